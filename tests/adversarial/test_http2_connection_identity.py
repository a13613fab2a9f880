"""
Attack class: one client's identity on another client's request, over HTTP/2.  An HTTP/2 connection
carries many streams and lives long; the gateway computes the peer's identity once per connection
and upstream connections are pooled across clients.  So: two clients' connections, streams
interleaved, each stream's upstream request must carry its own connection's XFCC (exactly one
element, never the other's); and a reload that changes the allow rules must apply to the next stream
of a connection that was open before it (the decision is per stream, only the verified certificate is
per connection).
"""

from __future__ import annotations

import json
import signal

import yaml

from mtlsgate.identity import parse_xfcc
from tests.conftest import free_port, gateway_config
from tests.h2peer import H2Client

ALICE = "spiffe://test/ns/prod/sa/alice"
BOB = "spiffe://test/ns/prod/sa/bob"


def _start(start_gateway, pki, echo_upstream, tmp_path, allowed: list[str]):
    port = free_port()
    path = tmp_path / "gw.yaml"

    def write(uris: list[str]) -> None:
        config = gateway_config(pki, port, [f"https://127.0.0.1:{echo_upstream}"], route={"allow_client": {"uri": uris}})
        path.write_text(yaml.safe_dump(config))

    write(allowed)
    return start_gateway(["--config", str(path)], port=port), write


def _uris(body: bytes) -> list[str]:
    values = json.loads(body)["headers"]["x-forwarded-client-cert"]
    assert len(values) == 1
    return [uri for element in parse_xfcc(values[0]) for uri in element["URI"]]


def test_interleaved_connections_of_two_clients_each_carry_their_own_identity(start_gateway, pki, echo_upstream, tmp_path):
    gateway, _ = _start(start_gateway, pki, echo_upstream, tmp_path, [ALICE, BOB])
    with H2Client(gateway.port, pki, "alice") as alice, H2Client(gateway.port, pki, "bob") as bob:
        sent = []
        for i in range(20):  # all in flight at once, alternating, before any answer is read
            sent.append(("alice", alice, alice.request("GET", f"/a{i}", headers=[(b"x-forwarded-client-cert", b"URI=" + BOB.encode())])))
            sent.append(("bob", bob, bob.request("GET", f"/b{i}", headers=[(b"x-forwarded-client-cert", b"URI=" + ALICE.encode())])))
        wrong = []
        for who, client, sid in sent:
            stream = client.response(sid)
            assert stream.status == 200
            expected = ALICE if who == "alice" else BOB
            if _uris(bytes(stream.body)) != [expected]:
                wrong.append(f"{who} stream {sid}: {_uris(bytes(stream.body))}")
        assert not wrong, "\n".join(wrong)


def test_a_reload_that_refuses_a_client_applies_to_the_next_stream_of_its_open_connection(start_gateway, pki, echo_upstream, tmp_path):
    gateway, write = _start(start_gateway, pki, echo_upstream, tmp_path, [ALICE, BOB])
    with H2Client(gateway.port, pki, "alice") as alice, H2Client(gateway.port, pki, "bob") as bob:
        assert alice.response(alice.request("GET", "/before")).status == 200
        assert bob.response(bob.request("GET", "/before")).status == 200
        write([BOB])
        gateway.proc.signal(signal.SIGHUP)
        gateway.proc.wait_for_log("reloaded:")
        after = alice.response(alice.request("GET", "/after-reload"))
        assert after.status == 403 and b"not allowed here" in bytes(after.body)
        assert alice.goaway is None  # the connection stays; each stream is judged under the rules in force
        kept = bob.response(bob.request("GET", "/after-reload"))
        assert kept.status == 200 and _uris(bytes(kept.body)) == [BOB]
    lines = [line for line in gateway.proc.output().splitlines() if "/after-reload HTTP/2" in line]
    assert any(" 403 " in line and "upstream=- " in line for line in lines)


def test_identity_in_request_trailers_never_reaches_the_upstream(start_gateway, pki, echo_upstream, tmp_path):
    """Request trailers are dropped (as the HTTP/1.1 engine drops chunked trailers): an XFCC there is nobody's."""
    gateway, _ = _start(start_gateway, pki, echo_upstream, tmp_path, [ALICE, BOB])
    with H2Client(gateway.port, pki, "alice") as c:
        sid = c.request("POST", "/trailers", body=b"hello", end=False)
        c.conn.send_headers(sid, [(b"x-forwarded-client-cert", b"URI=" + BOB.encode()), (b"x-real-ip", b"10.0.0.1")], end_stream=True)
        c.flush()
        stream = c.response(sid)
    assert stream.status == 200
    echoed = json.loads(bytes(stream.body))
    assert _uris(bytes(stream.body)) == [ALICE]
    assert "x-real-ip" not in echoed["headers"] and echoed["body_bytes"] == 5
