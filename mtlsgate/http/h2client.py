"""
The upstream HTTP/2 client: an L{IAgent} on the C{h2} state machine, for routes with
C{upstream_protocol: http2} (gRPC upstreams among them).

One connection per origin carries many streams; a new connection is made when every connection to
the origin is at its stream limit or going away (GOAWAY).  It keeps the contract of
L{mtlsgate.http.client.HTTP11Agent} (L{IAgent}, L{IResponse}, C{deliverBody} with a push-producer
transport, C{ResponseDone} / C{ResponseFailed} / C{ResponseNeverReceived}), so the proxy's exchange
works with either, and adds one thing: a response's trailers, as the attribute C{trailers} (a list of
C{(name, value)} byte pairs, names in lower case, as received; empty when there were none), set
before the body protocol's C{connectionLost(ResponseDone)}.  The design is in docs/engine.md,
"HTTP/2 upstreams".
"""

from __future__ import annotations

import collections
from typing import Any

import attrs
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated, DataReceived, RemoteSettingsChanged, ResponseReceived, StreamEnded, StreamReset, TrailersReceived, WindowUpdated,
)  # fmt: skip
from h2.exceptions import DenialOfServiceError, H2Error
from h2.settings import SettingCodes
from twisted.internet import defer
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IConsumer, IHandshakeListener, IPushProducer, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

from mtlsgate.http.client import DEFAULT_MAX_HEADER_SIZE, IDEMPOTENT, IDLE_TIMEOUT, ClientRequest, check_request, parse_origin, split_url
from mtlsgate.http.client import ResponseHeadersTooLarge, UpstreamProtocolError
from mtlsgate.http.outcomes import RequestGenerationFailed, ResponseDone, ResponseFailed, ResponseNeverReceived, is_response_done
from mtlsgate.http.status import RESPONSES

log = Logger(namespace="mtlsgate.http.h2client")

MAX_STREAMS_PER_CONNECTION = 100  # the gateway's own cap, below whatever the upstream allows (RFC 9113 recommends allowing 100)
STREAM_WINDOW = 256 * 1024  # bytes an upstream may send on one stream before the gateway's client consumed them
CONNECTION_WINDOW = 16 * 1024 * 1024  # the same for the whole connection
_LAST_STREAM_ID = 2**31 - 1
_COALESCE_BELOW = 16 * 1024  # body pieces kept for a paused stream are joined below this size (tiny DATA frames)
_NO_BODY_STATUS = frozenset([204, 304])
# Never sent on HTTP/2 (RFC 9113 8.2.2), nor the framing the client does itself; `te` only as `te: trailers`.
_CONNECTION_SPECIFIC = frozenset(
    [b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"host", b"content-length", b"te", b"http2-settings"]
)  # fmt: skip


class UpstreamStreamReset(Exception):
    """The upstream reset the stream (RST_STREAM), or went away (GOAWAY) with it unanswered."""

    def __init__(self, code: int, message: str = "") -> None:
        try:
            name = ErrorCodes(code).name
        except ValueError:
            name = str(code)
        super().__init__(message or f"the upstream reset the stream ({name})")
        self.code = code


def h2_request_headers(request: ClientRequest, scheme: bytes, authority: bytes) -> list[tuple[bytes, bytes]]:
    """
    The header block of C{request} on HTTP/2: pseudo-headers first, names in lower case, without
    connection-specific headers (RFC 9113 8.2.2) and without C{Host} (C{:authority} carries it: the
    request's own Host, when the caller gave one, else the origin's); C{te} only as C{te: trailers}, and
    only when the caller sent that token; C{content-length} from the body producer's length.
    """
    headers = request.headers
    hosts = headers.getRawHeaders(b"host")
    block = [(b":method", request.method), (b":scheme", scheme), (b":authority", hosts[0] if hosts else authority), (b":path", request.target)]
    te_trailers = False
    for name, values in headers.getAllRawHeaders():
        lowered = name.lower()
        if lowered == b"te":
            te_trailers = te_trailers or any(t.strip().lower() == b"trailers" for v in values for t in v.split(b","))
            continue
        if lowered in _CONNECTION_SPECIFIC or lowered.startswith(b":"):
            continue
        for value in values:
            block.append((lowered, value))
    if te_trailers:
        block.append((b"te", b"trailers"))
    body = request.body
    if body is not None and body.length is not UNKNOWN_LENGTH:
        block.append((b"content-length", b"%d" % body.length))
    elif body is None and request.method in (b"POST", b"PUT"):
        block.append((b"content-length", b"0"))
    return block


# --- the response -----------------------------------------------------------------------------------


@implementer(IResponse, IPushProducer)
class H2Response:
    """
    One stream's response: status and headers, a body delivered to the protocol given to
    L{deliverBody}, and C{trailers}.  Its transport (this object) pauses and resumes the stream alone:
    while paused, data the upstream sends is kept (at most the stream's flow-control window) and not
    acknowledged, so the upstream stops once that window is used.  Data is acknowledged only as the
    body's protocol takes it.
    """

    previousResponse = None

    def __init__(self, stream: _Stream, code: int, headers: Headers, length: Any) -> None:
        self._stream: _Stream | None = stream
        self.request = stream.exchange.request
        self.version = (b"HTTP", 2, 0)
        self.code = code
        self.phrase = RESPONSES.get(code, b"")
        self.headers = headers
        self.length = length
        self.trailers: list[tuple[bytes, bytes]] = []
        self._protocol: Any = None
        self._buffer: collections.deque[tuple[bytes | bytearray, int]] = collections.deque()  # (data, flow-controlled length) not yet handed on
        self._paused = False
        self._end: Failure | None = None
        self.finished = False

    def setPreviousResponse(self, response: IResponse) -> None:
        self.previousResponse = response

    def deliverBody(self, protocol: Any) -> None:
        if self._protocol is not None:
            raise RuntimeError("the response body was delivered already")
        self._protocol = protocol
        protocol.makeConnection(self)
        self._drain()

    def data(self, data: bytes, flow_length: int) -> None:
        """Body bytes from the stream."""
        if self._end is not None or self.finished:
            return
        if self._protocol is None or self._paused or self._buffer:
            last = self._buffer[-1] if self._buffer else None
            if last is not None and len(last[0]) < _COALESCE_BELOW:
                kept = last[0] if isinstance(last[0], bytearray) else bytearray(last[0])
                kept += data  # tiny DATA frames are kept at about their size, not one object each
                self._buffer[-1] = (kept, last[1] + flow_length)
            else:
                self._buffer.append((data, flow_length))
            return
        self._protocol.dataReceived(data)
        self._consumed(flow_length)

    def end(self, reason: Failure) -> None:
        """The body is over (C{ResponseDone}) or was cut off; told to the protocol once what is kept has been taken."""
        if self._end is not None:
            return
        self._end = reason
        if not is_response_done(reason.value):
            self._buffer.clear()  # a body cut off: what is kept would only be a truncated tail
            self._stream = None
        self._drain()

    def _consumed(self, flow_length: int) -> None:
        stream = self._stream
        if stream is not None and flow_length:
            stream.consumed(flow_length)

    def _drain(self) -> None:
        protocol = self._protocol
        if protocol is None or self.finished:
            return
        while self._buffer and not self._paused and not self.finished:
            data, flow_length = self._buffer.popleft()
            if data:
                protocol.dataReceived(bytes(data) if isinstance(data, bytearray) else data)
            self._consumed(flow_length)
        if self._end is not None and not self._buffer and not self.finished:
            self.finished = True
            self._stream = None
            protocol.connectionLost(self._end)

    # The body's transport, for back-pressure on this stream only.

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._drain()

    def stopProducing(self) -> None:
        """The body is not wanted (the client left, or the upstream stalled): it ends as cut off, and the stream is reset."""
        if self.finished:
            return
        stream, self._stream = self._stream, None
        self._buffer.clear()  # even when the stream had ended: what was kept is not wanted either
        self._end = Failure(ResponseFailed([Failure(ConnectionAborted("the response body was not wanted"))]))
        self._drain()
        if stream is not None:
            stream.reset(ErrorCodes.CANCEL)


# --- one stream ---------------------------------------------------------------------------------------


@implementer(IConsumer)
class _Stream:
    """One request on a connection: its upload (window-bounded), its response, its reset."""

    def __init__(self, connection: H2ClientConnection, stream_id: int, exchange: _H2Exchange) -> None:
        self.connection = connection
        self.stream_id = stream_id
        self.exchange = exchange
        self.response: H2Response | None = None
        self.closed = False
        # the upload
        self.body: Any = None
        self._pending: list[bytes] = []  # body bytes waiting for flow-control window
        self._remaining: int | None = None  # bytes the producer still owes, for a known length
        self._producer_paused = False
        self._body_done = False  # the producer finished: END_STREAM once _pending is sent
        self.uploading = False

    # -- the request body, as the producer's consumer --

    def start_upload(self, body: Any) -> None:
        self.body = body
        self.uploading = True
        self._remaining = None if body.length is UNKNOWN_LENGTH else body.length
        try:
            done = body.startProducing(self)
        except BaseException:
            done = defer.fail()
        done.addCallbacks(self._produced, self._upload_failed)

    def registerProducer(self, producer: Any, streaming: bool) -> None:  # IConsumer; the body is registered by start_upload
        pass

    def unregisterProducer(self) -> None:
        pass

    def write(self, data: bytes) -> None:
        if not self.uploading or not data:
            return
        if self._remaining is not None:
            if len(data) > self._remaining:
                self._upload_failed(Failure(ValueError(f"the request body producer wrote more than its length ({self._remaining} bytes left)")))
                return
            self._remaining -= len(data)
        self._pending.append(data)
        self.flush()

    def _produced(self, _: Any) -> None:
        if not self.uploading:
            return
        if self._remaining:
            self._upload_failed(Failure(ValueError(f"the request body producer stopped {self._remaining} bytes short of its length")))
            return
        self._body_done = True
        self.flush()

    def _upload_failed(self, failure: Failure) -> None:
        if not self.uploading:
            return
        self.uploading = False
        self._stop_body()
        if self.response is None:
            self.exchange.fail(Failure(RequestGenerationFailed([failure])))
        self.reset(ErrorCodes.CANCEL)

    def _stop_body(self) -> None:
        body, self.body = self.body, None
        self._pending.clear()
        if body is not None:
            body.stopProducing()

    def flush(self) -> None:
        """Send what the flow-control windows (and the transport) allow; pause the producer when bytes are left waiting."""
        if not self.uploading or self.closed:
            return
        connection = self.connection
        h2 = connection.h2
        while self._pending and not connection.write_paused:
            window = h2.local_flow_control_window(self.stream_id)
            if window <= 0:
                break
            chunk = self._pending[0]
            size = min(window, h2.max_outbound_frame_size, len(chunk))
            if size < len(chunk):
                self._pending[0] = chunk[size:]
                chunk = chunk[:size]
            else:
                self._pending.pop(0)
            h2.send_data(self.stream_id, chunk)
        if self._pending or connection.write_paused:
            if not self._producer_paused and self.body is not None and not self._body_done:
                self._producer_paused = True
                self.body.pauseProducing()
        else:
            if self._body_done:
                self.uploading = False
                self.body = None
                h2.end_stream(self.stream_id)
            elif self._producer_paused and self.body is not None:
                self._producer_paused = False
                self.body.resumeProducing()
        connection.send_pending()

    # -- the response --

    def consumed(self, flow_length: int) -> None:
        """The response's consumer took C{flow_length} bytes: open the windows by as much."""
        self.connection.acknowledge(self.stream_id, flow_length)

    def reset(self, code: int) -> None:
        """Give up the stream (cancelled, or its body unwanted): RST_STREAM, and it leaves the connection."""
        if self.closed:
            return
        self.connection.reset_stream(self, code)

    def lost(self, reason: Failure, reused: bool = False) -> None:
        """
        The stream ended abnormally (reset by the upstream, GOAWAY, the connection lost; C{reused}: a
        connection that had completed streams before, lost with no byte of this one's response).
        """
        if self.closed:
            return
        self.closed = True
        if self.uploading:
            self.uploading = False
            self._stop_body()
        if self.response is None:
            self.exchange.lost(reason, reused)
        else:
            self.response.end(Failure(ResponseFailed([reason])))


# --- one connection ---------------------------------------------------------------------------------


@implementer(IHandshakeListener, IPushProducer)
class H2ClientConnection(Protocol):
    """One HTTP/2 connection to an upstream origin, carrying up to C{max_streams} streams at once."""

    transport: Any = None

    def __init__(self, agent: H2Agent, origin: _Origin) -> None:
        self.agent = agent
        self.origin = origin
        self.h2 = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.streams: dict[int, _Stream] = {}
        self.connected = False
        self.going_away = False  # GOAWAY received or sent, or retired: no new streams
        self.write_paused = False
        self.single_use = not agent.persistent
        self._used = False
        self._completed = 0  # streams that ended with a complete response
        self._heard_up_to = 0  # the highest stream opened when bytes last arrived: streams above it heard nothing back
        self._idle_timer: Any = None
        self._handshake_waiters: list[defer.Deferred[None]] | None = []

    # -- TLS handshake (connect_timeout covers it: mtlsgate.proxy.upstream._HandshakeBoundedEndpoint) --

    def when_handshake_done(self) -> defer.Deferred[None]:
        if self._handshake_waiters is None:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._handshake_waiters.append(d)
        return d

    def handshakeCompleted(self) -> None:
        waiters, self._handshake_waiters = self._handshake_waiters or [], None
        negotiated = getattr(self.transport, "negotiatedProtocol", None)
        if negotiated not in (None, b"h2"):
            # The upstream chose another protocol by ALPN: HTTP/2 bytes would be nonsense to it.
            error = UpstreamProtocolError(f"the upstream chose {negotiated!r} by ALPN, not h2 (upstream_protocol: http2)")
            for d in waiters:
                d.errback(error)
            self.abort()
            return
        self._send_preface()
        for d in waiters:
            d.callback(None)

    def connectionMade(self) -> None:
        self.connected = True
        self.transport.registerProducer(self, True)
        if self.origin.scheme != b"https":
            self._send_preface()  # prior knowledge on http://; over TLS the preface waits for the handshake

    def _send_preface(self) -> None:
        """
        The connection preface and our settings.  Over TLS they go once the handshake is done, never
        before: bytes written during the handshake wait in C{TLSMemoryBIOProtocol}'s buffer, and a
        write made from C{handshakeCompleted} (a request started by whoever waited for the handshake)
        reaches OpenSSL before that buffer is flushed, so the upstream would see a HEADERS frame
        before the preface (docs/engine.md, "Writes before the TLS handshake").
        """
        h2 = self.h2
        h2.initiate_connection()
        h2.update_settings({
            SettingCodes.ENABLE_PUSH: 0,
            SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            SettingCodes.MAX_HEADER_LIST_SIZE: self.agent.max_header_size,
        })  # fmt: skip
        h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.send_pending()

    # -- streams --

    def has_capacity(self) -> bool:
        if not self.connected or self.going_away or (self.single_use and self._used):
            return False
        h2 = self.h2
        limit = min(h2.remote_settings.max_concurrent_streams, self.agent.max_streams)
        return h2.open_outbound_streams < limit and (h2.highest_outbound_stream_id or 0) < _LAST_STREAM_ID - 2

    def start(self, exchange: _H2Exchange) -> None:
        """Open a stream for C{exchange}'s request: headers now, then the body as the windows allow."""
        self._used = True
        self._cancel_idle()
        request = exchange.request
        h2 = self.h2
        stream_id = h2.get_next_available_stream_id()
        stream = _Stream(self, stream_id, exchange)
        try:
            block = h2_request_headers(request, self.origin.scheme, self.origin.authority)
            h2.send_headers(stream_id, block, end_stream=request.body is None)
        except H2Error as e:
            # Invalid headers (h2 validates them before anything is sent): this request fails, the connection goes on.
            exchange.fail(Failure(RequestGenerationFailed([Failure(e)])))
            self._maybe_idle()
            return
        self.streams[stream_id] = stream
        exchange.stream = stream
        self.send_pending()
        if request.body is not None:
            stream.start_upload(request.body)

    def reset_stream(self, stream: _Stream, code: int) -> None:
        stream.lost(Failure(ConnectionAborted("the stream was reset by the gateway")))
        self.streams.pop(stream.stream_id, None)
        if self.connected:
            try:
                self.h2.reset_stream(stream.stream_id, code)
            except H2Error:
                pass  # closed already on h2's side
            self.send_pending()
        self._maybe_idle()

    def acknowledge(self, stream_id: int, size: int) -> None:
        if not self.connected:
            return
        self.h2.acknowledge_received_data(size, stream_id)
        self.send_pending()

    def send_pending(self) -> None:
        if self.transport is None:
            return
        data = self.h2.data_to_send()
        if data:
            self.transport.write(data)

    # -- receiving --

    def dataReceived(self, data: bytes) -> None:
        if not self.connected or (self.going_away and not self.streams):
            return  # closing, nothing in flight (after GOAWAY, h2 would call any further frame a protocol error)
        self._heard_up_to = self.h2.highest_outbound_stream_id or 0
        try:
            events = self.h2.receive_data(data)
        except DenialOfServiceError as e:
            self._broken(ResponseHeadersTooLarge(f"response headers larger than {self.agent.max_header_size} bytes (max_response_header_size): {e}"))
            return
        except H2Error as e:
            self._broken(UpstreamProtocolError(f"HTTP/2 protocol error: {e}"))
            return
        self.send_pending()
        for event in events:
            if not self.connected:
                return
            if isinstance(event, ResponseReceived):
                self._response(event.stream_id, event.headers)
            elif isinstance(event, DataReceived):
                stream = self.streams.get(event.stream_id)
                if stream is not None and stream.response is not None:
                    stream.response.data(event.data, event.flow_controlled_length)
                elif event.flow_controlled_length:
                    self.acknowledge(event.stream_id, event.flow_controlled_length)  # for a stream given up: keep the connection's window open
            elif isinstance(event, TrailersReceived):
                stream = self.streams.get(event.stream_id)
                if stream is not None and stream.response is not None:
                    stream.response.trailers = [(name, value) for name, value in event.headers if not name.startswith(b":")]
            elif isinstance(event, StreamEnded):
                self._ended(event.stream_id)
            elif isinstance(event, StreamReset):
                stream = self.streams.pop(event.stream_id, None)
                if stream is not None:
                    stream.lost(Failure(UpstreamStreamReset(event.error_code)))
                    self._maybe_idle()
            elif isinstance(event, WindowUpdated):
                self._window_opened(event.stream_id)
            elif isinstance(event, RemoteSettingsChanged):
                if SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
                    self._window_opened(0)
                if SettingCodes.MAX_CONCURRENT_STREAMS in event.changed_settings and self in self.origin.connections:
                    self.agent.capacity_changed(self.origin)
            elif isinstance(event, ConnectionTerminated):
                self._goaway(int(event.error_code or 0), event.last_stream_id)
        self.send_pending()

    def _response(self, stream_id: int, block: list[tuple[bytes, bytes]]) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        headers = Headers()
        code = 0
        length: Any = UNKNOWN_LENGTH
        for name, value in block:
            if name == b":status":
                code = int(value)  # h2 checked there is exactly one, of three digits
            elif not name.startswith(b":"):
                headers.addRawHeader(name, value)
                if name == b"content-length" and value.isdigit():
                    length = int(value)  # h2 checks the DATA frames against it
        request = stream.exchange.request
        if request.method == b"HEAD" or code in _NO_BODY_STATUS:
            length = 0
        response = stream.response = H2Response(stream, code, headers, length)
        stream.exchange.respond(response)

    def _ended(self, stream_id: int) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is None:
            return
        stream.closed = True
        if stream.uploading:
            # The upstream answered before taking the whole body (a gRPC server ending the call early): stop the upload.
            stream.uploading = False
            stream._stop_body()
            try:
                self.h2.reset_stream(stream_id, ErrorCodes.NO_ERROR)  # RFC 9113 8.1: tells the upstream the rest will not come
            except H2Error:
                pass
        if stream.response is not None:
            self._completed += 1
            stream.response.end(Failure(ResponseDone()))
        else:
            stream.exchange.lost(Failure(UpstreamProtocolError("the stream ended without a response")))
        self._maybe_idle()

    def _window_opened(self, stream_id: int) -> None:
        if stream_id:
            stream = self.streams.get(stream_id)
            if stream is not None:
                stream.flush()
            return
        for stream in list(self.streams.values()):
            stream.flush()

    def _goaway(self, code: int, last_stream_id: int | None) -> None:
        """
        GOAWAY: streams the upstream never processed (above C{last_stream_id}) fail as refused, and are
        sent again on another connection when that is safe.  h2 closes its state machine on GOAWAY, so
        the streams the upstream did accept cannot run to their end either: they fail too (a 502, or a
        body cut off), and the connection closes.
        """
        self.going_away = True
        self.agent.gone(self)
        last = last_stream_id if last_stream_id is not None else _LAST_STREAM_ID
        if code != ErrorCodes.NO_ERROR:
            log.info("upstream connection to {origin} went away: {code}", origin=self.origin.authority.decode("ascii", "replace"), code=code)
        streams, self.streams = self.streams, {}
        for stream_id in sorted(streams):
            if stream_id > last:
                reason = UpstreamStreamReset(ErrorCodes.REFUSED_STREAM, "the upstream went away (GOAWAY) before processing the stream")
            else:
                reason = UpstreamStreamReset(code, "the upstream went away (GOAWAY) in the middle of the stream")
            streams[stream_id].lost(Failure(reason))
        self.close()

    def _broken(self, error: Exception) -> None:
        """The upstream broke HTTP/2 (or the header limit): every stream on the connection fails, and it closes."""
        log.info("upstream connection closed: {error}", error=error)
        self.going_away = True
        self.agent.gone(self)
        self.send_pending()  # h2 queued its GOAWAY
        self._fail_all(Failure(error))
        self.abort()

    # -- idle, teardown, back-pressure --

    def _maybe_idle(self) -> None:
        if self.streams or not self.connected:
            return
        if self.going_away or self.single_use or self.agent.retired:
            self.close()
            return
        if self._idle_timer is None:
            self._idle_timer = self.agent.reactor.callLater(self.agent.idle_timeout, self._idle_expired)

    def _idle_expired(self) -> None:
        self._idle_timer = None
        if not self.streams:
            self.close()

    def _cancel_idle(self) -> None:
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.cancel()
        self._idle_timer = None

    def close(self) -> None:
        """Say GOAWAY and close (nothing in flight, or retired)."""
        self.going_away = True
        self.agent.gone(self)
        self._cancel_idle()
        if self.connected and self.transport is not None:
            try:
                self.h2.close_connection()
            except H2Error:
                pass
            self.send_pending()
            self.transport.loseConnection()

    def abort(self) -> None:
        self.going_away = True
        if self.transport is not None:
            self.transport.abortConnection()

    def _fail_all(self, reason: Failure, lost: bool = False) -> None:
        """
        Every stream fails with C{reason}.  C{lost}: the connection died; a stream sent on a connection
        that had completed streams before, and that heard nothing back since it was sent, is the
        HTTP/1.1 pool's dead-connection case (the upstream closed it, idle, as the request went).
        """
        streams, self.streams = self.streams, {}
        for stream_id, stream in streams.items():
            stream.lost(reason, lost and self._completed > 0 and stream_id > self._heard_up_to)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.connected = False
        self.going_away = True
        self._cancel_idle()
        self.agent.gone(self)
        waiters, self._handshake_waiters = self._handshake_waiters or [], None
        for d in waiters:
            d.errback(reason)
        if self.streams:
            self._fail_all(reason if not reason.check(ConnectionDone) else Failure(ConnectionLost("the upstream closed the connection")), lost=True)

    def pauseProducing(self) -> None:
        self.write_paused = True

    def resumeProducing(self) -> None:
        self.write_paused = False
        self._window_opened(0)

    def stopProducing(self) -> None:
        pass


class _ConnectionFactory(Factory):
    noisy = False

    def __init__(self, agent: H2Agent, origin: _Origin) -> None:
        self.agent = agent
        self.origin = origin

    def buildProtocol(self, addr: Any) -> H2ClientConnection:
        return H2ClientConnection(self.agent, self.origin)


# --- the agent --------------------------------------------------------------------------------------


@attrs.define(slots=True, eq=False)
class _Origin:
    scheme: bytes
    authority: bytes  # :authority when the request has no Host
    endpoint: IStreamClientEndpoint
    connections: list[H2ClientConnection] = attrs.Factory(list)
    waiting: list[_H2Exchange] = attrs.Factory(list)
    dialing: bool = False  # a connection is being made (requests that find no room wait for it)
    factory: Any = None


class _H2Exchange:
    """One request through the agent: waiting for a connection with room, then on its stream."""

    def __init__(self, agent: H2Agent, origin: _Origin, request: ClientRequest) -> None:
        self.agent = agent
        self.origin = origin
        self.request = request
        self.deferred: defer.Deferred[IResponse] = defer.Deferred(self._cancel)
        self.stream: _Stream | None = None
        self.cancelled = False
        self.retried = False
        self.connecting: defer.Deferred[Any] | None = None  # a dedicated connection (persistent=False)

    def respond(self, response: H2Response) -> None:
        if not self.deferred.called:
            self.deferred.callback(response)
        elif not response.finished:
            response.stopProducing()  # cancelled meanwhile: nobody will read the body

    def fail(self, failure: Failure) -> None:
        self.stream = None
        if not self.deferred.called:
            self.deferred.errback(failure)

    def lost(self, reason: Failure, reused: bool = False) -> None:
        """
        The stream failed before its response: sent again once, with no body, when the upstream never
        processed it (REFUSED_STREAM, above GOAWAY's last stream), or, for an idempotent method, when a
        reused connection died before any byte came back (as L{mtlsgate.http.client} does).
        """
        self.stream = None
        if self.cancelled:
            return  # the Deferred fails with CancelledError
        refused = isinstance(reason.value, UpstreamStreamReset) and reason.value.code == ErrorCodes.REFUSED_STREAM
        safe = refused or (reused and self.request.method in IDEMPOTENT)
        if safe and not self.retried and self.request.body is None:
            self.retried = True
            log.debug("an upstream stream was refused ({reason}); sending it again", reason=reason.getErrorMessage())
            self.agent.dispatch(self)
            return
        self.fail(Failure(ResponseNeverReceived([reason])))

    def _cancel(self, d: defer.Deferred[IResponse]) -> None:
        self.cancelled = True
        stream, self.stream = self.stream, None
        if self in self.origin.waiting:
            self.origin.waiting.remove(self)
        if self.connecting is not None:
            self.connecting.cancel()
        if stream is not None:
            stream.reset(ErrorCodes.CANCEL)


@implementer(IAgent)
class H2Agent:
    """
    An L{IAgent} speaking HTTP/2 for one set of TLS settings (one route): connections come from
    C{endpoints} (asked once per origin; their TLS context offers ALPN C{h2}), each carrying up to
    C{max_streams} concurrent streams (fewer when the upstream says so); C{persistent=False} makes a
    connection per request (health checks).
    """

    def __init__(self, reactor: Any, endpoints: IAgentEndpointFactory, *, max_header_size: int = DEFAULT_MAX_HEADER_SIZE,
                 persistent: bool = True, max_streams: int = MAX_STREAMS_PER_CONNECTION, idle_timeout: float = IDLE_TIMEOUT) -> None:  # fmt: skip
        self.reactor = reactor
        self.endpoints = endpoints
        self.max_header_size = max_header_size
        self.persistent = persistent
        self.max_streams = max_streams
        self.idle_timeout = idle_timeout
        self.retired = False
        self._origins: dict[bytes, _Origin] = {}

    def request(self, method: bytes, uri: bytes, headers: Headers | None = None, bodyProducer: IBodyProducer | None = None) -> defer.Deferred[IResponse]:
        try:
            origin, target = self._split(uri)
            check_request(method, target)
        except ValueError:
            return defer.fail()
        request = ClientRequest(method, uri, Headers() if headers is None else headers, target, bodyProducer, origin.authority, self.persistent)
        exchange = _H2Exchange(self, origin, request)
        self.dispatch(exchange)
        return exchange.deferred

    def dispatch(self, exchange: _H2Exchange) -> None:
        """Put C{exchange} on a connection with room, or wait for one being made (making one if none is)."""
        origin = exchange.origin
        if not self.persistent:
            self._connect_dedicated(exchange)
            return
        for connection in origin.connections:
            if connection.has_capacity():
                connection.start(exchange)
                return
        origin.waiting.append(exchange)
        if not origin.dialing:
            self._connect(origin)

    def _connect(self, origin: _Origin) -> None:
        origin.dialing = True  # before connect(): it may call back at once

        def connected(connection: H2ClientConnection) -> None:
            origin.dialing = False
            if self.retired and not origin.waiting:
                connection.close()
                return
            origin.connections.append(connection)
            self.capacity_changed(origin)
            connection._maybe_idle()

        def not_connected(failure: Failure) -> None:
            origin.dialing = False
            waiting, origin.waiting = origin.waiting, []
            for exchange in waiting:
                exchange.fail(failure)  # a ConnectError (TimeoutError included) as Agent gives it: the proxy fails over on it

        origin.endpoint.connect(origin.factory).addCallbacks(connected, not_connected)

    def _connect_dedicated(self, exchange: _H2Exchange) -> None:
        connecting = exchange.connecting = exchange.origin.endpoint.connect(exchange.origin.factory)

        def connected(connection: H2ClientConnection) -> None:
            exchange.connecting = None
            if exchange.cancelled:
                connection.abort()
                return
            connection.start(exchange)

        def not_connected(failure: Failure) -> None:
            exchange.connecting = None
            if not exchange.cancelled:
                exchange.fail(failure)

        connecting.addCallbacks(connected, not_connected)

    def capacity_changed(self, origin: _Origin) -> None:
        """A connection came up or may take more streams: hand the waiting requests over; connect again for those left."""
        waiting, origin.waiting = origin.waiting, []
        for exchange in waiting:
            if not exchange.cancelled:
                self.dispatch(exchange)

    def gone(self, connection: H2ClientConnection) -> None:
        """A connection takes no new streams (GOAWAY, closed, broken): new requests go to another."""
        origin = connection.origin
        if connection in origin.connections:
            origin.connections.remove(connection)
            if origin.waiting and not origin.dialing:
                self._connect(origin)

    def _split(self, uri: bytes) -> tuple[_Origin, bytes]:
        base, target = split_url(uri)
        origin = self._origins.get(base)
        if origin is None:
            origin = self._origins[base] = self._origin(base)
        return origin, target

    def _origin(self, base: bytes) -> _Origin:
        parsed, host = parse_origin(base)
        origin = _Origin(parsed.scheme, host, self.endpoints.endpointForURI(parsed))
        origin.factory = _ConnectionFactory(self, origin)
        return origin

    def connection_count(self) -> int:
        """Connections open and taking streams, over all origins (for tests and metrics)."""
        return sum(len(origin.connections) for origin in self._origins.values())

    def close(self) -> defer.Deferred[None]:
        """Retire: idle connections close now, busy ones when their last stream ends."""
        self.retired = True
        for origin in self._origins.values():
            for connection in list(origin.connections):
                if not connection.streams:
                    connection.close()
        return defer.succeed(None)
