"""
Shared fixtures: a per-run PKI, free loopback ports, and real processes (twistd, the echo upstream,
nginx) started per test and always stopped.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import http.client
import itertools
import json
import os
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

import mtlsgate
from mtlsgate.tls.pki import DevCA

#: The checkout, for the files that are not part of the package (docs/, bench/).  CI copies tests/
#: out of the checkout and runs them against the installed wheel, naming the checkout here.
ROOT = Path(os.environ.get("MTLSGATE_CHECKOUT") or Path(__file__).resolve().parent.parent)

#: Where the mtlsgate under test comes from: the installed wheel in CI, the checkout (or an
#: editable install) in development.  Subprocesses run this same copy, never another.
PACKAGE_DIR = Path(mtlsgate.__file__).resolve().parent

#: How the tests run twistd: the installed console script may belong to another Python, so use ours.
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback port nobody listens on, never the same twice in a run (a test often asks for
    several before any is bound, and the kernel may offer a just-released port again)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def poll_pauses(first: float = 0.005, longest: float = 0.05) -> Iterator[float]:
    """
    The pauses between two looks for an event: short at first (most events come within a moment, and
    a fixed 50 ms pause cost every wait 25 ms on average), then growing to C{longest}.
    """
    pause = first
    while True:
        yield pause
        pause = min(longest, pause * 1.5)


def wait_for_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 20.0, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    pauses = poll_pauses()
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            output = log.read_text() if log and log.exists() else ""
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}:\n{output}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(next(pauses))
    raise RuntimeError(f"nothing listening on {port} after {timeout}s")


def importable_without_path(directory: Path) -> bool:
    """Whether a fresh interpreter of ours finds packages in C{directory} on its own (site-packages)."""
    paths = sysconfig.get_paths()
    return any(directory == Path(paths[key]).resolve() for key in ("purelib", "platlib"))


def subprocess_env() -> dict[str, str]:
    """
    The environment for every process a test starts (twistd, mtlsgate, python -m mtlsgate.*): no
    PYTHONPATH of the caller's, and only when the tests run against a checkout (not an installed
    copy), that checkout, so a subprocess never runs another mtlsgate than the tests import.
    """
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    source = PACKAGE_DIR.parent
    if not importable_without_path(source):
        env["PYTHONPATH"] = str(source)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "needs(*tools): the external programs a test runs; skipped where absent, failed under CI=true")


@pytest.fixture(autouse=True)
def _needed_tools(request: pytest.FixtureRequest) -> None:
    """
    C{@pytest.mark.needs("nginx", "ab")}: a developer without a tool gets a skip; CI, which installs
    every tool, gets a failure, since a skip there would hide a broken install step.
    """
    for marker in request.node.iter_markers("needs"):
        require_tools(*marker.args)


def require_tools(*tools: str) -> None:
    """Skip the test where a tool is missing; fail it under CI=true, where a skip would hide a broken install step."""
    missing = [tool for tool in tools if not find_tool(tool)]
    if missing:
        message = f"{', '.join(missing)} not installed (.ci/run installs it)"
        under_ci = os.environ.get("CI") == "true"
        outcome = functools.partial(pytest.fail, pytrace=False) if under_ci else pytest.skip
        outcome(message + (": under CI this is a broken install step, not a skip" if under_ci else ""))


def find_tool(name: str) -> str | None:
    """
    The path of an external program: on PATH, or in /usr/sbin (nginx, for a user without it on PATH), or
    in Debian's /usr/lib/postgresql/VERSION/bin (initdb and postgres are not on PATH there).
    """
    extra = ["/usr/sbin", "/sbin", *sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    return shutil.which(name) or shutil.which(name, path=":".join(extra))


class Proc:
    """
    A started process whose output goes to a log file; stopped at teardown.  With C{pipe}, the
    output reaches the file through a pipe and this process writes it (for a process whose own
    file writes are limited, as with RLIMIT_FSIZE); C{preexec_fn} runs in the child before exec.
    """

    def __init__(
        self, argv: list[str], log: Path, cwd: Path | None = None, env: dict[str, str] | None = None,
        pipe: bool = False, preexec_fn: Any = None,
    ) -> None:  # fmt: skip
        self.argv = argv
        self.log = log
        self._out = open(log, "wb")
        stdout = subprocess.PIPE if pipe else self._out
        self.popen = subprocess.Popen(argv, stdout=stdout, stderr=subprocess.STDOUT, cwd=cwd, env=env or subprocess_env(), preexec_fn=preexec_fn)
        self._copier: threading.Thread | None = None
        if pipe:
            self._copier = threading.Thread(target=self._copy, daemon=True)
            self._copier.start()

    def _copy(self) -> None:
        assert self.popen.stdout is not None
        while chunk := self.popen.stdout.read1(65536):
            self._out.write(chunk)
            self._out.flush()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 10.0, after: int = 0) -> str:
        """The output once C{text} is in it (past its first C{after} characters)."""
        deadline = time.monotonic() + timeout
        pauses = poll_pauses()
        while time.monotonic() < deadline:
            out = self.output()
            if text in out[after:]:
                return out
            time.sleep(next(pauses))
        raise AssertionError(f"{text!r} not in log after {timeout}s:\n{self.output()}")

    def wait_for_count(self, text: str, count: int, timeout: float = 10.0) -> str:
        """
        The output once C{text} is in it C{count} times: with workers, their lines reach this log
        through the parent, a moment after the event (the test must not read it sooner).
        """
        deadline = time.monotonic() + timeout
        pauses = poll_pauses()
        while (out := self.output()).count(text) < count:
            assert time.monotonic() < deadline, f"{text!r} seen {out.count(text)} times in {timeout}s, wanted {count}:\n{out}"
            time.sleep(next(pauses))
        return out

    def signal(self, sig: int) -> None:
        self.popen.send_signal(sig)

    def stop(self) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        if self._copier is not None:
            self._copier.join(10)
        self._out.close()
        return self.popen.returncode


@contextlib.contextmanager
def started_processes() -> Iterator[list[Proc]]:
    """A list for the processes started inside; on the way out each is stopped, the last started first."""
    started: list[Proc] = []
    try:
        yield started
    finally:
        for p in reversed(started):
            p.stop()


@pytest.fixture
def procs():
    with started_processes() as started:
        yield started


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> dict[str, Any]:
    """A CA and every certificate the tests need, written to files."""
    d = tmp_path_factory.mktemp("pki")
    ca = DevCA.create(str(d / "ca"), name="test CA")
    other = DevCA.create(str(d / "other"), name="untrusted CA")
    files: dict[str, Any] = {"dir": d, "ca": str(d / "ca" / "ca.pem"), "ca_obj": ca}

    def write(name: str, issued: Any) -> None:
        issued.write(str(d / f"{name}.pem"), str(d / f"{name}-key.pem"))
        files[name] = (str(d / f"{name}.pem"), str(d / f"{name}-key.pem"))
        files[name + "_obj"] = issued

    write("gateway", ca.issue_server(["localhost", "127.0.0.1"]))
    write("upstream", ca.issue_server(["localhost", "127.0.0.1", "upstream.internal"]))
    write("gateway_client", ca.issue_client("gateway", uris=["spiffe://test/gateway"]))
    write("alice", ca.issue_client("alice", uris=["spiffe://test/ns/prod/sa/alice"], ou=["eng"]))
    write("bob", ca.issue_client("bob", uris=["spiffe://test/ns/prod/sa/bob"], ou=["ops"]))
    write("stranger", other.issue_client("stranger"))
    from datetime import datetime, timedelta, timezone

    now = datetime.now(timezone.utc)
    write("expired", ca.issue("expired", uris=["spiffe://test/expired"], client=True, not_before=now - timedelta(days=30), not_after=now - timedelta(days=1)))
    write("revoked", ca.issue_client("revoked", uris=["spiffe://test/revoked"]))
    write("server_only", ca.issue("server-only", dns=["server-only.test"], server=True))
    write("weak_rsa", ca.issue("weak-rsa", client=True, rsa=True, rsa_bits=1024))
    files["sha1_signed"] = _sha1_signed_client(d, files["alice"][1])
    crl = ca.crl([files["revoked_obj"].certificate])
    from cryptography.hazmat.primitives.serialization import Encoding

    (d / "clients.crl").write_bytes(crl.public_bytes(Encoding.PEM))
    files["crl"] = str(d / "clients.crl")
    return files


def _sha1_signed_client(d: Path, key: str) -> tuple[str, str]:
    """A client certificate the test CA signed with SHA-1 (by openssl: cryptography refuses SHA-1 signatures)."""
    csr, cert, ext = d / "sha1.csr", d / "sha1_signed.pem", d / "sha1.ext"
    ext.write_text("extendedKeyUsage=clientAuth\nbasicConstraints=critical,CA:FALSE\n")
    subprocess.run(["openssl", "req", "-new", "-key", key, "-subj", "/CN=sha1-signed", "-out", str(csr)], check=True, capture_output=True)
    subprocess.run(
        ["openssl", "x509", "-req", "-in", str(csr), "-CA", str(d / "ca" / "ca.pem"), "-CAkey", str(d / "ca" / "ca-key.pem"),
         "-sha1", "-days", "30", "-extfile", str(ext), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return str(cert), key


def https_request(
    port: int,
    path: str = "/",
    *,
    ca: str,
    cert: tuple[str, str] | None = None,
    host: str = "localhost",
    server_hostname: str | None = "localhost",
    method: str = "GET",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 20.0,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTPS request with Python's ssl (a real handshake); returns status, headers, body."""
    ctx = ssl.create_default_context(cafile=ca)
    ctx.check_hostname = False
    if cert:
        ctx.load_cert_chain(cert[0], cert[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    conn.sock = ctx.wrap_socket(sock, server_hostname=server_hostname)
    all_headers = {"Host": host}
    all_headers.update(headers or {})
    conn.request(method, path, body=body, headers=all_headers)
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, data


def echo_json(body: bytes) -> dict[str, Any]:
    return json.loads(body)


@pytest.fixture
def echo_upstream(procs, pki, tmp_path):
    """The project's mTLS echo upstream, requiring a client certificate from the test CA."""
    return start_echo_upstream(procs, pki, tmp_path)[0]


def start_echo_upstream(procs: list[Proc], pki: dict[str, Any], tmp_path: Path, port: int | None = None) -> tuple[int, Proc]:
    """Start an echo upstream (on C{port}, or a free one) that the test's C{procs} will stop; returns its port and process."""
    port = port or free_port()
    proc = Proc(
        [sys.executable, "-m", "mtlsgate.testing", "upstream", "--listen", f"tcp:{port}:interface=127.0.0.1",
         "--cert", pki["upstream"][0], "--key", pki["upstream"][1], "--client-ca", pki["ca"]],
        tmp_path / f"upstream-{port}-{len(procs)}.log",
    )  # fmt: skip
    procs.append(proc)
    wait_for_port(port, proc.popen, log=proc.log)
    return port, proc


class ThreadedListener:
    """
    A loopback TCP listener in this process whose accepted connections go to L{handle} on one thread
    (for upstream doubles that misbehave on purpose); L{stop} ends it.
    """

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.handle(conn)

    def handle(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(5)
        self.listener.close()


class Gateway:
    """A started gateway: its process, its TLS port, and how many processes serve it (C{--workers})."""

    def __init__(self, proc: Proc, port: int, workers: int = 1) -> None:
        self.proc = proc
        self.port = port
        self.workers = workers

    def wait_for_each(self, text: str, timeout: float = 20.0, after: int = 0) -> str:
        """
        The output once every serving process has logged C{text} (past the first C{after}
        characters): with workers, each worker (a health checker, a reload, a rotation of its own)
        logs its own line, tagged C{[worker-N]}.
        """
        lines = [text] if self.workers == 1 else [f"[worker-{index}] {text}" for index in range(self.workers)]
        deadline = time.monotonic() + timeout
        pauses = poll_pauses()
        while not all(line in (out := self.proc.output())[after:] for line in lines):
            assert time.monotonic() < deadline, f"not every process logged {text!r} in {timeout}s:\n{out}"
            time.sleep(next(pauses))
        return out

    def reload(self, timeout: float = 20.0) -> str:
        """SIGHUP, then the output once every serving process has reloaded: until the last has, a connection may reach an old configuration."""
        before = len(self.proc.output())
        self.proc.signal(signal.SIGHUP)
        return self.wait_for_each("reloaded:", timeout, after=before)

    def log_prefix(self, source: str = "127.0.0.1") -> str:
        """
        What starts the log lines of the process serving connections from C{source}: C{""} for one
        process; with workers, the worker C{worker_affinity: client_ip} sends that address to.
        """
        return "" if self.workers == 1 else f"[worker-{worker_for_address(source, self.workers)}] "


def worker_for_address(source: str, workers: int) -> int:
    """
    The worker C{worker_affinity: client_ip} hands a connection from the IPv4 address C{source}:
    the hash of L{mtlsgate.app.sockets.client_address_program}, in Python.
    """
    value = int.from_bytes(socket.inet_aton(source), "big")
    return (((value * 2654435761) & 0xFFFFFFFF) >> 16) % workers


def gateway_workers(args: list[str]) -> int:
    """How many processes serve a gateway started with C{args} (C{--workers N}, else 1)."""
    if "--workers" in args:
        value = args[args.index("--workers") + 1]
        return (os.cpu_count() or 1) if value == "auto" else int(value)
    return 1


@pytest.fixture
def start_gateway(procs, tmp_path):
    """Start C{twistd -n mtlsgate ARGS} on a free port; returns a L{Gateway} once it listens."""
    return gateway_starter(procs, tmp_path)


def gateway_starter(procs: list[Proc], tmp_path: Path) -> Callable[..., Gateway]:
    """
    L{start_gateway}'s function, for C{procs} and C{tmp_path} of any scope: a module-scoped fixture
    shares one gateway among tests that do not change its state (see L{started_processes}).
    """

    def start(
        args: list[str], *, port: int | None = None, tac: Path | None = None, env: dict[str, str] | None = None,
        file_size_limit: int | None = None, nofile: tuple[int, int] | None = None,
    ) -> Gateway:  # fmt: skip
        """
        With C{port}, the config (file or tac) names the listener; otherwise --https is added.  With
        C{file_size_limit}, the gateway starts with RLIMIT_FSIZE (soft) at that many bytes, its own
        writes to regular files fail past it as on a full disk, and its log goes through a pipe.  With
        C{nofile}, it starts with RLIMIT_NOFILE at that (soft, hard).
        """
        argv = [*TWISTD, "-n", "--pidfile=", "--logfile=-"]
        if tac is not None:
            argv += ["-y", str(tac)]
        else:
            argv += ["mtlsgate"]
            if port is None:
                port = free_port()
                argv += ["--https", f"tcp:{port}:interface=127.0.0.1"]
            argv += args
            workers = os.environ.get("MTLSGATE_TEST_WORKERS")
            if workers and "--workers" not in args:
                argv += ["--workers", workers]  # the same tests against a worker group (see README)
        full_env = subprocess_env()
        full_env.update(env or {})
        limit = None if file_size_limit is None else functools.partial(_limit_file_size, file_size_limit)
        if nofile is not None:
            limit = functools.partial(resource.setrlimit, resource.RLIMIT_NOFILE, nofile)
        proc = Proc(argv, tmp_path / f"gateway-{port}.log", cwd=tmp_path, env=full_env, pipe=file_size_limit is not None, preexec_fn=limit)
        procs.append(proc)
        assert port is not None
        wait_for_port(port, proc.popen, log=proc.log)
        gateway = Gateway(proc, port, gateway_workers(argv))
        if gateway.workers > 1:  # the parent listens first; each worker then starts serving on its own
            for index in range(gateway.workers):
                proc.wait_for_log(f"worker {index} serving", timeout=60)
        return gateway

    return start


def _limit_file_size(size: int) -> None:
    """In a child before exec: files it writes stop at C{size} bytes (EFBIG; Python ignores SIGXFSZ)."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def gateway_args(pki: dict[str, Any], upstream_port: int, *extra: str) -> list[str]:
    """The usual flags: gateway certificate, client CA, one route to the echo upstream over mTLS."""
    return [
        "--cert", pki["gateway"][0], "--key", pki["gateway"][1],
        "--client-ca", pki["ca"],
        "--route", f"localhost=https://127.0.0.1:{upstream_port}",
        "--upstream-ca", pki["ca"], "--upstream-cert", pki["gateway_client"][0], "--upstream-key", pki["gateway_client"][1],
        *extra,
    ]  # fmt: skip


def gateway_config(pki: dict[str, Any], port: int, targets: list[str], route: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
    """
    The usual YAML config as a mapping: the TLS listener on C{port}, the gateway certificate, the
    test CA for client certificates, and one route for localhost to C{targets} over mTLS, with
    C{route}'s keys added to it and C{top}'s to the top level.
    """
    return {
        "address": f"tcp:{port}:interface=127.0.0.1",
        "certificates": [{"cert": pki["gateway"][0], "key": pki["gateway"][1]}],
        "downstream_mtls": {"ca_file": pki["ca"]},
        "routes": [{
            "from": "https://localhost", "to": targets, "tls_custom_ca_file": pki["ca"],
            "tls_client_cert_file": pki["gateway_client"][0], "tls_client_key_file": pki["gateway_client"][1],
            **(route or {}),
        }],
        **top,
    }  # fmt: skip


def run_python_twistd_check(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run twistd mtlsgate expecting it to refuse to start; returns the finished process."""
    argv = [*TWISTD, "-n", "--pidfile=", "--logfile=-", "mtlsgate", *args]
    return subprocess.run(argv, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=60)


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The admin listener's /metrics, parsed by prometheus-client: (sample name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def admin_get(port: int, path: str) -> tuple[int, str]:
    """Status and text of a GET on the admin listener, errors included."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


class RedisServer:
    """One redis-server process; L{stop} and L{start} again keep the port (and, with C{persist}, the data)."""

    def __init__(self, workdir: Path, port: int, persist: bool, password: str | None = None, tls: dict[str, str] | None = None) -> None:
        """C{tls}: C{cert}, C{key}, C{ca} files; then Redis speaks TLS only, and requires a client certificate from C{ca}."""
        self.workdir = workdir
        self.port = port
        self.persist = persist
        self.password = password
        self.tls = tls
        self.proc: Proc | None = None
        self._runs = itertools.count(1)

    @property
    def url(self) -> str:
        return f"rediss://localhost:{self.port}/0" if self.tls else f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = [find_tool("redis-server") or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
                "--dbfilename", "dump.rdb", "--save", "3600 1" if self.persist else "", "--appendonly", "no"]  # fmt: skip
        if self.password:
            argv += ["--requirepass", self.password]
        if self.tls:
            argv[argv.index("--port") + 1] = "0"
            argv += ["--tls-port", str(self.port), "--tls-cert-file", self.tls["cert"], "--tls-key-file", self.tls["key"],
                     "--tls-ca-cert-file", self.tls["ca"], "--tls-auth-clients", "yes"]  # fmt: skip
        self.proc = Proc(argv, self.workdir / f"redis-{next(self._runs)}.log", cwd=self.workdir)
        deadline = time.monotonic() + 20
        while not self.ping():
            if self.proc.popen.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.popen.returncode}:\n{self.proc.output()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server not answering after 20s:\n{self.proc.output()}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        """SIGTERM by PID: with C{persist}, redis-server writes dump.rdb before it exits."""
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

    def command(self, *args: str) -> bytes:
        """One command over a raw socket (RESP), for test assertions; returns the raw reply."""
        parts = ([b"AUTH", self.password.encode()],) if self.password else ()
        wire = b""
        for cmd in (*parts, [a.encode() for a in args]):
            wire += b"*%d\r\n" % len(cmd) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in cmd)
        with contextlib.ExitStack() as stack:
            s = stack.enter_context(socket.create_connection(("127.0.0.1", self.port), timeout=5))
            if self.tls:
                ctx = ssl.create_default_context(cafile=self.tls["ca"])
                ctx.load_cert_chain(self.tls["client_cert"], self.tls["client_key"])
                s = stack.enter_context(ctx.wrap_socket(s, server_hostname="localhost"))
            s.sendall(wire)
            time.sleep(0.05)
            s.settimeout(2)
            data = b""
            with contextlib.suppress(TimeoutError, socket.timeout):
                while chunk := s.recv(65536):
                    data += chunk
                    if data.endswith(b"\r\n") and (not self.password or data.count(b"\r\n") >= 2):
                        break
        return data

    def ping(self) -> bool:
        try:
            return b"PONG" in self.command("PING")
        except OSError:
            return False


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """
    C{redis_server(persist=False, password=None, tls=None)}: a real redis-server on a free loopback port in the
    test's directory (no persistence unless C{persist}: then SIGTERM writes dump.rdb and a restart
    reads it); all stopped by PID at teardown.
    """
    require_tools("redis-server")
    started: list[RedisServer] = []
    numbers = itertools.count(1)

    def start(persist: bool = False, password: str | None = None, tls: dict[str, str] | None = None) -> RedisServer:
        server = RedisServer(tmp_path / f"redis-{next(numbers)}", free_port(), persist, password, tls)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()
