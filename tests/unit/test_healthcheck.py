"""The health checker's state machine on a Clock, with checks whose outcome the test decides."""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from mtlsgate.config.model import HealthCheck, Route
from mtlsgate.proxy.healthcheck import HealthChecker
from mtlsgate.proxy.upstream import UpstreamGroup

A, B = "https://10.0.0.1:9443", "https://10.0.0.2:9443"


class Checks:
    """A probe whose Deferreds the test fires: C{pending[target]} is the check in flight."""

    def __init__(self) -> None:
        self.pending: dict[str, defer.Deferred[int]] = {}
        self.count = 0

    def __call__(self, target: str) -> defer.Deferred[int]:
        self.count += 1
        d: defer.Deferred[int] = defer.Deferred()
        self.pending[target] = d
        return d

    def answer(self, target: str, status: int | Exception) -> None:
        d = self.pending.pop(target)
        d.errback(status) if isinstance(status, Exception) else d.callback(status)


def checker(clock: Clock, checks: Checks, **settings) -> HealthChecker:
    defaults = {"interval": 5.0, "timeout": 2.0, "unhealthy_threshold": 2, "healthy_threshold": 2}
    return HealthChecker(clock, "app/", (A, B), HealthCheck(**{**defaults, **settings}), checks)


def transitions(events) -> list[str]:
    return [e["log_format"].split(":")[0].format(**e) for e in events if e.get("log_namespace") == "mtlsgate.proxy.healthcheck"]


def test_a_target_goes_down_after_the_threshold_of_failures_and_up_after_that_of_successes():
    clock, checks = Clock(), Checks()
    hc = checker(clock, checks)
    with capturedLogs() as events:
        hc.start()  # the first round runs at once
        assert set(checks.pending) == {A, B}
        checks.answer(A, 200)
        checks.answer(B, ConnectionRefusedError())
        assert hc.is_up(B)  # one failure is not enough
        clock.advance(5)
        checks.answer(A, 301)  # a redirect counts as alive
        checks.answer(B, 503)
        assert not hc.is_up(B) and hc.is_up(A)
        clock.advance(5)
        checks.answer(A, 200)
        checks.answer(B, 500)  # still down: logged once, not again
        clock.advance(5)
        checks.answer(A, 200)
        checks.answer(B, 200)
        assert not hc.is_up(B)  # one success of the two needed
        clock.advance(5)
        checks.answer(A, 200)
        checks.answer(B, 200)
        assert hc.is_up(B)
    assert transitions(events) == [f"upstream {B} of route app/ is down", f"upstream {B} of route app/ is up"]
    down = next(e for e in events if "is down" in e.get("log_format", ""))
    assert down["problem"] == "status 503"
    hc.stop()
    assert not clock.getDelayedCalls()


def test_a_check_without_an_answer_fails_at_its_timeout_and_is_not_doubled_meanwhile():
    clock, checks = Clock(), Checks()
    hc = checker(clock, checks, interval=1.0, timeout=3.0, unhealthy_threshold=1)
    with capturedLogs() as events:
        hc.start()
        for _ in range(2):
            checks.answer(A, 200)
            clock.advance(1)  # B's first check is still out: no second one is sent beside it
        assert checks.count == 4  # A three times, B once
        checks.answer(A, 200)
        clock.advance(1)
        assert not hc.is_up(B)
    [down] = [e for e in events if "is down" in e.get("log_format", "")]
    assert down["problem"] == "no answer within 3s"
    hc.stop()
    assert not clock.getDelayedCalls() and all(d.called for d in checks.pending.values())


def test_stop_cancels_checks_in_flight_and_their_outcome_changes_nothing():
    clock, checks = Clock(), Checks()
    hc = checker(clock, checks, unhealthy_threshold=1)
    hc.start()
    hc.stop()
    assert all(d.called for d in checks.pending.values())  # cancelled
    assert hc.is_up(A) and hc.is_up(B)
    assert not clock.getDelayedCalls()


def group_with(clock: Clock, checks: Checks, **settings) -> UpstreamGroup:
    route = Route(host="app", to=(A, B, "https://10.0.0.3:9443"), health_check=HealthCheck(**settings))
    group = UpstreamGroup(clock, route)
    assert group.checker is not None
    group.checker._probe = checks  # the same state machine, with the test deciding each check
    return group


def test_round_robin_skips_targets_that_are_down_and_tries_all_when_all_are():
    clock, checks = Clock(), Checks()
    group = group_with(clock, checks, unhealthy_threshold=1)
    C = group.targets[2]
    assert [group.order()[0] for _ in range(3)] == [A, B, C]
    group.start()
    checks.answer(A, 200)
    checks.answer(B, ConnectionRefusedError())
    checks.answer(C, 200)
    assert sorted(group.order() for _ in range(2)) == [[A, C], [C, A]]  # B is out; A and C take turns
    clock.advance(5)
    for target in (A, B, C):
        checks.answer(target, 502)
    assert sorted(group.order()) == sorted([A, B, C])  # every one down: try them all rather than a certain 502
    group.close()
    assert not clock.getDelayedCalls()


def test_a_reloaded_group_keeps_knowing_which_upstreams_are_down():
    clock, checks = Clock(), Checks()
    old = group_with(clock, checks, unhealthy_threshold=1)
    old.start()
    checks.answer(B, ConnectionRefusedError())
    new_checks = Checks()
    new = group_with(clock, new_checks, unhealthy_threshold=1)
    new.start(replacing=[old])
    old.close()
    assert B not in new.order()
    new.close()
    assert not clock.getDelayedCalls()
