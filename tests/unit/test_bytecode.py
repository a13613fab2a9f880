"""C{worker_bytecode}: the parent compiles -OO bytecode where a worker's interpreter looks for it, into a directory only its user can write."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mtlsgate.app import bytecode
from tests.conftest import subprocess_env


def test_the_parent_compiles_where_a_worker_interpreter_looks_and_only_once(tmp_path):
    source = tmp_path / "src" / "probe_mod.py"
    source.parent.mkdir()
    source.write_text('"""A docstring -OO drops."""\nassert False, "-OO drops asserts too"\nVALUE = 42\n')
    cache = str(tmp_path / "cache")
    bytecode.private_directory(cache)
    assert bytecode.fill(cache, [str(source)]) == 1
    assert bytecode.fill(cache, [str(source)]) == 0  # fresh: only its header is read
    os.utime(source, (1, 1))  # an upgrade: the source's mtime changes
    assert bytecode.fill(cache, [str(source)]) == 1
    probe = "import importlib.util, sys, probe_mod; print(importlib.util.cache_from_source(probe_mod.__file__), probe_mod.__doc__, probe_mod.VALUE)"
    env = {**subprocess_env(), "PYTHONPATH": str(source.parent)}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    result = subprocess.run([sys.executable, *bytecode.interpreter_flags(cache), "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [bytecode.cache_path(str(source), cache), "None", "42"]


def test_the_worker_modules_the_parent_did_not_import_are_compiled_too():
    files = bytecode.sources()
    assert any(f.endswith(os.path.join("mtlsgate", "app", "worker.py")) for f in files)
    assert any(f.endswith("stringprep.py") for f in files)


@pytest.mark.parametrize("mode", [0o770, 0o702, 0o777])
def test_a_directory_others_can_write_is_refused(tmp_path, mode):
    directory = tmp_path / "cache"
    directory.mkdir()
    directory.chmod(mode)
    with pytest.raises(bytecode.BytecodeError, match="writable by no one else"):
        bytecode.private_directory(str(directory))


def test_a_symbolic_link_is_refused(tmp_path):
    (tmp_path / "real").mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(bytecode.BytecodeError, match="not a directory"):
        bytecode.private_directory(str(tmp_path / "link"))


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to give the directory to another user")
def test_a_directory_of_another_user_is_refused(tmp_path):
    directory = tmp_path / "cache"
    directory.mkdir(mode=0o700)
    os.chown(directory, 65534, 65534)
    with pytest.raises(bytecode.BytecodeError, match="must belong to this user"):
        bytecode.private_directory(str(directory))


def test_a_new_directory_is_private(tmp_path):
    old = os.umask(0)
    try:
        bytecode.private_directory(str(tmp_path / "new" / "cache"))
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "new" / "cache").st_mode & 0o777 == 0o700
