"""PEM loading, safe file writing and the development CA."""

from __future__ import annotations

import ipaddress
import os
import stat
import subprocess
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from mtlsgate.tls import pki
from mtlsgate.tls.pki import DevCA, PKIError


@pytest.fixture(scope="module")
def ca() -> DevCA:
    return DevCA.create(name="unit test CA")


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def ext(cert: x509.Certificate, kind):
    return cert.extensions.get_extension_for_class(kind)


# --- the CA on disk ------------------------------------------------------------------------------------


def test_create_writes_a_private_key_and_load_round_trips(tmp_path):
    directory = tmp_path / "ca"
    created = DevCA.create(str(directory), name="disk CA")
    assert mode(directory / "ca-key.pem") == 0o600
    assert mode(directory / "ca.pem") == 0o644
    assert mode(directory) == 0o700
    loaded = DevCA.load(str(directory))
    assert loaded.certificate == created.certificate
    assert pki.key_matches_certificate(loaded.key, created.certificate)
    assert loaded.chain == ()
    assert DevCA.load_or_create(str(directory)).certificate == created.certificate
    assert [p.name for p in directory.iterdir() if p.name.startswith(".")] == []  # no temporary files left


def test_root_is_an_ecdsa_ca_by_default_and_rsa_on_request():
    root = DevCA.create(name="x")
    assert isinstance(root.key, ec.EllipticCurvePrivateKey)
    constraints = ext(root.certificate, x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length is None
    usage = ext(root.certificate, x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    ext(root.certificate, x509.SubjectKeyIdentifier)
    assert root.is_root
    big = DevCA.create(rsa=True)
    assert isinstance(big.key, rsa.RSAPrivateKey) and big.key.key_size == 3072


def test_load_or_create_creates_when_absent(tmp_path):
    ca = DevCA.load_or_create(str(tmp_path / "new"), name="fresh")
    assert "CN=fresh" == ca.certificate.subject.rfc4514_string()
    assert (tmp_path / "new" / "ca-key.pem").exists()


def test_load_refuses_a_key_that_does_not_match(tmp_path, ca):
    DevCA.create(str(tmp_path))
    (tmp_path / "ca-key.pem").write_bytes(pki.private_key_pem(ca.key))
    with pytest.raises(PKIError, match="ca-key.pem: private key does not match certificate .*ca.pem"):
        DevCA.load(str(tmp_path))


# --- loading -------------------------------------------------------------------------------------------


def test_load_key_and_chain_names_both_files_on_mismatch(tmp_path, ca):
    a, b = ca.issue_server(["a.test"]), ca.issue_server(["b.test"])
    a.write(str(tmp_path / "a.pem"), str(tmp_path / "a-key.pem"))
    b.write(str(tmp_path / "b.pem"), str(tmp_path / "b-key.pem"))
    key, chain = pki.load_key_and_chain(str(tmp_path / "a.pem"), str(tmp_path / "a-key.pem"))
    assert chain[0] == a.certificate
    with pytest.raises(PKIError) as e:
        pki.load_key_and_chain(str(tmp_path / "a.pem"), str(tmp_path / "b-key.pem"))
    assert str(tmp_path / "a.pem") in str(e.value) and str(tmp_path / "b-key.pem") in str(e.value)
    assert "does not match" in str(e.value)


def test_combined_file_loads_without_a_key_path(tmp_path, ca):
    inter = ca.issue_intermediate("combined inter")
    issued = inter.issue_server(["combined.test"])
    path = tmp_path / "combined.test.pem"
    issued.write_combined(str(path))
    assert mode(path) == 0o600
    key, chain = pki.load_key_and_chain(str(path))
    assert chain == [issued.certificate, inter.certificate]
    assert pki.key_matches_certificate(key, chain[0])


def test_combined_file_without_a_key(tmp_path, ca):
    path = tmp_path / "nokey.pem"
    path.write_bytes(ca.issue_server(["x.test"]).cert_pem())
    with pytest.raises(PKIError, match=f"^{path}: no PEM private key found$"):
        pki.load_key_and_chain(str(path))


def test_load_certificates_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.pem"
    with pytest.raises(PKIError, match=f"^{missing}: no such file"):
        pki.load_certificates(str(missing))
    empty = tmp_path / "empty.pem"
    empty.write_text("just some text\n")
    with pytest.raises(PKIError, match=f"^{empty}: no PEM certificate found$"):
        pki.load_certificates(str(empty))
    broken = tmp_path / "broken.pem"
    broken.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(PKIError, match="broken.pem: certificate #1 is malformed"):
        pki.load_certificates(str(broken))
    with pytest.raises(PKIError, match=f"^{tmp_path}: cannot read"):
        pki.load_certificates(str(tmp_path))


def test_load_certificates_keeps_file_order(tmp_path, ca):
    certs = [ca.issue_server([f"n{i}.test"]).certificate for i in range(3)]
    path = tmp_path / "bundle.pem"
    path.write_bytes(b"junk before\n" + pki.certificates_pem(certs) + b"junk after\n")
    assert pki.load_certificates(str(path)) == certs


_PKCS8, _TRADITIONAL = serialization.PrivateFormat.PKCS8, serialization.PrivateFormat.TraditionalOpenSSL


@pytest.mark.parametrize(
    "make, fmt",
    [
        (lambda: ec.generate_private_key(ec.SECP384R1()), _PKCS8),
        (lambda: ec.generate_private_key(ec.SECP256R1()), _TRADITIONAL),
        (lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048), _PKCS8),
        (lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048), _TRADITIONAL),
        (lambda: ed25519.Ed25519PrivateKey.generate(), _PKCS8),
    ],
)
def test_load_private_key_formats(tmp_path, make, fmt):
    key = make()
    path = tmp_path / "key.pem"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption()))
    loaded = pki.load_private_key(str(path))
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert loaded.public_key().public_bytes(*spki) == key.public_key().public_bytes(*spki)


def test_key_errors_never_contain_key_material(tmp_path, ca):
    pem = pki.private_key_pem(ca.key)
    body = b"".join(pem.splitlines()[1:-1]).decode()
    damaged = pem.replace(body[40:48].encode(), b"!!!!!!!!")  # a key file that fails to parse
    encrypted = ca.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")
    )
    for name, data, problem in (("damaged.pem", damaged, "malformed"), ("encrypted.pem", encrypted, "encrypted")):
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(PKIError) as e:
            pki.load_private_key(str(path))
        message = str(e.value)
        assert message.startswith(f"{path}: ") and problem in message
        assert "\n" not in message and "BEGIN" not in message
        for line in data.splitlines()[1:-1]:
            assert line[:16].decode() not in message
        assert e.value.__cause__ is None and e.value.__suppress_context__


def test_key_file_unreadable(tmp_path):
    path = tmp_path / "key.pem"
    path.write_bytes(b"secret")
    path.chmod(0)
    if os.access(path, os.R_OK):  # running as root
        with pytest.raises(PKIError, match="no PEM private key found"):
            pki.load_private_key(str(path))
    else:
        with pytest.raises(PKIError, match="permission denied|Permission denied"):
            pki.load_private_key(str(path))


# --- writing -------------------------------------------------------------------------------------------


def test_write_files_are_atomic_with_the_right_modes(tmp_path):
    private, public = tmp_path / "k.pem", tmp_path / "c.pem"
    private.write_bytes(b"old")
    private.chmod(0o644)
    pki.write_private_file(str(private), b"new key")
    pki.write_public_file(str(public), b"cert")
    assert private.read_bytes() == b"new key" and mode(private) == 0o600
    assert public.read_bytes() == b"cert" and mode(public) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pem", "k.pem"]


def test_write_to_a_missing_directory_fails_cleanly(tmp_path):
    target = tmp_path / "nope" / "key.pem"
    with pytest.raises(PKIError, match="nope/key.pem: no such file"):
        pki.write_private_file(str(target), b"data")


def test_write_over_a_directory_leaves_no_temporary_file(tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(PKIError, match="taken: cannot write"):
        pki.write_public_file(str(tmp_path / "taken"), b"data")
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]


# --- issuing -------------------------------------------------------------------------------------------


def test_intermediate_chain_verifies_with_openssl(tmp_path, ca):
    ca_dir = tmp_path / "ca"
    root = DevCA.create(str(ca_dir))
    inter = root.issue_intermediate("inter 1")
    inter2 = inter.issue_intermediate("inter 2")
    assert inter.chain == () and inter2.chain == (inter.certificate,)
    leaf = inter2.issue_server(["deep.test"])
    assert leaf.chain == (inter2.certificate, inter.certificate)
    leaf.write(str(tmp_path / "leaf.pem"), str(tmp_path / "leaf-key.pem"))
    (tmp_path / "inter.pem").write_bytes(inter2.cert_pem())
    result = subprocess.run(
        ["openssl", "verify", "-CAfile", str(ca_dir / "ca.pem"), "-untrusted", str(tmp_path / "inter.pem"),
         "-purpose", "sslserver", str(tmp_path / "leaf.pem")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    # Without the intermediates, the leaf does not verify.
    lonely = tmp_path / "lonely.pem"
    lonely.write_bytes(pki.certificates_pem([leaf.certificate]))
    result = subprocess.run(["openssl", "verify", "-CAfile", str(ca_dir / "ca.pem"), str(lonely)], capture_output=True)
    assert result.returncode != 0


def test_server_certificate(ca):
    issued = ca.issue_server(["www.example.test", "*.apps.example.test", "127.0.0.1", "::1"])
    cert = issued.certificate
    assert ext(cert, x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])
    san = ext(cert, x509.SubjectAlternativeName)
    assert not san.critical
    assert san.value.get_values_for_type(x509.DNSName) == ["www.example.test", "*.apps.example.test"]
    assert san.value.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
    assert cert.subject.rfc4514_string() == "CN=www.example.test"
    constraints = ext(cert, x509.BasicConstraints)
    assert constraints.critical and not constraints.value.ca
    usage = ext(cert, x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and not usage.value.key_encipherment
    aki = ext(cert, x509.AuthorityKeyIdentifier).value.key_identifier
    assert aki == ext(ca.certificate, x509.SubjectKeyIdentifier).value.digest
    assert issued.chain == ()
    assert cert.signature_hash_algorithm.name == "sha256"
    cert.verify_directly_issued_by(ca.certificate)
    days = (cert.not_valid_after_utc - cert.not_valid_before_utc).days
    assert 825 <= days <= 826


def test_rsa_leaf_has_key_encipherment(ca):
    issued = ca.issue_server(["rsa.test"], rsa=True)
    assert isinstance(issued.key, rsa.RSAPrivateKey) and issued.key.key_size == 2048
    assert ext(issued.certificate, x509.KeyUsage).value.key_encipherment


def test_client_certificate(ca):
    issued = ca.issue_client("alice", uris=["spiffe://test/alice"], emails=["alice@example.test"], ou=["eng"])
    cert = issued.certificate
    assert ext(cert, x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
    san = ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://test/alice"]
    assert san.get_values_for_type(x509.RFC822Name) == ["alice@example.test"]
    assert san.get_values_for_type(x509.DNSName) == []
    assert cert.subject.rfc4514_string() == "CN=alice,OU=eng"


def test_client_certificate_without_names_gets_its_cn_as_dns_name_if_hostname_like(ca):
    plain = ca.issue_client("gateway")
    assert ext(plain.certificate, x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName) == ["gateway"]
    odd = ca.issue_client("Alice Example")
    with pytest.raises(x509.ExtensionNotFound):
        ext(odd.certificate, x509.SubjectAlternativeName)


def test_issue_with_both_usages_and_no_subject(ca):
    issued = ca.issue(None, uris=["spiffe://test/both"], server=True, client=True, hash_algorithm=hashes.SHA384())
    cert = issued.certificate
    assert set(ext(cert, x509.ExtendedKeyUsage).value) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert len(cert.subject) == 0 and ext(cert, x509.SubjectAlternativeName).critical
    assert cert.signature_hash_algorithm.name == "sha384"
    with pytest.raises(PKIError, match="needs a common name or a subject alternative name"):
        ca.issue(None)


def test_expired_certificate(ca):
    now = datetime.now(timezone.utc)
    issued = ca.issue("old", client=True, not_before=now - timedelta(days=30), not_after=now - timedelta(days=1))
    assert issued.certificate.not_valid_after_utc < now


def test_serial_numbers_are_random(ca):
    serials = {ca.issue_server(["s.test"]).certificate.serial_number for _ in range(5)}
    assert len(serials) == 5


@pytest.mark.parametrize(
    "name, problem",
    [
        ("*.*.example.com", "wildcard"),
        ("", "empty name"),
        ("a" * 64 + ".example.com", "longer than 63"),
        (".".join(["a" * 60] * 5), "longer than 253"),
        ("a*.example.com", "wildcard"),
        ("*", "wildcard"),
        ("www.*.example.com", "wildcard"),
        ("under_score.test", "invalid label"),
        ("bücher.test", "invalid label"),
        ("-lead.test", "invalid label"),
        ("trailing.dot.", "invalid label"),
    ],
)
def test_bad_server_names(ca, name, problem):
    with pytest.raises(PKIError, match=problem):
        ca.issue_server([name])


def test_acceptable_server_names(ca):
    ca.issue_server(["*.com"])
    ca.issue_server(["a" * 63 + ".test", "xn--bcher-kva.test", "single"])
    with pytest.raises(PKIError, match="at least one name"):
        ca.issue_server([])


def test_bad_ip_in_issue_is_a_pki_error(ca):
    with pytest.raises(PKIError, match="not-an-ip"):
        ca.issue("x", ips=["not-an-ip"])


def test_crl_lists_the_revoked_serial(tmp_path, ca):
    revoked = ca.issue_client("revoked")
    kept = ca.issue_client("kept")
    crl = ca.crl([revoked.certificate])
    assert crl.get_revoked_certificate_by_serial_number(revoked.certificate.serial_number) is not None
    assert crl.get_revoked_certificate_by_serial_number(kept.certificate.serial_number) is None
    assert crl.is_signature_valid(ca.certificate.public_key())
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number > 0
    assert crl.next_update_utc > datetime.now(timezone.utc) + timedelta(days=6)
    other = DevCA.create(name="other")
    with pytest.raises(PKIError, match="not issued by"):
        ca.crl([other.issue_client("x").certificate])


def test_load_crls_pem_several_and_der(tmp_path, ca):
    first, second = ca.crl(), ca.crl([ca.issue_client("r").certificate])
    pem = tmp_path / "crls.pem"
    pem.write_bytes(first.public_bytes(serialization.Encoding.PEM) + second.public_bytes(serialization.Encoding.PEM))
    assert pki.load_crls(str(pem)) == [first, second]
    der = tmp_path / "crl.der"
    der.write_bytes(second.public_bytes(serialization.Encoding.DER))
    assert pki.load_crls(str(der)) == [second]
    junk = tmp_path / "junk.crl"
    junk.write_bytes(b"\x00\x01junk")
    with pytest.raises(PKIError, match=f"^{junk}: not a valid PEM or DER"):
        pki.load_crls(str(junk))
    certs = tmp_path / "certs.pem"
    certs.write_bytes(ca.cert_pem())
    with pytest.raises(PKIError, match="no PEM certificate revocation list"):
        pki.load_crls(str(certs))


def test_fingerprint_and_pem_helpers(ca):
    assert pki.fingerprint_sha256(ca.certificate) == ca.certificate.fingerprint(hashes.SHA256()).hex()
    assert len(pki.fingerprint_sha256(ca.certificate)) == 64
    assert pki.private_key_pem(ca.key).startswith(b"-----BEGIN PRIVATE KEY-----")
    inter = ca.issue_intermediate("pem inter")
    assert inter.cert_pem() == pki.certificates_pem([inter.certificate])
    inter2 = inter.issue_intermediate("pem inter 2")
    assert inter2.cert_pem() == pki.certificates_pem([inter2.certificate, inter.certificate])
