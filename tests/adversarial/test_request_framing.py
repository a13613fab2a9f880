"""
The attacker's suite for request framing (issue #12): exact bytes over a real mTLS socket against the
real twistd gateway.  Whatever the gateway refuses, it answers itself with a 4xx and a logged reason,
never with a traceback, and the upstream never sees the request.
"""

from __future__ import annotations

import socket
import ssl
import uuid
from typing import Any

import pytest
import yaml

from tests.conftest import TWISTD, Proc, echo_json, free_port, https_request, start_echo_upstream, subprocess_env, wait_for_port, gateway_config

H = b"Host: localhost\r\n"


@pytest.fixture(scope="module")
def gateway(pki, tmp_path_factory) -> Any:
    """One gateway (and echo upstream) for the module: every test here sends a few hundred bytes."""
    tmp = tmp_path_factory.mktemp("framing")
    procs: list[Proc] = []
    try:
        upstream_port, _ = start_echo_upstream(procs, pki, tmp)
        port = free_port()
        config = gateway_config(pki, port, [f"https://127.0.0.1:{upstream_port}"])
        (tmp / "gw.yaml").write_text(yaml.safe_dump(config))
        argv = [*TWISTD, "-n", "--pidfile=", "--logfile=-", "mtlsgate", "--config", str(tmp / "gw.yaml")]
        proc = Proc(argv, tmp / "gateway.log", cwd=tmp, env=subprocess_env())
        procs.append(proc)
        wait_for_port(port, proc.popen, log=proc.log)
        proc.port = port  # type: ignore[attr-defined]
        yield proc
    finally:
        for p in reversed(procs):
            p.stop()


def exchange(port: int, pki: dict[str, Any], raw: bytes, wait: float = 5.0) -> bytes:
    """Send C{raw} over mTLS and read until the gateway closes (or C{wait} passes)."""
    ctx = ssl.create_default_context(cafile=pki["ca"])
    ctx.load_cert_chain(*pki["alice"])
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname="localhost") as s:
        s.sendall(raw)
        s.settimeout(wait)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
                if b"\r\n\r\n" in out and _complete(out):
                    break
        except (TimeoutError, ssl.SSLError, ConnectionError):
            pass
        return out


def _complete(out: bytes) -> bool:
    head, _, body = out.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def headers_of(answer: bytes) -> dict[bytes, bytes]:
    head = answer.partition(b"\r\n\r\n")[0]
    return {n.strip().lower(): v.strip() for n, _, v in (line.partition(b":") for line in head.split(b"\r\n")[1:])}


def refused(gateway: Any, pki: dict[str, Any], raw: bytes, status: bytes = b"400") -> bytes:
    """Send C{raw}; it must get C{status} from the gateway itself, reach no upstream, and leave no traceback."""
    before = len(gateway.output())
    answer = exchange(gateway.port, pki, raw)
    assert answer.startswith(b"HTTP/1.1 " + status + b" "), answer[:300]
    assert b'"method"' not in answer  # not the echo upstream's answer
    log = gateway.output()[before:]
    assert "upstream=https://" not in log, log  # no access line of a forwarded request
    assert "Traceback" not in gateway.output()
    still_serving(gateway, pki)
    return answer


def still_serving(gateway: Any, pki: dict[str, Any]) -> None:
    """A request after the refused one is served; its access line is awaited, so the next test's log starts after it."""
    path = f"/alive/{uuid.uuid4().hex}"
    status, _, body = https_request(gateway.port, path, ca=pki["ca"], cert=pki["alice"])
    assert status == 200 and echo_json(body)["uri"] == path
    # The response leaves before its access line is written (TLS output is sent at once, mtlsgate.tls.fastwrite).
    gateway.wait_for_log(f"GET {path} HTTP/1.1")


def forwarded(gateway: Any, pki: dict[str, Any], raw: bytes) -> dict[str, Any]:
    answer = exchange(gateway.port, pki, raw)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
    still_serving(gateway, pki)  # and the forwarded request's access line is written before the next test looks
    return echo_json(answer.partition(b"\r\n\r\n")[2])


# --- 1. the request target: visible ASCII only ------------------------------------------------------

TARGET_BYTES = [0x00, 0x01, 0x09, 0x0B, 0x1F, 0x7F, 0x80, 0x9F, 0xA0, 0xAF, 0xB0, 0xB1, 0xC3, 0xFF]


@pytest.mark.parametrize("byte", TARGET_BYTES, ids=[f"0x{b:02X}" for b in TARGET_BYTES])
def test_a_request_target_byte_outside_visible_ascii_is_a_400_with_a_reason(gateway, pki, byte):
    refused(gateway, pki, b"GET /a" + bytes([byte]) + b"b HTTP/1.1\r\n" + H + b"\r\n")
    assert f"byte 0x{byte:02X} in the request target" in gateway.output()


def test_the_whole_visible_ascii_range_is_still_accepted_in_a_target(gateway, pki):
    visible = bytes(range(0x21, 0x7F)).replace(b"#", b"").replace(b"\\", b"").replace(b".", b"")
    echoed = forwarded(gateway, pki, b"GET /v?" + visible + b" HTTP/1.1\r\n" + H + b"\r\n")
    assert echoed["uri"].encode() == b"/v?" + visible


# --- 2. Content-Length: 1*DIGIT, below 2^63 -----------------------------------------------------------

BAD_LENGTHS = {
    "2^63": b"9223372036854775808",
    "2^64": b"18446744073709551616",
    "30 digits": b"9" * 30,
    "plus sign": b"+5",
    "minus zero": b"-0",
    "space inside": b"5 5",
    "hex": b"0x5",
    "trailing letter": b"5a",
    "underscore": b"1_0",
    "non-ascii digit": "\u0665".encode(),
    "empty": b"",
}


@pytest.mark.parametrize("name", sorted(BAD_LENGTHS))
def test_a_content_length_that_is_not_a_plain_decimal_below_2_63_is_a_400(gateway, pki, name):
    refused(gateway, pki, b"POST /cl HTTP/1.1\r\n" + H + b"Content-Length: " + BAD_LENGTHS[name] + b"\r\n\r\nhello")


def test_a_content_length_with_leading_zeros_is_still_a_length(gateway, pki):
    echoed = forwarded(gateway, pki, b"POST /cl HTTP/1.1\r\n" + H + b"Content-Length: 005\r\n\r\nhello")
    assert echoed["body_bytes"] == 5 and echoed["headers"]["content-length"] == ["5"]


# --- 3. header fields: token names, no control characters in values ----------------------------------

CONTROLS = [0x00, 0x01, 0x08, 0x0B, 0x0C, 0x1B, 0x1F, 0x7F]


@pytest.mark.parametrize("byte", CONTROLS, ids=[f"0x{b:02X}" for b in CONTROLS])
def test_a_control_character_in_a_header_value_is_a_400(gateway, pki, byte):
    refused(gateway, pki, b"GET /hv HTTP/1.1\r\n" + H + b"X-Note: a" + bytes([byte]) + b"b\r\n\r\n")
    assert f"control character 0x{byte:02X} in the value of header X-Note" in gateway.output()


def test_htab_and_obs_text_in_a_header_value_are_passed_on(gateway, pki):
    echoed = forwarded(gateway, pki, b"GET /hv HTTP/1.1\r\n" + H + b"X-Note: a\tb \xe9t\xe9\r\n\r\n")
    assert echoed["headers"]["x-note"] == ["a\tb \xe9t\xe9"]


BAD_NAMES = [b"X Note", b"X\x7fNote", b"X(Note)", b"X@Note", b"X\x80Note", b"X/Note", b"X\x00Note", b"X\x0bNote", b"X\tNote", b'X"Note', b""]


@pytest.mark.parametrize("name", BAD_NAMES, ids=[repr(n) for n in BAD_NAMES])
def test_a_header_name_that_is_not_a_token_is_a_400(gateway, pki, name):
    refused(gateway, pki, b"GET /hn HTTP/1.1\r\n" + H + name + b": v\r\n\r\n")
    assert "is not a token" in gateway.output()


# --- 4. methods and request-target forms ------------------------------------------------------------


@pytest.mark.parametrize("method", [b"CONNECT", b"TRACE", b"TRACK", b"connect", b"Trace"])
def test_connect_and_trace_are_refused_with_405_and_allow(gateway, pki, method):
    answer = refused(gateway, pki, method + b" /m HTTP/1.1\r\n" + H + b"\r\n", b"405")
    headers = headers_of(answer)
    assert b"GET" in headers[b"allow"] and b"TRACE" not in headers[b"allow"] and b"CONNECT" not in headers[b"allow"]
    assert headers[b"server"] == b"mtlsgate" and b"strict-transport-security" in headers


def test_connect_in_authority_form_is_refused(gateway, pki):
    refused(gateway, pki, b"CONNECT localhost:443 HTTP/1.1\r\n" + H + b"\r\n", b"405")


def test_options_star_is_answered_by_the_gateway_not_twisted(gateway, pki):
    answer = refused(gateway, pki, b"OPTIONS * HTTP/1.1\r\n" + H + b"\r\n", b"200")
    headers = headers_of(answer)
    assert headers[b"server"] == b"mtlsgate" and b"TwistedWeb" not in answer
    assert b"OPTIONS" in headers[b"allow"] and headers[b"strict-transport-security"] == b"max-age=31536000"


@pytest.mark.parametrize("method", [b"GET", b"POST", b"DELETE"])
def test_star_with_another_method_is_a_400(gateway, pki, method):
    answer = refused(gateway, pki, method + b" * HTTP/1.1\r\n" + H + b"Content-Length: 0\r\n\r\n")
    assert b"TwistedWeb" not in answer


@pytest.mark.parametrize("target", [b"http://localhost/", b"https://localhost/abs", b"https://evil.example/", b"localhost:443"])
def test_a_target_that_is_not_origin_form_is_a_400(gateway, pki, target):
    refused(gateway, pki, b"GET " + target + b" HTTP/1.1\r\n" + H + b"\r\n")

