"""
Attack class: the files a worker group shares between its processes, planted or read by another local
user (docs/security.md, "A worker group's private files").  The configuration the parent hands its
workers (mtlsgate.app.handoff) may hold a Redis password in a URL: it must be the gateway's user's alone
and gone when the gateway stops.  The C{-OO} bytecode the workers run (C{worker_bytecode}) is code: a
directory another user can write, replace or point elsewhere must stop the start before anything is
compiled into it or run from it.
"""

from __future__ import annotations

import os
import signal
import stat

import pytest
import yaml

from tests.conftest import free_port, gateway_config, run_python_twistd_check


def _config(pki, echo_upstream, tmp_path, **top):
    config = gateway_config(pki, free_port(), [f"https://127.0.0.1:{echo_upstream}"], **top)
    (tmp_path / "mtlsgate.yaml").write_text(yaml.safe_dump(config))
    return tmp_path / "mtlsgate.yaml"


_AS_ROOT = pytest.mark.skipif(os.getuid() != 0, reason="needs root to give the directory to another user")


@pytest.mark.parametrize("how", ["others can write", "group can write", "a symbolic link to ours", pytest.param("another user's", marks=_AS_ROOT)])
def test_a_bytecode_directory_another_user_could_plant_code_in_stops_the_start(pki, echo_upstream, tmp_path, how):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    cache = tmp_path / "bytecode"
    if how == "a symbolic link to ours":
        cache.symlink_to(real)
    else:
        cache.mkdir()
        cache.chmod({"others can write": 0o777, "group can write": 0o770}.get(how, 0o700))
        if how == "another user's":
            os.chown(cache, 65534, 65534)
    path = _config(pki, echo_upstream, tmp_path, worker_bytecode=str(cache))
    done = run_python_twistd_check(["--config", str(path), "--workers", "2"], tmp_path)
    out = done.stdout + done.stderr
    assert done.returncode != 0, out
    assert "worker_bytecode" in out and ("writable by no one else" in out or "not a directory" in out), out
    assert "serving" not in out  # no worker started
    assert not list(real.iterdir()) and (cache.is_symlink() or not list(cache.iterdir()))  # nothing compiled into it


def test_the_handed_configuration_is_private_and_gone_after_stop(start_gateway, pki, echo_upstream, tmp_path):
    secret = "s3cret-in-a-url"
    path = _config(pki, echo_upstream, tmp_path, access_log=str(tmp_path / f"{secret}.log"))
    port = int(yaml.safe_load(path.read_text())["address"].split(":")[1])
    gateway = start_gateway(["--config", str(path), "--workers", "2"], port=port)
    pid = int(gateway.proc.output().split("worker 0 serving (pid ")[1].split(")")[0])
    argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
    handed = argv[argv.index(b"--config-json") + 1].decode()
    assert secret in open(handed).read()
    assert stat.S_IMODE(os.stat(handed).st_mode) == 0o600 and stat.S_IMODE(os.stat(os.path.dirname(handed)).st_mode) == 0o700
    assert os.stat(handed).st_uid == os.stat(os.path.dirname(handed)).st_uid == os.getuid()
    assert gateway.proc.stop() in (0, -signal.SIGTERM)
    assert not os.path.exists(os.path.dirname(handed))
