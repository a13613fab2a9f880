"""The benchmark harness runs (a few seconds, tiny numbers): it must not rot between real runs."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT, subprocess_env

pytestmark = pytest.mark.needs("ab", "nginx")


def test_bench_smoke_run_prints_a_table_of_ratios():
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--smoke"], capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert result.returncode == 0, result.stderr
    lines = {line.split("  ")[0].strip(): line for line in result.stdout.splitlines() if "  " in line}
    for figure in ("keep-alive req/s c=32", "new mTLS connection+request/s c=32", "1 MiB responses MB/s", "RSS idle after warm-up (MiB)"):
        assert figure in lines and "nan" not in lines[figure], result.stdout
    assert lines["failed requests"].split()[2:4] == ["0.0", "0.0"], result.stdout
