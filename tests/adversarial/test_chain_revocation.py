"""
Revocation of a CA in the client's chain, end to end through the real twistd process: a root CA (the
gateway's client CA bundle) issues an intermediate, the intermediate issues the client's leaf, and the
client sends leaf + intermediate.  A CRL from the root that revokes the intermediate must keep every
certificate under it out, not only certificates the CRL lists themselves.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from mtlsgate.tls.pki import DevCA
from tests.conftest import https_request, run_python_twistd_check


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("chain")
    root = DevCA.create(str(d / "root"), name="chain test root")
    good, bad = root.issue_intermediate("good intermediate"), root.issue_intermediate("revoked intermediate")
    files: dict[str, Any] = {"dir": d, "root": str(d / "root" / "ca.pem"), "root_obj": root, "good": good, "bad": bad}
    for name, ca in (("ok", good), ("under_bad", bad), ("revoked_leaf", good)):
        issued = ca.issue_client(name, uris=[f"spiffe://chain/{name}"])
        issued.write(str(d / f"{name}.pem"), str(d / f"{name}-key.pem"))  # leaf, then the intermediate
        files[name] = (str(d / f"{name}.pem"), str(d / f"{name}-key.pem"))
        files[name + "_obj"] = issued
    # One file, one CRL per CA (as nginx's ssl_crl takes them): the root's revokes the bad intermediate,
    # the good intermediate's revokes one of its leaves, the bad intermediate's revokes nothing.
    crls = [root.crl([bad.certificate]), good.crl([files["revoked_leaf_obj"].certificate]), bad.crl()]
    (d / "crls.pem").write_bytes(b"".join(crl.public_bytes(Encoding.PEM) for crl in crls))
    files["crl"] = str(d / "crls.pem")
    return files


def _args(pki: dict[str, Any], chain: dict[str, Any], upstream: int, *extra: str) -> list[str]:
    return [
        "--cert", pki["gateway"][0], "--key", pki["gateway"][1],
        "--client-ca", chain["root"], "--crl", chain["crl"],
        "--route", f"localhost=https://127.0.0.1:{upstream}",
        "--upstream-ca", pki["ca"], "--upstream-cert", pki["gateway_client"][0], "--upstream-key", pki["gateway_client"][1],
        *extra,
    ]  # fmt: skip


@pytest.fixture
def gateway(start_gateway, pki, chain, echo_upstream):
    return start_gateway(_args(pki, chain, echo_upstream))


@pytest.fixture
def policy_gateway(start_gateway, pki, chain, echo_upstream):
    return start_gateway(_args(pki, chain, echo_upstream, "--enforcement", "policy"))


def test_a_leaf_under_a_revoked_intermediate_fails_the_handshake(gateway, pki, chain):
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        https_request(gateway.port, "/", ca=pki["ca"], cert=chain["under_bad"])
    log = gateway.proc.wait_for_log("refused client certificate from 127.0.0.1")
    assert "revoked" in log and "revoked intermediate" in log


def test_a_leaf_under_a_revoked_intermediate_gets_403_revoked_under_policy(policy_gateway, pki, chain):
    status, _, body = https_request(policy_gateway.port, "/", ca=pki["ca"], cert=chain["under_bad"])
    assert status == 403
    assert b"revoked" in body
    assert "revoked" in policy_gateway.proc.wait_for_log("refused 127.0.0.1")


def test_a_leaf_under_an_intermediate_still_in_good_standing_is_admitted(gateway, pki, chain):
    status, _, _ = https_request(gateway.port, "/", ca=pki["ca"], cert=chain["ok"])
    assert status == 200


@pytest.mark.parametrize("enforcement", ["reject_connection", "policy"])
def test_the_intermediates_own_crl_in_the_same_file_revokes_its_leaf(start_gateway, pki, chain, echo_upstream, enforcement):
    gateway = start_gateway(_args(pki, chain, echo_upstream, "--enforcement", enforcement))
    if enforcement == "policy":
        status, _, body = https_request(gateway.port, "/", ca=pki["ca"], cert=chain["revoked_leaf"])
        assert (status, b"revoked" in body) == (403, True)
    else:
        with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
            https_request(gateway.port, "/", ca=pki["ca"], cert=chain["revoked_leaf"])
        assert "revoked" in gateway.proc.wait_for_log("refused client certificate from 127.0.0.1")


def test_a_ca_of_the_bundle_without_a_crl_stops_the_start_with_one_line(pki, chain, tmp_path: Path):
    """A bundle of the root and the bad intermediate, a CRL file with the root's CRL only."""
    root, bad = chain["root_obj"], chain["bad"]
    bundle, crl = tmp_path / "bundle.pem", tmp_path / "root-only.crl"
    bundle.write_bytes(root.cert_pem() + bad.certificate.public_bytes(Encoding.PEM))
    crl.write_bytes(root.crl().public_bytes(Encoding.PEM))
    result = run_python_twistd_check(
        ["--https", "tcp:0:interface=127.0.0.1", "--cert", pki["gateway"][0], "--key", pki["gateway"][1],
         "--client-ca", str(bundle), "--crl", str(crl), "--route", "localhost=https://127.0.0.1:9"],
        tmp_path,
    )  # fmt: skip
    assert result.returncode != 0
    lines = [line for line in (result.stdout + result.stderr).splitlines() if "no CRL" in line]
    assert len(lines) == 1, result.stdout + result.stderr
    assert "CN=revoked intermediate" in lines[0] and str(crl) in lines[0]


@pytest.mark.parametrize(
    "bundle_of, who, admitted",
    [
        (("root", "good"), "ok", True),  # the chain stops at the trusted intermediate (partial chain)
        (("good",), "ok", True),  # a bundle of the issuing intermediate only
        (("good",), "revoked_leaf", False),
        (("root", "bad"), "under_bad", False),  # the bad intermediate trusted directly, and revoked by the root's CRL
    ],
)
def test_intermediates_in_the_bundle_are_checked_too(start_gateway, pki, chain, echo_upstream, tmp_path, bundle_of, who, admitted):
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(b"".join(chain[name + "_obj" if name == "root" else name].certificate.public_bytes(Encoding.PEM) for name in bundle_of))
    args = _args(pki, chain, echo_upstream, "--enforcement", "policy")
    args[args.index(chain["root"])] = str(bundle)
    gateway = start_gateway(args)
    status, _, body = https_request(gateway.port, "/", ca=pki["ca"], cert=chain[who])
    assert (status, body if status != 200 else b"") == ((200, b"") if admitted else (403, body)), body
    if not admitted:
        assert b"revoked" in body
