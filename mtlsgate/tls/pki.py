"""
Reading PEM material, writing key files safely, and a small local certificate authority.

Every problem becomes a L{PKIError} whose message names the file and the problem, and never quotes the
file's contents: a key file's bytes must not end up in a log. L{DevCA} is an mkcert-like CA for
development and tests: ECDSA P-256 keys by default, intermediates, short-lived leaves and CRLs.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import re
import tempfile
import time
from datetime import datetime, timedelta, timezone
from typing import Callable, Sequence, Union

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = Union[rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey]
SignatureHash = Union[hashes.SHA256, hashes.SHA384, hashes.SHA512]
"""The digests the development CA signs with (SHA-256 unless asked)."""
_KEY_TYPES = (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)

_Validity = tuple[datetime, datetime]
_Extensions = Sequence[tuple[x509.ExtensionType, bool]]

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----.*?-----END \1-----", re.DOTALL)
_BACKDATE = timedelta(minutes=5)  # tolerate clocks that are a little behind ours


class PKIError(Exception):
    """A certificate, key or CRL problem; C{str()} is one line naming the file(s) and the problem."""


# --- reading ----------------------------------------------------------------------------------------


def _os_problem(path: str, e: OSError, doing: str) -> PKIError:
    if isinstance(e, FileNotFoundError):
        return PKIError(f"{path}: no such file or directory")
    return PKIError(f"{path}: cannot {doing} ({e.strerror or type(e).__name__})")


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise _os_problem(path, e, "read") from None


def _pem_blocks(data: bytes, label: Callable[[bytes], bool]) -> list[bytes]:
    return [m.group(0) for m in _PEM_BLOCK.finditer(data) if label(m.group(1))]


def load_certificates(path: str) -> list[x509.Certificate]:
    """Every PEM C{CERTIFICATE} in C{path}, in file order."""
    certificates = []
    for number, block in enumerate(_pem_blocks(_read(path), lambda label: label == b"CERTIFICATE"), 1):
        try:
            certificates.append(x509.load_pem_x509_certificate(block))
        except ValueError:
            raise PKIError(f"{path}: certificate #{number} is malformed") from None
    if not certificates:
        raise PKIError(f"{path}: no PEM certificate found")
    return certificates


def load_private_key(path: str) -> PrivateKey:
    """The one unencrypted PEM private key (PKCS#8 or traditional) in C{path}."""
    blocks = _pem_blocks(_read(path), lambda label: label.endswith(b"PRIVATE KEY"))
    if not blocks:
        raise PKIError(f"{path}: no PEM private key found")
    if len(blocks) > 1:
        raise PKIError(f"{path}: holds {len(blocks)} private keys, expected one")
    try:
        key = serialization.load_pem_private_key(blocks[0], password=None)
    except TypeError:
        raise PKIError(f"{path}: private key is encrypted; an unencrypted key is needed") from None
    except (ValueError, UnsupportedAlgorithm):
        # The library's message is not passed on: only our own words describe a key file.
        raise PKIError(f"{path}: private key is malformed or of an unsupported kind") from None
    if not isinstance(key, _KEY_TYPES):
        raise PKIError(f"{path}: unsupported private key type {type(key).__name__} (use RSA, EC or Ed25519)")
    return key


def load_key_and_chain(cert_path: str, key_path: str | None = None) -> tuple[PrivateKey, list[x509.Certificate]]:
    """
    The key and the certificate chain (leaf first, then the rest as in the file). Without C{key_path}
    the key is read from C{cert_path} too: the txsni "NAME.pem" layout of key, certificate and chain.
    """
    chain = load_certificates(cert_path)
    key = load_private_key(key_path or cert_path)
    if not key_matches_certificate(key, chain[0]):
        if key_path is None:
            raise PKIError(f"{cert_path}: private key does not match the certificate in the same file")
        raise PKIError(f"{key_path}: private key does not match certificate {cert_path}")
    return key, chain


def load_crls(path: str) -> list[x509.CertificateRevocationList]:
    """Every CRL of a PEM file, or the one CRL of a DER file."""
    data = _read(path)
    blocks = _pem_blocks(data, lambda label: label == b"X509 CRL")
    if not blocks and b"-----BEGIN " in data:
        raise PKIError(f"{path}: no PEM certificate revocation list found")
    try:
        if blocks:
            return [x509.load_pem_x509_crl(block) for block in blocks]
        return [x509.load_der_x509_crl(data)]
    except ValueError:
        raise PKIError(f"{path}: not a valid PEM or DER certificate revocation list") from None


def key_matches_certificate(key: PrivateKey, cert: x509.Certificate) -> bool:
    """Whether C{key} is the private half of C{cert}'s public key."""
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        return key.public_key().public_bytes(*spki) == cert.public_key().public_bytes(*spki)
    except (ValueError, UnsupportedAlgorithm):
        return False


# --- writing ----------------------------------------------------------------------------------------


_NO_ROOM = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def _write_problem(path: str, e: OSError) -> PKIError:
    """A failed write, said so that nobody has to wonder about the file that was there."""
    if isinstance(e, FileNotFoundError):  # no such directory: there was no file before either
        return _os_problem(path, e, "write")
    room = " (disk full, quota or file size limit)" if e.errno in _NO_ROOM else ""
    return PKIError(f"{path}: cannot write ({e.strerror or type(e).__name__}){room}; the file there before, if any, is unchanged")


def _write_atomically(path: str, data: bytes, mode: int) -> None:
    """
    Readers see the old file or the whole new one, never a partial write, and never a key with
    loose permissions; a failed write (a full disk) leaves the old file as it was and no
    temporary file behind.
    """
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    except OSError as e:
        raise _write_problem(path, e) from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)  # mkstemp creates 0600, so a key is never readable by others
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        if isinstance(e, OSError):
            raise _write_problem(path, e) from None
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable, where the platform allows it
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def write_private_file(path: str, data: bytes) -> None:
    """Atomically replace C{path} with C{data}, mode 0600."""
    _write_atomically(path, data, 0o600)


def write_public_file(path: str, data: bytes) -> None:
    """Atomically replace C{path} with C{data}, mode 0644."""
    _write_atomically(path, data, 0o644)


def fingerprint_sha256(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def is_issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Whether C{issuer} names C{cert}'s issuer and its key made C{cert}'s signature (a self-signed one issues itself)."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def private_key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def certificates_pem(certs: Sequence[x509.Certificate]) -> bytes:
    return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certs)


# --- issuing ----------------------------------------------------------------------------------------


@attrs.frozen
class IssuedCertificate:
    """A new key and certificate, with the intermediates (not the root) a peer needs to verify it."""

    key: PrivateKey
    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...] = ()

    def cert_pem(self) -> bytes:
        return certificates_pem([self.certificate, *self.chain])

    def key_pem(self) -> bytes:
        return private_key_pem(self.key)

    def write(self, cert_path: str, key_path: str) -> None:
        write_private_file(key_path, self.key_pem())
        write_public_file(cert_path, self.cert_pem())

    def write_combined(self, path: str) -> None:
        """Key, certificate and chain in one 0600 file (the txsni "NAME.pem" layout)."""
        write_private_file(path, self.key_pem() + self.cert_pem())


def self_signed(
    common_name: str, dns_names: Sequence[str] = (), extensions: Sequence[tuple[x509.ExtensionType, bool]] = (), days: int = 7,
) -> tuple[PrivateKey, x509.Certificate]:  # fmt: skip
    """A fresh P-256 key and a short-lived self-signed certificate for it (not a CA)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=days))
    )
    if dns_names:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in dns_names]), critical=False)
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return key, builder.sign(key, hashes.SHA256())


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _new_key(rsa_bits: int | None) -> PrivateKey:
    if rsa_bits:
        return rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)
    return ec.generate_private_key(ec.SECP256R1())


def _signature_hash(key: PrivateKey, requested: SignatureHash | None) -> SignatureHash | None:
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        return None  # EdDSA hashes internally
    return requested or hashes.SHA256()


def _key_usage(**flags: bool) -> x509.KeyUsage:
    names = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment", "key_agreement",
             "key_cert_sign", "crl_sign", "encipher_only", "decipher_only")  # fmt: skip
    return x509.KeyUsage(**{name: flags.get(name, False) for name in names})


def _name(common_name: str | None, ou: Sequence[str] = (), organization: Sequence[str] = ()) -> x509.Name:
    parts = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in organization]
    parts += [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, u) for u in ou]
    if common_name:
        parts.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(parts)


_CA_EXTENSIONS = (
    (x509.BasicConstraints(ca=True, path_length=None), True),
    (_key_usage(key_cert_sign=True, crl_sign=True), True),
)

_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?\Z")


def _hostname_problem(name: str) -> str | None:
    """Why C{name} is not a valid DNS name for a certificate (a leftmost C{*} label is allowed), or None."""
    if not name:
        return "empty name"
    if len(name) > 253:
        return f"{name[:40]!r}...: name longer than 253 characters"
    labels = name.split(".")
    for position, label in enumerate(labels):
        if label == "*" and position == 0 and len(labels) > 1:
            continue
        if "*" in label:
            return f"{name!r}: a wildcard '*' must be the whole leftmost label of a longer name"
        if len(label) > 63:
            return f"{name!r}: label longer than 63 characters"
        if not _LABEL.match(label):
            return f"{name!r}: invalid label {label!r} (letters, digits and inner '-' only; IDNs in punycode)"
    return None


def _ip_literal(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


@attrs.frozen
class DevCA:
    """A local certificate authority for development and tests."""

    certificate: x509.Certificate
    key: PrivateKey
    # For an intermediate: the certificates above it, up to but excluding the root; () for a root.
    chain: tuple[x509.Certificate, ...] = ()

    @classmethod
    def create(cls, directory: str | None = None, name: str = "mtlsgate development CA", rsa: bool = False, days: int = 3650) -> DevCA:
        """A new self-signed root; with C{directory}, also written there as ca.pem and ca-key.pem (0600)."""
        key = _new_key(3072 if rsa else None)
        cert = _sign(_name(name), key.public_key(), None, key, _validity(days), _CA_EXTENSIONS)
        ca = cls(certificate=cert, key=key)
        if directory is not None:
            ca._write(directory)
        return ca

    @classmethod
    def load(cls, directory: str) -> DevCA:
        cert_path, key_path = os.path.join(directory, "ca.pem"), os.path.join(directory, "ca-key.pem")
        key, certs = load_key_and_chain(cert_path, key_path)
        try:
            is_ca = certs[0].extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except (x509.ExtensionNotFound, ValueError):
            is_ca = False
        if not is_ca:
            raise PKIError(f"{cert_path}: certificate is not a CA certificate")
        return cls(certificate=certs[0], key=key, chain=tuple(certs[1:]))

    @classmethod
    def load_or_create(cls, directory: str, **kw: object) -> DevCA:
        """Load the CA in C{directory}; create it only when neither of its files exists."""
        if any(os.path.exists(os.path.join(directory, f)) for f in ("ca.pem", "ca-key.pem")):
            return cls.load(directory)
        return cls.create(directory, **kw)  # type: ignore[arg-type]

    def _write(self, directory: str) -> None:
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        except OSError as e:
            raise _os_problem(directory, e, "create directory") from None
        write_private_file(os.path.join(directory, "ca-key.pem"), private_key_pem(self.key))
        write_public_file(os.path.join(directory, "ca.pem"), self.cert_pem())

    @property
    def is_root(self) -> bool:
        cert = self.certificate
        try:
            cert.verify_directly_issued_by(cert)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
            return False
        return True

    def _issuing_chain(self) -> tuple[x509.Certificate, ...]:
        """What a certificate issued by this CA needs sent along with it: every CA certificate but the root."""
        return () if self.is_root else (self.certificate, *self.chain)

    def issue_intermediate(self, name: str, days: int = 1825) -> DevCA:
        """A sub-CA, kept in memory; what it issues carries it (and the CAs between it and the root) as chain."""
        key = _new_key(None)
        cert = _sign(_name(name), key.public_key(), self.certificate, self.key, _validity(days), _CA_EXTENSIONS)
        return DevCA(certificate=cert, key=key, chain=self._issuing_chain())

    def issue(
        self,
        common_name: str | None,
        *,
        dns: Sequence[str] = (), ips: Sequence[str] = (), uris: Sequence[str] = (), emails: Sequence[str] = (),
        ou: Sequence[str] = (), organization: Sequence[str] = (),
        server: bool = False, client: bool = False,
        days: int = 90, not_before: datetime | None = None, not_after: datetime | None = None,
        rsa: bool = False, rsa_bits: int = 2048, hash_algorithm: SignatureHash | None = None,
    ) -> IssuedCertificate:  # fmt: skip
        """
        A leaf certificate with a new key. Names are not validated here (tests may want odd ones); see
        L{issue_server} and L{issue_client} for the checked forms. C{not_before}/C{not_after} override
        the validity, e.g. to make an already expired certificate.
        """
        what = common_name or next(iter([*dns, *uris, *emails, *ips]), "")
        try:
            sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
            sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
            sans += [x509.UniformResourceIdentifier(u) for u in uris]
            sans += [x509.RFC822Name(e) for e in emails]
            subject = _name(common_name, ou, organization)
            if not sans and not subject:
                raise PKIError("a certificate needs a common name or a subject alternative name")
            key = _new_key(rsa_bits if rsa else None)
            extensions = [
                (x509.BasicConstraints(ca=False, path_length=None), True),
                (_key_usage(digital_signature=True, key_encipherment=rsa), True),
            ]
            purposes = ((server, ExtendedKeyUsageOID.SERVER_AUTH), (client, ExtendedKeyUsageOID.CLIENT_AUTH))
            usages = [oid for wanted, oid in purposes if wanted]
            if usages:
                extensions.append((x509.ExtendedKeyUsage(usages), False))
            if sans:
                extensions.append((x509.SubjectAlternativeName(sans), not subject))  # RFC 5280: critical when the subject is empty
            validity = _validity(days, not_before, not_after)
            cert = _sign(subject, key.public_key(), self.certificate, self.key, validity, extensions, hash_algorithm)
        except ValueError as e:
            raise PKIError(f"cannot issue a certificate for {what!r}: {e}") from None
        return IssuedCertificate(key=key, certificate=cert, chain=self._issuing_chain())

    def issue_server(self, names: Sequence[str], days: int = 825, rsa: bool = False) -> IssuedCertificate:
        """A serverAuth certificate for DNS names, C{*.} wildcards and IP literals; the first name is the CN."""
        if not names:
            raise PKIError("a server certificate needs at least one name")
        dns, ips = [], []
        for name in names:
            if _ip_literal(name) is not None:
                ips.append(name)
            elif problem := _hostname_problem(name):
                raise PKIError(problem)
            else:
                dns.append(name)
        common_name = names[0] if len(names[0]) <= 64 else None  # the CN attribute holds at most 64 characters
        return self.issue(common_name, dns=dns, ips=ips, server=True, days=days, rsa=rsa)

    def issue_client(
        self, common_name: str, *, uris: Sequence[str] = (), emails: Sequence[str] = (), dns: Sequence[str] = (),
        ou: Sequence[str] = (), days: int = 90, rsa: bool = False,
    ) -> IssuedCertificate:  # fmt: skip
        """A clientAuth certificate; without other names, a hostname-like CN is repeated as a DNS name."""
        for name in dns:
            if problem := _hostname_problem(name):
                raise PKIError(problem)
        if not (uris or emails or dns) and "*" not in common_name and _hostname_problem(common_name) is None:
            dns = [common_name]
        return self.issue(common_name, uris=uris, emails=emails, dns=dns, ou=ou, client=True, days=days, rsa=rsa)

    def crl(self, revoked: Sequence[x509.Certificate] = (), days: int = 7) -> x509.CertificateRevocationList:
        """A CRL signed by this CA listing C{revoked}, each of which this CA must have issued."""
        for cert in revoked:
            if cert.issuer != self.certificate.subject:
                raise PKIError(f"cannot revoke {cert.subject.rfc4514_string()!r}: not issued by {self.certificate.subject.rfc4514_string()!r}")
        revoked_at = _now() - _BACKDATE
        return self.crl_for_serials([(cert.serial_number, revoked_at) for cert in revoked], days=days)

    def crl_for_serials(self, entries: Sequence[tuple[int, datetime]], days: int = 7) -> x509.CertificateRevocationList:
        """
        A CRL signed by this CA listing C{(serial, revocation time)} entries: what C{mtlsgate ca crl}
        needs, since it keeps serials rather than the revoked certificates themselves.
        """
        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.certificate.subject)
            .last_update(now - _BACKDATE)
            .next_update(now + timedelta(days=days))
            .add_extension(x509.CRLNumber(time.time_ns() // 1000), critical=False)  # increases with every CRL
            .add_extension(_authority_key_identifier(self.certificate), critical=False)
        )
        for serial, revoked_at in entries:
            entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(revoked_at).build()
            builder = builder.add_revoked_certificate(entry)
        return builder.sign(self.key, _signature_hash(self.key, None))

    def cert_pem(self) -> bytes:
        """This CA's certificate, followed by its chain for an intermediate."""
        return certificates_pem([self.certificate, *self.chain])


def _validity(days: int, not_before: datetime | None = None, not_after: datetime | None = None) -> _Validity:
    now = _now()
    return not_before or now - _BACKDATE, not_after or now + timedelta(days=days)


def _authority_key_identifier(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    """The issuer's own SKI when it has one, so that chain building by key identifier finds it."""
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key())  # type: ignore[arg-type]
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _sign(
    subject: x509.Name, public_key: CertificatePublicKeyTypes, issuer: x509.Certificate | None, signing_key: PrivateKey,
    validity: _Validity, extensions: _Extensions, hash_algorithm: SignatureHash | None = None,
) -> x509.Certificate:  # fmt: skip
    """A certificate signed by C{issuer}'s key C{signing_key}; self-signed when C{issuer} is None."""
    if issuer is None:
        issuer_name, aki = subject, x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key)  # type: ignore[arg-type]
    else:
        issuer_name, aki = issuer.subject, _authority_key_identifier(issuer)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(aki, critical=False)
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(signing_key, _signature_hash(signing_key, hash_algorithm))
