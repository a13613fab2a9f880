"""
The HTTP/2 front end (mtlsgate.http.h2server) in memory: an h2 client connection object talking to the
server protocol on a StringTransport, the reactor a MemoryReactorClock.  The handler is the test.
"""

from __future__ import annotations

from typing import Any

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated, DataReceived, InformationalResponseReceived, ResponseReceived, StreamEnded, StreamReset, TrailersReceived,
)  # fmt: skip
from h2.settings import SettingCodes
from hyperframe.frame import ContinuationFrame, DataFrame, Frame, GoAwayFrame, HeadersFrame, RstStreamFrame
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mtlsgate.config.model import Limits
from mtlsgate.http import h2server
from mtlsgate.http.h2server import H2ServerFactory
from mtlsgate.http.headers import sendable_trailers
from mtlsgate.http.interfaces import IGatewayChannel, IGatewayRequest
from mtlsgate.http.server import HTTPServerFactory


class _Transport(StringTransport):
    def abortConnection(self) -> None:
        self.loseConnection()


@implementer(IPushProducer)
class Producer:
    def __init__(self) -> None:
        self.paused = False
        self.pauses = 0

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        pass


class Consumer:
    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


class Peer:
    """The server protocol and an h2 client, bytes moved between them by L{pump}; client events collected."""

    def __init__(self, limits: Limits = Limits(), max_streams: int = 100, client_settings: dict[Any, int] | None = None, handler: Any = None) -> None:
        self.reactor = Clock()
        self.requests: list[Any] = []
        factory = H2ServerFactory(handler or self.requests.append, limits, self.reactor, max_streams=max_streams)
        self.factory = factory
        self.server = factory.buildProtocol(None)
        self.transport = _Transport()
        self.server.makeConnection(self.transport)
        self.client = H2Connection(H2Configuration(client_side=True, header_encoding=None, validate_outbound_headers=False, normalize_outbound_headers=False))
        self.client.initiate_connection()
        if client_settings:
            self.client.update_settings(client_settings)
        self.events: list[Any] = []

    def send(self) -> None:
        """Client to server only (the client has not read the server's SETTINGS yet, as in a first flight)."""
        data = self.client.data_to_send()
        if data:
            self.server.dataReceived(data)

    def pump(self) -> list[Any]:
        self.send()
        out = self.transport.value()
        self.transport.clear()
        new = self.client.receive_data(out) if out else []
        self.events += new
        self.send()
        return new

    def get(self, path: str = "/", headers: list[tuple[bytes, bytes]] | None = None, end: bool = True, method: bytes = b"GET") -> int:
        stream_id = self.client.get_next_available_stream_id()
        fields = [(b":method", method), (b":authority", b"localhost"), (b":scheme", b"https"), (b":path", path.encode())]
        self.client.send_headers(stream_id, fields + (headers or []), end_stream=end)
        return stream_id

    def fill(self, stream_id: int, byte: bytes = b"x") -> int:
        """Send as much body as the stream's window allows, in frames the server takes; returns the count."""
        total = 0
        while (room := min(self.client.local_flow_control_window(stream_id), self.client.max_outbound_frame_size)) > 0:
            self.client.send_data(stream_id, byte * room)
            total += room
        return total

    def of(self, kind: type, stream_id: int | None = None) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind) and (stream_id is None or getattr(e, "stream_id", None) == stream_id)]

    def goaway(self) -> ConnectionTerminated | None:
        found = self.of(ConnectionTerminated)
        return found[0] if found else None


def _respond(request: Any, body: bytes = b"hello", code: int = 200) -> None:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"text/plain")
    request.write(body)
    request.finish()


# --- the request interface --------------------------------------------------------------------------


def test_a_stream_is_a_gateway_request_with_authority_as_host_and_gets_its_response():
    peer = Peer()
    sid = peer.get("/a?b=1", headers=[(b"x-kept", b"1"), (b"cookie", b"a=1"), (b"cookie", b"b=2")])
    peer.pump()
    [request] = peer.requests
    assert verifyObject(IGatewayRequest, request) and verifyObject(IGatewayChannel, request.channel)
    assert (request.method, request.uri, request.path, request.clientproto) == (b"GET", b"/a?b=1", b"/a", b"HTTP/2")
    assert request.requestHeaders.getRawHeaders(b"host") == [b"localhost"]
    assert request.getHeader(b"x-kept") == b"1"
    assert request.requestHeaders.getRawHeaders(b"cookie") == [b"a=1; b=2"]  # crumbs joined for an HTTP/1.1 upstream
    assert request.body is None
    assert request.channel.transport is peer.transport
    _respond(request)
    peer.pump()
    [response] = peer.of(ResponseReceived, sid)
    assert dict(response.headers)[b":status"] == b"200"
    assert b"".join(e.data for e in peer.of(DataReceived, sid)) == b"hello"
    assert peer.of(StreamEnded, sid)
    assert sid not in peer.server.streams


def test_the_http11_request_provides_the_same_interface():
    requests: list[Any] = []
    protocol = HTTPServerFactory(requests.append, Limits(), Clock()).buildProtocol(None)
    protocol.makeConnection(_Transport())
    protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert verifyObject(IGatewayRequest, requests[0]) and verifyObject(IGatewayChannel, requests[0].channel)


def test_a_response_without_body_is_one_headers_frame():
    peer = Peer()
    sid = peer.get()
    peer.pump()
    request = peer.requests[0]
    request.setResponseCode(404)
    request.write(b"")
    request.finish()
    peer.pump()
    [response] = peer.of(ResponseReceived, sid)
    assert response.stream_ended is not None
    assert not peer.of(DataReceived, sid)


def test_the_client_resetting_a_stream_tells_the_request():
    peer = Peer()
    sid = peer.get()
    peer.pump()
    request = peer.requests[0]
    outcome: list[Any] = []
    request.when_done(outcome.append)
    peer.client.reset_stream(sid, ErrorCodes.CANCEL)
    peer.pump()
    assert request.disconnected and outcome and outcome[0] is not None
    assert sid not in peer.server.streams


def test_expect_100_continue_gets_an_informational_100_on_proceed():
    peer = Peer()
    sid = peer.get(method=b"POST", headers=[(b"expect", b"100-continue"), (b"content-length", b"3")], end=False)
    peer.pump()
    request = peer.requests[0]
    assert not peer.of(InformationalResponseReceived)
    request.proceed()
    peer.pump()
    assert [dict(e.headers)[b":status"] for e in peer.of(InformationalResponseReceived, sid)] == [b"100"]


# --- flow control -----------------------------------------------------------------------------------


def test_request_body_data_is_acknowledged_only_as_the_upstream_takes_it():
    peer = Peer()
    sid = peer.get(method=b"POST", end=False)
    peer.pump()
    request = peer.requests[0]
    window = peer.fill(sid)
    peer.pump()
    assert request.body.received == window
    assert peer.client.local_flow_control_window(sid) == 0  # nobody took the bytes: the client must wait
    consumer = Consumer()
    request.body.startProducing(consumer)  # the upstream connection takes what is buffered
    peer.pump()
    assert len(consumer.data) == window
    assert peer.client.local_flow_control_window(sid) > 0
    request.body.pauseProducing()  # a slow upstream
    peer.fill(sid, b"y")
    peer.pump()
    assert peer.client.local_flow_control_window(sid) == 0
    assert peer.client.outbound_flow_control_window > 0  # one slow stream never holds the connection's window
    request.body.resumeProducing()
    peer.pump()
    assert peer.client.local_flow_control_window(sid) > 0


def test_a_response_waits_for_the_clients_window_with_its_producer_paused():
    peer = Peer(client_settings={SettingCodes.INITIAL_WINDOW_SIZE: 1000})
    peer.pump()
    sid = peer.get()
    peer.pump()
    request = peer.requests[0]
    producer = Producer()
    request.registerProducer(producer, True)
    request.setResponseCode(200)
    request.write(b"z" * 200_000)
    peer.pump()
    received = sum(len(e.data) for e in peer.of(DataReceived, sid))
    assert received == 1000 and producer.paused  # the h2 client acknowledges nothing by itself
    sent = received
    while sent < 200_000:
        peer.client.acknowledge_received_data(received, sid)
        peer.client.increment_flow_control_window(50_000, sid)
        peer.client.increment_flow_control_window(50_000)
        new = peer.pump()
        received = sum(len(e.data) for e in new if isinstance(e, DataReceived))
        assert received
        sent += received
    assert not producer.paused
    request.unregisterProducer()
    request.finish()
    peer.pump()
    assert peer.of(StreamEnded, sid)


def test_a_client_that_does_not_read_is_not_read_either():
    peer = Peer()
    peer.server.pauseProducing()  # the transport's buffer is full
    assert peer.transport.producerState == "paused"
    peer.server.resumeProducing()
    assert peer.transport.producerState == "producing"


# --- trailers ---------------------------------------------------------------------------------------


def test_trailers_are_a_final_headers_frame_and_bad_fields_are_dropped():
    peer = Peer()
    sid = peer.get(headers=[(b"te", b"trailers")])
    peer.pump()
    request = peer.requests[0]
    request.setHeader(b"content-type", b"application/grpc")
    request.write(b"\x00\x00\x00\x00\x00")
    request.write_trailers([(b"grpc-status", b"0"), (b"Grpc-Message", b"ok"), (b"connection", b"close"), (b":status", b"500"),
                            (b"x-bad", b"a\r\nb"), (b"bad name", b"v")])  # fmt: skip
    request.finish()
    peer.pump()
    [trailers] = peer.of(TrailersReceived, sid)
    assert trailers.headers == [(b"grpc-status", b"0"), (b"grpc-message", b"ok")]
    assert peer.of(StreamEnded, sid)


def test_sendable_trailers():
    assert sendable_trailers([(b"A", b"1"), (b"content-length", b"2"), (b"x", b" y"), (b"x", b"\x00"), (b"", b"z")]) == [(b"a", b"1")]


def _http11(head: bytes) -> tuple[Any, _Transport]:
    requests: list[Any] = []
    transport = _Transport()
    protocol = HTTPServerFactory(requests.append, Limits(), Clock()).buildProtocol(None)
    protocol.makeConnection(transport)
    protocol.dataReceived(head)
    return requests[0], transport


@pytest.mark.parametrize("te, sent", [(b"TE: trailers\r\n", True), (b"TE: gzip, Trailers;q=1\r\n", True), (b"", False)])
def test_http11_sends_trailers_in_the_last_chunk_only_to_a_client_that_accepts_them(te, sent):
    request, transport = _http11(b"GET / HTTP/1.1\r\nHost: x\r\n" + te + b"\r\n")
    request.write(b"abc")
    request.write_trailers([(b"grpc-status", b"0"), (b"x-evil", b"1\r\nInjected: yes")])
    request.finish()
    out = transport.value()
    assert out.endswith(b"3\r\nabc\r\n0\r\ngrpc-status: 0\r\n\r\n" if sent else b"3\r\nabc\r\n0\r\n\r\n")
    assert b"Injected" not in out


def test_http11_drops_trailers_on_a_response_with_a_length():
    request, transport = _http11(b"GET / HTTP/1.1\r\nHost: x\r\nTE: trailers\r\n\r\n")
    request.setHeader(b"content-length", b"3")
    request.write(b"abc")
    request.write_trailers([(b"grpc-status", b"0")])
    request.finish()
    assert transport.value().endswith(b"\r\n\r\nabc")


# --- refusals and bounds ----------------------------------------------------------------------------


@pytest.mark.parametrize("field", [(b"x(y", b"1"), (b"x-ctl", b"a\x01b"), (b"x-del", b"a\x7fb"), (b"x_y", b"1\x0b")])
def test_what_the_http11_engine_refuses_is_a_400_on_the_stream_and_never_handed_on(field):
    peer = Peer()
    sid = peer.get(method=b"POST", headers=[field], end=False)
    peer.client.send_data(sid, b"abc", end_stream=True)
    peer.pump()
    assert not peer.requests
    [response] = peer.of(ResponseReceived, sid)
    assert dict(response.headers)[b":status"] == b"400"
    assert not peer.goaway()


@pytest.mark.parametrize("method", [b"GET /admin HTTP/1.1", b"GET\t", b"G(E)T", b"", b"GET\x01"])
def test_a_method_that_is_not_a_token_is_a_400_on_the_stream_and_never_handed_on(method):
    peer = Peer()
    sid = peer.get(method=method)
    peer.pump()
    assert not peer.requests
    if method.endswith(b"\t"):  # surrounding whitespace: h2's own refusal, the connection's end
        assert peer.goaway() is not None and peer.goaway().error_code == ErrorCodes.PROTOCOL_ERROR
        return
    [response] = peer.of(ResponseReceived, sid)
    assert dict(response.headers)[b":status"] == b"400"
    assert not peer.goaway()


@pytest.mark.parametrize("field", [(b"content-length", b"+3"), (b"content-length", b"3, 3"), (b"X-Upper", b"1"), (b"x-nul", b"a\x00b"),
                                   (b"x-lf", b"a\nb"), (b"x-cr", b"a\rb"), (b"connection", b"close"), (b"transfer-encoding", b"chunked"),
                                   (b"keep-alive", b"5"), (b"upgrade", b"h2c"), (b"te", b"gzip"), (b"x-sp", b" a")])  # fmt: skip
def test_what_h2_refuses_ends_the_connection_and_is_never_handed_on(field):
    peer = Peer()
    sid = peer.get(method=b"POST", headers=[field], end=False)
    peer.client.send_data(sid, b"abc", end_stream=True)
    peer.pump()
    assert not peer.requests
    assert peer.goaway() is not None and peer.goaway().error_code == ErrorCodes.PROTOCOL_ERROR


def test_streams_beyond_the_advertised_limit_are_refused_and_the_connection_carries_on():
    peer = Peer(max_streams=3)
    ids = [peer.get() for _ in range(6)]  # a first flight: the client has not read SETTINGS_MAX_CONCURRENT_STREAMS yet
    peer.pump()
    assert len(peer.requests) == 3
    assert [e.stream_id for e in peer.of(StreamReset) if e.error_code == ErrorCodes.REFUSED_STREAM] == ids[3:]
    _respond(peer.requests[0])
    peer.pump()
    later = peer.get()
    peer.pump()
    assert len(peer.requests) == 4 and peer.requests[-1].stream_id == later
    assert peer.goaway() is None


def test_rapid_reset_is_cut_off_with_enhance_your_calm():
    peer = Peer()
    for _ in range(h2server.RESET_BUDGET + 50):
        sid = peer.get()
        peer.client.reset_stream(sid, ErrorCodes.CANCEL)
        peer.send()
        if peer.transport.disconnecting:
            break
    peer.pump()
    assert peer.goaway() is not None and peer.goaway().error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert len(peer.requests) == h2server.RESET_BUDGET
    assert all(r.disconnected for r in peer.requests)  # every upstream exchange told to stop


def test_a_client_that_cancels_now_and_then_is_not_cut_off():
    peer = Peer()
    for i in range(3 * h2server.RESET_BUDGET):
        sid = peer.get()
        peer.pump()
        if i % 3 == 0:
            peer.client.reset_stream(sid, ErrorCodes.CANCEL)
        else:
            _respond(peer.requests[-1])
        peer.pump()
    assert peer.goaway() is None


@pytest.mark.parametrize("kind", ["ping", "settings"])
def test_control_frame_floods_get_enhance_your_calm(kind):
    peer = Peer()
    for i in range(h2server.CONTROL_FRAME_BUDGET + 1):
        if kind == "ping":
            peer.client.ping(b"%08d" % i)
        else:
            peer.client.update_settings({SettingCodes.ENABLE_PUSH: 0})
    peer.pump()
    assert peer.goaway() is not None and peer.goaway().error_code == ErrorCodes.ENHANCE_YOUR_CALM


def test_control_frames_spread_over_time_are_fine():
    peer = Peer()
    for _ in range(3):
        for i in range(h2server.CONTROL_FRAME_BUDGET - 10):
            peer.client.ping(b"%08d" % i)
        peer.pump()
        peer.reactor.advance(h2server.FLOOD_WINDOW + 1)
    assert peer.goaway() is None


def test_a_header_list_over_max_header_size_is_431_and_over_twice_it_goaway():
    peer = Peer(limits=Limits(max_header_size=2000))
    sid = peer.get(headers=[(b"x-big", b"a" * 2500)])
    peer.pump()
    [response] = peer.of(ResponseReceived, sid)
    assert dict(response.headers)[b":status"] == b"431" and not peer.requests
    peer.get(headers=[(b"x-big", b"a" * 5000)])
    peer.pump()
    assert peer.goaway() is not None


def test_too_many_header_fields_is_431():
    peer = Peer(limits=Limits(max_header_count=5))
    sid = peer.get(headers=[(b"x-%d" % i, b"v") for i in range(6)])
    peer.pump()
    assert dict(peer.of(ResponseReceived, sid)[0].headers)[b":status"] == b"431"


def test_a_continuation_flood_is_a_connection_error():
    peer = Peer()
    peer.pump()
    frame = HeadersFrame(1)
    frame.data = peer.client.encoder.encode([(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"https"), (b":authority", b"localhost")])
    peer.server.dataReceived(frame.serialize())
    for _ in range(100):
        cont = ContinuationFrame(1)
        cont.data = b""
        peer.server.dataReceived(cont.serialize())
        if peer.server.closed:
            break
    assert peer.server.closed and not peer.requests


def test_the_idle_timeout_ends_the_connection_with_goaway():
    peer = Peer(limits=Limits(idle_timeout=5))
    peer.pump()
    peer.reactor.advance(6)
    peer.pump()
    assert peer.goaway() is not None and peer.goaway().error_code == ErrorCodes.NO_ERROR
    assert peer.transport.disconnecting


def _ping_for(peer: Peer, seconds: float, until: Any = lambda: False) -> None:
    """PINGs every second (bytes both ways) for C{seconds}, or until C{until()}."""
    for _ in range(int(seconds)):
        if until():
            break
        peer.client.ping(b"12345678")
        peer.pump()
        peer.reactor.advance(1)
    peer.pump()


def test_a_stream_whose_body_stalls_is_reset_though_pings_keep_the_connection_busy():
    peer = Peer(limits=Limits(idle_timeout=5))
    stalled = peer.get(method=b"POST", end=False)
    peer.pump()
    request = peer.requests[0]
    request.body.startProducing(Consumer())  # the upstream takes the body as it comes: the wait is the client's
    peer.client.send_data(stalled, b"x")
    _ping_for(peer, 4)
    assert not peer.of(StreamReset, stalled)  # progress 4 s ago
    _ping_for(peer, 8, until=lambda: peer.of(StreamReset, stalled))
    assert [e.error_code for e in peer.of(StreamReset, stalled)] == [ErrorCodes.CANCEL]
    assert request.disconnected  # the proxy is told: it cancels the upstream request
    assert peer.goaway() is None and not peer.transport.disconnecting  # the stream goes, not the connection
    _ping_for(peer, 6, until=lambda: peer.goaway())  # then no stream is left: PINGs do not keep the connection
    assert peer.goaway() is not None and peer.goaway().error_code == ErrorCodes.NO_ERROR


def test_a_stream_whose_response_waits_for_a_window_never_opened_is_reset():
    peer = Peer(limits=Limits(idle_timeout=5), client_settings={SettingCodes.INITIAL_WINDOW_SIZE: 1000})
    peer.pump()
    sid = peer.get()
    peer.pump()
    request = peer.requests[0]
    request.registerProducer(Producer(), True)
    request.write(b"z" * 5000)
    _ping_for(peer, 12, until=lambda: peer.of(StreamReset, sid))
    assert [e.error_code for e in peer.of(StreamReset, sid)] == [ErrorCodes.CANCEL]


def test_streams_waiting_on_the_upstream_are_not_the_idle_timeouts():
    peer = Peer(limits=Limits(idle_timeout=5))
    no_body = peer.get()  # waiting for its response: the route timeout's business
    paused = peer.get(method=b"POST", end=False)
    peer.pump()
    peer.fill(paused)  # buffered and not taken: the upstream is slow, reading is paused
    _ping_for(peer, 20)
    assert not peer.of(StreamReset, no_body) and not peer.of(StreamReset, paused)


def test_pings_and_an_unfinished_header_block_do_not_keep_a_connection_without_streams():
    peer = Peer(limits=Limits(idle_timeout=5))
    sid = peer.get()
    peer.pump()
    _respond(peer.requests[0])
    peer.requests[0].finish()
    peer.pump()
    assert peer.of(StreamEnded, sid)
    _ping_for(peer, 4)
    assert peer.goaway() is None
    _ping_for(peer, 4, until=lambda: peer.goaway())
    assert peer.goaway() is not None and peer.goaway().error_code == ErrorCodes.NO_ERROR
    trickle = Peer(limits=Limits(idle_timeout=5))
    trickle.pump()
    trickle.server.dataReceived(HeadersFrame(1, data=trickle.client.encoder.encode([(b":method", b"GET"), (b":path", b"/")])).serialize())
    for _ in range(8):
        trickle.server.dataReceived(ContinuationFrame(1, data=b"").serialize())
        trickle.reactor.advance(1)
    assert trickle.transport.disconnecting


def _frames(peer: Peer) -> list[Any]:
    """The frames the server wrote since the last look, parsed by hand (h2 as a client stops reading at a GOAWAY, even a graceful one)."""
    data = peer.transport.value()
    peer.transport.clear()
    frames = []
    while data:
        frame, length = Frame.parse_frame_header(memoryview(data[:9]))
        frame.parse_body(memoryview(data[9 : 9 + length]))
        frames.append(frame)
        data = data[9 + length :]
    return frames


def test_drain_sends_goaway_lets_streams_in_flight_finish_refuses_new_ones_then_closes():
    peer = Peer()
    first = peer.get()
    peer.pump()
    peer.factory.drain()
    [goaway] = [f for f in _frames(peer) if isinstance(f, GoAwayFrame)]
    assert (goaway.error_code, goaway.last_stream_id) == (0, first)
    assert not peer.transport.disconnecting
    late = peer.get()
    peer.send()
    assert [(f.stream_id, f.error_code) for f in _frames(peer) if isinstance(f, RstStreamFrame)] == [(late, ErrorCodes.REFUSED_STREAM)]
    assert len(peer.requests) == 1
    _respond(peer.requests[0])
    frames = _frames(peer)
    assert any(f.stream_id == first and "END_STREAM" in f.flags for f in frames if isinstance(f, (DataFrame, HeadersFrame)))
    assert peer.transport.disconnecting


def test_drain_closes_an_idle_connection_at_once():
    peer = Peer()
    peer.pump()
    peer.factory.drain()
    peer.pump()
    assert peer.goaway() is not None and peer.transport.disconnecting


def test_a_response_ending_before_the_request_body_resets_the_stream_with_no_error():
    peer = Peer()
    sid = peer.get(method=b"POST", end=False)
    peer.client.send_data(sid, b"part")
    peer.pump()
    request = peer.requests[0]
    request.channel.stop_parsing()
    _respond(request, b"413", 413)
    peer.pump()
    assert peer.of(StreamEnded, sid)
    assert [e.error_code for e in peer.of(StreamReset, sid)] == [ErrorCodes.NO_ERROR]
    assert sid not in peer.server.streams


def test_abort_resets_the_stream_not_the_connection():
    peer = Peer()
    sid = peer.get()
    other = peer.get()
    peer.pump()
    request = peer.requests[0]
    request.setResponseCode(200)
    request.write(b"partial")
    request.channel.abort()
    peer.pump()
    assert [e.error_code for e in peer.of(StreamReset, sid)] == [ErrorCodes.INTERNAL_ERROR]
    assert not peer.of(StreamEnded, sid)
    _respond(peer.requests[1])
    peer.pump()
    assert peer.of(StreamEnded, other) and peer.goaway() is None


# --- the proxy behind it: the same ProxyResource, gRPC-shaped answers -------------------------------


def _proxied(timeout: float = 30.0) -> tuple[Peer, Any]:
    from mtlsgate.config.model import Route
    from mtlsgate.identity import AllowRules
    from mtlsgate.proxy.exchange import ProxyResource, ProxyState, RouteEntry
    from mtlsgate.proxy.routing import RouteTable
    from tests.unit.test_proxy_channel import Metrics, Upstream

    upstream = Upstream()
    table = RouteTable([("localhost", "/", RouteEntry(route=Route(host="localhost", timeout=timeout), upstreams=upstream))])  # type: ignore[arg-type]
    state = ProxyState(routes=table, global_rules=AllowRules(), require_client_certificate=False)
    peer = Peer()
    peer.server.handler = ProxyResource(peer.reactor, state, Metrics()).handle
    return peer, upstream


_GRPC = [(b"content-type", b"application/grpc"), (b"te", b"trailers")]


def _grpc_answer(peer: Peer, sid: int) -> dict[bytes, bytes]:
    [response] = peer.of(ResponseReceived, sid)
    assert response.stream_ended is not None and not peer.of(DataReceived, sid)  # trailers-only: one HEADERS frame, END_STREAM
    return dict(response.headers)


def test_grpc_request_for_no_route_gets_grpc_status_unimplemented_not_404():
    peer, upstream = _proxied()
    sid = peer.client.get_next_available_stream_id()
    peer.client.send_headers(
        sid, [(b":method", b"POST"), (b":authority", b"nowhere"), (b":scheme", b"https"), (b":path", b"/pkg.Svc/Call"), *_GRPC], end_stream=True,
    )  # fmt: skip
    peer.pump()
    answer = _grpc_answer(peer, sid)
    assert (answer[b":status"], answer[b"content-type"], answer[b"grpc-status"]) == (b"200", b"application/grpc", b"12")
    assert answer[b"grpc-message"] == b"404 Not Found: no route for this host"
    assert not upstream.requests


def test_grpc_request_whose_upstream_fails_gets_unavailable_and_past_the_timeout_deadline_exceeded():
    from twisted.internet.error import ConnectionRefusedError

    peer, upstream = _proxied(timeout=5)
    refused = peer.get("/pkg.Svc/A", headers=_GRPC, method=b"POST")
    slow = peer.get("/pkg.Svc/B", headers=_GRPC, method=b"POST")
    peer.pump()
    upstream.pending[0].errback(ConnectionRefusedError("no"))
    peer.reactor.advance(6)
    peer.pump()
    assert _grpc_answer(peer, refused)[b"grpc-status"] == b"14"
    assert _grpc_answer(peer, slow)[b"grpc-status"] == b"4"


def test_a_plain_request_still_gets_the_text_answer():
    peer, _ = _proxied()
    sid = peer.client.get_next_available_stream_id()
    peer.client.send_headers(sid, [(b":method", b"GET"), (b":authority", b"nowhere"), (b":scheme", b"https"), (b":path", b"/")], end_stream=True)
    peer.pump()
    [response] = peer.of(ResponseReceived, sid)
    assert dict(response.headers)[b":status"] == b"404"
    assert b"".join(e.data for e in peer.of(DataReceived, sid)) == b"404 Not Found: no route for this host\n"


def test_the_request_body_streams_to_the_upstream_over_http2():
    peer, upstream = _proxied()
    sid = peer.get("/up", method=b"POST", headers=[(b"content-length", b"6")], end=False)
    peer.client.send_data(sid, b"abc")
    peer.pump()
    peer.client.send_data(sid, b"def", end_stream=True)
    peer.pump()
    [(method, url, headers, body)] = upstream.requests
    assert (method, url, body.length, upstream.consumer.data) == (b"POST", b"https://upstream.test/up", 6, b"abcdef")
    assert headers.getRawHeaders(b"x-forwarded-host") == [b"localhost"]


def test_grpc_message_is_percent_encoded():
    from mtlsgate.proxy.exchange import _grpc_message

    assert _grpc_message("50% caf\u00e9\n") == b"50%25 caf%C3%A9%0A"


def test_priority_carried_by_headers_frames_is_not_a_flood():
    peer = Peer()
    for _ in range(2 * h2server.CONTROL_FRAME_BUDGET // 100):
        for _ in range(100):
            sid = peer.client.get_next_available_stream_id()
            fields = [(b":method", b"GET"), (b":authority", b"localhost"), (b":scheme", b"https"), (b":path", b"/")]
            peer.client.send_headers(sid, fields, end_stream=True, priority_weight=200, priority_depends_on=0)
        peer.pump()
        for request in list(peer.requests):
            _respond(request)
        peer.requests.clear()
        peer.pump()
    assert peer.goaway() is None


def test_priority_frames_of_their_own_count():
    peer = Peer()
    for _ in range(h2server.CONTROL_FRAME_BUDGET + 1):
        peer.client.prioritize(1, weight=10)
    peer.pump()
    assert peer.goaway() is not None and peer.goaway().error_code == ErrorCodes.ENHANCE_YOUR_CALM


def test_a_larger_initial_window_from_the_client_resumes_a_waiting_response():
    peer = Peer(client_settings={SettingCodes.INITIAL_WINDOW_SIZE: 100})
    peer.pump()
    sid = peer.get()
    peer.pump()
    request = peer.requests[0]
    request.write(b"q" * 1000)
    peer.pump()
    assert sum(len(e.data) for e in peer.of(DataReceived, sid)) == 100
    peer.client.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 65535})
    peer.pump()
    assert sum(len(e.data) for e in peer.of(DataReceived, sid)) == 1000


def test_the_settings_frame_announces_the_stream_and_header_list_limits():
    peer = Peer(limits=Limits(max_header_size=12345))
    peer.pump()
    assert peer.client.remote_settings.max_concurrent_streams == h2server.MAX_CONCURRENT_STREAMS
    assert peer.client.remote_settings.max_header_list_size == 12345
    assert peer.client.remote_settings.initial_window_size == 65535
    # h2's own enforcement sits at twice each (the polite refusals come first): pinned, as it rests on replacing local_settings
    assert peer.server.conn.local_settings.max_concurrent_streams == 2 * h2server.MAX_CONCURRENT_STREAMS
    assert peer.server.conn.decoder.max_header_list_size == 2 * 12345


def test_request_bodies_held_for_one_connection_stay_within_its_window():
    peer = Peer()
    ids = [peer.get(method=b"POST", end=False) for _ in range(30)]
    peer.pump()
    for sid in ids:  # nobody upstream takes anything: every stream fills its window, until the connection's is shut
        peer.fill(sid)
        peer.pump()
    held = sum(r.body.received for r in peer.requests)
    assert peer.client.outbound_flow_control_window == 0
    assert held == h2server._CONNECTION_WINDOW


def test_a_request_body_in_tiny_pieces_is_held_at_about_its_size_and_relayed_in_order():
    import tracemalloc

    from mtlsgate.http.body import RequestBody

    pieces = [bytes([65 + i % 26, 97 + i % 26]) for i in range(32767)] + [b"L" * 70000, b"z"]
    body = RequestBody(Producer(), None, high_water=0, low_water=1)
    tracemalloc.start()
    try:
        for piece in pieces[:-2]:
            body.write(piece)
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert held < 4 * 65534  # one object per 2-byte piece would be some 1.5 MB
    body.write(pieces[-2])
    body.write(pieces[-1])
    consumer = Consumer()
    body.finish()
    body.startProducing(consumer)
    assert consumer.data == b"".join(pieces)
