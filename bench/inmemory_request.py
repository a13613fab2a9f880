"""
The gateway's own Python per request, in memory: microseconds per keep-alive request through the real
server protocol, ProxyResource, exchange, upstream client (HTTP11Agent with its pool) and response
relay, with both connections on StringTransports (no TLS, no sockets, no reactor turns).  A figure
for A/B of code versions on a busy machine: a single thread on one core, timed as the best of several
batches, so other load on the machine barely moves it.  It leaves out what bench/cpu_per_request.py
includes (TLS, syscalls, the reactor), so the two together say where a change paid.  The request
observers are the gateway's own (mtlsgate.app.service): access lines off, metrics counted (as by a
gateway with an admin listener); with --no-metrics, none (no admin listener).

    PYTHONPATH=. python bench/inmemory_request.py                        # this checkout
    PYTHONPATH=/tmp/base python bench/inmemory_request.py                # an export of another commit
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from typing import Any

from twisted.internet.testing import MemoryReactorClock, StringTransport

from mtlsgate.accounting import RequestObservers
from mtlsgate.config.model import HSTS, Route
from mtlsgate.identity import AllowRules, Identity
from mtlsgate.observe.accesslog import AccessEvents
from mtlsgate.observe.metrics import GatewayMetrics, NoMetrics
from mtlsgate.proxy.exchange import GatewaySite, Peer, ProxyResource, ProxyState, RouteEntry
from mtlsgate.proxy.routing import RouteTable
from mtlsgate.testing import MemoryEndpoints
from mtlsgate.tls.pki import DevCA
from mtlsgate.proxy.upstream import UpstreamGroup

REQUEST = b"GET /1k HTTP/1.0\r\nConnection: Keep-Alive\r\nHost: 127.0.0.1:8443\r\nUser-Agent: ApacheBench/2.3\r\nAccept: */*\r\n\r\n"
BODY = b"x" * 1024
RESPONSE = (  # what the bench's nginx upstream answers
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Tue, 01 Dec 2026 16:00:00 GMT\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 1024\r\nLast-Modified: Tue, 01 Dec 2026 15:00:00 GMT\r\nConnection: keep-alive\r\n"
    b'ETag: "692dab0a-400"\r\nAccept-Ranges: bytes\r\n\r\n' + BODY
)


_Endpoints = MemoryEndpoints  # bench/inmemory_handshake.py takes it from here
_Endpoint = MemoryEndpoints


def build(reactor: Any, metrics: bool = True) -> tuple[Any, StringTransport, _Endpoint]:
    route = Route(host="*", to=("https://127.0.0.1:9443",))
    group = UpstreamGroup(reactor, route)
    endpoints = _Endpoints()
    group.agent.endpoints = endpoints  # type: ignore[assignment]
    table = RouteTable([(route.host, route.prefix, RouteEntry(route=route, upstreams=group))])
    state = ProxyState(routes=table, global_rules=AllowRules(), require_client_certificate=False, hsts_header=HSTS().header())  # the default
    counted: GatewayMetrics | NoMetrics = GatewayMetrics() if metrics else NoMetrics()
    resource = ProxyResource(reactor, state, RequestObservers([AccessEvents(enabled=False), counted]), counted)  # as mtlsgate.app.service builds it
    channel = GatewaySite(resource).buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    # As the real bench's connections are: over TLS (so the default HSTS field is set on every response) and from a
    # verified client certificate (so its X-Forwarded-Client-Cert element goes upstream with every request).
    channel.secure = True
    client = DevCA.create(name="bench CA").issue_client("bench-client", uris=["spiffe://bench/client"])
    channel._mtlsgate_peer = Peer.verified(Identity.from_certificate(client.certificate))
    return channel, transport, endpoints.endpoint


def one(channel: Any, transport: StringTransport, endpoint: _Endpoint) -> None:
    channel.dataReceived(REQUEST)
    upstream, upstream_transport = endpoint.connections[-1]
    upstream_transport.clear()
    upstream.dataReceived(RESPONSE)
    transport.clear()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="requests per batch [default: 2000]")
    parser.add_argument("--batches", type=int, default=15, help="batches; the best is reported [default: 15]")
    parser.add_argument("--no-metrics", action="store_true", help="no metrics counted (a gateway without an admin listener)")
    args = parser.parse_args(argv)
    reactor = MemoryReactorClock()
    channel, transport, endpoint = build(reactor, metrics=not args.no_metrics)
    one(channel, transport, endpoint)
    answer = transport.value()
    assert not answer, answer
    channel.dataReceived(REQUEST)
    endpoint.connections[-1][0].dataReceived(RESPONSE)
    answer = transport.value()
    assert answer.startswith(b"HTTP/1.0 200 OK\r\n") and answer.endswith(BODY), answer[:300]
    assert len(endpoint.connections) == 1, "the upstream connection is reused"
    transport.clear()
    best = float("inf")
    for _ in range(args.batches):
        gc.collect()
        started = time.process_time()
        for _ in range(args.requests):
            one(channel, transport, endpoint)
        best = min(best, (time.process_time() - started) / args.requests)
    observed = "access lines off, " + ("no metrics" if args.no_metrics else "metrics counted")
    print(f"{best * 1e6:.1f} us of gateway Python per keep-alive request ({observed}; best of {args.batches} batches of {args.requests})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
