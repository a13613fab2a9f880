"""
mtlsgate.http.linger in memory: the close of a connection the gateway ends itself lingers only once it is
written out, then the TCP connection under the TLS layer closes; and the HTTP/1.1 engine keeps one timer
per connection (the idle timer while it serves, the linger once it closes).  The real gateway and a client
that never answers are in tests/adversarial/test_close_notify_linger.py.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from OpenSSL import SSL
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from zope.interface import implementer

from mtlsgate.config.model import Limits
from mtlsgate.http.linger import _LONGEST_CHECK, LINGER, Linger, written_out
from mtlsgate.http.server import HTTPServerFactory


@implementer(ISSLTransport)
class _TLS(ProtocolWrapper):
    """The TLS layer as Linger sees it: a ProtocolWrapper over the TCP transport, its SSL connection's shutdown state, abortConnection."""

    def __init__(self, tcp: StringTransport) -> None:
        super().__init__(WrappingFactory(Factory()), Protocol())
        self.transport = tcp
        self.close_notify_sent = True
        self.aborted = False
        self.connected = True

    def getHandle(self) -> Any:
        return SimpleNamespace(get_shutdown=lambda: SSL.SENT_SHUTDOWN if self.close_notify_sent else 0)

    def abortConnection(self) -> None:
        self.aborted = True


def _connection() -> tuple[MemoryReactorClock, StringTransport, _TLS]:
    clock, tcp = MemoryReactorClock(), StringTransport()
    return clock, tcp, _TLS(tcp)


def test_written_out_it_lingers_then_closes_the_tcp_connection_and_aborts_only_if_that_does_not_end_it():
    clock, tcp, tls = _connection()
    assert written_out(clock, tls)
    Linger(clock, tls)
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(LINGER * 0.99)
    assert not tcp.disconnecting
    clock.advance(LINGER * 0.01)
    assert tcp.disconnecting and not tls.aborted  # the orderly close of the TCP connection under TLS
    clock.advance(LINGER)
    assert tls.aborted
    assert not clock.getDelayedCalls()


def test_nothing_is_cut_while_the_close_is_not_written_out():
    clock, tcp, tls = _connection()
    tls.close_notify_sent = False  # held back (a producer still registered, say)
    Linger(clock, tls)
    clock.pump([LINGER] * 10)
    assert not tcp.disconnecting and not tls.aborted
    tls.close_notify_sent = True
    clock.addWriter(tcp)  # Twisted still holds bytes for the client
    assert not written_out(clock, tls)
    clock.pump([LINGER] * 10)
    assert not tcp.disconnecting and not tls.aborted
    clock.removeWriter(tcp)  # all handed to the kernel: the linger starts at the next check, at most _LONGEST_CHECK away
    started = clock.getDelayedCalls()[0].getTime()
    clock.advance(started - clock.seconds())
    assert len(clock.getDelayedCalls()) == 1  # one timer all along
    assert clock.getDelayedCalls()[0].getTime() - started == LINGER
    clock.advance(LINGER * 0.99)
    assert not tcp.disconnecting
    clock.advance(LINGER * 0.01)
    assert tcp.disconnecting and not tls.aborted


def test_a_close_not_written_out_is_checked_less_and_less_often():
    clock, tcp, tls = _connection()
    clock.addWriter(tcp)
    Linger(clock, tls)
    checks = []
    for _ in range(8):
        checks.append(clock.getDelayedCalls()[0].getTime() - clock.seconds())
        clock.advance(checks[-1])
    assert checks == [LINGER, 2 * LINGER, 4 * LINGER, 8 * LINGER, _LONGEST_CHECK, _LONGEST_CHECK, _LONGEST_CHECK, _LONGEST_CHECK]
    assert not tcp.disconnecting and not tls.aborted


def test_a_close_never_written_out_is_aborted_at_the_given_time():
    clock, tcp, tls = _connection()
    clock.addWriter(tcp)  # the client reads nothing
    Linger(clock, tls, give_up_at=5.0)
    clock.advance(4.9)
    assert not tls.aborted
    clock.advance(0.1)
    assert tls.aborted and not tcp.disconnecting
    assert not clock.getDelayedCalls()


def test_cancel_when_the_connection_is_lost():
    clock, _, tls = _connection()
    linger = Linger(clock, tls)
    assert linger.active()
    linger.cancel()
    assert not linger.active() and not clock.getDelayedCalls()


def _server(clock: MemoryReactorClock) -> tuple[Any, StringTransport]:
    def handler(request: Any) -> None:
        request.setHeader(b"content-length", b"2")
        request.write(b"ok")
        request.finish()

    protocol = HTTPServerFactory(handler, Limits(), clock).buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def test_the_http11_engine_keeps_one_timer_on_keep_alive_and_one_once_it_closes():
    clock = MemoryReactorClock()
    protocol, transport = _server(clock)
    for _ in range(3):
        protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert len(clock.getDelayedCalls()) == 1  # the idle timer, nothing per request
    protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert transport.disconnecting
    calls = clock.getDelayedCalls()
    assert len(calls) == 1 and calls[0].getTime() == LINGER  # the linger, in place of the idle timer
    protocol.connectionLost(None)
    assert not clock.getDelayedCalls()


def test_the_http11_engine_lingers_after_a_refusal_too():
    clock = MemoryReactorClock()
    protocol, transport = _server(clock)
    protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 400 ") and transport.disconnecting
    assert [c.getTime() for c in clock.getDelayedCalls()] == [LINGER]
