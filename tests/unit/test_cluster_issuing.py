"""
The issuing service with a shared store (a cluster), on a Clock: it orders only under the lease,
waits (not failing) while another gateway holds it, writes fenced, and keeps a certificate the store
could not take for the next try instead of ordering again.
"""

from __future__ import annotations

import time

from twisted.internet import defer
from twisted.internet.task import Clock
from zope.interface import implementer

from mtlsgate.acme.service import AcmeIssuingService, renewal_due
from mtlsgate.acme.store import ICertificateStore, IIssuanceLock, LeaseLost
from mtlsgate.config.model import Autocert

NAME = "a.example.com"


@implementer(ICertificateStore, IIssuanceLock)
class SharedFake:
    """One shared store, as every node sees it (no Redis): a lease holder, certificates, a switch to lose the lease or fail a write."""

    def __init__(self) -> None:
        self.certificates: dict = {}
        self.holder: object | None = None
        self.lose_lease = False
        self.fail_writes = 0
        self.prepared = 0

    def get(self, name):
        return self.certificates.get(name)

    def store(self, name, key, chain):
        if self.lose_lease:
            raise LeaseLost("the issuance lease for a.example.com was lost")
        if self.fail_writes:
            self.fail_writes -= 1
            return defer.fail(ConnectionError("shared store unavailable"))
        self.certificates[name] = (key, chain)
        return defer.succeed(None)

    def account_key(self):
        raise AssertionError("no client is made here")

    def prepare(self):
        self.prepared += 1
        return defer.succeed(None)

    def acquire(self, name):
        if self.holder is not None:
            return defer.succeed(None)
        store = self

        class Lease:
            def release(self):
                store.holder = None
                return defer.succeed(None)

        self.holder = Lease()
        return defer.succeed(self.holder)

    def wait_for_other(self):
        return 5.0


class Node(AcmeIssuingService):
    def __init__(self, clock, store, ca):
        settings = Autocert(directory="https://ca.test/dir", domains=((NAME,),), retry_interval=60.0, check_interval=3600.0)
        super().__init__(clock, settings, store, [], installed=lambda: None)
        self.ca = ca
        self.obtained: list = []

    async def _obtain(self, names):
        issued = self.ca.issue_server(list(names))
        self.obtained.append(issued.certificate)
        return issued.key, [issued.certificate]

    async def _renewal_time(self, leaf):
        return renewal_due(leaf, None)


def clock_now() -> Clock:
    clock = Clock()
    clock.advance(time.time())
    return clock


def test_a_node_waits_while_another_holds_the_lease_without_counting_a_failure(pki):
    clock = clock_now()
    shared = SharedFake()
    shared.holder = object()  # another gateway is ordering
    node = Node(clock, shared, pki["ca_obj"])
    node.startService()
    clock.advance(0)
    assert node.obtained == [] and NAME not in node._failures
    assert node._retry_at[NAME] - clock.seconds() == 5.0
    issued = pki["ca_obj"].issue_server([NAME])  # the other gateway's certificate arrives
    shared.certificates[NAME] = (issued.key, [issued.certificate])
    shared.holder = None
    clock.advance(5)
    assert node.obtained == []  # nothing left to order
    node.stopService()


def test_of_two_nodes_one_orders_and_the_other_takes_its_certificate(pki):
    clock = clock_now()
    shared = SharedFake()
    a, b = Node(clock, shared, pki["ca_obj"]), Node(clock, shared, pki["ca_obj"])
    gate: defer.Deferred[None] = defer.Deferred()
    obtain = a._obtain

    async def slow_obtain(names):
        await gate  # a's order is under way while b looks
        return await obtain(names)

    a._obtain = slow_obtain  # type: ignore[method-assign]
    a.startService()
    b.startService()
    clock.advance(0)
    assert b.obtained == [] and NAME in b._retry_at
    gate.callback(None)
    assert len(a.obtained) == 1 and NAME in shared.certificates
    clock.advance(5)
    assert b.obtained == [] and shared.holder is None
    a.stopService()
    b.stopService()


def test_a_lost_lease_drops_the_certificate_instead_of_keeping_it_for_later(pki):
    clock = clock_now()
    shared = SharedFake()
    shared.lose_lease = True
    node = Node(clock, shared, pki["ca_obj"])
    node.startService()
    clock.advance(0)
    assert len(node.obtained) == 1 and NAME not in shared.certificates
    assert node._unstored == {} and shared.holder is None  # released; the other gateway's order stands
    node.stopService()


def test_a_write_the_store_refused_is_retried_under_a_new_lease_without_a_new_order(pki):
    clock = clock_now()
    shared = SharedFake()
    shared.fail_writes = 1  # Redis went away just as the certificate came
    node = Node(clock, shared, pki["ca_obj"])
    node.startService()
    clock.advance(0)
    assert len(node.obtained) == 1 and NAME in node._unstored and shared.holder is None
    clock.advance(node._retry_at[NAME] - clock.seconds())
    assert len(node.obtained) == 1 and NAME in shared.certificates  # stored now, ordered once
    node.stopService()
