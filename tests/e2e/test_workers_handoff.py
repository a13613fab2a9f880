"""
C{--workers 2}: the parent hands its workers the configuration it validated (mtlsgate.app.handoff), as
JSON in a private file: no worker imports yaml, the file is the parent's alone and gone when it stops,
a broken configuration on reload is refused once by the parent and every process keeps the last good
one (a worker restarted afterwards too), and with C{watch_interval} the parent notices the YAML file
change and has every worker reload.
"""

from __future__ import annotations

import os
import re
import signal
import stat
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port, gateway_config, https_request


def _worker_pids(out: str) -> dict[int, int]:
    """The latest pid of each worker, from its 'serving' lines."""
    return {int(index): int(pid) for index, pid in re.findall(r"worker (\d+) serving \(pid (\d+)\)", out)}


def _handed_path(pid: int) -> str:
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return argv[argv.index(b"--config-json") + 1].decode()


def _start(start_gateway, pki, echo_upstream, tmp_path: Path, **top):
    port = free_port()
    path = tmp_path / "mtlsgate.yaml"
    config = gateway_config(pki, port, [f"https://127.0.0.1:{echo_upstream}"], **top)
    config["downstream_mtls"]["enforcement"] = "policy"  # a client the rules refuse gets a 403
    path.write_text(yaml.safe_dump(config))
    gateway = start_gateway(["--config", str(path), "--workers", "2"], port=port)
    return gateway, path


def test_workers_get_the_validated_configuration_in_a_private_file_without_yaml(start_gateway, pki, echo_upstream, tmp_path):
    gateway, _ = _start(start_gateway, pki, echo_upstream, tmp_path)
    pids = _worker_pids(gateway.proc.output())
    assert sorted(pids) == [0, 1]
    handed = _handed_path(pids[0])
    assert handed == _handed_path(pids[1])
    assert stat.S_IMODE(os.stat(handed).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(handed)).st_mode) == 0o700
    assert os.stat(handed).st_uid == os.getuid()
    for pid in pids.values():
        maps = Path(f"/proc/{pid}/maps").read_text()
        if yaml.__with_libyaml__:
            assert "_yaml" not in maps, "a worker imported yaml"
    assert https_request(gateway.port, "/", ca=pki["ca"], cert=pki["alice"])[0] == 200
    assert gateway.proc.stop() in (0, -signal.SIGTERM)
    assert not os.path.exists(os.path.dirname(handed)), "the handed configuration outlived the gateway"


def test_a_broken_config_on_reload_is_refused_once_and_a_restarted_worker_keeps_the_last_good_one(start_gateway, pki, echo_upstream, tmp_path):
    gateway, path = _start(start_gateway, pki, echo_upstream, tmp_path)
    path.write_text(path.read_text().replace("routes:", "routez:"))
    before = len(gateway.proc.output())
    gateway.proc.signal(signal.SIGHUP)
    out = gateway.proc.wait_for_log("reload refused", after=before)
    assert "routez: unknown key" in out[before:]
    assert "[worker-" not in out[before:].split("reload refused")[0].rsplit("\n", 1)[-1]  # the parent says it, not a worker
    victim = _worker_pids(out)[1]
    os.kill(victim, signal.SIGKILL)
    gateway.proc.wait_for_log(f"(pid {victim}) was killed by SIGKILL; restarting it")
    deadline = time.monotonic() + 60
    while _worker_pids(gateway.proc.output()).get(1) == victim:
        assert time.monotonic() < deadline, "worker 1 was not restarted"
        time.sleep(0.1)
    for _ in range(10):  # both workers serve the last good configuration, the restarted one included
        assert https_request(gateway.port, "/", ca=pki["ca"], cert=pki["alice"])[0] == 200


@pytest.mark.parametrize("watch", [True, False], ids=["watched", "sighup"])
def test_a_changed_config_reaches_every_worker(start_gateway, pki, echo_upstream, tmp_path, watch):
    gateway, path = _start(start_gateway, pki, echo_upstream, tmp_path, **({"watch_interval": "1s"} if watch else {"watch_interval": "off"}))
    assert https_request(gateway.port, "/", ca=pki["ca"], cert=pki["alice"])[0] == 200
    config = yaml.safe_load(path.read_text())
    config["allow_client"] = {"cn": ["bob"]}
    before = len(gateway.proc.output())
    path.write_text(yaml.safe_dump(config))
    if watch:
        out = gateway.wait_for_each("reloaded:", timeout=30, after=before)
        assert "configuration file changed; reloading" in out[before:]
    else:
        gateway.reload()
    for _ in range(6):  # new connections, over both workers
        assert https_request(gateway.port, "/", ca=pki["ca"], cert=pki["alice"])[0] == 403
        assert https_request(gateway.port, "/", ca=pki["ca"], cert=pki["bob"])[0] == 200


def test_worker_bytecode_runs_the_workers_optimized_on_bytecode_compiled_once(start_gateway, pki, echo_upstream, tmp_path):
    cache = tmp_path / "bytecode"
    gateway, _ = _start(start_gateway, pki, echo_upstream, tmp_path, worker_bytecode=str(cache))
    out = gateway.proc.output()
    compiled = int(re.search(r"worker_bytecode: workers run as python -OO on the bytecode in \S+ \((\d+) module\(s\) compiled now\)", out)[1])
    assert compiled > 100  # the first start: the gateway's whole stack
    for pid in _worker_pids(out).values():
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert argv[1:6] == [b"-X", b"no_debug_ranges", b"-OO", b"-X", f"pycache_prefix={cache}".encode()]
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700
    for _ in range(6):
        assert https_request(gateway.port, "/", ca=pki["ca"], cert=pki["alice"])[0] == 200
    gateway.proc.stop()
    again, _ = _start(start_gateway, pki, echo_upstream, tmp_path, worker_bytecode=str(cache))
    assert "(0 module(s) compiled now)" in again.proc.output()  # later starts only read the files' headers
    assert https_request(again.port, "/", ca=pki["ca"], cert=pki["alice"])[0] == 200
