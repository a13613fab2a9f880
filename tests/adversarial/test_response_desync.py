"""
The attacker's suite for response desync (issue #12): an upstream that frames its answer so that
bytes of it outlive the response they belong to.  No byte of one response may reach the client as
(part of) another response, on the client's connection or through the upstream keep-alive pool; a
pooled upstream connection is never used again after an anomaly.

The upstream is a scripted TLS server (raw bytes); clients are raw mTLS sockets against the real
twistd gateway.
"""

from __future__ import annotations

import io
import http.client
import socket
import ssl
from typing import Callable

import pytest

from tests.conftest import gateway_args
from tests.e2e.test_failing_upstreams import read_until_closed, scripted  # noqa: F401  (scripted: a fixture)

FORGED = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nX-Forged: 1\r\n\r\nforged"
SECOND = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond"


def keep_serving(first: bytes) -> Callable[[ssl.SSLSocket], None]:
    """A script: C{first} (exact bytes) for the connection's first request, then C{SECOND} for every later one on it."""

    def script(conn: ssl.SSLSocket) -> None:
        conn.sendall(first)
        pending = b""
        while True:
            try:
                chunk = conn.recv(65536)
            except (OSError, ssl.SSLError):
                return
            if not chunk:
                return
            pending += chunk
            while b"\r\n\r\n" in pending:
                _, _, pending = pending.partition(b"\r\n\r\n")
                conn.sendall(SECOND)

    return script


def _alice(port: int, pki) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=pki["ca"])
    ctx.load_cert_chain(*pki["alice"])
    return ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=15), server_hostname="localhost")


def responses(raw: bytes) -> list[tuple[int, bytes]]:
    """The responses in C{raw}, parsed in turn as a client does (status, body)."""
    class _Unclosed(io.BytesIO):
        def close(self) -> None:  # HTTPResponse closes its file after each body: the next response is on it
            pass

    stream, out = _Unclosed(raw), []

    class _Sock:
        def makefile(self, mode: str) -> io.BytesIO:
            return stream

    while stream.tell() < len(raw):
        response = http.client.HTTPResponse(_Sock())  # type: ignore[arg-type]
        try:
            response.begin()
        except http.client.HTTPException:
            out.append((0, stream.read()))
            break
        out.append((response.status, response.read()))
    return out


# A 1xx response has no content (RFC 9110 15.2); llhttp reads one for 1xx codes other than 100, 102, 103 when it is
# framed, and the gateway used to pass those bytes on as the start of the final response's body, past its Content-Length.
INTERIM_WITH_BODY = [
    pytest.param(b"HTTP/1.1 199 Odd\r\nContent-Length: %d\r\n\r\n%s" % (len(FORGED), FORGED), id="1xx-content-length"),
    pytest.param(b"HTTP/1.1 150 Odd\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(FORGED), FORGED), id="1xx-chunked"),
]


@pytest.mark.parametrize("interim", INTERIM_WITH_BODY)
def test_a_1xx_response_with_a_body_never_puts_a_response_on_the_clients_connection(start_gateway, pki, scripted, interim):  # noqa: F811
    upstream = scripted(keep_serving(interim + b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"), keep_serving(SECOND))
    gateway = start_gateway(gateway_args(pki, upstream.port))
    with _alice(gateway.port, pki) as s:
        s.sendall(b"GET /one HTTP/1.1\r\nHost: localhost\r\n\r\nGET /two HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        received = read_until_closed(s)
    assert b"forged" not in received, responses(received)
    answers = responses(received)
    assert answers[0][0] == 502  # the upstream broke HTTP: its answer is not relayed
    assert answers[-1] == (200, b"second")
    assert "Traceback" not in gateway.proc.log.read_text()


# Upstream answers that carry bytes past their end: the extra bytes must never be read as the answer to a later request.
EXTRA_BYTES = [
    pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst" + FORGED, id="two-responses-for-one-request"),
    pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nfirst" + FORGED, id="body-longer-than-content-length"),
    pytest.param(b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nfirst" + FORGED, id="204-with-a-body"),
    pytest.param(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\nfirst" + FORGED, id="304-with-a-body"),
    pytest.param(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n0\r\n\r\n" + FORGED, id="chunked-then-a-response"),
    pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n0\r\n\r\n" + FORGED, id="cl-and-te"),
    pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nfirst" + FORGED, id="two-content-lengths"),
    pytest.param(b"HTTP/1.1 100 Continue\r\n\r\n" * 3000 + b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst", id="1xx-flood"),
]


@pytest.mark.parametrize("answer", EXTRA_BYTES)
def test_bytes_past_an_upstream_response_never_answer_another_request(start_gateway, pki, scripted, answer):  # noqa: F811
    upstream = scripted(keep_serving(answer), keep_serving(SECOND))
    gateway = start_gateway(gateway_args(pki, upstream.port))
    with _alice(gateway.port, pki) as s:
        s.sendall(b"GET /one HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        first = read_until_closed(s)
    assert b"forged" not in first
    with _alice(gateway.port, pki) as s:  # another client connection: the gateway's pool is where the forged bytes would wait
        s.sendall(b"GET /two HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        second = read_until_closed(s)
    assert b"forged" not in second
    assert responses(second) == [(200, b"second")]
    assert upstream.connections == 2  # the connection that misbehaved was not reused
    assert "Traceback" not in gateway.proc.log.read_text()
