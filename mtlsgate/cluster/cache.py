"""
What a node keeps on its own disk of the shared store, to serve while Redis is away: certificates in
C{certs_dir} itself (as autocert writes them), and the shared CRLs in C{certs_dir/.cluster/crls.pem}.
Light on purpose: the gateway reads this at start-up without importing txredisapi.
"""

from __future__ import annotations

import os

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from mtlsgate.tls import pki


def crl_cache_file(certs_dir: str) -> str:
    return os.path.join(certs_dir, ".cluster", "crls.pem")


def cached_crls(certs_dir: str | None) -> list[x509.CertificateRevocationList]:
    """The shared CRLs this node last loaded (none if it never did)."""
    if not certs_dir or not os.path.exists(crl_cache_file(certs_dir)):
        return []
    return pki.load_crls(crl_cache_file(certs_dir))


def write_cached_crls(certs_dir: str, crls: list[x509.CertificateRevocationList]) -> None:
    if not crls:
        if os.path.exists(crl_cache_file(certs_dir)):
            os.unlink(crl_cache_file(certs_dir))
        return
    os.makedirs(os.path.dirname(crl_cache_file(certs_dir)), mode=0o700, exist_ok=True)
    pki.write_public_file(crl_cache_file(certs_dir), b"".join(crl.public_bytes(Encoding.PEM) for crl in crls))
