"""
A byte tunnel between two connections: what a client connection and an upstream connection become
after an upstream's C{101 Switching Protocols} (WebSockets, docs/engine.md).

Each end is a L{Protocol} handed a connection's transport (the client's by
L{mtlsgate.http.server.Request.upgrade}, the upstream's by L{mtlsgate.http.client.UpgradeResponse.switch}).
What one end receives is written to the other, with back-pressure both ways: each transport is
registered as the streaming producer of the other, so a peer that reads slowly stops the gateway
reading from its counterpart.  Bytes that arrive at one end before the other end is connected wait
(with reading paused) and go first.

The tunnel never parses the bytes it carries, with one exception: in the upstream-to-client direction
it reads each RFC 6455 frame's 2 to 14 byte header (never the payload) to know where frames end
(L{FrameBoundaries}), so that on shutdown it can put a Close frame (1001, "going away") between two
frames instead of cutting a frame in half.

It closes when either end closes (the other end is closed after its pending bytes are written, and
aborted if that takes longer than C{ABORT_TIMEOUT}), or when no byte has passed either way for
C{idle_timeout} seconds.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

log = Logger(namespace="mtlsgate.http.tunnel")

ABORT_TIMEOUT = 15.0  # seconds an end that is closing may take to flush before it is aborted
_REASON = b"gateway shutting down"
GOING_AWAY = bytes([0x88, 2 + len(_REASON)]) + (1001).to_bytes(2, "big") + _REASON  # an unmasked Close frame: 1001, going away


class FrameBoundaries:
    """
    Where RFC 6455 frames end in one direction of a stream: each frame's header (2 to 14 bytes) is
    read for the payload length, the payload is skipped uncounted.  It holds whatever the frames
    carry (extensions, fragmentation, masked or not): the header's layout is the same for all.
    """

    __slots__ = ("_head", "_left")

    def __init__(self) -> None:
        self._head = b""  # the start of a header split across reads
        self._left = 0  # payload bytes of the current frame still to come

    @property
    def at_boundary(self) -> bool:
        """Whether the bytes seen so far end exactly at the end of a frame."""
        return not self._head and not self._left

    def feed(self, data: bytes, stop: bool = False) -> int:
        """
        Follow C{data} through the frames; with C{stop}, only up to the first frame end it reaches.
        Returns how many bytes of C{data} were followed.
        """
        pos, size = 0, len(data)
        while pos < size:
            if self._left:
                take = min(self._left, size - pos)
                self._left -= take
                pos += take
                if stop and not self._left:
                    return pos
                continue
            have = len(self._head)
            head = self._head + data[pos : pos + 14 - have] if have else data[pos : pos + 14]
            if len(head) < 2:
                self._head = head
                return size
            second = head[1]
            length = second & 0x7F
            need = 2 + (2 if length == 126 else 8 if length == 127 else 0) + (4 if second & 0x80 else 0)
            if len(head) < need:
                self._head = head
                return size
            if length == 126:
                length = int.from_bytes(head[2:4], "big")
            elif length == 127:
                length = int.from_bytes(head[2:10], "big")
            pos += need - have
            self._head = b""
            self._left = length
            if stop and not length:
                return pos
        return pos


@implementer(IPushProducer)
class TransportReading:
    """
    One side's transport as the other side's streaming producer: the other side's back-pressure pauses reading
    here.  C{stopProducing} does nothing: a transport calls it on its producer when it is lost, and closing the
    other side (flushing what it still has to write, with TLS's close_notify) is the tunnel's own business.
    Both the WebSocket tunnel here and a TCP route's tunnel (L{mtlsgate.proxy.tcp}) pipe with it.
    """

    def __init__(self, transport: Any) -> None:
        self._transport = transport

    def pauseProducing(self) -> None:
        self._transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._transport.resumeProducing()

    def stopProducing(self) -> None:
        pass


class TunnelEnd(Protocol):
    """One connection of a L{Tunnel}: the client's or the upstream's."""

    transport: Any = None

    def __init__(self, tunnel: Tunnel, name: str) -> None:
        self.tunnel = tunnel
        self.name = name
        self.other: TunnelEnd | None = None
        self.received = 0
        self.pending: list[bytes] = []  # what arrived before the other end was connected
        self.lost = False
        self.closing = False

    def connectionMade(self) -> None:
        self.tunnel._connected(self)

    def dataReceived(self, data: bytes) -> None:
        self.tunnel._relay(self, data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.tunnel._lost(self, reason)


class Tunnel:
    """
    Two L{TunnelEnd}s, C{client} and C{upstream}, writing to each other; C{on_closed(tunnel)} is
    called once, when both connections are closed.  C{close_reason} says why it closed.
    """

    def __init__(self, reactor: IReactorTime, idle_timeout: float, on_closed: Callable[[Tunnel], None] | None = None) -> None:
        self.reactor = reactor
        self.idle_timeout = idle_timeout
        self.on_closed = on_closed
        self.client = TunnelEnd(self, "client")
        self.upstream = TunnelEnd(self, "upstream")
        self.client.other, self.upstream.other = self.upstream, self.client
        self.started = reactor.seconds()
        self.close_reason = ""  # "client closed", "upstream closed", "idle", "shutdown"
        self.closed = False
        self._frames = FrameBoundaries()  # upstream to client
        self._going_away = False  # a Close frame is to go to the client at the next frame end
        self._last = self.started
        self._idle_timer: IDelayedCall | None = None
        self._abort_timer: IDelayedCall | None = None

    @property
    def bytes_from_client(self) -> int:
        return self.client.received

    @property
    def bytes_to_client(self) -> int:
        return self.upstream.received

    # -- the ends --

    def _connected(self, end: TunnelEnd) -> None:
        other = end.other
        assert other is not None
        if self._idle_timer is None and self.idle_timeout:
            self._idle_timer = self.reactor.callLater(self.idle_timeout, self._idle_check)
        if other.transport is None:
            return
        if self.closing:
            end.transport.loseConnection()
            return
        for a, b in ((end, other), (other, end)):
            a.transport.registerProducer(TransportReading(b.transport), True)
        for source in (other, end):
            pending, source.pending = source.pending, []
            if pending:
                source.transport.resumeProducing()
                for data in pending:
                    self._relay(source, data)

    @property
    def closing(self) -> bool:
        return self.close_reason != ""

    def _relay(self, end: TunnelEnd, data: bytes) -> None:
        other = end.other
        assert other is not None
        if other.transport is None:
            end.pending.append(data)
            end.transport.pauseProducing()
            return
        if end.closing or other.closing:
            return  # the tunnel is closing: nothing more crosses it
        self._last = self.reactor.seconds()
        if end is self.upstream:
            followed = self._frames.feed(data, stop=self._going_away)
            if followed < len(data) or self._going_away and self._frames.at_boundary:
                data = data[:followed]
                end.received += len(data)
                other.transport.write(data)
                self._say_going_away()
                return
        end.received += len(data)
        other.transport.write(data)

    def _lost(self, end: TunnelEnd, reason: Failure) -> None:
        end.lost = True
        end.closing = True
        if not self.closing:
            self.close_reason = f"{end.name} closed"
        other = end.other
        assert other is not None
        if other.lost or other.transport is None:
            self._done()
            return
        self._close_end(other)

    def _close_end(self, end: TunnelEnd) -> None:
        """Close C{end} once its pending writes are out; abort it if that takes too long."""
        if end.closing or end.transport is None:
            return
        end.closing = True
        end.transport.unregisterProducer()  # TLS only shuts down once no producer is registered
        end.transport.loseConnection()
        if self._abort_timer is None:
            self._abort_timer = self.reactor.callLater(ABORT_TIMEOUT, self.abort)

    def _done(self) -> None:
        if self.closed:
            return
        self.closed = True
        for timer in (self._idle_timer, self._abort_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._idle_timer = self._abort_timer = None
        if self.on_closed is not None:
            try:
                self.on_closed(self)
            except Exception:
                log.failure("a tunnel's close hook failed")

    # -- closing it --

    def _idle_check(self) -> None:
        self._idle_timer = None
        idle = self.reactor.seconds() - self._last
        if idle < self.idle_timeout:
            self._idle_timer = self.reactor.callLater(self.idle_timeout - idle, self._idle_check)
            return
        log.info("closing a tunnel idle for {timeout:g}s (websocket_idle_timeout)", timeout=self.idle_timeout)
        self.close("idle")

    def close(self, why: str) -> None:
        """Close both connections (their pending bytes go out first)."""
        if not self.closing:
            self.close_reason = why
        for end in (self.client, self.upstream):
            if not end.lost:
                self._close_end(end)
        if all(end.lost or end.transport is None for end in (self.client, self.upstream)):
            self._done()

    def going_away(self) -> None:
        """
        The gateway is shutting down: send the client a Close frame (1001) at the next end of an
        upstream frame (at once if the stream is between frames), then close both connections.
        """
        if self.closing or self._going_away:
            return
        self._going_away = True
        if self._frames.at_boundary and not self.upstream.pending:
            self._say_going_away()

    def _say_going_away(self) -> None:
        if self.closing:
            return
        self.close_reason = "shutdown"
        if self.client.transport is not None and not self.client.lost:
            self.client.transport.write(GOING_AWAY)
        self.close("shutdown")

    def abort(self) -> None:
        """Drop both connections at once."""
        self._abort_timer = None
        if not self.closing:
            self.close_reason = "aborted"
        for end in (self.client, self.upstream):
            if not end.lost and end.transport is not None:
                end.closing = True
                end.transport.abortConnection()
        if all(end.lost or end.transport is None for end in (self.client, self.upstream)):
            self._done()
