"""
Which of mtlsgate's modules run compiled (setup.py's COMPILED, built with mypyc): a compiled module binds the names it
imports when it loads, so a test that monkeypatches a module global to watch a compiled caller runs only against the
pure-Python build (.ci/test runs the unit tests against both wheels).
"""

from __future__ import annotations

import importlib.machinery
from types import ModuleType

import pytest


def is_compiled(module: ModuleType) -> bool:
    return str(getattr(module, "__file__", "")).endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def pure_python_only(module: ModuleType) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        is_compiled(module), reason=f"monkeypatches a global that compiled {module.__name__} binds when it loads: run against the pure-Python wheel"
    )
