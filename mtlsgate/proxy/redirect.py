"""
The plain-HTTP listener's resource: a 308 to the same URL on HTTPS, and ACME http-01 answers.

Imported only by a process that serves that listener (C{http_address}; in a worker group, worker 0),
with twisted.web's server and resource modules: the HTTPS path never needs them (issue #13).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from twisted.logger import Logger
from twisted.web.resource import Resource

from mtlsgate.proxy.routing import normalize_host

if TYPE_CHECKING:
    from twisted.web import server

log = Logger(namespace="mtlsgate.proxy.exchange")  # the namespace its lines always had

ACME_CHALLENGE_PATH = b"/.well-known/acme-challenge/"


class RedirectToHTTPS(Resource):
    """
    The plain-HTTP listener: 308 to the same URL on HTTPS, except ACME http-01 challenges, which
    C{acme_http01} (token -> key authorization, or None) answers when autocert is on.
    """

    isLeaf = True

    def __init__(self, https_port: Callable[[], int | None], acme_http01: Callable[[str], str | None] | None = None) -> None:
        super().__init__()
        self._https_port = https_port
        self._acme_http01 = acme_http01

    def render(self, request: server.Request) -> bytes:
        if self._acme_http01 is not None and request.path.startswith(ACME_CHALLENGE_PATH):
            return self._challenge(request)
        host = (request.getHeader(b"host") or b"").decode("ascii", "replace")
        name = normalize_host(host) or request.getHost().host
        if ":" in name:
            name = f"[{name}]"
        port = self._https_port()
        netloc = name if port in (None, 443) else f"{name}:{port}"
        request.setResponseCode(308)
        request.setHeader(b"location", f"https://{netloc}".encode("ascii", "replace") + request.uri)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"308 Permanent Redirect: use HTTPS\n"

    def _challenge(self, request: server.Request) -> bytes:
        token = request.path[len(ACME_CHALLENGE_PATH):].decode("ascii", "replace")
        answer = self._acme_http01(token) if self._acme_http01 is not None else None
        request.setHeader(b"content-type", b"text/plain")
        if answer is None:
            request.setResponseCode(404)
            return b"no such challenge\n"
        log.info("answered the http-01 challenge {token} for {host}",
                 token=token, host=normalize_host((request.getHeader(b"host") or b"").decode("ascii", "replace")))
        return answer.encode("ascii")
