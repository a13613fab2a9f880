"""The issuance lock against a real redis-server: two contenders, expiry and takeover, fencing, release by the holder only."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from tests.cluster.test_store import shared_store, storage_for

pytestmark = pytest.mark.needs("redis-server")


def lock_for(store, lease: float):
    from mtlsgate.cluster.lock import LeaseLock

    return LeaseLock(reactor, store.client, lease)


@pytest_twisted.ensureDeferred
async def test_of_two_contenders_exactly_one_holds_the_lock(redis_server, tmp_path):
    from twisted.internet import defer

    server = redis_server()
    storage = storage_for(server, tmp_path)
    stores = [shared_store(storage, f"n{i}") for i in range(5)]
    results = await defer.gatherResults([defer.Deferred.fromCoroutine(lock_for(s, 10).acquire("a.test")) for s in stores])
    held = [r for r in results if r is not None]
    assert len(held) == 1
    await held[0].release()
    assert await lock_for(stores[1], 10).acquire("a.test") is not None
    for s in stores:
        await s.client.close()


@pytest_twisted.ensureDeferred
async def test_a_dead_holders_lock_lapses_and_another_takes_over(redis_server, tmp_path):
    server = redis_server()
    storage = storage_for(server, tmp_path)
    a, b = shared_store(storage, "a"), shared_store(storage, "b")
    lease = await lock_for(a, 1).acquire("a.test")
    lease._renewing.stop()  # the holder "dies": nobody renews
    assert await lock_for(b, 1).acquire("a.test") is None
    taken = None
    for _ in range(50):
        taken = await lock_for(b, 1).acquire("a.test")
        if taken is not None:
            break
        await deferLater(reactor, 0.1, lambda: None)
    assert taken is not None
    # the old holder can neither renew, nor release the new holder's lock, nor write the certificate
    assert not await lease.renew() and lease.lost
    assert not await lease.release()
    assert server.command("GET", "mtlsgate:lock:a.test").endswith(taken.token.encode() + b"\r\n")
    await taken.release()
    await a.client.close()
    await b.client.close()


@pytest_twisted.ensureDeferred
async def test_a_holder_keeps_the_lock_past_its_lease_by_renewing(redis_server, tmp_path):
    server = redis_server()
    storage = storage_for(server, tmp_path)
    a, b = shared_store(storage, "a"), shared_store(storage, "b")
    lease = await lock_for(a, 1).acquire("a.test")
    await deferLater(reactor, 2.5, lambda: None)  # more than two leases: only renewal keeps it
    assert await lock_for(b, 1).acquire("a.test") is None
    assert not lease.lost
    assert await lease.release()
    await a.client.close()
    await b.client.close()


@pytest_twisted.ensureDeferred
async def test_fencing_a_stalled_holder_cannot_write_after_losing_the_lock(redis_server, tmp_path, pki):
    server = redis_server()
    storage = storage_for(server, tmp_path)
    a, b = shared_store(storage, "a"), shared_store(storage, "b")
    stalled = await lock_for(a, 1).acquire("a.test")
    stalled._renewing.stop()
    await deferLater(reactor, 1.3, lambda: None)
    current = await lock_for(b, 10).acquire("a.test")
    assert current is not None
    issued = pki["gateway_obj"]
    assert not await a.put_certificate("a.test", issued.key, [issued.certificate], stalled.token)
    assert await a.get_certificate("a.test") is None
    assert await b.put_certificate("a.test", issued.key, [issued.certificate], current.token)
    await current.release()
    await a.client.close()
    await b.client.close()
