"""Pure ACME logic: renewal times, back-off, Retry-After, ARI CertIDs, RFC 8737 certificates, config."""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from twisted.web.http_headers import Headers

from mtlsgate.acme.client import ari_certificate_id, renewal_time_in, retry_after
from mtlsgate.acme.responders import ID_PE_ACME_IDENTIFIER, dns01_record_name, validation_certificate
from mtlsgate.acme.service import backoff, renewal_due
from mtlsgate.config.load import config_from_mapping, parse_domain
from mtlsgate.config.model import ConfigError
from mtlsgate.tls.pki import DevCA

DAY = 86400


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return DevCA.create(str(tmp_path_factory.mktemp("ca")), name="unit CA")


def _leaf(ca, days):
    now = datetime.now(timezone.utc)
    return ca.issue("x.example.com", dns=["x.example.com"], server=True, not_before=now, not_after=now + timedelta(days=days)).certificate


def test_long_lived_certificates_renew_30_days_before_expiry(ca):
    leaf = _leaf(ca, 90)
    assert leaf.not_valid_after_utc - renewal_due(leaf, None) == timedelta(days=30)


def test_short_lived_certificates_renew_with_a_third_of_their_life_left(ca):
    leaf = _leaf(ca, 6)
    assert leaf.not_valid_after_utc - renewal_due(leaf, None) == timedelta(days=2)


def test_an_explicit_renew_before_wins(ca):
    leaf = _leaf(ca, 90)
    assert leaf.not_valid_after_utc - renewal_due(leaf, 10 * DAY) == timedelta(days=10)


def test_backoff_doubles_with_jitter_and_is_capped_at_a_day():
    middle = lambda low, high: 1.0  # noqa: E731
    assert [backoff(n, 60, middle) for n in (1, 2, 3)] == [60, 120, 240]
    assert backoff(40, 60, middle) == DAY
    assert 45 <= backoff(1, 60) <= 75


def test_retry_after_in_seconds_or_as_a_date_else_the_default():
    assert retry_after(Headers({b"retry-after": [b"7"]}), 0, 1) == 7
    assert retry_after(Headers({b"retry-after": [b"Thu, 01 Jan 1970 00:01:40 GMT"]}), 40, 1) == 60
    assert retry_after(Headers(), 0, 3) == 3
    assert retry_after(Headers({b"retry-after": [b"soon"]}), 0, 3) == 3


def test_ari_certificate_id_is_aki_dot_serial(ca):
    leaf = _leaf(ca, 90)
    aki, serial = ari_certificate_id(leaf).split(".")
    assert "=" not in aki + serial
    import base64

    decoded = int.from_bytes(base64.urlsafe_b64decode(serial + "=" * (-len(serial) % 4)), "big")
    assert decoded == leaf.serial_number


def test_renewal_time_is_inside_the_window():
    start = datetime(2030, 1, 1, tzinfo=timezone.utc)
    end = start + timedelta(days=2)
    for _ in range(20):
        assert start <= renewal_time_in((start, end)) <= end


def test_tls_alpn_validation_certificate_follows_rfc_8737():
    key, cert = validation_certificate("a.example.com", "token.thumbprint")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["a.example.com"]
    extension = cert.extensions.get_extension_for_oid(ID_PE_ACME_IDENTIFIER)
    assert extension.critical
    assert extension.value.value == b"\x04\x20" + hashlib.sha256(b"token.thumbprint").digest()


def test_dns01_record_name_strips_the_wildcard():
    assert dns01_record_name("*.example.com") == dns01_record_name("example.com") == "_acme-challenge.example.com"


@pytest.mark.parametrize("name", ["*.*.example.com", "", "a..example.com", "-a.example.com", "x" * 64 + ".com", "localhost", "a_b.example.com"])
def test_bad_certificate_names_are_refused(name):
    with pytest.raises(ConfigError):
        parse_domain(name, "autocert.domains[0]")


def test_good_certificate_names_pass():
    assert parse_domain("*.Apps.Example.com.", "k") == "*.apps.example.com"


def test_autocert_config_errors_name_the_key(tmp_path):
    base = {"certs_dir": str(tmp_path), "http_address": "tcp:8080"}
    with pytest.raises(ConfigError, match=r"autocert\.domains\[0\].*wildcard needs dns-01"):
        config_from_mapping({**base, "autocert": {"directory": "https://ca.test/dir", "domains": ["*.example.com"]}})
    with pytest.raises(ConfigError, match=r"^certs_dir: is required with autocert"):
        config_from_mapping({"autocert": {"directory": "https://ca.test/dir", "domains": ["a.example.com"]}})
    with pytest.raises(ConfigError, match=r"autocert\.directory"):
        config_from_mapping({**base, "autocert": {"directory": "http://ca.test/dir", "domains": ["a.example.com"]}})
    with pytest.raises(ConfigError, match=r"autocert\.challenges\[0\]"):
        config_from_mapping({**base, "autocert": {"directory": "letsencrypt", "domains": ["a.example.com"], "challenges": ["http-02"]}})


def test_autocert_config_groups_names_into_certificates(tmp_path):
    config = config_from_mapping({
        "certs_dir": str(tmp_path / "new"),
        "autocert": {"directory": "letsencrypt-staging", "domains": ["a.example.com", ["b.example.com", "www.b.example.com"]]},
    })  # fmt: skip
    assert config.autocert.domains == (("a.example.com",), ("b.example.com", "www.b.example.com"))
    assert config.autocert.directory == "https://acme-staging-v02.api.letsencrypt.org/directory"
    assert config.certificates == ()


def test_dns01_without_a_configured_resolver_asks_the_systems_on_our_reactor():
    """Regression (found by mypy): createResolver() takes no reactor, so this raised TypeError."""
    from twisted.internet.task import Clock
    from twisted.names.client import Resolver

    from mtlsgate.acme.responders import DNS01Responder

    clock = Clock()
    resolver = DNS01Responder(clock, hook="/bin/true")._resolver()
    assert isinstance(resolver, Resolver)
