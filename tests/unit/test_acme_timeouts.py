"""
A CA that hangs: every HTTP exchange of the ACME client is bounded by C{request_timeout}, the
hanging request is cancelled, and the failure is an L{ACMEError} (which the issuing service retries
with its back-off, see test_acme_service).  On a Clock, and once on a real socket that never answers.
"""

from __future__ import annotations

import socket

import pytest
import pytest_twisted
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.web.client import HTTPConnectionPool

from mtlsgate.acme.client import ACMEClient, ACMEError, http_client


class HangingHTTP:
    """A treq-like client whose requests (or, with C{body_hangs}, their bodies) never finish."""

    def __init__(self, body_hangs: bool = False) -> None:
        self.body_hangs = body_hangs
        self.pending: list[defer.Deferred] = []

    def _hang(self) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.pending.append(d)
        return d

    def get(self, url, **kwargs):
        if not self.body_hangs:
            return self._hang()
        http = self

        class Response:
            code = 200

            def content(self):
                return http._hang()

        return defer.succeed(Response())

    head = post = get


@pytest.mark.parametrize("body_hangs", [False, True])
def test_a_ca_that_never_answers_fails_the_call_after_request_timeout(body_hangs):
    clock, http = Clock(), HangingHTTP(body_hangs)
    client = ACMEClient(clock, http, "https://ca.test/directory", ec.generate_private_key(ec.SECP256R1()), request_timeout=20)
    result = client.register()
    failures: list = []
    result.addErrback(failures.append)
    clock.advance(19)
    assert not failures
    clock.advance(1)
    (failure,) = failures
    assert failure.check(ACMEError)
    assert "GET https://ca.test/directory: no answer from the CA within 20s" in str(failure.value)
    assert all(d.called for d in http.pending)  # the hanging request was cancelled, not left behind


@pytest_twisted.ensureDeferred
async def test_a_real_socket_that_accepts_and_never_answers():
    from twisted.internet import reactor

    listener = socket.create_server(("127.0.0.1", 0))
    try:
        pool = HTTPConnectionPool(reactor, persistent=False)
        client = ACMEClient(reactor, http_client(reactor, None, pool), f"http://127.0.0.1:{listener.getsockname()[1]}/directory",
                            ec.generate_private_key(ec.SECP256R1()), request_timeout=0.5)  # fmt: skip
        with pytest.raises(ACMEError, match="no answer from the CA within 0.5s"):
            await client.register()
        await pool.closeCachedConnections()
    finally:
        listener.close()
