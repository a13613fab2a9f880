"""
The gateway's HTTP server protocol (mtlsgate.http.server), request and exchange in memory: a L{GatewaySite} on a StringTransport, a
MemoryReactorClock for the timers, and a scripted upstream in place of the Agent.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.error import ConnectionAborted
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http_headers import Headers
from zope.interface import implementer

from mtlsgate.accounting import FinishedRequest, IRequestObserver, RequestObservers
from mtlsgate.config.model import Limits, Route
from mtlsgate.identity import AllowRules
from mtlsgate.observe.accesslog import AccessEvents
from mtlsgate.observe.metrics import NoMetrics
from mtlsgate.proxy import exchange
from mtlsgate.proxy.exchange import GatewaySite, ProxyResource, ProxyState, RouteEntry, header_field_problem, request_line_problem
from mtlsgate.proxy.routing import RouteTable
from tests.compiled import pure_python_only

H = b"Host: localhost\r\n"


class Consumer:
    """The upstream connection's end of the request body."""

    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


class Upstream:
    """Stands in for the route's UpstreamGroup and its Agent: records each request, answers when told."""

    def __init__(self) -> None:
        self.agent = self
        self.requests: list[tuple[bytes, bytes, Any, Any]] = []
        self.pending: list[defer.Deferred[Any]] = []
        self.consumer = Consumer()

    def order(self) -> list[str]:
        return ["https://upstream.test"]

    def request(self, method: bytes, url: bytes, headers: Any, body: Any) -> defer.Deferred[Any]:
        self.requests.append((method, url, headers, body))
        d: defer.Deferred[Any] = defer.Deferred()
        self.pending.append(d)
        if body is not None:
            body.startProducing(self.consumer)
        return d


@implementer(IRequestObserver)
class Metrics:
    """A request observer that keeps (route, status) of each finished request."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, int]] = []

    def request_finished(self, record: FinishedRequest) -> None:
        self.requests.append((record.route, record.status))


class Gateway:
    """One client connection to an in-memory gateway with one route to a scripted upstream."""

    def __init__(self, timeout: float = 30.0, observer: IRequestObserver | None = None) -> None:
        self.reactor = MemoryReactorClock()
        self.upstream = Upstream()
        self.metrics = Metrics()
        route = Route(host="localhost", timeout=timeout)
        table = RouteTable([("localhost", "/", RouteEntry(route=route, upstreams=self.upstream))])  # type: ignore[arg-type]
        state = ProxyState(routes=table, global_rules=AllowRules(), require_client_certificate=False, hsts_header=b"max-age=60")
        site = GatewaySite(ProxyResource(self.reactor, state, observer if observer is not None else RequestObservers([AccessEvents(), self.metrics])))
        site.reactor = self.reactor
        self.channel = site.buildProtocol(None)
        self.transport = StringTransport()
        self.channel.makeConnection(self.transport)
        self.access: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self._observe)

    def _observe(self, event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "mtlsgate.access":
            self.access.append(event)

    def close(self) -> None:
        globalLogPublisher.removeObserver(self._observe)

    def send(self, data: bytes) -> bytes:
        self.channel.dataReceived(data)
        return self.transport.value()


@pytest.fixture
def gateway():
    g = Gateway()
    yield g
    g.close()


# --- framing ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("byte", [0x00, 0x09, 0x7F, 0x80, 0xA0, 0xB0, 0xFF])
def test_a_request_target_byte_outside_visible_ascii_is_a_400_and_nothing_goes_upstream(gateway, byte):
    answer = gateway.send(b"GET /a" + bytes([byte]) + b" HTTP/1.1\r\n" + H + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n") and b"request target" in answer
    assert gateway.upstream.requests == [] and gateway.transport.disconnecting


def test_request_line_problem_knows_visible_ascii():
    assert request_line_problem(b"GET /" + bytes(range(0x21, 0x7F)) + b" HTTP/1.1") is None
    assert request_line_problem(b"GET /\x7f HTTP/1.1") == "byte 0x7F in the request target (only visible ASCII is allowed)"


@pytest.mark.parametrize(
    ("name", "value", "problem"),
    [
        (b"Content-Length", b"9223372036854775807", None),
        (b"Content-Length", b"9223372036854775808", "Content-Length must be decimal digits only, below 2^63"),
        (b"Content-Length", b"+1", "Content-Length must be decimal digits only, below 2^63"),
        (b"Content-Length", "\u0661".encode(), "Content-Length must be decimal digits only, below 2^63"),
        (b"X-A", b"a\tb\x80\xff", None),
        (b"X-A", b"a\x0bb", "control character 0x0B in the value of header X-A"),
        (b"X-A", b"a\x7f", "control character 0x7F in the value of header X-A"),
        (b"X A", b"v", "header name 'X A' is not a token"),
        (b"", b"v", "header name '' is not a token"),
        (b"Transfer-Encoding", b"gzip, chunked", "only 'Transfer-Encoding: chunked' is accepted"),
    ],
)
def test_header_field_problem(name, value, problem):
    assert header_field_problem(name, value) == problem


def test_a_content_length_of_2_63_is_a_400_and_nothing_goes_upstream(gateway):
    answer = gateway.send(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 9223372036854775808\r\n\r\nhello")
    assert answer.startswith(b"HTTP/1.1 400 ") and gateway.upstream.requests == []


def test_a_vertical_tab_in_a_header_value_is_a_400_and_nothing_goes_upstream(gateway):
    answer = gateway.send(b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x0bb\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ") and gateway.upstream.requests == []


@pytest.mark.parametrize("method", [b"CONNECT", b"TRACE", b"track"])
def test_connect_and_trace_get_405_with_allow_from_the_gateway(gateway, method):
    answer = gateway.send(method + b" / HTTP/1.1\r\n" + H + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 405 ") and b"\r\nAllow: GET, HEAD" in answer and b"Server: mtlsgate\r\n" in answer
    assert gateway.upstream.requests == [] and gateway.metrics.requests == [("-", 405)]


def test_options_star_is_the_gateways_own_answer(gateway):
    answer = gateway.send(b"OPTIONS * HTTP/1.1\r\n" + H + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ") and b"Allow: " in answer and b"TwistedWeb" not in answer
    assert b"\r\nDate: " in answer and gateway.upstream.requests == []  # HSTS (HTTPS only): tests/adversarial


# --- one access line and one count per request ---------------------------------------------------


class UpstreamTransport:
    def pauseProducing(self) -> None: ...

    def resumeProducing(self) -> None: ...

    def stopProducing(self) -> None: ...


class Response:
    code = 200
    phrase = b"OK"
    length = 10

    def __init__(self) -> None:
        self.headers = Headers()
        self.protocol: Any = None

    def deliverBody(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.makeConnection(UpstreamTransport())


def test_a_response_the_upstream_cuts_off_is_logged_and_counted_once(gateway):
    gateway.send(b"GET /cut HTTP/1.1\r\n" + H + b"\r\n")
    response = Response()
    gateway.upstream.pending[0].callback(response)
    response.protocol.dataReceived(b"hello")
    response.protocol.connectionLost(Failure(ResponseFailed([Failure(ConnectionAborted())])))
    gateway.channel.connectionLost(Failure(ConnectionAborted()))  # the abort the gateway asked for
    assert gateway.metrics.requests == [("localhost/", 200)]
    assert [(e["status"], e["size"]) for e in gateway.access] == [(200, 5)]


def test_a_client_that_goes_away_is_logged_and_counted_once_as_499(gateway):
    gateway.send(b"GET /gone HTTP/1.1\r\n" + H + b"\r\n")
    gateway.channel.connectionLost(Failure(ConnectionAborted()))
    assert gateway.metrics.requests == [("localhost/", 499)] and [e["status"] for e in gateway.access] == [499]


@pure_python_only(exchange)
def test_with_the_access_log_off_and_no_metrics_no_record_is_built_until_a_reload_turns_the_log_on(monkeypatch):
    built: list[FinishedRequest] = []
    real = exchange.finished

    def finished(*args: Any, **kwargs: Any) -> FinishedRequest:
        built.append(real(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(exchange, "finished", finished)
    access = AccessEvents(enabled=False)
    g = Gateway(observer=RequestObservers([access, NoMetrics()]))
    try:
        for path in (b"/a", b"/b"):  # relayed, then cut off by the client after the response head (a 499 once)
            g.send(b"GET " + path + b" HTTP/1.1\r\n" + H + b"\r\n")
            response = Response()
            g.upstream.pending[-1].callback(response)
            response.protocol.dataReceived(b"0123456789")
            response.protocol.connectionLost(Failure(ResponseDone()))
        g.send(b"GET /c HTTP/1.1\r\n" + H + b"\r\n")
        g.upstream.pending[-1].callback(Response())
        g.send(b"TRACE / HTTP/1.1\r\n" + H + b"\r\n")  # the gateway's own answer
        assert built == [] and g.access == []
        g.channel.connectionLost(Failure(ConnectionAborted()))  # the client goes: its 499 is accounted, and built for no one
        assert built == []
        access.enabled = True  # a reload turns the access log on: the next request's record is built and logged
        g2 = Gateway(observer=RequestObservers([access, NoMetrics()]))
        try:
            g2.send(b"GET /d HTTP/1.1\r\n" + H + b"\r\n")
            response = Response()
            g2.upstream.pending[-1].callback(response)
            response.protocol.dataReceived(b"0123456789")
            response.protocol.connectionLost(Failure(ResponseDone()))
            assert [(r.target, r.status, r.size) for r in built] == [("/d", 200, 10)]
            assert [(e["uri"], e["status"], e["size"]) for e in g2.access] == [("/d", 200, 10)]
        finally:
            g2.close()
    finally:
        g.close()


# --- the route timeout is the upstream's time, not the client's upload ----------------------------


@pytest.fixture
def slow():
    g = Gateway(timeout=1.0)
    yield g
    g.close()


def test_a_slow_upload_is_not_a_504_and_the_timeout_runs_once_the_body_is_sent(slow):
    slow.send(b"POST /up HTTP/1.1\r\n" + H + b"Content-Length: 8\r\n\r\n")
    for _ in range(8):  # one byte every 0.5s: 4s of upload on a 1s route timeout
        slow.reactor.advance(0.5)
        assert slow.send(b"x") == b""
    assert slow.upstream.consumer.data == b"x" * 8
    slow.reactor.advance(0.9)
    assert slow.transport.value() == b""
    slow.reactor.advance(0.2)
    assert slow.transport.value().startswith(b"HTTP/1.1 504 ")
    assert slow.metrics.requests == [("localhost/", 504)]


def test_an_upstream_that_stops_taking_the_body_gets_a_504(slow):
    slow.send(b"POST /up HTTP/1.1\r\n" + H + b"Content-Length: 8\r\n\r\nxx")
    body = slow.upstream.requests[0][3]
    body.pauseProducing()  # the upstream connection's buffers are full
    slow.send(b"xx")
    slow.reactor.advance(1.1)
    assert slow.transport.value().startswith(b"HTTP/1.1 504 ")


def test_a_request_without_a_body_times_out_after_the_route_timeout(slow):
    slow.send(b"GET /wait HTTP/1.1\r\n" + H + b"\r\n")
    slow.reactor.advance(0.9)
    assert slow.transport.value() == b""
    slow.reactor.advance(0.2)
    assert slow.transport.value().startswith(b"HTTP/1.1 504 ")


class StoppableTransport(UpstreamTransport):
    def __init__(self, protocol: Any) -> None:
        self.protocol = protocol
        self.stopped = False

    def stopProducing(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.protocol.connectionLost(Failure(ResponseFailed([Failure(ConnectionAborted())])))


def _respond_slowly(gateway) -> Any:
    response = Response()

    def deliver(protocol: Any) -> None:
        response.protocol = protocol
        response.upstream = StoppableTransport(protocol)  # type: ignore[attr-defined]
        protocol.makeConnection(response.upstream)  # type: ignore[attr-defined]

    response.deliverBody = deliver  # type: ignore[method-assign]
    gateway.upstream.pending[0].callback(response)
    return response


def test_the_stall_timer_counts_from_the_last_body_bytes_not_from_the_request(slow):
    slow.send(b"GET /slow HTTP/1.1\r\n" + H + b"\r\n")
    slow.reactor.advance(0.8)  # the upstream answers late within the route timeout
    response = _respond_slowly(slow)
    response.protocol.dataReceived(b"he")
    slow.reactor.advance(0.5)  # 1.3s after the request, 0.5s after the headers
    response.protocol.dataReceived(b"ll")
    slow.reactor.advance(0.9)
    assert not response.upstream.stopped
    slow.reactor.advance(0.2)  # 1.1s without a byte
    assert response.upstream.stopped and slow.transport.disconnecting
    assert slow.metrics.requests == [("localhost/", 200)]


def test_a_client_that_holds_the_response_up_stops_the_stall_clock(slow):
    slow.send(b"GET /slow HTTP/1.1\r\n" + H + b"\r\n")
    response = _respond_slowly(slow)
    response.protocol.dataReceived(b"he")
    response.protocol.pauseProducing()  # the client reads slowly
    slow.reactor.advance(5)
    assert not response.upstream.stopped
    response.protocol.resumeProducing()
    slow.reactor.advance(0.9)
    assert not response.upstream.stopped
    slow.reactor.advance(0.2)
    assert response.upstream.stopped


def test_one_timer_per_connection_for_the_route_timeout_and_the_stall_timer(gateway):
    """
    A request answered at once arms one timer, not one per phase; the connection's next request reuses that timer
    (no callLater, no cancel per request); a timer left over fires into nothing, and closing the connection cancels it.
    """
    armed: list[Any] = []
    call_later = gateway.reactor.callLater

    def counting(delay: float, f: Any, *a: Any, **kw: Any) -> Any:
        call = call_later(delay, f, *a, **kw)
        armed.append(call)
        return call

    gateway.reactor.callLater = counting  # type: ignore[method-assign]
    gateway.send(b"GET /a HTTP/1.1\r\n" + H + b"\r\n")
    _answer(gateway)
    assert gateway.transport.value().startswith(b"HTTP/1.1 200 OK\r\n")
    assert len(armed) == 1 and armed[0].active()  # left scheduled for the next request
    gateway.reactor.advance(10)
    gateway.send(b"GET /b HTTP/1.1\r\n" + H + b"\r\n")
    _answer(gateway, 1)
    assert len(armed) == 1 and armed[0].getTime() == 30.0  # the same call, not even moved: the disarmed timer lets it run into nothing
    gateway.transport.clear()
    gateway.reactor.advance(30.0)  # fires into nothing
    assert not armed[0].active() and gateway.transport.value() == b"" and not gateway.transport.disconnecting
    gateway.send(b"GET /c HTTP/1.1\r\n" + H + b"\r\n")
    assert len(armed) == 2 and armed[1].active()
    gateway.channel.connectionLost(Failure(ConnectionAborted()))
    assert not armed[1].active()


def test_the_route_timeout_counts_from_each_request_on_a_kept_connection(gateway):
    """The timer moved on for a later request times that request from its own start, not the first one's."""
    gateway.send(b"GET /a HTTP/1.1\r\n" + H + b"\r\n")
    _answer(gateway)
    gateway.reactor.advance(20.0)
    gateway.send(b"GET /b HTTP/1.1\r\n" + H + b"\r\n")  # its route timeout: at 50s; the timer was set for 30s
    gateway.transport.clear()
    gateway.reactor.advance(10.5)
    assert gateway.transport.value() == b""
    gateway.reactor.advance(19.0)
    assert gateway.transport.value() == b""
    gateway.reactor.advance(1.0)
    assert gateway.transport.value().startswith(b"HTTP/1.1 504 ")


def test_a_sooner_timeout_on_the_same_connection_takes_a_timer_of_its_own():
    """A route with a shorter timeout after a longer one's request: its timer fires on its own time, not the first's."""
    g = Gateway(timeout=30.0)
    try:
        g.send(b"GET /a HTTP/1.1\r\n" + H + b"\r\n")
        _answer(g)
        entry = g.channel.handler.__self__.state.routes.lookup("localhost", b"/")
        object.__setattr__(entry.route, "timeout", 2.0)
        g.send(b"GET /b HTTP/1.1\r\n" + H + b"\r\n")
        g.transport.clear()
        g.reactor.advance(1.9)
        assert g.transport.value() == b""
        g.reactor.advance(0.2)
        assert g.transport.value().startswith(b"HTTP/1.1 504 ")
    finally:
        g.close()


# --- the server protocol: one request at a time, keep-alive, timers (mtlsgate.http.server) ----------


def _answer(gateway, index: int = 0, body: bytes = b"0123456789") -> None:
    response = Response()
    gateway.upstream.pending[index].callback(response)
    response.protocol.dataReceived(body)
    response.protocol.connectionLost(Failure(ResponseDone()))


def test_pipelined_requests_wait_until_the_response_before_them_is_done(gateway):
    gateway.send(b"GET /one HTTP/1.1\r\n" + H + b"\r\nGET /two HTTP/1.1\r\n" + H + b"\r\n")
    assert [r[1] for r in gateway.upstream.requests] == [b"https://upstream.test/one"]
    assert gateway.transport.producerState == "paused"  # no more reading while a request is in flight
    _answer(gateway)
    assert [r[1] for r in gateway.upstream.requests] == [b"https://upstream.test/one", b"https://upstream.test/two"]
    _answer(gateway, 1)
    assert gateway.transport.value().count(b"HTTP/1.1 200 OK\r\n") == 2 and gateway.transport.producerState == "producing"
    assert not gateway.transport.disconnecting


def test_http_1_0_with_keep_alive_stays_open_when_the_response_has_a_length(gateway):
    gateway.send(b"GET /k HTTP/1.0\r\n" + H + b"Connection: keep-alive\r\n\r\n")
    _answer(gateway)
    answer = gateway.transport.value()
    assert answer.startswith(b"HTTP/1.0 200 OK\r\n") and b"\r\nConnection: keep-alive\r\n" in answer and b"Content-Length: 10\r\n" in answer
    assert not gateway.transport.disconnecting


def test_http_1_0_without_keep_alive_and_connection_close_are_closed_after_the_response(gateway):
    gateway.send(b"GET /k HTTP/1.0\r\n" + H + b"\r\n")
    _answer(gateway)
    assert gateway.transport.disconnecting
    other = Gateway()
    other.send(b"GET /k HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n")
    _answer(other)
    assert b"\r\nConnection: close\r\n" in other.transport.value() and other.transport.disconnecting
    other.close()


def test_headers_that_take_longer_than_the_header_timeout_get_408(gateway):
    gateway.send(b"GET / HTTP/1.1\r\n")
    gateway.reactor.advance(9.9)
    assert gateway.send(b"X-A: 1\r\n") == b""
    gateway.reactor.advance(0.2)
    assert gateway.transport.value().startswith(b"HTTP/1.1 408 Request Timeout\r\n") and gateway.transport.disconnecting


def test_a_connection_without_a_byte_for_the_idle_timeout_is_closed(gateway):
    gateway.reactor.advance(59)
    assert not gateway.transport.disconnecting
    gateway.reactor.advance(2)
    assert gateway.transport.disconnecting and gateway.transport.value() == b""


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n" + H + b"\r\n", b"414"),
        (b"GET / HTTP/1.1\r\n" + H + b"X-Big: " + b"a" * 9000 + b"\r\n\r\n", b"431"),
        (b"GET / HTTP/1.1\r\n" + H + b"".join(b"X-%d: v\r\n" % i for i in range(150)) + b"\r\n", b"431"),
        (b"GET / HTTP/1.1\r\n" + H + b"X-A: a\r\n b\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\n" + H + b"\n", b"400"),
        (b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", b"400"),
    ],
)
def test_oversized_and_ambiguous_heads_are_refused_before_anything_goes_upstream(gateway, raw, status):
    answer = gateway.send(raw)
    assert answer.startswith(b"HTTP/1.1 " + status + b" ") and b"\r\nConnection: close\r\n" in answer
    assert gateway.upstream.requests == [] and gateway.transport.disconnecting


def test_100_continue_is_sent_only_when_the_request_goes_upstream(gateway):
    answer = gateway.send(b"POST /up HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nExpect: 100-continue\r\n\r\n")
    assert answer == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert not gateway.upstream.requests[0][2].hasHeader(b"expect")
    gateway.send(b"abc")
    assert gateway.upstream.consumer.data == b"abc"


def test_a_broken_chunk_after_the_request_went_upstream_is_a_400_and_the_upstream_request_is_cancelled(gateway):
    answer = gateway.send(b"POST /up HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ") and gateway.transport.disconnecting
    assert gateway.upstream.pending[0].called  # cancelled
    assert gateway.metrics.requests == [("localhost/", 499)]


def test_a_handler_that_raises_gets_a_500_and_the_connection_closes_not_a_hang():
    from mtlsgate.http.server import HTTPServerFactory

    def broken(request):
        raise ValueError("a bug")

    protocol = HTTPServerFactory(broken, Limits(), MemoryReactorClock()).buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    errors: list[Any] = []
    globalLogPublisher.addObserver(errors.append)
    try:
        protocol.dataReceived(b"GET / HTTP/1.1\r\n" + H + b"\r\n")
    finally:
        globalLogPublisher.removeObserver(errors.append)
    assert transport.value().startswith(b"HTTP/1.1 500 ") and transport.disconnecting
    assert any(e.get("log_failure") is not None for e in errors)
