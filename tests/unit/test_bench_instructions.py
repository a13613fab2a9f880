"""bench/instructions_per_request.py's reading of a callgrind dump: each function's own instructions, a callee's line left out."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tests.conftest import ROOT

DUMP = """\
# callgrind format
events: Ir
summary: 1000

ob=(1) /usr/lib/libpython3.11.so.1.0
fl=(1) ceval.c
fn=(1) _PyEval_EvalFrameDefault
10 300
+2 100
cob=(2) /site-packages/_rust.abi3.so
cfi=(2) gcm.c
cfn=(2) aes_gcm
calls=4 20
* 550
ob=(2)
fl=(2)
fn=(2)
20 500
ob=(1)
fn=(3) _PyType_Lookup
5 50
"""


def test_own_costs_leave_callees_out_and_follow_name_compression(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("instructions_per_request", ROOT / "bench" / "instructions_per_request.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    dump = tmp_path / "callgrind.out.1"
    dump.write_text(DUMP)
    total, costs = bench.self_costs(dump)
    assert total == 1000  # callgrind's summary line
    assert costs == {
        ("libpython3.11.so.1.0", "_PyEval_EvalFrameDefault"): 400,  # not the 550 its call to aes_gcm cost
        ("_rust.abi3.so", "aes_gcm"): 500,
        ("libpython3.11.so.1.0", "_PyType_Lookup"): 50,
    }
