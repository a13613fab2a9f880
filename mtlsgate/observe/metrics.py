"""
The gateway's Prometheus metrics, in a registry of its own (so that several gateways in one process,
as in tests, never share counters).  The parts of the gateway that see an event call the matching
method; the admin listener exposes the registry at C{/metrics}.

Without an admin listener nobody can read them: the gateway then uses L{NoMetrics}, and
prometheus_client (about 1.3 MiB per process) is never imported (it is imported here only when a
registry is built).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Callable, Iterable

from zope.interface import implementer

from mtlsgate.accounting import FinishedRequest, IRequestObserver
from mtlsgate.tls.observer import IConnectionObserver, NoObserver

#: Upstream latency buckets, seconds: from a loopback hop to a slow backend.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


@implementer(IConnectionObserver, IRequestObserver)
class GatewayMetrics:
    """
    @param certificates: returns the certificates being served now, as C{(name, not_after)}
        pairs, read at each scrape so the expiry gauge is never stale.
    """

    listening = True  # every finished request is counted (L{mtlsgate.accounting.listening})

    def __init__(self, certificates: Callable[[], Iterable[tuple[str, datetime]]] = lambda: ()) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "mtlsgate_requests", "Requests answered, by route and status code.", ["route", "status"], registry=self.registry
        )
        self.upstream_latency = Histogram(
            "mtlsgate_upstream_latency_seconds", "Time from sending a request upstream to its response headers.",
            ["route"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.handshakes = Counter(
            "mtlsgate_tls_handshakes", "TLS handshakes on the gateway's listener, by result (ok, rejected, failed) and reason.",
            ["result", "reason"], registry=self.registry,
        )  # fmt: skip
        self.connections = Gauge(
            "mtlsgate_active_connections", "Open client connections on the TLS listener.", registry=self.registry,
            multiprocess_mode="livesum",
        )  # fmt: skip
        self.tunnels = Gauge(
            "mtlsgate_websocket_tunnels", "Open WebSocket tunnels (upgraded client connections).", registry=self.registry,
            multiprocess_mode="livesum",
        )  # fmt: skip
        self.acme_orders = Counter("mtlsgate_acme_orders", "ACME orders, by result (issued, failed).", ["result"], registry=self.registry)
        self.tcp_connections = Counter(
            "mtlsgate_tcp_connections", "Connections on TCP routes, by route and how they ended (client_closed, upstream_closed, "
            "idle_timeout, connect_failed, refused, over_limit, shutdown, error).", ["route", "end"], registry=self.registry,
        )  # fmt: skip
        self.tcp_bytes_total = Counter(
            "mtlsgate_tcp_bytes", "Bytes piped on TCP routes, by route and direction (up: client to upstream, down: upstream to client).",
            ["route", "direction"], registry=self.registry,
        )  # fmt: skip
        self.tcp_active = Gauge(
            "mtlsgate_tcp_active_connections", "Open tunnels on TCP routes, by route.", ["route"], registry=self.registry,
            multiprocess_mode="livesum",
        )  # fmt: skip
        self.registry.register(_ExpiryCollector(certificates))
        self._tcp_byte_children: dict[tuple[str, str], Any] = {}
        self._request_children: dict[tuple[str, int], Any] = {}
        self._latency_children: dict[str, Any] = {}

    def request_finished(self, record: FinishedRequest) -> None:
        """A request finished: counted by route and status, and its upstream's latency (if one answered) observed."""
        if record.upstream_latency is not None:
            self.upstream_responded(record.route, record.upstream_latency)
        self.request(record.route, record.status)

    def request(self, route: str, status: int) -> None:
        child = self._request_children.get((route, status))
        if child is None:  # .labels() validates and locks on every call: look each child up once
            child = self._request_children[route, status] = self.requests.labels(route=route, status=str(status))
        child.inc()

    def upstream_responded(self, route: str, seconds: float) -> None:
        child = self._latency_children.get(route)
        if child is None:
            child = self._latency_children[route] = self.upstream_latency.labels(route=route)
        child.observe(seconds)

    def handshake(self, result: str, reason: str = "") -> None:
        self.handshakes.labels(result=result, reason=reason).inc()

    def connection_opened(self) -> None:
        self.connections.inc()

    def connection_closed(self) -> None:
        self.connections.dec()

    def tunnel_opened(self) -> None:
        self.tunnels.inc()

    def tunnel_closed(self) -> None:
        self.tunnels.dec()

    def tcp_opened(self, route: str) -> None:
        self.tcp_active.labels(route=route).inc()

    def tcp_closed(self, route: str) -> None:
        self.tcp_active.labels(route=route).dec()

    def tcp_bytes(self, route: str, direction: str, count: int) -> None:
        child = self._tcp_byte_children.get((route, direction))
        if child is None:
            child = self._tcp_byte_children[route, direction] = self.tcp_bytes_total.labels(route=route, direction=direction)
        child.inc(count)

    def tcp_connection(self, route: str, end: str) -> None:
        self.tcp_connections.labels(route=route, end=end).inc()

    def acme_order(self, result: str) -> None:
        self.acme_orders.labels(result=result).inc()


@implementer(IConnectionObserver, IRequestObserver)
class NoMetrics(NoObserver):
    """
    The metrics of a gateway without an admin listener: nobody could read them, so nothing is counted (the TLS
    listener's events are ignored as L{NoObserver} ignores them).
    """

    registry = None  # no prometheus_client registry is made (nor the module imported)
    listening = False  # nor a finished request's record built for it (L{mtlsgate.accounting.listening})

    def request_finished(self, record: FinishedRequest) -> None:
        pass

    def tunnel_opened(self) -> None:
        pass

    def tunnel_closed(self) -> None:
        pass

    def tcp_opened(self, route: str) -> None:
        pass

    def tcp_closed(self, route: str) -> None:
        pass

    def tcp_bytes(self, route: str, direction: str, count: int) -> None:
        pass

    def tcp_connection(self, route: str, end: str) -> None:
        pass

    def request(self, route: str, status: int) -> None:
        pass

    def upstream_responded(self, route: str, seconds: float) -> None:
        pass

    def acme_order(self, result: str) -> None:
        pass


def worker_group_registry(
    directory: str, certificates: Callable[[], Iterable[tuple[str, datetime]]], workers: Callable[[], int],
) -> Any:  # fmt: skip
    """
    The parent's view of a worker group: every worker's metrics summed from prometheus_client's
    multiprocess files in C{directory} (workers run with C{PROMETHEUS_MULTIPROC_DIR} set to it), plus
    the certificate expiry and the number of workers running.
    """
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=directory)
    registry.register(_ExpiryCollector(certificates))
    registry.register(_WorkersCollector(workers))
    return registry


class _WorkersCollector:
    def __init__(self, running: Callable[[], int]) -> None:
        self.running = running

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import GaugeMetricFamily

        yield GaugeMetricFamily("mtlsgate_workers", "Worker processes running.", value=self.running())


class _ExpiryCollector:
    def __init__(self, certificates: Callable[[], Iterable[tuple[str, datetime]]]) -> None:
        self.certificates = certificates

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily(
            "mtlsgate_certificate_expiry_seconds", "Seconds until a served certificate expires (negative: expired).", labels=["name"]
        )
        now = datetime.now(timezone.utc).timestamp()
        for name, not_after in self.certificates():
            family.add_metric([name], not_after.timestamp() - now)
        yield family
