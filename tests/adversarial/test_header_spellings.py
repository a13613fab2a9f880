"""
Identity headers by another spelling: WSGI and CGI servers map C{X_Forwarded_For} and
C{X-Forwarded-For} to the same variable, so a client's underscore spelling of a gateway-owned header
would sit next to (or replace) the gateway's own.  Whatever the client spells, the upstream sees
only the gateway's.
"""

from __future__ import annotations

from mtlsgate.http.headers import FRAMING, GATEWAY_OWNED, HOP_BY_HOP
from mtlsgate.identity import parse_xfcc
from tests.adversarial.gateway_fixture import echoed, get, raw_request, two_routes  # noqa: F401 (fixture)

OWNED = {n.decode() for n in GATEWAY_OWNED | HOP_BY_HOP | FRAMING} | {"host"}

SPELLINGS = [
    b"X_Forwarded_Client_Cert", b"x_forwarded_client_cert", b"X-Forwarded_Client-Cert", b"X_Forwarded_For", b"X-Forwarded_For",
    b"X_Real_IP", b"X_REAL_IP", b"x-real_ip", b"X_Forwarded_Proto", b"X_Forwarded_Host", b"Transfer_Encoding", b"Content_Length",
    b"Proxy_Connection", b"Keep_Alive",
]  # fmt: skip


def test_no_client_spelling_of_a_gateway_owned_header_reaches_the_upstream(two_routes, pki):
    extra = b"".join(name + b": forged-by-alice\r\n" for name in SPELLINGS)
    status, body = get(two_routes.port, pki, "alice", b"/", extra)
    assert status == 200, body[:200]
    headers = echoed(body)["headers"]
    assert not [name for name in headers if name.replace("_", "-") in OWNED and name not in OWNED]
    assert not [name for name, values in headers.items() if "forged-by-alice" in values]
    assert headers["x-forwarded-for"] == ["127.0.0.1"]
    [element] = parse_xfcc(headers["x-forwarded-client-cert"][0])
    assert element["URI"] == ["spiffe://test/ns/prod/sa/alice"]


def test_other_headers_go_through(two_routes, pki):
    status, body = get(two_routes.port, pki, "alice", b"/", b"X-Request-Id: 42\r\n")
    assert status == 200 and echoed(body)["headers"]["x-request-id"] == ["42"]


def test_a_header_name_that_is_not_a_token_is_refused(two_routes, pki):
    for name in [b"X Forwarded For", b"X-Forwarded-For\x00", b"X(For)", b"X/For", b"X\x7fFor", b"X\xe9For", b""]:
        head = b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n" + name + b": 6.6.6.6\r\n\r\n"
        status, body = raw_request(two_routes.port, pki, "alice", head)
        assert status == 400, name
        assert b'"uri"' not in body
