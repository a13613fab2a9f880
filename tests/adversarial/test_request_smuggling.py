"""
The attacker's suite for request smuggling against the HTTP/1.1 engine (issue #12): exact bytes over
a real mTLS socket against the real twistd gateway and echo upstream, each followed by a second
request that a parser disagreeing with the gateway's would read differently.  What the gateway
accepts, it forwards re-framed (the upstream sees one request per request, the body the gateway
read); what is ambiguous is refused with 400 before routing, and no byte after a refusal is ever
processed.
"""

from __future__ import annotations

import hashlib
import json
import socket
import ssl

import pytest

from tests.adversarial.test_request_framing import gateway  # noqa: F401  (a module-scoped fixture)
from tests.adversarial.test_response_desync import responses

H = b"Host: localhost\r\n"
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: localhost\r\n\r\n"
LAST = b"GET /last HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
CHUNKED = b"POST /one HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n"


def send(port: int, pki, raw: bytes, head_first: bool = False) -> list[tuple[int, bytes]]:
    """C{raw} over mTLS as alice, read until the gateway closes: the responses, in order (the first to a HEAD: no body)."""
    ctx = ssl.create_default_context(cafile=pki["ca"])
    ctx.load_cert_chain(*pki["alice"])
    out = b""
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname="localhost") as s:
        s.sendall(raw)
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (ssl.SSLError, ConnectionError):
            pass
    if head_first:
        head, _, rest = out.partition(b"\r\n\r\n")
        return [(int(head.split(b" ")[1]), b"")] + responses(rest)
    return responses(out)


def echo(answer: tuple[int, bytes]) -> dict:
    assert answer[0] == 200, answer
    return json.loads(answer[1])


# Ambiguous framing: a 400 from the gateway, then the connection closes; the bytes behind it are never a request.
REFUSED = [
    pytest.param(b"POST /one HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n", id="te-chunked-chunked"),
    pytest.param(b"POST /one HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", id="te-twice"),
    pytest.param(b"POST /one HTTP/1.1\r\n" + H + b"Transfer-Encoding: identity\r\nContent-Length: 5\r\n\r\nhello", id="te-identity"),
    pytest.param(b"POST /one HTTP/1.1\r\n" + H + b"Content-Length: 5, 5\r\n\r\nhello", id="cl-list"),
    pytest.param(b"POST /one HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello", id="cl-twice-same"),
    pytest.param(b"POST /one HTTP/1.1\r\n" + H + b"Content-Length: +5\r\n\r\nhello", id="cl-plus"),
    pytest.param(b"POST /one HTTP/1.1\r\n" + H + b"Content-Length : 5\r\n\r\nhello", id="space-before-colon"),
    pytest.param(b"POST /one HTTP/1.1\r\n" + H + b"Transfer-Encoding\x00: chunked\r\n\r\n0\r\n\r\n", id="nul-in-name"),
    pytest.param(b"POST /one HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", id="cl-and-te"),
    pytest.param(b"POST /one HTTP/1.1\r\n" + H + b"X: y\r\n Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", id="obs-fold"),
    pytest.param(CHUNKED + b"\r\n0x5\r\nhello\r\n0\r\n\r\n", id="chunk-size-0x"),
    pytest.param(CHUNKED + b"\r\n-5\r\nhello\r\n0\r\n\r\n", id="chunk-size-negative"),
    pytest.param(CHUNKED + b"\r\n10000000000000005\r\nhello\r\n0\r\n\r\n", id="chunk-size-overflow"),
    pytest.param(CHUNKED + b"\r\n5 \r\nhello\r\n0\r\n\r\n", id="chunk-size-space"),
    pytest.param(CHUNKED + b"\r\n5\nhello\r\n0\r\n\r\n", id="chunk-size-bare-lf"),
    pytest.param(CHUNKED + b"\r\n5\rhello\r\n0\r\n\r\n", id="chunk-size-bare-cr"),
    pytest.param(CHUNKED + b"\r\n5\r\nhello\n0\r\n\r\n", id="chunk-data-bare-lf"),
    pytest.param(CHUNKED + b"\r\n5\r\nhelloXX0\r\n\r\n", id="chunk-data-too-long"),
    pytest.param(CHUNKED + b"\r\n5;a\rb\r\nhello\r\n0\r\n\r\n", id="chunk-ext-bare-cr"),
    pytest.param(CHUNKED + b"\r\n0\r\n\n", id="last-chunk-bare-lf"),
    pytest.param(CHUNKED + b"\r\n0\r\nX: y\n\r\n", id="trailer-bare-lf"),
    pytest.param(CHUNKED + b"\r\n0\r\nX: y\r\n z\r\n\r\n", id="trailer-obs-fold"),
    pytest.param(CHUNKED + b"\r\n0\r\nX y: z\r\n\r\n", id="trailer-name-not-a-token"),
    pytest.param(CHUNKED + b"\r\n5\r\nhello\r\n0\r\nContent-Length: 60\r\n\r\n", id="trailer-content-length"),
    pytest.param(CHUNKED + b"\r\n5\r\nhello\r\n0\r\nTransfer-Encoding: x\r\n\r\n", id="trailer-transfer-encoding"),
    pytest.param(b"POST /one HTTP/1.0\r\n" + H + b"Transfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n5\r\nhello\r\n0\r\n\r\n", id="http10-chunked"),
    pytest.param(b"GET /one HTTP/1.1\r\n" + H + b"Connection: Upgrade\r\nUpgrade: websocket\r\nContent-Length: 5\r\n\r\nhello", id="upgrade-with-body"),
]


@pytest.mark.parametrize("raw", REFUSED)
def test_ambiguous_framing_is_refused_and_nothing_behind_it_is_processed(gateway, pki, raw):  # noqa: F811
    answers = send(gateway.port, pki, raw + SMUGGLED + LAST)
    assert [code for code, _ in answers] == [400], answers
    assert "Traceback" not in gateway.log.read_text(errors="replace")


# Unambiguous framing: served, the upstream gets exactly the body the gateway read, and every later request is its own.
SERVED = [
    pytest.param(CHUNKED + b"\r\n5;ext=\"q\";x=y\r\nhello\r\n0\r\n\r\n", b"hello", id="chunk-extensions"),
    pytest.param(CHUNKED + b"\r\n0005\r\nhello\r\n0\r\n\r\n", b"hello", id="chunk-size-leading-zeros"),
    pytest.param(CHUNKED + b"\r\n6\r\n\r\n\r\n\r\n\r\n0\r\n\r\n", b"\r\n\r\n\r\n", id="crlfcrlf-in-chunk-data"),
    pytest.param(CHUNKED + b"\r\n5\r\nhello\r\n0\r\nX-Forwarded-Client-Cert: By=spiffe://evil\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n", b"hello",
                 id="trailers-not-forwarded"),
    pytest.param(CHUNKED + b"\r\n" + b"%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED), SMUGGLED, id="request-in-chunk-data"),
    pytest.param(b"GET /one HTTP/1.1\r\n" + H + b"Content-Length: %d\r\n\r\n%s" % (len(SMUGGLED), SMUGGLED), SMUGGLED, id="request-in-get-body"),
    pytest.param(b"POST /one HTTP/1.1\r\n" + H + b"Expect: 100-continue\r\nContent-Length: 5\r\n\r\nhello", b"hello", id="expect-pipelined"),
    pytest.param(b"HEAD /one HTTP/1.1\r\n" + H + b"\r\n", None, id="head-pipelined"),
    pytest.param(b"POST /one HTTP/1.1\r\n" + H + b"Connection: X-Forwarded-Client-Cert, X-Forwarded-For\r\nX-Forwarded-Client-Cert: By=evil\r\n"
                 b"X-Forwarded-For: 6.6.6.6\r\nContent-Length: 5\r\n\r\nhello", b"hello", id="connection-names-the-identity-headers"),
]


@pytest.mark.parametrize("raw,body", SERVED)
def test_unambiguous_framing_is_forwarded_reframed_and_the_next_requests_stay_requests(gateway, pki, raw, body):  # noqa: F811
    answers = send(gateway.port, pki, raw + SMUGGLED + LAST, head_first=raw.startswith(b"HEAD"))  # a 100 Continue is skipped
    assert [code for code, _ in answers] == [200, 200, 200], answers
    if body is not None:
        first = echo(answers[0])
        assert first["uri"] == "/one" and first["body_bytes"] == len(body) and first["body_sha256"] == hashlib.sha256(body).hexdigest()
        assert "transfer-encoding" not in first["headers"] or first["headers"]["transfer-encoding"] == ["chunked"]
        [xfcc] = first["headers"]["x-forwarded-client-cert"]  # the gateway's own, for alice's certificate
        assert "URI=spiffe://test/ns/prod/sa/alice" in xfcc and "evil" not in xfcc
        assert first["headers"]["x-forwarded-for"] == ["127.0.0.1"]
    assert [echo(a)["uri"] for a in answers[1:]] == ["/smuggled", "/last"]
