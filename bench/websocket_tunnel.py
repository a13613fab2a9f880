"""
WebSocket tunnel throughput, through the gateway against straight to the upstream (issue #14).

    python bench/websocket_tunnel.py

Starts the tests' mTLS WebSocket upstream (the C{websockets} library) and a gateway in front of it
(certificates made per run), then measures, with the C{websockets} sync client over mTLS: 256 MiB
sent in 1 MiB binary messages (best of 3), and round trips of 100-byte text messages one at a time;
each straight to the upstream and through the gateway.  Prints the gateway's peak RSS.  Needs the
checkout (it uses tests/), not only the installed package.
"""

from __future__ import annotations

import pathlib
import socket
import sys
import tempfile
import time
from typing import Any, Callable

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import yaml  # noqa: E402
from websockets.sync.client import ClientConnection, connect  # noqa: E402

from mtlsgate.tls.pki import DevCA  # noqa: E402
from tests.conftest import TWISTD, Proc, free_port, gateway_config, subprocess_env, wait_for_port  # noqa: E402
from tests.websocket_peers import WebSocketUpstream, client_context, ws_connect  # noqa: E402

CHUNK = bytes(range(256)) * 4096  # 1 MiB


def bulk(ws: ClientConnection, mib: int = 256) -> float:
    start = time.monotonic()
    for _ in range(mib):
        ws.send(CHUNK)
    ws.send("end")
    assert ws.recv(timeout=300) == str(mib << 20)
    return mib / (time.monotonic() - start)


def round_trips(ws: ClientConnection, n: int = 5000) -> float:
    start = time.monotonic()
    for _ in range(n):
        ws.send("x" * 100)
        ws.recv(timeout=30)
    return n / (time.monotonic() - start)


def main() -> None:
    d = pathlib.Path(tempfile.mkdtemp(prefix="ws-bench-"))
    ca = DevCA.create(str(d / "ca"), name="bench CA")
    pki: dict[str, Any] = {"ca": str(d / "ca" / "ca.pem")}
    for name, issued in [
        ("gateway", ca.issue_server(["localhost", "127.0.0.1"])), ("upstream", ca.issue_server(["localhost", "127.0.0.1"])),
        ("gateway_client", ca.issue_client("gateway")), ("alice", ca.issue_client("alice")),
    ]:  # fmt: skip
        issued.write(str(d / f"{name}.pem"), str(d / f"{name}-key.pem"))
        pki[name] = (str(d / f"{name}.pem"), str(d / f"{name}-key.pem"))
    upstream = WebSocketUpstream(pki)
    port = free_port()
    (d / "gw.yaml").write_text(yaml.safe_dump(gateway_config(pki, port, [f"https://127.0.0.1:{upstream.port}"], {"allow_websockets": True})))
    gateway = Proc([*TWISTD, "-n", "--pidfile=", "--logfile=-", "mtlsgate", "--config", str(d / "gw.yaml")], d / "gw.log", cwd=d, env=subprocess_env())
    try:
        wait_for_port(port, gateway.popen)

        def direct(path: str) -> Callable[[], ClientConnection]:
            return lambda: connect(f"wss://localhost:{upstream.port}{path}", sock=socket.create_connection(("127.0.0.1", upstream.port)),
                                   ssl=client_context(pki, "gateway_client"), server_hostname="localhost", max_size=None, compression=None)  # fmt: skip

        for label, make in [("direct", direct("/sink")), ("through the gateway", lambda: ws_connect(port, "/sink", pki))]:
            rates = []
            for _ in range(3):
                with make() as ws:
                    rates.append(bulk(ws))
            print(f"{label:20} {max(rates):6.0f} MiB/s  (256 MiB in 1 MiB messages, best of 3)")
        for label, make in [("direct", direct("/echo")), ("through the gateway", lambda: ws_connect(port, "/echo", pki))]:
            with make() as ws:
                print(f"{label:20} {round_trips(ws):6.0f} round trips/s  (100-byte text messages, one at a time)")
        with open(f"/proc/{gateway.popen.pid}/status") as f:
            print("gateway peak RSS:", next(line.split(None, 1)[1].strip() for line in f if line.startswith("VmHWM:")))
    finally:
        gateway.stop()
        upstream.stop()


if __name__ == "__main__":
    main()
