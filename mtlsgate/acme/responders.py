"""
Challenge responders, txacme's shape: each answers one challenge type while an authorization is
being validated, then forgets it.

- L{HTTP01Responder}: a resource for C{/.well-known/acme-challenge/} on the gateway's HTTP listener.
- L{TLSALPN01Responder}: validation certificates (RFC 8737) that the gateway's own TLS listener
  presents when a client offers ALPN C{acme-tls/1} for a name under validation.
- L{DNS01Responder}: an operator's hook program sets the TXT record; we wait until a resolver sees it.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Any

from cryptography import x509
from cryptography.x509.oid import ObjectIdentifier
from twisted.internet import defer
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import Logger
from twisted.names import client as dns_client
from twisted.names import dns
from zope.interface import Attribute, Interface, implementer

from mtlsgate.reactors import IGatewayReactor
from mtlsgate.tls import pki

log = Logger(namespace="mtlsgate.acme")

ACME_TLS_ALPN = b"acme-tls/1"
ID_PE_ACME_IDENTIFIER = ObjectIdentifier("1.3.6.1.5.5.7.1.31")


class IResponder(Interface):
    """Makes one challenge type answerable for a name, and stops."""

    challenge_type = Attribute("The ACME challenge type, e.g. C{'http-01'}.")

    def start_responding(name: str, token: str, key_authorization: str) -> defer.Deferred[None] | None:
        """Be ready to be validated for C{name}; a Deferred if readiness takes time."""

    def stop_responding(name: str, token: str, key_authorization: str) -> defer.Deferred[None] | None:
        """Forget the challenge (validation is over, passed or failed)."""


@implementer(IResponder)
class HTTP01Responder:
    """Key authorizations by token, for the HTTP listener's C{/.well-known/acme-challenge/} (L{answer})."""

    challenge_type = "http-01"

    def __init__(self) -> None:
        self.tokens: dict[str, str] = {}

    def answer(self, token: str) -> str | None:
        return self.tokens.get(token)

    def start_responding(self, name: str, token: str, key_authorization: str) -> None:
        self.tokens[token] = key_authorization

    def stop_responding(self, name: str, token: str, key_authorization: str) -> None:
        self.tokens.pop(token, None)


def validation_certificate(name: str, key_authorization: str) -> tuple[Any, x509.Certificate]:
    """
    RFC 8737's self-signed certificate: the name as its only SAN and the critical acmeIdentifier
    extension holding the DER OCTET STRING of SHA-256(key authorization).
    """
    digest = hashlib.sha256(key_authorization.encode("ascii")).digest()
    identifier = x509.UnrecognizedExtension(ID_PE_ACME_IDENTIFIER, b"\x04\x20" + digest)
    return pki.self_signed("ACME TLS-ALPN-01 challenge", [name], [(identifier, True)])


_PUBLISHABLE_NAME = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,252})$")


def _published_file(directory: str, server_name: str | None) -> str | None:
    """Where a validation certificate for C{server_name} is published; None for a name that is not a plain host name."""
    name = (server_name or "").lower().rstrip(".")
    if not _PUBLISHABLE_NAME.match(name) or ".." in name:
        return None
    return os.path.join(directory, name + ".pem")


@implementer(IResponder)
class TLSALPN01Responder:
    """
    Validation certificates by name, for the TLS listener's ALPN callback (L{certificate_for}).

    With C{publish_dir}, each one is also written there (0600) while the validation lasts, so that
    sibling worker processes, which share the TLS port, can present it too (L{PublishedValidations}).
    """

    challenge_type = "tls-alpn-01"

    def __init__(self, publish_dir: str | None = None) -> None:
        self._certificates: dict[str, tuple[Any, x509.Certificate]] = {}
        self.publish_dir = publish_dir

    def start_responding(self, name: str, token: str, key_authorization: str) -> None:
        key, certificate = self._certificates[name.lower()] = validation_certificate(name, key_authorization)
        path = _published_file(self.publish_dir, name) if self.publish_dir else None
        if path is not None:
            os.makedirs(self.publish_dir, mode=0o700, exist_ok=True)  # type: ignore[arg-type]
            pki.write_private_file(path, pki.private_key_pem(key) + pki.certificates_pem([certificate]))

    def stop_responding(self, name: str, token: str, key_authorization: str) -> None:
        self._certificates.pop(name.lower(), None)
        path = _published_file(self.publish_dir, name) if self.publish_dir else None
        if path is not None and os.path.exists(path):
            os.unlink(path)

    def certificate_for(self, server_name: str | None) -> tuple[Any, x509.Certificate] | None:
        if not server_name:
            return None
        return self._certificates.get(server_name.lower().rstrip("."))


class PublishedValidations:
    """
    The TLS-ALPN-01 validation certificates another worker published (L{TLSALPN01Responder}'s
    C{publish_dir}).  Looked up when a client offers C{acme-tls/1} (a CA's validator, rarely) and,
    with C{unknown_sni: reject}, for a name no certificate carries: one stat, a read only while a
    validation is on.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def certificate_for(self, server_name: str | None) -> tuple[Any, x509.Certificate] | None:
        path = _published_file(self.directory, server_name)
        if path is None or not os.path.exists(path):
            return None
        try:
            key, chain = pki.load_key_and_chain(path)
        except (OSError, pki.PKIError):
            return None  # being replaced or removed just now
        return key, chain[0]


class DNSHookError(Exception):
    """The operator's dns_hook failed; the message carries its exit status and stderr."""


def dns01_record_name(name: str) -> str:
    """C{*.example.com} and C{example.com} both validate at C{_acme-challenge.example.com}."""
    return "_acme-challenge." + (name[2:] if name.startswith("*.") else name)


@implementer(IResponder)
class DNS01Responder:
    """
    Runs C{HOOK add|remove FQDN VALUE} and, after C{add}, polls C{resolver} (host, port) — or the
    system's resolvers — until the TXT value is visible, up to C{propagation_timeout} seconds.
    """

    challenge_type = "dns-01"

    def __init__(
        self, reactor: IGatewayReactor, hook: str, resolver: tuple[str, int] | None = None,
        propagation_timeout: float = 120.0, poll_interval: float = 2.0,
    ) -> None:  # fmt: skip
        self.reactor = reactor
        self.hook = hook
        self.resolver_address = resolver
        self.propagation_timeout = propagation_timeout
        self.poll_interval = poll_interval

    def _resolver(self) -> Any:
        if self.resolver_address is not None:
            return dns_client.Resolver(servers=[self.resolver_address], reactor=self.reactor)
        # The system's resolvers (resolv.conf), on our reactor: createResolver() takes no reactor.
        return dns_client.Resolver(resolv="/etc/resolv.conf", reactor=self.reactor)

    async def _run_hook(self, action: str, fqdn: str, value: str) -> None:
        try:
            out, err, code = await getProcessOutputAndValue(self.hook, (action, fqdn, value), env=dict(os.environ), reactor=self.reactor)
        except OSError as e:
            raise DNSHookError(f"dns_hook {self.hook}: cannot run it: {e}") from None
        if code != 0:
            reason = (err or out).decode("utf-8", "replace").strip().splitlines()
            raise DNSHookError(f"dns_hook {self.hook} {action} {fqdn} exited with {code}: {reason[-1] if reason else 'no output'}")

    async def _visible(self, fqdn: str, value: str) -> bool:
        resolver = self._resolver()
        try:
            answers, _, _ = await resolver.lookupText(fqdn, timeout=[2])
        except Exception:  # NXDOMAIN, timeouts: simply not visible yet
            return False
        return any(
            value.encode("ascii") in record.payload.data for record in answers if record.type == dns.TXT
        )

    async def _add(self, name: str, value: str) -> None:
        fqdn = dns01_record_name(name)
        await self._run_hook("add", fqdn, value)
        waited = 0.0
        while not await self._visible(fqdn, value):
            if waited >= self.propagation_timeout:
                raise DNSHookError(f"TXT {fqdn} not visible after {waited:.0f}s (dns_hook add returned 0)")
            await deferLater(self.reactor, self.poll_interval, lambda: None)
            waited += self.poll_interval
        log.info("TXT {fqdn} is visible; asking the CA to validate {name}", fqdn=fqdn, name=name)

    def start_responding(self, name: str, token: str, key_authorization: str) -> defer.Deferred[None]:
        """C{key_authorization} here is the dns-01 TXT value (base64url SHA-256 of it)."""
        return defer.Deferred.fromCoroutine(self._add(name, key_authorization))

    def stop_responding(self, name: str, token: str, key_authorization: str) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._run_hook("remove", dns01_record_name(name), key_authorization))
