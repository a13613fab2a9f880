"""
Three real gateway processes on 127.0.0.2, 127.0.0.3 and 127.0.0.4 share a real redis-server and a
real pebble.  pebble's DNS points the name at a node other than the one that orders, so validation
only passes if any node answers any challenge; the certificate is ordered exactly once and every node
serves it; renewal happens once; a node killed holding the lock is taken over after the lease; Redis
stopping does not stop serving, and issuance resumes when it returns.
"""

from __future__ import annotations

import itertools
import re
import signal
import ssl
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from mtlsgate.cluster.seal import new_key_text
from tests.conftest import TWISTD, Proc, admin_get, free_port, poll_pauses, scrape, wait_for_port

pytestmark = pytest.mark.needs("redis-server", "pebble")

NAME = "shared.example.test"
NODES = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
ISSUED = "issued a certificate for"
ORDERED = "ordered a certificate for"


def served_leaf(address: str, port: int, trust: bytes | None = None, client: tuple[str, str] | None = None) -> Any:
    import socket

    from cryptography import x509

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if trust is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx.load_verify_locations(cadata=trust.decode())
    if client:
        ctx.load_cert_chain(*client)
    with socket.create_connection((address, port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=NAME) as tls:
            return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))


def wait_until(check, timeout: float, what: str, interval: float | None = None) -> Any:
    """C{check()}'s first true value, looked for every C{interval} seconds (by default, soon at first and then every 0.2s)."""
    deadline = time.monotonic() + timeout
    pauses = poll_pauses(longest=0.2) if interval is None else itertools.repeat(interval)
    while True:
        try:
            result = check()
            if result:
                return result
        except (OSError, ssl.SSLError, AssertionError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"not after {timeout}s: {what}")
        time.sleep(next(pauses))


class Cluster:
    def __init__(self, tmp_path: Path, procs: list[Proc], redis, pebble, pki, *, lease: str = "30s", extra: dict | None = None) -> None:
        self.tmp_path = tmp_path
        self.procs = procs
        self.redis = redis
        self.pebble = pebble
        self.pki = pki
        self.port = pebble.tls_port_for_nodes
        self.http_port = pebble.http_port_for_nodes
        self.key_file = tmp_path / "storage.key"
        self.key_file.write_text(new_key_text())
        self.lease = lease
        self.extra = extra or {}
        self.nodes: dict[str, Proc] = {}
        self.admin: dict[str, int] = {}

    def config(self, address: str, lease: str | None = None, **autocert: Any) -> Path:
        admin = self.admin.setdefault(address, free_port())
        certs = self.tmp_path / f"node-{address}" / "certs"
        config = {
            "address": f"tcp:{self.port}:interface={address}",
            "http_address": f"tcp:{self.http_port}:interface={address}",
            "admin_address": f"tcp:{admin}",
            "certs_dir": str(certs),
            "downstream_mtls": {"ca_file": self.pki["ca"]},
            "storage": self.redis.url,
            "storage_key_file": str(self.key_file),
            "storage_lease": lease or self.lease,
            "storage_sync_interval": "2s",
            "autocert": {
                "directory": self.pebble.directory_url, "ca_file": str(self.pebble.ca_file), "email": "ops@example.test",
                "domains": [NAME], "challenges": ["tls-alpn-01"], "retry_interval": "1s", **autocert,
            },
            **self.extra,
        }  # fmt: skip
        path = self.tmp_path / f"node-{address}.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    def start(self, address: str, lease: str | None = None, **autocert: Any) -> Proc:
        argv = [*TWISTD, "-n", "--pidfile=", "--logfile=-", "mtlsgate", "--config", str(self.config(address, lease, **autocert))]
        proc = Proc(argv, self.tmp_path / f"node-{address}-{len(self.procs)}.log", cwd=self.tmp_path)
        self.procs.append(proc)
        self.nodes[address] = proc
        wait_for_port(self.admin[address], proc.popen, log=proc.log)
        return proc

    def logs(self) -> str:
        return "\n".join(p.output() for p in self.procs)

    def trust(self) -> bytes:
        return self.pebble.root_pem() + self.pebble.intermediate_pem()

    def serves_issued(self, address: str) -> Any:
        leaf = served_leaf(address, self.port, self.trust(), client=self.pki["alice"])
        return leaf


@pytest.fixture
def cluster(redis_server, start_pebble, procs, tmp_path, pki):
    """C{cluster(validity=None, **Cluster kwargs)}: pebble (its DNS points the name at the last node) and redis-server started."""

    def make(validity: int | None = None, **kwargs: Any) -> Cluster:
        tls_port, http_port = free_port(), free_port()
        pebble = start_pebble(http_port=http_port, tls_port=tls_port, validity=validity)
        pebble.tls_port_for_nodes, pebble.http_port_for_nodes = tls_port, http_port
        pebble.set_a(NAME, NODES[-1])
        return Cluster(tmp_path, procs, redis_server(persist=True), pebble, pki, **kwargs)

    return make


def hold_lock(redis, seconds: int) -> None:
    assert b"OK" in redis.command("SET", f"mtlsgate:lock:{NAME}", "held-by-the-test", "PX", str(seconds * 1000), "NX")


@pytest.mark.parametrize("challenge", ["tls-alpn-01", "http-01"])
def test_three_nodes_order_once_and_all_serve_the_certificate_validated_on_another_node(cluster, challenge):
    """
    B and C wait on a lock the test holds, looking again every 200s (a third of their lease); A (lease 3s) looks
    every second, so A wins the lock once the test lets it go, and the CA validates on C.
    """
    c = cluster()
    a, b, third = NODES  # the CA's validator reaches only C (the fixture's DNS)
    hold_lock(c.redis, 120)
    c.start(b, lease="600s", challenges=[challenge])
    c.start(third, lease="600s", challenges=[challenge])
    c.start(a, lease="3s", challenges=[challenge])
    for address in (b, third, a):
        c.nodes[address].wait_for_log("another gateway of the cluster is ordering", timeout=60)
    c.redis.command("DEL", f"mtlsgate:lock:{NAME}")
    c.nodes[a].wait_for_log(ISSUED, timeout=90)
    assert f"3 of 3 gateway(s) answer the {challenge} challenge" in c.nodes[a].output()
    validated = "closed the acme-tls/1 connection" if challenge == "tls-alpn-01" else "answered the http-01 challenge"
    assert validated in c.nodes[third].output()  # the CA validated on C
    assert validated not in c.nodes[a].output() + c.nodes[b].output()
    assert f"answering the {challenge} challenge for shared.example.test (from the shared store)" in c.nodes[third].output()
    leaves = {address: wait_until(lambda address=address: c.serves_issued(address), 30, f"{address} serves the issued certificate") for address in NODES}
    assert len({leaf.serial_number for leaf in leaves.values()}) == 1
    logs = c.logs()
    assert logs.count(ORDERED) == 1 and logs.count(ISSUED) == 1, logs
    for address in NODES:
        metrics = scrape(c.admin[address])
        assert metrics[("mtlsgate_shared_store_up", ())] == 1
        assert admin_get(c.admin[address], "/readyz") == (200, "ready\n")
    raw = c.redis.command("GET", f"mtlsgate:cert:{NAME}")
    assert b"BEGIN CERTIFICATE" in raw and b"PRIVATE KEY" not in raw
    # Redis loses everything (a new instance without persistence): the nodes write back what they hold
    c.redis.command("FLUSHALL")
    wait_until(lambda: b"BEGIN CERTIFICATE" in c.redis.command("GET", f"mtlsgate:cert:{NAME}"), 30, "the certificate written back")
    assert "wrote the local certificate for shared.example.test back to the shared store" in c.logs()
    assert c.logs().count(ORDERED) == 1


def test_a_renewal_also_happens_once(cluster):
    c = cluster(validity=45)  # renewed renew_before (30s) ahead: some 15s after issue, with 30s to spare before expiry
    hold_lock(c.redis, 120)  # until all three are up (the CA's validator reaches only the last one)
    for address in NODES:
        c.start(address, check_interval="2s", lease="3s", renew_before="30s")
    for address in NODES:
        c.nodes[address].wait_for_log("another gateway of the cluster is ordering", timeout=60)
    c.redis.command("DEL", f"mtlsgate:lock:{NAME}")
    wait_until(lambda: c.logs().count(ISSUED) >= 1, 60, "the first certificate", interval=0.5)
    first = wait_until(lambda: len({c.serves_issued(address).serial_number for address in NODES}) == 1 and c.serves_issued(NODES[0]).serial_number,
                       30, "every node serves the first certificate")  # fmt: skip
    held = {address: open_connection(address, c.port, c.pki) for address in NODES}  # open across the renewal
    wait_until(lambda: c.logs().count(ISSUED) >= 2, 120, "the renewal", interval=0.5)
    renewed = wait_until(lambda: len({c.serves_issued(address).serial_number for address in NODES} - {first}) == 1
                         and {c.serves_issued(address).serial_number for address in NODES}, 30, "every node serves the renewed certificate")  # fmt: skip
    assert first not in renewed and len(renewed) == 1
    logs = c.logs()
    assert logs.count(ORDERED) == logs.count(ISSUED) == 2, logs
    for address, conn in held.items():  # the swap dropped no connection
        conn.request("GET", "/", headers={"Host": NAME})
        assert conn.getresponse().status == 404  # no routes here: the gateway's own answer, on the old connection
        conn.close()


def open_connection(address: str, port: int, pki) -> Any:
    import http.client
    import socket

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(*pki["alice"])
    conn = http.client.HTTPConnection(address, port, timeout=10)
    conn.sock = ctx.wrap_socket(socket.create_connection((address, port), timeout=10), server_hostname=NAME)
    conn.request("GET", "/", headers={"Host": NAME})
    response = conn.getresponse()
    response.read()
    assert response.status == 404
    return conn


def test_a_node_killed_holding_the_lock_is_taken_over_after_the_lease(cluster, tmp_path):
    """The first orderer's DNS hook never returns (it stalls mid-order); it is killed there; another node completes."""
    import stat
    import sys

    c = cluster(lease="4s")
    gate = tmp_path / "stall"
    gate.write_text("")
    hook = tmp_path / "hook"
    real = tmp_path / "real-hook"
    from tests.acme.pebble import write_dns_hook

    write_dns_hook(real, c.pebble)
    hook.write_text(
        f"#!{sys.executable}\nimport os, sys, time\n"
        f"if sys.argv[1] == 'add' and os.path.exists({str(gate)!r}):\n"
        f"    os.unlink({str(gate)!r}); open({str(tmp_path / 'stalled')!r}, 'w').write(str(os.getppid()))\n"
        f"    while True: time.sleep(1)\n"
        f"os.execv({str(real)!r}, [{str(real)!r}] + sys.argv[1:])\n"
    )
    hook.chmod(hook.stat().st_mode | stat.S_IXUSR)
    settings = {"challenges": ["dns-01"], "dns_hook": str(hook), "dns_resolver": "%s:%d" % c.pebble.dns_address, "propagation_timeout": "20s"}
    for address in NODES:
        c.start(address, **settings)
    wait_until(lambda: (tmp_path / "stalled").exists() and (tmp_path / "stalled").read_text(), 60, "an orderer stalls in its DNS hook")
    holder_pid = int((tmp_path / "stalled").read_text())
    [holder] = [address for address, proc in c.nodes.items() if proc.popen.pid == holder_pid]
    c.nodes[holder].signal(signal.SIGKILL)
    c.nodes[holder].popen.wait(10)
    others = [address for address in NODES if address != holder]
    wait_until(lambda: any(ISSUED in c.nodes[o].output() for o in others), 120, "another node issues after the lease", interval=0.5)
    for address in others:
        wait_until(lambda address=address: c.serves_issued(address), 30, f"{address} serves it")
    import os

    for line in Path("/proc").glob("[0-9]*/cmdline"):  # the stalled hook outlives its gateway: stop it by PID
        try:
            if str(hook).encode() in line.read_bytes():
                os.kill(int(line.parent.name), signal.SIGKILL)
        except OSError:
            pass


def test_redis_away_nodes_keep_serving_and_issuance_resumes_with_nothing_lost(cluster):
    c = cluster()
    c.redis.stop()
    for address in reversed(NODES):  # the CA's validator reaches the last one: it starts first
        c.start(address)
    for address in NODES:
        wait_until(lambda address=address: "degraded: shared store unavailable" in admin_get(c.admin[address], "/readyz")[1]
                   or "not ready" in admin_get(c.admin[address], "/readyz")[1], 30, "readyz says why")  # fmt: skip
        assert scrape(c.admin[address])[("mtlsgate_shared_store_up", ())] == 0
        served_leaf(address, c.port)  # the placeholder, still serving TLS
    c.redis.start()
    wait_until(lambda: c.logs().count(ISSUED) == 1, 120, "issued once Redis is back", interval=0.5)
    serials = {wait_until(lambda address=address: c.serves_issued(address).serial_number, 30, "served") for address in NODES}
    assert len(serials) == 1
    for address in NODES:
        wait_until(lambda address=address: admin_get(c.admin[address], "/readyz") == (200, "ready\n"), 30, "ready, not degraded")
    # Redis stops again: every node keeps serving the certificate and says it is degraded
    c.redis.stop()
    for address in NODES:
        assert c.serves_issued(address).serial_number in serials
        wait_until(lambda address=address: admin_get(c.admin[address], "/readyz")[0] == 200
                   and "degraded" in admin_get(c.admin[address], "/readyz")[1], 30, "degraded")  # fmt: skip
    # Redis restarts from its dump file: the certificate is still there
    c.redis.start()
    raw = c.redis.command("GET", f"mtlsgate:cert:{NAME}")
    assert b"BEGIN CERTIFICATE" in raw
    assert re.search(rb"mtlsgate:cert:" + NAME.encode(), c.redis.command("KEYS", "mtlsgate:cert:*"))
