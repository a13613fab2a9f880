"""
The access log as a file: an observer of the C{mtlsgate.access} log namespace that writes one line
per request to a file (or stdout), in the spirit of nginx's C{access_log}, in one of two formats:

- C{combined}: Apache/nginx "combined" with the client identity in the user field, and the route,
  upstream, certificate CN and fingerprint, and duration appended;
- C{json}: one JSON object per line, every field named, for log shippers.

Lines are written by a thread of their own, so a slow disk never stalls the reactor; if the disk
falls so far behind that the queue fills, lines are dropped and the drops counted in the twistd log.
The access events (L{AccessEvents}, told of each finished request) also reach the twistd log.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
from datetime import datetime, timezone
from typing import IO, Any

from twisted.application.service import Service
from twisted.logger import ILogObserver, LogPublisher, Logger, globalLogPublisher
from zope.interface import implementer

from mtlsgate.accounting import FinishedRequest, IRequestObserver
from mtlsgate.identity import printable

ACCESS_NAMESPACE = "mtlsgate.access"
FORMATS = ("combined", "json")
_QUEUE_LINES = 10000

log = Logger(namespace="mtlsgate")
access_log = Logger(namespace=ACCESS_NAMESPACE)


@implementer(IRequestObserver)
class AccessEvents:
    """
    Each finished request as one event in the C{mtlsgate.access} log namespace, with fields a
    formatter (L{AccessLogObserver}) can read; the twistd log shows it too.  Not C{enabled}
    (C{access_log: off}, which a reload may switch): no event at all.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    @property
    def listening(self) -> bool:
        """Off: the proxy builds no record for it (L{mtlsgate.accounting.listening})."""
        return self.enabled

    def request_finished(self, record: FinishedRequest) -> None:
        if not self.enabled:
            return
        identity = record.identity
        access_log.info(
            "{client} {identity} \"{method} {uri} {proto}\" {status} {size} route={route} upstream={upstream}"
            " cn={common_name} sha256={fingerprint} {duration:.3f}s" + ("" if record.tunnel is None else " tunnel_in={tunnel_in} tunnel_out={tunnel_out}"),
            tunnel_in=None if record.tunnel is None else record.tunnel[0],
            tunnel_out=None if record.tunnel is None else record.tunnel[1],
            client=record.client,
            identity=record.peer,
            spiffe_id=identity.spiffe_id if identity else None,
            common_name=printable(identity.common_name or "-").replace(" ", "_") if identity else "-",
            fingerprint=identity.fingerprint_sha256 if identity else "-",
            method=record.method,
            uri=record.target,
            proto=record.protocol,
            referer=record.referer,
            user_agent=record.user_agent,
            status=record.status,
            size=record.size,
            route=record.route,
            upstream=record.upstream,
            duration=record.duration,
        )


def _quoted(value: Any) -> str:
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def format_tcp_combined(event: dict[str, Any]) -> str:
    """A TCP route's connection (C{kind: tcp}): the combined line's first fields, then what a tunnel has instead of a request."""
    when = datetime.fromtimestamp(event.get("log_time", 0), tz=timezone.utc).strftime("%d/%b/%Y:%H:%M:%S +0000")
    return (
        f"{event['client']} - {event['identity']} [{when}] \"TCP {event['route']}\" end={event['end']} up={event['bytes_up']} "
        f"down={event['bytes_down']} route={event['route']} upstream={event['upstream']} cn={event['common_name']} "
        f"sha256={event['fingerprint']} {event['duration']:.3f}s"
    )


def format_tcp_json(event: dict[str, Any]) -> str:
    when = datetime.fromtimestamp(event.get("log_time", 0), tz=timezone.utc).isoformat(timespec="milliseconds")
    record = {
        "time": when, "kind": "tcp", "client": event["client"], "identity": event["identity"], "spiffe_id": event.get("spiffe_id"),
        "common_name": None if event["common_name"] == "-" else event["common_name"],
        "fingerprint_sha256": None if event["fingerprint"] == "-" else event["fingerprint"],
        "server_name": event.get("server_name"), "route": event["route"], "upstream": event["upstream"], "end": event["end"],
        "detail": event.get("detail"), "bytes_up": event["bytes_up"], "bytes_down": event["bytes_down"],
        "duration_s": round(event["duration"], 6), "pid": os.getpid(),
    }  # fmt: skip
    return json.dumps(record, ensure_ascii=True, separators=(",", ":"))


def format_combined(event: dict[str, Any]) -> str:
    if event.get("kind") == "tcp":
        return format_tcp_combined(event)
    when = datetime.fromtimestamp(event.get("log_time", 0), tz=timezone.utc).strftime("%d/%b/%Y:%H:%M:%S +0000")
    request = f"{event['method']} {event['uri']} {event['proto']}"
    return (
        f"{event['client']} - {event['identity']} [{when}] {_quoted(request)} {event['status']} {event['size']} "
        f"{_quoted(event.get('referer') or '-')} {_quoted(event.get('user_agent') or '-')} "
        f"route={event['route']} upstream={event['upstream']} cn={event['common_name']} sha256={event['fingerprint']} "
        f"{event['duration']:.3f}s"
    ) + ("" if event.get("tunnel_in") is None else f" tunnel_in={event['tunnel_in']} tunnel_out={event['tunnel_out']}")


def format_json(event: dict[str, Any]) -> str:
    if event.get("kind") == "tcp":
        return format_tcp_json(event)
    when = datetime.fromtimestamp(event.get("log_time", 0), tz=timezone.utc).isoformat(timespec="milliseconds")
    record = {
        "time": when,
        "client": event["client"],
        "identity": event["identity"],
        "spiffe_id": event.get("spiffe_id"),
        "common_name": None if event["common_name"] == "-" else event["common_name"],
        "fingerprint_sha256": None if event["fingerprint"] == "-" else event["fingerprint"],
        "method": event["method"],
        "uri": event["uri"],
        "proto": event["proto"],
        "status": event["status"],
        "size": event["size"],
        "referer": event.get("referer"),
        "user_agent": event.get("user_agent"),
        "route": event["route"],
        "upstream": event["upstream"],
        "duration_s": round(event["duration"], 6),
        "pid": os.getpid(),
    }
    if event.get("tunnel_in") is not None:  # a WebSocket tunnel's line, written when it closed: bytes from and to the client
        record["tunnel_in"] = event["tunnel_in"]
        record["tunnel_out"] = event["tunnel_out"]
    return json.dumps(record, ensure_ascii=True, separators=(",", ":"))


_FORMATTERS = {"combined": format_combined, "json": format_json}


class _Writer(threading.Thread):
    """
    Writes queued lines to the stream, flushing whenever the queue runs empty.  A write error (a full
    disk, a removed NFS mount) loses that line, is logged once per run of errors, and the thread goes
    on; shutdown never waits on it for longer than L{finish}'s timeout.
    """

    def __init__(self, stream: IO[str]) -> None:
        super().__init__(name="mtlsgate-access-log", daemon=True)
        self.stream = stream
        self.lines: queue.Queue[str | None] = queue.Queue(maxsize=_QUEUE_LINES)
        self.dropped = 0
        self.failed = 0  # lines lost to write errors
        self._failing = 0  # lines lost in the current run of errors
        self._in_burst = False
        self._stopping = False

    def put(self, line: str) -> None:
        try:
            self.lines.put_nowait(line)
        except queue.Full:
            self.dropped += 1

    def run(self) -> None:
        while not self._stopping:
            line = self.lines.get()
            if line is None:
                break
            self._attempt(self.stream.write, line)
            if self.lines.empty():
                self._attempt(self.stream.flush)
        self._attempt(self.stream.flush)

    def _attempt(self, operation: Any, *args: Any) -> None:
        try:
            operation(*args)
        except Exception as error:  # an OSError mostly; a ValueError once the stream is closed
            lost = 1 if args else 0
            self.failed += lost
            self._failing += lost
            if not self._in_burst:
                self._in_burst = True
                log.error("access log: writing failed ({error}); lines are lost until it works again", error=f"{error.__class__.__name__}: {error}")
        else:
            if self._in_burst and args:
                log.info("access log: writing works again; {n} line(s) were lost", n=self._failing)
                self._in_burst = False
                self._failing = 0

    def finish(self, timeout: float = 10.0) -> None:
        """Write what is queued and stop, within C{timeout} seconds whatever the disk does."""
        deadline = time.monotonic() + timeout
        try:
            self.lines.put(None, timeout=timeout)
        except queue.Full:
            self._stopping = True  # wedged in a write: let it end there, lines still queued are lost
        self.join(timeout=max(0.0, deadline - time.monotonic()))


@implementer(ILogObserver)
class AccessLogObserver:
    """Formats each access event and hands it to the writer thread."""

    def __init__(self, writer: _Writer, fmt: str = "combined") -> None:
        self.writer = writer
        self.format = _FORMATTERS[fmt]

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("log_namespace") != ACCESS_NAMESPACE:
            return
        self.writer.put(self.format(event) + "\n")


class AccessLogService(Service):
    """Opens C{path} (C{-} is stdout) on start, appending; observes C{publisher} until stopped."""

    def __init__(self, path: str, fmt: str = "combined", publisher: LogPublisher = globalLogPublisher) -> None:
        self.path = path
        self.fmt = fmt
        self.publisher = publisher
        self.observer: AccessLogObserver | None = None

    def _open(self) -> None:
        if self.observer is None:
            # Line-buffered: one write(2) per line, so workers appending to one file never interleave.
            stream = sys.stdout if self.path == "-" else open(self.path, "a", encoding="utf-8", buffering=1)
            writer = _Writer(stream)
            writer.start()
            self.observer = AccessLogObserver(writer, self.fmt)

    def privilegedStartService(self) -> None:
        # Opened before twistd drops privileges (-u/-g), as nginx opens its logs as root.
        self._open()
        super().privilegedStartService()

    def startService(self) -> None:
        self._open()
        assert self.observer is not None
        self.publisher.addObserver(self.observer)
        super().startService()

    def stopService(self) -> None:
        super().stopService()
        if self.observer is not None:
            self.publisher.removeObserver(self.observer)
            writer = self.observer.writer
            writer.finish()
            if writer.dropped:
                log.warn("access log {path}: {n} line(s) dropped because the disk fell behind", path=self.path, n=writer.dropped)
            if writer.failed:
                log.warn("access log {path}: {n} line(s) lost to write errors", path=self.path, n=writer.failed)
            if writer.stream is not sys.stdout and not writer.is_alive():
                try:
                    writer.stream.close()
                except Exception as error:
                    log.warn("access log {path}: closing failed: {error}", path=self.path, error=error)
            self.observer = None
