"""
Gateway CPU time per request, and idle memory: figures a busy machine barely moves.

Throughput on a shared machine measures the machine's other load as much as the gateway.  The CPU
time the gateway's processes spend per request does not depend on how long the run took: this script
starts the bench's nginx mTLS upstream and one or more gateways (mtlsgate, optionally at several code
versions, the aiohttp + uvloop peer of bench/aiohttp_proxy.py, and with --bare the bare Twisted ceiling of
bench/bare_proxy.py: mtlsgate's stack without mtlsgate's work), drives each with
C{ab -k -n N -c C} (TLS 1.3, a client certificate, as bench/run.py does), and reads the utime+stime
of the gateway's process tree from /proc before and after: microseconds of gateway CPU per request.
Runs alternate between the sides (A B C A B C ...); the median and the minimum of the repeats are
reported (other load on the machine only ever adds to a run's cost: cache misses, more wake-ups with
less work each, so the minimum is the steadier figure on a busy machine).  Beside it, ab's own CPU per request
(what a side makes its client spend: on a machine whose cores the client shares, req/s follows the sum) and the
split over the side's processes (parent first: the parent should spend nothing per request, the workers alike).

Memory: the RSS of every process of each side after start-up and after a warm-up, and (--idle N) per
1,000 handshaken idle TLS connections.

    PYTHONPATH=. python bench/cpu_per_request.py                               # mtlsgate and aiohttp, --workers 1
    PYTHONPATH=. python bench/cpu_per_request.py --mtlsgate base=/tmp/base --mtlsgate new=.   # two code versions (A/B)
    PYTHONPATH=. python bench/cpu_per_request.py --workers 2 --idle 1000 --requests 0          # memory only
    PYTHONPATH=. python bench/cpu_per_request.py --no-aiohttp --repeats 1 --py-spy /tmp/prof   # and a py-spy profile
    PYTHONPATH=. python bench/cpu_per_request.py --bare --py-spy /tmp/prof     # beside the bare Twisted ceiling, both profiled
    PYTHONPATH=. python bench/cpu_per_request.py --new-connections --requests 3000 --nginx      # a new mTLS connection per request (ab without -k)

C{--mtlsgate NAME=DIR} runs twistd with PYTHONPATH=DIR (an export of a commit: C{git archive REV | tar -x -C DIR}).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_spec = importlib.util.spec_from_file_location("bench_run", Path(__file__).with_name("run.py"))
assert _spec is not None and _spec.loader is not None
harness: Any = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(harness)

_TICK = os.sysconf("SC_CLK_TCK")


def tree(pid: int) -> list[int]:
    """C{pid} and its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        children = subprocess.run(["pgrep", "-P", str(p)], capture_output=True, text=True).stdout.split()
        todo += [int(c) for c in children]
    return out


def cpu_split(pids: list[int]) -> tuple[float, float]:
    """utime and stime of C{pids} (all their threads), in seconds: the process's own code, and the kernel's work for it."""
    user = system = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user += int(fields[11])  # utime, stime: fields 14 and 15 of stat(5)
        system += int(fields[12])
    return user / _TICK, system / _TICK


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of C{pids} (all their threads), in seconds."""
    return sum(cpu_split(pids))


def rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            return int(next(line for line in f if line.startswith("VmRSS:")).split()[1]) / 1024
    except (OSError, StopIteration):
        return 0.0


def start_mtlsgate(d: Path, name: str, pythonpath: str, port: int, upstream: int, workers: int, files: dict[str, tuple[Path, Path]],
                   ca: Path, config: Path) -> subprocess.Popen:  # fmt: skip
    log = d / f"mtlsgate-{name}.log"
    env = {**os.environ, "PYTHONPATH": os.path.abspath(pythonpath)}
    cert, key = files["server"]
    proc = subprocess.Popen(
        [*harness.TWISTD, "-n", "--pidfile=", "--logfile", str(log), "mtlsgate", "--config", str(config), "--workers", str(workers),
         "--https", f"tcp:{port}:interface=127.0.0.1", "--cert", str(cert), "--key", str(key),
         "--client-ca", str(ca), "--route", f"*=https://127.0.0.1:{upstream}", "--upstream-server-name", "localhost",
         "--upstream-ca", str(ca), "--upstream-cert", str(files["gwclient"][0]), "--upstream-key", str(files["gwclient"][1]),
         "--access-log", "off"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=env, cwd=str(d),
    )  # fmt: skip
    harness.wait_for(port, proc)
    harness._wait_for_log(log, f"worker {workers - 1} serving" if workers > 1 else "route(s)")
    return proc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mtlsgate", action="append", metavar="NAME=DIR", help="an mtlsgate side: its PYTHONPATH [default: mtlsgate=.]")
    parser.add_argument("--no-aiohttp", action="store_true", help="leave the aiohttp + uvloop peer out")
    parser.add_argument("--nginx", action="store_true", help="measure nginx as a gateway too")
    parser.add_argument("--bare", action="store_true", help="measure the bare Twisted ceiling too (bench/bare_proxy.py)")
    parser.add_argument("--workers", type=int, default=1, help="processes per side [default: 1]")
    parser.add_argument("--requests", type=int, default=20000, help="requests per run (ab -n); 0: memory only [default: 20000]")
    parser.add_argument("--concurrency", type=int, default=32, help="ab -c [default: 32]")
    parser.add_argument("--path", default="/1k", choices=("/1k", "/1m"), help="the upstream resource [default: /1k]")
    parser.add_argument("--repeats", type=int, default=3, help="runs per side; the median is reported [default: 3]")
    parser.add_argument("--idle", type=int, default=0, help="hold N idle TLS connections for the memory figure [default: 0, skip]")
    parser.add_argument("--py-spy-rate", type=int, default=200, metavar="HZ",
                        help="py-spy's samples per second [default: 200]")
    parser.add_argument("--py-spy", metavar="PREFIX",
                        help="also profile each mtlsgate side and the bare one (py-spy --format raw) to PREFIX-NAME.txt during one more run")
    parser.add_argument("--new-connections", action="store_true",
                        help="ab without -k: every request is a new TLS 1.3 connection with a client certificate (full handshake)")
    parser.add_argument("--config", default="limits: {max_connections: 20000, idle_timeout: 300s}\n", help="mtlsgate's YAML config")
    args = parser.parse_args(argv)
    keepalive = not args.new_connections
    if not shutil.which("ab") or not os.path.exists(harness.NGINX):
        print("bench: needs nginx and ab", file=sys.stderr)
        return 2
    gateways = [tuple(spec.split("=", 1)) for spec in (args.mtlsgate or ["mtlsgate=."])]
    d = Path(tempfile.mkdtemp(prefix="mtlsgate-cpu-"))
    procs: list[subprocess.Popen] = []
    try:
        ca_pem, files, client_pem = harness.bench_files(d)
        config = d / "mtlsgate.yaml"
        config.write_text(args.config)
        up_port = harness.free_port()
        cert, key = files["server"]
        procs.append(harness.start_nginx(d / "upstream", harness.UPSTREAM.format(port=up_port, cert=cert, key=key, ca=ca_pem, dir=d / "upstream"),
                                         up_port, max(1, args.workers)))  # fmt: skip
        sides: dict[str, tuple[int, int]] = {}  # name -> (port, pid)
        for name, path in gateways:
            port = harness.free_port()
            proc = start_mtlsgate(d, name, path, port, up_port, args.workers, files, ca_pem, config)
            procs.append(proc)
            sides[name] = (port, proc.pid)
        if not args.no_aiohttp:
            port = harness.free_port()
            proc = harness.start_aiohttp(d, port, up_port, args.workers, files, ca_pem)
            procs.append(proc)
            sides["aiohttp"] = (port, proc.pid)
        if args.bare:
            port = harness.free_port()
            proc = harness.start_bare(d, port, up_port, args.workers, files, ca_pem)
            procs.append(proc)
            sides["bare"] = (port, proc.pid)
        if args.nginx:
            port = harness.free_port()
            proc = harness.start_nginx(d / "nginx-gw", harness.NGINX_GATEWAY.format(
                port=port, upstream=up_port, cert=cert, key=key, ca=ca_pem,
                client_cert=files["gwclient"][0], client_key=files["gwclient"][1]), port, args.workers)  # fmt: skip
            procs.append(proc)
            sides["nginx"] = (port, proc.pid)

        time.sleep(1)
        started = {side: [round(rss_mib(p), 1) for p in tree(pid)] for side, (port, pid) in sides.items()}
        for side, (port, pid) in sides.items():
            harness.ab(port, "/1k", client_pem, concurrency=4, requests=2000, keepalive=True)  # warm-up
        warm = {side: [round(rss_mib(p), 1) for p in tree(pid)] for side, (port, pid) in sides.items()}

        cpu: dict[str, list[float]] = {side: [] for side in sides}
        client: dict[str, list[float]] = {side: [] for side in sides}  # ab's own CPU per request: what the gateway makes the client spend
        split: dict[str, list[list[float]]] = {side: [] for side in sides}  # per process of the tree (parent first): how the work spreads
        p99: dict[str, list[float]] = {side: [] for side in sides}
        rps: dict[str, list[float]] = {side: [] for side in sides}
        system_share: dict[str, list[float]] = {side: [] for side in sides}  # of the CPU, the kernel's (sys) part
        failed: dict[str, float] = {side: 0 for side in sides}
        if args.requests:
            for _ in range(args.repeats):
                for side, (port, pid) in sides.items():
                    pids = tree(pid)
                    before_user, before_system = cpu_split(pids)
                    each = [cpu_seconds([p]) for p in pids]
                    children = resource.getrusage(resource.RUSAGE_CHILDREN)
                    r = harness.ab(port, args.path, client_pem, concurrency=args.concurrency, requests=args.requests, keepalive=keepalive)
                    after = resource.getrusage(resource.RUSAGE_CHILDREN)
                    after_user, after_system = cpu_split(pids)
                    used = after_user + after_system - before_user - before_system
                    system_share[side].append((after_system - before_system) / used if used else 0.0)
                    client[side].append((after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime) / args.requests * 1e6)
                    split[side].append([(cpu_seconds([p]) - e) / args.requests * 1e6 for p, e in zip(pids, each)])
                    failed[side] += r["failed"]
                    cpu[side].append(used / args.requests * 1e6)
                    p99[side].append(r["p99"])
                    rps[side].append(r["rps"])

        if args.py_spy:
            for name in [name for name, _ in gateways] + (["bare"] if args.bare else []):
                port, pid = sides[name]
                worker = tree(pid)[-1]
                record = ["py-spy", "record", "--format", "raw", "-r", str(args.py_spy_rate), "-o", f"{args.py_spy}-{name}.txt", "--pid", str(worker)]
                spy = subprocess.Popen(record,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
                time.sleep(1)
                harness.ab(port, args.path, client_pem, concurrency=args.concurrency, requests=max(args.requests, 3000 if args.new_connections else 20000),
                           keepalive=keepalive)
                spy.send_signal(2)
                spy.wait(60)

        idle: dict[str, float] = {}
        if args.idle:
            for side, (port, pid) in sides.items():
                pids = tree(pid)
                before = sum(rss_mib(p) for p in pids)
                held = harness.hold_idle(port, ca_pem, files["client"], args.idle)
                time.sleep(1)
                idle[side] = (sum(rss_mib(p) for p in tree(pid)) - before) / max(1, len(held)) * 1000
                for sock in held:
                    sock.close()
    finally:
        harness.stop_all(procs)
        shutil.rmtree(d, ignore_errors=True)

    unit, ab_k = ("request", "-k") if keepalive else ("connection+request", "without -k")
    print(f"\n{args.workers} process(es) per side; ab {ab_k} -c {args.concurrency} -n {args.requests} {args.path}, "
          f"{args.repeats} run(s) per side, "
          f"load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    for side in sides:
        line = f"{side:>10}:"
        if cpu[side]:
            runs = ", ".join(f"{v:.1f}" for v in cpu[side])
            line += f" CPU {statistics.median(cpu[side]):6.1f} us/{unit}, min {min(cpu[side]):6.1f} (runs: {runs}; failed {failed[side]:.0f})"
            line += f" kernel {statistics.median(system_share[side]):.0%}"
            line += f" p99 {statistics.median(p99[side]):.0f} ms (max {max(p99[side]):.0f})"
            line += f" req/s {statistics.median(rps[side]):.0f} (runs: {', '.join(f'{v:.0f}' for v in rps[side])})"
            line += f" ab CPU {statistics.median(client[side]):.1f} us/{unit}"
            line += f" per process {[round(statistics.median(run[i] for run in split[side]), 1) for i in range(min(map(len, split[side])))]}"
        line += f"  RSS MiB started {started[side]} warm {warm[side]}"
        if side in idle:
            line += f"  per 1,000 idle TLS connections {idle[side]:.1f} MiB"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
