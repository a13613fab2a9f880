"""
TCP routes end to end: the real twistd process, with real peers: redis-server reached by redis-cli
over TLS with a client certificate, a plain TCP echo, a TLS upstream that requires the gateway's
client certificate, a recorder of the PROXY v2 header; idle and connect failures, drain on SIGTERM,
ALPN, metrics and the access line.  The attacker's side is in tests/adversarial/test_tcp_routes.py.
"""

from __future__ import annotations

import hashlib
import os
import select
import signal
import socket
import ssl
import subprocess
import time

import pytest
import yaml

from mtlsgate.identity import parse_xfcc
from tests.conftest import Proc, find_tool, free_port, scrape, wait_for_port
from tests.nginx_peer import MAIN, TEMP_PATHS, start_nginx
from tests.tcp_peers import (
    CountingUpstream,
    LocalTunnel,
    RecordingUpstream,
    client_context,
    connect,
    parse_proxy_v2,
    read_until_closed,
    start_tcp_gateway,
    tcp_certificate,
    tcp_config,
    tls_upstream_context,
)  # fmt: skip


@pytest.fixture
def echo():
    up = CountingUpstream()
    yield up
    up.stop()


def _start(start_gateway, tmp_path, pki, routes, **top):
    port = free_port()
    return start_tcp_gateway(start_gateway, tmp_path, tcp_config(pki, port, routes, **top))


@pytest.mark.needs("redis-server", "redis-cli")
def test_redis_cli_reaches_redis_server_through_a_tcp_route(start_gateway, tmp_path, pki, procs):
    help_text = subprocess.run([find_tool("redis-cli"), "--help"], capture_output=True, text=True).stdout
    assert "--tls" in help_text and "--sni" in help_text, "this redis-cli was built without TLS"
    redis_port = free_port()
    redis = Proc([find_tool("redis-server"), "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                 tmp_path / "redis.log")
    procs.append(redis)
    wait_for_port(redis_port, redis.popen, log=redis.log)
    gateway = _start(start_gateway, tmp_path, pki, [{"host": "redis.test", "to": f"tcp://127.0.0.1:{redis_port}",
                                                     "allow_client": {"uri": ["spiffe://test/ns/prod/sa/alice"]}}])

    def cli(who: str, *command: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [find_tool("redis-cli"), "--tls", "--sni", "redis.test", "--cacert", pki["ca"], "--cert", pki[who][0], "--key", pki[who][1],
             "-h", "127.0.0.1", "-p", str(gateway.port), *command],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    assert cli("alice", "PING").stdout.strip() == "PONG"
    assert cli("alice", "SET", "greeting", "hello through mtlsgate").stdout.strip() == "OK"
    assert cli("alice", "GET", "greeting").stdout.strip() == "hello through mtlsgate"
    refused = cli("bob", "PING")
    assert "PONG" not in refused.stdout
    out = gateway.proc.wait_for_log("end=refused")
    assert "TCP redis.test end=client_closed" in out or "TCP redis.test end=upstream_closed" in out
    assert "spiffe://test/ns/prod/sa/alice" in out


@pytest.mark.needs("psql", "initdb", "postgres")
def test_psql_15_goes_through_a_local_client_side_tunnel_not_directly(start_gateway, tmp_path, pki, procs):
    """
    psql before PostgreSQL 17 sends SSLRequest in plain text before any TLS, so a route that
    terminates TLS cannot serve it directly (docs/configuration.md, "Clients that need a local
    tunnel"); through a local client-side tunnel (plain locally, TLS with a client certificate to the
    gateway) it works.
    """
    import pwd
    import shutil
    import tempfile

    user = pwd.getpwnam("postgres")

    def as_postgres() -> None:
        os.setgid(user.pw_gid)
        os.setuid(user.pw_uid)

    pgdir = tempfile.mkdtemp(prefix="mtlsgate-pg-")  # outside pytest's root-only tmp_path: postgres must reach it
    try:
        os.chown(pgdir, user.pw_uid, user.pw_gid)
        subprocess.run([find_tool("initdb"), "-D", f"{pgdir}/data", "--auth=trust", "-U", "postgres"], preexec_fn=as_postgres,
                       check=True, capture_output=True, timeout=120)  # fmt: skip
        pg_port = free_port()
        postgres = Proc([find_tool("postgres"), "-D", f"{pgdir}/data", "-p", str(pg_port), "-k", pgdir, "-c", "listen_addresses=127.0.0.1"],
                        tmp_path / "postgres.log", preexec_fn=as_postgres)  # fmt: skip
        procs.append(postgres)
        wait_for_port(pg_port, postgres.popen, log=postgres.log)
        gateway = _start(start_gateway, tmp_path, pki, [{"host": "pg.test", "to": f"tcp://127.0.0.1:{pg_port}"}])
        direct = subprocess.run(
            [find_tool("psql"), f"host=127.0.0.1 port={gateway.port} user=postgres dbname=postgres sslmode=verify-ca sslrootcert={pki['ca']} "
             f"sslcert={pki['alice'][0]} sslkey={pki['alice'][1]} connect_timeout=20", "-c", "select 'direct'"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert direct.returncode != 0 and "direct" not in direct.stdout
        tunnel = LocalTunnel(gateway.port, client_context(pki, "alice"), "pg.test")
        try:
            through = subprocess.run(
                [find_tool("psql"), f"host=127.0.0.1 port={tunnel.port} user=postgres dbname=postgres sslmode=disable connect_timeout=20",
                 "-At", "-c", "select 'through ' || 'mtlsgate'"],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
        finally:
            tunnel.stop()
        assert through.stdout.strip() == "through mtlsgate", through.stderr
        gateway.proc.wait_for_log("TCP pg.test end=")
    finally:
        for proc in procs:
            if proc.argv[0] == find_tool("postgres"):
                proc.stop()
        shutil.rmtree(pgdir, ignore_errors=True)


def test_32_mib_each_way_arrive_intact_with_metrics_and_an_access_line(start_gateway, tmp_path, pki, echo):
    admin = free_port()
    gateway = _start(start_gateway, tmp_path, pki, [{"host": "echo.test", "to": f"tcp://127.0.0.1:{echo.port}"}],
                     admin_address=f"tcp:{admin}:interface=127.0.0.1")
    size = 32 * 1024 * 1024
    payload = os.urandom(1 << 20) * 32
    sock = connect(gateway.port, client_context(pki), "echo.test", timeout=120)
    sent, received = _pump(sock, payload)
    assert sent == size and len(received) == size
    assert hashlib.sha256(received).hexdigest() == hashlib.sha256(payload).hexdigest()
    sock.close()
    out = gateway.proc.wait_for_log("end=client_closed")
    assert f"up={size} down={size}" in out
    metrics = scrape(admin)
    assert metrics[("mtlsgate_tcp_bytes_total", (("direction", "up"), ("route", "echo.test")))] == size
    assert metrics[("mtlsgate_tcp_bytes_total", (("direction", "down"), ("route", "echo.test")))] == size
    assert metrics[("mtlsgate_tcp_connections_total", (("end", "client_closed"), ("route", "echo.test")))] == 1
    assert metrics[("mtlsgate_tcp_active_connections", (("route", "echo.test"),))] == 0


def _pump(sock: ssl.SSLSocket, payload: bytes, timeout: float = 300) -> tuple[int, bytes]:
    """Send C{payload} and read as many bytes back, in one thread (one SSL object is not for two threads at once)."""
    sock.setblocking(False)
    sent, chunks, got = 0, [], 0
    deadline = time.monotonic() + timeout
    while got < len(payload) and time.monotonic() < deadline:
        readable, writable, _ = select.select([sock], [sock] if sent < len(payload) else [], [], 5)
        if readable or sock.pending():
            try:
                chunk = sock.recv(1 << 18)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                chunk = None
            if chunk == b"":
                break
            if chunk:
                chunks.append(chunk)
                got += len(chunk)
        if writable:
            try:
                sent += sock.send(payload[sent : sent + (1 << 16)])
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                pass
    sock.setblocking(True)
    return sent, b"".join(chunks)


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def test_a_client_that_never_reads_cannot_make_the_gateway_buffer(start_gateway, tmp_path, pki, echo):
    """Back-pressure both ways: the echo's answers pile up unread, the echo stops reading, and so must the gateway."""
    gateway = _start(start_gateway, tmp_path, pki, [{"host": "echo.test", "to": f"tcp://127.0.0.1:{echo.port}"}])
    before = _rss_mib(gateway.proc.popen.pid)
    sock = connect(gateway.port, client_context(pki), "echo.test", timeout=60)
    chunk, sent, limit = os.urandom(1 << 16), 0, 256 << 20
    sock.settimeout(5)
    try:
        while sent < limit:
            sent += sock.send(chunk)
    except (TimeoutError, ssl.SSLWantWriteError):
        pass
    assert sent < limit, "the gateway took 256 MiB from a client that reads nothing"
    grown = _rss_mib(gateway.proc.popen.pid) - before
    assert grown < 64, f"the gateway grew by {grown:.0f} MiB holding {sent >> 20} MiB in flight"
    sock.settimeout(60)
    got = 0
    while got < sent:  # reading again lets everything through, nothing lost
        data = sock.recv(1 << 18)
        assert data, f"closed after {got} of {sent} bytes"
        got += len(data)
    assert got == sent
    sock.close()


def test_a_tls_upstream_gets_the_gateways_client_certificate(start_gateway, tmp_path, pki):
    upstream = CountingUpstream(tls=tls_upstream_context(pki))
    try:
        tls_keys = {"tls_custom_ca_file": pki["ca"], "tls_client_cert_file": pki["gateway_client"][0],
                    "tls_client_key_file": pki["gateway_client"][1]}  # fmt: skip
        gateway = _start(start_gateway, tmp_path, pki, [
            {"host": "tls-echo.test", "to": f"tls://127.0.0.1:{upstream.port}", **tls_keys},
            {"host": "echo.test", "to": f"tls://127.0.0.1:{upstream.port}", "tls_server_name": "wrong.internal", **tls_keys},
        ])  # fmt: skip
        sock = connect(gateway.port, client_context(pki), "tls-echo.test")
        sock.sendall(b"hello over two TLS hops")
        assert sock.recv(100) == b"hello over two TLS hops"
        sock.close()
        subject = dict(pair[0] for pair in upstream.peer_certificates[0]["subject"])
        assert subject["commonName"] == "gateway"
        # the upstream's certificate does not carry the name the route checks: the client is closed, with the reason logged
        sock = connect(gateway.port, client_context(pki), "echo.test")
        sock.sendall(b"hello")
        assert read_until_closed(sock) == b""
        sock.close()
        out = gateway.proc.wait_for_log("end=connect_failed")
        assert "upstream certificate does not match wrong.internal" in out and "Traceback" not in out
    finally:
        upstream.stop()


def test_proxy_protocol_v2_carries_the_client_address_and_identity(start_gateway, tmp_path, pki):
    upstream = RecordingUpstream()
    upstream.want = len(b"hello")
    try:
        gateway = _start(start_gateway, tmp_path, pki, [{"host": "pp.test", "to": f"tcp://127.0.0.1:{upstream.port}", "proxy_protocol": "v2"}])
        sock = connect(gateway.port, client_context(pki, "alice"), "pp.test")
        client_port = sock.getsockname()[1]
        sock.sendall(b"hello")
        assert read_until_closed(sock) == b"ok\n"
        sock.close()
        header, rest = parse_proxy_v2(upstream.received[0])
        assert rest == b"hello"
        assert header["command"] == 1 and header["family"] == 0x11
        assert header["src"] == ("127.0.0.1", client_port) and header["dst"] == ("127.0.0.1", gateway.port)
        tlvs = header["tlvs"]
        assert tlvs[0x02] == b"pp.test"
        assert tlvs[0xE0] == b"spiffe://test/ns/prod/sa/alice"
        (element,) = parse_xfcc(tlvs[0xE1].decode("ascii"))
        assert element["URI"] == ["spiffe://test/ns/prod/sa/alice"] and "CN=alice" in element["Subject"][0]
        assert header["ssl"]["client"] == 0x07 and header["ssl"]["verify"] == 0
        assert header["ssl"][0x22] == b"alice" and header["ssl"][0x21].startswith(b"TLSv1.")
    finally:
        upstream.stop()


NGINX_PROXY_PROTOCOL = MAIN + """http {{
    access_log {dir}/access.log;
""" + TEMP_PATHS + """    server {{
        listen 127.0.0.1:{port} proxy_protocol;
        location / {{
            default_type text/plain;
            return 200 "from $proxy_protocol_addr:$proxy_protocol_port to $proxy_protocol_server_addr:$proxy_protocol_server_port\n";
        }}
    }}
}}
"""


@pytest.mark.needs("nginx")
def test_nginx_reads_the_proxy_v2_header(start_gateway, tmp_path, pki, procs):
    """
    A real PROXY v2 reader: nginx (listen ... proxy_protocol) takes the header, TLVs and all.  (nginx
    1.22 on an ssl listener reads at most 108 bytes of it, too few for the identity TLVs: see
    docs/configuration.md; the header before a TLS upstream's handshake is tested below.)
    """
    port = free_port()
    start_nginx(procs, tmp_path, NGINX_PROXY_PROTOCOL.format(dir=tmp_path, port=port), port)
    gateway = _start(start_gateway, tmp_path, pki, [{"host": "pp.test", "to": f"tcp://127.0.0.1:{port}", "proxy_protocol": "v2"}])
    sock = connect(gateway.port, client_context(pki, "alice"), "pp.test")
    client_port = sock.getsockname()[1]
    sock.sendall(b"GET / HTTP/1.1\r\nHost: pp.test\r\nConnection: close\r\n\r\n")
    reply = read_until_closed(sock)
    sock.close()
    assert reply.startswith(b"HTTP/1.1 200"), reply
    assert f"from 127.0.0.1:{client_port} to 127.0.0.1:{gateway.port}".encode() in reply


class _ProxyThenTLS(CountingUpstream):
    """Reads a PROXY v2 header in the clear, then makes the TLS handshake (requiring a client certificate) and echoes."""

    def __init__(self, pki) -> None:
        self.headers: list[dict] = []
        self.server_tls = tls_upstream_context(pki)
        super().__init__()

    def serve(self, conn: socket.socket) -> None:
        data = b""
        while len(data) < 16 or len(data) < 16 + int.from_bytes(data[14:16], "big"):
            chunk = conn.recv(16 + int.from_bytes(data[14:16], "big") - len(data) if len(data) >= 16 else 16 - len(data))
            if not chunk:
                return
            data += chunk
        header, rest = parse_proxy_v2(data)
        assert rest == b""  # exactly the header: the ClientHello follows it
        self.headers.append(header)
        tls = self.server_tls.wrap_socket(conn, server_side=True)
        self.peer_certificates.append(tls.getpeercert())
        super().serve(tls)


def test_the_proxy_header_precedes_a_tls_upstreams_handshake(start_gateway, tmp_path, pki):
    upstream = _ProxyThenTLS(pki)
    try:
        gateway = _start(start_gateway, tmp_path, pki, [{
            "host": "pp.test", "to": f"tls://127.0.0.1:{upstream.port}", "proxy_protocol": "v2", "tls_custom_ca_file": pki["ca"],
            "tls_client_cert_file": pki["gateway_client"][0], "tls_client_key_file": pki["gateway_client"][1],
        }])  # fmt: skip
        sock = connect(gateway.port, client_context(pki, "alice"), "pp.test")
        sock.sendall(b"through TLS after the header")
        assert sock.recv(100) == b"through TLS after the header"
        sock.close()
        assert upstream.headers[0]["tlvs"][0xE0] == b"spiffe://test/ns/prod/sa/alice"
        assert dict(pair[0] for pair in upstream.peer_certificates[0]["subject"])["commonName"] == "gateway"
    finally:
        upstream.stop()


def test_an_idle_tunnel_is_closed(start_gateway, tmp_path, pki, echo):
    gateway = _start(start_gateway, tmp_path, pki, [{"host": "echo.test", "to": f"tcp://127.0.0.1:{echo.port}", "idle_timeout": "1s"}])
    sock = connect(gateway.port, client_context(pki), "echo.test", timeout=60)
    sock.sendall(b"ping")
    assert sock.recv(4) == b"ping"
    assert read_until_closed(sock) == b""  # nothing more either way: the gateway closes it
    sock.close()
    gateway.proc.wait_for_log("end=idle_timeout")
    assert echo.closed.wait(20)


def test_a_dead_upstream_closes_the_client_with_a_reason_and_failover_finds_a_live_one(start_gateway, tmp_path, pki, echo):
    dead = free_port()
    gateway = _start(start_gateway, tmp_path, pki, [
        {"host": "dead.test", "to": f"tcp://127.0.0.1:{dead}"},
        {"host": "echo.test", "to": [f"tcp://127.0.0.1:{dead}", f"tcp://127.0.0.1:{echo.port}"]},
    ])  # fmt: skip
    sock = connect(gateway.port, client_context(pki), "dead.test")
    sock.sendall(b"anyone?")
    assert read_until_closed(sock) == b""
    sock.close()
    out = gateway.proc.wait_for_log("end=connect_failed")
    assert f"upstream tcp://127.0.0.1:{dead} unreachable" in out and "Traceback" not in out
    for _ in range(2):  # round-robin starts at either; the dead one fails over to the live one
        sock = connect(gateway.port, client_context(pki), "echo.test")
        sock.sendall(b"live")
        assert sock.recv(4) == b"live"
        sock.close()
    assert echo.accepted == 2


def test_sigterm_drains_open_tunnels_then_closes_them(start_gateway, tmp_path, pki, echo):
    gateway = _start(start_gateway, tmp_path, pki, [{"host": "echo.test", "to": f"tcp://127.0.0.1:{echo.port}"}],
                     limits={"shutdown_timeout": "3s"})
    sock = connect(gateway.port, client_context(pki), "echo.test", timeout=60)
    sock.sendall(b"before")
    assert sock.recv(6) == b"before"
    gateway.proc.signal(signal.SIGTERM)
    gateway.proc.wait_for_log("for 1 TCP tunnel(s) to end")
    with pytest.raises(OSError):  # no longer accepting: refused, or (workers: the parent holds the socket) never served
        connect(gateway.port, client_context(pki), "echo.test", timeout=2).close()
    sock.sendall(b"during")
    assert sock.recv(6) == b"during"  # the open tunnel still works until shutdown_timeout
    assert read_until_closed(sock) == b""
    sock.close()
    assert gateway.proc.popen.wait(30) in (0, -signal.SIGTERM)  # twistd re-raises the signal it stopped on
    assert "end=shutdown" in gateway.proc.output()


def test_reload_adds_a_tcp_route_and_keeps_open_tunnels(start_gateway, tmp_path, pki, echo):
    port = free_port()
    config = tcp_config(pki, port, [{"host": "echo.test", "to": f"tcp://127.0.0.1:{echo.port}"}], watch_interval="off")
    gateway = start_tcp_gateway(start_gateway, tmp_path, config)
    sock = connect(gateway.port, client_context(pki), "echo.test", timeout=60)
    sock.sendall(b"one")
    assert sock.recv(3) == b"one"
    config = tcp_config(pki, port, [{"host": "echo.test", "to": f"tcp://127.0.0.1:{echo.port}"},
                                    {"host": "record.test", "to": f"tcp://127.0.0.1:{echo.port}", "allow_client": {"cn": ["bob"]}}],
                        watch_interval="off")  # fmt: skip
    (tmp_path / f"tcp-{port}.yaml").write_text(yaml.safe_dump(config))
    gateway.proc.signal(signal.SIGHUP)
    gateway.proc.wait_for_log("reloaded:")
    sock.sendall(b"two")
    assert sock.recv(3) == b"two"  # the tunnel opened before the reload carries on
    new = connect(gateway.port, client_context(pki, "bob"), "record.test")
    new.sendall(b"new")
    assert new.recv(3) == b"new"
    new.close()
    sock.close()
    assert echo.accepted == 2


def test_alpn_on_a_tcp_route_is_the_routes_own(start_gateway, tmp_path, pki, echo, echo_upstream):
    port = free_port()
    config = tcp_config(pki, port, [{"host": "echo.test", "to": f"tcp://127.0.0.1:{echo.port}", "alpn": ["postgresql"]}], echo_upstream)
    gateway = start_tcp_gateway(start_gateway, tmp_path, config)

    def negotiated(name: str, offered: list[str]) -> str | None:
        ctx = client_context(pki)
        ctx.set_alpn_protocols(offered)
        sock = connect(gateway.port, ctx, name)
        protocol = sock.selected_alpn_protocol()
        sock.close()
        return protocol

    assert negotiated("echo.test", ["postgresql"]) == "postgresql"
    assert negotiated("echo.test", ["h2", "http/1.1"]) is None  # a TCP route's bytes are not HTTP
    assert negotiated("localhost", ["h2", "http/1.1"]) == "h2"  # an HTTP route's: the HTTP front ends' choice
    assert negotiated("localhost", ["http/1.1"]) == "http/1.1"


def test_tcp_route_certificate_is_served_for_its_name(pki):
    """The test certificate carries every TCP route name (a sanity check of the fixture the other tests rely on)."""
    cert, _ = tcp_certificate(pki)
    assert ssl.PEM_cert_to_DER_cert(open(cert).read())
