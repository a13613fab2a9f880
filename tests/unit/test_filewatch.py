"""The file watch on a Clock: it survives a failing reload and never misses a file replaced during one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from mtlsgate.app.filewatch import FileWatch


@pytest.fixture
def errors():
    seen: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "mtlsgate.app.filewatch" and "log_failure" in event:
            seen.append(event)

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


def replace(path: Path, text: str) -> None:
    """A new file in the old one's place (new inode and size), as tools that write-and-rename do."""
    tmp = path.with_suffix(".new")
    tmp.write_text(text)
    tmp.replace(path)


def test_a_reload_that_raises_is_logged_and_the_watch_goes_on(tmp_path, errors):
    clock, watched = Clock(), tmp_path / "cert.pem"
    watched.write_text("one")
    calls: list[int] = []

    def changed() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("unexpected")

    watch = FileWatch(clock, lambda: [str(watched)], changed, 1.0)
    watch.startService()
    replace(watched, "two")
    clock.advance(1)
    assert calls == [1] and len(errors) == 1 and errors[0]["log_failure"].check(RuntimeError)
    assert watch.loop.running
    clock.advance(1)
    assert calls == [1]  # no reload again for the same change
    replace(watched, "three!")
    clock.advance(1)
    assert calls == [1, 1] and len(errors) == 1
    watch.stopService()


def test_a_file_replaced_during_the_reload_is_seen_at_the_next_check(tmp_path):
    clock, watched = Clock(), tmp_path / "cert.pem"
    watched.write_text("one")
    calls: list[int] = []

    def changed() -> None:
        calls.append(1)
        if len(calls) == 1:
            replace(watched, "renewed while reloading")  # after the reload read it

    watch = FileWatch(clock, lambda: [str(watched)], changed, 1.0)
    watch.startService()
    replace(watched, "two")
    clock.advance(1)
    assert len(calls) == 1
    clock.advance(1)
    assert len(calls) == 2
    clock.advance(1)
    assert len(calls) == 2
    watch.stopService()


def test_files_a_reload_adds_are_watched_from_then_on(tmp_path):
    clock, config, key = Clock(), tmp_path / "gw.yaml", tmp_path / "key.pem"
    config.write_text("one")
    key.write_text("key")
    files = [str(config)]
    calls: list[int] = []

    def changed() -> None:
        calls.append(1)
        files.append(str(key))  # the new configuration names another file

    watch = FileWatch(clock, lambda: list(files), changed, 1.0)
    watch.startService()
    replace(config, "two")
    clock.advance(1)
    clock.advance(1)
    assert len(calls) == 1  # the new file's first snapshot is no change
    replace(key, "new key")
    clock.advance(1)
    assert len(calls) == 2
    watch.stopService()


def test_a_files_list_that_raises_is_logged_and_the_watch_goes_on(tmp_path, errors):
    clock = Clock()
    answers: list[Any] = [[], OSError("boom"), []]

    def files() -> list[str]:
        answer = answers.pop(0) if answers else []
        if isinstance(answer, Exception):
            raise answer
        return answer

    watch = FileWatch(clock, files, lambda: None, 1.0)
    watch.startService()
    clock.advance(1)
    assert len(errors) == 1 and watch.loop.running
    clock.advance(1)
    watch.stopService()
