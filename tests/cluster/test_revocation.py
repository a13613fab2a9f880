"""
Revocation across the cluster: C{mtlsgate ca revoke --storage} publishes the CA's CRL to Redis and
three real gateways on 127.0.0.2-4 refuse the certificate within seconds, without a restart and
without dropping other clients; a node restarted while Redis is away still refuses it (its copy on disk).
"""

from __future__ import annotations

import http.client
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mtlsgate.cluster.seal import new_key_text
from tests.cluster.test_cluster import NODES, wait_until
from tests.conftest import TWISTD, Proc, admin_get, free_port, gateway_config, scrape, start_echo_upstream, subprocess_env

pytestmark = pytest.mark.needs("redis-server")

CLI = [sys.executable, "-c", "from mtlsgate.cli.main import main; import sys; sys.exit(main())"]


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=120)


def request(address: str, port: int, ca: str, cert: tuple[str, str]) -> int:
    """Status of GET / with the client certificate; raises OSError/SSLError when refused."""
    ctx = ssl.create_default_context(cafile=ca)
    ctx.check_hostname = False
    ctx.load_cert_chain(*cert)
    with socket.create_connection((address, port), timeout=10) as raw:
        conn = http.client.HTTPConnection(address, port, timeout=10)
        conn.sock = ctx.wrap_socket(raw, server_hostname="localhost")
        conn.request("GET", "/", headers={"Host": "localhost"})
        return conn.getresponse().status


def refused(address: str, port: int, ca: str, cert: tuple[str, str]) -> bool:
    try:
        request(address, port, ca, cert)
    except (OSError, ssl.SSLError, http.client.HTTPException):
        return True
    return False


@pytest.mark.parametrize("workers", [1, 2])
def test_ca_revoke_with_storage_refuses_the_client_on_every_node(redis_server, procs, pki, tmp_path, workers):
    """With workers: 2, worker 0 holds the Redis connection and the other picks the CRLs up from disk."""
    redis = redis_server()
    assert cli(tmp_path, "ca", "init", "--dir", "ca").returncode == 0
    for name in ("alice", "bob"):
        done = cli(tmp_path, "ca", "issue", "client", name, "--dir", "ca", "--uri", f"spiffe://test/{name}")
        assert done.returncode == 0, done.stderr
    alice, bob = (str(tmp_path / "alice.pem"), str(tmp_path / "alice-key.pem")), (str(tmp_path / "bob.pem"), str(tmp_path / "bob-key.pem"))
    upstream, _ = start_echo_upstream(procs, pki, tmp_path)
    key_file = tmp_path / "storage.key"
    key_file.write_text(new_key_text())
    port = free_port()
    configs = {}
    admin = {address: free_port() for address in NODES}
    for address in NODES:
        config = gateway_config(pki, port, [f"https://127.0.0.1:{upstream}"])
        config.update(
            address=f"tcp:{port}:interface={address}", downstream_mtls={"ca_file": str(tmp_path / "ca" / "ca.pem")},
            certs_dir=str(tmp_path / f"certs-{address}"), storage=redis.url, storage_key_file=str(key_file), storage_sync_interval="2s",
            workers=workers, watch_interval="1s", admin_address=f"tcp:{admin[address]}",
        )  # fmt: skip
        (tmp_path / f"certs-{address}").mkdir()
        path = tmp_path / f"gw-{address}.yaml"
        path.write_text(yaml.safe_dump(config))
        configs[address] = path
    nodes = {}

    def launch(address: str) -> Proc:
        proc = Proc([*TWISTD, "-n", "--pidfile=", "--logfile=-", "mtlsgate", "--config", str(configs[address])],
                    tmp_path / f"gw-{address}-{len(procs)}.log", cwd=tmp_path)  # fmt: skip
        procs.append(proc)
        nodes[address] = proc
        return proc

    def listening(address: str) -> None:
        nodes[address].wait_for_log("listening on", timeout=30)
        wait_until(lambda: socket.create_connection((address, port), timeout=2).close() or True, 30, f"{address}:{port} listens")

    def start(address: str) -> Proc:
        launch(address)
        listening(address)
        return nodes[address]

    for address in NODES:  # the three start side by side
        launch(address)
    for address in NODES:
        listening(address)
    for address in NODES:
        assert request(address, port, pki["ca"], alice) == 200
    # a connection alice opened before the revocation carries on: contexts swap, open connections stay
    ctx = ssl.create_default_context(cafile=pki["ca"])
    ctx.check_hostname = False
    ctx.load_cert_chain(*alice)
    held = http.client.HTTPConnection(NODES[0], port, timeout=10)
    held.sock = ctx.wrap_socket(socket.create_connection((NODES[0], port), timeout=10), server_hostname="localhost")
    held.request("GET", "/", headers={"Host": "localhost"})
    assert held.getresponse().read() and True

    done = cli(tmp_path, "ca", "revoke", "alice.pem", "--dir", "ca", "--storage", redis.url)
    assert done.returncode == 0, done.stderr
    assert "published the CRL to" in done.stdout
    for address in NODES:
        # ten new connections in a row refused: whichever worker takes them
        wait_until(lambda address=address: all(refused(address, port, pki["ca"], alice) for _ in range(10)), 15, f"{address} refuses alice")
        assert request(address, port, pki["ca"], bob) == 200
        assert "shared CRLs changed" in nodes[address].output()
    held.request("GET", "/", headers={"Host": "localhost"})
    assert held.getresponse().status == 200  # the verdict of its handshake stands for its life; new ones are refused
    held.close()

    up = [value for (name, _), value in scrape(admin[NODES[0]]).items() if name == "mtlsgate_shared_store_up"]
    assert up == [1.0]  # with workers, worker 0's (labelled with its pid)
    # Redis goes away: /readyz stays 200 and says why it is degraded (with workers, the parent's too)
    redis.stop()
    # the CLI, asked to publish now, tries for its 10s timeout: it runs while the nodes are checked (its verdict below)
    publishing = subprocess.Popen([*CLI, "ca", "revoke", "bob.pem", "--dir", "ca", "--storage", redis.url], cwd=tmp_path, env=subprocess_env(),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    for address in (NODES[0], NODES[2]):
        wait_until(lambda address=address: admin_get(admin[address], "/readyz")[0] == 200
                   and "ready, degraded: shared store unavailable" in admin_get(admin[address], "/readyz")[1], 30, f"{address} degraded")  # fmt: skip
    # a node restarts: it still refuses alice, from its copy on disk
    nodes[NODES[1]].stop()
    start(NODES[1])
    assert refused(NODES[1], port, pki["ca"], alice)
    assert request(NODES[1], port, pki["ca"], bob) == 200

    # the CLI says clearly when it cannot publish, and leaves the local CRL written
    _, stderr = publishing.communicate(timeout=120)
    assert publishing.returncode != 0 and "written locally but not published" in stderr and "Traceback" not in stderr
    # and Redis restarted empty (no persistence): the nodes write the CRL they hold back
    redis.start()
    wait_until(lambda: redis.command("HLEN", "mtlsgate:crls") == b":1\r\n", 30, "the CRL written back by a node")


def test_a_password_on_the_command_line_is_refused(tmp_path):
    assert cli(tmp_path, "ca", "init", "--dir", "ca").returncode == 0
    done = cli(tmp_path, "ca", "crl", "--dir", "ca", "--storage", "redis://:secret@127.0.0.1:1/0")
    assert done.returncode != 0 and "password in the URL is refused" in done.stderr
