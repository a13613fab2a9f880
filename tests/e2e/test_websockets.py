"""
WebSockets through the real twistd gateway (issue #14): the C{websockets} library as the client, with
a client certificate, and as the upstream, requiring the gateway's client certificate: mTLS both ways.
"""

from __future__ import annotations

import json
import signal
import time
from typing import Any

import pytest
import yaml
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.conftest import TWISTD, Proc, free_port, gateway_config, scrape, subprocess_env, wait_for_port
from tests.websocket_peers import WebSocketUpstream, ws_connect


@pytest.fixture(scope="module")
def upstream(pki):
    server = WebSocketUpstream(pki)
    yield server
    server.stop()


def start(tmp, pki, upstream_port: int, route: dict[str, Any] | None = None, **top: Any) -> Proc:
    """A gateway whose route for localhost allows WebSockets only under /ws (and as C{route} adds); /plain does not."""
    port = free_port()
    config = gateway_config(pki, port, [f"https://127.0.0.1:{upstream_port}"], {"prefix": "/", **(route or {})}, **top)
    base = config["routes"][0]
    config["routes"] = [
        {**base, "prefix": "/plain", "allow_websockets": False},
        {**base, "allow_websockets": True, "allow_client": {"uri": ["spiffe://test/ns/prod/sa/alice"]}, **(route or {})},
    ]
    (tmp / "gw.yaml").write_text(yaml.safe_dump(config))
    argv = [*TWISTD, "-n", "--pidfile=", "--logfile=-", "mtlsgate", "--config", str(tmp / "gw.yaml")]
    proc = Proc(argv, tmp / "gateway.log", cwd=tmp, env=subprocess_env())
    wait_for_port(port, proc.popen, log=proc.log)
    proc.port = port  # type: ignore[attr-defined]
    return proc


@pytest.fixture(scope="module")
def gateway(pki, upstream, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ws")
    admin = free_port()
    proc = start(tmp, pki, upstream.port, admin_address=f"tcp:{admin}:interface=127.0.0.1")
    proc.admin = admin  # type: ignore[attr-defined]
    yield proc
    proc.stop()


def test_text_and_binary_messages_cross_both_ways(gateway, pki, upstream):
    with ws_connect(gateway.port, "/echo", pki) as ws:
        ws.send("hello, upstream")
        assert ws.recv() == "hello, upstream"
        ws.send(b"\x00\x01\xff" * 1000)
        assert ws.recv() == b"\x00\x01\xff" * 1000


def test_the_upstream_may_speak_first(gateway, pki, upstream):
    with ws_connect(gateway.port, "/hello", pki) as ws:
        assert ws.recv() == "hello"
        ws.send("and back")
        assert ws.recv() == "and back"


def test_a_16_mib_message_round_trips(gateway, pki, upstream):
    payload = bytes(range(256)) * (16 * 4096)  # 16 MiB
    with ws_connect(gateway.port, "/echo", pki) as ws:
        ws.send(payload)
        assert ws.recv(timeout=120) == payload


def test_permessage_deflate_is_negotiated_end_to_end(gateway, pki, upstream):
    with ws_connect(gateway.port, "/echo", pki, compression="deflate") as ws:
        assert "permessage-deflate" in (ws.response.headers.get("Sec-WebSocket-Extensions") or "")
        ws.send("compressible " * 1000)
        assert ws.recv() == "compressible " * 1000


MIB = 128
RSS_LIMIT_KIB = 100 * 1024  # as tests/e2e/test_streaming.py: far below what buffering 128 MiB would take


def peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def test_128_mib_each_way_to_a_slow_reader_streams_in_bounded_gateway_memory(gateway, pki, upstream):
    """Each side reads nothing for 3 s while the other sends 128 MiB: without back-pressure the gateway would hold it all."""
    received = 0
    with ws_connect(gateway.port, f"/flood/{MIB}", pki) as ws:
        time.sleep(3)  # a slow reader, not a synchronisation: any speed passes with back-pressure
        while isinstance(message := ws.recv(timeout=120), bytes):
            received += len(message)
        assert message == "done"
    assert received == MIB << 20
    chunk = bytes(range(256)) * 4096
    with ws_connect(gateway.port, "/sink/slow", pki) as ws:
        for _ in range(MIB):
            ws.send(chunk)
        ws.send("end")
        assert ws.recv(timeout=120) == str(MIB << 20)
    assert peak_rss_kib(gateway.popen.pid) < RSS_LIMIT_KIB


def test_ping_and_pong(gateway, pki, upstream):
    with ws_connect(gateway.port, "/echo", pki) as ws:
        assert ws.ping(b"are you there").wait(20)


def test_close_codes_round_trip(gateway, pki, upstream):
    with ws_connect(gateway.port, "/close/4001", pki) as ws:
        ws.send("go")
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=20)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001 and closed.value.rcvd.reason == "bye"
    with ws_connect(gateway.port, "/echo", pki) as ws:
        ws.close(4002, "client says bye")
    _wait_for_close_code(upstream, 4002)  # the first connection's handler may still be returning: wait for this one's


def _wait_for_close_code(upstream, code: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while code not in upstream.closed_codes:
        upstream.done.clear()
        if code in upstream.closed_codes:
            break
        assert upstream.done.wait(max(0.0, deadline - time.monotonic())), f"the upstream saw no close with code {code}: {upstream.closed_codes}"


def test_the_upstream_sees_the_gateways_identity_headers_not_the_clients(gateway, pki, upstream):
    spoofed = {"X-Forwarded-Client-Cert": "Hash=0;URI=spiffe://test/ns/prod/sa/admin", "X-Forwarded-For": "10.9.9.9"}
    with ws_connect(gateway.port, "/echo?who=me", pki, additional_headers=spoofed) as ws:
        ws.send("x")
        ws.recv()
    seen = upstream.handshakes[-1]
    assert seen["path"] == "/echo?who=me"
    assert seen["subject"] == {"commonName": "gateway"}  # the gateway's client certificate, over mTLS
    headers = seen["headers"]
    assert "URI=spiffe://test/ns/prod/sa/alice" in headers["x-forwarded-client-cert"]
    assert "admin" not in headers["x-forwarded-client-cert"]
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["x-forwarded-proto"] == "https"
    assert headers["upgrade"].lower() == "websocket" and "upgrade" in headers["connection"].lower()
    assert headers["sec-websocket-version"] == "13" and headers["sec-websocket-key"]


def test_a_route_without_allow_websockets_refuses_with_403(gateway, pki, upstream):
    before = len(upstream.handshakes)
    with pytest.raises(InvalidStatus) as refused:
        ws_connect(gateway.port, "/plain/echo", pki)
    response = refused.value.response
    assert response.status_code == 403
    assert b"allow_websockets" in response.body
    assert len(upstream.handshakes) == before  # never sent upstream: not even as a plain GET
    assert "refused a WebSocket upgrade" in gateway.wait_for_log("allow_websockets is off")


def test_a_client_the_route_does_not_allow_gets_403_and_never_reaches_the_upstream(gateway, pki, upstream):
    before = len(upstream.handshakes)
    with pytest.raises(InvalidStatus) as refused:
        ws_connect(gateway.port, "/echo", pki, client="bob")
    assert refused.value.response.status_code == 403
    assert b"not allowed here" in refused.value.response.body
    assert len(upstream.handshakes) == before


def test_an_upstream_refusing_the_handshake_is_relayed_as_is(gateway, pki, upstream):
    with pytest.raises(InvalidStatus) as refused:
        ws_connect(gateway.port, "/refuse", pki)
    assert refused.value.response.status_code == 403
    assert refused.value.response.body == b"refused\n"


def _tunnels(admin: int) -> float:
    return scrape(admin).get(("mtlsgate_websocket_tunnels", ()), -1.0)


def _eventually(check, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


def test_open_tunnels_are_a_gauge_and_each_closed_one_an_access_line(gateway, pki, upstream):
    assert _eventually(lambda: _tunnels(gateway.admin) == 0)
    with ws_connect(gateway.port, "/echo?gauge", pki) as ws:
        ws.send("12345")
        assert ws.recv() == "12345"
        assert _tunnels(gateway.admin) == 1
    assert _eventually(lambda: _tunnels(gateway.admin) == 0)
    line = gateway.wait_for_log("GET /echo?gauge HTTP/1.1")
    line = next(ln for ln in line.splitlines() if "/echo?gauge" in ln and " 101 " in ln)
    assert "route=localhost/" in line and "tunnel_in=" in line and "tunnel_out=" in line
    tunnel_in = int(line.split("tunnel_in=")[1].split()[0])
    tunnel_out = int(line.split("tunnel_out=")[1].split()[0])
    assert tunnel_in >= 5 + 6 and tunnel_out >= 5 + 2  # the masked client frame and the upstream's frame, at least
    assert scrape(gateway.admin)[("mtlsgate_requests_total", (("route", "localhost/"), ("status", "101")))] >= 1


def test_an_idle_tunnel_is_closed(pki, upstream, tmp_path):
    gw = start(tmp_path, pki, upstream.port, {"websocket_idle_timeout": "1s"})
    try:
        with ws_connect(gw.port, "/echo", pki) as ws:
            ws.send("still here")
            assert ws.recv() == "still here"
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=30)  # nothing crosses it: closed after a second
        assert "websocket_idle_timeout" in gw.wait_for_log("closing a tunnel idle")
    finally:
        gw.stop()


def test_shutdown_lets_tunnels_run_through_the_drain_then_sends_going_away(pki, upstream, tmp_path):
    gw = start(tmp_path, pki, upstream.port, limits={"shutdown_timeout": "4s"})
    try:
        with ws_connect(gw.port, "/echo", pki) as ws:
            ws.send("before")
            assert ws.recv() == "before"
            gw.signal(signal.SIGTERM)
            gw.wait_for_log("waiting up to 4s")
            ws.send("during the drain")  # the tunnel goes on while requests in flight may finish
            assert ws.recv(timeout=10) == "during the drain"
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=30)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
        assert gw.popen.wait(30) in (0, -signal.SIGTERM)  # twistd re-raises the signal it stopped on
        assert "closed (shutdown)" in gw.output()
    finally:
        gw.stop()


def test_the_config_check_knows_the_keys(pki, upstream, tmp_path):
    from mtlsgate.config.load import config_from_mapping

    config = config_from_mapping(json.loads(json.dumps(gateway_config(pki, 1, ["https://127.0.0.1:1"], {"allow_websockets": True},
                                                                      websocket_idle_timeout="2m"))))  # fmt: skip
    assert config.routes[0].allow_websockets and config.routes[0].websocket_idle_timeout == 120.0


def test_through_a_worker_group(pki, upstream, tmp_path):
    admin = free_port()
    gw = start(tmp_path, pki, upstream.port, workers=2, admin_address=f"tcp:{admin}:interface=127.0.0.1")
    try:
        wait_for_port(admin, gw.popen, log=gw.log)
        with ws_connect(gw.port, "/echo", pki) as ws:
            ws.send("via a worker")
            assert ws.recv() == "via a worker"
            assert _tunnels(admin) == 1  # summed over the workers
        assert _eventually(lambda: _tunnels(admin) == 0)
    finally:
        gw.stop()
