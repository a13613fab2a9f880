"""
The proxy's two paths for an upstream response, through the real server protocol, ProxyResource, exchange and HTTP/1.1
upstream client on StringTransports: a response whose head and body come in one read is handed over whole
(IResponseReceiver.upstream_whole) and written to the client in one write; one split over reads streams through the
relay.  The client gets the same response either way (framing aside: a chunked body that came whole gets a
Content-Length), and the upstream connection goes back to the pool only when it may.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.testing import MemoryReactorClock, StringTransport

from mtlsgate.accounting import RequestObservers
from mtlsgate.config.model import Route
from mtlsgate.identity import AllowRules
from mtlsgate.proxy.exchange import GatewaySite, ProxyResource, ProxyState, RouteEntry
from mtlsgate.proxy.routing import RouteTable
from mtlsgate.proxy.upstream import UpstreamGroup
from mtlsgate.testing import MemoryEndpoints

REQUEST = b"GET /x HTTP/1.1\r\nHost: gw.test\r\n\r\n"


_Endpoint = MemoryEndpoints


class Records:
    listening = True

    def __init__(self) -> None:
        self.records: list[Any] = []

    def request_finished(self, record: Any) -> None:
        self.records.append(record)


def build() -> tuple[Any, StringTransport, _Endpoint, Records, Any]:
    reactor = MemoryReactorClock()
    route = Route(host="*", to=("https://127.0.0.1:9443",))
    group = UpstreamGroup(reactor, route)
    endpoint = _Endpoint()
    group.agent.endpoints = endpoint  # type: ignore[assignment]
    table = RouteTable([(route.host, route.prefix, RouteEntry(route=route, upstreams=group))])
    records = Records()
    state = ProxyState(routes=table, global_rules=AllowRules(), require_client_certificate=False)
    channel = GatewaySite(ProxyResource(reactor, state, RequestObservers([records]))).buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport, endpoint, records, group


def exchange(pieces: list[bytes], request: bytes = REQUEST) -> tuple[bytes, Records, Any, StringTransport]:
    channel, transport, endpoint, records, group = build()
    channel.dataReceived(request)
    upstream, upstream_transport = endpoint.connections[-1]
    for piece in pieces:
        upstream.dataReceived(piece)
    return transport.value(), records, group, upstream_transport


def _split(response: bytes) -> list[bytes]:
    head_end = response.index(b"\r\n\r\n") + 4
    return [response[:head_end], response[head_end:]]


FIXED = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nETag: e\r\nServer: up\r\n\r\nhello"
CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nETag: e\r\nServer: up\r\n\r\n2\r\nhe\r\n3\r\nllo\r\n0\r\n\r\n"


@pytest.mark.parametrize("response", [FIXED, b"HTTP/1.1 204 No Content\r\nETag: e\r\n\r\n", b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"])
def test_a_response_whole_in_one_read_reaches_the_client_as_one_split_over_reads_does(response):
    whole, whole_records, whole_group, _ = exchange([response])
    split, split_records, split_group, _ = exchange(_split(response))
    assert whole == split and whole.startswith(response.split(b"\r\n", 1)[0])
    assert [(r.status, r.size) for r in whole_records.records] == [(r.status, r.size) for r in split_records.records]
    assert whole_group.agent.pool.idle_count() == split_group.agent.pool.idle_count() == 1


def test_a_chunked_body_that_came_whole_goes_to_the_client_with_its_length_in_one_write():
    channel, transport, endpoint, records, group = build()
    channel.dataReceived(REQUEST)
    upstream, _ = endpoint.connections[-1]
    writes: list[bytes] = []
    transport.writeSequence = lambda parts: writes.append(b"".join(parts))  # type: ignore[method-assign]
    transport.write = writes.append  # type: ignore[method-assign]
    upstream.dataReceived(CHUNKED)
    [answer] = writes
    head, body = answer.split(b"\r\n\r\n", 1)
    assert body == b"hello" and b"\r\nContent-Length: 5" in head and b"Transfer-Encoding" not in head
    assert [(r.status, r.size) for r in records.records] == [(200, 5)]


def test_a_chunked_body_split_over_reads_is_relayed_chunked():
    answer, records, _, _ = exchange(_split(CHUNKED))
    head, body = answer.split(b"\r\n\r\n", 1)
    assert b"Transfer-Encoding: chunked" in head and body.endswith(b"0\r\n\r\n") and b"he" in body and b"llo" in body
    assert [(r.status, r.size) for r in records.records] == [(200, 5)]


def test_a_head_request_gets_the_upstreams_head_whole_and_no_body():
    answer, _, group, _ = exchange([b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"], b"HEAD /x HTTP/1.1\r\nHost: gw.test\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\n")  # the head alone
    assert group.agent.pool.idle_count() == 1


@pytest.mark.parametrize("extra", [b"x", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"])
def test_bytes_after_a_whole_response_are_never_sent_to_the_client_and_the_connection_is_not_pooled(extra):
    answer, _, group, upstream_transport = exchange([FIXED + extra])
    assert answer.endswith(b"\r\n\r\nhello") and answer.count(b"HTTP/1.1") == 1
    assert group.agent.pool.idle_count() == 0 and upstream_transport.disconnecting
