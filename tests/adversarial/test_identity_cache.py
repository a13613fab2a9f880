"""
Attack class: being taken for another client by the identity cache.  The gateway works out a client
certificate's identity (subject, SANs, fingerprint, the XFCC element) once per distinct certificate and
reuses it for later connections that present the very same certificate (keyed by its whole DER, issue
#13).  An attacker who knows a trusted client's names makes look-alikes: the same subject and SANs under
another issuer, with another key, with another serial, the same key under another serial; or presents
a certificate whose identity is cached after its revocation.  Each must be judged as itself, on every
connection: admission (verification, revocation, validity, pins) is decided per connection as before,
the cache only saves parsing.  End to end, through the real twistd process; alice connects first each
time, so her identity is cached when the look-alike arrives.
"""

from __future__ import annotations

import http.client
import ssl
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding

from mtlsgate.tls import pki as pkimod
from tests.conftest import echo_json, gateway_args, https_request

ALICE_URI = "spiffe://test/ns/prod/sa/alice"


def _write(directory: Path, name: str, cert: x509.Certificate, key: Any) -> tuple[str, str]:
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}-key.pem"
    cert_path.write_bytes(cert.public_bytes(Encoding.PEM))
    key_path.write_bytes(pkimod.private_key_pem(key))
    return str(cert_path), str(key_path)


def _alice_with_her_key(pki: dict[str, Any]) -> tuple[x509.Certificate, Any]:
    """A second certificate for alice from the trusted CA: her very subject, SANs and key, another serial."""
    ca, alice = pki["ca_obj"], pki["alice_obj"].certificate
    now = datetime.now(timezone.utc)
    builder = (
        x509.CertificateBuilder().subject_name(alice.subject).issuer_name(ca.certificate.subject).public_key(alice.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
    )  # fmt: skip
    for extension in alice.extensions:
        builder = builder.add_extension(extension.value, extension.critical)
    return builder.sign(ca.key, hashes.SHA256()), pki["alice_obj"].key


@pytest.fixture(scope="module")
def lookalikes(pki, tmp_path_factory) -> dict[str, Any]:
    """alice's look-alikes: same subject (CN alice, OU eng) and URI SAN, each different in one other way."""
    d = tmp_path_factory.mktemp("lookalikes")
    other = pkimod.DevCA.create(str(d / "other"), name="untrusted CA")
    files: dict[str, Any] = {}
    for name, issued in (
        ("other_issuer", other.issue_client("alice", uris=[ALICE_URI], ou=["eng"])),  # an untrusted CA, another key
        ("other_key", pki["ca_obj"].issue_client("alice", uris=[ALICE_URI], ou=["eng"])),  # the trusted CA, another key and serial
    ):
        files[name] = _write(d, name, issued.certificate, issued.key)
        files[name + "_cert"] = issued.certificate
    same_key, key = _alice_with_her_key(pki)
    files["same_key"] = _write(d, "same_key", same_key, key)
    files["same_key_cert"] = same_key
    files["same_key_crl"] = str(d / "same-key.crl")  # revokes the same-key twin (and the suite's revoked client), not alice
    crl = pki["ca_obj"].crl([same_key, pki["revoked_obj"].certificate])
    Path(files["same_key_crl"]).write_bytes(crl.public_bytes(Encoding.PEM))
    return files


def _fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def _xfcc(body: bytes) -> str:
    return echo_json(body)["headers"]["x-forwarded-client-cert"][0]


def _refused_at_handshake(port: int, ca: str, cert: tuple[str, str]) -> None:
    with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
        https_request(port, "/", ca=ca, cert=cert)


def _alice_admitted(port: int, pki: dict[str, Any]) -> None:
    status, _, body = https_request(port, "/", ca=pki["ca"], cert=pki["alice"])
    assert status == 200
    assert f"Hash={_fingerprint(pki['alice_obj'].certificate)}" in _xfcc(body)


def test_a_lookalike_from_an_untrusted_issuer_gets_403_not_the_cached_identity(start_gateway, pki, echo_upstream, lookalikes):
    gateway = start_gateway(gateway_args(pki, echo_upstream, "--enforcement", "policy"))
    _alice_admitted(gateway.port, pki)
    for _ in range(2):
        status, _, body = https_request(gateway.port, "/", ca=pki["ca"], cert=lookalikes["other_issuer"])
        assert status == 403 and b"untrusted issuer" in body
        assert b"x-forwarded-client-cert" not in body.lower()  # the gateway's own answer, nothing went upstream
        _alice_admitted(gateway.port, pki)


def test_a_lookalike_from_an_untrusted_issuer_fails_the_handshake(start_gateway, pki, echo_upstream, lookalikes):
    gateway = start_gateway(gateway_args(pki, echo_upstream))
    _alice_admitted(gateway.port, pki)
    _refused_at_handshake(gateway.port, pki["ca"], lookalikes["other_issuer"])
    assert "untrusted issuer" in gateway.proc.wait_for_log("refused client certificate from 127.0.0.1")
    _alice_admitted(gateway.port, pki)


@pytest.mark.parametrize("twin", ["other_key", "same_key"])
def test_a_trusted_lookalike_goes_upstream_as_itself(start_gateway, pki, echo_upstream, lookalikes, twin):
    """Admitted (the trusted CA issued it, nothing restricts it), but under its own fingerprint, never alice's."""
    gateway = start_gateway(gateway_args(pki, echo_upstream))
    _alice_admitted(gateway.port, pki)
    status, _, body = https_request(gateway.port, "/", ca=pki["ca"], cert=lookalikes[twin])
    assert status == 200
    xfcc = _xfcc(body)
    assert f"Hash={_fingerprint(lookalikes[twin + '_cert'])}" in xfcc
    assert _fingerprint(pki["alice_obj"].certificate) not in xfcc
    _alice_admitted(gateway.port, pki)


@pytest.mark.parametrize("twin", ["other_key", "same_key"])
def test_a_pin_to_alices_fingerprint_keeps_her_lookalikes_out(start_gateway, pki, echo_upstream, lookalikes, twin):
    pin = _fingerprint(pki["alice_obj"].certificate)
    gateway = start_gateway(gateway_args(pki, echo_upstream, "--enforcement", "policy", "--allow-fingerprint", pin))
    _alice_admitted(gateway.port, pki)
    status, _, body = https_request(gateway.port, "/", ca=pki["ca"], cert=lookalikes[twin])
    assert status == 403 and b"not allowed here" in body
    _alice_admitted(gateway.port, pki)


@pytest.mark.parametrize("enforcement", ["policy", "reject_connection"])
def test_a_revoked_twin_with_alices_key_and_names_is_refused(start_gateway, pki, echo_upstream, lookalikes, enforcement):
    """Same subject, SANs and key as alice, another serial, revoked: refused while alice (cached) is admitted."""
    gateway = start_gateway(gateway_args(pki, echo_upstream, "--crl", lookalikes["same_key_crl"], "--enforcement", enforcement))
    _alice_admitted(gateway.port, pki)
    if enforcement == "policy":
        status, _, body = https_request(gateway.port, "/", ca=pki["ca"], cert=lookalikes["same_key"])
        assert status == 403 and b"revoked" in body
    else:
        _refused_at_handshake(gateway.port, pki["ca"], lookalikes["same_key"])
        assert "revoked" in gateway.proc.wait_for_log("refused client certificate from 127.0.0.1")
    _alice_admitted(gateway.port, pki)


@pytest.mark.parametrize("enforcement", ["policy", "reject_connection"])
def test_a_certificate_revoked_after_its_identity_was_cached_is_refused(start_gateway, pki, echo_upstream, tmp_path, enforcement):
    crl = tmp_path / "clients.crl"
    crl.write_bytes(pki["ca_obj"].crl([]).public_bytes(Encoding.PEM))
    gateway = start_gateway(gateway_args(pki, echo_upstream, "--crl", str(crl), "--enforcement", enforcement))
    for _ in range(2):  # the second connection takes its identity from the cache
        status, _, body = https_request(gateway.port, "/", ca=pki["ca"], cert=pki["revoked"])
        assert status == 200 and "spiffe://test/revoked" in _xfcc(body)
    crl.write_bytes(Path(pki["crl"]).read_bytes())  # now revoking that client
    gateway.reload()
    for _ in range(2):
        if enforcement == "policy":
            status, _, body = https_request(gateway.port, "/", ca=pki["ca"], cert=pki["revoked"])
            assert status == 403 and b"revoked" in body
        else:
            _refused_at_handshake(gateway.port, pki["ca"], pki["revoked"])
    assert "revoked" in gateway.proc.wait_for_log("revoked", timeout=10)
    _alice_admitted(gateway.port, pki)
