"""
Forwarded-header rules after the hot-path changes (677599a: the Connection tokens worked out once by the server and
handed to the upstream request filter; on_header and the upstream client look only at names of some lengths; 9913f29:
CR and LF looked for as ints).  Through the in-memory proxy (server protocol, ProxyResource, exchange, HTTP11Agent):
fields a Connection header names are stripped both ways however it is spelled; the gateway-owned fields cannot be
spoofed in any case or with '_'; names as long as Content-Length or Transfer-Encoding that are neither are plain
fields; the framing fields are recognised in every case.
"""

from __future__ import annotations

import pytest

from tests.adversarial.test_whole_response_desync import Gateway, parse_responses

H = b"Host: localhost\r\n"


def upstream_head(fields: bytes, body: bytes = b"") -> tuple[bytes, Gateway]:
    gw = Gateway()
    gw.channel.dataReceived(b"POST /one HTTP/1.1\r\n" + H + fields + b"\r\n" + body)
    _, transport = gw.endpoint.connections[-1]
    return transport.value(), gw


def lowered_names(head: bytes) -> list[bytes]:
    return [line.split(b":", 1)[0].lower() for line in head.split(b"\r\n\r\n")[0].split(b"\r\n")[1:]]


@pytest.mark.parametrize("connection", [
    b"Connection: x-secret, keep-alive\r\n", b"Connection: keep-alive, X-Secret\r\n", b"Connection: X-SECRET\r\n",
    b"Connection: keep-alive\r\nConnection: x-secret\r\n", b"Connection: ,x-secret,\r\n", b"Connection:\tx-secret\t,\tkeep-alive\r\n",
    b"connection: x-secret\r\n", b"CONNECTION: keep-alive,x-secret\r\n",
])  # fmt: skip
def test_fields_the_clients_connection_header_names_never_go_upstream(connection):
    head, _ = upstream_head(connection + b"X-Secret: 1\r\nx-secret: 2\r\nX-Kept: yes\r\nContent-Length: 0\r\n")
    names = lowered_names(head)
    assert b"x-secret" not in names and b"connection" not in names and b"x-kept" in names, head


@pytest.mark.parametrize("name", [
    b"X-Forwarded-Client-Cert", b"x-forwarded-client-cert", b"X-FORWARDED-CLIENT-CERT", b"X_Forwarded_Client_Cert",
    b"x_forwarded_client_cert", b"X-Forwarded_Client-Cert", b"X-Forwarded-For", b"X_Forwarded_For", b"X-Real-IP", b"Forwarded",
])  # fmt: skip
def test_gateway_owned_fields_cannot_be_spoofed_in_any_spelling(name):
    head, _ = upstream_head(name + b": By=spiffe://evil;URI=spiffe://evil\r\nContent-Length: 0\r\n")
    assert b"evil" not in head, head


@pytest.mark.parametrize("name", [b"Content-Lengtx", b"X-Content-Lengt", b"Transfer-Encodinx", b"X-Transfer-Encod", b"Content_Length"])
def test_a_request_field_as_long_as_a_framing_field_but_not_one_frames_nothing(name):
    # Not a framing field: the bytes behind the head are the next request's, not a body (so a 400 for "hello").
    head, gw = upstream_head(name + b": 5\r\n", body=b"hello\r\n\r\n")
    assert head.startswith(b"POST /one HTTP/1.1\r\n") and b"hello" not in head and b"Content-Length: 0" in head, head
    upstream, _ = gw.endpoint.connections[-1]
    upstream.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert [status for status, _, _ in parse_responses(gw.transport.value(), [b"POST", b"GET"])[0]] == [200, 400]


@pytest.mark.parametrize("name", [b"Content-Length", b"content-length", b"CONTENT-LENGTH", b"Content-length", b"cOnTeNt-LeNgTh"])
def test_content_length_is_read_in_every_case(name):
    head, gw = upstream_head(name + b": 5\r\n", body=b"hello")
    assert head.endswith(b"\r\n\r\nhello") and b"Content-Length: 5\r\n" in head, head


@pytest.mark.parametrize("name", [b"Transfer-Encoding", b"transfer-encoding", b"TRANSFER-ENCODING", b"Transfer-encoding"])
def test_transfer_encoding_is_read_in_every_case(name):
    head, gw = upstream_head(name + b": chunked\r\n", body=b"5\r\nhello\r\n0\r\n\r\n")
    assert b"hello" in head, head


@pytest.mark.parametrize("raw", [
    b"POST /one HTTP/1.1\r\n" + H + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    b"POST /one HTTP/1.1\r\n" + H + b"Content-Length : 5\r\n\r\nhello",
    b"POST /one HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked \r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
    b"POST /one HTTP/1.1\r\n" + H + b"Content-Length: 5 \r\nTransfer-Encoding: Chunked\r\n\r\n0\r\n\r\n",
    b"POST /one HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nTransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST /one HTTP/1.1\r\n" + H + b"Content-length: 5\r\nContent-Length: 6\r\n\r\nhello!",
])  # fmt: skip
def test_framing_spellings_that_are_ambiguous_are_refused_before_anything_goes_upstream(raw):
    gw = Gateway()
    gw.channel.dataReceived(raw)
    assert gw.endpoint.connections == [] and gw.transport.value().startswith(b"HTTP/1.1 400 "), gw.transport.value()


@pytest.mark.parametrize("fields", [
    b"Connection: x-internal, keep-alive\r\nX-Internal: s3cret\r\n", b"Connection: X-INTERNAL\r\nx-internal: s3cret\r\n",
    b"connection: keep-alive\r\nConnection: x-internal\r\nX-Internal: s3cret\r\n", b"X-Internal: s3cret\r\nConnection: ,x-Internal\r\n",
])  # fmt: skip
def test_fields_the_upstreams_connection_header_names_never_reach_the_client(fields):
    gw = Gateway()
    gw.channel.dataReceived(b"GET /one HTTP/1.1\r\n" + H + b"\r\n")
    upstream, _ = gw.endpoint.connections[-1]
    upstream.dataReceived(b"HTTP/1.1 200 OK\r\n" + fields + b"X-Public: yes\r\nContent-Length: 2\r\n\r\nok")
    out = gw.transport.value()
    assert b"s3cret" not in out and b"X-Public: yes" in out and out.endswith(b"\r\n\r\nok"), out


@pytest.mark.parametrize("name", [b"Content-length", b"CONTENT-LENGTH", b"content-length"])
def test_an_upstream_content_length_in_any_case_frames_the_response(name):
    gw = Gateway()
    gw.channel.dataReceived(b"GET /one HTTP/1.1\r\n" + H + b"\r\n")
    upstream, _ = gw.endpoint.connections[-1]
    upstream.dataReceived(b"HTTP/1.1 200 OK\r\n" + name + b": 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil")
    out = gw.transport.value()
    assert out.endswith(b"\r\n\r\nok") and b"evil" not in out and out.count(b"HTTP/1.1 ") == 1, out


@pytest.mark.parametrize("name", [b"Transfer-encoding", b"TRANSFER-ENCODING"])
def test_an_upstream_transfer_encoding_in_any_case_frames_the_response(name):
    gw = Gateway()
    gw.channel.dataReceived(b"GET /one HTTP/1.1\r\n" + H + b"\r\n")
    upstream, _ = gw.endpoint.connections[-1]
    upstream.dataReceived(b"HTTP/1.1 200 OK\r\n" + name + b": chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n")
    (response,), rest = parse_responses(gw.transport.value(), [b"GET"])
    # read as chunked: the body is "ok", framed by the gateway (a chunked body that came whole gets its Content-Length),
    # and the upstream's own framing field is not passed on
    assert response[2] == b"ok" and rest == b"" and name + b":" not in response[1], response
    assert b"Content-Length: 2" in response[1] or b"Transfer-Encoding: chunked" in response[1], response


@pytest.mark.parametrize("name", [b"X-Content-Lengt", b"Content-Lengtx", b"X-Transfer-Encod", b"Transfer-Encodinx"])
def test_an_upstream_field_as_long_as_a_framing_field_but_not_one_is_a_plain_field(name):
    gw = Gateway()
    gw.channel.dataReceived(b"GET /one HTTP/1.1\r\n" + H + b"\r\n")
    upstream, _ = gw.endpoint.connections[-1]
    upstream.dataReceived(b"HTTP/1.1 200 OK\r\n" + name + b": 99\r\nContent-Length: 2\r\n\r\nok")
    out = gw.transport.value()
    assert out.endswith(b"\r\n\r\nok") and name + b": 99\r\n" in out and b"Content-Length: 2\r\n" in out, out
