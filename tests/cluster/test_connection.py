"""Connecting to Redis as a deployment would: rediss:// with a client certificate, a password from a file or the environment."""

from __future__ import annotations

import pytest
import pytest_twisted

from mtlsgate.cluster.seal import new_key_text
from mtlsgate.config.model import Storage
from tests.cluster.test_store import shared_store

pytestmark = pytest.mark.needs("redis-server")


def tls_files(pki) -> dict[str, str]:
    return {"cert": pki["gateway"][0], "key": pki["gateway"][1], "ca": pki["ca"],
            "client_cert": pki["gateway_client"][0], "client_key": pki["gateway_client"][1]}  # fmt: skip


def key_file(tmp_path) -> str:
    path = tmp_path / "storage.key"
    path.write_text(new_key_text())
    return str(path)


@pytest_twisted.ensureDeferred
async def test_rediss_with_a_client_certificate_and_a_password_file(redis_server, tmp_path, pki):
    server = redis_server(password="s3cret", tls=tls_files(pki))
    (tmp_path / "password").write_text("s3cret\n")
    storage = Storage(url=server.url, key_file=key_file(tmp_path), password_file=str(tmp_path / "password"), ca_file=pki["ca"],
                      cert=pki["gateway_client"][0], key=pki["gateway_client"][1], timeout=3.0)  # fmt: skip
    store = shared_store(storage)
    account = await store.account_key(None)
    assert account is not None
    assert b"mtlsgate:account" in server.command("KEYS", "*")
    await store.client.close()


@pytest_twisted.ensureDeferred
async def test_rediss_without_a_client_certificate_is_unavailable_not_a_hang(redis_server, tmp_path, pki):
    from mtlsgate.cluster.connection import StoreUnavailable

    server = redis_server(tls=tls_files(pki))
    store = shared_store(Storage(url=server.url, key_file=key_file(tmp_path), ca_file=pki["ca"], timeout=2.0))
    with pytest.raises(StoreUnavailable):
        await store.certificate_names()
    await store.client.close()


@pytest_twisted.ensureDeferred
async def test_a_password_from_the_environment(redis_server, tmp_path, monkeypatch):
    from mtlsgate.cluster.connection import StoreUnavailable

    server = redis_server(password="from-env")
    monkeypatch.setenv("MTLSGATE_TEST_REDIS_PASSWORD", "from-env")
    store = shared_store(Storage(url=server.url, key_file=key_file(tmp_path), password_env="MTLSGATE_TEST_REDIS_PASSWORD", timeout=2.0))
    assert await store.certificate_names() == []
    await store.client.close()
    wrong = shared_store(Storage(url=server.url, key_file=key_file(tmp_path), timeout=2.0))  # no password: refused, reported in time
    with pytest.raises(StoreUnavailable):
        await wrong.certificate_names()
    await wrong.client.close()
