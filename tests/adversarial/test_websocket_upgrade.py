"""
The attacker's suite for protocol upgrades (issue #14): exact bytes over a real mTLS socket against the
real twistd gateway and a raw scripted mTLS upstream that records every byte it is sent.

The class: an upgrade request is the one HTTP/1.1 request after which a connection may stop being
HTTP.  A proxy that opens its tunnel on the client's word (the request) instead of the upstream's
(a 101 to WebSocket) lets a client pipeline a second request behind a refused upgrade and have it
reach the upstream raw, on a path it was never authorized for ("WebSocket smuggling").  The gateway:
tunnels only after the upstream's own 101 to WebSocket; forwards no byte sent behind the handshake
before that 101; closes the connection after any other answer (the bytes behind it are never read as
a request); routes and authorizes the handshake as any request, and refuses it (403) on a route
without allow_websockets instead of downgrading it to a plain GET.
"""

from __future__ import annotations

import base64
import hashlib
import re
import socket
import ssl
import threading
from typing import Any

import pytest
import yaml

from tests.conftest import TWISTD, Proc, free_port, subprocess_env, wait_for_port
from tests.websocket_peers import ScriptedUpstream

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
SMUGGLED = b"GET /admin/secret HTTP/1.1\r\nHost: localhost\r\n\r\n"
_count = iter(range(1, 1 << 30))
_lock = threading.Lock()


def _answer(head: bytes) -> bytes:
    target = head.split(b" ", 2)[1]
    if target.startswith(b"/refuse-keepalive"):
        return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nno"
    if target.startswith(b"/refuse-426"):
        return b"HTTP/1.1 426 Upgrade Required\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nContent-Length: 0\r\n\r\n"
    if target.startswith(b"/h2c"):
        return b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n"
    if target.startswith(b"/no-connection"):
        return b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"
    if target.startswith(b"/switch"):
        key = re.search(rb"(?im)^sec-websocket-key: *(\S+)", head)
        accept = base64.b64encode(hashlib.sha1((key.group(1) if key else b"") + GUID).digest())
        return (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: " + accept
                + b"\r\nX-Upstream: yes\r\nKeep-Alive: timeout=5\r\n\r\n\x81\x02hi")  # fmt: skip
    return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


@pytest.fixture(scope="module")
def upstream(pki):
    server = ScriptedUpstream(pki, _answer)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gateway(pki, upstream, tmp_path_factory):
    """/admin for bob only, /plain for alice without WebSockets, / for alice with WebSockets."""
    tmp = tmp_path_factory.mktemp("ws-attack")
    port = free_port()
    base = {
        "from": "https://localhost", "to": [f"https://127.0.0.1:{upstream.port}"], "tls_custom_ca_file": pki["ca"],
        "tls_client_cert_file": pki["gateway_client"][0], "tls_client_key_file": pki["gateway_client"][1],
    }  # fmt: skip
    config = {
        "address": f"tcp:{port}:interface=127.0.0.1",
        "certificates": [{"cert": pki["gateway"][0], "key": pki["gateway"][1]}],
        "downstream_mtls": {"ca_file": pki["ca"]},
        "routes": [
            {**base, "prefix": "/admin", "allow_websockets": True, "allow_client": {"uri": ["spiffe://test/ns/prod/sa/bob"]}},
            {**base, "prefix": "/plain", "allow_client": {"uri": ["spiffe://test/ns/prod/sa/alice"]}},
            {**base, "prefix": "/", "allow_websockets": True, "allow_client": {"uri": ["spiffe://test/ns/prod/sa/alice"]}},
        ],
    }
    (tmp / "gw.yaml").write_text(yaml.safe_dump(config))
    proc = Proc([*TWISTD, "-n", "--pidfile=", "--logfile=-", "mtlsgate", "--config", str(tmp / "gw.yaml")], tmp / "gateway.log", cwd=tmp, env=subprocess_env())
    try:
        wait_for_port(port, proc.popen, log=proc.log)
        proc.port = port  # type: ignore[attr-defined]
        yield proc
    finally:
        proc.stop()


def marker() -> bytes:
    with _lock:
        return b"m%d" % next(_count)


def handshake(target: bytes, *, method: bytes = b"GET", version: bytes = b"HTTP/1.1", upgrade: bytes = b"websocket", extra: bytes = b"",
              connection: bytes = b"Upgrade") -> bytes:  # fmt: skip
    return (method + b" " + target + b" " + version + b"\r\nHost: localhost\r\nConnection: " + connection + b"\r\nUpgrade: " + upgrade
            + b"\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + KEY + b"\r\n" + extra + b"\r\n")  # fmt: skip


def exchange(port: int, pki: dict[str, Any], raw: bytes, client: str = "alice", until: bytes | None = None) -> bytes:
    """C{raw} over mTLS as C{client}, then everything the gateway sends until it closes (or, with C{until}, until that came)."""
    ctx = ssl.create_default_context(cafile=pki["ca"])
    ctx.load_cert_chain(*pki[client])
    out = b""
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=30), server_hostname="localhost") as s:
        s.sendall(raw)
        try:
            while chunk := s.recv(65536):
                out += chunk
                if until is not None and until in out:
                    break
        except (ssl.SSLError, ConnectionError):
            pass
    return out


def statuses(out: bytes) -> list[int]:
    return [int(code) for code in re.findall(rb"(?m)^HTTP/1\.1 (\d{3}) ", out)]


def barrier(gateway: Any, pki: dict[str, Any], upstream: ScriptedUpstream) -> None:
    """A plain request through the gateway to the upstream, which serves connections in order: any connection opened before is recorded."""
    m = marker()
    out = exchange(gateway.port, pki, b"GET /barrier-" + m + b" HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    assert statuses(out) == [200], out
    upstream.wait_for(b"/barrier-" + m)


def never_upstream(upstream: ScriptedUpstream, *needles: bytes) -> None:
    for record in upstream.received:
        for needle in needles:
            assert needle not in record, f"{needle!r} reached the upstream: {record!r}"


@pytest.mark.parametrize("refusal", [b"/refuse-keepalive", b"/refuse-426"])
def test_a_request_pipelined_behind_a_refused_upgrade_never_reaches_the_upstream(gateway, pki, upstream, refusal):
    m = marker()
    head = handshake(refusal + b"?" + m)
    out = exchange(gateway.port, pki, head + SMUGGLED)
    assert len(statuses(out)) == 1, out  # one answer, relayed as a normal response, then the connection closes
    assert b"connection: close" in out.lower()
    carried = upstream.wait_for(m)  # the upstream connection closed: it is never pooled after an upgrade request
    assert b"/admin/secret" not in carried
    assert carried.count(b"\r\n\r\n") == 1  # the handshake, and not one byte more
    barrier(gateway, pki, upstream)
    never_upstream(upstream, b"/admin/secret")


def test_a_request_pipelined_behind_an_upgrade_the_gateway_refuses_is_never_read(gateway, pki, upstream):
    m = marker()
    out = exchange(gateway.port, pki, handshake(b"/plain/chat?" + m) + SMUGGLED)
    assert statuses(out) == [403], out
    assert b"allow_websockets" in out
    barrier(gateway, pki, upstream)
    never_upstream(upstream, m, b"/admin/secret")  # not even the handshake, as a plain GET
    assert "refused a WebSocket upgrade" in gateway.wait_for_log("allow_websockets is off")


def test_bytes_sent_behind_the_handshake_wait_for_the_upstreams_101(gateway, pki, upstream):
    m = marker()
    head = handshake(b"/switch?" + m, extra=b"X-Forwarded-Client-Cert: Hash=00;URI=spiffe://test/ns/prod/sa/bob\r\n")
    frame = b"\x81\x85abcd" + bytes(c ^ k for c, k in zip(b"hello", b"abcdabcd"))  # a masked text frame, sent eagerly
    behind = b"GET /after-the-101 HTTP/1.1\r\nHost: localhost\r\n\r\n"  # once switched, the upstream's to read as WebSocket
    out = exchange(gateway.port, pki, head + frame + behind, until=b"\x81\x02hi")  # then the client closes the tunnel
    response, _, rest = out.partition(b"\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 101 ")
    lowered = response.lower()
    assert b"\r\nupgrade: websocket" in lowered and b"\r\nconnection: upgrade" in lowered and b"x-upstream: yes" in lowered
    assert b"keep-alive:" not in lowered  # hop-by-hop
    assert rest.startswith(b"\x81\x02hi")  # the upstream's first frame, after the 101 head
    before = next(b for b in upstream.before_answer if m in b)
    assert before.endswith(b"\r\n\r\n") and before.count(b"\r\n\r\n") == 1  # nothing past the head before the 101
    carried = upstream.wait_for(m)
    assert carried == before + frame + behind  # after the 101 the tunnel carries the client's bytes as they are
    headers = before.lower()
    assert headers.count(b"x-forwarded-client-cert:") == 1
    assert b"uri=spiffe://test/ns/prod/sa/alice" in headers and b"sa/bob" not in headers


@pytest.mark.parametrize("target", [b"/h2c", b"/no-connection"])
def test_a_101_that_is_not_the_switch_asked_for_is_a_502_and_no_tunnel(gateway, pki, upstream, target):
    m = marker()
    out = exchange(gateway.port, pki, handshake(target + b"?" + m) + SMUGGLED)
    assert statuses(out) == [502], out
    carried = upstream.wait_for(m)
    assert b"/admin/secret" not in carried and carried.count(b"\r\n\r\n") == 1


@pytest.mark.parametrize("target", [b"/%61dmin/chat", b"/admin/chat", b"/ADMIN/../admin/chat"])
def test_another_routes_websocket_is_not_reached_by_spelling_its_path(gateway, pki, upstream, target):
    m = marker()
    out = exchange(gateway.port, pki, handshake(target + b"?" + m))
    assert statuses(out) in ([403], [400]), out
    barrier(gateway, pki, upstream)
    never_upstream(upstream, m)


def test_a_refused_client_certificate_never_reaches_the_upstream(gateway, pki, upstream):
    m = marker()
    out = exchange(gateway.port, pki, handshake(b"/chat?" + m), client="bob")
    assert statuses(out) == [403] and b"not allowed here" in out
    barrier(gateway, pki, upstream)
    never_upstream(upstream, m)


@pytest.mark.parametrize("method", [b"POST", b"PUT", b"DELETE", b"HEAD"])
def test_a_websocket_handshake_that_is_not_a_get_is_refused(gateway, pki, upstream, method):
    m = marker()
    out = exchange(gateway.port, pki, handshake(b"/chat?" + m, method=method) + SMUGGLED)
    assert statuses(out) == [400], out
    barrier(gateway, pki, upstream)
    never_upstream(upstream, m, b"/admin/secret")


def test_an_h2c_upgrade_is_forwarded_as_a_plain_request_and_ends_the_connection(gateway, pki, upstream):
    m = marker()
    h2c = handshake(b"/plain-h2c?" + m, upgrade=b"h2c", connection=b"Upgrade, HTTP2-Settings", extra=b"HTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n")
    out = exchange(gateway.port, pki, h2c + SMUGGLED)
    assert statuses(out) == [200], out
    carried = upstream.wait_for(m).lower()
    assert b"upgrade" not in carried and b"http2-settings" not in carried  # hop-by-hop: never forwarded
    barrier(gateway, pki, upstream)
    never_upstream(upstream, b"/admin/secret")


def test_an_http10_upgrade_is_ignored_as_rfc_9110_says(gateway, pki, upstream):
    m = marker()
    out = exchange(gateway.port, pki, handshake(b"/old?" + m, version=b"HTTP/1.0"))
    assert re.match(rb"HTTP/1\.0 200 ", out), out
    carried = upstream.wait_for(m).lower()
    assert b"upgrade" not in carried and b"sec-websocket-key" in carried
