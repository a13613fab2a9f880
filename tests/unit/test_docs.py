"""The configuration reference cannot drift from the config model and the twistd options."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtlsgate import config
from mtlsgate.tap import Options

REFERENCE = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()


def _keys() -> list[str]:
    return sorted(set(config._TOP_KEYS) | set(config._ROUTE_KEYS) | set(config._ALLOW_KEYS) | set(config._DOWNSTREAM_MTLS_KEYS) | set(config._AUTOCERT_KEYS) | set(config._LIMIT_KEYS))


def _flags() -> list[str]:
    options = Options()
    names = [row[0] for row in options.optParameters + options.optFlags]
    names += [name[len("opt_"):].replace("_", "-") for name in dir(options) if name.startswith("opt_")]
    return sorted(set(names) - {"help", "version"})


@pytest.mark.parametrize("key", _keys())
def test_every_config_key_is_documented(key):
    assert f"`{key}`" in REFERENCE


@pytest.mark.parametrize("flag", _flags())
def test_every_flag_is_documented(flag):
    assert f"--{flag}" in REFERENCE
