"""
Request smuggling against the server's reused llhttp parser (af7a293: one HttpRequestParser goes on from one
kept-alive request to the next).  Whatever one request leaves in llhttp's state must not change how the next is
read: the same bytes as the N-th request of a kept-alive connection get the same decision (served with the same
body, or refused with the same status) as on a connection of their own, and as with a fresh parser per request
(the engine before af7a293).  In memory (StringTransport, MemoryReactorClock), whole and split at every offset.
"""

from __future__ import annotations

import re

import pytest
from typing import Any
from unittest import mock

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from twisted.internet.testing import MemoryReactorClock, StringTransport

from mtlsgate.config.model import Limits
from mtlsgate.http.server import HTTPServerFactory, HTTPServerProtocol, Request
from tests.adversarial.test_request_framing import gateway  # noqa: F401  (a module-scoped fixture)
from tests.adversarial.test_request_smuggling import LAST, SMUGGLED, echo, send
from tests.unit.test_http_server_properties import ROOMY, SMALL, requests, sound_requests

H = b"Host: a\r\n"


class Collect:
    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


def run(chunks: list[bytes], limits: Limits = ROOMY, still_open: list[bool] | None = None) -> tuple[list[tuple[bytes, bytes, bytes]], list[int]]:
    """The requests served (method, target, body) and the statuses written, for the client's bytes in C{chunks}."""
    served: list[tuple[bytes, bytes, bytes]] = []

    def handler(request: Request) -> None:
        def respond(body: bytes) -> None:
            served.append((request.method, request.uri, body))
            request.setHeader(b"content-length", b"2")
            request.write(b"ok")
            request.finish()

        if request.uri.startswith(b"/refuse"):  # answered before its body is read (a 403, or an Expect: 100-continue refused)
            served.append((request.method, request.uri, b"<refused>"))
            request.setResponseCode(403)
            request.setHeader(b"content-length", b"0")
            request.finish()
            return
        if request.body is None:
            respond(b"")
            return
        request.proceed()
        sink = Collect()
        request.body.startProducing(sink).addCallback(lambda _: respond(sink.data))

    protocol = HTTPServerFactory(handler, limits, MemoryReactorClock()).buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    for chunk in chunks:
        if transport.disconnecting:
            break
        protocol.dataReceived(chunk)
    if still_open is not None:
        still_open.append(not transport.disconnecting)
    return served, [int(m) for m in re.findall(rb"HTTP/1\.[01] (\d{3}) ", transport.value())]


def fresh_parser_per_request() -> Any:
    """The engine before af7a293: a new llhttp parser for every request head."""
    begin = HTTPServerProtocol._begin

    def _begin(self: HTTPServerProtocol, *args: Any) -> None:
        self._parser = None
        begin(self, *args)

    return mock.patch.object(HTTPServerProtocol, "_begin", _begin)


def splits(stream: bytes, every: bool) -> list[list[bytes]]:
    cuts = range(1, len(stream)) if every else sorted({len(stream) // 3, len(stream) // 2, len(stream) - 1} - {0})
    return [[stream]] + [[stream[:k], stream[k:]] for k in cuts]


def same_as_fresh(stream: bytes, limits: Limits = ROOMY, every: bool = True) -> None:
    for chunks in splits(stream, every):
        reused = run(chunks, limits)
        with fresh_parser_per_request():
            fresh = run(chunks, limits)
        assert reused == fresh, (stream, [len(c) for c in chunks])


# --- known cases: what one request may leave in llhttp, then a second request ---------------------------------------

CHUNKED = b"POST /one HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
NEXT = b"GET /next HTTP/1.1\r\n" + H + b"\r\n"


def test_a_trailer_saying_connection_close_does_not_refuse_the_next_request():
    """llhttp reads a trailer's Connection: close as the end of the connection, yet should_keep_alive() says True: a
    reused parser then refuses the next request ("Data after Connection: close") that a fresh connection serves."""
    stream = CHUNKED + b"3\r\nabc\r\n0\r\nConnection: close\r\n\r\n" + NEXT
    assert run([stream]) == ([(b"POST", b"/one", b"abc"), (b"GET", b"/next", b"")], [200, 200])
    same_as_fresh(stream)


KEPT_ALIVE_FIRSTS = [
    CHUNKED + b"0\r\n\r\n",
    CHUNKED + b"3\r\nabc\r\n0\r\nX-T: v\r\n\r\n",
    CHUNKED + b"3;ext=1\r\nabc\r\n0\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n",
    CHUNKED + b"3\r\nabc\r\n0\r\nExpect: 100-continue\r\n\r\n",
    CHUNKED + b"3\r\nabc\r\n0\r\nConnection: close\r\n\r\n",
    CHUNKED + b"3\r\nabc\r\n0\r\nConnection: keep-alive, close\r\n\r\n",
    b"GET /u HTTP/1.1\r\n" + H + b"Connection: upgrade, keep-alive\r\nUpgrade: ,\r\n\r\n",
    b"GET /u HTTP/1.1\r\n" + H + b"Connection: upgrade\r\nUpgrade:\r\n\r\n",
    b"GET /u HTTP/1.0\r\n" + H + b"Connection: upgrade, keep-alive\r\nUpgrade: websocket\r\n\r\n",
    b"GET /k HTTP/1.0\r\n" + H + b"Connection: keep-alive\r\n\r\n",
    b"POST /k HTTP/1.0\r\n" + H + b"Connection: keep-alive\r\nContent-Length: 3\r\n\r\nabc",
    b"POST /l HTTP/1.1\r\n" + H + b"Content-Length: 3\r\n\r\nabc",
    b"POST /l HTTP/1.1\r\n" + H + b"Content-Length: 0\r\n\r\n",
    b"POST /l HTTP/1.1\r\n" + H + b"Expect: 100-continue\r\nContent-Length: 3\r\n\r\nabc",
    b"OPTIONS * HTTP/1.1\r\n" + H + b"\r\n",
    b"\r\n\r\nGET /crlf HTTP/1.1\r\n" + H + b"\r\n",
]

SECONDS = [
    NEXT,
    b"POST /cl-te HTTP/1.1\r\n" + H + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + NEXT,
    b"POST /te-cl HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n" + NEXT,
    b"POST /te-te HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n\r\n0\r\n\r\n" + NEXT,
    b"POST /te-10 HTTP/1.0\r\n" + H + b"Connection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + NEXT,
    b"POST /cl2 HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc" + NEXT,
    b"POST /chunk HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n" + NEXT,
    b"POST /chunk-lf HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3\nabc\r\n0\r\n\r\n" + NEXT,
    b"POST /refuse HTTP/1.1\r\n" + H + b"Content-Length: 5\r\n\r\n" + NEXT[:5],
    b"POST /refuse HTTP/1.1\r\n" + H + b"Expect: 100-continue\r\nContent-Length: 5\r\n\r\n" + NEXT,
    b"GET /close HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n" + NEXT,
    b"GET /upgrade HTTP/1.1\r\n" + H + b"Connection: upgrade\r\nUpgrade: websocket\r\n\r\n" + NEXT,
]


def test_close_wins_over_keep_alive_and_what_follows_is_never_read():
    """An HTTP/1.0 (or 1.1) request saying both keep-alive and close is the connection's last, as nginx reads it."""
    for version in (b"HTTP/1.0", b"HTTP/1.1"):
        kept: list[bool] = []
        first = b"GET /k " + version + b"\r\n" + H + b"Connection: keep-alive, close\r\n\r\n"
        assert run([first + NEXT], still_open=kept) == ([(b"GET", b"/k", b"")], [200]) and kept == [False], version


def test_a_second_request_gets_the_decision_it_gets_on_a_connection_of_its_own():
    for first in KEPT_ALIVE_FIRSTS:
        kept: list[bool] = []
        alone = run([first], still_open=kept)
        assert kept == [True] and alone[1][-1:] == [200], first
        for second in SECONDS:
            own = run([second])
            stream = first + second
            together = run([stream])
            assert together == (alone[0] + own[0], alone[1] + own[1]), (first, second)
            same_as_fresh(stream, every=False)


# --- properties over the generated streams of tests/unit/test_http_server_properties.py -----------------------------

_settings = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def trailered(draw: Any) -> bytes:
    """A sound chunked request whose trailer section holds what llhttp reads in a head: Connection, Upgrade, Expect..."""
    trailer = draw(st.lists(st.sampled_from([
        b"Connection: close", b"Connection: keep-alive", b"Connection: upgrade", b"Upgrade: x", b"Expect: 100-continue",
        b"X-T: v", b"Keep-Alive: timeout=5", b"Proxy-Connection: close",
    ]), max_size=3))  # fmt: skip
    data = draw(st.binary(max_size=5))
    body = (b"%x\r\n%s\r\n" % (len(data), data) if data else b"") + b"0\r\n" + b"".join(t + b"\r\n" for t in trailer) + b"\r\n"
    return b"POST /t HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n" + body


@_settings
@given(st.lists(st.one_of(sound_requests(), trailered(), st.sampled_from(KEPT_ALIVE_FIRSTS)), max_size=3), st.one_of(requests(), sound_requests()))
def test_after_any_kept_alive_requests_a_request_is_decided_as_on_a_connection_of_its_own(firsts, last):
    kept: list[bool] = []
    before = run([b"".join(firsts)], still_open=kept)
    assume(kept[0] and [c for c in before[1] if c != 100] == [200] * len(firsts) and len(before[0]) == len(firsts))  # all served, the connection kept
    own = run([last])
    stream = b"".join(firsts) + last
    together = run([stream])
    assert together == (before[0] + own[0], before[1] + own[1]), stream


@_settings
@given(st.lists(st.one_of(requests(), sound_requests(), trailered(), st.sampled_from(KEPT_ALIVE_FIRSTS + SECONDS)), min_size=1, max_size=4),
       st.sampled_from([SMALL, ROOMY]))  # fmt: skip
def test_the_reused_parser_decides_what_a_fresh_parser_per_request_decides(parts, limits):
    same_as_fresh(b"".join(parts), limits, every=False)


# --- the same, through the real twistd gateway over mTLS (the echo upstream tells what it got) ---------------------


HL = b"Host: localhost\r\n"
REAL_FIRSTS = [
    pytest.param(b"POST /one HTTP/1.1\r\n" + HL + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nConnection: close\r\n\r\n",
                 id="trailer-connection-close"),
    pytest.param(b"POST /one HTTP/1.1\r\n" + HL + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n",
                 id="trailer-upgrade"),
    pytest.param(b"GET /one HTTP/1.0\r\n" + HL + b"Connection: keep-alive\r\n\r\n", id="http10-keep-alive"),
    pytest.param(b"GET /one HTTP/1.1\r\n" + HL + b"Connection: upgrade, keep-alive\r\nUpgrade:\r\n\r\n", id="empty-upgrade"),
    pytest.param(b"POST /one HTTP/1.1\r\n" + HL + b"Expect: 100-continue\r\nContent-Length: 5\r\n\r\nhello", id="expect-100"),
]


@pytest.mark.parametrize("first", REAL_FIRSTS)
def test_after_a_kept_alive_request_the_next_ones_are_read_as_on_a_new_connection(gateway, pki, first):  # noqa: F811
    answers = send(gateway.port, pki, first + SMUGGLED + LAST)
    codes = [code for code, _ in answers]
    assert codes == [200, 200, 200], answers
    assert [echo(a)["uri"] for a in answers] == ["/one", "/smuggled", "/last"]
    assert "Traceback" not in gateway.log.read_text(errors="replace")
