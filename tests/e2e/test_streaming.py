"""Bodies stream both ways with back-pressure: a 256 MiB upload and download in bounded gateway memory."""

from __future__ import annotations

import hashlib
import http.client
import socket
import ssl

import pytest

from tests.conftest import echo_json, gateway_args

SIZE = 256 * 1024 * 1024
RSS_LIMIT_KIB = 100 * 1024


def peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


def _connection(port: int, pki) -> http.client.HTTPConnection:
    ctx = ssl.create_default_context(cafile=pki["ca"])
    ctx.load_cert_chain(*pki["alice"])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="localhost")
    return conn


@pytest.fixture
def gateway(start_gateway, pki, echo_upstream):
    return start_gateway(gateway_args(pki, echo_upstream, "--timeout", "120s"))


def test_large_upload_streams_in_bounded_memory(gateway, pki):
    chunk = bytes(range(256)) * 256
    expected = hashlib.sha256()

    def body():
        for _ in range(SIZE // len(chunk)):
            expected.update(chunk)
            yield chunk

    conn = _connection(gateway.port, pki)
    conn.request("POST", "/upload", body=body(), headers={"Host": "localhost"}, encode_chunked=True)
    response = conn.getresponse()
    echoed = echo_json(response.read())
    assert response.status == 200
    assert echoed["body_bytes"] == SIZE
    assert echoed["body_sha256"] == expected.hexdigest()
    assert peak_rss_kib(gateway.proc.popen.pid) < RSS_LIMIT_KIB


def test_large_download_streams_in_bounded_memory(gateway, pki):
    conn = _connection(gateway.port, pki)
    conn.request("GET", f"/bytes/{SIZE}", headers={"Host": "localhost"})
    response = conn.getresponse()
    assert response.status == 200
    assert int(response.getheader("content-length")) == SIZE
    received = 0
    while data := response.read(1 << 20):
        received += len(data)
    assert received == SIZE
    assert peak_rss_kib(gateway.proc.popen.pid) < RSS_LIMIT_KIB


def test_upload_with_content_length_is_forwarded_whole(gateway, pki):
    payload = b"x" * 3_000_000
    conn = _connection(gateway.port, pki)
    conn.request("PUT", "/put", body=payload, headers={"Host": "localhost", "Content-Type": "application/octet-stream"})
    response = conn.getresponse()
    echoed = echo_json(response.read())
    assert echoed["method"] == "PUT"
    assert echoed["body_sha256"] == hashlib.sha256(payload).hexdigest()
    assert echoed["headers"]["content-length"] == ["3000000"]
