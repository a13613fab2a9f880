"""
C{mtls:} endpoint strings, so any Twisted server gets the gateway's TLS and client-certificate
verification: C{twistd web --listen mtls:8443:cert=gate.pem:key=gate-key.pem:client_ca=ca.pem}.

Arguments: the port, then C{cert} (leaf + chain; required), C{key} (if not in C{cert}),
C{client_ca} (enables mTLS, required by default), C{crl}, C{client_auth} (require, optional, off),
C{max_verify_depth}, C{interface}, C{backlog}.  The wrapped protocol reads the verified peer
certificate from its transport (C{transport.getPeerCertificate()}).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.interfaces import IReactorTime, IStreamServerEndpoint, IStreamServerEndpointStringParser
from twisted.plugin import IPlugin
from zope.interface import implementer

from mtlsgate.config.model import CertificateSpec, ConfigError, DownstreamMTLS
from mtlsgate.reactors import IReactorTimeAndTCP
from mtlsgate.tls.pki import PKIError
from mtlsgate.tls.server import ClientVerification, GatewayTLSFactory, ServerTLS, load_served_certificates


@implementer(IStreamServerEndpoint)
class MTLSServerEndpoint:
    """TLS (and client-certificate verification) by the gateway's L{ServerTLS} over a TCP endpoint."""

    def __init__(self, reactor: IReactorTime, tcp: IStreamServerEndpoint, server_tls: ServerTLS) -> None:
        self.reactor = reactor
        self.tcp = tcp
        self.server_tls = server_tls

    def listen(self, factory: Any) -> Any:
        return self.tcp.listen(GatewayTLSFactory(self.server_tls, factory, self.reactor))


@implementer(IPlugin, IStreamServerEndpointStringParser)
class MTLSEndpointParser:
    prefix = "mtls"

    # twistd hands the string's fields over as keyword arguments; naming them here (where the
    # interface says **kwargs) is how each field gets its default and its place in the help text.
    def parseStreamServer(  # type: ignore[override]
        self, reactor: IReactorTimeAndTCP, port: str, cert: str | None = None, key: str | None = None, client_ca: str | None = None,
        crl: str | None = None, client_auth: str | None = None, max_verify_depth: str = "2",
        interface: str = "", backlog: str = "50",
    ) -> MTLSServerEndpoint:  # fmt: skip
        if cert is None:
            raise ValueError("mtls: endpoint needs cert=FILE (and key=FILE unless the key is in it)")
        auth = client_auth or ("require" if client_ca else "off")
        if auth != "off" and client_ca is None:
            raise ValueError(f"mtls: client_auth={auth} needs client_ca=FILE")
        try:
            settings = DownstreamMTLS(ca_file=client_ca, crl_file=crl, client_auth=auth, max_verify_depth=int(max_verify_depth))
            server_tls = ServerTLS()
            server_tls.install(server_tls.build(load_served_certificates([CertificateSpec(cert=cert, key=key)], None), ClientVerification.load(settings)))
        except (ConfigError, PKIError, OSError) as e:
            raise ValueError(f"mtls: {e}") from None
        tcp_class = TCP6ServerEndpoint if ":" in interface else TCP4ServerEndpoint
        return MTLSServerEndpoint(reactor, tcp_class(reactor, int(port), int(backlog), interface), server_tls)
