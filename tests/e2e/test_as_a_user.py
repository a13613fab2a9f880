"""
The gateway run as a user runs it: twistd with flags, with a YAML file, with the .tac file, and the
demo; talked to with curl and openssl s_client.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ROOT, TWISTD, Proc, free_port, gateway_args, run_python_twistd_check, subprocess_env, wait_for_port


def curl(port: int, pki, *extra: str, path: str = "/") -> subprocess.CompletedProcess:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "20", "--cacert", pki["ca"], "--resolve", f"localhost:{port}:127.0.0.1",
         *extra, f"https://localhost:{port}{path}"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def test_twistd_with_flags_serves_curl_with_a_client_certificate(start_gateway, pki, echo_upstream):
    gateway = start_gateway(gateway_args(pki, echo_upstream))
    result = curl(gateway.port, pki, "--cert", pki["alice"][0], "--key", pki["alice"][1], path="/from-curl")
    assert result.returncode == 0, result.stderr
    echoed = json.loads(result.stdout)
    assert echoed["uri"] == "/from-curl"
    assert "spiffe://test/ns/prod/sa/alice" in echoed["headers"]["x-forwarded-client-cert"][0]
    refused = curl(gateway.port, pki)
    assert refused.returncode != 0  # no client certificate: the handshake is refused


def test_openssl_s_client_sees_tls13_and_the_gateway_certificate(start_gateway, pki, echo_upstream):
    gateway = start_gateway(gateway_args(pki, echo_upstream))
    result = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{gateway.port}", "-servername", "localhost",
         "-CAfile", pki["ca"], "-cert", pki["alice"][0], "-key", pki["alice"][1], "-verify_return_error", "-brief", "-ign_eof"],
        input="GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n", capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert "Protocol version: TLSv1.3" in output
    assert "Verification: OK" in output
    assert "HTTP/1.1 200" in output


def test_openssl_s_client_without_certificate_gets_an_alert(start_gateway, pki, echo_upstream):
    gateway = start_gateway(gateway_args(pki, echo_upstream))
    result = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{gateway.port}", "-servername", "localhost", "-CAfile", pki["ca"], "-brief", "-ign_eof"],
        input="GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert "alert" in (result.stdout + result.stderr).lower()
    assert "HTTP/1.1 200" not in result.stdout


def _yaml_config(tmp_path, pki, upstream_port):
    port = free_port()
    config = {
        "address": f"tcp:{port}:interface=127.0.0.1",
        "certificates": [{"cert": pki["gateway"][0], "key": pki["gateway"][1]}],
        "downstream_mtls": {"ca_file": pki["ca"], "client_auth": "require"},
        "routes": [{
            "from": "https://localhost", "to": [f"https://127.0.0.1:{upstream_port}"],
            "tls_custom_ca_file": pki["ca"], "tls_client_cert_file": pki["gateway_client"][0], "tls_client_key_file": pki["gateway_client"][1],
        }],
    }  # fmt: skip
    path = tmp_path / "mtlsgate.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, port


def test_twistd_with_a_yaml_config(start_gateway, pki, echo_upstream, tmp_path):
    path, port = _yaml_config(tmp_path, pki, echo_upstream)
    start_gateway(["--config", str(path)], port=port)
    assert curl(port, pki, "--cert", pki["alice"][0], "--key", pki["alice"][1]).returncode == 0


def test_twistd_with_the_tac_file(start_gateway, pki, echo_upstream, tmp_path):
    path, port = _yaml_config(tmp_path, pki, echo_upstream)
    start_gateway([], port=port, tac=ROOT / "mtlsgate.tac", env={"MTLSGATE_CONFIG": str(path)})
    result = curl(port, pki, "--cert", pki["alice"][0], "--key", pki["alice"][1])
    assert result.returncode == 0, result.stderr


def test_twistd_help_lists_and_documents_the_plugin(tmp_path):
    listing = subprocess.run([*TWISTD, "--help"], capture_output=True, text=True, env=subprocess_env(), cwd=tmp_path)
    assert "mtlsgate" in listing.stdout
    options = subprocess.run([*TWISTD, "mtlsgate", "--help"], capture_output=True, text=True, env=subprocess_env(), cwd=tmp_path)
    for flag in ("--https", "--cert", "--key", "--client-ca", "--crl", "--client-auth", "--route", "--upstream-ca", "--allow-uri", "--config", "--demo"):
        assert flag in options.stdout


def test_demo_runs_and_prints_a_curl_command_that_works(procs, tmp_path):
    port, upstream_port = free_port(), free_port()
    demo_dir = tmp_path / "demo"
    proc = Proc(
        [sys.executable, "-m", "mtlsgate.cli.main", "demo", "--dir", str(demo_dir), "--port", str(port), "--upstream-port", str(upstream_port)],
        tmp_path / "demo.log",
    )
    procs.append(proc)
    wait_for_port(port, proc.popen, log=proc.log)
    output = proc.wait_for_log("Stop with Ctrl-C")
    commands = [line.strip() for line in output.splitlines() if line.strip().startswith("curl ")]
    assert len(commands) == 2
    works = subprocess.run(commands[0].split() + ["-sS", "--max-time", "20"], capture_output=True, text=True, timeout=30)
    assert works.returncode == 0, works.stderr
    assert "spiffe://demo.mtlsgate/alice" in works.stdout
    refused = subprocess.run(commands[1].split() + ["-sS", "--max-time", "20"], capture_output=True, text=True, timeout=30)
    assert "403" in refused.stdout
    assert (demo_dir / "mtlsgate.yaml").exists()
    assert oct(os.stat(demo_dir / "alice-key.pem").st_mode & 0o777) == "0o600"


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--cert", "/nonexistent.pem"], "certificates[0].cert: /nonexistent.pem: no such file"),
        (["--route", "localhost=ftp://x"], "routes[0].to[0]"),
        (["--route", "nonsense"], "--route"),
        (["--client-auth", "sometimes"], "client_auth"),
        (["--timeout", "soon"], "timeout"),
    ],
)
def test_bad_flags_exit_non_zero_naming_the_problem(pki, tmp_path, args, expected):
    base = ["--https", f"tcp:{free_port()}", "--cert", pki["gateway"][0], "--key", pki["gateway"][1],
            "--client-ca", pki["ca"], "--route", "localhost=https://127.0.0.1:1"]  # fmt: skip
    # later flags of the same name add to (certs) or replace earlier ones; put the bad one first for certs
    if args[0] == "--cert":
        base = ["--https", f"tcp:{free_port()}"] + args + ["--key", pki["gateway"][1], "--client-ca", pki["ca"]]
        args = []
    if args and args[0] == "--route":
        base = base[: base.index("--route")]
    result = run_python_twistd_check(base + args, tmp_path)
    assert result.returncode != 0
    assert expected in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda c: c.update(routes=[{**c["routes"][0], "tls_skip_verfy": True}]), "routes[0].tls_skip_verfy: unknown key (did you mean 'tls_skip_verify'?)"),
        (lambda c: c["downstream_mtls"].update(enforcement="maybe"), "downstream_mtls.enforcement"),
        (lambda c: c.update(certificates=[{"cert": c["certificates"][0]["cert"], "key": c["routes"][0]["tls_client_key_file"]}]), "private key does not match"),
        (lambda c: c.update(routes=[{**c["routes"][0], "from": "https://a.*.example.com"}]), "routes[0].from"),
    ],
)
def test_bad_config_file_exits_non_zero_naming_the_key(pki, tmp_path, mutate, expected):
    path, _ = _yaml_config(tmp_path, pki, 1)
    config = yaml.safe_load(path.read_text())
    mutate(config)
    path.write_text(yaml.safe_dump(config))
    result = run_python_twistd_check(["--config", str(path)], tmp_path)
    assert result.returncode != 0
    assert expected in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert "BEGIN" not in result.stdout + result.stderr  # no key material in errors


def test_a_private_key_readable_by_others_is_warned_about_or_refused(start_gateway, pki, echo_upstream, tmp_path):
    import shutil

    key = tmp_path / "loose-key.pem"
    shutil.copy(pki["gateway"][1], key)
    key.chmod(0o644)
    args = gateway_args(pki, echo_upstream)
    args[args.index(pki["gateway"][1])] = str(key)
    gateway = start_gateway(args)
    assert "loose-key.pem: private key file is readable by group or others (mode 0644)" in gateway.proc.wait_for_log("chmod 600")
    refused = run_python_twistd_check([*args, "--strict-permissions"], tmp_path)
    assert refused.returncode != 0
    assert "strict_permissions is on" in refused.stderr + refused.stdout
    assert "BEGIN" not in refused.stderr + refused.stdout
