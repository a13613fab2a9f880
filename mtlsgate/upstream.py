"""
Client TLS to upstreams and the per-route connection pools.

Each route gets its own trust root, client certificate and server name, so each route gets its own
L{Agent} and persistent pool: a connection made with one route's client certificate is never reused
for another route.
"""

from __future__ import annotations

import functools
import ipaddress
import itertools
from typing import Any, Iterable, TypeVar

from cryptography import x509
from OpenSSL import SSL
from service_identity import VerificationError
from service_identity.cryptography import verify_certificate_hostname, verify_certificate_ip_address
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import TimeoutError
from twisted.internet.interfaces import IHandshakeListener, IOpenSSLClientConnectionCreator, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._newclient import HEADER, STATUS, HTTP11ClientProtocol
from twisted.web.client import URI, Agent, HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS, IResponse
from zope.interface import implementer

from mtlsgate import pki
from mtlsgate.config import Route
from mtlsgate.healthcheck import HealthChecker, http_probe
from mtlsgate.tls import CIPHERS

log = Logger(namespace="mtlsgate.upstream")


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
    """

    def __init__(self, route: Route) -> None:
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
        ctx.set_alpn_protos([b"http/1.1"])
        self._ctx = ctx

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        name = self.route.tls_server_name or hostname.decode("idna")
        return _UpstreamConnectionCreator(self._ctx, name, verify=not self.route.tls_skip_verify)


class ResponseHeadersTooLarge(Exception):
    """An upstream's status line and headers went past the route's C{max_response_header_size}."""


def _end_of_headers(data: bytes) -> int | None:
    """Where the blank line ending a header block ends in C{data} (LF or CRLF line ends, as Twisted parses), or None."""
    ends = [i + len(blank) for blank in (b"\n\n", b"\n\r\n") if (i := data.find(blank)) != -1]
    return min(ends) if ends else None


@implementer(IHandshakeListener)
class _BoundedClientProtocol(HTTP11ClientProtocol):
    """
    Twisted's client parser accepts response headers without a total limit (any number of lines of
    up to 16 KiB each), so an upstream could make the gateway hold any amount of memory before a
    response starts.  This counts the bytes of each response's status line and headers and gives
    the response up past C{max_header_size}: the request fails with L{ResponseHeadersTooLarge}
    (a 502 for the client) and the connection is closed, never pooled.
    """

    def __init__(self, quiescentCallback: Any, max_header_size: int) -> None:
        super().__init__(quiescentCallback)
        self._max_header_size = max_header_size
        self._header_bytes = 0
        self._tail = b""  # the last bytes of header data seen, to find a blank line split across reads
        self._handshake_waiters: list[defer.Deferred[None]] | None = []  # None once the TLS handshake is done

    def when_handshake_done(self) -> defer.Deferred[None]:
        """Fires when the TLS handshake under this protocol completes; fails if the connection is lost first."""
        if self._handshake_waiters is None:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._handshake_waiters.append(d)
        return d

    def handshakeCompleted(self) -> None:
        waiters, self._handshake_waiters = self._handshake_waiters or [], None
        for d in waiters:
            d.callback(None)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        waiters, self._handshake_waiters = self._handshake_waiters or [], None
        for d in waiters:
            d.errback(reason)
        super().connectionLost(reason)

    def request(self, request: Any) -> defer.Deferred[IResponse]:
        self._header_bytes, self._tail = 0, b""
        d = super().request(request)
        if self._parser is not None:
            # One line may take the whole allowance (Twisted's own line limit would only drop the connection).
            self._parser.MAX_LENGTH = self._max_header_size
        return d

    def dataReceived(self, data: bytes) -> None:
        parser = self._parser
        if parser is not None and parser.state in (STATUS, HEADER):
            seen = self._tail + data
            end = _end_of_headers(seen)
            self._header_bytes += len(data) if end is None else max(0, end - len(self._tail))
            self._tail = seen[-2:]
            if self._header_bytes > self._max_header_size:
                error = ResponseHeadersTooLarge(f"response headers larger than {self._max_header_size} bytes (max_response_header_size)")
                self._giveUp(Failure(error))
                return
        super().dataReceived(data)


class _BoundedClientFactory(_HTTP11ClientFactory):
    noisy = False  # one per upstream connection (and health check): "Starting factory" lines would flood the log

    def __init__(self, quiescentCallback: Any, metadata: Any, max_header_size: int) -> None:
        super().__init__(quiescentCallback, metadata)
        self._max_header_size = max_header_size

    def buildProtocol(self, addr: Any) -> HTTP11ClientProtocol:
        return _BoundedClientProtocol(self._quiescentCallback, self._max_header_size)


_Pool = TypeVar("_Pool", bound=HTTPConnectionPool)


def _bounded_pool(pool: _Pool, route: Route) -> _Pool:
    """C{pool}, making connections that hold response headers to the route's C{max_response_header_size}."""
    # A private attribute of Twisted's (no public way to choose the pool's protocol factory); held by
    # tests/unit/test_private_apis.py, which fails loudly when Twisted changes it.
    pool._factory = functools.partial(_BoundedClientFactory, max_header_size=route.max_response_header_size)  # type: ignore[assignment]
    return pool


class _RetirablePool(HTTPConnectionPool):
    """
    A pool that can be retired on reload: idle connections close at once, and connections still
    carrying a request close when it ends instead of going back into a pool nobody uses.
    """

    retired = False

    def retire(self) -> Any:
        self.retired = True
        return self.closeCachedConnections()

    def _putConnection(self, key: Any, connection: Any) -> None:
        if self.retired:
            connection.transport.loseConnection()
            return
        super()._putConnection(key, connection)


@implementer(IStreamClientEndpoint)
class _HandshakeBoundedEndpoint:
    """
    A TLS endpoint whose connection is made only once the TLS handshake is done, with C{timeout}
    bounding the TCP connection and the handshake together: an upstream that accepts TCP and never
    speaks TLS fails with L{TimeoutError} (a C{ConnectError}, so the request moves on to the next
    upstream) after C{connect_timeout}, not after the route's whole C{timeout}.
    """

    def __init__(self, reactor: Any, tls: IStreamClientEndpoint, timeout: float) -> None:
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

    def __init__(self, reactor: Any, policy: UpstreamTLSPolicy, connect_timeout: float | None) -> None:
        self.reactor = reactor
        self.policy = policy
        self.connect_timeout = connect_timeout
        self._endpoints: dict[tuple[bytes, bytes, int], IStreamClientEndpoint] = {}

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            timeout = 30.0 if self.connect_timeout is None else self.connect_timeout  # 30: HostnameEndpoint's own default
            endpoint = HostnameEndpoint(self.reactor, uri.host.decode("ascii"), uri.port, timeout=timeout)
            if uri.scheme == b"https":
                endpoint = wrapClientTLS(self.policy.creatorForNetloc(uri.host, uri.port), endpoint)
                if self.connect_timeout is not None:
                    endpoint = _HandshakeBoundedEndpoint(self.reactor, endpoint, self.connect_timeout)
            self._endpoints[key] = endpoint
        return endpoint


class UpstreamGroup:
    """
    A route's upstream URLs, an Agent over a persistent pool, round-robin order with failover, and,
    with C{health_check}, the checker that takes dead upstreams out of that order.
    """

    def __init__(self, reactor: Any, route: Route, max_per_host: int = 64) -> None:
        self.route = route
        self.targets = route.to
        policy = UpstreamTLSPolicy(route)
        self.pool = _bounded_pool(_RetirablePool(reactor, persistent=True), route)
        self.pool.maxPersistentPerHost = max_per_host
        # Twisted retries only idempotent requests without a body, once, when a pooled connection
        # the upstream had closed fails before any response: safe, and it hides keep-alive races.
        self.pool.retryAutomatically = True
        self.agent = Agent.usingEndpointFactory(reactor, _EndpointPerOrigin(reactor, policy, route.connect_timeout), pool=self.pool)
        self._turn = itertools.count()
        self.checker: HealthChecker | None = None
        if route.health_check is not None:
            # A fresh connection per check (same TLS policy as requests): it proves the upstream
            # still accepts connections, and check connections never mix with the request pool.
            checks = Agent(reactor, contextFactory=policy, pool=_bounded_pool(HTTPConnectionPool(reactor, persistent=False), route),
                           connectTimeout=min(route.connect_timeout, route.health_check.timeout))  # fmt: skip
            self.checker = HealthChecker(reactor, route.name, route.to, route.health_check, http_probe(checks, route.health_check.path))

    def order(self) -> list[str]:
        """
        The targets up (all of them when none is: better a try than a certain 502), starting with
        the next one in round-robin order; the rest are failover.
        """
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
        return self.pool.retire()
