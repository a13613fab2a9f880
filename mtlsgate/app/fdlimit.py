"""
File descriptors: the soft RLIMIT_NOFILE raised to the hard limit at start-up, and C{max_connections}
held to what the descriptors allow, so that a flood of idle connections meets the connection limit
(refused at once, counted) before it meets EMFILE (no descriptor left for an admitted client's
upstream connection, a certificate file or a log line).
"""

from __future__ import annotations

import resource
from typing import Callable

#: Descriptors kept for everything but connections: listeners, the reactor's own, log and access
#: files, certificate and CRL files being read, health checks, idle pooled upstream connections.
RESERVED = 64
#: Descriptors one client connection may take: its own and its upstream connection's.
PER_CONNECTION = 2
#: Where to stop when the hard limit is unlimited (the kernel's nr_open is usually 1048576).
UNLIMITED_TARGET = 1 << 20

Limit = tuple[int, int]


def raise_soft_limit(
    getrlimit: Callable[[int], Limit] = resource.getrlimit, setrlimit: Callable[[int, Limit], None] = resource.setrlimit,
) -> tuple[int, int]:  # fmt: skip
    """
    Raise the soft RLIMIT_NOFILE to the hard limit, as nginx's worker_rlimit_nofile would; returns
    C{(before, after)}, the soft limit before and after (equal when there was nothing to raise or the
    system said no).
    """
    soft, hard = getrlimit(resource.RLIMIT_NOFILE)
    target = UNLIMITED_TARGET if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return soft, soft  # e.g. above the kernel's nr_open: keep what there is
        return soft, target
    return soft, soft


def connection_ceiling(nofile: int) -> int:
    """How many client connections C{nofile} descriptors can carry, each with an upstream connection, beside the reserve."""
    return max(1, (nofile - RESERVED) // PER_CONNECTION)
