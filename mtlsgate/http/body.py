"""
A request body as the upstream client's L{IBodyProducer}: streamed as it arrives, with back-pressure
on the client connection, and bounded by the route's C{max_body_size}.
"""

from __future__ import annotations

import collections
from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

_HIGH_WATER = 256 * 1024
_LOW_WATER = 64 * 1024
#: Pieces smaller than this are joined while they wait: an HTTP/2 client sending its window in 1- or 2-byte DATA frames
#: would otherwise make the gateway hold one Python object per frame (some 24 times the bytes: tests/adversarial/test_http2_tiny_frames.py).
_COALESCE_BELOW = 16 * 1024


class BodyTooLarge(Exception):
    """The client sent more than the route allows."""


@implementer(IBodyProducer)
class RequestBody:
    """
    The client's request body as an L{IBodyProducer} for the Agent: chunks are handed on as they
    arrive; when the upstream (or the not-yet-made connection) cannot take more, reading from the
    client is paused at a high-water mark and resumed below a low one.
    """

    def __init__(self, network: IPushProducer, length: int | None, high_water: int = _HIGH_WATER, low_water: int = _LOW_WATER) -> None:
        self.length = UNKNOWN_LENGTH if length is None else length
        self._high_water = high_water  # HTTP/2 uses 0: the stream's flow-control window is the buffer
        self._low_water = low_water
        self._network = network
        self._network_paused = False
        self._chunks: collections.deque[bytes | bytearray] = collections.deque()
        self._buffered = 0
        self._consumer: Any = None
        self._paused = False
        self._done: defer.Deferred[None] | None = None
        self.started = False
        self.complete = False
        self.stopped = False
        self.limit: int | None = None
        self.received = 0
        self.too_large = False
        self.on_change: Callable[[], None] | None = None  # told when who the upload waits on may have changed

    def waiting_on_client(self) -> bool:
        """Whether the upload waits for the client's bytes (the upstream takes all it is given), not on the upstream."""
        return self._consumer is not None and not self._paused and not self._chunks and not self.complete

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def write(self, data: bytes) -> None:
        """A chunk from the client."""
        if self.stopped or self.too_large:
            return
        self.received += len(data)
        if self.limit is not None and self.received > self.limit:
            self._overflow()
            return
        if self._consumer is not None and not self._paused and not self._chunks:
            self._consumer.write(data)
            return
        last = self._chunks[-1] if self._chunks else None
        if last is not None and len(last) < _COALESCE_BELOW:
            if not isinstance(last, bytearray):
                last = self._chunks[-1] = bytearray(last)
            last += data  # amortised: held bytes cost about their size, however small the pieces came
        else:
            self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > self._high_water and not self._network_paused:
            self._network_paused = True
            self._network.pauseProducing()
        self._changed()

    def finish(self) -> None:
        """The client sent the whole body."""
        self.complete = True
        self._flush()
        self._changed()

    def _overflow(self) -> None:
        """More than the route's max_body_size: fail the upstream request (the client gets 413)."""
        self.too_large = True
        self._chunks.clear()
        self._buffered = 0
        if self._done is not None:
            done, self._done = self._done, None
            done.errback(BodyTooLarge(self.limit))

    def startProducing(self, consumer: Any) -> defer.Deferred[None]:
        if self.too_large:
            return defer.fail(BodyTooLarge(self.limit))
        self.started = True
        self._consumer = consumer
        done = self._done = defer.Deferred()
        self._flush()  # may fire it at once, when the whole body is already here
        self._changed()
        return done

    def pauseProducing(self) -> None:
        self._paused = True
        self._changed()

    def resumeProducing(self) -> None:
        self._paused = False
        self._flush()
        self._changed()

    def stopProducing(self) -> None:
        """The upstream went away: drop what is buffered, and let the client's bytes drain."""
        self.stopped = True
        self._chunks.clear()
        self._consumer = None
        self._resume_network()
        self._changed()

    def _flush(self) -> None:
        while self._chunks and self._consumer is not None and not self._paused:
            chunk = self._chunks.popleft()
            self._buffered -= len(chunk)
            self._consumer.write(bytes(chunk) if isinstance(chunk, bytearray) else chunk)
        if self._buffered < self._low_water:
            self._resume_network()
        if self.complete and not self._chunks and self._done is not None and not self.stopped:
            done, self._done = self._done, None
            done.callback(None)

    def _resume_network(self) -> None:
        if self._network_paused:
            self._network_paused = False
            self._network.resumeProducing()
