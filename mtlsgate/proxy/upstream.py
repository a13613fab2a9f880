"""
Client TLS to upstreams and the per-route connection pools.

Each route gets its own trust root, client certificate and server name, so each route gets its own
agent (mtlsgate.http.client) and persistent pool: a connection made with one route's client certificate is never reused
for another route.
"""

from __future__ import annotations

import ipaddress
import itertools
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from cryptography import x509
from OpenSSL import SSL
from service_identity import VerificationError
from service_identity.cryptography import verify_certificate_hostname, verify_certificate_ip_address
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.error import TimeoutError
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

from mtlsgate.tls import pki
from mtlsgate.config.model import Route, TCPRoute
from mtlsgate.http.client import HTTP11Agent, OriginURI
from mtlsgate.reactors import IReactorTimeAndTCP
from mtlsgate.tls.fastwrite import SendAtOnceTLSProtocol
from mtlsgate.tls.server import CIPHERS

if TYPE_CHECKING:
    # Imported where they are used: the HTTP/2 client (and h2) by an upstream_protocol: http2 route, the
    # health checker by a route with health_check (issue #13: a worker imports only what its routes use).
    from mtlsgate.http.h2client import H2Agent
    from mtlsgate.proxy.healthcheck import HealthChecker

log = Logger(namespace="mtlsgate.proxy.upstream")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _check_identity(cert: x509.Certificate, name: str) -> None:
    if _is_ip(name):
        verify_certificate_ip_address(cert, name)
    else:
        verify_certificate_hostname(cert, name)


@implementer(IOpenSSLClientConnectionCreator)
class _UpstreamConnectionCreator:
    """Client connections on one shared context, with SNI and service-identity checks for one name."""

    def __init__(self, ctx: SSL.Context, server_name: str, verify: bool) -> None:
        self._ctx = ctx
        self._server_name = server_name
        self._verify = verify

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self._ctx, None)
        connection.set_app_data(tlsProtocol)
        if not _is_ip(self._server_name):
            connection.set_tlsext_host_name(self._server_name.encode("idna"))
        if self._verify:
            connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, self._verify_callback)
        return connection

    def _verify_callback(self, conn: SSL.Connection, cert: Any, errno: int, depth: int, ok: int) -> bool:
        if not ok or depth != 0:
            return bool(ok)
        try:
            _check_identity(cert.to_cryptography(), self._server_name)
        except VerificationError as e:
            log.warn("upstream certificate does not match {name}: {error}", name=self._server_name, error=e)
            return False
        return True


@implementer(IPolicyForHTTPS)
class UpstreamTLSPolicy:
    """
    The client TLS policy of one route: trust (the route's CA file, or the system store), the client
    certificate the gateway presents, and the name verified (C{tls_server_name}, else the URL's host).
    ALPN offers C{alpn} when given (a TCP route), else C{h2} alone for an C{upstream_protocol: http2} route,
    C{http/1.1} otherwise.
    """

    def __init__(self, route: Route | TCPRoute, alpn: Sequence[bytes] | None = None) -> None:
        self.route = route
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        ctx.set_options(SSL.OP_NO_COMPRESSION | getattr(SSL, "OP_NO_RENEGOTIATION", 0))
        ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)  # pooled idle connections hold no record buffers
        ctx.set_cipher_list(CIPHERS)
        if route.tls_skip_verify:
            ctx.set_verify(SSL.VERIFY_NONE)
        elif route.tls_custom_ca_file:
            pki.load_certificates(route.tls_custom_ca_file)  # names the file if it holds no certificate
            ctx.load_verify_locations(route.tls_custom_ca_file)
        else:
            ctx.set_default_verify_paths()
        if route.tls_client_cert_file:
            key, chain = pki.load_key_and_chain(route.tls_client_cert_file, route.tls_client_key_file)
            ctx.use_certificate(chain[0])
            for extra in chain[1:]:
                ctx.add_extra_chain_cert(extra)
            ctx.use_privatekey(key)
        if alpn is None:  # an HTTP route: by its upstream_protocol
            alpn = [b"h2"] if isinstance(route, Route) and route.upstream_protocol == "http2" else [b"http/1.1"]
        if alpn:  # a TCP route's tls:// upstream (mtlsgate.proxy.tcp) offers none, or what the route names
            ctx.set_alpn_protos(list(alpn))
        self._ctx = ctx

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        name = self.route.tls_server_name or hostname.decode("idna")
        return _UpstreamConnectionCreator(self._ctx, name, verify=not self.route.tls_skip_verify)


class _DirectTLSFactory(TLSMemoryBIOFactory):
    # Writes go to OpenSSL at once, not held to the next reactor turn (BufferingTLSTransport), and OpenSSL's output to the socket
    # at once, not on the next reactor turn (mtlsgate.tls.fastwrite).
    protocol = SendAtOnceTLSProtocol


@implementer(IStreamClientEndpoint)
class _DirectTLSEndpoint:
    """
    C{wrapClientTLS(creator, endpoint)}, with TLS writes made at once: the upstream client writes a
    request's head in one write, so Twisted's default coalescing of small TLS writes (a callLater(0)
    per write, and a reactor turn of latency) buys nothing here.

    Under it a client must write nothing before the TLS handshake is done: C{TLSMemoryBIOProtocol} holds
    such bytes until the handshake's last flight has been read, and a write made from
    C{handshakeCompleted} (where the connection is handed over) reaches OpenSSL before them.  Both
    upstream clients wait (the HTTP/2 client sends its preface from C{handshakeCompleted}).
    """

    def __init__(self, creator: IOpenSSLClientConnectionCreator, wrapped: IStreamClientEndpoint) -> None:
        self._creator = creator
        self._wrapped = wrapped

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        connecting: defer.Deferred[Any] = self._wrapped.connect(_DirectTLSFactory(self._creator, True, factory))
        return connecting.addCallback(lambda protocol: protocol.wrappedProtocol)


@implementer(IStreamClientEndpoint)
class _HandshakeBoundedEndpoint:
    """
    A TLS endpoint whose connection is made only once the TLS handshake is done, with C{timeout}
    bounding the TCP connection and the handshake together: an upstream that accepts TCP and never
    speaks TLS fails with L{TimeoutError} (a C{ConnectError}, so the request moves on to the next
    upstream) after C{connect_timeout}, not after the route's whole C{timeout}.
    """

    def __init__(self, reactor: IReactorTime, tls: IStreamClientEndpoint, timeout: float) -> None:
        self._reactor = reactor
        self._tls = tls
        self._timeout = timeout

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        connecting = self._tls.connect(factory)
        connected: list[Any] = []
        timed_out: list[bool] = []

        def abort() -> None:
            if not connected:
                connecting.cancel()
            elif connected[0].transport is not None:
                connected[0].transport.abortConnection()

        result: defer.Deferred[Any] = defer.Deferred(lambda _: abort())

        def too_slow() -> None:
            timed_out.append(True)
            abort()

        timer = self._reactor.callLater(self._timeout, too_slow)

        def handshake(protocol: Any) -> defer.Deferred[Any]:
            connected.append(protocol)
            return protocol.when_handshake_done().addCallback(lambda _: protocol)

        def done(outcome: Any) -> None:
            if timer.active():
                timer.cancel()
            if result.called:  # cancelled by the request's own timeout or the client leaving
                if not isinstance(outcome, Failure) and outcome.transport is not None:
                    outcome.transport.abortConnection()
                return
            if isinstance(outcome, Failure):
                if timed_out:
                    outcome = Failure(TimeoutError(string=f"TCP connection and TLS handshake not done within {self._timeout:g}s (connect_timeout)"))
                result.errback(outcome)
            else:
                result.callback(outcome)

        connecting.addCallback(handshake).addBoth(done)
        return result


@implementer(IAgentEndpointFactory)
class _EndpointPerOrigin:
    """
    One endpoint per upstream origin, made on first use.  Agent's own factory makes (and
    IDNA-encodes the name of) a new endpoint for every request: 6 % of a keep-alive request's time.
    """

    def __init__(self, reactor: IReactorTimeAndTCP, policy: UpstreamTLSPolicy, connect_timeout: float | None) -> None:
        self.reactor = reactor
        self.policy = policy
        self.connect_timeout = connect_timeout
        self._endpoints: dict[tuple[bytes, bytes, int], IStreamClientEndpoint] = {}

    def endpointForURI(self, uri: OriginURI) -> IStreamClientEndpoint:
        key = (uri.scheme, uri.host, uri.port)
        endpoint: Any = self._endpoints.get(key)
        if endpoint is None:
            timeout = 30.0 if self.connect_timeout is None else self.connect_timeout  # 30: HostnameEndpoint's own default
            endpoint = HostnameEndpoint(self.reactor, uri.host.decode("ascii"), uri.port, timeout=timeout)
            if uri.scheme == b"https":
                creator = self.policy.creatorForNetloc(uri.host, uri.port)
                endpoint = _DirectTLSEndpoint(creator, endpoint)
                if self.connect_timeout is not None:
                    endpoint = _HandshakeBoundedEndpoint(self.reactor, endpoint, self.connect_timeout)
            self._endpoints[key] = endpoint
        return endpoint


class UpstreamGroup:
    """
    A route's upstream URLs, an agent over a persistent pool, round-robin order with failover, and,
    with C{health_check}, the checker that takes dead upstreams out of that order.
    """

    def __init__(self, reactor: IReactorTimeAndTCP, route: Route, max_per_host: int = 64) -> None:
        self.route = route
        self.targets = route.to
        policy = UpstreamTLSPolicy(route)
        self.agent: HTTP11Agent | H2Agent
        if route.upstream_protocol == "http2":
            from mtlsgate.http import h2client

            # mtlsgate's HTTP/2 client (mtlsgate.http.h2client): one connection per origin carrying many streams.
            self.agent = h2client.H2Agent(reactor, _EndpointPerOrigin(reactor, policy, route.connect_timeout),
                                          max_header_size=route.max_response_header_size)  # fmt: skip
        else:
            # mtlsgate's own HTTP/1.1 client (mtlsgate.http.client, docs/engine.md): a keep-alive pool per origin
            # holding up to max_per_host idle connections, response headers bounded by max_response_header_size.
            self.agent = HTTP11Agent(reactor, _EndpointPerOrigin(reactor, policy, route.connect_timeout),
                                     max_header_size=route.max_response_header_size, max_idle=max_per_host)  # fmt: skip
        self._turn = itertools.count()
        self._one = list(self.targets)  # order() for a single upstream without checks
        self.checker: HealthChecker | None = None
        if route.health_check is not None:
            from mtlsgate.proxy import healthcheck

            # A fresh connection per check (same TLS policy as requests, Connection: close): it proves the upstream
            # still accepts connections, and check connections never mix with the request pool.
            check_endpoints = _EndpointPerOrigin(reactor, policy, min(route.connect_timeout, route.health_check.timeout))
            checks: HTTP11Agent | H2Agent
            if route.upstream_protocol == "http2":
                from mtlsgate.http import h2client

                checks = h2client.H2Agent(reactor, check_endpoints, max_header_size=route.max_response_header_size, persistent=False)
            else:
                checks = HTTP11Agent(reactor, check_endpoints, max_header_size=route.max_response_header_size, persistent=False)
            path = route.health_check.path
            probe = healthcheck.grpc_probe(checks, path) if route.health_check.grpc else healthcheck.http_probe(checks, path)
            self.checker = healthcheck.HealthChecker(reactor, route.name, route.to, route.health_check, probe)

    def order(self) -> list[str]:
        """
        The targets up (all of them when none is: better a try than a certain 502), starting with
        the next one in round-robin order; the rest are failover.
        """
        if len(self.targets) == 1 and self.checker is None:
            return self._one  # one upstream, no checks: nothing to choose (the list is never changed: _attempt slices it)
        targets = list(self.targets)
        if self.checker is not None:
            targets = [t for t in targets if self.checker.is_up(t)] or targets
        start = next(self._turn) % len(targets)
        return targets[start:] + targets[:start]

    def start(self, replacing: Iterable[UpstreamGroup] = ()) -> None:
        """
        Start health checks, if the route has them; on reload, C{replacing} are the old world's
        groups, whose knowledge of which upstreams are down carries over to the same route's.
        """
        if self.checker is None:
            return
        for old in replacing:
            if old.route.name == self.route.name and old.checker is not None:
                self.checker.inherit(old.checker)
        self.checker.start()

    def close(self) -> Any:
        """Stop health checks and retire the pool (reload or shutdown): requests in flight finish, then their connections close."""
        if self.checker is not None:
            self.checker.stop()
        return self.agent.close()
