"""Server certificates: SNI picks exact names, then wildcards, then the default; RSA and ECDSA; chains."""

from __future__ import annotations

import socket
import ssl
import subprocess

import pytest

from tests.conftest import free_port, gateway_args, gateway_starter, scrape, start_echo_upstream, started_processes, wait_for_port


def served_certificate(port: int, server_name: str | None, ca: str, cert: tuple[str, str]) -> dict:
    ctx = ssl.create_default_context(cafile=ca)
    ctx.check_hostname = False
    ctx.load_cert_chain(*cert)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        with ctx.wrap_socket(sock, server_hostname=server_name) as tls:
            return {"peer": tls.getpeercert(), "version": tls.version(), "alpn": tls.selected_alpn_protocol()}


def _names(info: dict) -> set[str]:
    return {value for kind, value in info["peer"]["subjectAltName"]}


@pytest.fixture(scope="module")
def sni_gateway(pki, tmp_path_factory):
    """One for the module's handshake-only tests: a handshake changes nothing of the gateway's state."""
    tmp = tmp_path_factory.mktemp("sni")
    with started_processes() as procs:
        upstream, _ = start_echo_upstream(procs, pki, tmp)
        yield start_sni_gateway(gateway_starter(procs, tmp), pki, upstream, tmp)


def start_sni_gateway(start_gateway, pki, echo_upstream, tmp_path, *extra: str):
    """The test CA's localhost certificate (the default), *.apps.example.com and exact.apps.example.com."""
    ca = pki["ca_obj"]
    inter = ca.issue_intermediate("test intermediate")
    files = []
    for name, issued in (
        ("wild", inter.issue_server(["*.apps.example.com"], rsa=True)),
        ("exact", ca.issue_server(["exact.apps.example.com"])),
    ):
        cert, key = str(tmp_path / f"{name}.pem"), str(tmp_path / f"{name}-key.pem")
        issued.write(cert, key)
        files += ["--cert", cert, "--key", key]
    return start_gateway(gateway_args(pki, echo_upstream, *files, *extra))


@pytest.mark.parametrize(
    "server_name, expected",
    [
        ("localhost", "localhost"),  # the default (first) certificate by name
        ("exact.apps.example.com", "exact.apps.example.com"),  # exact beats the wildcard
        ("web.apps.example.com", "*.apps.example.com"),  # wildcard, served with its intermediate
        ("unknown.example.org", "localhost"),  # unknown name: the default certificate
        (None, "localhost"),  # no SNI at all
    ],
)
def test_sni_picks_the_certificate(sni_gateway, pki, server_name, expected):
    info = served_certificate(sni_gateway.port, server_name, pki["ca"], pki["alice"])
    assert expected in _names(info)


@pytest.mark.parametrize("offered, chosen", [(["h2", "http/1.1"], "h2"), (["http/1.1", "h2"], "h2"), (["http/1.1"], "http/1.1")])
def test_tls13_is_preferred_and_alpn_prefers_h2_then_http11(sni_gateway, pki, offered, chosen):
    ctx = ssl.create_default_context(cafile=pki["ca"])
    ctx.load_cert_chain(*pki["alice"])
    ctx.set_alpn_protocols(offered)
    with socket.create_connection(("127.0.0.1", sni_gateway.port)) as sock:
        with ctx.wrap_socket(sock, server_hostname="localhost") as tls:
            assert tls.version() == "TLSv1.3"
            assert tls.selected_alpn_protocol() == chosen


def test_tls12_uses_only_ecdhe_aead_suites(sni_gateway, pki):
    ctx = ssl.create_default_context(cafile=pki["ca"])
    ctx.load_cert_chain(*pki["alice"])
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("ALL")
    with socket.create_connection(("127.0.0.1", sni_gateway.port)) as sock:
        with ctx.wrap_socket(sock, server_hostname="localhost") as tls:
            name, version, _ = tls.cipher()
            assert version == "TLSv1.2"
            assert name.startswith("ECDHE-") and ("GCM" in name or "CHACHA20" in name)
            assert tls.compression() is None


def test_cbc_only_client_is_refused(sni_gateway, pki):
    ctx = ssl.create_default_context(cafile=pki["ca"])
    ctx.load_cert_chain(*pki["alice"])
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("AES128-SHA:ECDHE-RSA-AES128-SHA:ECDHE-ECDSA-AES128-SHA")
    with socket.create_connection(("127.0.0.1", sni_gateway.port)) as sock:
        with pytest.raises(ssl.SSLError):
            ctx.wrap_socket(sock, server_hostname="localhost")


@pytest.mark.parametrize(
    "server_name, expected",
    [
        ("localhost", "localhost"),
        ("exact.apps.example.com", "exact.apps.example.com"),
        ("WEB.apps.example.com.", "*.apps.example.com"),  # names match case-insensitively, trailing dot or not
        (None, "localhost"),  # no SNI at all (a client connecting by IP address): still the default
    ],
)
def test_unknown_sni_reject_still_serves_every_name_a_certificate_carries(start_gateway, pki, echo_upstream, tmp_path, server_name, expected):
    gateway = start_sni_gateway(start_gateway, pki, echo_upstream, tmp_path, "--unknown-sni", "reject")
    assert expected in _names(served_certificate(gateway.port, server_name, pki["ca"], pki["alice"]))


def test_unknown_sni_reject_fails_the_handshake_with_unrecognized_name(start_gateway, pki, echo_upstream, tmp_path):
    admin = free_port()
    gateway = start_sni_gateway(start_gateway, pki, echo_upstream, tmp_path, "--unknown-sni", "reject", "--admin", f"tcp:{admin}")
    wait_for_port(admin, gateway.proc.popen, log=gateway.proc.log)
    for name in ("unknown.example.org", "a.b.apps.example.com"):  # a wildcard covers one label only
        with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
            served_certificate(gateway.port, name, pki["ca"], pki["alice"])
    s_client = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{gateway.port}", "-servername", "unknown.example",
         "-CAfile", pki["ca"], "-cert", pki["alice"][0], "-key", pki["alice"][1]],
        input=b"", capture_output=True, timeout=30,
    )  # fmt: skip
    output = (s_client.stdout + s_client.stderr).decode(errors="replace")
    assert "unrecognized name" in output and "alert number 112" in output
    assert "no peer certificate available" in output  # no certificate was shown to it
    log = gateway.proc.wait_for_log("the server name unknown.example it asked for")
    assert "refused TLS handshake from 127.0.0.1:" in log and "(unknown_sni: reject)" in log
    assert "Traceback" not in log
    assert scrape(admin)[("mtlsgate_tls_handshakes_total", (("reason", "unknown_sni"), ("result", "refused")))] == 3
    assert "localhost" in _names(served_certificate(gateway.port, "localhost", pki["ca"], pki["alice"]))  # and it goes on serving
