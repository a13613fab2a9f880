"""
C{mtlsgate check CONFIG}: validate a configuration and every file it names without starting anything.

The config is loaded as the gateway loads it (a L{ConfigError} stops the check at once, naming the
key). Then each file is opened and judged; every finding is one line, C{error:} (the gateway would
refuse to start, or would refuse every client or upstream it concerns) or C{warning:} (it would run,
but something is probably wrong or soon will be). The exit status is 1 when there is an error.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime, timedelta, timezone
from typing import Any, Sequence, TextIO

import attrs
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from mtlsgate.config.load import load_config
from mtlsgate.config.model import Config, Route, TCPRoute
from mtlsgate.identity import Identity, printable
from mtlsgate.tls.pki import PKIError, is_issued_by, load_certificates, load_crls, load_key_and_chain
from mtlsgate.observe.summary import ROUTE_HEADERS, days_left, issuer_label, route_rows, short_path, table_lines

WARN_WITHIN = timedelta(days=30)

_EKU_NAMES = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
    ExtendedKeyUsageOID.CODE_SIGNING: "codeSigning",
    ExtendedKeyUsageOID.EMAIL_PROTECTION: "emailProtection",
    ExtendedKeyUsageOID.TIME_STAMPING: "timeStamping",
    ExtendedKeyUsageOID.OCSP_SIGNING: "OCSPSigning",
    ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE: "anyExtendedKeyUsage",
}


# --- certificate facts, shared with `mtlsgate ca show` ---------------------------------------------


def extended_key_usages(cert: x509.Certificate) -> tuple[str, ...] | None:
    """The EKU names (C{serverAuth}, C{clientAuth}, or dotted OIDs), or None without the extension (any use)."""
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except (x509.ExtensionNotFound, ValueError):
        return None
    return tuple(_EKU_NAMES.get(oid, oid.dotted_string) for oid in usages)


def serial_hex(serial: int) -> str:
    """A serial number as OpenSSL prints it: upper-case hex, an even number of digits."""
    digits = f"{serial:X}"
    return digits.zfill(len(digits) + len(digits) % 2)


def served_names(cert: x509.Certificate) -> str:
    """The DNS and IP SANs a client may reach this certificate by; the CN when there are none."""
    identity = Identity.from_certificate(cert)
    names = [*identity.dns_names, *identity.ips]
    return printable(", ".join(names)) if names else f"CN={printable(identity.common_name or '-')}"


# --- findings --------------------------------------------------------------------------------------


@attrs.define
class Findings:
    """Errors and warnings, one line each, in the order found."""

    lines: list[tuple[str, str]] = attrs.Factory(list)

    def error(self, message: str) -> None:
        self.lines.append(("error", message))

    def warning(self, message: str) -> None:
        self.lines.append(("warning", message))

    def extend(self, other: Findings) -> None:
        self.lines.extend(other.lines)

    @property
    def errors(self) -> int:
        return sum(1 for level, _ in self.lines if level == "error")

    @property
    def warnings(self) -> int:
        return sum(1 for level, _ in self.lines if level == "warning")


def _date(when: datetime) -> str:
    return when.strftime("%Y-%m-%d")


def validity_findings(what: str, cert: x509.Certificate, now: datetime, warn_within: timedelta = WARN_WITHIN) -> Findings:
    """Expired or not yet valid: an error; expiring within C{warn_within}: a warning."""
    found = Findings()
    after = cert.not_valid_after_utc
    if now >= after:
        found.error(f"{what}: expired on {_date(after)}")
    elif now < cert.not_valid_before_utc:
        found.error(f"{what}: not valid until {_date(cert.not_valid_before_utc)}")
    elif after - now <= warn_within:
        found.warning(f"{what}: expires in {days_left(cert, now)} day(s), on {_date(after)}")
    return found


def _subject(cert: x509.Certificate) -> str:
    return printable(cert.subject.rfc4514_string()) or "(empty subject)"


def chain_findings(what: str, chain: Sequence[x509.Certificate], roots: Sequence[x509.Certificate]) -> Findings:
    """
    The links of a served chain, by this rule: each certificate in the file must be issued (name and
    signature) by the one after it, or it is an error. A file that ends with a certificate that is
    not self-signed is only a warning, "chain incomplete", because its issuer may well be a root the
    clients trust; it is not even that when the issuer is a self-signed root found in one of the
    config's own CA bundles (C{roots}).
    """
    found = Findings()
    for position, (cert, issuer) in enumerate(zip(chain, chain[1:]), 1):
        if not is_issued_by(cert, issuer):
            found.error(
                f"{what}: chain broken: certificate #{position} ({_subject(cert)}) is not issued by the next one, "
                f"#{position + 1} ({_subject(issuer)}); put the leaf first, then each issuer"
            )
    last = chain[-1]
    if not is_issued_by(last, last) and not any(is_issued_by(last, root) and is_issued_by(root, root) for root in roots):
        found.warning(
            f"{what}: chain incomplete: {_subject(last)} is issued by {printable(last.issuer.rfc4514_string())}, "
            "which is not in the file (fine if clients trust it as a root; otherwise append the intermediate)"
        )
    return found


def _eku_lacks(cert: x509.Certificate, usage: str) -> bool:
    usages = extended_key_usages(cert)
    return usages is not None and usage not in usages and "anyExtendedKeyUsage" not in usages


# --- the checker -----------------------------------------------------------------------------------


class Checker:
    """Judges a loaded L{Config}; collects the tables' rows and the findings."""

    def __init__(self, config: Config, now: datetime) -> None:
        self.config = config
        self.now = now
        self.findings = Findings()
        self.certificate_rows: list[list[str]] = []
        self.served_dns_names: set[str] = set()
        self.roots = self._bundle_roots()

    def _bundle_roots(self) -> list[x509.Certificate]:
        bundles = [self.config.downstream_mtls.ca_file, *(route.tls_custom_ca_file for route in self.config.routes)]
        bundles += [route.tls_custom_ca_file for route in self.config.tcp_routes]
        roots = []
        for path in filter(None, bundles):
            try:
                roots += [cert for cert in load_certificates(path) if is_issued_by(cert, cert)]
            except PKIError:
                pass  # reported where the bundle itself is checked
        return roots

    def run(self) -> None:
        self.check_served()
        self.check_downstream()
        for index, route in enumerate(self.config.routes):
            self.check_route(index, route)
        for tcp_route in self.config.tcp_routes:
            self.check_tcp_route(tcp_route)
        if self.config.downstream_mtls.client_auth == "off":
            self.findings.warning("downstream_mtls: client certificates are not requested (client_auth off): the gateway only terminates TLS")
        if not self.config.routes and not self.config.tcp_routes:
            self.findings.warning("routes: none; every request will get 404")

    def _served_files(self) -> list[tuple[str, str, str | None]]:
        files = [(f"certificates[{i}]", spec.cert, spec.key) for i, spec in enumerate(self.config.certificates)]
        certs_dir = self.config.certs_dir
        if certs_dir is not None and os.path.isdir(certs_dir):
            files += [("certs_dir", os.path.join(certs_dir, name), None) for name in sorted(os.listdir(certs_dir)) if name.endswith(".pem")]
        return files

    def check_served(self) -> None:
        files = self._served_files()
        if not files and self.config.autocert is None:
            self.findings.error(f"certs_dir: {self.config.certs_dir}: no *.pem files, and no other certificate to serve")
        for key, cert_path, key_path in files:
            chain = self._load_served(key, cert_path, key_path)
            if chain is None:
                continue
            leaf = chain[0]
            self.certificate_rows.append([short_path(cert_path), served_names(leaf), issuer_label(leaf), days_left(leaf, self.now)])
            self.served_dns_names.update(name.lower() for name in Identity.from_certificate(leaf).dns_names)
            self._validity(f"{key}: {cert_path}", chain)
            self.findings.extend(chain_findings(f"{key}: {cert_path}", chain, self.roots))
            if _eku_lacks(leaf, "serverAuth"):
                self.findings.error(f"{key}: {cert_path}: not a server certificate (its extended key usage lacks serverAuth)")

    def _load_served(self, key: str, cert_path: str, key_path: str | None) -> list[x509.Certificate] | None:
        try:
            return load_key_and_chain(cert_path, key_path)[1]
        except PKIError as e:
            self.findings.error(f"{key}: {e}")
        try:
            leaf = load_certificates(cert_path)[0]
        except PKIError:
            return None
        self.certificate_rows.append([short_path(cert_path), served_names(leaf), issuer_label(leaf), "(unusable)"])
        return None

    def _validity(self, what: str, chain: Sequence[x509.Certificate]) -> None:
        for position, cert in enumerate(chain, 1):
            label = what if position == 1 else f"{what}: certificate #{position} ({_subject(cert)})"
            self.findings.extend(validity_findings(label, cert, self.now))

    def _bundle(self, key: str, path: str) -> list[x509.Certificate]:
        try:
            bundle = load_certificates(path)
        except PKIError as e:
            self.findings.error(f"{key}: {e}")
            return []
        for cert in bundle:
            if self.now >= cert.not_valid_after_utc:
                self.findings.warning(f"{key}: {path}: CA certificate {_subject(cert)} expired on {_date(cert.not_valid_after_utc)}")
        return bundle

    def check_downstream(self) -> None:
        mtls = self.config.downstream_mtls
        bundle = self._bundle("downstream_mtls.ca_file", mtls.ca_file) if mtls.ca_file else []
        if not mtls.crl_file:
            return
        try:
            crls = load_crls(mtls.crl_file)
        except PKIError as e:
            self.findings.error(f"downstream_mtls.crl_file: {e}")
            return
        for crl in crls:
            self._check_crl(mtls.crl_file, crl, bundle)
        for ca in bundle:
            if not any(crl.issuer == ca.subject for crl in crls):
                if mtls.crl_check == "chain":  # the gateway refuses to start (crl_check: chain)
                    self.findings.error(f"downstream_mtls.crl_file: {mtls.crl_file}: no CRL from {_subject(ca)}; crl_check: chain needs one from every CA")
                    continue
                self.findings.warning(
                    f"downstream_mtls.crl_file: {mtls.crl_file}: no CRL from {_subject(ca)}; "
                    "client certificates it issued directly will be refused (no CRL for issuer)"
                )

    def _check_crl(self, path: str, crl: x509.CertificateRevocationList, bundle: Sequence[x509.Certificate]) -> None:
        what = f"downstream_mtls.crl_file: {path}: the CRL from {printable(crl.issuer.rfc4514_string())}"
        next_update = crl.next_update_utc
        if next_update is not None and self.now >= next_update:
            self.findings.error(f"{what} expired on {_date(next_update)}: every client certificate it covers is refused")
        issuers = [ca for ca in bundle if ca.subject == crl.issuer]
        if not issuers:
            self.findings.warning(f"{what}: its issuer is not in downstream_mtls.ca_file")
        elif not any(crl.is_signature_valid(ca.public_key()) for ca in issuers):  # type: ignore[arg-type]
            self.findings.error(f"{what}: its signature does not verify with the CA in downstream_mtls.ca_file")

    def _upstream_tls_files(self, where: str, route: Route | TCPRoute, client_eku: bool) -> None:
        """
        A route's TLS files toward its upstreams (HTTP and TCP routes alike): the CA bundle, and the client certificate
        (loads with its key, valid now; with C{client_eku}, a warning when its extended key usage lacks clientAuth).
        Findings name the field after C{where}.
        """
        if route.tls_custom_ca_file:
            self._bundle(f"{where}tls_custom_ca_file", route.tls_custom_ca_file)
        if route.tls_client_cert_file:
            try:
                chain = load_key_and_chain(route.tls_client_cert_file, route.tls_client_key_file)[1]
            except PKIError as e:
                self.findings.error(f"{where}tls_client_cert_file: {e}")
            else:
                self._validity(f"{where}tls_client_cert_file: {route.tls_client_cert_file}", chain)
                if client_eku and _eku_lacks(chain[0], "clientAuth"):
                    self.findings.warning(f"{where}tls_client_cert_file: {route.tls_client_cert_file}"
                                          f": not a client certificate (its extended key usage lacks clientAuth)")

    def check_route(self, index: int, route: Route) -> None:
        key = f"routes[{index}]"
        self._upstream_tls_files(f"{key}.", route, client_eku=True)
        if route.tls_skip_verify:
            self.findings.warning(f"{key} ({route.name}): tls_skip_verify is on; the upstream's certificate is NOT verified")
        elif any(url.startswith("http://") for url in route.to):
            self.findings.warning(f"{key} ({route.name}): upstream over plain http://; traffic to it is not encrypted")

    def check_tcp_route(self, route: TCPRoute) -> None:
        """A TCP route: its upstream TLS files as an HTTP route's, and a served certificate for its name (SNI picks it)."""
        key = f"TCP route {route.name}"
        self._upstream_tls_files(f"{key}: ", route, client_eku=False)
        wildcard = "*." + route.host.split(".", 1)[1] if "." in route.host else None
        if self.config.autocert is None and route.host not in self.served_dns_names and wildcard not in self.served_dns_names:
            self.findings.warning(f"{key}: no served certificate carries {route.host}; clients asking for it get the default certificate"
                                  + (" (unknown_sni: reject refuses them)" if self.config.unknown_sni == "reject" else ""))
        if route.tls_skip_verify:
            self.findings.warning(f"{key}: tls_skip_verify is on; the upstream's certificate is NOT verified")
        elif any(url.startswith("tcp://") for url in route.to):
            self.findings.warning(f"{key}: upstream over plain tcp://; traffic to it is not encrypted")


def _downstream_summary(config: Config) -> str:
    mtls = config.downstream_mtls
    if mtls.client_auth == "off":
        return "client certificates not requested"
    parts = [f"client_auth {mtls.client_auth}", f"enforcement {mtls.enforcement}", f"CA {short_path(mtls.ca_file or '-')}"]
    parts.append(f"CRL {short_path(mtls.crl_file)}" if mtls.crl_file else "no CRL")
    return ", ".join(parts)


def _print_autocert(config: Config, out: TextIO) -> None:
    """The certificates autocert keeps: one row per certificate, its names, and its file in certs_dir (or not yet)."""
    from mtlsgate.acme.store import file_name_for

    autocert = config.autocert
    assert autocert is not None and config.certs_dir is not None
    print(f"autocert: {autocert.directory} into certs_dir {short_path(config.certs_dir)} (challenges {', '.join(autocert.challenges)}):", file=out)
    rows = []
    for names in autocert.domains:
        path = os.path.join(config.certs_dir, file_name_for(names[0]) + ".pem")
        rows.append([", ".join(names), short_path(path) if os.path.isfile(path) else "not issued yet"])
    for line in table_lines(["domains", "file"], rows):
        print("  " + line, file=out)


def report(checker: Checker, source: str, out: TextIO, err: TextIO) -> int:
    """Print the tables (C{out}), the findings (C{err}) and a summary line (C{out}); the exit status."""
    config = checker.config
    print("certificates:", file=out)
    for line in table_lines(["file", "names", "issuer", "days left"], checker.certificate_rows):
        print("  " + line, file=out)
    if config.autocert is not None:
        _print_autocert(config, out)
    print(f"downstream mTLS: {_downstream_summary(config)}", file=out)
    print(f"global allow_client: {config.allow_client.explain()}", file=out)
    print("routes:", file=out)
    for line in table_lines(ROUTE_HEADERS, route_rows(config.routes)):
        print("  " + line, file=out)
    if config.tcp_routes:
        print("TCP routes (picked by SNI on the TLS listener):", file=out)
        rows = [[r.name, ", ".join(r.to), r.allow_client.explain(), r.proxy_protocol or "-"] for r in config.tcp_routes]
        for line in table_lines(["route", "upstreams", "client rules", "PROXY"], rows):
            print("  " + line, file=out)
    out.flush()
    for level, message in checker.findings.lines:
        print(f"{level}: {message}", file=err)
    err.flush()
    findings = checker.findings
    if findings.errors:
        print(f"{source}: {findings.errors} error(s), {findings.warnings} warning(s)", file=out)
        return 1
    print(f"{source}: ok" + (f" ({findings.warnings} warning(s))" if findings.warnings else ""), file=out)
    return 0


def check(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    checker = Checker(config, datetime.now(timezone.utc))
    checker.run()
    return report(checker, args.config, sys.stdout, sys.stderr)


def add_parser(subparsers: Any) -> None:
    """C{mtlsgate check CONFIG}."""
    parser = subparsers.add_parser(
        "check", help="validate a config file and the files it names, without starting anything",
        description="Validate CONFIG as the gateway would load it, then every certificate, key, CA bundle and CRL it names.",
    )  # fmt: skip
    parser.add_argument("config", metavar="CONFIG", help="the YAML config file")
    parser.set_defaults(run=check)
