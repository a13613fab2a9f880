"""
Header hygiene for a reverse proxy, as pure functions over L{Headers}.

Upstream bound: hop-by-hop headers (RFC 9110 7.6.1, plus whatever the client's Connection header
names) and framing headers go (the Agent frames the body itself); every forwarding header the client
sent is removed, whatever its case, so identity headers can never be spoofed; so is every header
whose name holds C{_} (nginx's C{underscores_in_headers off}): WSGI and CGI servers read
C{X_Forwarded_For} as C{X-Forwarded-For}, so a client could otherwise put a forged value next to the
gateway's.  Then the gateway's own X-Forwarded-* and X-Forwarded-Client-Cert are set.  One hop-by-hop
header is regenerated rather than copied: C{TE: trailers} when the client's TE named C{trailers} and
the upstream client relays trailers (HTTP/2 upstreams; gRPC needs it; RFC 9110 10.1.4).  Client bound:
hop-by-hop and framing go too.  Response trailers (L{client_response_trailers}) get the same hygiene
and more: see docs/security.md, "Response trailers".
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Iterator, Sequence

from twisted.logger import Logger
from twisted.web.http_headers import Headers

log = Logger(namespace="mtlsgate.http.headers")


HOP_BY_HOP = frozenset(
    b"connection keep-alive proxy-connection proxy-authenticate proxy-authorization te trailer "
    b"transfer-encoding upgrade".split()
)
FRAMING = frozenset([b"content-length", b"transfer-encoding"])
# Headers only the gateway may set on the upstream request.
GATEWAY_OWNED = frozenset(
    [b"x-forwarded-client-cert", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host",
     b"x-forwarded-port", b"x-forwarded-prefix", b"x-real-ip", b"forwarded", b"expect"]
)  # fmt: skip


# Fields that must not come as trailers (RFC 9110 6.5.1: framing, routing, request modifiers, authentication, response control,
# content processing), and identity the gateway vouches for: a recipient that merges trailers into the header section (many
# HTTP libraries do) would otherwise take them from the upstream as if they were the message's own headers.
TRAILER_FORBIDDEN = frozenset(
    b"age authorization cache-control content-encoding content-length content-range content-type cookie date expect expires host "
    b"location max-forwards pragma proxy-authenticate proxy-authorization range retry-after set-cookie strict-transport-security "
    b"te trailer transfer-encoding vary www-authenticate".split()
) | HOP_BY_HOP | GATEWAY_OWNED
_FIELD_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_FIELD_VALUE_BAD = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def _connection_tokens(headers: Headers) -> set[bytes]:
    tokens: set[bytes] = set()
    for value in headers.getRawHeaders(b"connection", []):
        tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return tokens


def _copy_without(headers: Headers, drop: Iterable[bytes], underscores: bool = True, into: Headers | None = None) -> Headers:
    dropped = frozenset(drop)
    out = Headers() if into is None else into
    for name, values in headers.getAllRawHeaders():
        if not underscores and b"_" in name:
            log.debug("dropped the request header {name!r}: '_' in a header name", name=name)
            continue
        if name.lower() not in dropped:
            out.setRawHeaders(name, list(values))
    return out


def upstream_request_headers(
    incoming: Headers,
    *,
    client_ip: str,
    proto: str,
    xfcc: bytes | None,
    preserve_host: bool,
    trailers: bool = False,
) -> Headers:
    """
    The headers to send upstream for a client request that arrived with C{incoming}; C{xfcc} is the
    verified client's X-Forwarded-Client-Cert value (None: the header is not sent at all).  With
    C{trailers} (the upstream client relays response trailers: HTTP/2), C{TE: trailers} is sent when
    the client's TE named C{trailers}.
    """
    drop = HOP_BY_HOP | FRAMING | GATEWAY_OWNED | _connection_tokens(incoming)
    if not preserve_host:
        drop = drop | {b"host"}
    out = _copy_without(incoming, drop, underscores=False)
    if trailers and any(t.strip().lower() == b"trailers" for value in incoming.getRawHeaders(b"te", []) for t in value.split(b",")):
        out.setRawHeaders(b"te", [b"trailers"])  # the one TE value forwarded: the client takes trailers, and so does the gateway
    host = incoming.getRawHeaders(b"host")
    out.setRawHeaders(b"x-forwarded-for", [client_ip.encode("ascii")])
    out.setRawHeaders(b"x-forwarded-proto", [proto.encode("ascii")])
    if host:
        out.setRawHeaders(b"x-forwarded-host", [host[0]])
    if xfcc is not None:
        out.setRawHeaders(b"x-forwarded-client-cert", [xfcc])
    return out


def client_response_headers(upstream: Headers, into: Headers | None = None) -> Headers:
    """
    The upstream response's headers as forwarded to the client, without framing (set by the proxy):
    a new Headers, or set on C{into} (the client response's headers, a name at a time as before).
    """
    drop = HOP_BY_HOP | FRAMING | _connection_tokens(upstream)
    return _copy_without(upstream, drop, into=into)


def client_response_trailers(trailers: Sequence[tuple[bytes, bytes]], response_headers: Headers | None = None) -> list[tuple[bytes, bytes]]:
    """
    The upstream's response trailers as forwarded to the client, in order, names in lower case:
    without pseudo-fields, names that are not tokens, values holding a control character (CR, LF and
    NUL among them; HTAB passes), hop-by-hop fields and those the response's C{Connection} named, and
    every field of L{TRAILER_FORBIDDEN}.  What is dropped is logged.
    """
    drop = TRAILER_FORBIDDEN | (_connection_tokens(response_headers) if response_headers is not None else set())
    out: list[tuple[bytes, bytes]] = []
    for name, value in trailers:
        lowered = name.lower()
        if not _FIELD_NAME.match(lowered) or _FIELD_VALUE_BAD.search(value) or lowered in drop:
            log.info("dropped the response trailer {name!r} from the upstream", name=name[:64])
            continue
        out.append((lowered, value))
    return out


# Fields a trailer section must not carry (RFC 9110 6.5.1: framing, routing, authentication, control), beside hop-by-hop ones.
_NOT_IN_TRAILERS = HOP_BY_HOP | FRAMING | frozenset([b"host", b"content-type", b"content-encoding", b"content-range", b"expect", b"set-cookie"])
_TOKEN_BYTES = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_VALUE_CONTROLS = frozenset(range(0x00, 0x20)) - {0x09} | {0x7F}


def sendable_trailers(pairs: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """
    The trailer fields a response may carry to the client, names in lower case: a name that is not a
    token (pseudo-headers included), a value with a control character (CR, LF, NUL...) or surrounding
    whitespace, and fields no trailer may hold (framing, hop-by-hop, Host...) are dropped.
    """
    out = []
    for name, value in pairs:
        name = name.lower()
        if not name or not _TOKEN_BYTES.issuperset(name) or name in _NOT_IN_TRAILERS:
            log.debug("dropped the trailer field {name!r}", name=name)
            continue
        if _VALUE_CONTROLS.intersection(value) or value[:1] in (b" ", b"\t") or value[-1:] in (b" ", b"\t"):
            log.debug("dropped the trailer field {name!r}: a control character or surrounding whitespace in its value", name=name)
            continue
        out.append((name, value))
    return out


# --- the same rules over (name, value) pairs, in one pass: the hot path's form ---------------------------------------------------


class HeaderPairs:
    """
    Header fields as an ordered list of C{(name, value)} pairs, each name as it was spelled: what the
    proxy hands the upstream client instead of a L{Headers} when it has the request's fields as
    received (the client writes them out as they are, without building a L{Headers} and canonicalising
    each name twice).  It answers the read side of L{Headers} (C{hasHeader}, C{getRawHeaders},
    C{getAllRawHeaders}) for anything else that looks.
    """

    __slots__ = ("pairs", "framed_by_client")

    def __init__(self, pairs: list[tuple[bytes, bytes]], framed_by_client: bool = False) -> None:
        self.pairs = pairs
        # True: no framing or Connection field among the pairs (upstream_request_pairs dropped them), so the client
        # need not look for them again before adding its own.
        self.framed_by_client = framed_by_client

    def hasHeader(self, name: bytes) -> bool:
        name = name.lower()
        return any(n.lower() == name for n, _ in self.pairs)

    def getRawHeaders(self, name: bytes, default: Any = None) -> Any:
        name = name.lower()
        values = [v for n, v in self.pairs if n.lower() == name]
        return values or default

    def getAllRawHeaders(self) -> Iterator[tuple[bytes, list[bytes]]]:
        grouped: dict[bytes, tuple[bytes, list[bytes]]] = {}
        for name, value in self.pairs:
            entry = grouped.get(name.lower())
            if entry is None:
                grouped[name.lower()] = (name, [value])
            else:
                entry[1].append(value)
        return iter(grouped.values())


def connection_tokens(values: Iterable[bytes]) -> set[bytes]:
    """The tokens of Connection field values, lowercased (the field names and options they name), empty ones left out."""
    return _tokens(values)


def _tokens(values: Iterable[bytes]) -> set[bytes]:
    if isinstance(values, list) and len(values) == 1 and _COMMA not in values[0]:  # the usual "keep-alive" or "close": no generator
        token = values[0].strip().lower()
        return {token} if token else set()
    tokens: set[bytes] = set()
    for value in values:
        tokens.update(t.strip().lower() for t in value.split(b","))
    tokens.discard(b"")
    return tokens


_UPSTREAM_DROP = HOP_BY_HOP | FRAMING | GATEWAY_OWNED
# One byte looked for in a value as its int: "13 in value" takes a seventh of the time of b"\r" in value, for which CPython
# first tries the needle as an int (raising and clearing a TypeError) before searching; on every field of every message.
_CR, _LF, _COMMA, _UNDERSCORE = 0x0D, 0x0A, 0x2C, 0x5F
_UPSTREAM_DROP_HOST = _UPSTREAM_DROP | {b"host"}
_RESPONSE_DROP = HOP_BY_HOP | FRAMING
_NONE: frozenset[bytes] = frozenset()


def upstream_request_pairs(
    pairs: list[tuple[bytes, bytes]],
    *,
    connection: list[bytes],
    connection_tokens: set[bytes] | None = None,
    host: bytes | None,
    client_ip: str,
    proto: str,
    xfcc: bytes | None,
    preserve_host: bool,
) -> HeaderPairs:
    """
    L{upstream_request_headers} over the client's fields as received (C{pairs}, whose Connection
    values are C{connection}, their tokens C{connection_tokens} if the server worked them out already, and
    first Host value C{host}), in one pass: the same fields go, the same are added.  The values are the
    server's, already held to security.md's rules (no CR, LF or other control character).
    """
    # The fixed set, then the Connection-named tokens (and Host), looked up in turn: no set built per request.
    drop = _UPSTREAM_DROP if preserve_host else _UPSTREAM_DROP_HOST
    named: set[bytes] | frozenset[bytes]
    if connection_tokens is not None:
        named = connection_tokens
    else:
        named = _tokens(connection) if connection else _NONE
    out = []
    for name, value in pairs:
        if _UNDERSCORE in name:
            log.debug("dropped the request header {name!r}: '_' in a header name", name=name)
        else:
            lowered = name.lower()
            if lowered not in drop and lowered not in named:
                out.append((name, value))
    out.append((b"X-Forwarded-For", client_ip.encode("ascii")))
    out.append((b"X-Forwarded-Proto", proto.encode("ascii")))
    if host is not None:
        out.append((b"X-Forwarded-Host", host))
    if xfcc is not None:
        out.append((b"X-Forwarded-Client-Cert", xfcc))
    return HeaderPairs(out, framed_by_client=True)


def client_response_block(pairs: list[tuple[bytes, bytes]]) -> tuple[bytes, set[bytes]]:
    """
    L{client_response_headers} over the upstream response's fields as received, in one pass: the
    fields to forward as the lines of a head (C{b"Name: value\\r\\n"} each, in the upstream's order),
    and the set of their lowercased names.  A value holding CR or LF (which the strict parser never
    lets through) has them turned into spaces, as L{Headers} would.
    """
    block, names, connection = _response_fields(pairs, _RESPONSE_DROP)
    if connection:
        # The fields the Connection values name go too, when one of them is not dropped anyway (an upstream's "Connection:
        # keep-alive" or "close" names none such): a second pass, for that rare response only.
        named = _tokens(connection) & names
        if named:
            block, names, _ = _response_fields(pairs, _RESPONSE_DROP | named)
    return block, names


def _response_fields(pairs: list[tuple[bytes, bytes]], drop: frozenset[bytes] | set[bytes]) -> tuple[bytes, set[bytes], list[bytes]]:
    """The fields not in C{drop}, written as head lines in one join; their lowercased names; the Connection values met."""
    connection = []
    out: list[bytes] = []
    names = set()
    for name, value in pairs:
        lowered = name.lower()
        if lowered in drop:
            if lowered == b"connection":
                connection.append(value)
            continue
        if _CR in value or _LF in value:
            value = b" ".join(value.splitlines())
        out += (name, b": ", value, b"\r\n")
        names.add(lowered)
    return b"".join(out), names, connection
