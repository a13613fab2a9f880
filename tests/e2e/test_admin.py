"""The admin listener: Prometheus metrics that move with real traffic, health and readiness."""

from __future__ import annotations

import ssl

import pytest

from tests.conftest import admin_get as get
from tests.conftest import free_port, gateway_args, https_request, scrape, wait_for_port


def test_metrics_count_requests_handshakes_and_rejections(start_gateway, pki, echo_upstream):
    admin = free_port()
    gateway = start_gateway(gateway_args(pki, echo_upstream, "--admin", f"tcp:{admin}"))
    wait_for_port(admin, gateway.proc.popen, log=gateway.proc.log)
    before = scrape(admin)
    assert ("mtlsgate_active_connections", ()) in before

    for _ in range(3):
        assert https_request(gateway.port, "/", ca=pki["ca"], cert=pki["alice"])[0] == 200
    assert https_request(gateway.port, "/", ca=pki["ca"], cert=pki["alice"], host="nowhere.example")[0] == 404
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        https_request(gateway.port, "/", ca=pki["ca"], cert=pki["stranger"])
    gateway.proc.wait_for_log("refused client certificate")

    after = scrape(admin)
    assert after[("mtlsgate_requests_total", (("route", "localhost/"), ("status", "200")))] == 3
    assert after[("mtlsgate_requests_total", (("route", "-"), ("status", "404")))] == 1
    assert after[("mtlsgate_tls_handshakes_total", (("reason", "untrusted issuer"), ("result", "rejected")))] == 1
    assert after[("mtlsgate_tls_handshakes_total", (("reason", ""), ("result", "ok")))] >= 4
    assert after[("mtlsgate_upstream_latency_seconds_count", (("route", "localhost/"),))] == 3
    expiry = after[("mtlsgate_certificate_expiry_seconds", (("name", "localhost"),))]
    assert 0 < expiry < 900 * 86400


def test_health_and_readiness(start_gateway, pki, echo_upstream):
    admin = free_port()
    gateway = start_gateway(gateway_args(pki, echo_upstream, "--admin", f"tcp:{admin}"))
    wait_for_port(admin, gateway.proc.popen, log=gateway.proc.log)
    assert get(admin, "/healthz") == (200, "ok\n")
    assert get(admin, "/readyz") == (200, "ready\n")


def test_readiness_fails_while_autocert_has_nothing_to_serve(start_gateway, tmp_path):
    admin = free_port()
    dead = f"https://127.0.0.1:{free_port()}/dir"
    gateway = start_gateway(
        ["--admin", f"tcp:{admin}", "--certs-dir", str(tmp_path / "certs"), "--acme-directory", dead, "--acme-domain", "ready.example.test"],
    )  # fmt: skip
    wait_for_port(admin, gateway.proc.popen, log=gateway.proc.log)
    code, text = get(admin, "/readyz")
    assert code == 503
    assert "no certificate yet" in text
    assert get(admin, "/healthz")[0] == 200
