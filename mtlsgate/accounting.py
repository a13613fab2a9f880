"""
The one account of every request the gateway finishes, and who is told of it: the access log
(L{mtlsgate.observe.accesslog.AccessEvents}) and the metrics (L{mtlsgate.observe.metrics.GatewayMetrics})
both provide L{IRequestObserver}, composed with L{RequestObservers} and handed to the proxy, which
tells one observer once per request.  A value at the bottom of the layers, so that the front ends
that finish requests (HTTP/1.1 today; HTTP/2, WebSocket and TCP routes name theirs in C{protocol})
depend on no observer, and the observers on no front end.

An observer that would do nothing with a record (the access log when C{access_log: off}, the metrics
without an admin listener) says so with a false C{listening} attribute, and the proxy then builds
none (L{listening}): a gateway that neither logs nor counts spends nothing per request on the record.
"""

from __future__ import annotations

from typing import Iterable

import attrs
from zope.interface import Interface, implementer

from mtlsgate.identity import Identity


@attrs.frozen
class FinishedRequest:
    """One request the gateway finished, answered by an upstream or by the gateway itself."""

    client: str  # the client's address, "-" when unknown
    peer: str  # the client's identity as log lines name it ("-" without a verified certificate)
    identity: Identity | None  # the verified client certificate's identity, if any
    protocol: str  # what the client spoke, as the access line shows it: "HTTP/1.1", "HTTP/1.0"; other front ends name theirs
    method: str
    target: str  # the request target as the client sent it
    status: int  # the status the client got (499: it went away first)
    size: int  # response body bytes sent to the client
    route: str  # the route's name, "-" when none matched
    upstream: str  # the upstream that answered, "-" for the gateway's own answers
    duration: float  # seconds from the request's head to its end
    upstream_latency: float | None = None  # seconds from sending upstream to the response head; None when none came
    referer: str | None = None
    user_agent: str | None = None
    tunnel: tuple[int, int] | None = None  # a WebSocket tunnel (status 101): bytes from and to the client, counted until it closed


class IRequestObserver(Interface):
    """
    Told once of every request the gateway finishes.  Optionally, a C{listening} attribute: false while the
    observer would do nothing with a record (read per request, so a reload may switch it); without one it is
    always told.
    """

    def request_finished(record: FinishedRequest) -> None:
        """C{record} is finished: its status and size are final.  Called on the reactor thread; must not block."""


@implementer(IRequestObserver)
class RequestObservers:
    """Several observers as one, told in order (none: a request observed by no one)."""

    def __init__(self, observers: Iterable[IRequestObserver] = ()) -> None:
        self.observers = tuple(observers)

    @property
    def listening(self) -> bool:
        """Whether any of them would read a record."""
        for observer in self.observers:
            if getattr(observer, "listening", True):
                return True
        return False

    def request_finished(self, record: FinishedRequest) -> None:
        for observer in self.observers:
            observer.request_finished(record)


def listening(observer: IRequestObserver) -> bool:
    """Whether C{observer} would read a record now: a finished request's record is built only then."""
    return bool(getattr(observer, "listening", True))
