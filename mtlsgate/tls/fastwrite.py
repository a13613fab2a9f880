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

Asking OpenSSL for nothing: after every read, Twisted's TLS layer calls C{recv} until it raises
C{WantReadError}, and then C{bio_read} for output, which raises it again when there is none (the usual
case): two exceptions made, raised and caught per read, about 1.1 µs each, four per proxied request.
Both ends here look first at what the memory BIOs hold (cryptography's binding's C{BIO_get_mem_data},
about 0.1 µs): no output pending, no C{bio_read}; after a record was read, no byte left in the incoming
BIO and no decrypted byte held (C{pending()}), no further C{recv}: exactly the calls that would have
raised (without read-ahead, OpenSSL leaves every record it has not read yet in the BIO).

Every access to private internals is in this module: the C{FileDescriptor}'s write state
(C{dataBuffer}, C{offset}, C{_tempDataLen}, C{_writeDisconnecting}, C{_writeDisconnected}, C{_aborting}),
C{TLSMemoryBIOProtocol}'s C{_flushSendBIO}, C{_flushReceiveBIO} (whose loop L{SendAtOnce} restates, with
the look at the BIO before each further C{recv}), C{_tlsConnection}, C{_lostTLSConnection}, C{_aborted},
C{_shutdownTLS} and C{_tlsShutdownFinished}, and pyOpenSSL's C{Connection._into_ssl} and C{_from_ssl}
(its memory BIOs).  C{tests/unit/test_fastwrite.py} fails by name when one of them changes, and when
Twisted's C{_flushReceiveBIO} is no longer the loop restated here.  At run time, a transport that lacks
any of the attributes (another transport, an older or newer Twisted) gets no L{DirectWriter} and the
normal path, a TLS connection without the BIO attributes gets the calls that raise, and a Twisted whose
TLS layer stopped calling C{_flushSendBIO} would never reach the override: the normal path.
"""

from __future__ import annotations

from typing import Any, Callable

from cryptography.hazmat.bindings.openssl.binding import Binding
from mypy_extensions import mypyc_attr
from OpenSSL.SSL import Error, WantReadError, ZeroReturnError
from twisted.internet.abstract import FileDescriptor
from twisted.internet.protocol import connectionDone
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure

_held = getattr(Binding.lib, "BIO_get_mem_data", None)  # bytes a memory BIO holds (BIO_get_mem_data(bio, NULL))
_NULL = Binding.ffi.NULL

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


@mypyc_attr(allow_interpreted_subclasses=True)  # the TLS listener's protocol (mtlsgate.tls.server) extends it
class SendAtOnce(TLSMemoryBIOProtocol):
    """
    A C{TLSMemoryBIOProtocol} whose output goes out through a L{DirectWriter}: put it before
    C{TLSMemoryBIOProtocol} in a protocol's bases (or use L{SendAtOnceTLSProtocol}).
    """

    _direct: DirectWriter | None = None
    _bulk = False
    _eof = False  # the transport is gone: the receive loop makes every recv, as Twisted's does

    def makeConnection(self, transport: Any) -> None:
        self._direct = direct_writer(transport)
        super().makeConnection(transport)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._direct = None  # lets go of the transport and its socket's send
        # Twisted's connectionLost shuts the incoming BIO and reads it out: every recv is made there, as Twisted makes them
        # (an empty shut BIO is an unexpected EOF, a truncation the reason must carry, not a WantReadError to skip).
        self._eof = True
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
        if _held is not None:
            out = getattr(tls, "_from_ssl", None)
            if out is not None and not _held(out, _NULL):
                return  # nothing to send: what bio_read would say with a WantReadError
        try:
            data = tls.bio_read(BIO_READ)
        except WantReadError:  # nothing to send
            return
        if self._direct is not None and not self._bulk:
            self._direct(data)
        elif self.transport is not None:
            self.transport.write(data)

    def _flushReceiveBIO(self) -> None:
        """
        TLSMemoryBIOProtocol's loop (deliver what the bytes just received decrypt to, then flush what they made OpenSSL
        write), with one look before each further C{recv}: when the incoming BIO holds no byte and OpenSSL no decrypted
        one, the loop ends without the C{recv} that would raise C{WantReadError}.
        """
        held = _held
        into = getattr(self._tlsConnection, "_into_ssl", None) if held is not None and not self._eof else None
        first = True
        while not self._lostTLSConnection:
            tls = self._tlsConnection
            if not first and held is not None and into is not None and not held(into, _NULL) and not tls.pending():
                break
            first = False
            try:
                data = tls.recv(BIO_READ)
            except WantReadError:
                break
            except ZeroReturnError:
                self._shutdownTLS()  # the peer's close_notify: TLS is over, the transport's own reason follows
                self._tlsShutdownFinished(None)
            except Error:
                self._tlsShutdownFinished(Failure())  # a TLS error: the connection cannot go on
            else:
                if not self._aborted:
                    ProtocolWrapper.dataReceived(self, data)
        self._flushSendBIO()


class SendAtOnceTLSProtocol(SendAtOnce):
    """A plain C{TLSMemoryBIOProtocol} that sends at once (the upstream connections')."""
