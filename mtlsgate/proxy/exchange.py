"""
The reverse proxy: the handler that routes each request (handed over by mtlsgate.http.server as soon as
its head is in, so bodies stream with back-pressure instead of being spooled), authorizes on the client
certificate, and relays the exchange to an upstream.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import attrs
from twisted.internet import defer
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.client import PotentialDataLoss, ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.resource import Resource
from zope.interface import implementer

from mtlsgate.config.model import Limits, Route
from mtlsgate.http.headers import client_response_headers, client_response_pairs, upstream_request_headers, upstream_request_pairs
from mtlsgate.http.body import BodyTooLarge, RequestBody
from mtlsgate.http.framing import header_field_problem, request_line_problem
from mtlsgate.http.server import HTTPServerFactory, Request
from mtlsgate.identity import AllowRules, Identity, printable, xfcc_element
from mtlsgate.observe.metrics import GatewayMetrics, NoMetrics
from mtlsgate.http.pathnorm import PathRefused, normalize_target
from mtlsgate.proxy.routing import RouteTable, normalize_host
from mtlsgate.tls.server import peer_verdict
from mtlsgate.proxy.upstream import UpstreamGroup

if TYPE_CHECKING:
    from twisted.web import server  # the redirect listener's requests; twisted.web.server is imported only where it serves

# Names other modules and tests import from here; they live in mtlsgate.http now.
__all__ = ["BodyTooLarge", "GatewayRequest", "RequestBody", "header_field_problem", "request_line_problem"]

GatewayRequest = Request

log = Logger(namespace="mtlsgate.proxy.exchange")
access_log = Logger(namespace="mtlsgate.access")

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


# --- the server side: mtlsgate.http.server (the channel, the request, the framing rules) --------------


def GatewaySite(resource: ProxyResource, limits: Limits = Limits()) -> HTTPServerFactory:
    """The gateway's HTTP/1.1 server factory: each request goes to C{resource}, connections are bounded by C{limits}."""
    return HTTPServerFactory(resource.handle, limits, resource.reactor)


# --- relaying the response ------------------------------------------------------------------------


_CLEAN_END = (ResponseDone, PotentialDataLoss)  # how a response body ends when all of it came


def _ignore(reason: Failure | None) -> None:
    pass


class UpstreamStalled(Exception):
    """The upstream sent nothing for the route's timeout in the middle of a response body."""


@implementer(IPushProducer)
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
        self, request: GatewayRequest, done: Callable[[Failure | None], None], reactor: Any, stall_timeout: float,
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
        self._unwatch()
        if not self.request.disconnected:
            self.request.unregisterProducer()
        if self._stalled:
            reason = Failure(UpstreamStalled(f"no bytes for {self._stall_timeout:g}s in the middle of the response body"))
        done, self._done, self._on_resume = self._done, _ignore, None
        self.transport = None  # the response body's producer, which holds this relay: no cycle left to the garbage collector
        # isinstance, not Failure.check: check works out the exception's class names on first use (about 2 us a response); and
        # PotentialDataLoss imported once: twisted.web.http is a deprecation proxy whose every attribute read runs Python (~3 us)
        done(None if isinstance(reason.value, _CLEAN_END) else reason)

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
        self, reactor: Any, request: GatewayRequest, entry: RouteEntry, peer: Peer, metrics: GatewayMetrics | NoMetrics, log_access: bool = True,
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
        request.when_done(self._request_done)

    def start(self) -> None:
        request = self.request
        route = self.entry.route
        headers: Any
        pairs = getattr(request, "raw_headers", None)
        hosts = getattr(request, "host_values", None)
        connection = getattr(request, "connection_values", None)
        if pairs is not None and hosts is not None and connection is not None:
            # The fields as received, filtered in one pass into the upstream request's head (no Headers built); a request
            # object without them (another front end, a test) takes the Headers path below.
            headers = upstream_request_pairs(
                pairs,
                connection=connection,
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
        self.waiting = False  # the route timeout is over; its timer goes on as the relay's stall timer
        if self.client_gone:
            self._cancel_timer()
        self.metrics.upstream_responded(self.entry.route.name, self.reactor.seconds() - self.started)
        request = self.request
        if self.client_gone:
            response.deliverBody(Protocol())
            return
        request.setResponseCode(response.code, response.phrase)
        raw = getattr(response, "raw_headers", None)
        if raw is not None and hasattr(request, "forward_headers"):
            # The upstream's fields as received, filtered in one pass and written as they are (no Headers built).
            pairs, names = client_response_pairs(raw)
            request.forward_headers(pairs, names)
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
        self.relay = _ResponseRelay(request, self._relayed, self.reactor, self.entry.route.timeout, self._arm_timer)
        self._arm_timer()
        response.deliverBody(self.relay)

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
        else:
            self._arm_timer()

    def _arm_timer(self) -> None:
        """
        The exchange's one timer: the route timeout while waiting for the response headers, then the
        relay's stall timer (L{_fired} tells which); armed unless it runs already.
        """
        if self.timer is None:
            self.timer = self.reactor.callLater(self.entry.route.timeout, self._fired)

    def _fired(self) -> None:
        self.timer = None
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
            self.timer = self.reactor.callLater(left, self._fired)
            return
        relay.stall()

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

    def _request_done(self, reason: Failure | None) -> None:
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


class ProxyResource:
    """
    The gateway's request handler (L{handle}): route by Host and path, authorize the client certificate
    for the route, and relay to the route's upstreams.
    """

    def __init__(self, reactor: Any, state: ProxyState, metrics: GatewayMetrics | NoMetrics | None = None) -> None:
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

    def _answer(self, request: GatewayRequest, peer: Peer, route: str, code: int, text: str) -> None:
        """A response of the gateway's own (no upstream involved), with its access line."""
        body = _plain(request, code, text)
        if request.body is not None and not request.body.complete:
            # Refused before its body arrived (a client sending "Expect: 100-continue" never sends it): the body
            # is not read, and the connection closes after this answer, which says so.
            request.channel.stop_parsing()
            request.setHeader(b"connection", b"close")
        if self.state.log_access:
            write_access_line(request, peer, route, "-", code, len(body), 0.0)
        self.metrics.request(route, code)
        request.write(body)
        request.finish()

    def handle(self, request: GatewayRequest) -> None:
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
        limit = entry.route.max_body_size
        if limit is not None and request.body is not None:
            if isinstance(request.body.length, int) and request.body.length > limit:
                request.channel.stop_parsing()
                self._answer(request, peer, entry.route.name, 413, f"request body larger than {limit} bytes")
                return
            request.body.limit = limit
        request.proceed()  # routed, authorized, within max_body_size: now "100 Continue" (refusals above answer at once)
        self.in_flight += 1
        request.when_done(self._finished)
        _Exchange(self.reactor, request, entry, peer, self.metrics, state.log_access, target.forward).start()

    def _own_answer(self, request: GatewayRequest, peer: Peer) -> bool:
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
