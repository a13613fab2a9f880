"""
The certificate chain the gateway presents, through real handshakes between pyOpenSSL connections over
memory BIOs: the certificate file's chain, worked out once at load, never by OpenSSL on every handshake.

Without SSL_MODE_NO_AUTO_CHAIN, OpenSSL builds the server's chain on every full handshake from the
context's verify store (the client-CA bundle) when the certificate file has no chain: an
X509_verify_cert of the gateway's own certificate per connection, and the bundle's root sent to every
client, which then checks one more signature (nginx sets NO_AUTO_CHAIN; bench/RESULTS.md, "new mTLS
connections with two workers").  An intermediate of the bundle that issued a leaf-only certificate is
still sent, found once when the context is built.
"""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL

from mtlsgate.config.model import CertificateSpec, DownstreamMTLS
from mtlsgate.tls import server as tls
from mtlsgate.tls.pki import DevCA, certificates_pem, private_key_pem


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("served-chain")
    root = DevCA.create(str(d / "root"), name="chain root CA")
    inter = root.issue_intermediate("chain intermediate CA")
    return {"dir": d, "root": root, "inter": inter, "alice": root.issue_client("alice")}


def _write(d, name: str, issued, chain=()) -> CertificateSpec:
    (d / f"{name}.pem").write_bytes(certificates_pem([issued.certificate, *chain]))
    (d / f"{name}-key.pem").write_bytes(private_key_pem(issued.key))
    return CertificateSpec(str(d / f"{name}.pem"), str(d / f"{name}-key.pem"))


def _bundle(d, name: str, *cas: DevCA) -> str:
    (d / name).write_bytes(certificates_pem([ca.certificate for ca in cas]))
    return str(d / name)


def _presented(pki, spec: CertificateSpec, ca_file: str | None) -> list[bytes]:
    """The DER of each certificate the gateway sends in a TLS 1.3 handshake with alice."""
    verification = tls.ClientVerification.load(DownstreamMTLS(ca_file=ca_file, client_auth="require" if ca_file else "off"))
    server_tls = tls.ServerTLS()
    server_tls.install(server_tls.build(tls.load_served_certificates([spec], None), verification))
    server = server_tls.serverConnectionForTLS(None)
    server.set_accept_state()
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.use_certificate(pki["alice"].certificate)
    ctx.use_privatekey(pki["alice"].key)
    client = SSL.Connection(ctx, None)
    client.set_connect_state()
    for _ in range(10):
        for source, sink in ((client, server), (server, client)):
            try:
                source.do_handshake()
            except SSL.WantReadError:
                pass
            try:
                sink.bio_write(source.bio_read(65536))
            except SSL.WantReadError:
                pass
    chain = client.get_peer_cert_chain(as_cryptography=True)
    assert chain is not None
    return [cert.public_bytes(serialization.Encoding.DER) for cert in chain]


def _der(*issued) -> list[bytes]:
    return [x.certificate.public_bytes(serialization.Encoding.DER) for x in issued]


def test_a_leaf_the_client_ca_issued_goes_alone_not_with_the_root(pki):
    leaf = pki["root"].issue_server(["localhost"])
    spec = _write(pki["dir"], "by-root", leaf)
    assert _presented(pki, spec, _bundle(pki["dir"], "root.pem", pki["root"])) == _der(leaf)


def test_the_certificate_files_chain_goes_as_written(pki):
    leaf = pki["inter"].issue_server(["localhost"])
    spec = _write(pki["dir"], "with-chain", leaf, [pki["inter"].certificate])
    assert _presented(pki, spec, _bundle(pki["dir"], "root.pem", pki["root"])) == _der(leaf, pki["inter"])
    assert _presented(pki, spec, None) == _der(leaf, pki["inter"])


def test_an_intermediate_of_the_client_ca_bundle_still_completes_a_leaf_only_file(pki):
    leaf = pki["inter"].issue_server(["localhost"])
    spec = _write(pki["dir"], "leaf-only", leaf)
    bundle = _bundle(pki["dir"], "root-and-inter.pem", pki["root"], pki["inter"])
    assert _presented(pki, spec, bundle) == _der(leaf, pki["inter"])
    assert _presented(pki, spec, None) == _der(leaf)  # no bundle, nothing to complete it with (as before)
