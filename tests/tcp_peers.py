"""
Peers for the TCP route tests (tests/e2e/test_tcp_routes.py, tests/adversarial/test_tcp_routes.py):
upstreams that count what they accept (an echo, a TLS echo requiring a client certificate, a
recorder of the first bytes), the gateway's config for TCP routes, a TLS client, and a parser of
PROXY protocol v2 headers written from the specification (independent of mtlsgate's builder).
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import ThreadedListener, free_port

#: The names TCP routes are tested with; the gateway serves one certificate carrying them all.
TCP_NAMES = ["echo.test", "tls-echo.test", "redis.test", "record.test", "pp.test", "dead.test", "pg.test"]


def tcp_certificate(pki: dict[str, Any]) -> tuple[str, str]:
    """A server certificate (from the test CA) for the TCP route names, written once per session."""
    d: Path = pki["dir"]
    cert, key = d / "tcp-routes.pem", d / "tcp-routes-key.pem"
    if not cert.exists():
        pki["ca_obj"].issue_server(TCP_NAMES).write(str(cert), str(key))
    return str(cert), str(key)


class CountingUpstream(ThreadedListener):
    """
    A loopback upstream that accepts on a thread and serves each connection on a thread of its own
    (C{serve}; echo by default), counting accepted connections.  With C{tls}, it requires a client
    certificate from C{tls}'s CA and records the certificate it got.
    """

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.tls = tls
        self.accepted = 0
        self.received: list[bytes] = []  # what each connection sent, once it closed
        self.peer_certificates: list[Any] = []
        self.closed = threading.Event()  # set whenever a connection ends
        self._conns: list[socket.socket] = []
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        self.accepted += 1
        self._conns.append(conn)
        threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(60)
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
                self.peer_certificates.append(conn.getpeercert())
            self.serve(conn)
        except (OSError, ssl.SSLError):
            pass
        finally:
            try:
                conn.close()
            except OSError:
                pass
            self.closed.set()

    def serve(self, conn: socket.socket) -> None:
        """Echo until the peer closes."""
        got = b""
        while chunk := conn.recv(65536):
            if len(got) < 1 << 16:
                got += chunk[: (1 << 16) - len(got)]
            conn.sendall(chunk)
        self.received.append(got)

    def stop(self) -> None:
        super().stop()
        for conn in self._conns:
            try:
                conn.close()
            except OSError:
                pass


class RecordingUpstream(CountingUpstream):
    """Reads until C{want} bytes (or the peer closes), records them, answers C{b"ok\\n"} and closes."""

    want = 1

    def serve(self, conn: socket.socket) -> None:
        got = b""
        while True:
            chunk = conn.recv(65536)
            got += chunk
            if not chunk or _proxy_header_complete(got, self.want):
                break
        self.received.append(got)
        conn.sendall(b"ok\n")


def _proxy_header_complete(data: bytes, want: int) -> bool:
    if len(data) < 16:
        return False
    if data.startswith(SIGNATURE):
        return len(data) >= 16 + struct.unpack("!H", data[14:16])[0] + want
    return len(data) >= want


def tls_upstream_context(pki: dict[str, Any]) -> ssl.SSLContext:
    """A server context with the upstream certificate that requires a client certificate from the test CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*pki["upstream"])
    ctx.load_verify_locations(pki["ca"])
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def tcp_config(pki: dict[str, Any], port: int, tcp_routes: list[dict[str, Any]], http_upstream: int | None = None, **top: Any) -> dict[str, Any]:
    """The gateway's config: its own certificate and the TCP routes' one, the test CA for clients, C{tcp_routes} and optionally an HTTP route."""
    cert, key = tcp_certificate(pki)
    routes = [{"from": f"tcp+https://{r.pop('host')}", **r} for r in (dict(r) for r in tcp_routes)]
    if http_upstream is not None:
        routes.append({
            "from": "https://localhost", "to": [f"https://127.0.0.1:{http_upstream}"], "tls_custom_ca_file": pki["ca"],
            "tls_client_cert_file": pki["gateway_client"][0], "tls_client_key_file": pki["gateway_client"][1],
        })  # fmt: skip
    return {
        "address": f"tcp:{port}:interface=127.0.0.1",
        "certificates": [{"cert": pki["gateway"][0], "key": pki["gateway"][1]}, {"cert": cert, "key": key}],
        "downstream_mtls": {"ca_file": pki["ca"]},
        "routes": routes,
        **top,
    }


def start_tcp_gateway(start_gateway: Any, tmp_path: Path, config: dict[str, Any], *args: str) -> Any:
    port = int(config["address"].split(":")[1])
    path = tmp_path / f"tcp-{port}.yaml"
    path.write_text(yaml.safe_dump(config))
    return start_gateway(["--config", str(path), *args], port=port)


def new_port() -> int:
    return free_port()


def client_context(pki: dict[str, Any], who: str | None = "alice", version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=pki["ca"])
    if who is not None:
        ctx.load_cert_chain(*pki[who])
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    return ctx


def connect(port: int, ctx: ssl.SSLContext, server_name: str | None, session: ssl.SSLSession | None = None, timeout: float = 20) -> ssl.SSLSocket:
    ctx.check_hostname = False
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return ctx.wrap_socket(raw, server_hostname=server_name, session=session)


def read_until_closed(sock: socket.socket, limit: int = 1 << 20) -> bytes:
    """Everything until the peer closes (or resets: what came before is returned)."""
    data = b""
    try:
        while len(data) < limit:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except (ConnectionResetError, ssl.SSLError, TimeoutError):
        pass
    return data


# --- PROXY protocol v2, from haproxy's proxy-protocol.txt -------------------------------------------------

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def parse_proxy_v2(data: bytes) -> tuple[dict[str, Any], bytes]:
    """A PROXY v2 header at the start of C{data}: its fields and TLVs (SSL sub-TLVs under "ssl"), and the bytes after it."""
    assert data[:12] == SIGNATURE, data[:16]
    ver_cmd, family, length = struct.unpack("!BBH", data[12:16])
    assert ver_cmd >> 4 == 2, "not version 2"
    body, rest = data[16 : 16 + length], data[16 + length :]
    assert len(body) == length, "truncated header"
    out: dict[str, Any] = {"command": ver_cmd & 0xF, "family": family, "tlvs": {}}
    if family == 0x11:
        out["src"] = (socket.inet_ntop(socket.AF_INET, body[0:4]), struct.unpack("!H", body[8:10])[0])
        out["dst"] = (socket.inet_ntop(socket.AF_INET, body[4:8]), struct.unpack("!H", body[10:12])[0])
        pos = 12
    elif family == 0x21:
        out["src"] = (socket.inet_ntop(socket.AF_INET6, body[0:16]), struct.unpack("!H", body[32:34])[0])
        out["dst"] = (socket.inet_ntop(socket.AF_INET6, body[16:32]), struct.unpack("!H", body[34:36])[0])
        pos = 36
    else:
        pos = 0
    out["tlvs"] = _tlvs(body[pos:])
    if 0x20 in out["tlvs"]:
        ssl_value = out["tlvs"][0x20]
        client, verify = struct.unpack("!BI", ssl_value[:5])
        out["ssl"] = {"client": client, "verify": verify, **_tlvs(ssl_value[5:])}
    return out, rest


def _tlvs(data: bytes) -> dict[int, bytes]:
    found: dict[int, bytes] = {}
    pos = 0
    while pos < len(data):
        kind, length = struct.unpack("!BH", data[pos : pos + 3])
        value = data[pos + 3 : pos + 3 + length]
        assert len(value) == length, "truncated TLV"
        assert kind not in found, f"TLV {kind:#x} twice"
        found[kind] = value
        pos += 3 + length
    return found


class LocalTunnel(ThreadedListener):
    """
    A client-side tunnel, as ghostunnel's client mode or stunnel run beside a client that cannot start
    with TLS itself: plain TCP on a loopback port, each connection carried over TLS (a client
    certificate, SNI C{server_name}) to the gateway.  One thread per connection, one non-blocking loop
    (one SSL object is not for two threads at once).
    """

    def __init__(self, gateway_port: int, ctx: ssl.SSLContext, server_name: str) -> None:
        self.gateway_port = gateway_port
        self.ctx = ctx
        self.server_name = server_name
        super().__init__()

    def handle(self, plain: socket.socket) -> None:
        threading.Thread(target=self._carry, args=(plain,), daemon=True).start()

    def _carry(self, plain: socket.socket) -> None:
        import selectors

        try:
            tls = connect(self.gateway_port, self.ctx, self.server_name)
        except (OSError, ssl.SSLError):
            plain.close()
            return
        plain.setblocking(False)
        tls.setblocking(False)
        to_tls, to_plain = b"", b""
        open_sides = 2
        with selectors.DefaultSelector() as selector:
            selector.register(plain, selectors.EVENT_READ)
            selector.register(tls, selectors.EVENT_READ)
            while open_sides == 2 and not self._stopping.is_set():
                for key, _ in selector.select(1) or [(None, None)]:
                    try:
                        if key is not None and key.fileobj is plain:
                            data = plain.recv(65536)
                            if not data:
                                open_sides -= 1
                            to_tls += data
                        elif key is not None or tls.pending():
                            data = tls.recv(65536)
                            if not data:
                                open_sides -= 1
                            to_plain += data
                    except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                        pass
                    except OSError:
                        open_sides = 0
                for sock, attr in ((tls, "to_tls"), (plain, "to_plain")):
                    pending = to_tls if attr == "to_tls" else to_plain
                    while pending:
                        try:
                            sent = sock.send(pending)
                        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                            break
                        except OSError:
                            pending, open_sides = b"", 0
                            break
                        pending = pending[sent:]
                    if attr == "to_tls":
                        to_tls = pending
                    else:
                        to_plain = pending
        for sock in (plain, tls):
            try:
                sock.close()
            except OSError:
                pass
