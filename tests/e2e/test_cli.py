"""
The C{mtlsgate} command as a user runs it: a subprocess through the real entry point, its files
checked with openssl, and its certificates and CRLs used by the real gateway.
"""

from __future__ import annotations

import stat
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID

from mtlsgate.tls.pki import DevCA, key_matches_certificate, load_certificates, load_private_key
from tests.conftest import https_request, subprocess_env

CLI = [sys.executable, "-c", "from mtlsgate.cli.main import main; import sys; sys.exit(main())"]


def mtlsgate(cwd: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], cwd=cwd, env=subprocess_env(), input=stdin, capture_output=True, text=True, timeout=120)


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The single C{mtlsgate: ...} line of a failed command."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mtlsgate: "), result.stderr
    return lines[0]


def openssl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=30)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def cert(path: Path) -> x509.Certificate:
    return load_certificates(str(path))[0]


@pytest.fixture
def ca(tmp_path) -> Path:
    """A CA made by C{mtlsgate ca init --dir ca}; returns the directory."""
    ok(mtlsgate(tmp_path, "ca", "init", "--dir", "ca"))
    return tmp_path / "ca"


# --- ca init ---------------------------------------------------------------------------------------


def test_init_makes_an_ecdsa_ca_with_a_private_key_and_refuses_to_overwrite_it(tmp_path, ca):
    key = load_private_key(str(ca / "ca-key.pem"))
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert mode(ca / "ca-key.pem") == 0o600
    assert cert(ca / "ca.pem").extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    before = (ca / "ca.pem").read_bytes(), (ca / "ca-key.pem").read_bytes()

    line = one_line_error(mtlsgate(tmp_path, "ca", "init", "--dir", "ca"))
    assert "exists" in line and "--force" in line
    assert ((ca / "ca.pem").read_bytes(), (ca / "ca-key.pem").read_bytes()) == before

    ok(mtlsgate(tmp_path, "ca", "init", "--dir", "ca", "--force", "--rsa", "--name", "second CA"))
    assert (ca / "ca.pem").read_bytes() != before[0]
    assert cert(ca / "ca.pem").subject.rfc4514_string() == "CN=second CA"
    assert mode(ca / "ca-key.pem") == 0o600


def test_a_ca_key_that_does_not_match_the_ca_certificate_is_one_line_naming_both(tmp_path, ca):
    ok(mtlsgate(tmp_path, "ca", "init", "--dir", "other"))
    (ca / "ca-key.pem").write_bytes((tmp_path / "other" / "ca-key.pem").read_bytes())
    line = one_line_error(mtlsgate(tmp_path, "ca", "issue", "server", "x.example.com", "--dir", "ca"))
    assert "ca/ca-key.pem" in line and "ca/ca.pem" in line and "does not match" in line
    assert not (tmp_path / "x.example.com.pem").exists()


def test_an_unwritable_dir_fails_with_one_line_and_leaves_nothing(tmp_path):
    (tmp_path / "plain").write_text("a regular file, so nothing can be made under it (even by root)\n")
    line = one_line_error(mtlsgate(tmp_path, "ca", "init", "--dir", "plain/sub"))
    assert "plain/sub" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain"]


def test_an_unwritable_output_fails_with_one_line_and_leaves_nothing(tmp_path, ca):
    (tmp_path / "plain").write_text("x\n")
    (tmp_path / "pw").write_text("secret\n")
    line = one_line_error(mtlsgate(tmp_path, "ca", "issue", "client", "alice", "--dir", "ca", "--out", "plain/alice", "--p12-password-file", "pw"))
    assert "plain/alice" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca", "plain", "pw"]


# --- ca issue --------------------------------------------------------------------------------------


def test_issued_certificates_verify_with_openssl_for_their_purpose(tmp_path, ca):
    out = ok(mtlsgate(tmp_path, "ca", "issue", "server", "localhost", "127.0.0.1", "*.example.com", "--dir", "ca"))
    assert "localhost.pem" in out
    ok(mtlsgate(tmp_path, "ca", "issue", "client", "alice", "--uri", "spiffe://example.org/alice", "--email", "alice@example.org",
                "--ou", "eng", "--dir", "ca"))  # fmt: skip
    ca_pem = str(ca / "ca.pem")
    for purpose, good, bad in (("sslserver", "localhost.pem", "alice.pem"), ("sslclient", "alice.pem", "localhost.pem")):
        result = openssl("verify", "-CAfile", ca_pem, "-purpose", purpose, str(tmp_path / good))
        assert result.returncode == 0 and ": OK" in result.stdout, result.stdout + result.stderr
        assert openssl("verify", "-CAfile", ca_pem, "-purpose", purpose, str(tmp_path / bad)).returncode != 0

    server, client = cert(tmp_path / "localhost.pem"), cert(tmp_path / "alice.pem")
    now = datetime.now(timezone.utc)
    assert abs((server.not_valid_after_utc - now) - timedelta(days=825)) < timedelta(minutes=10)
    assert abs((client.not_valid_after_utc - now) - timedelta(days=90)) < timedelta(minutes=10)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "*.example.com"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    san = client.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://example.org/alice"]
    assert san.get_values_for_type(x509.RFC822Name) == ["alice@example.org"]
    assert list(server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert list(client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert server.serial_number != client.serial_number and server.serial_number.bit_length() > 64
    assert mode(tmp_path / "localhost-key.pem") == mode(tmp_path / "alice-key.pem") == 0o600
    assert not (tmp_path / "_wildcard.example.com.pem").exists()  # the files are named after the first NAME

    ok(mtlsgate(tmp_path, "ca", "issue", "server", "*.apps.test", "--days", "30", "--dir", "ca"))
    wildcard = cert(tmp_path / "_wildcard.apps.test.pem")
    assert abs((wildcard.not_valid_after_utc - now) - timedelta(days=30)) < timedelta(minutes=10)


def test_p12_opens_with_the_right_password_only(tmp_path, ca):
    (tmp_path / "pw").write_text("correct horse\nsecond line is not the password\n")
    (tmp_path / "wrong").write_text("battery staple\n")
    out = ok(mtlsgate(tmp_path, "ca", "issue", "client", "alice", "--uri", "spiffe://example.org/alice", "--dir", "ca",
                      "--p12", "--p12-password-file", "pw"))  # fmt: skip
    assert "alice.p12" in out
    p12 = tmp_path / "alice.p12"
    assert mode(p12) == 0o600

    result = openssl("pkcs12", "-in", str(p12), "-passin", f"file:{tmp_path / 'pw'}", "-nokeys")
    assert result.returncode == 0, result.stderr
    assert "CN = alice" in result.stdout and "CN = mtlsgate development CA" in result.stdout
    assert openssl("pkcs12", "-in", str(p12), "-passin", f"file:{tmp_path / 'wrong'}", "-nokeys").returncode != 0

    key, leaf, extra = pkcs12.load_key_and_certificates(p12.read_bytes(), b"correct horse")
    assert leaf == cert(tmp_path / "alice.pem") and key_matches_certificate(key, leaf)
    assert extra == [cert(ca / "ca.pem")]
    with pytest.raises(ValueError):
        pkcs12.load_key_and_certificates(p12.read_bytes(), b"battery staple")


def test_p12_password_is_prompted_twice_and_a_mismatch_writes_nothing(tmp_path, ca):
    def issue(answers: str) -> subprocess.CompletedProcess:
        # Without a terminal (a new session has none), getpass reads the answers from stdin.
        return subprocess.run([*CLI, "ca", "issue", "client", "carol", "--dir", "ca", "--p12"], cwd=tmp_path, env=subprocess_env(),
                              input=answers, capture_output=True, text=True, timeout=120, start_new_session=True)  # fmt: skip

    refused = issue("one\ntwo\n")
    assert refused.returncode == 1 and refused.stderr.splitlines()[-1] == "mtlsgate: the passwords for carol.p12 do not match"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca"]
    ok(issue("same\nsame\n"))
    _, leaf, _ = pkcs12.load_key_and_certificates((tmp_path / "carol.p12").read_bytes(), b"same")
    assert leaf == cert(tmp_path / "carol.pem")


@pytest.mark.parametrize(
    "kind, names, problem",
    [
        ("server", ["*.*.example.com"], "'*.*.example.com': a wildcard"),
        ("server", ["ok.test", "a" * 64 + ".example.com"], "a" * 64 + ".example.com': label longer than 63"),
        ("server", [".".join(["a" * 60] * 5)], "longer than 253"),
        ("server", [""], "empty name"),
        ("client", [""], "needs a NAME"),
        ("client", ["alice", "bob"], "exactly one NAME"),
    ],
)
def test_bad_names_fail_with_one_line_and_write_nothing(tmp_path, ca, kind, names, problem):
    line = one_line_error(mtlsgate(tmp_path, "ca", "issue", kind, *names, "--dir", "ca"))
    assert problem in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca"]


def test_a_bad_uri_or_missing_ca_fails_with_one_line(tmp_path, ca):
    assert "not a URI" in one_line_error(mtlsgate(tmp_path, "ca", "issue", "client", "alice", "--uri", "no scheme", "--dir", "ca"))
    assert "nowhere/ca.pem" in one_line_error(mtlsgate(tmp_path, "ca", "issue", "server", "x.test", "--dir", "nowhere"))
    assert "invalid choice" in one_line_error(mtlsgate(tmp_path, "ca", "issue", "neither", "x.test"))


# --- ca revoke / ca crl ----------------------------------------------------------------------------


def test_revoke_and_crl_make_a_crl_that_openssl_enforces(tmp_path, ca):
    for name in ("alice", "bob"):
        ok(mtlsgate(tmp_path, "ca", "issue", "client", name, "--dir", "ca"))
    out = ok(mtlsgate(tmp_path, "ca", "crl", "--dir", "ca"))
    assert "ca/crl.pem" in out and "0 revoked" in out

    out = ok(mtlsgate(tmp_path, "ca", "revoke", "alice.pem", "--dir", "ca"))
    serial = cert(tmp_path / "alice.pem").serial_number
    assert "1 revoked" in out
    text = openssl("crl", "-in", str(ca / "crl.pem"), "-noout", "-text").stdout
    listed = [int(line.split(":", 1)[1], 16) for line in text.splitlines() if "Serial Number:" in line]
    assert listed == [serial]
    assert f"{serial:X}" in yaml.safe_load((ca / "revoked.json").read_text())["revoked"][0]["serial"]

    out = ok(mtlsgate(tmp_path, "ca", "crl", "--dir", "ca", "--days", "3"))
    assert "1 revoked" in out
    crl = x509.load_pem_x509_crl((ca / "crl.pem").read_bytes())
    assert crl.next_update_utc < datetime.now(timezone.utc) + timedelta(days=3, minutes=1)

    def verify(name: str) -> subprocess.CompletedProcess:
        return openssl("verify", "-crl_check", "-CRLfile", str(ca / "crl.pem"), "-CAfile", str(ca / "ca.pem"), str(tmp_path / f"{name}.pem"))

    refused = verify("alice")
    assert refused.returncode != 0 and "revoked" in (refused.stdout + refused.stderr)
    assert verify("bob").returncode == 0

    again = ok(mtlsgate(tmp_path, "ca", "revoke", "alice.pem", "--dir", "ca"))
    assert "already revoked" in again and "1 revoked" in again


def test_revoking_a_certificate_of_another_ca_is_refused(tmp_path, ca):
    # The same (default) name as the CA in ca/: only the signature tells them apart.
    ok(mtlsgate(tmp_path, "ca", "init", "--dir", "other"))
    ok(mtlsgate(tmp_path, "ca", "issue", "client", "mallory", "--dir", "other"))
    line = one_line_error(mtlsgate(tmp_path, "ca", "revoke", "mallory.pem", "--dir", "ca"))
    assert "mallory.pem: not issued by this CA" in line
    assert not (ca / "revoked.json").exists() and not (ca / "crl.pem").exists()


# --- ca show ---------------------------------------------------------------------------------------


def _write_config(tmp_path: Path, **extra) -> Path:
    config = {
        "certificates": [{"cert": "localhost.pem", "key": "localhost-key.pem"}],
        "downstream_mtls": {"ca_file": "ca/ca.pem", "enforcement": "policy"},
        "routes": [
            {"from": "https://localhost", "to": "https://127.0.0.1:9", "tls_custom_ca_file": "ca/ca.pem",
             "tls_client_cert_file": "gateway.pem", "tls_client_key_file": "gateway-key.pem"},
            {"from": "https://localhost", "prefix": "/admin", "to": "https://127.0.0.1:9", "allow_client": {"cn": ["bob"]}},
        ],
        **extra,
    }  # fmt: skip
    path = tmp_path / "mtlsgate.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def issued(tmp_path, ca) -> Path:
    """A server certificate, the gateway's upstream client certificate and alice's, made with the CLI."""
    ok(mtlsgate(tmp_path, "ca", "issue", "server", "localhost", "127.0.0.1", "--dir", "ca"))
    ok(mtlsgate(tmp_path, "ca", "issue", "client", "gateway", "--dir", "ca"))
    ok(mtlsgate(tmp_path, "ca", "issue", "client", "alice", "--uri", "spiffe://example.org/ns/prod/sa/alice", "--ou", "eng", "--dir", "ca"))
    return tmp_path


def test_show_prints_the_identity_and_the_verdict_of_each_route(issued):
    tmp_path = issued
    out = ok(mtlsgate(tmp_path, "ca", "show", "alice.pem"))
    alice = cert(tmp_path / "alice.pem")
    assert "SPIFFE ID:" in out and "spiffe://example.org/ns/prod/sa/alice" in out
    assert alice.fingerprint(hashes.SHA256()).hex() in out
    assert f"{alice.serial_number:X}" in out
    assert "CN=alice" in out and "OU:" in out and "eng" in out
    assert "days left" in out and "clientAuth" in out

    config = _write_config(tmp_path)
    out = ok(mtlsgate(tmp_path, "ca", "show", "alice.pem", "--config", str(config)))
    lines = out.splitlines()
    assert any(line.split() == ["localhost/", "admitted"] for line in lines), out
    assert any(line.split()[:1] == ["localhost/admin"] and "refused: not allowed (cn in {bob})" in line for line in lines), out
    assert "verification against ca/ca.pem: ok" in out

    config = _write_config(tmp_path, allow_client={"ou": ["ops"]})
    out = ok(mtlsgate(tmp_path, "ca", "show", "alice.pem", "--config", str(config)))
    assert out.count("refused: not allowed by the global allow_client (ou in {ops})") == 2


def test_show_marks_an_expired_certificate(tmp_path, ca):
    now = datetime.now(timezone.utc)
    old = DevCA.load(str(ca)).issue("old", client=True, not_before=now - timedelta(days=30), not_after=now - timedelta(days=1))
    old.write(str(tmp_path / "old.pem"), str(tmp_path / "old-key.pem"))
    out = ok(mtlsgate(tmp_path, "ca", "show", "old.pem"))
    assert "(EXPIRED)" in out


# --- check -----------------------------------------------------------------------------------------


def test_check_passes_a_good_config_and_prints_the_tables(issued):
    tmp_path = issued
    result = mtlsgate(tmp_path, "check", str(_write_config(tmp_path)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "error:" not in result.stderr
    out = result.stdout
    assert "localhost.pem" in out and "localhost, 127.0.0.1" in out and "mtlsgate development CA" in out
    route_lines = [line.split() for line in out.splitlines() if line.strip().startswith("localhost ")]
    assert route_lines[0][:3] == ["localhost", "/", "https://127.0.0.1:9"] and "client gateway.pem" in " ".join(route_lines[0])
    assert route_lines[1][:3] == ["localhost", "/admin", "https://127.0.0.1:9"] and "cn in {bob}" in " ".join(route_lines[1])
    assert out.splitlines()[-1].endswith("mtlsgate.yaml: ok")


def test_check_fails_a_key_that_does_not_match_naming_both_files(issued):
    tmp_path = issued
    config = _write_config(tmp_path, certificates=[{"cert": "localhost.pem", "key": "alice-key.pem"}])
    result = mtlsgate(tmp_path, "check", str(config))
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "alice-key.pem" in errors[0] and "localhost.pem" in errors[0] and "does not match" in errors[0]


def test_check_fails_a_mismatched_upstream_client_key(issued):
    tmp_path = issued
    config = _write_config(tmp_path)
    data = yaml.safe_load(config.read_text())
    data["routes"][0]["tls_client_key_file"] = "alice-key.pem"
    config.write_text(yaml.safe_dump(data))
    result = mtlsgate(tmp_path, "check", str(config))
    assert result.returncode == 1
    assert "error: routes[0].tls_client_cert_file:" in result.stderr and "alice-key.pem" in result.stderr


def _served(tmp_path: Path, ca: Path, not_after: datetime) -> None:
    now = datetime.now(timezone.utc)
    issued = DevCA.load(str(ca)).issue("localhost", dns=["localhost"], server=True, not_before=now - timedelta(days=60), not_after=not_after)
    issued.write(str(tmp_path / "localhost.pem"), str(tmp_path / "localhost-key.pem"))


def test_check_fails_an_expired_certificate_and_warns_for_one_expiring_soon(issued):
    tmp_path = issued
    config = _write_config(tmp_path)
    _served(tmp_path, tmp_path / "ca", datetime.now(timezone.utc) - timedelta(days=2))
    result = mtlsgate(tmp_path, "check", str(config))
    assert result.returncode == 1
    assert any(line.startswith("error: certificates[0]:") and "expired" in line for line in result.stderr.splitlines()), result.stderr
    assert "EXPIRED" in result.stdout

    _served(tmp_path, tmp_path / "ca", datetime.now(timezone.utc) + timedelta(days=10))
    result = mtlsgate(tmp_path, "check", str(config))
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "localhost.pem: expires in 10 day(s)" in warnings[0]
    assert "error:" not in result.stderr
    assert "ok (1 warning(s))" in result.stdout


def test_check_reports_a_config_error_naming_the_key(issued):
    tmp_path = issued
    config = _write_config(tmp_path)
    config.write_text(config.read_text().replace("enforcement: policy", "enforcment: policy"))
    line = one_line_error(mtlsgate(tmp_path, "check", str(config)))
    assert "downstream_mtls.enforcment: unknown key" in line


# --- with the real gateway ---------------------------------------------------------------------------


def test_a_cli_client_certificate_is_admitted_then_refused_after_revoke_and_sighup(tmp_path, issued, start_gateway, pki, echo_upstream):
    ok(mtlsgate(tmp_path, "ca", "crl", "--dir", "ca"))  # --crl needs the file at start-up
    ca_pem, crl = str(tmp_path / "ca" / "ca.pem"), str(tmp_path / "ca" / "crl.pem")
    gateway = start_gateway([
        "--cert", str(tmp_path / "localhost.pem"), "--key", str(tmp_path / "localhost-key.pem"),
        "--client-ca", ca_pem, "--crl", crl, "--enforcement", "policy",
        "--route", f"localhost=https://127.0.0.1:{echo_upstream}",
        "--upstream-ca", pki["ca"], "--upstream-cert", pki["gateway_client"][0], "--upstream-key", pki["gateway_client"][1],
    ])  # fmt: skip
    alice = (str(tmp_path / "alice.pem"), str(tmp_path / "alice-key.pem"))
    status, _, body = https_request(gateway.port, "/before", ca=ca_pem, cert=alice)
    assert status == 200, body

    ok(mtlsgate(tmp_path, "ca", "revoke", "alice.pem", "--dir", "ca"))
    ok(mtlsgate(tmp_path, "ca", "crl", "--dir", "ca"))
    gateway.reload()  # with workers, every one
    status, _, body = https_request(gateway.port, "/after", ca=ca_pem, cert=alice)
    assert status == 403 and b"revoked" in body
    assert "revoked" in gateway.proc.wait_for_log("refused 127.0.0.1")
