"""Running a service in the foreground, outside twistd (the demo, the echo upstream)."""

from __future__ import annotations

import sys

from twisted.application.service import IService
from twisted.internet.interfaces import IReactorCore


def run_service(reactor: IReactorCore, service: IService) -> None:
    """Run a service in the foreground with log lines on stdout, until SIGINT/SIGTERM."""
    from twisted.logger import globalLogBeginner, textFileLogObserver

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)], redirectStandardIO=False)
    service.privilegedStartService()
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()
