"""
The gateway's HTTP/2 server protocol, on the C{h2} state machine: a second front end beside the
HTTP/1.1 one (L{mtlsgate.http.server}), chosen by ALPN (L{mtlsgate.http.negotiate}).

Each stream becomes an L{H2Request}, which provides the same L{IGatewayRequest} as the HTTP/1.1
engine's C{Request}, for the same handler (the proxy's C{ProxyResource.handle}): routing,
authorization, identity, header hygiene, body limits and access lines are not repeated here.

What this module owns is HTTP/2's own: h2 validates frames, HPACK, pseudo-headers, connection-specific
and upper-case header names, CR/LF/NUL in values and Content-Length against the DATA received (strict
configuration; its refusals are connection errors, GOAWAY PROTOCOL_ERROR, which RFC 9113 5.4.1 allows
for stream errors).  On top of h2, the gateway refuses what its HTTP/1.1 engine refuses and an
HTTP/1.1 upstream could read differently: a header name that is not a token, a control character in a
value (400 on the stream).  And it bounds what an HTTP/2 client can make a server do:

- concurrent streams (SETTINGS_MAX_CONCURRENT_STREAMS, L{MAX_CONCURRENT_STREAMS}): a stream beyond it is
  refused with RST_STREAM REFUSED_STREAM (h2's own bound, set at twice as many, is a backstop);
- the header list (SETTINGS_MAX_HEADER_LIST_SIZE = C{limits.max_header_size}; C{max_header_count}
  fields): 431 on the stream; HPACK decoding stops at twice the size (GOAWAY);
- rapid reset (CVE-2023-44487): a client that resets (or gets refused) L{RESET_BUDGET} streams, at
  least half of those it opened, gets GOAWAY ENHANCE_YOUR_CALM;
- control-frame floods (PING, SETTINGS, PRIORITY, empty DATA, RST_STREAM for a finished stream): more than L{CONTROL_FRAME_BUDGET} in
  L{FLOOD_WINDOW} seconds gets GOAWAY ENHANCE_YOUR_CALM; and a client that does not read what it
  makes the gateway write is not read either (the transport's back-pressure pauses reading);
- flow control both ways: a request body's DATA is acknowledged (WINDOW_UPDATE) only as the upstream
  takes it, so a slow upstream stops the client at its stream window (64 KiB), and the connection's
  window (1 MiB) bounds what one connection can make the gateway hold; a response body waits for the
  client's window, and its upstream is paused while it waits;
- the idle timeout: no stream open for C{idle_timeout} (PINGs do not count), GOAWAY, closed; a stream waiting on the
  client (its body, or its window for the response) without progress for C{idle_timeout}, RST_STREAM CANCEL;
- L{H2ServerFactory.drain} (SIGTERM): GOAWAY NO_ERROR with the last stream taken; streams in flight
  finish, new ones are refused, and the connection closes when the last is done.
"""

from __future__ import annotations

import collections
from typing import Any, Callable

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated, DataReceived, PingReceived, PriorityUpdated, RemoteSettingsChanged, RequestReceived, StreamEnded, StreamReset,
    TrailersReceived, WindowUpdated,
)  # fmt: skip
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes, Settings
from hyperframe.frame import GoAwayFrame
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime, ISSLTransport, ITCPTransport
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from zope.interface import implementer

from mtlsgate.config.model import Limits
from mtlsgate.http.body import RequestBody
from mtlsgate.http.framing import header_field_problem, method_problem
from mtlsgate.http.headers import HOP_BY_HOP, sendable_trailers
from mtlsgate.http.interfaces import IGatewayChannel, IGatewayRequest
from mtlsgate.http.linger import Linger
from mtlsgate.http.server import ConnectionLostBeforeResponse, ResponseHooks, _dates
from mtlsgate.http.status import RESPONSES

log = Logger(namespace="mtlsgate.http.h2server")

#: SETTINGS_MAX_CONCURRENT_STREAMS the gateway advertises (nginx's http2_max_concurrent_streams is 128, Envoy's 100).
MAX_CONCURRENT_STREAMS = 100
#: Streams reset by the client (or refused) before their response ended, per connection, before GOAWAY ENHANCE_YOUR_CALM
#: (when they are also at least half of the streams it opened: a client that cancels now and then is not cut off).
RESET_BUDGET = 100
#: PING, SETTINGS, PRIORITY, empty DATA frames and RST_STREAM on finished streams a client may send within FLOOD_WINDOW seconds
#: (WINDOW_UPDATE is not counted: a fast download makes many).
CONTROL_FRAME_BUDGET = 1000
FLOOD_WINDOW = 10.0
_STREAM_WINDOW = 65535  # SETTINGS_INITIAL_WINDOW_SIZE (the protocol's default): a request body buffers at most this per stream
_CONNECTION_WINDOW = 16 * 65536  # the connection's receive window: request body bytes held per connection at most
_OUT_HIGH_WATER = 65536  # response bytes waiting for a stream's window before its upstream is paused
_COALESCE_BELOW = 16 * 1024  # response pieces smaller than this are joined while they wait for the window
_ABORT_TIMEOUT = 15.0  # a close not written out (the client reads nothing) is aborted this long after it
_CONNECTION_SPECIFIC = HOP_BY_HOP | {b"proxy-connection"}
_NO_BODY_CODES = frozenset([204, 304])


def _refusal_body(code: int, reason: str) -> bytes:
    return f"{code} {RESPONSES.get(code, b'').decode()}: {reason}\n".encode()


@implementer(IGatewayChannel)
class _StreamChannel:
    """A stream as the proxy's view of "the connection": the TLS transport and peer cache are the connection's; abort is the stream's."""

    def __init__(self, connection: H2ServerProtocol, request: H2Request) -> None:
        self._connection = connection
        self._request = request

    @property
    def transport(self) -> Any:
        return self._connection.transport

    @property
    def _mtlsgate_peer(self) -> Any:  # peer_of's per-connection cache
        return self._connection._mtlsgate_peer

    @_mtlsgate_peer.setter
    def _mtlsgate_peer(self, peer: Any) -> None:
        self._connection._mtlsgate_peer = peer

    def stop_parsing(self) -> None:
        self._request.discard_body = True
        self._connection.ack(self._request)

    def abort(self) -> None:
        self._connection.reset(self._request, ErrorCodes.INTERNAL_ERROR, "the response was cut off")


@implementer(IPushProducer)
class _StreamReading:
    """A stream's request body producer: paused, the stream's DATA is no longer acknowledged, so the client stops at its window."""

    def __init__(self, connection: H2ServerProtocol, request: H2Request) -> None:
        self._connection = connection
        self._request = request

    def pauseProducing(self) -> None:
        self._request.reading_paused = True

    def resumeProducing(self) -> None:
        self._request.reading_paused = False
        self._request.progress()  # the upstream took what it had: the wait is the client's again from now
        self._connection.ack(self._request)
        self._connection.flush()

    def stopProducing(self) -> None:
        pass


@implementer(IGatewayRequest)
class H2Request(ResponseHooks):
    """One HTTP/2 stream as the gateway's handler sees it (L{IGatewayRequest})."""

    clientproto = b"HTTP/2"
    _hook_log = log

    def __init__(
        self, connection: H2ServerProtocol, stream_id: int, method: bytes, uri: bytes, headers: Headers, has_body: bool, expects_continue: bool,
    ) -> None:  # fmt: skip
        self.connection = connection
        self.stream_id = stream_id
        self.channel = _StreamChannel(connection, self)
        self.method = method
        self.uri = uri
        self.requestHeaders = headers
        self.expects_continue = expects_continue
        self.body: RequestBody | None = None
        if has_body:
            length = headers.getRawHeaders(b"content-length")
            # h2 checked Content-Length (digits, one value, equal to the DATA that arrives); 0 high water: the window is the buffer
            self.body = RequestBody(_StreamReading(connection, self), int(length[0]) if length else None, high_water=0, low_water=1)
        self.code = 200
        self.responseHeaders = Headers()
        self.responseHeaders.setRawHeaders(b"date", [_dates.value(connection.reactor.seconds())])
        self.startedWriting = False
        self.finished = False
        self.disconnected = False
        self.ended = False  # END_STREAM sent (or the stream reset): nothing more goes out
        self.client_ended = not has_body  # the client's side of the stream is closed
        self.reading_paused = False
        self.discard_body = False
        self.unacked = 0  # flow-controlled bytes received and not yet acknowledged
        self.producer: Any = None
        self.producer_paused = False
        self.out: collections.deque[bytes | bytearray] = collections.deque()
        self.out_size = 0
        self.end_pending = False
        self._no_body = False
        self._trailers: list[tuple[bytes, bytes]] = []
        self._notify: list[Callable[[Failure | None], None]] = []
        self.last_progress = connection.reactor.seconds()  # a DATA byte in or out, a head out, or the upstream taking the body

    def progress(self) -> None:
        self.last_progress = self.connection.reactor.seconds()

    @property
    def waiting_on_client(self) -> bool:
        """
        Whether the stream can only move if the client does something: send more of a body the gateway is
        ready to read (not paused for the upstream), or open its window for response bytes waiting to go.
        """
        if self.ended or self.disconnected:
            return False
        if self.body is not None and not self.client_ended and not self.discard_body and not self.reading_paused:
            return True
        return bool(self.out) or self.end_pending

    def getHeader(self, name: bytes) -> bytes | None:
        values = self.requestHeaders.getRawHeaders(name)
        return values[-1] if values else None

    def getClientAddress(self) -> Any:
        return self.connection.peer_address

    def isSecure(self) -> bool:
        return self.connection.secure

    def setResponseCode(self, code: int, message: bytes | None = None) -> None:
        self.code = code  # HTTP/2 has no reason phrase

    def proceed(self) -> None:
        """A client that sent C{Expect: 100-continue} gets an informational 100 now."""
        if self.expects_continue and not self.startedWriting and not self.disconnected:
            self.expects_continue = False
            self.connection.send_headers(self, [(b":status", b"100")], end_stream=False)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer
        self.producer_paused = False
        if self.out_size > _OUT_HIGH_WATER or self.connection.write_paused:
            self.pause_producer()

    def unregisterProducer(self) -> None:
        self.producer = None
        self.producer_paused = False

    def pause_producer(self) -> None:
        if self.producer is not None and not self.producer_paused:
            self.producer_paused = True
            self.producer.pauseProducing()

    def resume_producer(self) -> None:
        if self.producer is not None and self.producer_paused:
            self.producer_paused = False
            self.producer.resumeProducing()

    def _head(self) -> list[tuple[bytes, bytes]]:
        self.startedWriting = True
        self._no_body = self.method == b"HEAD" or self.code in _NO_BODY_CODES
        fields = [(b":status", b"%d" % self.code)]
        for name, values in self.responseHeaders.getAllRawHeaders():
            name = name.lower()
            if name in _CONNECTION_SPECIFIC:
                continue
            fields.extend((name, value) for value in values)
        return fields

    def write(self, data: bytes) -> None:
        if self.finished:
            raise RuntimeError("write after finish")
        if self.disconnected or self.ended or not data:
            return  # the head waits for the first body byte or finish(): a response without a body is one HEADERS frame
        if not self.startedWriting:
            self.connection.send_headers(self, self._head(), end_stream=False)
        if not self._no_body:
            if not self.out:
                self.progress()  # the wait for the client's window (if any) starts now
            last = self.out[-1] if self.out else None
            if last is not None and len(last) < _COALESCE_BELOW:
                if not isinstance(last, bytearray):
                    last = self.out[-1] = bytearray(last)
                last += data  # small writes (an upstream's tiny chunks) wait at about their size, not one object each
            else:
                self.out.append(data)
            self.out_size += len(data)
            self.connection.pump(self)

    def write_trailers(self, pairs: list[tuple[bytes, bytes]]) -> None:
        """Trailer fields, sent as the final HEADERS frame (END_STREAM) by finish()."""
        self._trailers = sendable_trailers(pairs)

    def finish(self) -> None:
        if self.disconnected:
            raise RuntimeError("finish after the stream was reset; use notifyFinish")
        if self.finished:
            return
        if self.body is not None and not self.client_ended:
            self.discard_body = True  # the response ends before the request body did: RST_STREAM NO_ERROR after it (RFC 9113 8.1)
            self.connection.ack(self)
        if not self.startedWriting and not self._trailers:
            self.connection.send_headers(self, self._head(), end_stream=True)  # a headers-only (or trailers-only) response
        else:
            if not self.startedWriting:
                self.connection.send_headers(self, self._head(), end_stream=False)
            self.end_pending = True
            self.connection.pump(self)
        self.finished = True
        self._tell(None)
        self.connection.flush()

    def end_with_trailers(self) -> list[tuple[bytes, bytes]]:
        trailers, self._trailers = self._trailers, []
        return trailers

    def connection_lost(self, reason: Failure) -> None:
        """The stream was reset, or the connection lost, before the response was finished."""
        self.ended = True
        if self.disconnected or self.finished:
            return
        self.disconnected = True
        self._tell(reason)


class FrameHeaders:
    """
    Walks the frame headers of a client's byte stream as it arrives, to refuse a frame longer than
    SETTINGS_MAX_FRAME_SIZE at its header (RFC 9113 4.2): h2 checks the length only once the whole
    frame is buffered, so a header announcing 16 MiB had the connection hold up to 16 MiB of the
    client's bytes (tests/adversarial/test_http2_oversized_frames.py).  The connection preface is
    passed over (h2 checks it).
    """

    __slots__ = ("_skip", "_header")

    def __init__(self) -> None:
        self._skip = len(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")  # bytes to pass over: the preface, then each frame's payload
        self._header = b""

    def too_long(self, data: bytes, limit: int) -> int | None:
        """The length of the first frame in C{data} longer than C{limit}, or None."""
        at, size = 0, len(data)
        while at < size:
            if self._skip:
                step = min(self._skip, size - at)
                self._skip -= step
                at += step
                continue
            take = 9 - len(self._header)
            self._header += data[at:at + take]
            at += take
            if len(self._header) < 9:
                return None
            length = int.from_bytes(self._header[:3], "big")
            self._header = b""
            if length > limit:
                return length
            self._skip = length
        return None


@implementer(IPushProducer)
class H2ServerProtocol(Protocol):
    """One HTTP/2 client connection: each stream's request is handed to C{handler} when its headers are in."""

    factory: H2ServerFactory | None = None
    _mtlsgate_peer: Any = None  # the client's verified identity, computed once per connection by the proxy's peer_of

    def __init__(self, handler: Callable[[Any], None], limits: Limits, reactor: IReactorTime, max_streams: int = MAX_CONCURRENT_STREAMS) -> None:
        self.handler = handler
        self.limits = limits
        self.reactor = reactor
        self.max_streams = max_streams
        self.peer_address: Any = None
        self.secure = False
        self.streams: dict[int, H2Request] = {}
        self.write_paused = False
        self.closed = False
        self.draining = False
        self._last_stream = 0
        self._opened = 0
        self._premature_resets = 0
        self._control_frames = 0
        self._flood_window_start = 0.0
        self._headers_priority: Any = None
        self._last_activity = 0.0
        self._idle_timer: IDelayedCall | None = None
        self._abort_timer: Linger | None = None  # the close, once the gateway closes (mtlsgate.http.linger)
        self._unregistered = False
        self._frame_headers = FrameHeaders()
        self.conn = H2Connection(H2Configuration(
            client_side=False, header_encoding=None, validate_inbound_headers=True, normalize_inbound_headers=True,
            validate_outbound_headers=True, normalize_outbound_headers=True,
        ))  # fmt: skip

    # --- the connection -------------------------------------------------------------------------

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.peer_address = self.transport.getPeer()
        self.secure = ISSLTransport.providedBy(self.transport)
        if ITCPTransport.providedBy(self.transport):
            self.transport.setTcpNoDelay(True)
        if self.factory is not None:
            self.factory.protocols.add(self)
        self._last_activity = self._flood_window_start = self.reactor.seconds()
        header_list = self.limits.max_header_size
        conn = self.conn
        conn.local_settings = Settings(client=False, initial_values={
            SettingCodes.MAX_CONCURRENT_STREAMS: self.max_streams, SettingCodes.MAX_HEADER_LIST_SIZE: header_list,
            SettingCodes.INITIAL_WINDOW_SIZE: _STREAM_WINDOW,
        })  # fmt: skip
        conn.initiate_connection()  # the SETTINGS frame says max_streams and max_header_size...
        # ...and h2 enforces twice as much: the streams and header lists between are refused politely (REFUSED_STREAM, 431),
        # those beyond end the connection.  Settings made here are in force at once (there is nothing pending to acknowledge).
        conn.local_settings = Settings(client=False, initial_values={
            SettingCodes.MAX_CONCURRENT_STREAMS: 2 * self.max_streams, SettingCodes.MAX_HEADER_LIST_SIZE: 2 * header_list,
            SettingCodes.INITIAL_WINDOW_SIZE: _STREAM_WINDOW,
        })  # fmt: skip
        conn.decoder.max_header_list_size = 2 * header_list
        # The connection window holds 16 stream windows: a few streams whose upstreams are slow hold back their own windows, not the others',
        # and request bodies the gateway holds for one connection stay within 1 MiB (nginx holds up to 64 KiB x 128 streams).
        conn.increment_flow_control_window(_CONNECTION_WINDOW - 65535)
        self.transport.registerProducer(self, True)  # type: ignore[attr-defined]
        self.flush()
        if self.limits.idle_timeout:
            self._idle_timer = self.reactor.callLater(self.limits.idle_timeout, self._idle_check)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed = True
        if self.factory is not None:
            self.factory.protocols.discard(self)
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.cancel()
        if self._abort_timer is not None:
            self._abort_timer.cancel()
        self._idle_timer = self._abort_timer = None
        streams, self.streams = self.streams, {}
        for request in streams.values():
            request.connection_lost(reason)

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.transport is not None and not self.closed:
            self.transport.write(data)

    def _peer(self) -> str:
        return str(getattr(self.peer_address, "host", "-"))

    def go_away(self, code: ErrorCodes, why: str) -> None:
        """End the connection with GOAWAY C{code} (the streams in flight are lost with it)."""
        if self.closed:
            return
        log.info("HTTP/2 connection from {peer} closed with GOAWAY {code}: {why}", peer=self._peer(), code=code.name, why=why)
        try:
            self.conn.close_connection(error_code=code, additional_data=why.encode("ascii", "replace")[:256])
        except ProtocolError:
            pass
        self._close()

    def _close(self) -> None:
        self.flush()
        self.closed = True
        if self.transport is not None:
            if not self._unregistered:
                self._unregistered = True
                self.transport.unregisterProducer()  # type: ignore[attr-defined]  # TLS waits for a registered producer before it closes
            self.transport.loseConnection()
            if self._abort_timer is None and getattr(self.transport, "connected", True):
                # close_notify, then a short linger for the client's answer once it is written out; a client that reads
                # nothing is aborted after _ABORT_TIMEOUT (mtlsgate.http.linger)
                if self._idle_timer is not None and self._idle_timer.active():
                    self._idle_timer.cancel()
                self._idle_timer = None
                self._abort_timer = Linger(self.reactor, self.transport, self.reactor.seconds() + _ABORT_TIMEOUT)

    def drain(self) -> None:
        """GOAWAY NO_ERROR: no new streams; close once those in flight are done."""
        if self.closed or self.draining:
            return
        self.draining = True
        if not self.streams:
            self.go_away(ErrorCodes.NO_ERROR, "shutting down")
            return
        # h2 allows nothing after its own GOAWAY, so the graceful one (streams in flight carry on) is written by hand.
        self.flush()
        assert self.transport is not None
        self.transport.write(GoAwayFrame(0, last_stream_id=self.conn.highest_inbound_stream_id, error_code=0).serialize())

    # --- IPushProducer: the transport's back-pressure ---------------------------------------------

    def pauseProducing(self) -> None:
        """The client does not read what is written: stop writing response bodies, and stop reading (no more PING/SETTINGS acks)."""
        if self.write_paused:
            return
        self.write_paused = True
        if self.transport is not None:
            self.transport.pauseProducing()  # type: ignore[attr-defined]
        for request in list(self.streams.values()):
            request.pause_producer()

    def resumeProducing(self) -> None:
        if not self.write_paused:
            return
        self.write_paused = False
        if self.transport is not None and not self.closed:
            self.transport.resumeProducing()  # type: ignore[attr-defined]
        for request in list(self.streams.values()):
            if request.out_size <= _OUT_HIGH_WATER:
                request.resume_producer()

    def stopProducing(self) -> None:
        pass

    # --- timers ---------------------------------------------------------------------------------

    def _idle_check(self) -> None:
        """
        The connection: no stream open for C{idle_timeout} (since the last one started or ended), GOAWAY; PING,
        SETTINGS, WINDOW_UPDATE and a header block that never ends do not keep it.  Each stream: waiting on the
        client (L{H2Request.waiting_on_client}) with no progress for C{idle_timeout}, RST_STREAM CANCEL, whatever
        else the connection carries (PINGs, other streams): one connection must not hold 100 stalled requests open.
        A stream waiting on its upstream is bounded by the route's timeout instead.
        """
        self._idle_timer = None
        timeout = self.limits.idle_timeout
        now = self.reactor.seconds()
        next_check = timeout
        if not self.streams:
            idle = now - self._last_activity
            if idle >= timeout:
                self.go_away(ErrorCodes.NO_ERROR, f"no stream for {timeout:g}s")
                return
            next_check = timeout - idle
        for request in list(self.streams.values()):
            if not request.waiting_on_client:
                continue
            stalled = now - request.last_progress
            if stalled >= timeout:
                self.reset(request, ErrorCodes.CANCEL, f"no progress from the client on this stream for {timeout:g}s")
            else:
                next_check = min(next_check, timeout - stalled)
        if not self.closed:
            self._idle_timer = self.reactor.callLater(next_check, self._idle_check)

    # --- input ----------------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.closed:
            return
        too_long = self._frame_headers.too_long(data, self.conn.max_inbound_frame_size)
        if too_long is not None:
            self.go_away(ErrorCodes.FRAME_SIZE_ERROR, f"a frame of {too_long} bytes, over SETTINGS_MAX_FRAME_SIZE {self.conn.max_inbound_frame_size}")
            return
        try:
            events = self.conn.receive_data(data)
        except ProtocolError as e:
            # h2 has prepared a GOAWAY with the error's code; nothing after the bad frame is read
            log.info("HTTP/2 protocol error from {peer}: {error}; GOAWAY", peer=self._peer(), error=str(e) or e.__class__.__name__)
            self._close()
            return
        for event in events:
            if self.closed:
                return
            self._event(event)
        self.flush()

    def _event(self, event: Any) -> None:
        if isinstance(event, RequestReceived):
            self._request_received(event)
        elif isinstance(event, DataReceived):
            self._data_received(event)
        elif isinstance(event, StreamEnded):
            request = self.streams.get(event.stream_id)
            if request is not None:
                request.client_ended = True
                if request.body is not None:
                    request.body.finish()
                if request.ended:
                    self._done(request)
        elif isinstance(event, StreamReset):
            self._stream_reset(event)
        elif isinstance(event, WindowUpdated):
            if event.stream_id:
                request = self.streams.get(event.stream_id)
                if request is not None:
                    self.pump(request)
            else:
                for request in list(self.streams.values()):
                    self.pump(request)
        elif isinstance(event, RemoteSettingsChanged):
            self._control_frame()
            for request in list(self.streams.values()):  # a new SETTINGS_INITIAL_WINDOW_SIZE opens every stream's window
                self.pump(request)
        elif isinstance(event, PriorityUpdated):
            if event is not self._headers_priority:  # a PRIORITY frame of its own, not the priority a HEADERS frame carried
                self._control_frame()
        elif isinstance(event, PingReceived):
            self._control_frame()
        elif isinstance(event, TrailersReceived):
            log.debug("dropped the request trailers of stream {stream}", stream=event.stream_id)  # as the HTTP/1.1 engine does
        elif isinstance(event, ConnectionTerminated):
            log.debug("GOAWAY from {peer}: {code}", peer=self._peer(), code=event.error_code)
            self.draining = True
            if event.error_code or not self.streams:
                self._close()

    def _control_frame(self) -> None:
        now = self.reactor.seconds()
        if now - self._flood_window_start > FLOOD_WINDOW:
            self._flood_window_start = now
            self._control_frames = 0
        self._control_frames += 1
        if self._control_frames > CONTROL_FRAME_BUDGET:
            self.go_away(ErrorCodes.ENHANCE_YOUR_CALM, f"more than {CONTROL_FRAME_BUDGET} control frames in {FLOOD_WINDOW:g}s")

    def _refuse_stream(self, stream_id: int, why: str) -> None:
        log.debug("refused stream {stream} from {peer}: {why}", stream=stream_id, peer=self._peer(), why=why)
        try:
            self.conn.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
        except ProtocolError:
            pass
        self._premature()

    def _premature(self) -> None:
        """A stream reset (or refused) before its response ended: the rapid-reset count (CVE-2023-44487)."""
        self._premature_resets += 1
        if self._premature_resets >= RESET_BUDGET and 2 * self._premature_resets >= self._opened:
            self.go_away(ErrorCodes.ENHANCE_YOUR_CALM, f"{self._premature_resets} of {self._opened} streams reset before their response")

    def _request_received(self, event: RequestReceived) -> None:
        stream_id = event.stream_id
        self._last_activity = self.reactor.seconds()
        self._headers_priority = event.priority_updated  # h2 lists it as an event of its own next
        self._opened += 1
        if self.draining:
            self._refuse_stream(stream_id, "the connection is closing")
            return
        if len(self.streams) >= self.max_streams:
            self._refuse_stream(stream_id, f"more than {self.max_streams} concurrent streams")
            return
        pseudo: dict[bytes, bytes] = {}
        headers = Headers()
        size = count = 0
        problem: tuple[int, str] | None = None
        for name, value in event.headers:
            size += len(name) + len(value) + 32  # RFC 9113 6.5.2's measure
            if name[:1] == b":":
                pseudo[name] = value
                continue
            count += 1
            why = header_field_problem(name, value)
            if why is not None:
                problem = problem or (400, why)
                continue  # never into Headers (which refuses such names itself) nor anywhere else
            headers.addRawHeader(name, value)
        if problem is None and len(headers.getRawHeaders(b"content-length", ())) > 1:
            problem = (400, "more than one Content-Length")
        if size > self.limits.max_header_size:
            problem = (431, f"header list larger than {self.limits.max_header_size} bytes")
        elif count > self.limits.max_header_count:
            problem = (431, f"more than {self.limits.max_header_count} header fields")
        authority = pseudo.get(b":authority")
        if authority is not None and not headers.hasHeader(b"host"):
            headers.setRawHeaders(b"host", [authority])  # h2 has refused a Host that differs from :authority
        method = pseudo.get(b":method", b"")
        why = method_problem(method)
        if why is not None:  # as the HTTP/1.1 engine refuses it, before the proxy (an upstream client would only fail it as a 502)
            problem = problem or (400, why)
        uri = pseudo.get(b":path") or (authority or b"")  # CONNECT has no :path
        has_body = event.stream_ended is None
        expect = headers.getRawHeaders(b"expect")
        expects_continue = bool(expect) and expect[0].lower() == b"100-continue" and has_body  # type: ignore[index]
        request = H2Request(self, stream_id, method, uri, headers, has_body, expects_continue)
        self.streams[stream_id] = request
        self._last_stream = stream_id
        if problem is not None:
            code, why = problem
            log.info("refused a request from {peer} with {code}: {reason}", peer=self._peer(), code=code, reason=why)
            body = _refusal_body(code, why)
            request.setResponseCode(code)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            request.setHeader(b"content-length", b"%d" % len(body))
            request.write(body)
            request.finish()
            return
        try:
            self.handler(request)
        except Exception:
            log.failure("the handler failed on {method} {uri}", method=method, uri=uri)
            if not request.startedWriting and not request.finished and not request.disconnected:
                self.reset(request, ErrorCodes.INTERNAL_ERROR, "internal error")

    def _data_received(self, event: DataReceived) -> None:
        request = self.streams.get(event.stream_id)
        size = event.flow_controlled_length
        if not event.data and not event.stream_ended:
            self._control_frame()  # an empty DATA frame without END_STREAM does nothing but cost
        if request is None or request.body is None or request.discard_body or request.disconnected:
            self._ack_bytes(event.stream_id, size)
            return
        request.progress()
        request.unacked += size
        request.body.write(event.data)
        if not request.reading_paused:
            self.ack(request)

    def _stream_reset(self, event: StreamReset) -> None:
        request = self.streams.pop(event.stream_id, None)
        self._last_activity = self.reactor.seconds()
        if request is None:
            self._control_frame()  # RST_STREAM for a stream already done: nothing to stop, only a cost
            return
        if not request.ended:
            self._premature()
        request.connection_lost(Failure(ConnectionLostBeforeResponse(f"stream reset by the client ({event.error_code!s})")))
        self._ack_bytes(event.stream_id, request.unacked)
        request.unacked = 0
        self._maybe_finish_draining()

    # --- flow control ---------------------------------------------------------------------------

    def _ack_bytes(self, stream_id: int, size: int) -> None:
        if size:
            try:
                self.conn.acknowledge_received_data(size, stream_id)
            except (ProtocolError, ValueError):
                pass

    def ack(self, request: H2Request) -> None:
        """Hand the stream's received bytes back to the client's window."""
        size, request.unacked = request.unacked, 0
        self._ack_bytes(request.stream_id, size)

    def send_headers(self, request: H2Request, fields: list[tuple[bytes, bytes]], end_stream: bool) -> None:
        if request.ended or self.closed:
            return
        try:
            self.conn.send_headers(request.stream_id, fields, end_stream=end_stream)
            request.progress()
        except ProtocolError as e:
            log.warn("could not send the response head of stream {stream}: {error}", stream=request.stream_id, error=str(e))
            self.reset(request, ErrorCodes.INTERNAL_ERROR, "bad response head")
            return
        if end_stream:
            self._ended(request)
        self.flush()

    def pump(self, request: H2Request) -> None:
        """Send what the stream's window allows; pause its producer while too much waits; end the stream once all is out."""
        if request.ended or self.closed:
            return
        conn = self.conn
        stream_id = request.stream_id
        try:
            while request.out:
                room = min(conn.local_flow_control_window(stream_id), conn.max_outbound_frame_size)
                if room <= 0:
                    break
                chunk = request.out[0]
                if len(chunk) <= room:
                    request.out.popleft()
                else:
                    request.out[0] = chunk[room:]
                    chunk = chunk[:room]
                request.out_size -= len(chunk)
                conn.send_data(stream_id, bytes(chunk) if isinstance(chunk, bytearray) else chunk)
                request.progress()
            if not request.out and request.end_pending:
                request.end_pending = False
                trailers = request.end_with_trailers()
                if trailers:
                    conn.send_headers(stream_id, trailers, end_stream=True)
                else:
                    conn.end_stream(stream_id)
                self._ended(request)
        except ProtocolError as e:
            log.info("stream {stream} of {peer} ended while sending: {error}", stream=stream_id, peer=self._peer(), error=str(e))
            self.reset(request, ErrorCodes.INTERNAL_ERROR, "send failed")
            return
        if request.out_size > _OUT_HIGH_WATER or self.write_paused:
            request.pause_producer()
        else:
            request.resume_producer()
        self.flush()

    def _ended(self, request: H2Request) -> None:
        """END_STREAM is out: done with the stream once the client's side is done too (or at once, resetting a body not wanted)."""
        request.ended = True
        if request.body is not None and not request.client_ended:
            try:
                self.conn.reset_stream(request.stream_id, ErrorCodes.NO_ERROR)
            except ProtocolError:
                pass
            request.client_ended = True
        if request.client_ended:
            self._done(request)

    def _done(self, request: H2Request) -> None:
        if self.streams.get(request.stream_id) is request:
            del self.streams[request.stream_id]
            self._last_activity = self.reactor.seconds()
        self._ack_bytes(request.stream_id, request.unacked)
        request.unacked = 0
        self._maybe_finish_draining()

    def reset(self, request: H2Request, code: ErrorCodes, why: str) -> None:
        """RST_STREAM: the client sees the stream fail, never a cut-off response as complete."""
        if not request.ended and not self.closed:
            log.info("reset stream {stream} of {peer} ({code}): {why}", stream=request.stream_id, peer=self._peer(), code=code.name, why=why)
            try:
                self.conn.reset_stream(request.stream_id, code)
            except ProtocolError:
                pass
        if self.streams.pop(request.stream_id, None) is not None:
            self._last_activity = self.reactor.seconds()
        self._ack_bytes(request.stream_id, request.unacked)
        request.unacked = 0
        request.connection_lost(Failure(ConnectionLostBeforeResponse(why)))
        self.flush()
        self._maybe_finish_draining()

    def _maybe_finish_draining(self) -> None:
        if self.draining and not self.streams and not self.closed:
            self.go_away(ErrorCodes.NO_ERROR, "drained")


class H2ServerFactory(Factory):
    """Builds L{H2ServerProtocol}s for C{handler}, and keeps the open ones for L{drain}."""

    noisy = False

    def __init__(self, handler: Callable[[Any], None], limits: Limits, reactor: IReactorTime, max_streams: int = MAX_CONCURRENT_STREAMS) -> None:
        self.handler = handler
        self.limits = limits
        self.reactor = reactor
        self.max_streams = max_streams
        self.protocols: set[H2ServerProtocol] = set()

    def buildProtocol(self, addr: Any) -> H2ServerProtocol:  # type: ignore[override]
        protocol = H2ServerProtocol(self.handler, self.limits, self.reactor, self.max_streams)
        protocol.factory = self
        return protocol

    def drain(self) -> None:
        """Every open connection: GOAWAY, finish the streams in flight, close."""
        for protocol in list(self.protocols):
            protocol.drain()
