"""
Peers for the "sending at once" attack classes (mtlsgate/tls/fastwrite.py): a TLS upstream that
answers with bodies no reordering, loss or duplication of any record can leave unchanged (seeded
random bytes, not a repeating pattern) and counts what it has sent; an upload sink that reads
slowly and answers with the hash of what it read; a raw mTLS client that parses what it receives.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import ssl
import struct
import threading
import time
from typing import Any

from tests.conftest import ThreadedListener, gateway_config

SIZES_AROUND_A_RECORD = [1, 16383, 16384, 16385, 2, 32767, 32768, 32769, 0, 65536, 65537, 1048577, 3]


def body_for(size: int, seed: int) -> bytes:
    """The body C{GET /rand/SIZE/SEED} answers with."""
    return random.Random(seed).randbytes(size)


class RandomUpstream(ThreadedListener):
    """
    A TLS upstream (keep-alive, a thread per connection): C{GET /rand/N/SEED} answers L{body_for};
    C{POST /upload} reads the body C{slow}ly (small reads from a small receive buffer) and answers
    {"bytes": n, "sha256": ...}.  C{sent} counts the body bytes the kernel has taken, per path.
    """

    def __init__(self, pki: dict[str, Any], slow: bool = False) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(*pki["upstream"])
        self.slow = slow
        self.sent: dict[str, int] = {}
        self.done: dict[str, threading.Event] = {}
        self.lock = threading.Lock()
        super().__init__()
        if slow:
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)

    def handle(self, conn: socket.socket) -> None:
        threading.Thread(target=self._serve_connection, args=(conn,), daemon=True).start()

    def _serve_connection(self, raw: socket.socket) -> None:
        raw.settimeout(30)
        try:
            conn = self.ctx.wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError):
            raw.close()
            return
        pending = b""
        try:
            while True:
                while b"\r\n\r\n" not in pending:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    pending += chunk
                head, _, pending = pending.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
                if method == "POST":
                    pending = self._upload(conn, path, int(fields.get("content-length", "0")), pending)
                else:
                    self._send_random(conn, path)
        except (OSError, ssl.SSLError, ValueError):
            return
        finally:
            conn.close()

    def _send_random(self, conn: ssl.SSLSocket, path: str) -> None:
        _, _, size, seed = path.split("/")
        body = body_for(int(size), int(seed))
        with self.lock:
            self.sent[path] = 0
            self.done[path] = threading.Event()
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n" % len(body))
        view = memoryview(body)
        for start in range(0, len(body), 65536):
            conn.sendall(view[start:start + 65536])
            with self.lock:
                self.sent[path] += len(view[start:start + 65536])
        self.done[path].set()

    def _upload(self, conn: ssl.SSLSocket, path: str, length: int, pending: bytes) -> bytes:
        digest = hashlib.sha256(pending[:length])
        got = len(pending[:length])
        pending = pending[length:]
        while got < length:
            chunk = conn.recv(min(1024 if self.slow else 65536, length - got))
            if not chunk:
                raise OSError("upload cut short")
            digest.update(chunk)
            got += len(chunk)
        answer = json.dumps({"bytes": got, "sha256": digest.hexdigest(), "path": path}).encode()
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer))
        return pending


def random_route_config(pki: dict[str, Any], port: int, upstream_port: int, **top: Any) -> dict[str, Any]:
    return gateway_config(pki, port, [f"https://127.0.0.1:{upstream_port}"], {"timeout": "60s"}, **top)


class RawClient:
    """An mTLS client (alice) on one TLS connection, ALPN http/1.1, that parses responses from what it reads."""

    def __init__(self, port: int, pki: dict[str, Any], rcvbuf: int | None = None, timeout: float = 30.0) -> None:
        ctx = ssl.create_default_context(cafile=pki["ca"])
        ctx.load_cert_chain(*pki["alice"])
        ctx.set_alpn_protocols(["http/1.1"])
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:  # before connect: the window the gateway sees
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        raw.settimeout(timeout)
        raw.connect(("127.0.0.1", port))
        self.sock = ctx.wrap_socket(raw, server_hostname="localhost")
        self.buffer = bytearray()
        self.closed = False

    def reset(self) -> None:
        """Close with RST, not FIN (SO_LINGER 0), no close_notify."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def half_close(self) -> None:
        """FIN (TCP shutdown for writing) without close_notify, keeping the TLS connection readable."""
        dup = socket.socket(fileno=os.dup(self.sock.fileno()))
        dup.shutdown(socket.SHUT_WR)
        dup.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def fill(self, at_least: int = 1) -> None:
        while len(self.buffer) < at_least and not self.closed:
            chunk = self.sock.recv(262144)
            if not chunk:
                self.closed = True
            self.buffer += chunk

    def read_head(self) -> tuple[int, dict[str, str]]:
        while b"\r\n\r\n" not in self.buffer:
            before = len(self.buffer)
            self.fill(before + 1)
            assert len(self.buffer) > before, f"connection closed inside a response head: {bytes(self.buffer[:200])!r}"
        head, _, rest = bytes(self.buffer).partition(b"\r\n\r\n")
        self.buffer = bytearray(rest)
        lines = head.decode("latin-1").split("\r\n")
        fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        return int(lines[0].split(" ")[1]), fields

    def read_exact(self, n: int) -> bytes:
        self.fill(n)
        assert len(self.buffer) >= n, f"connection closed after {len(self.buffer)} of {n} body bytes"
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data

    def read_response(self) -> tuple[int, dict[str, str], bytes]:
        status, fields = self.read_head()
        if "content-length" in fields:
            return status, fields, self.read_exact(int(fields["content-length"]))
        assert fields.get("transfer-encoding") == "chunked", fields
        body = bytearray()
        while True:
            while b"\r\n" not in self.buffer:
                self.fill(len(self.buffer) + 1)
            line, _, rest = bytes(self.buffer).partition(b"\r\n")
            self.buffer = bytearray(rest)
            size = int(line.split(b";")[0], 16)
            body += self.read_exact(size)
            self.read_exact(2)
            if size == 0:
                return status, fields, bytes(body)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def get(path: str) -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: localhost\r\n\r\n" % path.encode()


def tree_rss(pid: int) -> int:
    """The resident memory (bytes) of C{pid} and its children (the workers)."""
    total = 0
    pids = [pid]
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                pids += [int(p) for p in f.read().split()]
        except OSError:
            pass
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            pass
    return total


def wait_until_still(read: Any, settle: int = 6, every: float = 0.25, timeout: float = 30.0) -> Any:
    """
    The value of C{read()} once it has stopped changing for C{settle} looks in a row (a stalled flow:
    the event is "no progress", which has no signal of its own); C{timeout} is a safety net.
    """
    deadline = time.monotonic() + timeout
    last, same = read(), 0
    while same < settle and time.monotonic() < deadline:
        time.sleep(every)
        now = read()
        same = same + 1 if now == last else 0
        last = now
    return last
