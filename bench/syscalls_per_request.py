"""
System calls per proxied request: the bench's nginx mTLS upstream and one mtlsgate process (as
bench/cpu_per_request.py starts them), a warm-up, then C{strace -c -f} on the gateway during one
C{ab -k} run.  C{epoll_wait} counts reactor turns, C{epoll_ctl} registrations.

    PYTHONPATH=. python bench/syscalls_per_request.py --concurrency 1 --requests 5000
    PYTHONPATH=. python bench/syscalls_per_request.py --mtlsgate /tmp/base --path /1m --concurrency 4 --requests 300
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_spec = importlib.util.spec_from_file_location("bench_cpu", Path(__file__).with_name("cpu_per_request.py"))
assert _spec is not None and _spec.loader is not None
cpu: Any = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cpu)
harness = cpu.harness


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mtlsgate", default=".", metavar="DIR", help="mtlsgate's PYTHONPATH [default: .]")
    parser.add_argument("--concurrency", type=int, default=1, help="ab -c [default: 1]")
    parser.add_argument("--requests", type=int, default=5000, help="ab -n [default: 5000]")
    parser.add_argument("--path", default="/1k", choices=("/1k", "/1m"), help="the upstream resource [default: /1k]")
    args = parser.parse_args(argv)
    if not shutil.which("strace") or not shutil.which("ab"):
        print("bench: needs strace and ab", file=sys.stderr)
        return 2
    d = Path(tempfile.mkdtemp(prefix="mtlsgate-syscalls-"))
    procs: list[subprocess.Popen] = []
    try:
        ca, files, client = harness.bench_files(d)
        config = d / "mtlsgate.yaml"
        config.write_text("limits: {max_connections: 20000, idle_timeout: 300s}\n")
        up = harness.free_port()
        cert, key = files["server"]
        procs.append(harness.start_nginx(d / "upstream", harness.UPSTREAM.format(port=up, cert=cert, key=key, ca=ca, dir=d / "upstream"), up, 1))
        port = harness.free_port()
        gateway = cpu.start_mtlsgate(d, "mtlsgate", args.mtlsgate, port, up, 1, files, ca, config)
        procs.append(gateway)
        harness.ab(port, "/1k", client, concurrency=4, requests=2000, keepalive=True)  # warm-up
        out = d / "strace.txt"
        strace = subprocess.Popen(["strace", "-c", "-f", "-p", str(cpu.tree(gateway.pid)[-1]), "-o", str(out)], stderr=subprocess.DEVNULL)
        time.sleep(1.5)  # attached
        result = harness.ab(port, args.path, client, concurrency=args.concurrency, requests=args.requests, keepalive=True)
        time.sleep(0.5)
        strace.send_signal(2)
        strace.wait(30)
        rows = []
        for line in out.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 5 and parts[3].isdigit():
                rows.append((parts[-1], int(parts[3])))
    finally:
        harness.stop_all(procs)
        shutil.rmtree(d, ignore_errors=True)
    print(f"ab -k -c {args.concurrency} -n {args.requests} {args.path}: {result['rps']:.0f} req/s under strace, {result['failed']:.0f} failed")
    for name, calls in sorted(rows, key=lambda row: -row[1]):
        if calls >= args.requests / 100:
            print(f"{name:>16} {calls / args.requests:7.2f} per request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
