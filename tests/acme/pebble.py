"""
A real ACME server for end-to-end tests: Debian's pebble, with pebble-challtestsrv as its DNS server,
both on loopback ports of their own and stopped by L{Pebble.stop}.

challtestsrv answers every A query with 127.0.0.1 (and AAAA with nothing), so pebble's validator reaches
the gateway under test at C{http_port} (http-01) and C{tls_port} (tls-alpn-01) for any name. TXT records
for dns-01 are set through L{Pebble.set_txt} or the hook written by L{write_dns_hook}.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import ssl
import stat
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

from twisted.names import dns

from mtlsgate.tls.pki import DevCA
from tests.conftest import Proc, free_port

PEBBLE = "/usr/bin/pebble"
CHALLTESTSRV = "/usr/bin/pebble-challtestsrv"

#: What a failed start that is worth another try with new ports says in its log.
_PORT_TAKEN = "address already in use"
_START_ATTEMPTS = 3


def free_dns_port() -> int:
    """A loopback port that is free for both TCP and UDP at the time of asking."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no loopback port free for both TCP and UDP")


def _fqdn(name: str) -> str:
    """challtestsrv matches names exactly: lower case with the trailing dot."""
    return name.lower().rstrip(".") + "."


def _post_json(url: str, body: dict[str, str], timeout: float = 10.0) -> None:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        response.read()


class Pebble:
    """A running pebble and its challtestsrv; use L{start}, then L{stop}."""

    def __init__(self, workdir: Path, ca_file: Path, acme_port: int, management_port: int, dns_port: int,
                 challtestsrv_port: int, pebble: Proc, challtestsrv: Proc) -> None:  # fmt: skip
        self.workdir = workdir
        self.ca_file = ca_file
        self.acme_port = acme_port
        self.management_port = management_port
        self.dns_port = dns_port
        self.challtestsrv_port = challtestsrv_port
        self.pebble = pebble
        self.challtestsrv = challtestsrv

    @classmethod
    def start(
        cls, workdir: Path, http_port: int, tls_port: int, *,
        nonce_reject_percent: int = 0, eab: dict[str, str] | None = None, env: dict[str, str] | None = None,
        timeout: float = 20.0, validity: int | None = None,
    ) -> Pebble:  # fmt: skip
        """
        Start both processes in C{workdir} and return once all their ports accept connections. pebble's
        validator connects to C{http_port} for http-01 and C{tls_port} for tls-alpn-01. C{eab} maps key
        ids to base64url HMAC keys and makes external account binding required. C{env} is added to
        pebble's environment (e.g. C{PEBBLE_CHAIN_LENGTH}). C{validity}: the certificates' lifetime in seconds.
        """
        workdir.mkdir(parents=True, exist_ok=True)
        ca = DevCA.create(str(workdir / "ca"), name="pebble test CA")
        cert, key = workdir / "pebble-cert.pem", workdir / "pebble-key.pem"
        ca.issue_server(["localhost", "127.0.0.1"]).write(str(cert), str(key))
        pebble_env = dict(os.environ)
        pebble_env.update({"PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": str(nonce_reject_percent), "PEBBLE_AUTHZREUSE": "0"})
        pebble_env.update(env or {})
        attempts = itertools.count(1)
        while True:
            attempt = next(attempts)
            acme_port, management_port, challtestsrv_port, dns_port = free_port(), free_port(), free_port(), free_dns_port()
            config = {
                "pebble": {
                    "listenAddress": f"127.0.0.1:{acme_port}",
                    "managementListenAddress": f"127.0.0.1:{management_port}",
                    "certificate": str(cert),
                    "privateKey": str(key),
                    "httpPort": http_port,
                    "tlsPort": tls_port,
                    "ocspResponderURL": "",
                    "externalAccountBindingRequired": bool(eab),
                    "externalAccountMACKeys": eab or {},
                    **({"certificateValidityPeriod": validity} if validity else {}),
                }
            }
            config_path = workdir / "pebble-config.json"
            config_path.write_text(json.dumps(config, indent=2))
            challtestsrv = Proc(
                [CHALLTESTSRV, "-management", f"127.0.0.1:{challtestsrv_port}", "-dns01", f"127.0.0.1:{dns_port}",
                 "-http01", "", "-https01", "", "-tlsalpn01", "", "-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""],
                workdir / "challtestsrv.log", cwd=workdir, env=dict(os.environ),
            )  # fmt: skip
            try:
                pebble = Proc([PEBBLE, "-config", str(config_path), "-dnsserver", f"127.0.0.1:{dns_port}"],
                              workdir / "pebble.log", cwd=workdir, env=pebble_env)  # fmt: skip
            except BaseException:
                challtestsrv.stop()
                raise
            instance = cls(workdir, workdir / "ca" / "ca.pem", acme_port, management_port, dns_port, challtestsrv_port, pebble, challtestsrv)
            try:
                instance._wait_until_listening(timeout)
            except BaseException as e:
                instance.stop()
                if isinstance(e, RuntimeError) and attempt < _START_ATTEMPTS and _PORT_TAKEN in instance.log_text():
                    continue
                raise
            return instance

    def _wait_until_listening(self, timeout: float) -> None:
        """Return once every listener answers; challtestsrv only logs a failed bind and keeps running."""
        checks: dict[str, Callable[[], bool]] = {
            f"pebble ACME port {self.acme_port}": lambda: _accepts(self.acme_port),
            f"pebble management port {self.management_port}": lambda: _accepts(self.management_port),
            f"challtestsrv management port {self.challtestsrv_port}": lambda: _accepts(self.challtestsrv_port),
            f"challtestsrv DNS port {self.dns_port}/tcp": lambda: _accepts(self.dns_port),
            f"challtestsrv DNS port {self.dns_port}/udp": lambda: _answers_dns(self.dns_address),
        }
        deadline = time.monotonic() + timeout
        while True:
            for proc in (self.pebble, self.challtestsrv):
                if proc.popen.poll() is not None:
                    raise RuntimeError(f"{Path(proc.argv[0]).name} exited with {proc.popen.returncode} during start-up:\n{self.log_text()}")
            if _PORT_TAKEN in self.log_text():
                raise RuntimeError(f"a port was taken during start-up:\n{self.log_text()}")
            for name, check in list(checks.items()):
                if check():
                    del checks[name]
            if not checks:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"not ready after {timeout}s: {', '.join(checks)}\n{self.log_text()}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop both processes (SIGTERM, then SIGKILL after 10s); safe to call more than once."""
        procs = (self.pebble, self.challtestsrv)
        for proc in procs:
            if proc.popen.poll() is None:
                proc.signal(signal.SIGTERM)
        for proc in procs:
            proc.stop()

    def __enter__(self) -> Pebble:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def directory_url(self) -> str:
        return f"https://localhost:{self.acme_port}/dir"

    @property
    def management_url(self) -> str:
        return f"https://localhost:{self.management_port}"

    @property
    def challtestsrv_url(self) -> str:
        return f"http://127.0.0.1:{self.challtestsrv_port}"

    @property
    def dns_address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.dns_port)

    def ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts pebble's own listeners (ACME and management)."""
        return ssl.create_default_context(cafile=str(self.ca_file))

    def _management_get(self, path: str) -> bytes:
        with urllib.request.urlopen(self.management_url + path, context=self.ssl_context(), timeout=10) as response:
            return response.read()

    def root_pem(self) -> bytes:
        """The root of the certificates pebble issues (new at every start)."""
        return self._management_get("/roots/0")

    def intermediate_pem(self) -> bytes:
        """The intermediate that signs the certificates pebble issues."""
        return self._management_get("/intermediates/0")

    def set_a(self, name: str, address: str) -> None:
        """Make C{name} resolve to C{address} (instead of the default 127.0.0.1) for pebble's validator."""
        _post_json(self.challtestsrv_url + "/add-a", {"host": _fqdn(name), "addresses": [address]})

    def set_txt(self, fqdn: str, value: str) -> None:
        """Add a TXT value for C{fqdn} (values accumulate; the name is matched case-insensitively)."""
        _post_json(self.challtestsrv_url + "/set-txt", {"host": _fqdn(fqdn), "value": value})

    def clear_txt(self, fqdn: str) -> None:
        """Remove every TXT value of C{fqdn}."""
        _post_json(self.challtestsrv_url + "/clear-txt", {"host": _fqdn(fqdn)})

    def log_text(self) -> str:
        return "\n".join(f"--- {proc.log.name}\n{proc.output()}" for proc in (self.pebble, self.challtestsrv))


_HOOK = '''#!{python}
"""DNS-01 hook for tests: HOOK add|remove FQDN VALUE sets or removes a TXT value in pebble-challtestsrv."""
import fcntl, json, sys, urllib.request

URL = {url!r}
STATE = {state!r}


def post(path, body):
    request = urllib.request.Request(URL + path, data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()


def main(argv):
    if len(argv) != 4 or argv[1] not in ("add", "remove") or not argv[2].strip("."):
        raise SystemExit("usage: %s add|remove FQDN VALUE" % argv[0])
    action, host, value = argv[1], argv[2].lower().rstrip(".") + ".", argv[3]
    with open(STATE, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        records = json.loads(f.read() or "{{}}")
        values = records.get(host, [])
        if action == "add":
            post("/set-txt", {{"host": host, "value": value}})
            values.append(value)
        else:
            if value in values:
                values.remove(value)
            post("/clear-txt", {{"host": host}})
            for other in values:
                post("/set-txt", {{"host": host, "value": other}})
        records[host] = values
        f.seek(0)
        f.truncate()
        f.write(json.dumps(records))


if __name__ == "__main__":
    try:
        main(sys.argv)
    except SystemExit:
        raise
    except Exception as e:
        print("dns hook %s failed: %s" % (" ".join(sys.argv[1:3]), " ".join(str(e).split()) or type(e).__name__), file=sys.stderr)
        sys.exit(1)
'''


def write_dns_hook(path: Path, pebble: Pebble) -> Path:
    """
    Write an executable DNS-01 hook at C{path} for C{pebble}'s challtestsrv: C{HOOK add FQDN VALUE} adds a
    TXT value, C{HOOK remove FQDN VALUE} removes that value only (others for the same name stay, as for
    a wildcard and its apex). Errors: one line on stderr and a non-zero exit.
    """
    state = path.with_name(path.name + ".records.json")
    path.write_text(_HOOK.format(python=sys.executable, url=pebble.challtestsrv_url, state=str(state)))
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def dns_query(address: tuple[str, int], name: str, rtype: str = "TXT", *, tcp: bool = False, timeout: float = 5.0) -> list[str]:
    """
    Ask the DNS server at C{address} for C{name}'s A, AAAA or TXT records, over UDP or TCP; returns the
    addresses, or each TXT record's strings joined. Raises L{RuntimeError} for an error response code.
    """
    qtype = {"A": dns.A, "AAAA": dns.AAAA, "TXT": dns.TXT}[rtype]
    query = dns.Message(id=int.from_bytes(os.urandom(2), "big"), recDes=1)
    query.queries = [dns.Query(name.rstrip("."), qtype, dns.IN)]
    wire = query.toStr()
    if tcp:
        with socket.create_connection(address, timeout=timeout) as s:
            s.sendall(len(wire).to_bytes(2, "big") + wire)
            data = _recv_exactly(s, int.from_bytes(_recv_exactly(s, 2), "big"))
    else:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(timeout)
            s.sendto(wire, address)
            data, _ = s.recvfrom(65535)
    reply = dns.Message()
    reply.fromStr(data)
    if reply.id != query.id:
        raise RuntimeError(f"DNS reply id {reply.id} does not match query id {query.id}")
    if reply.rCode != dns.OK:
        raise RuntimeError(f"DNS query {rtype} {name} failed with rcode {reply.rCode}")
    answers: list[str] = []
    for record in reply.answers:
        if record.type != qtype:
            continue
        payload: Any = record.payload
        if qtype == dns.TXT:
            answers.append(b"".join(payload.data).decode())
        else:
            answers.append(payload.dottedQuad() if qtype == dns.A else socket.inet_ntop(socket.AF_INET6, payload.address))
    return answers


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _answers_dns(address: tuple[str, int]) -> bool:
    try:
        return dns_query(address, "localhost", "A", timeout=0.2) != []
    except (OSError, RuntimeError):
        return False


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise RuntimeError("DNS server closed the TCP connection early")
        data += chunk
    return data
