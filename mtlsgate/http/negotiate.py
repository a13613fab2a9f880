"""
One factory for the TLS listener, two front ends: after the handshake, the protocol ALPN chose picks
the HTTP/2 engine (C{h2}) or the HTTP/1.1 one (C{http/1.1}, or no ALPN at all).  Any other protocol
(C{acme-tls/1}: the TLS layer closes that connection itself, RFC 8737) gets no HTTP at all.

The HTTP/2 front end is built by the first connection that negotiates C{h2} (L{LazyH2ServerFactory}):
a process that never speaks HTTP/2 never imports C{h2}, C{hpack} and C{hyperframe} (about 1.7 MiB
with L{mtlsgate.http.h2server}, issue #13).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from twisted.internet.interfaces import IHandshakeListener, IReactorTime, ISSLTransport
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from mtlsgate.config.model import Limits
from mtlsgate.http.server import HTTPServerFactory

if TYPE_CHECKING:
    from mtlsgate.http.h2server import H2ServerFactory

ALPN_H2 = b"h2"
ALPN_HTTP1 = b"http/1.1"


@implementer(IHandshakeListener)
class _ByALPN(Protocol):
    """Waits for the TLS handshake, then hands the connection to the front end its ALPN protocol names."""

    def __init__(self, factory: NegotiatingFactory, addr: Any) -> None:
        self._factory = factory
        self._addr = addr
        self.inner: Any = None

    def connectionMade(self) -> None:
        if not ISSLTransport.providedBy(self.transport):  # no handshake to wait for (plain TCP, tests)
            self._choose(None)

    def handshakeCompleted(self) -> None:
        self._choose(getattr(self.transport, "negotiatedProtocol", None))

    def _choose(self, protocol: bytes | None) -> None:
        if self.inner is not None:
            return
        if protocol == ALPN_H2:
            factory: Factory | None = self._factory.h2
        elif protocol in (None, ALPN_HTTP1):
            factory = self._factory.http1
        else:
            factory = None  # acme-tls/1: no HTTP on it
        if factory is None:
            return
        inner = factory.buildProtocol(self._addr)
        if inner is None or self.transport is None:
            return
        self.inner = inner
        inner.makeConnection(self.transport)
        if getattr(self.transport, "wrappedProtocol", None) is self:
            # The TLS layer hands the front end its bytes and its end itself from now on (as a TCP route's dispatch does,
            # mtlsgate.proxy.tcp): one Python call less on every read.
            self.transport.wrappedProtocol = inner  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.dataReceived(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.inner is not None:
            self.inner.connectionLost(reason)


class LazyH2ServerFactory(Factory):
    """
    The HTTP/2 front end (L{mtlsgate.http.h2server.H2ServerFactory}), imported and built when the first
    connection negotiates C{h2}.  That connection pays for the import (a few milliseconds, once per process).
    """

    noisy = False

    def __init__(self, handler: Callable[[Any], None], limits: Limits, reactor: IReactorTime) -> None:
        self._handler = handler
        self._limits = limits
        self._reactor = reactor
        self.built: H2ServerFactory | None = None

    def buildProtocol(self, addr: Any) -> Protocol | None:
        if self.built is None:
            from mtlsgate.http.h2server import H2ServerFactory

            self.built = H2ServerFactory(self._handler, self._limits, self._reactor)
        return self.built.buildProtocol(addr)

    def drain(self) -> None:
        if self.built is not None:
            self.built.drain()


class NegotiatingFactory(Factory):
    """The TLS listener's factory: HTTP/1.1 and, when C{h2} is given, HTTP/2, by ALPN."""

    noisy = False

    def __init__(self, http1: HTTPServerFactory, h2: H2ServerFactory | LazyH2ServerFactory | None) -> None:
        self.http1 = http1
        self.h2 = h2

    def buildProtocol(self, addr: Any) -> Protocol:
        return _ByALPN(self, addr)

    def drain(self) -> None:
        """Shutting down: HTTP/2 connections get GOAWAY and close once their streams are done."""
        if self.h2 is not None:
            self.h2.drain()
