"""A real gateway with two routes on one host, C{/admin} for bob only and C{/} for alice only, and raw mTLS requests."""

from __future__ import annotations

import http.client
import io
import json
import socket
import ssl
from typing import Any

import pytest
import yaml

from tests.conftest import free_port, gateway_starter, start_echo_upstream, started_processes

PREFIXES = ["/admin", "/"]


def two_route_config(tmp_path, pki, upstream_port: int, port: int) -> str:
    upstream = {
        "to": [f"https://127.0.0.1:{upstream_port}"], "tls_custom_ca_file": pki["ca"],
        "tls_client_cert_file": pki["gateway_client"][0], "tls_client_key_file": pki["gateway_client"][1],
    }  # fmt: skip
    config = {
        "address": f"tcp:{port}:interface=127.0.0.1",
        "certificates": [{"cert": pki["gateway"][0], "key": pki["gateway"][1]}],
        "downstream_mtls": {"ca_file": pki["ca"]},
        "routes": [
            {"from": "https://localhost", "prefix": "/admin", "allow_client": {"uri": ["spiffe://test/ns/prod/sa/bob"]}, **upstream},
            {"from": "https://localhost", "prefix": "/", "allow_client": {"uri": ["spiffe://test/ns/prod/sa/alice"]}, **upstream},
        ],
    }  # fmt: skip
    path = tmp_path / "two-routes.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.fixture
def two_routes(start_gateway, pki, echo_upstream, tmp_path):
    port = free_port()
    return start_gateway(["--config", two_route_config(tmp_path, pki, echo_upstream, port)], port=port)


@pytest.fixture(scope="module")
def two_routes_for_the_module(pki, tmp_path_factory):
    """L{two_routes}, one for a module whose tests do not change its state (each finds its own log lines by a marker)."""
    tmp = tmp_path_factory.mktemp("two-routes")
    with started_processes() as procs:
        upstream, _ = start_echo_upstream(procs, pki, tmp)
        port = free_port()
        yield gateway_starter(procs, tmp)(["--config", two_route_config(tmp, pki, upstream, port)], port=port)


class _Sock:
    def __init__(self, data: bytes) -> None:
        self._data = data

    def makefile(self, mode: str) -> io.BytesIO:
        return io.BytesIO(self._data)


def raw_request(port: int, pki, client: str, head: bytes, timeout: float = 10.0) -> tuple[int, bytes]:
    """Send C{head} (request line and headers, CRLF CRLF included) as C{client} over mTLS, byte for byte; status and body."""
    ctx = ssl.create_default_context(cafile=pki["ca"])
    ctx.load_cert_chain(*pki[client])
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=timeout), server_hostname="localhost") as s:
        s.sendall(head)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    response = http.client.HTTPResponse(_Sock(data))  # type: ignore[arg-type]
    response.begin()
    return response.status, response.read()


def get(port: int, pki, client: str, target: bytes, extra: bytes = b"") -> tuple[int, bytes]:
    return raw_request(port, pki, client, b"GET " + target + b" HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n" + extra + b"\r\n")


def echoed(body: bytes) -> dict[str, Any]:
    return json.loads(body)
