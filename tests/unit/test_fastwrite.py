"""
Sending at once (mtlsgate/tls/fastwrite.py): TLS output goes to the socket in the call that made it
when the TCP transport holds nothing unsent; what the kernel does not take takes Twisted's buffered
path, with its back-pressure, its close after pending data and its error handling.

Real TCP sockets on loopback under Twisted's real TCP transport (C{tcp.Server}), driven by hand: a
C{MemoryReactorClock} records which descriptors are registered for writing, and the test calls C{doWrite}
where the reactor would.  The first tests pin the Twisted internals the fast path reads, so that an
upgrade of Twisted that changes one fails here by name (the module falls back to the buffered path
at run time when an attribute is missing, which the last tests check).
"""

from __future__ import annotations

import inspect
import select
import socket
from typing import Any

import pytest
from twisted.internet import tcp
from twisted.internet.abstract import FileDescriptor
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IPushProducer, IPullProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions, optionsForClientTLS, Certificate as TxCertificate, PrivateCertificate
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from zope.interface import implementer

from mtlsgate.tls import fastwrite
from mtlsgate.tls.fastwrite import DirectWriter, SendAtOnce, SendAtOnceTLSProtocol, direct_writer

BIG = 8 * 1024 * 1024  # more than loopback TCP takes with the small buffers below: a partial send


def tcp_pair(small: bool = False) -> tuple[socket.socket, socket.socket]:
    """A connected TCP pair on 127.0.0.1 (ours, the peer's); C{small}: small buffers, so a big write is partial."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    ours = socket.socket()
    if small:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    ours.connect(listener.getsockname())
    peer, _ = listener.accept()
    listener.close()
    if small:
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    peer.setblocking(False)
    return ours, peer


class Recorder(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.lost: Any = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = reason


def transport(sock: socket.socket, reactor: MemoryReactorClock, protocol: Any = None) -> tcp.Server:
    """Twisted's real TCP transport over C{sock}, as a listening port makes it."""
    protocol = protocol or Recorder()
    t = tcp.Server(sock, protocol, ("127.0.0.1", 1), None, 0, reactor)  # type: ignore[arg-type]
    t.repstr = "<test transport>"  # set from the listening port, which there is none of
    protocol.makeConnection(t)
    return t


def read_all(peer: socket.socket, t: FileDescriptor, reactor: MemoryReactorClock, until: int, timeout: float = 30) -> bytes:
    """Read the peer until C{until} bytes came, calling the transport's C{doWrite} whenever the reactor would."""
    got = bytearray()
    while len(got) < until:
        if t in reactor.writers:
            result = t.doWrite()
            assert result is None, result
        ready, _, _ = select.select([peer], [], [], timeout)
        assert ready, f"no byte for {timeout}s after {len(got)} of {until}"
        got += peer.recv(1 << 20)
    return bytes(got)


def writer_for(sock: socket.socket, reactor: MemoryReactorClock) -> tuple[tcp.Server, DirectWriter]:
    t = transport(sock, reactor)
    w = direct_writer(t)
    assert w is not None
    return t, w


# --- the Twisted internals the fast path reads ---------------------------------------------------------------------


def test_a_tcp_transport_has_the_state_the_fast_path_reads():
    ours, peer = tcp_pair()
    t = transport(ours, MemoryReactorClock())
    missing = [name for name in fastwrite.TRANSPORT_STATE if not hasattr(t, name)]
    assert not missing, f"twisted.internet.tcp.Connection no longer has {missing}: review mtlsgate/tls/fastwrite.py"
    assert t.getHandle() is ours
    peer.close()


def test_the_buffered_path_keeps_the_invariants_the_fast_path_relies_on():
    """Empty is C{offset == len(dataBuffer)} with C{_tempDataLen == 0}; writes queue in C{_tempDataLen}; close and half-close set their flags."""
    reactor = MemoryReactorClock()
    ours, peer = tcp_pair(small=True)
    t = transport(ours, reactor)
    assert (t.dataBuffer, t.offset, t._tempDataLen) == (b"", 0, 0)
    t.write(b"x" * BIG)
    assert t._tempDataLen == BIG and t in reactor.writers
    assert t.doWrite() is None  # a partial send: the rest stays in dataBuffer, past offset
    assert 0 < t.offset < len(t.dataBuffer) and t._tempDataLen == 0
    read_all(peer, t, reactor, BIG)
    assert (t.dataBuffer, t.offset, t._tempDataLen) == (b"", 0, 0) and t not in reactor.writers
    t.loseWriteConnection()
    assert t._writeDisconnecting
    assert t.doWrite() is None and t._writeDisconnected
    ours2, peer2 = tcp_pair()
    t2 = transport(ours2, reactor)
    t2.abortConnection()
    assert t2._aborting
    ours3, peer3 = tcp_pair()
    t3 = transport(ours3, reactor)
    t3.loseConnection()
    assert t3.disconnecting
    for s in (peer, peer2, peer3):
        s.close()


def test_tls_memory_bio_protocol_flushes_through_the_hook_the_fast_path_overrides():
    """Every place TLSMemoryBIOProtocol hands OpenSSL's output to the transport goes through C{_flushSendBIO}."""
    source = inspect.getsource(TLSMemoryBIOProtocol)
    assert callable(getattr(TLSMemoryBIOProtocol, "_flushSendBIO", None)), "TLSMemoryBIOProtocol._flushSendBIO is gone"
    assert source.count("self.transport.write(") == 1, "TLSMemoryBIOProtocol writes to its transport outside _flushSendBIO"
    assert "self.transport.write(" in inspect.getsource(TLSMemoryBIOProtocol._flushSendBIO)
    assert "self.transport.writeSequence(" not in source
    for caller in ("_write", "_checkHandshakeStatus", "_shutdownTLS", "_tlsShutdownFinished", "_flushReceiveBIO"):
        assert "self._flushSendBIO()" in inspect.getsource(getattr(TLSMemoryBIOProtocol, caller)), caller
    assert "self._tlsConnection = " in inspect.getsource(TLSMemoryBIOProtocol.makeConnection)
    assert list(inspect.signature(TLSMemoryBIOProtocol.write).parameters) == ["self", "bytes"]


# --- the direct writer on a real socket ----------------------------------------------------------------------------


def test_bytes_go_out_at_once_when_nothing_is_queued():
    reactor = MemoryReactorClock()
    ours, peer = tcp_pair()
    t, write = writer_for(ours, reactor)
    write(b"request head")
    write(b" and more")
    assert t not in reactor.writers, "the socket was registered for writing: the bytes were buffered"
    assert (t.dataBuffer, t._tempDataLen) == (b"", 0)
    select.select([peer], [], [], 30)
    assert peer.recv(100) == b"request head and more"
    peer.close()


def test_a_partial_send_queues_the_rest_and_later_writes_behind_it_in_order():
    reactor = MemoryReactorClock()
    ours, peer = tcp_pair(small=True)
    t, write = writer_for(ours, reactor)
    first = bytes(range(256)) * (BIG // 256)
    write(first)
    queued = t._tempDataLen
    assert 0 < queued < BIG, "the kernel took part of it, the rest is queued"
    assert t in reactor.writers
    write(b"second")  # something is queued: this one must not overtake it
    write(b"third")
    assert t._tempDataLen == queued + len(b"secondthird")
    got = read_all(peer, t, reactor, BIG + len(b"secondthird"))
    assert got == first + b"secondthird"
    assert t not in reactor.writers
    write(b"fourth")  # drained: at once again
    assert t not in reactor.writers
    assert read_all(peer, t, reactor, 6) == b"fourth"
    peer.close()


@implementer(IPushProducer)
class PushProducer:
    def __init__(self) -> None:
        self.events: list[str] = []

    def pauseProducing(self) -> None:
        self.events.append("pause")

    def resumeProducing(self) -> None:
        self.events.append("resume")

    def stopProducing(self) -> None:
        self.events.append("stop")


def test_back_pressure_pauses_and_resumes_a_streaming_producer_as_before():
    reactor = MemoryReactorClock()
    ours, peer = tcp_pair(small=True)
    t, write = writer_for(ours, reactor)
    producer = PushProducer()
    t.registerProducer(producer, True)
    write(b"small")  # taken whole: no reason to pause
    assert producer.events == []
    assert read_all(peer, t, reactor, 5) == b"small"
    write(b"y" * BIG)  # more than the kernel takes, and the rest above the transport's bufferSize
    assert producer.events == ["pause"] and t.producerPaused
    queued = len(t.dataBuffer) - t.offset + t._tempDataLen
    write(b"z")  # paused: queued behind, never sent at once (Twisted's write pauses the producer again, as it always did)
    assert len(t.dataBuffer) - t.offset + t._tempDataLen == queued + 1 and producer.events == ["pause", "pause"]
    assert read_all(peer, t, reactor, BIG + 1)[-2:] == b"yz"
    assert producer.events == ["pause", "pause", "resume"] and not t.producerPaused
    peer.close()


@implementer(IPullProducer)
class PullProducer:
    def __init__(self) -> None:
        self.asked = 0

    def resumeProducing(self) -> None:
        self.asked += 1

    def stopProducing(self) -> None:
        pass


def test_with_a_pull_producer_writes_take_the_buffered_path_that_asks_it_for_more():
    reactor = MemoryReactorClock()
    ours, peer = tcp_pair()
    t, write = writer_for(ours, reactor)
    producer = PullProducer()
    t.registerProducer(producer, False)
    asked = producer.asked
    write(b"chunk")
    assert t in reactor.writers, "a pull producer's write must go through doWrite"
    assert read_all(peer, t, reactor, 5) == b"chunk"
    assert producer.asked == asked + 1
    peer.close()


def test_the_connection_closes_only_after_the_pending_bytes_and_later_writes_are_not_sent_at_once():
    reactor = MemoryReactorClock()
    ours, peer = tcp_pair(small=True)
    t, write = writer_for(ours, reactor)
    write(b"a" * BIG)
    t.loseConnection()
    assert t.disconnecting and t.connected
    got = bytearray()
    while True:
        result = t.doWrite()
        if result is not None:
            break
        ready, _, _ = select.select([peer], [], [], 30)
        assert ready
        got += peer.recv(1 << 20)
    assert isinstance(result, ConnectionDone)  # the reactor then closes it: only after the last byte was sent
    while len(got) < BIG:
        select.select([peer], [], [], 30)
        got += peer.recv(1 << 20)
    assert bytes(got) == b"a" * BIG

    ours2, peer2 = tcp_pair()
    t2, write2 = writer_for(ours2, reactor)
    t2.loseConnection()
    write2(b"after close")  # buffered (Twisted's own write decides), not sent behind the close's back
    assert t2._tempDataLen == len(b"after close")
    peer.close()
    peer2.close()


def test_a_peer_that_reset_is_reported_by_the_buffered_path_as_before():
    reactor = MemoryReactorClock()
    ours, peer = tcp_pair()
    t, write = writer_for(ours, reactor)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # close with RST
    peer.close()
    failures = 0
    for _ in range(10):  # the RST may need a moment to arrive; once it has, send fails (ECONNRESET/EPIPE)
        write(b"data")
        if t in reactor.writers:
            result = t.doWrite()
            if isinstance(result, ConnectionLost):
                failures += 1
                break
        select.select([ours], [], [], 0.2)
    assert failures == 1, "the error should surface from doWrite, as it did before the fast path"


def test_nothing_is_sent_at_once_after_an_abort_or_a_half_close():
    reactor = MemoryReactorClock()
    for shut in ("abortConnection", "loseWriteConnection"):
        ours, peer = tcp_pair()
        t, write = writer_for(ours, reactor)
        getattr(t, shut)()
        write(b"late")
        assert t._tempDataLen in (0, 4)  # Twisted's own write: queued (abort) or dropped
        ready, _, _ = select.select([peer], [], [], 0.2)
        assert not ready or peer.recv(10) == b"", f"bytes written at once after {shut}"
        peer.close()


# --- the fallback ---------------------------------------------------------------------------------------------------


def test_other_transports_get_the_normal_path():
    assert direct_writer(StringTransport()) is None
    assert direct_writer(object()) is None


def test_a_transport_missing_an_attribute_gets_the_normal_path(monkeypatch):
    reactor = MemoryReactorClock()
    ours, peer = tcp_pair()
    t = transport(ours, reactor)
    del t._tempDataLen  # as if Twisted renamed it
    assert direct_writer(t) is None
    peer.close()


# --- TLS on top ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server_options() -> tuple[CertificateOptions, TxCertificate]:
    from cryptography.hazmat.primitives import serialization

    from mtlsgate.tls.pki import self_signed

    key, cert = self_signed("localhost", ["localhost"])
    pem = cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    server = PrivateCertificate.loadPEM(pem)
    return server.options(), TxCertificate.loadPEM(cert.public_bytes(serialization.Encoding.PEM))


class CountingSend:
    def __init__(self, send: Any) -> None:
        self.send = send
        self.calls: list[int] = []

    def __call__(self, data: bytes) -> int:
        self.calls.append(len(data))
        return self.send(data)


def tls_pair(server_options: Any, client_class: type = TLSMemoryBIOProtocol) -> Any:
    """A SendAtOnce TLS server and a client over a real TCP pair, handshaken by hand."""
    options, ca = server_options
    reactor = MemoryReactorClock()
    a, b = tcp_pair()
    b.setblocking(True)
    server_app, client_app = Recorder(), Recorder()
    server_factory = TLSMemoryBIOFactory(options, False, Factory.forProtocol(lambda: server_app))
    server_factory.protocol = SendAtOnceTLSProtocol
    client_factory = TLSMemoryBIOFactory(optionsForClientTLS("localhost", ca), True, Factory.forProtocol(lambda: client_app))
    client_factory.protocol = client_class
    server_tls = server_factory.buildProtocol(None)
    client_tls = client_factory.buildProtocol(None)
    server_t = tcp.Server(a, server_tls, ("127.0.0.1", 1), None, 0, reactor)  # type: ignore[arg-type]
    client_t = tcp.Server(b, client_tls, ("127.0.0.1", 2), None, 1, reactor)  # type: ignore[arg-type]
    server_tls.makeConnection(server_t)
    client_tls.makeConnection(client_t)

    def pump(rounds: int = 200) -> None:
        """Call doWrite and doRead where the reactor would, and connectionLost when they say so."""
        for _ in range(rounds):
            moved = False
            for t in (server_t, client_t):
                if not t.connected:
                    continue
                result = t.doWrite() if t in reactor.writers else None
                if result is None and t in reactor.readers and select.select([t.getHandle()], [], [], 0)[0]:
                    result = t.doRead()
                    moved = True
                if result is not None:
                    t.connectionLost(Failure(result))
                    moved = True
            if not moved:
                return

    for _ in range(50):
        pump()
        if server_tls._handshakeDone and client_tls._handshakeDone:
            break
        select.select([a, b], [], [], 0.1)
    assert server_tls._handshakeDone and client_tls._handshakeDone
    return reactor, server_tls, client_tls, server_t, client_t, server_app, client_app, pump


def test_tls_output_is_sent_at_once_and_bulk_data_takes_the_buffered_path(server_options):
    reactor, server_tls, client_tls, server_t, client_t, server_app, client_app, pump = tls_pair(server_options)
    assert isinstance(server_tls._direct, DirectWriter)
    counting = CountingSend(server_tls._direct._send)
    server_tls._direct._send = counting
    server_app.transport.writeSequence([b"HTTP/1.1 200 OK\r\n\r\n", b"hello"])
    assert server_t not in reactor.writers and len(counting.calls) == 1, "a small write should have been sent at once"
    body = bytes(range(256)) * 256  # 64 KiB: four full TLS records, bulk data
    server_app.transport.write(body)
    assert len(counting.calls) == 1 and server_t in reactor.writers, "bulk data should have been buffered (one send a turn)"
    server_app.transport.write(b"tail")  # small, but behind buffered bytes: queued, never ahead of them
    assert len(counting.calls) == 1
    body += b"tail"
    for _ in range(100):
        pump()
        if len(client_app.received) >= 24 + len(body):
            break
        select.select([client_t.getHandle()], [], [], 0.1)
    assert client_app.received == b"HTTP/1.1 200 OK\r\n\r\nhello" + body
    server_app.transport.loseConnection()  # close_notify, sent at once, then the TCP close after it
    for _ in range(100):
        pump()
        if client_app.lost is not None and server_app.lost is not None:
            break
        select.select([client_t.getHandle()], [], [], 0.1)
    assert client_app.lost is not None and client_app.lost.check(ConnectionDone), client_app.lost
    assert server_app.lost is not None
    assert server_tls._direct is None, "the protocol should let go of the transport's socket once the connection is lost"


def test_tls_over_a_transport_without_the_fast_path_works_as_before():
    """SendAtOnce over a StringTransport (no socket): the ClientHello goes to transport.write."""
    factory = TLSMemoryBIOFactory(optionsForClientTLS("localhost"), True, Factory.forProtocol(Protocol))
    factory.protocol = SendAtOnceTLSProtocol
    protocol = factory.buildProtocol(None)
    out = StringTransport()
    protocol.makeConnection(out)
    assert protocol._direct is None
    assert out.value()[:1] == b"\x16"  # a TLS handshake record


def test_the_listener_and_upstream_protocols_send_at_once():
    from mtlsgate.proxy.upstream import _DirectTLSFactory
    from mtlsgate.tls.server import GatewayTLSFactory

    assert issubclass(GatewayTLSFactory.protocol, SendAtOnce)
    assert issubclass(_DirectTLSFactory.protocol, SendAtOnce)
