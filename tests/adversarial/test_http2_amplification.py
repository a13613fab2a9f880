"""
Attack class: HTTP/2 frames that are cheap to send and dear to handle.  An HPACK bomb (one large field
put in the dynamic table, then referred to by one-byte indexes: a 16 KiB header block that decodes to
tens of megabytes), flow-control windows pushed past 2^31-1 or incremented by zero, DATA on a stream
that does not exist.  Each is a connection error (GOAWAY) or a refused stream; the gateway's memory
stays flat (VmRSS from /proc) and the next client is served.
"""

from __future__ import annotations

import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import DataFrame, WindowUpdateFrame

from tests.conftest import gateway_args
from tests.h2peer import H2Client, simple_get


@pytest.fixture
def gateway(start_gateway, pki, echo_upstream):
    return start_gateway(gateway_args(pki, echo_upstream))


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_an_hpack_bomb_is_cut_off_without_the_memory_it_would_decode_to(gateway, pki):
    pid = gateway.proc.popen.pid
    assert simple_get(gateway.port, pki, "/warm").status == 200
    before = rss_kib(pid)
    for _ in range(3):
        with H2Client(gateway.port, pki) as c:
            c.ping()
            big = (b"x-bomb", b"v" * 4000)  # fits the 4 KiB dynamic table: every repetition is one byte on the wire
            fields = [(b":method", b"GET"), (b":authority", b"localhost"), (b":scheme", b"https"), (b":path", b"/bomb")] + [big] * 16000
            sid = c.conn.get_next_available_stream_id()
            c.conn.send_headers(sid, fields, end_stream=True)
            wire = c.conn.data_to_send()
            assert len(wire) < 100_000  # the bomb: ~64 MB of fields in well under 100 KB
            c.send_raw(wire)
            c.read_until_closed()
            assert c.goaway is not None and c.goaway.error_code != ErrorCodes.NO_ERROR
    grown = rss_kib(pid) - before
    assert grown < 32 * 1024, f"the gateway grew by {grown} KiB"
    assert simple_get(gateway.port, pki, "/after").status == 200
    assert "/bomb" not in "".join(line for line in gateway.proc.output().splitlines() if "mtlsgate.access" in line)


@pytest.mark.parametrize("stream", [0, 1])
def test_a_window_pushed_past_2_31_is_a_flow_control_error(gateway, pki, stream):
    with H2Client(gateway.port, pki) as c:
        c.ping()
        if stream:
            c.request("GET", "/slow/2")
        c.send_raw(WindowUpdateFrame(stream, window_increment=2**31 - 1).serialize())
        c.read(lambda: c.goaway is not None or c.streams.get(1) is not None and c.streams[1].reset is not None)
        assert (c.goaway is not None and c.goaway.error_code == ErrorCodes.FLOW_CONTROL_ERROR) or c.streams[1].reset == ErrorCodes.FLOW_CONTROL_ERROR
    assert simple_get(gateway.port, pki, "/after").status == 200
    assert "Traceback" not in gateway.proc.output()


def test_a_zero_window_increment_and_data_on_an_idle_stream_are_protocol_errors(gateway, pki):
    with H2Client(gateway.port, pki) as c:
        c.ping()
        c.send_raw(WindowUpdateFrame(0, window_increment=0).serialize())
        c.read_until_closed()
        assert c.goaway is not None and c.goaway.error_code == ErrorCodes.PROTOCOL_ERROR
    with H2Client(gateway.port, pki) as c:
        c.ping()
        c.send_raw(DataFrame(99, data=b"x" * 1000).serialize())
        c.read_until_closed()
        assert c.goaway is not None and c.goaway.error_code in (ErrorCodes.PROTOCOL_ERROR, ErrorCodes.STREAM_CLOSED)
    assert simple_get(gateway.port, pki, "/after").status == 200
    assert "Traceback" not in gateway.proc.output()
