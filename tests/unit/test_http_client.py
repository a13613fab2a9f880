"""
The upstream HTTP/1.1 client (mtlsgate.http.client) in memory: connections are StringTransports
handed out by a scripted endpoint, time is a Clock.  Framing, byte-by-byte splits (hypothesis), the
response header bound, the keep-alive pool, the one retry on a dead pooled connection,
back-pressure both ways, cancellation.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import PotentialDataLoss, ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IResponse
from zope.interface import directlyProvides

from mtlsgate.http.client import HTTP11Agent, ResponseHeadersTooLarge, UpstreamConnection, UpstreamProtocolError
from mtlsgate.http.headers import HeaderPairs
from mtlsgate.proxy.exchange import RequestBody

URL = b"https://upstream.test:8443/path?q=1"


class Endpoint:
    """Connects at once (or, with C{hold}, when told) over a StringTransport; counts connections."""

    def __init__(self) -> None:
        self.connections: list[UpstreamConnection] = []
        self.hold = False
        self.refuse = False
        self.pending: list[defer.Deferred[Any]] = []
        self.cancelled = 0

    def endpointForURI(self, uri: Any) -> Endpoint:
        self.uri = uri
        return self

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        if self.refuse:
            return defer.fail(ConnectionRefusedError("scripted"))
        if self.hold:
            d: defer.Deferred[Any] = defer.Deferred(lambda _: setattr(self, "cancelled", self.cancelled + 1))
            self.pending.append(d)
            return d
        return defer.succeed(self.make(factory))

    def make(self, factory: Any) -> UpstreamConnection:
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(StringTransport())
        self.connections.append(protocol)
        return protocol


class Body(Protocol):
    """Collects a response body and how it ended."""

    def __init__(self) -> None:
        self.data = b""
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = ConnectionDone()) -> None:  # type: ignore[assignment]
        assert self.reason is None, "connectionLost twice"
        self.reason = reason


def make(**kwargs: Any) -> tuple[HTTP11Agent, Endpoint, Clock]:
    clock = Clock()
    endpoint = Endpoint()
    return HTTP11Agent(clock, endpoint, **kwargs), endpoint, clock


def results(d: defer.Deferred[Any]) -> list[Any]:
    out: list[Any] = []
    d.addBoth(out.append)
    return out


def lose(connection: UpstreamConnection, reason: Exception | None = None) -> None:
    connection.connectionLost(Failure(reason or ConnectionDone()))


def exchange(raw: list[bytes], method: bytes = b"GET", close_after: bool = False, **kwargs: Any) -> tuple[Any, Body, HTTP11Agent, UpstreamConnection]:
    """One request; the upstream's bytes in the pieces of C{raw}; returns (response or failure, body, agent, connection)."""
    agent, endpoint, _ = make(**kwargs)
    got = results(agent.request(method, URL))
    connection = endpoint.connections[0]
    body = Body()
    delivered = False
    for piece in raw:
        if piece:
            connection.dataReceived(piece)
        if got and IResponse.providedBy(got[0]) and not delivered:
            delivered = True
            got[0].deliverBody(body)
        if connection.transport.disconnecting:
            break
    if close_after and body.reason is None and not connection.transport.disconnecting:
        lose(connection)
    return got[0] if got else None, body, agent, connection


def test_the_agent_provides_iagent_and_writes_the_request_head_in_one_write():
    agent, endpoint, _ = make()
    assert IAgent.providedBy(agent)
    agent.request(b"GET", URL, Headers({b"x-one": [b"1", b"2"], b"content-length": [b"99"], b"connection": [b"keep-alive"]}))
    transport = endpoint.connections[0].transport
    assert transport.value() == b"GET /path?q=1 HTTP/1.1\r\nHost: upstream.test:8443\r\nX-One: 1\r\nX-One: 2\r\n\r\n"
    assert (endpoint.uri.scheme, endpoint.uri.host, endpoint.uri.port) == (b"https", b"upstream.test", 8443)


def test_upstream_connections_send_without_nagle():
    """An upload's chunks go out in their own writes after the head: Nagle would hold each back for the upstream's delayed ACK."""
    calls: list[bool] = []
    transport = StringTransport()
    directlyProvides(transport, ITCPTransport)
    transport.setTcpNoDelay = calls.append  # type: ignore[attr-defined]
    agent, _, _ = make()
    UpstreamConnection(agent.pool, None, 1000).makeConnection(transport)
    assert calls == [True]


@pytest.mark.parametrize("framed_by_client", [False, True])
def test_header_pairs_are_written_as_they_are_in_order_framing_from_the_caller_dropped(framed_by_client):
    """The proxy's form of the fields (HeaderPairs): names as spelled, order kept; the caller's framing and Connection never go out."""
    agent, endpoint, _ = make()
    pairs = [(b"x-one", b"1"), (b"Accept", b"*/*"), (b"X-ONE", b"2")]
    if not framed_by_client:  # a HeaderPairs not built by upstream_request_pairs: the client drops framing itself
        pairs += [(b"Content-Length", b"99"), (b"connection", b"keep-alive"), (b"Transfer-Encoding", b"chunked")]
    agent.request(b"GET", URL, HeaderPairs(pairs, framed_by_client=framed_by_client))
    assert endpoint.connections[0].transport.value() == (
        b"GET /path?q=1 HTTP/1.1\r\nHost: upstream.test:8443\r\nx-one: 1\r\nAccept: */*\r\nX-ONE: 2\r\n\r\n"
    )
    agent.request(b"GET", URL, HeaderPairs([(b"HOST", b"public.example")], framed_by_client=framed_by_client))
    assert endpoint.connections[1].transport.value() == b"GET /path?q=1 HTTP/1.1\r\nHOST: public.example\r\n\r\n"


@pytest.mark.parametrize("url, host, target", [
    (b"https://upstream.test/", b"upstream.test", b"/"),
    (b"http://upstream.test:80", b"upstream.test", b"/"),
    (b"https://[::1]:9443/a#frag", b"[::1]:9443", b"/a"),
    (b"http://127.0.0.1:8080/a;b?c=d", b"127.0.0.1:8080", b"/a;b?c=d"),
])  # fmt: skip
def test_host_and_target_are_those_agent_would_send(url, host, target):
    agent, endpoint, _ = make()
    agent.request(b"GET", url)
    assert endpoint.connections[0].transport.value() == b"GET %b HTTP/1.1\r\nHost: %b\r\n\r\n" % (target, host)


def test_a_host_header_given_is_sent_instead_of_the_urls():
    agent, endpoint, _ = make()
    agent.request(b"GET", URL, Headers({b"host": [b"public.example"]}))
    assert endpoint.connections[0].transport.value() == b"GET /path?q=1 HTTP/1.1\r\nHost: public.example\r\n\r\n"


@pytest.mark.parametrize("method, url", [(b"GET /x HTTP/1.1\r\nX:", URL), (b"GET", b"https://h/a b"), (b"GET", b"https://h/\r\nX: y"), (b"GET", b"/relative")])
def test_an_invalid_method_or_target_fails_and_nothing_is_sent(method, url):
    agent, endpoint, _ = make()
    failure = results(agent.request(method, url))[0]
    assert isinstance(failure, Failure) and failure.check(ValueError)
    assert endpoint.connections == []


def test_post_without_body_says_content_length_0_and_non_persistent_says_close():
    agent, endpoint, _ = make(persistent=False)
    agent.request(b"POST", URL)
    assert endpoint.connections[0].transport.value().endswith(b"Content-Length: 0\r\nConnection: close\r\n\r\n")


# --- framing ------------------------------------------------------------------------------------------


FRAMINGS = [
    # (name, method, upstream bytes, code, body, ending, length, pooled)
    ("content-length", b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhello", 200, b"hello", ResponseDone, 5, True),
    ("chunked", b"GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n1\r\n!\r\n0\r\nTrailer: x\r\n\r\n",
     200, b"hello!", ResponseDone, UNKNOWN_LENGTH, True),
    ("until close", b"GET", b"HTTP/1.1 200 OK\r\n\r\nhello until close", 200, b"hello until close", PotentialDataLoss, UNKNOWN_LENGTH, False),
    ("head", b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", 200, b"", ResponseDone, 0, True),
    ("204", b"GET", b"HTTP/1.1 204 No Content\r\n\r\n", 204, b"", ResponseDone, 0, True),
    ("304", b"GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n", 304, b"", ResponseDone, 0, True),
    ("interim 100 and 103", b"GET",
     b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok",
     201, b"ok", ResponseDone, 2, True),
    ("http/1.0", b"GET", b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", 200, b"ok", ResponseDone, 2, False),
    ("http/1.0 keep-alive", b"GET", b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok", 200, b"ok", ResponseDone, 2, True),
    ("connection close", b"GET", b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", 200, b"ok", ResponseDone, 2, False),
    ("no reason phrase", b"GET", b"HTTP/1.1 200 \r\nContent-Length: 0\r\n\r\n", 200, b"", ResponseDone, 0, True),
]  # fmt: skip


def check_framing(raw_pieces: list[bytes], method: bytes, code: int, body: bytes, ending: type, length: Any, pooled: bool) -> None:
    response, got, agent, connection = exchange(raw_pieces, method, close_after=True)
    assert IResponse.providedBy(response), response
    assert (response.code, response.length, response.version) == (code, length, response.version)
    assert got.data == body
    assert got.reason is not None and got.reason.check(ending), got.reason
    assert agent.pool.idle_count() == (1 if pooled else 0)
    assert (connection.transport.disconnecting or not connection.connected) is not pooled


@pytest.mark.parametrize("name, method, raw, code, body, ending, length, pooled", FRAMINGS, ids=[f[0] for f in FRAMINGS])
def test_framing(name, method, raw, code, body, ending, length, pooled):
    check_framing([raw], method, code, body, ending, length, pooled)


@pytest.mark.parametrize("name, method, raw, code, body, ending, length, pooled", FRAMINGS, ids=[f[0] for f in FRAMINGS])
def test_framing_split_at_every_offset(name, method, raw, code, body, ending, length, pooled):
    for i in range(len(raw) + 1):
        check_framing([raw[:i], raw[i:]], method, code, body, ending, length, pooled)


@settings(max_examples=300, deadline=None)
@given(which=st.integers(0, len(FRAMINGS) - 1), cuts=st.lists(st.integers(0, 200), max_size=12))
def test_framing_in_any_pieces(which, cuts):
    _, method, raw, code, body, ending, length, pooled = FRAMINGS[which]
    points = sorted({min(c, len(raw)) for c in cuts})
    pieces = [raw[a:b] for a, b in zip([0] + points, points + [len(raw)])]
    check_framing(pieces, method, code, body, ending, length, pooled)


class DirectBody(Body):
    """A body protocol that takes the clean end directly (body_done, as the proxy's relay does)."""

    def body_done(self) -> None:
        assert self.reason is None, "told twice"
        self.reason = Failure(ResponseDone())  # recorded as connectionLost would have been told
        self.direct = True


@pytest.mark.parametrize("name, method, raw, code, body, ending, length, pooled", FRAMINGS, ids=[f[0] for f in FRAMINGS])
def test_a_body_protocol_with_body_done_is_told_a_whole_body_by_it_once_and_anything_else_by_connection_lost(
    name, method, raw, code, body, ending, length, pooled,
):  # fmt: skip
    agent, endpoint, _ = make()
    got = results(agent.request(method, URL))
    connection = endpoint.connections[0]
    protocol = DirectBody()
    connection.dataReceived(raw[: len(raw) - len(body)])  # the head: the response is delivered before its body ends
    got[0].deliverBody(protocol)
    ended_before = protocol.reason is not None  # no body (HEAD, 204, 304, Content-Length: 0): over with its head
    connection.dataReceived(raw[len(raw) - len(body) :])
    if protocol.reason is None:
        lose(connection)
    assert protocol.data == body and protocol.reason is not None and protocol.reason.check(ending)
    assert getattr(protocol, "direct", False) is (ending is ResponseDone and not ended_before)
    assert agent.pool.idle_count() == (1 if pooled else 0)


def test_a_whole_body_that_came_before_deliver_body_is_told_by_connection_lost_even_to_a_direct_protocol():
    agent, endpoint, _ = make()
    got = results(agent.request(b"GET", URL))
    endpoint.connections[0].dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    protocol = DirectBody()
    got[0].deliverBody(protocol)
    assert protocol.data == b"ok" and protocol.reason.check(ResponseDone) and not getattr(protocol, "direct", False)


def test_response_headers_are_all_there_in_order_and_the_phrase_whole():
    response, _, _, _ = exchange([b"HTTP/1.1 404 Not ", b"Found Here\r\nX-A: 1\r\nx-a: 2\r\nConnection: close, X-Secret\r\nContent-Length: 0\r\n\r\n"])
    assert response.phrase == b"Not Found Here"
    assert response.headers.getRawHeaders(b"x-a") == [b"1", b"2"]
    # Connection stays visible, so that the proxy strips the headers it names (mtlsgate.http.headers.client_response_headers).
    assert response.headers.getRawHeaders(b"connection") == [b"close, X-Secret"]


def test_body_bytes_that_arrive_before_deliver_body_are_kept():
    agent, endpoint, _ = make()
    got = results(agent.request(b"GET", URL))
    endpoint.connections[0].dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
    endpoint.connections[0].dataReceived(b"cd")
    body = Body()
    got[0].deliverBody(body)
    assert body.data == b"abcd" and body.reason.check(ResponseDone)


# --- malformed and oversized responses -----------------------------------------------------------------


@pytest.mark.parametrize("raw", [
    b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",  # bare LF
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX: a\x00b\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX: a\r\n folded\r\n\r\n",
    b"HTTP/1.1 20 OK\r\n\r\n",
    b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
    b"SSH-2.0-OpenSSH_9.6\r\n",
])  # fmt: skip
def test_a_malformed_response_head_fails_the_request_and_closes(raw):
    failure, _, agent, connection = exchange([raw])
    assert isinstance(failure, Failure) and failure.check(ResponseFailed), failure
    assert failure.value.reasons[0].check(UpstreamProtocolError)
    assert connection.transport.disconnecting and agent.pool.idle_count() == 0


def test_a_malformed_chunk_cuts_the_body_off():
    response, body, agent, connection = exchange([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\nzz\r\n"])
    assert IResponse.providedBy(response) and body.data == b"ok"
    assert body.reason.check(ResponseFailed) and connection.transport.disconnecting and agent.pool.idle_count() == 0


def test_bytes_after_a_complete_response_close_the_connection():
    response, body, agent, connection = exchange([b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n"])
    assert body.data == b"ok" and body.reason.check(ResponseDone)
    assert connection.transport.disconnecting and agent.pool.idle_count() == 0


def test_a_head_response_with_a_body_closes_the_connection():
    response, body, agent, connection = exchange([b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"], method=b"HEAD")
    assert body.data == b"" and body.reason.check(ResponseDone)
    assert connection.transport.disconnecting and agent.pool.idle_count() == 0


def test_unsolicited_bytes_on_an_idle_connection_close_it():
    response, body, agent, connection = exchange([b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"])
    assert agent.pool.idle_count() == 1
    connection.dataReceived(b"HTTP/1.1 200 OK\r\n")
    assert connection.transport.disconnecting
    lose(connection, ConnectionAborted())
    assert agent.pool.idle_count() == 0


LIMIT = 1024


def head_of(size: int) -> bytes:
    """A response head of exactly C{size} bytes (status line, one filler header, Content-Length, blank line)."""
    start, end = b"HTTP/1.1 200 OK\r\nX-Fill: ", b"\r\nContent-Length: 2\r\n\r\n"
    return start + b"f" * (size - len(start) - len(end)) + end


@pytest.mark.parametrize("pieces", [1, 2, 7, LIMIT])
def test_response_headers_up_to_the_limit_pass_and_one_byte_more_fails(pieces):
    for size, ok in ((LIMIT, True), (LIMIT + 1, False)):
        raw = head_of(size) + b"hi"
        step = max(1, len(raw) // pieces)
        response, body, agent, connection = exchange([raw[i : i + step] for i in range(0, len(raw), step)], max_header_size=LIMIT)
        if ok:
            assert IResponse.providedBy(response) and body.data == b"hi"
        else:
            assert isinstance(response, Failure) and response.check(ResponseFailed)
            assert response.value.reasons[0].check(ResponseHeadersTooLarge)
            assert "response headers larger than 1024 bytes (max_response_header_size)" in str(response.value.reasons[0].value)
            assert connection.transport.disconnecting


def test_interim_responses_count_against_the_header_limit():
    hints = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>\r\n\r\n"
    failure, _, _, connection = exchange([hints] * 100, max_header_size=LIMIT)
    assert isinstance(failure, Failure) and failure.value.reasons[0].check(ResponseHeadersTooLarge)


@pytest.mark.parametrize("interim", [
    b"HTTP/1.1 199 Odd\r\nContent-Length: 5\r\n\r\nforge",
    b"HTTP/1.1 150 Odd\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nforge\r\n0\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\nTransfer-Encoding: chunked\r\n\r\n",
])
def test_a_1xx_response_with_content_is_a_protocol_error_and_none_of_it_is_relayed(interim):
    for pieces in ([interim + OK], [interim[:-3], interim[-3:] + OK]):
        failure, _, _, connection = exchange(pieces)
        assert isinstance(failure, Failure) and failure.value.reasons[0].check(UpstreamProtocolError)
        assert "a 1xx response with content" in str(failure.value.reasons[0].value)
        assert connection.transport.disconnecting


def test_endless_headers_fail_without_buffering_them():
    agent, endpoint, _ = make(max_header_size=LIMIT)
    got = results(agent.request(b"GET", URL))
    connection = endpoint.connections[0]
    connection.dataReceived(b"HTTP/1.1 200 OK\r\n")
    for i in range(1000):
        if got:
            break
        connection.dataReceived(b"X-%d: y\r\n" % i)
    assert got and got[0].check(ResponseFailed) and i < 200


# --- keep-alive pool ----------------------------------------------------------------------------------


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def complete(agent: HTTP11Agent, connection: UpstreamConnection, raw: bytes = OK, method: bytes = b"GET", d: Any = None) -> Body:
    got = results(d if d is not None else agent.request(method, URL))
    connection.dataReceived(raw)
    body = Body()
    got[0].deliverBody(body)
    return body


def test_a_complete_response_puts_the_connection_back_and_the_next_request_reuses_it():
    agent, endpoint, _ = make()
    d = agent.request(b"GET", URL)
    connection = endpoint.connections[0]
    complete(agent, connection, d=d)
    assert agent.pool.idle_count() == 1
    connection.transport.clear()
    body = complete(agent, connection, d=agent.request(b"GET", b"https://upstream.test:8443/again"))
    assert len(endpoint.connections) == 1 and body.data == b"ok"
    assert connection.transport.value().startswith(b"GET /again HTTP/1.1\r\n")
    # another origin, another pool slot
    agent.request(b"GET", b"https://other.test/")
    assert len(endpoint.connections) == 2


def test_the_pool_keeps_at_most_max_idle_per_origin():
    agent, endpoint, _ = make(max_idle=2)
    ds = [agent.request(b"GET", URL) for _ in range(3)]
    for d, connection in zip(ds, endpoint.connections):
        complete(agent, connection, d=d)
    assert agent.pool.idle_count() == 2 and endpoint.connections[2].transport.disconnecting


def test_idle_connections_close_after_the_idle_timeout():
    agent, endpoint, clock = make(idle_timeout=60)
    first, second = agent.request(b"GET", URL), agent.request(b"GET", URL)
    complete(agent, endpoint.connections[0], d=first)
    clock.advance(30)
    complete(agent, endpoint.connections[1], d=second)
    clock.advance(30)
    assert endpoint.connections[0].transport.disconnecting and not endpoint.connections[1].transport.disconnecting
    assert agent.pool.idle_count() == 1
    clock.advance(30)
    assert endpoint.connections[1].transport.disconnecting and agent.pool.idle_count() == 0
    assert clock.getDelayedCalls() == []


def test_a_pooled_connection_the_upstream_closed_leaves_the_pool():
    agent, endpoint, clock = make()
    d = agent.request(b"GET", URL)
    complete(agent, endpoint.connections[0], d=d)
    lose(endpoint.connections[0])
    assert agent.pool.idle_count() == 0
    agent.request(b"GET", URL)
    assert len(endpoint.connections) == 2


def test_retire_closes_idle_connections_and_busy_ones_when_done():
    agent, endpoint, _ = make()
    idle, busy = agent.request(b"GET", URL), agent.request(b"GET", URL)
    complete(agent, endpoint.connections[0], d=idle)
    agent.close()
    assert endpoint.connections[0].transport.disconnecting
    complete(agent, endpoint.connections[1], d=busy)
    assert endpoint.connections[1].transport.disconnecting and agent.pool.idle_count() == 0


# --- a dead pooled connection -------------------------------------------------------------------------


def reused_connection(agent: HTTP11Agent, endpoint: Endpoint) -> UpstreamConnection:
    d = agent.request(b"GET", URL)
    complete(agent, endpoint.connections[0], d=d)
    return endpoint.connections[0]


@pytest.mark.parametrize("method", [b"GET", b"HEAD", b"DELETE", b"OPTIONS"])
def test_an_idempotent_request_on_a_dead_pooled_connection_is_sent_again_once(method):
    agent, endpoint, _ = make()
    dead = reused_connection(agent, endpoint)
    got = results(agent.request(method, URL))
    lose(dead, ConnectionLost())
    assert len(endpoint.connections) == 2 and not got
    fresh = endpoint.connections[1]
    assert fresh.transport.value().startswith(method + b" /path?q=1 HTTP/1.1\r\n")
    fresh.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert got[0].code == 200


def test_a_fresh_connection_that_dies_too_is_not_retried_again():
    agent, endpoint, _ = make()
    dead = reused_connection(agent, endpoint)
    got = results(agent.request(b"GET", URL))
    lose(dead)
    lose(endpoint.connections[1])
    assert len(endpoint.connections) == 2 and got[0].check(ResponseNeverReceived)


def test_a_request_with_a_body_or_a_non_idempotent_method_is_not_retried():
    for method, body in ((b"POST", None), (b"PUT", None), (b"GET", RequestBody(StringTransport(), 2))):
        agent, endpoint, _ = make()
        dead = reused_connection(agent, endpoint)
        got = results(agent.request(method, URL, None, body))
        lose(dead)
        assert len(endpoint.connections) == 1 and got[0].check(ResponseNeverReceived)


def test_no_retry_once_a_response_byte_arrived():
    agent, endpoint, _ = make()
    dead = reused_connection(agent, endpoint)
    got = results(agent.request(b"GET", URL))
    dead.dataReceived(b"HTTP/1.1 2")
    lose(dead)
    assert len(endpoint.connections) == 1 and got[0].check(ResponseNeverReceived)


def test_a_fresh_connection_lost_before_a_response_is_never_received():
    agent, endpoint, _ = make()
    got = results(agent.request(b"GET", URL))
    lose(endpoint.connections[0], ConnectionLost())
    assert len(endpoint.connections) == 1 and got[0].check(ResponseNeverReceived)


def test_a_connection_failure_is_passed_on_as_is_for_failover():
    agent, endpoint, _ = make()
    endpoint.refuse = True
    got = results(agent.request(b"GET", URL))
    assert got[0].check(ConnectionRefusedError)


def test_a_body_cut_off_is_a_response_failed():
    agent, endpoint, _ = make()
    got = results(agent.request(b"GET", URL))
    connection = endpoint.connections[0]
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    body = Body()
    got[0].deliverBody(body)
    lose(connection)
    assert body.data == b"abc" and body.reason.check(ResponseFailed)


def test_an_until_close_body_cut_by_a_reset_is_not_a_clean_end():
    agent, endpoint, _ = make()
    got = results(agent.request(b"GET", URL))
    connection = endpoint.connections[0]
    connection.dataReceived(b"HTTP/1.1 200 OK\r\n\r\nabc")
    body = Body()
    got[0].deliverBody(body)
    lose(connection, ConnectionLost())
    assert body.reason.check(ResponseFailed)


# --- back-pressure ------------------------------------------------------------------------------------


def test_pausing_the_body_pauses_reading_the_upstream_and_the_pool_gets_it_reading():
    agent, endpoint, _ = make()
    got = results(agent.request(b"GET", URL))
    connection = endpoint.connections[0]
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
    body = Body()
    got[0].deliverBody(body)
    body.transport.pauseProducing()
    assert connection.transport.producerState == "paused"
    body.transport.resumeProducing()
    assert connection.transport.producerState == "producing"
    body.transport.pauseProducing()
    connection.dataReceived(b"cd")  # what was in flight still arrives
    assert body.data == b"abcd" and body.reason.check(ResponseDone)
    assert connection.transport.producerState == "producing" and agent.pool.idle_count() == 1
    body.transport.pauseProducing()  # a late call after the end reaches nothing
    assert connection.transport.producerState == "producing"


def test_stopping_the_body_drops_the_connection_and_ends_the_body():
    agent, endpoint, _ = make()
    got = results(agent.request(b"GET", URL))
    connection = endpoint.connections[0]
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
    body = Body()
    got[0].deliverBody(body)
    body.transport.stopProducing()
    assert connection.transport.disconnecting and body.reason.check(ResponseFailed)
    lose(connection, ConnectionAborted())  # connectionLost once only (Body asserts it)
    assert agent.pool.idle_count() == 0


class Network:
    """The client connection under a RequestBody: records pause/resume."""

    def __init__(self) -> None:
        self.paused = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        pass


def test_a_body_of_unknown_length_goes_chunked_with_the_transport_as_its_back_pressure():
    agent, endpoint, _ = make()
    upload = RequestBody(Network(), None)
    upload.write(b"early")
    got = results(agent.request(b"POST", URL, None, upload))
    connection = endpoint.connections[0]
    transport = connection.transport
    assert transport.producer is upload and transport.streaming
    upload.write(b"")
    upload.write(b"more")
    upload.finish()
    assert transport.value() == (b"POST /path?q=1 HTTP/1.1\r\nHost: upstream.test:8443\r\nTransfer-Encoding: chunked\r\n\r\n"
                                 b"5\r\nearly\r\n4\r\nmore\r\n0\r\n\r\n")  # fmt: skip
    assert transport.producer is None
    connection.dataReceived(OK)
    got[0].deliverBody(Body())
    assert agent.pool.idle_count() == 1


def test_a_body_of_known_length_goes_with_content_length_and_pauses_when_the_upstream_does():
    agent, endpoint, _ = make()
    network = Network()
    upload = RequestBody(network, 300 * 1024)
    agent.request(b"PUT", URL, None, upload)
    transport = endpoint.connections[0].transport
    assert b"Content-Length: 307200\r\n\r\n" in transport.value()
    upload.pauseProducing()  # what the TCP/TLS transport does when its buffer fills
    upload.write(b"x" * 300 * 1024)
    assert network.paused  # the client is no longer read
    upload.resumeProducing()
    assert not network.paused and transport.value().endswith(b"x" * 1024)


def test_a_body_longer_than_its_length_fails_the_request():
    agent, endpoint, _ = make()
    upload = RequestBody(Network(), 3)
    got = results(agent.request(b"PUT", URL, None, upload))
    upload.write(b"toolong")
    assert got[0].check(Exception) and endpoint.connections[0].transport.disconnecting


def test_a_response_before_the_upload_ends_stops_the_upload_and_the_connection_is_not_reused():
    agent, endpoint, _ = make()
    upload = RequestBody(Network(), None)
    got = results(agent.request(b"POST", URL, None, upload))
    connection = endpoint.connections[0]
    connection.dataReceived(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n")
    got[0].deliverBody(Body())
    assert upload.stopped and connection.transport.disconnecting and agent.pool.idle_count() == 0


# --- cancellation -------------------------------------------------------------------------------------


def test_cancelling_while_connecting_cancels_the_connection_attempt():
    agent, endpoint, _ = make()
    endpoint.hold = True
    d = agent.request(b"GET", URL)
    got = results(d)
    d.cancel()
    assert endpoint.cancelled == 1 and got[0].check(defer.CancelledError)


def test_cancelling_while_waiting_for_the_response_aborts_the_connection():
    agent, endpoint, _ = make()
    d = agent.request(b"GET", URL)
    got = results(d)
    d.cancel()
    connection = endpoint.connections[0]
    assert got[0].check(defer.CancelledError) and connection.transport.disconnected
    lose(connection, ConnectionAborted())
    assert agent.pool.idle_count() == 0 and len(endpoint.connections) == 1  # no retry for a cancelled request


def test_a_connection_made_as_the_request_is_cancelled_is_dropped():
    agent, endpoint, _ = make()

    def connect(factory: Any) -> defer.Deferred[Any]:
        connection = endpoint.make(factory)
        return defer.Deferred(lambda d: d.callback(connection))  # connected just as the attempt was cancelled

    endpoint.connect = connect  # type: ignore[method-assign]
    d = agent.request(b"GET", URL)
    got = results(d)
    d.cancel()
    connection = endpoint.connections[0]
    assert got[0].check(defer.CancelledError)
    assert connection.transport.disconnected and connection.transport.value() == b""


# --- HTTP11Agent.send: the proxy's direct form (a receiver told, no Deferred) ------------------------------------------


class Receiver:
    """An IResponseReceiver that records what it is told."""

    def __init__(self) -> None:
        self.told: list[Any] = []

    def upstream_response(self, response: Any) -> None:
        self.told.append(response)

    def upstream_failed(self, failure: Failure) -> None:
        self.told.append(failure)


def test_send_tells_the_receiver_the_response_and_writes_what_request_writes():
    agent, endpoint, _ = make()
    receiver = Receiver()
    agent.send(b"GET", b"https://upstream.test:8443", b"/path?q=1", Headers({b"x-one": [b"1"]}), None, receiver)
    connection = endpoint.connections[0]
    assert connection.transport.value() == b"GET /path?q=1 HTTP/1.1\r\nHost: upstream.test:8443\r\nX-One: 1\r\n\r\n"
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    [response] = receiver.told
    assert response.code == 200 and response.request.absoluteURI == URL.split(b"?")[0] + b"?q=1"
    body = Body()
    response.deliverBody(body)
    assert body.data == b"ok" and body.reason is not None and body.reason.check(ResponseDone)
    assert agent.pool.idle_count() == 1


def test_send_with_a_bad_target_or_origin_tells_the_receiver_at_once_and_sends_nothing():
    agent, endpoint, _ = make()
    for base, target in [(b"https://upstream.test:8443", b"/a b"), (b"ftp://upstream.test", b"/"), (b"https://upstream.test", b"/\x7f")]:
        receiver = Receiver()
        agent.send(b"GET", base, target, Headers(), None, receiver)
        [failure] = receiver.told
        assert isinstance(failure, Failure) and failure.check(ValueError)
    assert endpoint.connections == []


def test_cancelling_a_sent_request_drops_its_connection_and_tells_the_receiver_cancelled_once():
    agent, endpoint, _ = make()
    receiver = Receiver()
    exchange = agent.send(b"GET", b"https://upstream.test:8443", b"/", Headers(), None, receiver)
    connection = endpoint.connections[0]
    exchange.cancel()
    exchange.cancel()
    lose(connection, ConnectionAborted())
    [failure] = receiver.told
    assert failure.check(defer.CancelledError)
    assert connection.transport.disconnecting or connection._aborted
    assert agent.pool.idle_count() == 0


def test_cancelling_a_send_while_connecting_cancels_the_connection_attempt():
    agent, endpoint, _ = make()
    endpoint.hold = True
    receiver = Receiver()
    exchange = agent.send(b"GET", b"https://upstream.test:8443", b"/", Headers(), None, receiver)
    exchange.cancel()
    assert endpoint.cancelled == 1
    [failure] = receiver.told
    assert failure.check(defer.CancelledError)


def test_a_refused_connection_is_told_to_the_receiver_as_the_deferred_would_fail():
    agent, endpoint, _ = make()
    endpoint.refuse = True
    receiver = Receiver()
    agent.send(b"GET", b"https://upstream.test:8443", b"/", Headers(), None, receiver)
    [failure] = receiver.told
    assert failure.check(ConnectionRefusedError)


class WholeReceiver(Receiver):
    """A receiver with upstream_whole: told whole responses as (response, body), and what the pool held at that moment."""

    def __init__(self, agent: HTTP11Agent, then: Any = None) -> None:
        super().__init__()
        self.agent = agent
        self.then = then
        self.idle_when_told: list[int] = []

    def upstream_whole(self, response: Any, body: bytes) -> None:
        self.told.append((response, body))
        self.idle_when_told.append(self.agent.pool.idle_count())
        if self.then is not None:
            self.then()


def test_a_response_whole_in_one_read_is_told_whole_after_its_connection_is_pooled():
    agent, endpoint, _ = make()
    receiver = WholeReceiver(agent)
    agent.send(b"GET", b"https://upstream.test:8443", b"/", Headers(), None, receiver)
    endpoint.connections[0].dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nETag: x\r\n\r\nhello")
    [(response, body)] = receiver.told
    assert (response.code, body, response.length) == (200, b"hello", 5)
    assert receiver.idle_when_told == [1]  # pooled before the receiver was told: its next request finds the connection
    later = Body()
    response.deliverBody(later)  # the IResponse contract still holds for a whole response
    assert later.data == b"hello" and later.reason is not None and later.reason.check(ResponseDone)


def test_the_next_request_sent_from_upstream_whole_reuses_the_same_connection():
    agent, endpoint, _ = make()
    second = Receiver()
    receiver = WholeReceiver(agent, then=lambda: agent.send(b"GET", b"https://upstream.test:8443", b"/2", Headers(), None, second))
    agent.send(b"GET", b"https://upstream.test:8443", b"/1", Headers(), None, receiver)
    connection = endpoint.connections[0]
    connection.transport.clear()
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na")
    assert len(endpoint.connections) == 1 and connection.transport.value().startswith(b"GET /2 HTTP/1.1\r\n")


def test_a_response_split_over_reads_takes_the_streaming_path():
    agent, endpoint, _ = make()
    receiver = WholeReceiver(agent)
    agent.send(b"GET", b"https://upstream.test:8443", b"/", Headers(), None, receiver)
    connection = endpoint.connections[0]
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhe")
    [response] = receiver.told
    assert IResponse.providedBy(response)
    body = Body()
    response.deliverBody(body)
    connection.dataReceived(b"llo")
    assert body.data == b"hello" and body.reason is not None and body.reason.check(ResponseDone)


@pytest.mark.parametrize("after", [b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", b"x"])
def test_a_whole_response_with_bytes_after_it_is_told_but_its_connection_is_closed_not_pooled(after):
    agent, endpoint, _ = make()
    receiver = WholeReceiver(agent)
    agent.send(b"GET", b"https://upstream.test:8443", b"/", Headers(), None, receiver)
    connection = endpoint.connections[0]
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" + after)
    told = receiver.told
    assert told and (told[0][1] if isinstance(told[0], tuple) else None) in (b"ok", None)
    assert agent.pool.idle_count() == 0
    assert connection.transport.disconnecting or connection._aborted


def test_a_whole_response_to_a_connection_close_request_closes_the_connection():
    agent, endpoint, _ = make()
    receiver = WholeReceiver(agent)
    agent.send(b"GET", b"https://upstream.test:8443", b"/", Headers(), None, receiver)
    connection = endpoint.connections[0]
    connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
    assert [body for _, body in receiver.told] == [b"ok"] and receiver.idle_when_told == [0]
    assert agent.pool.idle_count() == 0 and connection.transport.disconnecting
