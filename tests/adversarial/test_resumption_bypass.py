"""
Attack class: getting a refused client certificate (or a revoked one) admitted by resuming a TLS
session instead of making a full handshake, on TLS 1.2 (session ticket or ID) and TLS 1.3 (PSK ticket).

OpenSSL does not run the certificate verify callback on a resumed handshake, so whatever the gateway
trusts about a resumed connection must come from a verdict that survives resumption.  The guarantee:
a certificate that failed verification never gets a TLS 1.3 ticket that resumes, and on every
version a resumed connection is trusted only with a certificate that verified in a full handshake
under the trust settings now in force; otherwise 403 with the reason (``enforcement: policy``) and
the upstream sees nothing.  Also: one certificate with two common names is refused.

With workers, a session resumes only on the worker that made it (each has its own ticket key and
session cache), so every test that resumes asks for C{worker_affinity: client_ip}: the session is
offered to the very process that issued it, the attacker's best case.  A session carried to another
worker is its own attack: L{test_a_session_made_on_one_worker_admits_no_one_on_another}.
"""

from __future__ import annotations

import http.client
import socket
import ssl
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mtlsgate.tls import pki as pkimod
from tests.conftest import echo_json, gateway_args, worker_for_address

VERSIONS = [pytest.param(ssl.TLSVersion.TLSv1_2, id="tls1.2"), pytest.param(ssl.TLSVersion.TLSv1_3, id="tls1.3")]


class _Client:
    """One client context pinned to a TLS version (Python resumes only sessions of the same context) and its last session."""

    def __init__(self, ca: str, cert: tuple[str, str], version: ssl.TLSVersion) -> None:
        self.ctx = ssl.create_default_context(cafile=ca)
        self.ctx.minimum_version = self.ctx.maximum_version = version
        self.ctx.load_cert_chain(*cert)
        self.session: ssl.SSLSession | None = None

    def get(self, port: int, source: str = "127.0.0.1") -> tuple[bool, int, bytes]:
        """A request on a new connection (from C{source}) offering the last session: (resumed?, status, body)."""
        raw = socket.create_connection(("127.0.0.1", port), timeout=20, source_address=(source, 0))
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
        conn.sock = self.ctx.wrap_socket(raw, server_hostname="localhost", session=self.session)
        conn.request("GET", "/", headers={"Host": "localhost"})
        response = conn.getresponse()
        body = response.read()
        resumed = conn.sock.session_reused
        if not resumed:
            self.session = conn.sock.session  # TLS 1.3: the ticket arrived with the response
        conn.close()
        return resumed, response.status, body


def _long_chain_client(pki, directory: Path) -> tuple[str, str]:
    """A client certificate under two intermediates (sent by the client): a chain too long for max_verify_depth 1."""
    first = pki["ca_obj"].issue_intermediate("resumption inter 1")
    second = first.issue_intermediate("resumption inter 2")
    issued = second.issue_client("long-chain", uris=["spiffe://test/long-chain"])
    cert, key = str(directory / "long-chain.pem"), str(directory / "long-chain-key.pem")
    issued.write(cert, key)
    return cert, key


def _two_common_names(pki, directory: Path) -> tuple[str, str]:
    """A client certificate from the trusted CA whose subject holds two CNs: alice first, mallory last."""
    ca = pki["ca_obj"]
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "alice"), x509.NameAttribute(NameOID.COMMON_NAME, "mallory")])
    now = datetime.now(timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(ca.certificate.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )  # fmt: skip
    cert_path, key_path = directory / "two-cns.pem", directory / "two-cns-key.pem"
    cert_path.write_bytes(cert.public_bytes(Encoding.PEM))
    key_path.write_bytes(pkimod.private_key_pem(key))
    return str(cert_path), str(key_path)


#: With workers, every connection of the test client reaches the worker that issued its session.
SAME_WORKER = ("--worker-affinity", "client_ip")

REFUSED = [
    ("stranger", "untrusted issuer"),
    ("expired", "expired"),
    ("revoked", "revoked"),
    ("server_only", "not a client certificate"),
    ("long_chain", "chain too long"),
    ("two_cns", "more than one common name"),
]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("who, reason", REFUSED)
def test_a_refused_certificate_cannot_resume_its_way_in(start_gateway, pki, echo_upstream, tmp_path, who, reason, version):
    extra = ["--crl", pki["crl"], "--enforcement", "policy", *SAME_WORKER]
    if who == "long_chain":
        cert, extra = _long_chain_client(pki, tmp_path), [*extra, "--max-verify-depth", "1"]
    elif who == "two_cns":
        cert = _two_common_names(pki, tmp_path)
    else:
        cert = pki[who]
    gateway = start_gateway(gateway_args(pki, echo_upstream, *extra))
    client = _Client(pki["ca"], cert, version)
    resumed, status, body = client.get(gateway.port)
    assert (resumed, status) == (False, 403) and reason in body.decode()
    assert client.session is not None
    for _ in range(3):  # the session (or ticket) the refused handshake left with the client
        resumed, status, body = client.get(gateway.port)
        assert status == 403, f"resumed={resumed}: {body[:300]!r}"
        assert b"x-forwarded-client-cert" not in body.lower()  # the gateway's own answer, not the upstream's echo
        if version is ssl.TLSVersion.TLSv1_3:
            assert not resumed, "a refused certificate got a TLS 1.3 ticket that resumes"
    assert "refused 127.0.0.1" in gateway.proc.output()


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("enforcement", ["policy", "reject_connection"])
def test_a_good_client_resumes_and_keeps_its_identity(start_gateway, pki, echo_upstream, version, enforcement):
    gateway = start_gateway(gateway_args(pki, echo_upstream, "--crl", pki["crl"], "--enforcement", enforcement, *SAME_WORKER))
    client = _Client(pki["ca"], pki["alice"], version)
    assert client.get(gateway.port)[:2] == (False, 200)
    for _ in range(3):
        resumed, status, body = client.get(gateway.port)
        assert (resumed, status) == (True, 200)
        assert "spiffe://test/ns/prod/sa/alice" in echo_json(body)["headers"]["x-forwarded-client-cert"][0]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("enforcement", ["policy", "reject_connection"])
def test_a_reload_that_revokes_a_client_beats_resumption(start_gateway, pki, echo_upstream, tmp_path, version, enforcement):
    crl = tmp_path / "clients.crl"
    crl.write_bytes(pki["ca_obj"].crl([]).public_bytes(Encoding.PEM))
    gateway = start_gateway(gateway_args(pki, echo_upstream, "--crl", str(crl), "--enforcement", enforcement, *SAME_WORKER))
    client = _Client(pki["ca"], pki["revoked"], version)
    assert client.get(gateway.port)[1] == 200
    assert client.get(gateway.port)[:2] == (True, 200)
    crl.write_bytes(Path(pki["crl"]).read_bytes())  # now revoking this client
    gateway.reload()  # every worker: the revocation is in force wherever the client lands
    if enforcement == "reject_connection":
        with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
            client.get(gateway.port)
    else:
        resumed, status, body = client.get(gateway.port)
        assert (resumed, status) == (False, 403) and b"revoked" in body
    assert "revoked" in gateway.proc.wait_for_log("revoked", timeout=10)


def test_two_common_names_are_refused_at_the_handshake_under_reject_connection(start_gateway, pki, echo_upstream, tmp_path):
    gateway = start_gateway(gateway_args(pki, echo_upstream))
    client = _Client(pki["ca"], _two_common_names(pki, tmp_path), ssl.TLSVersion.TLSv1_3)
    with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
        client.get(gateway.port)
    assert "more than one common name" in gateway.proc.wait_for_log("refused client certificate from 127.0.0.1")


def _two_workers_sources() -> tuple[str, str]:
    """Two loopback addresses that C{worker_affinity: client_ip} sends to different workers of two."""
    sources = [f"127.0.0.{n}" for n in range(1, 9)]
    first = sources[0]
    other = next(source for source in sources if worker_for_address(source, 2) != worker_for_address(first, 2))
    return first, other


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("who, reason", [("stranger", "untrusted issuer"), ("revoked", "revoked")])
def test_a_session_made_on_one_worker_admits_no_one_on_another(start_gateway, pki, echo_upstream, version, who, reason):
    """
    Workers keep their own ticket keys, session caches and records of verified certificates: a
    session a refused certificate got from one worker, offered to the other, is refused there too
    (it does not resume, or resumes with no verdict on record), and never reaches the upstream.
    """
    gateway = start_gateway(gateway_args(pki, echo_upstream, "--crl", pki["crl"], "--enforcement", "policy", "--workers", "2", *SAME_WORKER))
    issuer, other = _two_workers_sources()
    client = _Client(pki["ca"], pki[who], version)
    resumed, status, body = client.get(gateway.port, issuer)
    assert (resumed, status) == (False, 403) and reason in body.decode()
    session = client.session
    assert session is not None
    for _ in range(3):
        client.session = session  # always the first worker's session, never one the other worker hands out
        resumed, status, body = client.get(gateway.port, other)
        assert status == 403 and reason in body.decode(), f"resumed={resumed}: {body[:300]!r}"
        assert b"x-forwarded-client-cert" not in body.lower()
    out = gateway.proc.output()
    for source in (issuer, other):  # the test did reach both workers
        assert f"[worker-{worker_for_address(source, 2)}] refused {source}" in out


@pytest.mark.parametrize("version", VERSIONS)
def test_a_good_session_carried_to_another_worker_keeps_its_identity(start_gateway, pki, echo_upstream, version):
    """A good client's session offered to the other worker: served (after a full handshake there) as the same identity."""
    gateway = start_gateway(gateway_args(pki, echo_upstream, "--crl", pki["crl"], "--workers", "2", *SAME_WORKER))
    issuer, other = _two_workers_sources()
    client = _Client(pki["ca"], pki["alice"], version)
    assert client.get(gateway.port, issuer)[:2] == (False, 200)
    session = client.session
    for _ in range(2):
        client.session = session
        resumed, status, body = client.get(gateway.port, other)
        assert status == 200
        assert "spiffe://test/ns/prod/sa/alice" in echo_json(body)["headers"]["x-forwarded-client-cert"][0]
