"""
gRPC end to end over mTLS both ways: a real grpcio client presenting a client certificate, the real
gateway process (HTTP/2 front end, a route with C{upstream_protocol: http2}), and a real grpcio server
that requires the gateway's client certificate.  Unary, server streaming, client streaming, bidi,
trailers (grpc-status, grpc-message, custom trailing metadata), deadlines (grpc-timeout forwarded; a
deadline exceeded is a gRPC error), and a refused client gets PERMISSION_DENIED, not HTML.
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest
import yaml

from tests.conftest import free_port, gateway_config
from tests.grpc_peer import GRPCServer, call, channel


@pytest.fixture
def grpc_upstream(pki):
    server = GRPCServer(pki["upstream"][0], pki["upstream"][1], pki["ca"])
    yield server
    server.stop()


@pytest.fixture
def gateway(start_gateway, pki, tmp_path, grpc_upstream):
    port = free_port()
    route = {"upstream_protocol": "http2", "allow_client": {"uri": ["spiffe://test/ns/prod/sa/alice"]}, "timeout": "20s"}
    config = gateway_config(pki, port, [f"https://127.0.0.1:{grpc_upstream.port}"], route, downstream_mtls={"ca_file": pki["ca"], "enforcement": "policy"})
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(config))
    return start_gateway(["--config", str(path)], port=port)


@pytest.fixture
def alice(gateway, pki):
    ch = channel(gateway.port, pki["ca"], pki["alice"])
    yield ch
    ch.close()


def test_unary_with_trailing_metadata_and_the_clients_identity_upstream(alice):
    response, rpc = call(alice, "Unary").with_call(b"hi", timeout=30)
    assert response == b"echo:hi"
    assert rpc.code() == grpc.StatusCode.OK
    trailing = dict(rpc.trailing_metadata())
    assert trailing["x-trailer"] == "done"
    assert "URI=spiffe://test/ns/prod/sa/alice" in trailing["x-xfcc"]  # the gateway's XFCC, from alice's certificate


def test_server_streaming(alice):
    assert list(call(alice, "ServerStream", "unary_stream")(b"500", timeout=30)) == [str(i).encode() for i in range(500)]


def test_client_streaming(alice):
    assert call(alice, "ClientStream", "stream_unary")(iter([b"a", b"b", b"c"]), timeout=30) == b"a,b,c"


def test_bidi_streaming_answers_as_requests_arrive(alice):
    import queue

    requests: queue.Queue[Any] = queue.Queue()

    def source():
        while (item := requests.get()) is not None:
            yield item

    responses = call(alice, "Bidi", "stream_stream")(source(), timeout=30)
    for word in (b"one", b"two", b"three"):
        requests.put(word)
        assert next(responses) == b"re:" + word  # answered before the next request is even sent
    requests.put(None)
    assert list(responses) == []


def test_an_error_status_and_message_reach_the_client(alice):
    with pytest.raises(grpc.RpcError) as e:
        call(alice, "Fail")(b"", timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details() == "bad thing"


def test_the_deadline_is_forwarded_and_exceeding_it_is_deadline_exceeded(alice):
    remaining = float(call(alice, "Deadline")(b"", timeout=10))
    assert 0 < remaining <= 10  # the upstream got grpc-timeout
    with pytest.raises(grpc.RpcError) as e:
        call(alice, "Sleep")(b"", timeout=1)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert call(alice, "Unary")(b"after", timeout=30) == b"echo:after"  # and the connection goes on


def test_many_concurrent_calls(alice):
    futures = [call(alice, "Unary").future(b"%d" % i, timeout=30) for i in range(50)]
    assert sorted(f.result() for f in futures) == sorted(b"echo:%d" % i for i in range(50))


def test_a_refused_client_gets_permission_denied(gateway, pki):
    ch = channel(gateway.port, pki["ca"], pki["bob"])  # a valid certificate, but not allowed on this route
    try:
        with pytest.raises(grpc.RpcError) as e:
            call(ch, "Unary")(b"hi", timeout=30)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "not allowed here" in e.value.details()
    finally:
        ch.close()


def test_a_client_whose_certificate_does_not_verify_gets_permission_denied(gateway, pki):
    ch = channel(gateway.port, pki["ca"], pki["stranger"])  # policy enforcement: the handshake passes, the request is refused
    try:
        with pytest.raises(grpc.RpcError) as e:
            call(ch, "Unary")(b"hi", timeout=30)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        ch.close()


def test_the_routes_own_timeout_is_deadline_exceeded_not_html(start_gateway, pki, tmp_path, grpc_upstream):
    port = free_port()
    config = gateway_config(pki, port, [f"https://127.0.0.1:{grpc_upstream.port}"], {"upstream_protocol": "http2", "timeout": "1s"})
    path = tmp_path / "gw-timeout.yaml"
    path.write_text(yaml.safe_dump(config))
    gateway = start_gateway(["--config", str(path)], port=port)
    ch = channel(gateway.port, pki["ca"], pki["alice"])
    try:
        with pytest.raises(grpc.RpcError) as e:
            call(ch, "Sleep")(b"", timeout=60)  # the client would wait; the gateway's route timeout (504) ends it
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "504" in e.value.details()
    finally:
        ch.close()


def test_a_dead_upstream_is_unavailable(start_gateway, pki, tmp_path):
    port = free_port()
    config = gateway_config(pki, port, [f"https://127.0.0.1:{free_port()}"], {"upstream_protocol": "http2"})
    path = tmp_path / "gw-dead.yaml"
    path.write_text(yaml.safe_dump(config))
    gateway = start_gateway(["--config", str(path)], port=port)
    ch = channel(gateway.port, pki["ca"], pki["alice"])
    try:
        with pytest.raises(grpc.RpcError) as e:
            call(ch, "Unary")(b"", timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "502" in e.value.details()
    finally:
        ch.close()


def test_256_mib_each_way_streams_in_bounded_gateway_memory(gateway, alice):
    from tests.e2e.test_streaming import RSS_LIMIT_KIB, peak_rss_kib

    message = b"m" * (1 << 20)
    assert call(alice, "Count", "stream_unary")((message for _ in range(256)), timeout=120) == str(256 << 20).encode()
    received = sum(len(m) for m in call(alice, "Blob", "unary_stream")(b"256 1048576", timeout=120))
    assert received == 256 << 20
    assert peak_rss_kib(gateway.proc.popen.pid) < RSS_LIMIT_KIB


def test_a_reload_keeps_a_streaming_call_in_flight_and_new_calls_work(gateway, alice):
    import queue
    import signal

    requests: queue.Queue[Any] = queue.Queue()

    def source():
        while (item := requests.get()) is not None:
            yield item

    responses = call(alice, "Bidi", "stream_stream")(source(), timeout=60)
    requests.put(b"before")
    assert next(responses) == b"re:before"
    gateway.proc.signal(signal.SIGHUP)  # the old upstream agent is retired: its busy connection closes when the call ends
    gateway.proc.wait_for_log("reloaded:")
    requests.put(b"after")
    assert next(responses) == b"re:after"
    requests.put(None)
    assert list(responses) == []
    assert call(alice, "Unary")(b"new", timeout=30) == b"echo:new"  # on the new agent's connection


def test_grpc_health_checks_take_a_not_serving_upstream_out_and_bring_it_back(start_gateway, pki, tmp_path):
    servers = [GRPCServer(pki["upstream"][0], pki["upstream"][1], pki["ca"], health=True) for _ in range(2)]
    bare = GRPCServer(pki["upstream"][0], pki["upstream"][1], pki["ca"])  # no health service: UNIMPLEMENTED
    try:
        port = free_port()
        targets = [f"https://127.0.0.1:{s.port}" for s in (*servers, bare)]
        health = {"grpc": True, "interval": "200ms", "timeout": "2s", "unhealthy_threshold": 1, "healthy_threshold": 1}
        config = gateway_config(pki, port, targets, {"upstream_protocol": "http2", "health_check": health})
        path = tmp_path / "gw-health.yaml"
        path.write_text(yaml.safe_dump(config))
        gateway = start_gateway(["--config", str(path)], port=port)
        log = gateway.proc.wait_for_log(f"upstream https://127.0.0.1:{bare.port} of route localhost/ is down: GRPCUnhealthy: grpc-status 12")
        assert "/grpc.health.v1.Health/Check" in log
        servers[1].serving = False
        gateway.proc.wait_for_log(f"upstream https://127.0.0.1:{servers[1].port} of route localhost/ is down: GRPCUnhealthy: NOT_SERVING")
        ch = channel(gateway.port, pki["ca"], pki["alice"])
        try:
            assert {call(ch, "Whoami")(b"", timeout=30) for _ in range(6)} == {str(servers[0].port).encode()}
            servers[1].serving = True
            gateway.proc.wait_for_log(f"upstream https://127.0.0.1:{servers[1].port} of route localhost/ is up")
            assert {call(ch, "Whoami")(b"", timeout=30) for _ in range(6)} == {str(s.port).encode() for s in servers}
        finally:
            ch.close()
    finally:
        for server in (*servers, bare):
            server.stop()
