"""
The upstream HTTP/1.1 client: an L{IAgent} on httptools (llhttp) with a keep-alive pool per origin.

It replaces Twisted's L{Agent} and C{HTTPConnectionPool} on the proxy's hot path and keeps their
public contract (L{IAgent}, L{IResponse}, C{deliverBody} with a push-producer transport, the
C{ResponseDone} / C{PotentialDataLoss} / C{ResponseFailed} / C{ResponseNeverReceived} outcomes), so
the proxy's exchange works with either.  The design (pool, keep-alive rules, retries, back-pressure)
is in docs/engine.md.
"""

from __future__ import annotations

import re
from typing import Any, Callable
from urllib.parse import urlparse, urlunparse

import attrs
from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser
from twisted.internet import defer
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.interfaces import IConsumer, IHandshakeListener, IPushProducer, IReactorTime, IStreamClientEndpoint, ITCPTransport
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IAgentEndpointFactory, IBodyProducer, IClientRequest, IResponse
from zope.interface import classImplements

from mtlsgate.http.interfaces import IResponseReceiver

# The IResponse contract's outcomes, Twisted's classes made on first use (twisted.web.client is imported then, not here).
from mtlsgate.http.outcomes import PotentialDataLoss, RequestGenerationFailed, ResponseDone, ResponseFailed, ResponseNeverReceived

log = Logger(namespace="mtlsgate.http.client")

IDLE_TIMEOUT = 60.0  # seconds a pooled connection may sit idle before it is closed (no configuration key: docs/engine.md)
MAX_IDLE_PER_ORIGIN = 64  # idle connections kept per origin; more are closed when their response ends
DEFAULT_MAX_HEADER_SIZE = 65536

# Methods whose request may be sent again on a fresh connection when a reused one turns out to be dead (Twisted's list).
IDEMPOTENT = frozenset([b"GET", b"HEAD", b"OPTIONS", b"DELETE", b"TRACE"])
_NO_BODY_STATUS = frozenset([204, 304])
_FRAMING = frozenset([b"content-length", b"transfer-encoding", b"connection"])  # the client frames the request itself
_FRAMING_UPGRADE = _FRAMING | {b"upgrade"}
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_TARGET = re.compile(rb"[\x21-\x7e]+\Z")


class BytesBody:
    """A request body known in advance (a health check's, a test's): written whole at once, its length given."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.length = len(data)

    def startProducing(self, consumer: Any) -> defer.Deferred[None]:
        consumer.write(self.data)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


classImplements(BytesBody, IBodyProducer)


def split_url(uri: bytes) -> tuple[bytes, bytes]:
    """
    An absolute URL's origin part (C{scheme://authority}, the key an agent keeps its origins by) and its request
    target in origin form (as L{URI.originForm} has it: no fragment, C{/} when empty); shared by both agents.
    """
    start = uri.find(b"://")
    if start == -1:
        raise ValueError(f"not an absolute URL: {uri!r}")
    end = len(uri)
    for stop in (b"/", b"?", b"#"):
        i = uri.find(stop, start + 3)
        if i != -1 and i < end:
            end = i
    base, rest = uri[:end], uri[end:]
    rest = rest.partition(b"#")[0]
    if not rest.startswith(b"/"):
        rest = b"/" + rest
    return base, rest


@attrs.frozen
class OriginURI:
    """
    An origin part of a URL (from L{split_url}), parsed as C{twisted.web.client.URI.fromBytes} parses one: what
    L{IAgentEndpointFactory.endpointForURI} is given (the attributes and methods of a C{URI}, path empty), without
    importing C{twisted.web.client} (L{mtlsgate.http.outcomes}).
    """

    scheme: bytes
    netloc: bytes
    host: bytes  # brackets of an IPv6 literal stripped
    port: int
    path: bytes = b""
    params: bytes = b""
    query: bytes = b""
    fragment: bytes = b""

    @classmethod
    def fromBytes(cls, uri: bytes) -> OriginURI:
        """C{URI.fromBytes}'s parse (and its errors: C{ValueError}): the port given, else 443 for https and wss, else 80."""
        scheme, netloc, path, params, query, fragment = urlparse(uri.strip())
        default = 443 if scheme in (b"https", b"wss") else 80
        host, port = netloc, default
        if b":" in netloc:
            host, _, digits = netloc.rpartition(b":")
            try:
                port = int(digits)
            except ValueError:
                host, port = netloc, default
        return cls(scheme, netloc, host.strip(b"[]"), port, path, params, query, fragment)

    def toBytes(self) -> bytes:
        return urlunparse((self.scheme, self.netloc, self.path, self.params, self.query, self.fragment))

    @property
    def originForm(self) -> bytes:
        return urlunparse((b"", b"", self.path, self.params, self.query, b"")) or b"/"


def parse_origin(base: bytes) -> tuple[OriginURI, bytes]:
    """An origin part from L{split_url}, parsed (http or https with a host, else C{ValueError}), and its authority as sent (C{Host} / C{:authority})."""
    parsed = OriginURI.fromBytes(base)
    if parsed.scheme not in (b"http", b"https") or not parsed.host:
        raise ValueError(f"unsupported URL {base!r}")
    host = b"[" + parsed.host + b"]" if b":" in parsed.host else parsed.host
    if (parsed.scheme, parsed.port) not in ((b"http", 80), (b"https", 443)):
        host = b"%b:%d" % (host, parsed.port)
    return parsed, host


def check_request(method: bytes, target: bytes) -> None:
    """C{ValueError} unless C{method} is a token and C{target} visible ASCII: what either agent puts on the wire."""
    if not _TOKEN.match(method):
        raise ValueError(f"invalid method {method!r}")
    if not _TARGET.match(target):
        raise ValueError(f"invalid request target {target!r}")


class ResponseHeadersTooLarge(Exception):
    """An upstream's status line and headers went past the route's C{max_response_header_size}."""


class UpstreamProtocolError(Exception):
    """The upstream broke HTTP/1.1 (a malformed status line, header or chunk; an unexpected 101; bytes nobody asked for)."""


# --- the request ------------------------------------------------------------------------------------


@attrs.define(slots=True)
class ClientRequest:
    """One request as the client sends it (and as L{IResponse.request} shows it)."""

    method: bytes
    absoluteURI: bytes
    headers: Headers
    target: bytes = b"/"
    body: Any = None  # an IBodyProducer
    host: bytes = b""  # the Host value when the headers hold none
    persistent: bool = True
    upgrade: bytes | None = None  # the protocol asked for with Upgrade (and Connection: upgrade); never pooled

    def head(self) -> bytes:
        """The request line and headers, framing included, as one string."""
        parts = [self.method, b" ", self.target, b" HTTP/1.1\r\n"]
        headers = self.headers
        skip = _FRAMING if self.upgrade is None else _FRAMING_UPGRADE
        pairs = getattr(headers, "pairs", None)  # a HeaderPairs (mtlsgate.http.headers): the fields in order, written as they are
        if pairs is not None:
            has_host = False
            fields: list[bytes] = []
            if getattr(headers, "framed_by_client", False):  # no framing or Connection field among them: only Host to look for
                for name, value in pairs:
                    if len(name) == 4 and name.lower() == b"host":
                        has_host = True
                    fields += (name, b": ", value, b"\r\n")
            else:
                for name, value in pairs:
                    lowered = name.lower()
                    if lowered in skip:
                        continue
                    if lowered == b"host":
                        has_host = True
                    fields += (name, b": ", value, b"\r\n")
            if not has_host:
                parts += (b"Host: ", self.host, b"\r\n")
            parts += fields
        else:
            if not headers.hasHeader(b"host"):
                parts += (b"Host: ", self.host, b"\r\n")
            for name, values in headers.getAllRawHeaders():
                if name.lower() in skip:
                    continue
                for value in values:
                    parts += (name, b": ", value, b"\r\n")
        body = self.body
        if body is None:
            if self.method in (b"POST", b"PUT"):
                parts.append(b"Content-Length: 0\r\n")
        elif body.length is UNKNOWN_LENGTH:
            parts.append(b"Transfer-Encoding: chunked\r\n")
        else:
            parts += (b"Content-Length: %d\r\n" % body.length,)
        if self.upgrade is not None:
            parts += (b"Connection: Upgrade\r\nUpgrade: ", self.upgrade, b"\r\n")
        elif not self.persistent:
            parts.append(b"Connection: close\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)


classImplements(ClientRequest, IClientRequest)


class _BodySink:
    """Where the request body's producer writes: frames it (chunked, or enforces the Content-Length) onto the connection."""

    def __init__(self, transport: Any, length: int | None, on_error: Callable[[Failure], None]) -> None:
        self._transport = transport
        self.remaining = length  # None: chunked
        self._on_error = on_error

    def write(self, data: bytes) -> None:
        if not data:
            return
        if self.remaining is None:
            self._transport.write(b"%x\r\n%b\r\n" % (len(data), data))
            return
        if len(data) > self.remaining:
            self._on_error(Failure(ValueError(f"the request body producer wrote more than its length ({self.remaining} bytes left)")))
            return
        self.remaining -= len(data)
        self._transport.write(data)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self._transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self._transport.unregisterProducer()


classImplements(_BodySink, IConsumer)


# --- the response -----------------------------------------------------------------------------------

# How a body ended that was told to its protocol by body_done() (L{UpstreamResponse.done}), or came whole (L{UpstreamResponse.settle}):
# a stand-in, made a Failure(ResponseDone()) only when deliverBody tells it.
_BODY_DONE: Any = object()


class UpstreamResponse:
    """
    An upstream response: status and headers, and a body delivered to the protocol given to
    L{deliverBody}, whose transport (this object) pauses, resumes and stops the upstream connection.
    Body bytes that arrive before L{deliverBody} are kept until then.
    """

    previousResponse = None

    def __init__(self, connection: UpstreamConnection, request: ClientRequest, version: tuple[bytes, int, int], code: int, phrase: bytes,
                 headers: Headers | list[tuple[bytes, bytes]], length: Any) -> None:  # fmt: skip
        self._connection: UpstreamConnection | None = connection
        self.request = request
        self.version = version
        self.code = code
        self.phrase = phrase
        # The fields as received, (name, value) in order; headers (a twisted Headers) is built from them when asked for.
        self.raw_headers: list[tuple[bytes, bytes]] | None = None
        self._headers: Headers | None = None
        if isinstance(headers, Headers):
            self._headers = headers
        else:
            self.raw_headers = headers
        self.length = length
        self._protocol: Any = None
        self._buffer: list[bytes] = []
        self._end: Failure | None = None  # how the body ended, when it did before deliverBody
        self.finished = False  # the body's protocol was told connectionLost (or will be, at deliverBody)

    @property
    def headers(self) -> Headers:
        headers = self._headers
        if headers is None:
            headers = self._headers = Headers()
            for name, value in self.raw_headers or ():
                headers.addRawHeader(name, value)
            self.raw_headers = None  # from now on the Headers is the response's fields
        return headers

    def setPreviousResponse(self, response: IResponse) -> None:
        self.previousResponse = response

    def deliverBody(self, protocol: Any) -> None:
        if self._protocol is not None:
            raise RuntimeError("the response body was delivered already")
        self._protocol = protocol
        protocol.makeConnection(self)
        buffered, self._buffer = self._buffer, []
        for data in buffered:
            if self.finished:
                break  # stopped from the protocol itself
            protocol.dataReceived(data)
        if self._end is not None:
            self._tell(self._end if self._end is not _BODY_DONE else Failure(ResponseDone()))

    def settle(self, body: bytes) -> None:
        """
        The whole response came in one read and was handed over whole (L{IResponseReceiver}'s C{upstream_whole}): the body
        is C{body}, and the connection lets go of this response.  C{deliverBody} still gives the body and its clean end.
        """
        if body:
            self._buffer.append(body)
        self._end = _BODY_DONE
        self._connection = None

    def data(self, data: bytes) -> None:
        """Body bytes from the connection."""
        if self._end is not None:
            return
        if self._protocol is None:
            self._buffer.append(data)
        else:
            self._protocol.dataReceived(data)

    def end(self, reason: Failure) -> None:
        """The body is over (C{ResponseDone}, C{PotentialDataLoss}) or was cut off: the connection lets go of this response."""
        if self._end is not None:
            return
        self._end = reason
        self._connection = None
        if self._protocol is not None:
            self._tell(reason)

    def done(self) -> None:
        """
        The body came whole: L{end} with C{ResponseDone}, except that a body protocol with a C{body_done()} method (the
        proxy's relay) is told by it, with no C{Failure} made: the common end of a response, once per request.
        """
        protocol = self._protocol
        if self._end is None and protocol is not None and not self.finished:
            body_done = getattr(protocol, "body_done", None)
            if body_done is not None:
                self._end = _BODY_DONE  # never told to anyone: the protocol has been told, and finished is set
                self._connection = None
                self.finished = True
                body_done()
                return
        self.end(Failure(ResponseDone()))

    def _tell(self, reason: Failure) -> None:
        if not self.finished:
            self.finished = True
            self._protocol.connectionLost(reason)

    # The body's transport, for back-pressure.

    def pauseProducing(self) -> None:
        if self._connection is not None:
            self._connection.pause_reading()

    def resumeProducing(self) -> None:
        if self._connection is not None:
            self._connection.resume_reading()

    def stopProducing(self) -> None:
        """The body is not wanted (the client left, or the upstream stalled): drop the connection."""
        connection = self._connection
        if connection is None:
            return
        self.end(Failure(ResponseFailed([Failure(ConnectionAborted("the response body was not wanted"))])))
        connection.abort()


classImplements(UpstreamResponse, IResponse, IPushProducer)


class UpgradeResponse(UpstreamResponse):
    """
    A C{101 Switching Protocols} answering an upgrade request (L{HTTP11Agent.upgrade}): it has no body;
    L{switch} hands the connection, which has left HTTP, to a protocol (a byte tunnel).  Until then
    the upstream is not read; a response nobody switches is dropped with its connection.
    """

    def switch(self, protocol: Any) -> None:
        """Give the connection to C{protocol}: it gets the transport, the bytes that came right after the 101, then the rest."""
        connection = self._connection
        if connection is None or self.finished:
            raise RuntimeError("the upgraded connection was switched already, or is gone")
        self.finished = True
        self._connection = None
        connection.switch(protocol)

    def deliverBody(self, protocol: Any) -> None:
        """No body: C{protocol} is told at once it is over, and the connection, which nobody took, is dropped."""
        protocol.makeConnection(self)
        self.finished = True
        protocol.connectionLost(Failure(ResponseDone()))
        self.stopProducing()

    def stopProducing(self) -> None:
        connection, self._connection = self._connection, None
        self.finished = True
        if connection is not None:
            connection.abort()


classImplements(UpgradeResponse, IResponse)


# --- one connection ---------------------------------------------------------------------------------


class _Parse:
    """httptools' callbacks for one response (interim 1xx responses included): they record, the connection acts after each feed."""

    __slots__ = ("connection", "phrase", "headers", "length", "chunked", "head_done", "complete", "interim", "pieces", "problem")

    def __init__(self, connection: UpstreamConnection) -> None:
        self.connection = connection
        self.phrase = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.length: int | None = None
        self.chunked = False
        self.head_done = False  # the final (non-1xx) response's headers are in
        self.complete = False  # ... and its body
        self.interim = False  # inside a 1xx response
        self.pieces: list[bytes] = []  # body bytes of the current feed
        self.problem: str | None = None  # a violation found after the response was complete

    def on_message_begin(self) -> None:
        if self.head_done:
            self.problem = "bytes after the end of the response"

    def on_status(self, status: bytes) -> None:
        self.phrase += status  # may come in pieces when the status line is split across reads

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.head_done:
            return  # chunked trailers: not forwarded
        if len(name) == 14 or len(name) == 17:  # as long as Content-Length or Transfer-Encoding: lowercased and looked at
            lowered = name.lower()
            if lowered == b"content-length":
                self.length = int(value)  # llhttp checked it: digits, and no second, different one
            elif lowered == b"transfer-encoding":
                self.chunked = value.rstrip(b" \t").lower().endswith(b"chunked")
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.head_done:
            return
        if self.connection.headers_complete(self):
            return
        if self.chunked or self.length:
            # A 1xx has no content (RFC 9110 15.2), but llhttp reads a framed one for codes other than 100, 102 and
            # 103: its bytes would go out as the start of the final response's body, past that body's length.
            raise UpstreamProtocolError("a 1xx response with content")
        self.interim = True
        self.phrase, self.headers, self.length, self.chunked = b"", [], None, False

    def on_body(self, body: bytes) -> None:
        if self.interim:
            raise UpstreamProtocolError("a 1xx response with content")
        if self.complete:
            self.problem = "a body after a response that has none"
            return
        self.pieces.append(body)

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
        elif self.head_done:
            self.complete = True


class UpstreamConnection(Protocol):
    """
    One connection to an upstream, carrying one request at a time.  The response is parsed by
    httptools; callbacks record, and L{dataReceived} acts after each feed, so nothing the response's
    consumer does can re-enter the parser.
    """

    transport: Any = None  # ITCPTransport, or TLSMemoryBIOProtocol over one

    def __init__(self, pool: ConnectionPool, key: Any, max_header_size: int) -> None:
        self.pool = pool
        self.key = key
        self.max_header_size = max_header_size
        self.reused = False  # carried a request before: a request may find it dead
        self.idle_since = 0.0
        self.idle = False
        self.connected = False
        self._exchange: Exchange | None = None
        self._parser: Any = None
        self._parse: _Parse | None = None
        self._head_room = 0
        self._received = False
        self._response: UpstreamResponse | None = None
        self._keep_alive = False
        self._until_close = False
        self._no_body = False
        self._sink: _BodySink | None = None
        self._body: Any = None  # the request body's producer while it uploads
        self._uploading = False
        self._reading_paused = False
        self._aborted = False
        self._handshake_waiters: list[defer.Deferred[None]] | None = []  # None once the TLS handshake is done (or for TCP, unused)
        self._upgraded = False  # a 101 answered our upgrade request: the connection has left HTTP
        self._tunnel: Any = None  # the protocol it was switched to (UpgradeResponse.switch)
        self._tunnel_data: list[bytes] = []  # bytes after the 101, kept until the switch
        self._lost_reason: Failure | None = None  # an upgraded connection lost before its switch

    # -- TLS handshake (connect_timeout covers it: mtlsgate.proxy.upstream._HandshakeBoundedEndpoint) --

    def when_handshake_done(self) -> defer.Deferred[None]:
        """Fires when the TLS handshake under this connection completes; fails if the connection is lost first."""
        if self._handshake_waiters is None:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._handshake_waiters.append(d)
        return d

    def handshakeCompleted(self) -> None:
        waiters, self._handshake_waiters = self._handshake_waiters or [], None
        for d in waiters:
            d.callback(None)

    def connectionMade(self) -> None:
        self.connected = True
        if ITCPTransport.providedBy(self.transport):
            # A request's head and its body can go out in separate writes (an upload streams as the client sends it): with
            # Nagle, a body chunk would wait for the upstream's (delayed) ACK of the head, up to 40 ms.
            self.transport.setTcpNoDelay(True)

    # -- sending --

    def send(self, exchange: Exchange) -> None:
        """Write C{exchange}'s request: the head in one write, then its body, if any, from its producer."""
        assert self._exchange is None and self.transport is not None
        self._exchange = exchange
        exchange.connection = self
        parse = self._parse = _Parse(self)
        self._parser = HttpResponseParser(parse)
        self._head_room = self.max_header_size
        self._received = False
        self._response = None
        request = exchange.request
        self.transport.write(request.head())
        body = request.body
        if body is None:
            return
        self._uploading = True
        self._body = body
        sink = self._sink = _BodySink(self.transport, None if body.length is UNKNOWN_LENGTH else body.length, self._upload_failed)
        sink.registerProducer(body, True)
        try:
            done = body.startProducing(sink)
        except BaseException:
            done = defer.fail()
        done.addCallbacks(self._uploaded, self._upload_failed)

    def _uploaded(self, _: Any) -> None:
        sink = self._sink
        if not self._uploading or sink is None:
            return
        self._uploading = False
        sink.unregisterProducer()
        if sink.remaining is None:
            self.transport.write(b"0\r\n\r\n")
        elif sink.remaining:
            self._upload_failed(Failure(ValueError(f"the request body producer stopped {sink.remaining} bytes short of its length")))
            return
        self._sink = None
        self._body = None

    def _upload_failed(self, failure: Failure) -> None:
        if not self._uploading:
            return
        self._uploading = False
        if self.transport is not None and self._sink is not None:
            self._sink.unregisterProducer()
        self._sink = None
        self._body = None
        exchange = self._exchange
        if exchange is not None and self._response is None:
            self._exchange = None
            exchange.fail(Failure(RequestGenerationFailed([failure])))
        self.abort()

    # -- receiving --

    def _head_parsed(self) -> bool:
        """The response's status line and headers are in (llhttp's on_headers_complete made it)."""
        return self._response is not None

    def dataReceived(self, data: bytes) -> None:
        if self._upgraded:
            if self._tunnel is not None:
                self._tunnel.dataReceived(data)
            elif data:
                self._tunnel_data.append(data)
            return
        parser = self._parser
        if parser is None:
            if not self._aborted and data:
                log.info("upstream connection closed: it sent bytes while no request was outstanding")
                self.abort()
            return
        self._received = True
        fed = data  # what feed_data was last given: an upgrade's offset counts from its start
        try:
            if self._response is None:  # still in the status line and headers: bounded
                room = self._head_room
                if len(data) > room:
                    fed = data[:room]
                    parser.feed_data(fed)
                    data = fed = data[room:]
                    if not self._head_parsed():  # a method: the callbacks set _response during feed_data (no narrowing across it)
                        raise ResponseHeadersTooLarge(f"response headers larger than {self.max_header_size} bytes (max_response_header_size)")
                    self._head_room = 0
                else:
                    self._head_room = room - len(data)
            parser.feed_data(data)
        except HttpParserUpgrade as e:
            if self._upgraded:
                self._switching(fed[e.args[0] :] if e.args else b"")
            else:
                self._broken(UpstreamProtocolError("an upgrade, but none was asked for"))
            return
        except HttpParserError as e:
            cause = e.__context__ if isinstance(e.__context__, UpstreamProtocolError) else None
            self._broken(cause or UpstreamProtocolError(f"malformed response: {e}"))
            return
        except ResponseHeadersTooLarge as e:
            self._broken(e)
            return
        self._after_feed()

    def headers_complete(self, parse: _Parse) -> bool:
        """From the parser: a response's headers are in.  False for an interim (1xx) response, which is skipped."""
        parser = self._parser
        code = parser.get_status_code()
        if code == 101:
            return self._upgrade_response(parse)
        if code < 200:
            return False
        version = parser.get_http_version()
        if version not in ("1.1", "1.0"):
            raise UpstreamProtocolError(f"malformed response: HTTP version {version}")
        exchange = self._exchange
        assert exchange is not None
        request = exchange.request
        parse.head_done = True
        self._keep_alive = parser.should_keep_alive() and request.upgrade is None  # an upgrade's connection is never pooled
        self._no_body = request.method == b"HEAD" or code in _NO_BODY_STATUS
        self._until_close = not (self._no_body or parse.chunked or parse.length is not None)
        if self._no_body:
            length: Any = 0
            parse.complete = True  # llhttp would wait for a HEAD response's body: it has none
        elif parse.chunked or parse.length is None:
            length = UNKNOWN_LENGTH
        else:
            length = parse.length
        self._response = UpstreamResponse(self, request, (b"HTTP", int(version[0]), int(version[2])), code, parse.phrase, parse.headers, length)
        return True

    def _upgrade_response(self, parse: _Parse) -> bool:
        """
        A 101: the switch our upgrade request asked for, to the protocol it asked for, with C{Connection: upgrade}
        (RFC 9110 7.8; RFC 6455 4.2.2), or a protocol error.  The connection leaves HTTP when llhttp stops after the head.
        """
        exchange = self._exchange
        assert exchange is not None
        request = exchange.request
        if request.upgrade is None:
            raise UpstreamProtocolError("101 Switching Protocols, but no upgrade was asked for")
        if self._parser.get_http_version() != "1.1":
            raise UpstreamProtocolError("101 Switching Protocols in a response that is not HTTP/1.1")
        upgrade: set[bytes] = set()
        connection: set[bytes] = set()
        for name, value in parse.headers:
            lowered = name.lower()
            if lowered in (b"upgrade", b"connection"):
                (upgrade if lowered == b"upgrade" else connection).update(t.strip().lower() for t in value.split(b","))
        if request.upgrade.lower() not in upgrade:
            raise UpstreamProtocolError(f"101 Switching Protocols to {sorted(upgrade)!r}, but {request.upgrade!r} was asked for")
        if b"upgrade" not in connection:
            raise UpstreamProtocolError("101 Switching Protocols without Connection: upgrade")
        parse.head_done = parse.complete = True
        self._upgraded = True
        self._keep_alive = False
        headers = Headers()
        for name, value in parse.headers:
            headers.addRawHeader(name, value)
        self._response = UpgradeResponse(self, request, (b"HTTP", 1, 1), 101, parse.phrase, headers, 0)
        return True

    def _switching(self, rest: bytes) -> None:
        """The 101's head is in: hold what followed it, stop reading, hand the response over."""
        self._parser = self._parse = None
        if rest:
            self._tunnel_data.append(rest)
        self.pause_reading()
        exchange, response = self._exchange, self._response
        self._exchange = self._response = None
        if exchange is not None and response is not None:
            exchange.respond(response)

    def switch(self, protocol: Any) -> None:
        """The connection goes to C{protocol} (L{UpgradeResponse.switch}): first the bytes held since the 101, then the rest."""
        self._tunnel = protocol
        self.resume_reading()
        protocol.makeConnection(self.transport)
        held, self._tunnel_data = self._tunnel_data, []
        for data in held:
            protocol.dataReceived(data)
        if self._lost_reason is not None:
            protocol.connectionLost(self._lost_reason)

    def _after_feed(self) -> None:
        response, parse, exchange = self._response, self._parse, self._exchange
        if response is None or parse is None:
            return
        if exchange is not None:
            self._exchange = None
            whole = exchange.whole_receiver() if parse.complete else None
            if whole is not None:
                # Head and body in this one read: the connection is pooled (or closed) first, so that whatever the receiver
                # does next (the client's next request) finds it, then the receiver gets the response whole.
                pieces, parse.pieces = parse.pieces, []
                body = pieces[0] if len(pieces) == 1 else b"".join(pieces)
                self._finish(body)
                whole(response, body)
                return
            exchange.respond(response)
        if parse.pieces:
            pieces, parse.pieces = parse.pieces, []
            for piece in pieces:
                if self._response is not response:
                    return  # stopped from the response's consumer
                response.data(piece)
        if parse.complete and self._response is response:
            self._finish()

    def _finish(self, whole: bytes | None = None) -> None:
        """The response is complete: end its body (or settle it with C{whole}, its body), and pool the connection or close it."""
        response, parse = self._response, self._parse
        assert response is not None and parse is not None
        reusable = self._keep_alive and parse.problem is None and not self._aborted
        if self._uploading:
            # The upstream answered before taking the whole body: it will not read the rest, and the connection is not reusable.
            self._stop_upload()
            reusable = False
        if parse.problem is not None:
            log.info("upstream connection closed: {problem}", problem=parse.problem)
        self._response = None
        self._parse = None
        self._parser = None
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resumeProducing()
        if whole is None:
            response.done()
        else:
            response.settle(whole)
        if reusable:
            self.reused = True
            self.pool.release(self)
        elif not self._aborted and self.transport is not None:
            self.transport.loseConnection()

    def _broken(self, error: Exception) -> None:
        """The upstream broke the protocol (or the header limit): fail the request, or cut the body off, and close."""
        failure = Failure(ResponseFailed([Failure(error)]))
        exchange, response = self._exchange, self._response
        self._exchange = None
        if exchange is not None:
            if response is not None:
                exchange.respond(response)  # a body that went wrong: the response itself was fine
            else:
                exchange.fail(failure)
        if response is not None:
            log.info("upstream response body cut off: {error}", error=error)
            if self._parse is not None:
                for piece in self._parse.pieces:
                    response.data(piece)
            response.end(failure)
        self._response = self._parse = None
        self.abort()

    # -- back-pressure and teardown --

    def pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pauseProducing()

    def resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resumeProducing()

    def _stop_upload(self) -> None:
        self._uploading = False
        sink, body = self._sink, self._body
        self._sink = self._body = None
        if sink is not None and self.transport is not None:
            sink.unregisterProducer()
        if body is not None:
            body.stopProducing()

    def abort(self) -> None:
        """Drop the connection at once: nothing on it is wanted any more."""
        self._aborted = True
        self._parser = None
        if self.transport is not None:
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.connected = False
        self._aborted = True
        if self._upgraded:
            self._lost_reason = reason
            if self._tunnel is not None:
                self._tunnel.connectionLost(reason)
            return
        waiters, self._handshake_waiters = self._handshake_waiters or [], None
        for d in waiters:
            d.errback(reason)
        if self.idle:
            self.pool.forget(self)
        if self._uploading:
            self._stop_upload()
        exchange, response, parse = self._exchange, self._response, self._parse
        self._exchange, self._response, self._parse, self._parser = None, None, None, None
        if exchange is not None:
            if response is not None:
                exchange.respond(response)
            elif self.reused and not self._received:
                exchange.lost_reused(reason)
            else:
                exchange.fail(Failure(ResponseNeverReceived([reason])))
        if response is not None:
            if parse is not None and parse.pieces:
                for piece in parse.pieces:
                    response.data(piece)
            if self._until_close and reason.check(ConnectionDone):
                response.end(Failure(PotentialDataLoss()))
            else:
                response.end(Failure(ResponseFailed([reason])))


classImplements(UpstreamConnection, IHandshakeListener)


class _ConnectionFactory(Factory):
    """Builds the connections to one origin."""

    noisy = False  # one per origin (and health check): "Starting factory" lines would flood the log

    transport: Any = None  # ITCPTransport, or TLSMemoryBIOProtocol over one

    def __init__(self, pool: ConnectionPool, key: Any, max_header_size: int) -> None:
        self.pool = pool
        self.key = key
        self.max_header_size = max_header_size

    def buildProtocol(self, addr: Any) -> UpstreamConnection:
        return UpstreamConnection(self.pool, self.key, self.max_header_size)


# --- the pool ---------------------------------------------------------------------------------------


class ConnectionPool:
    """
    Idle keep-alive connections per origin: the most recently used is taken first (so the others
    age out), at most C{max_idle} per origin, each closed after C{idle_timeout} seconds unused.
    L{retire} (reload, shutdown) closes the idle ones and keeps any more from being pooled.
    """

    def __init__(self, reactor: IReactorTime, persistent: bool = True, max_idle: int = MAX_IDLE_PER_ORIGIN, idle_timeout: float = IDLE_TIMEOUT) -> None:
        self.reactor = reactor
        self.persistent = persistent
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.retired = False
        self._idle: dict[Any, list[UpstreamConnection]] = {}
        self._sweep: Any = None

    def take(self, key: Any) -> UpstreamConnection | None:
        """A live idle connection to C{key}'s origin, out of the pool, or None."""
        idle = self._idle.get(key)
        while idle:
            connection = idle.pop()
            connection.idle = False
            if connection.connected and not connection._aborted:  # not one aborted (stray bytes) whose connectionLost is still to come
                return connection
        return None

    def release(self, connection: UpstreamConnection) -> None:
        """A connection whose response is complete and may carry another request."""
        idle = self._idle.setdefault(connection.key, [])
        if self.retired or not self.persistent or len(idle) >= self.max_idle:
            connection.transport.loseConnection()
            return
        connection.idle = True
        connection.idle_since = self.reactor.seconds()
        idle.append(connection)
        if self._sweep is None:
            self._sweep = self.reactor.callLater(self.idle_timeout, self._expire)

    def forget(self, connection: UpstreamConnection) -> None:
        """An idle connection that closed (the upstream's keep-alive timeout, usually)."""
        connection.idle = False
        idle = self._idle.get(connection.key)
        if idle and connection in idle:
            idle.remove(connection)

    def _expire(self) -> None:
        """Close the connections idle for C{idle_timeout}; come back when the next one will be."""
        self._sweep = None
        now = self.reactor.seconds()
        oldest: float | None = None
        for idle in self._idle.values():
            while idle and now - idle[0].idle_since >= self.idle_timeout:
                connection = idle.pop(0)
                connection.idle = False
                connection.transport.loseConnection()
            if idle and (oldest is None or idle[0].idle_since < oldest):
                oldest = idle[0].idle_since
        if oldest is not None:
            self._sweep = self.reactor.callLater(max(0.0, oldest + self.idle_timeout - now), self._expire)

    def idle_count(self, key: Any = None) -> int:
        """How many connections sit idle (for C{key}'s origin, or in all)."""
        if key is not None:
            return len(self._idle.get(key, ()))
        return sum(len(idle) for idle in self._idle.values())

    def retire(self) -> defer.Deferred[None]:
        """Close the idle connections now; connections carrying a request close when it ends."""
        self.retired = True
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()
        self._sweep = None
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                connection.idle = False
                connection.transport.loseConnection()
        return defer.succeed(None)


# --- the agent --------------------------------------------------------------------------------------


@attrs.define(slots=True)
class _Origin:
    key: tuple[bytes, bytes, int]
    endpoint: IStreamClientEndpoint
    factory: _ConnectionFactory
    host: bytes  # the Host header's value


class Exchange:
    """
    One request through the agent: who is told its response (a Deferred, or an L{IResponseReceiver}), the connection it
    is on, one retry on a dead pooled connection.
    """

    __slots__ = ("agent", "origin", "request", "deferred", "receiver", "connection", "connecting", "cancelled", "retried")

    def __init__(self, agent: HTTP11Agent, origin: _Origin, request: ClientRequest, receiver: IResponseReceiver | None = None) -> None:
        self.agent = agent
        self.origin = origin
        self.request = request
        # Dropped once fired: its canceller refers back to this exchange, and the cycle would leave both (and the response
        # they hold) to the cyclic garbage collector.  None when a receiver is told instead (likewise dropped once told).
        self.deferred: defer.Deferred[IResponse] | None = defer.Deferred(self._cancel) if receiver is None else None
        self.receiver = receiver
        self.connection: UpstreamConnection | None = None
        self.connecting: defer.Deferred[Any] | None = None
        self.cancelled = False
        self.retried = False

    def start(self) -> None:
        connection = self.agent.pool.take(self.origin.key) if self.request.upgrade is None else None  # an upgrade gets its own
        if connection is not None:
            connection.send(self)
        else:
            self._connect()

    def _connect(self) -> None:
        connecting = self.connecting = self.origin.endpoint.connect(self.origin.factory)
        connecting.addCallbacks(self._connected, self._not_connected)

    def _connected(self, connection: UpstreamConnection) -> None:
        self.connecting = None
        if self.cancelled:
            connection.abort()
            return
        connection.send(self)

    def _not_connected(self, failure: Failure) -> None:
        self.connecting = None
        if not self.cancelled:
            self.fail(failure)  # a ConnectError (TimeoutError included) as Agent gives it: the proxy fails over on it

    def respond(self, response: UpstreamResponse) -> None:
        self.connection = None
        receiver = self.receiver
        if receiver is not None:
            self.receiver = None
            receiver.upstream_response(response)
            return
        d = self.deferred
        if d is not None and not d.called:
            self.deferred = None
            d.callback(response)
        elif not response.finished:
            response.stopProducing()  # cancelled meanwhile: nobody will read the body

    def fail(self, failure: Failure) -> None:
        self.connection = None
        receiver = self.receiver
        if receiver is not None:
            self.receiver = None
            receiver.upstream_failed(failure)
            return
        d = self.deferred
        if d is not None and not d.called:
            self.deferred = None
            d.errback(failure)

    def whole_receiver(self) -> Callable[[UpstreamResponse, bytes], None] | None:
        """
        The receiver's C{upstream_whole}, if it has one, taken (the exchange is then over: nothing more is told, a cancel is
        a no-op); else None, and L{respond} tells the receiver as usual.
        """
        receiver = self.receiver
        whole = getattr(receiver, "upstream_whole", None) if receiver is not None else None
        if whole is not None:
            self.receiver = None
            self.connection = None
        return whole

    def cancel(self) -> None:
        """
        Give up on the response (L{HTTP11Agent.send}'s form of cancelling the Deferred): the connection is dropped, and
        the receiver, if not told yet, is told C{CancelledError}, as the Deferred's errback would be.
        """
        d = self.deferred
        if d is not None:
            d.cancel()
            return
        if self.cancelled:
            return
        self._cancel(None)
        self.fail(Failure(defer.CancelledError()))

    def lost_reused(self, reason: Failure) -> None:
        """A pooled connection closed before any byte of the response: send again on a fresh one when that is safe."""
        self.connection = None
        request = self.request
        if not self.cancelled and not self.retried and request.body is None and request.method in IDEMPOTENT:
            self.retried = True
            log.debug("a pooled upstream connection was dead ({reason}); retrying on a new one", reason=reason.getErrorMessage())
            self._connect()
            return
        self.fail(Failure(ResponseNeverReceived([reason])))

    def _cancel(self, d: defer.Deferred[IResponse] | None) -> None:
        self.cancelled = True
        connecting, connection = self.connecting, self.connection
        self.connecting = self.connection = None
        if connecting is not None:
            connecting.cancel()
        if connection is not None:
            connection.abort()


class HTTP11Agent:
    """
    An L{IAgent} for one set of TLS settings (one route): connections come from C{endpoints} (an
    L{IAgentEndpointFactory}, asked once per origin), and are kept alive in a L{ConnectionPool}
    keyed by scheme, host and port; C{persistent=False} sends C{Connection: close} and pools nothing.
    """

    def __init__(self, reactor: IReactorTime, endpoints: IAgentEndpointFactory, *, max_header_size: int = DEFAULT_MAX_HEADER_SIZE,
                 persistent: bool = True, max_idle: int = MAX_IDLE_PER_ORIGIN, idle_timeout: float = IDLE_TIMEOUT) -> None:  # fmt: skip
        self.reactor = reactor
        self.endpoints = endpoints
        self.max_header_size = max_header_size
        self.persistent = persistent
        self.pool = ConnectionPool(reactor, persistent=persistent, max_idle=max_idle, idle_timeout=idle_timeout)
        self._origins: dict[bytes, _Origin] = {}

    def request(self, method: bytes, uri: bytes, headers: Headers | None = None, bodyProducer: IBodyProducer | None = None) -> defer.Deferred[IResponse]:
        try:
            origin, target = self._split(uri)
            check_request(method, target)
        except ValueError:
            return defer.fail()
        request = ClientRequest(method, uri, Headers() if headers is None else headers, target, bodyProducer, origin.host, self.persistent)
        exchange = Exchange(self, origin, request)
        d = exchange.deferred
        assert d is not None
        exchange.start()
        return d

    def send(self, method: bytes, base: bytes, target: bytes, headers: Any, body: IBodyProducer | None, receiver: IResponseReceiver) -> Exchange:
        """
        L{request} for the proxy's hot path: the URL already split (C{base}, an origin part as L{split_url} gives it, and
        C{target}, a request target in origin form), and the outcome told to C{receiver} instead of a Deferred.  The
        exchange returned is cancelled with its C{cancel()}.  The receiver may be told before this returns (a request that
        cannot be sent, a connection that fails at once).
        """
        try:
            origin = self._origins.get(base)
            if origin is None:
                origin = self._origins[base] = self._origin(base)
            check_request(method, target)
        except ValueError:
            origin = None
            failure = Failure()
        if origin is None:
            exchange = Exchange(self, None, None, receiver)  # type: ignore[arg-type]
            exchange.fail(failure)
            return exchange
        request = ClientRequest(method, base + target, headers, target, body, origin.host, self.persistent)
        exchange = Exchange(self, origin, request, receiver)
        exchange.start()
        return exchange

    def upgrade(self, method: bytes, uri: bytes, headers: Headers | None = None, protocol: bytes = b"websocket") -> defer.Deferred[IResponse]:
        """
        An upgrade request (no body; C{Connection: Upgrade} and C{Upgrade: protocol} added) on a new connection
        of its own, never pooled and never retried.  A C{101} switching to C{protocol} is an L{UpgradeResponse};
        any other response is an ordinary one, after which the connection closes.
        """
        try:
            origin, target = self._split(uri)
            if not _TOKEN.match(method) or not _TOKEN.match(protocol):
                raise ValueError(f"invalid method {method!r} or protocol {protocol!r}")
            if not _TARGET.match(target):
                raise ValueError(f"invalid request target {target!r}")
        except ValueError:
            return defer.fail()
        request = ClientRequest(method, uri, Headers() if headers is None else headers, target, None, origin.host, False, protocol)
        exchange = Exchange(self, origin, request)
        d = exchange.deferred  # taken before start(): a connection failing at once fires it, and the exchange lets go of it
        assert d is not None
        exchange.start()
        return d

    def _split(self, uri: bytes) -> tuple[_Origin, bytes]:
        """C{uri}'s origin (made once per origin) and its request target in origin form (as L{URI.originForm} has it)."""
        base, target = split_url(uri)
        origin = self._origins.get(base)
        if origin is None:
            origin = self._origins[base] = self._origin(base)
        return origin, target

    def _origin(self, base: bytes) -> _Origin:
        parsed, host = parse_origin(base)
        key = (parsed.scheme, parsed.host, parsed.port)
        endpoint = self.endpoints.endpointForURI(parsed)
        return _Origin(key, endpoint, _ConnectionFactory(self.pool, key, self.max_header_size), host)

    def close(self) -> defer.Deferred[None]:
        """Retire the pool: idle connections close now, busy ones when their response ends."""
        return self.pool.retire()


classImplements(HTTP11Agent, IAgent)
