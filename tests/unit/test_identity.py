"""A client certificate as an Identity, allow-rules, and the x-forwarded-client-cert header."""

from __future__ import annotations

import base64
import hashlib
from datetime import datetime, timedelta, timezone

import attrs
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from mtlsgate import identity as identity_module
from mtlsgate.identity import AllowRules, Identity, parse_xfcc, printable, xfcc_element
from mtlsgate.tls.pki import DevCA


@pytest.fixture(scope="module")
def ca() -> DevCA:
    return DevCA.create(name="identity test CA")


@pytest.fixture(scope="module")
def alice_cert(ca) -> x509.Certificate:
    return ca.issue(
        "alice",
        ou=["eng", "ops"],
        organization=["Example Corp"],
        dns=["alice.example.test"],
        ips=["10.0.0.7", "::1"],
        uris=["https://alice.example.test/", "spiffe://test/ns/prod/sa/alice", "spiffe://test/second"],
        emails=["Alice@Example.test"],
        client=True,
    ).certificate


@pytest.fixture(scope="module")
def alice(alice_cert) -> Identity:
    return Identity.from_certificate(alice_cert)


def test_from_certificate_extracts_everything(alice, alice_cert, ca):
    assert alice.subject == "CN=alice,OU=ops,OU=eng,O=Example Corp"
    assert alice.issuer == "CN=identity test CA"
    assert alice.common_name == "alice"
    assert alice.organizational_units == ("eng", "ops")
    assert alice.organizations == ("Example Corp",)
    assert alice.dns_names == ("alice.example.test",)
    assert alice.ips == ("10.0.0.7", "::1")
    assert alice.uris == ("https://alice.example.test/", "spiffe://test/ns/prod/sa/alice", "spiffe://test/second")
    assert alice.emails == ("Alice@Example.test",)
    assert alice.spiffe_id == "spiffe://test/ns/prod/sa/alice"
    assert alice.fingerprint_sha256 == alice_cert.fingerprint(hashes.SHA256()).hex()
    spki = alice_cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert alice.spki_sha256 == base64.b64encode(hashlib.sha256(spki).digest()).decode()
    assert alice.serial == alice_cert.serial_number
    assert alice.not_before == alice_cert.not_valid_before_utc and alice.not_before.tzinfo is not None
    assert alice.not_after == alice_cert.not_valid_after_utc
    assert alice.label() == "spiffe://test/ns/prod/sa/alice"


def test_spki_from_the_raw_certificate_matches_the_library(ca):
    """The fallback for keys the library cannot load reads the same bytes, for short and long DER lengths."""
    for issued in (ca.issue_server(["ec.test"]), ca.issue_server(["rsa.test"], rsa=True), ca):
        cert = issued.certificate
        expected = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        assert identity_module._spki_from_tbs(cert.tbs_certificate_bytes) == expected


def test_certificate_without_names_does_not_raise(ca):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(timezone.utc)
    bare = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .sign(ca.key, hashes.SHA256())
    )
    identity = Identity.from_certificate(bare)
    assert identity.subject == "" and identity.common_name is None
    assert identity.dns_names == identity.uris == identity.emails == identity.ips == identity.organizational_units == ()
    assert identity.spiffe_id is None
    assert identity.label() == "sha256:" + identity.fingerprint_sha256[:16]


def test_label_falls_back_to_cn_and_escapes_control_characters(ca):
    plain = Identity.from_certificate(ca.issue_client("bob").certificate)
    assert plain.spiffe_id is None and plain.label() == "bob"
    evil = attrs.evolve(plain, common_name="bob\n2024 INFO admin logged in\x1b[0m")
    assert evil.label() == "bob\\n2024 INFO admin logged in\\x1b[0m"


def test_organization_only_certificate(ca):
    cert = ca.issue(None, organization=["Org"], uris=["urn:x"]).certificate
    identity = Identity.from_certificate(cert)
    assert identity.common_name is None and identity.organizations == ("Org",) and identity.label().startswith("sha256:")


# --- allow rules -----------------------------------------------------------------------------------------


def test_empty_rules_allow_any_verified_certificate(alice):
    assert AllowRules().is_empty()
    assert AllowRules.from_lists().allows(alice)
    assert AllowRules().explain() == "any verified certificate"


@pytest.mark.parametrize(
    "field, admitted, refused",
    [
        ("cn", "alice", "Alice"),
        ("ou", "ops", "OPS"),
        ("dns", "ALICE.example.test", "*.example.test"),
        ("uri", "spiffe://test/second", "SPIFFE://test/second"),
        ("email", "alice@example.TEST", "bob@example.test"),
        ("fingerprint_sha256", None, "00" * 32),
    ],
)
def test_each_field_matches_exactly(alice, field, admitted, refused):
    admitted = admitted or alice.fingerprint_sha256
    assert AllowRules.from_lists(**{field: [admitted]}).allows(alice)
    assert not AllowRules.from_lists(**{field: [refused]}).allows(alice)
    assert not AllowRules.from_lists(**{field: [refused]}).is_empty()


def test_any_matching_field_admits(alice):
    rules = AllowRules.from_lists(cn=["bob"], ou=["finance"], uri=["spiffe://test/ns/prod/sa/alice"])
    assert rules.allows(alice)
    assert not AllowRules.from_lists(cn=["bob"], ou=["finance"]).allows(alice)
    nameless = attrs.evolve(alice, common_name=None)
    assert not AllowRules.from_lists(cn=["bob"]).allows(nameless)


def test_fingerprints_are_normalized(alice):
    colons = ":".join(alice.fingerprint_sha256[i : i + 2] for i in range(0, 64, 2)).upper()
    assert AllowRules.from_lists(fingerprint_sha256=[colons]).allows(alice)
    spaced = " ".join(alice.fingerprint_sha256[i : i + 2] for i in range(0, 64, 2))
    rules = AllowRules(fingerprint_sha256=[spaced])  # the constructor normalizes too
    assert rules.fingerprint_sha256 == frozenset([alice.fingerprint_sha256])
    assert rules.allows(alice)


def test_rules_are_frozensets_and_explain_themselves():
    rules = AllowRules.from_lists(cn=["bob", "alice", "bob"], uri=("spiffe://x/y",))
    assert rules.cn == frozenset({"alice", "bob"}) and isinstance(rules.uri, frozenset)
    assert rules.explain() == "cn in {alice, bob}; uri in {spiffe://x/y}"
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        rules.cn = frozenset()  # type: ignore[misc]
    with pytest.raises(TypeError, match="not the string 'alice'"):
        AllowRules.from_lists(cn="alice")


# --- x-forwarded-client-cert -----------------------------------------------------------------------------


def test_xfcc_element_for_a_plain_identity(ca):
    cert = ca.issue_client("carol", uris=["spiffe://test/carol"], dns=["carol.example.test"]).certificate
    carol = Identity.from_certificate(cert)
    fingerprint = cert.fingerprint(hashes.SHA256()).hex()
    expected = f'Hash={fingerprint};Subject="CN=carol";URI=spiffe://test/carol;DNS=carol.example.test'
    assert xfcc_element(carol) == expected
    assert xfcc_element(carol, by="spiffe://test/gateway") == "By=spiffe://test/gateway;" + expected
    assert parse_xfcc(expected) == [
        {"Hash": [fingerprint], "Subject": ["CN=carol"], "URI": ["spiffe://test/carol"], "DNS": ["carol.example.test"]}
    ]


def test_xfcc_quotes_and_escapes(alice):
    odd = attrs.evolve(alice, subject='CN=a\\,b "q";x=y', uris=("urn:a,b", "urn:plain"), dns_names=("ok.test",))
    element = xfcc_element(odd)
    assert 'Subject="CN=a\\\\,b \\"q\\";x=y"' in element
    assert 'URI="urn:a,b";URI=urn:plain;DNS=ok.test' in element
    control = attrs.evolve(alice, subject="CN=x\r\nInjected: 1\x00é", uris=(), dns_names=())
    assert xfcc_element(control).endswith('Subject="CN=x\\x0d\\x0aInjected: 1\\x00\\xc3\\xa9"')


def test_parse_xfcc_several_elements_and_whitespace():
    value = 'By=spiffe://a;Hash=11;Subject="CN=one";URI=spiffe://one, Hash=22 ; Subject="CN=t\\"wo" ;DNS=two.test'
    assert parse_xfcc(value) == [
        {"By": ["spiffe://a"], "Hash": ["11"], "Subject": ["CN=one"], "URI": ["spiffe://one"]},
        {"Hash": ["22"], "Subject": ['CN=t"wo'], "DNS": ["two.test"]},
    ]
    assert parse_xfcc("") == []


@pytest.mark.parametrize("bad", ['Subject="unterminated', "novalue", 'Subject="x"junk', 'Subject="\\', "=x", 'Subject="\\xff"'])
def test_parse_xfcc_rejects_malformed_values(bad):
    with pytest.raises(ValueError):
        parse_xfcc(bad)


_TRICKY = st.sampled_from([",", ";", "=", '"', "\\", "\\x41", "\r", "\n", "\x00", "\x7f", "\x85", " ", "\t", "é", "☃", "😀", "%41"])
_TEXT = st.lists(st.one_of(_TRICKY, st.characters()), max_size=30).map("".join)  # fragments, so "\\x41" stays whole


@settings(max_examples=300, deadline=None)
@given(subject=_TEXT, uris=st.lists(_TEXT, max_size=3), dns=st.lists(_TEXT, max_size=3), by=st.none() | _TEXT)
def test_xfcc_round_trips_and_is_a_safe_header_line(alice, subject, uris, dns, by):
    identity = attrs.evolve(alice, subject=subject, uris=tuple(uris), dns_names=tuple(dns))
    value = xfcc_element(identity, by=by)
    assert all(" " <= c <= "~" for c in value), value
    value.encode("ascii")
    expected = {"Hash": [alice.fingerprint_sha256], "Subject": [subject]}
    if by is not None:
        expected = {"By": [by], **expected}
    if uris:
        expected["URI"] = uris
    if dns:
        expected["DNS"] = dns
    assert parse_xfcc(value) == [expected]
    assert parse_xfcc(value + "," + value) == [expected, expected]


@settings(max_examples=500, deadline=None)
@given(text=st.text())
def test_printable_escapes_each_non_printable_character_and_leaves_printable_text_as_it_is(text):
    escaped = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    assert printable(text) == escaped
    assert printable(escaped).isprintable()


# --- the identity cache (issue #13): what a certificate's bytes say, worked out once per distinct DER ---------------


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def test_known_certificate_says_what_the_certificate_says(alice_cert):
    known = identity_module.KnownCertificate.from_der(_der(alice_cert))
    assert known.identity == Identity.from_certificate(alice_cert)
    assert known.fingerprint == alice_cert.fingerprint(hashes.SHA256())
    assert known.xfcc == xfcc_element(known.identity).encode("ascii")
    assert known.common_names == 1
    assert known.certificate == alice_cert


def test_the_cache_parses_a_certificate_once(alice_cert):
    cache = identity_module.IdentityCache()
    first = cache.known(_der(alice_cert))
    assert cache.known(bytes(_der(alice_cert))) is first  # equal bytes, another object: the same entry
    assert len(cache) == 1


def test_lookalikes_are_entries_of_their_own(ca, alice_cert):
    """Same subject and SANs, another key and serial (and another issuer): never the first one's identity."""
    other_ca = DevCA.create(name="identity test CA")  # even the issuer's name is the same
    cache = identity_module.IdentityCache()
    original = cache.known(_der(alice_cert))
    names = dict(ou=["eng", "ops"], organization=["Example Corp"], dns=["alice.example.test"], ips=["10.0.0.7", "::1"],
                 uris=["https://alice.example.test/", "spiffe://test/ns/prod/sa/alice", "spiffe://test/second"],
                 emails=["Alice@Example.test"], client=True)  # fmt: skip
    for twin in (ca.issue("alice", **names).certificate, other_ca.issue("alice", **names).certificate):
        known = cache.known(_der(twin))
        assert known is not original
        assert known.identity.subject == original.identity.subject and known.identity.uris == original.identity.uris
        assert known.identity.fingerprint_sha256 == twin.fingerprint(hashes.SHA256()).hex() != original.identity.fingerprint_sha256
        assert known.fingerprint != original.fingerprint and known.xfcc != original.xfcc
        assert known.certificate == twin
    assert cache.known(_der(alice_cert)) is original


def test_the_cache_is_bounded_least_recently_used_first(ca):
    cache = identity_module.IdentityCache(limit=2)
    a, b, c = (_der(ca.issue(name, client=True).certificate) for name in "abc")
    first = cache.known(a)
    cache.known(b)
    assert cache.known(a) is first  # a is now the most recently used
    cache.known(c)  # b goes
    assert len(cache) == 2 and cache.known(a) is first
    assert cache.known(b) is not None and len(cache) == 2


def test_bytes_that_are_not_a_certificate_raise_and_are_not_kept():
    cache = identity_module.IdentityCache()
    with pytest.raises(ValueError):
        cache.known(b"\x30\x03\x02\x01\x00")
    assert len(cache) == 0
