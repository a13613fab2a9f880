"""
The private Twisted APIs mtlsgate still leans on, each checked here so that an upgrade of Twisted that
changes one fails this test by name, not a handshake at run time.

The TLS listener (mtlsgate.tls.server._HandshakeLoggingTLSProtocol) overrides two private hooks of
TLSMemoryBIOProtocol to learn when a handshake finished or failed, and reads two of its private
attributes: Twisted has no public "handshake failed" notification, and IHandshakeListener reports
success only.
"""

from __future__ import annotations

import inspect

from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory, TLSMemoryBIOProtocol

from mtlsgate.tls.server import ServerTLS


def test_tls_memory_bio_protocol_keeps_the_hooks_the_listener_overrides():
    for name in ("_checkHandshakeStatus", "_tlsShutdownFinished"):
        assert callable(getattr(TLSMemoryBIOProtocol, name, None)), f"TLSMemoryBIOProtocol.{name} is gone"
    assert list(inspect.signature(TLSMemoryBIOProtocol._tlsShutdownFinished).parameters) == ["self", "reason"]
    assert issubclass(BufferingTLSTransport, TLSMemoryBIOProtocol)


def test_tls_memory_bio_protocol_keeps_the_attributes_the_listener_reads():
    protocol = TLSMemoryBIOFactory(ServerTLS(), False, Factory.forProtocol(Protocol)).buildProtocol(None)
    assert protocol._handshakeDone is False
    # _tlsConnection is set when the connection is made: pin its name in Twisted's own source.
    assert "self._tlsConnection = " in inspect.getsource(TLSMemoryBIOProtocol)
