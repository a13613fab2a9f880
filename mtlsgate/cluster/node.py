"""
One gateway's membership of the cluster (docs/cluster.md): the connection to the shared store, the
subscription to its events, periodic reconciliation, the local copy on disk, and the adapters the
ACME service uses (L{ClusterCertificateStore}, L{SharedResponder}).

- A certificate stored by any node is announced on the event channel; every node copies it into its
  C{certs_dir} and swaps it in (and every C{sync_interval} compares everything, the safety net for
  announcements missed while disconnected).
- Challenge material is announced the same way; the ordering node waits until every subscribed node
  has loaded it before asking the CA to validate, so the CA may reach any node.
- While Redis is away, the node serves its local copy, says so (L{problem}, the
  C{mtlsgate_shared_store_up} metric), and ordering waits (with back-off) for Redis to return; what the
  node holds and Redis lacks (Redis restarted without its data) is written back when it returns.
"""

from __future__ import annotations

import json
import os
import socket
from datetime import datetime, timezone
from typing import Any, Callable

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from prometheus_client import CollectorRegistry, Gauge
from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger
from zope.interface import implementer

from mtlsgate.acme.responders import IResponder
from mtlsgate.acme.store import DirectoryStore, ICertificateStore, IIssuanceLock, LeaseLost
from mtlsgate.cluster.cache import cached_crls, write_cached_crls, write_state
from mtlsgate.cluster.connection import RedisClient, StoreUnavailable, Subscription
from mtlsgate.cluster.lock import Lease, LeaseLock
from mtlsgate.cluster.seal import SealError, Sealer
from mtlsgate.cluster.shared import CHANNEL, SharedStore
from mtlsgate.cluster.url import parse_storage_url
from mtlsgate.config.model import Storage
from mtlsgate.tls import pki
from mtlsgate.tls.server import newest_crl_per_issuer

log = Logger(namespace="mtlsgate.cluster")

CHALLENGE_TTL = 600.0
ACK_WAIT = 10.0


def node_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{os.urandom(2).hex()}"


def _newer(a: list[x509.Certificate], b: list[x509.Certificate]) -> bool:
    """Whether chain C{a}'s leaf expires later than C{b}'s."""
    return a[0].not_valid_after_utc > b[0].not_valid_after_utc


class ClusterNode(Service):
    """
    @param on_certificates: called after certificates in C{certs_dir} changed (to swap them in).
    @param on_crls: called with the shared CRLs after they changed.
    """

    def __init__(
        self, reactor: Any, settings: Storage, certs_dir: str, registry: CollectorRegistry | None = None,
        on_certificates: Callable[[], None] = lambda: None,
        on_crls: Callable[[list[x509.CertificateRevocationList]], None] = lambda crls: None,
        client: RedisClient | None = None,
    ) -> None:  # fmt: skip
        self.reactor = reactor
        self.settings = settings
        self.url = parse_storage_url(settings.url)
        self.certs_dir = certs_dir
        self.local = DirectoryStore(certs_dir)
        self.sealer = Sealer.from_file(settings.key_file)
        self.node = node_name()
        self.on_certificates = on_certificates
        self.on_crls = on_crls
        self.responders: dict[str, IResponder] = {}  # this node's own responders, by challenge type
        self.names: frozenset[str] = frozenset()  # the names this node answers challenges for (its autocert domains)
        self._applied: dict[str, dict[str, Any]] = {}  # challenges answered here, by id
        self._ignored: set[str] = set()  # challenges for names not ours, reported once
        self._challenge_sync = defer.DeferredLock()
        self.crls: list[x509.CertificateRevocationList] = cached_crls(certs_dir)
        self.available: bool | None = None
        self.problem: str | None = "not connected yet"
        self._down_since: datetime | None = None
        self._client = client
        self.shared: SharedStore | None = None
        self.lock: LeaseLock | None = None
        self._subscription: Subscription | None = None
        self._loop: task.LoopingCall | None = None
        self._reconciling: defer.Deferred[None] | None = None
        self.up = Gauge("mtlsgate_shared_store_up", "1 while the shared store (Redis) answers, 0 while this node serves its local copy.",
                        registry=registry) if registry is not None else None  # fmt: skip

    # --- life cycle -----------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        client = self._client or RedisClient(self.reactor, self.settings)
        self.shared = SharedStore(client, self.sealer, self.node)
        self.lock = LeaseLock(self.reactor, client, self.settings.lease)
        self._subscription = Subscription(self.reactor, self.settings, CHANNEL, self._message, self._subscribed, self._lost)
        self._loop = task.LoopingCall(self.reconcile)
        self._loop.clock = self.reactor
        self._loop.start(self.settings.sync_interval, now=True)
        log.info("cluster node {node} sharing {url}", node=self.node, url=self.url.display())

    def stopService(self) -> Any:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        closing = []
        if self._subscription is not None:
            closing.append(self._subscription.close())
        if self.shared is not None:
            closing.append(self.shared.client.close())
        return defer.DeferredList(closing)

    # --- state ----------------------------------------------------------------------------------

    def _mark_up(self) -> None:
        if self.available is not True:
            if self._down_since is not None:
                log.info("shared store {url} is back", url=self.url.display())
            self.available, self.problem, self._down_since = True, None, None
            if self.up is not None:
                self.up.set(1)
            self._write_state()

    def _mark_down(self, reason: str) -> None:
        if self.available is not False:
            self._down_since = datetime.now(timezone.utc)
            log.warn("shared store unavailable ({reason}); serving the local copy, ordering waits for it", reason=reason)
        self.available = False
        problem = f"shared store unavailable since {self._down_since.isoformat(timespec='seconds') if self._down_since else '?'}: {reason}"
        changed, self.problem = problem != self.problem, problem
        if self.up is not None:
            self.up.set(0)
        if changed:
            self._write_state()

    def _write_state(self) -> None:
        try:
            write_state(self.certs_dir, self.problem)
        except (OSError, pki.PKIError) as e:
            log.warn("cannot record the shared store's state for the other processes: {error}", error=str(e))

    def degraded(self) -> str | None:
        """None while the shared store answers; else why not (for /readyz)."""
        return None if self.available else self.problem

    # --- events ---------------------------------------------------------------------------------

    def _subscribed(self) -> None:
        log.info("subscribed to {channel} at {url}", channel=CHANNEL, url=self.url.display())
        self.reconcile()  # announcements sent while away are lost: compare everything

    def _lost(self) -> None:
        self._mark_down("connection lost")

    def _message(self, channel: str, message: str) -> None:
        try:
            event = json.loads(message)
            kind, name, sender = event["kind"], event["name"], event.get("node")
        except (ValueError, KeyError, TypeError):
            log.warn("ignoring a malformed event on {channel}", channel=channel)
            return
        if kind == "certificate":
            if sender != self.node:
                self._run(self._sync_certificates([str(name)]))
        elif kind == "crl":
            self._run(self._sync_crls())
        elif kind == "challenge":
            self._run(self._sync_challenges())

    def _run(self, coroutine: Any) -> defer.Deferred[Any]:
        d = defer.Deferred.fromCoroutine(coroutine)

        def failed(f: Any) -> None:
            if f.check(StoreUnavailable):
                self._mark_down(f.getErrorMessage())
            else:
                log.failure("cluster synchronisation failed", f)

        return d.addErrback(failed)

    # --- reconciliation -------------------------------------------------------------------------

    def reconcile(self) -> defer.Deferred[None]:
        """Compare everything with the shared store and bring both up to date; one at a time."""
        if self._reconciling is None:
            self._reconciling = self._run(self._reconcile())

            def done(result: Any) -> Any:
                self._reconciling = None
                return result

            self._reconciling.addBoth(done)
        return self._reconciling

    async def _reconcile(self) -> None:
        assert self.shared is not None
        names = await self.shared.certificate_names()
        await self._sync_certificates(sorted(set(names) | set(self._local_names())))
        await self._sync_crls()
        await self._sync_challenges()
        self._mark_up()

    def _local_names(self) -> list[str]:
        if not os.path.isdir(self.certs_dir):
            return []
        names = []
        for file in sorted(os.listdir(self.certs_dir)):
            if file.endswith(".pem"):
                stem = file[: -len(".pem")]
                names.append("*." + stem[2:] if stem.startswith("_.") else stem)
        return names

    async def _sync_certificates(self, names: list[str]) -> None:
        changed = False
        for name in names:
            changed = await self._sync_certificate(name) or changed
        if changed:
            self.on_certificates()

    async def _sync_certificate(self, name: str) -> bool:
        """Copy the shared certificate here if it is newer; write ours back if the store lacks it (a Redis that lost its data)."""
        assert self.shared is not None and self.lock is not None
        try:
            stored = await self.shared.get_certificate(name)
        except (SealError, ValueError, KeyError) as e:
            log.error("shared certificate for {name} cannot be read ({error}); keeping the local one", name=name, error=str(e))
            return False
        try:
            local = self.local.get(name)
        except (pki.PKIError, OSError):
            local = None
        if stored is not None and (local is None or _newer(stored[1], local[1])):
            try:
                self.local.store(name, *stored)
            except pki.PKIError as e:
                log.error("shared certificate for {name} not copied here: {error}", name=name, error=str(e))
                return False
            log.info("copied the certificate for {name} from the shared store (valid until {until})",
                     name=name, until=stored[1][0].not_valid_after_utc.isoformat())  # fmt: skip
            return True
        if local is not None and (stored is None or _newer(local[1], stored[1])):
            lease = await self.lock.acquire(name)
            if lease is not None:
                try:
                    if await self.shared.put_certificate(name, local[0], local[1], lease.token):
                        log.info("wrote the local certificate for {name} back to the shared store, which lacked it", name=name)
                finally:
                    await lease.release()
        return False

    async def _sync_crls(self) -> None:
        assert self.shared is not None
        shared = await self.shared.crls()
        merged = list(newest_crl_per_issuer(self.crls + shared))
        for crl in merged:  # ours that the store lacks (it lost its data): back again; the store keeps only newer ones
            if not any(crl.public_bytes(Encoding.DER) == s.public_bytes(Encoding.DER) for s in shared):
                await self.shared.put_crl(crl)
        if _ders(merged) != _ders(self.crls):
            write_cached_crls(self.certs_dir, merged)
            self.crls = merged
            log.info("shared CRLs changed: {n} issuer(s)", n=len(merged))
            self.on_crls(merged)

    async def _sync_challenges(self) -> None:
        """One at a time (a sync that read the list before a removal must not re-apply what a later one stopped)."""
        await self._challenge_sync.acquire()
        try:
            await self._sync_challenges_now()
        finally:
            self._challenge_sync.release()

    async def _sync_challenges_now(self) -> None:
        assert self.shared is not None
        now = self.reactor.seconds()
        stored = await self.shared.challenges()
        current = {ident: c for ident, c in stored.items() if c.get("expires", 0) > now}
        for ident in stored.keys() - current.keys():  # left behind by a node that died validating
            await self.shared.forget_challenge(ident)
        for ident in [i for i in self._applied if i not in current]:
            challenge = self._applied.pop(ident)
            responder = self.responders.get(challenge["type"])
            if responder is not None:
                responder.stop_responding(challenge["name"], challenge["token"], challenge["value"])
        for ident, challenge in current.items():
            if ident not in self._applied:
                responder = self.responders.get(challenge["type"])
                if responder is None:
                    continue
                if str(challenge["name"]).lower() not in self.names:
                    if ident in self._ignored:
                        continue
                    self._ignored.add(ident)
                    log.warn("ignoring the {type} challenge for {name} in the shared store: not one of this gateway's autocert domains",
                             type=challenge["type"], name=challenge["name"])  # fmt: skip
                    continue
                responder.start_responding(challenge["name"], challenge["token"], challenge["value"])
                self._applied[ident] = challenge
                log.info("answering the {type} challenge for {name} (from the shared store)", type=challenge["type"], name=challenge["name"])
            await self.shared.acknowledge(ident)

    # --- challenges, for SharedResponder --------------------------------------------------------

    async def publish_challenge(self, typ: str, name: str, token: str, value: str) -> None:
        """Answer here, store and announce it, and wait (up to 10s) until every subscribed node answers it too."""
        assert self.shared is not None
        ident = f"{typ}:{name}:{token}"
        challenge = {"type": typ, "name": name, "token": token, "value": value, "expires": self.reactor.seconds() + CHALLENGE_TTL}
        responder = self.responders[typ]
        responder.start_responding(name, token, value)
        self._applied[ident] = challenge
        receivers = await self.shared.add_challenge(ident, challenge)
        waited = 0.0
        while (acked := await self.shared.acknowledged(ident)) < receivers and waited < ACK_WAIT:
            await task.deferLater(self.reactor, 0.1, lambda: None)
            waited += 0.1
        log.info("{acked} of {receivers} gateway(s) answer the {type} challenge for {name}", acked=acked, receivers=receivers, type=typ, name=name)

    async def withdraw_challenge(self, typ: str, name: str, token: str, value: str) -> None:
        ident = f"{typ}:{name}:{token}"
        self._applied.pop(ident, None)
        self.responders[typ].stop_responding(name, token, value)
        assert self.shared is not None
        await self.shared.remove_challenge(ident)

    # --- the ACME account -----------------------------------------------------------------------

    async def prepare(self) -> None:
        """Before a check: the shared account key here, everything reconciled."""
        assert self.shared is not None
        account = os.path.join(self.certs_dir, "acme-account.key")
        local = pki.load_private_key(account) if os.path.exists(account) else None
        try:
            key = await self.shared.account_key(local)
        except StoreUnavailable as e:
            self._mark_down(str(e))
            raise
        if local is None or pki.private_key_pem(key) != pki.private_key_pem(local):
            os.makedirs(self.certs_dir, mode=0o700, exist_ok=True)
            pki.write_private_file(account, pki.private_key_pem(key))
        await self.reconcile()


def _ders(crls: list[x509.CertificateRevocationList]) -> list[bytes]:
    return sorted(crl.public_bytes(Encoding.DER) for crl in crls)


class _HeldLease:
    """What L{ClusterCertificateStore.acquire} hands the issuing service: the lease, until C{release()}."""

    def __init__(self, store: ClusterCertificateStore, name: str, lease: Lease) -> None:
        self.store = store
        self.name = name
        self.lease = lease

    async def _release(self) -> None:
        self.store._leases.pop(self.name, None)
        await self.lease.release()

    def release(self) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._release())


@implementer(ICertificateStore, IIssuanceLock)
class ClusterCertificateStore:
    """The ACME service's store on a cluster: reads the local copy, writes through the shared store under the lease."""

    def __init__(self, node: ClusterNode) -> None:
        self.node = node
        self._leases: dict[str, Lease] = {}

    def get(self, name: str) -> tuple[Any, list[x509.Certificate]] | None:
        return self.node.local.get(name)

    async def _store(self, name: str, key: Any, chain: list[x509.Certificate]) -> None:
        lease = self._leases.get(name)
        assert self.node.shared is not None
        if lease is None or not await self.node.shared.put_certificate(name, key, chain, lease.token):
            raise LeaseLost(f"the issuance lease for {name} was lost (it ran out); another gateway orders it, this certificate is dropped")
        self.node.local.store(name, key, chain)

    def store(self, name: str, key: Any, chain: list[x509.Certificate]) -> defer.Deferred[None]:
        """Into the shared store (fenced by the lease: refused with L{LeaseLost} if this node no longer holds it), then here."""
        return defer.Deferred.fromCoroutine(self._store(name, key, chain))

    def account_key(self) -> Any:
        return self.node.local.account_key()

    def prepare(self) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self.node.prepare())

    async def _acquire(self, name: str) -> _HeldLease | None:
        assert self.node.lock is not None
        try:
            lease = await self.node.lock.acquire(name)
        except StoreUnavailable as e:
            self.node._mark_down(str(e))
            raise
        if lease is None:
            return None
        self._leases[name] = lease
        return _HeldLease(self, name, lease)

    def acquire(self, name: str) -> defer.Deferred[Any]:
        return defer.Deferred.fromCoroutine(self._acquire(name))

    def wait_for_other(self) -> float:
        """A third of the lease: the holder's result arrives by pub/sub anyway; looking again is for taking over from a dead holder."""
        return max(1.0, self.node.settings.lease / 3)


@implementer(IResponder)
class SharedResponder:
    """A responder whose challenges every node of the cluster answers (HTTP-01, TLS-ALPN-01)."""

    def __init__(self, node: ClusterNode, local: IResponder) -> None:
        self.node = node
        self.challenge_type = local.challenge_type
        node.responders[local.challenge_type] = local

    def start_responding(self, name: str, token: str, key_authorization: str) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self.node.publish_challenge(self.challenge_type, name, token, key_authorization))

    def stop_responding(self, name: str, token: str, key_authorization: str) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self.node.withdraw_challenge(self.challenge_type, name, token, key_authorization))
