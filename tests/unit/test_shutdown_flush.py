"""
The pause before the reactor stops (mtlsgate.app.service.written_out): it lasts while a transport still
has bytes to send, up to the grace, and not at all when nothing is waiting to be sent.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock

from mtlsgate.app.service import written_out


class _Writer:
    """Stands for a transport with bytes in its buffer (the reactor lists it among its writers)."""

    def fileno(self) -> int:
        return 99


def test_nothing_waiting_to_be_sent_stops_at_once():
    reactor = MemoryReactorClock()
    fired = []
    written_out(reactor, 0.5).addCallback(fired.append)
    assert fired == [None]


def test_a_transport_with_bytes_to_send_is_waited_for_until_it_is_done():
    reactor = MemoryReactorClock()
    writer = _Writer()
    reactor.addWriter(writer)
    fired = []
    written_out(reactor, 0.5).addCallback(fired.append)
    reactor.advance(0.2)
    assert fired == []
    reactor.removeWriter(writer)  # its buffer went out
    reactor.advance(0.01)
    assert fired == [None]
    assert reactor.seconds() < 0.5


def test_a_transport_that_never_empties_is_waited_for_the_grace_only():
    reactor = MemoryReactorClock()
    reactor.addWriter(_Writer())
    fired = []
    written_out(reactor, 0.5).addCallback(fired.append)
    for _ in range(49):
        reactor.advance(0.01)
    assert fired == []
    reactor.advance(0.02)
    assert fired == [None]


def test_a_reactor_that_does_not_list_its_writers_waits_the_grace():
    clock = Clock()
    fired = []
    written_out(clock, 0.5).addCallback(fired.append)
    clock.advance(0.49)
    assert fired == []
    clock.advance(0.01)
    assert fired == [None]
