"""
Client TLS to upstreams and the per-route connection pools.

Each route gets its own trust root, client certificate and server name, so each route gets its own
L{Agent} and persistent pool: a connection made with one route's client certificate is never reused
for another route.
"""

from __future__ import annotations

import ipaddress
import itertools
from typing import Any

from cryptography import x509
from OpenSSL import SSL
from service_identity import VerificationError
from service_identity.cryptography import verify_certificate_hostname, verify_certificate_ip_address
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.web.client import URI, Agent, HTTPConnectionPool
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

from mtlsgate import pki
from mtlsgate.config import Route
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
            ctx.use_privatekey(key)  # type: ignore[arg-type]
        ctx.set_alpn_protos([b"http/1.1"])
        self._ctx = ctx

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        name = self.route.tls_server_name or hostname.decode("idna")
        return _UpstreamConnectionCreator(self._ctx, name, verify=not self.route.tls_skip_verify)


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
            kwargs = {} if self.connect_timeout is None else {"timeout": self.connect_timeout}
            endpoint = HostnameEndpoint(self.reactor, uri.host.decode("ascii"), uri.port, **kwargs)
            if uri.scheme == b"https":
                endpoint = wrapClientTLS(self.policy.creatorForNetloc(uri.host, uri.port), endpoint)
            self._endpoints[key] = endpoint
        return endpoint


class UpstreamGroup:
    """A route's upstream URLs, an Agent over a persistent pool, and round-robin order with failover."""

    def __init__(self, reactor: Any, route: Route, max_per_host: int = 64) -> None:
        self.route = route
        self.targets = route.to
        self.pool = _RetirablePool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = max_per_host
        # Twisted retries only idempotent requests without a body, once, when a pooled connection
        # the upstream had closed fails before any response: safe, and it hides keep-alive races.
        self.pool.retryAutomatically = True
        endpoints = _EndpointPerOrigin(reactor, UpstreamTLSPolicy(route), route.connect_timeout)
        self.agent = Agent.usingEndpointFactory(reactor, endpoints, pool=self.pool)
        self._next = itertools.cycle(range(len(self.targets)))

    def order(self) -> list[str]:
        """All targets, starting with the next one in round-robin order (the rest are failover)."""
        start = next(self._next)
        return list(self.targets[start:] + self.targets[:start])

    def close(self) -> Any:
        """Retire the pool (reload or shutdown): requests in flight finish, then their connections close."""
        return self.pool.retire()
