"""
The route table's Host cache (issue #13) must never change which route a request gets: whatever Host
spellings a client sends first (case, ports, trailing dots, brackets, floods of invented names past the
cache's bound), every later lookup answers exactly as a table that never cached anything.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mtlsgate.proxy import routing
from mtlsgate.proxy.routing import RouteTable

ENTRIES = [
    ("api.example", "/", "api-root"),
    ("api.example", "/admin", "api-admin"),
    ("*.example", "/", "wild"),
    ("*.internal.example", "/v1/", "internal-v1"),
    ("*", "/public", "catch-all-public"),
    ("::1", "/", "v6"),
]

_labels = st.sampled_from(["api", "API", "x", "internal", "a.internal", "example", "EXAMPLE", "other", ""])
_hosts = st.builds(
    lambda parts, port, dot, bracket: (("[::1]" if bracket else ".".join(parts)) + ("." if dot else "") + (f":{port}" if port else "")),
    st.lists(_labels, min_size=1, max_size=4), st.sampled_from([None, 443, 8443]), st.booleans(), st.booleans(),
)
_paths = st.sampled_from(["/", "/admin", "/admin/x", "/adminx", "/v1/", "/v1/a", "/v1", "/public", "/public?q", "/publicx"])


def _uncached(host: str, path: str) -> str | None:
    return RouteTable(ENTRIES).lookup(host, path)  # a fresh table: an empty cache


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_hosts, _paths), min_size=1, max_size=40))
def test_a_cached_lookup_answers_as_an_uncached_one(requests: list[tuple[str, str]]) -> None:
    table = RouteTable(ENTRIES)
    for host, path in requests + requests:  # the second pass is served from the cache
        assert table.lookup(host, path) == _uncached(host, path)


def test_a_flood_of_invented_hosts_neither_grows_the_cache_nor_changes_routing(monkeypatch) -> None:
    monkeypatch.setattr(routing, "_HOST_CACHE_SIZE", 16)
    table = RouteTable(ENTRIES)
    for i in range(100):
        assert table.lookup(f"n{i}.nowhere", "/public") == "catch-all-public"
    assert len(table._host_cache) == 16
    for host, path, want in [("API.example:443", "/admin/x", "api-admin"), ("a.internal.example.", "/v1/a", "internal-v1"),
                             ("a.internal.example", "/v1", None), ("zz.example", "/admin", "wild"), ("[::1]:8443", "/x", "v6"),
                             ("nowhere", "/x", None)]:  # fmt: skip
        assert table.lookup(host, path) == want
