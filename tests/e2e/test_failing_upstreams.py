"""
Upstreams that misbehave on the wire, played by a small scripted TLS server (Python's ssl, in a
thread) that answers each connection with the next script: a nice server library would never send
these bytes.  Each time the client gets a bounded answer, the gateway logs why, and the next request
is served.
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
from typing import Callable

import pytest

from tests.conftest import ThreadedListener, gateway_args, https_request

Script = Callable[[ssl.SSLSocket], None]


def ok(conn: ssl.SSLSocket) -> None:
    body = b"healthy\n"
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))


def reset(conn: ssl.SSLSocket) -> None:
    """Close with SO_LINGER 0: the kernel sends RST instead of FIN, and TLS gets no close_notify."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


class ScriptedUpstream(ThreadedListener):
    """A TLS upstream requiring the gateway's client certificate; connection N gets C{scripts[N]} (the last repeats)."""

    def __init__(self, pki, scripts: list[Script]) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(*pki["upstream"])
        self.ctx.load_verify_locations(pki["ca"])
        self.ctx.verify_mode = ssl.CERT_REQUIRED
        self.scripts = scripts
        self.connections = 0
        super().__init__()

    def handle(self, raw: socket.socket) -> None:
        script = self.scripts[min(self.connections, len(self.scripts) - 1)]
        self.connections += 1
        raw.settimeout(15)
        try:
            with self.ctx.wrap_socket(raw, server_side=True) as conn:
                request = b""
                while b"\r\n\r\n" not in request and (chunk := conn.recv(65536)):
                    request += chunk
                script(conn)
        except OSError:
            pass  # the gateway gave up on us first: that is what some tests are about


@pytest.fixture
def scripted(pki):
    started: list[ScriptedUpstream] = []

    def start(*scripts: Script) -> ScriptedUpstream:
        upstream = ScriptedUpstream(pki, list(scripts))
        started.append(upstream)
        return upstream

    yield start
    for upstream in started:
        upstream.stop()


def read_until_closed(s: ssl.SSLSocket, seen: Callable[[bytes], None] = lambda data: None) -> bytes:
    """Everything until the gateway closes or resets the connection; a hang fails on the socket timeout."""
    received = b""
    try:
        while chunk := s.recv(65536):
            received += chunk
            seen(received)
    except (ssl.SSLError, ConnectionError):
        pass
    return received


def test_an_upstream_reset_mid_body_cuts_the_client_off_and_the_next_request_is_served(start_gateway, pki, scripted):
    client_has_part_of_the_body = threading.Event()

    def reset_mid_body(conn: ssl.SSLSocket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 100000\r\n\r\n" + b"x" * 10000)
        client_has_part_of_the_body.wait(15)  # so the reset surely lands mid-body, not before the headers
        reset(conn)

    upstream = scripted(reset_mid_body, ok)
    gateway = start_gateway(gateway_args(pki, upstream.port))
    ctx = ssl.create_default_context(cafile=pki["ca"])
    ctx.load_cert_chain(*pki["alice"])
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", gateway.port), timeout=15), server_hostname="localhost") as s:
        s.sendall(b"GET /big HTTP/1.1\r\nHost: localhost\r\n\r\n")

        def seen(data: bytes) -> None:
            head, _, body = data.partition(b"\r\n\r\n")
            if body:
                client_has_part_of_the_body.set()

        received = read_until_closed(s, seen)
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: 100000" in head
    assert 0 < len(body) < 100000  # cut off: the client can tell the body is short
    assert set(body) == {ord("x")}  # nothing but the upstream's bytes: no error page or traceback appended
    assert "ConnectionLost" in gateway.proc.wait_for_log(f"upstream https://127.0.0.1:{upstream.port} broke off the response")
    status, _, body = https_request(gateway.port, "/next", ca=pki["ca"], cert=pki["alice"])
    assert (status, body) == (200, b"healthy\n")


def test_an_upstream_reset_before_its_headers_are_complete_is_a_502(start_gateway, pki, scripted):
    def reset_in_headers(conn: ssl.SSLSocket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Le")
        reset(conn)

    upstream = scripted(reset_in_headers, ok)
    gateway = start_gateway(gateway_args(pki, upstream.port))
    status, headers, body = https_request(gateway.port, "/", ca=pki["ca"], cert=pki["alice"])
    assert status == 502 and headers["content-type"].startswith("text/plain")
    assert b"Traceback" not in body and len(body) < 200
    gateway.proc.wait_for_log("502 for GET / on route localhost/")
    assert https_request(gateway.port, "/", ca=pki["ca"], cert=pki["alice"])[:3:2] == (200, b"healthy\n")


def one_huge_header(conn: ssl.SSLSocket) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nX-Huge: " + b"h" * (200 * 1024) + b"\r\nContent-Length: 2\r\n\r\nhi")


def thousands_of_headers(conn: ssl.SSLSocket) -> None:
    headers = b"".join(b"X-Header-%d: some value\r\n" % i for i in range(5000))  # ~125 KiB, each line short
    conn.sendall(b"HTTP/1.1 200 OK\r\n" + headers + b"Content-Length: 2\r\n\r\nhi")


def endless_headers(conn: ssl.SSLSocket) -> None:
    for i in range(100000):  # until the gateway hangs up: the headers never end
        conn.sendall(b"X-Header-%d: and another one\r\n" % i if i else b"HTTP/1.1 200 OK\r\n")


@pytest.mark.parametrize("script", [one_huge_header, thousands_of_headers, endless_headers], ids=lambda s: s.__name__)
def test_oversized_response_headers_are_a_502_and_the_gateway_keeps_serving(start_gateway, pki, scripted, script):
    upstream = scripted(script, ok)
    gateway = start_gateway(gateway_args(pki, upstream.port))
    status, headers, body = https_request(gateway.port, "/", ca=pki["ca"], cert=pki["alice"])
    assert status == 502 and len(body) < 200
    assert len(headers) < 20
    log = gateway.proc.wait_for_log("502 for GET / on route localhost/")
    assert "response headers larger than 65536 bytes (max_response_header_size)" in log
    assert https_request(gateway.port, "/", ca=pki["ca"], cert=pki["alice"])[:3:2] == (200, b"healthy\n")
