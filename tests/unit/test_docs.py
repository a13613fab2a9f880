"""The configuration reference cannot drift from the config model and the twistd options."""

from __future__ import annotations


import pytest

from mtlsgate.config import load as config
from mtlsgate.app.tap import Options
from tests.conftest import ROOT

REFERENCE = (ROOT / "docs" / "configuration.md").read_text()


def _keys() -> list[str]:
    lists = (
        config._TOP_KEYS, config._ROUTE_KEYS, config._ALLOW_KEYS, config._DOWNSTREAM_MTLS_KEYS, config._AUTOCERT_KEYS,
        config._LIMIT_KEYS, config._HEALTH_CHECK_KEYS,
    )  # fmt: skip
    return sorted(set().union(*lists))


def _flags() -> list[str]:
    options = Options()
    names = [row[0] for row in options.optParameters + options.optFlags]
    names += [name[len("opt_"):].replace("_", "-") for name in dir(options) if name.startswith("opt_")]
    return sorted(set(names) - {"help", "version"})


@pytest.mark.parametrize("key", _keys())
def test_every_config_key_is_documented(key):
    assert f"`{key}`" in REFERENCE


@pytest.mark.parametrize("key", config._TCP_ROUTE_KEYS)
def test_every_tcp_route_key_is_documented(key):
    assert f"`{key}`" in REFERENCE


@pytest.mark.parametrize("flag", _flags())
def test_every_flag_is_documented(flag):
    assert f"--{flag}" in REFERENCE


class _Answer:
    """Just what the gateway's own answers set on a request."""

    def __init__(self) -> None:
        self.headers: dict[bytes, bytes] = {}

    def setResponseCode(self, code: int) -> None:
        self.code = code

    def setHeader(self, name: bytes, value: bytes) -> None:
        self.headers[name] = value


@pytest.mark.parametrize("why", ["no route for this host", "no route for this path"])
def test_the_documented_404_bodies_are_the_real_ones(why):
    from mtlsgate.proxy.exchange import _plain

    body = _plain(_Answer(), 404, why).decode().strip()  # type: ignore[arg-type]
    assert f"`{body}`" in REFERENCE
