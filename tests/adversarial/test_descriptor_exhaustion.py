"""
Running out of file descriptors before C{max_connections}: with a low RLIMIT_NOFILE, idle TCP
connections used to take every descriptor, so accept() failed with EMFILE, connections piled up in
the backlog and legitimate clients hung.  The gateway raises its soft limit to the hard one and
clamps C{max_connections} to what the descriptors allow (two per connection: client and upstream,
plus a reserve), with a warning; past the clamp a connection is refused at once (closed), and
clients are served again as soon as the idle connections go.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import time

import pytest

from tests.conftest import gateway_args, https_request

IDLE = 300


def _tls_connection(port: int, pki) -> http.client.HTTPConnection:
    """A verified client connection, handshake done, no request sent yet."""
    ctx = ssl.create_default_context(cafile=pki["ca"])
    ctx.check_hostname = False
    ctx.load_cert_chain(*pki["alice"])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    conn.sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=20), server_hostname="localhost")
    return conn


def test_idle_connections_past_the_descriptor_limit_are_refused_cleanly(start_gateway, pki, echo_upstream):
    gateway = start_gateway(gateway_args(pki, echo_upstream), nofile=(128, 256))
    log = gateway.proc.wait_for_log("max_connections lowered")
    assert "soft limit raised from 128 to 256" in log
    admitted = _tls_connection(gateway.port, pki)  # admitted before the flood; its upstream connection comes later

    idle: list[socket.socket] = []
    try:
        for _ in range(IDLE):
            try:
                idle.append(socket.create_connection(("127.0.0.1", gateway.port), timeout=2))
            except OSError:
                pass
        # The admitted client still gets its upstream connection: descriptors are left for it.
        admitted.request("GET", "/", headers={"Host": "localhost"})
        response = admitted.getresponse()
        assert response.status == 200, response.read()
        admitted.close()
        # Every slot is taken: a new client is refused at once (served would do too), never left hanging.
        try:
            status = https_request(gateway.port, "/", ca=pki["ca"], cert=pki["alice"], timeout=5)[0]
            assert status == 200
        except TimeoutError:
            pytest.fail("a legitimate client was left hanging: the gateway stopped accepting")
        except (ssl.SSLError, ConnectionError, OSError):
            pass  # closed by the gateway: refused at max_connections
        gateway.proc.wait_for_log("connection(s) refused: at max_connections")
    finally:
        for sock in idle:
            sock.close()

    deadline = time.monotonic() + 15
    while True:  # the gateway notices the closed connections; then a client is served again
        try:
            status = https_request(gateway.port, "/", ca=pki["ca"], cert=pki["alice"], timeout=5)[0]
            break
        except (ssl.SSLError, ConnectionError, OSError):
            if time.monotonic() > deadline:
                raise
    assert status == 200
    out = gateway.proc.output()
    assert "Too many open files" not in out and "EMFILE" not in out
