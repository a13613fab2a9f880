"""
An independent model of a *normalising* upstream: how nginx, Go's net/http, Tomcat, Jetty, Spring and
friends, taken together, could read the path of a request target they receive.  The union of their
habits, each one applied: percent-decode everything (once), cut at a decoded NUL (C string
handling), map C{\\} to C{/} (Windows-minded servers), strip C{;params} from every segment
(Tomcat/Jetty/Spring), merge empty segments (nginx C{merge_slashes}), resolve dot segments (RFC 3986
5.2.4).  Deliberately written without anything from mtlsgate, so it can judge the gateway.
"""

from __future__ import annotations

from urllib.parse import unquote_to_bytes


def upstream_path(target: bytes) -> bytes:
    """The path a normalising upstream serves for this request target (query and fragment cut off)."""
    path = target.split(b"#", 1)[0].split(b"?", 1)[0]
    decoded = unquote_to_bytes(path).split(b"\x00", 1)[0].replace(b"\\", b"/")
    segments = [segment.split(b";", 1)[0] for segment in decoded.split(b"/")[1:]]
    out: list[bytes] = []
    trailing = False
    for segment in segments:
        trailing = segment in (b"", b".", b"..")
        if segment == b"..":
            if out:
                out.pop()
        elif segment not in (b"", b"."):
            out.append(segment)
    return b"/" + b"/".join(out) + (b"/" if trailing and out else b"")


def upstream_route(prefixes: list[str], target: bytes) -> str | None:
    """
    The prefix (plain ASCII, no trailing slash but C{/}) that a normalising upstream's view of
    C{target} falls under, matched on whole segments, longest first.
    """
    path = upstream_path(target)
    for prefix in sorted(prefixes, key=len, reverse=True):
        p = prefix.encode("ascii")
        if p == b"/" or path == p or path.startswith(p + b"/"):
            return prefix
    return None
