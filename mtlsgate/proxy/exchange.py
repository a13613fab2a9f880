"""
The reverse proxy: the handler that routes each request (handed over by mtlsgate.http.server as soon as
its head is in, so bodies stream with back-pressure instead of being spooled), authorizes on the client
certificate, and relays the exchange to an upstream.
"""

from __future__ import annotations

from typing import Any, Callable, cast

import attrs
from twisted.internet import defer
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import classImplements

from mtlsgate.accounting import FinishedRequest, IRequestObserver, RequestObservers, listening
from mtlsgate.config.model import Limits, Route
from mtlsgate.http.headers import client_response_block, client_response_headers, client_response_trailers, upstream_request_headers, upstream_request_pairs
from mtlsgate.http.body import BodyTooLarge, RequestBody
from mtlsgate.http.outcomes import ResponseDone, is_clean_end, wraps_reasons
from mtlsgate.http.framing import header_field_problem, request_line_problem
from mtlsgate.http.interfaces import IGatewayRequest, IResponseReceiver, IUpgradableRequest
from mtlsgate.http.server import HTTPServerFactory
from mtlsgate.http.status import RESPONSES
from mtlsgate.http.timer import ReusableTimer
from mtlsgate.http.tunnel import Tunnel
from mtlsgate.identity import AllowRules, Identity, printable, xfcc_element
from mtlsgate.observe.metrics import GatewayMetrics, NoMetrics
from mtlsgate.http.pathnorm import PathRefused, normalize_target
from mtlsgate.proxy.routing import RouteTable, host_problem
from mtlsgate.tls.server import peer_verdict
from mtlsgate.proxy.upstream import UpstreamGroup


# Names other modules and tests import from here; they live in mtlsgate.http now.
__all__ = ["BodyTooLarge", "GatewayRequest", "RequestBody", "header_field_problem", "request_line_problem"]

GatewayRequest = IGatewayRequest  # either front end's request (HTTP/1.1: mtlsgate.http.server.Request; HTTP/2: h2server.H2Request)

log = Logger(namespace="mtlsgate.proxy.exchange")

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


def admission_refusal(peer: Peer, global_rules: AllowRules, route_rules: AllowRules, require_client_certificate: bool) -> str | None:
    """
    Why C{peer} may not use a route, or None: its certificate's own refusal first; without an identity, refused when
    a certificate is required or any rule (global, then the route's) is set; with one, the first rule that does not
    allow it.  The one admission decision for HTTP routes (L{ProxyResource}) and TCP routes (L{mtlsgate.proxy.tcp}).
    """
    if peer.refusal is not None:
        return peer.refusal
    identity = peer.identity
    rules = (global_rules, route_rules)
    if identity is None:
        if require_client_certificate or any(not r.is_empty() for r in rules):
            return "missing (none presented)"
        return None
    for rule in rules:
        if not rule.allows(identity):
            return f"not allowed here ({rule.explain()})"
    return None


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
            elif verdict.known is not None:  # the identity and XFCC element the TLS layer's cache holds for these bytes
                peer = Peer(identity=verdict.known.identity, refusal=None, xfcc=verdict.known.xfcc)
            elif verdict.certificate is not None:
                peer = Peer.verified(Identity.from_certificate(verdict.certificate))
        channel._mtlsgate_peer = peer
    return peer


# --- the server side: mtlsgate.http.server (the channel, the request, the framing rules) --------------


def GatewaySite(resource: ProxyResource, limits: Limits = Limits()) -> HTTPServerFactory:
    """The gateway's HTTP/1.1 server factory: each request goes to C{resource}, connections are bounded by C{limits}."""
    return HTTPServerFactory(resource.handle, limits, resource.reactor)


# --- relaying the response ------------------------------------------------------------------------


def _ignore(reason: Failure | None) -> None:
    pass


class UpstreamStalled(Exception):
    """The upstream sent nothing for the route's timeout in the middle of a response body."""


class _ResponseRelay(Protocol):
    """
    Upstream response body to the client, pausing the upstream when the client reads slowly, and
    cutting off an upstream that goes silent mid-body for C{stall_timeout} seconds (the time the
    client itself holds things up does not count).

    The stall clock: a body chunk only notes its time, and the timer checks it when it fires.  Given
    C{on_resume}, the relay has no timer of its own: the exchange's one timer per request (the route
    timeout while it waits for the response headers) goes on as the stall timer, asking L{stall_left}
    when it fires, and C{on_resume} is called when a pause (which stops the clock) ends.
    """

    transport: Any  # the response body's producer (the upstream connection)

    def __init__(
        self, request: IGatewayRequest, done: Callable[[Failure | None], None], reactor: IReactorTime, stall_timeout: float,
        on_resume: Callable[[], None] | None = None,
    ) -> None:  # fmt: skip
        self.request = request
        self._done = done
        self.bytes = 0
        self._reactor = reactor
        self._stall_timeout = stall_timeout
        self._stall_timer: Any = None
        self._stalled = False
        self._on_resume = on_resume
        self.paused = False  # by the client's back-pressure: the stall clock stops
        self._last = reactor.seconds()  # when the last body bytes came (or the watch started): the timer checks it when it fires

    def connectionMade(self) -> None:
        self.request.registerProducer(self, True)
        if self._on_resume is None:
            self._watch()

    def stall_left(self) -> float | None:
        """Seconds left before the upstream counts as stalled (0 or less: it has); None while paused (the clock is stopped)."""
        if self.paused:
            return None
        return self._last + self._stall_timeout - self._reactor.seconds()

    def stall(self) -> None:
        """The upstream sent nothing for C{stall_timeout}: cut it off (connectionLost follows)."""
        self._stalled = True
        self.transport.stopProducing()

    def _watch(self) -> None:
        """Start the stall clock afresh, on a timer of the relay's own."""
        self._unwatch()
        self._last = self._reactor.seconds()
        self._stall_timer = self._reactor.callLater(self._stall_timeout, self._check)

    def _unwatch(self) -> None:
        if self._stall_timer is not None and self._stall_timer.active():
            self._stall_timer.cancel()
        self._stall_timer = None

    def _check(self) -> None:
        left = self.stall_left()
        if left is not None and left > 0:
            self._stall_timer = self._reactor.callLater(left, self._check)
            return
        self._stall_timer = None
        self.stall()

    def dataReceived(self, data: bytes) -> None:
        self.bytes += len(data)
        self._last = self._reactor.seconds()
        self.request.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._stalled:
            reason = Failure(UpstreamStalled(f"no bytes for {self._stall_timeout:g}s in the middle of the response body"))
        # isinstance (in is_clean_end), not Failure.check: check works out the exception's class names on first use (about 2 us a response)
        self._ended(None if is_clean_end(reason.value) else reason)

    def body_done(self) -> None:
        """
        The body came whole: what L{connectionLost} does with C{ResponseDone}, told directly by the upstream client
        (L{mtlsgate.http.client.UpstreamResponse.done}), with no C{Failure} made; a stall that came first still wins.
        """
        if self._stalled:
            self.connectionLost(Failure(ResponseDone()))
            return
        self._ended(None)

    def _ended(self, failure: Failure | None) -> None:
        """The body is over: C{failure} None when it came whole."""
        self._unwatch()
        if not self.request.disconnected:
            self.request.unregisterProducer()
        done, self._done, self._on_resume = self._done, _ignore, None
        self.transport = None  # the response body's producer, which holds this relay: no cycle left to the garbage collector
        done(failure)

    def pauseProducing(self) -> None:
        if self.transport is None:
            return  # the body is over
        self.paused = True
        self._unwatch()
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        if self.transport is None:
            return
        self.paused = False
        if self._on_resume is None:
            self._watch()
        else:
            self._last = self._reactor.seconds()
            self._on_resume()
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()


classImplements(_ResponseRelay, IPushProducer)


def _plain(request: IGatewayRequest, code: int, text: str) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    request.setHeader(b"server", b"mtlsgate")
    body = f"{code} {RESPONSES.get(code, b'').decode()}: {text}\n".encode()
    request.setHeader(b"content-length", str(len(body)).encode())
    return body


# The gateway's own refusals as gRPC status codes (grpc's doc/http-grpc-status-mapping.md; 504 as the deadline it is).
_GRPC_STATUS = {400: 13, 401: 16, 403: 7, 404: 12, 405: 12, 413: 8, 429: 14, 431: 8, 502: 14, 503: 14, 504: 4}
_GRPC_UNKNOWN = 2


def _grpc_message(text: str) -> bytes:
    """The grpc-message form of a text: percent-encoded outside printable ASCII, and '%' itself."""
    return b"".join(bytes([b]) if 0x20 <= b <= 0x7E and b != 0x25 else b"%%%02X" % b for b in text.encode("utf-8"))


def _own_response(request: IGatewayRequest, code: int, text: str) -> bytes:
    """
    The head and body of an answer of the gateway's own: L{_plain}, or, to a gRPC request
    (content-type application/grpc*) that is refused or failed, a gRPC trailers-only response
    (HTTP 200, grpc-status and grpc-message, no body) a gRPC client reads as a status.
    """
    content_type = (request.getHeader(b"content-type") or b"").lower()
    if code < 400 or not content_type.startswith(b"application/grpc"):
        return _plain(request, code, text)
    request.setResponseCode(200)
    request.setHeader(b"content-type", b"application/grpc")
    request.setHeader(b"server", b"mtlsgate")
    request.setHeader(b"grpc-status", b"%d" % _GRPC_STATUS.get(code, _GRPC_UNKNOWN))
    request.setHeader(b"grpc-message", _grpc_message(f"{code} {RESPONSES.get(code, b'').decode()}: {text}"))
    return b""


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


_SENDING: Any = object()  # _Exchange.pending while HTTP11Agent.send runs (it may tell the exchange before it returns)


class _Exchange:
    """One proxied request: upstream attempts with failover, the timeout, relaying, the access line."""

    # One is made per request: slots make it smaller and its attributes quicker to set and read.
    __slots__ = (
        "reactor", "target", "observer", "upstream_latency", "request", "entry", "peer", "started", "upstream", "relay", "response",
        "pending", "_targets", "_headers", "timed_out", "client_gone", "accounted", "waiting", "_timer_shared", "timer", "tunnel_opened",
        "_finished_hook", "__weakref__",
    )  # fmt: skip

    def __init__(
        self, reactor: IReactorTime, request: IGatewayRequest, entry: RouteEntry, peer: Peer, observer: IRequestObserver, target: bytes | None = None,
        tunnel_opened: Callable[[Tunnel], None] | None = None, finished_hook: Callable[[Any], None] | None = None,
    ) -> None:  # fmt: skip
        self.reactor = reactor
        self.target = request.uri if target is None else target  # the normal form that was routed: exactly what goes upstream
        self.observer = observer
        self.upstream_latency: float | None = None
        self.request = request
        self.entry = entry
        self.peer = peer
        self.started = reactor.seconds()
        self.upstream = "-"
        self.relay: _ResponseRelay | None = None
        self.response: Any = None  # the upstream's IResponse, once its headers are in
        self.pending: Any = None  # the Deferred of the agent's request, or the HTTP/1.1 agent's Exchange: cancel() either
        self._targets: list[str] = []  # the upstreams left to try, and the headers, for a failover (HTTP11Agent.send)
        self._headers: Any = None
        self.timed_out = False
        self.client_gone = False
        self.accounted = False  # the observer is told once per request
        self.waiting = True  # for the upstream's response headers (the route timeout applies)
        # The exchange's one timer (_arm_timer): an HTTP/1.1 connection's, kept over its requests (one at a time), or one of its own
        request_timer = getattr(request.channel, "request_timer", None)
        self._timer_shared = request_timer is not None
        self.timer: ReusableTimer = request_timer() if request_timer is not None else ReusableTimer(reactor)
        self.tunnel_opened = tunnel_opened  # set for a WebSocket upgrade: a 101 from the upstream becomes a tunnel
        self._finished_hook = finished_hook  # the handler's own end of the request (its in-flight count), told first
        if request.body is not None:
            request.body.on_change = self._upload_changed
        request.when_done(self._request_done)

    def start(self) -> None:
        request = self.request
        route = self.entry.route
        headers: Any
        pairs = getattr(request, "raw_headers", None)
        hosts = getattr(request, "host_values", None)
        connection = getattr(request, "connection_values", None)
        if pairs is not None and hosts is not None and connection is not None and route.upstream_protocol == "http1":
            # The fields as received, filtered in one pass into the upstream request's head (no Headers built); a request
            # object without them (another front end, a test), or an HTTP/2 upstream (its client takes Headers, and TE:
            # trailers may go there), takes the Headers path below.
            headers = upstream_request_pairs(
                pairs,
                connection=connection,
                connection_tokens=getattr(request, "connection_tokens", None),
                host=hosts[0] if hosts else None,
                client_ip=request.getClientAddress().host,
                proto="https" if request.isSecure() else "http",
                xfcc=self.peer.xfcc if route.forward_client_cert == "xfcc" else None,
                preserve_host=route.preserve_host_header,
            )
        else:
            headers = upstream_request_headers(
                request.requestHeaders,
                client_ip=request.getClientAddress().host,
                proto="https" if request.isSecure() else "http",
                xfcc=self.peer.xfcc if route.forward_client_cert == "xfcc" else None,
                preserve_host=route.preserve_host_header,
                trailers=route.upstream_protocol == "http2",  # the HTTP/1.1 client reads and drops chunked trailers: it does not claim to take them
            )
        self._attempt(self.entry.upstreams.order(), headers)

    def _attempt(self, targets: list[str], headers: Any) -> None:
        self.upstream = targets[0]
        base = targets[0].encode("ascii")
        agent = self.entry.upstreams.agent
        send = getattr(agent, "send", None)
        if send is not None and self.tunnel_opened is None:
            # The HTTP/1.1 agent's direct form: the target as routed (pathnorm's normal form), the outcome told to this
            # exchange's upstream_response / upstream_failed, no Deferred per request.
            self._targets, self._headers = targets, headers
            self.pending = _SENDING
            exchange = send(self.request.method, base, self.target, headers, self.request.body, self)
            if self.pending is _SENDING:  # not told yet
                self.pending = exchange
                self._upload_changed()
            return
        url = base + self.target  # Agent re-parses it: pathnorm's normal form round-trips unchanged (a unit test holds it)
        if self.tunnel_opened is not None:  # Connection: Upgrade, Upgrade: websocket, on a connection of its own
            assert self.entry.route.upstream_protocol != "http2", "config refuses allow_websockets with upstream_protocol: http2"
            d = cast(Any, agent).upgrade(self.request.method, url, headers, b"websocket")  # an HTTP11Agent (cast to Any: mypyc checks a cast to a class)
        else:
            d = agent.request(self.request.method, url, headers, self.request.body)
        self.pending = d
        self._upload_changed()
        d.addCallbacks(self._response, self._failed, errbackArgs=(targets, headers))  # no closure made per request

    def upstream_response(self, response: Any) -> None:
        """L{IResponseReceiver}: the response to L{HTTP11Agent.send} (what the Deferred's callback is to the other agents)."""
        self._response(response)

    def upstream_failed(self, failure: Failure) -> None:
        """L{IResponseReceiver}: no response to L{HTTP11Agent.send}; failing over as the Deferred's errback does."""
        self._failed(failure, self._targets, self._headers)

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
        self.response = response
        self.upstream_latency = self.reactor.seconds() - self.started
        self.waiting = False  # the route timeout is over; its timer goes on as the relay's stall timer
        if self.client_gone:
            self._cancel_timer()
        request = self.request
        if self.client_gone:
            response.deliverBody(Protocol())
            return
        if response.code == 101 and self.tunnel_opened is not None:
            self._cancel_timer()  # a tunnel has its own idle timer
            self._switch(response)
            return
        self._response_head(request, response)
        self.relay = _ResponseRelay(request, self._relayed, self.reactor, self.entry.route.timeout, self._arm_timer)
        self._arm_timer()
        response.deliverBody(self.relay)

    def upstream_whole(self, response: Any, body: bytes) -> None:
        """
        L{IResponseReceiver}'s fast form: the whole response came in one read (the usual small response on a kept-alive
        connection), its connection already back in the pool.  The same head as L{_response}, then head and body go to
        the client in one write, and the request is finished: no relay, producer or stall timer for a body that is all here.
        """
        self.pending = None
        self.response = response
        self.upstream_latency = self.reactor.seconds() - self.started
        self.waiting = False
        self._cancel_timer()
        if self.client_gone:
            return
        request = self.request
        self._response_head(request, response)
        if not isinstance(response.length, int) and request.method != b"HEAD" and response.code not in (204, 304):
            # A chunked body that came whole: its length is known now, so the client gets it with a Content-Length (one
            # write, no chunk framing) rather than re-chunked (the upstream's trailers are not forwarded either way).
            request.setHeader(b"content-length", b"%d" % len(body))
        request.write(body)  # the head with the body (or alone), in one writeSequence
        if self.client_gone:  # the write found the client gone: counted as a 499 already
            return
        request.finish()
        self._access(request.code, len(body))

    def _response_head(self, request: Any, response: Any) -> None:
        """The upstream response's status and fields, as the client gets them (docs/security.md, "Response headers")."""
        request.setResponseCode(response.code, response.phrase)
        raw = getattr(response, "raw_headers", None)
        if raw is not None and hasattr(request, "forward_headers"):
            # The upstream's fields as received, filtered and written as head lines in one pass (no Headers built).
            block, names = client_response_block(raw)
            request.forward_headers(block, names)
            has_server = b"server" in names
        else:
            client_response_headers(response.headers, into=request.responseHeaders)
            has_server = response.headers.hasHeader(b"server")
        if isinstance(response.length, int) and request.method != b"HEAD" and response.code not in (204, 304):
            # Agent keeps Content-Length out of response.headers (it is framing); a known length is
            # passed on so that clients see the size and the response is not chunked.
            request.setHeader(b"content-length", b"%d" % response.length)
        if not has_server:
            request.setHeader(b"server", b"mtlsgate")

    def _switch(self, response: Any) -> None:
        """
        The upstream switched to WebSocket: relay its 101 head (hop-by-hop headers but Upgrade and Connection
        dropped), then both connections become a byte tunnel; the access line is written when it closes.
        """
        request = IUpgradableRequest(self.request)  # only an HTTP/1.1 request gets here: upgrade_to is set on no other
        client_response_headers(response.headers, into=request.responseHeaders)
        request.setHeader(b"upgrade", b"websocket")
        request.setHeader(b"connection", b"Upgrade")
        tunnel = Tunnel(self.reactor, self.entry.route.websocket_idle_timeout, self._tunnel_closed)
        assert self.tunnel_opened is not None
        self.tunnel_opened(tunnel)  # in flight from now on: before the request counts as finished
        response.switch(tunnel.upstream)
        request.upgrade(tunnel.client)

    def _tunnel_closed(self, tunnel: Tunnel) -> None:
        if self.accounted:
            return
        self.accounted = True
        route = self.entry.route.name
        log.info("WebSocket tunnel on route {route} via {upstream} closed ({why}) after {duration:.3f}s: {up} bytes up, {down} bytes down",
                 route=route, upstream=self.upstream, why=tunnel.close_reason, duration=self.reactor.seconds() - tunnel.started,
                 up=tunnel.bytes_from_client, down=tunnel.bytes_to_client)  # fmt: skip
        if not listening(self.observer):
            return
        self.observer.request_finished(finished(
            self.request, self.peer, route, self.upstream, 101, tunnel.bytes_to_client, self.reactor.seconds() - self.started,
            self.upstream_latency, tunnel=(tunnel.bytes_from_client, tunnel.bytes_to_client),
        ))  # fmt: skip

    def _relayed(self, failure: Failure | None) -> None:
        self._cancel_timer()
        if self.client_gone:
            return
        size = self.relay.bytes if self.relay else 0
        if failure is not None:
            # The status line is gone already: all that is left is to cut the client off.
            log.warn("upstream {upstream} broke off the response: {error}", upstream=self.upstream, error=_describe(failure))
            self._access(self.request.code, size)  # the status the client got, cut short; not also a 499
            self.client_gone = True
            self.request.channel.abort()
        else:
            self._relay_trailers()
            self.request.finish()
            self._access(self.request.code, size)

    def _relay_trailers(self) -> None:
        """
        The upstream's trailers (an HTTP/2 upstream's C{IResponse.trailers}: gRPC's C{grpc-status} and
        C{grpc-message}), cleaned like headers and more (docs/security.md, "Response trailers"), go to the
        client just before the end of the response, when the client's request can carry them.
        """
        trailers = getattr(self.response, "trailers", None)
        write_trailers = getattr(self.request, "write_trailers", None)
        if not trailers or write_trailers is None:
            return
        forwarded = client_response_trailers(trailers, self.response.headers)
        if forwarded:
            write_trailers(forwarded)

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
        else:
            self._arm_timer()

    def _arm_timer(self) -> None:
        """
        The exchange's one timer: the route timeout while waiting for the response headers, then the
        relay's stall timer (L{_fired} tells which); armed unless it runs already.
        """
        if not self.timer.armed(self):
            self.timer.arm(self, self.entry.route.timeout, self._fired)

    def _fired(self) -> None:
        if self.waiting:
            self._timeout()
            return
        relay = self.relay
        if relay is None or self.client_gone:
            return
        left = relay.stall_left()
        if left is None:
            return  # paused by the client: the relay re-arms the timer when it resumes
        if left > 0:
            self.timer.arm(self, left, self._fired)
            return
        relay.stall()

    def _timeout(self) -> None:
        self.timed_out = True
        self.waiting = False
        if self.pending is not None:
            self.pending.cancel()

    def _cancel_timer(self) -> None:
        if self._timer_shared:
            self.timer.disarm(self)  # left scheduled for the connection's next request to move on
        else:
            self.timer.stop()

    def _stop_waiting(self) -> None:
        self.waiting = False
        self._cancel_timer()

    def _request_done(self, reason: Failure | None) -> None:
        """The request's one completion hook: the handler's count first (as its own hook was, before), then a lost client."""
        hook = self._finished_hook
        if hook is not None:
            self._finished_hook = None
            hook(reason)
        if reason is not None:
            self._client_lost(reason)

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
        body = _own_response(self.request, code, text)
        self.request.write(body)
        self.request.finish()
        self._access(code, len(body))

    def _access(self, status: int, size: int) -> None:
        """Tell the observer (access log, metrics) once: a response cut off by the upstream is not also the client's 499."""
        if self.accounted:
            return
        self.accounted = True
        if not listening(self.observer):
            return  # nobody reads the record (access log off, no metrics): none is built
        duration = self.reactor.seconds() - self.started
        self.observer.request_finished(
            finished(self.request, self.peer, self.entry.route.name, self.upstream, status, size, duration, self.upstream_latency)
        )


classImplements(_Exchange, IResponseReceiver)


def finished(
    request: IGatewayRequest, peer: Peer, route: str, upstream: str, status: int, size: int, duration: float, upstream_latency: float | None = None,
    tunnel: tuple[int, int] | None = None,
) -> FinishedRequest:  # fmt: skip
    """
    The record of one finished request (HTTP/1.x or HTTP/2), for the request observer; C{tunnel}: a WebSocket
    tunnel's bytes from and to the client (the record is made when it closes).
    """
    address = request.getClientAddress()
    return FinishedRequest(
        client=getattr(address, "host", None) or "-",
        peer=peer.label,
        identity=peer.identity,
        protocol=request.clientproto.decode("ascii", "replace"),
        method=request.method.decode("ascii", "replace"),
        target=request.uri.decode("ascii", "replace"),
        status=status,
        size=size,
        route=route,
        upstream=upstream,
        duration=duration,
        upstream_latency=upstream_latency,
        referer=_header_text(request, b"referer"),
        user_agent=_header_text(request, b"user-agent"),
        tunnel=tunnel,
    )


def _cancelling(result: Any, timer: IDelayedCall) -> Any:
    """A callback that cancels C{timer} (if still pending) and passes C{result} on."""
    if timer.active():
        timer.cancel()
    return result


def _loggable(raw: bytes) -> str:
    """Client bytes for a log line: printable ASCII as is, the rest escaped."""
    return raw[:512].decode("latin-1").encode("unicode_escape").decode("ascii")


def _header_text(request: IGatewayRequest, name: bytes) -> str | None:
    value = request.getHeader(name)
    return printable(value.decode("latin-1")) if value is not None else None


def _describe(failure: Failure) -> str:
    if wraps_reasons(failure.value):
        reasons = getattr(failure.value, "reasons", []) or []
        return "; ".join(_describe(r) for r in reasons) or failure.getErrorMessage()
    return describe_failure(failure)


def describe_failure(failure: Failure) -> str:
    """A connection-level failure for a log line: a pyOpenSSL error's reasons (C{TLS: ...}), else the error's class and message."""
    error = failure.value
    if error is not None and error.__class__.__module__.startswith("OpenSSL"):
        try:
            return "TLS: " + "; ".join(str(part[2]) for part in error.args[0])
        except (IndexError, TypeError):
            return f"TLS: {error}"
    return f"{error.__class__.__name__}: {failure.getErrorMessage()}"


_NOT_FORWARDED = frozenset({b"CONNECT", b"TRACE", b"TRACK"})
_ALLOW = b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"


#: How long before the drain's deadline (C{limits.shutdown_timeout}) open WebSocket tunnels are told to go away
#: (at most half the drain): time for the Close frame to reach the client before the process stops.
GOING_AWAY_LEAD = 1.0


class ProxyResource:
    """
    The gateway's request handler (L{handle}): route by Host and path, authorize the client certificate
    for the route, and relay to the route's upstreams.
    """

    def __init__(
        self, reactor: IReactorTime, state: ProxyState, observer: IRequestObserver = RequestObservers(),
        metrics: GatewayMetrics | NoMetrics | None = None,
    ) -> None:  # fmt: skip
        self.reactor = reactor
        self.state = state
        self.observer = observer  # told of every finished request: the access log and the metrics
        self.metrics: GatewayMetrics | NoMetrics = metrics if metrics is not None else NoMetrics()  # the open WebSocket tunnels' gauge
        self.in_flight = 0  # requests, and WebSocket tunnels, open
        self.tunnels: set[Tunnel] = set()
        self.draining = False  # shutting down: requests in flight finish, WebSocket tunnels go on until the deadline
        self.tunnels_go_away = False  # the drain's deadline is near: every tunnel, and one that opens now, is told to go away
        self._drained: list[defer.Deferred[None]] = []

    def drained(self, timeout: float) -> defer.Deferred[None]:
        """Fires when no proxied request is in flight, or after C{timeout} seconds (shutdown)."""
        d: defer.Deferred[None] = defer.Deferred()
        self.draining = True
        # WebSocket tunnels go on through the drain, as requests in flight do; shortly before the deadline each is told
        # to go away (a Close frame 1001 to the client at the next frame end, then both connections close), so its
        # client hears why rather than having the connection cut when the process stops.
        self.reactor.callLater(max(0.0, timeout - min(GOING_AWAY_LEAD, timeout / 2)), self._tunnels_go_away)
        if self.in_flight == 0:
            d.callback(None)
            return d
        log.info("waiting up to {timeout:g}s for {n} request(s) in flight", timeout=timeout, n=self.in_flight)
        self._drained.append(d)
        timer = self.reactor.callLater(timeout, lambda: None if d.called else d.callback(None))
        d.addBoth(_cancelling, timer)
        return d

    def _tunnels_go_away(self) -> None:
        self.tunnels_go_away = True
        for tunnel in list(self.tunnels):
            tunnel.going_away()

    def _tunnel_opened(self, tunnel: Tunnel) -> None:
        """A WebSocket tunnel counts as a request in flight until it closes (drained() closes it)."""
        self.in_flight += 1
        self.tunnels.add(tunnel)
        self.metrics.tunnel_opened()
        hook = tunnel.on_closed

        def closed(tunnel: Tunnel) -> None:
            self.tunnels.discard(tunnel)
            self.metrics.tunnel_closed()
            try:
                if hook is not None:
                    hook(tunnel)
            finally:
                self._finished(None)

        tunnel.on_closed = closed
        if self.tunnels_go_away:
            self.reactor.callLater(0, tunnel.going_away)  # once both its connections are on

    def _finished(self, result: Any) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            waiting, self._drained = self._drained, []
            for d in waiting:
                if not d.called:
                    d.callback(None)

    def _answer(self, request: IGatewayRequest, peer: Peer, route: str, code: int, text: str) -> None:
        """A response of the gateway's own (no upstream involved), with its access line."""
        body = _own_response(request, code, text)
        if request.body is not None and not request.body.complete:
            # Refused before its body arrived (a client sending "Expect: 100-continue" never sends it): the body
            # is not read, and the connection closes after this answer, which says so.
            request.channel.stop_parsing()
            request.setHeader(b"connection", b"close")
        if listening(self.observer):
            self.observer.request_finished(finished(request, peer, route, "-", code, len(body), 0.0))
        request.write(body)
        request.finish()

    def handle(self, request: IGatewayRequest) -> None:
        """One request, from the end of its head: answered here, or relayed by an L{_Exchange}."""
        state = self.state
        if state.hsts_header is not None and request.isSecure():
            request.setHeader(b"strict-transport-security", state.hsts_header)
        hosts = getattr(request, "host_values", None)
        if hosts is None or getattr(request, "raw_headers", None) is None:
            hosts = request.requestHeaders.getRawHeaders(b"host") or []
        host = hosts[0].decode("ascii", "replace") if hosts else ""
        peer = peer_of(request.channel)
        if self._own_answer(request, peer):
            return
        if len(hosts) > 1 or (not hosts and request.clientproto != b"HTTP/1.0"):
            self._answer(request, peer, "-", 400, "exactly one Host header is required")
            return
        why = host_problem(hosts[0]) if hosts else None
        if why is not None:
            log.info("refused the Host {host} from {client}: {reason}", host=_loggable(hosts[0]), client=request.getClientAddress().host, reason=why)
            self._answer(request, peer, "-", 400, why)
            return
        try:
            target = normalize_target(request.uri)
        except PathRefused as e:
            log.info("refused the request target {uri} from {client}: {reason}",
                     uri=_loggable(request.uri), client=request.getClientAddress().host, reason=e.reason)
            self._answer(request, peer, "-", 400, e.reason)
            return
        entry = state.routes.lookup(host, target.route_path)
        if entry is None:
            self._answer(request, peer, "-", 404, "no route for this host" if not state.routes.knows_host(host) else "no route for this path")
            return
        refusal = self._refusal(peer, entry.route)
        if refusal is not None:
            log.info(
                "refused {client} ({identity}) on route {route}: {reason}",
                client=request.getClientAddress().host, route=entry.route.name, reason=refusal,
                identity=f"unverified {peer.presented}" if peer.presented and peer.identity is None else peer.label,
            )
            self._answer(request, peer, entry.route.name, 403, f"client certificate {refusal}")
            return
        websocket = b"websocket" in getattr(request, "upgrade_to", ())  # an HTTP/1.1 upgrade request (mtlsgate.http.server)
        if websocket and not self._websocket_allowed(request, peer, entry.route):
            return
        limit = entry.route.max_body_size
        if limit is not None and request.body is not None:
            if isinstance(request.body.length, int) and request.body.length > limit:
                request.channel.stop_parsing()
                self._answer(request, peer, entry.route.name, 413, f"request body larger than {limit} bytes")
                return
            request.body.limit = limit
        request.proceed()  # routed, authorized, within max_body_size: now "100 Continue" (refusals above answer at once)
        self.in_flight += 1
        tunnel_opened = self._tunnel_opened if websocket else None
        # The exchange's completion hook ends the request's in-flight count too (one hook per request, not two).
        _Exchange(self.reactor, request, entry, peer, self.observer, target.forward, tunnel_opened, self._finished).start()

    def _websocket_allowed(self, request: IGatewayRequest, peer: Peer, route: Route) -> bool:
        """
        A WebSocket handshake (HTTP/1.1, Connection: upgrade, Upgrade: websocket), routed and authorized: refused
        with a reason unless it is a GET to a route with C{allow_websockets}.  Never downgraded to a plain GET.
        """
        if request.method != b"GET":
            self._answer(request, peer, route.name, 400, "a WebSocket handshake must be a GET request (RFC 6455 4.1)")
            return False
        if not route.allow_websockets:
            log.info("refused a WebSocket upgrade from {client} ({identity}) on route {route}: allow_websockets is off",
                     client=request.getClientAddress().host, identity=peer.label, route=route.name)  # fmt: skip
            self._answer(request, peer, route.name, 403, "WebSockets are not allowed on this route (allow_websockets)")
            return False
        return True

    def _own_answer(self, request: IGatewayRequest, peer: Peer) -> bool:
        """
        CONNECT and TRACE (and IIS's TRACK), in any case, are never forwarded: 405.  C{OPTIONS *} is
        about the gateway itself: 200 with C{Allow}; C{*} with another method is a 400.
        """
        method = request.method.upper()
        if method in _NOT_FORWARDED:
            request.setHeader(b"allow", _ALLOW)
            self._answer(request, peer, "-", 405, f"{method.decode('ascii')} is not forwarded by this gateway")
            return True
        if request.uri == b"*":
            if request.method != b"OPTIONS":
                self._answer(request, peer, "-", 400, "'*' is a request target for OPTIONS only")
                return True
            request.setHeader(b"allow", _ALLOW)
            self._answer(request, peer, "-", 200, "methods the gateway forwards are in Allow")
            return True
        return False

    def _refusal(self, peer: Peer, route: Route) -> str | None:
        state = self.state
        return admission_refusal(peer, state.global_rules, route.allow_client, state.require_client_certificate)
