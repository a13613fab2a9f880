"""
One worker process of a group (L{mtlsgate.app.workers}), started by the parent as
C{python -m mtlsgate.app.worker --index N [--http] [--acme] [--parent PID] --config-json PATH}, where PATH
holds the configuration the parent validated (L{mtlsgate.app.handoff}), read again on each reload.

It adopts the listening sockets the parent passed, sends its log events to the parent as JSON, and
otherwise runs the same L{GatewayService} as a single-process gateway: SIGHUP reloads it, SIGTERM
drains it.  It dies with its parent.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

from twisted.python import usage

_PR_SET_PDEATHSIG = 1


class WorkerOptions(usage.Options):
    """The worker's own flags (twisted.python.usage, which the gateway's options load anyway: argparse is not imported)."""

    synopsis = "python -m mtlsgate.app.worker --index N [--http] [--acme] [--parent PID] --config-json PATH"
    optParameters = [
        ["index", None, None, "this worker's number in the group", int],
        ["parent", None, None, "the supervising process's pid", int],
        ["config-json", None, None, "the configuration the parent validated (mtlsgate.app.handoff)"],
    ]
    optFlags = [["http", None, "serve the HTTP listener (fd 5)"], ["acme", None, "run autocert"]]

    def parseArgs(self, *flags: str) -> None:
        self["flags"] = list(flags)

    def postOptions(self) -> None:
        if self["index"] is None or self["config-json"] is None:
            raise usage.UsageError("--index and --config-json are required")


def _die_with_parent() -> None:
    """Linux: get SIGTERM when the parent dies, so a killed parent leaves no orphan serving."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: the parent's stop still reaches every worker


def main(argv: list[str] | None = None) -> None:
    args = WorkerOptions()
    try:
        args.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        sys.exit(f"python -m mtlsgate.app.worker: {e}")
    index = args["index"]
    _die_with_parent()
    if args["parent"] is not None and os.getppid() != args["parent"]:  # it died before PDEATHSIG was set
        sys.exit("mtlsgate worker: the parent is gone")

    from mtlsgate.app.memory import settle_when_running, without_twisted_web_http2

    without_twisted_web_http2()  # before anything imports twisted.web.http: h2 only where mtlsgate speaks HTTP/2

    from twisted.internet import reactor
    from twisted.logger import FileLogObserver, Logger, globalLogBeginner

    from mtlsgate.app.service import WorkerRole
    from mtlsgate.app.tap import Options
    from mtlsgate.app.workers import EVENTS_FD, HTTP_FD, HTTPS_FD, relayed_event

    events = os.fdopen(EVENTS_FD, "w", encoding="utf-8")
    globalLogBeginner.beginLoggingTo([FileLogObserver(events, relayed_event)], redirectStandardIO=False)
    options = Options()
    options.worker = WorkerRole(index=index, https_fd=HTTPS_FD, http_fd=HTTP_FD if args["http"] else None, acme=bool(args["acme"]))
    options.handed = args["config-json"]
    try:
        options.parseOptions(args["flags"])  # none: the parent's flags are in the configuration it hands on
    except usage.UsageError as e:
        sys.exit(f"mtlsgate worker {index}: {e}")
    service = options.service
    service.privilegedStartService()
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    settle_when_running(reactor)
    Logger(namespace="mtlsgate.app.workers").info(
        "worker {index} serving (pid {pid})", index=index, pid=os.getpid(), mtlsgate_worker_ready=True
    )
    reactor.run()


if __name__ == "__main__":
    main()
