"""
The first hour of a new user (issue #11): the documented spellings work as written, errors are one
line that says how to fix them, and the commands an installed user is told to run exist.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import TWISTD, Proc, free_port, gateway_args, https_request, run_python_twistd_check, subprocess_env, wait_for_port

CLI = [sys.executable, "-c", "from mtlsgate.cli.main import main; import sys; sys.exit(main())"]


def mtlsgate(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=120)


def yaml_text(pki, port: int, upstream_port: int, extra: str = "") -> str:
    """A config file as a user writes it by hand (not yaml.safe_dump, which would quote 'off')."""
    return (
        f"address: tcp:{port}:interface=127.0.0.1\n"
        f"certificates:\n  - {{cert: {pki['gateway'][0]}, key: {pki['gateway'][1]}}}\n"
        f"downstream_mtls:\n  ca_file: {pki['ca']}\n"
        f"routes:\n  - from: https://localhost\n    to: https://127.0.0.1:{upstream_port}\n"
        f"    tls_custom_ca_file: {pki['ca']}\n"
        f"    tls_client_cert_file: {pki['gateway_client'][0]}\n    tls_client_key_file: {pki['gateway_client'][1]}\n"
        + extra
    )


# --- 1. `access_log: off` as documented, unquoted ----------------------------------------------------


def test_access_log_off_unquoted_starts_and_serves_without_access_lines(start_gateway, pki, echo_upstream, tmp_path):
    port = free_port()
    path = tmp_path / "mtlsgate.yaml"
    path.write_text(yaml_text(pki, port, echo_upstream, "access_log: off\nwatch_interval: off\nhsts: off\n"))
    gateway = start_gateway(["--config", str(path)], port=port)
    status, headers, _ = https_request(port, "/unquoted-off", ca=pki["ca"], cert=pki["alice"])
    assert status == 200
    assert "strict-transport-security" not in headers
    assert "/unquoted-off" not in gateway.proc.output()  # no access line


# --- 2. a config error under twistd is one line ------------------------------------------------------


def _one_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0
    lines = (result.stdout + result.stderr).splitlines()
    assert len(lines) == 1, result.stdout + result.stderr
    assert lines[0].startswith("mtlsgate: ")
    return lines[0]


def test_a_config_error_under_twistd_is_one_line_naming_the_key(pki, tmp_path):
    path = tmp_path / "mtlsgate.yaml"
    path.write_text(yaml_text(pki, free_port(), 1).replace("downstream_mtls:\n", "downstream_mtls:\n  enforcment: policy\n"))
    line = _one_line(run_python_twistd_check(["--config", str(path)], tmp_path))
    assert line == "mtlsgate: downstream_mtls.enforcment: unknown key (did you mean 'enforcement'?)"


def test_a_bad_flag_value_under_twistd_is_one_line_naming_the_flag(pki, tmp_path):
    line = _one_line(run_python_twistd_check(["--https", f"tcp:{free_port()}", *gateway_args(pki, 1, "--client-auth", "sometimes")], tmp_path))
    assert "client_auth" in line and "--client-auth" in line


def test_a_malformed_flag_under_twistd_is_one_line(pki, tmp_path):
    line = _one_line(run_python_twistd_check(["--https", f"tcp:{free_port()}", "--route", "nonsense"], tmp_path))
    assert "--route" in line and "twistd mtlsgate --help" in line


def test_cert_without_key_says_pass_key(pki, tmp_path):
    line = _one_line(run_python_twistd_check(["--https", f"tcp:{free_port()}", "--cert", pki["gateway"][0]], tmp_path))
    assert pki["gateway"][0] in line and "pass --key" in line


# --- 3. `mtlsgate tac` prints a working deployment file ---------------------------------------------


def test_mtlsgate_tac_prints_a_deployment_file_that_serves(procs, pki, echo_upstream, tmp_path):
    result = mtlsgate(tmp_path, "tac")
    assert result.returncode == 0, result.stderr
    tac = tmp_path / "mtlsgate.tac"
    tac.write_text(result.stdout)
    port = free_port()
    (tmp_path / "gw.yaml").write_text(yaml_text(pki, port, echo_upstream))
    env = subprocess_env()
    env["MTLSGATE_CONFIG"] = str(tmp_path / "gw.yaml")
    proc = Proc([*TWISTD, "-ny", str(tac), "--pidfile=", "--logfile=-"], tmp_path / "tac.log", cwd=tmp_path, env=env)
    procs.append(proc)
    wait_for_port(port, proc.popen, log=proc.log)
    status, _, body = https_request(port, "/via-tac", ca=pki["ca"], cert=pki["alice"])
    assert status == 200 and b"/via-tac" in body


# --- 4. versions -------------------------------------------------------------------------------------


def test_versions(tmp_path):
    result = mtlsgate(tmp_path, "--version")
    assert result.returncode == 0 and result.stdout.startswith("mtlsgate "), result.stderr
    twistd = subprocess.run([*TWISTD, "mtlsgate", "--version"], cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert twistd.returncode == 0
    assert twistd.stdout.splitlines()[0] == result.stdout.strip()
    assert "Twisted version" in twistd.stdout


def test_a_usage_error_has_one_prefix(tmp_path):
    result = mtlsgate(tmp_path, "ca", "frobnicate")
    assert result.returncode == 1
    assert result.stderr.startswith("mtlsgate: ca: argument") and "mtlsgate: mtlsgate" not in result.stderr


# --- 7. Expect: 100-continue is answered only once the request may proceed ----------------------------


def _tls(port: int, pki, cert) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=pki["ca"])
    ctx.check_hostname = False
    ctx.load_cert_chain(*cert)
    return ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname="localhost")


def _read_head(sock) -> tuple[bytes, bytes]:
    """One response head (status line and headers), and whatever came after it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def _read_to_close(sock, rest: bytes) -> bytes:
    while True:
        try:
            chunk = sock.recv(65536)
        except OSError:
            return rest
        if not chunk:
            return rest
        rest += chunk


@pytest.fixture
def continue_gateway(start_gateway, pki, echo_upstream, tmp_path):
    port = free_port()
    path = tmp_path / "mtlsgate.yaml"
    path.write_text(yaml_text(pki, port, echo_upstream, "    max_body_size: 1k\n    allow_client: {cn: [alice]}\n").replace(
        "downstream_mtls:\n", "downstream_mtls:\n  enforcement: policy\n"))
    start_gateway(["--config", str(path)], port=port)
    return port


def _expecting(host: str, length: int) -> bytes:
    return (f"POST /upload HTTP/1.1\r\nHost: {host}\r\nContent-Type: text/plain\r\nContent-Length: {length}\r\n"
            f"Expect: 100-continue\r\n\r\n").encode()


@pytest.mark.parametrize(
    "who, host, length, status",
    [("bob", "localhost", 10, b"403"), ("alice", "localhost", 100_000, b"413"), ("alice", "unknown.test", 10, b"404")],
)
def test_a_refused_request_is_answered_at_once_without_100_continue(continue_gateway, pki, who, host, length, status):
    with _tls(continue_gateway, pki, pki[who]) as sock:
        sock.sendall(_expecting(host, length))
        head, rest = _read_head(sock)  # the client sends no body: it waits for 100 or a final answer
        assert head.split(b" ")[1] == status, head
        assert b"connection: close" in head.lower()
        _read_to_close(sock, rest)  # and then the gateway closes


def test_an_admitted_request_gets_100_continue_then_its_response(continue_gateway, pki):
    with _tls(continue_gateway, pki, pki["alice"]) as sock:
        sock.sendall(_expecting("localhost", 10))
        head, rest = _read_head(sock)
        assert head == b"HTTP/1.1 100 Continue" and rest == b""
        sock.sendall(b"0123456789")
        head, rest = _read_head(sock)
        assert head.startswith(b"HTTP/1.1 200"), head
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")))
        while len(rest) < length:
            rest += sock.recv(65536)
        echoed = json.loads(rest)
        assert echoed["body_bytes"] == 10 and "expect" not in echoed["headers"]


# --- 5/6. the mtlsgate command says how to fix what broke -----------------------------------------------


def test_ca_issue_before_ca_init_says_run_ca_init_or_pass_dir(tmp_path):
    result = mtlsgate(tmp_path, "ca", "issue", "client", "alice")
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1, result.stderr
    assert "mtlsgate ca init" in result.stderr and "--dir" in result.stderr
    elsewhere = mtlsgate(tmp_path, "ca", "crl", "--dir", "nowhere")
    assert "nowhere" in elsewhere.stderr and "mtlsgate ca init --dir nowhere" in elsewhere.stderr


def test_ca_show_takes_dir_and_says_whether_that_ca_issued_and_revoked_it(tmp_path):
    for args in (("ca", "init", "--dir", "ca"), ("ca", "init", "--dir", "other"), ("ca", "issue", "client", "alice", "--dir", "ca"),
                 ("ca", "issue", "client", "bob", "--dir", "ca")):  # fmt: skip
        assert mtlsgate(tmp_path, *args).returncode == 0
    assert mtlsgate(tmp_path, "ca", "revoke", "bob.pem", "--dir", "ca").returncode == 0
    alice = mtlsgate(tmp_path, "ca", "show", "alice.pem", "--dir", "ca")
    assert alice.returncode == 0, alice.stderr
    assert "issued by the CA in ca: yes, not revoked" in alice.stdout
    bob = mtlsgate(tmp_path, "ca", "show", "bob.pem", "--dir", "ca")
    assert "issued by the CA in ca: yes, REVOKED on " in bob.stdout
    assert "issued by the CA in other: no" in mtlsgate(tmp_path, "ca", "show", "alice.pem", "--dir", "other").stdout


def test_check_lists_the_acme_domains_of_an_autocert_only_config(tmp_path):
    (tmp_path / "mtlsgate.yaml").write_text(
        "address: tcp:8443\ncerts_dir: certs\nhttp_address: tcp:8080\n"
        "autocert:\n  directory: https://acme.invalid/directory\n  domains: [example.com, [api.example.com, www.example.com]]\n"
    )
    result = mtlsgate(tmp_path, "check", "mtlsgate.yaml")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("autocert:"))
    assert "https://acme.invalid/directory" in lines[start] and "certs" in lines[start]
    table = "\n".join(lines[start + 1:start + 4])
    assert "example.com" in table and "api.example.com, www.example.com" in table and "not issued yet" in table


def test_a_refused_revoked_certificate_is_logged_with_its_subject(start_gateway, pki, echo_upstream):
    gateway = start_gateway(gateway_args(pki, echo_upstream, "--crl", pki["crl"], "--enforcement", "policy"))
    status, _, body = https_request(gateway.port, "/", ca=pki["ca"], cert=pki["revoked"])
    assert status == 403 and b"revoked" in body
    line = next(line for line in gateway.proc.wait_for_log("on route").splitlines() if "refused 127.0.0.1" in line)
    assert "CN=revoked" in line and "unverified" in line and "(-)" not in line


# --- 8. a quiet log, and no stale pidfile -------------------------------------------------------------


def test_the_log_has_no_starting_factory_noise(start_gateway, pki, echo_upstream):
    admin, http = free_port(), free_port()
    gateway = start_gateway(gateway_args(pki, echo_upstream, "--admin", f"tcp:{admin}", "--http", f"tcp:{http}:interface=127.0.0.1"))
    assert https_request(gateway.port, "/", ca=pki["ca"], cert=pki["alice"])[0] == 200
    urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=10).read()
    gateway.proc.stop()
    log = gateway.proc.output()
    assert "Main loop terminated" in log
    assert "Starting factory" not in log and "Stopping factory" not in log, log


def test_a_port_in_use_exits_non_zero_and_leaves_no_pidfile(pki, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        pidfile = tmp_path / "twistd.pid"
        result = subprocess.run(
            [*TWISTD, "-n", f"--pidfile={pidfile}", "--logfile=-", "mtlsgate", "--https", f"tcp:{port}:interface=127.0.0.1",
             "--cert", pki["gateway"][0], "--key", pki["gateway"][1]],
            cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert result.returncode != 0
    assert f"mtlsgate: cannot listen for HTTPS on tcp:{port}" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert not pidfile.exists()
