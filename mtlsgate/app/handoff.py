"""
The configuration a worker group's parent validated, handed to its workers as JSON (no YAML in a worker).

The parent reads the YAML file and the flags into one plain mapping (the document: the mapping, the
keys flags set, the file it came from), validates it, and writes it to C{config.json} in a private
directory of its own (C{0700}, the file C{0600}, replaced atomically, removed when the group stops).
A worker validates that document with the same loader code (L{mtlsgate.config.load.config_from_mapping}),
so it gets the same L{Config} and the same error messages, without importing C{yaml} (about 1 MiB of
every worker's memory).  On SIGHUP (or a change of the YAML file it watches), the parent validates the
file again: a broken one is refused there and every process keeps its configuration; a good one is
written here before each worker is told to reload.  A worker that is restarted reads the last good one.

The mapping may hold what a config holds (paths, a Redis URL with its password), hence the modes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

from mtlsgate.config.model import Config, ConfigError

_NAME = "config.json"


def _check_plain(value: Any, key: str) -> None:
    """Refuse what JSON would not give back as it is (YAML's dates, binary, sets; keys that are not strings), naming the key."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(key or str(k), f"the key {k!r} is not a string: quote it (a worker group hands its configuration on as JSON)")
            _check_plain(v, f"{key}.{k}" if key else k)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_plain(item, f"{key}[{i}]")
    elif value is not None and not isinstance(value, (str, bool, int, float)):
        raise ConfigError(key, f"a {type(value).__name__} value: quote it (a worker group hands its configuration on as JSON)")


def encode(document: dict[str, Any]) -> str:
    """The document as JSON, or L{ConfigError} naming a key whose value JSON would not give back as it is."""
    _check_plain(document.get("config"), "")
    return json.dumps(document)


def read(path: str) -> dict[str, Any]:
    """A document the parent wrote (in a worker)."""
    try:
        with open(path, encoding="utf-8") as f:
            document = json.load(f)
    except OSError as e:
        raise ConfigError("", f"{path}: {e.strerror} (the configuration the worker group's parent hands on)") from None
    if not isinstance(document, dict) or not isinstance(document.get("config"), dict):
        raise ConfigError("", f"{path}: not a configuration the worker group's parent wrote")
    return document


def load(path: str) -> Config:
    """
    The configuration of a document the parent wrote (in a worker, at start and on each reload): the
    loader's own validation, and its errors with the flag that set the key, as the parent words them.
    The YAML file is left out (C{source}): the parent watches it, the worker its certificates.
    """
    from mtlsgate.config.load import config_from_mapping

    document = read(path)
    flags = document.get("flags") or {}
    try:
        return config_from_mapping(document["config"])
    except ConfigError as e:
        top = e.key.split(".", 1)[0].split("[", 1)[0]
        if top in flags:
            raise ConfigError(e.key, f"{e.problem} (set by {flags[top]})") from None
        raise


class Handoff:
    """The parent's side: the private directory and the file in it."""

    def __init__(self) -> None:
        self.directory: str | None = None

    @property
    def path(self) -> str:
        assert self.directory is not None, "nothing written yet"
        return os.path.join(self.directory, _NAME)

    def write(self, text: str) -> str:
        """Write (or replace, atomically) the document's JSON; returns the file's path."""
        if self.directory is None:
            self.directory = tempfile.mkdtemp(prefix="mtlsgate-config-")  # 0700, this process's user
        partial = os.path.join(self.directory, _NAME + ".new")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(partial, self.path)
        return self.path

    def remove(self) -> None:
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None
