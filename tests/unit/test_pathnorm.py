"""
The request target's normal form (mtlsgate.http.pathnorm), and the property that makes prefix routing
sound: what the gateway routes is what a normalising upstream serves.
"""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.web.client import URI

from mtlsgate.http.pathnorm import PathRefused, normalize_target, prefix_problem
from mtlsgate.proxy.routing import RouteTable
from tests.adversarial.upstream_model import upstream_path, upstream_route

PREFIXES = ["/", "/admin", "/admin/users", "/a@b", "/api/v2", "/.well-known/acme", "/~x"]
TABLE = RouteTable(("localhost", prefix, prefix) for prefix in PREFIXES)


@pytest.mark.parametrize(
    ("target", "forward", "route_path"),
    [
        (b"/", b"/", "/"),
        (b"/admin/users?q=1", b"/admin/users?q=1", "/admin/users"),
        (b"/%61dmin", b"/admin", "/admin"),
        (b"/%7euser/%2d%2E%5f", b"/~user/-._", "/~user/-._"),
        (b"//admin///users//", b"/admin/users/", "/admin/users/"),
        (b"/a%40b/c%3a", b"/a%40b/c%3A", "/a@b/c:"),
        (b"/caf%c3%a9", b"/caf%C3%A9", "/caf\xc3\xa9"),
        (b"/a{b}|c", b"/a%7Bb%7D%7Cc", "/a{b}|c"),
        (b"/100%25", b"/100%25", "/100%"),
        (b"/.well-known/x/...", b"/.well-known/x/...", "/.well-known/x/..."),
        (b"/x?", b"/x", "/x"),
        (b"/x?q=%2f..;a/../b\\", b"/x?q=%2f..;a/../b\\", "/x"),  # the query goes as it came
    ],
)
def test_normal_forms(target, forward, route_path):
    normal = normalize_target(target)
    assert (normal.forward, normal.route_path) == (forward, route_path)
    assert normalize_target(normal.forward) == normal  # idempotent


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        (b"/admin#x", "fragment"), (b"/#", "fragment"), (b"/x?a#b", "fragment"),
        (b"/admin;", "';'"), (b"/admin;x/y", "';'"), (b"/admin%3bx", "%3B"), (b"/admin%3B", "%3B"),
        (b"/admin%2fusers", "%2F"), (b"/admin%2F", "%2F"), (b"/a%5cb", "%5C"), (b"/a\\b", "backslash"), (b"/a%23b", "%23"), (b"/a%3fb", "%3F"),
        (b"/a%00", "control"), (b"/a%0d%0a", "control"), (b"/a%7f", "control"),
        (b"/x/../admin", "dot-segment"), (b"/./admin", "dot-segment"), (b"/x/%2e%2e/admin", "dot-segment"), (b"/x/.%2E", "dot-segment"),
        (b"/x/%2e", "dot-segment"), (b"/x/..", "dot-segment"), (b"/x//../y", "dot-segment"),
        (b"/a%", "malformed"), (b"/a%2", "malformed"), (b"/a%zz", "malformed"), (b"/a%+1", "malformed"),
        (b"/caf\xc3\xa9", "non-ASCII"), (b"/a\x00", "control"), (b"/a b", "space"), (b"/a\tb", "control"), (b"/x?a\x7f", "control"),
        (b"http://evil/admin", "'/'"), (b"*", "'/'"), (b"", "'/'"), (b"admin", "'/'"),
    ],
)  # fmt: skip
def test_refusals_carry_a_reason(target, reason):
    with pytest.raises(PathRefused) as refused:
        normalize_target(target)
    assert reason in refused.value.reason


# --- the property: route(what the upstream receives, as a normalising upstream reads it) == the gateway's route --------------

_PIECES = [
    "/", "//", "admin", "users", "a@b", "a%40b", "api", "v2", "x", ".", "..", "%2e", "%2E", "%2e%2e", ".%2E", "...", ".well-known", "acme",
    "%61", "%41", "%64min", "%7e", "~", "%7Ex", "%2f", "%2F", "%5c", "%5C", "\\", ";", ";x", "%3b", "%3B", "#", "%23", "%00", "%0a", "%3f",
    "%25", "%2561", "%", "%z", "%c3%a9", "é", " ", "{", "|", "?", "?q=1", "?a=/../admin#", "&", "=", ":", "+", "%20", "%40", "%3a",
]  # fmt: skip
TARGETS = st.builds(
    lambda lead, parts: (lead + "".join(parts)).encode("utf-8"),
    st.sampled_from(["/", "", "//", "/admin", "http://h"]),
    st.lists(st.one_of(st.sampled_from(_PIECES), st.text(alphabet="adminus/.%;?#\\2fFeE5cC", max_size=4)), max_size=10),
)


@settings(max_examples=3000, deadline=None)
@given(TARGETS)
@example(b"/admin#x")
@example(b"/admin;")
@example(b"/%61dmin")
@example(b"//admin")
@example(b"/a%40b/x")
@example(b"/x/..%2fadmin")
def test_the_gateway_routes_what_a_normalising_upstream_serves(target):
    try:
        normal = normalize_target(target)
    except PathRefused:
        return  # 400: nothing reaches any upstream
    assert upstream_path(normal.forward) == normal.route_path.encode("latin-1")
    assert upstream_route(PREFIXES, normal.forward) == TABLE.lookup("localhost", normal.route_path)


@settings(max_examples=2000, deadline=None)
@given(TARGETS)
def test_the_normal_form_reaches_the_upstream_byte_for_byte(target):
    """The Agent parses the upstream URL (twisted.web.client.URI): the normal form must come out of it unchanged."""
    try:
        normal = normalize_target(target)
    except PathRefused:
        return
    assert URI.fromBytes(b"https://127.0.0.1:9443" + normal.forward).originForm == normal.forward
    assert normalize_target(normal.forward) == normal


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=30))
def test_any_bytes_are_normalised_or_refused_with_a_reason(raw):
    try:
        normal = normalize_target(b"/" + raw)
    except PathRefused as e:
        assert e.reason
        return
    assert normal.forward.isascii() and normal.path.startswith(b"/") and b"//" not in normal.path


@pytest.mark.parametrize(("prefix", "ok"), [("/", True), ("/api", True), ("/api/v2/", True), ("/a@b", True), ("/a%40b", False), ("/a//b", False),
                                            ("/a/../b", False), ("/a;b", False), ("/café", False), ("/a?b", False), ("/a b", False)])  # fmt: skip
def test_route_prefixes_must_be_in_normal_form(prefix, ok):
    assert (prefix_problem(prefix) is None) == ok


@settings(max_examples=1000, deadline=None)
@given(TARGETS)
def test_the_fast_path_agrees_with_the_full_walk(target):
    from mtlsgate.http.pathnorm import _PLAIN, _normalize_path

    path = target.partition(b"?")[0].partition(b"#")[0]
    if path.startswith(b"/") and _PLAIN.fullmatch(path) is not None:
        assert _normalize_path(path) == (path, path.decode("ascii"))
