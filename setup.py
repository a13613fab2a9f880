"""
The build of mtlsgate's wheel beyond pyproject.toml (which holds all the metadata): the data path's hot
modules compiled to C with mypyc, as black and mypy ship theirs.

mypyc compiles these modules from their type annotations (the same that `mypy` checks in CI): their
classes become C structs with typed attributes, their calls direct C calls.  In memory (bench/RESULTS.md,
"Compiled hot path") a kept-alive request costs the gateway's Python about half as much.  The `.py`
sources ship beside the compiled modules, which the import system prefers; everything else stays Python.

    pip wheel .                       # compiled (needs a C compiler and Python's headers)
    MTLSGATE_COMPILE=0 pip wheel .    # pure Python, the same behaviour: for a platform without a compiler

docs/engine.md ("Compiled") says what a compiled module may not do (set attributes that are not declared, be
subclassed outside the compiled set unless marked, rely on narrowing across a call that changes an attribute).
"""

from __future__ import annotations

import os

from setuptools import setup

# The per-request path: the HTTP/1.1 server and client, their header and framing rules, the path normaliser and the
# exchange between them.  tests/unit/test_compiled.py holds an installed wheel to this list.
COMPILED = [
    "mtlsgate/http/framing.py",
    "mtlsgate/http/headers.py",
    "mtlsgate/http/pathnorm.py",
    "mtlsgate/http/server.py",
    "mtlsgate/http/client.py",
    "mtlsgate/proxy/exchange.py",
]


def ext_modules() -> list:
    if os.environ.get("MTLSGATE_COMPILE", "1") == "0":
        return []
    from mypyc.build import mypycify

    return mypycify(COMPILED, opt_level="3")


setup(ext_modules=ext_modules())
