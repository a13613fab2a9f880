"""
The PROXY protocol version 2 header (HAProxy's proxy-protocol.txt, section 2.2) a TCP route sends
its upstream first, with C{proxy_protocol: v2}: the client's address and port, the gateway's, and
what the TLS layer established, as TLVs.

TLVs sent (types from the specification, plus two of the custom range 0xE0-0xEF):

- C{0x01} PP2_TYPE_ALPN: the ALPN protocol negotiated with the client, if any;
- C{0x02} PP2_TYPE_AUTHORITY: the server name (SNI) the client asked for, as the route matched it;
- C{0x20} PP2_TYPE_SSL: C{client} = PP2_CLIENT_SSL, plus PP2_CLIENT_CERT_CONN when a certificate was
  presented in this connection's full handshake and PP2_CLIENT_CERT_SESS when the session carries
  one (a resumed session: SESS only); C{verify} = 0 for a certificate the gateway verified, 1 for
  none; sub-TLVs C{0x21} PP2_SUBTYPE_SSL_VERSION (e.g. TLSv1.3), C{0x22} PP2_SUBTYPE_SSL_CN (the
  certificate's common name, if any), C{0x23} PP2_SUBTYPE_SSL_CIPHER;
- C{0xE0} (mtlsgate): the client certificate's SPIFFE ID (its first spiffe:// URI SAN), UTF-8;
- C{0xE1} (mtlsgate): the client certificate as one X-Forwarded-Client-Cert element (Envoy's form,
  exactly the value HTTP routes send in that header: Hash, Subject, URI and DNS SANs), ASCII.

A client is only ever described here after the gateway admitted it: a refused client never gets an
upstream connection, so there is no header for one.  The header is written first on the upstream's
TCP connection, before a tls:// upstream's handshake (mtlsgate.proxy.tcp), as HAProxy sends it.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Any

import attrs

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
VERSION_2_PROXY = 0x21  # version 2, command PROXY
VERSION_2_LOCAL = 0x20
AF_UNSPEC, TCP_OVER_IPV4, TCP_OVER_IPV6 = 0x00, 0x11, 0x21

PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CN = 0x22
PP2_SUBTYPE_SSL_CIPHER = 0x23
PP2_CLIENT_SSL = 0x01
PP2_CLIENT_CERT_CONN = 0x02
PP2_CLIENT_CERT_SESS = 0x04
#: mtlsgate's TLVs, in the range the specification leaves to applications (PP2_TYPE_MIN_CUSTOM..MAX_CUSTOM).
PP2_TYPE_MTLSGATE_SPIFFE_ID = 0xE0
PP2_TYPE_MTLSGATE_XFCC = 0xE1

_MAX_LENGTH = 0xFFFF  # the header's 16-bit length field: addresses and TLVs after the first 16 bytes


class HeaderTooLong(ValueError):
    """The identity does not fit the PROXY v2 header's 64 KiB: the connection is refused rather than sent without it."""


@attrs.frozen
class TLSFacts:
    """What the TLS layer knows about one client connection, for the PP2_TYPE_SSL TLV and its neighbours."""

    version: str | None = None  # "TLSv1.3"
    cipher: str | None = None
    server_name: str | None = None
    alpn: bytes | None = None
    certificate_in_connection: bool = False  # presented in this connection's full handshake
    certificate_in_session: bool = False  # the session carries one (full or resumed)
    verified: bool = False  # the gateway verified it (always so for a client that reaches an upstream with one)
    common_name: str | None = None
    spiffe_id: str | None = None
    xfcc: str | None = None


def _tlv(kind: int, value: bytes) -> bytes:
    if len(value) > _MAX_LENGTH:
        raise HeaderTooLong(f"a TLV of {len(value)} bytes does not fit the PROXY v2 header's {_MAX_LENGTH}")
    return struct.pack("!BH", kind, len(value)) + value


def _addresses(source: Any, destination: Any) -> tuple[int, bytes]:
    """The family byte and address block for two Twisted addresses (IPv4Address/IPv6Address), or UNSPEC."""
    try:
        src, dst = ipaddress.ip_address(source.host), ipaddress.ip_address(destination.host)
        src_port, dst_port = int(source.port), int(destination.port)
    except (AttributeError, ValueError, TypeError):
        return AF_UNSPEC, b""
    if src.version != dst.version:  # e.g. a v4-mapped peer on a dual-stack socket: say both in IPv6
        src, dst = _as_ipv6(src), _as_ipv6(dst)
    family = TCP_OVER_IPV4 if src.version == 4 else TCP_OVER_IPV6
    return family, src.packed + dst.packed + struct.pack("!HH", src_port, dst_port)


def _as_ipv6(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv6Address:
    return address if isinstance(address, ipaddress.IPv6Address) else ipaddress.IPv6Address(f"::ffff:{address}")


def ssl_tlv(facts: TLSFacts) -> bytes:
    """The PP2_TYPE_SSL TLV: client flags, the verify result, and the version, CN and cipher sub-TLVs."""
    client = PP2_CLIENT_SSL
    if facts.certificate_in_connection:
        client |= PP2_CLIENT_CERT_CONN
    if facts.certificate_in_session:
        client |= PP2_CLIENT_CERT_SESS
    verify = 0 if facts.verified else 1
    body = struct.pack("!BI", client, verify)
    if facts.version:
        body += _tlv(PP2_SUBTYPE_SSL_VERSION, facts.version.encode("ascii", "replace"))
    if facts.common_name is not None:
        body += _tlv(PP2_SUBTYPE_SSL_CN, facts.common_name.encode("utf-8", "surrogatepass"))
    if facts.cipher:
        body += _tlv(PP2_SUBTYPE_SSL_CIPHER, facts.cipher.encode("ascii", "replace"))
    return _tlv(PP2_TYPE_SSL, body)


def proxy_v2_header(source: Any, destination: Any, facts: TLSFacts) -> bytes:
    """
    The whole header: C{source} is the client's address, C{destination} the gateway's (Twisted
    addresses).  Raises L{HeaderTooLong} when the TLVs do not fit.
    """
    family, addresses = _addresses(source, destination)
    tlvs = b""
    if facts.alpn:
        tlvs += _tlv(PP2_TYPE_ALPN, facts.alpn)
    if facts.server_name:
        tlvs += _tlv(PP2_TYPE_AUTHORITY, facts.server_name.encode("ascii", "replace"))
    tlvs += ssl_tlv(facts)
    if facts.spiffe_id is not None:
        tlvs += _tlv(PP2_TYPE_MTLSGATE_SPIFFE_ID, facts.spiffe_id.encode("utf-8", "surrogatepass"))
    if facts.xfcc is not None:
        tlvs += _tlv(PP2_TYPE_MTLSGATE_XFCC, facts.xfcc.encode("ascii"))
    length = len(addresses) + len(tlvs)
    if length > _MAX_LENGTH:
        raise HeaderTooLong(f"the client's identity needs {length} bytes of PROXY v2 header, more than its {_MAX_LENGTH}")
    command = VERSION_2_PROXY if family != AF_UNSPEC else VERSION_2_LOCAL
    return SIGNATURE + struct.pack("!BBH", command, family, length) + addresses + tlvs
