"""Smoke tests of the pebble fixture itself: real processes, real sockets, loopback only."""

from __future__ import annotations

import json
import subprocess
import urllib.request

import pytest
from cryptography import x509

from tests.acme.pebble import Pebble, dns_query, write_dns_hook
from tests.conftest import free_port


@pytest.fixture
def pebble(start_pebble) -> Pebble:
    return start_pebble(http_port=free_port(), tls_port=free_port())


def get_json(url: str, pebble: Pebble) -> dict:
    with urllib.request.urlopen(url, context=pebble.ssl_context(), timeout=10) as response:
        return json.load(response)


def test_directory_is_served_over_https_trusting_ca_file(pebble):
    assert pebble.directory_url == f"https://localhost:{pebble.acme_port}/dir"
    directory = get_json(pebble.directory_url, pebble)
    for resource in ("newNonce", "newAccount", "newOrder"):
        assert directory[resource].startswith(f"https://localhost:{pebble.acme_port}/")
    assert directory["meta"]["externalAccountRequired"] is False
    assert "reject 0% of good nonces" in pebble.log_text()


def test_root_and_intermediate_are_pem_certificates(pebble):
    root = x509.load_pem_x509_certificate(pebble.root_pem())
    intermediate = x509.load_pem_x509_certificate(pebble.intermediate_pem())
    assert root.subject == root.issuer
    assert intermediate.issuer == root.subject
    intermediate.verify_directly_issued_by(root)


def test_set_and_clear_txt(pebble):
    pebble.set_txt("_acme-challenge.example.test.", "abc")
    assert dns_query(pebble.dns_address, "_acme-challenge.example.test", "TXT") == ["abc"]
    assert dns_query(pebble.dns_address, "_acme-challenge.example.test", "TXT", tcp=True) == ["abc"]
    pebble.clear_txt("_acme-challenge.example.test")
    assert dns_query(pebble.dns_address, "_acme-challenge.example.test", "TXT") == []


def test_dns_hook_adds_and_removes_single_values(pebble, tmp_path):
    hook = write_dns_hook(tmp_path / "dns-hook", pebble)
    name = "_acme-challenge.apps.example.test"

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(hook), *args], capture_output=True, text=True, timeout=30)

    assert run("add", name, "wildcard").returncode == 0
    assert run("add", name + ".", "apex").returncode == 0
    assert sorted(dns_query(pebble.dns_address, name, "TXT")) == ["apex", "wildcard"]
    assert run("remove", name, "wildcard").returncode == 0
    assert dns_query(pebble.dns_address, name, "TXT") == ["apex"]
    assert run("remove", name, "apex").returncode == 0
    assert dns_query(pebble.dns_address, name, "TXT") == []


def test_dns_hook_reports_errors_on_one_line(pebble, tmp_path):
    hook = write_dns_hook(tmp_path / "dns-hook", pebble)
    usage = subprocess.run([str(hook), "upsert", "x.test", "v"], capture_output=True, text=True, timeout=30)
    assert usage.returncode != 0 and usage.stderr.startswith("usage:")
    pebble.stop()
    down = subprocess.run([str(hook), "add", "_acme-challenge.x.test", "v"], capture_output=True, text=True, timeout=30)
    assert down.returncode != 0
    assert down.stderr.count("\n") == 1 and "refused" in down.stderr.lower()


def test_every_name_resolves_to_loopback(pebble):
    assert dns_query(pebble.dns_address, "anything.example.test", "A") == ["127.0.0.1"]
    assert dns_query(pebble.dns_address, "anything.example.test", "AAAA") == []


def test_eab_makes_external_accounts_required(start_pebble):
    eab = {"kid-1": "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W"}
    pebble = start_pebble(http_port=free_port(), tls_port=free_port(), eab=eab, nonce_reject_percent=50)
    assert get_json(pebble.directory_url, pebble)["meta"]["externalAccountRequired"] is True
    assert "reject 50% of good nonces" in pebble.log_text()


def test_stop_leaves_no_process_behind(start_pebble):
    pebble = start_pebble(http_port=free_port(), tls_port=free_port())
    pebble.stop()
    assert pebble.pebble.popen.poll() is not None and pebble.challtestsrv.popen.poll() is not None
    pebble.stop()


def test_a_pebble_that_exits_during_start_up_is_reported_with_its_log(start_pebble, tmp_path):
    with pytest.raises(RuntimeError, match="pebble exited with 1 during start-up") as failure:
        start_pebble(http_port=free_port(), tls_port=free_port(), eab={"kid-1": "not base64!"})
    assert "failed to decode base64 URL encoded key" in str(failure.value)
    assert subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True).stdout == b""


def test_pebble_validates_dns01_for_a_wildcard_and_its_apex_through_the_hook(pebble, tmp_path):
    import josepy
    from acme import challenges, client, crypto_util, messages
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    hook = write_dns_hook(tmp_path / "dns-hook", pebble)
    account = josepy.JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
    network = client.ClientNetwork(account, alg=josepy.ES256, user_agent="mtlsgate-tests", verify_ssl=str(pebble.ca_file))
    acme = client.ClientV2(client.ClientV2.get_directory(pebble.directory_url, network), network)
    acme.new_account(messages.NewRegistration.from_data(email="ops@example.test", terms_of_service_agreed=True))
    key_pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())  # fmt: skip
    order = acme.new_order(crypto_util.make_csr(key_pem, ["*.apps.example.test", "apps.example.test"]))
    for authorization in order.authorizations:
        challenge = next(c for c in authorization.body.challenges if isinstance(c.chall, challenges.DNS01))
        name = "_acme-challenge." + authorization.body.identifier.value
        subprocess.run([str(hook), "add", name, challenge.chall.validation(account)], check=True, timeout=30)
        acme.answer_challenge(challenge, challenge.chall.response(account))
    order = acme.poll_and_finalize(order)
    leaf = x509.load_pem_x509_certificate(order.fullchain_pem.encode())
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert sorted(names) == ["*.apps.example.test", "apps.example.test"]
    leaf.verify_directly_issued_by(x509.load_pem_x509_certificate(pebble.intermediate_pem()))
