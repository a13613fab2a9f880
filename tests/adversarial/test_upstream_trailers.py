"""
Attack class: an upstream that uses response trailers to say what its headers may not.

An HTTP/2 upstream's trailers (gRPC's grpc-status and grpc-message live there) are relayed to the
client.  A hostile or compromised upstream may put into them what the gateway strips from headers,
or what a client that merges trailers into the header section would trust: framing
(content-length, transfer-encoding), hop-by-hop fields, pseudo-fields, identity the gateway vouches
for (x-forwarded-client-cert, x-forwarded-for, forwarded), cookies and authentication challenges,
and CR/LF/NUL to split a field in two on an HTTP/1.1 client.  The gateway forwards trailers only
through L{client_response_trailers}: none of that passes, whatever the spelling; everything else
(grpc-*, custom metadata) passes unchanged and in order.  docs/security.md, "Response trailers".
"""

from __future__ import annotations

import socket
import ssl
import threading
from typing import Any

import attrs
import h2.config
import h2.connection
import h2.events
import pytest
import pytest_twisted
import yaml
from hypothesis import given
from hypothesis import strategies as st
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers

from mtlsgate.config.model import Route
from mtlsgate.http.headers import GATEWAY_OWNED, HOP_BY_HOP, TRAILER_FORBIDDEN, client_response_trailers
from mtlsgate.proxy.upstream import UpstreamGroup
from tests.agent_body import Collect
from tests.conftest import free_port, gateway_config
from tests.h2peer import H2Client

HOSTILE = [
    (b"grpc-status", b"0"),
    (b"x-forwarded-client-cert", b'Hash=00;Subject="CN=admin"'),
    (b"X-Forwarded-For", b"10.0.0.1"),
    (b"forwarded", b"for=10.0.0.1"),
    (b"content-length", b"0"),
    (b"transfer-encoding", b"chunked"),
    (b"set-cookie", b"session=stolen"),
    (b"www-authenticate", b"Basic"),
    (b"connection", b"close"),
    (b"x-named-by-connection", b"1"),
    (b"x-split", b"a\r\nx-forwarded-client-cert: forged"),
    (b"x-nul", b"a\x00b"),
    (b":status", b"200"),
    (b"bad name", b"1"),
    (b"grpc-message", b"all\tgood"),
    (b"x-custom-bin", b"AAEC"),
]
ALLOWED = [(b"grpc-status", b"0"), (b"grpc-message", b"all\tgood"), (b"x-custom-bin", b"AAEC")]


def test_only_harmless_trailers_are_forwarded_in_order():
    headers = Headers({b"connection": [b"x-named-by-connection"]})
    assert client_response_trailers(HOSTILE, headers) == ALLOWED


_NAMES = st.one_of(
    st.sampled_from(sorted(TRAILER_FORBIDDEN | HOP_BY_HOP | GATEWAY_OWNED | {b"grpc-status", b"grpc-message", b":status", b":path", b"x-ok"})),
    st.binary(min_size=0, max_size=12),
).flatmap(lambda n: st.sampled_from([n, n.upper(), n.title()]))
_VALUES = st.binary(max_size=20)


@given(trailers=st.lists(st.tuples(_NAMES, _VALUES), max_size=12))
def test_whatever_the_upstream_sends_nothing_forbidden_or_malformed_passes(trailers):
    out = client_response_trailers(trailers)
    for name, value in out:
        assert name == name.lower()
        assert name not in TRAILER_FORBIDDEN and not name.startswith(b":")
        assert name and all(c > 0x20 and c < 0x7F and c not in b'"(),/:;<=>?@[\\]{}' for c in name)
        assert not any(c < 0x20 and c != 0x09 or c == 0x7F for c in value)
    # and nothing harmless is lost: the forwarded list is the input minus the dropped fields, in order
    kept = [(n.lower(), v) for n, v in trailers if (n.lower(), v) in out]
    assert kept == out


# --- the exchange relays them (in memory: the real HTTP/1.1 request with a write_trailers of the test's) -------


class _Transport:
    def pauseProducing(self) -> None: ...

    def resumeProducing(self) -> None: ...

    def stopProducing(self) -> None: ...


class _Response:
    code = 200
    phrase = b"OK"
    length = 5

    def __init__(self, trailers: list[tuple[bytes, bytes]]) -> None:
        self.headers = Headers({b"content-type": [b"application/grpc"], b"connection": [b"x-named-by-connection"]})
        self.trailers = trailers
        self.protocol: Any = None

    def deliverBody(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.makeConnection(_Transport())


def _in_memory_gateway() -> Any:
    from tests.unit.test_proxy_channel import Gateway

    return Gateway()


@pytest.fixture
def relay(monkeypatch):
    """
    An in-memory gateway whose requests get a recording write_trailers (the HTTP/2 front end provides the real one), and
    whose finish is recorded too: patched on the class (the HTTP/1.1 Request has slots), for this test only.
    """
    from mtlsgate.http.server import Request

    gateway = _in_memory_gateway()
    events: list[Any] = []
    original = gateway.channel.handler
    entry = original.__self__.state.routes.lookup("localhost", "/")  # ProxyResource.handle's resource: its one route
    entry.route = attrs.evolve(entry.route, upstream_protocol="http2")
    finish = Request.finish
    monkeypatch.setattr(Request, "write_trailers", lambda self, pairs: events.append(("trailers", list(pairs))))
    monkeypatch.setattr(Request, "finish", lambda self: (events.append(("finish",)), finish(self))[1])
    yield gateway, events
    gateway.close()


def test_the_exchange_forwards_only_harmless_trailers_just_before_the_end(relay):
    gateway, events = relay
    gateway.send(b"POST /svc/M HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nTE: trailers\r\n\r\n")
    assert gateway.upstream.requests[0][2].getRawHeaders(b"te") == [b"trailers"]  # an HTTP/2 route: the gateway takes trailers
    response = _Response(HOSTILE)
    gateway.upstream.pending[0].callback(response)
    response.protocol.dataReceived(b"hello")
    assert events == []
    response.protocol.connectionLost(Failure(ResponseDone()))
    assert events == [("trailers", ALLOWED), ("finish",)]


def test_no_trailers_no_call(relay):
    gateway, events = relay
    gateway.send(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    response = _Response([])
    gateway.upstream.pending[0].callback(response)
    response.protocol.dataReceived(b"hello")
    response.protocol.connectionLost(Failure(ResponseDone()))
    assert events == [("finish",)]


def test_trailers_that_are_all_forbidden_are_not_sent_at_all(relay):
    gateway, events = relay
    gateway.send(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    response = _Response([(b"x-forwarded-client-cert", b"forged"), (b"content-length", b"9")])
    gateway.upstream.pending[0].callback(response)
    response.protocol.dataReceived(b"hello")
    response.protocol.connectionLost(Failure(ResponseDone()))
    assert events == [("finish",)]


# --- a real hostile HTTP/2 upstream: what the agent hands over, and what the gateway would forward of it ---------


class HostileH2Upstream:
    """A TLS + h2 server in a thread that answers every stream with a body and HOSTILE-like trailers h2 lets through."""

    TRAILERS = [(b"grpc-status", b"0"), (b"x-forwarded-client-cert", b"forged"), (b"set-cookie", b"a=b"), (b"content-length", b"0"),
                (b"x-fine", b"yes")]  # fmt: skip

    def __init__(self, pki: dict[str, Any]) -> None:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=pki["ca"])
        ctx.load_cert_chain(*pki["upstream"])
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.set_alpn_protocols(["h2"])
        self.ctx = ctx
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._connection, args=(raw,), daemon=True).start()

    def _connection(self, raw: socket.socket) -> None:
        try:
            sock = self.ctx.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):
            raw.close()
            return
        with sock:
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
            conn.initiate_connection()
            sock.sendall(conn.data_to_send())
            while True:
                try:
                    data = sock.recv(65536)
                except (ssl.SSLError, OSError):
                    return
                if not data:
                    return
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.StreamEnded):
                        conn.send_headers(event.stream_id, [(b":status", b"200"), (b"content-type", b"application/grpc")])
                        conn.send_data(event.stream_id, b"hello")
                        conn.send_headers(event.stream_id, self.TRAILERS, end_stream=True)
                sock.sendall(conn.data_to_send())

    def stop(self) -> None:
        self.listener.close()
        self.thread.join(5)


@pytest_twisted.ensureDeferred
async def test_a_hostile_h2_upstreams_trailers_reach_the_agent_and_the_hygiene_drops_the_forged_ones(pki):
    from twisted.internet import reactor

    upstream = HostileH2Upstream(pki)
    route = Route(host="localhost", to=(f"https://127.0.0.1:{upstream.port}",), tls_custom_ca_file=pki["ca"],
                  tls_client_cert_file=pki["gateway_client"][0], tls_client_key_file=pki["gateway_client"][1], upstream_protocol="http2")  # fmt: skip
    group = UpstreamGroup(reactor, route)
    try:
        response = await group.agent.request(b"GET", f"https://127.0.0.1:{upstream.port}/".encode())
        body = Collect()
        response.deliverBody(body)
        [reason] = await body.done
        assert reason.check(ResponseDone) and body.data == b"hello"
        assert response.trailers == HostileH2Upstream.TRAILERS  # the agent hands over what came, as it came
        assert client_response_trailers(response.trailers, response.headers) == [(b"grpc-status", b"0"), (b"x-fine", b"yes")]
    finally:
        await group.close()
        upstream.stop()


@pytest.fixture
def hostile_gateway(start_gateway, pki, tmp_path):
    upstream = HostileH2Upstream(pki)
    port = free_port()
    config = gateway_config(pki, port, [f"https://127.0.0.1:{upstream.port}"], {"upstream_protocol": "http2"})
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(config))
    yield start_gateway(["--config", str(path)], port=port)
    upstream.stop()


def test_through_the_gateway_an_http2_client_gets_only_the_harmless_trailers(hostile_gateway, pki):
    with H2Client(hostile_gateway.port, pki) as client:
        assert client.alpn == "h2"
        stream = client.response(client.request("GET", "/", headers=[(b"te", b"trailers")]))
    assert stream.status == 200 and bytes(stream.body) == b"hello"
    assert stream.trailers == [(b"grpc-status", b"0"), (b"x-fine", b"yes")]


def test_through_the_gateway_an_http1_client_gets_only_the_harmless_trailers_in_the_last_chunk(hostile_gateway, pki):
    ctx = ssl.create_default_context(cafile=pki["ca"])
    ctx.load_cert_chain(*pki["alice"])
    ctx.set_alpn_protocols(["http/1.1"])
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", hostile_gateway.port), timeout=30), server_hostname="localhost") as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nTE: trailers\r\nConnection: close\r\n\r\n")
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head.lower()
    assert body == b"5\r\nhello\r\n0\r\ngrpc-status: 0\r\nx-fine: yes\r\n\r\n"
