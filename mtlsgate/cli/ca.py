"""
The local development CA on the command line: C{mtlsgate ca init|issue|revoke|crl|show}.

The CA lives in one directory: C{ca.pem}, C{ca-key.pem} (0600), C{revoked.json} (the serials this CA
has revoked, with when) and C{crl.pem} (the CRL made from C{revoked.json}). Issued certificates go to
the current directory (or C{--out}), never into the CA's directory.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import os
import re
from datetime import datetime, timezone
from typing import Any, Callable, Sequence

import attrs
from cryptography import x509
from cryptography.hazmat.primitives.serialization import BestAvailableEncryption, Encoding, pkcs12

from mtlsgate.cli.check import extended_key_usages, serial_hex
from mtlsgate.observe.summary import days_left, short_path, table_lines
from mtlsgate.config.load import load_config
from mtlsgate.identity import AllowRules, Identity, printable
from mtlsgate.tls.pki import (
    DevCA, IssuedCertificate, PKIError, _hostname_problem, is_issued_by, load_certificates, load_crls, private_key_pem,
    write_private_file, write_public_file,
)  # fmt: skip

DEFAULT_DIR = "mtlsgate-ca"
SERVER_DAYS = 825
CLIENT_DAYS = 90
CRL_DAYS = 30

_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:[^\s]+\Z")
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\Z")


class CommandError(Exception):
    """A problem with what the command was asked to do; C{str()} is the one line to show."""


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _date(when: datetime) -> str:
    return when.strftime("%Y-%m-%d %H:%M:%S UTC")


def write_files(files: Sequence[tuple[str, bytes, bool]]) -> None:
    """
    Write each C{(path, data, private)} atomically (private: 0600, else 0644). When one write fails,
    the files this call created are removed again, so a failed command leaves no partial set behind.
    """
    created: list[str] = []
    try:
        for path, data, private in files:
            existed = os.path.lexists(path)
            (write_private_file if private else write_public_file)(path, data)
            if not existed:
                created.append(path)
    except PKIError:
        for path in created:
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise


# --- ca init ---------------------------------------------------------------------------------------


def _make_directory(directory: str) -> None:
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except OSError as e:
        raise PKIError(f"{directory}: cannot create directory ({e.strerror or type(e).__name__})") from None


def ca_init(args: argparse.Namespace) -> int:
    existing = [name for name in ("ca.pem", "ca-key.pem") if os.path.lexists(os.path.join(args.dir, name))]
    if existing and not args.force:
        raise CommandError(f"{os.path.join(args.dir, existing[0])} exists; use --force to replace the CA (what it issued will stop verifying)")
    ca = DevCA.create(None, name=args.name, rsa=args.rsa)
    _make_directory(args.dir)
    write_files([(os.path.join(args.dir, "ca-key.pem"), private_key_pem(ca.key), True), (os.path.join(args.dir, "ca.pem"), ca.cert_pem(), False)])
    kind = "RSA 3072" if args.rsa else "ECDSA P-256"
    print(f"created CA {ca.certificate.subject.rfc4514_string()!r} ({kind}, valid until {_date(ca.certificate.not_valid_after_utc)})")
    print(f"  {os.path.join(args.dir, 'ca.pem')}: the certificate to trust (--client-ca, --upstream-ca, curl --cacert)")
    print(f"  {os.path.join(args.dir, 'ca-key.pem')}: its private key, mode 0600")
    for stale in ("revoked.json", "crl.pem"):  # they belong to the replaced CA
        path = os.path.join(args.dir, stale)
        try:
            os.unlink(path)
        except FileNotFoundError:
            continue
        except OSError as e:
            raise PKIError(f"{path}: cannot remove this file of the replaced CA ({e.strerror or type(e).__name__})") from None
        print(f"  removed {path}, which belonged to the replaced CA")
    return 0


# --- ca issue --------------------------------------------------------------------------------------


def default_out(name: str) -> str:
    """The file name prefix for a certificate named C{name}: C{*.example.com} -> C{_wildcard.example.com}."""
    out = name.replace("*", "_wildcard")
    return re.sub(r"[^A-Za-z0-9._@-]", "_", out).lstrip(".") or "certificate"


def client_name_problem(common_name: str, uris: Sequence[str], emails: Sequence[str]) -> str | None:
    """
    Why a client certificate cannot carry these names, or None. Its subjectAltName must not end up
    empty: without a URI or email, the CN is repeated as a DNS name, so it must be a hostname then.
    """
    if not common_name:
        return "a client certificate needs a NAME (its CN), got an empty one"
    if len(common_name) > 64:
        return f"{common_name[:40]!r}...: a CN holds at most 64 characters"
    if printable(common_name) != common_name:
        return f"{printable(common_name)!r}: control characters in a CN"
    for uri in uris:
        if not _URI.match(uri):
            return f"--uri {uri!r}: not a URI (expected SCHEME:..., such as spiffe://example.org/web)"
        if uri.startswith("spiffe:") and not re.match(r"spiffe://[a-z0-9._-]+(/[^\s/]+)*\Z", uri):
            return f"--uri {uri!r}: not a SPIFFE ID (spiffe://TRUST-DOMAIN/PATH, lower-case trust domain)"
    for email in emails:
        if not _EMAIL.match(email) or not email.isascii():
            return f"--email {email!r}: not an ASCII email address"
    if not uris and not emails and ("*" in common_name or _hostname_problem(common_name) is not None):
        return f"{common_name!r} is not a hostname, so it cannot also be the DNS name: give --uri or --email for the subjectAltName"
    return None


def read_password_file(path: str) -> bytes:
    """The first line of C{path}, without its line ending."""
    try:
        with open(path, "rb") as f:
            line = f.readline()
    except OSError as e:
        raise CommandError(f"{path}: cannot read the password file ({e.strerror or type(e).__name__})") from None
    password = line.rstrip(b"\r\n")
    if not password:
        raise CommandError(f"{path}: the first line (the password) is empty")
    return password


def prompt_password(what: str, ask: Callable[[str], str] = getpass.getpass) -> bytes:
    """A password typed twice; mismatch and empty are errors."""
    try:
        first = ask(f"password for {what}: ")
        second = ask(f"password for {what} (again): ")
    except (EOFError, KeyboardInterrupt):
        raise CommandError(f"no password given for {what}") from None
    if first != second:
        raise CommandError(f"the passwords for {what} do not match")
    if not first:
        raise CommandError(f"an empty password for {what}; give one, or use --p12-password-file")
    return first.encode("utf-8")


def pkcs12_bytes(issued: IssuedCertificate, ca: DevCA, password: bytes, friendly_name: str) -> bytes:
    """A PKCS#12 bundle of the key, the certificate and the CA certificates above it, encrypted with C{password}."""
    cas = list(issued.chain) or [ca.certificate]
    return pkcs12.serialize_key_and_certificates(
        friendly_name.encode("utf-8"), issued.key, issued.certificate, cas, BestAvailableEncryption(password),
    )


def check_days(days: int | None) -> None:
    """C{--days}: from 1 to 100 years' worth, or absent."""
    if days is not None and not 1 <= days <= 36500:
        raise CommandError(f"--days must be from 1 to 36500, got {days}")


def _issue(ca: DevCA, args: argparse.Namespace) -> IssuedCertificate:
    check_days(args.days)
    if args.kind == "server":
        if args.uri or args.email or args.ou:
            raise CommandError("--uri, --email and --ou are for client certificates")
        return ca.issue_server(args.names, days=args.days or SERVER_DAYS, rsa=args.rsa)
    if len(args.names) != 1:
        raise CommandError(f"a client certificate takes exactly one NAME (its CN), got {len(args.names)}")
    if problem := client_name_problem(args.names[0], args.uri, args.email):
        raise CommandError(problem)
    return ca.issue_client(args.names[0], uris=args.uri, emails=args.email, ou=args.ou, days=args.days or CLIENT_DAYS, rsa=args.rsa)


def load_ca(directory: str) -> DevCA:
    """The CA in C{directory}; when there is none at all, say how to make one or where else to look."""
    if not any(os.path.exists(os.path.join(directory, name)) for name in ("ca.pem", "ca-key.pem")):
        init = "mtlsgate ca init" if directory == DEFAULT_DIR else f"mtlsgate ca init --dir {directory}"
        raise CommandError(f"no CA in {directory} ({os.path.join(directory, 'ca.pem')}: no such file)"
                           f": run '{init}' first, or pass --dir DIR for an existing CA's directory")
    return DevCA.load(directory)


def ca_issue(args: argparse.Namespace) -> int:
    ca = load_ca(args.dir)
    out = args.out or default_out(args.names[0])
    issued = _issue(ca, args)
    files = [(f"{out}-key.pem", issued.key_pem(), True), (f"{out}.pem", issued.cert_pem(), False)]
    if args.p12 or args.p12_password_file:
        password = read_password_file(args.p12_password_file) if args.p12_password_file else prompt_password(f"{out}.p12")
        files.append((f"{out}.p12", pkcs12_bytes(issued, ca, password, args.names[0]), True))
    write_files(files)
    cert = issued.certificate
    print(f"issued {args.kind} certificate {cert.subject.rfc4514_string()!r}, serial {serial_hex(cert.serial_number)}"
          f", valid until {_date(cert.not_valid_after_utc)}")
    print(f"  names: {', '.join(_names(Identity.from_certificate(cert))) or '-'}")
    for path, _, private in files:
        print(f"  wrote {path}{' (mode 0600)' if private else ''}")
    return 0


def _names(identity: Identity) -> list[str]:
    return [*identity.dns_names, *identity.ips, *identity.uris, *identity.emails]


# --- ca revoke / ca crl ----------------------------------------------------------------------------


@attrs.frozen
class Revocation:
    """One entry of C{revoked.json}."""

    serial: int
    revoked_at: datetime
    subject: str = ""

    def to_json(self) -> dict[str, str]:
        return {"serial": serial_hex(self.serial), "revoked_at": self.revoked_at.strftime("%Y-%m-%dT%H:%M:%SZ"), "subject": self.subject}

    @classmethod
    def from_json(cls, data: Any) -> Revocation:
        revoked_at = datetime.strptime(data["revoked_at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
        return cls(serial=int(data["serial"], 16), revoked_at=revoked_at, subject=str(data.get("subject", "")))


def read_revocations(path: str) -> list[Revocation]:
    """The entries of C{revoked.json}; none when it does not exist yet."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return []
    except OSError as e:
        raise PKIError(f"{path}: cannot read ({e.strerror or type(e).__name__})") from None
    except ValueError:
        raise PKIError(f"{path}: not valid JSON") from None
    try:
        return [Revocation.from_json(entry) for entry in data["revoked"]]
    except (KeyError, TypeError, ValueError, AttributeError):
        raise PKIError(f"{path}: expected {{\"revoked\": [{{\"serial\": HEX, \"revoked_at\": \"YYYY-MM-DDTHH:MM:SSZ\"}}, ...]}}") from None


def revocations_json(entries: Sequence[Revocation]) -> bytes:
    return (json.dumps({"revoked": [entry.to_json() for entry in entries]}, indent=2) + "\n").encode("utf-8")


def _write_crl(ca: DevCA, directory: str, entries: Sequence[Revocation], days: int, args: argparse.Namespace | None = None) -> None:
    crl = ca.crl_for_serials([(entry.serial, entry.revoked_at) for entry in entries], days=days)
    path = os.path.join(directory, "crl.pem")
    write_public_file(path, crl.public_bytes(Encoding.PEM))
    print(f"wrote {path}: {len(entries)} revoked certificate(s)"
          f", next update {_date(crl.next_update_utc)} (run 'mtlsgate ca crl' again before then)")  # type: ignore[arg-type]
    if args is not None and args.storage:
        _publish(crl, args)


def _storage_from(args: argparse.Namespace) -> Any:
    """The C{--storage*} flags as the gateway's storage settings (no storage key: a CRL is public)."""
    from mtlsgate.cluster.url import parse_storage_url
    from mtlsgate.config.model import Storage

    try:
        url = parse_storage_url(args.storage)
    except ValueError as e:
        raise CommandError(f"--storage: {e}") from None
    if (args.storage_ca_file or args.storage_cert) and not url.tls:
        raise CommandError("--storage-ca-file and --storage-cert are for rediss:// (Redis over TLS)")
    return Storage(
        url=args.storage, key_file="", password_file=args.storage_password_file, password_env=args.storage_password_env,
        username=url.username, ca_file=args.storage_ca_file, cert=args.storage_cert, key=args.storage_key, timeout=10.0,
    )  # fmt: skip


def _publish(crl: x509.CertificateRevocationList, args: argparse.Namespace) -> None:
    from mtlsgate.cluster.publish import publish_crl

    storage = _storage_from(args)
    try:
        stored = publish_crl(storage, crl)
    except Exception as e:  # noqa: BLE001 - txredisapi's errors, StoreUnavailable: one line, not a traceback
        raise CommandError(f"--storage {args.storage}: the CRL was written locally but not published: {e}") from None
    if stored:
        print(f"published the CRL to {args.storage}: every gateway sharing it refuses the revoked certificates within seconds")
    else:
        print(f"{args.storage} already holds this CRL or a newer one for this CA; nothing published")


def ca_revoke(args: argparse.Namespace) -> int:
    check_days(args.days)
    ca = load_ca(args.dir)
    cert = load_certificates(args.certfile)[0]
    if cert == ca.certificate:
        raise CommandError(f"{args.certfile}: is the CA certificate itself; to retire the CA, stop trusting it (or 'ca init --force')")
    if not is_issued_by(cert, ca.certificate):
        raise CommandError(f"{args.certfile}: not issued by this CA ({ca.certificate.subject.rfc4514_string()!r} in {args.dir}); refusing to revoke it")
    registry = os.path.join(args.dir, "revoked.json")
    entries = read_revocations(registry)
    subject = cert.subject.rfc4514_string()
    if any(entry.serial == cert.serial_number for entry in entries):
        print(f"{subject!r} (serial {serial_hex(cert.serial_number)}) was already revoked")
    else:
        entries.append(Revocation(serial=cert.serial_number, revoked_at=_now().replace(microsecond=0), subject=subject))
        write_public_file(registry, revocations_json(entries))
        print(f"revoked {subject!r} (serial {serial_hex(cert.serial_number)}); recorded in {registry}")
    try:
        _write_crl(ca, args.dir, entries, args.days, args)
    except PKIError as e:
        raise PKIError(f"{e} (the revocation is recorded in {registry}; run 'mtlsgate ca crl' once this is fixed)") from None
    return 0


def ca_crl(args: argparse.Namespace) -> int:
    check_days(args.days)
    ca = load_ca(args.dir)
    _write_crl(ca, args.dir, read_revocations(os.path.join(args.dir, "revoked.json")), args.days, args)
    return 0


# --- ca show ---------------------------------------------------------------------------------------


def _listing(values: Sequence[str]) -> str:
    return ", ".join(printable(v) for v in values) or "-"


def describe(cert: x509.Certificate, now: datetime) -> list[tuple[str, str]]:
    """What the gateway sees of C{cert}, as (label, value) lines."""
    identity = Identity.from_certificate(cert)
    remaining = days_left(cert, now)
    until = f"{_date(identity.not_after)} ({remaining}{' days left' if remaining.isdigit() else ''})"
    usages = extended_key_usages(cert)
    return [
        ("subject", printable(identity.subject) or "-"),
        ("issuer", printable(identity.issuer) or "-"),
        ("CN", printable(identity.common_name or "-")),
        ("OU", _listing(identity.organizational_units)),
        ("O", _listing(identity.organizations)),
        ("DNS", _listing(identity.dns_names)),
        ("URI", _listing(identity.uris)),
        ("email", _listing(identity.emails)),
        ("IP", _listing(identity.ips)),
        ("SPIFFE ID", printable(identity.spiffe_id or "-")),
        ("fingerprint_sha256", identity.fingerprint_sha256),
        ("SPKI SHA-256", identity.spki_sha256 or "-"),
        ("serial", serial_hex(identity.serial)),
        ("not before", _date(identity.not_before)),
        ("not after", until),
        ("extended key usage", "any (no EKU extension)" if usages is None else _listing(usages)),
    ]


def route_verdict(identity: Identity, global_rules: AllowRules, route_rules: AllowRules) -> str:
    """C{admitted}, or why the allow rules (global AND the route's) refuse C{identity}."""
    if not global_rules.allows(identity):
        return f"refused: not allowed by the global allow_client ({global_rules.explain()})"
    if not route_rules.allows(identity):
        return f"refused: not allowed ({route_rules.explain()})"
    return "admitted"


def verification_problems(chain: Sequence[x509.Certificate], anchors: Sequence[x509.Certificate],
                          crls: Sequence[x509.CertificateRevocationList], now: datetime) -> list[str]:  # fmt: skip
    """
    Why the gateway would refuse this client certificate before any allow rule: validity, EKU, trust
    (some anchor issued the leaf, or a certificate of C{chain} that leads to one; anchors may be
    intermediates, as in the gateway) and the CRLs.
    """
    leaf = chain[0]
    problems = []
    remaining = days_left(leaf, now)
    if not remaining.isdigit():
        problems.append(remaining.lower())
    usages = extended_key_usages(leaf)
    if usages is not None and "clientAuth" not in usages:
        problems.append("not a client certificate (extended key usage)")
    if not _chains_to(leaf, chain[1:], anchors):
        problems.append("untrusted issuer")
    own_crls = [crl for crl in crls if crl.issuer == leaf.issuer]
    if crls and not own_crls:
        problems.append("no CRL for issuer")
    if any(crl.get_revoked_certificate_by_serial_number(leaf.serial_number) is not None for crl in own_crls):
        problems.append("revoked")
    return problems


def _chains_to(cert: x509.Certificate, intermediates: Sequence[x509.Certificate], anchors: Sequence[x509.Certificate]) -> bool:
    for _ in range(len(intermediates) + 1):
        if cert in anchors or any(is_issued_by(cert, anchor) for anchor in anchors):
            return True
        issuer = next((c for c in intermediates if is_issued_by(cert, c)), None)
        if issuer is None:
            return False
        cert = issuer
    return False


def _show_config(chain: list[x509.Certificate], config_path: str, now: datetime) -> None:
    config = load_config(config_path)
    mtls = config.downstream_mtls
    identity = Identity.from_certificate(chain[0])
    print()
    if mtls.ca_file is None or mtls.client_auth == "off":
        print(f"client certificates are not requested (client_auth {mtls.client_auth})")
    else:
        anchors = load_certificates(mtls.ca_file)
        crls = load_crls(mtls.crl_file) if mtls.crl_file else []
        problems = verification_problems(chain, anchors, crls, now)
        against = short_path(mtls.ca_file) + (f" and {short_path(mtls.crl_file)}" if mtls.crl_file else "")
        print(f"verification against {against}: {'; '.join(problems) or 'ok'}")
    print(f"global allow_client: {config.allow_client.explain()}")
    print(f"allow rules per route of {config_path}:")
    rows = [[route.name, route_verdict(identity, config.allow_client, route.allow_client)] for route in config.routes]
    if not rows:
        print("  (no routes)")
        return
    for line in table_lines(["route", "allow rules"], rows):
        print("  " + line)


def ca_show(args: argparse.Namespace) -> int:
    chain = load_certificates(args.certfile)
    now = _now()
    lines = describe(chain[0], now)
    width = max(len(label) for label, _ in lines)
    print(f"{args.certfile}{f' (and {len(chain) - 1} more certificate(s) in the file)' if len(chain) > 1 else ''}")
    for label, value in lines:
        print(f"  {label + ':':<{width + 1}} {value}")
    if args.dir:
        _show_ca(chain[0], args.dir)
    if args.config:
        _show_config(chain, args.config, now)
    return 0


def _show_ca(cert: x509.Certificate, directory: str) -> None:
    """Whether the CA in C{directory} issued the certificate (name and signature) and has revoked it."""
    ca = load_ca(directory)
    if not (cert == ca.certificate or is_issued_by(cert, ca.certificate)):
        print(f"issued by the CA in {directory}: no")
        return
    revoked = next((e for e in read_revocations(os.path.join(directory, "revoked.json")) if e.serial == cert.serial_number), None)
    status = f"REVOKED on {_date(revoked.revoked_at)}" if revoked else "not revoked"
    print(f"issued by the CA in {directory}: yes, {status}")


# --- the parsers -----------------------------------------------------------------------------------


def _storage_flags(parser: Any) -> None:
    """C{--storage URL} and its password and TLS flags (the password never on the command line)."""
    parser.add_argument("--storage", metavar="URL", help="also publish the CRL to this cluster's shared store (redis://HOST:PORT/DB, rediss://...)")
    parser.add_argument("--storage-password-file", metavar="FILE", help="Redis password: the first line of FILE")
    parser.add_argument("--storage-password-env", metavar="VAR", help="Redis password: the environment variable VAR")
    parser.add_argument("--storage-ca-file", metavar="FILE", help="rediss://: the CA bundle to trust for Redis's certificate [system]")
    parser.add_argument("--storage-cert", metavar="FILE", help="rediss://: the client certificate to present (PEM, may hold the key)")
    parser.add_argument("--storage-key", metavar="FILE", help="rediss://: the client certificate's key, if not in --storage-cert")


def add_parsers(subparsers: Any) -> None:
    """C{mtlsgate ca ...} and its subcommands."""
    ca = subparsers.add_parser("ca", help="a local development CA", description="A local development CA, kept in one directory.")
    sub = ca.add_subparsers(dest="ca_command", required=True, metavar="{init,issue,revoke,crl,show}")
    dir_help = f"the CA's directory [{DEFAULT_DIR}]"

    init = sub.add_parser("init", help="create a root CA (ECDSA P-256 unless --rsa)")
    init.add_argument("--dir", default=DEFAULT_DIR, help=dir_help)
    init.add_argument("--name", default="mtlsgate development CA", help="the CA's common name [mtlsgate development CA]")
    init.add_argument("--rsa", action="store_true", help="RSA 3072 instead of ECDSA P-256")
    init.add_argument("--force", action="store_true", help="replace an existing CA in --dir")
    init.set_defaults(run=ca_init)

    issue = sub.add_parser("issue", help="issue a server or client certificate")
    issue.add_argument("kind", choices=["server", "client"])
    issue.add_argument("names", nargs="+", metavar="NAME", help="server: DNS names, IP addresses, *.wildcards (the first is the CN); client: the CN")
    issue.add_argument("--dir", default=DEFAULT_DIR, help=dir_help)
    issue.add_argument("--out", help="file name prefix: OUT.pem, OUT-key.pem, OUT.p12 [the first NAME]")
    issue.add_argument("--days", type=int, help=f"validity in days [server {SERVER_DAYS}, client {CLIENT_DAYS}]")
    issue.add_argument("--rsa", action="store_true", help="an RSA 2048 key instead of ECDSA P-256")
    issue.add_argument("--uri", action="append", default=[], help="client: a URI SAN such as spiffe://example.org/web (repeatable)")
    issue.add_argument("--email", action="append", default=[], help="client: an email SAN (repeatable)")
    issue.add_argument("--ou", action="append", default=[], help="client: an organizational unit (repeatable)")
    issue.add_argument("--p12", action="store_true", help="also write OUT.p12 (key, certificate and CA, password-protected)")
    issue.add_argument("--p12-password-file", metavar="FILE", help="the .p12 password: the first line of FILE (implies --p12) [prompted]")
    issue.set_defaults(run=ca_issue)

    revoke = sub.add_parser("revoke", help="revoke a certificate this CA issued and rewrite the CRL")
    revoke.add_argument("certfile", metavar="CERTFILE")
    revoke.add_argument("--dir", default=DEFAULT_DIR, help=dir_help)
    revoke.add_argument("--days", type=int, default=CRL_DAYS, help=f"the CRL's validity in days [{CRL_DAYS}]")
    _storage_flags(revoke)
    revoke.set_defaults(run=ca_revoke)

    crl = sub.add_parser("crl", help="(re)write DIR/crl.pem listing every revoked certificate")
    crl.add_argument("--dir", default=DEFAULT_DIR, help=dir_help)
    crl.add_argument("--days", type=int, default=CRL_DAYS, help=f"the CRL's validity in days [{CRL_DAYS}]")
    _storage_flags(crl)
    crl.set_defaults(run=ca_crl)

    show = sub.add_parser("show", help="print the identity the gateway would see in a certificate")
    show.add_argument("certfile", metavar="CERTFILE")
    show.add_argument("--dir", help="also say whether the CA in DIR issued the certificate and has revoked it")
    show.add_argument("--config", metavar="CONFIG", help="also say, per route of this config file, whether its allow rules admit it")
    show.set_defaults(run=ca_show)
