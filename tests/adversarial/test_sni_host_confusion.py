"""
Attack class: the TLS server name (SNI) says one thing, the HTTP authority (Host, HTTP/2's
C{:authority}) another.  HTTP/2 makes this ordinary (a browser coalesces connections for every name
the certificate carries), and an attacker makes it deliberate: to reach an HTTP route under the rules of
the name its handshake was made for, to reach a TCP route's upstream over HTTP (or HTTP over a TCP
route's connection, by offering h2), or to be told apart by the upstream as another client.

The gateway's decisions: every name shares one client verification (CA, CRL, client_auth,
enforcement), so the handshake never admits a client for one name that another name would refuse,
and there is no case for 421 Misdirected Request; an HTTP request is routed by its authority and
judged by that route's rules, whatever the SNI; a TCP route is chosen by the SNI alone, and its
connection never speaks HTTP (no h2 or http/1.1 by ALPN, HTTP bytes piped or dropped, never served);
an authority naming a TCP route is a 404.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import free_port
from tests.h2peer import H2Client
from tests.tcp_peers import CountingUpstream, client_context, connect, read_until_closed, start_tcp_gateway, tcp_config

ALICE = "spiffe://test/ns/prod/sa/alice"
BOB = "spiffe://test/ns/prod/sa/bob"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@pytest.fixture
def upstream():
    up = CountingUpstream()
    yield up
    up.stop()


@pytest.fixture
def gateway(start_gateway, tmp_path, pki, upstream, echo_upstream):
    """TCP route echo.test (bob only); HTTP routes: localhost for alice only, 127.0.0.1 for bob only (one certificate carries both names)."""
    port = free_port()
    config = tcp_config(pki, port, [{"host": "echo.test", "to": f"tcp://127.0.0.1:{upstream.port}", "allow_client": {"uri": [BOB]}}], echo_upstream)
    localhost = config["routes"][-1]
    localhost["allow_client"] = {"uri": [ALICE]}
    config["routes"].append({**localhost, "from": "https://127.0.0.1", "allow_client": {"uri": [BOB]}})
    config["unknown_sni"] = "reject"
    return start_tcp_gateway(start_gateway, tmp_path, config)


@pytest.mark.parametrize("who, status", [("alice", 403), ("bob", 200)])
def test_an_authority_other_than_the_sni_gets_its_own_routes_rules_over_http2(gateway, pki, who, status):
    with H2Client(gateway.port, pki, who, server_name="localhost") as c:
        assert c.alpn == "h2"
        stream = c.response(c.request("GET", "/coalesced", authority=b"127.0.0.1"))
        own = c.response(c.request("GET", "/own", authority=b"localhost"))
    assert stream.status == status
    assert own.status == (200 if who == "alice" else 403)
    if status == 200:
        assert json.loads(bytes(stream.body))["headers"]["x-forwarded-client-cert"][0].count(BOB) == 1


@pytest.mark.parametrize("who, status", [("alice", 403), ("bob", 200)])
def test_a_host_other_than_the_sni_gets_its_own_routes_rules_over_http11(gateway, pki, who, status):
    sock = connect(gateway.port, client_context(pki, who), "localhost")
    sock.sendall(b"GET /coalesced HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    reply = read_until_closed(sock)
    sock.close()
    assert reply.startswith(b"HTTP/1.1 %d" % status)


@pytest.mark.parametrize("who", ["alice", "bob"])
def test_an_authority_naming_the_tcp_route_is_404_and_nothing_is_piped(gateway, pki, upstream, who):
    with H2Client(gateway.port, pki, who, server_name="localhost") as c:
        assert c.response(c.request("GET", "/", authority=b"echo.test")).status == 404
        assert c.response(c.request("GET", "/", authority=b"ECHO.TEST.")).status == 404
    assert upstream.accepted == 0


def test_offering_h2_on_the_tcp_routes_name_never_gets_http(gateway, pki, upstream):
    """Refused (alice): closed, nothing piped, no HTTP answer.  Admitted (bob): no ALPN, and the h2 preface is piped raw, never served."""
    ctx = client_context(pki, "alice")
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    sock = connect(gateway.port, ctx, "echo.test")
    assert sock.selected_alpn_protocol() is None
    sock.sendall(PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
    assert read_until_closed(sock) == b""
    sock.close()
    assert upstream.accepted == 0
    ctx = client_context(pki, "bob")
    ctx.set_alpn_protocols(["h2"])
    sock = connect(gateway.port, ctx, "echo.test")
    assert sock.selected_alpn_protocol() is None
    sock.sendall(PREFACE)
    sock.settimeout(10)
    reply = b""
    while len(reply) < len(PREFACE):
        chunk = sock.recv(65536)
        if not chunk:
            break
        reply += chunk
    sock.close()
    assert reply == PREFACE  # the counting upstream echoes: the bytes went through as bytes
    assert upstream.accepted == 1


@pytest.mark.needs("openssl")
@pytest.mark.parametrize("name", ["echo.test", "localhost"])
def test_client_initiated_renegotiation_is_refused_so_the_sni_cannot_be_switched_midway(gateway, pki, upstream, name):
    """TLS 1.2 renegotiation would be a second handshake (another SNI, another certificate) inside a connection already dispatched."""
    proc = subprocess.Popen(
        ["openssl", "s_client", "-tls1_2", "-connect", f"127.0.0.1:{gateway.port}", "-servername", name, "-CAfile", pki["ca"],
         "-cert", pki["bob"][0], "-key", pki["bob"][1], "-legacy_renegotiation"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        assert proc.stdin is not None and proc.stdout is not None
        seen = b""
        while b"Verify return code" not in seen:  # the first handshake is done (s_client prints the session then)
            line = proc.stdout.readline()
            assert line, seen
            seen += line
        proc.stdin.write(b"R\n")
        proc.stdin.flush()
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = (seen + out).decode("latin-1")
    assert "RENEGOTIATING" in text
    assert "no renegotiation" in text and text.count("Verify return code") == 1, text[-2000:]  # the server's no_renegotiation alert
