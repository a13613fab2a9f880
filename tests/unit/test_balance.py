"""
mtlsgate.app.balance: the worker group's load board and the listener that takes a connection from the shared
socket only when its worker is not the busier one (by MARGIN), standing back at most MAX_WAITS ticks in a row.
Real loopback sockets, an in-memory reactor.
"""

from __future__ import annotations

import os
import socket
import stat

import pytest
from twisted.internet.protocol import ServerFactory
from twisted.internet.testing import MemoryReactorClock

from mtlsgate.app import balance
from mtlsgate.app.balance import GONE, MARGIN, MAX_WAITS, TICK, BalancedListener, CountPublisher, LoadBoard
from mtlsgate.tls.observer import NoObserver


def _boards(tmp_path, slots: int = 2) -> tuple[LoadBoard, list[LoadBoard]]:
    parent = LoadBoard.create(str(tmp_path), slots)
    path = os.path.join(str(tmp_path), balance.BOARD_NAME)
    return parent, [LoadBoard(path, slots, index) for index in range(slots)]


def test_the_board_is_private_new_and_every_slot_starts_as_not_running(tmp_path):
    old = os.umask(0)
    try:
        parent, (w0, w1) = _boards(tmp_path)
    finally:
        os.umask(old)
    path = os.path.join(str(tmp_path), balance.BOARD_NAME)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with pytest.raises(FileExistsError):  # never one planted beforehand (O_EXCL)
        LoadBoard.create(str(tmp_path), 2)
    assert not w0.busier_than_others()  # the other is not running: nobody to stand back for
    w0.publish(MARGIN + 5)
    assert not w0.busier_than_others()


def test_a_worker_stands_back_only_when_it_holds_margin_more_than_the_least_loaded_other(tmp_path):
    parent, (w0, w1) = _boards(tmp_path)
    w0.publish(0)
    w1.publish(0)
    assert not w0.busier_than_others() and not w1.busier_than_others()
    w0.publish(MARGIN - 1)
    assert not w0.busier_than_others()
    w0.publish(MARGIN)
    assert w0.busier_than_others() and not w1.busier_than_others()
    parent.gone(1)  # worker 1 died: worker 0 takes everything until its successor publishes
    assert not w0.busier_than_others()


def test_the_connection_observer_keeps_the_slot_current_and_tells_the_metrics(tmp_path):
    told = []

    class Metrics(NoObserver):
        def connection_opened(self) -> None:
            told.append("+")

        def connection_closed(self) -> None:
            told.append("-")

    parent, (w0, w1) = _boards(tmp_path)
    counts = CountPublisher(Metrics(), w0)
    w1.publish(0)
    for _ in range(MARGIN):
        counts.connection_opened()
    assert w1.busier_than_others() is False and w0.busier_than_others()
    counts.connection_closed()
    assert not w0.busier_than_others()
    assert told == ["+"] * MARGIN + ["-"]


class _Queue:
    """A real listening socket on loopback, and clients connected to it (queued until accepted)."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.clients: list[socket.socket] = []

    def connect(self) -> None:
        self.clients.append(socket.create_connection(self.server.getsockname()))

    def close(self) -> None:
        for client in self.clients:
            client.close()
        self.server.close()


@pytest.fixture
def queue():
    q = _Queue()
    yield q
    q.close()


def _listener(tmp_path, queue: _Queue) -> tuple[MemoryReactorClock, BalancedListener, LoadBoard]:
    reactor = MemoryReactorClock()
    parent, (w0, w1) = _boards(tmp_path)
    w1.publish(0)
    listener = BalancedListener(reactor, queue.server.fileno(), ServerFactory(), w0)
    listener.startListening()
    return reactor, listener, w0


def test_an_even_worker_takes_one_connection_per_readiness(tmp_path, queue):
    reactor, listener, board = _listener(tmp_path, queue)
    board.publish(0)
    queue.connect()
    queue.connect()
    listener.doRead()
    assert len(reactor.adoptedStreamConnections) == 1  # one, then back to the loop: the other worker may take the next
    listener.doRead()
    assert len(reactor.adoptedStreamConnections) == 2
    listener.doRead()  # nothing queued: another worker took it, nothing happens
    assert len(reactor.adoptedStreamConnections) == 2
    assert listener in reactor.getReaders()
    listener.stopListening()
    assert listener not in reactor.getReaders() and listener.fileno() == -1


def test_a_busier_worker_stands_back_a_tick_at_a_time_and_takes_it_after_max_waits(tmp_path, queue):
    reactor, listener, board = _listener(tmp_path, queue)
    board.publish(MARGIN)
    queue.connect()
    for wait in range(MAX_WAITS):
        assert listener in reactor.getReaders()
        listener.doRead()
        assert reactor.adoptedStreamConnections == [], wait  # left for the less loaded worker
        assert listener not in reactor.getReaders()  # not woken again at once by the same queued connection
        reactor.advance(TICK)
    listener.doRead()  # the other worker never took it: a connection waits a few ticks at most
    assert len(reactor.adoptedStreamConnections) == 1
    queue.connect()
    listener.doRead()  # the count of waits starts again
    assert len(reactor.adoptedStreamConnections) == 1
    listener.stopListening()


def test_the_less_loaded_worker_is_not_held_back(tmp_path, queue):
    reactor, listener, board = _listener(tmp_path, queue)
    board.publish(0)
    other = LoadBoard(os.path.join(str(tmp_path), balance.BOARD_NAME), 2, 1)
    other.publish(GONE - 1)  # the other is far busier
    queue.connect()
    listener.doRead()
    assert len(reactor.adoptedStreamConnections) == 1
    listener.stopListening()
