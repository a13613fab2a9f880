"""mtlsgate.http.h2server.FrameHeaders: a frame over the limit is seen at its header, however the bytes are cut."""

from __future__ import annotations

from hyperframe.frame import DataFrame, PingFrame, SettingsFrame

from mtlsgate.http.h2server import FrameHeaders

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
LIMIT = 16384


def _feed(stream: bytes, cut: int) -> int | None:
    guard = FrameHeaders()
    for start in range(0, len(stream), cut):
        found = guard.too_long(stream[start:start + cut], LIMIT)
        if found is not None:
            return found
    return None


def test_frames_within_the_limit_pass_however_cut():
    stream = PREFACE + SettingsFrame(0).serialize() + DataFrame(1, data=b"x" * LIMIT).serialize() + PingFrame(0).serialize() * 3
    for cut in (1, 2, 5, 9, 10, 24, 25, 4096, len(stream)):
        assert _feed(stream, cut) is None


def test_an_oversized_header_is_found_however_cut_before_its_body():
    header = (2**24 - 1).to_bytes(3, "big") + b"\x00\x00" + (1).to_bytes(4, "big")
    stream = PREFACE + SettingsFrame(0).serialize() + header
    for cut in (1, 2, 5, 9, 10, 24, 25, len(stream)):
        assert _feed(stream, cut) == 2**24 - 1
    assert _feed(PREFACE + (LIMIT + 1).to_bytes(3, "big") + b"\x00" * 6, 7) == LIMIT + 1
