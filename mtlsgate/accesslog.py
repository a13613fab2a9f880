"""
The access log as a file: an observer of the C{mtlsgate.access} log namespace that writes one
formatted line per request to a file (or stdout), in the spirit of nginx's C{access_log}.

The access events also reach the twistd log; this observer is for operators who want the lines on
their own, for log shippers or C{tail -f}.
"""

from __future__ import annotations

import sys
from typing import IO, Any

from twisted.application.service import Service
from twisted.logger import ILogObserver, LogPublisher, formatEvent, globalLogPublisher
from zope.interface import implementer

ACCESS_NAMESPACE = "mtlsgate.access"


@implementer(ILogObserver)
class AccessLogObserver:
    """Writes each access event as one line to C{stream}, flushed so that C{tail -f} sees it at once."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("log_namespace") != ACCESS_NAMESPACE:
            return
        self.stream.write(formatEvent(event) + "\n")
        self.stream.flush()


class AccessLogService(Service):
    """Opens C{path} (C{-} is stdout) on start, appending; observes C{publisher} until stopped."""

    def __init__(self, path: str, publisher: LogPublisher = globalLogPublisher) -> None:
        self.path = path
        self.publisher = publisher
        self.observer: AccessLogObserver | None = None

    def _open(self) -> None:
        if self.observer is None:
            stream = sys.stdout if self.path == "-" else open(self.path, "a", encoding="utf-8")
            self.observer = AccessLogObserver(stream)

    def privilegedStartService(self) -> None:
        # Opened before twistd drops privileges (-u/-g), as nginx opens its logs as root.
        self._open()
        super().privilegedStartService()

    def startService(self) -> None:
        self._open()
        self.publisher.addObserver(self.observer)
        super().startService()

    def stopService(self) -> None:
        super().stopService()
        if self.observer is not None:
            self.publisher.removeObserver(self.observer)
            if self.observer.stream is not sys.stdout:
                self.observer.stream.close()
            self.observer = None
