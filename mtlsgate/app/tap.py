"""
The twistd plugin's options and service maker: C{twistd -n mtlsgate --https tcp:8443 ...}.

Flags are turned into the same mapping a YAML file gives, laid over the file's (C{--config}), and
validated by the same code, so a flag and a key can never disagree.  Everything is loaded and checked
in L{Options.postOptions}: a bad value stops twistd with one line on stderr (C{mtlsgate: KEY: problem})
and exit status 1 before any port opens.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from twisted.python import usage

from mtlsgate.config.load import config_from_mapping, read_config_file
from mtlsgate.config.model import Config, ConfigError
from mtlsgate.tls.pki import PKIError

if TYPE_CHECKING:
    from mtlsgate.app.service import WorkerRole

# Which flags feed which top-level key, so errors can name the flag the user actually typed.
_FLAG_FOR_KEY = {
    "address": "--https",
    "http_address": "--http",
    "admin_address": "--admin",
    "certificates": "--cert/--key",
    "certs_dir": "--certs-dir",
    "downstream_mtls": "--client-ca/--crl/--crl-check/--client-auth/--enforcement/--max-verify-depth",
    "allow_client": "--allow-*",
    "routes": "--route/--upstream-*/--timeout",
    "access_log": "--access-log",
    "access_log_format": "--access-log-format",
    "strict_permissions": "--strict-permissions",
    "unknown_sni": "--unknown-sni",
    "autocert": "--acme-*",
    "workers": "--workers",
    "worker_affinity": "--worker-affinity",
}


def parse_route_flag(text: str) -> tuple[str, str, list[str]]:
    """C{HOST[/PREFIX]=URL[,URL...]} from C{--route}."""
    target, sep, urls = text.partition("=")
    if not sep or not target or not urls:
        raise usage.UsageError(f"--route {text!r}: expected HOST[/PREFIX]=URL[,URL...]")
    host, slash, prefix = target.partition("/")
    return host, "/" + prefix if slash else "/", [u.strip() for u in urls.split(",") if u.strip()]


def _holds_private_key(path: str) -> bool:
    """Whether a --cert file also holds its key (the txsni layout); an unreadable file is left to the loader's error."""
    try:
        with open(path, "rb") as f:
            return b"PRIVATE KEY-----" in f.read()
    except OSError:
        return True


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "A TLS and mutual-TLS gateway: terminates TLS for downstream clients, verifies their "
        "certificates, authorizes them per route, and proxies to upstreams over client-authenticated "
        "TLS.  Allow rules (--allow-*) have OR semantics: a client is admitted when ANY listed value "
        "matches its certificate; with none, any certificate that verified is admitted.  Flags given "
        "with --config override the file's keys."
    )

    optFlags = [
        ["upstream-skip-verify", None, "Do not verify upstream certificates (insecure; warned at start-up)."],
        ["preserve-host", None, "Send the client's Host header upstream instead of the upstream's."],
        ["strict-permissions", None, "Refuse private key files readable by group or others (default: warn)."],
    ]
    optParameters = [
        ["config", "c", None, "A YAML configuration file (see docs/configuration.md)."],
        ["https", None, None, "Endpoint for the TLS listener, without TLS [default: tcp:8443]."],
        ["http", None, None, "Endpoint for the plain-HTTP listener that redirects to HTTPS (308)."],
        ["admin", None, None, "Endpoint for the admin listener (loopback)."],
        ["certs-dir", None, None, "A directory of NAME.pem files (key + certificate + chain) to serve."],
        ["client-ca", None, None, "CA bundle that client certificates must chain to (enables mTLS)."],
        ["crl", None, None, "A CRL file (PEM or DER); revoked client certificates are refused."],
        ["crl-check", None, None, "chain (every certificate of the client's chain, the default) | leaf (the client's own only)."],
        ["client-auth", None, None, "require | optional | off [default: require when --client-ca is given]."],
        ["enforcement", None, None, "reject_connection (handshake alert) | policy (403 with the reason)."],
        ["max-verify-depth", None, None, "Maximum client certificate chain depth [default: 2].", int],
        ["upstream-ca", None, None, "CA bundle to verify upstreams with (replaces the system store)."],
        ["upstream-cert", None, None, "Client certificate (and chain) presented to upstreams."],
        ["upstream-key", None, None, "Private key of --upstream-cert."],
        ["upstream-server-name", None, None, "Name to send (SNI) and verify on upstream certificates."],
        ["timeout", None, None, "Upstream response timeout for --route routes, e.g. 30s."],
        ["access-log", None, None, "Write access lines to this file ('-' for stdout)."],
        ["access-log-format", None, None, "combined (the default) | json."],
        ["unknown-sni", None, None, "default (serve the first certificate) | reject (unrecognized_name alert)."],
        ["demo", None, None, "Run the self-contained demo in this directory (see 'mtlsgate demo')."],
        ["acme-directory", None, None, "ACME directory URL (or letsencrypt, letsencrypt-staging): enables autocert."],
        ["acme-email", None, None, "Contact email for the ACME account."],
        ["acme-ca-file", None, None, "CA bundle to trust for the ACME server's HTTPS (private CAs, pebble)."],
        ["acme-dns-hook", None, None, "Executable run as HOOK add|remove FQDN VALUE for dns-01."],
        ["workers", None, None, "Processes serving the TLS listener: a number, or auto (one per core) [default: 1]."],
        ["worker-affinity", None, None, "connection (the default) | client_ip: every connection of a client reaches one worker."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["cert"] = []
        self["key"] = []
        self["route"] = []
        self["acme-domain"] = []
        for name in ("cn", "ou", "dns", "uri", "email", "fingerprint"):
            self[f"allow-{name}"] = []
        self.config: Config | None = None
        #: Set by L{mtlsgate.app.worker}: this process is one worker of a group.
        self.worker: WorkerRole | None = None

    def parseOptions(self, options: list[str] | None = None) -> None:
        """One line for a usage error, not twistd's whole usage text."""
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            if self.worker is not None:
                raise
            # twistd would print its whole usage text before the error: one line is what the docs promise.
            raise SystemExit(f"mtlsgate: {e} (see twistd mtlsgate --help)") from None

    def opt_version(self) -> None:
        """Display mtlsgate's and Twisted's versions and exit."""
        from twisted import copyright

        from mtlsgate.version import version

        print(f"mtlsgate {version()}")
        print("Twisted version:", copyright.version)
        sys.exit(0)

    def opt_cert(self, path: str) -> None:
        """A certificate file (leaf + chain) to serve; repeatable, the first is the default."""
        self["cert"].append(path)

    def opt_key(self, path: str) -> None:
        """The private key of the --cert at the same position; repeatable."""
        self["key"].append(path)

    def opt_route(self, text: str) -> None:
        """HOST[/PREFIX]=URL[,URL...]: route a host (or *.domain) and path prefix to upstreams; repeatable."""
        self["route"].append(parse_route_flag(text))

    def opt_acme_domain(self, names: str) -> None:
        """NAME[,NAME...]: one certificate from the ACME CA for these names; repeatable."""
        self["acme-domain"].append([n.strip() for n in names.split(",") if n.strip()])

    def opt_allow_cn(self, value: str) -> None:
        """Admit client certificates with this subject CN; repeatable."""
        self["allow-cn"].append(value)

    def opt_allow_ou(self, value: str) -> None:
        """Admit client certificates with this subject OU; repeatable."""
        self["allow-ou"].append(value)

    def opt_allow_dns(self, value: str) -> None:
        """Admit client certificates with this DNS SAN; repeatable."""
        self["allow-dns"].append(value)

    def opt_allow_uri(self, value: str) -> None:
        """Admit client certificates with this URI SAN (e.g. a SPIFFE ID); repeatable."""
        self["allow-uri"].append(value)

    def opt_allow_email(self, value: str) -> None:
        """Admit client certificates with this email SAN; repeatable."""
        self["allow-email"].append(value)

    def opt_allow_fingerprint(self, value: str) -> None:
        """Admit the client certificate with this SHA-256 fingerprint (hex); repeatable."""
        self["allow-fingerprint"].append(value)

    def overlay(self, data: dict[str, Any]) -> tuple[dict[str, Any], set[str]]:
        """Lay the flags over a config mapping; returns the mapping and the keys flags set."""
        data = dict(data)
        flagged: set[str] = set()

        def put(key: str, value: Any) -> None:
            data[key] = value
            flagged.add(key)

        for flag, key in (("https", "address"), ("http", "http_address"), ("admin", "admin_address"),
                          ("certs-dir", "certs_dir"), ("access-log", "access_log"),
                          ("access-log-format", "access_log_format"), ("worker-affinity", "worker_affinity"),
                          ("unknown-sni", "unknown_sni")):  # fmt: skip
            if self[flag] is not None:
                put(key, self[flag])
        if self["cert"] or self["key"]:
            if len(self["key"]) > len(self["cert"]):
                raise usage.UsageError("--key given without a matching --cert")
            keys = self["key"] + [None] * (len(self["cert"]) - len(self["key"]))
            for i, (cert, key) in enumerate(zip(self["cert"], keys)):
                if key is None and not _holds_private_key(cert):
                    raise ConfigError(f"certificates[{i}].key", f"{cert} holds no private key: pass --key KEYFILE after its --cert")
            put("certificates", [{"cert": c, "key": k} if k else {"cert": c} for c, k in zip(self["cert"], keys)])
        mtls = dict(data.get("downstream_mtls") or {})
        for flag, key in (("client-ca", "ca_file"), ("crl", "crl_file"), ("client-auth", "client_auth"),
                          ("enforcement", "enforcement"), ("max-verify-depth", "max_verify_depth"), ("crl-check", "crl_check")):  # fmt: skip
            if self[flag] is not None:
                mtls[key] = self[flag]
                flagged.add("downstream_mtls")
        if mtls:
            data["downstream_mtls"] = mtls
        allow = {name: self[f"allow-{flag}"] for name, flag in (
            ("cn", "cn"), ("ou", "ou"), ("dns", "dns"), ("uri", "uri"), ("email", "email"), ("fingerprint_sha256", "fingerprint"))
            if self[f"allow-{flag}"]}  # fmt: skip
        if allow:
            put("allow_client", allow)
        if self["strict-permissions"]:
            put("strict_permissions", True)
        if self["workers"] is not None:
            put("workers", int(self["workers"]) if self["workers"].isdigit() else self["workers"])
        if self["route"]:
            put("routes", [self._route(host, prefix, urls) for host, prefix, urls in self["route"]])
        autocert = dict(data.get("autocert") or {})
        for flag, key in (("acme-directory", "directory"), ("acme-email", "email"), ("acme-ca-file", "ca_file"),
                          ("acme-dns-hook", "dns_hook")):  # fmt: skip
            if self[flag] is not None:
                autocert[key] = self[flag]
                flagged.add("autocert")
        if self["acme-domain"]:
            autocert["domains"] = [group[0] if len(group) == 1 else group for group in self["acme-domain"]]
            flagged.add("autocert")
        if autocert:
            data["autocert"] = autocert
        return data, flagged

    def _route(self, host: str, prefix: str, urls: list[str]) -> dict[str, Any]:
        route: dict[str, Any] = {"from": host if host == "*" else "https://" + host, "prefix": prefix, "to": urls}
        for flag, key in (("upstream-ca", "tls_custom_ca_file"), ("upstream-cert", "tls_client_cert_file"),
                          ("upstream-key", "tls_client_key_file"), ("upstream-server-name", "tls_server_name"),
                          ("timeout", "timeout")):  # fmt: skip
            if self[flag] is not None:
                route[key] = self[flag]
        if self["upstream-skip-verify"]:
            route["tls_skip_verify"] = True
        if self["preserve-host"]:
            route["preserve_host_header"] = True
        return route

    def load(self) -> Config:
        """The validated configuration from --config and the flags (re-run on every reload)."""
        return self.load_document()[0]

    def load_document(self) -> tuple[Config, dict[str, Any]]:
        """
        The validated configuration, and the plain document it was validated from: the YAML file's
        mapping with the flags laid over it, the flag that set each key, and the file.  A worker group's
        parent hands that document to its workers, which validate it again (L{mtlsgate.app.handoff.load})
        with the same errors, without yaml or these options.
        """
        flagged: set[str] = set()
        try:
            data, keys = self.overlay(read_config_file(self["config"]) if self["config"] else {})
            flagged.update(keys)
            config = config_from_mapping(data, source=self["config"])
        except ConfigError as e:
            top = e.key.split(".", 1)[0].split("[", 1)[0]
            if top in flagged:
                raise ConfigError(e.key, f"{e.problem} (set by {_FLAG_FOR_KEY.get(top, 'a flag')})") from None
            raise
        return config, {"config": data, "flags": {key: _FLAG_FOR_KEY.get(key, "a flag") for key in sorted(flagged)}, "source": self["config"]}

    def postOptions(self) -> None:
        if self["demo"] is not None:
            return
        try:
            self.config, document = self.load_document()
            from twisted.application.service import IService

            from mtlsgate.app.service import build_world, make_gateway
            from mtlsgate.reactors import installed_reactor

            reactor = installed_reactor()

            self.service: IService
            if self.config.workers > 1 and self.worker is None:
                from mtlsgate.tls.server import ServerTLS
                from mtlsgate.app.workers import WorkerGroup

                build_world(reactor, self.config, ServerTLS())  # every file loads, before any worker starts
                self.service = WorkerGroup(reactor, self.config, document, self.load_document)
            else:
                self.service = make_gateway(reactor, self.config, self.load, self.worker)
        except (ConfigError, PKIError) as e:
            if self.worker is not None:
                raise usage.UsageError(str(e)) from None
            # One line on stderr and a non-zero exit, without twistd's usage text (it prints that for a UsageError).
            raise SystemExit(f"mtlsgate: {e}") from None


def makeService(options: Options) -> Any:
    """The twistd entry point: the gateway service built (and validated) in postOptions."""
    if options["demo"] is not None:
        from mtlsgate.app.demo import make_demo_service
        from mtlsgate.reactors import installed_reactor

        return make_demo_service(installed_reactor(), options["demo"])
    from mtlsgate.app.memory import settle_when_running
    from mtlsgate.reactors import installed_reactor

    settle_when_running(installed_reactor())  # the twistd process: a single gateway, or a worker group's parent
    return options.service
