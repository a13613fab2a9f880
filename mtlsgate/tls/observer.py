"""What the TLS layer reports about connections and handshakes, and to whom: an interface, so that the
TLS layer depends on no metrics library (L{mtlsgate.observe.metrics.GatewayMetrics} provides it)."""

from __future__ import annotations

from zope.interface import Interface, implementer


class IConnectionObserver(Interface):
    """Told of every client connection the TLS listener accepts or refuses, and how its handshake ended."""

    def handshake(result: str, reason: str = "") -> None:
        """A handshake ended: C{result} is ok, unverified, rejected, refused or failed; C{reason} a bounded label."""

    def connection_opened() -> None:
        """A client connection was accepted."""

    def connection_closed() -> None:
        """A client connection accepted earlier has closed."""


@implementer(IConnectionObserver)
class NoObserver:
    """Observes nothing: for TLS listeners without metrics (the echo upstream, the C{mtls:} endpoint)."""

    def handshake(self, result: str, reason: str = "") -> None:
        pass

    def connection_opened(self) -> None:
        pass

    def connection_closed(self) -> None:
        pass
