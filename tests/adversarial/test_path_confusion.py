"""
Path confusion: a request target spelled so that the gateway routes it to C{/} (alice's) while a
normalising upstream serves it as C{/admin} (bob's).  End to end against the real gateway, over raw
TLS sockets (http.client would tidy the bytes up first), with the echo upstream telling what it got.

Whatever alice sends, the gateway either refuses it (400), or routes it to C{/admin} and refuses her
(403), or forwards something that a normalising upstream (tests/adversarial/upstream_model.py) does
not read as C{/admin}.
"""

from __future__ import annotations

from tests.adversarial.gateway_fixture import PREFIXES, echoed, get, two_routes  # noqa: F401 (fixture)
from tests.adversarial.upstream_model import upstream_route

SPELLINGS = [
    b"/admin#x", b"/admin#/../x", b"/admin;", b"/admin;?q=1", b"/admin;x", b"/admin;x/users", b"/admin%3bx", b"/admin%3Bx",
    b"/%61dmin", b"/%61%64%6d%69%6e", b"/adm%69n/users", b"/admin%2fusers", b"/admin%2Fusers", b"/%2fadmin", b"/x%2f..%2fadmin",
    b"//admin", b"///admin/users", b"/x//../admin", b"/admin\\users", b"/admin%5cusers", b"/admin%5Cusers", b"/x\\..\\admin",
    b"/x/../admin", b"/x/%2e%2e/admin", b"/x/.%2E/admin", b"/./admin", b"/%2e/admin", b"/x/..;/admin", b"/x;/../admin",
    b"/admin%00", b"/admin%00.png", b"/admin%23x", b"/admin%3fx", b"/admin%3F", b"/x/..%00/admin", b"/admin/.",
]  # fmt: skip


def test_alice_never_reaches_admin_by_another_spelling(two_routes, pki):
    """One gateway for all the spellings (each its own connection); every one that gets through is listed."""
    bypasses = []
    for target in SPELLINGS:
        status, body = get(two_routes.port, pki, "alice", target)
        if status in (400, 403):
            continue
        assert status == 200, (target, status, body[:200])
        received = echoed(body)["uri"].encode("utf-8")
        if upstream_route(PREFIXES, received) != "/":
            bypasses.append(f"{target!r} reached the upstream as {received!r}, which is /admin to a normalising upstream")
    assert not bypasses, "\n".join(bypasses)


def test_what_is_routed_is_what_is_forwarded(two_routes, pki):
    """Unreserved escapes are decoded, other escapes upper-cased, empty segments merged, the query left alone."""
    status, body = get(two_routes.port, pki, "bob", b"/%61dmin/%7euser")
    assert status == 200 and echoed(body)["uri"] == "/admin/~user"
    status, body = get(two_routes.port, pki, "alice", b"//docs//caf%c3%a9/a%40b?q=%2f..;#")
    assert status == 400  # a fragment in a request target is refused
    status, body = get(two_routes.port, pki, "alice", b"//docs//caf%c3%a9/a%40b?q=%2f..;")
    assert status == 200 and echoed(body)["uri"] == "/docs/caf%C3%A9/a%40b?q=%2f..;"
    status, _ = get(two_routes.port, pki, "alice", b"/%61dmin")
    assert status == 403  # routed as /admin: bob's


def test_refusals_say_why(two_routes, pki):
    for target in [b"/admin%2fusers", b"/x/../admin", b"/admin;x", b"/a\\b", b"/admin#x", b"/a%00", b"/caf\xc3\xa9", b"/a%zz"]:
        status, body = get(two_routes.port, pki, "bob", target)
        assert status == 400, target
        assert b'"uri"' not in body and body.strip(), body  # a reason, never the upstream's echo
    status, body = get(two_routes.port, pki, "bob", b"/admin%2fusers")
    assert (status, body) == (400, b"400 Bad Request: an encoded '/' (%2F) is not allowed in the path\n")
    two_routes.proc.wait_for_log("refused the request target /a%zz")
