"""
The soak: keep-alive and new-connection load while the certificate is rotated and the gateway
reloaded (SIGHUP) again and again.  Pass: no failed request, no file-descriptor growth, RSS stable
within 10 % after warm-up.  The pace is the gateway's: each cycle rotates the certificate, sends
SIGHUP, waits for the reload to be logged, then for the loads to make REQUESTS_PER_CYCLE more requests,
each thread at least EACH_PER_CYCLE (so every kind of load runs across every reload).  CI runs WARM_UP_CYCLES then CYCLES measured
ones; the long version also keeps cycling for MTLSGATE_SOAK_SECONDS:

    MTLSGATE_SOAK_SECONDS=1800 python -m pytest -m soak -s tests/e2e/test_soak.py

MTLSGATE_SOAK_WORKERS=2 runs the gateway with two workers (SIGHUP forwarded to both; RSS and fds
summed over the parent and its workers).
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import ssl
import threading
import time

import pytest
import yaml

from tests.conftest import free_port, https_request

pytestmark = pytest.mark.soak

SECONDS = float(os.environ.get("MTLSGATE_SOAK_SECONDS", "0"))
WORKERS = int(os.environ.get("MTLSGATE_SOAK_WORKERS", "1"))
WARM_UP_CYCLES = 3
CYCLES = 12  # measured reloads, at least
REQUESTS_PER_CYCLE = 600  # by the load threads together, between one reload and the next
EACH_PER_CYCLE = 10  # by each of them (a new connection per request is the slowest)


def _status(pid: int) -> dict[str, int]:
    """RSS and open fds of C{pid} and its children (the workers, with MTLSGATE_SOAK_WORKERS)."""
    children = open(f"/proc/{pid}/task/{pid}/children").read().split()
    total = {"rss_kib": 0, "fds": 0}
    for each in [pid, *map(int, children)]:
        for key, value in _one_status(each).items():
            total[key] += value
    return total


def _one_status(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {"rss_kib": int(fields["VmRSS"].split()[0]), "fds": len(os.listdir(f"/proc/{pid}/fd"))}


class Load(threading.Thread):
    def __init__(self, port: int, pki, keepalive: bool, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.port, self.pki, self.keepalive, self.stop = port, pki, keepalive, stop
        self.ok = 0
        self.failures: list[str] = []

    def _connection(self) -> http.client.HTTPConnection:
        ctx = ssl.create_default_context(cafile=self.pki["ca"])
        ctx.load_cert_chain(*self.pki["alice"])
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=20)
        conn.sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", self.port), timeout=20), server_hostname="localhost")
        return conn

    def run(self) -> None:
        conn = self._connection() if self.keepalive else None
        while not self.stop.is_set():
            try:
                if conn is None:
                    status = https_request(self.port, "/soak", ca=self.pki["ca"], cert=self.pki["alice"])[0]
                else:
                    conn.request("GET", "/soak", headers={"Host": "localhost"})
                    response = conn.getresponse()
                    response.read()
                    status = response.status
                if status == 200:
                    self.ok += 1
                else:
                    self.failures.append(f"status {status}")
            except Exception as e:  # noqa: BLE001 - every failure is counted and reported
                self.failures.append(f"{type(e).__name__}: {e}")
                if conn is not None:
                    conn.close()
                    conn = self._connection()
        if conn is not None:
            conn.close()


def test_load_with_certificate_rotation_and_reloads(start_gateway, pki, echo_upstream, tmp_path):
    port = free_port()
    cert, key = tmp_path / "served.pem", tmp_path / "served-key.pem"
    pki["ca_obj"].issue_server(["localhost", "127.0.0.1"]).write(str(cert), str(key))
    config = {
        "address": f"tcp:{port}:interface=127.0.0.1",
        "certificates": [{"cert": str(cert), "key": str(key)}],
        "downstream_mtls": {"ca_file": pki["ca"]},
        "watch_interval": "off",
        "workers": WORKERS,
        "routes": [{
            "from": "https://localhost", "to": [f"https://127.0.0.1:{echo_upstream}"], "tls_custom_ca_file": pki["ca"],
            "tls_client_cert_file": pki["gateway_client"][0], "tls_client_key_file": pki["gateway_client"][1],
        }],
    }  # fmt: skip
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(config))
    gateway = start_gateway(["--config", str(path)], port=port)
    pid = gateway.proc.popen.pid
    if WORKERS > 1:
        gateway.proc.wait_for_log(f"worker {WORKERS - 1} serving", timeout=30)

    stop = threading.Event()
    loads = [Load(port, pki, keepalive=True, stop=stop), Load(port, pki, keepalive=True, stop=stop), Load(port, pki, keepalive=False, stop=stop)]
    for load in loads:
        load.start()
    reloads = 0

    def cycle() -> None:
        """Rotate, reload, and wait until it is done and every load thread has made its requests since."""
        nonlocal reloads
        pki["ca_obj"].issue_server(["localhost", "127.0.0.1"]).write(str(cert), str(key))
        gateway.proc.signal(signal.SIGHUP)
        reloads += 1
        gateway.proc.wait_for_count("reloaded:", reloads * WORKERS, timeout=60)  # each worker logs its own
        _wait_for_requests(loads, REQUESTS_PER_CYCLE, EACH_PER_CYCLE)

    _wait_for_requests(loads, REQUESTS_PER_CYCLE, EACH_PER_CYCLE)
    for _ in range(WARM_UP_CYCLES):
        cycle()
    start = _status(pid)
    started = time.monotonic()
    measured = 0
    while measured < CYCLES or time.monotonic() - started < SECONDS:
        cycle()
        measured += 1
    end = _status(pid)
    stop.set()
    for load in loads:
        load.join(30)

    requests = sum(load.ok for load in loads)
    failures = [f for load in loads for f in load.failures]
    print(f"\nsoak {time.monotonic() - started:.0f}s measured, {WORKERS} worker(s): {requests} requests, {reloads} reloads, {len(failures)} failures, "
          f"RSS {start['rss_kib']} -> {end['rss_kib']} KiB, fds {start['fds']} -> {end['fds']}")
    assert failures == []
    assert requests > 0
    assert gateway.proc.output().count("reloaded:") >= reloads * WORKERS
    assert end["fds"] <= start["fds"] + 4
    assert end["rss_kib"] <= start["rss_kib"] * 1.10


def _wait_for_requests(loads: list[Load], total: int, each: int, timeout: float = 60.0) -> None:
    """Until the load threads have made C{total} more requests, each at least C{each} (failures count: they are reported at the end)."""

    def made() -> list[int]:
        return [load.ok + len(load.failures) for load in loads]

    before = made()
    deadline = time.monotonic() + timeout
    while sum(now := made()) < sum(before) + total or any(n < b + each for n, b in zip(now, before)):
        assert time.monotonic() < deadline, f"the load made fewer than {total} requests ({each} per thread) in {timeout}s"
        time.sleep(0.05)
