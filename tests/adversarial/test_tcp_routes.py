"""
Attack class: reaching a TCP route's upstream without being admitted.

A TCP route pipes bytes, so there is no request to answer with 403: the decision is made once, when
the handshake is done, and a refused client is closed before any upstream connection is opened.  The
attacker tries: a certificate the allow rules do not name, an untrusted or expired certificate under
``enforcement: policy``, no certificate; resuming the TLS session a refused handshake left (TLS 1.2
and 1.3), or a session made for another route; spellings of the server name (case, trailing dot),
no SNI at all, the SNI of an HTTP route, or a ``Host`` header naming the TCP route over HTTP; bytes
sent before the handshake is done or in the same flight as the client's Finished; and more tunnels
than ``max_connections``.  In every case the upstream's accept count stays 0 (or at the limit).
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import time

import pytest

from tests.conftest import free_port, https_request
from tests.tcp_peers import (
    CountingUpstream,
    client_context,
    connect,
    read_until_closed,
    start_tcp_gateway,
    tcp_config,
)  # fmt: skip

VERSIONS = [pytest.param(ssl.TLSVersion.TLSv1_2, id="tls1.2"), pytest.param(ssl.TLSVersion.TLSv1_3, id="tls1.3")]
BOB_ONLY = {"uri": ["spiffe://test/ns/prod/sa/bob"]}


@pytest.fixture
def upstream():
    up = CountingUpstream()
    yield up
    up.stop()


def _gateway(start_gateway, tmp_path, pki, upstream, route=None, http_upstream=None, args=(), **top):
    port = free_port()
    config = tcp_config(pki, port, [{"host": "echo.test", "to": f"tcp://127.0.0.1:{upstream.port}", **(route or {})}], http_upstream, **top)
    return start_tcp_gateway(start_gateway, tmp_path, config, *args)


def _exchange(port: int, ctx: ssl.SSLContext, name: str | None, data: bytes = b"PING\r\n", session=None) -> tuple[bytes, ssl.SSLSocket]:
    """Connect, send C{data}, read until closed or a reply arrives; the socket is returned closed."""
    sock = connect(port, ctx, name, session=session)
    try:
        sock.sendall(data)
        sock.settimeout(10)
        reply = b""
        try:
            while len(reply) < len(data):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
        except (ConnectionResetError, ssl.SSLError, TimeoutError):
            pass
    finally:
        sock.close()
    return reply, sock


def test_an_allowed_client_is_piped_the_baseline(start_gateway, tmp_path, pki, upstream):
    gateway = _gateway(start_gateway, tmp_path, pki, upstream, {"allow_client": BOB_ONLY})
    reply, _ = _exchange(gateway.port, client_context(pki, "bob"), "echo.test")
    assert reply == b"PING\r\n" and upstream.accepted == 1


@pytest.mark.parametrize("who, reason", [("alice", "not allowed here"), ("stranger", "untrusted issuer"), ("expired", "expired"), (None, "missing")])
def test_a_refused_client_never_reaches_the_upstream(start_gateway, tmp_path, pki, upstream, who, reason):
    gateway = _gateway(start_gateway, tmp_path, pki, upstream, {"allow_client": BOB_ONLY},
                       downstream_mtls={"ca_file": pki["ca"], "enforcement": "policy", "client_auth": "optional"})
    reply, _ = _exchange(gateway.port, client_context(pki, who), "echo.test")
    assert reply == b""
    out = gateway.proc.wait_for_log("end=refused")
    assert f"client certificate {reason}" in out and "no upstream connection made" in out
    assert _accepted_until_now(upstream) == 0  # counting a connection that would be late, still in the accept queue


def test_a_refused_client_that_never_closes_is_cut_off(start_gateway, tmp_path, pki, upstream):
    """The gateway's close_notify unanswered, the socket held open: the connection still ends (its access line is written when it does)."""
    gateway = _gateway(start_gateway, tmp_path, pki, upstream, {"allow_client": BOB_ONLY})
    sock = connect(gateway.port, client_context(pki, "alice"), "echo.test")
    gateway.proc.wait_for_log("no upstream connection made")
    gateway.proc.wait_for_log("end=refused", timeout=30)
    sock.close()
    assert upstream.accepted == 0


def test_an_untrusted_certificate_fails_the_handshake_under_reject_connection(start_gateway, tmp_path, pki, upstream):
    gateway = _gateway(start_gateway, tmp_path, pki, upstream)
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        reply, _ = _exchange(gateway.port, client_context(pki, "stranger"), "echo.test")
        assert reply == b""  # TLS 1.3: the client learns of the alert on its first read
        raise ConnectionResetError("closed without a reply")
    gateway.proc.wait_for_log("refused client certificate")
    assert upstream.accepted == 0


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("who", ["stranger", "expired"])
def test_resuming_a_refused_session_never_reaches_the_upstream(start_gateway, tmp_path, pki, upstream, who, version):
    gateway = _gateway(start_gateway, tmp_path, pki, upstream, downstream_mtls={"ca_file": pki["ca"], "enforcement": "policy"})
    ctx = client_context(pki, who, version)
    session = None
    for _ in range(4):
        sock = connect(gateway.port, ctx, "echo.test", session=session)
        sock.sendall(b"PING\r\n")
        assert read_until_closed(sock) == b""
        if not sock.session_reused:
            session = sock.session  # TLS 1.3: the ticket came after the handshake
        sock.close()
    assert session is not None
    assert upstream.accepted == 0
    assert gateway.proc.wait_for_count("no upstream connection made", 4).count("no upstream connection made") == 4


@pytest.mark.parametrize("version", VERSIONS)
def test_a_session_admitted_on_an_http_route_is_judged_again_on_a_tcp_route(start_gateway, tmp_path, pki, upstream, echo_upstream, version):
    """
    alice's session from the HTTP route (where she is allowed), resumed asking for the TCP route's
    name (bob only): TLS 1.3 takes the new name, and the TCP route refuses her; TLS 1.2 keeps the
    session's name (OpenSSL ties SNI to a 1.2 session), so the connection is HTTP's, as the session
    was.  Either way the TCP upstream sees nothing.
    """
    gateway = _gateway(start_gateway, tmp_path, pki, upstream, {"allow_client": BOB_ONLY}, http_upstream=echo_upstream)
    ctx = client_context(pki, "alice", version)
    sock = connect(gateway.port, ctx, "localhost")
    sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    assert read_until_closed(sock).startswith(b"HTTP/1.1 200")
    session = sock.session
    sock.close()
    for _ in range(2):
        sock = connect(gateway.port, ctx, "echo.test", session=session)
        sock.sendall(b"PING\r\n\r\n")
        reply = read_until_closed(sock)
        resumed = sock.session_reused
        sock.close()
        if resumed and version is ssl.TLSVersion.TLSv1_2:
            assert reply.startswith(b"HTTP/1.1 400"), reply
        else:
            assert reply == b""
            gateway.proc.wait_for_log("not allowed here")
        session = sock.session if not resumed else session
    assert upstream.accepted == 0


def test_a_session_made_on_the_tcp_route_resumed_with_another_name_keeps_its_rules(start_gateway, tmp_path, pki, upstream, echo_upstream):
    """TLS 1.2: alice's session refused on the TCP route, resumed asking for the HTTP route's name, is still the TCP route's, and still refused."""
    gateway = _gateway(start_gateway, tmp_path, pki, upstream, {"allow_client": BOB_ONLY}, http_upstream=echo_upstream)
    ctx = client_context(pki, "alice", ssl.TLSVersion.TLSv1_2)
    sock = connect(gateway.port, ctx, "echo.test")
    sock.sendall(b"PING\r\n")
    assert read_until_closed(sock) == b""
    session = sock.session
    sock.close()
    sock = connect(gateway.port, ctx, "localhost", session=session)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    reply = read_until_closed(sock)
    sock.close()
    assert reply == b"" or reply.startswith(b"HTTP/1.1 200")  # refused on the session's TCP route, or HTTP's if not resumed
    assert upstream.accepted == 0


@pytest.mark.parametrize("spelling", ["ECHO.TEST", "Echo.Test", "echo.test."])
def test_spellings_of_the_server_name_pick_the_same_route_and_its_rules(start_gateway, tmp_path, pki, upstream, spelling):
    gateway = _gateway(start_gateway, tmp_path, pki, upstream, {"allow_client": BOB_ONLY})
    out = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{gateway.port}", "-servername", spelling, "-CAfile", pki["ca"],
         "-cert", pki["alice"][0], "-key", pki["alice"][1], "-quiet"],
        input=b"PING\r\n", capture_output=True, timeout=30,
    )  # fmt: skip
    assert b"PING" not in out.stdout
    gateway.proc.wait_for_log("on TCP route echo.test")
    assert upstream.accepted == 0
    reply, _ = _exchange(gateway.port, client_context(pki, "bob"), spelling.rstrip("."))  # Python's ssl refuses a trailing dot
    assert reply == b"PING\r\n" and upstream.accepted == 1


def test_no_sni_or_an_http_routes_sni_is_served_as_http_never_piped(start_gateway, tmp_path, pki, upstream, echo_upstream):
    gateway = _gateway(start_gateway, tmp_path, pki, upstream, http_upstream=echo_upstream)
    for name in (None, "localhost", "unknown.test"):
        reply, _ = _exchange(gateway.port, client_context(pki, "alice"), name, b"PING\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 400"), (name, reply)
    status, _, body = https_request(gateway.port, ca=pki["ca"], cert=pki["alice"], host="echo.test")
    assert status == 404, body
    assert upstream.accepted == 0


def test_plaintext_before_the_handshake_never_reaches_the_upstream(start_gateway, tmp_path, pki, upstream):
    gateway = _gateway(start_gateway, tmp_path, pki, upstream)
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        sock.sendall(b"PING\r\n*1\r\n$4\r\nPING\r\n" * 100)
        read_until_closed(sock)
    gateway.proc.wait_for_log("TLS handshake with 127.0.0.1")
    assert upstream.accepted == 0


@pytest.mark.parametrize("version", VERSIONS)
def test_bytes_in_the_same_flight_as_the_finished_of_a_refused_client_go_nowhere(start_gateway, tmp_path, pki, upstream, version):
    """The client's Finished and its first application bytes in one TCP segment: dispatch happens before any of them is read."""
    gateway = _gateway(start_gateway, tmp_path, pki, upstream, {"allow_client": BOB_ONLY})
    ctx = client_context(pki, "alice", version)
    ctx.check_hostname = False
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="echo.test")
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if outgoing.pending:
                    sock.sendall(outgoing.read())
                incoming.write(sock.recv(65536))
        tls.write(b"PING\r\n" * 1000)
        sock.sendall(outgoing.read())  # Finished (TLS 1.3; TLS 1.2's went above) and the application data together
        gateway.proc.wait_for_log("no upstream connection made")
    # The client gave up (closed): the connection is over (its access line), and nothing it sent reached the upstream.
    gateway.proc.wait_for_log("end=refused")
    assert _accepted_until_now(upstream) == 0


def _accepted_until_now(upstream: CountingUpstream) -> int:
    """
    How many connections C{upstream} accepted before this call, counting any still in its accept queue: one
    more connection of ours goes in behind them, and once it is accepted (accepts are in order) so are they.
    """
    with socket.create_connection(("127.0.0.1", upstream.port), timeout=10) as probe:
        ours = probe.getsockname()
        deadline = time.monotonic() + 10
        while (ahead := next((i for i, conn in enumerate(list(upstream._conns)) if _peer(conn) == ours), None)) is None:
            assert time.monotonic() < deadline, "the upstream never accepted our connection"
            time.sleep(0.01)
    return ahead


def _peer(conn: socket.socket) -> object:
    try:
        return conn.getpeername()
    except OSError:
        return None


def test_more_tunnels_than_max_connections_are_refused(start_gateway, tmp_path, pki, upstream):
    # One process: a route's max_connections counts per worker (see configuration.md), so a second worker would admit one more.
    gateway = _gateway(start_gateway, tmp_path, pki, upstream, {"max_connections": 1}, args=("--workers", "1"))
    first = connect(gateway.port, client_context(pki), "echo.test")
    first.sendall(b"one")
    assert first.recv(3) == b"one"
    reply, _ = _exchange(gateway.port, client_context(pki), "echo.test", b"two")
    assert reply == b""
    gateway.proc.wait_for_log("at its max_connections (1)")
    assert upstream.accepted == 1
    first.close()
