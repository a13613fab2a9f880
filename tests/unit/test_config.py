"""Config validation: every error names the key and the problem."""

import pytest

from mtlsgate.config.load import config_from_mapping, parse_duration
from mtlsgate.config.model import ConfigError


def base(pki, **extra):
    data = {"certificates": [{"cert": pki["gateway"][0], "key": pki["gateway"][1]}]}
    data.update(extra)
    return data


def test_minimal_config_has_strict_defaults(pki):
    config = config_from_mapping(base(pki))
    assert config.address == "tcp:8443"
    assert config.downstream_mtls.client_auth == "off"
    assert config_from_mapping(base(pki, downstream_mtls={"ca_file": pki["ca"]})).downstream_mtls.client_auth == "require"


@pytest.mark.parametrize(
    "extra, key, words",
    [
        ({"adress": "tcp:1"}, "adress", "did you mean 'address'"),
        ({"address": "ssl:443"}, "address", "plain endpoint"),
        ({"routes": [{"from": "https://a", "to": "ftp://b"}]}, "routes[0].to[0]", "http:// or https://"),
        ({"routes": [{"from": "https://a", "to": []}]}, "routes[0].to", "upstream URL"),
        ({"routes": [{"from": "https://a/path", "to": "https://b"}]}, "routes[0].from", "prefix"),
        ({"routes": [{"from": "https://a", "prefix": "/a%2fb", "to": "https://b"}]}, "routes[0].prefix", "%2F"),
        ({"routes": [{"from": "https://a", "prefix": "/a/../b", "to": "https://b"}]}, "routes[0].prefix", "dot-segments"),
        ({"routes": [{"from": "https://a", "prefix": "/a%40b", "to": "https://b"}]}, "routes[0].prefix", "normal form"),
        ({"routes": [{"from": "https://a", "to": "https://b", "timeout": "-1s"}]}, "routes[0].timeout", "duration"),
        ({"routes": [{"from": "https://a", "to": "https://b", "tls_custom_ca_file": "/nope"}]}, "routes[0].tls_custom_ca_file", "no such file"),
        ({"routes": [{"from": "https://a", "to": "https://b", "allow_client": {"fingerprint_sha256": ["abc"]}}]}, "routes[0].allow_client.fingerprint_sha256[0]", "64 hex"),
        ({"routes": [{"from": "https://a", "to": "https://b"}, {"from": "https://a", "to": "https://c"}]}, "routes[1].from", "duplicates"),
        ({"routes": [{"from": "https://a", "to": "https://b", "max_response_header_size": "lots"}]}, "routes[0].max_response_header_size", "size like"),
        ({"routes": [{"from": "https://a", "to": "https://b", "health_check": {"intervall": "5s"}}]}, "routes[0].health_check.intervall", "did you mean 'interval'"),
        ({"routes": [{"from": "https://a", "to": "https://b", "health_check": {"path": "healthz"}}]}, "routes[0].health_check.path", "starting with '/'"),
        ({"routes": [{"from": "https://a", "to": "https://b", "health_check": {"unhealthy_threshold": 0}}]}, "routes[0].health_check.unhealthy_threshold", "positive whole number"),
        ({"routes": [{"from": "https://a", "to": "https://b", "health_check": {"timeout": "2 seconds"}}]}, "routes[0].health_check.timeout", "duration"),
        ({"routes": [{"from": "https://a", "to": "https://b", "upstream_protocol": "h2"}]}, "routes[0].upstream_protocol", "http1, http2"),
        ({"routes": [{"from": "https://a", "to": "https://b", "health_check": {"grpc": True}}]}, "routes[0].health_check.grpc", "upstream_protocol: http2"),
        ({"routes": [{"from": "https://a", "to": "https://b", "upstream_protocol": "http2", "allow_websockets": True}]}, "routes[0].allow_websockets", "RFC 8441"),
        ({"unknown_sni": "drop"}, "unknown_sni", "default, reject"),
        ({"downstream_mtls": {"client_auth": "require"}}, "downstream_mtls.ca_file", "required"),
        ({"downstream_mtls": {"max_verify_depth": 0}}, "downstream_mtls.max_verify_depth", "1 to 16"),
        ({"workers": 0}, "workers", "from 1 to 64, or auto"),
        ({"workers": "many"}, "workers", "from 1 to 64, or auto"),
        ({"workers": 2, "address": "systemd:domain=INET:index=0"}, "address", "only a tcp: or tcp6: listener"),
        ({"address": "unix:/tmp/gate.sock"}, "address", "UNIX socket is not supported"),
        ({"workers": 2, "address": "tcp:8443:reuseport=1"}, "address", "'reuseport' is not supported"),
        ({"workers": 2, "http_address": "unix:/tmp/redirect.sock"}, "http_address", "only a tcp: or tcp6: listener"),
    ],
)
def test_errors_name_the_key(pki, extra, key, words):
    with pytest.raises(ConfigError) as e:
        config_from_mapping(base(pki, **extra))
    assert e.value.key == key
    assert words in str(e.value)


def test_upstream_protocol_defaults_to_http1_and_takes_http2(pki):
    route = {"from": "https://a", "to": "https://b"}
    assert config_from_mapping(base(pki, routes=[route])).routes[0].upstream_protocol == "http1"
    assert config_from_mapping(base(pki, routes=[{**route, "upstream_protocol": "http2"}])).routes[0].upstream_protocol == "http2"


def test_a_grpc_health_check_asks_the_standard_health_method_unless_told_otherwise(pki):
    route = {"from": "https://a", "to": "https://b", "upstream_protocol": "http2"}
    check = config_from_mapping(base(pki, routes=[{**route, "health_check": {"grpc": True}}])).routes[0].health_check
    assert check.grpc and check.path == "/grpc.health.v1.Health/Check"
    check = config_from_mapping(base(pki, routes=[{**route, "health_check": {"grpc": True, "path": "/my.Health/Check"}}])).routes[0].health_check
    assert check.path == "/my.Health/Check"
    assert config_from_mapping(base(pki, routes=[{**route, "health_check": {}}])).routes[0].health_check.path == "/"


def test_no_certificate_at_all_is_an_error():
    with pytest.raises(ConfigError, match="certificates"):
        config_from_mapping({})


def test_durations():
    assert parse_duration("30s", "k") == 30
    assert parse_duration("500ms", "k") == 0.5
    assert parse_duration("2m", "k") == 120
    assert parse_duration(5, "k") == 5
    assert parse_duration("30d", "k") == 30 * 86400


def test_access_log_off_is_a_value_not_a_relative_path(tmp_path):
    from mtlsgate.config.load import load_config

    cert = tmp_path / "c.pem"
    cert.write_text("x")
    path = tmp_path / "gw.yaml"
    path.write_text(f"certificates: [{{cert: {cert}}}]\naccess_log: 'off'\n")
    assert load_config(str(path)).access_log == "off"


def test_workers_auto_is_one_per_core(pki):
    import os

    assert config_from_mapping(base(pki)).workers == 1
    assert config_from_mapping(base(pki, workers="auto")).workers == (os.cpu_count() or 1)


@pytest.mark.parametrize("spelling", ["off", "Off", "OFF", "no", "false", "'off'"])
def test_documented_off_values_work_unquoted_in_yaml(pki, tmp_path, spelling):
    """YAML 1.1 reads a bare off/no/false as the boolean false: every key documented as taking `off` accepts it."""
    from mtlsgate.config.load import load_config

    path = tmp_path / "gw.yaml"
    path.write_text(
        f"certificates: [{{cert: {pki['gateway'][0]}, key: {pki['gateway'][1]}}}]\n"
        f"access_log: {spelling}\n"
        f"watch_interval: {spelling}\n"
        f"session_ticket_rotation: {spelling}\n"
        f"hsts: {spelling}\n"
        f"downstream_mtls: {{ca_file: {pki['ca']}, client_auth: {spelling}}}\n"
    )
    config = load_config(str(path))
    assert config.access_log == "off"
    assert config.watch_interval is None
    assert config.session_ticket_rotation is None
    assert config.hsts is None
    assert config.downstream_mtls.client_auth == "off"


@pytest.mark.parametrize("spelling", ["on", "yes", "true"])
def test_a_bare_on_is_still_refused_where_it_means_nothing(pki, tmp_path, spelling):
    from mtlsgate.config.load import load_config

    path = tmp_path / "gw.yaml"
    path.write_text(f"certificates: [{{cert: {pki['gateway'][0]}, key: {pki['gateway'][1]}}}]\naccess_log: {spelling}\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    assert e.value.key == "access_log"
