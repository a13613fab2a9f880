"""
Dealing a worker group's new connections out by load.

With C{SO_REUSEPORT} the kernel hashes each connection to one worker's socket: even only on average,
and a client holding 32 kept-alive connections got 20 on one worker and 12 on the other as often as
16 and 16 (bench/RESULTS.md, issue #13); the busier worker then sets the tail latency while the
other idles.  One shared socket alone is worse: on a busy machine the worker that happens to be
running takes connection after connection before the other is scheduled.

So the workers of a group (default C{worker_affinity: connection}) share one listening socket and a
load board: a small file in the parent's private directory (the one the configuration is handed
over in, C{0700}; the file C{0600}), one 64-bit slot per worker holding its open client connections,
which each worker keeps current as connections open and close (L{CountPublisher}, on the TLS
factory's connection observer).  When the socket is readable, a worker takes one connection
(L{BalancedListener}), unless it holds C{MARGIN} or more connections than the least loaded other
worker: then it stands back for a millisecond, and the other takes it.  A worker stands back at most
C{MAX_WAITS} times in a row, so a connection waits a few milliseconds at most even when the other
worker is stuck; a worker that is not running has its slot set to L{GONE} by the parent.

Only public reactor APIs: the listening socket is an C{IReadDescriptor} given to C{addReader}, each
accepted socket is handed to C{adoptStreamConnection}, which builds the protocol as a port would.
"""

from __future__ import annotations

import errno
import mmap
import os
import socket
from typing import Any

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IListeningPort, IReadDescriptor
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mtlsgate.reactors import IGatewayReactor
from mtlsgate.tls.observer import IConnectionObserver

log = Logger(namespace="mtlsgate.app.balance")

BOARD_NAME = "loads"
GONE = 2**62  # the slot of a worker that is not running: never the least loaded
MARGIN = 2  # a worker holding this many more connections than the least loaded other stands back
TICK = 0.001  # seconds a worker stands back
MAX_WAITS = 5  # times in a row: a queued connection waits at most about 5 ms for the less loaded worker
RETRY_AFTER = 0.1  # seconds before accepting again after accept() ran out of descriptors or memory
_RESOURCE_ERRORS = frozenset([errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM])


class LoadBoard:
    """One 64-bit slot per worker, in a file every process of the group maps."""

    def __init__(self, path: str, slots: int, index: int | None = None) -> None:
        fd = os.open(path, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0))
        try:
            self._map = mmap.mmap(fd, 8 * slots)
        finally:
            os.close(fd)
        self._slots = memoryview(self._map).cast("q")
        self.index = index
        self.count = 0

    @classmethod
    def create(cls, directory: str, slots: int) -> LoadBoard:
        """The parent's: a new board in its private C{directory}, every slot L{GONE} until its worker starts."""
        path = os.path.join(directory, BOARD_NAME)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            os.write(fd, GONE.to_bytes(8, "little", signed=True) * slots)
        finally:
            os.close(fd)
        return cls(path, slots)

    def publish(self, count: int) -> None:
        """This worker's open connections."""
        assert self.index is not None
        self.count = count
        self._slots[self.index] = count

    def gone(self, index: int) -> None:
        """The parent's: worker C{index} is not running."""
        self._slots[index] = GONE

    def busier_than_others(self) -> bool:
        """This worker holds L{MARGIN} or more connections than the least loaded other one."""
        index, least = self.index, GONE
        for slot, count in enumerate(self._slots):
            if slot != index and count < least:
                least = count
        return least != GONE and self.count >= least + MARGIN

    def close(self) -> None:
        self._slots.release()
        self._map.close()


@implementer(IConnectionObserver)
class CountPublisher:
    """The TLS factory's connection observer: tells C{inner} (the metrics), and keeps this worker's slot current."""

    def __init__(self, inner: IConnectionObserver, board: LoadBoard) -> None:
        self.inner = inner
        self.board = board
        board.publish(0)

    def handshake(self, result: str, reason: str = "") -> None:
        self.inner.handshake(result, reason)

    def connection_opened(self) -> None:
        self.board.publish(self.board.count + 1)
        self.inner.connection_opened()

    def connection_closed(self) -> None:
        self.board.publish(self.board.count - 1)
        self.inner.connection_closed()


@implementer(IReadDescriptor, IListeningPort)
class BalancedListener:
    """Accept from the group's listening socket (C{fd}, duplicated here), one connection per readiness, by the board."""

    def __init__(self, reactor: IGatewayReactor, fd: int, factory: ServerFactory, board: LoadBoard) -> None:
        self.reactor = reactor
        self.factory = factory
        self.board = board
        self.socket = socket.socket(fileno=os.dup(fd))
        self.socket.setblocking(False)
        self._reading = False
        self._later: Any = None
        self._waits = 0

    # --- IListeningPort ------------------------------------------------------------------------

    def startListening(self) -> None:
        self.factory.doStart()
        self._start_reading()

    def stopListening(self) -> defer.Deferred[None]:
        self._stop_reading()
        if self._later is not None and self._later.active():
            self._later.cancel()
        if self.socket.fileno() != -1:
            self.socket.close()
            self.factory.doStop()
        return defer.succeed(None)

    def getHost(self) -> IPv4Address | IPv6Address:
        host, port = self.socket.getsockname()[:2]
        return IPv6Address("TCP", host, port) if self.socket.family == socket.AF_INET6 else IPv4Address("TCP", host, port)

    # --- IReadDescriptor -----------------------------------------------------------------------

    def fileno(self) -> int:
        return self.socket.fileno()

    def doRead(self) -> None:
        if self._waits < MAX_WAITS and self.board.busier_than_others():
            self._waits += 1
            self._pause(TICK)  # the less loaded worker, woken too, takes it meanwhile
            return None
        self._waits = 0
        try:
            connection, _ = self.socket.accept()
        except (BlockingIOError, InterruptedError):
            return None  # another worker took it
        except OSError as e:
            if e.errno in (errno.ECONNABORTED, errno.EPROTO):
                return None  # the client went away while queued
            if e.errno in _RESOURCE_ERRORS:
                log.warn("cannot accept a connection ({error}); trying again in {s}s", error=os.strerror(e.errno or 0), s=RETRY_AFTER)
                self._pause(RETRY_AFTER)  # the socket stays readable: accepting again at once would spin
                return None
            raise
        try:
            connection.setblocking(False)
            self.reactor.adoptStreamConnection(connection.fileno(), connection.family, self.factory)  # on a duplicate
        except OSError as e:  # reset between accept() and getpeername(): nothing to serve
            log.debug("a connection went away as it was accepted: {error}", error=e)
        finally:
            connection.close()
        return None

    def connectionLost(self, reason: Failure) -> None:
        self.stopListening()

    def logPrefix(self) -> str:
        return "mtlsgate.app.balance"

    # -------------------------------------------------------------------------------------------

    def _pause(self, seconds: float) -> None:
        self._stop_reading()
        self._later = self.reactor.callLater(seconds, self._start_reading)

    def _start_reading(self) -> None:
        if not self._reading and self.socket.fileno() != -1:
            self._reading = True
            self.reactor.addReader(self)

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            self.reactor.removeReader(self)
