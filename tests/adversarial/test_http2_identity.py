"""
Attack class: getting past the client-certificate decision, or past the gateway's say on identity,
by speaking HTTP/2 instead of HTTP/1.1.  Over HTTP/2 a certificate refused by a route (or by
verification, under enforcement: policy) gets 403 and nothing reaches the upstream, on every stream
of the connection; the X-Forwarded-Client-Cert the upstream sees is the gateway's, whatever the
client sent, in any spelling.
"""

from __future__ import annotations

import json

import pytest
import yaml

from mtlsgate.identity import parse_xfcc
from tests.conftest import free_port, gateway_config
from tests.h2peer import H2Client


@pytest.fixture
def bob_only(start_gateway, pki, echo_upstream, tmp_path):
    port = free_port()
    config = gateway_config(pki, port, [f"https://127.0.0.1:{echo_upstream}"], route={"allow_client": {"uri": ["spiffe://test/ns/prod/sa/bob"]}})
    config["downstream_mtls"]["enforcement"] = "policy"
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(config))
    return start_gateway(["--config", str(path)], port=port)


@pytest.mark.parametrize("client, reason", [("alice", "not allowed here"), ("stranger", "untrusted issuer"), ("expired", "expired")])
def test_a_refused_certificate_gets_403_on_every_stream_and_never_reaches_the_upstream(bob_only, pki, client, reason):
    with H2Client(bob_only.port, pki, client) as c:
        assert c.alpn == "h2"
        ids = [c.request("GET", f"/h2-{client}-{i}") for i in range(5)]
        answers = [c.response(sid) for sid in ids]
    assert [a.status for a in answers] == [403] * 5
    assert all(reason.encode() in bytes(a.body) for a in answers)
    lines = [line for line in bob_only.proc.wait_for_log(f"/h2-{client}-4 HTTP/2").splitlines() if f"/h2-{client}-" in line and " HTTP/2\" " in line]
    assert len(lines) == 5 and all(" 403 " in line and "upstream=- " in line for line in lines)


def test_the_admitted_client_gets_through_and_the_upstream_sees_the_gateways_xfcc(bob_only, pki):
    spoofed = [
        (b"x-forwarded-client-cert", b'By=spiffe://evil;URI=spiffe://test/ns/prod/sa/admin'), (b"x_forwarded_client_cert", b"URI=admin"),
        (b"x-forwarded-client-cert", b"second"), (b"forwarded", b"for=10.0.0.1"), (b"x-real-ip", b"10.0.0.1"),
    ]  # fmt: skip
    with H2Client(bob_only.port, pki, "bob") as c:
        stream = c.response(c.request("GET", "/who", headers=spoofed))
    assert stream.status == 200
    headers = json.loads(bytes(stream.body))["headers"]
    [xfcc] = headers["x-forwarded-client-cert"]
    [element] = parse_xfcc(xfcc)
    assert element["URI"] == ["spiffe://test/ns/prod/sa/bob"] and "By" not in element
    assert "forwarded" not in headers and "x-real-ip" not in headers and not any("_" in name for name in headers)
