"""
The route timeout and the stall timer on a kept-alive connection, after 873ec83 (ReusableTimer only notes a later time;
its one call re-arms itself when it runs).  An attacker (or a slow upstream) must not get more time than the route's
timeout by riding a connection whose timer was armed long ago by other requests: after many quick requests, a request
the upstream never answers gets its 504 at its own start + timeout (not sooner, not later); a shorter-timeout route
after a longer one gets its own shorter time; a body that stalls is cut off a timeout after its last bytes.  In memory
(MemoryReactorClock), through the server protocol, exchange and HTTP11Agent.
"""

from __future__ import annotations

import pytest

from mtlsgate.config.model import Route
from tests.adversarial.test_whole_response_desync import Gateway, parse_responses

H = b"Host: localhost\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
SLOW = Route(host="*", prefix="/slow", to=("https://127.0.0.1:9443",), timeout=30.0)
FAST = Route(host="*", prefix="/fast", to=("https://127.0.0.1:9444",), timeout=2.0)
ANY = Route(host="*", prefix="/", to=("https://127.0.0.1:9445",), timeout=10.0)


def answered(gw: Gateway, path: bytes, wait: float = 0.0) -> None:
    gw.transport.clear()
    gw.channel.dataReceived(b"GET " + path + b" HTTP/1.1\r\n" + H + b"\r\n")
    gw.reactor.advance(wait)
    upstream, _ = gw.endpoint.connections[-1]
    upstream.dataReceived(OK)
    assert [r[0] for r in parse_responses(gw.transport.value(), [b"GET"])[0]] == [200]


def times_out_at(gw: Gateway, path: bytes, timeout: float) -> None:
    """A request the upstream never answers: no answer until its start + timeout, then a 504 (no later than 1 ms after)."""
    gw.transport.clear()
    gw.channel.dataReceived(b"GET " + path + b" HTTP/1.1\r\n" + H + b"\r\n")
    gw.reactor.advance(timeout - 0.001)
    assert gw.transport.value() == b"", "answered before the route timeout"
    gw.reactor.advance(0.002)
    assert [r[0] for r in parse_responses(gw.transport.value(), [b"GET"])[0]] == [504], gw.transport.value()


@pytest.mark.parametrize("gap", [0.0, 0.3, 1.0, 9.9, 10.0, 10.1, 25.0])
def test_after_many_quick_requests_a_silent_upstream_gets_its_504_at_the_requests_own_start_plus_timeout(gap):
    gw = Gateway([ANY])
    for _ in range(60):  # each answered within the timeout, idle gaps between them
        answered(gw, b"/a", wait=min(gap, 9.5))
        gw.reactor.advance(gap)
    times_out_at(gw, b"/silent", 10.0)


@pytest.mark.parametrize("spent", [0.0, 1.0, 5.0, 29.0])
def test_a_shorter_timeout_route_after_a_longer_one_on_the_same_connection_gets_its_own_time(spent):
    gw = Gateway([SLOW, FAST])
    answered(gw, b"/slow/a", wait=spent)
    answered(gw, b"/slow/b")
    times_out_at(gw, b"/fast/x", 2.0)


def test_a_longer_timeout_route_after_a_shorter_one_is_not_cut_at_the_shorter_time():
    gw = Gateway([SLOW, FAST])
    answered(gw, b"/fast/a", wait=1.5)
    times_out_at(gw, b"/slow/x", 30.0)


@pytest.mark.parametrize("before", [0, 1, 40])
def test_a_body_that_stalls_mid_way_is_cut_off_a_timeout_after_its_last_bytes(before):
    gw = Gateway([ANY])
    for _ in range(before):
        answered(gw, b"/a", wait=0.2)
    gw.transport.clear()
    gw.channel.dataReceived(b"GET /stall HTTP/1.1\r\n" + H + b"\r\n")
    upstream, _ = gw.endpoint.connections[-1]
    gw.reactor.advance(9.0)  # 9 s into the 10 s route timeout: the head comes
    upstream.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234")
    for _ in range(3):  # bytes every 9 s keep it going
        gw.reactor.advance(9.0)
        assert not gw.transport.disconnecting
        upstream.dataReceived(b"5")
    gw.reactor.advance(10.0 - 0.001)
    assert not gw.transport.disconnecting, "cut off before the stall timeout"
    gw.reactor.advance(0.002)
    assert gw.transport.disconnecting, "not cut off at the stall timeout"
    assert gw.transport.value().endswith(b"01234555")
