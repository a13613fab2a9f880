"""
Attack class: byte order, loss, duplication and back-pressure under "sending at once"
(mtlsgate/tls/fastwrite.py).  The gateway's TLS output goes straight to the socket when Twisted's
transport holds nothing unsent, else through the buffered write; writes of a full TLS record (16 KiB)
or more take the buffered path.  An attacker picks the sizes, the pipelining and the pace of reading
so that direct and buffered sends alternate on one connection: pipelined requests whose responses
straddle the 16 KiB threshold, a client that stops reading mid-response (zero window) and resumes,
a client that resets or half-closes while a send is partial, an upstream that reads an upload slowly.

The decision: every byte the upstream sent reaches the client once and in order (bodies are seeded
random bytes, compared whole, so a reordered or repeated record cannot pass), whatever the pace; a
client that stops reading stops the upstream (the gateway's memory stays bounded, the upstream is
not drained into the gateway); a client gone mid-send costs its connection only.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import yaml

from tests.adversarial.send_at_once_peers import (
    SIZES_AROUND_A_RECORD, RandomUpstream, RawClient, body_for, get, random_route_config, tree_rss, wait_until_still,
)  # fmt: skip
from tests.conftest import free_port

STALLED = 64 * 2**20  # far more than every buffer between the upstream and a client that reads nothing


def _gateway(start_gateway, pki, tmp_path, upstream: RandomUpstream):
    port = free_port()
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(random_route_config(pki, port, upstream.port)))
    return start_gateway(["--config", str(path)], port=port)


@pytest.fixture
def upstream(pki):
    peer = RandomUpstream(pki)
    yield peer
    peer.stop()


@pytest.fixture
def gateway(start_gateway, pki, tmp_path, upstream):
    return _gateway(start_gateway, pki, tmp_path, upstream)


def test_pipelined_responses_around_a_record_arrive_whole_and_in_order(gateway, pki):
    client = RawClient(gateway.port, pki)
    try:
        paths = [f"/rand/{size}/{seed}" for seed, size in enumerate(SIZES_AROUND_A_RECORD)]
        client.send(b"".join(get(p) for p in paths))  # one flight: responses small and bulk, back to back
        for seed, size in enumerate(SIZES_AROUND_A_RECORD):
            status, _, body = client.read_response()
            assert status == 200
            assert len(body) == size and body == body_for(size, seed), f"response {seed} ({size} bytes) is not what the upstream sent"
    finally:
        client.close()
    assert "Traceback" not in gateway.proc.output()


def test_pipelined_responses_read_in_small_sips_arrive_whole_and_in_order(gateway, pki):
    """A 4 KiB receive window: every response meets a full socket, so direct and buffered sends alternate within one response."""
    client = RawClient(gateway.port, pki, rcvbuf=4096)
    try:
        sizes = [16385, 1, 262145, 16384, 5, 16383]
        client.send(b"".join(get(f"/rand/{size}/{100 + i}") for i, size in enumerate(sizes)))
        for i, size in enumerate(sizes):
            status, _, body = client.read_response()
            assert status == 200 and body == body_for(size, 100 + i)
    finally:
        client.close()


def test_a_client_that_stops_reading_holds_back_the_upstream_and_then_gets_every_byte(gateway, pki, upstream):
    path = f"/rand/{STALLED}/7"
    client = RawClient(gateway.port, pki, rcvbuf=4096)
    try:
        before = tree_rss(gateway.proc.popen.pid)
        client.send(get(path))
        status, fields = client.read_head()
        assert status == 200 and int(fields["content-length"]) == STALLED
        first = client.read_exact(1)
        sent = wait_until_still(lambda: upstream.sent.get(path, 0))  # the client reads nothing more: the flow stops somewhere
        grown = tree_rss(gateway.proc.popen.pid) - before
        assert sent < STALLED, "the gateway took the whole body from the upstream for a client that reads nothing"
        assert grown < 48 * 2**20, f"the gateway grew by {grown / 2**20:.1f} MiB holding a stalled response"
        rest = client.read_exact(STALLED - 1)  # resume: the rest, once, in order
        assert hashlib.sha256(first + rest).digest() == hashlib.sha256(body_for(STALLED, 7)).digest()
        client.send(get("/rand/16385/8"))  # the connection serves on
        assert client.read_response()[2] == body_for(16385, 8)
    finally:
        client.close()


def test_a_client_that_resets_mid_response_costs_only_its_connection(gateway, pki, upstream):
    for round_ in range(3):
        client = RawClient(gateway.port, pki, rcvbuf=4096)
        client.send(get(f"/rand/{8 * 2**20}/{200 + round_}") + get("/rand/16384/1"))  # a partial send, another response queued behind it
        client.read_head()
        client.read_exact(100)
        client.reset()
    after = RawClient(gateway.port, pki)
    try:
        after.send(get("/rand/1048577/9") + get("/rand/1/10"))
        assert after.read_response()[2] == body_for(1048577, 9)
        assert after.read_response()[2] == body_for(1, 10)
    finally:
        after.close()
    assert "Traceback" not in gateway.proc.output()


def test_a_client_that_half_closes_gets_a_prefix_of_the_truth_or_all_of_it(gateway, pki):
    """FIN after the requests: whatever the gateway still sends must be what the upstream sent, in order, nothing else."""
    sizes = [16385, 1048577, 1]
    client = RawClient(gateway.port, pki, rcvbuf=4096)
    try:
        client.send(b"".join(get(f"/rand/{size}/{300 + i}") for i, size in enumerate(sizes)))
        client.half_close()
        received = bytearray()
        while True:
            try:
                chunk = client.sock.recv(65536)
            except (OSError, ValueError):
                break
            if not chunk:
                break
            received += chunk
    finally:
        client.close()
    expected = bytearray()
    stream = bytes(received)
    for i, size in enumerate(sizes):  # rebuild what a faithful gateway sends, head by head, from the heads it sent
        head, sep, stream = stream.partition(b"\r\n\r\n")
        if not sep:
            break
        assert head.startswith(b"HTTP/1.1 200"), head[:100]
        expected += head + sep + body_for(size, 300 + i)
        stream = bytes(received[len(expected):]) if len(received) >= len(expected) else b""
        if len(received) < len(expected):
            break
    assert bytes(received) == bytes(expected[: len(received)]), "the bytes after a half-close are not a prefix of the responses"
    assert "Traceback" not in gateway.proc.output()


def test_a_large_upload_to_an_upstream_that_reads_slowly_arrives_whole(start_gateway, pki, tmp_path):
    slow = RandomUpstream(pki, slow=True)
    try:
        gateway = _gateway(start_gateway, pki, tmp_path, slow)
        body = body_for(4 * 2**20 + 1, 11)
        client = RawClient(gateway.port, pki)
        try:
            for size in (16384, 16385, len(body)):
                part = body[:size]
                client.send(b"POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n" % size + part)
                status, _, answer = client.read_response()
                assert status == 200
                echoed = json.loads(answer)
                assert echoed["bytes"] == size and echoed["sha256"] == hashlib.sha256(part).hexdigest()
        finally:
            client.close()
    finally:
        slow.stop()
