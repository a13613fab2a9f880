"""
A TLS scanner's verdict on the gateway's listener: Debian's testssl.sh, run as an operator would,
must find no old protocol, no CBC or non-forward-secret suite, no client renegotiation, no
compression, a complete chain and HSTS.  The full verdict is recorded in docs/security.md.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import gateway_args

pytestmark = pytest.mark.needs("testssl")


def test_testssl_finds_nothing_weak(start_gateway, pki, echo_upstream, tmp_path):
    # The scanner has no client certificate: ask for one (optional) so that it can complete handshakes.
    gateway = start_gateway(gateway_args(pki, echo_upstream, "--client-auth", "optional"))
    report = tmp_path / "testssl.json"
    subprocess.run(
        ["testssl", "--quiet", "--color", "0", "--warnings", "off", "--ip", "one", "--add-ca", pki["ca"],
         "-p", "-s", "-f", "-R", "-C", "-h", "-S", "--jsonfile", str(report), f"127.0.0.1:{gateway.port}"],
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    findings = {item["id"]: item for item in json.loads(report.read_text())}

    def finding(id: str) -> str:
        return findings[id]["finding"]

    for old in ("SSLv2", "SSLv3", "TLS1", "TLS1_1"):
        assert finding(old) == "not offered", old
    assert finding("TLS1_2") == "offered"
    assert finding("TLS1_3").startswith("offered")
    for weak in ("cipherlist_NULL", "cipherlist_aNULL", "cipherlist_EXPORT", "cipherlist_LOW", "cipherlist_3DES_IDEA", "cipherlist_AVERAGE"):
        assert finding(weak) == "not offered", weak  # AVERAGE is testssl's name for the CBC suites
    assert finding("cipherlist_STRONG") == "offered"
    assert findings["PFS"]["finding"] == "offered" and findings["PFS"]["severity"] == "OK"
    assert all(suite.startswith(("TLS_", "ECDHE-")) for suite in finding("PFS_ciphers").split())
    assert finding("secure_client_renego") == "not vulnerable"
    assert finding("CRIME_TLS") == "not vulnerable"
    assert finding("cert_chain_of_trust") == "passed."
    assert findings["HSTS_time"]["severity"] == "OK"
