"""
The gateway's CPU per new mTLS connection + request, in memory: what the gateway's process spends on
one connection from accept to close (ab without -k): the TLS 1.3 handshake with a client certificate
(P-256, verified against the CA), the HTTP/1.0 request proxied over a kept-alive upstream connection,
and the teardown.  The real TLS listener (GatewayTLSFactory, ServerTLS, its SNI, ALPN and verify
callbacks), the TCP-route dispatch, the ALPN front-end choice, the HTTP/1.1 server, ProxyResource and
the upstream client; every connection on a StringTransport (no sockets, no reactor turns).  Only the
gateway's calls are timed (the client's handshake runs outside the clock), so the figure is the
gateway's own: the TLS crypto (the same C work as nginx's) plus its Python.  A single thread on one
core, the best of several batches: steady enough for A/B of code versions on a busy machine.

    PYTHONPATH=. python bench/inmemory_handshake.py                     # this checkout
    PYTHONPATH=/tmp/base python bench/inmemory_handshake.py             # an export of another commit
    PYTHONPATH=. python bench/inmemory_handshake.py --profile 30        # and cProfile's top 30 (gateway calls only)
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import importlib.util
import pstats
import ssl
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from mtlsgate.config.model import CertificateSpec, DownstreamMTLS, Route
from mtlsgate.http.negotiate import NegotiatingFactory
from mtlsgate.identity import AllowRules
from mtlsgate.proxy.exchange import GatewaySite, ProxyResource, ProxyState, RouteEntry
from mtlsgate.proxy.routing import RouteTable
from mtlsgate.proxy.tcp import SNIDispatchFactory, TCPProxy, tcp_state
from mtlsgate.proxy.upstream import UpstreamGroup
from mtlsgate.tls.pki import DevCA
from mtlsgate.tls.server import ClientVerification, GatewayTLSFactory, ServerTLS, load_served_certificates

# The kept-alive upstream connection over a StringTransport: inmemory_request.py's endpoints.
_spec = importlib.util.spec_from_file_location("bench_inmemory_request", Path(__file__).with_name("inmemory_request.py"))
assert _spec is not None and _spec.loader is not None
_inmemory_request: Any = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_inmemory_request)
_Endpoints = _inmemory_request._Endpoints

REQUEST = b"GET /1k HTTP/1.0\r\nHost: 127.0.0.1:8443\r\nUser-Agent: ApacheBench/2.3\r\nAccept: */*\r\n\r\n"  # what ab sends without -k
BODY = b"x" * 1024
RESPONSE = (  # what the bench's nginx upstream answers
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Tue, 01 Dec 2026 16:00:00 GMT\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 1024\r\nLast-Modified: Tue, 01 Dec 2026 15:00:00 GMT\r\nConnection: keep-alive\r\n"
    b'ETag: "692dab0a-400"\r\nAccept-Ranges: bytes\r\n\r\n' + BODY
)


class _TCPTransport(StringTransport):
    """A StringTransport with the TCP options a server protocol sets."""

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass

    def setTcpKeepAlive(self, enabled: bool) -> None:
        pass


class Bench:
    """The gateway's TLS listener over its HTTP stack, as mtlsgate.app.service composes it, and a client context like ab's."""

    def __init__(self, directory: Path, enforcement: str) -> None:
        ca = DevCA.create(str(directory / "ca"), name="bench CA")
        ca.issue_server(["localhost", "127.0.0.1"]).write(str(directory / "server.pem"), str(directory / "server-key.pem"))
        ca.issue_client("alice", uris=["spiffe://bench/alice"]).write(str(directory / "client.pem"), str(directory / "client-key.pem"))
        ca_file = str(directory / "ca" / "ca.pem")
        self.reactor = MemoryReactorClock()
        server_tls = ServerTLS()
        verification = ClientVerification.load(DownstreamMTLS(ca_file=ca_file, client_auth="require", enforcement=enforcement))
        served = load_served_certificates([CertificateSpec(cert=str(directory / "server.pem"), key=str(directory / "server-key.pem"))], None)
        server_tls.install(server_tls.build(served, verification, http2=True))
        route = Route(host="*", to=("https://127.0.0.1:9443",))
        group = UpstreamGroup(self.reactor, route)
        self.upstream = _Endpoints()
        group.agent.endpoints = self.upstream  # type: ignore[assignment]
        table = RouteTable([(route.host, route.prefix, RouteEntry(route=route, upstreams=group))])
        resource = ProxyResource(self.reactor, ProxyState(routes=table, global_rules=AllowRules(), require_client_certificate=True))
        site = NegotiatingFactory(GatewaySite(resource), None)
        tcp = TCPProxy(self.reactor, tcp_state((), AllowRules(), True))
        server_tls.alpn_for_name = tcp.alpn_for
        self.factory = GatewayTLSFactory(server_tls, SNIDispatchFactory(site, tcp), self.reactor)
        # The client is Python's ssl module: the system's OpenSSL, as ab's (it offers X25519, not the hybrid
        # post-quantum group the OpenSSL in the cryptography wheel prefers, which would cost the gateway more).
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client.minimum_version = ssl.TLSVersion.TLSv1_3
        client.load_cert_chain(str(directory / "client.pem"), str(directory / "client-key.pem"))
        client.load_verify_locations(ca_file)
        client.check_hostname = False
        self.client_context = client
        self.gateway_seconds = 0.0

    def _gateway(self, call: Callable[..., Any], *args: Any) -> Any:
        started = time.process_time()
        try:
            return call(*args)
        finally:
            self.gateway_seconds += time.process_time() - started

    def connection(self, port: int) -> bytes:
        """One connection as ab makes it without -k: handshake, one HTTP/1.0 request, the response, the gateway closes; the response."""
        transport = _TCPTransport(hostAddress=IPv4Address("TCP", "127.0.0.1", 8443), peerAddress=IPv4Address("TCP", "127.0.0.1", port))
        protocol = self._gateway(self.factory.buildProtocol, transport.getPeer())
        self._gateway(protocol.makeConnection, transport)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        client = self.client_context.wrap_bio(incoming, outgoing)
        answer = b""
        sent = False
        for _ in range(20):
            if not sent:
                try:
                    client.do_handshake()
                    client.write(REQUEST)
                    sent = True
                except ssl.SSLWantReadError:
                    pass
            out = outgoing.read()
            if out:
                self._gateway(protocol.dataReceived, out)
            if sent and self.upstream.endpoint.connections:
                upstream, upstream_transport = self.upstream.endpoint.connections[-1]
                if upstream_transport.value():
                    upstream_transport.clear()
                    self._gateway(upstream.dataReceived, RESPONSE)
            back = transport.value()
            transport.clear()
            if back:
                incoming.write(back)
                try:
                    while chunk := client.read(65536):
                        answer += chunk
                except ssl.SSLWantReadError:
                    pass
                else:  # the gateway's close_notify (read gives b""): answer it, as ab does
                    try:
                        client.unwrap()
                    except ssl.SSLWantReadError:
                        pass
                    self._gateway(protocol.dataReceived, outgoing.read())
            if transport.disconnecting:
                break
        else:
            raise AssertionError(f"the connection did not finish: {answer[:200]!r}")
        self._gateway(protocol.connectionLost, None)
        return answer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=300, help="connections per batch [default: 300]")
    parser.add_argument("--batches", type=int, default=7, help="batches; the best is reported [default: 7]")
    parser.add_argument("--enforcement", default="reject_connection", choices=("reject_connection", "policy"))
    parser.add_argument("--profile", type=int, metavar="N", help="also profile one batch (gateway calls only) and print the top N by own time")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mtlsgate-hs-") as d:
        bench = Bench(Path(d), args.enforcement)
        answer = bench.connection(40000)
        assert answer.startswith(b"HTTP/1.0 200 OK\r\n") and answer.endswith(BODY), answer[:300]
        assert b"spiffe://bench/alice" not in answer  # the XFCC goes upstream, not back
        upstream_request = bench.upstream.endpoint.connections[-1][1]
        best = float("inf")
        for batch in range(args.batches):
            gc.collect()
            bench.gateway_seconds = 0.0
            for i in range(args.connections):
                bench.connection(40001 + i)
            best = min(best, bench.gateway_seconds / args.connections)
        assert len(bench.upstream.endpoint.connections) == 1, "the upstream connection is reused"
        del upstream_request
        print(f"{best * 1e6:.1f} us of gateway CPU per new mTLS connection + request (best of {args.batches} batches of {args.connections})")
        if args.profile:
            profiler = cProfile.Profile()
            original = bench._gateway

            def profiled(call: Callable[..., Any], *a: Any) -> Any:
                return profiler.runcall(original, call, *a)

            bench._gateway = profiled  # type: ignore[method-assign]
            for i in range(args.connections):
                bench.connection(41000 + i)
            pstats.Stats(profiler).sort_stats("tottime").print_stats(args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
