"""
What the cluster keeps in Redis, and the operations on it (every one returns a Deferred):

    mtlsgate:cert:NAME        JSON {chain: PEM, key: sealed key, by: node}   a certificate and its key
    mtlsgate:certs            set of NAMEs                                   the index of the above
    mtlsgate:account          JSON {key: sealed key}                         the ACME account key
    mtlsgate:lock:NAME        random token, PX lease                         the issuance lock (L{mtlsgate.cluster.lock})
    mtlsgate:challenges       hash ID -> sealed JSON {type, name, token, value, expires}   HTTP-01 / TLS-ALPN-01 material
    mtlsgate:ack:ID           set of node ids, short TTL                     nodes that loaded challenge ID
    mtlsgate:crls             hash ISSUER-SHA256 -> JSON {number, pem}       the newest CRL per issuer
    mtlsgate:events           pub/sub channel: JSON {kind, name, node}       "certificate", "crl", "challenge"

Private keys are sealed (L{mtlsgate.cluster.seal}); a certificate's key is bound to its chain.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.logger import Logger

from mtlsgate.cluster.connection import RedisClient
from mtlsgate.cluster.seal import SealError, Sealer
from mtlsgate.tls import pki
from mtlsgate.tls.server import crl_number

log = Logger(namespace="mtlsgate.cluster")

PREFIX = "mtlsgate:"
CHANNEL = PREFIX + "events"
CERT_INDEX = PREFIX + "certs"
ACCOUNT = PREFIX + "account"
CHALLENGES = PREFIX + "challenges"
CRLS = PREFIX + "crls"

#: Write a certificate only while holding its lock (the fencing check, atomic with the write).
_FENCED_PUT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2])
redis.call('SADD', KEYS[3], ARGV[3])
redis.call('PUBLISH', KEYS[4], ARGV[4])
return 1
"""

#: Keep a CRL only if it is newer than the one stored for its issuer (a stale CRL must not un-revoke).
_NEWER_CRL = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old then
  local number = cjson.decode(old)['number']
  if tonumber(number) >= tonumber(ARGV[2]) then return 0 end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('PUBLISH', KEYS[2], ARGV[4])
return 1
"""


def cert_key(name: str) -> str:
    return PREFIX + "cert:" + name


def lock_key(name: str) -> str:
    return PREFIX + "lock:" + name


def event(kind: str, name: str, node: str) -> str:
    return json.dumps({"kind": kind, "name": name, "node": node})


def issuer_id(crl: x509.CertificateRevocationList) -> str:
    return hashlib.sha256(crl.issuer.public_bytes()).hexdigest()


def _key_pem(key: Any) -> bytes:
    return key.private_bytes(Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


class SharedStore:
    """The cluster's data in Redis, through one L{RedisClient}; C{node} names this gateway in events."""

    def __init__(self, client: RedisClient, sealer: Sealer | None, node: str) -> None:
        """C{sealer}: None for a user of the CRLs alone (C{mtlsgate ca revoke --storage}), which never sees a key."""
        self.client = client
        self._sealer = sealer
        self.node = node
        self._rejected: set[str] = set()  # challenges that did not open, reported once

    @property
    def sealer(self) -> Sealer:
        assert self._sealer is not None, "this shared store was opened without the storage key"
        return self._sealer

    # --- certificates ---------------------------------------------------------------------------

    def _cert_value(self, name: str, key: Any, chain: list[x509.Certificate]) -> str:
        chain_pem = pki.certificates_pem(chain)
        context = (cert_key(name) + "\n").encode() + hashlib.sha256(chain_pem).digest()
        return json.dumps({"chain": chain_pem.decode("ascii"), "key": self.sealer.seal(_key_pem(key), context), "by": self.node})

    def _open_cert(self, name: str, raw: str) -> tuple[Any, list[x509.Certificate]]:
        data = json.loads(raw)
        chain_pem = data["chain"].encode("ascii")
        context = (cert_key(name) + "\n").encode() + hashlib.sha256(chain_pem).digest()
        key = serialization.load_pem_private_key(self.sealer.open(data["key"], context), password=None)
        return key, x509.load_pem_x509_certificates(chain_pem)

    async def get_certificate(self, name: str) -> tuple[Any, list[x509.Certificate]] | None:
        """The key and chain stored under C{name}, or None; L{SealError} for a key that does not open."""
        raw = await self.client.call("get", cert_key(name))
        return None if raw is None else self._open_cert(name, raw)

    async def certificate_names(self) -> list[str]:
        return sorted(await self.client.call("smembers", CERT_INDEX) or [])

    async def put_certificate(self, name: str, key: Any, chain: list[x509.Certificate], token: str) -> bool:
        """Store under C{name} if this node still holds the lock with C{token} (fencing); notify the others. False: lock lost."""
        value = self._cert_value(name, key, chain)
        done = await self.client.call("eval", _FENCED_PUT, [lock_key(name), cert_key(name), CERT_INDEX, CHANNEL],
                                      [token, value, name, event("certificate", name, self.node)])  # fmt: skip
        return bool(done)

    # --- the ACME account -----------------------------------------------------------------------

    async def account_key(self, local: Any | None) -> Any:
        """
        The shared account key: the stored one; else C{local} (this node's existing key) or a new one,
        stored unless another node got there first (SET NX), in which case that one.
        """
        raw = await self.client.call("get", ACCOUNT)
        if raw is None:
            key = local or ec.generate_private_key(ec.SECP256R1())
            value = json.dumps({"key": self.sealer.seal(_key_pem(key), ACCOUNT.encode())})
            await self.client.call("set", ACCOUNT, value, None, None, True)
            raw = await self.client.call("get", ACCOUNT)
        return serialization.load_pem_private_key(self.sealer.open(json.loads(raw)["key"], ACCOUNT.encode()), password=None)

    # --- challenges -----------------------------------------------------------------------------

    async def add_challenge(self, ident: str, challenge: dict[str, Any]) -> int:
        """
        Store one challenge, sealed (only a holder of the storage key can make the nodes answer one: else
        write access to Redis would let anyone pass the CA's validation for our names), and announce it;
        returns how many nodes received the announcement.
        """
        sealed = self.sealer.seal(json.dumps(challenge).encode(), (CHALLENGES + "\n" + ident).encode())
        await self.client.call("hset", CHALLENGES, ident, sealed)
        await self.client.call("delete", PREFIX + "ack:" + ident)
        return int(await self.client.call("publish", CHANNEL, event("challenge", ident, self.node)))

    async def remove_challenge(self, ident: str) -> None:
        await self.client.call("hdel", CHALLENGES, ident)
        await self.client.call("delete", PREFIX + "ack:" + ident)
        await self.client.call("publish", CHANNEL, event("challenge", ident, self.node))

    async def forget_challenge(self, ident: str) -> None:
        """Remove an expired challenge without announcing it (nobody answers it any more)."""
        await self.client.call("hdel", CHALLENGES, ident)

    async def challenges(self) -> dict[str, dict[str, Any]]:
        """The challenges that open with the storage key; others (forged, or of another key) are left out, and logged."""
        raw = await self.client.call("hgetall", CHALLENGES) or {}
        found = {}
        for ident, value in raw.items():
            try:
                found[ident] = json.loads(self.sealer.open(value, (CHALLENGES + "\n" + ident).encode()))
            except (SealError, ValueError) as e:
                if ident in self._rejected:
                    continue
                self._rejected.add(ident)
                log.warn("ignoring challenge {ident} in the shared store: {error}", ident=ident, error=str(e))
        return found

    async def acknowledge(self, ident: str) -> None:
        await self.client.call("sadd", PREFIX + "ack:" + ident, self.node)
        await self.client.call("expire", PREFIX + "ack:" + ident, 600)

    async def acknowledged(self, ident: str) -> int:
        return int(await self.client.call("scard", PREFIX + "ack:" + ident))

    # --- CRLs -----------------------------------------------------------------------------------

    async def put_crl(self, crl: x509.CertificateRevocationList) -> bool:
        """Keep C{crl} for its issuer unless a newer (or the same) one is stored; notify the others. False: not newer."""
        number = crl_number(crl)
        value = json.dumps({"number": number, "pem": crl.public_bytes(Encoding.PEM).decode("ascii")})
        done = await self.client.call("eval", _NEWER_CRL, [CRLS, CHANNEL], [issuer_id(crl), str(number), value, event("crl", issuer_id(crl), self.node)])
        return bool(done)

    async def crls(self) -> list[x509.CertificateRevocationList]:
        raw = await self.client.call("hgetall", CRLS) or {}
        return [x509.load_pem_x509_crl(json.loads(value)["pem"].encode("ascii")) for value in raw.values()]
