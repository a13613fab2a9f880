"""
A verified client certificate as an immutable value, the allow-rules a route checks it against, and
Envoy's C{x-forwarded-client-cert} (XFCC) header that carries it to upstreams.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections import OrderedDict
from datetime import datetime
from typing import Callable, Iterable, TypeVar

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

_T = TypeVar("_T")


def _attempt(produce: Callable[[], _T], default: _T) -> _T:
    """C{produce()}, or C{default} if it raises: a peer's odd certificate must not break the request."""
    try:
        return produce()
    except Exception:  # malformed, duplicated or unsupported fields all raise different things
        return default


def _der_bounds(der: bytes, offset: int) -> tuple[int, int]:
    """The (content start, end) offsets of the DER element at C{offset}."""
    length, start = der[offset + 1], offset + 2
    if length & 0x80:
        count = length & 0x7F
        length, start = int.from_bytes(der[start : start + count], "big"), start + count
    return start, start + length


def _spki_from_tbs(tbs: bytes) -> bytes:
    """The DER SubjectPublicKeyInfo inside a DER TBSCertificate."""
    offset = _der_bounds(tbs, 0)[0]  # inside the TBSCertificate SEQUENCE
    if tbs[offset] == 0xA0:  # the optional [0] version
        offset = _der_bounds(tbs, offset)[1]
    for _ in range(5):  # serialNumber, signature, issuer, validity, subject
        offset = _der_bounds(tbs, offset)[1]
    return tbs[offset : _der_bounds(tbs, offset)[1]]


def _spki_der(cert: x509.Certificate) -> bytes:
    """The certificate's DER SubjectPublicKeyInfo, even for a key type the cryptography library cannot load."""
    try:
        return cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    except Exception:
        return _spki_from_tbs(cert.tbs_certificate_bytes)


def printable(text: str) -> str:
    """C{text} with control and other non-printable characters escaped, so it cannot forge log lines."""
    if text.isprintable():
        return text  # the common case, once per logged or counted request: the same string, without a pass per character
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


@attrs.frozen
class Identity:
    """What a verified client certificate says about its holder."""

    subject: str  # RFC 4514
    issuer: str  # RFC 4514
    common_name: str | None
    organizational_units: tuple[str, ...]
    organizations: tuple[str, ...]
    dns_names: tuple[str, ...]
    uris: tuple[str, ...]
    emails: tuple[str, ...]
    ips: tuple[str, ...]
    spiffe_id: str | None  # the first URI SAN with the spiffe:// scheme
    fingerprint_sha256: str  # lowercase hex of SHA-256 over the certificate's DER
    spki_sha256: str  # base64 of SHA-256 over the DER SubjectPublicKeyInfo (HPKP/Envoy pin style)
    serial: int
    not_before: datetime  # timezone-aware UTC
    not_after: datetime

    @classmethod
    def from_certificate(cls, cert: x509.Certificate) -> Identity:
        """Never raises for a parseable certificate: missing or malformed fields come out empty."""
        subject = _attempt(lambda: cert.subject, x509.Name([]))

        def name_values(oid: x509.ObjectIdentifier) -> tuple[str, ...]:
            return _attempt(lambda: tuple(str(a.value) for a in subject.get_attributes_for_oid(oid)), ())

        san = _attempt(lambda: cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value, None)

        def san_values(kind: type[x509.GeneralName]) -> tuple[str, ...]:
            if san is None:
                return ()
            return _attempt(lambda: tuple(str(v) for v in san.get_values_for_type(kind)), ())  # type: ignore[arg-type]

        uris = san_values(x509.UniformResourceIdentifier)
        spki = _attempt(lambda: base64.b64encode(hashlib.sha256(_spki_der(cert)).digest()).decode("ascii"), "")
        return cls(
            subject=_attempt(subject.rfc4514_string, ""),
            issuer=_attempt(lambda: cert.issuer.rfc4514_string(), ""),
            common_name=next(iter(name_values(NameOID.COMMON_NAME)), None),
            organizational_units=name_values(NameOID.ORGANIZATIONAL_UNIT_NAME),
            organizations=name_values(NameOID.ORGANIZATION_NAME),
            dns_names=san_values(x509.DNSName),
            uris=uris,
            emails=san_values(x509.RFC822Name),
            ips=san_values(x509.IPAddress),
            spiffe_id=next((u for u in uris if u.startswith("spiffe://")), None),
            fingerprint_sha256=cert.fingerprint(hashes.SHA256()).hex(),
            spki_sha256=spki,
            serial=cert.serial_number,
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
        )

    def label(self) -> str:
        """Short text for log lines: the SPIFFE ID, else the CN, else a fingerprint prefix; never raw control characters."""
        return printable(self.spiffe_id or self.common_name or "sha256:" + self.fingerprint_sha256[:16])


@attrs.frozen(eq=False)
class KnownCertificate:
    """
    What one certificate's bytes say, worked out once: the parsed certificate, the SHA-256 of its DER,
    its L{Identity}, that identity's XFCC element, and how many common names its subject holds.  Every
    field is a function of the DER alone; nothing here says whether the certificate is to be trusted.
    """

    certificate: x509.Certificate
    fingerprint: bytes  # SHA-256 over the DER (raw bytes; Identity.fingerprint_sha256 is its hex)
    identity: Identity
    xfcc: bytes  # xfcc_element(identity), ASCII
    common_names: int

    @classmethod
    def from_der(cls, der: bytes) -> KnownCertificate:
        """Raises ValueError for bytes the cryptography library cannot load as a certificate."""
        certificate = x509.load_der_x509_certificate(der)
        identity = Identity.from_certificate(certificate)
        common_names = _attempt(lambda: len(certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)), 0)
        return cls(certificate, hashlib.sha256(der).digest(), identity, xfcc_element(identity).encode("ascii"), common_names)


class IdentityCache:
    """
    L{KnownCertificate}s by the certificate's whole DER, so that a client that connects again with the
    same certificate is not parsed again (issue #13: parsing was a sixth of the gateway's CPU per new
    connection).  Keyed by every byte of the certificate, not a digest or a name: a certificate that
    differs in anything (key, issuer, serial, signature, validity) is another entry, worked out afresh.
    It holds no verdict: verification, revocation, validity and allow-rules are decided per connection.
    Bounded: past C{limit} entries, the least recently used goes (about 6 KiB each: 3 MiB at most by default).
    """

    def __init__(self, limit: int = 500) -> None:
        self.limit = limit
        self._by_der: OrderedDict[bytes, KnownCertificate] = OrderedDict()

    def known(self, der: bytes) -> KnownCertificate:
        """The certificate with this DER, parsed once; raises ValueError for bytes that are not one (nothing is kept then)."""
        found = self._by_der.get(der)
        if found is not None:
            self._by_der.move_to_end(der)
            return found
        found = self._by_der[der] = KnownCertificate.from_der(der)
        if len(self._by_der) > self.limit:
            self._by_der.popitem(last=False)
        return found

    def __len__(self) -> int:
        return len(self._by_der)


def normalize_fingerprint(fingerprint: str) -> str:
    """C{"AB:CD ..."} -> C{"abcd..."}: the form of L{Identity.fingerprint_sha256}."""
    return fingerprint.replace(":", "").replace(" ", "").lower()


def _strings(values: Iterable[str]) -> frozenset[str]:
    if isinstance(values, str):  # frozenset("alice") would quietly admit CN "a"
        raise TypeError(f"allow-rule values must be a collection of strings, not the string {values!r}")
    return frozenset(values)


def _fingerprints(values: Iterable[str]) -> frozenset[str]:
    return frozenset(normalize_fingerprint(v) for v in _strings(values))


def _folded(values: Iterable[str]) -> frozenset[str]:
    return frozenset(v.lower() for v in values)


@attrs.frozen
class AllowRules:
    """
    Which verified client certificates a route admits. OR semantics across all fields, like ghostunnel's
    --allow-* flags: an identity is admitted when ANY listed value matches. No values at all = any
    verified certificate is admitted. Matches are exact (no wildcards) and case-sensitive, except DNS
    names and emails, which compare case-insensitively.
    """

    cn: frozenset[str] = attrs.field(default=frozenset(), converter=_strings)
    ou: frozenset[str] = attrs.field(default=frozenset(), converter=_strings)
    dns: frozenset[str] = attrs.field(default=frozenset(), converter=_strings)
    uri: frozenset[str] = attrs.field(default=frozenset(), converter=_strings)
    email: frozenset[str] = attrs.field(default=frozenset(), converter=_strings)
    fingerprint_sha256: frozenset[str] = attrs.field(default=frozenset(), converter=_fingerprints)

    @classmethod
    def from_lists(
        cls, cn: Iterable[str] = (), ou: Iterable[str] = (), dns: Iterable[str] = (), uri: Iterable[str] = (),
        email: Iterable[str] = (), fingerprint_sha256: Iterable[str] = (),
    ) -> AllowRules:  # fmt: skip
        """Rules from any iterables; fingerprints may be uppercase and colon- or space-separated."""
        return cls(cn=cn, ou=ou, dns=dns, uri=uri, email=email, fingerprint_sha256=fingerprint_sha256)

    def _fields(self) -> tuple[tuple[str, frozenset[str]], ...]:
        return (("cn", self.cn), ("ou", self.ou), ("dns", self.dns), ("uri", self.uri), ("email", self.email),
                ("fingerprint_sha256", self.fingerprint_sha256))  # fmt: skip

    def is_empty(self) -> bool:
        return not (self.cn or self.ou or self.dns or self.uri or self.email or self.fingerprint_sha256)  # per request: no tuple, no generator

    def allows(self, identity: Identity) -> bool:
        if self.is_empty():
            return True
        return (
            identity.common_name in self.cn
            or not self.ou.isdisjoint(identity.organizational_units)
            or not _folded(self.dns).isdisjoint(_folded(identity.dns_names))
            or not self.uri.isdisjoint(identity.uris)
            or not _folded(self.email).isdisjoint(_folded(identity.emails))
            or identity.fingerprint_sha256 in self.fingerprint_sha256
        )

    def explain(self) -> str:
        """The rule in a few words, for 403 reasons and logs: C{"cn in {alice}; uri in {spiffe://x/y}"}."""
        parts = [f"{name} in {{{', '.join(sorted(values))}}}" for name, values in self._fields() if values]
        return "; ".join(parts) or "any verified certificate"


# --- x-forwarded-client-cert -----------------------------------------------------------------------
#
# An element is KEY=VALUE pairs joined by ';'; elements are joined by ','. A value holding anything
# but printable ASCII other than , ; = " \ is double-quoted (Subject always is, as Envoy does). Inside
# quotes, '"' and '\' are escaped by a backslash, and every other character outside printable ASCII
# (controls such as CR, LF, NUL, DEL, and all non-ASCII) is written as its UTF-8 bytes, each as \xNN.
# So the header is printable ASCII only, and parse_xfcc() restores the exact text.

_PLAIN = frozenset(chr(c) for c in range(0x21, 0x7F)) - frozenset(',;="\\')
_HEX_ESCAPE = re.compile(r"\\x([0-9a-fA-F]{2})")


def _quote_char(char: str) -> str:
    if char in '"\\':
        return "\\" + char
    if " " <= char <= "~":
        return char
    return "".join(f"\\x{byte:02x}" for byte in char.encode("utf-8", "surrogatepass"))


def _xfcc_value(value: str, always_quote: bool = False) -> str:
    if not always_quote and all(c in _PLAIN for c in value):
        return value
    return '"' + "".join(map(_quote_char, value)) + '"'


def xfcc_element(identity: Identity, *, by: str | None = None) -> str:
    """One XFCC element: C{By} (if given), C{Hash}, C{Subject}, then a C{URI} and a C{DNS} pair per SAN."""
    pairs = [("By", by)] if by is not None else []
    pairs += [("Hash", identity.fingerprint_sha256), ("Subject", identity.subject)]
    pairs += [("URI", uri) for uri in identity.uris] + [("DNS", name) for name in identity.dns_names]
    return ";".join(f"{key}={_xfcc_value(value, always_quote=key == 'Subject')}" for key, value in pairs)


def _parse_quoted(text: str, pos: int) -> tuple[str, int]:
    """The unescaped value of the quoted string whose opening quote is just before C{pos}, and the offset after it."""
    out: list[str] = []
    pending = bytearray()  # consecutive \xNN bytes, decoded together as UTF-8
    while True:
        if pos >= len(text):
            raise ValueError("x-forwarded-client-cert: unterminated quoted value")
        escape = _HEX_ESCAPE.match(text, pos)
        if escape:
            pending.append(int(escape.group(1), 16))
            pos = escape.end()
            continue
        if pending:
            out.append(pending.decode("utf-8", "surrogatepass"))  # UnicodeDecodeError is a ValueError
            pending.clear()
        char = text[pos]
        if char == '"':
            return "".join(out), pos + 1
        if char == "\\":
            if pos + 1 >= len(text):
                raise ValueError("x-forwarded-client-cert: dangling backslash")
            char, pos = text[pos + 1], pos + 1
        out.append(char)
        pos += 1


def parse_xfcc(value: str) -> list[dict[str, list[str]]]:
    """
    An XFCC header value as a list of elements, each C{{key: [values in order]}}; the inverse of
    L{xfcc_element}. Raises L{ValueError} for a malformed value.
    """
    elements: list[dict[str, list[str]]] = []
    element: dict[str, list[str]] = {}
    pos = 0
    while pos < len(value):
        char = value[pos]
        if char in ", \t;":
            if char == "," and element:
                elements.append(element)
                element = {}
            pos += 1
            continue
        equals = value.find("=", pos)
        key = value[pos:equals].strip() if equals >= 0 else ""
        if not key or any(c in key for c in ',;"'):
            raise ValueError(f"x-forwarded-client-cert: expected KEY=VALUE at offset {pos}")
        pos = equals + 1
        while pos < len(value) and value[pos] in " \t":
            pos += 1
        if pos < len(value) and value[pos] == '"':
            text, pos = _parse_quoted(value, pos + 1)
            rest = value[pos:].lstrip(" \t")
            if rest and rest[0] not in ",;":
                raise ValueError(f"x-forwarded-client-cert: unexpected text after the quoted value of {key}")
        else:
            end = min((i for i in (value.find(",", pos), value.find(";", pos)) if i >= 0), default=len(value))
            text, pos = value[pos:end].strip(" \t"), end
        element.setdefault(key, []).append(text)
    if element:
        elements.append(element)
    return elements
