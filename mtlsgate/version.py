"""The installed mtlsgate's version, for C{mtlsgate --version} and C{twistd mtlsgate --version}."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path


def version() -> str:
    """The version of the installed distribution; in a checkout without metadata, pyproject.toml's, marked as such."""
    try:
        return metadata.version("mtlsgate")
    except metadata.PackageNotFoundError:
        pass
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    try:
        match = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(encoding="utf-8"), re.MULTILINE)
    except OSError:
        match = None
    return f"{match.group(1)} (source checkout, not installed)" if match else "unknown (not installed)"
