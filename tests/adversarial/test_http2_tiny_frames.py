"""
Attack class: memory amplification by tiny frames.  The gateway promises that one HTTP/2 connection
makes it hold at most its 1 MiB receive window of request bodies.  Measured in bytes of the window,
that holds; measured in memory, a body sent as 2-byte DATA frames used to be held as one Python
object per frame (about 24 times its size), so a connection's window became tens of megabytes.  The
client sends 16 streams' windows in 2-byte frames to a route whose upstream never takes the body
(it accepts TCP and never finishes TLS, so every byte waits in the gateway), and the gateway's VmRSS
must grow by little more than the window.
"""

from __future__ import annotations

import socket

import pytest
import yaml

from tests.conftest import free_port, gateway_config
from tests.h2peer import H2Client

STREAMS = 16
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
