"""
Attack class: memory amplification by tiny frames.  The gateway promises that one HTTP/2 connection
makes it hold at most its 1 MiB receive window of request bodies.  Measured in bytes of the window,
that holds; measured in memory, a body sent as 2-byte DATA frames used to be held as one Python
object per frame (about 24 times its size), so a connection's window became tens of megabytes.  The
client sends 16 streams' windows in 2-byte frames to a route whose upstream never takes the body
(it accepts TCP and never finishes TLS, so every byte waits in the gateway), and the gateway's VmRSS
must grow by little more than the window.  The same for responses: an upstream writing its body in
1-byte chunks to streams whose client never opens its window made each waiting byte an object of
its own in the stream's queue.
"""

from __future__ import annotations

import socket
import threading

import h2.config
import h2.connection
import h2.events
import pytest
import yaml
from h2.settings import SettingCodes

from tests.conftest import free_port, gateway_config
from tests.h2peer import H2Client
from tests.tcp_peers import CountingUpstream, tls_upstream_context

STREAMS = 16
RESPONSES = 32
UPSTREAM_STREAMS = 4
UPSTREAM_FRAMES = 96 * 1024  # 192 KiB a stream in 2-byte frames: 64 KiB wait in the client's queue, the rest in the upstream stream's
FRAME_DATA = b"ab"


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


@pytest.fixture
def silent_upstream():
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)  # never accepts: the kernel completes TCP, nobody speaks TLS
    yield listener.getsockname()[1]
    listener.close()


@pytest.fixture
def gateway(start_gateway, pki, silent_upstream, tmp_path):
    port = free_port()
    config = gateway_config(pki, port, [f"https://127.0.0.1:{silent_upstream}"], {"connect_timeout": "120s", "timeout": "120s"})
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(config))
    return start_gateway(["--config", str(path)], port=port)


def test_a_window_sent_in_two_byte_frames_costs_about_a_window_of_memory(gateway, pki):
    pid = gateway.proc.popen.pid
    with H2Client(gateway.port, pki, timeout=300) as warm:
        warm.ping()
        sid = warm.request("POST", "/warm", end=False)
        warm.send_raw(b"".join(b"\x00\x00\x02\x00\x00" + sid.to_bytes(4, "big") + FRAME_DATA for _ in range(1000)))
        warm.ping()
    before = rss_kib(pid)
    with H2Client(gateway.port, pki, timeout=300) as c:
        c.ping()
        window = c.conn.remote_settings.initial_window_size
        frames_per_stream = window // len(FRAME_DATA)
        for _ in range(STREAMS):
            sid = c.request("POST", "/tiny-frames", end=False)
            frame = b"\x00\x00\x02\x00\x00" + sid.to_bytes(4, "big") + FRAME_DATA
            c.send_raw(frame * frames_per_stream)  # a stream's whole window, one 2-byte frame at a time
        c.ping()  # the gateway has handled every frame before it
        held = STREAMS * frames_per_stream * len(FRAME_DATA)
        grown = rss_kib(pid) - before
        assert c.goaway is None
    assert grown * 1024 < 4 * held + 4 * 1024 * 1024, f"{held} bytes of body held cost {grown} KiB"


class TinyChunksUpstream(CountingUpstream):
    """An HTTP/1.1 upstream whose response body comes in 1-byte chunks (as an event stream's small writes do)."""

    def serve(self, conn) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = conn.recv(65536)
            if not chunk:
                return
            head += chunk
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1\r\nx\r\n" * 100_000 + b"0\r\n\r\n")
        while conn.recv(65536):
            pass


@pytest.fixture
def tiny_chunks_gateway(start_gateway, pki, tmp_path):
    upstream = TinyChunksUpstream(tls_upstream_context(pki))
    port = free_port()
    config = gateway_config(pki, port, [f"https://127.0.0.1:{upstream.port}"], {"timeout": "120s"})
    path = tmp_path / "gw-tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    yield start_gateway(["--config", str(path)], port=port)
    upstream.stop()


def test_responses_waiting_for_a_shut_window_in_tiny_pieces_cost_about_their_size(tiny_chunks_gateway, pki):
    pid = tiny_chunks_gateway.proc.popen.pid
    with H2Client(tiny_chunks_gateway.port, pki, auto_ack=False) as warm:
        warm.ping()
    before = rss_kib(pid)
    with H2Client(tiny_chunks_gateway.port, pki, auto_ack=False, timeout=120) as c:
        c.conn.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 0})  # every response byte has to wait in the gateway
        c.flush()
        ids = [c.request("GET", f"/tiny/{i}") for i in range(RESPONSES)]
        c.read(lambda: all(c.streams[sid].status is not None for sid in ids))
        c.ping()
        grown = rss_kib(pid) - before
        assert c.goaway is None
    held = RESPONSES * 100_000  # at most each body, whole: a producer is paused once 64 KiB wait
    assert grown * 1024 < 2 * held + 4 * 1024 * 1024, f"{RESPONSES} responses waiting in 1-byte pieces cost {grown} KiB"


class TinyFramesH2Upstream(CountingUpstream):
    """An HTTP/2 upstream (TLS, ALPN h2) answering each stream with UPSTREAM_FRAMES 2-byte DATA frames, written raw."""

    def __init__(self, tls) -> None:
        self.sent = 0
        self.all_sent = threading.Event()
        super().__init__(tls)

    def serve(self, conn) -> None:
        h2conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        h2conn.initiate_connection()
        conn.sendall(h2conn.data_to_send())
        while data := conn.recv(65536):
            for event in h2conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    h2conn.send_headers(event.stream_id, [(b":status", b"200"), (b"content-type", b"text/plain")])
                    conn.sendall(h2conn.data_to_send())
                    frame = b"\x00\x00\x02\x00\x00" + event.stream_id.to_bytes(4, "big") + FRAME_DATA
                    conn.sendall(frame * UPSTREAM_FRAMES)  # within the gateway's 256 KiB stream window; never ended
                    self.sent += 1
                    if self.sent == UPSTREAM_STREAMS:
                        self.all_sent.set()
            conn.sendall(h2conn.data_to_send())


@pytest.fixture
def tiny_frames_upstream(pki):
    ctx = tls_upstream_context(pki)
    ctx.set_alpn_protocols(["h2"])
    upstream = TinyFramesH2Upstream(ctx)
    yield upstream
    upstream.stop()


def test_an_http2_upstreams_tiny_frames_kept_for_a_paused_stream_cost_about_their_size(start_gateway, pki, tmp_path, tiny_frames_upstream):
    port = free_port()
    route = {"timeout": "120s", "upstream_protocol": "http2"}
    config = gateway_config(pki, port, [f"https://127.0.0.1:{tiny_frames_upstream.port}"], route)
    path = tmp_path / "gw-h2.yaml"
    path.write_text(yaml.safe_dump(config))
    gateway = start_gateway(["--config", str(path)], port=port)
    pid = gateway.proc.popen.pid
    with H2Client(gateway.port, pki, auto_ack=False) as warm:
        warm.ping()
    before = rss_kib(pid)
    with H2Client(gateway.port, pki, auto_ack=False, timeout=120) as c:
        c.conn.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 0})  # nothing leaves the gateway: past 64 KiB the upstream's stream is paused
        c.flush()
        ids = [c.request("GET", f"/tiny/{i}") for i in range(UPSTREAM_STREAMS)]
        c.read(lambda: all(c.streams[sid].status is not None for sid in ids))
        # the upstream's sendall returns once the gateway has read all but a socket buffer of its frames
        assert tiny_frames_upstream.all_sent.wait(60)
        c.ping()
        grown = rss_kib(pid) - before
    held = UPSTREAM_STREAMS * UPSTREAM_FRAMES * len(FRAME_DATA)
    assert grown * 1024 < 2 * held + 4 * 1024 * 1024, f"{held} bytes kept for paused streams cost {grown} KiB"
