"""Header hygiene, property-based: whatever a client sends, nothing it says about identity or hops goes upstream."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.web.http_headers import Headers

from mtlsgate.http.headers import (
    FRAMING, GATEWAY_OWNED, HOP_BY_HOP, client_response_block, client_response_headers, upstream_request_headers, upstream_request_pairs,
)  # fmt: skip

_SPECIAL = sorted(HOP_BY_HOP | FRAMING | GATEWAY_OWNED | {b"host", b"x-custom", b"authorization"})
_TE_VALUES = [b"trailers", b"gzip, trailers", b"Trailers;q=1", b"deflate", b"trailers\x00x"]
_TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-_", min_size=1, max_size=12).map(str.encode)
_NAME = st.one_of(st.sampled_from(_SPECIAL), _TOKEN).flatmap(
    # any case, and any '-' spelled '_' (WSGI and CGI servers read both as the same variable)
    lambda name: st.tuples(st.sampled_from([name, name.upper(), name.title()]), st.lists(st.booleans(), min_size=len(name), max_size=len(name)))
).map(lambda spelled: bytes(ord("_") if c == ord("-") and swap else c for c, swap in zip(spelled[0], spelled[1])))
_VALUE = st.one_of(st.sampled_from(_TE_VALUES), st.binary(min_size=0, max_size=40)).map(lambda v: v.replace(b"\r", b"").replace(b"\n", b""))


def _headers(pairs: list[tuple[bytes, bytes]], connection: list[bytes]) -> Headers:
    headers = Headers()
    for name, value in pairs:
        headers.addRawHeader(name, value)
    if connection:
        headers.addRawHeader(b"Connection", b", ".join(connection))
    return headers


@given(
    pairs=st.lists(st.tuples(_NAME, _VALUE), max_size=20), connection=st.lists(_TOKEN, max_size=4), preserve=st.booleans(),
    xfcc=st.sampled_from([None, b'Hash=00ff;Subject="CN=alice"']), trailers=st.booleans(),
)  # fmt: skip
def test_nothing_hop_by_hop_or_identity_bearing_from_the_client_goes_upstream(pairs, connection, preserve, xfcc, trailers):
    incoming = _headers(pairs, connection)
    out = upstream_request_headers(incoming, client_ip="192.0.2.7", proto="https", xfcc=xfcc, preserve_host=preserve, trailers=trailers)
    names = {name.lower() for name, _ in out.getAllRawHeaders()}
    assert not names & (HOP_BY_HOP - {b"te"})
    assert not names & FRAMING
    assert not [name for name in names if b"_" in name]  # no other spelling of anything, the gateway's own headers included
    assert not names & {t.lower() for t in connection} - {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"te"}
    # TE is regenerated, never copied: "trailers" alone, only when the client's TE named it and the upstream client relays trailers
    takes_trailers = trailers and any(t.strip().lower() == b"trailers" for v in incoming.getRawHeaders(b"te", []) for t in v.split(b","))
    assert out.getRawHeaders(b"te") == ([b"trailers"] if takes_trailers else None)
    assert out.getRawHeaders(b"x-forwarded-for") == [b"192.0.2.7"]
    assert out.getRawHeaders(b"x-forwarded-proto") == [b"https"]
    assert out.getRawHeaders(b"x-forwarded-client-cert") == ([xfcc] if xfcc else None)  # ours or none, never the client's
    for owned in GATEWAY_OWNED - {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-client-cert"}:
        assert not out.hasHeader(owned)
    hosts = incoming.getRawHeaders(b"host")
    assert out.getRawHeaders(b"x-forwarded-host") == ([hosts[0]] if hosts else None)
    if not preserve:
        assert not out.hasHeader(b"host")


@given(pairs=st.lists(st.tuples(_NAME, _VALUE), max_size=20), connection=st.lists(_TOKEN, max_size=4))
def test_responses_lose_hop_by_hop_and_framing_and_keep_the_rest(pairs, connection):
    upstream = _headers(pairs, connection)
    out = client_response_headers(upstream)
    names = {name.lower() for name, _ in out.getAllRawHeaders()}
    dropped = HOP_BY_HOP | FRAMING | {t.lower() for t in connection}
    assert not names & dropped
    for name, value in pairs:
        if name.lower() not in dropped:
            assert value in out.getRawHeaders(name)


# The hot path's form of the same rules (HeaderPairs, one pass over the fields as received) against the Headers form above: whatever
# a client or an upstream sends, the same fields go and the same are added (names compared case-insensitively, values in order).


def _fields(headers) -> list[tuple[bytes, bytes]]:
    return sorted((name.lower(), value) for name, values in headers.getAllRawHeaders() for value in values)


@given(
    pairs=st.lists(st.tuples(_NAME, _VALUE.map(lambda v: v.strip(b" \t"))), max_size=20), connection=st.lists(_TOKEN, max_size=4),
    preserve=st.booleans(), xfcc=st.sampled_from([None, b'Hash=00ff;Subject="CN=alice"']),
)  # fmt: skip
def test_the_one_pass_request_filter_forwards_exactly_what_the_headers_one_does(pairs, connection, preserve, xfcc):
    received = list(pairs) + ([(b"Connection", b", ".join(connection))] if connection else [])
    incoming = _headers(pairs, connection)
    hosts = [v for n, v in received if n.lower() == b"host"]
    fast = upstream_request_pairs(
        received, connection=[v for n, v in received if n.lower() == b"connection"], host=hosts[0] if hosts else None,
        client_ip="192.0.2.7", proto="https", xfcc=xfcc, preserve_host=preserve,
    )  # fmt: skip
    slow = upstream_request_headers(incoming, client_ip="192.0.2.7", proto="https", xfcc=xfcc, preserve_host=preserve)
    assert _fields(fast) == _fields(slow)
    for name, _ in fast.pairs:  # and the order of the client's fields of one name is kept
        assert fast.getRawHeaders(name) == slow.getRawHeaders(name)


@given(
    pairs=st.lists(st.tuples(_NAME, st.binary(max_size=40)), max_size=20),
    connection=st.lists(_TOKEN, max_size=4),
)  # fmt: skip
def test_the_one_pass_response_filter_forwards_exactly_what_the_headers_one_does(pairs, connection):
    received = list(pairs) + ([(b"Connection", b", ".join(connection))] if connection else [])
    block, names = client_response_block(received)
    assert block == b"" or block.endswith(b"\r\n")
    forwarded = [tuple(line.split(b": ", 1)) for line in block.split(b"\r\n")[:-1]]
    slow = client_response_headers(_headers(pairs, connection))
    assert sorted((n.lower(), v) for n, v in forwarded) == _fields(slow)  # CR and LF in a value become spaces, as Headers has them
    assert names == {n.lower() for n, _ in forwarded}
