"""The access log on a full disk (RLIMIT_FSIZE): the gateway logs the error once, keeps serving, and stops promptly."""

from __future__ import annotations

import time

from tests.conftest import gateway_args, https_request


def test_a_full_disk_under_the_access_log_is_logged_once_and_does_not_stop_serving_or_shutdown(start_gateway, pki, echo_upstream, tmp_path):
    path = tmp_path / "access.log"
    gateway = start_gateway(gateway_args(pki, echo_upstream, "--access-log", str(path)), file_size_limit=2048)
    for i in range(40):  # ~300 bytes a line: the file is full after a few
        assert https_request(gateway.port, f"/r{i}", ca=pki["ca"], cert=pki["alice"])[0] == 200
    gateway.proc.wait_for_log("access log: writing failed")
    assert https_request(gateway.port, "/still", ca=pki["ca"], cert=pki["alice"])[0] == 200
    started = time.monotonic()
    assert gateway.proc.stop() != -9  # SIGTERM was enough (twistd exits with the signal's status)
    assert time.monotonic() - started < 8
    out = gateway.proc.output()
    assert "Server Shut Down." in out
    assert 1 <= out.count("access log: writing failed") <= gateway.workers and "Traceback" not in out  # once per process writing the file
    assert "line(s) lost to write errors" in out
    assert path.stat().st_size <= 2048
