"""mtlsgate.http.timer.ReusableTimer: one holder at a time, its call moved on rather than made anew."""

from __future__ import annotations

from twisted.internet.task import Clock

from mtlsgate.http.timer import ReusableTimer


def test_armed_again_later_keeps_the_same_call_which_sets_itself_for_the_rest_and_fires_once_at_the_new_time() -> None:
    clock, fired = Clock(), []
    timer = ReusableTimer(clock)
    timer.arm("a", 30, lambda: fired.append("a"))
    (call,) = clock.getDelayedCalls()
    timer.disarm("a")
    clock.advance(10)
    for _ in range(100):  # a keep-alive connection's requests: no call made, cancelled or moved for any of them
        timer.arm("b", 30, lambda: fired.append("b"))
    assert clock.getDelayedCalls() == [call] and call.getTime() == 30 and timer.armed("b") and not timer.armed("a")
    clock.advance(20)  # the call runs at its time, and sets itself for the rest of b's
    (rest,) = clock.getDelayedCalls()
    assert fired == [] and rest.getTime() == 40
    clock.advance(9.9)
    assert fired == []
    clock.advance(0.1)
    assert fired == ["b"] and not clock.getDelayedCalls() and not timer.armed("b")


def test_a_sooner_time_takes_a_new_call() -> None:
    clock, fired = Clock(), []
    timer = ReusableTimer(clock)
    timer.arm("a", 30, lambda: fired.append("a"))
    (first,) = clock.getDelayedCalls()
    timer.arm("a", 2, lambda: fired.append("sooner"))
    (second,) = clock.getDelayedCalls()
    assert second is not first and first.cancelled and second.getTime() == 2
    clock.advance(2)
    assert fired == ["sooner"]


def test_disarmed_it_fires_into_nothing_and_a_former_holder_cannot_disarm_the_next() -> None:
    clock, fired = Clock(), []
    timer = ReusableTimer(clock)
    timer.arm("a", 5, lambda: fired.append("a"))
    timer.disarm("a")
    clock.advance(5)
    assert fired == [] and not clock.getDelayedCalls()
    timer.arm("b", 5, lambda: fired.append("b"))
    timer.disarm("a")  # no longer its holder: nothing changes
    clock.advance(5)
    assert fired == ["b"]


def test_stop_cancels_the_call() -> None:
    clock, fired = Clock(), []
    timer = ReusableTimer(clock)
    timer.arm("a", 5, lambda: fired.append("a"))
    timer.stop()
    assert not clock.getDelayedCalls() and not timer.armed("a")
    timer.stop()
    timer.arm("a", 5, lambda: fired.append("a"))
    clock.advance(5)
    assert fired == ["a"]
