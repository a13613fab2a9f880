"""
Instructions per kept-alive request of the whole gateway process, over real TLS: a figure the machine's noise does not move.

On a shared 2-core machine two runs of the same code differ by 20-40 % in req/s and CPU per request.  The instructions
a process executes per request do not depend on the machine's load.  This script starts the bench's nginx mTLS upstream
and a single-process mtlsgate (the one process does everything a worker does) under valgrind's callgrind, warms it up
with ab, zeroes the counters (callgrind_control -z), drives N kept-alive requests with ab (TLS 1.3, a client
certificate, as bench/run.py does), dumps the counters (callgrind_control -d) and prints the user-space instructions per
request: Python, OpenSSL, llhttp, the compiled modules, everything but the kernel.  Two runs of one build differ by
about 1 %.  With --top N it also prints the N functions (C level) with the most instructions of their own, and which
shared object they are in: where the interpreter, OpenSSL and the compiled modules each take their share.

    PYTHONPATH=. python bench/instructions_per_request.py --mtlsgate base=/tmp/base --mtlsgate new=/tmp/new   # two builds (A/B)
    PYTHONPATH=. python bench/instructions_per_request.py --top 30                                             # the checkout

C{--mtlsgate NAME=DIR} runs twistd with PYTHONPATH=DIR (a compiled export: C{git archive REV | tar -x -C DIR; cd DIR;
MTLSGATE_COMPILE=1 python setup.py build_ext --inplace}).  Needs valgrind (apt-get install valgrind), nginx and ab.
Under callgrind the gateway runs about 50 times slower: 1,000 requests take a minute or two.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

_spec = importlib.util.spec_from_file_location("bench_run", Path(__file__).with_name("run.py"))
assert _spec is not None and _spec.loader is not None
harness: Any = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(harness)


def _ab(port: int, client_pem: Path, requests: int, concurrency: int = 1) -> None:
    argv = ["ab", "-q", "-k", "-c", str(concurrency), "-n", str(requests), "-E", str(client_pem), "-f", "TLS1.3", f"https://127.0.0.1:{port}/1k"]
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)


def self_costs(dump: Path) -> tuple[int, collections.Counter[tuple[str, str]]]:
    """The total, and each (object, function)'s own instructions, of a callgrind dump (the line after calls= is a callee's)."""
    names: dict[str, dict[str, str]] = {"ob": {}, "fn": {}}
    costs: collections.Counter[tuple[str, str]] = collections.Counter()
    ob = fn = ""
    callee_line = False

    def name(kind: str, text: str) -> str:
        m = re.match(r"\((\d+)\)(?: (.*))?", text)
        if not m:
            return text
        if m.group(2):
            names[kind][m.group(1)] = m.group(2)
        return names[kind].get(m.group(1), text)

    text = dump.read_text(errors="replace")
    for line in text.splitlines():
        if line.startswith(("ob=", "cob=")):
            value = name("ob", line.split("=", 1)[1])
            ob = value if line.startswith("ob=") else ob
        elif line.startswith(("fn=", "cfn=")):
            value = name("fn", line.split("=", 1)[1])
            fn = value if line.startswith("fn=") else fn
        elif line.startswith("calls="):
            callee_line = True
        elif line[:1].isdigit() or line[:1] in "+-*":
            parts = line.split()
            if len(parts) >= 2 and not callee_line:
                costs[(ob.rsplit("/", 1)[-1], fn)] += int(parts[1])
            callee_line = False
    summary = re.search(r"^summary: (\d+)", text, re.M)  # callgrind's own total
    return int(summary.group(1)) if summary else sum(costs.values()), costs


def measure(d: Path, name: str, pythonpath: str, up_port: int, files: dict[str, tuple[Path, Path]], ca: Path, client: Path,
            requests: int, warm: int, concurrency: int = 1) -> Path:  # fmt: skip
    """Run one side under callgrind; returns its dump after the counted requests."""
    port = harness.free_port()
    side = d / name
    side.mkdir()
    (side / "mtlsgate.yaml").write_text("limits: {max_connections: 2000, idle_timeout: 300s}\n")
    out = side / "callgrind.out"
    cert, key = files["server"]
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *harness.TWISTD, "-n", "--pidfile=", "--logfile", str(side / "mtlsgate.log"),
         "mtlsgate", "--config", str(side / "mtlsgate.yaml"), "--https", f"tcp:{port}:interface=127.0.0.1", "--cert", str(cert), "--key", str(key),
         "--client-ca", str(ca), "--route", f"*=https://127.0.0.1:{up_port}", "--upstream-server-name", "localhost", "--upstream-ca", str(ca),
         "--upstream-cert", str(files["gwclient"][0]), "--upstream-key", str(files["gwclient"][1]), "--access-log", "off"],
        env={**os.environ, "PYTHONPATH": os.path.abspath(pythonpath)}, cwd=str(side), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        harness.wait_for(port, proc, timeout=300)
        _ab(port, client, warm, concurrency)
        subprocess.run(["callgrind_control", "-z", str(proc.pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        _ab(port, client, requests, concurrency)
        subprocess.run(["callgrind_control", "-d", str(proc.pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        return max(side.glob("callgrind.out.*"), key=lambda p: p.stat().st_mtime)
    finally:
        proc.terminate()
        proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mtlsgate", action="append", metavar="NAME=DIR", help="a side: its PYTHONPATH [default: mtlsgate=.]")
    parser.add_argument("--requests", type=int, default=1000, help="counted requests (ab -k) [default: 1000]")
    parser.add_argument("--concurrency", type=int, default=1, help="ab -c: with more, a reactor turn serves several requests [default: 1]")
    parser.add_argument("--warm", type=int, default=300, help="requests before counting [default: 300]")
    parser.add_argument("--top", type=int, default=0, metavar="N", help="also the N functions with the most instructions of their own")
    args = parser.parse_args(argv)
    for tool in ("valgrind", "callgrind_control", "ab"):
        if not shutil.which(tool):
            print(f"bench: needs {tool}", file=sys.stderr)
            return 2
    d = Path(tempfile.mkdtemp(prefix="mtlsgate-instructions-"))
    ca, files, client = harness.bench_files(d)
    up_port = harness.free_port()
    cert, key = files["server"]
    upstream = harness.start_nginx(d / "upstream", harness.UPSTREAM.format(port=up_port, cert=cert, key=key, ca=ca, dir=d / "upstream"), up_port)
    try:
        for spec in args.mtlsgate or ["mtlsgate=."]:
            name, path = spec.split("=", 1)
            total, costs = self_costs(measure(d, name, path, up_port, files, ca, client, args.requests, args.warm, args.concurrency))
            print(f"{name}: {total / args.requests / 1000:.1f} thousand instructions per kept-alive request ({args.requests} requests, c={args.concurrency})")
            by_object: collections.Counter[str] = collections.Counter()
            for (ob, _), cost in costs.items():
                by_object[ob] += cost
            parsed = sum(costs.values()) or 1  # the shares are of the functions' own costs as read, within a few % of the total
            print("    " + ", ".join(f"{ob} {100 * cost / parsed:.1f} %" for ob, cost in by_object.most_common(6)))
            for (ob, fn), cost in costs.most_common(args.top):
                print(f"    {100 * cost / parsed:5.1f} %  {fn[:80]}  [{ob}]")
    finally:
        upstream.terminate()
        upstream.wait()
        shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
