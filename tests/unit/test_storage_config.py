"""The storage keys (docs/cluster.md): a bad one names itself; a password never comes from the URL."""

from __future__ import annotations

import pytest

from mtlsgate.cluster.seal import new_key_text
from mtlsgate.cluster.url import parse_storage_url
from mtlsgate.config.load import config_from_mapping
from mtlsgate.config.model import ConfigError


@pytest.fixture
def base(tmp_path, pki):
    key = tmp_path / "storage.key"
    key.write_text(new_key_text())
    return {"certs_dir": str(tmp_path), "storage": "redis://10.0.0.5:6379/2", "storage_key_file": str(key),
            "certificates": [{"cert": pki["gateway"][0], "key": pki["gateway"][1]}]}  # fmt: skip


def test_a_complete_storage_section(base, tmp_path):
    (tmp_path / "pw").write_text("secret\n")
    config = config_from_mapping({**base, "certs_dir": str(tmp_path / "certs"), "storage": "rediss://gw@redis.internal:6380/1",
                                  "storage_password_file": str(tmp_path / "pw"),
                                  "storage_lease": "10s", "storage_sync_interval": "5s"})  # fmt: skip
    storage = config.storage
    assert storage is not None and storage.username == "gw" and storage.lease == 10 and storage.sync_interval == 5
    assert config.certs_dir == str(tmp_path / "certs")  # made later, by the node: need not exist yet


@pytest.mark.parametrize(
    "change,key,problem",
    [
        ({"storage": "redis://:pw@h:6379/0"}, "storage", "password in the URL is refused"),
        ({"storage": "memcached://h"}, "storage", "expected redis://"),
        ({"storage": "redis://h:6379/zero"}, "storage", "the database must be a number"),
        ({"storage_key_file": None}, "storage_key_file", "is required"),
        ({"storage_password_env": "A", "storage_password_file": "KEYFILE"}, "storage_password_env", "not both"),
        ({"storage_password_env": "MTLSGATE_TEST_UNSET_VARIABLE"}, "storage_password_env", "is not set or empty"),
        ({"storage_password_file": "EMPTYFILE"}, "storage_password_file", "the first line (the password) is empty"),
        ({"storage_tls": {"ca_file": "KEYFILE"}}, "storage_tls", "is for rediss://"),
        ({"storage_tls": {"verify": True}, "storage": "rediss://h"}, "storage_tls.verify", "unknown key"),
        ({"storage_lease": "500ms"}, "storage_lease", "at least 1s"),
        ({"certs_dir": None}, "certs_dir", "is required with storage"),
        ({"storage": None}, "storage_key_file", "needs storage"),
    ],
)
def test_a_bad_storage_setting_names_its_key(base, change, key, problem, tmp_path):
    (tmp_path / "empty").write_text("\n")
    files = {"KEYFILE": base["storage_key_file"], "EMPTYFILE": str(tmp_path / "empty")}
    data = {**base, **{k: files.get(v, v) if isinstance(v, str) else v for k, v in change.items()}}
    data = {k: v for k, v in data.items() if v is not None}
    with pytest.raises(ConfigError) as caught:
        config_from_mapping(data)
    assert str(caught.value).startswith(f"{key}: ") and problem in str(caught.value)


def test_a_key_file_that_is_not_32_bytes_is_refused(base, tmp_path):
    (tmp_path / "short.key").write_text("c2hvcnQ=\n")
    with pytest.raises(ConfigError, match="storage_key_file: .*32 random bytes"):
        config_from_mapping({**base, "storage_key_file": str(tmp_path / "short.key")})


def test_the_url_as_shown_never_holds_a_password():
    assert parse_storage_url("rediss://gw@[::1]:7000/3").display() == "rediss://gw@[::1]:7000/3"
    assert parse_storage_url("redis://h").display() == "redis://h:6379/0"
