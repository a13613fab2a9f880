"""
What the gateway asks of its reactor, as types: a function that needs one thing takes one of
Twisted's interfaces (C{IReactorTime}, C{IReactorCore}...); the parts that need several take one of
these combinations, which zope.interface (and mypy-zope) read as subtypes of each interface they
extend.  The reactor itself is passed in from the top (twistd, the worker, the CLI), typed once by
L{installed_reactor}.
"""

from __future__ import annotations

from typing import cast

from twisted.internet.interfaces import (
    IReactorCore,
    IReactorFromThreads,
    IReactorProcess,
    IReactorSocket,
    IReactorTCP,
    IReactorTime,
    IReactorUDP,
)


class IReactorTimeAndTCP(IReactorTime, IReactorTCP):
    """Timers and TCP connections: what an HTTP client (an Agent and its pool, a HostnameEndpoint) needs."""


class IGatewayReactor(IReactorCore, IReactorTimeAndTCP, IReactorUDP, IReactorProcess, IReactorFromThreads, IReactorSocket):
    """
    Everything some part of the gateway asks of the reactor: listeners (TCP, adopted sockets), clients,
    the DNS-01 resolver (UDP) and hook (processes), the worker group (processes), signal handlers
    (C{callFromThread}), start and shutdown triggers.  Twisted's default reactors provide them all.
    """


def installed_reactor() -> IGatewayReactor:
    """The reactor twistd installed (importing it installs the default one if none was), as the gateway types it."""
    from twisted.internet import reactor

    return cast(IGatewayReactor, reactor)
