"""Server certificates: SNI picks exact names, then wildcards, then the default; RSA and ECDSA; chains."""

from __future__ import annotations

import socket
import ssl

import pytest

from tests.conftest import gateway_args


def served_certificate(port: int, server_name: str | None, ca: str, cert: tuple[str, str]) -> dict:
    ctx = ssl.create_default_context(cafile=ca)
    ctx.check_hostname = False
    ctx.load_cert_chain(*cert)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        with ctx.wrap_socket(sock, server_hostname=server_name) as tls:
            return {"peer": tls.getpeercert(), "version": tls.version(), "alpn": tls.selected_alpn_protocol()}


def _names(info: dict) -> set[str]:
    return {value for kind, value in info["peer"]["subjectAltName"]}


@pytest.fixture
def sni_gateway(start_gateway, pki, echo_upstream, tmp_path):
    ca = pki["ca_obj"]
    inter = ca.issue_intermediate("test intermediate")
    files = []
    for name, issued in (
        ("wild", inter.issue_server(["*.apps.example.com"], rsa=True)),
        ("exact", ca.issue_server(["exact.apps.example.com"])),
    ):
        cert, key = str(tmp_path / f"{name}.pem"), str(tmp_path / f"{name}-key.pem")
        issued.write(cert, key)
        files += ["--cert", cert, "--key", key]
    return start_gateway(gateway_args(pki, echo_upstream, *files))


@pytest.mark.parametrize(
    "server_name, expected",
    [
        ("localhost", "localhost"),  # the default (first) certificate by name
        ("exact.apps.example.com", "exact.apps.example.com"),  # exact beats the wildcard
        ("web.apps.example.com", "*.apps.example.com"),  # wildcard, served with its intermediate
        ("unknown.example.org", "localhost"),  # unknown name: the default certificate
        (None, "localhost"),  # no SNI at all
    ],
)
def test_sni_picks_the_certificate(sni_gateway, pki, server_name, expected):
    info = served_certificate(sni_gateway.port, server_name, pki["ca"], pki["alice"])
    assert expected in _names(info)


def test_tls13_is_preferred_and_alpn_offers_http11(sni_gateway, pki):
    ctx = ssl.create_default_context(cafile=pki["ca"])
    ctx.load_cert_chain(*pki["alice"])
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection(("127.0.0.1", sni_gateway.port)) as sock:
        with ctx.wrap_socket(sock, server_hostname="localhost") as tls:
            assert tls.version() == "TLSv1.3"
            assert tls.selected_alpn_protocol() == "http/1.1"


def test_tls12_uses_only_ecdhe_aead_suites(sni_gateway, pki):
    ctx = ssl.create_default_context(cafile=pki["ca"])
    ctx.load_cert_chain(*pki["alice"])
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("ALL")
    with socket.create_connection(("127.0.0.1", sni_gateway.port)) as sock:
        with ctx.wrap_socket(sock, server_hostname="localhost") as tls:
            name, version, _ = tls.cipher()
            assert version == "TLSv1.2"
            assert name.startswith("ECDHE-") and ("GCM" in name or "CHACHA20" in name)
            assert tls.compression() is None


def test_cbc_only_client_is_refused(sni_gateway, pki):
    ctx = ssl.create_default_context(cafile=pki["ca"])
    ctx.load_cert_chain(*pki["alice"])
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("AES128-SHA:ECDHE-RSA-AES128-SHA:ECDHE-ECDSA-AES128-SHA")
    with socket.create_connection(("127.0.0.1", sni_gateway.port)) as sock:
        with pytest.raises(ssl.SSLError):
            ctx.wrap_socket(sock, server_hostname="localhost")
