"""
The outcomes of Twisted's L{IResponse} contract, made and recognised without importing C{twisted.web.client} up front.

A response body's protocol learns how the body ended from C{connectionLost}: C{ResponseDone}, C{PotentialDataLoss}
or C{ResponseFailed}; a request that got no response fails with C{ResponseNeverReceived}, C{ResponseFailed} or
C{RequestGenerationFailed}.  They are C{twisted.web.client}'s own classes (what users of L{IAgent} check for), and
that module imports C{twisted.web.http}, C{_newclient}, C{_responses} and C{twisted.web.error}: about 1.4 MiB in
every worker, which one serving keep-alive requests never uses (a whole response reaches the proxy's relay by
C{upstream_whole} or C{body_done()}, with no outcome made).  So the HTTP engines make them with the functions below,
named as the classes they make so that a call site reads C{Failure(ResponseDone())} as before: the first call imports
C{twisted.web.client}, and what it returns is an instance of Twisted's class.  They are recognised with
L{is_clean_end}, L{is_response_done} and L{wraps_reasons}, which import nothing for an error of another module (an
instance of one of the classes exists only once its module is imported).

Likewise C{parse_origin} hands endpoint factories an L{mtlsgate.http.client.OriginURI}, not a C{twisted.web.client.URI}.
"""

from __future__ import annotations

from typing import Any

_NAMES = ("ResponseDone", "PotentialDataLoss", "ResponseFailed", "ResponseNeverReceived", "RequestGenerationFailed")
_classes: dict[str, Any] = {}  # name -> twisted.web.client's class, filled by the first use of any


def _class(name: str) -> Any:
    cls = _classes.get(name)
    if cls is None:
        import twisted.web.client as client  # the module reads ~3 us per attribute (a deprecation proxy): each read once

        _classes.update((each, getattr(client, each)) for each in _NAMES)
        cls = _classes[name]
    return cls


def ResponseDone() -> Exception:
    """A C{twisted.web.client.ResponseDone}: the response body came whole."""
    return _class("ResponseDone")()


def PotentialDataLoss() -> Exception:
    """A C{twisted.web.client.PotentialDataLoss}: a body framed by the connection's close ended with the close."""
    return _class("PotentialDataLoss")()


def ResponseFailed(reasons: list[Any]) -> Exception:
    """A C{twisted.web.client.ResponseFailed} wrapping C{reasons} (L{Failure}s): the response went wrong after its head."""
    return _class("ResponseFailed")(reasons)


def ResponseNeverReceived(reasons: list[Any]) -> Exception:
    """A C{twisted.web.client.ResponseNeverReceived} wrapping C{reasons}: the connection ended before a response came."""
    return _class("ResponseNeverReceived")(reasons)


def RequestGenerationFailed(reasons: list[Any]) -> Exception:
    """A C{twisted.web.client.RequestGenerationFailed} wrapping C{reasons}: the request (its body) could not be sent."""
    return _class("RequestGenerationFailed")(reasons)


def _twisted_web(error: object) -> bool:
    return type(error).__module__.startswith("twisted.web.")


def is_response_done(error: object) -> bool:
    """C{error} is a C{ResponseDone}."""
    return _twisted_web(error) and isinstance(error, _class("ResponseDone"))


def is_clean_end(error: object) -> bool:
    """C{error} is a C{ResponseDone} or a C{PotentialDataLoss}: all of the body came."""
    return _twisted_web(error) and isinstance(error, (_class("ResponseDone"), _class("PotentialDataLoss")))


def wraps_reasons(error: object) -> bool:
    """C{error} is a C{ResponseNeverReceived} or a C{ResponseFailed}, whose C{reasons} hold the causes."""
    return _twisted_web(error) and isinstance(error, (_class("ResponseNeverReceived"), _class("ResponseFailed")))
