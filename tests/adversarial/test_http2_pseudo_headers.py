"""
Attack class: HTTP/2 pseudo-header tricks and path-rule parity.  HTTP/2 carries the request line as
pseudo-headers (C{:method}, C{:scheme}, C{:authority}, C{:path}) in HPACK, which can hold bytes and
forms a request line cannot: a C{:path} without its leading C{/}, with a space, a tab, a control or
8-bit byte, absolute-form, C{*}, empty; a C{:method} with a space (a request line of its own once an
HTTP/1.1 upstream writes it out); C{:protocol} (RFC 8441, WebSockets over HTTP/2); duplicated, unknown
or misplaced pseudo-headers; an C{:authority} with userinfo, port, trailing dot or upper case.

The rule: whatever spelling of C{/admin} (bob's) alice sends over HTTP/2 gets exactly the answer it gets
over HTTP/1.1 (a target HTTP/1.1 cannot carry is refused), never the upstream's C{/admin}; a C{:method}
that is not a token is a 400 before any upstream; no WebSocket (or any tunnel) over HTTP/2.
"""

from __future__ import annotations

import json
import uuid

import pytest
import yaml

from tests.adversarial.gateway_fixture import PREFIXES, echoed, get, two_routes_for_the_module  # noqa: F401 (fixture)
from tests.adversarial.test_path_confusion import SPELLINGS
from tests.adversarial.upstream_model import upstream_route
from tests.conftest import free_port, gateway_config
from tests.h2peer import H2Client, Stream

REFUSED = "refused"  # GOAWAY or RST_STREAM: the stream never got a response


@pytest.fixture
def two_routes(two_routes_for_the_module):  # noqa: F811
    """One two-route gateway for the module: no test here changes its state."""
    return two_routes_for_the_module


def h2_fields(port: int, pki, client: str, fields: list[tuple[bytes, bytes]]) -> tuple[int | str, bytes]:
    """Send exactly C{fields} (pseudo-headers included, in this order) as one request on a fresh connection: status and body."""
    with H2Client(port, pki, client) as c:
        sid = c.conn.get_next_available_stream_id()
        c.streams[sid] = Stream()
        c.conn.send_headers(sid, fields, end_stream=True)
        c.flush()
        stream = c.response(sid)
        if stream.status is None or stream.reset is not None and not stream.ended:
            return REFUSED, b""
        return stream.status, bytes(stream.body)


def h2_get(port: int, pki, client: str, path: bytes, authority: bytes = b"localhost", method: bytes = b"GET") -> tuple[int | str, bytes]:
    return h2_fields(port, pki, client, [(b":method", method), (b":scheme", b"https"), (b":authority", authority), (b":path", path)])


H2_ONLY = [
    b"admin", b"", b"https://localhost/admin", b"//localhost/admin", b"/admin users", b"/admin\tx", b"/admin\x01", b"/admin\x7f",
    b"/adm\xc3\xadn", b"/admin\x00", b" /admin", b"/admin ", b"*", b"localhost:443",
]  # fmt: skip


def test_every_spelling_of_admin_gets_over_http2_what_it_gets_over_http11(two_routes, pki):
    mismatches = []
    for target in SPELLINGS + [b"/admin", b"/", b"/ADMIN", b"/admin/", b"/admin?x=/../", b"/admin%2e"]:
        h1, h1_body = get(two_routes.port, pki, "alice", target)
        h2, h2_body = h2_get(two_routes.port, pki, "alice", target)
        if h1 != h2:
            mismatches.append(f"{target!r}: HTTP/1.1 {h1}, HTTP/2 {h2}")
        elif h2 == 200 and echoed(h2_body)["uri"] != echoed(h1_body)["uri"]:
            mismatches.append(f"{target!r} forwarded as {echoed(h1_body)['uri']!r} from HTTP/1.1, {echoed(h2_body)['uri']!r} from HTTP/2")
    assert not mismatches, "\n".join(mismatches)


def test_paths_only_http2_can_carry_never_reach_admin(two_routes, pki):
    bypasses = []
    for target in H2_ONLY:
        status, body = h2_get(two_routes.port, pki, "alice", target)
        if status in (400, 403, REFUSED):
            continue
        if status != 200:
            bypasses.append(f"{target!r}: {status}")
            continue
        received = echoed(body)["uri"].encode("utf-8")
        if upstream_route(PREFIXES, received) != "/":
            bypasses.append(f"{target!r} reached the upstream as {received!r}")
    assert not bypasses, "\n".join(bypasses)
    assert "Traceback" not in two_routes.proc.output()


@pytest.mark.parametrize("method", [b"GET /admin", b"GET\t", b"G(E)T", b"GET\x01", b"", b"GET /admin HTTP/1.1"])
def test_a_method_that_is_not_a_token_is_refused_before_any_upstream(two_routes, pki, method):
    marker = uuid.uuid4().hex.encode()
    status, _ = h2_get(two_routes.port, pki, "alice", b"/" + marker, method=method)
    assert status in (400, REFUSED)
    after = uuid.uuid4().hex  # this test's own request after, in a log the module's tests share
    h1, _ = get(two_routes.port, pki, "alice", b"/after/" + after.encode())
    assert h1 == 200
    two_routes.proc.wait_for_log(f'"GET /after/{after} HTTP/1.1" 200')
    out = two_routes.proc.output()
    assert f"/{marker.decode()} HTTP/2\" 502" not in out and f"/{marker.decode()} HTTP/2\" 200" not in out
    assert "Traceback" not in out


@pytest.mark.parametrize(
    "fields",
    [
        [(b":method", b"GET"), (b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"localhost"), (b":path", b"/admin")],
        [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"localhost"), (b":path", b"/"), (b":path", b"/admin")],
        [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"localhost"), (b"x-a", b"1"), (b":path", b"/admin")],
        [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"localhost"), (b":path", b"/admin"), (b":foo", b"x")],
        [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"localhost"), (b":path", b"/admin"), (b":status", b"200")],
        [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"localhost")],
        [(b":scheme", b"https"), (b":authority", b"localhost"), (b":path", b"/admin")],
        [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"localhost"), (b":path", b"/admin"), (b":protocol", b"websocket")],
    ],
    ids=["two-methods", "two-paths", "pseudo-after-regular", "unknown-pseudo", "status-in-request", "no-path", "no-method", "protocol-on-get"],
)
def test_malformed_pseudo_header_blocks_are_refused(two_routes, pki, fields):
    status, _ = h2_fields(two_routes.port, pki, "alice", fields)
    assert status in (400, REFUSED)


@pytest.mark.parametrize(
    "authority, expected",
    [(b"localhost:443", 200), (b"LOCALHOST", 200), (b"localhost.", 200), (b"bob@localhost", 400), (b"localhost@other", 400), (b"other", 404)],
)
def test_authority_spellings_route_as_host_does_over_http11(two_routes, pki, authority, expected):
    status, body = h2_get(two_routes.port, pki, "alice", b"/x", authority=authority)
    assert status == expected
    if status == 200:
        assert echoed(body)["headers"]["x-forwarded-client-cert"][0].count("URI=spiffe://test/ns/prod/sa/alice") == 1


def test_scheme_http_changes_nothing_the_upstream_is_told(two_routes, pki):
    status, body = h2_fields(two_routes.port, pki, "alice", [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"localhost"), (b":path", b"/s")])
    assert status == 200
    assert echoed(body)["headers"]["x-forwarded-proto"] == ["https"]


# --- RFC 8441: WebSockets over HTTP/2 are not supported; extended CONNECT must not open a tunnel, whatever the route says


@pytest.fixture
def websocket_route(start_gateway, pki, echo_upstream, tmp_path):
    port = free_port()
    config = gateway_config(pki, port, [f"https://127.0.0.1:{echo_upstream}"], {"allow_websockets": True})
    path = tmp_path / "ws.yaml"
    path.write_text(yaml.safe_dump(config))
    return start_gateway(["--config", str(path)], port=port)


def test_extended_connect_opens_no_tunnel_even_where_websockets_are_allowed(websocket_route, pki):
    with H2Client(websocket_route.port, pki) as c:
        settings = c.conn.remote_settings
        assert not settings.get(8, 0), "the gateway must not announce SETTINGS_ENABLE_CONNECT_PROTOCOL"
    marker = uuid.uuid4().hex.encode()
    fields = [
        (b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":scheme", b"https"), (b":path", b"/" + marker), (b":authority", b"localhost"),
        (b"sec-websocket-version", b"13"),
    ]  # fmt: skip
    status, _ = h2_fields(websocket_route.port, pki, "alice", fields)
    assert status in (400, 405, REFUSED)
    plain, _ = h2_fields(websocket_route.port, pki, "alice", [(b":method", b"CONNECT"), (b":authority", b"localhost:443")])
    assert plain in (405, REFUSED)
    out = websocket_route.proc.output()
    assert marker.decode() not in "\n".join(line for line in out.splitlines() if "upstream=https" in line)
    assert "Traceback" not in out


def test_a_websocket_handshake_sent_over_http2_is_a_plain_request(websocket_route, pki):
    """Upgrade and Connection are connection-specific (h2 refuses them); sec-websocket-* alone cannot make a tunnel."""
    with H2Client(websocket_route.port, pki) as c:
        stream = c.response(c.request("GET", "/ws", headers=[(b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ=="), (b"sec-websocket-version", b"13")]))
    assert stream.status == 200 and json.loads(bytes(stream.body))["method"] == "GET"
