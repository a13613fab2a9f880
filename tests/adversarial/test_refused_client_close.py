"""
Attack class: a refused client holding its connection open.

A refused client still costs the gateway a connection (a descriptor, a TLS object, a tunnel and its
timers) until that connection ends, so a refused client must be let go at once, however it behaves.
On a TCP route there is no request to answer: the gateway sends close_notify and closes the TCP
connection right away, without waiting for the client's close_notify (RFC 8446 6.1 lets the closing
side go), so a client that never answers, or keeps sending, is not kept until the 10 s abort of a
closed tunnel.  The attacker sends its first application bytes in the same TCP segment as its last
handshake message (TLS 1.3's Finished; TLS 1.2 right behind its Finished flight), or later, and
then neither answers the close nor closes.  On an HTTP route the refused request (403) is answered
at once, in the same flight case too.  The tests wait for the end of the connection (EOF or reset),
with a safety timeout (5 s) well below the abort; none measures time.
"""

from __future__ import annotations

import socket
import ssl

import pytest

from tests.conftest import free_port
from tests.tcp_peers import CountingUpstream, client_context, start_tcp_gateway, tcp_config

VERSIONS = [pytest.param(ssl.TLSVersion.TLSv1_2, id="tls1.2"), pytest.param(ssl.TLSVersion.TLSv1_3, id="tls1.3")]
BOB_ONLY = {"uri": ["spiffe://test/ns/prod/sa/bob"]}
PROMPTLY = 5.0  # a safety net only: the gateway aborts a closed tunnel's connection after 10 s


@pytest.fixture
def upstream():
    up = CountingUpstream()
    yield up
    up.stop()


class _Client:
    """A TLS client over memory BIOs on a plain socket: it decides which bytes go in which segment, and never answers a close."""

    def __init__(self, port: int, ctx: ssl.SSLContext, name: str) -> None:
        ctx.check_hostname = False
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname=name)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=PROMPTLY)

    def handshake(self) -> None:
        """The handshake, keeping back what is still to send after it (TLS 1.3: Certificate, CertificateVerify and Finished)."""
        while True:
            try:
                self.tls.do_handshake()
                return
            except ssl.SSLWantReadError:
                if self.outgoing.pending:
                    self.sock.sendall(self.outgoing.read())
                chunk = self.sock.recv(65536)
                assert chunk, "the gateway closed during the handshake"
                self.incoming.write(chunk)

    def send(self, data: bytes) -> None:
        """C{data}, with whatever the handshake left to send, in one C{send}."""
        self.tls.write(data)
        self.sock.sendall(self.outgoing.read())

    def until_closed(self, close_notify_is_enough: bool = False) -> tuple[bytes, bool, str]:
        """
        Read until the gateway ends the TCP connection (or, with C{close_notify_is_enough}, sends its
        close_notify): the plaintext it sent, whether its close_notify came, and how the connection
        ended (C{"eof"}, C{"reset"}, or C{"close_notify"}).  The safety timeout raises.
        """
        got, close_notify = b"", False
        while True:
            try:  # first what is already in (TLS 1.2: what came with the gateway's Finished), then the next segment
                while data := self.tls.read(65536):  # Python's ssl reads a close_notify as b"" (or raises SSLZeroReturnError)
                    got += data
                close_notify = True
            except ssl.SSLZeroReturnError:
                close_notify = True
            except ssl.SSLWantReadError:
                pass
            if close_notify and close_notify_is_enough:
                return got, close_notify, "close_notify"
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return got, close_notify, "reset"
            except TimeoutError:
                raise AssertionError(f"the gateway held a refused client's connection for {PROMPTLY:g}s (close_notify: {close_notify})") from None
            if not chunk:
                return got, close_notify, "eof"
            self.incoming.write(chunk)

    def close(self) -> None:
        self.sock.close()


def _tcp_gateway(start_gateway, tmp_path, pki, upstream):
    port = free_port()
    config = tcp_config(pki, port, [{"host": "echo.test", "to": f"tcp://127.0.0.1:{upstream.port}", "allow_client": BOB_ONLY}])
    return start_tcp_gateway(start_gateway, tmp_path, config)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("when", ["with_the_finished", "after_the_refusal"])
def test_a_refused_tcp_client_that_never_answers_the_close_is_closed_at_once(start_gateway, tmp_path, pki, upstream, version, when):
    gateway = _tcp_gateway(start_gateway, tmp_path, pki, upstream)
    client = _Client(gateway.port, client_context(pki, "alice", version), "echo.test")
    try:
        client.handshake()
        if when == "after_the_refusal":
            client.sock.sendall(client.outgoing.read())  # TLS 1.3: the Finished on its own
            gateway.proc.wait_for_log("no upstream connection made")
        client.send(b"PING\r\n" * 1000)
        got, close_notify, ended = client.until_closed()
    finally:
        client.close()
    assert got == b""
    assert close_notify or ended == "reset"  # the close_notify first (a reset may overtake it: the client's bytes were unread)
    out = gateway.proc.wait_for_log("end=refused")
    assert "no upstream connection made" in out
    assert upstream.accepted == 0


@pytest.mark.parametrize("version", VERSIONS)
def test_a_refused_http_client_with_a_request_in_its_finished_flight_is_answered_at_once(start_gateway, tmp_path, pki, echo_upstream, version):
    port = free_port()
    config = tcp_config(pki, port, [], echo_upstream)
    config["routes"][0]["allow_client"] = BOB_ONLY
    gateway = start_tcp_gateway(start_gateway, tmp_path, config)
    client = _Client(gateway.port, client_context(pki, "alice", version), "localhost")
    try:
        client.handshake()
        client.send(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        got, close_notify, ended = client.until_closed(close_notify_is_enough=True)
    finally:
        client.close()
    assert got.startswith(b"HTTP/1.1 403"), got
    assert close_notify  # the answer, then the close (the TCP connection ends as every HTTP connection's: see docs/security.md)
    assert "\" 403 " in gateway.proc.wait_for_log("on route localhost/: not allowed here")
