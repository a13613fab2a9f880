"""
Sending at once: TLS output goes to the socket in the call that made it, not on the next reactor turn.

Twisted's TCP transport (C{FileDescriptor.write}) never sends at once: it buffers, registers the socket
for writing (an C{epoll_ctl}), sends on the next reactor turn (C{doWrite}) and unregisters it (another
C{epoll_ctl}).  A proxied request pays that twice (its head upstream, the response downstream): four
C{epoll_ctl}s and, at c=1, two reactor turns of latency.  Twisted has no public API to send at once.

L{SendAtOnce}, mixed into a C{TLSMemoryBIOProtocol}, hands the bytes OpenSSL produced to
L{DirectWriter}: when the TCP transport holds nothing unsent (its buffers empty, no producer paused, no
pull producer, no close, half-close or abort asked for), they go to the socket's C{send} (the socket is public:
C{ITCPTransport.getHandle()}) in the same call; only what the kernel does not take goes to the
transport's own C{write}, the buffered path, which pauses producers, closes after pending data and
reports a lost connection exactly as before.  A C{send} that fails (C{EAGAIN}, C{EPIPE},
C{ECONNRESET}, ...) sends nothing, so the bytes take the buffered path, whose C{doWrite} meets the same
error and loses the connection as it always did.  Byte order holds: the socket is written directly only
when nothing is queued ahead.

Bulk data keeps the buffered path: an application write of a full TLS record (16 KiB) or more, such as
a large body relayed record by record from the upstream, goes to C{transport.write}, which joins all
that a reactor turn wrote into one C{send}; sent at once, each record would be a C{send} of its own
(four where there was one for each 64 KiB read from the upstream).  Smaller writes (request and
response heads, small responses, handshake flights, WebSocket frames) go at once.

Every access to Twisted's private internals is in this module: the C{FileDescriptor}'s write state
(C{dataBuffer}, C{offset}, C{_tempDataLen}, C{_writeDisconnecting}, C{_writeDisconnected}, C{_aborting})
and C{TLSMemoryBIOProtocol}'s C{_flushSendBIO} and C{_tlsConnection}.  C{tests/unit/test_fastwrite.py}
fails by name when one of them changes.  At run time, a transport that lacks any of the attributes
(another transport, an older or newer Twisted) gets no L{DirectWriter} and the normal path, and a
Twisted whose TLS layer stopped calling C{_flushSendBIO} would never reach the override: the normal path.
"""

from __future__ import annotations

from typing import Any, Callable

from OpenSSL.SSL import WantReadError
from twisted.internet.abstract import FileDescriptor
from twisted.internet.protocol import connectionDone
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure

# The FileDescriptor attributes the fast path reads (never writes): its state must be "nothing queued, nothing asked".
TRANSPORT_STATE = (
    "connected", "disconnecting", "dataBuffer", "offset", "_tempDataLen", "producer", "streamingProducer", "producerPaused",
    "_writeDisconnecting", "_writeDisconnected", "_aborting",
)  # fmt: skip

RECORD = 2**14  # the largest TLS record's payload: a write of this size or more is bulk data
BIO_READ = 2**15  # what Twisted reads from the memory BIO at a time


class DirectWriter:
    """Writes to a TCP transport: to its socket at once when nothing is queued there, else through C{transport.write}."""

    __slots__ = ("transport", "_send")

    def __init__(self, transport: FileDescriptor, send: Callable[[bytes], int]) -> None:
        self.transport = transport
        self._send = send

    def __call__(self, data: bytes) -> None:
        t: Any = self.transport
        if (
            t.connected and not t.disconnecting and not t._tempDataLen and t.offset == len(t.dataBuffer) and not t.producerPaused
            and (t.producer is None or t.streamingProducer)  # a pull producer is asked for more by doWrite: leave it that path
            and not t._writeDisconnecting and not t._writeDisconnected and not t._aborting
        ):  # fmt: skip
            try:
                sent = self._send(data)
            except OSError:  # EAGAIN/ENOBUFS: full; anything else: the buffered path meets it again and loses the connection
                sent = 0
            if sent >= len(data):
                return
            if sent:
                data = data[sent:]
        t.write(data)


def direct_writer(transport: object) -> DirectWriter | None:
    """A L{DirectWriter} for C{transport}, or None (use C{transport.write}) unless it is a socket FileDescriptor with the state this module reads."""
    if not isinstance(transport, FileDescriptor) or not all(hasattr(transport, name) for name in TRANSPORT_STATE):
        return None
    get_handle = getattr(transport, "getHandle", None)
    send = getattr(get_handle(), "send", None) if get_handle is not None else None
    if not callable(send):
        return None
    return DirectWriter(transport, send)


class SendAtOnce(TLSMemoryBIOProtocol):
    """
    A C{TLSMemoryBIOProtocol} whose output goes out through a L{DirectWriter}: put it before
    C{TLSMemoryBIOProtocol} in a protocol's bases (or use L{SendAtOnceTLSProtocol}).
    """

    _direct: DirectWriter | None = None
    _bulk = False

    def makeConnection(self, transport: Any) -> None:
        self._direct = direct_writer(transport)
        super().makeConnection(transport)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._direct = None  # lets go of the transport and its socket's send
        super().connectionLost(reason)

    def write(self, data: bytes) -> None:
        if len(data) < RECORD or self._bulk:
            return super().write(data)
        self._bulk = True  # a full record or more: bulk data, through the buffered path, which joins a turn's writes into one send
        try:
            super().write(data)
        finally:
            self._bulk = False

    def _flushSendBIO(self) -> None:  # TLSMemoryBIOProtocol's: read what OpenSSL wrote and hand it to the transport
        tls = self._tlsConnection
        if tls is None:
            return
        try:
            data = tls.bio_read(BIO_READ)
        except WantReadError:  # nothing to send
            return
        if self._direct is not None and not self._bulk:
            self._direct(data)
        elif self.transport is not None:
            self.transport.write(data)


class SendAtOnceTLSProtocol(SendAtOnce):
    """A plain C{TLSMemoryBIOProtocol} that sends at once (the upstream connections')."""
