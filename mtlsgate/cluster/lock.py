"""
The issuance lock: one order per name across the cluster.

A lease (C{SET key token NX PX lease}) with a random token; the holder renews it while its order
runs, and only the holder can renew or release it (compare-and-expire, compare-and-delete, in Lua).
A node that dies holding it loses it when the lease runs out, and another takes over.  The lease
alone cannot stop a node that stalled past it from writing late, so the certificate write itself is
fenced: it happens only if the lock still holds this node's token, atomically
(L{mtlsgate.cluster.shared.SharedStore.put_certificate}).
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer, task
from twisted.logger import Logger

from mtlsgate.cluster.connection import RedisClient, StoreUnavailable
from mtlsgate.cluster.shared import lock_key

log = Logger(namespace="mtlsgate.cluster")

_RENEW = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end"
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end"


class Lease:
    """A held lock: renewed every third of the lease until L{release}; C{lost} once a renewal finds another holder."""

    def __init__(self, reactor: Any, client: RedisClient, name: str, token: str, lease: float) -> None:
        self.reactor = reactor
        self.client = client
        self.name = name
        self.token = token
        self.lease = lease
        self.lost = False
        self._renewing = task.LoopingCall(self._renew)
        self._renewing.clock = reactor

    def start_renewing(self) -> None:
        self._renewing.start(self.lease / 3, now=False).addErrback(lambda f: log.failure("renewing the issuance lock", f))

    async def renew(self) -> bool:
        """Extend the lease; False (and C{lost}) if this node no longer holds it."""
        held = bool(await self.client.call("eval", _RENEW, [lock_key(self.name)], [self.token, str(int(self.lease * 1000))]))
        if not held and not self.lost:
            self.lost = True
            log.warn("lost the issuance lock for {name}: the lease ran out and another node may be ordering", name=self.name)
        return held

    def _renew(self) -> defer.Deferred[Any]:
        d = defer.Deferred.fromCoroutine(self.renew())
        d.addErrback(lambda f: log.warn("could not renew the issuance lock for {name}: {error}", name=self.name, error=f.getErrorMessage()))
        return d

    async def release(self) -> bool:
        """Give the lock up if still ours (never someone else's); False if it was not."""
        if self._renewing.running:
            self._renewing.stop()
        try:
            return bool(await self.client.call("eval", _RELEASE, [lock_key(self.name)], [self.token]))
        except StoreUnavailable as e:
            log.warn("could not release the issuance lock for {name} ({error}); it lapses after {lease:.0f}s", name=self.name, error=str(e), lease=self.lease)
            return False


class LeaseLock:
    """Acquires leases on names, for C{lease} seconds each."""

    def __init__(self, reactor: Any, client: RedisClient, lease: float) -> None:
        self.reactor = reactor
        self.client = client
        self.lease = lease

    async def acquire(self, name: str) -> Lease | None:
        """The lease on C{name}, renewing itself; None if another node holds it. L{StoreUnavailable} if Redis does not answer."""
        token = os.urandom(16).hex()
        got = await self.client.call("set", lock_key(name), token, None, int(self.lease * 1000), True)
        if not got:
            return None
        lease = Lease(self.reactor, self.client, name, token, self.lease)
        lease.start_renewing()
        return lease

    async def holder_ttl(self, name: str) -> float | None:
        """Seconds left on another holder's lease (None: nobody holds it)."""
        ms = await self.client.call("pttl", lock_key(name))
        return None if ms is None or ms < 0 else ms / 1000.0
