"""The reverse proxy through the real twistd process and the real mTLS echo upstream."""

from __future__ import annotations

import json
import socket
import ssl

import pytest
import yaml

from mtlsgate.identity import parse_xfcc
from tests.conftest import echo_json, free_port, gateway_args, gateway_starter, https_request, start_echo_upstream, started_processes


@pytest.fixture(scope="module")
def gateway(pki, tmp_path_factory):
    """One for the module's tests of it: none changes its state, and each reads only the log written after its own request."""
    tmp = tmp_path_factory.mktemp("proxy")
    with started_processes() as procs:
        upstream, _ = start_echo_upstream(procs, pki, tmp)
        yield gateway_starter(procs, tmp)(gateway_args(pki, upstream, "--timeout", "2s"))


def test_xfcc_carries_the_verified_identity_and_a_spoofed_one_is_removed(gateway, pki):
    status, _, body = https_request(
        gateway.port, "/", ca=pki["ca"], cert=pki["alice"],
        headers={"X-Forwarded-Client-Cert": 'Hash=00;Subject="CN=admin"', "X-Forwarded-For": "10.6.6.6", "x-forwarded-host": "evil"},
    )  # fmt: skip
    assert status == 200
    headers = echo_json(body)["headers"]
    assert len(headers["x-forwarded-client-cert"]) == 1
    [element] = parse_xfcc(headers["x-forwarded-client-cert"][0])
    assert element["URI"] == ["spiffe://test/ns/prod/sa/alice"]
    assert element["Hash"] == [pki["alice_obj"].certificate.fingerprint(__import__("cryptography.hazmat.primitives.hashes", fromlist=["SHA256"]).SHA256()).hex()]
    assert "CN=alice" in element["Subject"][0]
    assert headers["x-forwarded-for"] == ["127.0.0.1"]
    assert headers["x-forwarded-proto"] == ["https"]
    assert headers["x-forwarded-host"] == ["localhost"]


def test_hop_by_hop_headers_are_dropped(gateway, pki):
    status, _, body = https_request(
        gateway.port, "/", ca=pki["ca"], cert=pki["alice"],
        headers={"Connection": "keep-alive, X-Secret-Hop", "X-Secret-Hop": "1", "Keep-Alive": "timeout=5", "TE": "trailers", "X-Kept": "yes"},
    )  # fmt: skip
    assert status == 200
    headers = echo_json(body)["headers"]
    for name in ("x-secret-hop", "keep-alive", "te"):
        assert name not in headers
    assert headers["x-kept"] == ["yes"]
    assert headers["host"] == [f"127.0.0.1:{gateway_upstream_port(headers)}"]


def gateway_upstream_port(headers):
    return headers["host"][0].rsplit(":", 1)[1]


def test_unknown_host_is_404_not_the_first_route(gateway, pki):
    status, _, body = https_request(gateway.port, "/", ca=pki["ca"], cert=pki["alice"], host="other.example")
    assert status == 404
    assert b"no route" in body


def test_dead_upstream_gives_502_with_a_short_plain_body(start_gateway, pki):
    gateway = start_gateway(gateway_args(pki, free_port()))
    status, headers, body = https_request(gateway.port, "/", ca=pki["ca"], cert=pki["alice"])
    assert status == 502
    assert headers["content-type"].startswith("text/plain")
    assert b"Traceback" not in body and len(body) < 200
    # ... and the gateway keeps serving.
    assert https_request(gateway.port, "/", ca=pki["ca"], cert=pki["alice"])[0] == 502


def test_slow_upstream_gives_504_after_the_route_timeout(gateway, pki):
    status, _, body = https_request(gateway.port, "/slow/10", ca=pki["ca"], cert=pki["alice"])
    assert status == 504
    assert b"timed out" in body
    assert https_request(gateway.port, "/fast", ca=pki["ca"], cert=pki["alice"])[0] == 200


def test_failover_to_the_next_upstream_when_one_refuses_connections(start_gateway, pki, echo_upstream):
    dead = free_port()
    args = gateway_args(pki, echo_upstream)
    route = args.index("--route") + 1
    args[route] = f"localhost=https://127.0.0.1:{dead},https://127.0.0.1:{echo_upstream}"
    gateway = start_gateway(args)
    for _ in range(4):  # round robin starts on each target in turn; every request must succeed
        assert https_request(gateway.port, "/", ca=pki["ca"], cert=pki["alice"])[0] == 200


def test_upstream_name_mismatch_fails_closed(start_gateway, pki, echo_upstream):
    gateway = start_gateway(gateway_args(pki, echo_upstream, "--upstream-server-name", "not-the-upstream.example"))
    status, _, _ = https_request(gateway.port, "/", ca=pki["ca"], cert=pki["alice"])
    assert status == 502
    assert "TLS" in gateway.proc.wait_for_log("502 for GET")


def test_upstream_requiring_a_client_certificate_refuses_a_gateway_without_one(start_gateway, pki, echo_upstream):
    args = gateway_args(pki, echo_upstream)
    for flag in ("--upstream-cert", "--upstream-key"):
        i = args.index(flag)
        del args[i : i + 2]
    gateway = start_gateway(args)
    assert https_request(gateway.port, "/", ca=pki["ca"], cert=pki["alice"])[0] == 502


def test_http_listener_redirects_to_https_with_308(start_gateway, pki, echo_upstream):
    http_port = free_port()
    gateway = start_gateway(gateway_args(pki, echo_upstream, "--http", f"tcp:{http_port}:interface=127.0.0.1"))
    with socket.create_connection(("127.0.0.1", http_port)) as s:
        s.sendall(b"GET /a/b?c=1 HTTP/1.1\r\nHost: localhost:80\r\nConnection: close\r\n\r\n")
        response = b""
        while chunk := s.recv(4096):
            response += chunk
    assert response.startswith(b"HTTP/1.1 308")
    assert f"location: https://localhost:{gateway.port}/a/b?c=1".encode() in response.lower()


def _write_config(tmp_path, pki, upstream_port, routes, **top):
    config = {
        "address": f"tcp:{free_port()}:interface=127.0.0.1",
        "certificates": [{"cert": pki["gateway"][0], "key": pki["gateway"][1]}],
        "downstream_mtls": {"ca_file": pki["ca"], "enforcement": "policy"},
        "routes": [
            {
                "from": "https://localhost",
                "to": f"https://127.0.0.1:{upstream_port}",
                "tls_custom_ca_file": pki["ca"],
                "tls_client_cert_file": pki["gateway_client"][0],
                "tls_client_key_file": pki["gateway_client"][1],
                **route,
            }
            for route in routes
        ],
        **top,
    }
    path = tmp_path / "mtlsgate.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, int(config["address"].split(":")[1])


def test_allow_rules_per_route_by_cn_uri_and_fingerprint(start_gateway, pki, echo_upstream, tmp_path):
    bob_fingerprint = pki["bob_obj"].certificate.fingerprint(__import__("cryptography.hazmat.primitives.hashes", fromlist=["SHA256"]).SHA256()).hex()
    path, port = _write_config(tmp_path, pki, echo_upstream, [
        {"prefix": "/cn", "allow_client": {"cn": ["alice"]}},
        {"prefix": "/spiffe", "allow_client": {"uri": ["spiffe://test/ns/prod/sa/bob"]}},
        {"prefix": "/pinned", "allow_client": {"fingerprint_sha256": [bob_fingerprint.upper()]}},
        {"prefix": "/either", "allow_client": {"cn": ["alice"], "ou": ["ops"]}},
        {"prefix": "/"},
    ])  # fmt: skip
    start_gateway(["--config", str(path)], port=port)

    def status(who, path):
        return https_request(port, path, ca=pki["ca"], cert=pki[who])[0]

    assert (status("alice", "/cn/x"), status("bob", "/cn/x")) == (200, 403)
    assert (status("alice", "/spiffe"), status("bob", "/spiffe")) == (403, 200)
    assert (status("alice", "/pinned"), status("bob", "/pinned")) == (403, 200)
    assert (status("alice", "/either"), status("bob", "/either")) == (200, 200)  # OR: CN alice, or OU ops
    assert (status("alice", "/other"), status("bob", "/other")) == (200, 200)
    _, _, body = https_request(port, "/cn", ca=pki["ca"], cert=pki["bob"])
    assert b"not allowed here" in body


def test_preserve_host_header(start_gateway, pki, echo_upstream):
    gateway = start_gateway(gateway_args(pki, echo_upstream, "--preserve-host"))
    _, _, body = https_request(gateway.port, "/", ca=pki["ca"], cert=pki["alice"], host="localhost:8443")
    assert echo_json(body)["headers"]["host"] == ["localhost:8443"]


def test_access_log_file_has_one_line_per_request_with_the_identity(start_gateway, pki, echo_upstream, tmp_path):
    path = tmp_path / "access.log"
    gateway = start_gateway(gateway_args(pki, echo_upstream, "--access-log", str(path)))
    assert https_request(gateway.port, "/first", ca=pki["ca"], cert=pki["alice"])[0] == 200
    gateway.proc.stop()  # the access log is written by a thread; stopping flushes it
    lines = path.read_text().splitlines()
    first = [line for line in lines if "/first" in line]
    assert len(first) == 1, lines
    assert "spiffe://test/ns/prod/sa/alice" in first[0]
    assert " 200 " in first[0]
    assert "route=localhost" in first[0]
    assert "BEGIN" not in path.read_text()


def test_dot_segments_cannot_escape_a_route_prefix(gateway, pki):
    status, _, body = https_request(gateway.port, "/public/%2e%2e/admin", ca=pki["ca"], cert=pki["alice"])
    assert status == 400
    assert b"dot-segments" in body
    assert https_request(gateway.port, "/public/admin", ca=pki["ca"], cert=pki["alice"])[0] == 200


def test_json_access_log_parses_and_carries_the_spiffe_id(start_gateway, pki, echo_upstream, tmp_path):
    path = tmp_path / "access.jsonl"
    gateway = start_gateway(gateway_args(pki, echo_upstream, "--access-log", str(path), "--access-log-format", "json"))
    assert https_request(gateway.port, "/json?x=1", ca=pki["ca"], cert=pki["alice"], headers={"User-Agent": 'probe "1"'})[0] == 200
    assert https_request(gateway.port, "/", ca=pki["ca"], cert=pki["alice"], host="nowhere.example")[0] == 404
    gateway.proc.stop()  # flushes and closes the file
    records = [json.loads(line) for line in path.read_text().splitlines()]
    first, second = records
    assert first["spiffe_id"] == "spiffe://test/ns/prod/sa/alice"
    assert first["common_name"] == "alice"
    assert len(first["fingerprint_sha256"]) == 64
    assert (first["method"], first["uri"], first["status"], first["route"]) == ("GET", "/json?x=1", 200, "localhost/")
    assert first["user_agent"] == 'probe "1"'
    assert first["upstream"].startswith("https://127.0.0.1:")
    assert first["duration_s"] >= 0 and first["size"] > 0
    assert (second["status"], second["route"], second["upstream"]) == (404, "-", "-")


def test_http10_keepalive_is_honoured_when_the_length_is_known(gateway, pki):
    ctx = ssl.create_default_context(cafile=pki["ca"])
    ctx.load_cert_chain(*pki["alice"])
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", gateway.port), timeout=10), server_hostname="localhost") as s:
        reader = s.makefile("rb")
        for n in range(3):
            s.sendall(b"GET /bytes/10 HTTP/1.0\r\nHost: localhost\r\nConnection: keep-alive\r\n\r\n")
            assert reader.readline().startswith(b"HTTP/1.0 200"), n
            headers = {}
            while (line := reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                headers[name.lower()] = value.strip()
            assert headers["connection"].lower() == "keep-alive"
            assert len(reader.read(int(headers["content-length"]))) == 10


def test_an_upstream_that_goes_silent_mid_body_is_cut_off_after_the_route_timeout(gateway, pki):
    import time

    ctx = ssl.create_default_context(cafile=pki["ca"])
    ctx.load_cert_chain(*pki["alice"])
    started = time.monotonic()
    before = len(gateway.proc.output())
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", gateway.port), timeout=15), server_hostname="localhost") as s:
        s.sendall(b"GET /stall/1000 HTTP/1.1\r\nHost: localhost\r\n\r\n")
        received = b""
        try:
            while chunk := s.recv(65536):
                received += chunk
        except (ssl.SSLError, ConnectionError):
            pass
    assert received.startswith(b"HTTP/1.1 200") and b"Content-Length: 2000" in received
    assert time.monotonic() - started < 10  # cut off, not left hanging: the client sees a short body
    assert "UpstreamStalled: no bytes for 2s" in gateway.proc.wait_for_log("broke off the response", after=before)[before:]
    assert https_request(gateway.port, "/after", ca=pki["ca"], cert=pki["alice"])[0] == 200
