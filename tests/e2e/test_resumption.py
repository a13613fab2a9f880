"""
TLS session resumption: returning clients resume (and keep their identity), the ticket key rotates
on schedule, and a reload that revokes a client cannot be bypassed with an old session.

With workers (C{MTLSGATE_TEST_WORKERS}), each worker has its own ticket key, rotated on its own
schedule, and a session resumes only on the worker that made it: the tests ask for
C{worker_affinity: client_ip}, so the client always reaches one worker, and watch that worker's
rotations (L{Gateway.log_prefix}).
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import time
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives.serialization import Encoding

from tests.conftest import gateway_args


class _Client:
    """One client context (Python resumes only sessions made by the same context) and its last session."""

    def __init__(self, pki, who: str) -> None:
        self.ctx = ssl.create_default_context(cafile=pki["ca"])
        self.ctx.load_cert_chain(*pki[who])
        self.session: ssl.SSLSession | None = None

    def get(self, port: int) -> tuple[bool, dict]:
        """A request on a new connection offering the last session; (resumed?, the echoed request)."""
        raw = socket.create_connection(("127.0.0.1", port), timeout=20)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
        conn.sock = self.ctx.wrap_socket(raw, server_hostname="localhost", session=self.session)
        conn.request("GET", "/", headers={"Host": "localhost"})
        response = conn.getresponse()
        body = json.loads(response.read())
        resumed = conn.sock.session_reused
        if not resumed:
            self.session = conn.sock.session  # TLS 1.3: the ticket arrived with the response
        conn.close()
        return resumed, body


#: A returning client reaches the worker whose ticket it holds (no effect on a single process).
SAME_WORKER = ("--worker-affinity", "client_ip")


def _config(tmp_path: Path, **keys) -> Path:
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(keys))
    return path


def test_a_returning_client_resumes_and_keeps_its_identity(start_gateway, pki, echo_upstream):
    gateway = start_gateway(gateway_args(pki, echo_upstream, *SAME_WORKER))
    client = _Client(pki, "alice")
    assert client.get(gateway.port)[0] is False
    for _ in range(5):
        resumed, body = client.get(gateway.port)
        assert resumed
        assert "spiffe://test/ns/prod/sa/alice" in body["headers"]["x-forwarded-client-cert"][0]


def _next_rotation(gateway) -> None:
    """Wait until the process serving the test client logs one more ticket-key rotation than it has so far."""
    rotated = gateway.log_prefix() + ROTATED
    before = gateway.proc.output().count(rotated)
    deadline = time.monotonic() + 20
    while gateway.proc.output().count(rotated) <= before:
        assert time.monotonic() < deadline, "no rotation logged"
        time.sleep(0.05)


ROTATED = "session-ticket key rotated"


def test_the_ticket_key_rotates_on_schedule(start_gateway, pki, echo_upstream, tmp_path):
    config = _config(tmp_path, session_ticket_rotation="3s")
    gateway = start_gateway(["--config", str(config), *gateway_args(pki, echo_upstream, *SAME_WORKER)])
    client = _Client(pki, "alice")
    _next_rotation(gateway)  # just after a rotation: the next is 3 s away
    assert client.get(gateway.port)[0] is False
    assert client.get(gateway.port)[0] is True
    _next_rotation(gateway)
    assert client.get(gateway.port)[0] is False  # the ticket's key is gone: a full handshake


def test_a_reload_that_revokes_a_client_is_not_bypassed_by_resumption(start_gateway, pki, echo_upstream, tmp_path):
    crl = tmp_path / "clients.crl"
    crl.write_bytes(pki["ca_obj"].crl([]).public_bytes(Encoding.PEM))
    gateway = start_gateway(gateway_args(pki, echo_upstream, "--crl", str(crl), *SAME_WORKER))
    client = _Client(pki, "revoked")
    client.get(gateway.port)
    assert client.get(gateway.port)[0] is True
    crl.write_bytes(Path(pki["crl"]).read_bytes())  # now revoking this client
    gateway.reload()
    with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
        client.get(gateway.port)
    assert "revoked" in gateway.proc.wait_for_log("revoked", timeout=10)


def test_a_rotation_keeps_refusing_unknown_server_names(start_gateway, pki, echo_upstream, tmp_path):
    config = _config(tmp_path, session_ticket_rotation="1s", unknown_sni="reject")
    gateway = start_gateway(["--config", str(config), *gateway_args(pki, echo_upstream, *SAME_WORKER)])
    _next_rotation(gateway)
    _next_rotation(gateway)
    ctx = ssl.create_default_context(cafile=pki["ca"])
    ctx.check_hostname = False
    ctx.load_cert_chain(*pki["alice"])
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as raw:
            ctx.wrap_socket(raw, server_hostname="unknown.example").close()
    assert _Client(pki, "alice").get(gateway.port)[0] is False  # the served name still works
