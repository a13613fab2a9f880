"""
The product is what `pip install` puts in a venv: every module of the source ships, and the suite
(with every process it starts) runs the installed copy when CI says so, never the checkout.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from tests.conftest import PACKAGE_DIR, ROOT, TWISTD, importable_without_path, subprocess_env

SOURCE_MODULES = sorted(
    ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    for path in (ROOT / "mtlsgate").rglob("*.py")
)  # fmt: skip


def test_the_checkout_has_modules_to_compare():
    assert "mtlsgate.acme.client" in SOURCE_MODULES, f"no source under {ROOT}: set MTLSGATE_CHECKOUT"


@pytest.mark.parametrize("module", SOURCE_MODULES)
def test_every_source_module_is_in_the_package_under_test(module):
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None, f"{module} is not installed: the wheel lacks it"
    assert os.path.realpath(spec.origin).startswith(str(PACKAGE_DIR) + os.sep), (module, spec.origin)


def test_the_twistd_plugin_ships_with_the_package():
    plugin = importlib.util.find_spec("twisted.plugins.mtlsgate_plugin")
    assert plugin is not None, "twisted/plugins/mtlsgate_plugin.py is not installed: twistd would not know mtlsgate"


def test_subprocesses_run_the_same_mtlsgate_as_the_tests(tmp_path):
    probe = subprocess.run(
        [sys.executable, "-c", "import mtlsgate, os; print(os.path.realpath(mtlsgate.__file__))"],
        cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert probe.stdout.strip() == str(PACKAGE_DIR / "__init__.py")
    help_text = subprocess.run([*TWISTD, "--help"], cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=60).stdout
    assert "mtlsgate" in help_text, "twistd does not list the mtlsgate plugin"


@pytest.mark.skipif(os.environ.get("MTLSGATE_EXPECT_INSTALLED") != "1", reason="set by .ci/test, which runs against the installed wheel")
def test_ci_tests_the_installed_wheel_not_the_checkout():
    assert PACKAGE_DIR != (ROOT / "mtlsgate").resolve(), f"mtlsgate was imported from the checkout: {PACKAGE_DIR}"
    assert importable_without_path(PACKAGE_DIR.parent), f"mtlsgate is not in this interpreter's site-packages: {PACKAGE_DIR}"
    assert "PYTHONPATH" not in subprocess_env(), "subprocesses would be pointed at a source tree"
    assert str(ROOT.resolve()) not in {os.path.realpath(p or ".") for p in sys.path}, sys.path


def test_the_deployment_file_ships_with_the_package():
    from importlib.resources import files

    assert (files("mtlsgate") / "mtlsgate.tac").is_file(), "mtlsgate/mtlsgate.tac is not package data: 'mtlsgate tac' would fail"
