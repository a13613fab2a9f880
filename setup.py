"""
The build of mtlsgate's wheel beyond pyproject.toml (which holds all the metadata): the data path's
per-request modules compiled to C with mypyc, as black and mypy ship theirs (docs/engine.md, "Compiled").

mypyc compiles these modules from their type annotations (the same that `mypy` checks in CI): their
classes become C structs with typed attributes, their calls C calls.  In memory a kept-alive request
costs the gateway's own code about half as much (bench/RESULTS.md, "Compiled hot path").  The `.py`
sources ship beside the compiled modules, which the import system prefers.

    pip install .                     # compiled when a C compiler and Python's headers are there, else pure Python
    MTLSGATE_COMPILE=1 pip wheel .    # compiled, or the build fails (CI)
    MTLSGATE_COMPILE=0 pip wheel .    # pure Python: the same behaviour, about twice the CPU per request
    pip install -e .                  # pure Python too, so that edits to the checkout take effect
"""

from __future__ import annotations

import os
import sys
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext

# The per-request path: the HTTP/1.1 server and client, their header and framing rules, the path normaliser, the
# exchange between them, their timer, and the TLS layer's sending and reading at once.  tests/unit/test_compiled.py
# holds an installed wheel to this list; mypyc.ini is the type check mypyc compiles them from.
COMPILED = [
    "mtlsgate/http/framing.py",
    "mtlsgate/http/headers.py",
    "mtlsgate/http/pathnorm.py",
    "mtlsgate/http/server.py",
    "mtlsgate/http/client.py",
    "mtlsgate/proxy/exchange.py",
    "mtlsgate/tls/fastwrite.py",
    "mtlsgate/http/timer.py",
]

_MODE = os.environ.get("MTLSGATE_COMPILE", "auto")


class _CompileIfPossible(build_ext):
    """
    With MTLSGATE_COMPILE unset, a machine without a C compiler or Python's headers still gets a working (pure-Python)
    install: the failure is reported and every compiled output removed, never some modules compiled and others not (the
    compiled ones call each other inside one shared library).
    """

    def run(self) -> None:
        try:
            super().run()
        except Exception as e:  # the compiler's errors come as several distutils/setuptools classes, and OSError
            if _MODE == "1":
                raise
            for output in self.get_outputs():
                if os.path.exists(output):
                    os.remove(output)
            self.extensions = []
            print(f"mtlsgate: the hot path was not compiled ({e}); installing the pure-Python modules", file=sys.stderr)


def _ext_modules() -> list[Any]:
    if _MODE == "0" or "editable_wheel" in sys.argv:
        # `pip install -e .` (setuptools' editable_wheel) stays pure Python: compiled modules beside the sources of a
        # checkout would shadow every edit made to them until the next build.
        return []
    from mypyc.build import mypycify

    return mypycify(["--config-file", "mypyc.ini", *COMPILED], opt_level="3")


setup(ext_modules=_ext_modules(), cmdclass={"build_ext": _CompileIfPossible})
