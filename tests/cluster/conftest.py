"""
A real redis-server on loopback for the cluster tests: C{redis_server()} starts one on a free port in
the test's directory (no persistence unless C{persist}), stopped by PID at teardown.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests.conftest import Proc, find_tool, free_port


class RedisServer:
    """One redis-server process; L{stop} and L{start} again keep the port (and, with C{persist}, the data)."""

    def __init__(self, workdir: Path, port: int, persist: bool, password: str | None = None) -> None:
        self.workdir = workdir
        self.port = port
        self.persist = persist
        self.password = password
        self.proc: Proc | None = None
        self._runs = itertools.count(1)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = [find_tool("redis-server") or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
                "--dbfilename", "dump.rdb", "--save", "3600 1" if self.persist else "", "--appendonly", "no"]  # fmt: skip
        if self.password:
            argv += ["--requirepass", self.password]
        self.proc = Proc(argv, self.workdir / f"redis-{next(self._runs)}.log", cwd=self.workdir)
        deadline = time.monotonic() + 20
        while not self.ping():
            if self.proc.popen.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.popen.returncode}:\n{self.proc.output()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server not answering after 20s:\n{self.proc.output()}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        """SIGTERM by PID: with C{persist}, redis-server writes dump.rdb before it exits."""
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

    def command(self, *args: str) -> bytes:
        """One command over a raw socket (RESP), for test assertions; returns the raw reply."""
        parts = ([b"AUTH", self.password.encode()],) if self.password else ()
        wire = b""
        for cmd in (*parts, [a.encode() for a in args]):
            wire += b"*%d\r\n" % len(cmd) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in cmd)
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(wire)
            time.sleep(0.05)
            s.settimeout(2)
            data = b""
            with contextlib.suppress(TimeoutError, socket.timeout):
                while chunk := s.recv(65536):
                    data += chunk
                    if data.endswith(b"\r\n") and (not self.password or data.count(b"\r\n") >= 2):
                        break
        return data

    def ping(self) -> bool:
        try:
            return b"PONG" in self.command("PING")
        except OSError:
            return False


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """C{redis_server(persist=False, password=None)}: a started L{RedisServer}; all stopped at teardown."""
    if not find_tool("redis-server"):
        pytest.skip("redis-server not installed")
    started: list[RedisServer] = []
    numbers = itertools.count(1)

    def start(persist: bool = False, password: str | None = None, **_: Any) -> RedisServer:
        server = RedisServer(tmp_path / f"redis-{next(numbers)}", free_port(), persist, password)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


from tests.acme.conftest import start_pebble  # noqa: E402,F401 - the pebble fixture, for the cluster tests
