"""The pure parts of the mtlsgate command: names, passwords, revocation records, show and check verdicts."""

from __future__ import annotations

import argparse
from pathlib import Path
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, pkcs12

from mtlsgate.cli import ca as ca_cli
from mtlsgate.cli import check
from mtlsgate.cli import main as cli
from mtlsgate.observe import summary
from mtlsgate.cli.ca import CommandError, Revocation
from mtlsgate.config.model import Config, DownstreamMTLS, Route
from mtlsgate.identity import AllowRules, Identity
from mtlsgate.tls.pki import DevCA, PKIError, is_issued_by, key_matches_certificate
from tests.conftest import ROOT


def _now() -> datetime:
    """The time now: a module-level constant would be minutes stale by the time a long suite gets here."""
    return datetime.now(timezone.utc)



@pytest.fixture(scope="module")
def ca() -> DevCA:
    return DevCA.create(name="logic CA")


@pytest.fixture(scope="module")
def alice(ca):
    return ca.issue_client("alice", uris=["spiffe://example.org/alice"], ou=["eng"])


def _valid(ca: DevCA, days: float, before: float = 1) -> x509.Certificate:
    return ca.issue("x", dns=["x.test"], server=True, not_before=_now() - timedelta(days=before), not_after=_now() + timedelta(days=days)).certificate


# --- pki additions ---------------------------------------------------------------------------------


def test_is_issued_by_checks_the_signature_not_just_the_name(ca, alice):
    twin = DevCA.create(name="logic CA")  # same subject, different key
    assert is_issued_by(alice.certificate, ca.certificate)
    assert not is_issued_by(alice.certificate, twin.certificate)
    assert is_issued_by(ca.certificate, ca.certificate)
    assert not is_issued_by(ca.certificate, alice.certificate)


def test_crl_for_serials_lists_each_serial_with_its_date(ca):
    when = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
    crl = ca.crl_for_serials([(1234, when), (2**150, _now())], days=3)
    assert crl.get_revoked_certificate_by_serial_number(1234).revocation_date_utc == when
    assert crl.get_revoked_certificate_by_serial_number(2**150) is not None
    assert crl.is_signature_valid(ca.certificate.public_key())
    assert crl.next_update_utc < datetime.now(timezone.utc) + timedelta(days=3, minutes=1)
    assert len(ca.crl_for_serials([])) == 0


# --- ca issue helpers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, out",
    [("localhost", "localhost"), ("*.example.com", "_wildcard.example.com"), ("::1", "__1"), ("ops/alice", "ops_alice"), ("..", "certificate")],
)
def test_default_out_is_a_plain_file_name(name, out):
    assert ca_cli.default_out(name) == out


@pytest.mark.parametrize(
    "cn, uris, emails, problem",
    [
        ("", [], [], "needs a NAME"),
        ("a" * 65, [], [], "at most 64"),
        ("bad\nname", [], [], "control characters"),
        ("alice", ["no-scheme"], [], "not a URI"),
        ("alice", ["spiffe://Example.org/x"], [], "not a SPIFFE ID"),
        ("alice", ["spiffe://example.org/a//b"], [], "not a SPIFFE ID"),
        ("alice", [], ["alice"], "not an ASCII email"),
        ("alice", [], ["ä@example.org"], "not an ASCII email"),
        ("alice smith", [], [], "not a hostname"),
        ("*.example.org", [], [], "not a hostname"),
    ],
)
def test_client_name_problems(cn, uris, emails, problem):
    assert problem in ca_cli.client_name_problem(cn, uris, emails)


def test_acceptable_client_names():
    assert ca_cli.client_name_problem("alice smith", ["spiffe://example.org/ns/prod/sa/web", "https://x.test/id"], ["a@b.test"]) is None
    assert ca_cli.client_name_problem("a" * 64, ["spiffe://example.org"], []) is None


def test_password_file_first_line_only(tmp_path):
    (tmp_path / "pw").write_bytes(b"s3cret pass\r\nnot this\n")
    assert ca_cli.read_password_file(str(tmp_path / "pw")) == b"s3cret pass"
    (tmp_path / "bare").write_bytes(b"no newline")
    assert ca_cli.read_password_file(str(tmp_path / "bare")) == b"no newline"
    (tmp_path / "empty").write_bytes(b"\nsecond\n")
    with pytest.raises(CommandError, match="empty"):
        ca_cli.read_password_file(str(tmp_path / "empty"))
    with pytest.raises(CommandError, match="missing: cannot read the password file"):
        ca_cli.read_password_file(str(tmp_path / "missing"))


def _asker(*answers: str):
    replies = iter(answers)

    def ask(prompt: str) -> str:
        assert "x.p12" in prompt
        return next(replies)

    return ask


def test_prompted_password_must_be_typed_twice_the_same():
    assert ca_cli.prompt_password("x.p12", _asker("pw", "pw")) == b"pw"
    with pytest.raises(CommandError, match="do not match"):
        ca_cli.prompt_password("x.p12", _asker("pw", "wp"))
    with pytest.raises(CommandError, match="empty password"):
        ca_cli.prompt_password("x.p12", _asker("", ""))

    def closed(prompt: str) -> str:
        raise EOFError

    with pytest.raises(CommandError, match="no password given"):
        ca_cli.prompt_password("x.p12", closed)


def test_pkcs12_holds_key_certificate_and_ca(ca, alice):
    data = ca_cli.pkcs12_bytes(alice, ca, b"pw", "alice")
    key, cert, extra = pkcs12.load_key_and_certificates(data, b"pw")
    assert cert == alice.certificate and key_matches_certificate(key, cert) and extra == [ca.certificate]
    inter = ca.issue_intermediate("logic inter")
    leaf = inter.issue_client("bob")
    _, _, extra = pkcs12.load_key_and_certificates(ca_cli.pkcs12_bytes(leaf, inter, b"pw", "bob"), b"pw")
    assert extra == [inter.certificate]


def test_write_files_removes_what_it_created_when_a_later_write_fails(tmp_path):
    (tmp_path / "kept").write_bytes(b"old")
    (tmp_path / "plain").write_bytes(b"a file, not a directory")
    files = [(str(tmp_path / "new"), b"1", True), (str(tmp_path / "kept"), b"2", False), (str(tmp_path / "plain" / "x"), b"3", True)]
    with pytest.raises(PKIError, match="plain/x: cannot write"):
        ca_cli.write_files(files)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept", "plain"]


# --- revoked.json ----------------------------------------------------------------------------------


def test_revocations_round_trip(tmp_path):
    entries = [Revocation(serial=0xABC, revoked_at=_now().replace(microsecond=0), subject="CN=alice"), Revocation(serial=2**159 + 1, revoked_at=_now().replace(microsecond=0))]
    path = tmp_path / "revoked.json"
    path.write_bytes(ca_cli.revocations_json(entries))
    assert ca_cli.read_revocations(str(path)) == entries
    assert '"serial": "0ABC"' in path.read_text()
    assert ca_cli.read_revocations(str(tmp_path / "absent.json")) == []


@pytest.mark.parametrize("content, problem", [("{not json", "not valid JSON"), ('{"revoked": [{"serial": "xyz", "revoked_at": "2024-01-01T00:00:00Z"}]}', "expected"),
                                              ('{"revoked": [{"serial": "0A"}]}', "expected"), ("[]", "expected")])  # fmt: skip
def test_malformed_revocations_name_the_file(tmp_path, content, problem):
    path = tmp_path / "revoked.json"
    path.write_text(content)
    with pytest.raises(PKIError, match=f"^{path}: {problem}"):
        ca_cli.read_revocations(str(path))


# --- show ------------------------------------------------------------------------------------------


def test_describe_has_every_field(alice):
    issued_at = alice.certificate.not_valid_after_utc - timedelta(days=90)
    lines = dict(ca_cli.describe(alice.certificate, issued_at))
    identity = Identity.from_certificate(alice.certificate)
    assert lines["SPIFFE ID"] == "spiffe://example.org/alice"
    assert lines["fingerprint_sha256"] == identity.fingerprint_sha256
    assert lines["SPKI SHA-256"] == identity.spki_sha256
    assert lines["OU"] == "eng" and lines["DNS"] == "-" and lines["extended key usage"] == "clientAuth"
    assert lines["serial"] == check.serial_hex(identity.serial)
    assert lines["not after"].endswith("(90 days left)")
    later = dict(ca_cli.describe(alice.certificate, issued_at + timedelta(days=91)))
    assert later["not after"].endswith("(EXPIRED)")


def test_route_verdict_is_global_and_route_rules(alice):
    identity = Identity.from_certificate(alice.certificate)
    anyone, eng, bob = AllowRules(), AllowRules(ou=["eng"]), AllowRules(cn=["bob"])
    assert ca_cli.route_verdict(identity, anyone, anyone) == "admitted"
    assert ca_cli.route_verdict(identity, eng, AllowRules(uri=["spiffe://example.org/alice"])) == "admitted"
    assert ca_cli.route_verdict(identity, anyone, bob) == "refused: not allowed (cn in {bob})"
    assert ca_cli.route_verdict(identity, bob, anyone) == "refused: not allowed by the global allow_client (cn in {bob})"


def test_verification_problems(ca, alice):
    assert ca_cli.verification_problems([alice.certificate], [ca.certificate], [], _now()) == []
    assert ca_cli.verification_problems([alice.certificate], [ca.certificate], [ca.crl([alice.certificate])], _now()) == ["revoked"]
    assert ca_cli.verification_problems([alice.certificate], [ca.certificate], [DevCA.create(name="other").crl()], _now()) == ["no CRL for issuer"]
    assert ca_cli.verification_problems([alice.certificate], [DevCA.create(name="logic CA").certificate], [], _now()) == ["untrusted issuer"]
    server = ca.issue_server(["s.test"]).certificate
    assert ca_cli.verification_problems([server], [ca.certificate], [], _now()) == ["not a client certificate (extended key usage)"]
    assert ca_cli.verification_problems([alice.certificate], [ca.certificate], [], _now() + timedelta(days=100)) == ["expired"]
    inter = ca.issue_intermediate("logic inter 2")
    leaf = inter.issue_client("deep")
    assert ca_cli.verification_problems([leaf.certificate, *leaf.chain], [ca.certificate], [], _now()) == []
    assert ca_cli.verification_problems([leaf.certificate], [ca.certificate], [], _now()) == ["untrusted issuer"]
    assert ca_cli.verification_problems([leaf.certificate], [inter.certificate], [], _now()) == []  # intermediates are anchors too


# --- check -----------------------------------------------------------------------------------------


def test_format_table_aligns_columns_without_trailing_spaces():
    lines = summary.table_lines(["a", "long header"], [["x", "1"], ["wider", ""]])
    assert lines == ["A      LONG HEADER", "x      1", "wider"]


def test_days_left_rounds_up_and_names_expired(ca):
    assert summary.days_left(_valid(ca, 10), _now()) == "10"
    assert summary.days_left(_valid(ca, 0.5), _now()) == "1"
    assert summary.days_left(_valid(ca, 10), _now() + timedelta(days=11)) == "EXPIRED"
    assert summary.days_left(_valid(ca, 10, before=-1), _now()) == "not yet valid"


def test_serial_hex_is_as_openssl_prints_it():
    assert check.serial_hex(0xABC) == "0ABC"
    assert check.serial_hex(0x1F) == "1F"


def test_validity_findings(ca):
    assert check.validity_findings("f", _valid(ca, 100), _now()).lines == []
    assert check.validity_findings("f", _valid(ca, 10), _now()).lines == [("warning", f"f: expires in 10 day(s), on {(_now() + timedelta(days=10)):%Y-%m-%d}")]
    (level, message), = check.validity_findings("f", _valid(ca, 10), _now() + timedelta(days=12)).lines
    assert level == "error" and "f: expired on" in message
    (level, message), = check.validity_findings("f", _valid(ca, 10, before=-2), _now()).lines
    assert level == "error" and "not valid until" in message


def test_chain_findings_follow_the_stated_rule(ca):
    inter = ca.issue_intermediate("check inter")
    leaf = inter.issue_server(["a.test"])
    chain = [leaf.certificate, *leaf.chain]
    assert check.chain_findings("f", chain, [ca.certificate]).lines == []
    (level, message), = check.chain_findings("f", chain, []).lines
    assert level == "warning" and "chain incomplete" in message and "CN=logic CA" in message
    assert check.chain_findings("f", [*chain, ca.certificate], []).lines == []  # ends with the self-signed root
    (level, message), = check.chain_findings("f", [leaf.certificate], [ca.certificate]).lines
    assert level == "warning" and "CN=check inter, which is not in the file" in message
    levels = [level for level, _ in check.chain_findings("f", [leaf.certificate, ca.certificate], []).lines]
    assert levels == ["error"]  # a broken link; the file does end in a root
    assert check.chain_findings("f", [ca.certificate], []).lines == []


def test_upstream_tls_column():
    assert summary.upstream_tls(Route(host="a", to=("https://u",))) == "CA system store, no client cert"
    route = Route(host="a", to=("https://u",), tls_custom_ca_file="/elsewhere/ca.pem", tls_client_cert_file="/elsewhere/gw.pem", tls_server_name="api.internal")
    assert summary.upstream_tls(route) == "CA /elsewhere/ca.pem, client /elsewhere/gw.pem, name api.internal"
    assert summary.upstream_tls(Route(host="a", to=("https://u",), tls_skip_verify=True)).startswith("skip-verify!")
    assert summary.upstream_tls(Route(host="a", to=("http://u",))) == "none (http://)"
    assert summary.upstream_tls(Route(host="a", to=("https://u",), upstream_protocol="http2")) == "CA system store, no client cert, HTTP/2"


def _checker(tmp_path, ca: DevCA, crls) -> check.Checker:
    served = ca.issue_server(["a.test"])
    (tmp_path / "certs").mkdir(exist_ok=True)
    served.write_combined(str(tmp_path / "certs" / "a.pem"))
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem())
    (tmp_path / "crl.pem").write_bytes(b"".join(crl.public_bytes(Encoding.PEM) for crl in crls))
    config = Config(
        certs_dir=str(tmp_path / "certs"),
        downstream_mtls=DownstreamMTLS(ca_file=str(tmp_path / "ca.pem"), crl_file=str(tmp_path / "crl.pem"), client_auth="require"),
        routes=(Route(host="a.test", to=("https://127.0.0.1:9",)),),
    )
    checker = check.Checker(config, _now())
    checker.run()
    return checker


def test_checker_judges_crls(tmp_path, ca):
    assert _checker(tmp_path, ca, [ca.crl()]).findings.lines == []
    other = DevCA.create(name="elsewhere")
    lines = _checker(tmp_path, ca, [other.crl()]).findings.lines
    assert [level for level, _ in lines] == ["warning", "error"]  # crl_check: chain refuses to start without it
    assert "issuer is not in downstream_mtls.ca_file" in lines[0][1] and "no CRL from CN=logic CA" in lines[1][1]
    twin = DevCA(certificate=ca.certificate, key=DevCA.create().key)  # signs in the CA's name with another key
    (level, message), = _checker(tmp_path, ca, [twin.crl()]).findings.lines
    assert level == "error" and "signature does not verify" in message


def test_checker_reports_an_expired_crl(tmp_path, ca):
    crl = ca.crl(days=1)
    checker = _checker(tmp_path, ca, [crl])
    checker.now = _now() + timedelta(days=2)
    checker.findings = check.Findings()
    checker.check_downstream()
    (level, message), = checker.findings.lines
    assert level == "error" and "expired on" in message


def test_checker_lists_certs_dir_files(tmp_path, ca):
    checker = _checker(tmp_path, ca, [ca.crl()])
    assert [row[:3] for row in checker.certificate_rows] == [[str(tmp_path / "certs" / "a.pem"), "a.test", "logic CA"]]


# --- the parser --------------------------------------------------------------------------------------


def test_usage_errors_are_one_line_with_status_1(capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["ca", "frobnicate"])
    assert exit.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mtlsgate: ca: argument")  # once "mtlsgate: mtlsgate ca: ..."
    with pytest.raises(SystemExit):
        cli.main([])
    assert capsys.readouterr().err.startswith("mtlsgate: the following arguments are required")


def test_version_is_printed_and_exits_0(capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["--version"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("mtlsgate ") and "0." in out


def test_tac_is_the_shipped_deployment_file():
    shipped = Path(cli.__file__).parent.parent.joinpath("mtlsgate.tac").read_text()
    assert cli.tac_text() == shipped
    assert "application = Application(\"mtlsgate\")" in shipped
    top = ROOT / "mtlsgate.tac"
    assert top.is_symlink() and top.read_text() == shipped  # one source: the checkout's top-level file is a link


def test_every_subcommand_is_wired():
    parser = cli.parser()
    for argv, run in ((["ca", "init"], ca_cli.ca_init), (["ca", "issue", "server", "x"], ca_cli.ca_issue), (["ca", "revoke", "c.pem"], ca_cli.ca_revoke),
                      (["ca", "crl"], ca_cli.ca_crl), (["ca", "show", "c.pem"], ca_cli.ca_show), (["check", "c.yaml"], check.check), (["tac"], cli._tac)):  # fmt: skip
        assert parser.parse_args(argv).run is run


def _options(parser, prefix: str = "mtlsgate") -> list[tuple[str, str]]:
    """(subcommand, option) for every option of every subcommand, walking nested subparsers."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _options(sub, f"{prefix} {name}")
        else:
            found += [(prefix, option) for option in action.option_strings if option.startswith("--") and option != "--help"]
    return found


@pytest.mark.parametrize("command, option", _options(cli.parser()))
def test_every_subcommand_and_option_is_documented(command, option):
    reference = (ROOT / "docs" / "cli.md").read_text()
    assert f"`{command}" in reference
    assert f"`{option}" in reference
