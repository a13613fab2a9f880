"""
An upstream that accepts TCP and never speaks TLS (a hung process, a port-forward to nowhere, a
tarpit): C{connect_timeout} bounds the TCP connection *and* the TLS handshake, so the request fails
over to the next upstream, or gets a 502, after C{connect_timeout}, never after the route's whole
C{timeout}.  The silent upstream is a plain listener in this process that accepts and holds.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest
import yaml

from tests.conftest import ThreadedListener, echo_json, free_port, https_request, gateway_config

CONNECT_TIMEOUT = 1.0
ROUTE_TIMEOUT = 15.0


class SilentUpstream(ThreadedListener):
    """Accepts every connection and never sends or reads a byte, until stopped."""

    def __init__(self) -> None:
        self.held: list[socket.socket] = []
        self.accepted = threading.Event()
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        self.held.append(conn)
        self.accepted.set()

    def stop(self) -> None:
        super().stop()
        for conn in self.held:
            conn.close()


@pytest.fixture
def silent():
    upstream = SilentUpstream()
    yield upstream
    upstream.stop()


def _gateway(start_gateway, pki, tmp_path, targets: list[str]):
    port = free_port()
    config = gateway_config(pki, port, targets, {"connect_timeout": CONNECT_TIMEOUT, "timeout": ROUTE_TIMEOUT})
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(config))
    return start_gateway(["--config", str(path)], port=port)


def _timed_request(port: int, pki) -> tuple[int, bytes, float]:
    started = time.monotonic()
    status, _, body = https_request(port, "/", ca=pki["ca"], cert=pki["alice"], timeout=ROUTE_TIMEOUT + 15)
    return status, body, time.monotonic() - started


def test_a_silent_upstream_fails_over_to_the_next_within_connect_timeout(start_gateway, pki, tmp_path, silent, echo_upstream):
    gateway = _gateway(start_gateway, pki, tmp_path, [f"https://127.0.0.1:{silent.port}", f"https://127.0.0.1:{echo_upstream}"])
    # Round robin: of two requests, one tries the silent upstream first.
    for _ in range(2):
        status, body, took = _timed_request(gateway.port, pki)
        assert status == 200, body
        assert echo_json(body)["headers"]["host"] == [f"127.0.0.1:{echo_upstream}"]
        assert took < ROUTE_TIMEOUT / 2, f"{took:.1f}s: the silent upstream held the request"
    assert silent.accepted.is_set()
    log = gateway.proc.wait_for_log(f"upstream https://127.0.0.1:{silent.port} unreachable")
    assert "connect_timeout" in log


def test_only_a_silent_upstream_is_a_502_after_connect_timeout(start_gateway, pki, tmp_path, silent):
    gateway = _gateway(start_gateway, pki, tmp_path, [f"https://127.0.0.1:{silent.port}"])
    status, body, took = _timed_request(gateway.port, pki)
    assert status == 502, body
    assert b"upstream unavailable" in body
    assert CONNECT_TIMEOUT * 0.9 <= took < ROUTE_TIMEOUT / 2
    assert "connect_timeout" in gateway.proc.wait_for_log("502 for GET / on route localhost/")
