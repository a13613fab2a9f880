"""
Asking OpenSSL for nothing (mtlsgate/tls/fastwrite.py, SendAtOnce._flushReceiveBIO and _flushSendBIO): the receive loop
skips the recv that would raise WantReadError, and the send flush the bio_read that would.  Whatever the peer sends, and
however its bytes are split, a SendAtOnce TLS protocol delivers exactly what Twisted's own TLSMemoryBIOProtocol delivers,
in the same pieces, and ends with the same reason: the same records, a partial record held until its rest comes, the
peer's close_notify, and a connection lost mid-record or without close_notify (a truncation the reason must carry).
The private internals this reads are pinned first.
"""

from __future__ import annotations

import hashlib
import inspect
from typing import Any

import pytest
from cryptography.hazmat.bindings.openssl.binding import Binding
from OpenSSL import SSL
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions, PrivateCertificate, optionsForClientTLS
from twisted.internet.ssl import Certificate as TxCertificate
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol

from mtlsgate.tls import fastwrite
from mtlsgate.tls.fastwrite import SendAtOnceTLSProtocol

# The loop SendAtOnce._flushReceiveBIO restates (Twisted 23-25's TLSMemoryBIOProtocol._flushReceiveBIO, its source
# without the docstring and comments): a Twisted that changes it fails here, to be read and restated again.
RESTATED = "0af84340"


def _code_of(function: Any) -> str:
    lines = [line.split("#", 1)[0].rstrip() for line in inspect.getsource(function).splitlines()]
    body = "\n".join(line for line in lines if line.strip())
    doc = inspect.getdoc(function) or ""
    for line in doc.splitlines():
        body = body.replace(line.strip(), "")
    return hashlib.sha256(body.encode()).hexdigest()[:8]


def test_the_twisted_and_pyopenssl_internals_read_are_there():
    assert _code_of(TLSMemoryBIOProtocol._flushReceiveBIO) == RESTATED, (
        "Twisted's TLSMemoryBIOProtocol._flushReceiveBIO changed: read it, and restate it in mtlsgate/tls/fastwrite.py "
        f"(SendAtOnce._flushReceiveBIO); then set RESTATED to {_code_of(TLSMemoryBIOProtocol._flushReceiveBIO)!r}"
    )
    for name in ("_lostTLSConnection", "_aborted", "_shutdownTLS", "_tlsShutdownFinished", "_flushSendBIO", "_tlsConnection"):
        assert hasattr(TLSMemoryBIOProtocol, name) or name == "_tlsConnection", f"TLSMemoryBIOProtocol.{name} is gone"
    connection = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
    assert connection._into_ssl is not None and connection._from_ssl is not None, "pyOpenSSL's memory BIOs moved"
    assert fastwrite._held is Binding.lib.BIO_get_mem_data, "cryptography's binding no longer has BIO_get_mem_data"


class Recorder(Protocol):
    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.pieces.append(data)

    def connectionLost(self, reason: Failure = ConnectionDone()) -> None:  # type: ignore[assignment]
        self.lost = reason


@pytest.fixture(scope="module")
def options() -> tuple[CertificateOptions, TxCertificate]:
    from cryptography.hazmat.primitives import serialization

    from mtlsgate.tls.pki import self_signed

    key, cert = self_signed("localhost", ["localhost"])
    pem = cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return PrivateCertificate.loadPEM(pem).options(), TxCertificate.loadPEM(cert.public_bytes(serialization.Encoding.PEM))


def handshaken(options: Any, server_class: type) -> tuple[Any, Any, Recorder, StringTransport, StringTransport]:
    """A server of C{server_class} and Twisted's own client over StringTransports, handshaken by passing bytes by hand."""
    server_options, ca = options
    app = Recorder()
    server_factory = TLSMemoryBIOFactory(server_options, False, Factory.forProtocol(lambda: app))
    server_factory.protocol = server_class
    client_factory = TLSMemoryBIOFactory(optionsForClientTLS("localhost", ca), True, Factory.forProtocol(Protocol))
    client_factory.protocol = TLSMemoryBIOProtocol  # each write at once (the factory's default buffers until a reactor turn)
    server, client = server_factory.buildProtocol(None), client_factory.buildProtocol(None)
    to_server, to_client = StringTransport(), StringTransport()
    server.makeConnection(to_client)
    client.makeConnection(to_server)
    for _ in range(10):
        for source, sink in ((to_server, server), (to_client, client)):
            data = source.value()
            source.clear()
            if data:
                sink.dataReceived(data)
    assert server._handshakeDone and client._handshakeDone
    to_server.clear()
    return server, client, app, to_server, to_client


SENDS = [b"a" * 10, b"b" * 20000, b"c" * 3]  # a small record, a body over two records, another small one


def _run(options: Any, server_class: type, splits: list[int], close_notify: bool, lose: bool) -> tuple[list[bytes], list[bytes], str | None]:
    """One session: the client's records reach the server split at C{splits}; then maybe the connection is lost."""
    server, client, app, to_server, _ = handshaken(options, server_class)
    for data in SENDS:
        client.write(data)
    if close_notify:
        client.loseConnection()
    wire = to_server.value()
    bounds = [0, *sorted({s for s in splits if 0 < s < len(wire)}), len(wire)]
    chunks = [wire[a:b] for a, b in zip(bounds, bounds[1:])]
    if lose and len(chunks) > 1:
        chunks = chunks[:-1]  # the connection goes before the last piece: a truncation
    for chunk in chunks:
        server.dataReceived(chunk)
    if lose:
        server.connectionLost(Failure(ConnectionDone()))
    lost = None if app.lost is None else type(app.lost.value).__name__
    return app.pieces, [b"".join(app.pieces)], lost


@pytest.mark.parametrize("close_notify", [False, True])
@pytest.mark.parametrize("lose", [False, True])
@pytest.mark.parametrize("splits", [[], [1], [5], [6], [40], [41, 42], [10000], [20050], [20060, 20061], [3, 300, 3000, 30000]])
def test_the_server_delivers_what_twisteds_own_tls_protocol_delivers(options, splits, close_notify, lose):
    ours = _run(options, SendAtOnceTLSProtocol, splits, close_notify, lose)
    twisteds = _run(options, TLSMemoryBIOProtocol, splits, close_notify, lose)
    assert ours[1] == twisteds[1]  # the same bytes
    assert len(ours[0]) == len(twisteds[0])  # in the same number of pieces
    assert ours[2] == twisteds[2]  # and the same end: none yet, the peer's close, or a truncation


def test_a_connection_lost_mid_record_is_a_tls_error_not_a_clean_end(options):
    pieces, _, lost = _run(options, SendAtOnceTLSProtocol, [100], close_notify=False, lose=True)
    assert lost is not None and lost not in ("ConnectionDone",), lost


def test_a_read_that_brings_nothing_to_deliver_makes_no_recv_past_the_first(options, monkeypatch):
    server, client, app, to_server, _ = handshaken(options, SendAtOnceTLSProtocol)
    calls = []
    tls = server._tlsConnection
    recv = tls.recv

    def counting(n: int) -> bytes:
        calls.append(n)
        return recv(n)

    monkeypatch.setattr(tls, "recv", counting, raising=False)
    client.write(b"x" * 10)
    client.write(b"y" * 10)
    server.dataReceived(to_server.value())
    assert b"".join(app.pieces) == b"x" * 10 + b"y" * 10
    assert len(calls) == len(app.pieces)  # one recv per record delivered, none to be told WantReadError
