"""
The admin listener (C{admin_address}, meant for loopback or a private network): C{/metrics} in
Prometheus' text format, C{/healthz} (the process answers) and C{/readyz} (it can serve: listeners up,
certificates loaded and none expired).
"""

from __future__ import annotations

from typing import Any, Callable

from prometheus_client import CollectorRegistry
from prometheus_client.twisted import MetricsResource
from twisted.web.resource import Resource


class _Text(Resource):
    isLeaf = True

    def __init__(self, answer: Callable[[], tuple[int, str]]) -> None:
        super().__init__()
        self.answer = answer

    def render_GET(self, request: Any) -> bytes:
        code, text = self.answer()
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        return text.encode("utf-8") + b"\n"


def admin_resource(
    registry: CollectorRegistry, readiness: Callable[[], str | None], degraded: Callable[[], str | None] = lambda: None,
) -> Resource:
    """
    C{readiness} returns None when ready, else why not (answered with 503); C{degraded}, why a ready
    gateway serves in a degraded state (a cluster's shared store is away), still answered with 200.
    """

    def ready() -> tuple[int, str]:
        problem = readiness()
        if problem is not None:
            return 503, f"not ready: {problem}"
        why = degraded()
        return (200, "ready") if why is None else (200, f"ready, degraded: {why}")

    root = Resource()
    root.putChild(b"metrics", MetricsResource(registry=registry))
    root.putChild(b"healthz", _Text(lambda: (200, "ok")))
    root.putChild(b"readyz", _Text(ready))
    return root
