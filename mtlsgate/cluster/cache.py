"""
What a node keeps on its own disk of the shared store, to serve while Redis is away: certificates in
C{certs_dir} itself (as autocert writes them), and the shared CRLs in C{certs_dir/.cluster/crls.pem}.
Light on purpose: the gateway reads this at start-up without importing txredisapi.
"""

from __future__ import annotations

import json
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


def state_file(certs_dir: str) -> str:
    return os.path.join(certs_dir, ".cluster", "state.json")


def write_state(certs_dir: str, problem: str | None) -> None:
    """Whether this node reaches the shared store (None) or why not, for a worker group's parent (its /readyz)."""
    os.makedirs(os.path.dirname(state_file(certs_dir)), mode=0o700, exist_ok=True)
    pki.write_public_file(state_file(certs_dir), json.dumps({"problem": problem}).encode())


def read_state(certs_dir: str | None) -> str | None:
    """What L{write_state} last wrote: None while the store answers (or nothing was written)."""
    if not certs_dir:
        return None
    try:
        with open(state_file(certs_dir), encoding="utf-8") as f:
            problem = json.load(f).get("problem")
    except (OSError, ValueError, AttributeError):
        return None
    return str(problem) if problem else None
