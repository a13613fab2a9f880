"""
Attack class: HTTP/2 slowloris.  Over HTTP/1.1 a connection that moves no byte for C{idle_timeout} is
closed, and a connection carries one request, so a stalled request body or a response the client
never reads costs the client a connection each.  Over HTTP/2 one connection carries 100 streams, and
a PING now and then is a byte: a client that opens streams, never ends their bodies (or never opens
their windows to take the response) and pings would hold 100 upstream requests per connection for
ever.  The gateway bounds each stream that waits on the client by C{idle_timeout} (RST_STREAM CANCEL,
the upstream request cancelled); a stream that waits on the upstream is the route timeout's, not this.
"""

from __future__ import annotations

import time

import pytest
import yaml
from h2.errors import ErrorCodes

from tests.conftest import free_port, gateway_config
from tests.h2peer import H2Client

IDLE = 2.0


@pytest.fixture
def gateway(start_gateway, pki, echo_upstream, tmp_path):
    port = free_port()
    config = gateway_config(pki, port, [f"https://127.0.0.1:{echo_upstream}"], {"timeout": "30s"}, limits={"idle_timeout": f"{IDLE:g}s"})
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    return start_gateway(["--config", str(path)], port=port)


def _keep_pinging(client: H2Client, until, seconds: float) -> None:
    """Keep the connection busy with PINGs (bytes both ways, well inside idle_timeout) until C{until()} or C{seconds} pass."""
    deadline = time.monotonic() + seconds
    while not until() and time.monotonic() < deadline and not client.closed:
        client.ping()
        client.dawdle(IDLE / 4)


def test_a_request_body_that_never_ends_is_not_kept_alive_by_pings(gateway, pki):
    with H2Client(gateway.port, pki) as c:
        sid = c.request("POST", "/stalled-body", headers=[(b"content-length", b"100")], end=False)
        c.conn.send_data(sid, b"x" * 10)
        c.flush()
        _keep_pinging(c, lambda: c.streams[sid].done, 8 * IDLE)
        stream = c.streams[sid]
        assert stream.done, "the stream waited on the client's body for ever"
        assert stream.reset == ErrorCodes.CANCEL or (stream.status is not None and stream.status >= 400)
        assert not c.closed and c.goaway is None  # only the stalled stream goes; the connection serves on
        assert c.response(c.request("GET", "/after")).status == 200
    assert "Traceback" not in gateway.proc.output()


def test_a_response_the_client_never_takes_is_not_kept_alive_by_pings(gateway, pki):
    with H2Client(gateway.port, pki, auto_ack=False) as c:
        # 1 MiB: more than the stream's default 64 KiB window, which the client never opens
        sid = c.request("GET", "/bytes/1048576")
        _keep_pinging(c, lambda: c.streams[sid].done, 8 * IDLE)
        stream = c.streams[sid]
        assert stream.done, "the stream waited on the client's window for ever"
        assert stream.reset == ErrorCodes.CANCEL
        assert len(stream.body) < 1048576
    assert "Traceback" not in gateway.proc.output()


def test_a_stream_waiting_on_a_slow_upstream_is_the_route_timeouts_not_idle_timeouts(gateway, pki):
    with H2Client(gateway.port, pki) as c:
        sid = c.request("GET", f"/slow/{3 * IDLE:g}")
        _keep_pinging(c, lambda: c.streams[sid].done, 10 * IDLE)
        assert c.streams[sid].status == 200


def test_a_slow_but_steady_upload_is_served(gateway, pki):
    with H2Client(gateway.port, pki) as c:
        sid = c.request("POST", "/steady", headers=[(b"content-length", b"6")], end=False)
        for i in range(6):  # one byte every IDLE/2: 3 x IDLE in all, never IDLE without progress
            c.conn.send_data(sid, b"x", end_stream=i == 5)
            c.flush()
            c.dawdle(IDLE / 2)
        assert c.response(sid).status == 200


def test_a_connection_without_streams_is_not_kept_open_by_pings(gateway, pki):
    with H2Client(gateway.port, pki) as c:
        assert c.response(c.request("GET", "/first")).status == 200
        _keep_pinging(c, lambda: c.goaway is not None, 8 * IDLE)
        assert c.goaway is not None and c.goaway.error_code == ErrorCodes.NO_ERROR, "PINGs held an idle connection open"


def test_a_header_block_trickled_in_continuation_frames_is_cut_off(gateway, pki):
    """HEADERS without END_HEADERS, then a CONTINUATION frame every IDLE/2: no request ever starts, the connection must end."""
    from hpack import Encoder
    from hyperframe.frame import ContinuationFrame, HeadersFrame

    block = Encoder().encode([(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"localhost"), (b":path", b"/trickle")])
    with H2Client(gateway.port, pki) as c:
        c.ping()
        c.send_raw(HeadersFrame(1, data=block).serialize())  # no END_HEADERS flag
        deadline = time.monotonic() + 16 * IDLE
        frames = 0
        while time.monotonic() < deadline and not c.closed and frames < 60:
            try:
                c.send_raw(ContinuationFrame(1, data=Encoder().encode([(b"x-pad", b"y")])).serialize())
            except OSError:
                break
            frames += 1
            c.dawdle(IDLE / 2)
        assert c.closed or c.goaway is not None, f"{frames} CONTINUATION frames over {frames * IDLE / 2:g}s kept a header block open"
