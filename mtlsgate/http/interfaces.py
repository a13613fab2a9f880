"""
The seam between the gateway's front ends (HTTP/1.1 in L{mtlsgate.http.server}, HTTP/2 in
L{mtlsgate.http.h2server}) and the proxy (L{mtlsgate.proxy.exchange}): one request and its response,
and the connection it came on, as the proxy's handler sees them.  Routing, authorization, identity,
header hygiene, limits and access lines live behind this seam, once, for every protocol.

And the seam between the proxy's exchange and the HTTP/1.1 upstream client (L{IResponseReceiver}): here, out of
L{mtlsgate.http.client}, because that module is compiled (mypyc: docs/engine.md, "Compiled"), and an interface's
methods must stay plain Python functions for zope.interface to read them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from twisted.python.failure import Failure
from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from twisted.web.iweb import IResponse


class IGatewayChannel(Interface):
    """
    What the proxy may do to the connection (HTTP/1.1) or stream (HTTP/2) a request came on.
    L{mtlsgate.proxy.exchange.peer_of} reads the client's certificate through C{transport}, and caches
    the verdict as the attribute C{_mtlsgate_peer}, which must be per connection.
    """

    transport = Attribute("The connection's transport (the TLS transport: getHandle() gives the SSL.Connection)")

    def stop_parsing() -> None:
        """The rest of the request body is not wanted: discard it; the request ends with its response."""

    def abort() -> None:
        """Cut the response off, so the client never takes it for complete (the upstream broke off)."""


class IGatewayRequest(Interface):
    """
    One request and its response: the parts of twisted.web's C{IRequest} the proxy uses, plus
    C{proceed}, C{when_done} and C{write_trailers}.
    """

    channel = Attribute("The L{IGatewayChannel} this request came on")
    method = Attribute("bytes: the request method")
    uri = Attribute("bytes: the request target as sent (origin form; '*'; for HTTP/2, :path)")
    clientproto = Attribute("bytes: b'HTTP/1.0', b'HTTP/1.1' or b'HTTP/2'")
    requestHeaders = Attribute("twisted.web.http_headers.Headers: the request's fields (HTTP/2: :authority as Host, no pseudo-headers)")
    responseHeaders = Attribute("twisted.web.http_headers.Headers: the response's fields, until the head is written")
    body = Attribute("The request body as a RequestBody (an IBodyProducer with back-pressure on the client), or None")
    code = Attribute("int: the response status")
    startedWriting = Attribute("bool: the response head is written")
    finished = Attribute("bool: finish() was called")
    disconnected = Attribute("bool: the client went away before the response was finished")

    def getHeader(name: bytes) -> bytes | None:
        """The last value of a request header, or None."""

    def getClientAddress() -> Any:
        """The client's IPv4Address or IPv6Address."""

    def isSecure() -> bool:
        """Whether the request came over TLS."""

    def setResponseCode(code: int, message: bytes | None = None) -> None:
        """The response status (and, for HTTP/1.1, its reason phrase)."""

    def setHeader(name: bytes, value: bytes) -> None:
        """Set a response header (replacing any value)."""

    def proceed() -> None:
        """The request goes upstream: a client waiting for "100 Continue" gets it now."""

    def write(data: bytes) -> None:
        """Response body bytes (the head goes out first, with the first call)."""

    def write_trailers(pairs: list[tuple[bytes, bytes]]) -> None:
        """
        Trailer fields, called just before finish(): HTTP/2 sends them as the final HEADERS frame
        (END_STREAM); HTTP/1.1 sends them in the last chunk of a chunked response to a client that
        sent C{TE: trailers}, and drops them otherwise.  Fields no trailer may carry are dropped.
        """

    def finish() -> None:
        """The response is complete."""

    def notifyFinish() -> object:
        """A Deferred that fires when the response is finished, or fails if the client goes away first."""

    def when_done(hook: Callable[[Failure | None], None]) -> None:
        """Call C{hook(None)} when the response is finished, or C{hook(reason)} if the client goes away first."""

    def registerProducer(producer: object, streaming: bool) -> None:
        """The response body's producer: paused while the client (or its flow-control window) cannot take more."""

    def unregisterProducer() -> None:
        """The response body's producer is done."""


class IUpgradableRequest(IGatewayRequest):
    """
    An HTTP/1.1 request that may switch protocols (RFC 9110 7.8): a WebSocket handshake.  HTTP/2 requests do
    not provide it (WebSockets over HTTP/2, RFC 8441, is not supported).
    """

    upgrade_to = Attribute("tuple of bytes: the Upgrade tokens, lower case, of a request whose Connection names upgrade; () otherwise")

    def upgrade(protocol: Any) -> None:
        """Write the 101 head (the response headers set so far) and hand the connection to C{protocol}, a byte tunnel's end."""


class IResponseReceiver(Interface):
    """
    Who is told the outcome of a request sent with L{HTTP11Agent.send}: what the L{IAgent.request} Deferred's callback and
    errback would be given, called directly (the proxy's hot path: no Deferred, callback chain or canceller per request).
    """

    def upstream_response(response: IResponse) -> None:
        """The response's status and headers are in (its body follows through C{deliverBody})."""

    def upstream_failed(failure: Failure) -> None:
        """No response: the request could not be sent, the connection failed, or the exchange was cancelled (C{CancelledError})."""

    # A receiver may also have C{upstream_whole(response, body)}: told instead of C{upstream_response} when the whole
    # response (head and body) came in one read, with its body as C{body}, after the connection was pooled (or closed).
