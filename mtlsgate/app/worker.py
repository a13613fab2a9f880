"""
One worker process of a group (L{mtlsgate.app.workers}), started by the parent as
C{python -c BOOT PATH0 --index N [--http] [--acme] [--no-stdlib-ssl] [--parent PID] --config-json PATH}, where PATH0 is
the first entry of the parent's import path and PATH holds the configuration the parent validated
(L{mtlsgate.app.handoff}), read again on each reload.

Why not C{python -m mtlsgate.app.worker}: C{-m} (and C{-c}) put the current directory first on the import path, so an
C{mtlsgate/} package in the directory the gateway was started from (a checkout, or one another local user planted in
/tmp) would run in every worker while the parent runs the installed one.  L{BOOT} puts the parent's first entry there
instead (for the C{twistd} or C{mtlsgate} console script, its own directory): a worker imports what its parent imports
(docs/security.md, "A worker's import path"; C{tests/adversarial/test_worker_search_path.py}).

It adopts the listening sockets the parent passed, sends its log events to the parent as JSON, and
otherwise runs the same L{GatewayService} as a single-process gateway: SIGHUP reloads it, SIGTERM
drains it.  It dies with its parent.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from typing import NamedTuple

_PR_SET_PDEATHSIG = 1
BOOT = "import sys; sys.path[0] = sys.argv.pop(1); from mtlsgate.app.worker import main; main()"
_USAGE = "python -m mtlsgate.app.worker --index N [--http] [--acme] [--no-stdlib-ssl] [--parent PID] --config-json PATH"


class WorkerArgs(NamedTuple):
    number: int  # --index
    parent: int | None
    config_json: str  # the configuration the parent validated (mtlsgate.app.handoff)
    http: bool  # serve the HTTP listener (fd 5)
    acme: bool  # run autocert (and the shared store's connection)
    stdlib_ssl: bool = True  # False (--no-stdlib-ssl): the standard library's ssl and _hashlib are kept out (app/memory.py)


def parse_args(argv: list[str]) -> WorkerArgs:
    """
    The worker's own flags, read by hand: nothing else in a worker needs an options parser (neither
    argparse nor twisted.python.usage is imported: the configuration comes validated from the parent).
    """
    args: dict[str, object] = {"index": None, "parent": None, "config-json": None, "http": False, "acme": False, "no-stdlib-ssl": False}
    rest = list(argv)
    while rest:
        flag = rest.pop(0)
        name, eq, value = flag[2:].partition("=") if flag.startswith("--") else ("", "", "")
        if name in ("http", "acme", "no-stdlib-ssl") and not eq:
            args[name] = True
        elif name in ("index", "parent", "config-json"):
            if not eq:
                if not rest:
                    raise ValueError(f"{flag} needs a value")
                value = rest.pop(0)
            if name != "config-json":
                if not value.isdigit():
                    raise ValueError(f"--{name}: expected a number, got {value!r}")
                args[name] = int(value)
            else:
                args[name] = value
        else:
            raise ValueError(f"unknown argument {flag!r} (usage: {_USAGE})")
    if args["index"] is None or args["config-json"] is None:
        raise ValueError(f"--index and --config-json are required (usage: {_USAGE})")
    return WorkerArgs(args["index"], args["parent"], args["config-json"], bool(args["http"]), bool(args["acme"]),  # type: ignore[arg-type]
                      not args["no-stdlib-ssl"])


def _die_with_parent() -> None:
    """Linux: get SIGTERM when the parent dies, so a killed parent leaves no orphan serving."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: the parent's stop still reaches every worker


def main(argv: list[str] | None = None) -> None:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except ValueError as e:
        sys.exit(f"python -m mtlsgate.app.worker: {e}")
    index, handed = args.number, args.config_json
    _die_with_parent()
    if args.parent is not None and os.getppid() != args.parent:  # it died before PDEATHSIG was set
        sys.exit("mtlsgate worker: the parent is gone")

    from mtlsgate.app.memory import settle_when_running, without_stdlib_openssl, without_twisted_web_http2

    without_twisted_web_http2()  # before anything imports twisted.web.http: h2 only where mtlsgate speaks HTTP/2
    if not args.stdlib_ssl:
        without_stdlib_openssl()  # before anything imports Twisted (whose compat module imports http.cookiejar: ssl, hashlib)

    from twisted.logger import FileLogObserver, Logger, globalLogBeginner

    from mtlsgate.app import handoff
    from mtlsgate.app.service import WorkerRole, make_gateway
    from mtlsgate.app.workers import EVENTS_FD, HTTP_FD, HTTPS_FD, relayed_event
    from mtlsgate.config.model import ConfigError
    from mtlsgate.reactors import installed_reactor
    from mtlsgate.tls.pki import PKIError

    reactor = installed_reactor()
    events = os.fdopen(EVENTS_FD, "w", encoding="utf-8")
    globalLogBeginner.beginLoggingTo([FileLogObserver(events, relayed_event)], redirectStandardIO=False)
    role = WorkerRole(index=index, https_fd=HTTPS_FD, http_fd=HTTP_FD if args.http else None, acme=args.acme)
    try:
        service = make_gateway(reactor, handoff.load(handed), lambda: handoff.load(handed), role)
    except (ConfigError, PKIError) as e:
        sys.exit(f"mtlsgate worker {index}: {e}")
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
