"""
The IResponse contract without twisted.web.client imported up front (mtlsgate.http.outcomes): the outcomes made are
Twisted's own classes, recognised as such; the origin handed to endpoint factories parses as twisted.web.client.URI does;
and the proxy's common path (a whole response, a streamed body told by body_done) imports none of it.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure
from twisted.web import client

from mtlsgate.http import outcomes
from mtlsgate.http.client import OriginURI, parse_origin
from tests.conftest import subprocess_env


@pytest.mark.parametrize("name", ["ResponseDone", "PotentialDataLoss", "ResponseFailed", "ResponseNeverReceived", "RequestGenerationFailed"])
def test_an_outcome_is_twisted_s_own_class(name):
    made = getattr(outcomes, name)([Failure(ConnectionLost())]) if "Failed" in name or "Never" in name else getattr(outcomes, name)()
    assert type(made) is getattr(client, name)
    assert Failure(made).check(getattr(client, name))


def test_the_predicates_recognise_twisted_s_classes_and_nothing_else():
    assert outcomes.is_response_done(client.ResponseDone()) and not outcomes.is_response_done(client.PotentialDataLoss())
    assert outcomes.is_clean_end(client.ResponseDone()) and outcomes.is_clean_end(client.PotentialDataLoss())
    assert outcomes.wraps_reasons(client.ResponseFailed([])) and outcomes.wraps_reasons(client.ResponseNeverReceived([]))
    for other in (ConnectionLost(), ValueError("ResponseDone"), client.RequestGenerationFailed([]), None):
        assert not outcomes.is_clean_end(other) and not outcomes.is_response_done(other)
    assert not outcomes.wraps_reasons(ConnectionLost()) and not outcomes.wraps_reasons(client.ResponseDone())


_ORIGINS = [
    b"https://upstream.test", b"http://upstream.test", b"https://upstream.test:8443", b"http://127.0.0.1:8080", b"https://[::1]:9443",
    b"https://[::1]", b"HTTPS://Upstream.Test:443", b"https://user@host:1", b"https://host:", b"https://host:x", b"https://host:+7",
    b" https://host:7 ", b"wss://host", b"ftp://host", b"https://", b"host:80", b"https://[::1",
]  # fmt: skip


def _same(origin: bytes) -> None:
    try:
        theirs = client.URI.fromBytes(origin)
    except ValueError:
        with pytest.raises(ValueError):
            OriginURI.fromBytes(origin)
        return
    ours = OriginURI.fromBytes(origin)
    for attribute in ("scheme", "netloc", "host", "port", "path", "params", "query", "fragment", "originForm"):
        assert getattr(ours, attribute) == getattr(theirs, attribute), (origin, attribute)
    assert ours.toBytes() == theirs.toBytes()


@pytest.mark.parametrize("origin", _ORIGINS)
def test_an_origin_parses_as_twisted_s_uri_parses_it(origin):
    _same(origin)


@given(st.sampled_from([b"http", b"https", b"HTTP", b"wss", b"x"]), st.binary(max_size=24))
def test_any_origin_parses_as_twisted_s_uri_parses_it(scheme, authority):
    _same(scheme + b"://" + authority.replace(b"/", b"").replace(b"?", b"").replace(b"#", b""))


def test_parse_origin_keeps_its_host_header_form():
    assert parse_origin(b"https://[::1]:9443")[1] == b"[::1]:9443"
    assert parse_origin(b"https://upstream.test")[1] == b"upstream.test"
    with pytest.raises(ValueError):
        parse_origin(b"ftp://upstream.test")


_PROBE = r"""
import sys
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet import defer
from mtlsgate.http.client import HTTP11Agent
from mtlsgate.http.headers import HeaderPairs

class Endpoint:
    def endpointForURI(self, uri):
        return self
    def connect(self, factory):
        self.protocol = factory.buildProtocol(None)
        self.protocol.makeConnection(StringTransport())
        return defer.succeed(self.protocol)

class Relay:  # the proxy's relay, as the upstream client sees it: told a whole body by body_done()
    def __init__(self): self.data, self.done = b"", False
    def makeConnection(self, transport): pass
    def dataReceived(self, data): self.data += data
    def body_done(self): self.done = True
    def connectionLost(self, reason): raise AssertionError(reason)

class Receiver:
    def __init__(self, whole): self.whole, self.got = whole, None
    def upstream_response(self, response): response.deliverBody(self.relay_to(response))
    def relay_to(self, response): self.got = Relay(); return self.got
    def upstream_failed(self, failure): raise AssertionError(failure)

class Whole(Receiver):
    def upstream_whole(self, response, body): self.got = body

endpoint = Endpoint()
agent = HTTP11Agent(Clock(), endpoint)
whole = Whole(True)
agent.send(b"GET", b"https://upstream.test", b"/", HeaderPairs([]), None, whole)
endpoint.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
assert whole.got == b"ok", whole.got
streamed = Receiver(False)
agent.send(b"GET", b"https://upstream.test", b"/", HeaderPairs([]), None, streamed)
endpoint.protocol.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n")
endpoint.protocol.dataReceived(b"0\r\n\r\n")
assert streamed.got.done and streamed.got.data == b"ok"
print(" ".join(m for m in ("twisted.web.client", "twisted.web._newclient", "twisted.web.http") if m in sys.modules))
"""


def test_the_common_path_imports_no_outcome(tmp_path):
    """A whole response and a streamed body that came whole make no outcome: twisted.web.client stays out (about 1.4 MiB)."""
    result = subprocess.run([sys.executable, "-c", _PROBE], cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
