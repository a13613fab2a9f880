"""
Attack class: an HTTP/2 request whose fields or framing an HTTP/1.1 upstream would read differently
(HTTP/2-to-HTTP/1.1 downgrade smuggling: a Content-Length that disagrees with the DATA sent,
connection-specific headers such as Transfer-Encoding, CR/LF/NUL in a value to split the upstream's
request, upper-case or non-token names, control characters).  A raw h2 client over a real mTLS
socket, validation off, sends exactly these; the gateway refuses each (GOAWAY PROTOCOL_ERROR from h2,
or 400 for what only HTTP/1.1 forbids), and the upstream never receives a request for it.
"""

from __future__ import annotations

import json
import uuid

import pytest
from h2.errors import ErrorCodes

from tests.conftest import gateway_args, gateway_starter, start_echo_upstream, started_processes
from tests.h2peer import H2Client, Stream, simple_get


@pytest.fixture(scope="module")
def gateway(pki, tmp_path_factory):
    """One gateway (and echo upstream) for the module: no test changes its state, and each finds its own requests by a marker."""
    tmp = tmp_path_factory.mktemp("http2-smuggling")
    with started_processes() as procs:
        upstream, _ = start_echo_upstream(procs, pki, tmp)
        yield gateway_starter(procs, tmp)(gateway_args(pki, upstream, "--timeout", "30s"))


def _access_lines(gateway) -> str:
    return "\n".join(line for line in gateway.proc.output().splitlines() if " HTTP/2\" " in line)  # access lines (also as a worker's)


def _assert_never_forwarded(gateway, pki, marker: str) -> None:
    after = uuid.uuid4().hex  # this test's own request after, in a log the module's tests share
    assert simple_get(gateway.port, pki, f"/after/{after}").status == 200  # the gateway serves on; its access lines are written by now
    gateway.proc.wait_for_log(f'"GET /after/{after} HTTP/2" 200')
    assert marker not in _access_lines(gateway)  # neither forwarded nor answered by the proxy: refused before it


@pytest.mark.parametrize("declared, sent", [(10, 5), (5, 10), (0, 1)])
def test_content_length_disagreeing_with_data_is_refused_and_never_completes_upstream(gateway, pki, declared, sent):
    marker = uuid.uuid4().hex
    with H2Client(gateway.port, pki) as c:
        if declared:
            sid = c.request("POST", f"/{marker}", headers=[(b"content-length", b"%d" % declared)], end=False)
        else:
            # Content-Length: 0 makes the request whole at HEADERS: were the DATA frame to arrive a turn later, the upstream
            # could answer that whole, well-formed request (the extra byte is never forwarded either way). In one flight with
            # its DATA, h2 refuses the stream before the request exists.
            sid = c.conn.get_next_available_stream_id()
            fields = [(b":method", b"POST"), (b":authority", b"localhost"), (b":scheme", b"https"), (b":path", f"/{marker}".encode())]
            c.conn.send_headers(sid, fields + [(b"content-length", b"0")], end_stream=False)
            c.streams[sid] = Stream()
        c.conn.send_data(sid, b"x" * sent, end_stream=True)
        c.flush()
        stream = c.response(sid)
        assert stream.status != 200
        assert c.goaway is not None and c.goaway.error_code == ErrorCodes.PROTOCOL_ERROR
    out = gateway.proc.output()
    assert f'"POST /{marker} HTTP/2" 200' not in out
    assert "Traceback" not in out


@pytest.mark.parametrize(
    "field",
    [
        (b"transfer-encoding", b"chunked"), (b"connection", b"keep-alive"), (b"keep-alive", b"1"), (b"upgrade", b"websocket"),
        (b"proxy-connection", b"x"), (b"te", b"chunked"), (b"Content-Length", b"5"), (b"X-Upper", b"1"), (b"x-crlf", b"a\r\nX-Injected: 1"),
        (b"x-lf", b"a\nb"), (b"x-nul", b"a\x00b"), (b"x-cr", b"a\rb"), (b"x-leading", b" a"), (b"name with space", b"v"), (b"x:colon", b"v"),
        (b"", b"empty name"),
    ],
)  # fmt: skip
def test_headers_h2_refuses_end_the_connection_and_never_reach_the_upstream(gateway, pki, field):
    marker = uuid.uuid4().hex
    with H2Client(gateway.port, pki) as c:
        c.request("GET", f"/{marker}", headers=[field])
        c.read_until_closed()
        assert c.goaway is not None and c.goaway.error_code == ErrorCodes.PROTOCOL_ERROR
    _assert_never_forwarded(gateway, pki, marker)


@pytest.mark.parametrize("field", [(b"x(y)", b"v"), (b"x/y", b"v"), (b'x"y', b"v"), (b"x-ctl", b"a\x01b"), (b"x-del", b"a\x7fb"), (b"x-esc", b"\x1b[31m")])
def test_what_only_http11_forbids_is_a_400_and_never_reaches_the_upstream(gateway, pki, field):
    marker = uuid.uuid4().hex
    with H2Client(gateway.port, pki) as c:
        stream = c.response(c.request("GET", f"/{marker}", headers=[field]))
        assert stream.status == 400
        assert c.goaway is None  # a stream refused, the connection carries on
        assert c.response(c.request("GET", "/next")).status == 200
    _assert_never_forwarded(gateway, pki, marker)


def test_authority_and_host_disagreeing_is_refused(gateway, pki):
    marker = uuid.uuid4().hex
    with H2Client(gateway.port, pki) as c:
        c.request("GET", f"/{marker}", headers=[(b"host", b"other.example")])
        c.read_until_closed()
        assert c.goaway is not None and c.goaway.error_code == ErrorCodes.PROTOCOL_ERROR
    _assert_never_forwarded(gateway, pki, marker)


def test_host_alone_routes_when_authority_is_absent(gateway, pki):
    with H2Client(gateway.port, pki) as c:
        stream = c.response(c.request("GET", "/h", authority=None, headers=[(b"host", b"localhost")]))
        unknown = c.response(c.request("GET", "/h", authority=None, headers=[(b"host", b"nowhere.example")]))
    assert stream.status == 200 and json.loads(bytes(stream.body))["headers"]["x-forwarded-host"] == ["localhost"]
    assert unknown.status == 404


def test_the_upstream_sees_lowercase_token_names_and_one_cookie_header(gateway, pki):
    with H2Client(gateway.port, pki) as c:
        stream = c.response(c.request("GET", "/c", headers=[(b"cookie", b"a=1"), (b"cookie", b"b=2"), (b"x-obs", b"caf\xc3\xa9")]))
    headers = json.loads(bytes(stream.body))["headers"]
    assert headers["cookie"] == ["a=1; b=2"]
    assert headers["x-obs"] == ["caf\xc3\xa9"]  # obs-text passes, as over HTTP/1.1


def test_path_rules_hold_over_http2_too(gateway, pki):
    with H2Client(gateway.port, pki) as c:
        dots = c.response(c.request("GET", "/a/../admin"))
        fragment = c.response(c.request("GET", "/a#frag"))
        star = c.response(c.request("GET", "*"))
        connect = c.response(c.request("TRACE", "/"))
    assert (dots.status, fragment.status, star.status, connect.status) == (400, 400, 400, 405)
