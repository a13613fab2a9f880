"""
HTTP/2 downstream through the real twistd process: curl (nghttp2) and the h2 library over real mTLS,
the same proxy behind it as for HTTP/1.1 (routing, identity, XFCC), flow control both ways with 16 MiB
bodies, gRPC-shaped refusals (the h2 library and grpcio), the http2 switch, and a graceful drain.
"""

from __future__ import annotations

import hashlib
import json
import signal
import ssl
import subprocess
import time

import grpc
import pytest
import yaml
from hyperframe.frame import DataFrame, Frame, GoAwayFrame, HeadersFrame

from mtlsgate.identity import parse_xfcc
from tests.conftest import ThreadedListener, free_port, gateway_args, gateway_config
from tests.h2peer import H2Client, simple_get

MIB = 1024 * 1024


@pytest.fixture
def gateway(start_gateway, pki, echo_upstream):
    return start_gateway(gateway_args(pki, echo_upstream, "--timeout", "120s"))


def _curl(port: int, pki, *args: str, client: str = "alice") -> subprocess.CompletedProcess:
    return subprocess.run(
        ["curl", "-sS", "-i", "--cacert", pki["ca"], "--cert", pki[client][0], "--key", pki[client][1], *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


@pytest.mark.needs("curl")
def test_curl_http2_through_mtls_gets_200_over_http2(gateway, pki):
    assert "HTTP2" in subprocess.run(["curl", "-V"], capture_output=True, text=True).stdout
    out = _curl(gateway.port, pki, "--http2", f"https://localhost:{gateway.port}/hello?x=1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("HTTP/2 200")
    body = json.loads(out.stdout.split("\n\n", 1)[1])
    assert body["uri"] == "/hello?x=1"
    assert body["headers"]["x-forwarded-host"] == [f"localhost:{gateway.port}"]  # :authority as Host
    [element] = parse_xfcc(body["headers"]["x-forwarded-client-cert"][0])
    assert element["URI"] == ["spiffe://test/ns/prod/sa/alice"]
    assert '"GET /hello?x=1 HTTP/2" 200' in gateway.proc.wait_for_log("HTTP/2\" 200")


@pytest.mark.needs("curl")
def test_http2_off_keeps_curl_on_http11(start_gateway, pki, echo_upstream, tmp_path):
    port = free_port()
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(gateway_config(pki, port, [f"https://127.0.0.1:{echo_upstream}"], http2=False)))
    start_gateway(["--config", str(path)], port=port)
    out = _curl(port, pki, "--http2", f"https://localhost:{port}/")
    assert out.stdout.startswith("HTTP/1.1 200"), out.stdout + out.stderr
    with H2Client(port, pki) as c:
        assert c.alpn == "http/1.1"


def test_h2_client_post_is_echoed_and_client_identity_headers_cannot_be_spoofed(gateway, pki):
    body = b"hello over h2" * 1000
    with H2Client(gateway.port, pki) as c:
        assert c.alpn == "h2"
        spoof = [(b"x-forwarded-client-cert", b'Hash=00;Subject="CN=admin"'), (b"x-forwarded-for", b"10.6.6.6"), (b"x_forwarded_client_cert", b"x")]
        sid = c.request("POST", "/upload", headers=[(b"content-type", b"text/plain"), *spoof], body=body)
        stream = c.response(sid)
        # several requests on one connection, concurrently
        others = [c.request("GET", f"/n/{i}") for i in range(10)]
        answers = [c.response(s) for s in others]
    assert stream.status == 200
    echo = json.loads(bytes(stream.body))
    assert echo["method"] == "POST" and echo["body_bytes"] == len(body) and echo["body_sha256"] == hashlib.sha256(body).hexdigest()
    headers = echo["headers"]
    [element] = parse_xfcc(headers["x-forwarded-client-cert"][0])
    assert element["URI"] == ["spiffe://test/ns/prod/sa/alice"] and len(headers["x-forwarded-client-cert"]) == 1
    assert headers["x-forwarded-for"] == ["127.0.0.1"]
    assert not any("_" in name for name in headers)
    assert [json.loads(bytes(a.body))["uri"] for a in answers] == [f"/n/{i}" for i in range(10)]


def test_a_16_mib_upload_streams_through(gateway, pki):
    data = bytes(range(256)) * (16 * MIB // 256)
    with H2Client(gateway.port, pki, timeout=120) as c:
        sid = c.request("PUT", "/big", headers=[(b"content-length", b"%d" % len(data))], body=data)
        stream = c.response(sid)
    assert stream.status == 200, bytes(stream.body)
    echo = json.loads(bytes(stream.body))
    assert echo["body_bytes"] == len(data) and echo["body_sha256"] == hashlib.sha256(data).hexdigest()


class SlowReadingUpstream(ThreadedListener):
    """A TLS upstream that reads a request body 256 KiB at a time with a pause between (a slow consumer), then says how much it got."""

    def __init__(self, pki) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(*pki["upstream"])
        super().__init__()

    def handle(self, conn) -> None:
        conn.settimeout(60)
        with self.ctx.wrap_socket(conn, server_side=True) as tls:
            head = b""
            while b"\r\n\r\n" not in head:
                head += tls.recv(65536)
            head, rest = head.split(b"\r\n\r\n", 1)
            lengths = [line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
            length = int(lengths[0]) if lengths else 0
            digest = hashlib.sha256(rest)
            got = len(rest)
            paused_at = 0
            while got < length:
                if got - paused_at >= 256 * 1024:
                    paused_at = got
                    time.sleep(0.05)  # every 256 KiB: the upstream's pace, not the test's synchronisation
                chunk = tls.recv(65536)
                if not chunk:
                    break
                digest.update(chunk)
                got += len(chunk)
            body = json.dumps({"got": got, "sha256": digest.hexdigest()}).encode()
            tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))


def test_a_16_mib_upload_to_a_slow_upstream_is_held_at_the_stream_window(start_gateway, pki, tmp_path):
    upstream = SlowReadingUpstream(pki)
    try:
        port = free_port()
        path = tmp_path / "gw.yaml"
        path.write_text(yaml.safe_dump(gateway_config(pki, port, [f"https://127.0.0.1:{upstream.port}"], route={"timeout": "120s"})))
        gateway = start_gateway(["--config", str(path)], port=port)
        assert simple_get(gateway.port, pki, "/warm-up").status == 200
        peak_before = _peak_rss_kib(gateway.proc.popen.pid)
        data = bytes(range(256)) * (16 * MIB // 256)
        with H2Client(gateway.port, pki, timeout=120) as c:
            sid = c.request("POST", "/slow-upload", headers=[(b"content-length", b"%d" % len(data))], body=data)
            stream = c.response(sid)
            assert c.window_waits > 0  # the gateway stopped the client: its window stayed shut while the upstream was busy
        assert stream.status == 200, bytes(stream.body)
        assert json.loads(bytes(stream.body)) == {"got": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        assert _peak_rss_kib(gateway.proc.popen.pid) - peak_before < 12 * 1024  # KiB: never the 16 MiB body
    finally:
        upstream.stop()


def _peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def test_a_16_mib_download_to_a_slow_consumer_waits_for_its_window(gateway, pki):
    """
    The client acknowledges nothing until it has everything its window allows, and then only a
    little at a time: h2 (the client) fails the connection if the gateway sends past the window, and
    the gateway, holding the upstream back meanwhile, does not buffer the body in memory.
    """
    size = 16 * MIB
    assert simple_get(gateway.port, pki).status == 200  # everything a request needs is loaded
    peak_before = _peak_rss_kib(gateway.proc.popen.pid)
    with H2Client(gateway.port, pki, timeout=120, auto_ack=False) as c:
        sid = c.request("GET", f"/bytes/{size}")
        stream = c.streams[sid]
        c.read(lambda: len(stream.body) >= 65535 - 1024)  # the stream's initial window, nearly
        c.dawdle(2.0)  # a slow reader: the upstream would have sent all 16 MiB by now, were it not held back
        held = len(stream.body)
        digest = hashlib.sha256()
        acked = 0
        while not stream.done:
            new = len(stream.body) - acked
            if new:
                c.conn.acknowledge_received_data(new, sid)
                c.flush()
                acked += new
            c.read_once()
        assert held <= 65535
    digest.update(bytes(stream.body))
    assert stream.status == 200 and len(stream.body) == size
    assert digest.hexdigest() == hashlib.sha256((bytes(range(256)) * 256) * (size // 65536)).hexdigest()
    assert _peak_rss_kib(gateway.proc.popen.pid) - peak_before < 12 * 1024  # KiB: never the 16 MiB body


def _grpc_call(c: H2Client, path: str, authority: bytes = b"localhost") -> dict[bytes, bytes]:
    sid = c.request("POST", path, authority=authority, headers=[(b"content-type", b"application/grpc+proto"), (b"te", b"trailers")],
                    body=b"\x00\x00\x00\x00\x00")  # fmt: skip
    stream = c.response(sid)
    assert stream.status == 200 and stream.ended and not stream.body and stream.trailers is None  # trailers-only: one HEADERS frame
    return dict(stream.headers)


def test_grpc_requests_refused_by_the_gateway_get_grpc_status(start_gateway, pki, echo_upstream, tmp_path):
    port, dead = free_port(), free_port()
    config = gateway_config(pki, port, [f"https://127.0.0.1:{echo_upstream}"], route={"allow_client": {"uri": ["spiffe://test/ns/prod/sa/bob"]}})
    config["routes"].append({**config["routes"][0], "from": "https://dead.test", "to": [f"https://127.0.0.1:{dead}"], "allow_client": {}})
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(config))
    gateway = start_gateway(["--config", str(path)], port=port)
    with H2Client(port, pki, "alice") as c:
        refused = _grpc_call(c, "/pkg.Svc/Call")
        unknown = _grpc_call(c, "/pkg.Svc/Call", authority=b"nowhere.test")
        unavailable = _grpc_call(c, "/pkg.Svc/Call", authority=b"dead.test")
    assert (refused[b"content-type"], refused[b"grpc-status"]) == (b"application/grpc", b"7")
    assert refused[b"grpc-message"].startswith(b"403 Forbidden: client certificate not allowed here")
    assert unknown[b"grpc-status"] == b"12" and b"no route for this host" in unknown[b"grpc-message"]
    assert unavailable[b"grpc-status"] == b"14"
    log = gateway.proc.output()
    assert '"POST /pkg.Svc/Call HTTP/2" 403' in log  # the access line keeps the gateway's decision


def test_grpcio_sees_permission_denied_for_a_refused_certificate(start_gateway, pki, echo_upstream, tmp_path):
    port = free_port()
    config = gateway_config(pki, port, [f"https://127.0.0.1:{echo_upstream}"], route={"allow_client": {"uri": ["spiffe://test/ns/prod/sa/bob"]}})
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(config))
    start_gateway(["--config", str(path)], port=port)
    read = lambda p: open(p, "rb").read()  # noqa: E731
    credentials = grpc.ssl_channel_credentials(read(pki["ca"]), read(pki["alice"][1]), read(pki["alice"][0]))
    with grpc.secure_channel(f"localhost:{port}", credentials) as channel:
        call = channel.unary_unary("/pkg.Svc/Call", request_serializer=lambda b: b, response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as failure:
            call(b"ping", timeout=30)
    assert failure.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "not allowed here" in failure.value.details()


def test_sigterm_drains_http2_with_goaway_and_the_stream_in_flight_finishes(gateway, pki):
    with H2Client(gateway.port, pki) as c:
        sid = c.request("GET", "/slow/2")
        c.ping()  # the gateway has taken the request
        gateway.proc.signal(signal.SIGTERM)
        # From here frames are read by hand: h2 as a client stops at any GOAWAY, even a graceful one.
        frames = _raw_frames_until_closed(c)
    goaways = [f for f in frames if isinstance(f, GoAwayFrame)]
    assert goaways and goaways[0].error_code == 0 and goaways[0].last_stream_id == sid
    headers = [f for f in frames if isinstance(f, HeadersFrame) and f.stream_id == sid]
    assert headers and dict(c.conn.decoder.decode(headers[0].data, raw=True))[b":status"] == b"200"
    body = b"".join(f.data for f in frames if isinstance(f, DataFrame) and f.stream_id == sid)
    assert json.loads(body)["uri"] == "/slow/2"
    assert gateway.proc.popen.wait(30) in (0, -signal.SIGTERM)  # twistd re-raises the signal it stopped on


def _raw_frames_until_closed(c: H2Client) -> list[Frame]:
    data = b""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            chunk = c.sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError):
            chunk = b""
        if not chunk:
            break
        data += chunk
    frames = []
    while len(data) >= 9:
        frame, length = Frame.parse_frame_header(memoryview(data[:9]))
        frame.parse_body(memoryview(data[9 : 9 + length]))
        frames.append(frame)
        data = data[9 + length :]
    return frames


def test_a_refused_stream_does_not_disturb_the_others(gateway, pki):
    stream = simple_get(gateway.port, pki, "/ok")
    assert stream.status == 200
