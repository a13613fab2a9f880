"""Fixtures for the cluster tests: the real redis-server (C{redis_server}) lives in tests/conftest.py; pebble comes from tests/acme."""

from __future__ import annotations

from tests.acme.conftest import start_pebble  # noqa: F401 - the pebble fixture, for the cluster tests
