"""
The typed configuration: attrs value classes, built from a plain mapping (YAML or twistd flags).

Every problem is reported as a L{ConfigError} that names the key (``routes[1].to[0]``) and the
problem, so that ``twistd`` can refuse to start before any port is opened.  Unknown keys are errors
too: a typo must never pass silently.
"""

from __future__ import annotations

import ipaddress
import os
import re
from typing import Any, Callable, Mapping, Sequence
from urllib.parse import urlsplit

import attrs

from mtlsgate.identity import AllowRules
from mtlsgate.http.pathnorm import prefix_problem
from mtlsgate.app.sockets import parse_tcp_listen
from mtlsgate.config.model import (
    GRPC_HEALTH_PATH, Autocert, CHALLENGE_TYPES, CertificateSpec, Config, ConfigError, DownstreamMTLS, HSTS, HealthCheck, Limits, Route, Storage, TCPRoute,
)  # fmt: skip


def _check_keys(data: Mapping[str, Any], where: str, allowed: Sequence[str]) -> None:
    if not isinstance(data, Mapping):
        raise ConfigError(where, f"expected a mapping, got {type(data).__name__}")
    for key in data:
        if key not in allowed:
            import difflib  # only for an error: not in every process's memory

            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(_join(where, str(key)), f"unknown key{hint}")


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _string(value: Any, key: str, optional: bool = True) -> str | None:
    if value is None:
        if optional:
            return None
        raise ConfigError(key, "is required")
    if not isinstance(value, str) or not value:
        raise ConfigError(key, f"expected a non-empty string, got {value!r}")
    return value


def _boolean(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, f"expected true or false, got {value!r}")
    return value


def _off(value: Any) -> Any:
    """YAML 1.1 reads a bare C{off}, C{no} or C{false} as the boolean false: for keys that take C{off}, they all mean C{off}."""
    return "off" if value is False else value


def _choice(value: Any, key: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ConfigError(key, f"expected one of {', '.join(choices)}, got {value!r}")
    return value


def _string_list(value: Any, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(key, f"expected a list of strings, got {value!r}")
    return tuple(_string(item, f"{key}[{i}]", optional=False) for i, item in enumerate(value))  # type: ignore[misc]


def _readable_file(value: Any, key: str, optional: bool = True) -> str | None:
    path = _string(value, key, optional)
    if path is None:
        return None
    if not os.path.isfile(path):
        raise ConfigError(key, f"{path}: no such file")
    if not os.access(path, os.R_OK):
        raise ConfigError(key, f"{path}: not readable")
    return path


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(value: Any, key: str) -> float:
    """Seconds from C{30}, C{"30s"}, C{"500ms"}, C{"5m"}, C{"1h"} or C{"30d"}."""
    if isinstance(value, bool):
        raise ConfigError(key, f"expected a duration like 30s, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ConfigError(key, f"expected a duration like 30s, 500ms, 5m, 1h or 30d, got {value!r}")
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds <= 0:
        raise ConfigError(key, f"must be positive, got {value!r}")
    return seconds


def _endpoint(value: Any, key: str, optional: bool = True) -> str | None:
    description = _string(value, key, optional)
    if description is None:
        return None
    if description.split(":", 1)[0] in ("ssl", "tls", "mtls"):
        raise ConfigError(key, f"give a plain endpoint such as tcp:8443; mtlsgate adds TLS itself, got {description!r}")
    return description


def _ip_endpoint(value: Any, key: str) -> str:
    """
    The TLS listener's endpoint: client identity, X-Forwarded-For, the access log and worker
    affinity all need an IP peer, so a UNIX socket is refused here rather than failing every request.
    """
    description = _endpoint(value, key, optional=False)
    assert description is not None
    if description.split(":", 1)[0].strip().lower() == "unix":
        raise ConfigError(key, f"a UNIX socket is not supported for the TLS listener (clients are identified by IP address)"
                          f"; use tcp: or tcp6:, got {description!r}")
    return description


# --- sections ----------------------------------------------------------------------------------

_ALLOW_KEYS = ("cn", "ou", "dns", "uri", "email", "fingerprint_sha256")


def _allow_rules(data: Any, key: str) -> AllowRules:
    if data is None:
        return AllowRules()
    _check_keys(data, key, _ALLOW_KEYS)
    lists = {name: _string_list(data.get(name), _join(key, name)) for name in _ALLOW_KEYS}
    for i, fingerprint in enumerate(lists["fingerprint_sha256"]):
        if not re.fullmatch(r"[0-9a-fA-F]{64}", fingerprint.replace(":", "").replace(" ", "")):
            raise ConfigError(f"{key}.fingerprint_sha256[{i}]", f"expected 64 hex digits (colons allowed), got {fingerprint!r}")
    return AllowRules.from_lists(**lists)


def _certificates(data: Any, key: str) -> tuple[CertificateSpec, ...]:
    if data is None:
        return ()
    if not isinstance(data, list):
        raise ConfigError(key, "expected a list of {cert: FILE, key: FILE}")
    specs = []
    for i, item in enumerate(data):
        where = f"{key}[{i}]"
        _check_keys(item, where, ("cert", "key"))
        cert = _readable_file(item.get("cert"), f"{where}.cert", optional=False)
        specs.append(CertificateSpec(cert=cert, key=_readable_file(item.get("key"), f"{where}.key")))  # type: ignore[arg-type]
    return tuple(specs)


_DOWNSTREAM_MTLS_KEYS = ("ca_file", "crl_file", "enforcement", "max_verify_depth", "client_auth", "crl_check")


def _downstream_mtls(data: Any, key: str) -> DownstreamMTLS:
    if data is None:
        return DownstreamMTLS()
    _check_keys(data, key, _DOWNSTREAM_MTLS_KEYS)
    ca_file = _readable_file(data.get("ca_file"), f"{key}.ca_file")
    default_auth = "require" if ca_file else "off"
    client_auth = _choice(_off(data.get("client_auth", default_auth)), f"{key}.client_auth", ("require", "optional", "off"))
    if client_auth != "off" and ca_file is None:
        raise ConfigError(f"{key}.ca_file", f"is required when client_auth is {client_auth}")
    depth = data.get("max_verify_depth", 2)
    if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= 16:
        raise ConfigError(f"{key}.max_verify_depth", f"expected an integer from 1 to 16, got {depth!r}")
    return DownstreamMTLS(
        ca_file=ca_file,
        crl_file=_readable_file(data.get("crl_file"), f"{key}.crl_file"),
        enforcement=_choice(data.get("enforcement", "reject_connection"), f"{key}.enforcement", ("reject_connection", "policy")),
        max_verify_depth=depth,
        client_auth=client_auth,
        crl_check=_choice(data.get("crl_check", "chain"), f"{key}.crl_check", ("chain", "leaf")),
    )


_ROUTE_KEYS = (
    "from", "prefix", "to", "tls_custom_ca_file", "tls_client_cert_file", "tls_client_key_file",
    "tls_server_name", "tls_skip_verify", "allow_client", "forward_client_cert",
    "preserve_host_header", "timeout", "connect_timeout", "max_body_size", "max_response_header_size",
    "health_check", "upstream_protocol", "allow_websockets", "websocket_idle_timeout",
)  # fmt: skip

_HEALTH_CHECK_KEYS = ("path", "interval", "timeout", "unhealthy_threshold", "healthy_threshold", "grpc")


def _health_check(data: Any, key: str) -> HealthCheck | None:
    if data is None:
        return None
    _check_keys(data, key, _HEALTH_CHECK_KEYS)
    grpc = _boolean(data.get("grpc", False), f"{key}.grpc")
    path = _string(data.get("path", GRPC_HEALTH_PATH if grpc else "/"), f"{key}.path", optional=False)
    assert path is not None
    if not path.startswith("/") or any(c in path for c in " \r\n#"):
        raise ConfigError(f"{key}.path", f"expected a path starting with '/' (a query is allowed), got {path!r}")
    return HealthCheck(
        path=path,
        interval=parse_duration(data.get("interval", "5s"), f"{key}.interval"),
        timeout=parse_duration(data.get("timeout", "2s"), f"{key}.timeout"),
        unhealthy_threshold=_count(data.get("unhealthy_threshold", 2), f"{key}.unhealthy_threshold"),
        healthy_threshold=_count(data.get("healthy_threshold", 1), f"{key}.healthy_threshold"),
        grpc=grpc,
    )


def parse_from(value: Any, key: str) -> str:
    """The host of a route's C{from}: C{https://app.example.com}, C{https://*.example.com} or C{*}."""
    text = _string(value, key, optional=False)
    assert text is not None
    if text == "*":
        return "*"
    if "://" not in text:
        text = "https://" + text
    parts = urlsplit(text)
    if parts.scheme != "https" or not parts.hostname or parts.path not in ("", "/") or parts.query:
        raise ConfigError(key, f"expected https://HOST or https://*.DOMAIN (use 'prefix' for paths), got {value!r}")
    host = parts.hostname.lower()
    if "*" in host and not (host.startswith("*.") and "*" not in host[2:]):
        raise ConfigError(key, f"a wildcard may only be the whole leftmost label (*.example.com), got {value!r}")
    return host


def parse_upstream_url(value: Any, key: str) -> str:
    """An upstream URL: C{http://} or C{https://} with a host, no query or fragment."""
    text = _string(value, key, optional=False)
    assert text is not None
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ConfigError(key, f"expected an http:// or https:// URL with a host, got {value!r}")
    try:
        parts.port
    except ValueError:
        raise ConfigError(key, f"bad port in {value!r}") from None
    return text.rstrip("/")


def _upstreams(targets: Any, key: str, parse: Callable[[Any, str], str], expected: str) -> tuple[str, ...]:
    """A route's C{to}: one upstream or a non-empty list of them, each checked by C{parse} (HTTP and TCP routes alike)."""
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, list) or not targets:
        raise ConfigError(key, expected)
    return tuple(parse(url, f"{key}[{i}]") for i, url in enumerate(targets))


def _client_cert(data: Any, key: str) -> tuple[str | None, str | None]:
    """A route's client certificate and key files toward its upstreams (readable; a key only with a certificate)."""
    cert = _readable_file(data.get("tls_client_cert_file"), f"{key}.tls_client_cert_file")
    client_key = _readable_file(data.get("tls_client_key_file"), f"{key}.tls_client_key_file")
    if client_key and not cert:
        raise ConfigError(f"{key}.tls_client_key_file", "given without tls_client_cert_file")
    return cert, client_key


def _route(data: Any, key: str, websocket_idle_timeout: float = 300.0) -> Route:
    _check_keys(data, key, _ROUTE_KEYS)
    prefix = _string(data.get("prefix", "/"), f"{key}.prefix", optional=False)
    assert prefix is not None
    if not prefix.startswith("/"):
        raise ConfigError(f"{key}.prefix", f"must start with '/', got {prefix!r}")
    if (problem := prefix_problem(prefix)) is not None:  # a prefix no normal request path can match
        raise ConfigError(f"{key}.prefix", f"{prefix!r}: {problem}")
    to = _upstreams(data.get("to"), f"{key}.to", parse_upstream_url, "expected one upstream URL or a non-empty list of them")
    cert, client_key = _client_cert(data, key)
    protocol = _choice(data.get("upstream_protocol", "http1"), f"{key}.upstream_protocol", ("http1", "http2"))
    health_check = _health_check(data.get("health_check"), f"{key}.health_check")
    allow_websockets = _boolean(data.get("allow_websockets", False), f"{key}.allow_websockets")
    if allow_websockets and protocol == "http2":
        raise ConfigError(f"{key}.allow_websockets", "WebSockets need an HTTP/1.1 upstream (WebSockets over HTTP/2, RFC 8441, is not supported)")
    if health_check is not None and health_check.grpc and protocol != "http2":
        raise ConfigError(f"{key}.health_check.grpc", "gRPC health checks need upstream_protocol: http2")
    return Route(
        host=parse_from(data.get("from"), f"{key}.from"),
        prefix=prefix,
        to=to,
        tls_custom_ca_file=_readable_file(data.get("tls_custom_ca_file"), f"{key}.tls_custom_ca_file"),
        tls_client_cert_file=cert,
        tls_client_key_file=client_key,
        tls_server_name=_string(data.get("tls_server_name"), f"{key}.tls_server_name"),
        tls_skip_verify=_boolean(data.get("tls_skip_verify", False), f"{key}.tls_skip_verify"),
        allow_client=_allow_rules(data.get("allow_client"), f"{key}.allow_client"),
        forward_client_cert=_choice(data.get("forward_client_cert", "xfcc"), f"{key}.forward_client_cert", ("xfcc", "none")),
        preserve_host_header=_boolean(data.get("preserve_host_header", False), f"{key}.preserve_host_header"),
        timeout=parse_duration(data.get("timeout", 30), f"{key}.timeout"),
        connect_timeout=parse_duration(data.get("connect_timeout", 10), f"{key}.connect_timeout"),
        max_body_size=None if data.get("max_body_size") is None else parse_size(data["max_body_size"], f"{key}.max_body_size"),
        max_response_header_size=parse_size(data.get("max_response_header_size", "64k"), f"{key}.max_response_header_size"),
        health_check=health_check,
        upstream_protocol=protocol,
        allow_websockets=allow_websockets,
        websocket_idle_timeout=parse_duration(data.get("websocket_idle_timeout", websocket_idle_timeout), f"{key}.websocket_idle_timeout"),
    )


_TCP_ROUTE_KEYS = (
    "from", "to", "tls_custom_ca_file", "tls_client_cert_file", "tls_client_key_file", "tls_server_name", "tls_skip_verify",
    "allow_client", "connect_timeout", "idle_timeout", "max_connections", "proxy_protocol", "alpn",
)  # fmt: skip

TCP_SCHEME = "tcp+https://"


def is_tcp_route(data: Any) -> bool:
    """Whether a C{routes:} entry is a TCP route (C{from: tcp+https://...})."""
    return isinstance(data, Mapping) and isinstance(data.get("from"), str) and data["from"].lower().startswith(TCP_SCHEME)


def _parse_tcp_from(value: Any, key: str) -> tuple[str, int | None]:
    """C{tcp+https://db.example.com:5432}: the exact DNS name SNI must carry, and the optional service port."""
    text = _string(value, key, optional=False)
    assert text is not None
    parts = urlsplit("https://" + text[len(TCP_SCHEME):])
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(key, f"bad port in {value!r}") from None
    if not parts.hostname or parts.path not in ("", "/") or parts.query or parts.fragment or parts.username is not None:
        raise ConfigError(key, f"expected tcp+https://HOST or tcp+https://HOST:PORT, got {value!r}")
    host = parts.hostname.lower().rstrip(".")
    if "*" in host:
        raise ConfigError(key, f"a TCP route names one exact host (SNI picks it); wildcards are not supported, got {value!r}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        raise ConfigError(key, f"a TCP route is picked by SNI, which carries DNS names only, not IP addresses; got {value!r}")
    if len(host) > 253 or not all(_LABEL.match(label) for label in host.split(".")):
        raise ConfigError(key, f"not a valid DNS name (letters, digits, '-' and dots), as SNI carries it: {value!r}")
    return host, port


def parse_tcp_upstream(value: Any, key: str) -> str:
    """A TCP route's upstream: C{tcp://HOST:PORT} (plain) or C{tls://HOST:PORT}."""
    text = _string(value, key, optional=False)
    assert text is not None
    parts = urlsplit(text)
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(key, f"bad port in {value!r}") from None
    if parts.scheme not in ("tcp", "tls") or not parts.hostname or port is None or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(key, f"expected tcp://HOST:PORT or tls://HOST:PORT, got {value!r}")
    return f"{parts.scheme}://{parts.netloc}"


def _tcp_route(data: Any, key: str) -> TCPRoute:
    _check_keys(data, key, _TCP_ROUTE_KEYS)
    host, port = _parse_tcp_from(data.get("from"), f"{key}.from")
    to = _upstreams(data.get("to"), f"{key}.to", parse_tcp_upstream, "expected one upstream (tcp://HOST:PORT or tls://HOST:PORT) or a non-empty list of them")
    cert, client_key = _client_cert(data, key)
    if not any(url.startswith("tls://") for url in to):
        for name in ("tls_custom_ca_file", "tls_client_cert_file", "tls_client_key_file", "tls_server_name", "tls_skip_verify"):
            if name in data:
                raise ConfigError(f"{key}.{name}", "applies to tls:// upstreams, and this route has none")
    proxy_protocol = _off(data.get("proxy_protocol", "off"))
    max_connections = data.get("max_connections")
    alpn = _string_list(data.get("alpn"), f"{key}.alpn")
    for i, protocol in enumerate(alpn):
        if len(protocol.encode("utf-8")) > 255:
            raise ConfigError(f"{key}.alpn[{i}]", "an ALPN protocol name is at most 255 bytes")
    return TCPRoute(
        host=host,
        port=port,
        to=to,
        tls_custom_ca_file=_readable_file(data.get("tls_custom_ca_file"), f"{key}.tls_custom_ca_file"),
        tls_client_cert_file=cert,
        tls_client_key_file=client_key,
        tls_server_name=_string(data.get("tls_server_name"), f"{key}.tls_server_name"),
        tls_skip_verify=_boolean(data.get("tls_skip_verify", False), f"{key}.tls_skip_verify"),
        allow_client=_allow_rules(data.get("allow_client"), f"{key}.allow_client"),
        connect_timeout=parse_duration(data.get("connect_timeout", 10), f"{key}.connect_timeout"),
        idle_timeout=parse_duration(data.get("idle_timeout", "10m"), f"{key}.idle_timeout"),
        max_connections=None if max_connections is None else _count(max_connections, f"{key}.max_connections"),
        proxy_protocol=None if _choice(proxy_protocol, f"{key}.proxy_protocol", ("off", "v2")) == "off" else "v2",
        alpn=alpn,
    )


_TOP_KEYS = (
    "address", "http_address", "admin_address", "certificates", "certs_dir", "downstream_mtls",
    "allow_client", "routes", "access_log", "access_log_format", "autocert", "watch_interval",
    "limits", "hsts", "strict_permissions", "workers", "worker_affinity", "worker_bytecode", "session_ticket_rotation",
    "unknown_sni", "http2", "websocket_idle_timeout", "storage", "storage_key_file", "storage_password_file", "storage_password_env",
    "storage_tls", "storage_lease", "storage_sync_interval",
)  # fmt: skip

_LIMIT_KEYS = tuple(f.name for f in attrs.fields(Limits))
_HSTS_KEYS = ("max_age", "include_subdomains", "preload")
_SIZE = re.compile(r"^\s*(\d+)\s*([kmgKMG]i?[bB]?|[bB])?\s*$")
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def parse_size(value: Any, key: str) -> int:
    """Bytes from C{1048576}, C{"512k"}, C{"10m"}, C{"1g"} (binary units, as nginx's)."""
    if isinstance(value, bool):
        raise ConfigError(key, f"expected a size like 10m, got {value!r}")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.match(str(value))
        if not match:
            raise ConfigError(key, f"expected a size like 8192, 512k, 10m or 1g, got {value!r}")
        size = int(match.group(1)) * _SIZE_UNITS[(match.group(2) or "")[:1].lower()]
    if size <= 0:
        raise ConfigError(key, f"must be positive, got {value!r}")
    return size


def _count(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(key, f"expected a positive whole number, got {value!r}")
    return value


def _limits(data: Any, key: str) -> Limits:
    if data is None:
        return Limits()
    _check_keys(data, key, _LIMIT_KEYS)
    defaults = Limits()
    values: dict[str, Any] = {}
    for name in _LIMIT_KEYS:
        if name not in data:
            continue
        where = f"{key}.{name}"
        if name.endswith("timeout"):
            values[name] = parse_duration(data[name], where)
        elif name in ("max_header_count", "max_connections"):
            values[name] = _count(data[name], where)
        else:  # the byte sizes: max_line_length, max_header_size
            values[name] = parse_size(data[name], where)
    limits = attrs.evolve(defaults, **values)
    if limits.max_line_length > limits.max_header_size:
        raise ConfigError(f"{key}.max_line_length", "cannot exceed max_header_size")
    return limits


def _hsts(data: Any, key: str) -> HSTS | None:
    if data is None or data is True:
        return HSTS()
    if data is False or data == "off":
        return None
    _check_keys(data, key, _HSTS_KEYS)
    max_age = data.get("max_age", "365d")
    return HSTS(
        max_age=0 if max_age == 0 else int(parse_duration(max_age, f"{key}.max_age")),
        include_subdomains=_boolean(data.get("include_subdomains", False), f"{key}.include_subdomains"),
        preload=_boolean(data.get("preload", False), f"{key}.preload"),
    )


_AUTOCERT_KEYS = (
    "directory", "email", "domains", "challenges", "dns_hook", "dns_resolver", "ca_file", "eab",
    "renew_before", "key_type", "check_interval", "retry_interval", "propagation_timeout",
)  # fmt: skip

_DIRECTORY_PRESETS = {
    "letsencrypt": "https://acme-v02.api.letsencrypt.org/directory",
    "letsencrypt-staging": "https://acme-staging-v02.api.letsencrypt.org/directory",
}

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def parse_domain(value: Any, key: str) -> str:
    """A DNS name to put in a certificate: LDH labels, at most 253 characters, C{*.} only leftmost."""
    name = _string(value, key, optional=False).lower().rstrip(".")  # type: ignore[union-attr]
    labels = name[2:].split(".") if name.startswith("*.") else name.split(".")
    if len(name) > 253 or len(labels) < 2 or not all(_LABEL.match(label) for label in labels):
        raise ConfigError(key, f"not a valid DNS name for a certificate (letters, digits, '-', dots; *. only as the first label): {value!r}")
    return name


def _domains(value: Any, key: str) -> tuple[tuple[str, ...], ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(key, "expected a list: each item a name, or a list of names for one certificate")
    groups = []
    for i, item in enumerate(value):
        names = item if isinstance(item, list) else [item]
        if not names:
            raise ConfigError(f"{key}[{i}]", "an empty list of names")
        groups.append(tuple(parse_domain(n, f"{key}[{i}]" if not isinstance(item, list) else f"{key}[{i}][{j}]") for j, n in enumerate(names)))
    return tuple(groups)


def _host_port(value: Any, key: str) -> tuple[str, int] | None:
    text = _string(value, key)
    if text is None:
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(key, f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def _autocert(data: Any, key: str, certs_dir: str | None, http_address: str | None) -> Autocert | None:
    if data is None:
        return None
    _check_keys(data, key, _AUTOCERT_KEYS)
    given = _string(data.get("directory"), f"{key}.directory", optional=False)
    assert given is not None  # optional=False: a missing directory is a ConfigError
    directory = _DIRECTORY_PRESETS.get(given, given)
    if not directory.startswith("https://"):
        raise ConfigError(f"{key}.directory", f"expected an https:// directory URL, letsencrypt or letsencrypt-staging, got {directory!r}")
    if certs_dir is None:
        raise ConfigError("certs_dir", "is required with autocert: issued certificates and the account key are kept there")
    challenges = _string_list(data.get("challenges", list(CHALLENGE_TYPES)), f"{key}.challenges")
    for i, challenge in enumerate(challenges):
        _choice(challenge, f"{key}.challenges[{i}]", CHALLENGE_TYPES)
    dns_hook = _string(data.get("dns_hook"), f"{key}.dns_hook")
    if dns_hook is not None and not (os.path.isfile(dns_hook) and os.access(dns_hook, os.X_OK)):
        raise ConfigError(f"{key}.dns_hook", f"{dns_hook}: not an executable file")
    domains = _domains(data.get("domains"), f"{key}.domains")
    usable = [c for c in challenges if c != "dns-01" or dns_hook]
    if "http-01" in usable and http_address is None:
        usable.remove("http-01")
    if not usable:
        raise ConfigError(f"{key}.challenges", "no usable challenge: http-01 needs http_address, dns-01 needs dns_hook")
    for i, group in enumerate(domains):
        for name in group:
            if name.startswith("*.") and ("dns-01" not in challenges or dns_hook is None):
                raise ConfigError(f"{key}.domains[{i}]", f"{name}: a wildcard needs dns-01 with a dns_hook")
    eab = data.get("eab")
    eab_pair = None
    if eab is not None:
        _check_keys(eab, f"{key}.eab", ("key_id", "mac_key"))
        eab_pair = (
            _string(eab.get("key_id"), f"{key}.eab.key_id", optional=False),
            _string(eab.get("mac_key"), f"{key}.eab.mac_key", optional=False),
        )
    renew_before = data.get("renew_before")
    return Autocert(
        directory=directory,
        domains=domains,
        email=_string(data.get("email"), f"{key}.email"),
        challenges=tuple(challenges),
        dns_hook=dns_hook,
        dns_resolver=_host_port(data.get("dns_resolver"), f"{key}.dns_resolver"),
        ca_file=_readable_file(data.get("ca_file"), f"{key}.ca_file"),
        eab=eab_pair,  # type: ignore[arg-type]
        renew_before=None if renew_before is None else parse_duration(renew_before, f"{key}.renew_before"),
        key_type=_choice(data.get("key_type", "ecdsa"), f"{key}.key_type", ("ecdsa", "rsa")),
        check_interval=parse_duration(data.get("check_interval", "12h"), f"{key}.check_interval"),
        retry_interval=parse_duration(data.get("retry_interval", "60s"), f"{key}.retry_interval"),
        propagation_timeout=parse_duration(data.get("propagation_timeout", "120s"), f"{key}.propagation_timeout"),
    )


def _storage(data: Mapping[str, Any], certs_dir: str | None) -> Storage | None:
    """C{storage: redis://...} and its C{storage_*} keys (docs/cluster.md)."""
    given = _string(data.get("storage"), "storage")
    if given is None:
        others = [k for k in _TOP_KEYS if k.startswith("storage_") and data.get(k) is not None]
        if others:
            raise ConfigError(others[0], "needs storage: redis://HOST:PORT/DB")
        return None
    # The cluster's light modules, imported only with storage: (as app/ imports the rest of mtlsgate.cluster).
    from mtlsgate.cluster.seal import SealError, read_key_file
    from mtlsgate.cluster.url import parse_storage_url

    try:
        url = parse_storage_url(given)
    except ValueError as e:
        raise ConfigError("storage", str(e)) from None
    if certs_dir is None:
        raise ConfigError("certs_dir", "is required with storage: the node keeps what it last loaded there, to serve while Redis is away")
    key_file = _readable_file(data.get("storage_key_file"), "storage_key_file", optional=False)
    assert key_file is not None
    try:
        read_key_file(key_file)
    except SealError as e:
        raise ConfigError("storage_key_file", str(e)) from None
    password_file = _readable_file(data.get("storage_password_file"), "storage_password_file")
    password_env = _string(data.get("storage_password_env"), "storage_password_env")
    if password_file and password_env:
        raise ConfigError("storage_password_env", "give storage_password_file or storage_password_env, not both")
    if password_env and not os.environ.get(password_env):
        raise ConfigError("storage_password_env", f"the environment variable {password_env} is not set or empty")
    if password_file:
        with open(password_file, encoding="utf-8", errors="replace") as f:
            if not f.readline().rstrip("\r\n"):
                raise ConfigError("storage_password_file", f"{password_file}: the first line (the password) is empty")
    tls = data.get("storage_tls") or {}
    if not isinstance(tls, dict):
        raise ConfigError("storage_tls", "expected a mapping with ca_file, cert, key")
    _check_keys(tls, "storage_tls", ("ca_file", "cert", "key"))
    if tls and not url.tls:
        raise ConfigError("storage_tls", "is for rediss:// (Redis over TLS); storage is redis://")
    cert = _readable_file(tls.get("cert"), "storage_tls.cert")
    key = _readable_file(tls.get("key"), "storage_tls.key")
    if key and not cert:
        raise ConfigError("storage_tls.key", "needs storage_tls.cert")
    lease = parse_duration(data.get("storage_lease", "30s"), "storage_lease")
    if lease < 1:
        raise ConfigError("storage_lease", "at least 1s")
    return Storage(
        url=given, key_file=key_file, password_file=password_file, password_env=password_env, username=url.username,
        ca_file=_readable_file(tls.get("ca_file"), "storage_tls.ca_file"), cert=cert, key=key, lease=lease,
        sync_interval=parse_duration(data.get("storage_sync_interval", "30s"), "storage_sync_interval"),
    )  # fmt: skip


def config_from_mapping(data: Any, source: str | None = None) -> Config:
    """Validate a plain mapping (parsed YAML, or flags turned into the same shape) into a L{Config}."""
    if data is None:
        data = {}
    _check_keys(data, "", _TOP_KEYS)
    certs_dir = _string(data.get("certs_dir"), "certs_dir")
    if certs_dir is not None and not os.path.isdir(certs_dir) and data.get("autocert") is None and data.get("storage") is None:
        raise ConfigError("certs_dir", f"{certs_dir}: no such directory")
    certificates = _certificates(data.get("certificates"), "certificates")
    if not certificates and certs_dir is None and data.get("autocert") is None:
        raise ConfigError("certificates", "at least one certificate (or certs_dir, or autocert) is required to serve TLS")
    http_address = _endpoint(data.get("http_address"), "http_address")
    routes = data.get("routes") or []
    if not isinstance(routes, list):
        raise ConfigError("routes", "expected a list of routes")
    websocket_idle_timeout = parse_duration(data.get("websocket_idle_timeout", "300s"), "websocket_idle_timeout")
    http_indexes = [i for i, route in enumerate(routes) if not is_tcp_route(route)]
    parsed_routes = tuple(_route(routes[i], f"routes[{i}]", websocket_idle_timeout) for i in http_indexes)
    seen: dict[tuple[str, str], int] = {}
    for i, route in zip(http_indexes, parsed_routes):
        if (route.host, route.prefix) in seen:
            raise ConfigError(f"routes[{i}].from", f"duplicates routes[{seen[route.host, route.prefix]}] ({route.host} {route.prefix})")
        seen[route.host, route.prefix] = i
    tcp_routes = _tcp_routes(routes, seen)
    return Config(
        address=_ip_endpoint(data.get("address", "tcp:8443"), "address"),
        http_address=http_address,
        admin_address=_loopback_by_default(_endpoint(data.get("admin_address"), "admin_address")),
        certificates=certificates,
        certs_dir=certs_dir,
        downstream_mtls=_downstream_mtls(data.get("downstream_mtls"), "downstream_mtls"),
        allow_client=_allow_rules(data.get("allow_client"), "allow_client"),
        routes=parsed_routes,
        tcp_routes=tcp_routes,
        access_log=_string(_off(data.get("access_log")), "access_log"),
        watch_interval=None if data.get("watch_interval") in ("off", False) else parse_duration(data.get("watch_interval", "5s"), "watch_interval"),
        session_ticket_rotation=None if data.get("session_ticket_rotation") in ("off", False)
        else parse_duration(data.get("session_ticket_rotation", "12h"), "session_ticket_rotation"),
        limits=_limits(data.get("limits"), "limits"),
        hsts=_hsts(data.get("hsts"), "hsts"),
        strict_permissions=_boolean(data.get("strict_permissions", False), "strict_permissions"),
        unknown_sni=_choice(data.get("unknown_sni", "default"), "unknown_sni", ("default", "reject")),
        http2=_boolean(data.get("http2", True), "http2"),
        access_log_format=_choice(data.get("access_log_format", "combined"), "access_log_format", ("combined", "json")),
        autocert=_autocert(data.get("autocert"), "autocert", certs_dir, http_address),
        storage=_storage(data, certs_dir),
        workers=_workers(data.get("workers", 1), data.get("address", "tcp:8443"), http_address),
        worker_affinity=_choice(data.get("worker_affinity", "connection"), "worker_affinity", ("connection", "client_ip")),
        worker_bytecode=_string(data.get("worker_bytecode"), "worker_bytecode"),
        websocket_idle_timeout=websocket_idle_timeout,
        source=source,
    )


def _tcp_routes(routes: list[Any], http_routes: dict[tuple[str, str], int]) -> tuple[TCPRoute, ...]:
    """
    The TCP routes of C{routes:}.  SNI picks them, so a name is one TCP route or HTTP routes, never
    both, and two TCP routes cannot share a name (the port in C{from} is not seen by the gateway).
    """
    parsed: list[TCPRoute] = []
    names: dict[str, int] = {}
    http_hosts = {host: i for (host, _), i in http_routes.items()}
    for i, data in enumerate(routes):
        if not is_tcp_route(data):
            continue
        route = _tcp_route(data, f"routes[{i}]")
        if route.host in names:
            raise ConfigError(f"routes[{i}].from", f"{route.host} is already the TCP route routes[{names[route.host]}]: SNI carries the name only, "
                              "so two TCP routes cannot share a name (the port does not tell them apart)")
        if route.host in http_hosts:
            raise ConfigError(f"routes[{i}].from", f"{route.host} is also the HTTP route routes[{http_hosts[route.host]}]: "
                              "a TLS connection naming it by SNI is either piped (TCP) or served as HTTP, not both")
        names[route.host] = i
        parsed.append(route)
    return tuple(parsed)


_MAX_WORKERS = 64


def _workers(value: Any, address: Any, http_address: str | None) -> int:
    """C{workers}: a count, or C{auto} for one per core; more than one needs tcp/tcp6 listeners."""
    if value == "auto":
        count = os.cpu_count() or 1
    elif isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _MAX_WORKERS:
        raise ConfigError("workers", f"expected a number of processes from 1 to {_MAX_WORKERS}, or auto; got {value!r}")
    else:
        count = value
    if count > 1:
        for key, description in (("address", address), ("http_address", http_address)):
            try:
                if description is not None:
                    parse_tcp_listen(description)
            except ValueError as e:
                raise ConfigError(key, f"{e} (workers: {value} shares one TCP port between processes)") from None
    return count


def _loopback_by_default(description: str | None) -> str | None:
    """The admin listener binds to loopback unless an interface is named: metrics are not for the world."""
    if description is None or "interface=" in description:
        return description
    kind = description.split(":", 1)[0]
    if kind == "tcp":
        return description + ":interface=127.0.0.1"
    if kind == "tcp6":
        return description + r":interface=\:\:1"
    return description


def read_yaml(path: str) -> dict[str, Any]:
    """Parse a YAML config file into a mapping, with errors that name the file."""
    import yaml  # here, not at the top: a worker validates the mapping its parent read (mtlsgate.app.handoff) and never needs it

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError("", f"{path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError("", f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("", f"{path}: expected a mapping of keys at the top level")
    return data


def load_config(path: str, overrides: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> Config:
    """Read, optionally adjust (flags given alongside the file), and validate a YAML config file."""
    data = read_config_file(path)
    if overrides is not None:
        data = overrides(data)
    return config_from_mapping(data, source=path)


def read_config_file(path: str) -> dict[str, Any]:
    """A YAML config file as a mapping, its relative paths resolved against the file's directory (not validated yet)."""
    return _relative_to(read_yaml(path), os.path.dirname(os.path.abspath(path)))


_PATH_KEYS = {
    "cert", "key", "ca_file", "crl_file", "certs_dir", "tls_custom_ca_file", "tls_client_cert_file",
    "tls_client_key_file", "access_log", "dns_hook", "storage_key_file", "storage_password_file", "worker_bytecode",
}  # fmt: skip


def _relative_to(data: Any, base: str) -> Any:
    """Resolve relative file paths in a config file against the file's own directory."""
    if isinstance(data, dict):
        return {
            k: (os.path.join(base, v) if k in _PATH_KEYS and isinstance(v, str) and v not in ("-", "off") else _relative_to(v, base))
            for k, v in data.items()
        }
    if isinstance(data, list):
        return [_relative_to(item, base) for item in data]
    return data
