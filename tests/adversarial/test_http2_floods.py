"""
Attack class: making an HTTP/2 server do unbounded work or hold unbounded memory for little effort
(rapid reset, CVE-2023-44487; CONTINUATION floods; SETTINGS and PING floods; more streams than
advertised; header lists past the limit).  A raw h2 client over a real mTLS socket against the real
gateway: each is cut off (GOAWAY ENHANCE_YOUR_CALM or PROTOCOL_ERROR, REFUSED_STREAM, 431) after a
bound, and the gateway serves the next client.
"""

from __future__ import annotations

import json

import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import ContinuationFrame, HeadersFrame

from mtlsgate.http import h2server
from tests.conftest import gateway_args
from tests.h2peer import H2Client, simple_get


@pytest.fixture
def gateway(start_gateway, pki, echo_upstream):
    return start_gateway(gateway_args(pki, echo_upstream, "--timeout", "30s"))


def _still_serves(gateway, pki) -> None:
    assert simple_get(gateway.port, pki, "/after").status == 200


def test_rapid_reset_is_cut_off_with_enhance_your_calm(gateway, pki):
    with H2Client(gateway.port, pki) as c:
        for _ in range(5 * h2server.RESET_BUDGET):
            sid = c.request("GET", "/slow/5")
            c.conn.reset_stream(sid, ErrorCodes.CANCEL)
            try:
                c.flush()
            except OSError:
                break
        c.read_until_closed()
        assert c.goaway is not None and c.goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert "ENHANCE_YOUR_CALM" in gateway.proc.wait_for_log("ENHANCE_YOUR_CALM")
    assert "Traceback" not in gateway.proc.output()
    _still_serves(gateway, pki)


def test_a_continuation_flood_is_a_connection_error(gateway, pki):
    with H2Client(gateway.port, pki) as c:
        c.ping()
        head = HeadersFrame(c.conn.get_next_available_stream_id())
        head.data = c.conn.encoder.encode([(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"), (b":authority", b"localhost")])
        c.send_raw(head.serialize())  # no END_HEADERS: CONTINUATION frames must follow, and do, for ever
        try:
            for _ in range(10_000):
                cont = ContinuationFrame(head.stream_id)
                cont.data = b"\x40\x01a\x01b" * 1000  # literal headers that never end the block
                c.send_raw(cont.serialize())
        except OSError:
            pass
        c.read_until_closed()
    assert "Too many continuation frames" in gateway.proc.wait_for_log("HTTP/2 protocol error")
    _still_serves(gateway, pki)


@pytest.mark.parametrize("kind", ["ping", "settings"])
def test_control_frame_floods_are_cut_off(gateway, pki, kind):
    with H2Client(gateway.port, pki) as c:
        try:
            for i in range(3 * h2server.CONTROL_FRAME_BUDGET):
                if kind == "ping":
                    c.conn.ping(b"%08d" % i)
                else:
                    c.conn.update_settings({4: 65535})
                c.flush()
        except OSError:
            pass
        c.read_until_closed()
        assert c.goaway is not None and c.goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    _still_serves(gateway, pki)


def test_streams_beyond_the_advertised_limit_are_refused_and_the_rest_served(gateway, pki):
    extra = 20
    with H2Client(gateway.port, pki, timeout=60) as c:
        # sent before reading the gateway's SETTINGS (the client does not know the limit yet)
        ids = [c.request("GET", f"/slow/1?{i}") for i in range(h2server.MAX_CONCURRENT_STREAMS + extra)]
        answers = [c.response(sid) for sid in ids]
    refused = [a for a in answers if a.reset == ErrorCodes.REFUSED_STREAM]
    served = [a for a in answers if a.status == 200]
    assert len(refused) == extra and len(served) == h2server.MAX_CONCURRENT_STREAMS
    assert sorted(json.loads(bytes(a.body))["uri"] for a in served) == sorted(f"/slow/1?{i}" for i in range(h2server.MAX_CONCURRENT_STREAMS))
    _still_serves(gateway, pki)


def test_a_header_list_over_max_header_size_is_431_and_never_forwarded(gateway, pki):
    with H2Client(gateway.port, pki) as c:
        c.ping()  # SETTINGS exchanged: the client knows the limit and sends past it anyway
        sid = c.request("GET", "/big-headers", headers=[(b"x-big-%d" % i, b"v" * 4000) for i in range(10)])
        stream = c.response(sid)
    assert stream.status == 431
    assert "/big-headers" not in "".join(line for line in gateway.proc.output().splitlines() if "mtlsgate.access" in line)
    _still_serves(gateway, pki)


def test_a_header_list_far_over_the_limit_ends_the_connection(gateway, pki):
    with H2Client(gateway.port, pki) as c:
        c.ping()
        c.request("GET", "/huge-headers", headers=[(b"x-big-%d" % i, b"v" * 8000) for i in range(12)])
        c.read_until_closed()
        assert c.goaway is not None and c.goaway.error_code != ErrorCodes.NO_ERROR
    _still_serves(gateway, pki)
