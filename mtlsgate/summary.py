"""
Short plain-text tables of what the gateway serves (certificates) and where it sends requests
(routes), for the start-up log and for C{mtlsgate check}.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Iterable, Sequence

from cryptography import x509

from mtlsgate.config import Route


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Left-aligned columns, two spaces apart, with a header line."""
    rows = [list(map(str, row)) for row in rows]
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(headers)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [list(headers), *rows]]
    return "\n".join(lines)


def days_left(certificate: x509.Certificate, now: datetime | None = None) -> str:
    now = now or datetime.now(timezone.utc)
    seconds = (certificate.not_valid_after_utc - now).total_seconds()
    return "EXPIRED" if seconds <= 0 else f"{int(seconds // 86400)}"


def issuer_name(certificate: x509.Certificate) -> str:
    names = certificate.issuer.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(names[0].value) if names else certificate.issuer.rfc4514_string()


def certificates_table(served: Iterable[tuple[Sequence[str], x509.Certificate, str]]) -> str:
    """C{served}: (names, leaf, source) per certificate."""
    return table(
        ("certificate", "issuer", "days left", "from"),
        ((", ".join(names), issuer_name(leaf), days_left(leaf), source) for names, leaf, source in served),
    )


def upstream_tls(route: Route) -> str:
    if not any(url.startswith("https://") for url in route.to):
        return "plain http"
    if route.tls_skip_verify:
        return "skip-verify!"
    parts = [f"ca={route.tls_custom_ca_file}" if route.tls_custom_ca_file else "ca=system"]
    if route.tls_client_cert_file:
        parts.append(f"client-cert={route.tls_client_cert_file}")
    if route.tls_server_name:
        parts.append(f"name={route.tls_server_name}")
    return " ".join(parts)


def routes_table(routes: Iterable[Route]) -> str:
    return table(
        ("host", "prefix", "upstreams", "clients", "upstream TLS"),
        ((r.host, r.prefix, ", ".join(r.to), r.allow_client.explain(), upstream_tls(r)) for r in routes),
    )
