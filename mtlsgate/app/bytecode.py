"""
C{worker_bytecode: DIR}: workers run as C{python -OO} (no docstrings, no asserts: about 3 MiB less of a
worker's idle memory, nearly all of it the docstrings of Twisted, the standard library and mtlsgate),
loading bytecode from DIR (C{-X pycache_prefix=DIR}) that the parent compiles there.

pip installs no C{-OO} bytecode (C{.opt-2.pyc}) and site-packages is often read-only, so without a
cache of its own each worker would compile every module from source at each start (about 0.6 s of CPU
per process).  The parent compiles what is missing or stale before it starts the workers: the modules
it imported itself (the gateway's whole stack) and the worker's own; the first start pays for that once
(about 2 s of CPU), later starts only read the files' headers.  A module a worker imports later (h2 on
the first HTTP/2 connection, the ACME stack in worker 0) is compiled by that worker and written to DIR.

Safety: DIR holds code the workers run, so it must be this process's user's own and writable by no one
else (checked at each start, after twistd's C{-u}/C{-g}); it is created C{0700}.  No code a worker runs
reads a docstring (Twisted's error messages are class attributes, not docstrings; usage help is the
parent's), and no trust decision rests on an C{assert} (mtlsgate's are type narrowing and invariants the
config loader already holds).  Measured in bench/RESULTS.md ("worker idle RSS, fourth round").
"""

from __future__ import annotations

import importlib.util
import os
import stat
import sys
from typing import Iterable

#: Modules a worker imports that its parent does not (the idna codec: on its first request).
WORKER_MODULES = ("mtlsgate.app.worker", "mtlsgate.app.memory", "encodings.idna", "stringprep")


class BytecodeError(Exception):
    """DIR cannot be used safely (created, owned, or written only by this user)."""


def private_directory(directory: str) -> None:
    """Create C{directory} (0700) if missing; refuse one that is not ours alone: the workers run what it holds."""
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        st = os.lstat(directory)
    except OSError as e:
        raise BytecodeError(f"worker_bytecode: {directory}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise BytecodeError(f"worker_bytecode: {directory} is not a directory (a symbolic link?)")
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise BytecodeError(
            f"worker_bytecode: {directory} must belong to this user (uid {os.getuid()}) and be writable by no one else "
            f"(it is uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}): the workers run the code it holds"
        )


def cache_path(source: str, directory: str) -> str:
    """Where C{python -OO -X pycache_prefix=directory} looks for C{source}'s bytecode (the import system's own rule)."""
    saved = sys.pycache_prefix
    sys.pycache_prefix = directory
    try:
        return importlib.util.cache_from_source(os.path.abspath(source), optimization=2)
    finally:
        sys.pycache_prefix = saved


def _fresh(source: str, cached: str) -> bool:
    """Whether C{cached} is valid bytecode of C{source} as it is now (the header the import system checks)."""
    try:
        st = os.stat(source)
        with open(cached, "rb") as f:
            header = f.read(16)
    except OSError:
        return False
    return (
        len(header) == 16 and header[:4] == importlib.util.MAGIC_NUMBER and header[4:8] == b"\0\0\0\0"
        and int.from_bytes(header[8:12], "little") == int(st.st_mtime) & 0xFFFFFFFF
        and int.from_bytes(header[12:16], "little") == st.st_size & 0xFFFFFFFF
    )  # fmt: skip


def sources(extra: Iterable[str] = WORKER_MODULES) -> list[str]:
    """The source files of the modules this process imported, and of C{extra}."""
    files = {getattr(module, "__file__", None) for module in list(sys.modules.values())}
    for name in extra:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        files.add(spec.origin if spec is not None else None)
    return sorted(f for f in files if isinstance(f, str) and f.endswith(".py"))


def fill(directory: str, files: Iterable[str]) -> int:
    """Compile (C{-OO}) into C{directory} each of C{files} whose bytecode there is missing or stale; returns how many."""
    import py_compile  # the parent's alone: a worker imports this module (through mtlsgate.app.workers) but never compiles

    compiled = 0
    for source in files:
        cached = cache_path(source, directory)
        if _fresh(source, cached):
            continue
        try:
            py_compile.compile(source, cfile=cached, optimize=2, doraise=True, invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP)
        except (py_compile.PyCompileError, OSError):
            continue  # the worker compiles it from source, as without a cache
        compiled += 1
    return compiled


def interpreter_flags(directory: str) -> list[str]:
    """The flags a worker's interpreter starts with."""
    return ["-OO", "-X", f"pycache_prefix={directory}"]
