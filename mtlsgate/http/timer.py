"""
A timer kept over its holders: an HTTP/1.1 connection's requests, one after the other, each arm it (the proxy's route
timeout, then its stall timer) and disarm it when done.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime


class ReusableTimer:
    """
    One holder at a time calls C{fired} when its time comes.  Armed again to a later time, the timer only notes the time
    (no C{DelayedCall} made, cancelled or moved): its one call still runs at the time it was set for, sees the holder's
    time has not come, and sets itself for the rest, once.  So a keep-alive connection's requests, each arming and
    disarming it, cost the reactor one call per timeout period instead of a C{callLater} and a C{cancel} (some 3 µs) or
    a C{reset()} each.  A time sooner than the call's takes a new call.  Disarmed, the call stays scheduled and fires
    into nothing (unless armed again first); L{stop} cancels it (the connection closed).
    """

    def __init__(self, reactor: IReactorTime) -> None:
        self._reactor = reactor
        self._call: IDelayedCall | None = None
        self._set_for = 0.0  # the time the call runs at
        self._due = 0.0  # the holder's time: fired() runs then, not sooner
        self._owner: object | None = None
        self._fired: Callable[[], None] | None = None

    def armed(self, owner: object) -> bool:
        """C{owner} holds the timer, armed."""
        return self._owner is owner

    def arm(self, owner: object, delay: float, fired: Callable[[], None]) -> None:
        """C{owner} holds the timer: C{fired()} in C{delay} seconds, unless disarmed (or armed again) first."""
        self._owner, self._fired = owner, fired
        due = self._due = self._reactor.seconds() + delay
        call = self._call
        if call is not None and due >= self._set_for:
            return  # the call runs first, and sets itself for the rest
        if call is not None:
            call.cancel()
        self._call = self._reactor.callLater(delay, self._fire)
        self._set_for = due

    def disarm(self, owner: object) -> None:
        """Nothing fires for C{owner} (if it still holds the timer); the call is left for the next holder."""
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
        if self._owner is None:
            return  # disarmed: into nothing
        left = self._due - self._reactor.seconds()
        if left > 0:  # armed again since the call was set: the rest of the holder's time
            self._call = self._reactor.callLater(left, self._fire)
            self._set_for = self._due
            return
        fired = self._fired
        self._owner = self._fired = None
        if fired is not None:
            fired()
