"""
Real WebSocket peers for the tests: an mTLS WebSocket upstream (the C{websockets} library's server in
a thread, requiring a client certificate from the test CA), a raw scripted mTLS upstream that records
every byte it is sent, and a client connecting through the gateway with a client certificate.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from typing import Any, Callable

from websockets.datastructures import Headers as WSHeaders
from websockets.http11 import Response
from websockets.sync.client import ClientConnection, connect
from websockets.sync.server import ServerConnection, serve

from tests.conftest import ThreadedListener


class WebSocketUpstream:
    """
    C{websockets}' server over mTLS on a free loopback port, in a thread.  Paths: C{/echo} echoes every
    message; C{/hello} sends "hello" first, then echoes; C{/close/CODE} closes with CODE after the first
    message; C{/refuse} answers the handshake with 403; C{/flood/N} sends N MiB; C{/sink} counts what it
    gets (C{/sink/slow} after 3 s).  It offers permessage-deflate (clients that ask get it).  Each
    handshake's path, headers and client certificate subject are kept in C{handshakes}.
    """

    def __init__(self, pki: dict[str, Any]) -> None:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=pki["ca"])
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_cert_chain(*pki["upstream"])
        self.handshakes: list[dict[str, Any]] = []
        self.closed_codes: list[int | None] = []
        self.done = threading.Event()  # set when a handler returns
        self.server = serve(self._handler, "127.0.0.1", 0, ssl=ctx, max_size=None, process_request=self._process_request)
        self.port = self.server.socket.getsockname()[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def _process_request(self, connection: ServerConnection, request: Any) -> Response | None:
        peer = connection.socket.getpeercert()  # type: ignore[attr-defined]
        subject = dict(pair[0] for pair in peer.get("subject", ())) if peer else None
        self.handshakes.append({"path": request.path, "headers": {k.lower(): v for k, v in request.headers.raw_items()}, "subject": subject})
        if request.path == "/refuse":
            return Response(403, "Forbidden", WSHeaders([("Content-Length", "8")]), b"refused\n")
        return None

    def _handler(self, connection: ServerConnection) -> None:
        path = connection.request.path if connection.request else ""
        try:
            if path == "/hello":
                connection.send("hello")
            if path.startswith("/flood/"):  # N MiB in 1 MiB messages, then a text message "done"
                chunk = bytes(range(256)) * 4096
                for _ in range(int(path.rsplit("/", 1)[1])):
                    connection.send(chunk)
                connection.send("done")
                connection.recv()
                return
            if path.startswith("/sink"):  # counts the bytes of binary messages until a text message, then answers the count
                if path == "/sink/slow":
                    time.sleep(3)  # a reader that reads nothing for 3 s: what it is sent meanwhile must wait somewhere
                total = 0
                while isinstance(message := connection.recv(), bytes):
                    total += len(message)
                connection.send(str(total))
                connection.recv()
                return
            if path.startswith("/close/"):
                connection.recv()
                connection.close(int(path.rsplit("/", 1)[1]), "bye")
                return
            for message in connection:
                connection.send(message)
        except Exception:
            pass
        finally:
            self.closed_codes.append(connection.close_code)
            self.done.set()

    def stop(self) -> None:
        self.server.shutdown()
        self._thread.join(10)


def client_context(pki: dict[str, Any], client: str | None = "alice") -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=pki["ca"])
    if client is not None:
        ctx.load_cert_chain(*pki[client])
    return ctx


def ws_connect(port: int, path: str, pki: dict[str, Any], client: str | None = "alice", **kwargs: Any) -> ClientConnection:
    """A WebSocket client through the gateway on C{port} (Host: localhost) with C{client}'s certificate."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    options: dict[str, Any] = {"max_size": None, "compression": None, "open_timeout": 20, "close_timeout": 20, **kwargs}
    return connect(f"wss://localhost:{port}{path}", sock=sock, ssl=client_context(pki, client), server_hostname="localhost", **options)


class ScriptedUpstream(ThreadedListener):
    """
    A raw mTLS upstream: reads the first request head of each connection, answers it with
    C{answer(head)}, and records what the connection carried: C{before_answer} (the bytes it had when
    it answered) and C{received} (everything, until the connection closed), one entry per connection.
    Connections are served one at a time, in the order they were accepted.
    """

    def __init__(self, pki: dict[str, Any], answer: Callable[[bytes], bytes]) -> None:
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=pki["ca"])
        self.ctx.verify_mode = ssl.CERT_REQUIRED
        self.ctx.load_cert_chain(*pki["upstream"])
        self.answer = answer
        self.before_answer: list[bytes] = []
        self.received: list[bytes] = []
        self.recorded = threading.Condition()
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        data = b""
        try:
            conn.settimeout(30)
            with self.ctx.wrap_socket(conn, server_side=True) as s:
                while b"\r\n\r\n" not in data:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                self.before_answer.append(data)
                s.sendall(self.answer(data))
                while chunk := s.recv(65536):
                    data += chunk
        except (OSError, ssl.SSLError):
            pass
        finally:
            with self.recorded:
                self.received.append(data)
                self.recorded.notify_all()

    def wait_for(self, marker: bytes, timeout: float = 30.0) -> bytes:
        """What the connection whose bytes hold C{marker} carried, once it closed."""
        with self.recorded:
            found = self.recorded.wait_for(lambda: any(marker in r for r in self.received), timeout)
            assert found, f"no upstream connection carried {marker!r}"
            return next(r for r in self.received if marker in r)
