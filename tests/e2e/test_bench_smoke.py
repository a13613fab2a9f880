"""The benchmark harness runs (a few seconds, tiny numbers): it must not rot between real runs."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT, subprocess_env

pytestmark = pytest.mark.needs("ab", "nginx")

SIDES = ("mtlsgate", "nginx", "aiohttp", "bare")
RATIOS = ("mg/nginx", "aio/nginx", "mg/aio", "bare/nginx", "mg/bare")


def test_bench_smoke_run_prints_a_table_of_four_sides_and_their_ratios():
    # No importorskip for aiohttp/uvloop: .ci/test installs mtlsgate[bench], and a missing peer must fail here, not skip.
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--smoke"], capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert result.returncode == 0, result.stdout + result.stderr
    table = result.stdout.splitlines()
    header = next(line for line in table if line.startswith("figure"))
    assert header.split()[1:10] == [*SIDES, *RATIOS], header
    lines = {line.split("  ")[0].strip(): line for line in table if "  " in line}
    for figure in ("keep-alive req/s c=32", "keep-alive req/s c=1", "new mTLS connection+request/s c=32",
                   "resumed mTLS connection+request/s c=1", "1 MiB responses MB/s", "RSS idle after warm-up (MiB)"):  # fmt: skip
        assert figure in lines, result.stdout
        values = lines[figure][len(figure):].split()
        assert len(values) == len(SIDES) + len(RATIOS), lines[figure]
        assert all(float(v) > 0 for v in values[: len(SIDES)]), lines[figure]  # every side measured something
    assert "p99 ms c=32" in lines, result.stdout
    assert "nan" not in result.stdout, result.stdout
    assert lines["failed requests"].split()[2:6] == ["0.0"] * len(SIDES), result.stdout
