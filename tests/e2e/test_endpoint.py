"""The mtls: endpoint string gives any Twisted server the gateway's TLS and client verification."""

from __future__ import annotations

import ssl

import pytest

from tests.conftest import TWISTD, Proc, free_port, https_request, wait_for_port


def test_twistd_web_over_an_mtls_endpoint(procs, pki, tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "hello.txt").write_text("hello over mTLS\n")
    port = free_port()
    endpoint = f"mtls:{port}:interface=127.0.0.1:cert={pki['gateway'][0]}:key={pki['gateway'][1]}:client_ca={pki['ca']}"
    proc = Proc([*TWISTD, "-n", "--pidfile=", "--logfile=-", "web", "--listen", endpoint, "--path", str(tmp_path / "site")], tmp_path / "web.log", cwd=tmp_path)
    procs.append(proc)
    wait_for_port(port, proc.popen, log=proc.log)

    status, _, body = https_request(port, "/hello.txt", ca=pki["ca"], cert=pki["alice"])
    assert (status, body) == (200, b"hello over mTLS\n")
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        https_request(port, "/hello.txt", ca=pki["ca"], cert=pki["stranger"])
    assert "untrusted issuer" in proc.wait_for_log("refused client certificate")
