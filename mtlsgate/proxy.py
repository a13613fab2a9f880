"""
The reverse proxy: an HTTP channel and request that start forwarding as soon as a request's headers
are in (so bodies stream with back-pressure instead of being spooled), and the resource that routes,
authorizes on the client certificate, and relays the exchange to an upstream.
"""

from __future__ import annotations

import re
from io import BytesIO
from typing import Any, Callable, cast

import attrs
from twisted.internet import defer
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IPushProducer, ITCPTransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from twisted.web.resource import Resource
from zope.interface import implementer

from mtlsgate.config import Limits, Route
from mtlsgate.headers import client_response_headers, upstream_request_headers
from mtlsgate.identity import AllowRules, Identity, printable, xfcc_element
from mtlsgate.metrics import GatewayMetrics
from mtlsgate.pathnorm import PathRefused, normalize_target
from mtlsgate.routing import RouteTable, normalize_host
from mtlsgate.tls import peer_verdict
from mtlsgate.upstream import UpstreamGroup

log = Logger(namespace="mtlsgate.proxy")
access_log = Logger(namespace="mtlsgate.access")

_HIGH_WATER = 256 * 1024
_LOW_WATER = 64 * 1024


# --- the peer's identity, once per connection -----------------------------------------------------


@attrs.frozen
class Peer:
    """What the TLS layer established about the client of one connection."""

    identity: Identity | None
    refusal: str | None  # why the presented certificate did not verify (policy enforcement)
    xfcc: bytes | None = None  # the identity as an X-Forwarded-Client-Cert value, built once per connection
    presented: str | None = None  # the subject of a certificate that did not verify: for log lines only, never for decisions

    @classmethod
    def verified(cls, identity: Identity) -> Peer:
        return cls(identity=identity, refusal=None, xfcc=xfcc_element(identity).encode("ascii"))

    @property
    def label(self) -> str:
        return self.identity.label() if self.identity else "-"


_ANONYMOUS = Peer(identity=None, refusal=None)


def peer_of(channel: Any) -> Peer:
    """The verified identity (or the refusal) of a channel's TLS peer, computed once per connection."""
    peer = getattr(channel, "_mtlsgate_peer", None)
    if peer is None:
        peer = _ANONYMOUS
        get_handle = getattr(channel.transport, "getHandle", None)
        connection = get_handle() if get_handle is not None else None
        if connection is not None and hasattr(connection, "get_peer_certificate"):
            verdict = peer_verdict(connection)  # from a verification that also holds for resumed sessions
            if verdict.refusal is not None:
                subject = verdict.certificate.subject.rfc4514_string() if verdict.certificate is not None else "-"
                peer = Peer(identity=None, refusal=verdict.refusal, presented=printable(subject))
            elif verdict.certificate is not None:
                peer = Peer.verified(Identity.from_certificate(verdict.certificate))
        channel._mtlsgate_peer = peer
    return peer


# --- the channel and request that stream request bodies ------------------------------------------


_STATUS_TEXT = {400: b"Bad Request", 408: b"Request Timeout", 414: b"URI Too Long", 431: b"Request Header Fields Too Large"}


class GatewayChannel(http.HTTPChannel):
    """
    An HTTP/1.1 channel that lets a request with a body be dispatched when its headers arrive, and
    that stops parsing (and closes after the response) when a response ends before the body did.

    It is stricter than twisted.web's on what a gateway must never pass on ambiguously (bare LF line
    ends, obs-fold, any Transfer-Encoding but C{chunked}), answers over-long request lines and
    header lines with 414 and 431, and gives a request's headers C{header_timeout} to arrive
    (slowloris) on top of the idle timeout.
    """

    site: GatewaySite  # set by the site that builds the channel
    _discarding = False
    _header_timer: Any = None
    _tail = b""  # the last bytes of header data seen, to find line ends split across reads
    limits = Limits()

    def connectionMade(self) -> None:
        limits = getattr(self.site, "limits", None) or self.limits
        self.limits = limits
        self.MAX_LENGTH = limits.max_line_length
        self.maxHeaders = limits.max_header_count
        self.totalHeadersSize = limits.max_header_size
        super().connectionMade()

    _host: Any = None
    _secure: bool | None = None

    def getHost(self) -> Any:
        """Asked by every request (twisted.web's Request.__init__): one getsockname per connection, not per request."""
        if self._host is None:
            self._host = super().getHost()
        return self._host

    def isSecure(self) -> bool:
        """Asked twice per request; the interface adaptation behind it is not free."""
        if self._secure is None:
            self._secure = super().isSecure()
        return self._secure

    def _refuse(self, code: int, reason: str) -> None:
        """Answer a malformed or abusive request ourselves and close: nothing goes upstream."""
        self._cancel_header_timer()
        peer = self.transport.getPeer() if self.transport is not None else None
        log.info("refused a request from {peer} with {code}: {reason}", peer=getattr(peer, "host", peer), code=code, reason=reason)
        body = reason.encode("ascii", "replace") + b"\n"
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (code, _STATUS_TEXT[code], len(body), body)
        )
        self.stopParsing()
        self.loseConnection()

    def _respondToBadRequestAndDisconnect(self) -> None:
        if self._receivedHeaderCount > self.maxHeaders:
            self._refuse(431, f"more than {self.maxHeaders} header fields")
        elif self._receivedHeaderSize > self.totalHeadersSize:
            self._refuse(431, f"request line and headers larger than {self.totalHeadersSize} bytes")
        else:
            self._refuse(400, "malformed request")

    def lineLengthExceeded(self, line: bytes) -> None:
        if self._HTTPChannel__first_line:  # type: ignore[attr-defined]
            self._refuse(414, f"request line longer than {self.MAX_LENGTH} bytes")
        else:
            self._refuse(431, f"a header line is longer than {self.MAX_LENGTH} bytes")

    def _start_header_timer(self) -> None:
        if self._header_timer is None and self.limits.header_timeout:
            self._header_timer = self.callLater(self.limits.header_timeout, self._headers_too_slow)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            if self._header_timer.active():
                self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        self._refuse(408, f"request headers not complete within {self.limits.header_timeout:g}s")

    def headerReceived(self, line: bytes) -> bool:
        name, _, value = line.partition(b":")
        problem = header_field_problem(name, value.strip(b" \t"))
        if problem is not None:
            self._refuse(400, problem)
            return False
        return super().headerReceived(line)

    def allHeadersReceived(self) -> None:
        self._cancel_header_timer()
        request = self.requests[-1]
        # twisted.web answers "Expect: 100-continue" here, before routing, authorization and the body limit are
        # known, so a client would upload a body only to have it refused: take the expectation over, and answer
        # 100 only once the request may go upstream (GatewayRequest.proceed). The header is never forwarded.
        expect = request.requestHeaders.getRawHeaders(b"expect")
        if expect and expect[0].lower() == b"100-continue" and self._version == b"HTTP/1.1":
            request.requestHeaders.removeHeader(b"expect")
            request.expects_continue = True
        super().allHeadersReceived()
        if request.body is not None:
            request.dispatch(self._command, self._path, self._version)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_header_timer()
        super().connectionLost(reason)

    def checkPersistence(self, request: Any, version: bytes) -> bool:
        """
        HTTP/1.0 with C{Connection: keep-alive} stays open, as nginx does (twisted.web closes it;
        ApacheBench and older clients speak 1.0), provided the response turns out to have a
        Content-Length: L{GatewayRequest.write} decides once the response headers are known.
        """
        if version == b"HTTP/1.0":
            tokens = {t.strip().lower() for v in request.requestHeaders.getRawHeaders(b"connection", []) for t in v.split(b",")}
            if b"keep-alive" in tokens:
                request.http10_keepalive = True
                return True
        return super().checkPersistence(request, version)

    def stopParsing(self) -> None:
        """Ignore the rest of the client's input; the connection closes once the response is done."""
        self._discarding = True
        self.persistent = False

    def dataReceived(self, data: bytes) -> None:
        if self._discarding:
            return
        if self.line_mode and not self._handlingRequest:
            self._start_header_timer()
            seen = self._tail + data
            end = seen.find(b"\r\n\r\n")
            head = data if end == -1 else data[: max(0, end + 4 - len(self._tail))]  # the body may hold any bytes
            if _has_bare_lf(self._tail[-1:], head):
                self._refuse(400, "bare LF line ending (CRLF required)")
                return
            self._tail = seen[-3:]
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if self._discarding:
            return
        first_line = self._HTTPChannel__first_line  # type: ignore[attr-defined]
        if line[:1] in (b" ", b"\t") and not first_line:
            self._refuse(400, "obsolete line folding in a header")
            return
        if first_line and line and self.persistent:
            problem = request_line_problem(line)
            if problem is not None:
                self._refuse(400, problem)
                return
        super().lineReceived(line)

    def rawDataReceived(self, data: bytes) -> None:
        if not self._discarding:
            super().rawDataReceived(data)

    def allContentReceived(self) -> None:
        if not self._discarding:
            super().allContentReceived()


_VISIBLE_ASCII = bytes(range(0x21, 0x7F))
_CONTROLS = bytes(range(0x00, 0x09)) + bytes(range(0x0A, 0x20)) + b"\x7f"  # every CTL but HTAB
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_DIGITS = re.compile(rb"[0-9]+\Z")
_MAX_CONTENT_LENGTH = 2**63 - 1  # nginx's off_t bound; larger values mean nothing to anyone downstream


def request_line_problem(line: bytes) -> str | None:
    """
    Why a request line must be refused before twisted.web parses it, or None (twisted.web refuses
    what else is malformed).  The request target is visible ASCII only (RFC 9112 3.2): twisted.web
    lets 0x7F-0xB0 through (an octal/decimal slip), which the upstream URL would then carry.
    """
    parts = line.split(b" ")
    if len(parts) != 3:
        return None
    stray = parts[1].translate(None, _VISIBLE_ASCII)
    if stray:
        return f"byte 0x{stray[0]:02X} in the request target (only visible ASCII is allowed)"
    return None


def header_field_problem(name: bytes, value: bytes) -> str | None:
    """
    Why a header field (C{value} without its surrounding whitespace) must be refused, or None.  Names
    are RFC 9110 tokens; values carry no control character but HTAB (obs-text, 0x80-0xFF, is passed
    on, as nginx and Go do); Content-Length is 1*DIGIT below 2^63; Transfer-Encoding is chunked.
    """
    if not _TOKEN.match(name):
        return f"header name {name.decode('latin-1')!r} is not a token"
    if len(value.translate(None, _CONTROLS)) != len(value):
        first = next(b for b in value if b in _CONTROLS)
        return f"control character 0x{first:02X} in the value of header {name.decode('ascii')}"
    lowered = name.lower()
    if lowered == b"content-length" and (not _DIGITS.match(value) or int(value) > _MAX_CONTENT_LENGTH):
        return "Content-Length must be decimal digits only, below 2^63"
    if lowered == b"transfer-encoding" and value.lower() != b"chunked":
        return "only 'Transfer-Encoding: chunked' is accepted"
    return None


def _has_bare_lf(previous: bytes, data: bytes) -> bool:
    """Whether C{data} has an LF not preceded by CR; C{previous} is the byte before it, if any."""
    start = 0
    while (i := data.find(b"\n", start)) != -1:
        before = data[i - 1 : i] if i else previous
        if before != b"\r":
            return True
        start = i + 1
    return False


class BodyTooLarge(Exception):
    """The client sent more than the route allows."""


@implementer(IBodyProducer)
class RequestBody:
    """
    The client's request body as an L{IBodyProducer} for the Agent: chunks are handed on as they
    arrive; when the upstream (or the not-yet-made connection) cannot take more, reading from the
    client is paused at a high-water mark and resumed below a low one.
    """

    def __init__(self, network: IPushProducer, length: int | None) -> None:
        self.length = UNKNOWN_LENGTH if length is None else length
        self._network = network
        self._network_paused = False
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._consumer: Any = None
        self._paused = False
        self._done: defer.Deferred[None] | None = None
        self.started = False
        self.complete = False
        self.stopped = False
        self.limit: int | None = None
        self.received = 0
        self.too_large = False
        self.on_change: Callable[[], None] | None = None  # told when who the upload waits on may have changed

    def waiting_on_client(self) -> bool:
        """Whether the upload waits for the client's bytes (the upstream takes all it is given), not on the upstream."""
        return self._consumer is not None and not self._paused and not self._chunks and not self.complete

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def write(self, data: bytes) -> None:
        """A chunk from the client."""
        if self.stopped or self.too_large:
            return
        self.received += len(data)
        if self.limit is not None and self.received > self.limit:
            self._overflow()
            return
        if self._consumer is not None and not self._paused and not self._chunks:
            self._consumer.write(data)
            return
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > _HIGH_WATER and not self._network_paused:
            self._network_paused = True
            self._network.pauseProducing()
        self._changed()

    def finish(self) -> None:
        """The client sent the whole body."""
        self.complete = True
        self._flush()
        self._changed()

    def _overflow(self) -> None:
        """More than the route's max_body_size: fail the upstream request (the client gets 413)."""
        self.too_large = True
        self._chunks.clear()
        self._buffered = 0
        if self._done is not None:
            done, self._done = self._done, None
            done.errback(BodyTooLarge(self.limit))

    def startProducing(self, consumer: Any) -> defer.Deferred[None]:
        if self.too_large:
            return defer.fail(BodyTooLarge(self.limit))
        self.started = True
        self._consumer = consumer
        done = self._done = defer.Deferred()
        self._flush()  # may fire it at once, when the whole body is already here
        self._changed()
        return done

    def pauseProducing(self) -> None:
        self._paused = True
        self._changed()

    def resumeProducing(self) -> None:
        self._paused = False
        self._flush()
        self._changed()

    def stopProducing(self) -> None:
        """The upstream went away: drop what is buffered, and let the client's bytes drain."""
        self.stopped = True
        self._chunks.clear()
        self._consumer = None
        self._resume_network()
        self._changed()

    def _flush(self) -> None:
        while self._chunks and self._consumer is not None and not self._paused:
            chunk = self._chunks.pop(0)
            self._buffered -= len(chunk)
            self._consumer.write(chunk)
        if self._buffered < _LOW_WATER:
            self._resume_network()
        if self.complete and not self._chunks and self._done is not None and not self.stopped:
            done, self._done = self._done, None
            done.callback(None)

    def _resume_network(self) -> None:
        if self._network_paused:
            self._network_paused = False
            self._network.resumeProducing()


class GatewayRequest(server.Request):
    """A request whose body, if any, is a L{RequestBody} streamed to the upstream."""

    channel: GatewayChannel
    body: RequestBody | None = None
    _dispatched = False
    http10_keepalive = False
    expects_continue = False  # the client sent "Expect: 100-continue" and waits for 100 before its body

    def proceed(self) -> None:
        """The request goes upstream: if the client waits for "100 Continue" to send its body, send it now."""
        if self.expects_continue and self.body is not None and not self.startedWriting and self.channel is not None and self.channel.transport is not None:
            self.expects_continue = False
            self.channel.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def write(self, data: bytes) -> None:
        if not self.startedWriting and self.http10_keepalive:
            if self.responseHeaders.hasHeader(b"content-length") and self.channel is not None and self.channel.persistent:
                self.responseHeaders.setRawHeaders(b"connection", [b"keep-alive"])
            elif self.channel is not None:
                self.channel.persistent = False  # the body will end when the connection does
        super().write(data)

    def gotLength(self, length: int | None) -> None:
        self.content = BytesIO()
        if length != 0:
            self.body = RequestBody(self.channel._networkProducer, length)

    def handleContentChunk(self, data: bytes) -> None:
        assert self.body is not None
        self.body.write(data)  # past the route's limit, dropped; the 413 stops parsing (see finish)

    def dispatch(self, command: bytes, path: bytes, version: bytes) -> None:
        """Start handling now, before the body has arrived."""
        self._dispatched = True
        self.method, self.uri, self.clientproto = command, path, version
        self.path = path.split(b"?", 1)[0]
        self.args = {}
        self.process()

    def process(self) -> None:
        """twisted.web answers a C{*} target itself (as TwistedWeb, without the gateway's headers): here the resource does."""
        if self.path != b"*":
            super().process()
            return
        self.site = self.channel.site
        self.setHeader(b"date", http.datetimeToString())
        self.prepath, self.postpath = [], []
        try:
            self.render(self.site.resource)
        except BaseException:
            self.processingFailed(Failure())

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self.body is not None:
            self.body.finish()
        if not self._dispatched:
            self.dispatch(command, path, version)

    def finish(self) -> None:
        if self.body is not None and not self.body.complete and not self.finished:
            # The response ends before the request body did: stop reading, close afterwards.
            self.channel.stopParsing()
            if not self.startedWriting:
                self.setHeader(b"connection", b"close")
        super().finish()


class GatewaySite(server.Site):
    """A Site that builds L{GatewayChannel}s (with C{limits}) and leaves access logging to the proxy."""

    protocol = GatewayChannel  # type: ignore[assignment]  # twisted.web types it as a factory of HTTPChannel
    requestFactory = GatewayRequest
    displayTracebacks = False
    noisy = False  # no "Starting factory" / "Stopping factory" lines in the log

    def __init__(self, resource: Resource, limits: Limits = Limits()) -> None:
        super().__init__(resource, timeout=limits.idle_timeout)
        self.limits = limits

    def log(self, request: Any) -> None:
        pass


# --- relaying the response ------------------------------------------------------------------------


class UpstreamStalled(Exception):
    """The upstream sent nothing for the route's timeout in the middle of a response body."""


@implementer(IPushProducer)
class _ResponseRelay(Protocol):
    """
    Upstream response body to the client, pausing the upstream when the client reads slowly, and
    cutting off an upstream that goes silent mid-body for C{stall_timeout} seconds (the time the
    client itself holds things up does not count).
    """

    transport: Any  # the response body's producer (twisted.web's TransportProxyProducer)

    def __init__(self, request: GatewayRequest, done: Callable[[Failure | None], None], reactor: Any, stall_timeout: float) -> None:
        self.request = request
        self._done = done
        self.bytes = 0
        self._reactor = reactor
        self._stall_timeout = stall_timeout
        self._stall_timer: Any = None
        self._stalled = False

    def connectionMade(self) -> None:
        self.request.registerProducer(self, True)
        self._watch()

    def _watch(self) -> None:
        self._unwatch()
        self._stall_timer = self._reactor.callLater(self._stall_timeout, self._stall)

    def _unwatch(self) -> None:
        if self._stall_timer is not None and self._stall_timer.active():
            self._stall_timer.cancel()
        self._stall_timer = None

    def _stall(self) -> None:
        self._stall_timer = None
        self._stalled = True
        self.transport.stopProducing()  # closes the upstream connection; connectionLost follows

    def dataReceived(self, data: bytes) -> None:
        self.bytes += len(data)
        self._watch()
        self.request.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._unwatch()
        if not self.request._disconnected:
            self.request.unregisterProducer()
        if self._stalled:
            reason = Failure(UpstreamStalled(f"no bytes for {self._stall_timeout:g}s in the middle of the response body"))
        self._done(None if reason.check(ResponseDone, http.PotentialDataLoss) else reason)

    def pauseProducing(self) -> None:
        self._unwatch()
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._watch()
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        self.transport.stopProducing()


def _plain(request: GatewayRequest, code: int, text: str) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    request.setHeader(b"server", b"mtlsgate")
    body = f"{code} {http.RESPONSES.get(code, b'').decode()}: {text}\n".encode()
    request.setHeader(b"content-length", str(len(body)).encode())
    return body


@attrs.define
class RouteEntry:
    """A route as the proxy uses it: its settings and its upstream group."""

    route: Route
    upstreams: UpstreamGroup


@attrs.frozen
class ProxyState:
    """Everything a request needs from the configuration; replaced as a whole on reload."""

    routes: RouteTable[RouteEntry]
    global_rules: AllowRules
    require_client_certificate: bool
    hsts_header: bytes | None = None  # Strict-Transport-Security for HTTPS responses
    log_access: bool = True  # access_log: off turns the per-request event off entirely


class _Exchange:
    """One proxied request: upstream attempts with failover, the timeout, relaying, the access line."""

    def __init__(
        self, reactor: Any, request: GatewayRequest, entry: RouteEntry, peer: Peer, metrics: GatewayMetrics, log_access: bool = True,
        target: bytes | None = None,
    ) -> None:  # fmt: skip
        self.reactor = reactor
        self.target = request.uri if target is None else target  # the normal form that was routed: exactly what goes upstream
        self.metrics = metrics
        self.log_access = log_access
        self.request = request
        self.entry = entry
        self.peer = peer
        self.started = reactor.seconds()
        self.upstream = "-"
        self.relay: _ResponseRelay | None = None
        self.pending: defer.Deferred[Any] | None = None
        self.timed_out = False
        self.client_gone = False
        self.accounted = False  # the access line and the request metric, once per request
        self.waiting = True  # for the upstream's response headers (the route timeout applies)
        self.timer: Any = None
        if request.body is not None:
            request.body.on_change = self._upload_changed
        request.notifyFinish().addErrback(self._client_lost)

    def start(self) -> None:
        request = self.request
        route = self.entry.route
        headers = upstream_request_headers(
            request.requestHeaders,
            client_ip=request.getClientAddress().host,
            proto="https" if request.isSecure() else "http",
            xfcc=self.peer.xfcc if route.forward_client_cert == "xfcc" else None,
            preserve_host=route.preserve_host_header,
        )
        self._attempt(self.entry.upstreams.order(), headers)

    def _attempt(self, targets: list[str], headers: Any) -> None:
        self.upstream = targets[0]
        url = targets[0].encode("ascii") + self.target  # Agent re-parses it: pathnorm's normal form round-trips unchanged (a unit test holds it)
        d = self.entry.upstreams.agent.request(self.request.method, url, headers, self.request.body)
        self.pending = d
        self._upload_changed()
        d.addCallbacks(self._response, lambda f: self._failed(f, targets, headers))

    def _failed(self, failure: Failure, targets: list[str], headers: Any) -> None:
        self.pending = None
        if self.client_gone:
            return
        if self.request.body is not None and self.request.body.too_large:
            self._error(413, "request body too large", f"more than {self.entry.route.max_body_size} bytes")
            return
        body_started = self.request.body is not None and self.request.body.started
        if failure.check(ConnectError) and len(targets) > 1 and not body_started and not self.timed_out:
            log.warn("upstream {upstream} unreachable ({error}); trying {next}", upstream=targets[0], error=failure.getErrorMessage(), next=targets[1])
            self._attempt(targets[1:], headers)
            return
        if self.timed_out:
            self._error(504, "upstream timed out", f"no response within {self.entry.route.timeout:g}s")
        else:
            self._error(502, "upstream unavailable", _describe(failure))

    def _response(self, response: Any) -> None:
        self.pending = None
        self._stop_waiting()
        self.metrics.upstream_responded(self.entry.route.name, self.reactor.seconds() - self.started)
        request = self.request
        if self.client_gone:
            response.deliverBody(Protocol())
            return
        request.setResponseCode(response.code, response.phrase)
        request.defaultContentType = None
        for name, values in client_response_headers(response.headers).getAllRawHeaders():
            request.responseHeaders.setRawHeaders(name, values)
        if isinstance(response.length, int) and request.method != b"HEAD" and response.code not in (204, 304):
            # Agent keeps Content-Length out of response.headers (it is framing); a known length is
            # passed on so that clients see the size and twisted.web does not switch to chunked.
            request.setHeader(b"content-length", b"%d" % response.length)
        if not response.headers.hasHeader(b"server"):
            request.setHeader(b"server", b"mtlsgate")
        self.relay = _ResponseRelay(request, self._relayed, self.reactor, self.entry.route.timeout)
        response.deliverBody(self.relay)

    def _relayed(self, failure: Failure | None) -> None:
        if self.client_gone:
            return
        size = self.relay.bytes if self.relay else 0
        if failure is not None:
            # The status line is gone already: all that is left is to cut the client off.
            log.warn("upstream {upstream} broke off the response: {error}", upstream=self.upstream, error=_describe(failure))
            self._access(self.request.code, size)  # the status the client got, cut short; not also a 499
            self.client_gone = True
            self.request.channel.stopParsing()
            cast(ITCPTransport, self.request.channel.transport).abortConnection()
        else:
            self.request.finish()
            self._access(self.request.code, size)

    def _upload_changed(self) -> None:
        """
        The route timeout counts only the time the gateway waits on the upstream: to connect, to take
        the body (buffered bytes it does not read), to answer once the body is sent.  While the
        upload waits for the client's next bytes the clock stops (the idle timeout bounds the client)
        and starts afresh when the wait is the upstream's again.
        """
        if not self.waiting:
            return
        body = self.request.body
        if body is not None and body.waiting_on_client():
            self._cancel_timer()
        elif self.timer is None:
            self.timer = self.reactor.callLater(self.entry.route.timeout, self._timeout)

    def _timeout(self) -> None:
        self.timer = None
        self.timed_out = True
        self.waiting = False
        if self.pending is not None:
            self.pending.cancel()

    def _cancel_timer(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def _stop_waiting(self) -> None:
        self.waiting = False
        self._cancel_timer()

    def _client_lost(self, failure: Failure) -> None:
        self.client_gone = True
        self._stop_waiting()
        if self.pending is not None:
            self.pending.cancel()
        if self.relay is not None and self.relay.transport is not None:
            self.relay.transport.stopProducing()
        self._access(499, self.relay.bytes if self.relay else 0)

    def _error(self, code: int, text: str, detail: str) -> None:
        self._stop_waiting()
        log.warn(
            "{code} for {method} {uri} on route {route} via {upstream}: {detail}",
            code=code, method=self.request.method.decode("ascii", "replace"), uri=self.request.uri.decode("ascii", "replace"),
            route=self.entry.route.name, upstream=self.upstream, detail=detail,
        )
        body = _plain(self.request, code, text)
        self.request.write(body)
        self.request.finish()
        self._access(code, len(body))

    def _access(self, status: int, size: int) -> None:
        """Log and count the request, once: a response cut off by the upstream is not also the client's 499."""
        if self.accounted:
            return
        self.accounted = True
        route = self.entry.route.name
        if self.log_access:
            write_access_line(self.request, self.peer, route, self.upstream, status, size, self.reactor.seconds() - self.started)
        self.metrics.request(route, status)


def write_access_line(request: GatewayRequest, peer: Peer, route: str, upstream: str, status: int, size: int, duration: float) -> None:
    """One access event per request, with fields a formatter or a metrics observer can read."""
    identity = peer.identity
    access_log.info(
        "{client} {identity} \"{method} {uri} {proto}\" {status} {size} route={route} upstream={upstream}"
        " cn={common_name} sha256={fingerprint} {duration:.3f}s",
        client=request.getClientAddress().host if request.getClientAddress() else "-",
        identity=peer.label,
        spiffe_id=identity.spiffe_id if identity else None,
        common_name=printable(identity.common_name or "-").replace(" ", "_") if identity else "-",
        fingerprint=identity.fingerprint_sha256 if identity else "-",
        method=request.method.decode("ascii", "replace"),
        uri=request.uri.decode("ascii", "replace"),
        proto=request.clientproto.decode("ascii", "replace"),
        referer=_header_text(request, b"referer"),
        user_agent=_header_text(request, b"user-agent"),
        status=status,
        size=size,
        route=route,
        upstream=upstream,
        duration=duration,
    )


def _loggable(raw: bytes) -> str:
    """Client bytes for a log line: printable ASCII as is, the rest escaped."""
    return raw[:512].decode("latin-1").encode("unicode_escape").decode("ascii")


def _header_text(request: GatewayRequest, name: bytes) -> str | None:
    value = request.getHeader(name)
    return printable(value.decode("latin-1")) if value is not None else None


def _describe(failure: Failure) -> str:
    if failure.check(ResponseNeverReceived, ResponseFailed):
        reasons = getattr(failure.value, "reasons", []) or []
        return "; ".join(_describe(r) for r in reasons) or failure.getErrorMessage()
    error = failure.value
    if error is not None and error.__class__.__module__.startswith("OpenSSL"):
        try:
            return "TLS: " + "; ".join(str(part[2]) for part in error.args[0])
        except (IndexError, TypeError):
            return f"TLS: {error}"
    return f"{error.__class__.__name__}: {failure.getErrorMessage()}"


_NOT_FORWARDED = frozenset({b"CONNECT", b"TRACE", b"TRACK"})
_ALLOW = b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"


class ProxyResource(Resource):
    """
    The gateway's only resource: route by Host and path, authorize the client certificate for the
    route, and relay to the route's upstreams.
    """

    isLeaf = True

    def __init__(self, reactor: Any, state: ProxyState, metrics: GatewayMetrics | None = None) -> None:
        super().__init__()
        self.reactor = reactor
        self.state = state
        self.metrics = metrics or GatewayMetrics()
        self.in_flight = 0
        self._drained: list[defer.Deferred[None]] = []

    def drained(self, timeout: float) -> defer.Deferred[None]:
        """Fires when no proxied request is in flight, or after C{timeout} seconds (shutdown)."""
        d: defer.Deferred[None] = defer.Deferred()
        if self.in_flight == 0:
            d.callback(None)
            return d
        log.info("waiting up to {timeout:g}s for {n} request(s) in flight", timeout=timeout, n=self.in_flight)
        self._drained.append(d)
        timer = self.reactor.callLater(timeout, lambda: None if d.called else d.callback(None))
        d.addBoth(lambda result: (timer.active() and timer.cancel(), result)[1])
        return d

    def _finished(self, result: Any) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            waiting, self._drained = self._drained, []
            for d in waiting:
                if not d.called:
                    d.callback(None)

    def _answer(self, request: GatewayRequest, peer: Peer, route: str, code: int, text: str) -> bytes:
        """A response of the gateway's own (no upstream involved), with its access line."""
        body = _plain(request, code, text)
        if request.body is not None and not request.body.complete:
            # Refused before its body arrived (a client sending "Expect: 100-continue" never sends it): the body
            # is not read, and the connection closes after this answer, which says so.
            request.channel.stopParsing()
            request.setHeader(b"connection", b"close")
        if self.state.log_access:
            write_access_line(request, peer, route, "-", code, len(body), 0.0)
        self.metrics.request(route, code)
        return body

    def render(self, request: GatewayRequest) -> Any:
        state = self.state
        if state.hsts_header is not None and request.isSecure():
            request.setHeader(b"strict-transport-security", state.hsts_header)
        hosts = request.requestHeaders.getRawHeaders(b"host") or []
        host = hosts[0].decode("ascii", "replace") if hosts else ""
        peer = peer_of(request.channel)
        own = self._own_answer(request, peer)
        if own is not None:
            return own
        if len(hosts) > 1 or (not hosts and request.clientproto != b"HTTP/1.0"):
            return self._answer(request, peer, "-", 400, "exactly one Host header is required")
        try:
            target = normalize_target(request.uri)
        except PathRefused as e:
            log.info("refused the request target {uri} from {client}: {reason}",
                     uri=_loggable(request.uri), client=request.getClientAddress().host, reason=e.reason)
            return self._answer(request, peer, "-", 400, e.reason)
        entry = state.routes.lookup(host, target.route_path)
        if entry is None:
            return self._answer(request, peer, "-", 404, "no route for this host" if not state.routes.knows_host(host) else "no route for this path")
        refusal = self._refusal(peer, entry.route)
        if refusal is not None:
            log.info(
                "refused {client} ({identity}) on route {route}: {reason}",
                client=request.getClientAddress().host, route=entry.route.name, reason=refusal,
                identity=f"unverified {peer.presented}" if peer.presented and peer.identity is None else peer.label,
            )
            return self._answer(request, peer, entry.route.name, 403, f"client certificate {refusal}")
        limit = entry.route.max_body_size
        if limit is not None and request.body is not None:
            if isinstance(request.body.length, int) and request.body.length > limit:
                request.channel.stopParsing()
                return self._answer(request, peer, entry.route.name, 413, f"request body larger than {limit} bytes")
            request.body.limit = limit
        request.proceed()  # routed, authorized, within max_body_size: now "100 Continue" (refusals above answer at once)
        self.in_flight += 1
        request.notifyFinish().addBoth(self._finished)
        _Exchange(self.reactor, request, entry, peer, self.metrics, state.log_access, target.forward).start()
        return server.NOT_DONE_YET

    def _own_answer(self, request: GatewayRequest, peer: Peer) -> bytes | None:
        """
        CONNECT and TRACE (and IIS's TRACK), in any case, are never forwarded: 405.  C{OPTIONS *} is
        about the gateway itself: 200 with C{Allow}; C{*} with another method is a 400.
        """
        method = request.method.upper()
        if method in _NOT_FORWARDED:
            request.setHeader(b"allow", _ALLOW)
            return self._answer(request, peer, "-", 405, f"{method.decode('ascii')} is not forwarded by this gateway")
        if request.uri == b"*":
            if request.method != b"OPTIONS":
                return self._answer(request, peer, "-", 400, "'*' is a request target for OPTIONS only")
            request.setHeader(b"allow", _ALLOW)
            return self._answer(request, peer, "-", 200, "methods the gateway forwards are in Allow")
        return None

    def _refusal(self, peer: Peer, route: Route) -> str | None:
        if peer.refusal is not None:
            return peer.refusal
        identity = peer.identity
        rules = (self.state.global_rules, route.allow_client)
        if identity is None:
            if self.state.require_client_certificate or any(not r.is_empty() for r in rules):
                return "missing (none presented)"
            return None
        for rule in rules:
            if not rule.allows(identity):
                return f"not allowed here ({rule.explain()})"
        return None


ACME_CHALLENGE_PATH = b"/.well-known/acme-challenge/"


class RedirectToHTTPS(Resource):
    """
    The plain-HTTP listener: 308 to the same URL on HTTPS, except ACME http-01 challenges, which
    C{acme_http01} (token -> key authorization, or None) answers when autocert is on.
    """

    isLeaf = True

    def __init__(self, https_port: Callable[[], int | None], acme_http01: Callable[[str], str | None] | None = None) -> None:
        super().__init__()
        self._https_port = https_port
        self._acme_http01 = acme_http01

    def render(self, request: server.Request) -> bytes:
        if self._acme_http01 is not None and request.path.startswith(ACME_CHALLENGE_PATH):
            return self._challenge(request)
        host = (request.getHeader(b"host") or b"").decode("ascii", "replace")
        name = normalize_host(host) or request.getHost().host
        if ":" in name:
            name = f"[{name}]"
        port = self._https_port()
        netloc = name if port in (None, 443) else f"{name}:{port}"
        request.setResponseCode(308)
        request.setHeader(b"location", f"https://{netloc}".encode("ascii", "replace") + request.uri)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"308 Permanent Redirect: use HTTPS\n"

    def _challenge(self, request: server.Request) -> bytes:
        token = request.path[len(ACME_CHALLENGE_PATH):].decode("ascii", "replace")
        answer = self._acme_http01(token) if self._acme_http01 is not None else None
        request.setHeader(b"content-type", b"text/plain")
        if answer is None:
            request.setResponseCode(404)
            return b"no such challenge\n"
        log.info("answered the http-01 challenge {token} for {host}",
                 token=token, host=normalize_host((request.getHeader(b"host") or b"").decode("ascii", "replace")))
        return answer.encode("ascii")
