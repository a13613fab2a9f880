"""
The route table: a request's Host and path pick at most one route.

Host first (exact name, then the closest C{*.} wildcard, then an explicit C{*} catch-all; the port is
ignored), then the longest path prefix among that host's routes.  An unknown host matches nothing:
a request is never sent to the first route by accident.
"""

from __future__ import annotations

import re
from typing import Generic, Iterable, TypeVar

from mtlsgate.http.pathnorm import PathRefused, normalize_target

T = TypeVar("T")
_HOST_CACHE_SIZE = 1024


def normalize_host(host: str) -> str:
    """Lower-case a Host header value and strip its port (IPv6 literals keep their brackets' content)."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[1:end] if end > 0 else host
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


# name[:port] (letters, digits, '-', '.', '_'), an IP literal in brackets with an optional port, or empty (RFC 9112 3.2).
_HOST_VALUE = re.compile(rb"(?:\[[0-9A-Fa-f.]*:[0-9A-Fa-f:.]*\]|[A-Za-z0-9._-]*)(?::[0-9]{1,5})?\Z")  # an IPv6 literal has a colon


def host_problem(raw: bytes) -> str | None:
    """
    Why a Host (or HTTP/2 :authority) value is refused, or None.  Only C{name[:port]} and C{[IP]:port}
    forms pass: a list (C{a,b}), userinfo (C{a@b}), a path, whitespace, a second colon or 8-bit bytes
    would be routed by the gateway as one name while an upstream (which gets the value as X-Forwarded-Host,
    and as Host with preserve_host_header) could read another out of it.
    """
    if _HOST_VALUE.match(raw):
        return None
    return "the Host is not a name[:port] or a bracketed IP literal"


def prefix_matches(prefix: str, path: str) -> bool:
    """C{/api} matches C{/api}, C{/api/x} and C{/api?q}, not C{/apix}; C{/api/} matches C{/api/x}."""
    if prefix == "/" or path == prefix:
        return True
    if not path.startswith(prefix):
        return False
    return prefix.endswith("/") or path[len(prefix)] in "/?"


def request_target_problem(target: str) -> str | None:
    """Why a request target cannot be routed safely, or None (see L{mtlsgate.http.pathnorm} for the rules)."""
    try:
        normalize_target(target.encode("latin-1", "replace"))
    except PathRefused as e:
        return e.reason
    return None


class RouteTable(Generic[T]):
    """
    Host and path prefix to a value (a route).  Built once per configuration; lookups are a dict
    access per host candidate plus a scan of that host's prefixes, longest first.
    """

    def __init__(self, entries: Iterable[tuple[str, str, T]]) -> None:
        by_host: dict[str, list[tuple[str, T]]] = {}
        for host, prefix, value in entries:
            by_host.setdefault(host.lower(), []).append((prefix, value))
        self._by_host = {host: sorted(routes, key=lambda r: len(r[0]), reverse=True) for host, routes in by_host.items()}
        # Host header value as sent -> the routes of the first host candidate the table knows (None: no such host).
        # Bounded: a client inventing Host values fills it once and then pays the uncached lookup, never memory.
        self._host_cache: dict[str, list[tuple[str, T]] | None] = {}

    def _host_candidates(self, host: str) -> Iterable[str]:
        yield host
        labels = host.split(".")
        for i in range(1, len(labels)):
            yield "*." + ".".join(labels[i:])
        yield "*"

    def lookup(self, host: str, path: str) -> T | None:
        """The route for this Host header value and request path, or None."""
        try:
            routes = self._host_cache[host]
        except KeyError:
            routes = self._host_routes(normalize_host(host))
            if len(self._host_cache) < _HOST_CACHE_SIZE:
                self._host_cache[host] = routes
        if routes is None:
            return None
        for prefix, value in routes:
            if prefix_matches(prefix, path):
                return value
        return None

    def _host_routes(self, host: str) -> list[tuple[str, T]] | None:
        """The routes of the first candidate (exact, closest wildcard, catch-all) the table has: a host's prefixes never fall through to another's."""
        for candidate in self._host_candidates(host):
            routes = self._by_host.get(candidate)
            if routes is not None:
                return routes
        return None

    def knows_host(self, host: str) -> bool:
        """Whether any route serves this host (used to tell 404 for an unknown host from one for a path)."""
        host = normalize_host(host)
        return any(c in self._by_host for c in self._host_candidates(host))
