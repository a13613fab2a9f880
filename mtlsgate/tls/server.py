"""
Server-side TLS: fully configured pyOpenSSL contexts, one per certificate, picked by SNI; the client
certificate verify callback that records why a certificate was refused; and a connection creator
whose certificate set can be swapped at run time without touching open connections.
"""

from __future__ import annotations

import os
import sys
from collections import OrderedDict
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Sequence

import attrs
from cryptography import x509
from OpenSSL import SSL
from OpenSSL.crypto import FILETYPE_ASN1, X509StoreFlags, dump_certificate
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from mtlsgate.tls import pki
from mtlsgate.tls.fastwrite import SendAtOnce
from mtlsgate.config.model import CertificateSpec, DownstreamMTLS, Limits
from mtlsgate.identity import IdentityCache, KnownCertificate, printable
from mtlsgate.tls.observer import IConnectionObserver, NoObserver

log = Logger(namespace="mtlsgate.tls.server")

# ECDHE key exchange with AEAD ciphers only, for TLS 1.2; TLS 1.3 suites are all AEAD already.
# @SECLEVEL=2, whatever the library's default: keys of 112-bit strength or more (RSA >= 2048, EC >= 224)
# and no SHA-1 signatures, in our certificates, the peer's, and every chain verified.
CIPHERS = (
    b"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-CHACHA20-POLY1305:"
    b"ECDHE-RSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:@SECLEVEL=2"
)
_OPTIONS = (
    SSL.OP_NO_COMPRESSION
    | SSL.OP_CIPHER_SERVER_PREFERENCE
    | getattr(SSL, "OP_NO_RENEGOTIATION", 0)
    | SSL.OP_SINGLE_ECDH_USE
)
ALPN_HTTP1 = b"http/1.1"
ALPN_H2 = b"h2"  # RFC 9113 3.2: HTTP/2 over TLS
ALPN_ACME_TLS = b"acme-tls/1"  # RFC 8737

#: The gateway's own refusals, on top of OpenSSL's verification (X509_V_ERR codes are positive).
MULTIPLE_COMMON_NAMES = "more than one common name"
_ERRNO_MULTIPLE_COMMON_NAMES = -1

# X509_V_ERR_* codes to the reasons users see (403 page, logs, metrics labels).
_REASONS = {
    2: "untrusted issuer",  # UNABLE_TO_GET_ISSUER_CERT
    3: "no CRL for issuer",  # UNABLE_TO_GET_CRL
    7: "bad signature",
    9: "not yet valid",
    10: "expired",
    18: "untrusted issuer",  # DEPTH_ZERO_SELF_SIGNED_CERT
    19: "untrusted issuer",  # SELF_SIGNED_CERT_IN_CHAIN
    20: "untrusted issuer",  # UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    21: "untrusted issuer",  # UNABLE_TO_VERIFY_LEAF_SIGNATURE
    22: "chain too long",
    23: "revoked",
    24: "invalid CA certificate",
    26: "not a client certificate (extended key usage)",  # INVALID_PURPOSE
    _ERRNO_MULTIPLE_COMMON_NAMES: MULTIPLE_COMMON_NAMES,
    66: "key too small",  # EE_KEY_TOO_SMALL: RSA/DSA/DH under 2048 bits at security level 2
    67: "CA key too small",  # CA_KEY_TOO_SMALL
    68: "weak signature digest (e.g. SHA-1)",  # CA_MD_TOO_WEAK
}


def reason_for_verify_error(errno: int) -> str:
    """A short reason for an OpenSSL X509_V_ERR code."""
    return _REASONS.get(errno, f"certificate verification error {errno}")


@attrs.define
class VerifyFailure:
    """Why a peer certificate did not verify: the first error OpenSSL reported."""

    reason: str
    errno: int
    depth: int
    subject: str


#: A resumed session whose certificate did not verify in a full handshake under the trust settings in force.
UNVERIFIED_RESUMPTION = "not verified in a full handshake with the current trust settings (resumed TLS session)"


class VerifiedCertificates:
    """
    SHA-256 fingerprints of the client certificates that verified in a full handshake on one
    certificate set: the verdict a resumed session is judged by.  OpenSSL runs no verification on
    a resumed handshake, and the verdict it keeps in the session is useless here (pyOpenSSL records
    success for every certificate the verify callback lets through, as C{enforcement: policy} does).
    A set lives exactly as long as the session-ticket key and session cache of its contexts (a reload
    or a ticket-key rotation makes new ones), so a record never outlives the trust settings it was
    made under.  Bounded: past C{limit}, the least recently used record goes, and a session resumed
    with that certificate is refused until the client makes a full handshake (fail closed).
    """

    def __init__(self, limit: int = 100_000) -> None:
        self.limit = limit
        self._seen: OrderedDict[bytes, None] = OrderedDict()

    def record(self, fingerprint: bytes) -> None:
        self._seen[fingerprint] = None
        self._seen.move_to_end(fingerprint)
        while len(self._seen) > self.limit:
            self._seen.popitem(last=False)

    def __contains__(self, fingerprint: object) -> bool:
        if fingerprint not in self._seen:
            return False
        self._seen.move_to_end(fingerprint)  # type: ignore[arg-type]
        return True

    def __len__(self) -> int:
        return len(self._seen)


def certificate_verdict(failure: VerifyFailure | None, witnessed: bool, recorded: bool, validity: tuple[datetime, datetime], now: datetime) -> str | None:
    """
    Why the client certificate of a finished handshake must not be trusted, or None to trust it.

    Trusted only on evidence from this gateway: a full verification on this connection that found
    nothing wrong (C{witnessed}, no C{failure}); or, when no verification ran (a resumed session),
    a record that the same certificate verified in a full handshake under the trust settings in
    force (C{recorded}), and the certificate still within its validity.  Anything else is refused,
    so a session made by a refused handshake, or by one no longer on record, admits no one.
    """
    if failure is not None:
        return failure.reason
    if witnessed:
        return None
    if not recorded:
        return UNVERIFIED_RESUMPTION
    not_before, not_after = validity
    if now < not_before:
        return reason_for_verify_error(9)
    if now > not_after:
        return reason_for_verify_error(10)
    return None


@attrs.frozen
class PeerVerdict:
    """
    The client certificate of a finished handshake (None: none presented) and why it is refused (None: trusted);
    C{known}: what the certificate's bytes say (its identity and XFCC element), when this module made the verdict.
    """

    certificate: x509.Certificate | None
    refusal: str | None
    known: KnownCertificate | None = None


class GatewayConnection(SSL.Connection):
    """
    An C{SSL.Connection} that remembers the first client-certificate verification failure, whether a
    verification ran at all on this connection, and the server name it refused (C{unknown_sni: reject}).
    """

    verify_failure: VerifyFailure | None = None
    verification_witnessed = False
    verified_certificates: VerifiedCertificates | None = None  # of the certificate set it was accepted on
    identities: IdentityCache | None = None  # the listener's certificates already parsed, by their DER
    refused_server_name: str | None = None
    offered_acme_tls: bool = False  # the client offered acme-tls/1 (RFC 8737): the connection never carries HTTP
    _verdict: PeerVerdict | None = None

    def peer_verdict(self, now: datetime | None = None) -> PeerVerdict:
        """
        The verdict on the peer's certificate, once the handshake is done; made once per connection.
        A full verification that passed is recorded for the sessions it hands out (see
        L{VerifiedCertificates}); a resumed session is judged by that record (L{certificate_verdict}).
        """
        if self._verdict is None:
            self._verdict = _judge(self, now or datetime.now(timezone.utc))
        return self._verdict


def _known(conn: GatewayConnection, certificate: Any) -> KnownCertificate:
    """What the certificate (an OpenSSL.crypto.X509) says, from the listener's cache: parsed once per distinct DER."""
    der = dump_certificate(FILETYPE_ASN1, certificate)
    return conn.identities.known(der) if conn.identities is not None else KnownCertificate.from_der(der)


def _judge(conn: GatewayConnection, now: datetime) -> PeerVerdict:
    peer = conn.get_peer_certificate()
    if peer is None:
        return PeerVerdict(None, None)
    known = _known(conn, peer)  # its identity may come from the cache; the verdict below is this connection's own
    certificate = known.certificate
    verified = conn.verified_certificates
    recorded = verified is not None and known.fingerprint in verified
    validity = (certificate.not_valid_before_utc, certificate.not_valid_after_utc)
    refusal = certificate_verdict(conn.verify_failure, conn.verification_witnessed, recorded, validity, now)
    if refusal is None and conn.verification_witnessed and verified is not None:
        verified.record(known.fingerprint)
    return PeerVerdict(certificate, refusal, known)


def peer_verdict(connection: object) -> PeerVerdict:
    """The verdict on any connection's peer: a connection this module did not make is trusted with nothing."""
    if isinstance(connection, GatewayConnection):
        return connection.peer_verdict()
    certificate = getattr(connection, "get_peer_certificate", lambda **kw: None)(as_cryptography=True)
    return PeerVerdict(certificate, None if certificate is None else UNVERIFIED_RESUMPTION)


class UnknownServerName(Exception):
    """A ClientHello asked for a name no served certificate carries, and C{unknown_sni} is C{reject}."""


def _keep_refusals_out_of_excepthook() -> None:
    """
    pyOpenSSL hands an exception raised in the SNI callback to C{sys.excepthook} (a traceback on
    stderr, which twistd logs as errors) before it answers with the alert.  A refused name is the
    expected outcome, logged on one line of its own, so the hook passes over L{UnknownServerName}
    and hands everything else on as before.  Installed once, when a set that rejects is installed.
    """
    previous = sys.excepthook
    if getattr(previous, "passes_over_unknown_server_names", False):
        return

    def hook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        if not isinstance(value, UnknownServerName):
            previous(kind, value, tb)

    hook.passes_over_unknown_server_names = True  # type: ignore[attr-defined]
    sys.excepthook = hook


@attrs.frozen
class ServedCertificate:
    """A certificate the gateway serves: its key, leaf and chain, and the names it answers for."""

    key: object
    chain: tuple[x509.Certificate, ...]
    source: str
    placeholder: bool = False  # autocert's stand-in until a real certificate is issued

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def names(self) -> tuple[str, ...]:
        """DNS and IP SANs (lower case), or the subject CN when there are no SANs."""
        try:
            san = self.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            cns = self.leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
            return tuple(str(cn.value).lower() for cn in cns)
        dns = [name.lower() for name in san.get_values_for_type(x509.DNSName)]
        return tuple(dns + [str(ip) for ip in san.get_values_for_type(x509.IPAddress)])


def placeholder_certificate() -> ServedCertificate:
    """
    A self-signed certificate to serve while autocert has issued nothing yet: the listener must
    have some certificate for the CA's TLS-ALPN-01 validator to reach the ALPN callback.
    """
    key, certificate = pki.self_signed("mtlsgate certificate pending (autocert)")
    return ServedCertificate(key=key, chain=(certificate,), source="(placeholder until autocert issues a certificate)", placeholder=True)


def load_served_certificates(specs: Sequence[CertificateSpec], certs_dir: str | None) -> list[ServedCertificate]:
    """Load configured certificate files and every C{*.pem} of a certs_dir (key+cert+chain each)."""
    served = []
    for spec in specs:
        key, chain = pki.load_key_and_chain(spec.cert, spec.key)
        served.append(ServedCertificate(key=key, chain=tuple(chain), source=spec.cert))
    if certs_dir is not None and os.path.isdir(certs_dir):  # autocert makes it on first issue
        for name in sorted(os.listdir(certs_dir)):
            if name.endswith(".pem"):
                path = os.path.join(certs_dir, name)
                key, chain = pki.load_key_and_chain(path)
                served.append(ServedCertificate(key=key, chain=tuple(chain), source=path))
    return served


@attrs.frozen
class ClientVerification:
    """
    Downstream mTLS settings, with the CRLs already parsed.  With C{crl_check: chain} (the default)
    every certificate of a client's chain is checked against the CRL of its issuer, so a revoked
    intermediate keeps out everything under it; each CA of the bundle must then have its CRL in the
    file, or loading fails with one line naming the CA and the file.

    @ivar anchors: SHA-256 fingerprints of the bundle's CAs that are not self-signed: with partial-chain
        verification a client's chain stops at them, so OpenSSL cannot find their issuer's CRL for them.
    @ivar revoked_anchors: those of the anchors that a CRL in the file, signed by their issuer in the
        bundle, lists: what OpenSSL cannot see for them, checked here.
    @ivar bundle: the certificates of C{ca_file}, which may complete the chain of a served certificate file without one.
    """

    settings: DownstreamMTLS
    crls: tuple[x509.CertificateRevocationList, ...] = ()
    anchors: frozenset[str] = frozenset()
    revoked_anchors: frozenset[str] = frozenset()
    bundle: tuple[x509.Certificate, ...] = ()

    @classmethod
    def load(cls, settings: DownstreamMTLS, shared_crls: Sequence[x509.CertificateRevocationList] = ()) -> ClientVerification:
        """
        C{shared_crls} (from a cluster's shared store) join the file's: only those a CA of the bundle
        signed count, and per issuer only the newest (by CRL number) is kept, so an older CRL never
        un-revokes what a newer one lists.
        """
        crls = tuple(pki.load_crls(settings.crl_file)) if settings.crl_file else ()
        bundle = pki.load_certificates(settings.ca_file) if settings.ca_file else []  # fail early, naming the file, on an empty bundle
        if shared_crls:
            crls = newest_crl_per_issuer(crls + tuple(crl for crl in shared_crls if any(_is_crl_of(crl, ca) for ca in bundle)))
        if not (crls and settings.crl_check == "chain"):
            return cls(settings=settings, crls=crls, bundle=tuple(bundle))
        where = settings.crl_file or "the shared store's CRLs"
        if settings.crl_file and shared_crls:
            where = f"{settings.crl_file} and the shared store's CRLs"
        for ca in bundle:
            if not any(_is_crl_of(crl, ca) for crl in crls):
                raise pki.PKIError(
                    f"{where}: no CRL from CA {printable(ca.subject.rfc4514_string())} of {settings.ca_file} "
                    "(crl_check: chain needs one from every CA in the bundle; crl_check: leaf checks client certificates only)"
                )
        anchors = [ca for ca in bundle if not pki.is_issued_by(ca, ca)]
        revoked = [ca for ca in anchors if _revoked_by_issuer(ca, bundle, crls)]
        return cls(
            settings=settings, crls=crls,
            anchors=frozenset(pki.fingerprint_sha256(ca) for ca in anchors),
            revoked_anchors=frozenset(pki.fingerprint_sha256(ca) for ca in revoked), bundle=tuple(bundle),
        )  # fmt: skip

    @property
    def enabled(self) -> bool:
        return self.settings.client_auth != "off"

    @property
    def rejects_at_handshake(self) -> bool:
        return self.settings.enforcement == "reject_connection"

    @property
    def checks_chain(self) -> bool:
        return bool(self.crls) and self.settings.crl_check == "chain"


def crl_number(crl: x509.CertificateRevocationList) -> int:
    """The CRL number (RFC 5280 5.2.3), else its thisUpdate as a number: what makes one CRL of an issuer newer than another."""
    try:
        return int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
    except x509.ExtensionNotFound:
        return int(crl.last_update_utc.timestamp())


def newest_crl_per_issuer(crls: Sequence[x509.CertificateRevocationList]) -> tuple[x509.CertificateRevocationList, ...]:
    """Of several CRLs, the newest (L{crl_number}) of each issuer."""
    newest: dict[bytes, x509.CertificateRevocationList] = {}
    for crl in crls:
        issuer = crl.issuer.public_bytes()
        if issuer not in newest or crl_number(crl) > crl_number(newest[issuer]):
            newest[issuer] = crl
    return tuple(newest.values())


def _is_crl_of(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    """Whether C{ca} issued and signed C{crl}."""
    return crl.issuer == ca.subject and crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]


def _revoked_by_issuer(ca: x509.Certificate, bundle: Sequence[x509.Certificate], crls: Sequence[x509.CertificateRevocationList]) -> bool:
    """Whether a CRL signed by C{ca}'s issuer (in the bundle) lists C{ca}."""
    issuers = [other for other in bundle if other is not ca and pki.is_issued_by(ca, other)]
    return any(
        crl.get_revoked_certificate_by_serial_number(ca.serial_number) is not None
        for crl in crls for issuer in issuers if _is_crl_of(crl, issuer)
    )  # fmt: skip


_NO_CRL_FOR_ANCHOR = (3, 33)  # UNABLE_TO_GET_CRL, UNABLE_TO_GET_CRL_ISSUER
_REVOKED = 23


def _common_name_count(conn: GatewayConnection, cert: object) -> int:
    try:
        return _known(conn, cert).common_names
    except Exception:
        return 0  # an unparseable certificate: OpenSSL's own checks decide


def _verify_callback(rejects: bool, verification: ClientVerification | None = None) -> Callable[[SSL.Connection, Any, int, int, int], bool]:
    """
    The verify callback: records the first failure (a certificate with two CNs is one, at depth 0:
    routes authorize on one CN while XFCC's Subject names another first), and that a verification
    ran on this connection.  Under C{policy} the handshake goes on, and the connection is switched
    to C{OP_NO_TICKET}: with OpenSSL 3 the TLS 1.3 ticket it then sends does not resume (measured,
    and held by tests/adversarial/test_resumption_bypass.py).  A TLS 1.2 ticket was already promised
    in the ServerHello, before the certificate arrived, and pyOpenSSL has no call to withdraw it or
    to drop a cached session: whatever resumes, L{certificate_verdict} decides.
    """

    anchors = verification.anchors if verification is not None and verification.checks_chain else frozenset()
    revoked_anchors = verification.revoked_anchors if verification is not None else frozenset()

    def verify(conn: SSL.Connection, cert: Any, errno: int, depth: int, ok: int) -> bool:
        if not isinstance(conn, GatewayConnection):
            return False  # a connection that cannot carry the verdict admits no one
        conn.verification_witnessed = True
        if ok and depth == 0 and _common_name_count(conn, cert) > 1:
            ok, errno = 0, _ERRNO_MULTIPLE_COMMON_NAMES
        if not ok and errno in _NO_CRL_FOR_ANCHOR and anchors:
            # A chain that ends at a trusted intermediate of the bundle (partial chain): OpenSSL has no
            # issuer to check that intermediate's CRL with; its revocation was looked up at load time.
            fingerprint = pki.fingerprint_sha256(cert.to_cryptography())
            if fingerprint in anchors:
                if fingerprint not in revoked_anchors:
                    return True
                errno = _REVOKED
        if ok:
            return True
        if conn.verify_failure is None:
            try:
                subject = cert.to_cryptography().subject.rfc4514_string()
            except Exception:
                subject = "?"
            conn.verify_failure = VerifyFailure(reason_for_verify_error(errno), errno, depth, subject)
        if not rejects:
            conn.set_options(SSL.OP_NO_TICKET)
        return not rejects

    return verify


def build_server_context(
    served: ServedCertificate,
    verification: ClientVerification | None,
    servername_callback: Callable[[SSL.Connection], None] | None = None,
    alpn_select: Callable[[SSL.Connection, list[bytes]], bytes] | None = None,
) -> SSL.Context:
    """One complete server context: protocol floor, ciphers, certificate, client verification, SNI, ALPN."""
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(_OPTIONS)
    # MODE_RELEASE_BUFFERS: an idle connection gives its 2 x 16 KiB record buffers back, as nginx does.  NO_AUTO_CHAIN, as
    # nginx: without it OpenSSL builds the chain of a file without one on every full handshake from the client-CA store,
    # an X509_verify_cert of our own certificate per connection, and sends the bundle's root too (one more signature
    # for every client to check).  What it found is found once here instead (_issuers_in_bundle), less the root.
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS | _MODE_NO_AUTO_CHAIN)
    ctx.set_cipher_list(CIPHERS)
    ctx.use_certificate(served.leaf)
    chain = served.chain[1:]
    if not chain and verification is not None and verification.enabled:
        chain = _issuers_in_bundle(served.leaf, verification.bundle)
    for extra in chain:
        ctx.add_extra_chain_cert(extra)
    ctx.use_privatekey(served.key)  # type: ignore[arg-type]
    try:
        ctx.check_privatekey()
    except SSL.Error:
        raise pki.PKIError(f"{served.source}: private key does not match certificate") from None
    ctx.set_session_id(b"mtlsgate")
    ctx.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
    if verification is not None and verification.enabled:
        settings = verification.settings
        mode = SSL.VERIFY_PEER
        if settings.client_auth == "require" and verification.rejects_at_handshake:
            mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
        ctx.load_verify_locations(settings.ca_file)
        store = ctx.get_cert_store()
        assert store is not None
        flags = X509StoreFlags.PARTIAL_CHAIN  # intermediates in the bundle are anchors too
        for crl in verification.crls:
            store.add_crl(crl)
        if verification.crls:
            flags |= X509StoreFlags.CRL_CHECK
        if verification.checks_chain:
            flags |= X509StoreFlags.CRL_CHECK_ALL  # a revoked intermediate keeps out everything under it
        store.set_flags(flags)
        ctx.set_verify(mode, _verify_callback(verification.rejects_at_handshake, verification))
        ctx.set_verify_depth(settings.max_verify_depth)
    else:
        ctx.set_verify(SSL.VERIFY_NONE)
    if servername_callback is not None:
        ctx.set_tlsext_servername_callback(servername_callback)
    ctx.set_alpn_select_callback(alpn_select or _select_http1)
    return ctx


_MODE_NO_AUTO_CHAIN = 0x8  # SSL_MODE_NO_AUTO_CHAIN (ssl.h); pyOpenSSL names no constant for it


def _issuers_in_bundle(leaf: x509.Certificate, bundle: Sequence[x509.Certificate], limit: int = 8) -> tuple[x509.Certificate, ...]:
    """
    The CAs of C{bundle} above C{leaf}, issuer by issuer (name and signature), up to but without a self-signed root:
    what OpenSSL's automatic chain building sent on every handshake for a certificate file without a chain (it
    stopped at the bundle's first CA, a trusted intermediate with partial-chain verification, or sent the root
    too), worked out once.
    """
    chain: list[x509.Certificate] = []
    cert = leaf
    while len(chain) < limit:
        issuer = next((ca for ca in bundle if ca.subject == cert.issuer and ca not in chain and pki.is_issued_by(cert, ca)), None)
        if issuer is None or pki.is_issued_by(issuer, issuer):
            break
        chain.append(issuer)
        cert = issuer
    return tuple(chain)


def _select_http1(conn: SSL.Connection, offered: list[bytes]) -> bytes:
    return ALPN_HTTP1 if ALPN_HTTP1 in offered else SSL.NO_OVERLAPPING_PROTOCOLS  # type: ignore[return-value]


def _select_http(conn: SSL.Connection, offered: list[bytes], http2: bool) -> bytes:
    """The server's preference: h2 (when on), then http/1.1, whatever order the client offered them in."""
    if http2 and ALPN_H2 in offered:
        return ALPN_H2
    return _select_http1(conn, offered)


class CertificateSet:
    """
    Contexts by server name: exact, then C{*.} wildcard one label up, then the default (the first
    certificate).  Immutable once built; a reload builds a new one.

    @ivar reject_unknown: refuse handshakes that ask for a name none of the certificates carries
        (C{unknown_sni: reject}) instead of answering them with the default certificate.
    """

    def __init__(self, contexts: Iterable[tuple[ServedCertificate, SSL.Context]], reject_unknown: bool = False, http2: bool = False) -> None:
        self.reject_unknown = reject_unknown
        self.http2 = http2  # ALPN offers h2 before http/1.1 (config key http2)
        #: Client certificates verified in full handshakes on these contexts, for the sessions they resume.
        self.verified_clients = VerifiedCertificates()
        self.served: list[ServedCertificate] = []
        self._by_name: dict[str, SSL.Context] = {}
        self.default: SSL.Context | None = None
        for served, ctx in contexts:
            self.served.append(served)
            if self.default is None:
                self.default = ctx
            for name in served.names:
                self._by_name.setdefault(name, ctx)
        if self.default is None:
            raise pki.PKIError("no certificate to serve")

    def lookup(self, server_name: str) -> SSL.Context | None:
        """The context of the certificate for this name (exact, then wildcard), or None."""
        name = server_name.lower().rstrip(".")
        ctx = self._by_name.get(name)
        if ctx is None and "." in name:
            ctx = self._by_name.get("*." + name.split(".", 1)[1])
        return ctx

    def context_for(self, server_name: str | None) -> SSL.Context:
        """The context for this name, else the default (no SNI at all always gets the default)."""
        ctx = self.lookup(server_name) if server_name else None
        if ctx is not None:
            return ctx
        assert self.default is not None
        return self.default


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """
    The server connection creator: every new connection starts on the default context and moves to
    the one its SNI names.  L{install} swaps the whole certificate set at once; connections already
    open keep the context they negotiated.
    """

    def __init__(self) -> None:
        self._certificates: CertificateSet | None = None
        #: Set by autocert: an object whose C{certificate_for(server_name)} gives the TLS-ALPN-01
        #: validation C{(key, certificate)} for a name under validation, or None.
        self.acme_validation: Any = None
        #: Set by the TCP routes (mtlsgate.proxy.tcp): for a server name, the ALPN protocols its route
        #: accepts (server order; empty: none), or None when the name is not a TCP route's (HTTP's ALPN).
        self.alpn_for_name: Callable[[str | None], Sequence[bytes] | None] | None = None
        #: Client certificates already parsed (identity, XFCC), by their DER: kept across reloads, since they hold no verdict.
        self.identities = IdentityCache()

    def build(
        self, served: Sequence[ServedCertificate], verification: ClientVerification | None, unknown_sni: str = "default", http2: bool = False,
    ) -> CertificateSet:  # fmt: skip
        """
        Build (not install) a certificate set whose contexts route SNI and ALPN through this creator; with
        C{http2}, ALPN offers h2 (the gateway's listener has an HTTP/2 front end; the mtls: endpoint does not).
        """
        contexts = ((s, build_server_context(s, verification, self._on_servername, self._select_alpn)) for s in served)
        return CertificateSet(contexts, reject_unknown=unknown_sni == "reject", http2=http2)

    def _select_alpn(self, conn: SSL.Connection, offered: list[bytes]) -> bytes:
        """
        h2 (unless the config key http2 is off), else http/1.1, or, for a client offering acme-tls/1 for a name under validation, the RFC 8737
        validation certificate on this connection only.  The CA's validator has no client
        certificate, so client verification is lifted for that connection; it never carries HTTP.
        """
        if ALPN_ACME_TLS in offered:
            conn.offered_acme_tls = True  # type: ignore[attr-defined]
        if ALPN_ACME_TLS in offered and self.acme_validation is not None:
            raw = conn.get_servername()
            found = self.acme_validation.certificate_for(raw.decode("ascii", "replace") if raw else None)
            if found is not None:
                key, certificate = found
                conn.use_certificate(certificate)
                conn.use_privatekey(key)
                conn.set_verify(SSL.VERIFY_NONE)
                return ALPN_ACME_TLS
        if self.alpn_for_name is not None:
            raw = conn.get_servername()
            protocols = self.alpn_for_name(raw.decode("ascii", "replace") if raw else None)
            if protocols is not None:  # a TCP route's connection: never http/1.1 (or h2), only what the route names
                return next((p for p in protocols if p in offered), SSL.NO_OVERLAPPING_PROTOCOLS)  # type: ignore[return-value]
        certificates = self._certificates
        return _select_http(conn, offered, certificates is not None and certificates.http2)

    def install(self, certificates: CertificateSet) -> None:
        if certificates.reject_unknown:
            _keep_refusals_out_of_excepthook()
        self._certificates = certificates

    @property
    def certificates(self) -> CertificateSet:
        assert self._certificates is not None, "ServerTLS used before a certificate set was installed"
        return self._certificates

    def _on_servername(self, conn: SSL.Connection) -> None:
        raw = conn.get_servername()
        name = raw.decode("ascii", "replace") if raw else None
        certificates = self.certificates
        if name and certificates.reject_unknown and certificates.lookup(name) is None and not self._under_validation(name):
            if isinstance(conn, GatewayConnection):
                conn.refused_server_name = name
            # pyOpenSSL turns an exception here into SSL_TLSEXT_ERR_ALERT_FATAL, and OpenSSL's
            # alert for a refused server name is unrecognized_name (112): the handshake ends there.
            raise UnknownServerName(name)
        ctx = certificates.context_for(name)
        if ctx is not conn.get_context():
            conn.set_context(ctx)

    def _under_validation(self, name: str) -> bool:
        """Whether autocert is proving this name with TLS-ALPN-01 (before any certificate for it exists)."""
        return self.acme_validation is not None and self.acme_validation.certificate_for(name) is not None

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        certificates = self.certificates
        # The session cache and ticket key are the default context's: sessions resume only on this set.
        assert certificates.default is not None, "a certificate set always has a default context"
        connection = GatewayConnection(certificates.default, None)
        connection.verified_certificates = certificates.verified_clients
        connection.identities = self.identities
        connection.set_app_data(tlsProtocol)
        return connection


class _HandshakeLoggingTLSProtocol(SendAtOnce):
    """
    Logs why a handshake failed, naming the peer and, for a refused certificate, the reason; counts
    handshakes and open connections in the factory's metrics.

    A plain TLSMemoryBIOProtocol, not Twisted's default BufferingTLSTransport: that one holds every
    write back to the next reactor turn (a callLater(0) per write) to coalesce small writes, and the
    HTTP server writes each response's head and first body bytes in one writeSequence already, so the
    delay bought a timer per response and a reactor turn of latency, and nothing else (issue #13).
    Its output is sent at once (L{SendAtOnce}, mtlsgate.tls.fastwrite), not on the next reactor turn.
    """

    factory: GatewayTLSFactory
    _counted = False
    _handshake_timer: Any = None

    _open = False

    def connectionMade(self) -> None:
        if self._open:  # TLSMemoryBIOProtocol.makeConnection ends up here twice
            return super().connectionMade()
        self._open = True
        self.factory.connection_opened()
        timeout = self.factory.limits.handshake_timeout
        if timeout:
            self._handshake_timer = self.factory.reactor.callLater(timeout, self._handshake_too_slow)
        super().connectionMade()

    def _handshake_too_slow(self) -> None:
        self._handshake_timer = None
        if not self._handshakeDone:
            peer = self.transport.getPeer() if self.transport is not None else None
            log.info("TLS handshake with {peer} not done within {timeout:g}s; closing",
                     peer=getattr(peer, "host", peer), timeout=self.factory.limits.handshake_timeout)
            self._counted = True
            self.factory.metrics.handshake("failed", "timeout")
            self.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._handshake_timer is not None and self._handshake_timer.active():
            self._handshake_timer.cancel()
        if self._open:
            self._open = False
            self.factory.connection_closed()
        super().connectionLost(reason)

    def _checkHandshakeStatus(self) -> None:
        super()._checkHandshakeStatus()
        if self._handshakeDone and not self._counted:
            self._counted = True
            if self._handshake_timer is not None and self._handshake_timer.active():
                self._handshake_timer.cancel()
            refusal = peer_verdict(self._tlsConnection).refusal
            if refusal is None:
                self.factory.metrics.handshake("ok")
            else:  # enforcement: policy lets it through (or a session resumed); requests will get 403 with this reason
                self.factory.metrics.handshake("unverified", refusal)
            if _validation_only(self._tlsConnection):
                self._close_after_validation()

    def _close_after_validation(self) -> None:
        """
        RFC 8737: an acme-tls/1 connection is for the handshake only.  Send close_notify and close,
        before any byte the client sent after its Finished reaches the HTTP side.
        """
        peer = self.transport.getPeer() if self.transport is not None else None
        log.info("closed the acme-tls/1 connection from {peer} after its handshake (RFC 8737)", peer=getattr(peer, "host", peer))
        try:
            self._tlsConnection.shutdown()
        except SSL.Error:
            pass
        self._tlsShutdownFinished(None)  # no more application data is read; the transport closes once close_notify is out

    def _tlsShutdownFinished(self, reason: Failure | None) -> None:
        if not self._handshakeDone and not self._counted and reason is not None and isinstance(reason.value, SSL.Error):
            self._counted = True
            failure = getattr(self._tlsConnection, "verify_failure", None)
            peer = self.transport.getPeer() if self.transport is not None else None
            peer_text = f"{peer.host}:{peer.port}" if isinstance(peer, (IPv4Address, IPv6Address)) else str(peer)
            refused_name = getattr(self._tlsConnection, "refused_server_name", None)
            if failure is not None:
                log.info(
                    "refused client certificate from {peer}: {reason} (subject {subject})",
                    peer=peer_text, reason=failure.reason, subject=failure.subject, tls_result="rejected",
                )
                self.factory.metrics.handshake("rejected", failure.reason)
            elif refused_name is not None:
                log.info(
                    "refused TLS handshake from {peer}: no certificate for the server name {name} it asked for (unknown_sni: reject)",
                    peer=peer_text, name=printable(refused_name), tls_result="refused",
                )  # fmt: skip
                self.factory.metrics.handshake("refused", "unknown_sni")
            else:
                log.info("TLS handshake with {peer} failed: {error}", peer=peer_text, error=_ssl_error_text(reason.value), tls_result="failed")
                self.factory.metrics.handshake("failed", _failure_kind(reason.value))
        super()._tlsShutdownFinished(reason)


def _validation_only(conn: SSL.Connection) -> bool:
    """A connection whose client offered acme-tls/1 and did not get HTTP (h2 or http/1.1): a CA's validator (or someone acting as one)."""
    return getattr(conn, "offered_acme_tls", False) and conn.get_alpn_proto_negotiated() not in (ALPN_HTTP1, ALPN_H2)


def _failure_kind(error: SSL.Error) -> str:
    """A short, bounded label for a failed handshake (metrics labels must not be free text)."""
    text = _ssl_error_text(error).lower()
    for needle, kind in (
        ("wrong version number", "not tls"), ("http request", "not tls"), ("unsupported protocol", "old protocol"),
        ("no shared cipher", "no shared cipher"), ("certificate required", "no client certificate"),
        ("peer did not return a certificate", "no client certificate"), ("alert", "alert from client"),
    ):  # fmt: skip
        if needle in text:
            return kind
    return "other"


def _ssl_error_text(error: SSL.Error) -> str:
    try:
        return "; ".join(str(part[2]) for part in error.args[0]) or str(error)
    except (IndexError, TypeError):
        return str(error)


class GatewayTLSFactory(TLSMemoryBIOFactory):
    """TLS around an HTTP factory, logging failed handshakes with their reason."""

    protocol = _HandshakeLoggingTLSProtocol

    def __init__(
        self, creator: ServerTLS, wrapped: object, reactor: IReactorTime, metrics: IConnectionObserver | None = None, limits: Limits = Limits(),
    ) -> None:  # fmt: skip
        super().__init__(creator, False, wrapped, reactor)  # type: ignore[arg-type]
        self.reactor = reactor
        self.metrics: IConnectionObserver = metrics or NoObserver()
        self.limits = limits
        self.open_connections = 0
        self._refused_since_warning = 0

    def buildProtocol(self, addr: Any) -> Any:
        """Refuse connections beyond C{max_connections}: a flood degrades to refusals, not to memory exhaustion."""
        if self.open_connections >= self.limits.max_connections:
            self._refused_since_warning += 1
            if self._refused_since_warning == 1 or self._refused_since_warning % 1000 == 0:
                log.warn("{n} connection(s) refused: at max_connections ({limit})", n=self._refused_since_warning, limit=self.limits.max_connections)
            self.metrics.handshake("refused", "max_connections")
            return None
        return super().buildProtocol(addr)

    def connection_opened(self) -> None:
        self.open_connections += 1
        self.metrics.connection_opened()

    def connection_closed(self) -> None:
        self.open_connections -= 1
        self.metrics.connection_closed()
        if self.open_connections < self.limits.max_connections and self._refused_since_warning:
            self._refused_since_warning = 0
