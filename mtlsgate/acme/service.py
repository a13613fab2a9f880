"""
The issuing service (txacme's C{AcmeIssuingService}, for ACMEv2): at start and on a timer it orders
what is missing from the store and renews what is due, then asks the gateway to swap the new
certificates in.  A failure backs off per certificate, exponentially with jitter, and never touches
what is being served.
"""

from __future__ import annotations

import random
from datetime import datetime, timezone
from typing import Any, Callable, Sequence

from acme import messages
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool

from mtlsgate.acme.client import (
    ACMEClient, ACMEError, ari_certificate_id, challenge_token, challenge_type, dns01_txt_value, http_client, renewal_time_in,
)  # fmt: skip
from mtlsgate.acme.responders import DNSHookError, IResponder
from mtlsgate.acme.store import ICertificateStore, IIssuanceLock, LeaseLost
from mtlsgate.config.model import Autocert
from mtlsgate.observe.metrics import GatewayMetrics, NoMetrics
from mtlsgate.reactors import IReactorTimeAndTCP

log = Logger(namespace="mtlsgate.acme")

DEFAULT_RENEW_BEFORE = 30 * 86400.0
MAX_BACKOFF = 86400.0


class OrderedElsewhere(Exception):
    """Another gateway of the cluster holds the issuance lease for this name; its result is awaited, not duplicated."""


class NotStored(Exception):
    """The CA issued a certificate but the store could not keep it (a full disk); it is kept for the next try."""


def renewal_due(certificate: x509.Certificate, renew_before: float | None) -> datetime:
    """
    When to renew: C{renew_before} ahead of expiry; by default 30 days ahead, or a third of the
    lifetime ahead for certificates that live less than 90 days (Let's Encrypt's short-lived ones).
    """
    not_before = certificate.not_valid_before_utc
    not_after = certificate.not_valid_after_utc
    if renew_before is None:
        lifetime = (not_after - not_before).total_seconds()
        renew_before = min(DEFAULT_RENEW_BEFORE, lifetime / 3)
    return datetime.fromtimestamp(not_after.timestamp() - renew_before, tz=timezone.utc)


def backoff(failures: int, first: float, rng: Callable[[float, float], float] = random.uniform) -> float:
    """C{first}, doubling per failure up to a day, with +/-25% jitter so that many gateways spread out."""
    base = min(MAX_BACKOFF, first * 2 ** max(0, failures - 1))
    return base * rng(0.75, 1.25)


def make_csr(key: Any, names: Sequence[str]) -> x509.CertificateSigningRequest:
    builder = x509.CertificateSigningRequestBuilder().add_extension(
        x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
    )
    if len(names[0]) <= 64:
        builder = builder.subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
    return builder.sign(key, hashes.SHA256())


def new_certificate_key(key_type: str) -> Any:
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


class AcmeIssuingService(Service):
    """
    @param installed: called after a certificate is stored, to swap it into the TLS listener.
    @param client_factory: makes the (unregistered) L{ACMEClient}; the default talks to
        C{settings.directory} trusting C{settings.ca_file}.
    """

    def __init__(
        self, reactor: IReactorTimeAndTCP, settings: Autocert, store: ICertificateStore, responders: Sequence[IResponder],
        installed: Callable[[], None], client_factory: Callable[[], ACMEClient] | None = None,
        metrics: GatewayMetrics | NoMetrics | None = None,
    ) -> None:  # fmt: skip
        self.reactor = reactor
        self.metrics = metrics or GatewayMetrics()
        self.settings = settings
        self.store = store
        self.responders = {r.challenge_type: r for r in responders}
        self.installed = installed
        self._client_factory = client_factory or self._default_client
        self._client: ACMEClient | None = None
        self._pool: HTTPConnectionPool | None = None
        self._in_flight: dict[str, defer.Deferred[None]] = {}
        self._failures: dict[str, int] = {}
        self._retry_at: dict[str, float] = {}
        self._renew_at: dict[tuple[str, int], datetime] = {}  # (name, serial) -> when, fixed once chosen
        self._unstored: dict[str, tuple[Any, list[x509.Certificate]]] = {}  # issued, but the store refused it
        self._timer: Any = None
        self._checking: defer.Deferred[None] | None = None

    # --- life cycle -----------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        for group in self.settings.domains:
            stored = self.store.get(group[0])
            if stored is not None:
                leaf = stored[1][0]
                log.info("stored certificate for {names} valid until {until}", names=", ".join(group), until=leaf.not_valid_after_utc.isoformat())
        self._schedule(0)

    def stopService(self) -> Any:
        super().stopService()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        for d in list(self._in_flight.values()):
            d.cancel()
        if self._pool is not None:
            return self._pool.closeCachedConnections()
        return None

    def _schedule(self, delay: float) -> None:
        if not self.running:
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = self.reactor.callLater(max(0.0, delay), self.check)

    # --- the check ------------------------------------------------------------------------------

    def check(self) -> defer.Deferred[None]:
        """Issue or renew every certificate that needs it now; then schedule the next check."""
        if self._checking is None:
            self._checking = defer.Deferred.fromCoroutine(self._check())
            self._checking.addBoth(self._checked)
        return self._checking

    def _checked(self, result: Any) -> None:
        self._checking = None
        if isinstance(result, Failure) and not result.check(defer.CancelledError):
            log.failure("autocert check failed", result)
        self._schedule(self._next_wake())

    async def _check(self) -> None:
        if IIssuanceLock.providedBy(self.store):
            try:
                await _maybe(self.store.prepare())
            except Exception as e:  # noqa: BLE001 - the local copy carries on; ordering waits for the store
                log.warn("shared store: {error}; working from the local copy", error=str(e))
        waits = []
        for group in self.settings.domains:
            if self._retry_at.get(group[0], 0) > self.reactor.seconds():
                continue
            if await self._needs_certificate(group):
                waits.append(self.issue(group))
        for d in waits:
            try:
                await d
            except Exception:  # reported by issue(); the others go on
                pass

    def _next_wake(self) -> float:
        now = self.reactor.seconds()
        wake = self.settings.check_interval
        for group in self.settings.domains:
            name = group[0]
            if name in self._retry_at:
                wake = min(wake, self._retry_at[name] - now)
                continue
            stored = self.store.get(name)
            if stored is not None:
                when = self._renew_at.get((name, stored[1][0].serial_number)) or renewal_due(stored[1][0], self.settings.renew_before)
                wake = min(wake, when.timestamp() - now)
        return max(1.0, wake)

    async def _needs_certificate(self, group: tuple[str, ...]) -> bool:
        stored = self.store.get(group[0])
        if stored is None:
            return True
        leaf = stored[1][0]
        if set(_names_of(leaf)) != set(group):
            log.info("stored certificate for {name} covers other names; ordering a new one", name=group[0])
            return True
        key = (group[0], leaf.serial_number)
        if key not in self._renew_at:
            self._renew_at[key] = await self._renewal_time(leaf)
        return self._renew_at[key].timestamp() <= self.reactor.seconds()

    async def _renewal_time(self, leaf: x509.Certificate) -> datetime:
        """ARI's suggested window when the CA offers one (RFC 9773), else the configured rule."""
        try:
            client = await self._registered_client()
            window = await client.renewal_info(leaf)
        except Exception as e:  # noqa: BLE001 - ARI is advice; the configured rule stands without it
            log.info("no renewal information from the CA ({error}); renewing by the configured rule", error=str(e))
            window = None
        if window is not None:
            when = renewal_time_in(window)
            log.info("CA suggests renewing between {start} and {end}; chose {when}",
                     start=window[0].isoformat(), end=window[1].isoformat(), when=when.isoformat())
            return when
        return renewal_due(leaf, self.settings.renew_before)

    # --- issuing --------------------------------------------------------------------------------

    def issue(self, names: Sequence[str]) -> defer.Deferred[None]:
        """Order, validate, finalize, store and install a certificate for C{names} (coalesced per name)."""
        name = names[0]
        d = self._in_flight.get(name)
        if d is None:
            d = self._in_flight[name] = defer.Deferred.fromCoroutine(self._issue(tuple(names)))

            def done(result: Any) -> Any:
                del self._in_flight[name]
                return result

            d.addBoth(done)  # at once if the attempt already ended (a store that fails without a wait): d is kept here
        return _chained(d)

    def _default_client(self) -> ACMEClient:
        if self._pool is None:
            self._pool = HTTPConnectionPool(self.reactor, persistent=True)
            self._pool.retryAutomatically = False
        http = http_client(self.reactor, self.settings.ca_file, self._pool)
        return ACMEClient(self.reactor, http, self.settings.directory, self.store.account_key())

    async def _registered_client(self) -> ACMEClient:
        if self._client is None or self._client.account_url is None:
            client = self._client_factory()
            url = await client.register(self.settings.email, self.settings.eab)
            log.info("ACME account {url} at {directory}", url=url, directory=self.settings.directory)
            self._client = client
        return self._client

    async def _issue(self, names: tuple[str, ...]) -> None:
        label = ", ".join(names)
        try:
            await self._order(names)
        except defer.CancelledError:
            raise
        except OrderedElsewhere:
            wait = self.store.wait_for_other()  # type: ignore[attr-defined]
            self._retry_at[names[0]] = self.reactor.seconds() + wait
            log.info("another gateway of the cluster is ordering the certificate for {names}; looking again in {wait:.0f}s", names=label, wait=wait)
            return
        except Exception as e:  # noqa: BLE001 - every failure is logged and retried later
            failures = self._failures.get(names[0], 0) + 1
            self._failures[names[0]] = failures
            delay = backoff(failures, self.settings.retry_interval)
            self._retry_at[names[0]] = self.reactor.seconds() + delay
            reason = str(e) if isinstance(e, (ACMEError, DNSHookError, NotStored)) else f"{type(e).__name__}: {e}"
            self.metrics.acme_order("failed")
            what = "issued but not stored" if isinstance(e, NotStored) else "not issued"
            log.error(
                "certificate for {names} {what} (attempt {n}): {reason}; retrying in {delay:.0f}s",
                names=label, what=what, n=failures, reason=reason, delay=delay,
            )  # fmt: skip
            raise
        self._failures.pop(names[0], None)
        self._retry_at.pop(names[0], None)

    async def _order(self, names: tuple[str, ...]) -> None:
        """
        With a shared store (a cluster), order only while holding the name's lease: exactly one
        gateway orders; the others wait for its result (L{OrderedElsewhere}).
        """
        if not IIssuanceLock.providedBy(self.store):
            return await self._order_here(names)
        lease = await self.store.acquire(names[0])
        if lease is None:
            raise OrderedElsewhere()
        try:
            await _maybe(self.store.prepare())  # another gateway may have stored one just before we got the lease
            if not await self._needs_certificate(names):
                log.info("the certificate for {names} was stored by another gateway meanwhile", names=", ".join(names))
                self.installed()
                return None
            return await self._order_here(names)
        finally:
            await _maybe(lease.release())

    async def _order_here(self, names: tuple[str, ...]) -> None:
        """Obtain a certificate (or take the one issued last time but not stored) and keep it."""
        kept = self._unstored.pop(names[0], None)
        if kept is not None and kept[1][0].not_valid_after_utc.timestamp() > self.reactor.seconds():
            log.info("storing the certificate for {names} issued earlier, without a new order", names=", ".join(names))
        else:
            kept = await self._obtain(names)
        await self._keep(names, *kept)

    async def _keep(self, names: tuple[str, ...], key: Any, chain: list[x509.Certificate]) -> None:
        """
        Store, then install.  A certificate the store refuses (a full disk) is held on to and
        stored at the next attempt instead of ordering again (CAs limit duplicate certificates:
        Let's Encrypt allows five a week); what is served meanwhile is untouched.
        """
        label = ", ".join(names)
        try:
            await _maybe(self.store.store(names[0], key, chain))
        except LeaseLost:
            raise  # another gateway holds the lease now and orders; this certificate is dropped
        except Exception as e:
            self._unstored[names[0]] = (key, chain)
            raise NotStored(str(e)) from e
        self.metrics.acme_order("issued")
        leaf = chain[0]
        log.info(
            "issued a certificate for {names} by {issuer}, valid until {until}",
            names=label, issuer=leaf.issuer.rfc4514_string(), until=leaf.not_valid_after_utc.isoformat(),
        )  # fmt: skip
        self.installed()
        renew = await self._renewal_time(leaf)
        self._renew_at[(names[0], leaf.serial_number)] = renew
        log.info("installed the certificate for {names}; next renewal at {when}", names=label, when=renew.isoformat())

    async def _obtain(self, names: tuple[str, ...]) -> tuple[Any, list[x509.Certificate]]:
        """Order, validate and finalize at the CA: a new key and its chain (leaf first)."""
        label = ", ".join(names)
        client = await self._registered_client()
        replaces = None
        stored = self.store.get(names[0])
        if stored is not None and client.offers_renewal_info():
            try:
                replaces = ari_certificate_id(stored[1][0])  # RFC 9773 section 5: this order replaces that one
            except x509.ExtensionNotFound:
                pass
        order_url, order = await client.new_order(list(names), replaces=replaces)
        log.info("ordered a certificate for {names}: {url}", names=label, url=order_url)
        for authz_url in order.authorizations:
            await self._authorize(client, authz_url)
        order = await client.wait_until_ready(order_url)
        key = new_certificate_key(self.settings.key_type)
        final = await client.finalize(order_url, order, make_csr(key, names))
        pem = await client.certificate_chain(final.certificate)
        return key, x509.load_pem_x509_certificates(pem)

    async def _authorize(self, client: ACMEClient, url: str) -> None:
        authz = await client.authorization(url)
        if authz.status == messages.STATUS_VALID:
            return
        name = ("*." if authz.wildcard else "") + authz.identifier.value
        challenge, responder = self._pick(name, authz)
        token = challenge_token(challenge)
        value = client.key_authorization(token)
        if responder.challenge_type == "dns-01":
            value = dns01_txt_value(value)
        await _maybe(responder.start_responding(name, token, value))
        try:
            log.info("serving the {type} challenge for {name}", type=responder.challenge_type, name=name)
            await client.answer(challenge)
            await client.wait_for_authorization(url)
            log.info("{name} validated over {type}", name=name, type=responder.challenge_type)
        finally:
            try:
                await _maybe(responder.stop_responding(name, token, value))
            except Exception as e:  # noqa: BLE001 - cleaning up must not hide the real outcome
                log.warn("cleaning up the {type} challenge for {name} failed: {error}", type=responder.challenge_type, name=name, error=str(e))

    def _pick(self, name: str, authz: messages.Authorization) -> tuple[messages.ChallengeBody, IResponder]:
        offered = {challenge_type(c): c for c in authz.challenges or ()}
        order = ["dns-01"] if name.startswith("*.") else list(self.settings.challenges)
        for typ in order:
            if typ in offered and typ in self.responders:
                return offered[typ], self.responders[typ]
        raise ACMEError(f"no usable challenge for {name}: the CA offers {', '.join(sorted(offered)) or 'none'}, configured: {', '.join(order)}")


def _names_of(certificate: x509.Certificate) -> list[str]:
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [n.lower() for n in san.get_values_for_type(x509.DNSName)]


async def _maybe(result: Any) -> Any:
    if isinstance(result, defer.Deferred):
        return await result
    return result


def _chained(d: defer.Deferred[Any]) -> defer.Deferred[Any]:
    """A new Deferred with C{d}'s result, so that several waiters can share one in-flight issue."""
    out: defer.Deferred[Any] = defer.Deferred()

    def relay(result: Any) -> Any:
        if isinstance(result, Failure):
            out.errback(result)
            return None
        out.callback(result)
        return result

    d.addBoth(relay)
    return out
