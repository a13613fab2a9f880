"""
mtlsgate.http.status (the standard library's HTTPStatus and formatdate) against twisted.web.http's
RESPONSES and datetimeToString, which the gateway used before: what a client reads stays byte for byte
the same, for every status code and every second.
"""

from __future__ import annotations

import time

from hypothesis import given, strategies as st
from twisted.web.http import RESPONSES as TWISTED_RESPONSES, datetimeToString

from mtlsgate.http import status


def test_every_status_code_has_twisted_s_reason_phrase():
    for code in range(1000):
        assert status.RESPONSES.get(code) == TWISTED_RESPONSES.get(code), code
    assert status.RESPONSES == TWISTED_RESPONSES


def test_the_engines_fallbacks_for_unnamed_codes_are_unchanged():
    """An HTTP/1.1 status line for a code with no phrase still reads "Unknown Status", an error body's phrase stays empty."""
    from twisted.internet.testing import MemoryReactorClock

    from mtlsgate.config.model import Limits
    from mtlsgate.http.server import HTTPServerFactory, Request

    channel = HTTPServerFactory(lambda request: None, Limits(), MemoryReactorClock()).buildProtocol(None)
    request = Request(channel, b"GET", b"/", b"HTTP/1.1", [], None, True, False, False)
    for code in (299, 429, 431, 599):
        request.setResponseCode(code)
        assert request.code_message == TWISTED_RESPONSES.get(code, b"Unknown Status")


@given(st.integers(min_value=0, max_value=2**33))
def test_http_dates_are_twisted_s_for_any_second(seconds):
    assert status.http_date(seconds) == datetimeToString(seconds)


def test_the_date_header_now():
    now = int(time.time())
    assert status.http_date(now) == datetimeToString(now)
