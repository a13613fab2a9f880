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


# --- the gRPC probe (grpc.health.v1), against scripted HTTP/2 responses --------------------------------


class _GRPCResponse:
    def __init__(self, code: int = 200, body: bytes = b"", trailers: list[tuple[bytes, bytes]] | None = None,
                 headers: dict[bytes, list[bytes]] | None = None, cut: bool = False) -> None:  # fmt: skip
        from twisted.web.http_headers import Headers

        self.code = code
        self.headers = Headers(headers or {})
        self.trailers = trailers if trailers is not None else [(b"grpc-status", b"0")]
        self.body = body
        self.cut = cut

    def deliverBody(self, protocol) -> None:
        from twisted.python.failure import Failure
        from twisted.web.client import ResponseDone, ResponseFailed

        class Transport:
            def stopProducing(self) -> None: ...

        protocol.makeConnection(Transport())
        protocol.dataReceived(self.body)
        protocol.connectionLost(Failure(ResponseFailed([]) if self.cut else ResponseDone()))


class _Agent:
    def __init__(self, response) -> None:
        self.response = response
        self.sent: list = []

    def request(self, method, uri, headers, body):
        self.sent.append((method, uri, dict(headers.getAllRawHeaders()), body.data))
        return defer.succeed(self.response)


def _probe(response) -> tuple[list, _Agent]:
    from mtlsgate.proxy.healthcheck import grpc_probe

    agent = _Agent(response)
    out: list = []
    grpc_probe(agent)(A).addBoth(out.append)
    return out, agent


def test_the_grpc_probe_passes_on_serving_only():
    from mtlsgate.proxy.healthcheck import GRPCUnhealthy

    serving, agent = _probe(_GRPCResponse(body=b"\x00\x00\x00\x00\x02\x08\x01"))
    assert serving == [200]
    method, uri, headers, body = agent.sent[0]
    assert (method, uri, body) == (b"POST", A.encode() + b"/grpc.health.v1.Health/Check", b"\x00\x00\x00\x00\x00")
    assert {k.lower(): v for k, v in headers.items()}[b"te"] == [b"trailers"]
    for response, words in [
        (_GRPCResponse(body=b"\x00\x00\x00\x00\x02\x08\x02"), "NOT_SERVING"),
        (_GRPCResponse(body=b"\x00\x00\x00\x00\x00"), "UNKNOWN"),
        (_GRPCResponse(body=b"\x00\x00\x00\x00\x02\x08\x01", trailers=[(b"grpc-status", b"14"), (b"grpc-message", b"down")]), "grpc-status 14 down"),
        (_GRPCResponse(trailers=[], headers={b"grpc-status": [b"12"], b"grpc-message": [b"Method not found!"]}), "grpc-status 12 Method not found!"),
        (_GRPCResponse(code=503), "HTTP status 503"),
        (_GRPCResponse(body=b"\x00\x00\x00\x00\x02\x08\x01", cut=True), "cut off"),
        (_GRPCResponse(body=b"<html>"), "not one uncompressed gRPC message"),
        (_GRPCResponse(body=b"\x00\x00\x00\x00\x02\x12\x01"), "not a HealthCheckResponse"),
        (_GRPCResponse(trailers=[], body=b"\x00\x00\x00\x00\x02\x08\x01"), "grpc-status missing"),
    ]:
        [failure] = _probe(response)[0]
        assert failure.check(GRPCUnhealthy) and words in failure.getErrorMessage(), (words, failure)
