"""
Attack class: the first HTTP/2 connection of a process (mtlsgate/http/negotiate.py,
LazyH2ServerFactory: the HTTP/2 front end and the h2 library are imported and built when a worker's
first connection negotiates h2).  Whatever that first connection is, the front end it builds is the
one every later connection uses, so the attacker aims at it: many h2 connections at once on a fresh
gateway (each must keep its own identity, none is dropped while the import runs), a first h2
connection that sends garbage or a flood, a first h2 connection that is a resumed TLS session of a
refused client (its 403 must hold through the import), and ALPN h2 when http2 is off.

The decision: building the front end is invisible: the first connection is judged exactly as any
other (refused identity: 403, garbage: GOAWAY or close), the ones after it are served, and
C{http2: false} never negotiates h2.  Run with MTLSGATE_TEST_WORKERS=2 too (each worker builds its own).
"""

from __future__ import annotations

import socket
import ssl
import threading

import pytest
import yaml
from hyperframe.frame import PingFrame, SettingsFrame

from mtlsgate.identity import parse_xfcc
from tests.adversarial.test_resumption_bypass import SAME_WORKER, _Client
from tests.conftest import echo_json, free_port, gateway_args, gateway_config
from tests.h2peer import H2Client, simple_get

CLIENTS = ["alice", "bob"]


def _identity(stream) -> str:
    """The client identity the gateway told the upstream (its XFCC header)."""
    [xfcc] = echo_json(bytes(stream.body))["headers"]["x-forwarded-client-cert"]
    [element] = parse_xfcc(xfcc)
    [uri] = element["URI"]
    return uri


def test_many_h2_connections_at_once_on_a_fresh_gateway_each_keep_their_identity(start_gateway, pki, echo_upstream):
    gateway = start_gateway(gateway_args(pki, echo_upstream))
    count = 16
    ready = threading.Barrier(count)
    results: dict[int, tuple[str, object]] = {}

    def connect(index: int) -> None:
        who = CLIENTS[index % 2]
        try:
            ready.wait(30)  # all handshakes start together: several may be in flight while the first builds the front end
            with H2Client(gateway.port, pki, who) as c:
                assert c.alpn == "h2"
                sid = c.request("GET", f"/first/{index}")
                results[index] = (who, c.response(sid))
        except Exception as error:  # noqa: BLE001  (reported below, by connection)
            results[index] = (who, error)

    threads = [threading.Thread(target=connect, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == count
    for index, (who, stream) in sorted(results.items()):
        assert not isinstance(stream, Exception), f"connection {index}: {stream!r}"
        assert stream.status == 200, f"connection {index}: {stream.status}"
        assert _identity(stream) == f"spiffe://test/ns/prod/sa/{who}"
        assert echo_json(bytes(stream.body))["uri"] == f"/first/{index}"
    assert "Traceback" not in gateway.proc.output()


@pytest.mark.parametrize("opening", ["garbage", "preface then garbage", "ping flood", "settings flood"])
def test_a_first_h2_connection_that_misbehaves_spoils_nothing_for_the_next(start_gateway, pki, echo_upstream, opening):
    gateway = start_gateway(gateway_args(pki, echo_upstream))
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    payload = {
        "garbage": b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n" + bytes(range(256)) * 64,
        "preface then garbage": preface + b"\xff" * 9 + bytes(range(256)) * 64,
        "ping flood": preface + SettingsFrame(0).serialize() + PingFrame(0, opaque_data=b"12345678").serialize() * 20000,
        "settings flood": preface + SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 1}).serialize() * 20000,
    }[opening]
    ctx = ssl.create_default_context(cafile=pki["ca"])
    ctx.load_cert_chain(*pki["alice"])
    ctx.set_alpn_protocols(["h2"])
    sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", gateway.port), timeout=20), server_hostname="localhost")
    try:
        assert sock.selected_alpn_protocol() == "h2"
        try:
            sock.sendall(payload)
            while sock.recv(65536):  # the gateway answers (GOAWAY, PING ACKs) and closes; never hangs
                pass
        except (OSError, ssl.SSLError):
            pass
    finally:
        sock.close()
    for who in CLIENTS:  # the front end the misbehaving connection built serves everyone after it
        stream = simple_get(gateway.port, pki, "/after", client=who)
        assert stream.status == 200 and _identity(stream) == f"spiffe://test/ns/prod/sa/{who}"
    assert "Traceback" not in gateway.proc.output()


def test_a_first_h2_connection_resuming_a_refused_clients_session_is_refused(start_gateway, pki, echo_upstream):
    """TLS 1.2 (a refused certificate gets no resumable TLS 1.3 ticket): the session is made over HTTP/1.1, then resumed with ALPN h2."""
    gateway = start_gateway(gateway_args(pki, echo_upstream, "--enforcement", "policy", *SAME_WORKER))
    client = _Client(pki["ca"], pki["stranger"], ssl.TLSVersion.TLSv1_2)
    resumed, status, body = client.get(gateway.port)
    assert (resumed, status) == (False, 403) and b"untrusted issuer" in body
    assert client.session is not None
    client.ctx.set_alpn_protocols(["h2"])
    with H2Client(gateway.port, pki, context=client.ctx, session=client.session) as c:
        assert c.alpn == "h2"
        assert c.sock.session_reused, "the gateway did not resume the session: the test proves nothing"
        stream = c.response(c.request("GET", "/resumed"))
        assert stream.status == 403, bytes(stream.body)[:300]
        assert b"x-forwarded-client-cert" not in bytes(stream.body).lower()  # the gateway's answer, not the upstream's echo
    assert "Traceback" not in gateway.proc.output()


@pytest.mark.parametrize("alpn", [("h2",), ("h2", "http/1.1")])
def test_alpn_h2_with_http2_off_never_reaches_the_h2_front_end(start_gateway, pki, echo_upstream, tmp_path, alpn):
    """
    http2: false: h2 is never selected.  A client offering h2 alone gets no ALPN protocol (the
    handshake goes on, RFC 7301 lets the server pick none) and the HTTP/1.1 engine, which answers its
    HTTP/2 preface as a bad request line: never an HTTP/2 frame.
    """
    port = free_port()
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(gateway_config(pki, port, [f"https://127.0.0.1:{echo_upstream}"], http2=False)))
    gateway = start_gateway(["--config", str(path)], port=port)
    ctx = ssl.create_default_context(cafile=pki["ca"])
    ctx.load_cert_chain(*pki["alice"])
    ctx.set_alpn_protocols(list(alpn))
    try:
        sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", gateway.port), timeout=20), server_hostname="localhost")
    except (ssl.SSLError, OSError):
        assert alpn == ("h2",)  # h2 alone refused with no_application_protocol would hold too
        return
    try:
        assert sock.selected_alpn_protocol() == (None if alpn == ("h2",) else "http/1.1")
        if alpn == ("h2",):
            sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + SettingsFrame(0).serialize())
            expected = b"HTTP/1.1 400"
        else:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            expected = b"HTTP/1.1 200"
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except (OSError, ssl.SSLError):
            pass
        assert answer.startswith(expected), answer[:200]
    finally:
        sock.close()
    assert "Traceback" not in gateway.proc.output()
