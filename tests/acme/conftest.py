"""Fixtures for end-to-end ACME tests against a real pebble (see L{tests.acme.pebble})."""

from __future__ import annotations

import contextlib
import itertools
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests.acme.pebble import Pebble


@pytest.fixture
def start_pebble(tmp_path: Path) -> Iterator[Callable[..., Pebble]]:
    """
    A factory: C{start_pebble(http_port=..., tls_port=..., **kwargs)} starts a L{Pebble} in
    C{tmp_path/pebble-N} with L{Pebble.start}'s keyword arguments; every instance is stopped at teardown.
    """
    numbers = itertools.count(1)
    with contextlib.ExitStack() as stops:

        def start(*, http_port: int, tls_port: int, **kwargs: Any) -> Pebble:
            pebble = Pebble.start(tmp_path / f"pebble-{next(numbers)}", http_port, tls_port, **kwargs)
            stops.callback(pebble.stop)
            return pebble

        yield start
