"""
C{address: unix:...}: the gateway's client identity, X-Forwarded-For, access log and affinity all
assume an IP peer, and a UNIX-socket listener used to start and answer every request with 500.  It
is refused before anything listens, in one line naming the key.
"""

from __future__ import annotations

import pytest

from mtlsgate.config.load import config_from_mapping
from mtlsgate.config.model import ConfigError
from tests.conftest import run_python_twistd_check


@pytest.mark.parametrize("address", ["unix:/run/mtlsgate.sock", "unix:address=/tmp/gw.sock:mode=660"])
def test_a_unix_socket_address_is_a_config_error_naming_the_key(pki, address):
    with pytest.raises(ConfigError) as e:
        config_from_mapping({"address": address, "certificates": [{"cert": pki["gateway"][0], "key": pki["gateway"][1]}]})
    assert e.value.key == "address"
    assert "unix" in e.value.problem


def test_twistd_refuses_to_start_on_a_unix_socket(pki, tmp_path):
    result = run_python_twistd_check(
        ["--https", f"unix:{tmp_path / 'gw.sock'}", "--cert", pki["gateway"][0], "--key", pki["gateway"][1],
         "--client-ca", pki["ca"], "--route", "localhost=https://127.0.0.1:9"],
        tmp_path,
    )  # fmt: skip
    assert result.returncode != 0
    lines = [line for line in (result.stdout + result.stderr).splitlines() if "unix" in line and "address" in line]
    assert len(lines) == 1, result.stdout + result.stderr
    assert not (tmp_path / "gw.sock").exists()
