"""
Attack class: code planted in the directory the gateway is started from (CWE-427, an uncontrolled search path;
docs/security.md, "A worker's import path").

A worker is a new Python process.  Started as C{python -m mtlsgate.app.worker}, it had the current directory first on
its import path, so an C{mtlsgate/} package there (a checkout, or one another local user left in /tmp) ran in every
worker, as the gateway's user and with its private keys, while the parent ran the installed gateway: the command
a user runs (the C{twistd} or C{mtlsgate} console script) puts its own directory first, never the current one.  A
worker must import exactly what its parent imports.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import yaml

from tests.conftest import Proc, free_port, gateway_config, https_request, poll_pauses, subprocess_env

_PLANTED = ("mtlsgate/__init__.py", "mtlsgate/app/__init__.py", "mtlsgate/app/worker.py")


def test_a_package_planted_in_the_working_directory_never_runs_in_a_worker(pki, echo_upstream, procs, tmp_path):
    cwd = tmp_path / "started-here"
    (cwd / "mtlsgate" / "app").mkdir(parents=True)
    ran = tmp_path / "the planted code ran"
    for name in _PLANTED:
        (cwd / name).write_text(f"open({str(ran)!r}, 'a').write({name!r} + '\\n')\nraise SystemExit('planted')\n")
    port = free_port()
    config = cwd / "mtlsgate.yaml"
    config.write_text(yaml.safe_dump(gateway_config(pki, port, [f"https://127.0.0.1:{echo_upstream}"])))
    twistd = Path(sys.executable).with_name("twistd")  # the console script a user runs, not `python -c` (whose path starts at the cwd)
    assert twistd.exists(), twistd
    proc = Proc([str(twistd), "-n", "--pidfile=", "--logfile=-", "mtlsgate", "--config", str(config), "--workers", "2"], tmp_path / "gateway.log",
                cwd=cwd, env=subprocess_env())  # fmt: skip
    procs.append(proc)
    deadline = time.monotonic() + 60
    pauses = poll_pauses()
    while not all(f"worker {index} serving" in proc.output() for index in (0, 1)):
        assert not ran.exists(), f"a worker imported {ran.read_text()!r} from the directory it was started in:\n{proc.output()}"
        assert proc.popen.poll() is None and time.monotonic() < deadline, proc.output()
        time.sleep(next(pauses))
    for _ in range(4):  # both workers, whichever gets each connection
        assert https_request(port, "/", ca=pki["ca"], cert=pki["alice"])[0] == 200
    assert not ran.exists(), ran.read_text()
