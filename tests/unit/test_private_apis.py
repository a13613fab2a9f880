"""
The private Twisted APIs mtlsgate still leans on, each checked here so that an upgrade of Twisted that
changes one fails this test by name, not a request at run time.  (The upstream side of the
HTTP/1.1 engine is due to replace all of them: issue #13.)
"""

from __future__ import annotations

import inspect

from twisted.internet.task import Clock


def test_http_connection_pool_has_a_replaceable_protocol_factory():
    from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory

    pool = HTTPConnectionPool(Clock())
    assert pool._factory is _HTTP11ClientFactory  # mtlsgate.upstream._bounded_pool replaces it
    assert callable(getattr(pool, "_putConnection", None))  # mtlsgate.upstream overrides it
    assert list(inspect.signature(_HTTP11ClientFactory.__init__).parameters)[1:3] == ["quiescentCallback", "metadata"]


def test_http11_client_protocol_exposes_its_parser_and_the_parser_its_state():
    from twisted.internet.testing import StringTransport
    from twisted.web._newclient import STATUS, HTTP11ClientProtocol, HTTPClientParser

    assert HTTP11ClientProtocol()._parser is None  # mtlsgate.upstream._BoundedClientProtocol bounds it
    parser = HTTPClientParser(None, lambda rest: None)
    parser.makeConnection(StringTransport())
    assert parser.state == STATUS and isinstance(parser.MAX_LENGTH, int)
