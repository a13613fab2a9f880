"""
What an upstream's response framing may make the gateway forward: headers the upstream marked as
hop-by-hop in its Connection header never reach the client, and a read-until-close body that the
upstream's connection reset cut short never reaches the client as a complete response.
"""

from __future__ import annotations

import socket
import ssl
import threading

from tests.conftest import gateway_args, https_request
from tests.e2e.test_failing_upstreams import ok, read_until_closed, reset, scripted  # noqa: F401  (scripted: a fixture)


def test_headers_named_in_the_upstreams_connection_header_are_not_forwarded(start_gateway, pki, scripted):  # noqa: F811
    def names_a_hop_by_hop_header(conn: ssl.SSLSocket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close, X-Internal-Token\r\nX-Internal-Token: s3cret\r\nX-Public: yes\r\n"
                     b"Content-Length: 3\r\n\r\nhi\n")  # fmt: skip

    upstream = scripted(names_a_hop_by_hop_header)
    gateway = start_gateway(gateway_args(pki, upstream.port))
    status, headers, body = https_request(gateway.port, "/", ca=pki["ca"], cert=pki["alice"])
    assert (status, body, headers.get("x-public")) == (200, b"hi\n", "yes")
    assert "x-internal-token" not in headers


def test_a_body_until_close_cut_by_a_reset_is_not_passed_on_as_complete(start_gateway, pki, scripted):  # noqa: F811
    client_has_part_of_the_body = threading.Event()

    def reset_mid_body_without_length(conn: ssl.SSLSocket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n" + b"x" * 10000)
        client_has_part_of_the_body.wait(15)
        reset(conn)  # RST, no TLS close_notify: the body's end is unknown

    upstream = scripted(reset_mid_body_without_length, ok)
    gateway = start_gateway(gateway_args(pki, upstream.port))
    ctx = ssl.create_default_context(cafile=pki["ca"])
    ctx.load_cert_chain(*pki["alice"])
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", gateway.port), timeout=15), server_hostname="localhost") as s:
        s.sendall(b"GET /big HTTP/1.1\r\nHost: localhost\r\n\r\n")
        received = read_until_closed(s, lambda data: b"\r\n\r\n" in data and client_has_part_of_the_body.set())
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"Transfer-Encoding: chunked" in head
    assert not body.endswith(b"0\r\n\r\n")  # no last chunk: the client can tell the body is short
    gateway.proc.wait_for_log(f"upstream https://127.0.0.1:{upstream.port} broke off the response")
    assert https_request(gateway.port, "/next", ca=pki["ca"], cert=pki["alice"])[::2] == (200, b"healthy\n")
