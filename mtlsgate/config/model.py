"""
The configuration as values: what every layer of the gateway reads (Config, Route, Limits, ...).
Frozen attrs classes, built only by L{mtlsgate.config.load}; this module sits at the bottom of the
house and imports nothing of the gateway but the identity value classes its allow-rules are made of.
"""

from __future__ import annotations

import attrs

from mtlsgate.identity import AllowRules


class ConfigError(Exception):
    """
    A configuration problem: C{key} is the dotted path of the offending key, C{problem} says what is
    wrong with it.
    """

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}" if key else problem)
        self.key = key
        self.problem = problem


@attrs.frozen
class CertificateSpec:
    """A served certificate: C{cert} holds the leaf and its chain; C{key} may be None when the key is in C{cert}."""

    cert: str
    key: str | None = None


@attrs.frozen
class DownstreamMTLS:
    """How downstream clients authenticate with certificates."""

    ca_file: str | None = None
    crl_file: str | None = None
    enforcement: str = "reject_connection"  # or "policy"
    max_verify_depth: int = 2
    client_auth: str = "off"  # "require", "optional" or "off"
    crl_check: str = "chain"  # "chain": every certificate of the client's chain; "leaf": the client's certificate only


#: The gRPC health service's method (grpc.health.v1.Health/Check): a C{grpc: true} health check's default path.
GRPC_HEALTH_PATH = "/grpc.health.v1.Health/Check"


@attrs.frozen
class HealthCheck:
    """Active health checks of a route's upstreams (nginx's health_check, Caddy's health_uri)."""

    path: str = "/"
    interval: float = 5.0
    timeout: float = 2.0
    unhealthy_threshold: int = 2  # failed checks in a row that take an upstream out of rotation
    healthy_threshold: int = 1  # passed checks in a row that bring it back
    grpc: bool = False  # the gRPC health service (grpc.health.v1.Health/Check) instead of GET path; path defaults to its method


@attrs.frozen
class Route:
    """One entry of the route table and everything needed to reach its upstreams."""

    host: str  # lower case; "*.example.com" for a wildcard, "*" for any host
    prefix: str = "/"
    to: tuple[str, ...] = ()
    tls_custom_ca_file: str | None = None
    tls_client_cert_file: str | None = None
    tls_client_key_file: str | None = None
    tls_server_name: str | None = None
    tls_skip_verify: bool = False
    allow_client: AllowRules = AllowRules()
    forward_client_cert: str = "xfcc"  # or "none"
    preserve_host_header: bool = False
    timeout: float = 30.0
    connect_timeout: float = 10.0
    max_body_size: int | None = None  # bytes; None: unlimited
    max_response_header_size: int = 65536  # the upstream's status line and headers (502 beyond)
    health_check: HealthCheck | None = None
    upstream_protocol: str = "http1"  # or "http2" (ALPN h2; gRPC upstreams): docs/configuration.md
    allow_websockets: bool = False  # forward WebSocket upgrades (Pomerium's key); without it they get 403
    websocket_idle_timeout: float = 300.0  # a WebSocket tunnel with no byte either way for this long is closed

    @property
    def name(self) -> str:
        """A short label for logs and metrics."""
        return self.host + self.prefix


@attrs.frozen
class TCPRoute:
    """
    A TCP route (C{from: tcp+https://HOST[:PORT]}): a TLS connection whose SNI names C{host} is not
    served as HTTP; once its client certificate and the allow rules admit it, its bytes are piped to
    one of C{to} (C{tcp://HOST:PORT} or C{tls://HOST:PORT}).  See mtlsgate.proxy.tcp.
    """

    host: str  # lower case, an exact DNS name (SNI carries names only)
    port: int | None = None  # the service port of Pomerium's form: part of the route's name, not a listener
    to: tuple[str, ...] = ()  # tcp://HOST:PORT or tls://HOST:PORT
    tls_custom_ca_file: str | None = None
    tls_client_cert_file: str | None = None
    tls_client_key_file: str | None = None
    tls_server_name: str | None = None
    tls_skip_verify: bool = False
    allow_client: AllowRules = AllowRules()
    connect_timeout: float = 10.0  # TCP connect plus, for tls://, the upstream TLS handshake
    idle_timeout: float = 600.0  # no byte either way for this long closes the tunnel (nginx stream's proxy_timeout)
    max_connections: int | None = None  # open tunnels on this route; None: only the listener's max_connections
    proxy_protocol: str | None = None  # "v2": a PROXY protocol v2 header (client address, identity TLVs) first
    alpn: tuple[str, ...] = ()  # ALPN protocols this route accepts from clients (e.g. postgresql); none: no ALPN

    @property
    def name(self) -> str:
        """A short label for logs and metrics: C{db.example.com:5432}."""
        return self.host if self.port is None else f"{self.host}:{self.port}"


@attrs.frozen
class Limits:
    """Bounds on every phase of a client connection (nginx's timeouts and buffer limits)."""

    handshake_timeout: float = 10.0
    header_timeout: float = 10.0  # from a request's first byte to the end of its headers
    idle_timeout: float = 60.0  # no bytes in either direction on a connection between/within requests
    max_connections: int = 10000
    max_header_count: int = 100
    max_line_length: int = 8192  # the request line (414 beyond) and each header line (431 beyond)
    max_header_size: int = 32768  # request line plus all headers (431 beyond)
    shutdown_timeout: float = 30.0  # on SIGTERM, how long requests in flight may take to finish


@attrs.frozen
class HSTS:
    """Strict-Transport-Security on HTTPS responses (unless the upstream set its own)."""

    max_age: int = 31536000
    include_subdomains: bool = False
    preload: bool = False

    def header(self) -> bytes:
        value = f"max-age={self.max_age}"
        if self.include_subdomains:
            value += "; includeSubDomains"
        if self.preload:
            value += "; preload"
        return value.encode("ascii")


CHALLENGE_TYPES = ("tls-alpn-01", "http-01", "dns-01")


@attrs.frozen
class Autocert:
    """Certificates from an ACME CA (RFC 8555), stored in C{certs_dir}."""

    directory: str
    domains: tuple[tuple[str, ...], ...]  # one tuple of names per certificate
    email: str | None = None
    challenges: tuple[str, ...] = ("tls-alpn-01", "http-01", "dns-01")
    dns_hook: str | None = None
    dns_resolver: tuple[str, int] | None = None
    ca_file: str | None = None
    eab: tuple[str, str] | None = None  # (key_id, base64url HMAC key)
    renew_before: float | None = None  # None: 30 days, or a third of the lifetime if that is shorter
    key_type: str = "ecdsa"  # or "rsa"
    check_interval: float = 12 * 3600.0
    retry_interval: float = 60.0  # the first back-off after a failure; doubles up to a day
    propagation_timeout: float = 120.0


@attrs.frozen
class Storage:
    """A shared store for a cluster of gateways (docs/cluster.md): Redis at C{url}."""

    url: str  # redis://HOST:PORT/DB or rediss://HOST:PORT/DB (TLS)
    key_file: str  # the key that seals private keys at rest (base64 of 32 bytes)
    password_file: str | None = None
    password_env: str | None = None
    username: str | None = None  # a Redis ACL user (from the URL: redis://USER@HOST)
    ca_file: str | None = None  # rediss://: trust for the server's certificate (default: the system's)
    cert: str | None = None  # rediss://: the client certificate (and key) to present
    key: str | None = None
    lease: float = 30.0  # how long the issuance lock lives without renewal
    sync_interval: float = 30.0  # reconciliation with the store, beside pub/sub notifications
    timeout: float = 5.0  # per command


@attrs.frozen
class Config:
    """The whole gateway configuration."""

    address: str = "tcp:8443"
    http_address: str | None = None
    admin_address: str | None = None
    certificates: tuple[CertificateSpec, ...] = ()
    certs_dir: str | None = None
    downstream_mtls: DownstreamMTLS = DownstreamMTLS()
    allow_client: AllowRules = AllowRules()
    routes: tuple[Route, ...] = ()
    tcp_routes: tuple[TCPRoute, ...] = ()  # the routes given as from: tcp+https://...
    access_log: str | None = None  # a file path, "-" for stdout, "off", or None for the twistd log only
    access_log_format: str = "combined"  # or "json"
    watch_interval: float | None = 5.0  # None: reload on SIGHUP only
    session_ticket_rotation: float | None = 12 * 3600.0  # None: a ticket key lives until the next reload
    limits: Limits = Limits()
    hsts: HSTS | None = HSTS()
    strict_permissions: bool = False  # refuse (rather than warn about) private keys readable by others
    unknown_sni: str = "default"  # or "reject": fail handshakes for names no certificate carries
    http2: bool = True  # ALPN offers h2 (then http/1.1): HTTP/2 clients get the HTTP/2 front end
    autocert: Autocert | None = None
    storage: Storage | None = None  # certificates, ACME and revocation shared through Redis
    workers: int = 1  # processes serving the TLS listener (nginx's worker_processes)
    worker_affinity: str = "connection"  # or "client_ip": a client's connections all reach one worker
    worker_bytecode: str | None = None  # a directory: workers run as python -OO on bytecode the parent compiles there
    websocket_idle_timeout: float = 300.0  # the default of the routes' websocket_idle_timeout
    source: str | None = attrs.field(default=None, eq=False)  # the YAML file it came from


# --- small typed readers -------------------------------------------------------------------------
