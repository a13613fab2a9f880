"""
What tests and users share: the mTLS echo upstream (C{python -m mtlsgate.testing upstream}), which
answers every request with what it received (method, target, headers, body digest) as JSON, or with
a body of C{?size=N} bytes.  The demo puts it behind the gateway; the tests and the benchmark use it
as a real upstream that requires a client certificate.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from typing import Any

from twisted.internet.interfaces import IPullProducer, IReactorTime
from twisted.logger import Logger
from twisted.web import resource, server
from zope.interface import implementer

from mtlsgate.config.model import CertificateSpec, DownstreamMTLS
from mtlsgate.proxy.exchange import peer_of
from mtlsgate.reactors import IGatewayReactor
from mtlsgate.tls.server import ClientVerification, GatewayTLSFactory, ServerTLS, load_served_certificates

log = Logger(namespace="mtlsgate.testing")


@implementer(IPullProducer)
class _Bytes:
    """N bytes of a repeating pattern, produced as the client reads them."""

    def __init__(self, request: server.Request, size: int) -> None:
        self.request = request
        self.left = size
        self.chunk = bytes(range(256)) * 256  # 64 KiB

    def resumeProducing(self) -> None:
        if self.left <= 0:
            self.request.unregisterProducer()
            self.request.finish()
            return
        data = self.chunk[: min(self.left, len(self.chunk))]
        self.left -= len(data)
        self.request.write(data)

    def stopProducing(self) -> None:
        self.left = 0


class EchoUpstream(resource.Resource):
    """
    Answers C{GET /bytes/N} with N bytes, C{/slow/S} after S seconds, C{/stall/N} with N bytes of a
    2N-byte body and then silence, and anything else with a JSON
    echo of the method, path, headers, a hash of the body, and the client certificate it verified.
    """

    isLeaf = True

    def __init__(self, reactor: IReactorTime) -> None:
        super().__init__()
        self.reactor = reactor

    def render(self, request: server.Request) -> Any:
        parts = request.path.decode("ascii", "replace").strip("/").split("/")
        if parts[0] == "bytes" and len(parts) == 2 and parts[1].isdigit():
            size = int(parts[1])
            request.setHeader(b"content-type", b"application/octet-stream")
            request.setHeader(b"content-length", str(size).encode())
            if request.method == b"HEAD":
                return b""
            request.registerProducer(_Bytes(request, size), False)
            return server.NOT_DONE_YET
        if parts[0] == "stall" and len(parts) == 2 and parts[1].isdigit():
            request.setHeader(b"content-length", b"%d" % (2 * int(parts[1])))
            request.write(b"x" * int(parts[1]))  # half the body, then silence
            return server.NOT_DONE_YET
        if parts[0] == "slow" and len(parts) == 2:
            call = self.reactor.callLater(float(parts[1]), self._finish, request)
            request.notifyFinish().addErrback(lambda _: call.cancel() if call.active() else None)
            return server.NOT_DONE_YET
        return self._echo(request)

    def _finish(self, request: server.Request) -> None:
        request.write(self._echo(request))
        request.finish()

    def _echo(self, request: server.Request) -> bytes:
        digest = hashlib.sha256()
        size = 0
        content = request.content
        assert content is not None
        content.seek(0)
        while chunk := content.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
        peer = peer_of(request.channel)
        body = {
            "method": request.method.decode(),
            "uri": request.uri.decode("ascii", "replace"),
            "headers": {k.decode().lower(): [v.decode("latin-1") for v in vs] for k, vs in request.requestHeaders.getAllRawHeaders()},
            "body_bytes": size,
            "body_sha256": digest.hexdigest(),
            "client_certificate": peer.identity.subject if peer.identity else None,
            "client_spiffe_id": peer.identity.spiffe_id if peer.identity else None,
        }
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(body, indent=2).encode() + b"\n"


class MemoryEndpoints:
    """
    Upstream connections in memory, for an in-memory gateway (benches, tests): an C{IAgentEndpointFactory} whose one
    endpoint (this object) connects at once, each connection over a C{StringTransport}, kept in C{connections} as
    (protocol, transport) in the order made.
    """

    def __init__(self) -> None:
        self.connections: list[tuple[Any, Any]] = []

    @property
    def endpoint(self) -> MemoryEndpoints:
        return self

    def endpointForURI(self, uri: Any) -> MemoryEndpoints:
        return self

    def connect(self, factory: Any) -> Any:
        from twisted.internet import defer
        from twisted.internet.testing import StringTransport

        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.connections.append((protocol, transport))
        return defer.succeed(protocol)


def make_echo_upstream(reactor: IGatewayReactor, address: str, cert: str, key: str | None, client_ca: str | None) -> Any:
    """The echo upstream on an endpoint; it requires a client certificate when C{client_ca} is given."""
    from mtlsgate.app.service import _Listener

    server_tls = ServerTLS()
    mtls = DownstreamMTLS(ca_file=client_ca, client_auth="require" if client_ca else "off")
    server_tls.install(server_tls.build(load_served_certificates([CertificateSpec(cert, key)], None), ClientVerification.load(mtls)))
    site = server.Site(EchoUpstream(reactor))
    site.noisy = False
    site.log = lambda request: None  # type: ignore[method-assign]
    return _Listener(reactor, address, GatewayTLSFactory(server_tls, site, reactor), "echo upstream (mTLS)")


def main(argv: list[str] | None = None) -> None:
    """C{python -m mtlsgate.testing upstream ...}: run the echo upstream alone (tests, benchmarks)."""
    parser = argparse.ArgumentParser(prog="python -m mtlsgate.testing")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("upstream", help="run the mTLS echo upstream")
    up.add_argument("--listen", required=True, help="endpoint string, e.g. tcp:9443:interface=127.0.0.1")
    up.add_argument("--cert", required=True)
    up.add_argument("--key")
    up.add_argument("--client-ca", help="require client certificates from this CA")
    args = parser.parse_args(argv)
    from mtlsgate.app.run import run_service
    from mtlsgate.reactors import installed_reactor

    reactor = installed_reactor()
    run_service(reactor, make_echo_upstream(reactor, args.listen, args.cert, args.key, args.client_ca))


if __name__ == "__main__":
    main()
