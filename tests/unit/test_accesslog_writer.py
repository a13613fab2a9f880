"""The access log's writer thread against a failing disk: it logs, goes on, and never holds shutdown up."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from twisted.logger import globalLogPublisher

from mtlsgate.observe.accesslog import _Writer


class FlakyStream:
    """A file whose writes fail with ENOSPC while C{full} is set."""

    def __init__(self) -> None:
        self.full = False
        self.written: list[str] = []
        self.closed = False

    def write(self, line: str) -> int:
        if self.full:
            raise OSError(28, "No space left on device")
        self.written.append(line)
        return len(line)

    def flush(self) -> None:
        if self.full:
            raise OSError(28, "No space left on device")

    def close(self) -> None:
        self.closed = True


class WedgedStream(FlakyStream):
    """A file whose writes never return (a hung NFS mount) until released."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def write(self, line: str) -> int:
        self.release.wait()
        return super().write(line)


@pytest.fixture
def logged():
    events: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "mtlsgate":
            events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


def wait_until(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_a_write_error_is_logged_once_per_burst_and_writing_goes_on(logged):
    stream = FlakyStream()
    writer = _Writer(stream)  # type: ignore[arg-type]
    writer.start()
    writer.put("one\n")
    wait_until(lambda: stream.written == ["one\n"])
    stream.full = True
    for i in range(5):
        writer.put(f"lost {i}\n")
    wait_until(lambda: writer.failed == 5)
    assert writer.is_alive()
    stream.full = False
    writer.put("two\n")
    wait_until(lambda: stream.written == ["one\n", "two\n"])
    writer.finish(timeout=5)
    assert not writer.is_alive()
    errors = [e for e in logged if e.get("log_level").name == "error"]
    assert len(errors) == 1 and "No space left on device" in errors[0]["error"]
    assert [e["n"] for e in logged if "writing works again" in e.get("log_format", "")] == [5]


def test_shutdown_is_not_held_up_by_a_full_queue_behind_failing_writes():
    stream = FlakyStream()
    stream.full = True
    writer = _Writer(stream)  # type: ignore[arg-type]
    writer.start()
    for i in range(20000):  # more than the queue holds
        writer.put(f"{i}\n")
    done = threading.Event()
    threading.Thread(target=lambda: (writer.finish(timeout=5), done.set()), daemon=True).start()
    assert done.wait(8), "finish() blocked"
    assert not writer.is_alive()


def test_shutdown_is_bounded_when_a_write_never_returns():
    stream = WedgedStream()
    writer = _Writer(stream)  # type: ignore[arg-type]
    writer.start()
    for i in range(20000):
        writer.put(f"{i}\n")
    started = time.monotonic()
    writer.finish(timeout=0.5)
    assert time.monotonic() - started < 3
    stream.release.set()
    wait_until(lambda: not writer.is_alive())  # and the thread ends once the write returns
