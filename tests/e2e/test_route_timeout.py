"""
The route timeout is the upstream's time: a client that uploads slowly (but steadily) is not cut
off with a 504, and a slow upstream still is.
"""

from __future__ import annotations

import socket
import ssl
import time

from tests.conftest import echo_json, gateway_args, https_request


def test_a_slow_upload_longer_than_the_route_timeout_is_not_a_504(start_gateway, pki, echo_upstream):
    gateway = start_gateway(gateway_args(pki, echo_upstream, "--timeout", "1s"))
    ctx = ssl.create_default_context(cafile=pki["ca"])
    ctx.load_cert_chain(*pki["alice"])
    chunks = [b"%02d" % i for i in range(20)]  # 40 bytes in 20 pieces, 0.1s apart: 2s on a 1s timeout
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", gateway.port), timeout=15), server_hostname="localhost") as s:
        s.sendall(b"POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 40\r\n\r\n")
        started = time.monotonic()
        for chunk in chunks:
            time.sleep(0.1)  # the pace of the upload, not synchronisation
            s.sendall(chunk)
        assert time.monotonic() - started >= 2.0
        answer = b""
        while b"}\n" not in answer and (data := s.recv(65536)):
            answer += data
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    assert echo_json(answer.partition(b"\r\n\r\n")[2])["body_bytes"] == 40
    status, _, _ = https_request(gateway.port, "/slow/2", ca=pki["ca"], cert=pki["alice"])
    assert status == 504  # the upstream's own slowness still counts
    assert "Traceback" not in gateway.proc.output()
