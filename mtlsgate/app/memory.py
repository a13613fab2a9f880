"""
After start-up, once: move what start-up built out of the cyclic garbage collector's way, and give
the heap pages it freed back to the system.

Start-up leaves some 50,000 objects the collector tracks (modules, classes, functions, the
configuration) that live as long as the process.  Every full collection walks all of them: with
requests in flight, full collections come every few thousand requests and each took 25-40 ms of a
loaded machine's CPU (about 10 us per request on average, and a pause for every request in flight on
that process).  C{gc.freeze()} puts them in the permanent generation, which collections skip;
objects made later are collected as before.  Measured in bench/RESULTS.md (issue #13).

Before start-up, in a worker: L{without_twisted_web_http2}, L{without_stdlib_openssl}.
"""

from __future__ import annotations

import ctypes
import gc
import sys
from typing import Any


def settle() -> None:
    """Freeze the objects start-up made, and (glibc) return the heap pages it freed to the system."""
    gc.collect()
    gc.freeze()
    try:
        ctypes.CDLL(None).malloc_trim(0)  # about 1.3 MiB of a worker's idle RSS
    except (OSError, AttributeError):
        pass  # not glibc


def settle_when_running(reactor: Any) -> None:
    """L{settle} once C{reactor} runs (start-up is over then: listeners bound, the service started)."""
    reactor.callWhenRunning(settle)


def without_twisted_web_http2() -> None:
    """
    Keep C{twisted.web.http} from importing Twisted's own HTTP/2 server (C{twisted.web._http2}), in a
    worker process, before anything imports C{twisted.web.http}.

    The gateway imports C{twisted.web.http} only through C{twisted.web.client}'s exception classes
    (C{ResponseDone}, C{ResponseFailed}: the C{IResponse} contract, made on first use by
    L{mtlsgate.http.outcomes}: an upstream's failure, a health check) and serves HTTP/2 with its own
    front end (L{mtlsgate.http.h2server}), never with Twisted's.  Yet C{twisted.web.http} tries
    C{from twisted.web._http2 import H2Connection}, which imports C{h2}, C{hpack} and C{hyperframe}
    (1.2 MiB) even where that import then fails (no C{priority} package) and even in a process that
    never speaks HTTP/2.  A C{None} in C{sys.modules} makes that import fail at once (the import
    system's documented way to block one), so C{twisted.web.http.H2_ENABLED} is false: Twisted's web
    server, which a worker runs only for the plain-HTTP redirect listener, would not offer h2 there
    anyway (no TLS, no ALPN).  A no-op when C{twisted.web.http} is already imported.
    """
    if "twisted.web.http" not in sys.modules:
        sys.modules.setdefault("twisted.web._http2", None)  # type: ignore[arg-type]


#: The standard library's bindings to the system's OpenSSL: C{ssl} (with C{_ssl}) and C{_hashlib}.
STDLIB_OPENSSL = ("ssl", "_hashlib")


def without_stdlib_openssl() -> None:
    """
    Keep the standard library's own OpenSSL bindings (C{ssl}, C{_hashlib}) out of a worker process, before anything
    imports Twisted.

    The gateway's TLS is pyOpenSSL's, on the OpenSSL that cryptography's Rust extension carries; yet a Twisted process
    also loads the system's C{libcrypto} and C{libssl} a second time: C{twisted.python.compat} imports
    C{http.cookiejar} (and so C{urllib.request}, C{http.client}: C{ssl}, C{hashlib}) and C{twisted.internet.defer}
    imports asyncio (C{ssl} again), though nothing a worker runs uses either.  Loading and initialising that second
    OpenSSL (its providers, error strings, C{_hashlib}'s digest table) costs a worker about 4.5 MiB of RSS: 3.4 of it
    the library's pages, shared with the other processes, the rest the worker's own.  Every one of those importers
    takes an C{ImportError} as the standard library documents for a Python built without OpenSSL (asyncio and
    C{http.client} go without TLS, C{hashlib} falls back to its built-in SHA-2, SHA-3, BLAKE2, SHA-1 and MD5), and a
    C{None} in C{sys.modules} is the import system's documented way to make that import fail.  The ACME stack and
    C{prometheus_client} do need C{ssl}: the parent passes C{--no-stdlib-ssl} only to a worker that runs neither
    (L{mtlsgate.app.workers}).  A no-op for a module already imported.
    """
    for name in STDLIB_OPENSSL:
        if name not in sys.modules:
            sys.modules[name] = None  # type: ignore[assignment]
