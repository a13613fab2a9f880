"""
Attack class: byte order and back-pressure under "sending at once" (mtlsgate/tls/fastwrite.py) on
the connections that carry many flows: HTTP/2 streams whose client holds its flow-control windows
shut and opens them again (the gateway's writes stall, then resume, across streams whose bodies
straddle the 16 KiB record threshold), and a WebSocket tunnel whose client stops reading while the upstream floods it.

The decision: every stream and every message arrives whole, once, in order (seeded random bytes,
compared whole); a client that holds its window or stops reading holds back its own flows and the
gateway's memory stays bounded; the connection serves on when it resumes.
"""

from __future__ import annotations


import pytest
import yaml

from tests.adversarial.send_at_once_peers import RandomUpstream, body_for, random_route_config, tree_rss, wait_until_still
from tests.conftest import free_port, gateway_config
from tests.h2peer import H2Client
from tests.websocket_peers import WebSocketUpstream, ws_connect

STREAM_SIZES = [16383, 16384, 16385, 1, 65535, 65536, 65537, 0, 1048577, 2]
WINDOW = 65535  # the client's connection window: all the gateway may send until the client opens it


@pytest.fixture
def upstream(pki):
    peer = RandomUpstream(pki)
    yield peer
    peer.stop()


def test_http2_streams_stalled_by_flow_control_then_resumed_arrive_whole(start_gateway, pki, tmp_path, upstream):
    port = free_port()
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(random_route_config(pki, port, upstream.port)))
    gateway = start_gateway(["--config", str(path)], port=port)
    with H2Client(gateway.port, pki, auto_ack=False) as c:
        ids = {c.request("GET", f"/rand/{size}/{400 + i}"): (size, 400 + i) for i, size in enumerate(STREAM_SIZES)}
        acked = dict.fromkeys(ids, 0)

        def unacked() -> int:
            return sum(len(c.streams[sid].body) - acked[sid] for sid in ids)

        stalls = 0
        while not all(c.streams[sid].done for sid in ids):
            # the gateway fills the connection window, then must stop: the event is the window used up
            c.read(lambda: unacked() >= WINDOW or all(c.streams[sid].done for sid in ids))
            stalls += unacked() >= WINDOW
            opened = 0
            for sid in ids:  # open the windows again, for exactly what arrived (WINDOW_UPDATE frames, not h2's batching)
                grown = len(c.streams[sid].body) - acked[sid]
                if grown:
                    acked[sid] += grown
                    opened += grown
                    if not c.streams[sid].done:
                        c.conn.increment_flow_control_window(grown, sid)
            if opened:
                c.conn.increment_flow_control_window(opened)
            c.flush()
        assert stalls >= 10, "the windows never shut: the test proves nothing"
        for sid, (size, seed) in ids.items():
            stream = c.streams[sid]
            assert stream.status == 200 and stream.reset is None
            assert bytes(stream.body) == body_for(size, seed), f"stream {sid} ({size} bytes) is not what the upstream sent"
        after = c.request("GET", "/rand/16385/500")
        c.auto_ack = True
        assert bytes(c.response(after).body) == body_for(16385, 500)
    assert "Traceback" not in gateway.proc.output()


def test_a_websocket_tunnel_whose_client_stops_reading_holds_back_the_upstream_then_delivers_everything(start_gateway, pki, tmp_path):
    """
    The upstream sends 64 MiB in 1 MiB messages; the client holds two and reads nothing more until
    the flow has stopped.  (Frames both ways at once are not tried with these peers: the websockets
    library's sync connections hold their lock while a send blocks, so two saturated peers deadlock
    each other whatever sits between them.)
    """
    ws = WebSocketUpstream(pki)
    try:
        port = free_port()
        path = tmp_path / "gateway.yaml"
        config = gateway_config(pki, port, [f"https://127.0.0.1:{ws.port}"], {"allow_websockets": True, "timeout": "60s"})
        path.write_text(yaml.safe_dump(config))
        gateway = start_gateway(["--config", str(path)], port=port)
        chunk = bytes(range(256)) * 4096
        before = tree_rss(gateway.proc.popen.pid)
        client = ws_connect(gateway.port, "/flood/64", pki, max_queue=(2, 1))  # the client holds two messages: the rest waits on the way
        try:
            first = client.recv(timeout=30)
            out = wait_until_still(lambda: tree_rss(gateway.proc.popen.pid) >> 20)  # the flow has stopped: the gateway's memory no longer moves
            grown = tree_rss(gateway.proc.popen.pid) - before
            assert grown < 48 * 2**20, f"the gateway grew by {grown / 2**20:.1f} MiB holding a stalled tunnel ({out} MiB)"
            messages = [first] + [client.recv(timeout=30) for _ in range(63)]
            assert all(message == chunk for message in messages)
            assert client.recv(timeout=30) == "done"
        finally:
            client.close()
    finally:
        ws.stop()
    assert "Traceback" not in gateway.proc.output()
