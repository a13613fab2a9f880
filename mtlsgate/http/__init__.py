"""The gateway's own HTTP/1.1 engine on httptools (llhttp): the downstream server protocol and the upstream client."""

import importlib.machinery as _machinery


def compiled() -> bool:
    """Whether this install runs the compiled engine (mypyc: setup.py, docs/engine.md "Compiled") or the pure-Python one."""
    from mtlsgate.http import server

    return str(server.__file__).endswith(tuple(_machinery.EXTENSION_SUFFIXES))
