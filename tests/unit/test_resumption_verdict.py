"""
The verdict on a client certificate that holds for resumed TLS sessions: as a pure function, and
through real handshakes and resumptions between pyOpenSSL connections over memory BIOs (no sockets).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL

from mtlsgate.tls import server as tls
from mtlsgate.config.model import CertificateSpec, DownstreamMTLS
from mtlsgate.tls.pki import DevCA, IssuedCertificate
from mtlsgate.tls.server import MULTIPLE_COMMON_NAMES, UNVERIFIED_RESUMPTION, VerifiedCertificates, VerifyFailure, certificate_verdict

NOW = datetime(2030, 1, 1, tzinfo=timezone.utc)
VALID = (NOW - timedelta(days=1), NOW + timedelta(days=1))


@pytest.mark.parametrize(
    "failure, witnessed, recorded, validity, expected",
    [
        (None, True, False, VALID, None),  # a full verification on this connection found nothing wrong
        (VerifyFailure("expired", 10, 0, "CN=x"), True, True, VALID, "expired"),  # a failure wins over any record
        (None, False, False, VALID, UNVERIFIED_RESUMPTION),  # resumed, never verified here: the bypass
        (None, False, True, VALID, None),  # resumed, verified in a full handshake under these settings
        (None, False, True, (NOW - timedelta(days=2), NOW - timedelta(days=1)), "expired"),  # expired since
        (None, False, True, (NOW + timedelta(days=1), NOW + timedelta(days=2)), "not yet valid"),
    ],
)
def test_the_verdict(failure, witnessed, recorded, validity, expected):
    assert certificate_verdict(failure, witnessed, recorded, validity, NOW) == expected


def test_the_record_is_bounded_and_forgets_the_least_recently_used():
    verified = VerifiedCertificates(limit=2)
    verified.record(b"a")
    verified.record(b"b")
    assert b"a" in verified  # used: b is now the oldest
    verified.record(b"c")
    assert (b"a" in verified, b"b" in verified, b"c" in verified, len(verified)) == (True, False, True, 2)


def test_a_connection_this_module_did_not_make_is_trusted_with_nothing():
    class Plain:
        def get_peer_certificate(self, as_cryptography: bool = False) -> object:
            return object()

    assert tls.peer_verdict(Plain()).refusal == UNVERIFIED_RESUMPTION


# --- real handshakes in memory -------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("verdict-pki")
    ca, other = DevCA.create(str(d / "ca"), name="verdict CA"), DevCA.create(name="verdict stranger CA")
    server = ca.issue_server(["localhost"])
    server.write(str(d / "server.pem"), str(d / "server-key.pem"))
    key = ec.generate_private_key(ec.SECP256R1())
    two_cns = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "alice"), x509.NameAttribute(NameOID.COMMON_NAME, "mallory")]))
        .issuer_name(ca.certificate.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(datetime.now(timezone.utc) - timedelta(minutes=5)).not_valid_after(datetime.now(timezone.utc) + timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )  # fmt: skip
    return {
        "dir": d, "ca": str(d / "ca" / "ca.pem"),
        "alice": ca.issue_client("alice"), "stranger": other.issue_client("stranger"),
        "two_cns": IssuedCertificate(key=key, certificate=two_cns),
    }  # fmt: skip


def _server(pki, enforcement: str) -> tls.ServerTLS:
    server_tls = tls.ServerTLS()
    served = tls.load_served_certificates([CertificateSpec(str(pki["dir"] / "server.pem"), str(pki["dir"] / "server-key.pem"))], None)
    verification = tls.ClientVerification.load(DownstreamMTLS(ca_file=pki["ca"], client_auth="require", enforcement=enforcement))
    server_tls.install(server_tls.build(served, verification))
    return server_tls


def _pump(client: SSL.Connection, server: SSL.Connection) -> None:
    """Move bytes both ways until neither side has anything to send."""
    moved = True
    while moved:
        moved = False
        for source, sink in ((client, server), (server, client)):
            for step in (source.do_handshake, lambda: source.recv(65536)):
                try:
                    step()
                except (SSL.WantReadError, SSL.ZeroReturnError):
                    pass
            try:
                data = source.bio_read(65536)
            except SSL.WantReadError:
                continue
            sink.bio_write(data)
            moved = True


def _connect(server_tls, client_ctx: SSL.Context, session: SSL.Session | None) -> tuple[tls.GatewayConnection, SSL.Connection]:
    server = server_tls.serverConnectionForTLS(None)
    server.set_accept_state()
    client = SSL.Connection(client_ctx, None)
    client.set_connect_state()
    client.set_tlsext_host_name(b"localhost")
    if session is not None:
        client.set_session(session)
    _pump(client, server)
    client.write(b"x")  # and the server's TLS 1.3 tickets back
    _pump(client, server)
    return server, client


def _client_context(pki, who: str, version: int) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(version)
    ctx.set_max_proto_version(version)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_CLIENT)
    issued = pki[who]
    ctx.use_certificate(issued.certificate)
    ctx.use_privatekey(issued.key)
    return ctx


VERSIONS = [pytest.param(SSL.TLS1_2_VERSION, id="tls1.2"), pytest.param(SSL.TLS1_3_VERSION, id="tls1.3")]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("who, reason", [("stranger", "untrusted issuer"), ("two_cns", MULTIPLE_COMMON_NAMES)])
def test_a_refused_certificate_stays_refused_when_its_session_resumes(pki, version, who, reason):
    server_tls, client_ctx = _server(pki, "policy"), _client_context(pki, who, version)
    first, client = _connect(server_tls, client_ctx, None)
    assert first.peer_verdict().refusal == reason
    second, client = _connect(server_tls, client_ctx, client.get_session())
    if version == SSL.TLS1_3_VERSION:  # the refused handshake's ticket does not resume: a full handshake, refused again
        assert (second.verification_witnessed, second.peer_verdict().refusal) == (True, reason)
    else:  # the TLS 1.2 ticket promised before the certificate arrived resumes, and admits no one
        assert (second.verification_witnessed, second.peer_verdict().refusal) == (False, UNVERIFIED_RESUMPTION)
    assert second.peer_verdict().certificate is not None
    assert len(server_tls.certificates.verified_clients) == 0


@pytest.mark.parametrize("version", VERSIONS)
def test_a_verified_certificate_keeps_its_identity_on_resumption_until_its_record_is_gone(pki, version):
    server_tls, client_ctx = _server(pki, "reject_connection"), _client_context(pki, "alice", version)
    first, client = _connect(server_tls, client_ctx, None)
    assert (first.verification_witnessed, first.peer_verdict().refusal) == (True, None)
    resumed, _ = _connect(server_tls, client_ctx, client.get_session())
    assert (resumed.verification_witnessed, resumed.peer_verdict().refusal) == (False, None)
    _, client = _connect(server_tls, client_ctx, None)  # a fresh session
    server_tls.certificates.verified_clients.limit = 1  # and its record forgotten (evicted): fail closed
    server_tls.certificates.verified_clients.record(b"someone else")
    forgotten, _ = _connect(server_tls, client_ctx, client.get_session())
    assert (forgotten.verification_witnessed, forgotten.peer_verdict().refusal) == (False, UNVERIFIED_RESUMPTION)
