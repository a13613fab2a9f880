"""
Attack class: a Host (HTTP/2: C{:authority}) that the gateway routes as one name and the upstream
reads as another.  The gateway picks the route from the Host and forwards it (as C{Host} with
C{preserve_host_header}, and always as C{X-Forwarded-Host}); upstream frameworks read those values
their own ways: the first (or last) element of a comma-separated list, the part after a userinfo
C{@}, the part before the first colon, the contents of brackets.  A Host such as
C{admin.example.com,a.example.com} used to be routed by the gateway to C{*.example.com} (alice's)
while a framework that takes the first list element served it as C{admin.example.com} (bob's).

The rule: a Host is C{name[:port]} (letters, digits, C{-}, C{.}, C{_}) or an IP literal in brackets
with an optional port, or empty; anything else is a 400 before routing, over HTTP/1.1 and HTTP/2 alike.
"""

from __future__ import annotations

import pytest
import yaml

from tests.adversarial.gateway_fixture import get, raw_request
from tests.conftest import free_port
from tests.h2peer import H2Client

ALICE = "spiffe://test/ns/prod/sa/alice"
BOB = "spiffe://test/ns/prod/sa/bob"

CONFUSING = [
    b"admin.example.com,a.example.com", b"a.example.com,admin.example.com", b"admin.example.com, a.example.com",
    b"admin.example.com@a.example.com", b"a.example.com@admin.example.com", b"a.example.com:443@admin.example.com",
    b"a.example.com:443:admin.example.com", b"admin.example.com;a.example.com", b"admin.example.com a.example.com",
    b"admin.example.com/a.example.com", b"a.example.com/admin.example.com", b"admin.example.com\\a.example.com",
    b"[admin.example.com]", b"a.example.com:admin", b"a.example.com:-1", b"admin.example.com%2ca.example.com",
    b"a.example.com\tadmin.example.com", b"adm\xc3\xadn.example.com",
]  # fmt: skip
PLAIN = [(b"a.example.com", 200), (b"A.Example.COM:8443", 200), (b"a.example.com.", 200), (b"admin.example.com", 403), (b"ADMIN.example.com.", 403),
         (b"x_y.example.com", 200), (b"nowhere.test", 404)]  # fmt: skip


@pytest.fixture
def hosts(start_gateway, pki, echo_upstream, tmp_path):
    port = free_port()
    upstream = {
        "to": [f"https://127.0.0.1:{echo_upstream}"], "tls_custom_ca_file": pki["ca"], "preserve_host_header": True,
        "tls_client_cert_file": pki["gateway_client"][0], "tls_client_key_file": pki["gateway_client"][1],
    }  # fmt: skip
    config = {
        "address": f"tcp:{port}:interface=127.0.0.1",
        "certificates": [{"cert": pki["gateway"][0], "key": pki["gateway"][1]}],
        "downstream_mtls": {"ca_file": pki["ca"]},
        "routes": [
            {"from": "https://admin.example.com", "allow_client": {"uri": [BOB]}, **upstream},
            {"from": "https://*.example.com", "allow_client": {"uri": [ALICE]}, **upstream},
        ],
    }  # fmt: skip
    path = tmp_path / "hosts.yaml"
    path.write_text(yaml.safe_dump(config))
    return start_gateway(["--config", str(path)], port=port)


def _h1(port: int, pki, host: bytes) -> int:
    return raw_request(port, pki, "alice", b"GET /h HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n")[0]


def _h2(port: int, pki, host: bytes) -> int | str:
    with H2Client(port, pki, "alice") as c:
        stream = c.response(c.request("GET", "/h", authority=host))
        return "refused" if stream.status is None else stream.status


def test_a_host_an_upstream_could_read_as_another_name_is_refused_over_http11_and_http2(hosts, pki):
    served = []
    for host in CONFUSING:
        h1 = _h1(hosts.port, pki, host)
        h2 = _h2(hosts.port, pki, host)
        if h1 != 400 or h2 not in (400, "refused"):
            served.append(f"{host!r}: HTTP/1.1 {h1}, HTTP/2 {h2}")
    assert not served, "\n".join(served)
    assert "Traceback" not in hosts.proc.output()


def test_plain_names_route_as_before(hosts, pki):
    for host, status in PLAIN:
        assert (_h1(hosts.port, pki, host), _h2(hosts.port, pki, host)) == (status, status), host
    assert get(hosts.port, pki, "alice", b"/x")[0] == 404  # Host: localhost is no route here
