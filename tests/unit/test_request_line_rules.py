"""
The request line's rules in one pass (mtlsgate.http.framing.request_line_problems, the head scan's form) against the
two rules it stands for, each with its own split: the same answer for any line a client could send.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mtlsgate.http.framing import request_line_form_problem, request_line_problem, request_line_problems

_PIECES = st.sampled_from([b"GET", b"get", b"P\xc3\xb6ST", b"", b" ", b"/", b"/a b", b"/\x7f", b"/\x80", b"*", b"HTTP/1.1", b"HTTP/1.0",
                           b"HTTP/2.0", b"http/1.1", b"\t", b"@", b"/%41?q=#f"])  # fmt: skip


@given(st.lists(st.one_of(_PIECES, st.binary(max_size=6)), max_size=5))
def test_the_one_pass_request_line_rules_answer_as_the_two_rules_do(pieces):
    line = b" ".join(pieces)
    assert request_line_problems(line) == (request_line_problem(line) or request_line_form_problem(line))


def test_a_sound_request_line_has_no_problem_and_each_broken_part_is_named():
    assert request_line_problems(b"GET /x?y HTTP/1.1") is None
    assert "request target" in (request_line_problems(b"GET /\x7f HTTP/1.1") or "")
    assert "token" in (request_line_problems(b"G(T / HTTP/1.1") or "")
    assert "version" in (request_line_problems(b"GET / HTTP/2.0") or "")
    assert "single spaces" in (request_line_problems(b"GET  / HTTP/1.1") or "")
