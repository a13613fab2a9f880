"""
The HTTP/2 upstream client (mtlsgate.http.h2client) against real peers, on the real reactor: a
grpcio server requiring the gateway's client certificate (unary, streaming both ways, trailers, a
deadline, an error status, many calls multiplexed on one connection), and the route's TLS settings
as the gateway builds them (UpstreamGroup: CA, client certificate, server name, ALPN h2).
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, task
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from mtlsgate.config.model import Route
from mtlsgate.http.client import BytesBody
from mtlsgate.http.h2client import H2Agent
from mtlsgate.proxy.upstream import UpstreamGroup
from tests.agent_body import Collect
from tests.grpc_peer import GRPCServer, frame, unframe


@implementer(IBodyProducer)
class Chunks:
    """A request body written in pieces, one per reactor turn, of unknown length."""

    def __init__(self, reactor: Any, pieces: list[bytes]) -> None:
        self.length = UNKNOWN_LENGTH
        self.reactor = reactor
        self.pieces = list(pieces)

    @defer.inlineCallbacks
    def startProducing(self, consumer: Any) -> Any:
        for piece in self.pieces:
            yield task.deferLater(self.reactor, 0.01, lambda: None)
            consumer.write(piece)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


@pytest.fixture
def grpc_upstream(pki):
    server = GRPCServer(pki["upstream"][0], pki["upstream"][1], pki["ca"])
    yield server
    server.stop()


def _agent(pki: dict[str, Any], port: int, **route: Any) -> tuple[H2Agent, str]:
    from twisted.internet import reactor

    settings: dict[str, Any] = dict(
        host="localhost", to=(f"https://127.0.0.1:{port}",), tls_custom_ca_file=pki["ca"],
        tls_client_cert_file=pki["gateway_client"][0], tls_client_key_file=pki["gateway_client"][1], upstream_protocol="http2",
    )  # fmt: skip
    settings.update(route)
    group = UpstreamGroup(reactor, Route(**settings))
    assert isinstance(group.agent, H2Agent)
    return group.agent, f"https://127.0.0.1:{port}"


def _grpc_headers(**extra: bytes) -> Headers:
    headers = Headers({b"content-type": [b"application/grpc"], b"te": [b"trailers"]})
    for name, value in extra.items():
        headers.setRawHeaders(name.replace("_", "-").encode(), [value])
    return headers


async def _call(agent: H2Agent, base: str, method: str, body: Any, **headers: bytes) -> tuple[Any, Collect]:
    response = await agent.request(b"POST", f"{base}/test.Echo/{method}".encode(), _grpc_headers(**headers), body)
    collect = Collect()
    response.deliverBody(collect)
    [reason] = await collect.done
    assert reason.check(ResponseDone), reason
    return response, collect


@pytest_twisted.ensureDeferred
async def test_unary_call_with_trailers_over_mtls(pki, grpc_upstream):
    agent, base = _agent(pki, grpc_upstream.port)
    try:
        response, body = await _call(agent, base, "Unary", BytesBody(frame(b"hi")), x_forwarded_client_cert=b"Hash=ab")
        assert response.code == 200 and response.version == (b"HTTP", 2, 0)
        assert response.headers.getRawHeaders(b"content-type") == [b"application/grpc"]
        assert unframe(body.data) == [b"echo:hi"]
        trailers = dict(response.trailers)
        assert trailers[b"grpc-status"] == b"0"
        assert trailers[b"x-trailer"] == b"done"
        assert trailers[b"x-xfcc"] == b"Hash=ab"
    finally:
        await agent.close()


@pytest_twisted.ensureDeferred
async def test_server_stream_client_stream_and_bidi(pki, grpc_upstream):
    from twisted.internet import reactor

    agent, base = _agent(pki, grpc_upstream.port)
    try:
        response, body = await _call(agent, base, "ServerStream", BytesBody(frame(b"5")))
        assert unframe(body.data) == [b"0", b"1", b"2", b"3", b"4"]
        assert dict(response.trailers)[b"grpc-status"] == b"0"
        response, body = await _call(agent, base, "ClientStream", Chunks(reactor, [frame(b"a"), frame(b"b"), frame(b"c")]))
        assert unframe(body.data) == [b"a,b,c"]
        response, body = await _call(agent, base, "Bidi", Chunks(reactor, [frame(b"x"), frame(b"y")]))
        assert unframe(body.data) == [b"re:x", b"re:y"]
    finally:
        await agent.close()


@pytest_twisted.ensureDeferred
async def test_error_status_and_grpc_timeout_arrive(pki, grpc_upstream):
    agent, base = _agent(pki, grpc_upstream.port)
    try:
        response, body = await _call(agent, base, "Fail", BytesBody(frame(b"")))
        # a trailers-only response: grpc-status in the headers, no body
        status = response.headers.getRawHeaders(b"grpc-status") or [dict(response.trailers).get(b"grpc-status")]
        assert status == [b"3"]
        response, body = await _call(agent, base, "Deadline", BytesBody(frame(b"")), grpc_timeout=b"5S")
        remaining = float(unframe(body.data)[0])
        assert 0 < remaining <= 5
    finally:
        await agent.close()


@pytest_twisted.ensureDeferred
async def test_many_calls_share_one_connection(pki, grpc_upstream):
    agent, base = _agent(pki, grpc_upstream.port)
    try:
        results = await defer.gatherResults([
            defer.ensureDeferred(_call(agent, base, "Unary", BytesBody(frame(b"%d" % i)))) for i in range(20)
        ])  # fmt: skip
        assert sorted(unframe(body.data)[0] for _, body in results) == sorted(b"echo:%d" % i for i in range(20))
        assert agent.connection_count() == 1
    finally:
        await agent.close()


@pytest_twisted.ensureDeferred
async def test_the_stream_limit_opens_a_second_connection(pki, grpc_upstream):
    agent, base = _agent(pki, grpc_upstream.port)
    agent.max_streams = 2
    try:
        results = await defer.gatherResults([
            defer.ensureDeferred(_call(agent, base, "Unary", BytesBody(frame(b"%d" % i)))) for i in range(5)
        ])  # fmt: skip
        assert len(results) == 5
        assert agent.connection_count() >= 2
    finally:
        await agent.close()


@pytest_twisted.ensureDeferred
async def test_without_the_client_certificate_the_upstream_refuses(pki, grpc_upstream):
    agent, base = _agent(pki, grpc_upstream.port, tls_client_cert_file=None, tls_client_key_file=None)
    try:
        with pytest.raises(Exception) as e:
            await _call(agent, base, "Unary", BytesBody(frame(b"hi")))
        assert not isinstance(e.value, AssertionError)
    finally:
        await agent.close()


@pytest_twisted.ensureDeferred
async def test_cancelling_a_call_resets_its_stream_and_the_connection_goes_on(pki, grpc_upstream):
    agent, base = _agent(pki, grpc_upstream.port)
    try:
        await _call(agent, base, "Unary", BytesBody(frame(b"before")))  # the connection is up
        d = agent.request(b"POST", f"{base}/test.Echo/Sleep".encode(), _grpc_headers(), BytesBody(frame(b"")))
        d.cancel()
        with pytest.raises(defer.CancelledError):
            await d
        response, body = await _call(agent, base, "Unary", BytesBody(frame(b"after")))
        assert unframe(body.data) == [b"echo:after"]
        assert agent.connection_count() == 1
    finally:
        await agent.close()
