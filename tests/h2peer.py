"""
A raw HTTP/2 client for the tests: the C{h2} library over a real TLS socket (ALPN h2), with outbound
validation off so that a test can send exactly what an attacker would, and frames by hand (hyperframe).
"""

from __future__ import annotations

import socket
import ssl
import time
from typing import Any, Callable

import attrs
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    ConnectionTerminated, DataReceived, InformationalResponseReceived, PingAckReceived, ResponseReceived, StreamEnded, StreamReset,
    TrailersReceived, WindowUpdated,
)  # fmt: skip


@attrs.define
class Stream:
    status: int | None = None
    headers: list[tuple[bytes, bytes]] = attrs.Factory(list)
    body: bytearray = attrs.Factory(bytearray)
    trailers: list[tuple[bytes, bytes]] | None = None
    informational: list[int] = attrs.Factory(list)
    ended: bool = False
    reset: int | None = None  # the RST_STREAM error code

    def header(self, name: bytes) -> bytes | None:
        return next((v for n, v in self.headers if n == name), None)

    @property
    def done(self) -> bool:
        return self.ended or self.reset is not None


class H2Client:
    """One HTTP/2 connection to the gateway as C{client} (a pki name, or None for no certificate)."""

    def __init__(
        self, port: int, pki: dict[str, Any], client: str | None = "alice", *, timeout: float = 30.0, validate: bool = False,
        auto_ack: bool = True, alpn: tuple[str, ...] = ("h2", "http/1.1"), server_name: str = "localhost",
        context: ssl.SSLContext | None = None, session: ssl.SSLSession | None = None,
    ) -> None:  # fmt: skip
        """With C{context} (its certificate and ALPN as set there), C{session} is offered for resumption."""
        ctx = context or ssl.create_default_context(cafile=pki["ca"])
        if context is None:
            if client:
                ctx.load_cert_chain(*pki[client])
            ctx.set_alpn_protocols(list(alpn))
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as HTTP/2 clients do (curl, browsers): no Nagle stalls between frames
        self.sock = ctx.wrap_socket(raw, server_hostname=server_name, session=session)
        self.alpn = self.sock.selected_alpn_protocol()
        self.timeout = timeout
        self.auto_ack = auto_ack  # acknowledge received DATA at once (off: a slow consumer, acknowledging by hand)
        self.conn = H2Connection(H2Configuration(
            client_side=True, header_encoding=None, validate_outbound_headers=validate, normalize_outbound_headers=validate,
            validate_inbound_headers=True,
        ))  # fmt: skip
        self.streams: dict[int, Stream] = {}
        self.goaway: ConnectionTerminated | None = None
        self.ping_acks = 0
        self.window_waits = 0  # times send_body found the gateway's window shut and waited for a WINDOW_UPDATE
        self.closed = False
        if self.alpn == "h2":
            self.conn.initiate_connection()
            self.flush()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> H2Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.send_raw(data)

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(
        self, method: str = "GET", path: str = "/", headers: list[tuple[bytes, bytes]] | None = None, body: bytes | None = None,
        authority: bytes | None = b"localhost", end: bool = True,
    ) -> int:  # fmt: skip
        """Open a stream; the body (if any) is sent as the window allows by L{send_body}.  Returns the stream id."""
        stream_id = self.conn.get_next_available_stream_id()
        fields = [(b":method", method.encode()), (b":scheme", b"https"), (b":path", path.encode())]
        if authority is not None:
            fields.insert(1, (b":authority", authority))
        fields += headers or []
        self.streams[stream_id] = Stream()
        self.conn.send_headers(stream_id, fields, end_stream=end and body is None)
        self.flush()
        if body is not None:
            self.send_body(stream_id, body, end=end)
        return stream_id

    def send_body(self, stream_id: int, body: bytes, end: bool = True) -> None:
        view = memoryview(body)
        while view:
            room = min(self.conn.local_flow_control_window(stream_id), self.conn.max_outbound_frame_size)
            if room <= 0:
                self.window_waits += 1
                self.read(lambda: self.conn.local_flow_control_window(stream_id) > 0 or self.streams[stream_id].done)
                if self.streams[stream_id].done:
                    return
                continue
            self.conn.send_data(stream_id, bytes(view[:room]))
            view = view[room:]
            self.flush()
        if end:
            self.conn.end_stream(stream_id)
            self.flush()

    def read_once(self) -> bool:
        """Read and handle what arrives (one recv); False when the connection closed."""
        try:
            data = self.sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError):
            data = b""
        if not data:
            self.closed = True
            return False
        for event in self.conn.receive_data(data):
            self._event(event)
        self.flush()
        return True

    def read(self, until: Callable[[], bool], timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or self.timeout)
        while not until():
            if time.monotonic() > deadline:
                raise AssertionError("timed out waiting on the gateway")
            if not self.read_once():
                return

    def dawdle(self, seconds: float) -> None:
        """Be a slow client: handle what arrives for this long without reading faster (the pace of the test, not its synchronisation)."""
        deadline = time.monotonic() + seconds
        self.sock.settimeout(0.1)
        try:
            while time.monotonic() < deadline:
                try:
                    if not self.read_once():
                        return
                except TimeoutError:
                    pass
        finally:
            self.sock.settimeout(self.timeout)

    def ping(self) -> None:
        """A PING, and wait for its ACK: the gateway has then handled every frame sent before it."""
        before = self.ping_acks
        self.conn.ping(b"mtlsgate")
        self.flush()
        self.read(lambda: self.ping_acks > before)

    def response(self, stream_id: int) -> Stream:
        self.read(lambda: self.streams[stream_id].done or self.goaway is not None)
        return self.streams[stream_id]

    def read_until_closed(self) -> None:
        self.read(lambda: self.closed)

    def _event(self, event: Any) -> None:
        stream = self.streams.get(getattr(event, "stream_id", 0) or 0)
        if isinstance(event, ResponseReceived) and stream is not None:
            stream.headers = list(event.headers)
            stream.status = int(dict(event.headers)[b":status"])
        elif isinstance(event, InformationalResponseReceived) and stream is not None:
            stream.informational.append(int(dict(event.headers)[b":status"]))
        elif isinstance(event, DataReceived) and stream is not None:
            stream.body += event.data
            if self.auto_ack:
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, TrailersReceived) and stream is not None:
            stream.trailers = list(event.headers)
        elif isinstance(event, StreamEnded) and stream is not None:
            stream.ended = True
        elif isinstance(event, StreamReset) and stream is not None:
            stream.reset = event.error_code
        elif isinstance(event, ConnectionTerminated):
            self.goaway = event
        elif isinstance(event, PingAckReceived):
            self.ping_acks += 1
        elif isinstance(event, WindowUpdated):
            pass


def simple_get(port: int, pki: dict[str, Any], path: str = "/", client: str | None = "alice", **kw: Any) -> Stream:
    with H2Client(port, pki, client) as c:
        assert c.alpn == "h2"
        return c.response(c.request("GET", path, **kw))
