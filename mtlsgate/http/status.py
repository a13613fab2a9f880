"""
Reason phrases and the C{Date} header's form, from the standard library (L{http.HTTPStatus},
L{email.utils.formatdate}; Twisted's core imports both already), byte for byte what the gateway sent
when it took them from C{twisted.web.http} (C{RESPONSES}, C{datetimeToString}).

The HTTP engines import this instead of C{twisted.web.http}, a large module that also tries to import
Twisted's own HTTP/2 server (issue #13: a worker's idle memory); tests/unit/test_status.py holds the
two tables equal for every code.
"""

from __future__ import annotations

from email.utils import formatdate
from http import HTTPStatus

#: Where twisted.web.http spells a phrase differently from the standard library (RFC 2616's spellings,
#: mostly; Python 3.13 renamed 413, 414, 416 after RFC 9110): its spelling, which clients have always read.
_TWISTED_SPELLING = {
    205: b"Reset Content.", 408: b"Request Time-out", 413: b"Request Entity Too Large", 414: b"Request-URI Too Long",
    416: b"Requested Range not satisfiable", 418: b"I'm a teapot", 504: b"Gateway Time-out", 505: b"HTTP Version not supported",
    507: b"Insufficient Storage Space",
}  # fmt: skip

#: Codes the standard library names and twisted.web.http does not: they kept no phrase (an empty one, or
#: "Unknown Status" in an HTTP/1.1 status line the gateway makes), and keep none.
_UNNAMED_BY_TWISTED = frozenset({102, 103, 208, 226, 421, 422, 423, 424, 425, 426, 428, 429, 431, 451, 506, 508, 511})

#: Status code -> reason phrase, as twisted.web.http.RESPONSES has them.
RESPONSES: dict[int, bytes] = {
    status.value: _TWISTED_SPELLING.get(status.value, status.phrase.encode("ascii")) for status in HTTPStatus if status.value not in _UNNAMED_BY_TWISTED
}


def http_date(seconds: int) -> bytes:
    """C{seconds} since the epoch as an HTTP date (RFC 9110 5.6.7, IMF-fixdate): C{b"Tue, 01 Dec 2026 19:08:01 GMT"}."""
    return formatdate(seconds, usegmt=True).encode("ascii")
