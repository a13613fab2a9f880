"""
After start-up, once: move what start-up built out of the cyclic garbage collector's way, and give
the heap pages it freed back to the system.

Start-up leaves some 50,000 objects the collector tracks (modules, classes, functions, the
configuration) that live as long as the process.  Every full collection walks all of them: with
requests in flight, full collections come every few thousand requests and each took 25-40 ms of a
loaded machine's CPU (about 10 us per request on average, and a pause for every request in flight on
that process).  C{gc.freeze()} puts them in the permanent generation, which collections skip;
objects made later are collected as before.  Measured in bench/RESULTS.md (issue #13).
"""

from __future__ import annotations

import ctypes
import gc
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
