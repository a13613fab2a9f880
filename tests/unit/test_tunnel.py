"""
WebSockets in memory (issue #14): the byte tunnel (mtlsgate.http.tunnel) between two StringTransports
on a Clock, the frame-boundary reader (hypothesis), the client's upgrade (mtlsgate.http.client), the
server's TUNNEL state (mtlsgate.http.server) and the proxy's upgrade path, with a scripted upstream.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http_headers import Headers

from mtlsgate.config.model import Limits, Route
from mtlsgate.http.client import UpgradeResponse, UpstreamProtocolError
from mtlsgate.http.server import HTTPServerProtocol, Request
from mtlsgate.http.tunnel import ABORT_TIMEOUT, GOING_AWAY, FrameBoundaries, Tunnel
from mtlsgate.identity import AllowRules
from mtlsgate.proxy.exchange import GatewaySite, ProxyResource, ProxyState, RouteEntry
from mtlsgate.proxy.routing import RouteTable
from tests.unit.test_http_client import URL, make, results

H = b"Host: localhost\r\n"
HANDSHAKE = b"GET /chat HTTP/1.1\r\n" + H + b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: a2V5\r\nSec-WebSocket-Version: 13\r\n\r\n"
SWITCHED = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: x\r\n\r\n"


def frame(payload: bytes, masked: bool = False, opcode: int = 2) -> bytes:
    n = len(payload)
    length = bytes([n]) if n < 126 else bytes([126]) + n.to_bytes(2, "big") if n < 65536 else bytes([127]) + n.to_bytes(8, "big")
    if masked:
        return bytes([0x80 | opcode, length[0] | 0x80]) + length[1:] + b"abcd" + bytes(c ^ b"abcd"[i % 4] for i, c in enumerate(payload))
    return bytes([0x80 | opcode]) + length + payload


# --- where frames end -------------------------------------------------------------------------------------


@given(st.lists(st.tuples(st.sampled_from([0, 1, 5, 125, 126, 127, 200, 65535, 65536]), st.booleans()), min_size=1, max_size=6), st.data())
def test_frame_boundaries_are_found_however_the_stream_is_split(frames, data):
    stream = b""
    ends = []
    for size, masked in frames:
        stream += frame(b"x" * size, masked)
        ends.append(len(stream))
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(stream)), max_size=8))))
    reader = FrameBoundaries()
    pos = 0
    for cut in [*cuts, len(stream)]:
        assert reader.feed(stream[pos:cut]) == cut - pos
        pos = cut
        assert reader.at_boundary == (cut == 0 or cut in ends)
    # with stop: the first end reached from any position inside the stream
    start = data.draw(st.integers(0, len(stream) - 1))
    reader = FrameBoundaries()
    reader.feed(stream[:start])
    first_end = next(e for e in ends if e > start)
    assert start + reader.feed(stream[start:], stop=True) == first_end and reader.at_boundary


# --- the tunnel between two transports --------------------------------------------------------------------


class Ends:
    def __init__(self, idle: float = 300.0) -> None:
        self.clock = Clock()
        self.closed: list[Tunnel] = []
        self.tunnel = Tunnel(self.clock, idle, self.closed.append)
        self.client, self.upstream = StringTransport(), StringTransport()

    def connect(self) -> None:
        self.tunnel.upstream.makeConnection(self.upstream)
        self.tunnel.client.makeConnection(self.client)


def test_bytes_cross_both_ways_and_are_counted():
    t = Ends()
    t.connect()
    t.tunnel.client.dataReceived(b"up")
    t.tunnel.upstream.dataReceived(frame(b"down"))
    assert t.upstream.value() == b"up" and t.client.value() == frame(b"down")
    assert (t.tunnel.bytes_from_client, t.tunnel.bytes_to_client) == (2, len(frame(b"down")))


def test_bytes_before_the_other_end_is_connected_wait_with_reading_paused():
    t = Ends()
    t.tunnel.upstream.makeConnection(t.upstream)
    t.tunnel.upstream.dataReceived(b"early")
    assert t.upstream.producerState == "paused"
    t.client.write(b"101 head;")
    t.tunnel.client.makeConnection(t.client)
    assert t.client.value() == b"101 head;early" and t.upstream.producerState == "producing"


def test_each_transport_is_the_others_producer():
    t = Ends()
    t.connect()
    t.client.producer.pauseProducing()  # the client reads slowly: stop reading the upstream
    assert t.upstream.producerState == "paused"
    t.client.producer.resumeProducing()
    assert t.upstream.producerState == "producing"
    t.upstream.producer.pauseProducing()
    assert t.client.producerState == "paused"


def test_when_one_end_closes_the_other_is_closed_and_aborted_if_it_lingers():
    t = Ends()
    t.connect()
    t.tunnel.upstream.connectionLost(Failure(ConnectionDone()))
    assert t.client.disconnecting and t.client.producer is None  # TLS shuts down only without a producer
    assert t.closed == []
    t.clock.advance(ABORT_TIMEOUT)
    assert t.client.disconnected  # aborted
    t.tunnel.client.connectionLost(Failure(ConnectionDone()))
    assert t.closed == [t.tunnel] and t.tunnel.close_reason == "upstream closed"


def test_an_idle_tunnel_closes_and_traffic_keeps_it_open():
    t = Ends(idle=10)
    t.connect()
    t.clock.advance(6)
    t.tunnel.client.dataReceived(b"x")
    t.clock.advance(6)
    assert not t.client.disconnecting
    t.clock.advance(5)
    assert t.client.disconnecting and t.upstream.disconnecting and t.tunnel.close_reason == "idle"


def test_going_away_between_frames_sends_1001_at_once():
    t = Ends()
    t.connect()
    t.tunnel.upstream.dataReceived(frame(b"one"))
    t.tunnel.going_away()
    assert t.client.value() == frame(b"one") + GOING_AWAY
    assert GOING_AWAY[:4] == b"\x88\x17\x03\xe9"  # Close, 1001
    assert t.client.disconnecting and t.upstream.disconnecting and t.tunnel.close_reason == "shutdown"
    t.tunnel.client.dataReceived(b"the client's close frame")
    assert t.upstream.value() == b""


def test_going_away_in_the_middle_of_a_frame_waits_for_its_end():
    t = Ends()
    t.connect()
    whole = frame(b"y" * 1000)
    t.tunnel.upstream.dataReceived(whole[:300])
    t.tunnel.going_away()
    assert t.client.value() == whole[:300] and not t.client.disconnecting
    t.tunnel.upstream.dataReceived(whole[300:] + frame(b"next"))
    assert t.client.value() == whole + GOING_AWAY  # the frame finished, the next one not started
    assert t.client.disconnecting


# --- the client's upgrade ----------------------------------------------------------------------------------


class Pipe(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # type: ignore[assignment]
        self.reason = reason


def upgrade(headers: Headers | None = None) -> tuple[list[Any], Any, Any]:
    agent, endpoint, _ = make()
    got = results(agent.upgrade(b"GET", URL, headers or Headers({b"sec-websocket-key": [b"a2V5"], b"connection": [b"x"], b"upgrade": [b"h2c"]})))
    return got, endpoint.connections[-1], agent


def test_an_upgrade_request_says_so_and_nothing_the_caller_put_in_connection_or_upgrade():
    _, connection, _ = upgrade()
    assert connection.transport.value() == (
        b"GET /path?q=1 HTTP/1.1\r\nHost: upstream.test:8443\r\nSec-Websocket-Key: a2V5\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    )


@pytest.mark.parametrize("cut", range(0, len(SWITCHED) + 6, 7))
def test_a_101_hands_over_the_connection_with_the_bytes_that_followed_it(cut):
    got, connection, agent = upgrade()
    raw = SWITCHED + b"\x81\x02hi"
    connection.dataReceived(raw[:cut])
    connection.dataReceived(raw[cut:])
    response = got[0]
    assert isinstance(response, UpgradeResponse) and response.code == 101
    assert response.headers.getRawHeaders(b"sec-websocket-accept") == [b"x"]
    assert connection.transport.producerState == "paused"  # nothing read until someone takes the connection
    pipe = Pipe()
    response.switch(pipe)
    assert pipe.transport is connection.transport and pipe.data == b"\x81\x02hi"
    assert connection.transport.producerState == "producing"
    connection.dataReceived(b"more")
    pipe.transport.write(b"to upstream")
    connection.connectionLost(Failure(ConnectionDone()))
    assert pipe.data == b"\x81\x02himore" and pipe.reason is not None and agent.pool.idle_count() == 0


@pytest.mark.parametrize("raw", [
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
    b"HTTP/1.0 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
])  # fmt: skip
def test_a_101_that_is_not_the_switch_asked_for_is_a_protocol_error(raw):
    got, connection, _ = upgrade()
    connection.dataReceived(raw + b"tunnel bytes")
    assert isinstance(got[0], Failure) and got[0].check(ResponseFailed)
    assert got[0].value.reasons[0].check(UpstreamProtocolError) and connection.transport.disconnected


def test_any_other_answer_is_an_ordinary_response_and_the_connection_is_never_pooled():
    got, connection, agent = upgrade()
    connection.dataReceived(b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 2\r\n\r\nno")
    body = Pipe()
    got[0].deliverBody(body)
    assert got[0].code == 426 and body.data == b"no"
    assert connection.transport.disconnecting and agent.pool.idle_count() == 0


def test_an_upgrade_never_rides_a_pooled_connection():
    agent, endpoint, _ = make()
    results(agent.request(b"GET", URL))
    endpoint.connections[0].dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert agent.pool.idle_count() == 1
    agent.upgrade(b"GET", URL)
    assert len(endpoint.connections) == 2 and agent.pool.idle_count() == 1


def test_an_upgraded_connection_nobody_takes_is_dropped():
    got, connection, _ = upgrade()
    connection.dataReceived(SWITCHED)
    got[0].stopProducing()
    assert connection.transport.disconnected


def test_an_upgraded_connection_lost_before_the_switch_tells_the_protocol_at_the_switch():
    got, connection, _ = upgrade()
    connection.dataReceived(SWITCHED + b"last words")
    connection.connectionLost(Failure(ConnectionDone()))
    pipe = Pipe()
    got[0].switch(pipe)
    assert pipe.data == b"last words" and pipe.reason is not None


# --- the server's TUNNEL state ------------------------------------------------------------------------------


class Server:
    def __init__(self) -> None:
        self.reactor = MemoryReactorClock()
        self.requests: list[Request] = []
        self.channel = HTTPServerProtocol(self.requests.append, Limits(idle_timeout=60, header_timeout=10), self.reactor)
        self.transport = StringTransport()
        self.channel.makeConnection(self.transport)


def test_upgrade_writes_the_101_then_the_connection_belongs_to_the_protocol():
    s = Server()
    s.channel.dataReceived(HANDSHAKE + b"eager frame")
    request = s.requests[0]
    assert request.upgrade_to == (b"websocket",) and not request.persistent
    assert s.transport.producerState == "paused"  # the bytes behind the head wait, and so does the socket
    request.setHeader(b"upgrade", b"websocket")
    request.setHeader(b"connection", b"Upgrade")
    pipe = Pipe()
    request.upgrade(pipe)
    assert s.transport.value().startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"Connection: Upgrade\r\n" in s.transport.value() and s.transport.value().endswith(b"\r\n\r\n")
    assert pipe.transport is s.transport and pipe.data == b"eager frame" and s.transport.producerState == "producing"
    s.channel.dataReceived(b"GET /next HTTP/1.1\r\n" + H + b"\r\n")
    assert pipe.data.endswith(b"GET /next HTTP/1.1\r\n" + H + b"\r\n") and len(s.requests) == 1  # not HTTP any more
    s.reactor.advance(3600)
    assert not s.transport.disconnecting  # the HTTP timers are off: the tunnel has its own
    s.channel.connectionLost(Failure(ConnectionDone()))
    assert pipe.reason is not None and request.finished


def test_an_upgrade_request_not_switched_is_the_last_on_its_connection():
    s = Server()
    s.channel.dataReceived(HANDSHAKE + b"GET /smuggled HTTP/1.1\r\n" + H + b"\r\n")
    request = s.requests[0]
    request.setResponseCode(426)
    request.setHeader(b"content-length", b"0")
    request.finish()
    assert b"Connection: close" in s.transport.value() and s.transport.disconnecting
    assert len(s.requests) == 1  # the bytes behind it were never read as a request


def test_an_http10_upgrade_is_not_one():
    s = Server()
    s.channel.dataReceived(b"GET / HTTP/1.0\r\n" + H + b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
    assert s.requests[0].upgrade_to == ()


# --- the proxy's upgrade path, with a scripted upstream ------------------------------------------------------


class ScriptedAgent:
    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes, bytes, Headers]] = []
        self.pending: list[defer.Deferred[Any]] = []
        self.agent = self

    def order(self) -> list[str]:
        return ["https://upstream.test"]

    def upgrade(self, method: bytes, url: bytes, headers: Headers, protocol: bytes) -> defer.Deferred[Any]:
        self.calls.append(("upgrade", method, url, headers))
        d: defer.Deferred[Any] = defer.Deferred()
        self.pending.append(d)
        return d

    def request(self, method: bytes, url: bytes, headers: Headers, body: Any) -> defer.Deferred[Any]:
        self.calls.append(("request", method, url, headers))
        d: defer.Deferred[Any] = defer.Deferred()
        self.pending.append(d)
        return d


class Switching:
    """An upstream's 101 as the proxy sees it."""

    code, phrase, length = 101, b"Switching Protocols", 0

    def __init__(self) -> None:
        self.headers = Headers({b"upgrade": [b"websocket"], b"connection": [b"Upgrade, Keep-Alive"], b"keep-alive": [b"timeout=5"],
                                b"sec-websocket-accept": [b"x"]})  # fmt: skip
        self.transport = StringTransport()

    def switch(self, protocol: Any) -> None:
        protocol.makeConnection(self.transport)


class Metrics:
    def __init__(self) -> None:
        self.events: list[Any] = []
        self.open = 0

    def request_finished(self, record: Any) -> None:
        self.events.append((record.route, record.status))

    def upstream_responded(self, route: str, seconds: float) -> None:
        pass

    def tunnel_opened(self) -> None:
        self.open += 1

    def tunnel_closed(self) -> None:
        self.open -= 1


class Proxy:
    def __init__(self, allow: bool = True) -> None:
        self.reactor = MemoryReactorClock()
        self.upstream = ScriptedAgent()
        self.metrics = Metrics()
        route = Route(host="localhost", allow_websockets=allow, websocket_idle_timeout=30)
        table = RouteTable([("localhost", "/", RouteEntry(route=route, upstreams=self.upstream))])  # type: ignore[arg-type]
        state = ProxyState(routes=table, global_rules=AllowRules(), require_client_certificate=False)
        self.resource = ProxyResource(self.reactor, state, self.metrics, self.metrics)  # type: ignore[arg-type]
        self.channel = GatewaySite(self.resource).buildProtocol(None)
        self.transport = StringTransport()
        self.channel.makeConnection(self.transport)


def test_a_websocket_upgrade_is_relayed_and_becomes_a_tunnel():
    p = Proxy()
    p.channel.dataReceived(HANDSHAKE[:-2] + b"X-Forwarded-Client-Cert: spoofed\r\n\r\n" + b"eager")
    kind, method, url, headers = p.upstream.calls[0]
    assert (kind, method, url) == ("upgrade", b"GET", b"https://upstream.test/chat")
    assert headers.getRawHeaders(b"x-forwarded-client-cert") is None  # no verified identity here: none is sent, the spoofed one is gone
    assert headers.getRawHeaders(b"sec-websocket-key") == [b"a2V5"]
    assert p.transport.value() == b""
    response = Switching()
    p.upstream.pending[0].callback(response)
    head, _, rest = p.transport.value().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 Switching Protocols\r\n") and rest == b""
    lowered = head.lower()
    assert b"\r\nupgrade: websocket" in lowered and b"\r\nconnection: upgrade" in lowered and b"sec-websocket-accept: x" in lowered
    assert b"keep-alive" not in lowered and b"connection: close" not in lowered
    assert response.transport.value() == b"eager"  # only after the 101
    p.channel.dataReceived(b"from client")
    assert response.transport.value() == b"eagerfrom client"
    assert p.metrics.open == 1 and p.resource.in_flight == 1 and len(p.resource.tunnels) == 1
    # the drain: the tunnel goes on until shortly before the deadline, then a Close (1001) between frames, and both ends close
    drained = results(p.resource.drained(30))
    p.channel.dataReceived(b" during the drain")
    assert response.transport.value() == b"eagerfrom client during the drain" and not p.transport.disconnecting
    p.reactor.advance(28.9)
    assert not p.transport.value().endswith(GOING_AWAY) and not p.transport.disconnecting
    p.reactor.advance(0.1)  # 1 s (GOING_AWAY_LEAD) before the deadline
    assert p.transport.value().endswith(GOING_AWAY) and p.transport.disconnecting and response.transport.disconnecting
    assert drained == []
    p.channel.connectionLost(Failure(ConnectionDone()))
    next(iter(p.resource.tunnels)).upstream.connectionLost(Failure(ConnectionDone()))
    assert drained == [None] and p.metrics.open == 0 and p.metrics.events == [("localhost/", 101)]


def test_a_route_without_allow_websockets_answers_403_and_sends_nothing_upstream():
    p = Proxy(allow=False)
    p.channel.dataReceived(HANDSHAKE + b"GET /smuggled HTTP/1.1\r\n" + H + b"\r\n")
    answer = p.transport.value()
    assert answer.startswith(b"HTTP/1.1 403 Forbidden\r\n") and b"allow_websockets" in answer and b"Connection: close" in answer
    assert p.upstream.calls == [] and p.transport.disconnecting


def test_an_upstream_refusing_the_upgrade_is_relayed_and_the_connection_closes():
    p = Proxy()
    p.channel.dataReceived(HANDSHAKE + b"GET /smuggled HTTP/1.1\r\n" + H + b"\r\n")

    class Refused:
        code, phrase, length = 403, b"Forbidden", 2
        headers = Headers()

        def deliverBody(self, protocol: Any) -> None:
            protocol.makeConnection(StringTransport())
            protocol.dataReceived(b"no")
            protocol.connectionLost(Failure(ResponseDone()))

    p.upstream.pending[0].callback(Refused())
    answer = p.transport.value()
    assert answer.startswith(b"HTTP/1.1 403 Forbidden\r\n") and answer.endswith(b"no") and b"Connection: close" in answer
    assert p.transport.disconnecting and len(p.upstream.calls) == 1


def test_a_tunnel_that_opens_after_the_drains_go_away_goes_away_at_once_and_is_waited_for():
    p = Proxy()
    p.channel.dataReceived(HANDSHAKE)
    drained = results(p.resource.drained(30))
    assert drained == [] and p.resource.in_flight == 1
    p.reactor.advance(29)  # the tunnels are told to go away; this handshake's upstream has not answered yet
    response = Switching()
    p.upstream.pending[0].callback(response)
    assert drained == [] and p.resource.in_flight == 1  # the handshake's request finished, its tunnel is in flight
    p.reactor.advance(0)
    assert p.transport.value().endswith(GOING_AWAY) and p.transport.disconnecting and response.transport.disconnecting
    tunnel = next(iter(p.resource.tunnels))
    tunnel.client.connectionLost(Failure(ConnectionDone()))
    tunnel.upstream.connectionLost(Failure(ConnectionDone()))
    assert drained == [None] and p.resource.tunnels == set()


def test_an_upstream_that_never_answers_the_handshake_is_a_504_and_the_connection_closes():
    p = Proxy()
    p.channel.dataReceived(HANDSHAKE + b"eager")
    p.reactor.advance(30)  # the route's timeout
    answer = p.transport.value()
    assert answer.startswith(b"HTTP/1.1 504 Gateway Time-out\r\n") and b"Connection: close" in answer and p.transport.disconnecting
    assert p.resource.in_flight == 0 and p.resource.tunnels == set()


def test_a_tunnels_access_line_has_its_bytes_each_way_in_both_formats():
    import json

    from mtlsgate.observe.accesslog import format_combined, format_json

    event = {
        "log_time": 0, "client": "127.0.0.1", "identity": "alice", "common_name": "alice", "fingerprint": "ab", "method": "GET",
        "uri": "/chat", "proto": "HTTP/1.1", "status": 101, "size": 7, "route": "localhost/", "upstream": "https://u", "duration": 1.5,
    }  # fmt: skip
    assert "tunnel_in" not in format_combined(event) and "tunnel_in" not in format_json(event)
    event.update(tunnel_in=11, tunnel_out=7)
    assert format_combined(event).endswith(" 1.500s tunnel_in=11 tunnel_out=7")
    record = json.loads(format_json(event))
    assert (record["status"], record["tunnel_in"], record["tunnel_out"]) == (101, 11, 7)


@pytest.mark.parametrize("connection, upgrade, expected", [
    (b"keep-alive, Upgrade", b"websocket", (b"websocket",)),  # Firefox's
    (b"UPGRADE", b"WebSocket", (b"websocket",)),
    (b"Upgrade", b"h2c, websocket", (b"h2c", b"websocket")),
    (b"close", b"websocket", ()),  # Upgrade not named in Connection: no upgrade asked for
])  # fmt: skip
def test_what_counts_as_an_upgrade_request(connection, upgrade, expected):
    s = Server()
    s.channel.dataReceived(b"GET / HTTP/1.1\r\n" + H + b"Connection: " + connection + b"\r\nUpgrade: " + upgrade + b"\r\n\r\n")
    assert s.requests[0].upgrade_to == expected
