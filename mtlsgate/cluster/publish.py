"""
C{mtlsgate ca revoke|crl --storage URL}: put a CRL into the cluster's shared store from the command
line, so that every gateway sharing it refuses the revoked certificate within seconds.  Runs the
reactor for the one operation.
"""

from __future__ import annotations

from typing import Any

from cryptography import x509
from twisted.internet import defer, task

from mtlsgate.config.model import Storage


def publish_crl(storage: Storage, crl: x509.CertificateRevocationList, timeout: float = 10.0) -> bool:
    """Store C{crl} (unless the store holds a newer one for its issuer) and notify the gateways; False: a newer one is there."""
    from mtlsgate.cluster.connection import RedisClient
    from mtlsgate.cluster.shared import SharedStore

    outcome: dict[str, Any] = {}

    async def run(reactor: Any) -> None:
        client = RedisClient(reactor, storage)
        try:
            outcome["stored"] = await SharedStore(client, None, "mtlsgate-ca").put_crl(crl)
        except Exception as e:  # noqa: BLE001 - reported by the caller, as one line
            outcome["error"] = e
        finally:
            await client.close()

    try:
        task.react(lambda reactor: defer.ensureDeferred(run(reactor)))
    except SystemExit as e:
        if e.code not in (0, None) and "error" not in outcome:
            raise RuntimeError("the reactor stopped with an error") from None
    if "error" in outcome:
        raise outcome["error"]
    return bool(outcome["stored"])
