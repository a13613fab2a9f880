"""
A cut-off upstream body taken for a whole one (docs/security.md, "The IResponse contract's outcomes made on first use").

The proxy's relay ends the client's response as complete only when the upstream body's end is Twisted's
C{ResponseDone} or C{PotentialDataLoss}; since C{mtlsgate.http.outcomes} recognises them without importing
twisted.web.client first, an attacker controlling how an upstream connection ends must not find an end that passes
for clean: any other error, one wrapping a clean end, or a class that merely shares the name, is a cut-off body.
"""

from __future__ import annotations

import pytest
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web import client

from mtlsgate.proxy.exchange import _ResponseRelay


class _Request:
    disconnected = False

    def registerProducer(self, producer, streaming):  # type: ignore[no-untyped-def]
        pass

    def unregisterProducer(self) -> None:
        pass

    def write(self, data: bytes) -> None:
        pass


def _impostor(name: str) -> BaseException:
    """An exception whose class is called as Twisted's, from another module (as an upstream-facing library might raise)."""
    return type(name, (Exception,), {"__module__": "evil.web.client"})()


def _ended_with(error: BaseException) -> Failure | None:
    told: list[Failure | None] = []
    relay = _ResponseRelay(_Request(), told.append, Clock(), 30.0)  # type: ignore[arg-type]
    relay.makeConnection(type("Transport", (), {"stopProducing": lambda self: None})())
    relay.dataReceived(b"part of the body")
    relay.connectionLost(Failure(error))
    (outcome,) = told
    return outcome


@pytest.mark.parametrize("error", [client.ResponseDone(), client.PotentialDataLoss()], ids=["ResponseDone", "PotentialDataLoss"])
def test_twisted_s_clean_ends_complete_the_response(error):
    assert _ended_with(error) is None


@pytest.mark.parametrize(
    "error",
    [
        ConnectionDone(), ConnectionLost(), client.ResponseFailed([Failure(client.ResponseDone())]),
        client.ResponseNeverReceived([Failure(client.ResponseDone())]), _impostor("ResponseDone"), _impostor("PotentialDataLoss"),
        ValueError("ResponseDone"),
    ],
    ids=["ConnectionDone", "ConnectionLost", "ResponseFailed(ResponseDone)", "ResponseNeverReceived(ResponseDone)",
         "impostor ResponseDone", "impostor PotentialDataLoss", "a message that says it"],
)  # fmt: skip
def test_every_other_end_cuts_the_response_off(error):
    outcome = _ended_with(error)
    assert outcome is not None and outcome.value is error
