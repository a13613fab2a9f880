"""
The "request finished" seam (mtlsgate.accounting): the access log and the metrics both provide
IRequestObserver, composed into the one observer the proxy tells once per request.
"""

from __future__ import annotations

from typing import Any

import attrs
import pytest
from twisted.logger import globalLogPublisher
from zope.interface.verify import verifyObject

from mtlsgate.accounting import FinishedRequest, IRequestObserver, RequestObservers, listening
from mtlsgate.observe.accesslog import ACCESS_NAMESPACE, AccessEvents, format_combined, format_json
from mtlsgate.observe.metrics import GatewayMetrics, NoMetrics

RECORD = FinishedRequest(
    client="127.0.0.1", peer="spiffe://test/alice", identity=None, protocol="HTTP/1.1", method="GET", target="/a?b",
    status=200, size=5, route="localhost/", upstream="https://127.0.0.1:9443", duration=0.25, upstream_latency=0.125,
    referer=None, user_agent="curl/8",
)  # fmt: skip


@pytest.fixture
def access_events():
    events: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == ACCESS_NAMESPACE:
            events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


def test_the_access_log_and_the_metrics_provide_the_interface():
    for observer in (AccessEvents(), GatewayMetrics(), RequestObservers()):
        assert verifyObject(IRequestObserver, observer)


def test_the_metrics_count_the_request_and_observe_the_upstream_latency():
    metrics = GatewayMetrics()
    metrics.request_finished(RECORD)
    metrics.request_finished(attrs.evolve(RECORD, status=404, route="-", upstream="-", upstream_latency=None))
    value = metrics.registry.get_sample_value
    assert value("mtlsgate_requests_total", {"route": "localhost/", "status": "200"}) == 1
    assert value("mtlsgate_requests_total", {"route": "-", "status": "404"}) == 1
    assert value("mtlsgate_upstream_latency_seconds_count", {"route": "localhost/"}) == 1
    assert value("mtlsgate_upstream_latency_seconds_sum", {"route": "localhost/"}) == 0.125
    assert value("mtlsgate_upstream_latency_seconds_count", {"route": "-"}) is None  # the gateway's own answer: no upstream


def test_the_access_event_carries_the_fields_both_formats_read(access_events):
    AccessEvents().request_finished(RECORD)
    [event] = access_events
    assert (event["client"], event["identity"], event["method"], event["uri"], event["proto"], event["status"]) == (
        "127.0.0.1", "spiffe://test/alice", "GET", "/a?b", "HTTP/1.1", 200,
    )  # fmt: skip
    assert event["common_name"] == "-" and event["fingerprint"] == "-" and event["user_agent"] == "curl/8"
    assert '"GET /a?b HTTP/1.1" 200 5' in format_combined(event)
    assert '"route":"localhost/"' in format_json(event)


def test_access_log_off_is_no_event_at_all(access_events):
    events = AccessEvents(enabled=False)
    events.request_finished(RECORD)
    assert access_events == []
    events.enabled = True  # a reload that turns it back on
    events.request_finished(RECORD)
    assert len(access_events) == 1


def test_composed_observers_are_each_told_once_in_order():
    told: list[tuple[str, FinishedRequest]] = []

    class Recorder:
        def __init__(self, name: str) -> None:
            self.name = name

        def request_finished(self, record: FinishedRequest) -> None:
            told.append((self.name, record))

    RequestObservers([Recorder("access"), Recorder("metrics")]).request_finished(RECORD)
    assert told == [("access", RECORD), ("metrics", RECORD)]


def test_a_record_is_wanted_only_while_some_observer_would_read_it():
    class Recorder:
        def request_finished(self, record: FinishedRequest) -> None: ...

    access = AccessEvents(enabled=False)
    assert not listening(RequestObservers([access, NoMetrics()])) and not listening(RequestObservers())
    assert listening(RequestObservers([access, GatewayMetrics()]))
    assert listening(Recorder()) and listening(RequestObservers([access, NoMetrics(), Recorder()]))  # no "listening": always told
    access.enabled = True  # a reload that turns the access log on
    assert listening(RequestObservers([access, NoMetrics()]))
