"""
Hostile or broken clients, over raw sockets (a well-behaved library would refuse to send these
bytes): each gets a bounded answer, nothing ambiguous reaches the upstream, and the gateway keeps
serving.
"""

from __future__ import annotations

import socket
import ssl
import time

import pytest
import yaml

from tests.conftest import echo_json, free_port, gateway_config, gateway_starter, https_request, start_echo_upstream, started_processes


def write_config(tmp_path, pki, upstream_port, port, **extra):
    config = gateway_config(pki, port, [f"https://127.0.0.1:{upstream_port}"], {"max_body_size": "64k"}, **extra)
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


LIMITS = {"handshake_timeout": "1s", "header_timeout": "1s", "idle_timeout": "3s", "max_connections": 20}


@pytest.fixture
def gateway(start_gateway, pki, echo_upstream, tmp_path):
    port = free_port()
    # With workers, max_connections is each worker's: every connection from the test's one address reaches one worker.
    config = write_config(tmp_path, pki, echo_upstream, port, limits=LIMITS, worker_affinity="client_ip")
    return start_gateway(["--config", str(config)], port=port)


@pytest.fixture(scope="module")
def shared_gateway(pki, tmp_path_factory):
    """The same gateway, one for the module's one-request tests (each a connection of its own, closed by the gateway's answer)."""
    tmp = tmp_path_factory.mktemp("hostile-clients")
    with started_processes() as procs:
        upstream, _ = start_echo_upstream(procs, pki, tmp)
        port = free_port()
        config = write_config(tmp, pki, upstream, port, limits=LIMITS, worker_affinity="client_ip")
        yield gateway_starter(procs, tmp)(["--config", str(config)], port=port)


def tls_socket(port: int, pki) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=pki["ca"])
    ctx.load_cert_chain(*pki["alice"])
    return ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname="localhost")


def exchange(port: int, pki, raw: bytes, wait: float = 5.0) -> bytes:
    """Send C{raw} over mTLS and read until the gateway closes (or C{wait} passes)."""
    with tls_socket(port, pki) as s:
        s.sendall(raw)
        s.settimeout(wait)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (TimeoutError, ssl.SSLError, ConnectionError):
            pass
        return out


def still_serving(port: int, pki) -> None:
    status, _, body = https_request(port, "/alive", ca=pki["ca"], cert=pki["alice"])
    assert status == 200 and echo_json(body)["uri"] == "/alive"


H = b"Host: localhost\r\n"

SMUGGLING = {
    "content-length and transfer-encoding": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "conflicting content-lengths": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    "duplicated content-length": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
    "content-length list": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5, 5\r\n\r\nhello",
    "chunked, identity": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    "identity": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: identity\r\n\r\nhello",
    "obs-fold": b"GET / HTTP/1.1\r\n" + H + b"X-A: a\r\n b\r\n\r\n",
    "bare LF": b"GET / HTTP/1.1\n" + H.replace(b"\r\n", b"\n") + b"\n",
    "invalid chunk size": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    "negative content-length": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: -1\r\n\r\n",
    "space before colon": b"GET / HTTP/1.1\r\n" + H + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    "no Host": b"GET / HTTP/1.1\r\n\r\n",
    "two Hosts": b"GET / HTTP/1.1\r\n" + H + b"Host: evil.example\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(SMUGGLING))
def test_ambiguous_framing_is_refused_with_400_and_never_forwarded(shared_gateway, pki, name):
    answer = exchange(shared_gateway.port, pki, SMUGGLING[name], wait=3)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert b'"method"' not in answer  # the echo upstream never saw it
    still_serving(shared_gateway.port, pki)


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n" + H + b"\r\n", b"414"),
        (b"GET / HTTP/1.1\r\n" + H + b"X-Big: " + b"a" * 9000 + b"\r\n\r\n", b"431"),
        (b"GET / HTTP/1.1\r\n" + H + b"".join(b"X-%d: v\r\n" % i for i in range(150)) + b"\r\n", b"431"),
        (b"GET / HTTP/1.1\r\n" + H + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 4000) for i in range(10)) + b"\r\n", b"431"),
    ],
    ids=["long request line", "long header line", "too many headers", "headers too large"],
)
def test_oversized_requests_get_414_or_431(shared_gateway, pki, raw, status):
    assert exchange(shared_gateway.port, pki, raw).startswith(b"HTTP/1.1 " + status)
    still_serving(shared_gateway.port, pki)


def test_request_body_over_the_routes_limit_gets_413(gateway, pki):
    big = b"x" * (65 * 1024)
    declared = exchange(gateway.port, pki, b"POST /up HTTP/1.1\r\n" + H + b"Content-Length: %d\r\n\r\n" % len(big) + big)
    assert declared.startswith(b"HTTP/1.1 413 ")
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in [big[i : i + 8192] for i in range(0, len(big), 8192)]) + b"0\r\n\r\n"
    streamed = exchange(gateway.port, pki, b"POST /up HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n" + chunked)
    assert streamed.startswith(b"HTTP/1.1 413 "), streamed[:200]
    small = https_request(gateway.port, "/up", ca=pki["ca"], cert=pki["alice"], method="POST", body=b"y" * 1000)
    assert small[0] == 200 and echo_json(small[2])["body_bytes"] == 1000


def test_slowloris_headers_get_408_after_the_header_timeout(gateway, pki):
    with tls_socket(gateway.port, pki) as s:
        started = time.monotonic()
        s.sendall(b"GET / HTTP/1.1\r\n")
        answer = b""
        s.settimeout(0.3)
        while time.monotonic() - started < 8:
            try:
                s.sendall(b"X-Drip: 1\r\n")  # a header now and then keeps the idle timer happy, not the header timer
            except (ssl.SSLError, OSError):
                break
            try:
                chunk = s.recv(4096)
            except TimeoutError:
                continue
            if not chunk:
                break
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 408 ")
        assert time.monotonic() - started < 5
    still_serving(gateway.port, pki)


def test_a_connection_that_never_says_hello_is_closed_after_the_handshake_timeout(gateway, pki):
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as s:
        started = time.monotonic()
        try:
            assert s.recv(100) == b""  # closed by the gateway
        except ConnectionResetError:
            pass
        assert time.monotonic() - started < 5
    assert "not done within 1s" in gateway.proc.output()
    still_serving(gateway.port, pki)


def test_plain_http_on_the_tls_port_is_refused(gateway, pki):
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        try:
            answer = s.recv(100)
        except ConnectionError:
            answer = b""
        assert b"200" not in answer
    gateway.proc.wait_for_log("TLS handshake with 127.0.0.1")
    still_serving(gateway.port, pki)


def test_a_connection_flood_is_refused_beyond_max_connections(gateway, pki):
    held: list[ssl.SSLSocket] = []
    try:
        for _ in range(25):  # max_connections is 20; the start-up probe's connection may still count for a moment
            try:
                held.append(tls_socket(gateway.port, pki))
            except (ssl.SSLError, ConnectionError, OSError):
                break
        assert 19 <= len(held) <= 20
        assert "refused: at max_connections (20)" in gateway.proc.wait_for_log("max_connections")
    finally:
        for s in held:
            s.close()
    deadline = time.monotonic() + 10
    while True:
        try:
            still_serving(gateway.port, pki)
            break
        except (ssl.SSLError, ConnectionError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_hsts_is_sent_on_https_responses(gateway, pki):
    _, headers, _ = https_request(gateway.port, "/", ca=pki["ca"], cert=pki["alice"])
    assert headers["strict-transport-security"] == "max-age=31536000"
