"""
A timer kept over its holders: an HTTP/1.1 connection's requests, one after the other, each arm it (the proxy's route
timeout, then its stall timer) and disarm it when done.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime


class ReusableTimer:
    """
    One holder at a time calls C{fired} when its time comes.  Armed again, the timer's one C{DelayedCall} is moved on
    with C{reset()} instead of being cancelled and made anew (C{callLater} and C{cancel} cost some 3 µs of a keep-alive
    request): to a later time, Twisted only notes the delay and re-queues the call once, when its old time comes.  A time
    sooner than the one set last takes a new call (C{reset()} to a sooner time searches the reactor's whole heap).
    Disarmed, the call stays scheduled and fires into nothing, unless armed again first; L{stop} cancels it (the
    connection closed).
    """

    def __init__(self, reactor: IReactorTime) -> None:
        self._reactor = reactor
        self._call: IDelayedCall | None = None
        self._due = 0.0  # the time the call was last set for: it runs then, not sooner
        self._owner: object | None = None
        self._fired: Callable[[], None] | None = None

    def armed(self, owner: object) -> bool:
        """C{owner} holds the timer, armed."""
        return self._owner is owner

    def arm(self, owner: object, delay: float, fired: Callable[[], None]) -> None:
        """C{owner} holds the timer: C{fired()} in C{delay} seconds, unless disarmed (or armed again) first."""
        self._owner, self._fired = owner, fired
        due = self._reactor.seconds() + delay
        call = self._call
        if call is not None and due >= self._due:
            call.reset(delay)
        else:
            if call is not None:
                call.cancel()
            self._call = self._reactor.callLater(delay, self._fire)
        self._due = due

    def disarm(self, owner: object) -> None:
        """Nothing fires for C{owner} (if it still holds the timer); the call is left for the next holder to move on."""
        if self._owner is owner:
            self._owner = self._fired = None

    def stop(self) -> None:
        """Disarmed, and the call cancelled."""
        self._owner = self._fired = None
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()

    def _fire(self) -> None:
        self._call = None
        fired = self._fired
        self._owner = self._fired = None
        if fired is not None:
            fired()
