"""
The request-head rules of docs/security.md as pure functions over bytes: what the server protocol
refuses before llhttp (or anyone upstream) reads a request.

A head is scanned line by line, in the order the bytes arrive, and the first broken rule decides:
so the decision is the same however the client's bytes are split into reads (a property test holds
this).  Per line, in order: its length (414 for the request line, 431 for a header line), a bare LF,
then the line's own rules (the request line's form and target bytes; obs-fold, token names, control
characters, Content-Length and Transfer-Encoding values for a header line); after each header line,
the header count and the head's total size (431).  An incomplete line is only ever refused for its
length, which is the first rule of a line, so waiting for its end never changes a decision.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from mtlsgate.config.model import Limits

_VISIBLE_ASCII = bytes(range(0x21, 0x7F))
_CONTROLS = bytes(range(0x00, 0x09)) + bytes(range(0x0A, 0x20)) + b"\x7f"  # every CTL but HTAB
_TOKEN_CHARS = rb"!#$%&'*+\-.^_`|~0-9A-Za-z"
_TOKEN = re.compile(rb"[" + _TOKEN_CHARS + rb"]+\Z")
_DIGITS = re.compile(rb"[0-9]+\Z")
MAX_CONTENT_LENGTH = 2**63 - 1  # nginx's off_t bound; larger values mean nothing to anyone downstream
VERSIONS = frozenset([b"HTTP/1.1", b"HTTP/1.0"])

# A header block (after the request line) every line of which is "token: value" with a value free of
# control characters but HTAB, ending in an empty line, all with CRLF: the common case, checked by one
# regular expression instead of line by line.
_CLEAN_HEADERS = re.compile(rb"(?:[" + _TOKEN_CHARS + rb"]+:[\t\x20-\x7e\x80-\xff]*\r\n)*\r\n")

BARE_LF = "bare LF line ending (CRLF required)"
OBS_FOLD = "obsolete line folding in a header"


class Refusal(NamedTuple):
    """A request the gateway answers itself, with this status and reason, and then closes."""

    code: int
    reason: str


def request_line_problem(line: bytes) -> str | None:
    """
    Why a request line (without CRLF) must be refused for its target, or None.  The request target
    is visible ASCII only (RFC 9112 3.2): twisted.web let 0x7F-0xB0 through (an octal/decimal slip),
    which the upstream URL would then carry.
    """
    parts = line.split(b" ")
    if len(parts) != 3:
        return None
    stray = parts[1].translate(None, _VISIBLE_ASCII)
    if stray:
        return f"byte 0x{stray[0]:02X} in the request target (only visible ASCII is allowed)"
    return None


def request_line_form_problem(line: bytes) -> str | None:
    """Why a request line is not C{method SP target SP version}, with a token method and HTTP/1.0 or 1.1, or None."""
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[1]:
        return "malformed request line (method, target and version separated by single spaces)"
    if not _TOKEN.match(parts[0]):
        return "the method is not a token"
    if parts[2] not in VERSIONS:
        return "unsupported protocol version (HTTP/1.1 and HTTP/1.0 are served)"
    return None


def request_line_problems(line: bytes) -> str | None:
    """L{request_line_problem}, then L{request_line_form_problem}, over one split of the line: the first that applies, or None."""
    parts = line.split(b" ")
    if len(parts) == 3:
        stray = parts[1].translate(None, _VISIBLE_ASCII)
        if stray:
            return f"byte 0x{stray[0]:02X} in the request target (only visible ASCII is allowed)"
        if parts[1] and _TOKEN.match(parts[0]) and parts[2] in VERSIONS:
            return None
    return request_line_form_problem(line)


def method_problem(method: bytes) -> str | None:
    """Why a method (HTTP/2's C{:method}, which HPACK lets hold any byte) is not what a request line may carry: a token; or None."""
    return None if _TOKEN.match(method) else "the method is not a token"


def header_field_problem(name: bytes, value: bytes) -> str | None:
    """
    Why a header field (C{value} without its surrounding whitespace) must be refused, or None.  Names
    are RFC 9110 tokens; values carry no control character but HTAB (obs-text, 0x80-0xFF, is passed
    on, as nginx and Go do); Content-Length is 1*DIGIT below 2^63; Transfer-Encoding is chunked.
    """
    if not _TOKEN.match(name):
        return f"header name {name.decode('latin-1')!r} is not a token"
    if len(value.translate(None, _CONTROLS)) != len(value):
        first = next(b for b in value if b in _CONTROLS)
        return f"control character 0x{first:02X} in the value of header {name.decode('ascii')}"
    return framing_value_problem(name, value)


def framing_value_problem(name: bytes, value: bytes) -> str | None:
    """The Content-Length and Transfer-Encoding rules of L{header_field_problem} alone (for a field known to be well-formed)."""
    if len(name) == 14 and name.lower() == b"content-length" and (not _DIGITS.match(value) or int(value) > MAX_CONTENT_LENGTH):
        return "Content-Length must be decimal digits only, below 2^63"
    if len(name) == 17 and name.lower() == b"transfer-encoding" and value.lower() != b"chunked":
        return "only 'Transfer-Encoding: chunked' is accepted"
    return None


def header_line_problem(content: bytes) -> str | None:
    """Why a header line (without its CRLF) must be refused, or None."""
    if content[:1] in (b" ", b"\t"):
        return OBS_FOLD
    name, colon, value = content.partition(b":")
    if not colon:
        return "a header line without a colon"
    return header_field_problem(name, value.strip(b" \t"))


class HeadScan:
    """Where the scan of one request head stands: the next unchecked line, and what was counted."""

    __slots__ = ("offset", "lines", "line_end")

    def __init__(self) -> None:
        self.offset = 0  # where the next unchecked line starts
        self.lines = 0  # request line and header lines checked so far
        self.line_end = 0  # where the request line's CRLF starts (its content is buf[:line_end])


def scan_head(buf: bytes, scan: HeadScan, limits: Limits) -> Refusal | int | None:
    """
    Check the lines of a request head in C{buf} (starting at C{scan}'s offset) against the rules: a
    L{Refusal}, the offset just after the head's empty line when the head is complete and sound, or
    None while more bytes are needed.
    """
    if scan.offset == 0:
        fast = _whole_head(buf, scan, limits)
        if fast is not None:
            return fast
    while True:
        start = scan.offset
        lf = buf.find(b"\n", start)
        first = scan.lines == 0
        if lf == -1:
            partial = len(buf) - start - (1 if buf.endswith(b"\r") else 0)
            if partial > limits.max_line_length:
                return _too_long(first, limits)
            return None
        crlf = lf > start and buf[lf - 1] == 0x0D
        content_end = lf - 1 if crlf else lf
        if content_end - start > limits.max_line_length:
            return _too_long(first, limits)
        if not crlf:
            return Refusal(400, BARE_LF)
        scan.offset = lf + 1
        if first:
            content = buf[start:content_end]
            problem = request_line_problems(content)
            if problem is not None:
                return Refusal(400, problem)
            scan.line_end = content_end
        elif content_end == start:
            return scan.offset  # the empty line: the head is complete
        else:
            problem = header_line_problem(buf[start:content_end])
            if problem is not None:
                return Refusal(400, problem)
            if scan.lines > limits.max_header_count:
                return Refusal(431, f"more than {limits.max_header_count} header fields")
        scan.lines += 1
        if scan.offset > limits.max_header_size:
            return Refusal(431, f"request line and headers larger than {limits.max_header_size} bytes")


def _whole_head(buf: bytes, scan: HeadScan, limits: Limits) -> Refusal | int | None:
    """
    The common case in one pass: a whole head within every size limit whose header block is clean
    (see L{_CLEAN_HEADERS}); None sends the head to the line-by-line scan, which finds the same
    answer for these heads, only slower.
    """
    end = buf.find(b"\r\n\r\n")
    if end == -1:
        return None
    size = end + 4
    if size > limits.max_line_length or size > limits.max_header_size or buf.count(b"\n", 0, size) - 2 > limits.max_header_count:
        return None
    line_end = buf.find(b"\r\n")
    if not _CLEAN_HEADERS.fullmatch(buf, line_end + 2, size):
        return None
    line = buf[:line_end]
    if 0x0A in line:  # LF, as an int: quicker than b"\n" in
        return None
    problem = request_line_problems(line)
    if problem is not None:
        return Refusal(400, problem)
    scan.line_end = line_end
    scan.offset = size
    return size


def _too_long(first: bool, limits: Limits) -> Refusal:
    if first:
        return Refusal(414, f"request line longer than {limits.max_line_length} bytes")
    return Refusal(431, f"a header line is longer than {limits.max_line_length} bytes")
