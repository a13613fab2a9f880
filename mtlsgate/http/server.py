"""
The gateway's HTTP/1.1 server protocol, on llhttp (httptools), in place of twisted.web's HTTPChannel,
Request and Site.

One request at a time per connection: a request's head is checked line by line against the rules of
docs/security.md (L{mtlsgate.http.framing}) as its bytes arrive, then parsed by llhttp, and the
request is handed to the handler as soon as its head is in, with its body (if any) streaming behind
it as a L{RequestBody}.  llhttp is only ever given the bytes of the current request: bytes after it
(pipelined requests) wait in a buffer, with reading paused, until the response is done.

States: HEAD (reading a head; the header timer runs from its first byte), BODY (a request in flight
whose body is still arriving), WAIT (a request in flight, its body complete), TUNNEL (after
L{Request.upgrade}: every byte goes to the tunnel's protocol, the HTTP timers are off), and closing (the
connection closes once the response is written; further input is discarded).
"""

from __future__ import annotations

from typing import Any, Callable

from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser
from mypy_extensions import mypyc_attr
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IProtocol, IPushProducer, IReactorTime, ISSLTransport, ITCPTransport
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from zope.interface import classImplements

from mtlsgate.config.model import Limits
from mtlsgate.http.body import RequestBody
from mtlsgate.http.framing import HeadScan, Refusal, framing_value_problem, scan_head
from mtlsgate.http.headers import connection_tokens, sendable_trailers
from mtlsgate.http.interfaces import IGatewayChannel, IUpgradableRequest
from mtlsgate.http.linger import Linger
from mtlsgate.http.status import RESPONSES, http_date
from mtlsgate.http.timer import ReusableTimer

log = Logger(namespace="mtlsgate.proxy.exchange")

_STATUS_TEXT = {
    400: b"Bad Request", 408: b"Request Timeout", 414: b"URI Too Long", 431: b"Request Header Fields Too Large", 500: b"Internal Server Error",
}  # fmt: skip
_NO_BODY_CODES = frozenset([204, 304])
_ABORT_TIMEOUT = 15.0  # a close not written out (the client reads nothing) is aborted this long after idle_timeout passes
_CANONICAL_REQUEST_LINE = b"GET / HTTP/1.1\r\n"  # what llhttp is given instead of the (already checked) request line

# The response fields a Request keeps without a Headers (Request._fields; HSTS is on by default), lowercased, with each name as Headers writes it
# (tests/unit/test_server_fields.py holds the spelling to Headers' own); any other field set builds the Headers.
_FIELD_NAMES = {
    b"date": b"Date", b"content-length": b"Content-Length", b"server": b"Server", b"connection": b"Connection",
    b"transfer-encoding": b"Transfer-Encoding", b"strict-transport-security": b"Strict-Transport-Security",
}  # fmt: skip

# The lengths of the names on_header notes (Host, Expect, Connection, Content-Length, Transfer-Encoding): a name of another length is none of them.
_NOTED_LENGTHS = frozenset(len(name) for name in (b"host", b"expect", b"connection", b"content-length", b"transfer-encoding"))

_HEAD, _BODY, _WAIT, _TUNNEL = 0, 1, 2, 3
_PIPELINE, _UPLOAD = 1, 2  # why reading from the client is paused


class _DateCache:
    """The Date header value, formatted once per second."""

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def value(self, now: float) -> bytes:
        second = int(now)
        if second != self._second:
            self._second = second
            self._value = http_date(second)
        return self._value


_dates = _DateCache()


@mypyc_attr(allow_interpreted_subclasses=True)  # the HTTP/2 front end's H2Request is one (not compiled)
class ResponseHooks:
    """
    What an HTTP/1.1 L{Request} and an HTTP/2 stream's request share: the path, setting a response field, and the
    completion hooks (notifyFinish, when_done) told once when the response is finished or the connection lost first.
    The class keeps C{uri}, C{responseHeaders}, C{finished}, C{disconnected} and C{_notify}; C{_hook_log} logs a hook that fails.
    """

    uri: bytes
    responseHeaders: Headers
    finished: bool
    disconnected: bool
    _notify: list[Callable[[Failure | None], None]]
    _hook_log = log
    __slots__ = ("_notify",)  # with the HTTP/1.1 Request's own, a dict-less object

    @property
    def path(self) -> bytes:
        return self.uri.split(b"?", 1)[0]

    def setHeader(self, name: bytes, value: bytes) -> None:
        self.responseHeaders.setRawHeaders(name, [value])

    def notifyFinish(self) -> defer.Deferred[None]:
        """Fires when the response is finished; fails if the connection is lost first."""
        d: defer.Deferred[None] = defer.Deferred()
        self.when_done(lambda reason: d.callback(None) if reason is None else d.errback(reason))
        return d

    def when_done(self, hook: Callable[[Failure | None], None]) -> None:
        """
        Call C{hook(None)} when the response is finished, or C{hook(reason)} if the connection is lost first:
        notifyFinish without a Deferred, for the proxy's own per-request bookkeeping.
        """
        if self.finished:
            hook(None)
        elif self.disconnected:
            hook(Failure(ConnectionLostBeforeResponse()))
        else:
            self._notify.append(hook)

    def _tell(self, reason: Failure | None) -> None:
        notify, self._notify = self._notify, []
        for hook in notify:
            try:
                hook(reason)
            except Exception:
                self._hook_log.failure("a request's completion hook failed")


class Request(ResponseHooks):
    """
    One request and its response, as the gateway's handler sees it: the parts of twisted.web's Request
    the proxy uses (method, uri, clientproto, requestHeaders, responseHeaders, setResponseCode, setHeader,
    write, finish, notifyFinish, registerProducer), and nothing else (L{IGatewayRequest}), plus switching protocols (L{IUpgradableRequest}).
    """

    # One is made per request: slots make it smaller and its attributes quicker to set and read.
    __slots__ = (
        "channel", "method", "uri", "clientproto", "raw_headers", "_request_headers", "host_values", "connection_values", "connection_tokens",
        "forwarded_headers", "body", "persistent", "http10_keepalive", "expects_continue", "upgrade_to", "code", "code_message",
        "_fields", "_response_headers", "startedWriting", "finished", "disconnected", "_chunked", "_no_body", "_trailers",
        "__weakref__",
    )  # fmt: skip

    def __init__(
        self, channel: HTTPServerProtocol, method: bytes, uri: bytes, version: bytes, headers: Headers | list[tuple[bytes, bytes]],
        body: RequestBody | None, persistent: bool, http10_keepalive: bool, expects_continue: bool,
    ) -> None:  # fmt: skip
        self.channel = channel
        self.method = method
        self.uri = uri
        self.clientproto = version
        # The header fields as received, (name, value) in order (Expect taken by the gateway left out); requestHeaders, a
        # twisted Headers, is built from them only when asked for.  None when the request was given a Headers.
        self.raw_headers: list[tuple[bytes, bytes]] | None = None
        self._request_headers: Headers | None = None
        if isinstance(headers, Headers):
            self._request_headers = headers
        else:
            self.raw_headers = headers
        self.host_values: list[bytes] | None = None  # the Host values as received, when the server noted them
        self.connection_values: list[bytes] | None = None  # the Connection values, likewise
        self.connection_tokens: set[bytes] | None = None  # ... and their tokens, lowercased, when the server noted them
        self.forwarded_headers = b""  # response fields written as they are (head lines), after responseHeaders' own
        self.body = body
        self.persistent = persistent  # the connection stays open after this response
        self.http10_keepalive = http10_keepalive
        self.expects_continue = expects_continue  # the client sent "Expect: 100-continue" and waits for 100 before its body
        self.upgrade_to: tuple[bytes, ...] = ()  # the protocols (lower case) of an HTTP/1.1 upgrade request's Upgrade header
        self.code = 200
        self.code_message = b"OK"
        # The response's fields: while they are only ones of _FIELD_NAMES (the Date, Content-Length, Server, Connection,
        # Transfer-Encoding the gateway sets), a dict of lowercased name to (name as Headers writes it, value), in the
        # order set; responseHeaders, a twisted Headers, is built from them when asked for, and from then on holds them.
        self._fields: dict[bytes, tuple[bytes, bytes]] | None = {b"date": (b"Date", _dates.value(channel.reactor.seconds()))}
        self._response_headers: Headers | None = None
        self.startedWriting = False
        self.finished = False
        self.disconnected = False
        self._chunked = False
        self._no_body = False
        self._trailers: list[tuple[bytes, bytes]] = []
        self._notify: list[Callable[[Failure | None], None]] = []  # when_done hooks and notifyFinish Deferreds, in order

    @property
    def responseHeaders(self) -> Headers:
        headers = self._response_headers
        if headers is None:
            headers = self._response_headers = Headers()
            for name, value in (self._fields or {}).values():
                headers.setRawHeaders(name, [value])
            self._fields = None
        return headers

    @responseHeaders.setter
    def responseHeaders(self, headers: Headers) -> None:
        self._response_headers = headers
        self._fields = None

    def setHeader(self, name: bytes, value: bytes) -> None:
        fields = self._fields
        if fields is not None:
            written = _FIELD_NAMES.get(name)
            if written is not None and 0x0D not in value and 0x0A not in value:  # CR, LF: as ints, quicker than b"\r" in
                fields[name] = (written, value)  # as Headers.setRawHeaders: a field set again keeps its place
                return
        self.responseHeaders.setRawHeaders(name, [value])

    def _has_field(self, name: bytes) -> bool:
        """C{name} (lowercased, one of _FIELD_NAMES) is among the response's fields (forwarded ones aside)."""
        fields = self._fields
        return name in fields if fields is not None else self.responseHeaders.hasHeader(name)

    @property
    def requestHeaders(self) -> Headers:
        headers = self._request_headers
        if headers is None:
            headers = self._request_headers = Headers()
            for name, value in self.raw_headers or ():
                headers.addRawHeader(name, value)
            self.raw_headers = None  # from now on the Headers is the request's fields: whatever changes it counts
        return headers

    @requestHeaders.setter
    def requestHeaders(self, headers: Headers) -> None:
        self._request_headers = headers
        self.raw_headers = None

    def getHeader(self, name: bytes) -> bytes | None:
        pairs = self.raw_headers
        if pairs is not None:
            name = name.lower()
            for n, v in reversed(pairs):
                if n.lower() == name:
                    return v
            return None
        values = self.requestHeaders.getRawHeaders(name)
        return values[-1] if values else None

    def forward_headers(self, block: bytes, names: set[bytes]) -> None:
        """
        Response fields to write as they are (an upstream's, already filtered and written as head lines, C{b"Name:
        value\\r\\n"} each: L{mtlsgate.http.headers.client_response_block}), C{names} their lowercased names: each
        replaces the field of that name set on responseHeaders so far (the Date, say), as setting them there one by one would.
        """
        fields = self._fields
        if fields is not None:
            for name in [name for name in fields if name in names]:
                del fields[name]
        else:
            headers = self.responseHeaders
            for name, _ in list(headers.getAllRawHeaders()):
                if name.lower() in names:
                    headers.removeHeader(name)
        self.forwarded_headers = block

    def getClientAddress(self) -> Any:
        """The client's address (an IPv4Address or IPv6Address: the gateway listens on TCP only)."""
        return self.channel.peer_address

    def isSecure(self) -> bool:
        return self.channel.secure

    def setResponseCode(self, code: int, message: bytes | None = None) -> None:
        self.code = code
        self.code_message = message if message is not None else RESPONSES.get(code, b"Unknown Status")

    def proceed(self) -> None:
        """The request goes upstream: if the client waits for "100 Continue" to send its body, send it now."""
        if self.expects_continue and self.body is not None and not self.startedWriting and not self.disconnected:
            self.expects_continue = False
            self.channel.write_raw(b"HTTP/1.1 100 Continue\r\n\r\n")

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.channel.transport.registerProducer(producer, streaming)  # type: ignore[union-attr]

    def unregisterProducer(self) -> None:
        self.channel.transport.unregisterProducer()  # type: ignore[union-attr]

    def write(self, data: bytes) -> None:
        if self.finished:
            raise RuntimeError("write after finish")
        if self.disconnected:
            return
        if not self.startedWriting:
            self._write_head(data)
        elif data and not self._no_body:
            if self._chunked:
                self.channel.write_sequence([b"%x\r\n" % len(data), data, b"\r\n"])
            else:
                self.channel.write_raw(data)

    def _write_head(self, data: bytes) -> None:
        """The status line and headers, and the first body bytes with them, in one writeSequence."""
        self.startedWriting = True
        self._no_body = self.method == b"HEAD" or self.code in _NO_BODY_CODES or self.code < 200
        has_length = self._has_field(b"content-length")  # never among forwarded_headers: framing is the proxy's
        if self.http10_keepalive:
            if has_length and self.persistent:
                self.setHeader(b"connection", b"keep-alive")
            else:
                self.persistent = False  # the body will end when the connection does
        elif not has_length and not self._no_body:
            if self.clientproto == b"HTTP/1.1":
                self.setHeader(b"transfer-encoding", b"chunked")
                self._chunked = True
            else:
                self.persistent = False
        parts = [b"%s %d %s\r\n" % (self.clientproto, self.code, self.code_message)]
        fields = self._fields
        if fields is not None:
            for name, value in fields.values():
                parts.append(b"%s: %s\r\n" % (name, value))
        else:
            for name, values in self.responseHeaders.getAllRawHeaders():
                for value in values:
                    parts.append(b"%s: %s\r\n" % (name, value))
        parts.append(self.forwarded_headers + b"\r\n")
        if data and not self._no_body:
            parts += [b"%x\r\n" % len(data), data, b"\r\n"] if self._chunked else [data]
        self.channel.write_sequence(parts)

    def write_trailers(self, pairs: list[tuple[bytes, bytes]]) -> None:
        """
        Trailer fields, sent in the last chunk of a chunked response when the client said it accepts
        them (C{TE: trailers}, RFC 9110 10.1.4); dropped otherwise (a response with a Content-Length,
        an HTTP/1.0 client, a client that did not ask).
        """
        if self._accepts_trailers():
            self._trailers = sendable_trailers(pairs)

    def _accepts_trailers(self) -> bool:
        for value in self.requestHeaders.getRawHeaders(b"te", ()):
            if any(t.split(b";", 1)[0].strip().lower() == b"trailers" for t in value.split(b",")):
                return True
        return False

    def upgrade(self, protocol: IProtocol) -> None:
        """
        Switch protocols: write a C{101} head (C{responseHeaders}, set by the caller, with C{Upgrade} and
        C{Connection}) and hand the connection to C{protocol}, which gets the transport, then the bytes
        the client sent after this request's head, then everything else.  The request counts as finished.
        """
        if self.startedWriting or self.finished or self.disconnected:
            raise RuntimeError("upgrade after the response started, or after the connection was lost")
        self.startedWriting = True
        self.code, self.code_message = 101, b"Switching Protocols"
        parts = [b"HTTP/1.1 101 Switching Protocols\r\n"]
        for name, values in self.responseHeaders.getAllRawHeaders():
            for value in values:
                parts.append(b"%s: %s\r\n" % (name, value))
        parts.append(b"\r\n")
        self.channel.write_sequence(parts)
        self.finished = True
        self._tell(None)
        self.channel.switch(self, protocol)

    def finish(self) -> None:
        if self.disconnected:
            raise RuntimeError("finish after the connection was lost; use notifyFinish")
        if self.finished:
            return
        if self.body is not None and not self.body.complete:
            # The response ends before the request body did: stop reading, close afterwards.
            self.channel.stop_parsing()
            self.persistent = False
            if not self.startedWriting:
                self.setHeader(b"connection", b"close")
        if not self.startedWriting:
            self.write(b"")
        if self._chunked:
            if self._trailers:
                self.channel.write_sequence([b"0\r\n", *(b"%s: %s\r\n" % pair for pair in self._trailers), b"\r\n"])
            else:
                self.channel.write_raw(b"0\r\n\r\n")
        self.finished = True
        self._tell(None)
        self.channel.request_done(self)

    def connection_lost(self, reason: Failure) -> None:
        """The client went away before the response was finished."""
        if self.disconnected or self.finished:
            return
        self.disconnected = True
        self._tell(reason)


classImplements(Request, IUpgradableRequest)


class ConnectionLostBeforeResponse(Exception):
    """The client's connection closed before the response was finished."""


class _UploadReading:
    """The client connection as a request body's network producer: pausing it pauses reading for the upload."""

    def __init__(self, channel: HTTPServerProtocol) -> None:
        self._channel = channel

    def pauseProducing(self) -> None:
        self._channel.pause_reading(_UPLOAD)

    def resumeProducing(self) -> None:
        self._channel.resume_reading(_UPLOAD)

    def stopProducing(self) -> None:
        pass


classImplements(_UploadReading, IPushProducer)


class HTTPServerProtocol(Protocol):
    """One client connection: requests parsed one at a time, each handed to C{handler} at the end of its head."""

    factory: HTTPServerFactory
    # The fields of the head being parsed, as received, and the Host, Connection and Expect values among them: made by _begin
    # for each head (not per connection: an idle connection holds none of them).
    _pairs: list[tuple[bytes, bytes]]
    _hosts: list[bytes]
    _connection: list[bytes]
    _expect: list[bytes]

    def __init__(self, handler: Callable[[Request], None], limits: Limits, reactor: IReactorTime) -> None:
        self.handler = handler
        self.limits = limits
        self.reactor = reactor
        self.peer_address: Any = None
        self.secure = False
        self._buf = b""
        self._state = _HEAD
        self._closing = False  # no more requests: input is discarded, the connection closes after the response
        self._processing = False
        self._pauses = 0
        self._scan = HeadScan()
        self._request: Request | None = None
        self._parser: Any = None
        self._remaining: int | None = None  # Content-Length bytes still to come; None for a chunked body
        self._tail = b""  # the last bytes of chunked body data given to llhttp, to find CRLFCRLF split across reads
        self._header_timer: IDelayedCall | None = None
        self._idle_timer: IDelayedCall | None = None
        self._abort_timer: Linger | None = None  # the close, once the gateway closes (mtlsgate.http.linger)
        self._last_activity = 0.0
        self._upload = _UploadReading(self)
        # the head being parsed by llhttp (set by the callbacks; the field lists are made by _begin, for each head)
        self._head_done = False
        self._message_done = False
        self._parser_reusable = False  # llhttp's parser may go on to the next request (see _begin)
        self._content_length: int | None = None
        self._chunked = False
        self._problem: str | None = None
        self._tunnel: IProtocol | None = None  # in TUNNEL state, the protocol every byte goes to
        self._request_timer: ReusableTimer | None = None  # see request_timer

    # --- the connection -------------------------------------------------------------------------

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.peer_address = self.transport.getPeer()
        self.secure = ISSLTransport.providedBy(self.transport)
        if ITCPTransport.providedBy(self.transport):
            self.transport.setTcpNoDelay(True)  # responses are written whole: Nagle would only hold back their last segment
        self._last_activity = self.reactor.seconds()
        if self.limits.idle_timeout:
            self._idle_timer = self.reactor.callLater(self.limits.idle_timeout, self._idle_check)

    def request_timer(self) -> ReusableTimer:
        """
        The connection's timer for its requests' handler, one request after the other (the proxy's route and stall
        timer): one timer moved on per request rather than one made and cancelled per request; stopped when the
        connection closes.
        """
        timer = self._request_timer
        if timer is None:
            timer = self._request_timer = ReusableTimer(self.reactor)
        return timer

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closing = True
        for timer in (self._header_timer, self._idle_timer):
            if timer is not None and timer.active():
                timer.cancel()
        if self._abort_timer is not None:
            self._abort_timer.cancel()
        self._header_timer = self._idle_timer = self._abort_timer = None
        request, self._request = self._request, None
        if request is not None:
            request.connection_lost(reason)
        if self._request_timer is not None:
            self._request_timer.stop()
        if self._tunnel is not None:
            self._tunnel.connectionLost(reason)

    def dataReceived(self, data: bytes) -> None:
        if self._tunnel is not None:
            self._tunnel.dataReceived(data)
            return
        self._last_activity = self.reactor.seconds()
        if self._closing:
            return
        self._buf = self._buf + data if self._buf else data
        self._consume()

    def write_raw(self, data: bytes) -> None:
        self._last_activity = self.reactor.seconds()
        assert self.transport is not None
        self.transport.write(data)

    def write_sequence(self, parts: list[bytes]) -> None:
        self._last_activity = self.reactor.seconds()
        assert self.transport is not None
        self.transport.writeSequence(parts)

    def pause_reading(self, why: int) -> None:
        if not self._pauses and self.transport is not None:
            self.transport.pauseProducing()  # type: ignore[attr-defined]
        self._pauses |= why

    def resume_reading(self, why: int) -> None:
        if self._pauses & why:
            self._pauses &= ~why
            if not self._pauses and self.transport is not None:
                self.transport.resumeProducing()  # type: ignore[attr-defined]

    def stop_parsing(self) -> None:
        """Ignore the rest of the client's input; the connection closes once the response is done."""
        self._closing = True
        self._buf = b""
        self.resume_reading(_PIPELINE | _UPLOAD)  # let the client's bytes drain into the void

    def abort(self) -> None:
        """Cut the client off (a response the upstream broke off after its status line went out)."""
        self.stop_parsing()
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def switch(self, request: Request, protocol: IProtocol) -> None:
        """
        TUNNEL: the connection leaves HTTP for C{protocol} (L{Request.upgrade}).  The HTTP timers stop (the
        tunnel keeps its own), reading resumes, and the bytes buffered behind the request's head go first.
        """
        if request is not self._request or self.transport is None:
            raise RuntimeError("only the request in flight can switch its connection")
        self._request = None
        self._state = _TUNNEL
        self._tunnel = protocol
        for timer in (self._header_timer, self._idle_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._header_timer = self._idle_timer = None
        leftover, self._buf = self._buf, b""
        if self._pauses:
            self._pauses = 0
            self.transport.resumeProducing()  # type: ignore[attr-defined]
        protocol.makeConnection(self.transport)
        if leftover:
            protocol.dataReceived(leftover)

    def _close(self) -> None:
        """
        The gateway ends the connection: close_notify after what is written, then a short linger for the client's
        answer (L{Linger}, the connection's one timer from now on, in place of the idle timer; a client that reads
        nothing is aborted once idle_timeout and _ABORT_TIMEOUT have passed since the last byte either way).
        """
        self._closing = True
        self.resume_reading(_PIPELINE | _UPLOAD)  # the client's close_notify or FIN is read, whatever it sent before
        if self.transport is not None:
            self.transport.loseConnection()
            if self._abort_timer is None and getattr(self.transport, "connected", True):
                if self._idle_timer is not None and self._idle_timer.active():
                    self._idle_timer.cancel()
                self._idle_timer = None
                idle = self.limits.idle_timeout
                give_up_at = self._last_activity + idle + _ABORT_TIMEOUT if idle else None
                self._abort_timer = Linger(self.reactor, self.transport, give_up_at)

    # --- timers ---------------------------------------------------------------------------------

    def _idle_check(self) -> None:
        self._idle_timer = None
        idle = self.reactor.seconds() - self._last_activity
        if idle < self.limits.idle_timeout:
            self._idle_timer = self.reactor.callLater(self.limits.idle_timeout - idle, self._idle_check)
            return
        log.info("closing the idle connection from {peer} ({timeout:g}s without a byte)",
                 peer=getattr(self.peer_address, "host", "-"), timeout=self.limits.idle_timeout)
        self._close()

    def _start_header_timer(self) -> None:
        if self._header_timer is None and self.limits.header_timeout:
            self._header_timer = self.reactor.callLater(self.limits.header_timeout, self._headers_too_slow)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            if self._header_timer.active():
                self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        self._refuse(Refusal(408, f"request headers not complete within {self.limits.header_timeout:g}s"))

    # --- input ----------------------------------------------------------------------------------

    def _consume(self) -> None:
        """Work through the buffered input as far as the state allows (re-entered calls leave it to the outer loop)."""
        if self._processing:
            return
        self._processing = True
        try:
            while self._buf and not self._closing:
                if self._state == _HEAD:
                    if not self._next_head():
                        break
                elif self._state == _BODY:
                    data, self._buf = self._buf, b""
                    self._buf = self._feed_body(data)
                else:  # a request in flight: what follows waits, and so does the socket
                    self.pause_reading(_PIPELINE)
                    break
        finally:
            self._processing = False

    def _refuse(self, refusal: Refusal) -> None:
        """Answer a malformed or abusive request ourselves and close: nothing goes upstream."""
        self._cancel_header_timer()
        code, reason = refusal
        log.info("refused a request from {peer} with {code}: {reason}", peer=getattr(self.peer_address, "host", "-"), code=code, reason=reason)
        body = reason.encode("ascii", "replace") + b"\n"
        self.write_raw(
            b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (code, _STATUS_TEXT[code], len(body), body)
        )
        self.stop_parsing()
        self._close()

    def _next_head(self) -> bool:
        """
        Scan the buffered head; start the request when it is complete. False: wait for more bytes (or refused).
        The header timer is armed only when the head is not complete in the read that brought its first
        byte (it is armed in that same call, so it still counts from the first byte): a head that comes
        whole, the usual case, costs no timer.
        """
        buf = self._buf
        if buf[:1] == b"\r" and self._scan.offset == 0:
            while buf.startswith(b"\r\n"):  # empty lines before a request line are ignored (RFC 9112 2.2)
                buf = buf[2:]
            self._buf = buf
            if not buf or buf == b"\r":
                self._start_header_timer()
                return False
        result = scan_head(buf, self._scan, self.limits)
        if result is None:
            self._start_header_timer()
            return False
        if isinstance(result, Refusal):
            self._refuse(result)
            return False
        self._cancel_header_timer()
        line_end = self._scan.line_end
        self._scan = HeadScan()
        self._buf = buf[result:]
        self._begin(buf, line_end, result)
        return True

    def _begin(self, buf: bytes, line_end: int, head_end: int) -> None:
        """Parse the checked head with llhttp and hand the request to the handler."""
        method, target, version = buf[:line_end].split(b" ")
        # llhttp parses one message after another on a connection: the last request's parser goes on to this one when that
        # message came to its end as llhttp reads keep-alive (anything else closed the connection before a next head).
        # Keep-alive as llhttp read it at the end of the head (should_keep_alive() says True once a message is complete,
        # whatever its Connection said), and no trailer section since: llhttp reads a trailer's Connection: close too.
        parser = self._parser
        if parser is None or not self._message_done or not self._parser_reusable:
            parser = self._parser = HttpRequestParser(self)
        self._new_message()
        upgrade = False
        try:
            parser.feed_data(_CANONICAL_REQUEST_LINE)
            parser.feed_data(memoryview(buf)[line_end + 2 : head_end])
        except HttpParserUpgrade:
            upgrade = True
        except HttpParserError as e:
            self._problem = self._problem or f"malformed request: {e}"
        if self._problem is None and self._content_length is not None and self._chunked:
            self._problem = "both Content-Length and Transfer-Encoding"
        if self._problem is None and self._chunked and version == b"HTTP/1.0":
            # RFC 9112 6.1: faulty framing.  Go's net/http ignores Transfer-Encoding in HTTP/1.0 and nginx refuses it; llhttp
            # (given an HTTP/1.1 request line) would read a chunked body: one byte stream, two readings.
            self._problem = "Transfer-Encoding in an HTTP/1.0 request"
        if self._problem is None and upgrade and (self._chunked or self._content_length):
            self._problem = "a request asking for a protocol upgrade cannot carry a body"
        if self._problem is not None or not self._message_done and not self._head_done:
            self._refuse(Refusal(400, self._problem or "malformed request"))
            return
        self._dispatch(method, target, version)

    def _new_message(self) -> None:
        """
        What llhttp's callbacks note of one message, cleared before it is fed.  A method of its own: in the caller, the fields
        read after feed_data() are whatever the callbacks set, never the values given here (a type checker, and mypyc which
        compiles this module, would narrow them to these across the call).
        """
        self._pairs = []
        self._hosts = []
        self._connection = []
        self._expect = []
        self._head_done = self._message_done = self._chunked = False
        self._content_length = None
        self._problem = None
        self._tail = b""

    def _dispatch(self, method: bytes, target: bytes, version: bytes) -> None:
        pairs = self._pairs
        tokens = connection_tokens(self._connection) if self._connection else set()
        # "close" wins over "keep-alive" when a client sends both (as nginx reads them; llhttp too)
        http10_keepalive = version == b"HTTP/1.0" and b"keep-alive" in tokens and b"close" not in tokens
        persistent = http10_keepalive or (version == b"HTTP/1.1" and b"close" not in tokens)
        upgrade_to: tuple[bytes, ...] = ()
        if version == b"HTTP/1.1" and b"upgrade" in tokens:
            upgrade_to = tuple(t.strip().lower() for n, value in pairs if len(n) == 7 and n.lower() == b"upgrade" for t in value.split(b",") if t.strip())
            if upgrade_to:
                # Unless it is switched, a request asking to switch protocols is the last on its connection: the
                # bytes behind it are never read as a request (the client may have sent the new protocol's already).
                persistent = False
        expects_continue = False
        expect = self._expect
        if expect and expect[0].lower() == b"100-continue" and version == b"HTTP/1.1":
            # Answered with 100 only once the request may go upstream (Request.proceed); never forwarded.
            pairs = [(n, v) for n, v in pairs if not (len(n) == 6 and n.lower() == b"expect")]
            expects_continue = True
        body = None
        if self._chunked:
            body = RequestBody(self._upload, None)
        elif self._content_length:
            body = RequestBody(self._upload, self._content_length)
        self._remaining = None if self._chunked else self._content_length
        request = Request(self, method, target, version, pairs, body, persistent, http10_keepalive, expects_continue)
        request.host_values = self._hosts
        request.connection_values = self._connection
        request.connection_tokens = tokens
        request.upgrade_to = upgrade_to
        if version == b"HTTP/1.1" and not persistent:
            request.setHeader(b"connection", b"close")
        if body is not None and self._message_done:
            body.finish()  # a chunked body with no chunks
        self._state = _BODY if body is not None and not body.complete else _WAIT
        self._request = request
        try:
            self.handler(request)
        except Exception:
            log.failure("the handler failed on {method} {uri}", method=method, uri=target)
            if not request.startedWriting and not request.finished and not request.disconnected:
                self._request = None
                self._refuse(Refusal(500, "internal error"))
                request.connection_lost(Failure(ConnectionLostBeforeResponse("internal error")))
            else:
                self.abort()

    def _feed_body(self, data: bytes) -> bytes:
        """Give llhttp the current request's body bytes, and not one byte more: returns what follows the request."""
        if self._remaining is not None:
            n = self._remaining
            piece, rest = (data, b"") if len(data) <= n else (data[:n], data[n:])
            self._remaining = n - len(piece)
            self._feed(piece)
            return rest
        # chunked: a chunked message ends with CRLF CRLF (the last chunk's and the empty trailer line), so
        # it is fed up to each CRLFCRLF in turn and the rest held back once llhttp says the message is complete
        pos, size = 0, len(data)
        while pos < size and self._state == _BODY and not self._closing:
            end = -1
            tail = self._tail
            if tail:
                i = (tail + data[pos : pos + 3]).find(b"\r\n\r\n")
                if i != -1:
                    end = pos + i + 4 - len(tail)
            if end == -1:
                j = data.find(b"\r\n\r\n", pos)
                end = size if j == -1 else j + 4
            self._tail = (tail + data[max(pos, end - 3) : end])[-3:]
            self._feed(memoryview(data)[pos:end] if pos or end != size else data)
            pos = end
        return data[pos:] if pos < size and not self._closing else b""

    def _feed(self, data: Any) -> None:
        try:
            self._parser.feed_data(data)
        except HttpParserError as e:
            self._body_problem(f"malformed request body: {e}")
            return
        if self._problem is not None:
            self._body_problem(self._problem)

    def _body_problem(self, reason: str) -> None:
        """The body broke the framing after the request was handed on: a 400 if nothing was answered yet, else cut off."""
        request = self._request
        if request is not None and request.startedWriting:
            log.info("cut off {peer}: {reason}", peer=getattr(self.peer_address, "host", "-"), reason=reason)
            self.abort()
            return
        self._refuse(Refusal(400, reason))
        if request is not None:
            self._request = None
            request.connection_lost(Failure(ConnectionLostBeforeResponse(reason)))

    # --- llhttp's callbacks ---------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._head_done:
            self._parser_reusable = False  # a trailer field of a chunked body: not passed on (and llhttp may have read it)
            return
        value = value.strip(b" \t")
        if len(name) in _NOTED_LENGTHS:  # a name as long as one the server notes: lowercased once, and looked at
            lowered = name.lower()
            if lowered == b"host":
                self._hosts.append(value)
            elif lowered == b"connection":
                self._connection.append(value)
            elif lowered == b"expect":
                self._expect.append(value)
            elif lowered == b"content-length" or lowered == b"transfer-encoding":
                problem = framing_value_problem(name, value)
                if problem is not None:
                    self._problem = self._problem or problem
                elif lowered == b"content-length":
                    self._content_length = int(value)
                else:
                    self._chunked = True
        self._pairs.append((name, value))

    def on_headers_complete(self) -> None:
        self._head_done = True
        self._parser_reusable = self._parser.should_keep_alive()  # llhttp's reading of this head's Connection, while it holds

    def on_body(self, data: bytes) -> None:
        request = self._request
        if request is not None and request.body is not None:
            request.body.write(data)  # past the route's limit, dropped; the 413 stops parsing

    def on_message_complete(self) -> None:
        self._message_done = True
        request = self._request
        if request is not None and self._state == _BODY:
            self._state = _WAIT
            if request.body is not None:
                request.body.finish()

    # --- the end of a response ------------------------------------------------------------------

    def request_done(self, request: Request) -> None:
        """The response to C{request} is complete: close, or read the next request."""
        if request is not self._request:
            return
        self._request = None
        if not request.persistent or self._closing:
            self._close()
            return
        self._state = _HEAD
        self.resume_reading(_PIPELINE)
        self._consume()


classImplements(HTTPServerProtocol, IGatewayChannel)


class HTTPServerFactory(Factory):
    """Builds L{HTTPServerProtocol}s that hand each request to C{handler}."""

    noisy = False  # no "Starting factory" / "Stopping factory" lines in the log

    def __init__(self, handler: Callable[[Request], None], limits: Limits, reactor: IReactorTime) -> None:
        self.handler = handler
        self.limits = limits
        self.reactor = reactor

    def buildProtocol(self, addr: Any) -> HTTPServerProtocol:  # type: ignore[override]
        protocol = HTTPServerProtocol(self.handler, self.limits, self.reactor)
        protocol.factory = self
        return protocol
