"""
Short plain-text tables and facts about what the gateway serves (certificates) and where it sends
requests (routes): for the start-up log, C{mtlsgate check} and C{mtlsgate ca show}.
"""

from __future__ import annotations

import math
import os
from datetime import datetime, timedelta, timezone
from typing import Iterable, Sequence

from cryptography import x509
from cryptography.x509.oid import NameOID

from mtlsgate.config.model import Route
from mtlsgate.identity import printable


def table_lines(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """Left-aligned columns two spaces apart, headers in capitals; no trailing spaces."""
    grid = [[h.upper() for h in headers], *[[str(cell) for cell in row] for row in rows]]
    widths = [max(len(row[i]) for row in grid) for i in range(len(headers))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in grid]


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    return "\n".join(table_lines(headers, rows))


def days_left(cert: x509.Certificate, now: datetime | None = None) -> str:
    """Whole days of validity left, rounded up (C{"10"}), or C{"EXPIRED"} / C{"not yet valid"}."""
    now = now or datetime.now(timezone.utc)
    if now >= cert.not_valid_after_utc:
        return "EXPIRED"
    if now < cert.not_valid_before_utc:
        return "not yet valid"
    return str(math.ceil((cert.not_valid_after_utc - now) / timedelta(days=1)))


def issuer_label(cert: x509.Certificate) -> str:
    """The issuer's CN, else its whole name."""
    names = cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
    return printable(str(names[0].value)) if names else printable(cert.issuer.rfc4514_string()) or "-"


def short_path(path: str) -> str:
    """C{path} relative to the current directory when it is inside it."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def certificates_table(served: Iterable[tuple[Sequence[str], x509.Certificate, str]]) -> str:
    """C{served}: (names, leaf, source) per certificate."""
    return table(
        ("certificate", "issuer", "days left", "from"),
        ((", ".join(names), issuer_label(leaf), days_left(leaf), source) for names, leaf, source in served),
    )


def upstream_tls(route: Route) -> str:
    """The upstream-TLS column: CA, client certificate, server name, or C{skip-verify!}; C{HTTP/2} for an C{upstream_protocol: http2} route."""
    h2 = ", HTTP/2" if route.upstream_protocol == "http2" else ""
    if all(url.startswith("http://") for url in route.to):
        return "none (http://)" + h2
    ca = short_path(route.tls_custom_ca_file) if route.tls_custom_ca_file else "system store"
    parts = ["skip-verify!" if route.tls_skip_verify else f"CA {ca}"]
    parts.append(f"client {short_path(route.tls_client_cert_file)}" if route.tls_client_cert_file else "no client cert")
    if route.tls_server_name:
        parts.append(f"name {route.tls_server_name}")
    return ", ".join(parts) + h2


def route_rows(routes: Iterable[Route]) -> list[list[str]]:
    return [[r.host, r.prefix, ", ".join(r.to), r.allow_client.explain(), upstream_tls(r)] for r in routes]


ROUTE_HEADERS = ("host", "prefix", "upstreams", "client rules", "upstream TLS")


def routes_table(routes: Iterable[Route]) -> str:
    return table(ROUTE_HEADERS, route_rows(routes))
