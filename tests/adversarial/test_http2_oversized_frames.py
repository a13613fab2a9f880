"""
Attack class: an HTTP/2 frame header announcing more than SETTINGS_MAX_FRAME_SIZE (16 KiB; up to
16 MiB fits in the 24-bit length).  The h2 library checks a frame's length only once the whole frame
is buffered, so a client that sends such a header and then dribbles its body had the gateway hold up
to 16 MiB of its bytes per connection (every byte resets the idle timer): memory for the asking, on
a connection that is doomed anyway.  Found with the first h2 connection of a fresh gateway sending
garbage (tests/adversarial/test_lazy_http2.py), but it holds for any h2 connection.

The decision (RFC 9113 4.2): the frame is refused at its header, GOAWAY FRAME_SIZE_ERROR and the
connection closed, before its body is read; the next connection is served.
"""

from __future__ import annotations

import socket
import ssl

import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame, SettingsFrame

from tests.conftest import gateway_args
from tests.h2peer import simple_get

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _frames(data: bytes) -> list[tuple[int, bytes]]:
    """(type, payload) of each whole frame in C{data}."""
    frames = []
    while len(data) >= 9:
        length = int.from_bytes(data[:3], "big")
        if len(data) < 9 + length:
            break
        frames.append((data[3], data[9:9 + length]))
        data = data[9 + length:]
    return frames


@pytest.mark.parametrize("frame_type", [0x0, 0x1, 0x6, 0xFF], ids=["DATA", "HEADERS", "PING", "unknown"])
@pytest.mark.parametrize("length", [16385, 2**24 - 1])
def test_a_frame_longer_than_max_frame_size_is_refused_at_its_header(start_gateway, pki, echo_upstream, frame_type, length):
    gateway = start_gateway(gateway_args(pki, echo_upstream))
    ctx = ssl.create_default_context(cafile=pki["ca"])
    ctx.load_cert_chain(*pki["alice"])
    ctx.set_alpn_protocols(["h2"])
    sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", gateway.port), timeout=10), server_hostname="localhost")
    received = b""
    try:
        assert sock.selected_alpn_protocol() == "h2"
        header = length.to_bytes(3, "big") + bytes([frame_type, 0]) + (1 if frame_type in (0, 1) else 0).to_bytes(4, "big")
        sock.sendall(PREFACE + SettingsFrame(0).serialize() + header + b"x" * 1000)  # a header and a sip of its body, no more
        try:
            while chunk := sock.recv(65536):  # the gateway must close now: the rest of the frame never comes
                received += chunk
        except TimeoutError:
            pytest.fail(f"the gateway kept the connection open, waiting for {length} bytes of a frame longer than it allows")
    finally:
        sock.close()
    goaways = [payload for kind, payload in _frames(received) if kind == GoAwayFrame.type]
    assert len(goaways) == 1, f"no GOAWAY in {received[:200]!r}"
    [payload] = goaways
    assert int.from_bytes(payload[4:8], "big") == ErrorCodes.FRAME_SIZE_ERROR
    assert simple_get(gateway.port, pki, "/after").status == 200
    assert "Traceback" not in gateway.proc.output()
