"""
Where issued certificates live: a directory of C{NAME.pem} files, each the private key, the
certificate and its chain (the txsni/txacme layout), which the gateway's C{certs_dir} serves.

The ACME account key lives beside them as C{acme-account.key} (not C{.pem}, so that a directory
scan for certificates passes it by).
"""

from __future__ import annotations

import os
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from zope.interface import Interface, implementer

from mtlsgate.tls import pki

ACCOUNT_KEY_FILE = "acme-account.key"


class ICertificateStore(Interface):
    """Issued certificates by name (the first identifier of the certificate, C{*} spelled C{_})."""

    def get(name: str) -> tuple[Any, list[x509.Certificate]] | None:
        """The key and chain (leaf first) stored under C{name}, or None."""

    def store(name: str, key: Any, chain: list[x509.Certificate]) -> Any:
        """Replace what is stored under C{name}, atomically: a reader sees the old or the new. None, or a Deferred."""

    def account_key() -> Any:
        """The ACME account's private key, made (and kept) on first use."""


class LeaseLost(Exception):
    """A fenced write refused: this node's issuance lease ran out and another node may hold it now."""


class IIssuanceLock(Interface):
    """
    A store shared by several gateways (L{mtlsgate.cluster}) also decides which of them orders a
    certificate: the issuing service asks it before ordering, and the winner's L{ICertificateStore.store}
    is fenced by the lease it got.
    """

    def prepare() -> Any:
        """Bring the local view up to date with the shared store (a Deferred); a failure is logged, not fatal."""

    def acquire(name: str) -> Any:
        """A Deferred firing with a lease object (with C{release()}) if this node may order C{name}, or None if another node is."""

    def wait_for_other() -> float:
        """Seconds to wait before looking again when another node holds the lease."""


def file_name_for(name: str) -> str:
    """C{*.example.com} -> C{_.example.com}: a wildcard as a portable file name."""
    return name.replace("*", "_")


@implementer(ICertificateStore)
class DirectoryStore:
    def __init__(self, path: str) -> None:
        self.path = path

    def _file(self, name: str) -> str:
        return os.path.join(self.path, file_name_for(name) + ".pem")

    def get(self, name: str) -> tuple[Any, list[x509.Certificate]] | None:
        path = self._file(name)
        if not os.path.exists(path):
            return None
        key, chain = pki.load_key_and_chain(path)
        return key, chain

    def store(self, name: str, key: Any, chain: list[x509.Certificate]) -> None:
        """Replace C{NAME.pem} atomically; on failure (a full disk) it stays as it was, and L{pki.PKIError} names it."""
        self._make_directory()
        pki.write_private_file(self._file(name), pki.private_key_pem(key) + pki.certificates_pem(chain))

    def _make_directory(self) -> None:
        try:
            os.makedirs(self.path, mode=0o700, exist_ok=True)
        except OSError as e:
            raise pki.PKIError(f"{self.path}: cannot make the certificate directory ({e.strerror or type(e).__name__})") from None

    def account_key(self) -> Any:
        path = os.path.join(self.path, ACCOUNT_KEY_FILE)
        if os.path.exists(path):
            return pki.load_private_key(path)
        self._make_directory()
        key = ec.generate_private_key(ec.SECP256R1())
        pki.write_private_file(path, pki.private_key_pem(key))
        return key
