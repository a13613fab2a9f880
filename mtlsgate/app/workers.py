"""
C{workers: N}: nginx's master/worker model as a Twisted service.

The parent (the twistd process) binds the listening sockets, so ports below 1024 work with
C{twistd -u/-g}, and runs no TLS itself.  It starts N worker processes (L{mtlsgate.app.worker},
each given its own C{SO_REUSEPORT} socket of the TLS port, see L{mtlsgate.app.sockets}) and:

- restarts a worker that dies, after a back-off that grows while it keeps dying young;
- hands every worker the configuration it validated, as JSON (L{mtlsgate.app.handoff}: a worker never
  imports yaml); on SIGHUP (or, with C{watch_interval}, a change of the YAML file) validates it again
  and, if good, hands it on and has every worker reload (configuration and certificates); a broken one
  is refused here and every process keeps its own;
- on stop (SIGTERM), has every worker drain (C{limits.shutdown_timeout}), then exits;
- serves the admin listener, summing the workers' metrics (prometheus_client's multiprocess mode);
- relays the workers' log events into its own log, tagged C{worker-N}.

Worker 0 alone holds the plain-HTTP listener and runs autocert; the other workers pick up the
certificates it stores by watching C{certs_dir}, and the TLS-ALPN-01 validation certificates it
publishes there, since a CA's validator may reach any of them.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import tempfile
from typing import Any, Callable

import attrs
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger, eventAsJSON, eventFromJSON, formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from mtlsgate.app import bytecode, handoff
from mtlsgate.app.filewatch import FileWatch
from mtlsgate.config.model import Config, ConfigError
from mtlsgate.observe.metrics import worker_group_registry
from mtlsgate.tls.pki import PKIError
from mtlsgate.app.service import StartupError, admin_listener_for, certificate_expiries, certificate_problem, served_certificates
from mtlsgate.app.worker import BOOT
from mtlsgate.app.sockets import listening_socket, parse_tcp_listen, reuse_port_group, steer_by_client_address
from mtlsgate.reactors import IGatewayReactor

log = Logger(namespace="mtlsgate.app.workers")

#: The worker's file descriptors: its log events (JSON, to the parent), the TLS socket, the HTTP socket.
EVENTS_FD, HTTPS_FD, HTTP_FD = 3, 4, 5

_FIRST_DELAY = 0.5  # seconds before restarting a worker that died
_MAX_DELAY = 30.0
_YOUNG = 10.0  # a worker that dies younger than this doubles its next delay
_KILL_GRACE = 10.0  # seconds past shutdown_timeout before a worker that will not stop is killed


def relayed_event(event: dict[str, Any]) -> str:
    """
    One log event of a worker as it goes to the parent: JSON after a record separator, as Twisted's
    C{jsonFileLogObserver} writes it, but with the message already rendered here, where the fields
    are real values.  Through JSON, Twisted formats from each field's C{str()} and drops the format
    spec (C{:.3f}, C{:g}), so the parent would write "1.0s" where a single process writes "1s".  The
    fields themselves still travel with the event.
    """
    if event.get("log_format") is not None:
        text = formatEvent(event)
        event = {**event, "log_format": text.replace("{", "{{").replace("}", "}}")}
    return "\x1e" + eventAsJSON(event) + "\n"


class _Worker(ProcessProtocol):
    """One worker process: relays its output and log events, and tells the group when it ends."""

    def __init__(self, group: WorkerGroup, index: int) -> None:
        self.group = group
        self.index = index
        self.started = group.reactor.seconds()
        self.ready = False
        self.pid: int | None = None
        self._partial: dict[int, bytes] = {}

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.pid = self.transport.pid
        self.transport.closeStdin()

    def childDataReceived(self, fd: int, data: bytes) -> None:
        lines = (self._partial.pop(fd, b"") + data).split(b"\n")
        if lines[-1]:
            self._partial[fd] = lines[-1]
        for line in lines[:-1]:
            self._line(fd, line)

    def _line(self, fd: int, line: bytes) -> None:
        text = line.decode("utf-8", "replace").lstrip("\x1e").rstrip("\r")
        if not text:
            return
        if fd == EVENTS_FD:
            try:
                event = eventFromJSON(text)
            except ValueError:
                log.warn("worker {index}: unreadable log event {text!r}", index=self.index, text=text[:200])
                return
            if event.get("mtlsgate_worker_ready"):
                self.ready = True
            event["log_system"] = f"worker-{self.index}"
            globalLogPublisher(event)
        elif fd == 2:
            log.error("worker {index} (stderr): {text}", index=self.index, text=text, log_system=f"worker-{self.index}")
        else:
            log.info("{text}", text=text, log_system=f"worker-{self.index}")

    def processEnded(self, reason: Failure) -> None:
        for fd, rest in self._partial.items():
            self._line(fd, rest)
        self._partial.clear()
        self.group.ended(self, reason)


class WorkerGroup(MultiService):
    """
    @param document: the plain document C{config} was validated from (L{mtlsgate.app.tap.Options.load_document}),
        handed to every worker, which validates it again into the same configuration.
    @param reload_config: re-reads and validates the configuration and its document (on SIGHUP).
    """

    def __init__(
        self, reactor: IGatewayReactor, config: Config, document: dict[str, Any],
        reload_config: Callable[[], tuple[Config, dict[str, Any]]] | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.reactor = reactor
        self.config = config
        self.document = handoff.encode(document)  # a value JSON cannot carry is refused now, naming its key
        self.handoff = handoff.Handoff()
        self.interpreter_flags: list[str] = []  # worker_bytecode: -OO on the parent's compiled bytecode (mtlsgate.app.bytecode)
        self.reload_config = reload_config
        self.count = config.workers
        self.workers: dict[int, _Worker] = {}
        self.https_sockets: list[socket.socket] = []
        self.http_socket: socket.socket | None = None
        self.metrics_dir: str | None = None
        self.stopping = False
        self._delays: dict[int, float] = {}
        self._all_ended: defer.Deferred[None] | None = None
        self._previous_hup: Any = None
        if config.admin_address:
            self.metrics_dir = tempfile.mkdtemp(prefix="mtlsgate-metrics-")
            registry = worker_group_registry(self.metrics_dir, self._expiries, lambda: len(self.workers))
            admin_listener_for(reactor, config.admin_address, registry, self.readiness, self.degraded).setServiceParent(self)
        if reload_config is not None and config.watch_interval is not None and config.source:
            # The workers watch the certificate files themselves; the YAML file is read here only.
            FileWatch(reactor, lambda: [self.config.source] if self.config.source else [], self._file_changed, config.watch_interval).setServiceParent(self)

    # --- start ---------------------------------------------------------------------------------

    def privilegedStartService(self) -> None:
        if not self.https_sockets:
            self._bind()
        super().privilegedStartService()

    def _bind(self) -> None:
        try:
            self.https_sockets = reuse_port_group(parse_tcp_listen(self.config.address), self.count)
            if self.config.worker_affinity == "client_ip":
                steer_by_client_address(self.https_sockets)
            if self.config.http_address:
                self.http_socket = listening_socket(parse_tcp_listen(self.config.http_address))
        except (OSError, ValueError) as e:
            self._close(None)
            raise StartupError(f"mtlsgate: cannot listen for the worker group: {e}") from None
        host, port = self.https_sockets[0].getsockname()[:2]
        log.info(
            "HTTPS listening on {host}:{port} ({n} workers, one SO_REUSEPORT socket each; a new connection goes to {how})",
            host=host, port=port, n=self.count,
            how="the worker its client's address hashes to" if self.config.worker_affinity == "client_ip" else "any worker",
        )  # fmt: skip

    def startService(self) -> None:
        if not self.https_sockets:
            self._bind()
        super().startService()
        try:
            self.handoff.write(self.document)  # here, after twistd's -u/-g: the directory belongs to the workers' user
        except OSError as e:
            self._close(None)
            raise StartupError(f"mtlsgate: cannot write the configuration for the workers: {e}") from None
        if self.config.worker_bytecode is not None:  # also here, after -u/-g: the directory is the workers' user's
            directory = self.config.worker_bytecode
            try:
                bytecode.private_directory(directory)
            except bytecode.BytecodeError as e:
                self._close(None)
                raise StartupError(f"mtlsgate: {e}") from None
            compiled = bytecode.fill(directory, bytecode.sources())
            log.info("worker_bytecode: workers run as python -OO on the bytecode in {dir} ({n} module(s) compiled now)", dir=directory, n=compiled)
            self.interpreter_flags = bytecode.interpreter_flags(directory)
        for index in range(self.count):
            self._spawn(index)
        if hasattr(signal, "SIGHUP"):
            self._previous_hup = signal.signal(signal.SIGHUP, lambda signum, frame: self.reactor.callFromThread(self.reload))

    def _spawn(self, index: int) -> None:
        if self.stopping:
            return
        fds: dict[int, Any] = {0: "w", 1: "r", 2: "r", EVENTS_FD: "r", HTTPS_FD: self.https_sockets[index].fileno()}
        # -X no_debug_ranges: code objects without column positions (only tracebacks' ^^^ markers use them): 0.3 MiB a worker.
        # The worker's import path starts where the parent's does (worker.BOOT), not at the current directory, where
        # `python -m` would start it (docs/security.md, "A worker's import path").
        args = [sys.executable, "-X", "no_debug_ranges", *self.interpreter_flags, "-c", BOOT, sys.path[0]]
        args += ["--index", str(index), "--parent", str(os.getpid()), "--config-json", self.handoff.path]
        if index == 0:
            if self.http_socket is not None:
                fds[HTTP_FD] = self.http_socket.fileno()
                args.append("--http")
            if self.config.autocert is not None or self.config.storage is not None:
                args.append("--acme")  # autocert, and the shared store's connection (docs/cluster.md), live in worker 0
        if "--acme" not in args and not self.config.admin_address:
            # The ACME stack and prometheus_client (the workers' metrics, read through the admin listener) import the
            # standard library's ssl; nothing else a worker runs does (mtlsgate.app.memory.without_stdlib_openssl).
            args.append("--no-stdlib-ssl")
        env = dict(os.environ)
        if self.metrics_dir is not None:
            env["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir
        worker = _Worker(self, index)
        self.reactor.spawnProcess(worker, sys.executable, args, env=env, path=os.getcwd(), childFDs=fds)
        self.workers[index] = worker
        log.info("worker {index} started (pid {pid})", index=index, pid=worker.pid)

    # --- while running -------------------------------------------------------------------------

    def ended(self, worker: _Worker, reason: Failure) -> None:
        """A worker process ended: restart it (unless stopping), after a back-off if it died young."""
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        if self.metrics_dir is not None and worker.pid is not None:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(worker.pid, self.metrics_dir)
        how = _exit_text(reason)
        if self.stopping:
            log.info("worker {index} (pid {pid}) {how}", index=worker.index, pid=worker.pid, how=how)
            if not self.workers and self._all_ended is not None:
                self._all_ended.callback(None)
            return
        lived = self.reactor.seconds() - worker.started
        delay = _FIRST_DELAY if lived >= _YOUNG else min(self._delays.get(worker.index, _FIRST_DELAY / 2) * 2, _MAX_DELAY)
        self._delays[worker.index] = delay
        log.warn("worker {index} (pid {pid}) {how}; restarting it in {delay}s", index=worker.index, pid=worker.pid, how=how, delay=delay)
        self.reactor.callLater(delay, self._spawn, worker.index)

    def reload(self) -> None:
        """
        SIGHUP: validate the configuration again; if good, hand it on and have every worker reload
        (each also re-reads its certificates, and refuses them if broken, keeping its own); if not,
        refuse it here, and every process keeps the one it runs.
        """
        if self.reload_config is not None:
            try:
                config, document = self.reload_config()
                self.handoff.write(handoff.encode(document))
            except (ConfigError, PKIError, OSError) as e:
                log.error("reload refused, keeping the running configuration: {error}", error=str(e))
                return
            running = (self.count, self.config.worker_affinity, self.config.address, self.config.worker_bytecode)
            if (config.workers, config.worker_affinity, config.address, config.worker_bytecode) != running:
                log.warn("reload: workers, worker_affinity, worker_bytecode and address take effect on restart")
            self.config = attrs.evolve(
                config, workers=self.count, worker_affinity=self.config.worker_affinity, address=self.config.address,
                worker_bytecode=self.config.worker_bytecode,
            )  # fmt: skip
        log.info("SIGHUP: asking {n} worker(s) to reload", n=len(self.workers))
        for worker in list(self.workers.values()):
            _signal(worker, "HUP")

    def _file_changed(self) -> None:
        log.info("configuration file changed; reloading")
        self.reload()

    def _expiries(self) -> list[tuple[str, Any]]:
        try:
            served = served_certificates(self.config)
        except (PKIError, OSError):
            return []
        return certificate_expiries(served)

    def readiness(self) -> str | None:
        """None when every worker is serving and the certificates can serve; else why not."""
        waiting = [index for index in range(self.count) if not (index in self.workers and self.workers[index].ready)]
        if waiting:
            return f"worker(s) {', '.join(map(str, waiting))} not serving yet"
        try:
            return certificate_problem(served_certificates(self.config))
        except (PKIError, OSError) as e:
            return str(e)

    def degraded(self) -> str | None:
        """With a shared store: why worker 0 cannot reach it, as it last recorded (docs/cluster.md), or None."""
        if self.config.storage is None:
            return None
        from mtlsgate.cluster.cache import read_state

        return read_state(self.config.certs_dir)

    # --- stop ----------------------------------------------------------------------------------

    def stopService(self) -> defer.Deferred[None]:
        """Every worker drains and exits (killed if it outstays shutdown_timeout); then the sockets close."""
        self.stopping = True
        if self._previous_hup is not None:
            signal.signal(signal.SIGHUP, self._previous_hup)
            self._previous_hup = None
        d = defer.maybeDeferred(super().stopService)
        d.addCallback(lambda _: self._stop_workers())
        d.addBoth(self._close)
        return d

    def _stop_workers(self) -> defer.Deferred[None] | None:
        for worker in list(self.workers.values()):
            _signal(worker, "TERM")
        # Each worker closes its listening socket at once and drains; the parent's copies would keep
        # them listening, queueing new connections no one will accept until the drain ends.  Closed
        # now, a new connection is refused, as with a single process.
        self._close_sockets()
        if not self.workers:
            return None
        self._all_ended = defer.Deferred()
        kill = self.reactor.callLater(self.config.limits.shutdown_timeout + _KILL_GRACE, self._kill_stragglers)
        self._all_ended.addBoth(_cancelling, kill)
        return self._all_ended

    def _kill_stragglers(self) -> None:
        for worker in list(self.workers.values()):
            log.warn("worker {index} (pid {pid}) did not stop in time; killing it", index=worker.index, pid=worker.pid)
            _signal(worker, "KILL")

    def _close_sockets(self) -> None:
        for sock in self.https_sockets + ([self.http_socket] if self.http_socket else []):
            sock.close()
        self.https_sockets, self.http_socket = [], None

    def _close(self, result: Any) -> Any:
        self._close_sockets()
        if self.metrics_dir is not None:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
        self.handoff.remove()
        return result


def _cancelling(result: Any, timer: IDelayedCall) -> Any:
    """A callback that cancels C{timer} (if still pending) and passes C{result} on."""
    if timer.active():
        timer.cancel()
    return result


def _signal(worker: _Worker, name: str) -> None:
    try:
        if worker.transport is not None:
            worker.transport.signalProcess(name)
    except ProcessExitedAlready:
        pass


def _exit_text(reason: Failure) -> str:
    signal_number = getattr(reason.value, "signal", None)
    if signal_number:
        return f"was killed by {signal.Signals(signal_number).name}"
    return f"exited with status {getattr(reason.value, 'exitCode', '?')}"
