"""
Active health checks of a route's upstreams, as nginx's C{health_check}, Envoy's health checking
and Caddy's C{health_uri} do them: every upstream is asked for a path on a timer; failed checks in a
row take it out of rotation, passed checks in a row bring it back.  Requests then go only to
upstreams believed up, instead of paying for a failed connection (or a connect timeout) first.

The check itself is a function from a target URL to a Deferred status code, so the state machine
runs on any L{IReactorTime} (a L{Clock} in tests); L{http_probe} is the real one, over the route's
own Agent and TLS policy, and L{grpc_probe} the one for gRPC upstreams (the standard health service,
grpc.health.v1.Health/Check, over the route's HTTP/2 agent).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, cast

from twisted.internet import defer, task
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from mtlsgate.config.model import GRPC_HEALTH_PATH, HealthCheck
from mtlsgate.http.client import BytesBody
from mtlsgate.http.outcomes import is_response_done

log = Logger(namespace="mtlsgate.proxy.healthcheck")

Probe = Callable[[str], "defer.Deferred[int]"]

_USER_AGENT = b"mtlsgate-health-check"


class _HangUp(Protocol):
    """Takes a health check's response body by closing the connection: only the status matters."""

    def connectionMade(self) -> None:
        # A response body's transport is a producer (twisted.web's TransportProxyProducer): stopping it drops the connection.
        cast(IPushProducer, self.transport).stopProducing()


def http_probe(agent: Any, path: str) -> Probe:
    """C{GET target+path} through C{agent} (the route's TLS policy); fires with the status code."""

    def probe(target: str) -> defer.Deferred[int]:
        d = agent.request(b"GET", (target + path).encode("ascii"), Headers({b"user-agent": [_USER_AGENT]}))

        def status(response: Any) -> int:
            response.deliverBody(_HangUp())
            return int(response.code)

        return d.addCallback(status)

    return probe


# HealthCheckRequest{service: ""}: an empty protobuf message, as one uncompressed gRPC frame.
_GRPC_HEALTH_REQUEST = b"\x00\x00\x00\x00\x00"
_GRPC_SERVING_STATUS = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}
_GRPC_MAX_ANSWER = 4096  # a HealthCheckResponse is 2 bytes; anything much larger is not one


class GRPCUnhealthy(Exception):
    """A gRPC health check's answer was not SERVING (or not an answer at all)."""


class _Collect(Protocol):
    """A small response body, whole; a larger one is cut off (the check fails)."""

    def __init__(self) -> None:
        self.data = b""
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if len(self.data) > _GRPC_MAX_ANSWER:
            cast(IPushProducer, self.transport).stopProducing()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if is_response_done(reason.value) and len(self.data) <= _GRPC_MAX_ANSWER:
            self.done.callback(self.data)
        else:
            self.done.errback(GRPCUnhealthy(f"the answer was cut off or too large ({len(self.data)} bytes)"))


def _serving_status(body: bytes) -> str:
    """The status of a HealthCheckResponse in one gRPC frame: field 1, a varint enum (absent: UNKNOWN)."""
    if len(body) < 5 or body[0] != 0 or int.from_bytes(body[1:5], "big") != len(body) - 5:
        raise GRPCUnhealthy("the answer is not one uncompressed gRPC message")
    message = body[5:]
    if not message:
        return "UNKNOWN"
    if len(message) < 2 or message[0] != 0x08 or message[1] & 0x80:
        raise GRPCUnhealthy("the answer is not a HealthCheckResponse")
    return _GRPC_SERVING_STATUS.get(message[1], f"status {message[1]}")


def grpc_probe(agent: Any, path: str = GRPC_HEALTH_PATH) -> Probe:
    """
    The gRPC health check (grpc.health.v1, the server as a whole: service "") through C{agent} (the
    route's HTTP/2 agent): fires with 200 when the answer is grpc-status 0 and SERVING, fails with
    L{GRPCUnhealthy} naming what came otherwise.
    """
    headers = {b"content-type": [b"application/grpc"], b"te": [b"trailers"], b"user-agent": [_USER_AGENT]}

    def probe(target: str) -> defer.Deferred[int]:
        d = agent.request(b"POST", (target + path).encode("ascii"), Headers(headers), BytesBody(_GRPC_HEALTH_REQUEST))

        def answer(response: Any) -> defer.Deferred[int]:
            if response.code != 200:
                response.deliverBody(_HangUp())
                raise GRPCUnhealthy(f"HTTP status {response.code}")
            body = _Collect()
            response.deliverBody(body)

            def judge(data: bytes) -> int:
                fields = dict(getattr(response, "trailers", None) or [])
                status = fields.get(b"grpc-status") or response.headers.getRawHeaders(b"grpc-status", [None])[0]  # trailers-only
                if status != b"0":
                    message = fields.get(b"grpc-message") or response.headers.getRawHeaders(b"grpc-message", [b""])[0]
                    raise GRPCUnhealthy(f"grpc-status {(status or b'missing').decode('ascii', 'replace')} {message.decode('ascii', 'replace')}".rstrip())
                serving = _serving_status(data)
                if serving != "SERVING":
                    raise GRPCUnhealthy(serving)
                return 200

            return body.done.addCallback(judge)

        return d.addCallback(answer)

    return probe


def _problem(failure: Failure, timeout: float) -> str:
    if failure.check(defer.TimeoutError):
        return f"no answer within {timeout:g}s"
    reasons = getattr(failure.value, "reasons", None)  # ResponseNeverReceived and friends wrap the cause
    if reasons:
        return "; ".join(_problem(reason, timeout) for reason in reasons)
    return f"{failure.value.__class__.__name__}: {failure.getErrorMessage()}"


class HealthChecker:
    """
    The up/down state of each target of one route.  Targets start up (as in nginx: a new
    configuration does not refuse traffic before its first checks), unless L{inherit} copies the
    state of a checker being replaced; the first round of checks runs at L{start}.
    """

    def __init__(self, reactor: IReactorTime, route_name: str, targets: Iterable[str], settings: HealthCheck, probe: Probe) -> None:
        self.reactor = reactor
        self.route_name = route_name
        self.settings = settings
        self._probe = probe
        self.targets = tuple(targets)
        self._up = dict.fromkeys(self.targets, True)
        self._failed = dict.fromkeys(self.targets, 0)
        self._passed = dict.fromkeys(self.targets, 0)
        self._checking: dict[str, defer.Deferred[int]] = {}
        self._loop = task.LoopingCall(self._round)
        self._loop.clock = reactor
        self._stopped = False

    def is_up(self, target: str) -> bool:
        return self._up.get(target, True)

    def inherit(self, previous: HealthChecker) -> None:
        """Take over the state of the same targets from the checker this one replaces (reload)."""
        for target in self.targets:
            if target in previous._up:
                self._up[target] = previous._up[target]
                self._failed[target] = previous._failed[target]
                self._passed[target] = previous._passed[target]

    def start(self) -> None:
        self._loop.start(self.settings.interval, now=True)

    def stop(self) -> None:
        self._stopped = True
        if self._loop.running:
            self._loop.stop()
        for d in list(self._checking.values()):
            d.cancel()

    def _round(self) -> None:
        for target in self.targets:
            if target in self._checking:
                continue  # the last check is still out (its timeout will end it)
            d = self._probe(target)
            self._checking[target] = d
            d.addTimeout(self.settings.timeout, self.reactor)
            d.addCallbacks(
                lambda code, target=target: self._outcome(target, None if 200 <= code < 400 else f"status {code}"),
                lambda failure, target=target: self._outcome(target, _problem(failure, self.settings.timeout)),
            )

    def _outcome(self, target: str, problem: str | None) -> None:
        del self._checking[target]
        if self._stopped:
            return
        if problem is None:
            self._failed[target] = 0
            self._passed[target] += 1
            if not self._up[target] and self._passed[target] >= self.settings.healthy_threshold:
                self._up[target] = True
                log.info(
                    "upstream {target} of route {route} is up: {n} check(s) of {path} passed",
                    target=target, route=self.route_name, n=self._passed[target], path=self.settings.path,
                )  # fmt: skip
            return
        self._passed[target] = 0
        self._failed[target] += 1
        if self._up[target] and self._failed[target] >= self.settings.unhealthy_threshold:
            self._up[target] = False
            log.warn(
                "upstream {target} of route {route} is down: {problem} ({n} failed check(s) of {path} in a row){all_down}",
                target=target, route=self.route_name, problem=problem, n=self._failed[target], path=self.settings.path,
                all_down="" if any(self._up.values()) else "; every upstream of the route is down, requests still try them all",
            )  # fmt: skip
