"""The route table: host first (exact, wildcard, catch-all), then the longest prefix."""

import pytest

from mtlsgate.proxy.routing import RouteTable, host_problem, normalize_host, prefix_matches, request_target_problem


def table():
    return RouteTable([
        ("app.example.com", "/", "app"),
        ("app.example.com", "/api", "api"),
        ("app.example.com", "/api/v2/", "v2"),
        ("*.apps.example.com", "/", "wild"),
        ("deep.apps.example.com", "/x", "deep-x"),
    ])  # fmt: skip


def test_exact_host_and_longest_prefix():
    t = table()
    assert t.lookup("app.example.com", "/") == "app"
    assert t.lookup("app.example.com:8443", "/api") == "api"
    assert t.lookup("APP.example.com", "/api/users?x=1") == "api"
    assert t.lookup("app.example.com", "/api/v2/things") == "v2"
    assert t.lookup("app.example.com", "/apiary") == "app"


def test_wildcard_host_and_exact_host_without_matching_prefix():
    t = table()
    assert t.lookup("web.apps.example.com", "/") == "wild"
    # An exact host with routes owns its name: no fall-through to the wildcard.
    assert t.lookup("deep.apps.example.com", "/other") is None
    assert t.lookup("deep.apps.example.com", "/x/1") == "deep-x"


def test_unknown_host_matches_nothing_unless_a_catch_all_exists():
    assert table().lookup("elsewhere.example.org", "/") is None
    assert not table().knows_host("elsewhere.example.org")
    catch_all = RouteTable([("*", "/", "any"), ("a.example", "/", "a")])
    assert catch_all.lookup("elsewhere.example.org", "/") == "any"
    assert catch_all.lookup("a.example", "/") == "a"


def test_normalize_host():
    assert normalize_host("Example.COM:443") == "example.com"
    assert normalize_host("[::1]:8443") == "::1"
    assert normalize_host("example.com.") == "example.com"


def test_prefix_matches_on_segment_boundaries():
    assert prefix_matches("/api", "/api")
    assert prefix_matches("/api", "/api/x")
    assert prefix_matches("/api", "/api?x")
    assert not prefix_matches("/api", "/apix")
    assert prefix_matches("/api/", "/api/x")


@pytest.mark.parametrize(
    "target",
    ["/public/../admin", "/public/%2e%2e/admin", "/public/%2E./admin", "/./admin", "/a/..", "http://evil/x", "*", "/a\\..\\b", "/a%5cb", "/a%2fb", "/a;b", "/a#b"],
)
def test_request_targets_that_could_escape_their_prefix_are_refused(target):
    assert request_target_problem(target) is not None


@pytest.mark.parametrize("target", ["/", "/api/x?q=../y", "/a/...b/c", "/.well-known/x", "//a%61b"])
def test_ordinary_request_targets_pass(target):
    assert request_target_problem(target) is None


@pytest.mark.parametrize("raw", [b"a.example.com", b"A.Example.COM:8443", b"a.example.com.", b"x_y.example", b"[::1]", b"[::1]:443", b"127.0.0.1:80", b""])
def test_host_problem_passes_names_ports_and_ip_literals(raw):
    assert host_problem(raw) is None


@pytest.mark.parametrize("raw", [b"a,b", b"a, b", b"u@a", b"a:1@b", b"a:1:b", b"a;b", b"a b", b"a/b", b"a\\b", b"[a.b]", b"a:x", b"a:-1", b"a:123456",
                                 b"a%2cb", b"a\tb", b"caf\xc3\xa9.example", b"[::1]x"])  # fmt: skip
def test_host_problem_refuses_what_an_upstream_could_read_as_another_name(raw):
    assert host_problem(raw) is not None
