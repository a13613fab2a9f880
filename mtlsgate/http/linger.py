"""
The end of a connection the gateway closes itself (a C{Connection: close} response, a refusal, an idle
timeout, HTTP/2's GOAWAY): a short linger for the client's close_notify or FIN, then the connection goes.

Twisted's TLS layer, asked to close, sends close_notify after what is buffered and then keeps the TCP
connection until the client's close_notify (or its FIN) comes: a client that sends neither, and need not
read a byte, would keep the connection (its descriptor, TLS object and the front end's state) for as long
as nothing else ends it.  L{Linger}, one per closing connection with one timer, ends it:

- while the close is not written out (L{written_out}: the gateway's close_notify not yet sent, or bytes of
  the connection still held unsent by Twisted), the client is still being sent its response: nothing is
  cut, only checked again after L{LINGER} seconds, then twice as long each time up to L{_LONGEST_CHECK}
  (a check costs a look at the reactor's writers, which grows with them), and aborted at C{give_up_at} if
  one is given (a client that reads nothing, as the front ends' own abort did before);
- once it is written out, the client has L{LINGER} seconds to answer (its close_notify or FIN ends the
  connection at once, as before); after them the TCP connection under the TLS layer is closed, the orderly
  way: Twisted holds nothing unsent for it, so it closes at once, and the kernel still sends what it holds,
  then FIN (a reset if the client's unread bytes are still queued, as any close);
- should that not end it, the next turn of the timer aborts it.

"Written out" is read from public interfaces only: the TLS connection's shutdown state (pyOpenSSL's
C{get_shutdown()}: our close_notify is sent) and whether the TCP transport under it is among the reactor's
writers (L{IReactorFDSet.getWriters}: a transport is a writer exactly while Twisted holds bytes it has not
handed to the kernel).  A reactor that does not tell its writers is taken as having written everything.
"""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from twisted.internet.interfaces import IDelayedCall, IReactorFDSet, IReactorTime, ISSLTransport
from twisted.protocols.policies import ProtocolWrapper

#: Seconds a connection the gateway closed waits for the client's close_notify or FIN once the close is written out.
LINGER = 2.0

_LONGEST_CHECK = 8 * LINGER  # the longest wait between two checks of a close not yet written out

_SENDING, _LINGERING, _CLOSED = 0, 1, 2


def _tcp(transport: Any) -> Any:
    """The transport under the TLS layer and any other L{ProtocolWrapper} (Twisted's TLS layer is one): the TCP connection."""
    while isinstance(transport, ProtocolWrapper) and transport.transport is not None:
        transport = transport.transport
    return transport


def written_out(reactor: IReactorTime | IReactorFDSet, transport: Any) -> bool:
    """
    Whether the gateway's close of C{transport} is on its way as far as this process goes: on TLS, its
    close_notify sent; and no byte of the connection held unsent by Twisted (its TCP transport is not among
    the reactor's writers).
    """
    if ISSLTransport.providedBy(transport):
        tls: Any = transport
        connection = tls.getHandle()  # ISystemHandle: the TLS layer's SSL.Connection (None once it is gone)
        if connection is not None and not connection.get_shutdown() & SSL.SENT_SHUTDOWN:
            return False
    if IReactorFDSet.providedBy(reactor):
        return _tcp(transport) not in reactor.getWriters()
    return True


class Linger:
    """
    The close of one connection (see the module): made when the front end asks its transport to close,
    with one timer at a time; L{cancel} when the connection is lost.  C{give_up_at} (reactor seconds): a
    close still not written out by then is aborted (None: checked for as long as it takes).
    """

    def __init__(self, reactor: IReactorTime, transport: Any, give_up_at: float | None = None) -> None:
        self._reactor = reactor
        self._transport = transport
        self._give_up_at = give_up_at
        self._stage = _SENDING
        self._next_check = LINGER
        self._call: IDelayedCall | None = None
        self._turn()

    def active(self) -> bool:
        """The timer is set (False once the connection is gone or aborted)."""
        return self._call is not None and self._call.active()

    def cancel(self) -> None:
        """The connection is gone: nothing more to do."""
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()

    def _turn(self) -> None:
        self._call = None
        transport, reactor = self._transport, self._reactor
        if not getattr(transport, "connected", True):
            return  # lost meanwhile (its front end cancels the linger; this is for one that did not)
        if self._stage == _CLOSED:  # the orderly close did not end it
            transport.abortConnection()
            return
        if self._stage == _LINGERING:
            self._stage = _CLOSED
            _tcp(transport).loseConnection()
            self._call = reactor.callLater(LINGER, self._turn)
            return
        if written_out(reactor, transport):
            self._stage = _LINGERING
            self._call = reactor.callLater(LINGER, self._turn)
            return
        delay = self._next_check
        self._next_check = min(2 * delay, _LONGEST_CHECK)
        if self._give_up_at is not None:
            delay = min(delay, self._give_up_at - reactor.seconds())
            if delay <= 0:
                transport.abortConnection()
                return
        self._call = reactor.callLater(delay, self._turn)
