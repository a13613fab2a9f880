"""
TCP routes in memory: the config form, the PROXY v2 header (parsed by the tests' own parser), the
admission rule, and a tunnel on StringTransports with a MemoryReactorClock (refusal opens no
connection, pending bytes and the header go first, idle and connect timeouts, failover, the
connection limit, drain, the SNI dispatch).
"""

from __future__ import annotations

import ipaddress

import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport

from mtlsgate.config.load import config_from_mapping
from mtlsgate.config.model import ConfigError, TCPRoute
from mtlsgate.identity import AllowRules, Identity
from mtlsgate.observe.metrics import GatewayMetrics
from mtlsgate.proxy.exchange import Peer
from mtlsgate.proxy.proxyproto import HeaderTooLong, TLSFacts, proxy_v2_header
from mtlsgate.proxy.tcp import SNIDispatchFactory, TCPProxy, Tunnel, normal_server_name, refusal, tcp_state
from tests.tcp_peers import parse_proxy_v2

# --- configuration -----------------------------------------------------------------------------------------


def _config(pki, *routes, **top):
    return config_from_mapping({"certificates": [{"cert": pki["gateway"][0], "key": pki["gateway"][1]}], "routes": list(routes), **top})


def test_a_tcp_route_in_pomeriums_form(pki):
    config = _config(pki, {
        "from": "tcp+https://DB.Example.com:5432", "to": ["tcp://10.0.0.5:5432", "tls://[::1]:5433"], "tls_custom_ca_file": pki["ca"],
        "idle_timeout": "1h", "max_connections": 5, "proxy_protocol": "v2", "alpn": ["postgresql"],
    })  # fmt: skip
    (route,) = config.tcp_routes
    assert config.routes == ()
    assert (route.host, route.port, route.name) == ("db.example.com", 5432, "db.example.com:5432")
    assert route.to == ("tcp://10.0.0.5:5432", "tls://[::1]:5433")
    assert (route.idle_timeout, route.connect_timeout, route.max_connections, route.proxy_protocol, route.alpn) == (3600, 10, 5, "v2", ("postgresql",))
    assert TCPRoute(host="x.test").name == "x.test" and TCPRoute(host="x.test").idle_timeout == 600


@pytest.mark.parametrize("route, key, problem", [
    ({"from": "tcp+https://*.example.com", "to": "tcp://h:1"}, "routes[0].from", "wildcards"),
    ({"from": "tcp+https://10.0.0.1:5432", "to": "tcp://h:1"}, "routes[0].from", "IP addresses"),
    ({"from": "tcp+https://db.example.com/path", "to": "tcp://h:1"}, "routes[0].from", "expected tcp+https://HOST"),
    ({"from": "tcp+https://db.example.com", "to": "https://h:1"}, "routes[0].to[0]", "tcp://HOST:PORT or tls://HOST:PORT"),
    ({"from": "tcp+https://db.example.com", "to": "tcp://h"}, "routes[0].to[0]", "tcp://HOST:PORT"),
    ({"from": "tcp+https://db.example.com", "to": "tcp://h:1", "tls_server_name": "x"}, "routes[0].tls_server_name", "applies to tls:// upstreams"),
    ({"from": "tcp+https://db.example.com", "to": "tcp://h:1", "prefix": "/"}, "routes[0].prefix", "unknown key"),
    ({"from": "tcp+https://db.example.com", "to": "tcp://h:1", "proxy_protocol": "v1"}, "routes[0].proxy_protocol", "expected one of"),
    ({"from": "tcp+https://db.example.com", "to": "tcp://h:1", "max_connections": 0}, "routes[0].max_connections", "positive"),
])  # fmt: skip
def test_bad_tcp_routes_name_the_key(pki, route, key, problem):
    with pytest.raises(ConfigError) as e:
        _config(pki, route)
    assert e.value.key == key and problem in e.value.problem


def test_a_name_is_one_tcp_route_or_http_never_both(pki):
    with pytest.raises(ConfigError, match="two TCP routes cannot share a name") as e:
        _config(pki, {"from": "tcp+https://db.test:1", "to": "tcp://h:1"}, {"from": "tcp+https://DB.test:2", "to": "tcp://h:2"})
    assert e.value.key == "routes[1].from"
    with pytest.raises(ConfigError, match="also the HTTP route routes\\[0\\]") as e:
        _config(pki, {"from": "https://db.test", "to": "https://h"}, {"from": "tcp+https://db.test", "to": "tcp://h:1"})
    assert e.value.key == "routes[1].from"
    config = _config(pki, {"from": "https://*.test", "to": "https://h"}, {"from": "tcp+https://db.test", "to": "tcp://h:1"})
    assert len(config.routes) == len(config.tcp_routes) == 1  # an HTTP wildcard may cover it: the exact TCP name wins by SNI


@pytest.mark.parametrize("raw, name", [
    (b"DB.Test", "db.test"), (b"db.test.", "db.test"), ("db.test", "db.test"), (None, None), (b"\xff.test", None), (b".", None),
])  # fmt: skip
def test_server_names_are_compared_in_the_certificate_lookups_form(raw, name):
    assert normal_server_name(raw) == name


# --- PROXY protocol v2 -------------------------------------------------------------------------------------


def test_the_proxy_v2_header_carries_addresses_and_identity_tlvs():
    facts = TLSFacts(version="TLSv1.3", cipher="TLS_AES_128_GCM_SHA256", server_name="pp.test", alpn=b"postgresql", certificate_in_connection=True,
                     certificate_in_session=True, verified=True, common_name="älice", spiffe_id="spiffe://t/a", xfcc='Hash=ab;Subject="CN=a"')
    header, rest = parse_proxy_v2(proxy_v2_header(IPv4Address("TCP", "10.1.2.3", 40000), IPv4Address("TCP", "10.9.9.9", 443), facts) + b"data")
    assert rest == b"data"
    assert (header["command"], header["family"], header["src"], header["dst"]) == (1, 0x11, ("10.1.2.3", 40000), ("10.9.9.9", 443))
    assert header["tlvs"][0x01] == b"postgresql" and header["tlvs"][0x02] == b"pp.test"
    assert header["tlvs"][0xE0] == b"spiffe://t/a" and header["tlvs"][0xE1] == b'Hash=ab;Subject="CN=a"'
    assert header["ssl"]["client"] == 0x07 and header["ssl"]["verify"] == 0
    assert header["ssl"][0x21] == b"TLSv1.3" and header["ssl"][0x22] == "älice".encode() and header["ssl"][0x23] == b"TLS_AES_128_GCM_SHA256"


def test_a_resumed_or_anonymous_client_is_described_as_such():
    resumed, _ = parse_proxy_v2(proxy_v2_header(IPv6Address("TCP", "::1", 1), IPv6Address("TCP", "::1", 2),
                                                TLSFacts(certificate_in_session=True, verified=True, common_name="a")))
    assert resumed["family"] == 0x21 and resumed["src"] == ("::1", 1) and resumed["ssl"]["client"] == 0x05
    anonymous, _ = parse_proxy_v2(proxy_v2_header(IPv4Address("TCP", "127.0.0.1", 1), IPv4Address("TCP", "127.0.0.1", 2), TLSFacts()))
    assert anonymous["ssl"] == {"client": 0x01, "verify": 1} and set(anonymous["tlvs"]) == {0x20}
    mixed, _ = parse_proxy_v2(proxy_v2_header(IPv4Address("TCP", "127.0.0.1", 1), IPv6Address("TCP", "::1", 2), TLSFacts()))
    assert mixed["family"] == 0x21 and ipaddress.ip_address(mixed["src"][0]).ipv4_mapped == ipaddress.ip_address("127.0.0.1")


def test_an_identity_too_large_for_the_header_is_refused_not_cut():
    with pytest.raises(HeaderTooLong):
        proxy_v2_header(IPv4Address("TCP", "127.0.0.1", 1), IPv4Address("TCP", "127.0.0.1", 2), TLSFacts(xfcc="x" * 70000))


# --- admission ---------------------------------------------------------------------------------------------


def test_admission_is_http_routes_rule(pki):
    alice = Identity.from_certificate(pki["alice_obj"].certificate)
    state = tcp_state([], AllowRules(), require_client_certificate=False)
    bob_only = TCPRoute(host="x.test", allow_client=AllowRules(uri=["spiffe://test/ns/prod/sa/bob"]))
    assert refusal(Peer.verified(alice), state, TCPRoute(host="x.test")) is None
    assert "not allowed here" in (refusal(Peer.verified(alice), state, bob_only) or "")
    assert refusal(Peer(identity=None, refusal="expired"), state, TCPRoute(host="x.test")) == "expired"
    assert refusal(Peer(identity=None, refusal=None), state, TCPRoute(host="x.test")) is None
    assert refusal(Peer(identity=None, refusal=None), state, bob_only) == "missing (none presented)"
    required = tcp_state([], AllowRules(), require_client_certificate=True)
    assert refusal(Peer(identity=None, refusal=None), required, TCPRoute(host="x.test")) == "missing (none presented)"
    global_rules = tcp_state([], AllowRules(cn=["bob"]), require_client_certificate=True)
    assert "not allowed here" in (refusal(Peer.verified(alice), global_rules, TCPRoute(host="x.test")) or "")


# --- a tunnel in memory ------------------------------------------------------------------------------------


class _Connection:
    """What the tunnel reads of the client's TLS connection (not a GatewayConnection: a certificate on it is never trusted)."""

    def __init__(self, name: bytes | None = b"echo.test", certificate=None) -> None:
        self.name = name
        self.certificate = certificate

    def get_servername(self):
        return self.name

    def get_peer_certificate(self, as_cryptography=False):
        return self.certificate

    def get_alpn_proto_negotiated(self):
        return b""

    def get_protocol_version_name(self):
        return "TLSv1.3"

    def get_cipher_name(self):
        return "TLS_AES_128_GCM_SHA256"


class _TLS(StringTransport):
    def __init__(self, connection: _Connection) -> None:
        super().__init__(hostAddress=IPv4Address("TCP", "10.0.0.2", 443), peerAddress=IPv4Address("TCP", "10.0.0.1", 50000))
        self.connection = connection
        self.wrappedProtocol = None
        self.aborted = False

    def getHandle(self):
        return self.connection

    def abortConnection(self):
        self.aborted = True
        self.loseConnection()


def _proxy(reactor, **route):
    routes = [TCPRoute(host="echo.test", to=route.pop("to", ("tcp://127.0.0.1:7000",)), **route)]
    return TCPProxy(reactor, tcp_state(routes, AllowRules(), require_client_certificate=False), GatewayMetrics())


def _tunnel(proxy, connection=None):
    tls = _TLS(connection or _Connection())
    tunnel = Tunnel(proxy, proxy.route_for(b"echo.test"))
    tunnel.makeConnection(tls)
    return tunnel, tls


def _accept(reactor, index=0):
    """Complete the upstream connection the tunnel asked the reactor for; its transport."""
    factory = reactor.tcpClients[index][2]
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def _ends(proxy):
    return {labels["end"]: value for (name, labels, value) in _samples(proxy, "mtlsgate_tcp_connections_total")}


def _samples(proxy, wanted):
    return [(s.name, s.labels, s.value) for family in proxy.metrics.registry.collect() for s in family.samples if s.name == wanted]


def test_a_refused_client_opens_no_upstream_connection_and_its_bytes_go_nowhere(pki):
    reactor = MemoryReactorClock()
    proxy = _proxy(reactor)
    tunnel, tls = _tunnel(proxy, _Connection(certificate=pki["alice_obj"].certificate))  # no full handshake verified it here
    tunnel.dataReceived(b"*1\r\n$4\r\nPING\r\n")
    assert tls.disconnecting and not tls.aborted
    reactor.advance(60)
    assert reactor.tcpClients == [] and tls.aborted  # a client that never answers the close is cut off
    tunnel.connectionLost()
    assert _ends(proxy) == {"refused": 1} and not proxy.tunnels


@pytest.mark.parametrize("limit", [None, 0])
def test_a_refused_client_is_closed_down_to_tcp_at_once_not_left_to_the_abort(pki, limit):
    """close_notify (the TLS layer's loseConnection), and the TCP connection under it closed too, not held for the client's answer."""
    reactor = MemoryReactorClock()
    proxy = _proxy(reactor, max_connections=limit) if limit is not None else _proxy(reactor)
    tls = _TLS(_Connection(certificate=None if limit is not None else pki["alice_obj"].certificate))
    tls.transport = tcp = StringTransport()
    tunnel = Tunnel(proxy, proxy.route_for(b"echo.test"))
    tunnel.makeConnection(tls)
    assert tls.disconnecting and tcp.disconnecting and not tls.aborted and reactor.tcpClients == []
    tunnel.connectionLost()
    assert _ends(proxy) == {"over_limit" if limit is not None else "refused": 1} and not reactor.getDelayedCalls()


def test_bytes_before_the_upstream_is_there_go_first_after_the_proxy_header():
    reactor = MemoryReactorClock()
    proxy = _proxy(reactor, proxy_protocol="v2")
    tunnel, tls = _tunnel(proxy)
    assert tls.producerState == "paused"  # nothing more is read from the client until the upstream is there
    tunnel.dataReceived(b"early")
    assert [c[:2] for c in reactor.tcpClients] == [("127.0.0.1", 7000)]
    protocol, upstream = _accept(reactor)
    header, rest = parse_proxy_v2(upstream.value())
    assert rest == b"early" and header["src"] == ("10.0.0.1", 50000) and header["tlvs"][0x02] == b"echo.test"
    assert tls.producerState == "producing" and tls.producer is not None and upstream.producer is not None
    tunnel.dataReceived(b"more")
    protocol.dataReceived(b"reply")
    assert upstream.value().endswith(b"earlymore") and tls.value() == b"reply"
    protocol.connectionLost(connectionDone)
    assert tls.disconnecting
    tunnel.connectionLost()
    assert _ends(proxy) == {"upstream_closed": 1}
    assert {s[1]["direction"]: s[2] for s in _samples(proxy, "mtlsgate_tcp_bytes_total")} == {"up": 9, "down": 5}


def test_an_idle_tunnel_is_closed_and_activity_keeps_it_open():
    reactor = MemoryReactorClock()
    proxy = _proxy(reactor, idle_timeout=10)
    tunnel, tls = _tunnel(proxy)
    protocol, upstream = _accept(reactor)
    reactor.advance(6)
    protocol.dataReceived(b"x")
    reactor.advance(6)
    assert not tls.disconnecting
    reactor.advance(5)
    assert tls.disconnecting and upstream.disconnecting
    tunnel.connectionLost()
    assert _ends(proxy) == {"idle_timeout": 1}


def test_connect_timeout_fails_over_then_closes_the_client():
    reactor = MemoryReactorClock()
    proxy = _proxy(reactor, to=("tcp://127.0.0.1:7000", "tcp://127.0.0.1:7001"), connect_timeout=5)
    tunnel, tls = _tunnel(proxy)
    reactor.advance(5.1)
    assert [c[1] for c in reactor.tcpClients] == [7000, 7001] and not tls.disconnecting
    reactor.advance(5.1)
    assert tls.disconnecting and tls.producerState == "producing"  # reading resumed, so the client's FIN is seen
    tunnel.connectionLost()
    assert _ends(proxy) == {"connect_failed": 1}


def test_the_routes_connection_limit():
    reactor = MemoryReactorClock()
    proxy = _proxy(reactor, max_connections=1)
    first, _ = _tunnel(proxy)
    second, tls = _tunnel(proxy)
    assert len(reactor.tcpClients) == 1 and tls.disconnecting
    second.connectionLost()
    first.connectionLost()
    third, tls = _tunnel(proxy)
    assert len(reactor.tcpClients) == 2 and not tls.disconnecting


def test_drain_waits_then_closes_what_is_left():
    reactor = MemoryReactorClock()
    proxy = _proxy(reactor)
    tunnel, tls = _tunnel(proxy)
    _accept(reactor)
    done = proxy.drained(30)
    reactor.advance(29)
    assert not done.called and not tls.disconnecting
    reactor.advance(2)
    assert done.called and tls.disconnecting
    tunnel.connectionLost()
    assert _ends(proxy) == {"shutdown": 1}
    assert proxy.drained(30).called  # nothing open: at once


@pytest.mark.parametrize("name, tcp", [(b"echo.test", True), (b"ECHO.test.", True), (b"localhost", False), (None, False)])
def test_the_dispatch_hands_the_connection_over_once_the_handshake_is_done(name, tcp):
    reactor = MemoryReactorClock()
    built = []

    class HTTP(Protocol):
        def connectionMade(self):
            built.append(self)

    factory = SNIDispatchFactory(Factory.forProtocol(HTTP), _proxy(reactor))
    dispatch = factory.buildProtocol(None)
    tls = _TLS(_Connection(name=name))
    tls.wrappedProtocol = dispatch
    dispatch.makeConnection(tls)
    assert not built and not reactor.tcpClients  # nothing before the handshake
    dispatch.handshakeCompleted()
    assert isinstance(tls.wrappedProtocol, Tunnel) is tcp
    assert (len(reactor.tcpClients), len(built)) == ((1, 0) if tcp else (0, 1))


def test_mtlsgate_check_warns_about_a_tcp_route_no_certificate_names(pki):
    from datetime import datetime, timezone

    from mtlsgate.cli.check import Checker

    config = _config(pki, {"from": "tcp+https://db.test:5432", "to": "tcp://127.0.0.1:5432"}, {"from": "tcp+https://localhost", "to": "tcp://h:1"})
    checker = Checker(config, datetime.now(timezone.utc))
    checker.run()
    warnings = [message for level, message in checker.findings.lines if level == "warning"]
    assert any("TCP route db.test:5432: no served certificate carries db.test" in w for w in warnings)
    assert not any("carries localhost" in w for w in warnings)
    assert any("plain tcp://" in w for w in warnings)


def test_the_access_log_formats_a_tunnels_line():
    import json

    from mtlsgate.observe.accesslog import format_combined, format_json

    event = {
        "log_time": 0, "kind": "tcp", "client": "10.0.0.1", "identity": "spiffe://t/a", "spiffe_id": "spiffe://t/a", "common_name": "a",
        "fingerprint": "ab" * 32, "server_name": "db.test", "route": "db.test:5432", "upstream": "tcp://h:5432", "end": "client_closed",
        "detail": None, "bytes_up": 10, "bytes_down": 20, "duration": 1.5,
    }  # fmt: skip
    line = format_combined(event)
    assert line.startswith('10.0.0.1 - spiffe://t/a [01/Jan/1970:00:00:00 +0000] "TCP db.test:5432" end=client_closed up=10 down=20 ')
    assert line.endswith(f"upstream=tcp://h:5432 cn=a sha256={'ab' * 32} 1.500s")
    record = json.loads(format_json(event))
    assert (record["kind"], record["end"], record["bytes_up"], record["bytes_down"], record["server_name"]) == ("tcp", "client_closed", 10, 20, "db.test")
