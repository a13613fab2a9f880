"""
Attack class: a client that never answers the gateway's close (close_notify lingering).

When the gateway closes an HTTP connection itself (a C{Connection: close} response, a refused
request's 4xx, an HTTP/1.0 response without keep-alive, an idle timeout, an HTTP/2 GOAWAY), it sends
TLS close_notify and waits for the client's close_notify or FIN.  The attacker sends neither, and
reads nothing either: each such connection would keep a descriptor, a TLS object and the engine's
state in the gateway until C{idle_timeout} (60 s) plus the 15 s abort, or (HTTP/2) the 15 s abort.
The gateway must let such a connection go within a short linger once its response is written out.

The tests run the real gateway process with real TLS clients (Python C{ssl} over memory BIOs on raw
sockets: the client decides what goes out, and never sends close_notify or FIN).  Whether the gateway
still holds the connection is read from /proc: the TCP connection's socket (by its ports, in
/proc/net/tcp) among the gateway's descriptors (/proc/<pid>/fd).  No test measures time: each waits
for the gateway to drop the connection, with a safety net (L{SAFETY_NET}) well above the linger and
below the 15 s abort.  Once it is dropped, the client reads what it was sent, which must be the whole
response and the close_notify: the linger must not cut a response.
"""

from __future__ import annotations

import os
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import free_port, gateway_config, gateway_starter, poll_pauses, start_echo_upstream, started_processes

SAFETY_NET = 10.0  # seconds: a safety net only (the linger is 2 s; the bound before the fix was 15 s or more)
IDLE = 1.0  # idle_timeout of the gateway for the idle cases
BOB_ONLY = {"uri": ["spiffe://test/ns/prod/sa/bob"]}
# A response body the gateway's kernel holds in good part (the client's receive buffer is small) while the client reads nothing.
RESPONSE_IN_KERNEL, CLIENT_RECEIVE_BUFFER = 256 << 10, 16 << 10


def _config(tmp: Path, pki: dict[str, Any], upstream: int, port: int, **limits: Any) -> str:
    config = gateway_config(pki, port, [f"https://127.0.0.1:{upstream}"], **({"limits": limits} if limits else {}))
    everyone = config["routes"][0]
    config["routes"] = [{**everyone, "prefix": "/bob", "allow_client": BOB_ONLY}, everyone]
    path = tmp / f"linger-{port}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.fixture(scope="module")
def gateways(pki, tmp_path_factory):
    """Two gateways on one echo upstream: the default limits (idle_timeout 60 s), and idle_timeout IDLE."""
    tmp = tmp_path_factory.mktemp("linger")
    with started_processes() as procs:
        upstream, _ = start_echo_upstream(procs, pki, tmp)
        start = gateway_starter(procs, tmp)
        port, idle_port = free_port(), free_port()
        default = start(["--config", _config(tmp, pki, upstream, port)], port=port)
        idle = start(["--config", _config(tmp, pki, upstream, idle_port, idle_timeout=f"{IDLE:g}s")], port=idle_port)
        yield default, idle


# --- who holds the connection ------------------------------------------------------------------------------


def _process_tree(pid: int) -> list[int]:
    """C{pid} and its descendants (a worker group's workers hold the connections)."""
    pids, i = [pid], 0
    while i < len(pids):
        for task in Path(f"/proc/{pids[i]}/task").glob("*"):
            try:
                pids += [int(p) for p in (task / "children").read_text().split()]
            except OSError:
                pass
        i += 1
    return pids


def _socket_inode(local_port: int, remote_port: int) -> int:
    """The inode of the loopback TCP socket from C{local_port} to C{remote_port} (0: none, or orphaned: no process holds it)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1], fields[2]
        if int(local.split(":")[1], 16) == local_port and int(remote.split(":")[1], 16) == remote_port:
            return int(fields[9])
    return 0


def gateway_holds(gateway: Any, client: socket.socket) -> bool:
    """Whether the gateway (any process of it) still has this client's connection among its descriptors."""
    inode = _socket_inode(gateway.port, client.getsockname()[1])
    if not inode:
        return False
    target = f"socket:[{inode}]"
    for pid in _process_tree(gateway.proc.popen.pid):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    return True
            except OSError:
                continue
    return False


def wait_until_dropped(gateway: Any, client: socket.socket, what: str) -> None:
    deadline = time.monotonic() + SAFETY_NET
    pauses = poll_pauses(0.02, 0.1)
    while gateway_holds(gateway, client):
        if time.monotonic() > deadline:
            raise AssertionError(f"the gateway still holds the connection {SAFETY_NET:g}s after {what}, its client silent")
        time.sleep(next(pauses))


# --- the attacker ---------------------------------------------------------------------------------------


class SilentClient:
    """A TLS client over memory BIOs on a plain socket: it sends what it is told to, reads only when told to, and never closes."""

    def __init__(self, port: int, pki: dict[str, Any], who: str = "alice", alpn: str = "http/1.1", receive_buffer: int | None = None) -> None:
        ctx = ssl.create_default_context(cafile=pki["ca"])
        ctx.load_cert_chain(*pki[who])
        ctx.check_hostname = False
        ctx.set_alpn_protocols([alpn])
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if receive_buffer is not None:  # before connecting: the window the client offers stays that small
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.settimeout(SAFETY_NET)
        self.sock.connect(("127.0.0.1", port))
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if self.outgoing.pending:
                    self.sock.sendall(self.outgoing.read())
                chunk = self.sock.recv(65536)
                assert chunk, "the gateway closed during the handshake"
                self.incoming.write(chunk)
        if self.outgoing.pending:
            self.sock.sendall(self.outgoing.read())  # TLS 1.3: the client's Finished
        assert self.tls.selected_alpn_protocol() == alpn

    def send(self, data: bytes) -> None:
        self.tls.write(data)
        self.sock.sendall(self.outgoing.read())

    def read_all(self) -> tuple[bytes, bool]:
        """Once the gateway let go: everything it sent, and whether its close_notify came (the socket ends with EOF or a reset)."""
        got, close_notify = b"", False
        while True:
            try:
                while data := self.tls.read(65536):
                    got += data
                close_notify = True
            except ssl.SSLZeroReturnError:
                close_notify = True
            except ssl.SSLWantReadError:
                pass
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return got, close_notify
            if not chunk:
                return got, close_notify
            self.incoming.write(chunk)

    def close(self) -> None:
        self.sock.close()


# --- HTTP/1.1: the gateway's own close after a response -------------------------------------------------

REQUESTS = {
    "400_malformed": (b"GET / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", b"HTTP/1.1 400 "),
    "403_refused_body_unread": (
        b"POST /bob/x HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100000\r\nExpect: 100-continue\r\n\r\n", b"HTTP/1.1 403 "),
    "connection_close": (b"GET /echo HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n", b"HTTP/1.1 200 "),
    "http10_no_keepalive": (b"GET /echo HTTP/1.0\r\nHost: localhost\r\n\r\n", b"HTTP/1.0 200 "),
}


@pytest.mark.parametrize("case", list(REQUESTS))
def test_a_client_silent_after_the_gateways_close_is_let_go(gateways, pki, case):
    gateway, _ = gateways
    request, status = REQUESTS[case]
    client = SilentClient(gateway.port, pki)
    try:
        assert gateway_holds(gateway, client.sock)
        client.send(request)
        wait_until_dropped(gateway, client.sock, f"answering {case}")
        got, close_notify = client.read_all()
    finally:
        client.close()
    assert got.startswith(status), got[:200]
    assert close_notify  # the whole response, then close_notify: the linger cut nothing
    if b"\r\ncontent-length: " in got.lower():
        head, body = got.split(b"\r\n\r\n", 1)
        length = int(next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")).split(b":")[1])
        assert len(body) == length


def test_a_response_the_client_has_not_read_is_not_cut(gateways, pki):
    """
    A C{Connection: close} response the client does not read while the gateway lets go (it fits in the
    kernel's socket buffers, most of it on the gateway's side: the client's receive window is small): the
    linger's close is an orderly one, so the kernel still delivers what it holds (an abort's reset would
    drop it), and the client reads all of it afterwards, then the close_notify.
    """
    gateway, _ = gateways
    size = RESPONSE_IN_KERNEL
    client = SilentClient(gateway.port, pki, receive_buffer=CLIENT_RECEIVE_BUFFER)
    try:
        client.send(b"GET /bytes/%d HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n" % size)
        wait_until_dropped(gateway, client.sock, "a response not read yet")
        got, close_notify = client.read_all()
    finally:
        client.close()
    assert got.startswith(b"HTTP/1.1 200 "), got[:200]
    assert close_notify
    head, body = got.split(b"\r\n\r\n", 1)
    assert len(body) == size


def test_a_large_response_is_read_whole_after_a_silent_wait(gateways, pki):
    """
    A C{Connection: close} response larger than the socket buffers hold: the client reads nothing for a
    while (longer than the linger), then all of it; the gateway lets go once it has written everything.
    """
    gateway, _ = gateways
    size = 8 << 20
    client = SilentClient(gateway.port, pki)
    try:
        client.send(b"GET /bytes/%d HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n" % size)
        deadline = time.monotonic() + 4.0  # the client's silence, longer than the linger
        while time.monotonic() < deadline:
            time.sleep(0.2)
        assert gateway_holds(gateway, client.sock)  # the response is not written out: nothing cut
        got, close_notify = client.read_all()
    finally:
        client.close()
    assert got.startswith(b"HTTP/1.1 200 "), got[:200]
    assert close_notify
    head, body = got.split(b"\r\n\r\n", 1)
    assert len(body) == size


def test_an_idle_connection_closed_by_the_gateway_is_let_go(gateways, pki):
    _, gateway = gateways
    client = SilentClient(gateway.port, pki)
    try:
        assert gateway_holds(gateway, client.sock)
        gateway.proc.wait_for_log("closing the idle connection", timeout=SAFETY_NET)
        wait_until_dropped(gateway, client.sock, "closing the idle connection")
        got, close_notify = client.read_all()
    finally:
        client.close()
    assert got == b""
    assert close_notify


# --- HTTP/2: GOAWAY -------------------------------------------------------------------------------------

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # and an empty SETTINGS frame
DATA_ON_STREAM_0 = b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x"  # a connection error (RFC 9113 6.1): GOAWAY PROTOCOL_ERROR


def _goaway_codes(data: bytes) -> list[int]:
    codes, pos = [], 0
    while pos + 9 <= len(data):
        length = int.from_bytes(data[pos : pos + 3], "big")
        if data[pos + 3] == 7:
            codes.append(int.from_bytes(data[pos + 13 : pos + 17], "big"))
        pos += 9 + length
    return codes


@pytest.mark.parametrize("case", ["protocol_error", "idle"])
def test_an_http2_client_silent_after_goaway_is_let_go(gateways, pki, case):
    default, idle = gateways
    gateway = default if case == "protocol_error" else idle
    client = SilentClient(gateway.port, pki, alpn="h2")
    try:
        assert gateway_holds(gateway, client.sock)
        client.send(PREFACE + (DATA_ON_STREAM_0 if case == "protocol_error" else b""))
        wait_until_dropped(gateway, client.sock, f"GOAWAY ({case})")
        got, close_notify = client.read_all()
    finally:
        client.close()
    assert _goaway_codes(got) == [1 if case == "protocol_error" else 0]  # PROTOCOL_ERROR, NO_ERROR
    assert close_notify
