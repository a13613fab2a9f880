"""
Autocert end to end: the real twistd gateway gets real certificates from a real ACME server
(Debian's pebble, with pebble-challtestsrv as its DNS), over each challenge type.
"""

from __future__ import annotations

import os
import re
import resource
import socket
import ssl
import stat
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from tests.acme.pebble import write_dns_hook
from tests.conftest import free_port, scrape

ISSUED = "installed the certificate for"
REFRESHED = "certificates refreshed: serving"


def issued_everywhere(gateway, timeout: float = 60, after: int = 0) -> str:
    """
    The log once a certificate is issued (past C{after}) and every serving process serves it: with
    workers, worker 0 issues it and the others load it from certs_dir a moment later.
    """
    gateway.proc.wait_for_log(ISSUED, timeout=timeout, after=after)
    return gateway.wait_for_each(REFRESHED, timeout=timeout, after=after)


def served_certificate(port: int, server_name: str, ca_pem: bytes | None = None, client: tuple[str, str] | None = None) -> x509.Certificate:
    """Handshake with SNI C{server_name}; with C{ca_pem}, verify the chain and name against it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca_pem is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx.load_verify_locations(cadata=ca_pem.decode())
    if client is not None:
        ctx.load_cert_chain(*client)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=server_name) as tls:
            return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))


def write_config(path: Path, **autocert) -> Path:
    https, http = autocert.pop("https"), autocert.pop("http", None)
    certs_dir = autocert.pop("certs_dir")
    extra = autocert.pop("extra", {})
    config = {"address": f"tcp:{https}:interface=127.0.0.1", "certs_dir": str(certs_dir), "autocert": autocert, **extra}
    if http:
        config["http_address"] = f"tcp:{http}:interface=127.0.0.1"
    path.write_text(yaml.safe_dump(config))
    return path


def autocert_settings(pebble, **more):
    return {"directory": pebble.directory_url, "ca_file": str(pebble.ca_file), "email": "ops@example.test", "retry_interval": "1s", **more}


def http01_setup(start_pebble, tmp_path: Path, name: str, *, nonce_reject_percent: int = 0, extra=None, **settings):
    """pebble validating over http-01 against the gateway's HTTP listener; returns (pebble, https port, config)."""
    https, http = free_port(), free_port()
    pebble = start_pebble(http_port=http, tls_port=free_port(), nonce_reject_percent=nonce_reject_percent)
    config = write_config(tmp_path / "gw.yaml", https=https, http=http, certs_dir=tmp_path / "certs", extra=extra or {},
                          **autocert_settings(pebble, domains=[name], challenges=["http-01"], **settings))  # fmt: skip
    return pebble, https, config


def test_http01_issues_a_certificate_that_verifies_against_the_ca_root(start_pebble, start_gateway, tmp_path):
    admin = free_port()
    pebble, https, config = http01_setup(start_pebble, tmp_path, "web.example.test", extra={"admin_address": f"tcp:{admin}"})
    certs = tmp_path / "certs"
    gateway = start_gateway(["--config", str(config)], port=https)
    log = issued_everywhere(gateway)
    assert "answered the http-01 challenge" in log
    leaf = served_certificate(https, "web.example.test", pebble.root_pem() + pebble.intermediate_pem())
    assert leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName) == ["web.example.test"]
    assert stat.S_IMODE(os.stat(certs / "web.example.test.pem").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(certs / "acme-account.key").st_mode) == 0o600
    assert "PRIVATE KEY" not in log
    metrics = scrape(admin)
    assert metrics[("mtlsgate_acme_orders_total", (("result", "issued"),))] == 1
    assert metrics[("mtlsgate_certificate_expiry_seconds", (("name", "web.example.test"),))] > 30 * 86400


def test_tls_alpn01_is_answered_by_the_mtls_listener_itself(start_pebble, start_gateway, tmp_path, pki):
    https = free_port()
    pebble = start_pebble(http_port=free_port(), tls_port=https)
    config = write_config(
        tmp_path / "gw.yaml", https=https, certs_dir=tmp_path / "certs",
        # The validator has no client certificate, and asks for a name no certificate carries yet.
        extra={"downstream_mtls": {"ca_file": pki["ca"]}, "unknown_sni": "reject"},
        **autocert_settings(pebble, domains=["alpn.example.test"], challenges=["tls-alpn-01"]),
    )  # fmt: skip
    gateway = start_gateway(["--config", str(config)], port=https)
    issued_everywhere(gateway)
    leaf = served_certificate(https, "alpn.example.test", pebble.root_pem() + pebble.intermediate_pem(), client=pki["alice"])
    assert leaf.issuer != leaf.subject
    with pytest.raises(ssl.SSLError):  # mTLS still holds for everyone else
        served_certificate(https, "alpn.example.test", pebble.root_pem() + pebble.intermediate_pem())
        raise ssl.SSLError("handshake passed without a client certificate")
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):  # names under validation only, not any name
        served_certificate(https, "other.example.test", client=pki["alice"])


def test_with_workers_one_issues_and_every_worker_serves_the_certificate(start_pebble, start_gateway, tmp_path, pki):
    """The validator may reach either worker; the worker without autocert picks the certificate up from certs_dir."""
    import time

    https = free_port()
    pebble = start_pebble(http_port=free_port(), tls_port=https)
    config = write_config(
        tmp_path / "gw.yaml", https=https, certs_dir=tmp_path / "certs",
        extra={"downstream_mtls": {"ca_file": pki["ca"]}, "workers": 2},
        **autocert_settings(pebble, domains=["workers.example.test"], challenges=["tls-alpn-01"]),
    )  # fmt: skip
    gateway = start_gateway(["--config", str(config)], port=https)
    gateway.proc.wait_for_log(ISSUED, timeout=60)
    trust = pebble.root_pem() + pebble.intermediate_pem()
    deadline = time.monotonic() + 20
    while True:  # 20 new connections in a row, spread over both workers, all get the issued certificate
        try:
            for _ in range(20):
                served_certificate(https, "workers.example.test", trust, client=pki["alice"])
            break
        except ssl.SSLError:
            assert time.monotonic() < deadline, "a worker still serves the placeholder"
            time.sleep(0.5)
    out = gateway.proc.output()
    assert out.count(ISSUED) == 1 and "[worker-0]" in out and "[worker-1]" in out
    assert not list((tmp_path / "certs" / ".tls-alpn-01").glob("*.pem"))  # published only while validating


def test_dns01_issues_a_wildcard_with_its_apex(start_pebble, start_gateway, tmp_path):
    https = free_port()
    pebble = start_pebble(http_port=free_port(), tls_port=free_port())
    hook = write_dns_hook(tmp_path / "dns-hook", pebble)
    config = write_config(
        tmp_path / "gw.yaml", https=https, certs_dir=tmp_path / "certs",
        **autocert_settings(
            pebble, domains=[["*.apps.example.test", "apps.example.test"]], challenges=["dns-01"],
            dns_hook=str(hook), dns_resolver="%s:%d" % pebble.dns_address, propagation_timeout="20s",
        ),
    )  # fmt: skip
    gateway = start_gateway(["--config", str(config)], port=https)
    log = issued_everywhere(gateway, timeout=90)
    assert "TXT _acme-challenge.apps.example.test is visible" in log
    trust = pebble.root_pem() + pebble.intermediate_pem()
    for name in ("web.apps.example.test", "apps.example.test"):
        leaf = served_certificate(https, name, trust)
        names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
        assert sorted(names) == ["*.apps.example.test", "apps.example.test"]
    assert (tmp_path / "certs" / "_.apps.example.test.pem").exists()


def test_restart_reuses_the_account_and_the_stored_certificate(start_pebble, start_gateway, tmp_path):
    _, https, config = http01_setup(start_pebble, tmp_path, "again.example.test")
    certs = tmp_path / "certs"
    first = start_gateway(["--config", str(config)], port=https)
    issued_everywhere(first)
    account_key = (certs / "acme-account.key").read_bytes()
    issued = served_certificate(https, "again.example.test")
    first.proc.stop()

    second = start_gateway(["--config", str(config)], port=https)
    assert served_certificate(https, "again.example.test").serial_number == issued.serial_number  # served at once
    second.proc.wait_for_log("stored certificate for again.example.test")
    log = second.proc.output()
    assert "ordered a certificate" not in log
    assert (certs / "acme-account.key").read_bytes() == account_key


def test_renewal_replaces_the_served_certificate_without_a_restart(start_pebble, start_gateway, tmp_path):
    # Renewed every second or so: with workers, every connection of the test reaches one worker
    # (client_ip), whose own refreshes the test waits for.
    _, https, config = http01_setup(start_pebble, tmp_path, "renew.example.test", renew_before="36500d", check_interval="1s",
                                    extra={"worker_affinity": "client_ip"})  # fmt: skip
    gateway = start_gateway(["--config", str(config)], port=https)
    issued_everywhere(gateway)
    refreshed = gateway.log_prefix() + REFRESHED
    with socket.create_connection(("127.0.0.1", https)) as held:  # a connection open across the swap
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        with ctx.wrap_socket(held, server_hostname="renew.example.test") as tls:
            first = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
            wait_for_count(gateway.proc, refreshed, gateway.proc.output().count(refreshed) + 1, timeout=60)  # a renewal, installed
            tls.sendall(b"GET / HTTP/1.1\r\nHost: renew.example.test\r\n\r\n")
            assert tls.recv(100).startswith(b"HTTP/1.1 404")  # still served, on the old certificate
    assert served_certificate(https, "renew.example.test").serial_number != first.serial_number


def test_a_renewal_the_disk_has_no_room_for_leaves_the_served_certificate_until_it_has(start_pebble, start_gateway, tmp_path):
    _, https, config = http01_setup(start_pebble, tmp_path, "full.example.test")
    first = start_gateway(["--config", str(config)], port=https)
    first.proc.wait_for_log(ISSUED, timeout=60)
    first.proc.stop()
    certs = tmp_path / "certs"
    path = certs / "full.example.test.pem"
    before = path.read_bytes()
    old = x509.load_pem_x509_certificates(before)[0]

    # Started again due for renewal at once, and with room for 512 bytes per file: the renewed
    # certificate cannot be written (EFBIG, as on a full disk); the gateway's log goes through a pipe.
    settings = yaml.safe_load(config.read_text())
    settings["autocert"]["renew_before"] = "36500d"
    config.write_text(yaml.safe_dump(settings))
    gateway = start_gateway(["--config", str(config)], port=https, file_size_limit=512)
    log = gateway.proc.wait_for_log("certificate for full.example.test issued but not stored (attempt 1)", timeout=60)
    assert f"{path}: cannot write (File too large) (disk full, quota or file size limit)" in log
    assert "Traceback" not in log
    assert path.read_bytes() == before
    assert [p.name for p in certs.iterdir() if p.name.startswith(".")] == []
    assert served_certificate(https, "full.example.test").serial_number == old.serial_number

    for pid in [gateway.proc.popen.pid, *worker_pids(gateway)]:  # with workers, worker 0 is the one writing
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    log = issued_everywhere(gateway)
    until_stored = log[: log.index(ISSUED)]
    assert "storing the certificate for full.example.test issued earlier, without a new order" in until_stored
    assert until_stored.count("ordered a certificate for full.example.test") == 1  # one order, stored on a later try
    assert served_certificate(https, "full.example.test").serial_number != old.serial_number  # renewed, without a restart
    assert x509.load_pem_x509_certificates(path.read_bytes())[0].serial_number != old.serial_number


def test_nonce_rejections_are_retried(start_pebble, start_gateway, tmp_path):
    _, https, config = http01_setup(start_pebble, tmp_path, "nonce.example.test", nonce_reject_percent=60)
    gateway = start_gateway(["--config", str(config)], port=https)
    log = gateway.proc.wait_for_log(ISSUED, timeout=90)
    assert "badNonce from" in log


EAB_KEYS = {"kid-1": "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W"}


def test_external_account_binding(start_pebble, start_gateway, tmp_path):
    https, http = free_port(), free_port()
    pebble = start_pebble(http_port=http, tls_port=free_port(), eab=EAB_KEYS)
    settings = autocert_settings(pebble, domains=["eab.example.test"], challenges=["http-01"])
    missing = write_config(tmp_path / "missing.yaml", https=https, http=http, certs_dir=tmp_path / "certs", **settings)
    gateway = start_gateway(["--config", str(missing)], port=https)
    log = gateway.proc.wait_for_log("not issued (attempt 1)", timeout=30)
    assert "requires external account binding (autocert.eab: key_id, mac_key)" in log
    gateway.proc.stop()

    bound = write_config(tmp_path / "bound.yaml", https=https, http=http, certs_dir=tmp_path / "certs",
                         **settings, eab={"key_id": "kid-1", "mac_key": EAB_KEYS["kid-1"]})  # fmt: skip
    gateway = start_gateway(["--config", str(bound)], port=https)
    gateway.proc.wait_for_log(ISSUED, timeout=60)


def test_a_ca_that_is_down_leaves_the_served_certificates_alone(start_gateway, tmp_path, pki):
    https = free_port()
    dead = f"https://127.0.0.1:{free_port()}/dir"
    config = write_config(
        tmp_path / "gw.yaml", https=https, certs_dir=tmp_path / "certs",
        extra={"certificates": [{"cert": pki["gateway"][0], "key": pki["gateway"][1]}]},
        directory=dead, ca_file=pki["ca"], domains=["down.example.test"], challenges=["tls-alpn-01"], retry_interval="1s",
    )  # fmt: skip
    gateway = start_gateway(["--config", str(config)], port=https)
    log = gateway.proc.wait_for_log("(attempt 2)", timeout=30)
    assert "certificate for down.example.test not issued (attempt 1)" in log
    assert "Connection refused" in log or "connection refused" in log.lower()
    assert "Traceback" not in log
    leaf = served_certificate(https, "localhost", Path(pki["ca"]).read_bytes())
    assert leaf.subject.rfc4514_string() == pki["gateway_obj"].certificate.subject.rfc4514_string()


def test_failed_validation_is_reported_with_the_cas_detail_and_retried(start_pebble, start_gateway, tmp_path):
    https, http = free_port(), free_port()
    pebble = start_pebble(http_port=free_port(), tls_port=free_port())  # the VA knocks where nobody listens
    config = write_config(tmp_path / "gw.yaml", https=https, http=http, certs_dir=tmp_path / "certs",
                          **autocert_settings(pebble, domains=["fail.example.test"], challenges=["http-01"]))  # fmt: skip
    gateway = start_gateway(["--config", str(config)], port=https)
    log = gateway.proc.wait_for_log("not issued (attempt 1)", timeout=60)
    assert "authorization for fail.example.test failed: urn:ietf:params:acme:error:" in log
    assert "retrying in" in log
    assert "Traceback" not in log
    assert not (tmp_path / "certs" / "fail.example.test.pem").exists()


def test_a_failing_dns_hook_is_reported_clearly(start_pebble, start_gateway, tmp_path):
    https = free_port()
    pebble = start_pebble(http_port=free_port(), tls_port=free_port())
    hook = tmp_path / "broken-hook"
    hook.write_text("#!/bin/sh\necho 'no credentials for the DNS API' >&2\nexit 3\n")
    hook.chmod(0o755)
    config = write_config(tmp_path / "gw.yaml", https=https, certs_dir=tmp_path / "certs",
                          **autocert_settings(pebble, domains=["*.hook.example.test"], challenges=["dns-01"], dns_hook=str(hook)))  # fmt: skip
    gateway = start_gateway(["--config", str(config)], port=https)
    log = gateway.proc.wait_for_log("not issued (attempt 1)", timeout=60)
    assert "exited with 3: no credentials for the DNS API" in log


def worker_pids(gateway) -> list[int]:
    """The worker processes of a gateway started with workers (none for one process), from its log."""
    return [int(pid) for pid in re.findall(r"worker \d+ started \(pid (\d+)\)", gateway.proc.output())]


def wait_for_count(proc, text: str, count: int, timeout: float) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.output().count(text) >= count:
            return
        time.sleep(0.1)
    raise AssertionError(f"{text!r} seen {proc.output().count(text)} times, wanted {count}:\n{proc.output()}")


class _RenewalInfoCA:
    """
    pebble 2.4 has no ARI: this HTTPS server hands out pebble's directory with a C{renewalInfo}
    entry added, and answers that endpoint with a window that has already begun.  Everything
    else (orders, validation, issuance) is pebble's, over the URLs in its own directory.
    """

    def __init__(self, pebble, cert: tuple[str, str]) -> None:
        import http.server
        import json
        import threading
        import urllib.request
        from datetime import datetime, timedelta, timezone

        self.asked: list[str] = []
        outer = self
        pebble_context = ssl.create_default_context(cafile=str(pebble.ca_file))

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                if self.path == "/dir":
                    with urllib.request.urlopen(pebble.directory_url, context=pebble_context) as r:
                        directory = json.load(r)
                    directory["renewalInfo"] = f"https://localhost:{outer.port}/ari/"
                    body = json.dumps(directory).encode()
                elif self.path.startswith("/ari/"):
                    outer.asked.append(self.path[len("/ari/"):])
                    now = datetime.now(timezone.utc)
                    window = {"start": (now - timedelta(days=2)).strftime("%Y-%m-%dT%H:%M:%SZ"), "end": (now - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")}
                    body = json.dumps({"suggestedWindow": window}).encode()
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*cert)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_renewal_follows_the_cas_renewal_information(start_pebble, start_gateway, tmp_path, pki):
    https, http = free_port(), free_port()
    pebble = start_pebble(http_port=http, tls_port=free_port())
    ari = _RenewalInfoCA(pebble, pki["gateway"])
    try:
        trust = tmp_path / "trust.pem"
        trust.write_bytes(Path(pebble.ca_file).read_bytes() + Path(pki["ca"]).read_bytes())
        config = write_config(
            tmp_path / "gw.yaml", https=https, http=http, certs_dir=tmp_path / "certs",
            **{**autocert_settings(pebble, domains=["ari.example.test"], challenges=["http-01"]),
               "directory": f"https://localhost:{ari.port}/dir", "ca_file": str(trust)},
        )  # fmt: skip
        gateway = start_gateway(["--config", str(config)], port=https)
        issued_everywhere(gateway)
        first = served_certificate(https, "ari.example.test")
        wait_for_count(gateway.proc, ISSUED, 2, timeout=60)
        assert "CA suggests renewing between" in gateway.proc.output()
        from mtlsgate.acme.client import ari_certificate_id

        assert ari_certificate_id(first) in ari.asked
    finally:
        ari.stop()
