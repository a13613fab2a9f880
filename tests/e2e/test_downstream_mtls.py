"""Downstream mTLS through the real twistd process: who gets through the handshake, and why not."""

from __future__ import annotations

import ssl

import pytest

from tests.conftest import echo_json, gateway_args, gateway_starter, https_request, start_echo_upstream, started_processes


def _module_gateway(pki, tmp_path_factory, *extra: str):
    """One gateway for the module's tests of it: a handshake changes nothing of its state, and each test reads only the log its own connection wrote."""
    tmp = tmp_path_factory.mktemp("downstream-mtls")
    with started_processes() as procs:
        upstream, _ = start_echo_upstream(procs, pki, tmp)
        yield gateway_starter(procs, tmp)(gateway_args(pki, upstream, "--crl", pki["crl"], *extra))


@pytest.fixture(scope="module")
def gateway(pki, tmp_path_factory):
    yield from _module_gateway(pki, tmp_path_factory)


def test_valid_client_certificate_is_proxied_to_the_upstream(gateway, pki):
    status, _, body = https_request(gateway.port, "/hello", ca=pki["ca"], cert=pki["alice"])
    assert status == 200
    echoed = echo_json(body)
    assert echoed["uri"] == "/hello"
    # The upstream required a client certificate and saw the gateway's.
    assert echoed["client_spiffe_id"] == "spiffe://test/gateway"


@pytest.mark.parametrize(
    "who, reason",
    [
        (None, None),  # no certificate: OpenSSL refuses before any verify callback runs
        ("stranger", "untrusted issuer"),
        ("expired", "expired"),
        ("revoked", "revoked"),
        ("server_only", "not a client certificate"),
    ],
)
def test_bad_client_certificate_fails_the_handshake_with_a_logged_reason(gateway, pki, who, reason):
    before = len(gateway.proc.output())
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        https_request(gateway.port, "/", ca=pki["ca"], cert=pki[who] if who else None)
    log = gateway.proc.wait_for_log("TLS handshake with" if reason is None else "refused client certificate from 127.0.0.1", after=before)
    if reason is not None:
        assert reason in log[before:]


@pytest.mark.parametrize("who, reason", [("weak_rsa", "key too small"), ("sha1_signed", "weak signature digest")])
def test_weak_client_certificates_are_refused_with_a_logged_reason(gateway, pki, who, reason):
    """openssl s_client at security level 0, so that the client sends what a modern client would not."""
    import subprocess

    cert, key = pki[who]
    before = len(gateway.proc.output())
    subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{gateway.port}", "-servername", "localhost", "-cert", cert, "-key", key,
         "-cipher", "DEFAULT:@SECLEVEL=0", "-CAfile", pki["ca"]],
        input=b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n", capture_output=True, timeout=20,
    )  # fmt: skip
    log = gateway.proc.wait_for_log("refused client certificate from 127.0.0.1", after=before)
    assert reason in log[before:]


@pytest.fixture(scope="module")
def policy_gateway(pki, tmp_path_factory):
    yield from _module_gateway(pki, tmp_path_factory, "--enforcement", "policy")


@pytest.mark.parametrize(
    "who, reason",
    [
        (None, "missing"),
        ("stranger", "untrusted issuer"),
        ("expired", "expired"),
        ("revoked", "revoked"),
        ("server_only", "not a client certificate"),
    ],
)
def test_policy_enforcement_answers_403_naming_the_reason(policy_gateway, pki, who, reason):
    before = len(policy_gateway.proc.output())
    status, headers, body = https_request(policy_gateway.port, "/", ca=pki["ca"], cert=pki[who] if who else None)
    assert status == 403
    assert reason in body.decode()
    assert headers["content-type"].startswith("text/plain")
    assert reason in policy_gateway.proc.wait_for_log("refused 127.0.0.1", after=before)[before:]


def test_policy_enforcement_still_admits_a_valid_certificate(policy_gateway, pki):
    status, _, _ = https_request(policy_gateway.port, "/", ca=pki["ca"], cert=pki["bob"])
    assert status == 200


def test_chain_deeper_than_max_verify_depth_is_refused(start_gateway, pki, echo_upstream, tmp_path):
    ca = pki["ca_obj"]
    inter1 = ca.issue_intermediate("inter 1")
    inter2 = inter1.issue_intermediate("inter 2")
    deep = inter2.issue_client("deep", uris=["spiffe://test/deep"])
    cert, key = str(tmp_path / "deep.pem"), str(tmp_path / "deep-key.pem")
    deep.write(cert, key)
    gateway = start_gateway(gateway_args(pki, echo_upstream, "--max-verify-depth", "1", "--enforcement", "policy"))
    status, _, body = https_request(gateway.port, "/", ca=pki["ca"], cert=(cert, key))
    assert status == 403
    assert b"chain too long" in body


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_tls_1_1_is_refused(gateway, pki):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    try:
        ctx.set_ciphers("ALL:@SECLEVEL=0")
    except ssl.SSLError:
        pass
    import socket

    with socket.create_connection(("127.0.0.1", gateway.port)) as sock:
        with pytest.raises(ssl.SSLError):
            ctx.wrap_socket(sock, server_hostname="localhost")
