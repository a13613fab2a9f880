"""
The server Request's response fields without a Headers (mtlsgate.http.server: the Date, Content-Length, Server,
Connection and Transfer-Encoding kept in a dict until something asks for responseHeaders): the bytes written are
exactly those written when the same response goes through a twisted Headers (responseHeaders asked for first), for
each framing the server chooses and with the upstream's own fields (its Date among them) forwarded.
"""

from __future__ import annotations

from typing import Callable

import pytest
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.web.http_headers import Headers

from mtlsgate.config.model import Limits
from mtlsgate.http import server
from mtlsgate.http.server import HTTPServerFactory, Request

UPSTREAM_FIELDS = b'Server: nginx\r\nDate: Tue, 01 Dec 2026 16:00:00 GMT\r\nETag: "x"\r\n'


def test_field_names_are_spelled_as_headers_writes_them() -> None:
    for name, written in server._FIELD_NAMES.items():
        headers = Headers()
        headers.setRawHeaders(name, [b"v"])
        assert [n for n, _ in headers.getAllRawHeaders()] == [written]


def _forward(request: Request) -> None:
    request.forward_headers(UPSTREAM_FIELDS, {b"server", b"date", b"etag"})
    request.setHeader(b"content-length", b"5")


def _forward_no_date(request: Request) -> None:
    request.forward_headers(b'ETag: "x"\r\n', {b"etag"})
    request.setHeader(b"server", b"mtlsgate")


def _own(request: Request) -> None:
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")  # not one of the dict's: Headers from here on
    request.setHeader(b"server", b"mtlsgate")
    request.setHeader(b"content-length", b"5")


def _length_then_forward(request: Request) -> None:
    request.setHeader(b"server", b"mtlsgate")
    request.forward_headers(b"Server: up\r\nX-A: 1\r\n", {b"server", b"x-a"})
    request.setHeader(b"date", b"set again")
    request.setHeader(b"content-length", b"5")


def _status(code: int) -> Callable[[Request], None]:
    def respond(request: Request) -> None:
        request.setResponseCode(code)
        _forward(request)

    return respond


def _nothing(request: Request) -> None:
    pass


SCENARIOS = [_forward, _forward_no_date, _own, _length_then_forward, _status(204), _status(304), _nothing]
REQUESTS = [
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.0\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc",  # the response ends before the body: Connection: close
]


def _answer(raw: bytes, respond: Callable[[Request], None], through_headers: bool) -> bytes:
    reactor = MemoryReactorClock()
    reactor.advance(1_800_000_000)

    def handler(request: Request) -> None:
        if through_headers:
            request.responseHeaders  # the Headers path from the start
        respond(request)
        request.write(b"hello")
        request.finish()

    protocol = HTTPServerFactory(handler, Limits(), reactor).buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(raw)
    return transport.value()


@pytest.mark.parametrize("respond", SCENARIOS, ids=lambda f: getattr(f, "__name__", "status"))
@pytest.mark.parametrize("raw", REQUESTS)
def test_same_bytes_as_through_headers(raw: bytes, respond: Callable[[Request], None]) -> None:
    fast = _answer(raw, respond, through_headers=False)
    assert fast == _answer(raw, respond, through_headers=True)
    assert fast.startswith(b"HTTP/1.")


def test_date_only_when_the_upstream_sends_none() -> None:
    with_date = _answer(REQUESTS[0], _forward, through_headers=False)
    assert with_date.count(b"Date: ") == 1 and b"Date: Tue, 01 Dec 2026 16:00:00 GMT\r\n" in with_date
    own = _answer(REQUESTS[0], _forward_no_date, through_headers=False)
    assert own.count(b"Date: ") == 1 and b"Date: Fri, 15 Jan 2027 08:00:00 GMT\r\n" in own


def test_a_value_with_a_line_break_goes_through_headers() -> None:
    reactor = MemoryReactorClock()
    seen: list[Request] = []
    protocol = HTTPServerFactory(seen.append, Limits(), reactor).buildProtocol(None)
    protocol.makeConnection(StringTransport())
    protocol.dataReceived(REQUESTS[0])
    request = seen[0]
    request.setHeader(b"server", b"a\r\nX-Injected: 1")
    assert request._fields is None
    assert request.responseHeaders.getRawHeaders(b"server") == Headers({b"server": [b"a\r\nX-Injected: 1"]}).getRawHeaders(b"server")
