"""
mtlsgate beside nginx, the best plain-Python peer and the bare Twisted ceiling, doing the identical job on the same machine in the same run.

All four gateways terminate TLS 1.3, require and verify a client certificate, and proxy over kept-alive
mTLS connections to the same nginx upstream (a fixed 1 KiB and 1 MiB body), setting an
X-Forwarded-Client-Cert header, access logging off: mtlsgate, nginx, an aiohttp + uvloop proxy
(bench/aiohttp_proxy.py), and the bare Twisted ceiling (bench/bare_proxy.py: mtlsgate's own stack,
Twisted + pyOpenSSL + httptools, with none of its hardening, routing or metrics; issue #13's yardstick,
mg/bare shows how far mtlsgate is from what its stack allows).  ApacheBench (ab -E, a client certificate)
drives them, alternating runs (A B C D A B C D ...) so machine drift hits all alike; every run lasts the
same time (ab -t --seconds, with a large -n), so a fast side is not measured mostly on its start-up and
handshakes.  The table shows medians and the ratios mtlsgate/nginx, aiohttp/nginx, mtlsgate/aiohttp,
bare/nginx and mtlsgate/bare.  Every side gets the same number of processes: mtlsgate --workers N, nginx
worker_processes N, N aiohttp and N bare processes on one SO_REUSEPORT port each (default: one per core).

Besides ab's figures: resumed connections (openssl s_time -reuse, timed from outside, since s_time
counts whole seconds), the added latency at c=1 over going straight to the upstream, and memory per
idle TLS connection (N handshaken connections held open, RSS of the process tree before and after).

    python bench/run.py                 # the full run (5 s per run, 3 rounds: about 8 minutes)
    python bench/run.py --workers 1     # one process each
    python bench/run.py --smoke         # seconds: keeps the harness from rotting (CI)

Needs nginx and ab (apt-get install nginx apache2-utils), the mtlsgate package importable, and aiohttp and uvloop
(pip install 'mtlsgate[bench]').
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mtlsgate.tls.pki import DevCA

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]

NGINX_COMMON = """
user root;
daemon off;
worker_processes {workers};
worker_rlimit_nofile 40000;
error_log {dir}/error.log warn;
pid {dir}/nginx.pid;
events {{ worker_connections 20000; }}
http {{
    access_log off;
    client_header_timeout 300s;
    client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy; fastcgi_temp_path {dir}/fcgi;
    uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;
    ssl_protocols TLSv1.3;
    keepalive_requests 1000000;
    {body}
}}
"""

UPSTREAM = """
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert}; ssl_certificate_key {key};
        ssl_client_certificate {ca}; ssl_verify_client on;
        root {dir}/www;
        location = /1k {{ default_type text/plain; }}
        location = /1m {{ default_type application/octet-stream; }}
    }}
"""

NGINX_GATEWAY = """
    upstream backend {{ server 127.0.0.1:{upstream}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert}; ssl_certificate_key {key};
        ssl_client_certificate {ca}; ssl_verify_client on;
        location / {{
            proxy_pass https://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host localhost;
            proxy_set_header X-Forwarded-Client-Cert "Hash=$ssl_client_fingerprint;Subject=\\"$ssl_client_s_dn\\"";
            proxy_ssl_certificate {client_cert}; proxy_ssl_certificate_key {client_key};
            proxy_ssl_trusted_certificate {ca}; proxy_ssl_verify on; proxy_ssl_name localhost;
            proxy_ssl_session_reuse on; proxy_ssl_protocols TLSv1.3;
        }}
    }}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(port: int, proc: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"a server exited early ({proc.args[0]}), status {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def start_nginx(directory: Path, body: str, port: int, workers: int = 1) -> subprocess.Popen:
    directory.mkdir(parents=True, exist_ok=True)
    conf = directory / "nginx.conf"
    conf.write_text(NGINX_COMMON.format(dir=directory, body=body, workers=workers))
    proc = subprocess.Popen([NGINX, "-p", str(directory), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    wait_for(port, proc)
    return proc


def rss_kib(pid: int) -> int:
    """The resident memory of C{pid} and its children (nginx's workers)."""
    total = 0
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    for p in [str(pid), *children]:
        try:
            with open(f"/proc/{p}/status") as f:
                total += int(next(line for line in f if line.startswith("VmRSS:")).split()[1])
        except (OSError, StopIteration):
            pass
    return total


def ab(port: int, path: str, client_pem: Path, *, concurrency: int, requests: int, keepalive: bool, seconds: int = 0) -> dict[str, float]:
    """One ab run: C{requests} requests, or with C{seconds}, as many as fit in that time (at most C{requests})."""
    # ab's table rounds percentiles to whole milliseconds; its -e file has them to the microsecond
    percentiles = tempfile.NamedTemporaryFile(prefix="ab-", suffix=".csv", delete=False)
    percentiles.close()
    argv = ["ab", "-q", "-r", "-c", str(concurrency), "-E", str(client_pem), "-f", "TLS1.3", "-e", percentiles.name]
    if seconds:
        argv += ["-t", str(seconds)]  # -t implies -n 50000: the -n after it is the cap that counts
    argv += ["-n", str(requests)]
    if keepalive:
        argv.append("-k")
    try:
        out = subprocess.run([*argv, f"https://127.0.0.1:{port}{path}"], capture_output=True, text=True, timeout=600).stdout
        served = dict(line.split(",", 1) for line in Path(percentiles.name).read_text().splitlines()[1:] if "," in line)
    finally:
        os.unlink(percentiles.name)

    def number(pattern: str) -> float:
        match = re.search(pattern, out)
        return float(match.group(1)) if match else float("nan")

    failed = number(r"Failed requests:\s+(\d+)") + number(r"Non-2xx responses:\s+(\d+)") if "Non-2xx" in out else number(r"Failed requests:\s+(\d+)")
    return {
        "rps": number(r"Requests per second:\s+([\d.]+)"),
        "p50": float(served.get("50", "nan")),
        "p99": float(served.get("99", "nan")),
        "kbps": number(r"Transfer rate:\s+([\d.]+)"),
        "mean_ms": number(r"Time per request:\s+([\d.]+) \[ms\] \(mean\)"),
        "failed": failed,
    }


def resumed(port: int, client: tuple[Path, Path], seconds: float) -> tuple[float, float]:
    """Connections per second with session resumption (s_time -reuse, c=1, a request each), and the share resumed."""
    argv = ["openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-cert", str(client[0]), "-key", str(client[1]),
            "-reuse", "-time", str(max(1, round(seconds))), "-www", "/1k"]  # fmt: skip
    started = time.monotonic()
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120).stdout
    elapsed = time.monotonic() - started
    match = re.search(r"(\d+) connections in [\d.]+ real seconds", out.split("session id reuse")[-1])
    count = int(match.group(1)) if match else 0
    marks = out.split("session id reuse")[-1]
    reused, new = marks.count("r"), marks.count("*")
    return count / elapsed, 100.0 * reused / max(1, reused + new)


def hold_idle(port: int, ca: Path, client: tuple[Path, Path], count: int) -> list[ssl.SSLSocket]:
    """C{count} mTLS connections, handshaken and left idle (no request)."""
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.check_hostname = False
    ctx.load_cert_chain(str(client[0]), str(client[1]))

    def one(_: int) -> ssl.SSLSocket | None:
        try:
            return ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=60), server_hostname="localhost")
        except OSError:
            return None

    with ThreadPoolExecutor(16) as pool:
        return [s for s in pool.map(one, range(count)) if s is not None]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny numbers, one round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5, help="the length of each timed run (ab -t, s_time -time) [default: 5; 1 with --smoke]")
    parser.add_argument("--keep", action="store_true", help="keep the working directory (configs, logs) and print it")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes per side [default: one per core]")
    parser.add_argument("--affinity", choices=("connection", "client_ip"), default="connection", help="mtlsgate's worker_affinity")
    parser.add_argument("--idle", type=int, default=10000, help="idle TLS connections to hold for the memory figure")
    args = parser.parse_args(argv)
    if not shutil.which("ab") or not os.path.exists(NGINX):
        print("bench: needs nginx and ab (apt-get install nginx apache2-utils)", file=sys.stderr)
        return 2
    try:
        import aiohttp  # noqa: F401
        import uvloop  # noqa: F401
    except ImportError as e:
        print(f"bench: needs aiohttp and uvloop for the Python peer (pip install 'mtlsgate[bench]'): {e}", file=sys.stderr)
        return 2
    rounds = 1 if args.smoke else args.rounds
    seconds = 1 if args.smoke else max(1, args.seconds)

    tmp = tempfile.mkdtemp(prefix="mtlsgate-bench-")
    try:
        results = run(Path(tmp), rounds, seconds, args.workers, 100 if args.smoke else args.idle, args.affinity, smoke=args.smoke)
    finally:
        if args.keep:
            print(f"bench: configs and logs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    report(results, rounds, args.workers, seconds)
    return 0


def start_peer(script: str, d: Path, port: int, upstream: int, workers: int, files: dict[str, tuple[Path, Path]], ca: Path) -> subprocess.Popen:
    """A Python peer (bench/aiohttp_proxy.py, bench/bare_proxy.py: the same CLI), N processes on one SO_REUSEPORT port; returns once all serve."""
    log = d / f"{Path(script).stem}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name(script)), "--port", str(port), "--workers", str(workers),
             "--cert", str(files["server"][0]), "--key", str(files["server"][1]), "--ca", str(ca),
             "--upstream", f"https://127.0.0.1:{upstream}", "--upstream-cert", str(files["gwclient"][0]),
             "--upstream-key", str(files["gwclient"][1]), "--server-name", "localhost"],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    wait_for(port, proc)
    _wait_for_log(log, "serving", count=workers)
    return proc


def start_aiohttp(d: Path, port: int, upstream: int, workers: int, files: dict[str, tuple[Path, Path]], ca: Path) -> subprocess.Popen:
    """The aiohttp + uvloop peer (bench/aiohttp_proxy.py)."""
    return start_peer("aiohttp_proxy.py", d, port, upstream, workers, files, ca)


def start_bare(d: Path, port: int, upstream: int, workers: int, files: dict[str, tuple[Path, Path]], ca: Path) -> subprocess.Popen:
    """The bare Twisted ceiling (bench/bare_proxy.py)."""
    return start_peer("bare_proxy.py", d, port, upstream, workers, files, ca)


def stop_all(procs: list[subprocess.Popen]) -> None:
    """Terminate every process started, then wait for each (up to 10 s, then kill)."""
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def bench_files(d: Path) -> tuple[Path, dict[str, tuple[Path, Path]], Path]:
    """
    In C{d}: a CA, its certificates (C{server} for every side, C{gwclient} toward the upstream, C{client} for ab, as
    (cert, key) paths in C{files}), ab's combined client PEM, and the upstream's C{/1k} and C{/1m}; returns
    (the CA's PEM, files, the client PEM).  Shared by this harness and cpu_per_request.py.
    """
    ca = DevCA.create(str(d / "ca"), name="bench CA")
    ca_pem = d / "ca" / "ca.pem"
    files: dict[str, tuple[Path, Path]] = {}
    for name, issued in {
        "server": ca.issue_server(["localhost", "127.0.0.1"]),
        "gwclient": ca.issue_client("gateway"),
        "client": ca.issue_client("alice", uris=["spiffe://bench/alice"]),
    }.items():
        issued.write(str(d / f"{name}.pem"), str(d / f"{name}-key.pem"))
        files[name] = (d / f"{name}.pem", d / f"{name}-key.pem")
    client_pem = d / "client-combined.pem"
    client_pem.write_bytes(files["client"][0].read_bytes() + files["client"][1].read_bytes())
    www = d / "upstream" / "www"
    www.mkdir(parents=True)
    (www / "1k").write_bytes(b"x" * 1024)
    (www / "1m").write_bytes(os.urandom(1024 * 1024))
    return ca_pem, files, client_pem


def run(d: Path, rounds: int, seconds: int, workers: int, idle: int, affinity: str = "connection", *, smoke: bool = False) -> dict[str, dict[str, list[float]]]:
    """Start everything in C{d}, measure the four sides, stop everything; the figures per side."""
    # A timed run (ab -t) ends after C{seconds} or at the cap, whichever comes first: the cap keeps --smoke tiny.
    def cap(n: int) -> int:
        return n if smoke else 1_000_000

    if True:
        ca_pem, files, client_pem = bench_files(d)

        procs: list[subprocess.Popen] = []
        try:
            up_port, ng_port, mg_port, aio_port, bare_port = free_port(), free_port(), free_port(), free_port(), free_port()
            cert, key = files["server"]
            procs.append(start_nginx(d / "upstream", UPSTREAM.format(port=up_port, cert=cert, key=key, ca=ca_pem, dir=d / "upstream"), up_port))
            nginx_gw = start_nginx(d / "nginx-gw", NGINX_GATEWAY.format(
                port=ng_port, upstream=up_port, cert=cert, key=key, ca=ca_pem,
                client_cert=files["gwclient"][0], client_key=files["gwclient"][1]), ng_port, workers)  # fmt: skip
            (d / "mtlsgate.yaml").write_text("limits: {max_connections: 20000, idle_timeout: 300s}\n")
            procs.append(nginx_gw)
            mtlsgate = subprocess.Popen(
                [*TWISTD, "-n", "--pidfile=", "--logfile", str(d / "mtlsgate.log"), "mtlsgate", "--config", str(d / "mtlsgate.yaml"),
                 "--workers", str(workers), "--worker-affinity", affinity,
                 "--https", f"tcp:{mg_port}:interface=127.0.0.1", "--cert", str(cert), "--key", str(key),
                 "--client-ca", str(ca_pem), "--route", f"*=https://127.0.0.1:{up_port}", "--upstream-server-name", "localhost",
                 "--upstream-ca", str(ca_pem), "--upstream-cert", str(files["gwclient"][0]), "--upstream-key", str(files["gwclient"][1]),
                 "--access-log", "off"],
                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, cwd=str(d),  # PYTHONPATH's mtlsgate, not the current directory's
            )  # fmt: skip
            procs.append(mtlsgate)
            wait_for(mg_port, mtlsgate)
            _wait_for_log(d / "mtlsgate.log", f"worker {workers - 1} serving" if workers > 1 else "route(s)")
            aio = start_aiohttp(d, aio_port, up_port, workers, files, ca_pem)
            procs.append(aio)
            bare = start_bare(d, bare_port, up_port, workers, files, ca_pem)
            procs.append(bare)
            sides = {"mtlsgate": (mg_port, mtlsgate.pid), "nginx": (ng_port, nginx_gw.pid), "aiohttp": (aio_port, aio.pid), "bare": (bare_port, bare.pid)}
            results: dict[str, dict[str, list[float]]] = {side: {} for side in sides}

            def record(side: str, figure: str, value: float) -> None:
                results[side].setdefault(figure, []).append(value)

            for side, (port, pid) in sides.items():
                ab(port, "/1k", client_pem, concurrency=4, requests=20 if smoke else 2000, keepalive=True)  # warm-up
                record(side, "RSS idle after warm-up (MiB)", rss_kib(pid) / 1024)
            for _ in range(rounds):
                direct = ab(up_port, "/1k", client_pem, concurrency=1, requests=cap(50), keepalive=True, seconds=seconds)
                for side, (port, pid) in sides.items():  # A B C D A B C D: drift hits every side alike
                    for c in (1, 32):
                        r = ab(port, "/1k", client_pem, concurrency=c, requests=cap(50 * c), keepalive=True, seconds=seconds)
                        record(side, f"keep-alive req/s c={c}", r["rps"])
                        if c == 1:
                            record(side, "added latency c=1, mean ms over direct", r["mean_ms"] - direct["mean_ms"])
                        else:
                            record(side, "p50 ms c=32", r["p50"])
                            record(side, "p99 ms c=32", r["p99"])
                        record(side, "failed requests", r["failed"])
                    r = ab(port, "/1k", client_pem, concurrency=32, requests=cap(64), keepalive=False, seconds=seconds)
                    record(side, "new mTLS connection+request/s c=32", r["rps"])
                    rate, share = resumed(port, files["client"], seconds)
                    record(side, "resumed mTLS connection+request/s c=1", rate)
                    record(side, "resumed share of those (%)", share)
                    r = ab(port, "/1m", client_pem, concurrency=4, requests=cap(4), keepalive=True, seconds=seconds)
                    record(side, "1 MiB responses MB/s", r["kbps"] / 1024)
                    record(side, "RSS after load (MiB)", rss_kib(pid) / 1024)
            for side, (port, pid) in sides.items():  # once: the memory of idle connections
                before = rss_kib(pid)
                held = hold_idle(port, ca_pem, files["client"], idle)
                time.sleep(1)
                record(side, f"idle mTLS connections held (of {idle})", len(held))
                record(side, "RSS per 1,000 idle connections (MiB)", (rss_kib(pid) - before) / 1024 / max(1, len(held)) * 1000)
                for sock in held:
                    sock.close()
        finally:
            stop_all(procs)

    return results


def _wait_for_log(path: Path, text: str, timeout: float = 30, count: int = 1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text(errors="replace").count(text) >= count:
            return
        time.sleep(0.1)
    raise SystemExit(f"bench: {text!r} not {count} time(s) in {path} after {timeout}s")


def _ratio(a: float, b: float) -> str:
    return f"{a / b:6.2f}x" if b else "      -"


RATIOS = (("mg/nginx", "mtlsgate", "nginx"), ("aio/nginx", "aiohttp", "nginx"), ("mg/aio", "mtlsgate", "aiohttp"),
          ("bare/nginx", "bare", "nginx"), ("mg/bare", "mtlsgate", "bare"))  # fmt: skip


def report(results: dict[str, dict[str, list[float]]], rounds: int, workers: int, seconds: int) -> None:
    """The table: a figure per line, the four sides' medians, then the ratios of RATIOS (mg/bare: how far from the ceiling of its own stack)."""
    figures = list(results["nginx"])
    width = max(map(len, figures))
    sides = ("mtlsgate", "nginx", "aiohttp", "bare")
    print(f"\n{'figure'.ljust(width)}" + "".join(f"  {side:>10}" for side in sides) + "".join(f"  {name:>10}" for name, _, _ in RATIOS)
          + f"   (medians of {rounds} round(s) of {seconds} s runs, {workers} process(es) each)")
    for figure in figures:
        median = {side: statistics.median(results[side][figure]) for side in sides}
        print(figure.ljust(width) + "".join(f"  {median[side]:10.1f}" for side in sides)
              + "".join(f"  {_ratio(median[a], median[b]):>10}" for _, a, b in RATIOS))


if __name__ == "__main__":
    sys.exit(main())
