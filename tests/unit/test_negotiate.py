"""
The TLS listener's ALPN dispatch (mtlsgate.http.negotiate): once the handshake has chosen a front end, the TLS layer
hands that front end its bytes and its end itself, with no forwarding protocol between them (one Python call less on
every read), and a transport that is not TLS still gets the front end through the dispatcher.
"""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives import serialization
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.test.iosim import connect, makeFakeClient, makeFakeServer

from mtlsgate.http.negotiate import NegotiatingFactory
from mtlsgate.tls.pki import self_signed


class FrontEnd(Protocol):
    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.lost: list[Any] = []

    def dataReceived(self, data: bytes) -> None:
        self.data.append(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.append(reason)


def _tls_options() -> tuple[Any, Any]:
    key, cert = self_signed("localhost", ["localhost"])
    pem = cert.public_bytes(serialization.Encoding.PEM)
    private = PrivateCertificate.loadPEM(pem + key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                                 serialization.NoEncryption()))  # fmt: skip
    return private.options(), optionsForClientTLS("localhost", Certificate.loadPEM(pem))


def test_after_the_handshake_the_tls_layer_delivers_to_the_chosen_front_end_itself():
    server_options, client_options = _tls_options()
    built: list[FrontEnd] = []
    http1 = Factory.forProtocol(lambda: built.append(FrontEnd()) or built[-1])
    server = TLSMemoryBIOFactory(server_options, False, NegotiatingFactory(http1, None)).buildProtocol(None)  # type: ignore[arg-type]
    client_factory = TLSMemoryBIOFactory(client_options, True, Factory.forProtocol(Protocol))
    client_factory.protocol = TLSMemoryBIOProtocol  # writes at once (not BufferingTLSTransport's callLater on the global reactor)
    client = client_factory.buildProtocol(None)
    pump = connect(server, makeFakeServer(server), client, makeFakeClient(client), greet=False)
    pump.flush()  # the handshake
    client.write(b"GET / HTTP/1.1\r\n\r\n")
    pump.flush()
    assert len(built) == 1 and server.wrappedProtocol is built[0]
    assert b"".join(built[0].data) == b"GET / HTTP/1.1\r\n\r\n"
    client.loseConnection()
    pump.flush()
    assert len(built[0].lost) == 1


def test_a_transport_without_tls_gets_the_front_end_through_the_dispatcher():
    built: list[FrontEnd] = []
    dispatch = NegotiatingFactory(Factory.forProtocol(lambda: built.append(FrontEnd()) or built[-1]), None).buildProtocol(None)  # type: ignore[arg-type]
    dispatch.makeConnection(StringTransport())
    dispatch.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
    dispatch.connectionLost(None)  # type: ignore[arg-type]
    assert built[0].data == [b"GET / HTTP/1.1\r\n\r\n"] and len(built[0].lost) == 1
