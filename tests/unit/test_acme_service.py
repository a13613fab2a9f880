"""The issuing service's scheduling, on a Clock: coalesced orders, back-off after failures, next wake-up."""

from __future__ import annotations

import time

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent

from mtlsgate.acme.client import ACMEError
from mtlsgate.acme.service import AcmeIssuingService, renewal_due
from mtlsgate.acme.store import DirectoryStore
from mtlsgate.config.model import Autocert


class EmptyStore:
    def get(self, name):
        return None

    def store(self, name, key, chain):
        raise AssertionError("nothing is issued here")

    def account_key(self):
        raise AssertionError("no client is made here")


class ScriptedService(AcmeIssuingService):
    """Orders wait on Deferreds the test fires: no CA involved."""

    def __init__(self, clock, **settings):
        defaults = {"directory": "https://ca.test/dir", "domains": (("a.example.com",),), "retry_interval": 60.0, "check_interval": 3600.0}
        super().__init__(clock, Autocert(**{**defaults, **settings}), EmptyStore(), [], installed=lambda: None)
        self.orders: list[defer.Deferred[None]] = []

    async def _order(self, names):
        d: defer.Deferred[None] = defer.Deferred()
        self.orders.append(d)
        await d


def test_concurrent_issues_of_one_certificate_share_one_order():
    service = ScriptedService(Clock())
    first, second = service.issue(["a.example.com"]), service.issue(["a.example.com"])
    assert len(service.orders) == 1
    service.orders[0].callback(None)
    assert first.called and second.called


def test_a_failure_backs_off_and_the_next_check_waits_for_it():
    clock = Clock()
    service = ScriptedService(clock)
    service.startService()
    clock.advance(0)  # the start-up check orders at once
    assert len(service.orders) == 1
    service.orders[0].errback(ACMEError("urn:ietf:params:acme:error:rateLimited: too many"))
    retry_in = service._retry_at["a.example.com"] - clock.seconds()
    assert 45 <= retry_in <= 75
    clock.advance(retry_in - 1)
    assert len(service.orders) == 1  # not before the back-off is over
    clock.advance(1)
    assert len(service.orders) == 2
    service.orders[1].errback(ACMEError("again"))
    assert 90 <= service._retry_at["a.example.com"] - clock.seconds() <= 150  # doubled
    service.stopService()
    assert not clock.getDelayedCalls()


def test_success_clears_the_back_off():
    clock = Clock()
    service = ScriptedService(clock)
    service.startService()
    clock.advance(0)
    service.orders[0].errback(ACMEError("once"))
    clock.advance(service._retry_at["a.example.com"] - clock.seconds())
    service.orders[1].callback(None)
    assert "a.example.com" not in service._retry_at
    service.stopService()


class IssuingService(AcmeIssuingService):
    """Certificates from a local CA instead of an ACME order (counted); storing and installing are the service's own."""

    def __init__(self, clock, store, ca, installed):
        settings = Autocert(directory="https://ca.test/dir", domains=(("a.example.com",),), retry_interval=60.0, check_interval=3600.0)
        super().__init__(clock, settings, store, [], installed=lambda: installed.append(store.get("a.example.com")))
        self.ca = ca
        self.obtained: list = []

    async def _obtain(self, names):
        issued = self.ca.issue_server(list(names))
        self.obtained.append(issued.certificate)
        return issued.key, [issued.certificate]

    async def _renewal_time(self, leaf):
        return renewal_due(leaf, None)


def test_a_certificate_the_store_cannot_write_is_logged_and_stored_at_the_next_try_without_a_new_order(tmp_path, pki):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the certificate directory's parent should be")
    clock = Clock()
    clock.advance(time.time())
    installed: list = []
    store = DirectoryStore(str(blocked / "certs"))
    service = IssuingService(clock, store, pki["ca_obj"], installed)
    with capturedLogs() as events:
        service.startService()
        clock.advance(0)
    assert len(service.obtained) == 1 and installed == []  # nothing half-stored was installed
    [error] = [formatEvent(e) for e in events if e["log_level"] == LogLevel.error]
    assert error.startswith("certificate for a.example.com issued but not stored (attempt 1): ")
    assert f"{blocked / 'certs'}: cannot make the certificate directory (Not a directory)" in error and "retrying in" in error
    retry_in = service._retry_at["a.example.com"] - clock.seconds()
    assert 45 <= retry_in <= 75  # the usual back-off

    blocked.unlink()  # room again
    with capturedLogs() as events:
        clock.advance(retry_in)
    assert len(service.obtained) == 1  # the certificate already issued was stored: no second order at the CA
    assert [stored[1][0] for stored in installed] == service.obtained
    assert any("issued earlier, without a new order" in formatEvent(e) for e in events)
    assert "a.example.com" not in service._retry_at
    service.stopService()
    assert not clock.getDelayedCalls()


def test_an_attempt_that_fails_without_waiting_is_reported_once_without_a_traceback(tmp_path, pki):
    """A store that refuses at once (no CA round trip: the certificate issued earlier) ends the attempt before issue() returns."""
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the certificate directory's parent should be")
    clock = Clock()
    clock.advance(time.time())
    service = IssuingService(clock, DirectoryStore(str(blocked / "certs")), pki["ca_obj"], [])
    with capturedLogs() as events:
        service.startService()
        clock.advance(0)
        clock.advance(service._retry_at["a.example.com"] - clock.seconds())
    texts = [formatEvent(e) for e in events]
    assert [t.split(":")[0] for t in texts if "not stored" in t] == [
        "certificate for a.example.com issued but not stored (attempt 1)", "certificate for a.example.com issued but not stored (attempt 2)",
    ]  # fmt: skip
    assert not [e for e in events if e.get("log_failure") is not None], texts  # no "autocert check failed" with a KeyError
    failed = service.issue(["a.example.com"])  # a direct caller gets the failure as a Deferred, not an exception
    assert failed.called and not service._in_flight
    failed.addErrback(lambda f: None)
    service.stopService()
