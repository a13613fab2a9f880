"""
The request target as the gateway routes it and forwards it: one pure function, one normal form.

Prefix routing with per-route allow rules is only sound if the upstream serves the path the gateway
routed.  Upstreams disagree on spellings (nginx and Go decode escapes and merge slashes, Tomcat,
Jetty and Spring drop C{;params}, Windows-minded servers read C{\\} as C{/}, C libraries stop at a
NUL), so the gateway accepts only targets whose meaning all of them agree on, and forwards exactly
the normal form it routed:

  - refused (L{PathRefused}, a 400): anything but origin form (C{/path?query}); a fragment (C{#});
    bytes outside visible ASCII anywhere in the target; in the path, C{\\} and C{;}; a malformed
    escape; an escape of C{/ \\ ; # ?} or of a control byte (C{%2F %5C %3B %23 %3F %00-%1F %7F}, any
    case); a dot segment (C{.} or C{..}, raw or escaped);
  - normalised: escapes of unreserved characters (C{ALPHA DIGIT - . _ ~}) are decoded, the other
    escapes upper-cased, other characters a path may not hold raw (C{" < > [ ] ^ ` { | }}) escaped, and
    empty segments merged (C{//a///b} is C{/a/b});
  - the query is forwarded as it came (an empty one is dropped).

Routing uses L{NormalTarget.route_path}, the path fully decoded: what a decoding upstream sees
(C{/a%40b} and C{/a@b} route alike), and what C{path} decodes to.
"""

from __future__ import annotations

import re
from typing import NamedTuple

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# pchar (RFC 3986 3.3) held raw in a normal form: unreserved, sub-delims but ';', ':' and '@'.
_RAW_OK = _UNRESERVED | frozenset(b"!$&'()*+,=:@")
_REFUSED_ESCAPES = {0x2F: "an encoded '/' (%2F)", 0x5C: "an encoded '\\' (%5C)", 0x3B: "an encoded ';' (%3B)", 0x23: "an encoded '#' (%23)",
                    0x3F: "an encoded '?' (%3F)"}  # fmt: skip
_HEX = frozenset(b"0123456789abcdefABCDEF")
# The common case, handled without a byte-by-byte walk: raw pchar segments, none empty, none '.' or '..'.
_PLAIN = re.compile(rb"(?:/(?!\.\.?(?:/|$))[A-Za-z0-9\-._~!$&'()*+,=:@]+)*/?")
_VISIBLE = re.compile(rb"[\x21-\x7e]*")


class PathRefused(ValueError):
    """A request target the gateway will not route; C{reason} says why (it goes into the 400 answer and the log)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NormalTarget(NamedTuple):
    """A request target in normal form."""

    forward: bytes  # what goes upstream: the normal path, then '?' and the query as received, if any
    path: bytes  # the normal path
    route_path: str  # the path fully percent-decoded (bytes as latin-1): what routing matches prefixes against


def normalize_target(target: bytes) -> NormalTarget:
    """The normal form of a request target, or L{PathRefused}."""
    if not target.startswith(b"/"):
        raise PathRefused("the request target must be a path starting with '/'")
    if _VISIBLE.fullmatch(target) is None:
        raise PathRefused("the request target holds a control, space or non-ASCII byte")
    if 0x23 in target:  # "#", as an int: quicker than b"#" in
        raise PathRefused("a fragment ('#') is not allowed in a request target")
    path, question, query = target.partition(b"?")
    if _PLAIN.fullmatch(path) is not None:
        normal, route = path, path.decode("ascii")
    else:
        normal, route = _normalize_path(path)
    forward = normal + b"?" + query if query else normal
    return NormalTarget(forward, normal, route)


def _normalize_path(path: bytes) -> tuple[bytes, str]:
    segments = path.split(b"/")[1:]
    normal: list[bytes] = []
    decoded: list[bytes] = []
    for i, segment in enumerate(segments):
        if not segment and i < len(segments) - 1:
            continue  # an empty segment: merged ('//' is '/'); a trailing one keeps the trailing slash
        n, d = _normalize_segment(segment)
        if d in (b".", b".."):
            raise PathRefused("dot-segments ('.', '..', also encoded) are not allowed in the path")
        normal.append(n)
        decoded.append(d)
    return b"/" + b"/".join(normal), (b"/" + b"/".join(decoded)).decode("latin-1")


def _normalize_segment(segment: bytes) -> tuple[bytes, bytes]:
    normal = bytearray()
    decoded = bytearray()
    i, n = 0, len(segment)
    while i < n:
        c = segment[i]
        if c == 0x25:  # '%'
            pair = segment[i + 1 : i + 3]
            if len(pair) < 2 or pair[0] not in _HEX or pair[1] not in _HEX:
                raise PathRefused("a malformed percent-escape in the path")
            b = int(pair, 16)
            if b in _REFUSED_ESCAPES:
                raise PathRefused(f"{_REFUSED_ESCAPES[b]} is not allowed in the path")
            if b < 0x20 or b == 0x7F:
                raise PathRefused(f"an encoded control byte (%{b:02X}) is not allowed in the path")
            normal += bytes([b]) if b in _UNRESERVED else b"%%%02X" % b
            decoded.append(b)
            i += 3
            continue
        if c == 0x5C:
            raise PathRefused("a backslash is not allowed in the path")
        if c == 0x3B:
            raise PathRefused("';' (path parameters) is not allowed in the path")
        normal += bytes([c]) if c in _RAW_OK else b"%%%02X" % c
        decoded.append(c)
        i += 1
    return bytes(normal), bytes(decoded)


def prefix_problem(prefix: str) -> str | None:
    """Why a configured route prefix can never match a normal path (None: it is fine)."""
    try:
        normal = normalize_target(prefix.encode("ascii"))
    except UnicodeEncodeError:
        return "must be ASCII"
    except PathRefused as e:
        return e.reason
    if normal.forward != prefix.encode("ascii") or normal.route_path != prefix:
        return "must be written in normal form: no '?', no '%'-escapes, no empty segments"
    return None
