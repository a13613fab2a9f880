"""
C{--workers 2}: both workers serve, SIGHUP reaches both, SIGTERM drains a request in flight, and a
worker killed with SIGKILL is restarted while a request on the other one carries on.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import free_port, gateway_args, https_request, scrape, wait_for_port


def _start(start_gateway, pki, echo_upstream, tmp_path: Path, *extra: str):
    access = tmp_path / "access.json"
    gateway = start_gateway(
        gateway_args(pki, echo_upstream, "--workers", "2", "--access-log", str(access), "--access-log-format", "json",
                     "--timeout", "20s", *extra)
    )  # fmt: skip
    gateway.proc.wait_for_log("worker 0 serving", timeout=30)
    gateway.proc.wait_for_log("worker 1 serving", timeout=30)
    return gateway, access


def _pids(access: Path) -> list[int]:
    return [json.loads(line)["pid"] for line in access.read_text().splitlines() if line.strip()]


def _wait_for_lines(access: Path, count: int, timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = _pids(access)
        if len(pids) >= count:
            return pids
        time.sleep(0.05)
    raise AssertionError(f"{count} access lines expected, found {_pids(access)}")


class _KeepAlive:
    """One keep-alive mTLS connection to the gateway."""

    def __init__(self, port: int, pki) -> None:
        ctx = ssl.create_default_context(cafile=pki["ca"])
        ctx.load_cert_chain(*pki["alice"])
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.conn.sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="localhost")

    def get(self, path: str) -> int:
        self.conn.request("GET", path, headers={"Host": "localhost"})
        response = self.conn.getresponse()
        response.read()
        return response.status

    def close(self) -> None:
        self.conn.close()


def _connection_per_worker(port: int, pki, access: Path) -> dict[int, _KeepAlive]:
    """Open connections until one lands on each worker; returns them by the worker's pid."""
    found: dict[int, _KeepAlive] = {}
    for _ in range(60):
        before = len(_pids(access))
        conn = _KeepAlive(port, pki)
        assert conn.get("/which") == 200
        pid = _wait_for_lines(access, before + 1)[-1]
        if pid in found:
            conn.close()
        else:
            found[pid] = conn
        if len(found) == 2:
            return found
    raise AssertionError(f"60 connections all went to {list(found)}")


def test_both_workers_serve_and_their_metrics_add_up(start_gateway, pki, echo_upstream, tmp_path):
    admin = free_port()
    gateway, access = _start(start_gateway, pki, echo_upstream, tmp_path, "--admin", f"tcp:{admin}")
    wait_for_port(admin)
    for _ in range(40):  # new connections: the kernel spreads them over the workers' sockets
        status, _, _ = https_request(gateway.port, "/", ca=pki["ca"], cert=pki["alice"])
        assert status == 200
    pids = _wait_for_lines(access, 40)
    assert len(set(pids)) == 2, pids
    assert gateway.proc.popen.pid not in pids  # the parent serves no TLS
    metrics = scrape(admin)
    assert metrics[("mtlsgate_requests_total", (("route", "localhost/"), ("status", "200")))] == 40
    assert metrics[("mtlsgate_workers", ())] == 2


def test_sighup_reaches_every_worker(start_gateway, pki, echo_upstream, tmp_path):
    gateway, _ = _start(start_gateway, pki, echo_upstream, tmp_path)
    gateway.proc.signal(signal.SIGHUP)
    gateway.proc.wait_for_log("[worker-0] reloaded")
    gateway.proc.wait_for_log("[worker-1] reloaded")
    assert https_request(gateway.port, "/", ca=pki["ca"], cert=pki["alice"])[0] == 200


def test_sigterm_drains_a_request_in_flight(start_gateway, pki, echo_upstream, tmp_path):
    gateway, _ = _start(start_gateway, pki, echo_upstream, tmp_path)
    result: list = []
    slow = threading.Thread(target=lambda: result.append(https_request(gateway.port, "/slow/2", ca=pki["ca"], cert=pki["alice"])))
    slow.start()
    time.sleep(0.7)  # the request is at the upstream now
    gateway.proc.signal(signal.SIGTERM)
    gateway.proc.wait_for_log("for 1 request(s) in flight")
    with pytest.raises(OSError):  # while it drains, a new connection is refused, not queued for no one
        socket.create_connection(("127.0.0.1", gateway.port), timeout=2).close()
    slow.join(30)
    assert result and result[0][0] == 200
    assert gateway.proc.popen.wait(30) in (0, -signal.SIGTERM)
    out = gateway.proc.output()
    assert "worker 0 (pid" in out and "worker 1 (pid" in out and "exited with status 0" in out
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", gateway.port), timeout=2).close()


def test_a_killed_worker_is_restarted_and_the_other_carries_on(start_gateway, pki, echo_upstream, tmp_path):
    gateway, access = _start(start_gateway, pki, echo_upstream, tmp_path)
    by_pid = _connection_per_worker(gateway.port, pki, access)
    victim, survivor = sorted(by_pid)
    result: list[int] = []
    slow = threading.Thread(target=lambda: result.append(by_pid[survivor].get("/slow/2")))
    slow.start()
    time.sleep(0.7)
    os.kill(victim, signal.SIGKILL)
    slow.join(30)
    assert result == [200]  # the request on the other worker was not disturbed
    gateway.proc.wait_for_log(f"(pid {victim}) was killed by SIGKILL; restarting it")
    out = gateway.proc.wait_for_log("serving (pid", timeout=30)
    deadline = time.monotonic() + 30
    while out.count("serving (pid") < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
        out = gateway.proc.output()
    assert out.count("serving (pid") == 3, out
    for _ in range(10):  # new connections reach both again, the replacement included
        assert https_request(gateway.port, "/", ca=pki["ca"], cert=pki["alice"])[0] == 200
    for conn in by_pid.values():
        conn.close()


def _resume(port: int, pki, session, source: str = "127.0.0.1") -> tuple[bool, ssl.SSLSession, dict]:
    """One request on a new connection offering C{session}; (resumed?, the new session, the echo)."""
    ctx = _client_context(pki)
    raw = socket.create_connection(("127.0.0.1", port), timeout=20, source_address=(source, 0))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    conn.sock = ctx.wrap_socket(raw, server_hostname="localhost", session=session)
    conn.request("GET", "/", headers={"Host": "localhost"})
    response = conn.getresponse()
    body = json.loads(response.read())
    resumed, new_session = conn.sock.session_reused, conn.sock.session
    conn.close()
    return resumed, new_session, body


_CONTEXTS: dict[str, ssl.SSLContext] = {}


def _client_context(pki) -> ssl.SSLContext:
    """One client context for all connections: Python resumes only sessions of the same context."""
    if "alice" not in _CONTEXTS:
        ctx = ssl.create_default_context(cafile=pki["ca"])
        ctx.load_cert_chain(*pki["alice"])
        _CONTEXTS["alice"] = ctx
    return _CONTEXTS["alice"]


def test_client_ip_affinity_sends_a_client_back_to_the_worker_that_can_resume_its_session(start_gateway, pki, echo_upstream, tmp_path):
    gateway, access = _start(start_gateway, pki, echo_upstream, tmp_path, "--worker-affinity", "client_ip")
    workers_seen = set()
    for source in ("127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"):
        before = len(_wait_for_lines(access, 0))
        resumed, session, _ = _resume(gateway.port, pki, None, source)
        assert not resumed
        for _ in range(8):
            resumed, _, body = _resume(gateway.port, pki, session, source)
            assert resumed, f"a connection from {source} was not resumed"
            assert "spiffe://test/ns/prod/sa/alice" in body["headers"]["x-forwarded-client-cert"][0]  # the identity survives resumption
        pids = _wait_for_lines(access, before + 9)[before:]
        assert len(set(pids)) == 1, f"{source}'s connections went to several workers: {pids}"
        workers_seen.add(pids[0])
    assert len(workers_seen) == 2  # the four addresses hash to both workers


def test_a_port_in_use_stops_the_group_before_any_worker_starts(pki, tmp_path):
    from tests.conftest import run_python_twistd_check

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_python_twistd_check(
            ["--https", f"tcp:{port}:interface=127.0.0.1", "--workers", "2", "--cert", pki["gateway"][0], "--key", pki["gateway"][1]],
            tmp_path,
        )
    assert result.returncode != 0
    assert "cannot listen for the worker group" in result.stdout + result.stderr
    assert "worker 0 started" not in result.stdout + result.stderr
