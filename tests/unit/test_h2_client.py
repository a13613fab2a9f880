"""
The upstream HTTP/2 client (mtlsgate.http.h2client) in memory: each connection is a StringTransport
with an h2 server state machine (the h2 library, server side) at the other end, time is a Clock.
Multiplexing and the stream limit, GOAWAY, resets, cancellation, flow control as back-pressure both
ways, trailers, the header bound, the headers never sent on HTTP/2.
"""

from __future__ import annotations

from typing import Any

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import DataReceived, RequestReceived, StreamEnded, StreamReset
from h2.settings import SettingCodes
from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import RequestGenerationFailed, ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IResponse

from mtlsgate.http.client import ResponseHeadersTooLarge, UpstreamProtocolError
from mtlsgate.http.h2client import H2Agent, H2ClientConnection, h2_request_headers
from mtlsgate.http.client import ClientRequest
from mtlsgate.proxy.exchange import RequestBody

URL = b"https://upstream.test:8443/svc/Method"


class Peer:
    """The upstream's end of one connection: an h2 server state machine fed what the client wrote."""

    def __init__(self, client: H2ClientConnection, transport: StringTransport, settings: dict[int, int] | None = None) -> None:
        self.client = client
        self.transport = transport
        self.h2 = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        self.h2.initiate_connection()
        if settings:
            self.h2.update_settings(settings)
        self.events: list[Any] = []
        self.flush()

    def receive(self) -> list[Any]:
        """What the client sent since last time, as h2 events."""
        data = self.transport.value()
        self.transport.clear()
        events = self.h2.receive_data(data) if data else []
        self.events += events
        return events

    def flush(self) -> None:
        """Send what the server side has to say."""
        self.receive()
        data = self.h2.data_to_send()
        if data:
            self.client.dataReceived(data)
        self.receive()

    def requests(self) -> list[RequestReceived]:
        self.receive()
        return [e for e in self.events if isinstance(e, RequestReceived)]

    def ready(self) -> Peer:
        """Take in what the client sent, so the server side knows its streams."""
        self.receive()
        return self

    def answer(self, stream_id: int, body: bytes = b"", trailers: list[tuple[bytes, bytes]] | None = None,
               headers: list[tuple[bytes, bytes]] | None = None) -> None:  # fmt: skip
        self.receive()
        self.h2.send_headers(stream_id, [(b":status", b"200"), *(headers or [])], end_stream=not body and not trailers)
        if body:
            self.h2.send_data(stream_id, body, end_stream=not trailers)
        if trailers:
            self.h2.send_headers(stream_id, trailers, end_stream=True)
        self.flush()


class Endpoint:
    """Connects at once (or, with C{hold}, when told); each connection gets a L{Peer}."""

    def __init__(self, settings: dict[int, int] | None = None) -> None:
        self.peers: list[Peer] = []
        self.settings = settings
        self.hold = False
        self.pending: list[tuple[defer.Deferred[Any], Any]] = []

    def endpointForURI(self, uri: Any) -> Endpoint:
        return self

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        if self.hold:
            d: defer.Deferred[Any] = defer.Deferred()
            self.pending.append((d, factory))
            return d
        return defer.succeed(self.make(factory))

    def release(self) -> None:
        pending, self.pending = self.pending, []
        for d, factory in pending:
            d.callback(self.make(factory))

    def make(self, factory: Any) -> H2ClientConnection:
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.handshakeCompleted()  # as the upstream TLS endpoint hands over a connection: handshaken (_HandshakeBoundedEndpoint)
        self.peers.append(Peer(protocol, transport, self.settings))
        return protocol


class Body(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.reason: Failure | None = None
        self.trailers_at_end: Any = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        assert self.reason is None, "connectionLost twice"
        self.reason = reason
        self.trailers_at_end = list(self.transport.trailers)


def results(d: defer.Deferred[Any]) -> list[Any]:
    out: list[Any] = []
    d.addBoth(out.append)
    return out


def make(settings: dict[int, int] | None = None, **kwargs: Any) -> tuple[H2Agent, Endpoint, Clock]:
    clock = Clock()
    endpoint = Endpoint(settings)
    return H2Agent(clock, endpoint, **kwargs), endpoint, clock


class Network:
    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False


def test_the_agent_provides_iagent_and_a_request_is_one_stream_with_pseudo_headers():
    agent, endpoint, _ = make()
    assert IAgent.providedBy(agent)
    d = agent.request(b"GET", URL, Headers({b"x-one": [b"1"]}))
    peer = endpoint.peers[0]
    [request] = peer.requests()
    headers = request.headers
    assert headers[:4] == [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"upstream.test:8443"), (b":path", b"/svc/Method")]
    assert (b"x-one", b"1") in headers
    peer.answer(request.stream_id, b"hello", headers=[(b"content-length", b"5")])
    [response] = results(d)
    assert IResponse.providedBy(response) and response.code == 200 and response.length == 5 and response.version == (b"HTTP", 2, 0)
    body = Body()
    response.deliverBody(body)
    assert body.data == b"hello" and body.reason is not None and body.reason.check(ResponseDone)
    assert response.trailers == []


def test_connection_specific_headers_are_never_sent_and_te_only_as_trailers():
    headers = Headers({
        b"Connection": [b"keep-alive"], b"Keep-Alive": [b"5"], b"Proxy-Connection": [b"x"], b"Transfer-Encoding": [b"chunked"],
        b"Upgrade": [b"h2c"], b"HTTP2-Settings": [b"x"], b"Host": [b"client.test"], b"Content-Length": [b"99"], b"TE": [b"gzip, trailers"],
        b"X-Kept": [b"yes"],
    })  # fmt: skip
    block = h2_request_headers(ClientRequest(b"GET", URL, headers, b"/p", None, b"upstream.test"), b"https", b"upstream.test")
    names = [name for name, _ in block]
    assert names == [b":method", b":scheme", b":authority", b":path", b"x-kept", b"te"]
    assert dict(block)[b":authority"] == b"client.test"  # the Host given (preserve_host_header) goes as :authority
    assert dict(block)[b"te"] == b"trailers"
    no_te = h2_request_headers(ClientRequest(b"GET", URL, Headers({b"te": [b"gzip"]}), b"/p", None, b"u"), b"https", b"u")
    assert b"te" not in dict(no_te)


def test_many_requests_share_one_connection_as_streams():
    agent, endpoint, _ = make()
    ds = [agent.request(b"GET", URL) for _ in range(5)]
    assert len(endpoint.peers) == 1
    peer = endpoint.peers[0]
    ids = [r.stream_id for r in peer.requests()]
    assert ids == [1, 3, 5, 7, 9]
    for stream_id in reversed(ids):
        peer.answer(stream_id, b"x%d" % stream_id)
    for d, stream_id in zip(ds, ids):
        [response] = results(d)
        body = Body()
        response.deliverBody(body)
        assert body.data == b"x%d" % stream_id


def test_the_stream_limit_opens_another_connection():
    agent, endpoint, _ = make(settings={SettingCodes.MAX_CONCURRENT_STREAMS: 2})
    agent.request(b"GET", URL)
    endpoint.peers[0].flush()  # the limit arrives with the server's SETTINGS
    ds = [agent.request(b"GET", URL) for _ in range(3)]
    assert len(endpoint.peers) == 2
    assert len(endpoint.peers[0].requests()) == 2 and len(endpoint.peers[1].requests()) == 2
    assert all(not d.called for d in ds)


def test_the_gateways_own_stream_cap_applies_too():
    agent, endpoint, _ = make(max_streams=1)
    agent.request(b"GET", URL)
    agent.request(b"GET", URL)
    assert len(endpoint.peers) == 2


def test_requests_made_while_connecting_wait_for_that_connection():
    agent, endpoint, _ = make()
    endpoint.hold = True
    ds = [agent.request(b"GET", URL) for _ in range(3)]
    assert len(endpoint.pending) == 1
    endpoint.hold = False
    endpoint.release()
    assert len(endpoint.peers) == 1 and len(endpoint.peers[0].requests()) == 3
    assert all(not d.called for d in ds)


def test_a_connect_failure_fails_every_waiting_request_as_is_for_failover():
    from twisted.internet.error import ConnectionRefusedError

    agent, endpoint, _ = make()
    endpoint.hold = True
    ds = [agent.request(b"GET", URL) for _ in range(2)]
    d0, _factory = endpoint.pending.pop()
    d0.errback(ConnectionRefusedError("scripted"))
    for d in ds:
        [failure] = results(d)
        assert failure.check(ConnectionRefusedError)


def test_trailers_are_set_before_the_body_ends():
    agent, endpoint, _ = make()
    d = agent.request(b"POST", URL, Headers({b"te": [b"trailers"]}))
    peer = endpoint.peers[0]
    [request] = peer.requests()
    assert (b"te", b"trailers") in request.headers
    assert not d.called  # no headers yet
    peer.answer(request.stream_id, b"\x00\x00\x00\x00\x00", trailers=[(b"grpc-status", b"0"), (b"grpc-message", b"ok")])
    [response] = results(d)
    body = Body()
    response.deliverBody(body)
    assert body.reason is not None and body.reason.check(ResponseDone)
    assert body.trailers_at_end == [(b"grpc-status", b"0"), (b"grpc-message", b"ok")]


def test_a_trailers_only_response_has_its_status_in_the_headers_and_no_body():
    agent, endpoint, _ = make()
    d = agent.request(b"POST", URL)
    peer = endpoint.peers[0]
    [request] = peer.requests()
    peer.h2.send_headers(request.stream_id, [(b":status", b"200"), (b"grpc-status", b"4")], end_stream=True)
    peer.flush()
    [response] = results(d)
    body = Body()
    response.deliverBody(body)
    assert response.headers.getRawHeaders(b"grpc-status") == [b"4"] and body.data == b"" and body.reason.check(ResponseDone)


def test_response_data_is_acknowledged_only_as_it_is_consumed():
    agent, endpoint, _ = make()
    d = agent.request(b"GET", URL)
    peer = endpoint.peers[0]
    [request] = peer.requests()
    sid = request.stream_id
    peer.h2.send_headers(sid, [(b":status", b"200")])
    peer.flush()
    [response] = results(d)
    body = Body()
    response.deliverBody(body)
    response.pauseProducing()
    window = peer.h2.local_flow_control_window(sid)
    peer.h2.send_data(sid, b"a" * 10000)
    peer.flush()
    assert body.data == b""  # kept while paused
    assert peer.h2.local_flow_control_window(sid) == window - 10000  # and not acknowledged: the upstream's window shrinks
    response.resumeProducing()
    peer.flush()
    assert body.data == b"a" * 10000
    assert not [e for e in peer.events if isinstance(e, StreamReset)]
    # the client acknowledged as it consumed (h2 sends WINDOW_UPDATE once half the window is used; consumption is recorded)
    for _ in range(8):
        peer.h2.send_data(sid, b"b" * 16384)
        peer.flush()
    assert peer.h2.local_flow_control_window(sid) > window - 10000 - 8 * 16384


def test_an_upload_waits_for_the_windows_and_pauses_its_producer():
    agent, endpoint, _ = make()
    network = Network()
    body = RequestBody(network, None)  # type: ignore[arg-type]
    d = agent.request(b"POST", URL, Headers(), body)
    peer = endpoint.peers[0]
    body.write(b"x" * 100000)  # more than the default stream window of 65,535
    peer.receive()
    received = sum(len(e.data) for e in peer.events if isinstance(e, DataReceived))
    assert received == 65535
    assert body._paused  # the producer was paused: the rest waits for the window
    [request] = peer.requests()
    peer.h2.acknowledge_received_data(received, request.stream_id)
    peer.h2.increment_flow_control_window(100000)
    peer.flush()
    body.finish()
    peer.receive()
    received = sum(len(e.data) for e in peer.events if isinstance(e, DataReceived))
    assert received == 100000
    assert [e for e in peer.events if isinstance(e, StreamEnded)]
    assert not d.called


def test_a_transport_that_pauses_pauses_the_uploads():
    agent, endpoint, _ = make()
    network = Network()
    body = RequestBody(network, None)  # type: ignore[arg-type]
    agent.request(b"POST", URL, Headers(), body)
    connection = endpoint.peers[0].client
    connection.pauseProducing()
    body.write(b"x" * 10)
    assert body._paused
    connection.resumeProducing()
    assert not body._paused
    endpoint.peers[0].receive()
    assert sum(len(e.data) for e in endpoint.peers[0].events if isinstance(e, DataReceived)) == 10


def test_a_body_longer_than_its_length_fails_the_request():
    agent, endpoint, _ = make()
    network = Network()
    body = RequestBody(network, 3)  # type: ignore[arg-type]
    d = agent.request(b"POST", URL, Headers(), body)
    body.write(b"abcdef")
    [failure] = results(d)
    assert failure.check(RequestGenerationFailed)
    endpoint.peers[0].receive()
    assert [e for e in endpoint.peers[0].events if isinstance(e, StreamReset)]


def test_cancelling_resets_the_stream_and_the_connection_goes_on():
    agent, endpoint, _ = make()
    d = agent.request(b"GET", URL)
    d.cancel()
    [failure] = results(d)
    assert failure.check(defer.CancelledError)
    peer = endpoint.peers[0]
    peer.receive()
    [reset] = [e for e in peer.events if isinstance(e, StreamReset)]
    assert reset.error_code == ErrorCodes.CANCEL
    agent.request(b"GET", URL)
    assert len(endpoint.peers) == 1 and len(peer.requests()) == 2


def test_stopping_the_body_resets_the_stream():
    agent, endpoint, _ = make()
    d = agent.request(b"GET", URL)
    peer = endpoint.peers[0]
    [request] = peer.requests()
    peer.h2.send_headers(request.stream_id, [(b":status", b"200")])
    peer.flush()
    [response] = results(d)
    body = Body()
    response.deliverBody(body)
    response.stopProducing()
    assert body.reason is not None and body.reason.check(ResponseFailed)
    peer.receive()
    assert [e for e in peer.events if isinstance(e, StreamReset)]


def test_a_reset_before_the_response_is_never_received_and_a_refused_stream_is_sent_again_once():
    agent, endpoint, _ = make()
    d = agent.request(b"GET", URL)
    peer = endpoint.peers[0].ready()
    peer.h2.reset_stream(1, ErrorCodes.INTERNAL_ERROR)
    peer.flush()
    [failure] = results(d)
    assert failure.check(ResponseNeverReceived)
    d = agent.request(b"GET", URL)
    peer.ready().h2.reset_stream(3, ErrorCodes.REFUSED_STREAM)
    peer.flush()
    assert not d.called and [r.stream_id for r in peer.requests()] == [1, 3, 5]  # sent again
    peer.ready().h2.reset_stream(5, ErrorCodes.REFUSED_STREAM)
    peer.flush()
    [failure] = results(d)
    assert failure.check(ResponseNeverReceived)  # once only


def test_a_reset_mid_body_cuts_it_off():
    agent, endpoint, _ = make()
    d = agent.request(b"GET", URL)
    peer = endpoint.peers[0].ready()
    peer.h2.send_headers(1, [(b":status", b"200")])
    peer.h2.send_data(1, b"part")
    peer.h2.reset_stream(1, ErrorCodes.INTERNAL_ERROR)
    peer.flush()
    [response] = results(d)
    body = Body()
    response.deliverBody(body)
    assert body.reason is not None and body.reason.check(ResponseFailed)


def test_goaway_fails_unprocessed_streams_as_refused_so_they_go_again_on_a_new_connection():
    agent, endpoint, _ = make()
    first = agent.request(b"GET", URL)
    second = agent.request(b"GET", URL)
    peer = endpoint.peers[0].ready()
    peer.h2.close_connection(last_stream_id=1)
    peer.flush()
    [failure] = results(first)  # accepted, but h2 cannot carry it past GOAWAY: it fails
    assert failure.check(ResponseNeverReceived)
    assert not second.called and len(endpoint.peers) == 2  # not processed: sent again on a new connection
    assert peer.transport.disconnecting
    endpoint.peers[1].answer(1, b"ok")
    assert results(second)[0].code == 200


def test_response_headers_past_the_limit_fail_and_close_the_connection():
    agent, endpoint, _ = make(max_header_size=4096)
    d = agent.request(b"GET", URL)
    peer = endpoint.peers[0]
    peer.flush()  # the client's SETTINGS (MAX_HEADER_LIST_SIZE) acknowledged
    peer.h2.send_headers(1, [(b":status", b"200"), (b"x-big", b"a" * 8000)], end_stream=True)
    peer.flush()
    [failure] = results(d)
    assert failure.check(ResponseNeverReceived) and failure.value.reasons[0].check(ResponseHeadersTooLarge)


def test_a_protocol_error_fails_every_stream():
    agent, endpoint, _ = make()
    ds = [agent.request(b"GET", URL) for _ in range(2)]
    endpoint.peers[0].client.dataReceived(b"\x00\x00\x08\x07\x00\x00\x00\x00\x01garbage!")  # GOAWAY on stream 1: illegal
    for d in ds:
        [failure] = results(d)
        assert failure.check(ResponseNeverReceived) and failure.value.reasons[0].check(UpstreamProtocolError)


def test_an_alpn_other_than_h2_is_refused_before_any_http2_byte_is_sent():
    agent, endpoint, _ = make()
    endpoint.hold = True
    agent.request(b"GET", URL)
    [(_, factory)] = endpoint.pending
    connection = factory.buildProtocol(None)
    transport = StringTransport()
    transport.negotiatedProtocol = b"http/1.1"  # type: ignore[attr-defined]
    connection.makeConnection(transport)
    waiting = connection.when_handshake_done()
    connection.handshakeCompleted()
    [failure] = results(waiting)
    assert failure.check(UpstreamProtocolError)
    assert transport.value() == b""  # not even the preface: over TLS it waits for the handshake's outcome


def test_over_tls_the_preface_waits_for_the_handshake_and_goes_before_the_first_request():
    agent, endpoint, _ = make()
    endpoint.hold = True
    agent.request(b"GET", URL)
    [(_, factory)] = endpoint.pending
    connection = factory.buildProtocol(None)
    transport = StringTransport()
    connection.makeConnection(transport)
    assert transport.value() == b""  # during the handshake: nothing (TLSMemoryBIOProtocol would buffer it, see _send_preface)
    connection.handshakeCompleted()
    assert transport.value().startswith(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")


def test_an_idle_connection_closes_after_the_idle_timeout_and_retire_closes_idle_ones():
    agent, endpoint, clock = make(idle_timeout=60)
    d = agent.request(b"GET", URL)
    peer = endpoint.peers[0]
    peer.answer(1, b"x")
    results(d)[0].deliverBody(Body())
    clock.advance(59)
    assert not peer.transport.disconnecting
    clock.advance(2)
    assert peer.transport.disconnecting
    agent2, endpoint2, _ = make()
    d = agent2.request(b"GET", URL)
    agent2.close()
    assert not endpoint2.peers[0].transport.disconnecting  # busy: closes when its stream ends
    endpoint2.peers[0].answer(1, b"x")
    results(d)[0].deliverBody(Body())
    assert endpoint2.peers[0].transport.disconnecting


def test_persistent_false_makes_a_connection_per_request_closed_after_it():
    agent, endpoint, _ = make(persistent=False)
    d1 = agent.request(b"GET", URL)
    agent.request(b"GET", URL)
    assert len(endpoint.peers) == 2
    endpoint.peers[0].answer(1, b"x")
    results(d1)[0].deliverBody(Body())
    assert endpoint.peers[0].transport.disconnecting


def test_a_lost_connection_fails_its_streams():
    from twisted.internet.error import ConnectionLost

    agent, endpoint, _ = make()
    d1 = agent.request(b"GET", URL)
    d2 = agent.request(b"GET", URL)
    peer = endpoint.peers[0].ready()
    peer.h2.send_headers(1, [(b":status", b"200")])
    peer.flush()
    [response] = results(d1)
    body = Body()
    response.deliverBody(body)
    peer.client.connectionLost(Failure(ConnectionLost()))
    assert body.reason is not None and body.reason.check(ResponseFailed)
    [failure] = results(d2)
    assert failure.check(ResponseNeverReceived)
    agent.request(b"GET", URL)
    assert len(endpoint.peers) == 2  # the next request gets a new connection


@pytest.mark.parametrize("length", [None, 5])
def test_content_length_comes_from_the_body(length):
    agent, endpoint, _ = make()
    body = RequestBody(Network(), length)  # type: ignore[arg-type]
    agent.request(b"POST", URL, Headers({b"content-length": [b"999"]}), body)
    [request] = endpoint.peers[0].requests()
    assert dict(request.headers).get(b"content-length") == (None if length is None else b"5")
    assert body.length is (UNKNOWN_LENGTH if length is None else 5) or body.length == 5


def test_a_safe_request_on_a_reused_connection_that_dies_unheard_is_sent_again_once():
    from twisted.internet.error import ConnectionLost

    agent, endpoint, _ = make()
    d = agent.request(b"GET", URL)
    endpoint.peers[0].answer(1, b"x")
    results(d)[0].deliverBody(Body())  # the connection has carried a stream: reused from now on
    get = agent.request(b"GET", URL)
    post = agent.request(b"POST", URL)
    endpoint.peers[0].client.connectionLost(Failure(ConnectionLost()))  # closed by the upstream as they went
    assert not get.called and len(endpoint.peers) == 2  # GET: again, on a new connection
    [failure] = results(post)
    assert failure.check(ResponseNeverReceived)  # POST: not idempotent, not sent again
    endpoint.peers[1].client.connectionLost(Failure(ConnectionLost()))  # a fresh connection is not retried
    [failure] = results(get)
    assert failure.check(ResponseNeverReceived)


def test_stopping_a_paused_body_whose_stream_ended_still_ends_it_as_cut_off():
    agent, endpoint, _ = make()
    d = agent.request(b"GET", URL)
    peer = endpoint.peers[0].ready()
    peer.h2.send_headers(1, [(b":status", b"200")])
    peer.flush()
    [response] = results(d)
    body = Body()
    response.deliverBody(body)
    response.pauseProducing()
    peer.h2.send_data(1, b"kept", end_stream=True)
    peer.flush()
    assert body.reason is None  # ended upstream, but kept for the paused consumer
    response.stopProducing()
    assert body.data == b"" and body.reason is not None and body.reason.check(ResponseFailed)
