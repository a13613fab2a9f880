"""
Attack class: someone who can read the cluster's Redis (a dump, a replica, a backup) or write to it,
without the storage key.  The gateway must disclose no private key, serve no key and chain they put
together, answer no ACME challenge they planted (else they could pass a CA's validation for our
names with their own account), and let no older or foreign CRL un-revoke a certificate.
"""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from mtlsgate.cluster.seal import SealError, new_key_text
from mtlsgate.config.model import ConfigError, DownstreamMTLS, Storage
from mtlsgate.tls.pki import DevCA
from mtlsgate.tls.server import ClientVerification
from tests.cluster.test_store import shared_store, storage_for


def _der(key) -> bytes:
    return key.private_bytes(Encoding.DER, PrivateFormat.PKCS8, NoEncryption())


async def _stored(store, name, issued):
    from mtlsgate.cluster.lock import LeaseLock

    lease = await LeaseLock(store.client.reactor, store.client, 10).acquire(name)
    assert await store.put_certificate(name, issued.key, [issued.certificate], lease.token)
    await lease.release()


@pytest.mark.needs("redis-server")
@pytest_twisted.ensureDeferred
async def test_a_dump_of_redis_discloses_no_private_key(redis_server, tmp_path, pki):
    server = redis_server()
    store = shared_store(storage_for(server, tmp_path))
    issued = pki["gateway_obj"]
    await _stored(store, "a.test", issued)
    account = await store.account_key(None)
    dump = b"".join(server.command(*command) for command in (("GET", "mtlsgate:cert:a.test"), ("GET", "mtlsgate:account")))
    for key in (issued.key, account):
        der = _der(key)
        assert der not in dump and der[-32:] not in dump
    assert b"PRIVATE KEY" not in dump
    await store.client.close()


@pytest.mark.needs("redis-server")
@pytest_twisted.ensureDeferred
async def test_a_key_moved_to_another_name_or_paired_with_another_chain_does_not_open(redis_server, tmp_path, pki):
    server = redis_server()
    store = shared_store(storage_for(server, tmp_path))
    await _stored(store, "a.test", pki["gateway_obj"])
    value = await store.client.call("get", "mtlsgate:cert:a.test")
    await store.client.call("set", "mtlsgate:cert:b.test", value)  # the same blob under another name
    with pytest.raises(SealError):
        await store.get_certificate("b.test")
    attacker = DevCA.create(None, name="attacker").issue_server(["a.test"])
    swapped = dict(json.loads(value), chain=attacker.cert_pem().decode())  # their chain beside our sealed key
    await store.client.call("set", "mtlsgate:cert:a.test", json.dumps(swapped))
    with pytest.raises(SealError):
        await store.get_certificate("a.test")
    await store.client.close()


@pytest.mark.needs("redis-server")
@pytest_twisted.ensureDeferred
async def test_a_planted_challenge_is_not_answered(redis_server, tmp_path):
    """A challenge written without the storage key, or sealed but for a name not ours, gets no validation certificate."""
    from twisted.internet import reactor

    from mtlsgate.acme.responders import TLSALPN01Responder
    from mtlsgate.cluster.node import CHALLENGE_TTL, ClusterNode

    server = redis_server()
    storage = storage_for(server, tmp_path)
    nodes = []
    for i in range(2):
        (tmp_path / f"certs-{i}").mkdir()
        node = ClusterNode(reactor, storage, str(tmp_path / f"certs-{i}"))
        node.responders["tls-alpn-01"] = TLSALPN01Responder()
        node.names = frozenset({"a.test"})
        node.startService()
        nodes.append(node)
    ours, victim = nodes
    planted = {"type": "tls-alpn-01", "name": "a.test", "token": "t", "value": "attacker-key-authorization", "expires": 4e9}
    server.command("HSET", "mtlsgate:challenges", "tls-alpn-01:a.test:t", json.dumps(planted))
    await victim.reconcile()  # the one startService began may have read the store before the plant:
    await victim.reconcile()  # this one began after it
    assert victim.responders["tls-alpn-01"].certificate_for("a.test") is None
    ours.names = frozenset({"a.test", "evil.test"})  # a node with the key, ordering a name the victim does not serve
    # what publish_challenge stores and announces, sealed with the key, without its wait (up to ACK_WAIT) for an ack the victim never gives
    evil = {"type": "tls-alpn-01", "name": "evil.test", "token": "t2", "value": "value", "expires": reactor.seconds() + CHALLENGE_TTL}
    assert ours.shared is not None
    await ours.shared.add_challenge("tls-alpn-01:evil.test:t2", evil)
    await ours.publish_challenge("tls-alpn-01", "a.test", "t3", "genuine")
    await victim.reconcile()
    assert victim.responders["tls-alpn-01"].certificate_for("evil.test") is None
    assert victim.responders["tls-alpn-01"].certificate_for("a.test") is not None  # the genuine one is answered
    for node in nodes:
        await node.stopService()


@pytest.mark.needs("redis-server")
@pytest_twisted.ensureDeferred
async def test_an_older_crl_written_to_redis_does_not_un_revoke(redis_server, tmp_path, pki):
    server = redis_server()
    store = shared_store(storage_for(server, tmp_path))
    ca = pki["ca_obj"]
    old, new = ca.crl([]), ca.crl([pki["revoked_obj"].certificate])
    assert await store.put_crl(new)
    assert not await store.put_crl(old)  # through the store: refused
    [kept] = await store.crls()
    assert kept.get_revoked_certificate_by_serial_number(pki["revoked_obj"].certificate.serial_number) is not None
    await store.client.close()


def test_the_gateway_keeps_the_newest_crl_per_issuer_and_ignores_foreign_ones(pki, tmp_path):
    """Written straight into Redis (around the store's check): an older CRL, and one signed by a CA outside the bundle."""
    ca = pki["ca_obj"]
    serial = pki["revoked_obj"].certificate.serial_number
    old = ca.crl([])
    new = ca.crl([pki["revoked_obj"].certificate])
    (tmp_path / "new.crl").write_bytes(new.public_bytes(Encoding.PEM))
    (tmp_path / "old.crl").write_bytes(old.public_bytes(Encoding.PEM))
    [crl] = ClientVerification.load(DownstreamMTLS(ca_file=pki["ca"], crl_file=str(tmp_path / "new.crl"), client_auth="require"), [old]).crls
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None  # the older shared one does not replace the file's
    [crl] = ClientVerification.load(DownstreamMTLS(ca_file=pki["ca"], crl_file=str(tmp_path / "old.crl"), client_auth="require"), [new]).crls
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None  # the newer shared one does
    stranger = DevCA.create(None, name="test CA")  # the same name as the trusted CA, another key
    forged = stranger.crl([])
    assert ClientVerification.load(DownstreamMTLS(ca_file=pki["ca"], client_auth="require", crl_check="leaf"), [forged]).crls == ()


def test_a_redis_password_never_sits_in_the_configuration_url(tmp_path):
    from mtlsgate.config.load import config_from_mapping

    key = tmp_path / "storage.key"
    key.write_text(new_key_text())
    with pytest.raises(ConfigError, match="storage: a password in the URL is refused"):
        config_from_mapping({"certs_dir": str(tmp_path), "certificates": [], "storage": "redis://:hunter2@127.0.0.1:6379/0", "storage_key_file": str(key)})
    assert "hunter2" not in Storage(url="redis://127.0.0.1:6379/0", key_file=str(key)).url
