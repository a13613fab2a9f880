"""Reading a response body from an IAgent (the gateway's HTTP/1.1 or HTTP/2 upstream client) in a test."""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure


class Collect(Protocol):
    """The whole body in C{data}; C{done} fires with C{[reason]} when it ends (ResponseDone, or why it broke off)."""

    def __init__(self) -> None:
        self.data = b""
        self.done: defer.Deferred[list[Failure]] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.done.callback([reason])  # in a list: a Deferred fired with a Failure would fail
