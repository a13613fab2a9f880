"""The shared store against a real redis-server: certificates and keys sealed at rest, the account, CRLs, challenges."""

from __future__ import annotations

import base64

import pytest
import pytest_twisted
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from mtlsgate.cluster.seal import SealError, Sealer, new_key_text, read_key_file
from mtlsgate.config.model import Storage

pytestmark = pytest.mark.needs("redis-server")


def storage_for(server, tmp_path, **more) -> Storage:
    key_file = tmp_path / "storage.key"
    if not key_file.exists():
        key_file.write_text(new_key_text())
    return Storage(url=server.url, key_file=str(key_file), timeout=2.0, **more)


def shared_store(storage: Storage, node: str = "node-a"):
    from twisted.internet import reactor

    from mtlsgate.cluster.connection import RedisClient
    from mtlsgate.cluster.shared import SharedStore

    return SharedStore(RedisClient(reactor, storage), Sealer.from_file(storage.key_file), node)


def test_sealing_is_bound_to_key_and_place(tmp_path):
    one, other = Sealer(b"\x01" * 32), Sealer(b"\x02" * 32)
    sealed = one.seal(b"secret", b"mtlsgate:cert:a")
    assert one.open(sealed, b"mtlsgate:cert:a") == b"secret"
    with pytest.raises(SealError):
        other.open(sealed, b"mtlsgate:cert:a")
    with pytest.raises(SealError):  # moved to another name
        one.open(sealed, b"mtlsgate:cert:b")
    raw = bytearray(base64.b64decode(sealed))
    raw[-1] ^= 1
    with pytest.raises(SealError):
        one.open(base64.b64encode(bytes(raw)).decode(), b"mtlsgate:cert:a")
    bad = tmp_path / "bad.key"
    bad.write_text("c2hvcnQ=\n")
    with pytest.raises(SealError, match="32 random bytes"):
        read_key_file(str(bad))


@pytest_twisted.ensureDeferred
async def test_a_certificate_round_trips_and_a_dump_discloses_no_key(redis_server, tmp_path, pki):
    from mtlsgate.cluster.lock import LeaseLock

    server = redis_server()
    storage = storage_for(server, tmp_path)
    store = shared_store(storage)
    issued = pki["gateway_obj"]
    lease = await LeaseLock(store.client.reactor, store.client, 10).acquire("gate.example.test")
    assert await store.put_certificate("gate.example.test", issued.key, [issued.certificate], lease.token)
    await lease.release()
    key, chain = await store.get_certificate("gate.example.test")
    assert chain == [issued.certificate]
    assert key.private_bytes(Encoding.DER, PrivateFormat.PKCS8, NoEncryption()) == issued.key.private_bytes(Encoding.DER, PrivateFormat.PKCS8, NoEncryption())
    assert await store.certificate_names() == ["gate.example.test"]
    raw = server.command("GET", "mtlsgate:cert:gate.example.test")
    der = issued.key.private_bytes(Encoding.DER, PrivateFormat.PKCS8, NoEncryption())
    assert b"PRIVATE KEY" not in raw and der not in raw and base64.b64encode(der)[:40] not in raw
    # another storage key (a dump taken elsewhere) does not open it
    (tmp_path / "other.key").write_text(new_key_text())
    thief = shared_store(Storage(url=server.url, key_file=str(tmp_path / "other.key"), timeout=2.0))
    with pytest.raises(SealError):
        await thief.get_certificate("gate.example.test")
    await store.client.close()
    await thief.client.close()


@pytest_twisted.ensureDeferred
async def test_every_node_gets_the_same_account_key(redis_server, tmp_path):
    server = redis_server()
    storage = storage_for(server, tmp_path)
    a, b = shared_store(storage, "a"), shared_store(storage, "b")
    key_a = await a.account_key(None)
    key_b = await b.account_key(None)
    assert key_a.private_numbers() == key_b.private_numbers()
    assert b"PRIVATE KEY" not in server.command("GET", "mtlsgate:account")
    await a.client.close()
    await b.client.close()


@pytest_twisted.ensureDeferred
async def test_redis_down_is_reported_within_the_deadline(redis_server, tmp_path):
    from mtlsgate.cluster.connection import StoreUnavailable

    server = redis_server()
    store = shared_store(storage_for(server, tmp_path))
    assert await store.certificate_names() == []
    server.stop()
    with pytest.raises(StoreUnavailable):
        await store.certificate_names()
    server.start()
    names = None
    for _ in range(100):  # txredisapi reconnects on its own, with back-off
        try:
            names = await store.certificate_names()
            break
        except StoreUnavailable:
            from twisted.internet import reactor
            from twisted.internet.task import deferLater

            await deferLater(reactor, 0.2, lambda: None)
    assert names == []
    await store.client.close()
