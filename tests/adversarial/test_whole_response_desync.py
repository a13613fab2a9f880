"""
Response desync against the whole-response path (f5d58a1: a response whose head and body come in one read is handed
over whole, after its connection is pooled).  A hostile upstream sends a response with extra bytes, two responses, a
body to HEAD, 204 or 304, a 1xx and the final response, in one read or split at every offset.  Through the real server
protocol, ProxyResource, exchange and HTTP11Agent in memory (as bench/inmemory_request.py builds them): however the
bytes are split, the client gets one response per request, the one a clean read gives (or is cut off: never another),
and an upstream connection left in the pool answers the next request with that request's own response, never with a
previous response's leftover.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.testing import MemoryReactorClock, StringTransport

from mtlsgate.accounting import RequestObservers
from mtlsgate.config.model import HSTS, Route
from mtlsgate.identity import AllowRules
from mtlsgate.observe.accesslog import AccessEvents
from mtlsgate.observe.metrics import NoMetrics
from mtlsgate.proxy.exchange import GatewaySite, ProxyResource, ProxyState, RouteEntry
from mtlsgate.proxy.routing import RouteTable
from mtlsgate.proxy.upstream import UpstreamGroup
from mtlsgate.testing import MemoryEndpoints
from tests.conftest import gateway_args
from tests.e2e.test_failing_upstreams import scripted  # noqa: F401  (a fixture)

H = b"Host: localhost\r\n"
NEXT = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nX-Which: next\r\n\r\nnext"


Endpoint = MemoryEndpoints


class Gateway:
    """The proxy in memory: one client connection, the upstreams' connections from C{endpoint}, time on C{reactor}."""

    def __init__(self, routes: list[Route] | None = None) -> None:
        self.reactor = MemoryReactorClock()
        self.endpoint = Endpoint()
        entries = []
        for route in routes or [Route(host="*", to=("https://127.0.0.1:9443",))]:
            group = UpstreamGroup(self.reactor, route)
            group.agent.endpoints = self.endpoint  # type: ignore[assignment]
            entries.append((route.host, route.prefix, RouteEntry(route=route, upstreams=group)))
        table = RouteTable(entries)
        state = ProxyState(routes=table, global_rules=AllowRules(), require_client_certificate=False, hsts_header=HSTS().header())
        resource = ProxyResource(self.reactor, state, RequestObservers([AccessEvents(enabled=False), NoMetrics()]), NoMetrics())
        self.channel = GatewaySite(resource).buildProtocol(None)
        self.transport = StringTransport()
        self.channel.makeConnection(self.transport)


def parse_responses(data: bytes, methods: list[bytes]) -> tuple[list[tuple[int, bytes, bytes]], bytes]:
    """The client's view: (status, head, decoded body) per final response, 1xx skipped, and what is left unparsed."""
    out = []
    for method in methods:
        while True:
            head, sep, rest = data.partition(b"\r\n\r\n")
            if not sep:
                return out, data
            status = int(head.split(b" ", 2)[1])
            data = rest
            if status >= 200:
                break
        fields = {line.split(b":", 1)[0].strip().lower(): line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")[1:]}
        if method == b"HEAD" or status in (204, 304):
            body = b""
        elif b"content-length" in fields:
            n = int(fields[b"content-length"])
            if len(data) < n:
                return out, head + b"\r\n\r\n" + data
            body, data = data[:n], data[n:]
        elif fields.get(b"transfer-encoding") == b"chunked":
            body = b""
            while True:
                size_line, sep, rest = data.partition(b"\r\n")
                if not sep:
                    return out, head + b"\r\n\r\n" + data
                size = int(size_line.split(b";")[0], 16)
                if size == 0:
                    trailer_end = rest.find(b"\r\n") if rest.startswith(b"\r\n") else rest.find(b"\r\n\r\n")
                    if trailer_end == -1:
                        return out, head + b"\r\n\r\n" + data
                    data = rest[2:] if rest.startswith(b"\r\n") else rest[trailer_end + 4 :]
                    break
                if len(rest) < size + 2:
                    return out, head + b"\r\n\r\n" + data
                body += rest[:size]
                data = rest[size + 2 :]
        else:
            body, data = data, b""
        out.append((status, head, body))
    return out, data


def exchange(method: bytes, pieces: list[bytes], close_after: bool = False) -> dict[str, Any]:
    """One request whose upstream answers C{pieces}, one read each, then a second request on the same client connection."""
    gw = Gateway()
    gw.channel.dataReceived(method + b" /one HTTP/1.1\r\n" + H + b"\r\n")
    upstream, upstream_transport = gw.endpoint.connections[-1]
    for piece in pieces:
        if upstream_transport.disconnecting or getattr(upstream, "_aborted", False):
            break
        upstream.dataReceived(piece)
    if close_after and not upstream_transport.disconnecting and not upstream.idle:  # a body read until close: the upstream closes
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        upstream.connectionLost(Failure(ConnectionDone()))
    first = gw.transport.value()
    pooled = not upstream_transport.disconnecting and not getattr(upstream, "_aborted", False) and upstream.idle
    result: dict[str, Any] = {"first": first, "pooled": pooled, "client_cut": gw.transport.disconnecting}
    if gw.transport.disconnecting:
        return result
    gw.transport.clear()
    before = len(gw.endpoint.connections)
    upstream_transport.clear()
    gw.channel.dataReceived(b"GET /two HTTP/1.1\r\n" + H + b"\r\n")
    second_upstream, second_transport = gw.endpoint.connections[-1]
    result["reused"] = len(gw.endpoint.connections) == before
    assert result["reused"] == pooled, result  # a pooled connection is the one the next request takes
    assert second_transport.value().startswith(b"GET /two HTTP/1.1\r\n"), second_transport.value()
    if not second_transport.disconnecting and not getattr(second_upstream, "_aborted", False):
        second_upstream.dataReceived(NEXT)
    result["second"] = gw.transport.value()
    return result


def splits(raw: bytes) -> list[list[bytes]]:
    return [[raw]] + [[raw[:k], raw[k:]] for k in range(1, len(raw))] + [[raw[k : k + 1] for k in range(len(raw))]]


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
CHUNKED_OK = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\no\r\n1\r\nk\r\n0\r\n\r\n"
EVIL = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nX-Which: evil\r\n\r\nevil"

# (name, request method, the upstream's bytes, the clean response the client must get (a prefix of the bytes), close after)
CASES = [
    ("two-responses-in-one-read", b"GET", OK + EVIL, OK, False),
    ("response-then-garbage", b"GET", OK + b"XYZ", OK, False),
    ("response-then-crlf", b"GET", OK + b"\r\n", OK, False),
    ("chunked-then-response", b"GET", CHUNKED_OK + EVIL, CHUNKED_OK, False),
    ("chunked-trailers-then-response", b"GET", CHUNKED_OK[:-2] + b"X-T: v\r\n\r\n" + EVIL, CHUNKED_OK[:-2] + b"X-T: v\r\n\r\n",
     False),
    ("head-with-a-body", b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil", b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n",
     False),
    ("head-with-a-response-behind", b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n" + EVIL, b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n",
     False),
    ("204-with-a-body", b"GET", b"HTTP/1.1 204 No Content\r\n\r\n" + EVIL, b"HTTP/1.1 204 No Content\r\n\r\n", False),
    ("204-with-content-length", b"GET", b"HTTP/1.1 204 No Content\r\nContent-Length: 4\r\n\r\nevil",
     b"HTTP/1.1 204 No Content\r\nContent-Length: 4\r\n\r\n", False),
    ("304-with-content-length", b"GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 4\r\n\r\nevil",
     b"HTTP/1.1 304 Not Modified\r\nContent-Length: 4\r\n\r\n", False),
    ("1xx-then-final", b"GET", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK, OK, False),
    ("1xx-then-final-then-response", b"GET", b"HTTP/1.1 100 Continue\r\n\r\n" + OK + EVIL, OK, False),
    ("close-then-response", b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok" + EVIL,
     b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok", False),
    ("http10-then-response", b"GET", b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok" + EVIL, b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", False),
    ("until-close", b"GET", b"HTTP/1.1 200 OK\r\n\r\nokHTTP/1.1 200 OK\r\n", b"HTTP/1.1 200 OK\r\n\r\nokHTTP/1.1 200 OK\r\n", True),
]


def unframed(responses: list[tuple[int, bytes, bytes]]) -> list[tuple[int, bytes, bytes]]:
    """The responses without their framing fields: a chunked body that came whole reaches the client with a Content-Length,
    one split over reads chunked; the same response either way."""
    def head(h: bytes) -> bytes:
        return b"\r\n".join(line for line in h.split(b"\r\n") if line.split(b":", 1)[0].strip().lower() not in (b"content-length", b"transfer-encoding"))

    return [(status, head(h), body) for status, h, body in responses]


@pytest.mark.parametrize("name, method, raw, clean, close_after", CASES, ids=[c[0] for c in CASES])
def test_however_the_upstream_splits_its_bytes_the_client_gets_the_clean_response_or_is_cut_off(name, method, raw, clean, close_after):
    reference = exchange(method, [clean], close_after=close_after)
    (expected,), rest = parse_responses(reference["first"], [method])
    assert rest == b"" and not reference["client_cut"]
    for pieces in splits(raw):
        got = exchange(method, pieces, close_after=close_after)
        responses, rest = parse_responses(got["first"], [method, method])
        if got["client_cut"]:
            # cut off: never a different response, never a second one
            assert len(responses) <= 1 and (not responses or unframed(responses) == unframed([expected])), (name, [len(p) for p in pieces], got)
            continue
        assert (unframed(responses), rest) == (unframed([expected]), b""), (name, [len(p) for p in pieces], got)
        (second,), rest = parse_responses(got["second"], [b"GET"])
        assert rest == b"" and second[0] == 200 and second[2] == b"next" and b"X-Which: next" in second[1], (name, [len(p) for p in pieces], got)


@pytest.mark.parametrize("raw", [OK, CHUNKED_OK, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"])
def test_a_clean_response_pools_its_connection_however_it_is_split(raw):
    for pieces in splits(raw):
        got = exchange(b"GET", pieces)
        assert got["pooled"] and got["reused"] and not got["client_cut"], [len(p) for p in pieces]


@st.composite
def upstream_bytes(draw: Any) -> tuple[bytes, bytes]:
    """A request method and what an upstream answers: 1xx, a final response of any framing, and perhaps bytes after it."""
    method = draw(st.sampled_from([b"GET", b"GET", b"HEAD"]))
    out = b"".join(draw(st.lists(st.sampled_from([b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"]), max_size=2)))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"]))
    status = draw(st.sampled_from([b"200 OK", b"200 OK", b"404 Not Found", b"204 No Content", b"304 Not Modified"]))
    body = draw(st.binary(max_size=6))
    fields = draw(st.lists(st.sampled_from([b"X-A: 1", b"Connection: close", b"Connection: keep-alive", b"Connection: x-a"]), max_size=2))
    framing = draw(st.sampled_from(["length", "length", "chunked", "chunked-trailers", "wrong-length", "none"]))
    if framing == "length":
        fields.append(b"Content-Length: %d" % len(body))
    elif framing == "wrong-length":
        fields.append(b"Content-Length: %d" % (len(body) + draw(st.sampled_from([-1, 1, 3]))) if body else b"Content-Length: 2")
    elif framing.startswith("chunked"):
        fields.append(b"Transfer-Encoding: chunked")
        body = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n" + (b"X-T: v\r\n" if framing == "chunked-trailers" else b"") + b"\r\n"
    out += version + b" " + status + b"\r\n" + b"".join(f + b"\r\n" for f in fields) + b"\r\n" + body
    out += draw(st.sampled_from([b"", b"", b"\r\n", b"XYZ", EVIL, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", b"0\r\n\r\n"]))
    return method, out


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(upstream_bytes(), st.lists(st.integers(1, 200), max_size=6))
def test_however_any_upstream_answer_is_split_the_client_gets_one_same_response_or_is_cut_off(answer, cuts):
    method, raw = answer
    outcomes = set()
    for pieces in [[raw], [raw[k : k + 1] for k in range(len(raw))]] + [[raw[: k % len(raw)], raw[k % len(raw) :]] for k in cuts]:
        got = exchange(method, [p for p in pieces if p], close_after=True)
        responses, rest = parse_responses(got["first"], [method, method])
        assert len(responses) <= 1, (raw, [len(p) for p in pieces], got)  # never a second response to one request
        if not got["client_cut"]:
            assert len(responses) == 1 and rest == b"", (raw, [len(p) for p in pieces], got)
            outcomes.add(unframed(responses)[0])
            (second,), rest = parse_responses(got["second"], [b"GET"])
            assert rest == b"" and second[2] == b"next" and b"X-Which: next" in second[1], (raw, [len(p) for p in pieces], got)
    assert len(outcomes) <= 1, (raw, outcomes)  # served, it is the same response however the bytes came


# --- the same, through the real twistd gateway and a hostile TLS upstream --------------------------------------------

FRESH = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nfresh\n"


def _keep_answering(conn: Any, answer: bytes) -> None:
    """Answer every further request on this connection with C{answer}, until the gateway closes it."""
    buf = b""
    while True:
        while b"\r\n\r\n" not in buf:
            chunk = conn.recv(65536)
            if not chunk:
                return
            buf += chunk
        buf = buf.partition(b"\r\n\r\n")[2]
        conn.sendall(answer)


@pytest.mark.parametrize("method, first", [
    pytest.param(b"GET", OK + EVIL, id="two-responses"),
    pytest.param(b"GET", OK + b"XYZ", id="response-then-garbage"),
    pytest.param(b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n" + EVIL, id="head-then-response"),
    pytest.param(b"GET", b"HTTP/1.1 204 No Content\r\n\r\n" + EVIL, id="204-then-response"),
    pytest.param(b"GET", b"HTTP/1.1 100 Continue\r\n\r\n" + OK + EVIL, id="1xx-final-then-response"),
])  # fmt: skip
def test_a_hostile_upstreams_extra_response_never_reaches_the_next_request(start_gateway, pki, scripted, method, first):  # noqa: F811
    def hostile(conn: Any) -> None:
        conn.sendall(first)  # one write: one TLS record, one read at the gateway (usually)
        _keep_answering(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\npoisoned\n")

    def fresh(conn: Any) -> None:
        conn.sendall(FRESH)
        _keep_answering(conn, FRESH)

    upstream = scripted(hostile, fresh)
    gateway = start_gateway(gateway_args(pki, upstream.port))
    ctx = ssl.create_default_context(cafile=pki["ca"])
    ctx.load_cert_chain(*pki["alice"])

    def connect() -> ssl.SSLSocket:
        return ctx.wrap_socket(socket.create_connection(("127.0.0.1", gateway.port), timeout=15), server_hostname="localhost")

    def ask(s: ssl.SSLSocket, method: bytes, path: bytes) -> tuple[int, bytes, bytes] | None:
        """The response, or None when the gateway closes the connection first (it may cut a client off, never mislead it)."""
        try:
            s.sendall(method + b" " + path + b" HTTP/1.1\r\n" + H + b"\r\n")
        except (ssl.SSLError, ConnectionError):
            return None
        data = b""
        while not parse_responses(data, [method])[0]:
            try:
                chunk = s.recv(65536)
            except (ssl.SSLError, ConnectionError):
                chunk = b""
            if not chunk:
                assert b"HTTP/1.1 " not in data or parse_responses(data, [method])[0], data
                return None
            data += chunk
        (response,), rest = parse_responses(data, [method])
        assert rest == b"" and b"evil" not in data and b"poisoned" not in data, data
        return response

    s = connect()
    try:
        one = ask(s, method, b"/one")
        assert one is None or one[0] in (200, 204), one
        answers = []
        for _ in range(3):  # the next requests: each its own, fresh answer (on a new client connection if it was cut)
            two = ask(s, b"GET", b"/two")
            if two is None:
                s.close()
                s = connect()
                two = ask(s, b"GET", b"/two")
            answers.append(two)
        assert [(a[0], a[2]) if a else None for a in answers] == [(200, b"fresh\n")] * 3, answers
    finally:
        s.close()
    assert "Traceback" not in gateway.proc.log.read_text(errors="replace")
