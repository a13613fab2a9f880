"""
TCP routes (L4, ghostunnel's model): the TLS listener's connections whose SNI names a TCP route are
piped to its upstream instead of being served as HTTP.

A connection is dispatched once its handshake is done (L{SNIDispatchFactory}, the TLS factory's
wrapped factory): the server name it asked for (compared in the normal form the certificate lookup
uses: lower case, no trailing dot) picks a TCP route, or else the connection goes to the HTTP server
as before.  On a TCP route, the L{Tunnel} judges the client first, with the verdict of the TLS layer
(the same verification, CRL and depth as HTTP, and the same record for resumed sessions) and the
route's and the global allow rules (the identity model of mtlsgate.identity).  A refused client is
logged and closed: no upstream connection is even opened.  An admitted one is piped, bytes both ways
with back-pressure (each side the other's streaming producer), to the route's upstreams in
round-robin order with failover while connecting, over TCP (C{tcp://}) or TLS (C{tls://}, with the
same upstream TLS keys as HTTP routes), optionally behind a PROXY protocol v2 header
(mtlsgate.proxy.proxyproto).  Every tunnel ends with one access line (identity, route, upstream,
duration, bytes each way, how it ended).
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable, Mapping, Sequence
from urllib.parse import urlsplit

import attrs
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IHandshakeListener, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mtlsgate.config.model import TCPRoute
from mtlsgate.http.tunnel import TransportReading
from mtlsgate.identity import AllowRules, printable
from mtlsgate.observe.metrics import GatewayMetrics, NoMetrics
from mtlsgate.proxy.exchange import Peer, admission_refusal, describe_failure, peer_of
from mtlsgate.proxy.proxyproto import HeaderTooLong, TLSFacts, proxy_v2_header
from mtlsgate.proxy.upstream import UpstreamTLSPolicy
from mtlsgate.tls.server import ALPN_ACME_TLS

log = Logger(namespace="mtlsgate.proxy.tcp")
access_log = Logger(namespace="mtlsgate.access")

#: How a tunnel ended (the C{end} of its access line and the label of mtlsgate_tcp_connections_total).
CLIENT_CLOSED = "client_closed"
UPSTREAM_CLOSED = "upstream_closed"
IDLE_TIMEOUT = "idle_timeout"
CONNECT_FAILED = "connect_failed"
REFUSED = "refused"
OVER_LIMIT = "over_limit"
SHUTDOWN = "shutdown"
ERROR = "error"

_ABORT_AFTER_CLOSE = 10.0  # after the gateway closes a tunnel (any reason), how long before its connections are aborted


def normal_server_name(raw: bytes | str | None) -> str | None:
    """The server name as routes are matched: lower case, no trailing dot (as the certificate lookup has it); None if absent or not ASCII."""
    if raw is None:
        return None
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("ascii")
        except UnicodeDecodeError:
            return None
    name = raw.lower().rstrip(".")
    return name or None


def accepted_server_name(connection: Any) -> bytes | None:
    """
    The server name the TLS layer accepted for this connection, the one its certificate was picked
    for.  On a resumed TLS 1.2 session OpenSSL keeps the name the session was made for (and gives
    that even to the SNI callback), whatever the new ClientHello says: the route is then the
    session's, a route the same client could have asked for by name, and its rules are applied.
    """
    name: bytes | None = connection.get_servername()
    return name


@attrs.frozen
class Target:
    """One upstream of a TCP route: C{tcp://HOST:PORT} or C{tls://HOST:PORT}, parsed once."""

    url: str
    tls: bool
    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> Target:
        parts = urlsplit(url)
        assert parts.hostname is not None and parts.port is not None, url  # checked by the config loader
        return cls(url=url, tls=parts.scheme == "tls", host=parts.hostname, port=parts.port)


class TCPRouteEntry:
    """A TCP route as the dispatcher uses it: its settings, parsed targets, their round-robin order and the upstream TLS policy."""

    def __init__(self, route: TCPRoute) -> None:
        self.route = route
        self.targets = tuple(Target.parse(url) for url in route.to)
        # No ALPN towards the upstream: the bytes are the client's, not HTTP.
        self.policy = UpstreamTLSPolicy(route, alpn=()) if any(t.tls for t in self.targets) else None
        self.alpn = tuple(p.encode("utf-8") for p in route.alpn)
        self._turn = itertools.count()

    def order(self) -> list[Target]:
        """All targets, starting with the next in round-robin order; the rest are failover."""
        start = next(self._turn) % len(self.targets)
        return list(self.targets[start:] + self.targets[:start])


@attrs.frozen
class TCPState:
    """What a TCP connection needs from the configuration; replaced as a whole on reload."""

    routes: Mapping[str, TCPRouteEntry]
    global_rules: AllowRules = AllowRules()
    require_client_certificate: bool = False
    log_access: bool = True


def tcp_state(routes: Iterable[TCPRoute], global_rules: AllowRules, require_client_certificate: bool, log_access: bool = True) -> TCPState:
    """Build the TCP routes of a configuration (loads the upstream TLS files: raises PKIError on a problem)."""
    return TCPState(
        routes={route.host: TCPRouteEntry(route) for route in routes},
        global_rules=global_rules, require_client_certificate=require_client_certificate, log_access=log_access,
    )  # fmt: skip


def refusal(peer: Peer, state: TCPState, route: TCPRoute) -> str | None:
    """Why this peer may not use this TCP route, or None: the decision HTTP routes make (L{admission_refusal})."""
    return admission_refusal(peer, state.global_rules, route.allow_client, state.require_client_certificate)


class TCPProxy:
    """The TCP routes in force (L{state}, swapped on reload), the open tunnels, and their counts per route."""

    def __init__(self, reactor: IReactorTime, state: TCPState, metrics: GatewayMetrics | NoMetrics | None = None) -> None:
        self.reactor = reactor
        self.state = state
        self.metrics: GatewayMetrics | NoMetrics = metrics if metrics is not None else NoMetrics()
        self.tunnels: set[Tunnel] = set()
        self.open_by_route: dict[str, int] = {}
        self._drained: list[defer.Deferred[None]] = []

    def route_for(self, server_name: bytes | str | None) -> TCPRouteEntry | None:
        name = normal_server_name(server_name)
        return self.state.routes.get(name) if name is not None else None

    def alpn_for(self, server_name: str | None) -> Sequence[bytes] | None:
        """For L{mtlsgate.tls.server.ServerTLS.alpn_for_name}: a TCP route's ALPN protocols, or None for a name that is not one."""
        entry = self.route_for(server_name)
        return entry.alpn if entry is not None else None

    def admit(self, tunnel: Tunnel) -> bool:
        """Count a tunnel against its route's C{max_connections}; False when the route is full."""
        route = tunnel.entry.route
        count = self.open_by_route.get(route.name, 0)
        if route.max_connections is not None and count >= route.max_connections:
            return False
        self.open_by_route[route.name] = count + 1
        self.tunnels.add(tunnel)
        self.metrics.tcp_opened(route.name)
        return True

    def release(self, tunnel: Tunnel) -> None:
        if tunnel not in self.tunnels:
            return
        self.tunnels.discard(tunnel)
        name = tunnel.entry.route.name
        self.open_by_route[name] -= 1
        self.metrics.tcp_closed(name)
        if not self.tunnels:
            waiting, self._drained = self._drained, []
            for d in waiting:
                if not d.called:
                    d.callback(None)

    def drained(self, timeout: float) -> defer.Deferred[None]:
        """
        Shutdown: fires when no tunnel is open, or after C{timeout} seconds, when the tunnels still
        open are closed (their access lines say C{shutdown}).
        """
        d: defer.Deferred[None] = defer.Deferred()
        if not self.tunnels:
            d.callback(None)
            return d
        log.info("waiting up to {timeout:g}s for {n} TCP tunnel(s) to end", timeout=timeout, n=len(self.tunnels))
        self._drained.append(d)

        def deadline() -> None:
            if d.called:
                return
            log.info("closing {n} TCP tunnel(s) still open after shutdown_timeout", n=len(self.tunnels))
            for tunnel in list(self.tunnels):
                tunnel.close(SHUTDOWN)
            d.callback(None)

        timer = self.reactor.callLater(timeout, deadline)

        def stop_timer(result: None) -> None:
            if timer.active():
                timer.cancel()

        d.addCallback(stop_timer)
        return d


# --- dispatch by SNI, once the handshake is done -----------------------------------------------------------


class SNIDispatchFactory(Factory):
    """
    The TLS listener's wrapped factory: each connection's protocol is chosen when its handshake is
    done, a L{Tunnel} for a TCP route's server name, else what C{http} builds.
    """

    noisy = False

    def __init__(self, http: Factory, tcp: TCPProxy) -> None:
        self.http = http
        self.tcp = tcp

    def logPrefix(self) -> str:
        return self.http.logPrefix()

    def startFactory(self) -> None:
        self.http.doStart()

    def stopFactory(self) -> None:
        self.http.doStop()

    def buildProtocol(self, addr: Any) -> _Dispatch:
        return _Dispatch(self, addr)


@implementer(IHandshakeListener)
class _Dispatch(Protocol):
    """
    Holds a TLS connection until its handshake is done, then hands it over: it makes the chosen
    protocol the TLS transport's C{wrappedProtocol} (the TLS layer delivers everything after the
    handshake to it directly) and connects it.  A connection whose handshake fails never gets one.
    """

    def __init__(self, factory: SNIDispatchFactory, addr: Any) -> None:
        self.factory = factory
        self.addr = addr

    def handshakeCompleted(self) -> None:
        tls = self.transport
        connection = tls.getHandle()  # type: ignore[union-attr]
        entry = None
        if connection.get_alpn_proto_negotiated() != ALPN_ACME_TLS:  # an RFC 8737 validation is closed by the TLS layer
            entry = self.factory.tcp.route_for(accepted_server_name(connection))
        chosen: Any = self.factory.http.buildProtocol(self.addr) if entry is None else Tunnel(self.factory.tcp, entry)
        tls.wrappedProtocol = chosen  # type: ignore[union-attr]
        chosen.makeConnection(tls)
        if entry is None and IHandshakeListener.providedBy(chosen):
            chosen.handshakeCompleted()

    def dataReceived(self, data: bytes) -> None:
        # The TLS layer delivers application data only after handshakeCompleted, which replaced this protocol.
        raise AssertionError("application data before the TLS handshake completed")

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        pass  # the handshake failed (logged by the TLS layer): nothing was built


# --- the tunnel --------------------------------------------------------------------------------------------


class Tunnel(Protocol):
    """
    The client's side of one TCP route connection (its transport is the TLS listener's): judges the
    client, connects upstream, pipes, and writes the access line when the client connection closes.
    """

    def __init__(self, proxy: TCPProxy, entry: TCPRouteEntry) -> None:
        self.proxy = proxy
        self.entry = entry
        self.reactor = proxy.reactor
        self.peer: Peer | None = None
        self.client: Any = None
        self.server_name: str | None = None
        self.upstream: _UpstreamSide | None = None  # once established
        self.target: Target | None = None
        self.bytes_up = 0  # client to upstream
        self.bytes_down = 0  # upstream to client
        self.ending: str | None = None
        self.detail: str | None = None
        self.started = self.reactor.seconds()
        self._pending: list[bytes] = []
        self._connecting: defer.Deferred[Any] | None = None
        self._attempt: _UpstreamSide | None = None
        self._connect_timer: Any = None
        self._timed_out = False
        self._idle_timer: Any = None
        self._abort_timer: Any = None
        self._last = self.started
        self._admitted = False
        self._piped = False  # each side is the other's producer (established)
        self.proxy_header: bytes | None = None  # PROXY v2, sent first on the upstream's TCP connection
        self._gone = False  # the client connection is lost

    # --- the client's side --------------------------------------------------------------------

    def connectionMade(self) -> None:
        tls: Any = self.transport
        self.client = tls.getPeer()
        connection = tls.getHandle()
        self.server_name = normal_server_name(accepted_server_name(connection))
        self.peer = peer_of(self)  # the TLS layer's verdict, as HTTP routes read it (resumed sessions included)
        route = self.entry.route
        reason = refusal(self.peer, self.proxy.state, route)
        if reason is not None:
            peer = self.peer
            log.info(
                "refused {client} ({identity}) on TCP route {route}: client certificate {reason}; no upstream connection made",
                client=self._client_host(), route=route.name, reason=reason,
                identity=f"unverified {peer.presented}" if peer.presented and peer.identity is None else peer.label,
            )  # fmt: skip
            self._refuse(REFUSED, reason)
            return
        if not self.proxy.admit(self):
            log.warn("refused {client} on TCP route {route}: at its max_connections ({limit})",
                     client=self._client_host(), route=route.name, limit=route.max_connections)
            self._refuse(OVER_LIMIT, f"max_connections {route.max_connections}")
            return
        if route.proxy_protocol == "v2":
            try:
                self.proxy_header = proxy_v2_header(self.client, tls.getHost(), self._tls_facts())
            except HeaderTooLong as e:
                log.warn("refused {client} on TCP route {route}: {error}", client=self._client_host(), route=route.name, error=str(e))
                self._refuse(ERROR, str(e))
                self.proxy.release(self)
                return
        self._admitted = True
        tls.pauseProducing()  # nothing more is read from the client until the upstream is there
        self._watch_idle()
        self._connect(self.entry.order())

    def _refuse(self, ending: str, detail: str) -> None:
        """
        Close a client refused at dispatch: close_notify, then the TCP connection at once.  Nothing was
        piped, so nothing is owed either way, and the gateway does not wait for the client's
        close_notify (RFC 8446 6.1 lets the closing side go): a refused client that never answers
        (or whose bytes keep coming) would otherwise hold its connection until the abort.
        """
        self.ending, self.detail = ending, detail
        self._close_client()
        tcp: Any = getattr(self.transport, "transport", None)  # the TLS layer's own transport: the TCP connection
        if tcp is not None and not self._gone:
            tcp.loseConnection()  # the close_notify just written goes out first

    def dataReceived(self, data: bytes) -> None:
        if self.ending is not None or not self._admitted:
            return  # refused, or closing: nothing of it goes anywhere
        self._last = self.reactor.seconds()
        self.bytes_up += len(data)
        self.proxy.metrics.tcp_bytes(self.entry.route.name, "up", len(data))
        if self.upstream is not None:
            self.upstream.transport.write(data)  # type: ignore[union-attr]
        else:
            self._pending.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._gone = True
        if self.ending is None:
            self.ending = CLIENT_CLOSED
        for timer in (self._connect_timer, self._idle_timer, self._abort_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._stop_connecting()
        self._unpipe()
        upstream: Any = self.upstream.transport if self.upstream is not None else None
        if upstream is not None:
            upstream.loseConnection()  # what the client sent is written first
        self._pending = []
        self.proxy.release(self)
        self._account()

    # --- connecting -----------------------------------------------------------------------------

    def _connect(self, targets: list[Target]) -> None:
        target = self.target = targets[0]
        route = self.entry.route
        endpoint = HostnameEndpoint(self.reactor, target.host, target.port, timeout=route.connect_timeout)
        attempt = self._attempt = _UpstreamSide(self, target, lambda failure: self._connect_failed(failure, targets))
        self._timed_out = False
        self._connect_timer = self.reactor.callLater(route.connect_timeout, self._connect_too_slow)
        connecting = self._connecting = endpoint.connect(_QuietFactory(attempt))
        connecting.addCallback(self._tcp_connected)
        connecting.addErrback(lambda failure: self._connect_failed(failure, targets))

    def _tcp_connected(self, protocol: Any) -> None:
        self._connecting = None

    def _connect_too_slow(self) -> None:
        """C{connect_timeout} bounds the TCP connection and, for tls://, the upstream's handshake too."""
        self._connect_timer = None
        self._timed_out = True
        self._stop_connecting()

    def _stop_connecting(self) -> None:
        if self._connecting is not None:
            connecting, self._connecting = self._connecting, None
            connecting.cancel()
        elif self._attempt is not None and self.upstream is None and self._attempt.transport is not None:
            self._attempt.transport.abortConnection()  # type: ignore[attr-defined]

    def _connect_failed(self, failure: Failure, targets: list[Target]) -> None:
        self._connecting = None
        self._attempt = None
        if self._connect_timer is not None and self._connect_timer.active():
            self._connect_timer.cancel()
        self._connect_timer = None
        if self._gone or self.ending is not None:
            return  # the client left (or the tunnel is closing): nothing more to try
        route = self.entry.route
        why = f"not connected within {route.connect_timeout:g}s (connect_timeout)" if self._timed_out else describe_failure(failure)
        if len(targets) > 1:
            log.warn("TCP route {route}: upstream {upstream} unreachable ({error}); trying {next}",
                     route=route.name, upstream=targets[0].url, error=why, next=targets[1].url)
            self._connect(targets[1:])
            return
        log.warn("TCP route {route}: upstream {upstream} unreachable ({error}); closing the connection from {client}",
                 route=route.name, upstream=targets[0].url, error=why, client=self._client_host())
        self.ending, self.detail = CONNECT_FAILED, why
        self._close_client()

    def established(self, side: _UpstreamSide) -> None:
        """The upstream is connected (and for tls://, its certificate verified): send what the client sent, then pipe."""
        if self._connect_timer is not None and self._connect_timer.active():
            self._connect_timer.cancel()
        self._connect_timer = None
        if self._gone or self.ending is not None:
            side.transport.abortConnection()  # type: ignore[union-attr]
            return
        tls: Any = self.transport
        upstream: Any = side.transport
        self.upstream = side
        pending, self._pending = self._pending, []
        for data in pending:
            upstream.write(data)
        tls.registerProducer(TransportReading(upstream), True)  # the client reads slowly: stop reading from the upstream
        upstream.registerProducer(TransportReading(tls), True)  # the upstream reads slowly: stop reading from the client
        self._piped = True
        tls.resumeProducing()

    def _tls_facts(self) -> TLSFacts:
        connection = self.transport.getHandle()  # type: ignore[union-attr]
        peer = self.peer
        identity = peer.identity if peer is not None else None
        witnessed = bool(getattr(connection, "verification_witnessed", False))
        return TLSFacts(
            version=connection.get_protocol_version_name(),
            cipher=connection.get_cipher_name(),
            server_name=self.server_name,
            alpn=connection.get_alpn_proto_negotiated() or None,
            certificate_in_connection=identity is not None and witnessed,
            certificate_in_session=identity is not None,
            verified=identity is not None,
            common_name=identity.common_name if identity is not None else None,
            spiffe_id=identity.spiffe_id if identity is not None else None,
            xfcc=peer.xfcc.decode("ascii") if peer is not None and peer.xfcc is not None else None,
        )

    # --- the upstream's side ------------------------------------------------------------------

    def from_upstream(self, data: bytes) -> None:
        if self._gone:
            return
        self._last = self.reactor.seconds()
        self.bytes_down += len(data)
        self.proxy.metrics.tcp_bytes(self.entry.route.name, "down", len(data))
        self.transport.write(data)  # type: ignore[union-attr]

    def upstream_lost(self, reason: Failure) -> None:
        """The upstream closed (or broke) an established tunnel: the client gets what is buffered for it, then close_notify."""
        if self._gone:
            return
        if self.ending is None:
            self.ending = UPSTREAM_CLOSED
            if not reason.check(type(connectionDone.value)):
                self.detail = describe_failure(reason)
        self._close_client()

    def _unpipe(self) -> None:
        """Undo the producer registrations of L{established}, once (closing either side needs them gone first)."""
        if not self._piped:
            return
        self._piped = False
        self.transport.unregisterProducer()  # type: ignore[union-attr]
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.unregisterProducer()  # type: ignore[attr-defined]

    def _close_client(self) -> None:
        """
        Close the client's connection: what is buffered for it goes first, then close_notify.  Reading
        resumes (it may be paused, waiting for the upstream or by its back-pressure) so that the
        client's close_notify and FIN are seen and the connection ends.
        """
        self._unpipe()
        tls: Any = self.transport
        tls.resumeProducing()
        tls.loseConnection()
        if self._abort_timer is None and not self._gone:
            # A client that answers close_notify with neither its own nor a FIN would hold the connection: not for long.
            self._abort_timer = self.reactor.callLater(_ABORT_AFTER_CLOSE, self._abort)

    # --- idle, closing --------------------------------------------------------------------------

    def _watch_idle(self) -> None:
        self._idle_timer = self.reactor.callLater(self.entry.route.idle_timeout, self._idle_check)

    def _idle_check(self) -> None:
        timeout = self.entry.route.idle_timeout
        left = self._last + timeout - self.reactor.seconds()
        if left > 0:
            self._idle_timer = self.reactor.callLater(left, self._idle_check)
            return
        self._idle_timer = None
        log.info("TCP route {route}: closing the idle tunnel from {client} ({timeout:g}s without a byte either way)",
                 route=self.entry.route.name, client=self._client_host(), timeout=timeout)
        self.close(IDLE_TIMEOUT)

    def close(self, ending: str) -> None:
        """Close both sides in order (idle timeout, shutdown); abort them if that does not finish soon."""
        if self._gone:
            return
        if self.ending is None:
            self.ending = ending
        self._stop_connecting()
        self._unpipe()
        upstream: Any = self.upstream.transport if self.upstream is not None else None
        if upstream is not None:
            upstream.loseConnection()
        self._close_client()

    def _abort(self) -> None:
        self._abort_timer = None
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.abortConnection()  # type: ignore[attr-defined]
        if not self._gone and self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def _client_host(self) -> str:
        return str(getattr(self.client, "host", "-"))

    def _account(self) -> None:
        route = self.entry.route.name
        ending = self.ending or CLIENT_CLOSED
        self.proxy.metrics.tcp_connection(route, ending)
        if self.proxy.state.log_access:
            write_tcp_access_line(self, ending, self.reactor.seconds() - self.started)


class _QuietFactory(Factory):
    """connectProtocol's one-protocol factory, without a "Starting factory" log line per upstream connection."""

    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> Protocol:
        return self._protocol


@implementer(IHandshakeListener)
class _UpstreamSide(Protocol):
    """
    The upstream's side of a tunnel: established on connect (tcp://) or once the TLS handshake and
    the upstream's certificate check are done (tls://); a loss before that is a failed attempt.
    """

    def __init__(self, tunnel: Tunnel, target: Target, failed: Callable[[Failure], None]) -> None:
        self.tunnel = tunnel
        self.target = target
        self._failed = failed
        self.established = False

    def connectionMade(self) -> None:
        """
        The PROXY header goes first on the TCP connection, before a tls:// upstream's ClientHello, in the
        clear: where HAProxy sends it and nginx (C{listen ... ssl proxy_protocol}) and HAProxy
        (C{accept-proxy}) read it.  Then TLS starts (its handshake and the certificate check end in
        L{handshakeCompleted}), or, for tcp://, the tunnel is established.
        """
        transport: Any = self.transport
        header = self.tunnel.proxy_header
        if header is not None:
            transport.write(header)
        if self.target.tls:
            policy = self.tunnel.entry.policy
            assert policy is not None
            transport.startTLS(policy.creatorForNetloc(self.target.host.encode("idna"), self.target.port))
        else:
            self._establish()

    def handshakeCompleted(self) -> None:
        self._establish()

    def _establish(self) -> None:
        self.established = True
        self.tunnel.established(self)

    def dataReceived(self, data: bytes) -> None:
        self.tunnel.from_upstream(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.established:
            self.tunnel.upstream_lost(reason)
        else:
            self._failed(reason)


def write_tcp_access_line(tunnel: Tunnel, ending: str, duration: float) -> None:
    """One access event per TCP connection, when it closes (C{kind="tcp"}: mtlsgate.observe.accesslog formats it)."""
    peer = tunnel.peer
    identity = peer.identity if peer is not None else None
    label = peer.label if peer is not None else "-"
    if peer is not None and peer.identity is None and peer.presented:
        label = "-"
    access_log.info(
        "{client} {identity} TCP {route} end={end} up={bytes_up} down={bytes_down} upstream={upstream}"
        " cn={common_name} sha256={fingerprint} {duration:.3f}s",
        kind="tcp",
        client=tunnel._client_host(),
        identity=label,
        spiffe_id=identity.spiffe_id if identity else None,
        common_name=printable(identity.common_name or "-").replace(" ", "_") if identity else "-",
        fingerprint=identity.fingerprint_sha256 if identity else "-",
        server_name=tunnel.server_name or "-",
        route=tunnel.entry.route.name,
        upstream=tunnel.target.url if tunnel.target is not None else "-",
        end=ending,
        detail=tunnel.detail,
        bytes_up=tunnel.bytes_up,
        bytes_down=tunnel.bytes_down,
        duration=duration,
    )
