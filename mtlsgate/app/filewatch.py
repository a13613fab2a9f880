"""
Reload on file change, the cheap way: every few seconds, stat the files a configuration was built
from (the config file, certificates and keys, the client CA bundle, the CRL) and call back when any
of them changed.  C{mtlsgate ca crl} or a certificate renewal by another tool then takes effect
without a SIGHUP.
"""

from __future__ import annotations

import os
from typing import Callable, Iterable

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from mtlsgate.config.model import Config

Snapshot = dict[str, "tuple[int, int, int] | None"]

log = Logger(namespace="mtlsgate.app.filewatch")


def watched_files(config: Config) -> list[str]:
    """Every file the running configuration read, except what autocert itself writes."""
    files = [config.source] if config.source else []
    for spec in config.certificates:
        files += [spec.cert] + ([spec.key] if spec.key else [])
    files += [f for f in (config.downstream_mtls.ca_file, config.downstream_mtls.crl_file) if f]
    for route in config.routes:
        files += [f for f in (route.tls_custom_ca_file, route.tls_client_cert_file, route.tls_client_key_file) if f]
    for tcp_route in config.tcp_routes:
        files += [f for f in (tcp_route.tls_custom_ca_file, tcp_route.tls_client_cert_file, tcp_route.tls_client_key_file) if f]
    return sorted(set(files))


def snapshot(paths: Iterable[str]) -> Snapshot:
    state: Snapshot = {}
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            state[path] = None
        else:
            state[path] = (st.st_mtime_ns, st.st_size, st.st_ino)
    return state


class FileWatch(Service):
    """Calls C{changed} (once per change) when any file of C{files()} changes; C{files} is re-read after each call."""

    def __init__(self, reactor: IReactorTime, files: Callable[[], list[str]], changed: Callable[[], None], interval: float) -> None:
        self.files = files
        self.changed = changed
        self.loop = LoopingCall(self._check)
        self.loop.clock = reactor
        self.interval = interval
        self.state: Snapshot = {}

    def startService(self) -> None:
        super().startService()
        self.state = snapshot(self.files())
        self.loop.start(self.interval, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self.loop.running:
            self.loop.stop()

    def _check(self) -> None:
        """
        The snapshot is taken before C{changed} runs, so a file replaced while it runs is seen at the
        next check; an unexpected error is logged and the watch goes on (a LoopingCall whose function
        raises stops for good).
        """
        try:
            now = snapshot(self.files())
            if now == self.state:
                return
            self.state = now
            try:
                self.changed()
            finally:
                self.state = self._after_change(now)
        except Exception:
            log.failure("handling a change of watched files failed; still watching")

    def _after_change(self, before: Snapshot) -> Snapshot:
        """The files to watch after a change (C{changed} may have named new ones): known ones keep their earlier snapshot."""
        files = self.files()
        new = snapshot(f for f in files if f not in before)
        return {f: before[f] if f in before else new[f] for f in files}
