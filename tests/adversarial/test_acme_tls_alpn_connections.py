"""
RFC 8737: a connection that negotiates C{acme-tls/1} exists only for the handshake (the CA's validator
looks at the certificate and closes).  The gateway closes it after the handshake and never hands it
to HTTP: a client offering only C{acme-tls/1} must never reach a route, whether or not a validation
is pending for the name it asks for.  The gateway runs from a .tac file whose ServerTLS has a pending
validation for acme.test (what the TLS-ALPN-01 responder does during an order).
"""

from __future__ import annotations

import socket
import ssl
import textwrap

import pytest
from cryptography import x509

from tests.conftest import free_port, https_request

TAC = """
from twisted.application import service
from twisted.internet import reactor

from mtlsgate.tls import pki
from mtlsgate.config.load import config_from_mapping
from mtlsgate.app.service import make_gateway

config = config_from_mapping({config!r})
gateway = make_gateway(reactor, config)
key, certificate = pki.self_signed("acme.test", ["acme.test"])


class PendingValidation:
    def certificate_for(self, server_name):
        return (key, certificate) if server_name == "acme.test" else None


gateway.server_tls.acme_validation = PendingValidation()
application = service.Application("acme-tls-alpn test")
gateway.setServiceParent(application)
"""


@pytest.fixture
def gateway(start_gateway, pki, echo_upstream, tmp_path):
    port = free_port()
    config = {
        "address": f"tcp:{port}:interface=127.0.0.1",
        "certificates": [{"cert": pki["gateway"][0], "key": pki["gateway"][1]}],
        "downstream_mtls": {"ca_file": pki["ca"], "enforcement": "policy", "client_auth": "optional"},
        "routes": [{"from": "*", "to": [f"https://127.0.0.1:{echo_upstream}"], "tls_custom_ca_file": pki["ca"],
                    "tls_client_cert_file": pki["gateway_client"][0], "tls_client_key_file": pki["gateway_client"][1]}],
    }  # fmt: skip
    tac = tmp_path / "acme.tac"
    tac.write_text(textwrap.dedent(TAC.format(config=config)))
    return start_gateway([], port=port, tac=tac)


def _acme_client(port: int, server_name: str, pki) -> tuple[ssl.SSLSocket, str | None]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # a validator checks the certificate itself
    ctx.load_cert_chain(*pki["alice"])  # a client certificate the routes would admit: the refusal is not about identity
    ctx.set_alpn_protocols(["acme-tls/1"])
    sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname=server_name)
    return sock, sock.selected_alpn_protocol()


def _answer_to_a_request(sock: ssl.SSLSocket) -> bytes:
    """What comes back to an HTTP request sent on the connection (b"" when it is closed)."""
    received = b""
    try:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        while chunk := sock.recv(65536):
            received += chunk
    except TimeoutError:
        return received + b" (connection still open)"
    except (ssl.SSLError, ConnectionError):
        pass
    return received


@pytest.mark.parametrize("server_name, pending", [("acme.test", True), ("localhost", False)])
def test_an_acme_tls_connection_is_closed_after_the_handshake_and_never_reaches_http(gateway, pki, server_name, pending):
    sock, selected = _acme_client(gateway.port, server_name, pki)
    with sock:
        if pending:
            assert selected == "acme-tls/1"
            served = x509.load_der_x509_certificate(sock.getpeercert(binary_form=True))
            assert served.subject.rfc4514_string() == "CN=acme.test"  # the validation certificate
        answer = _answer_to_a_request(sock)
    assert answer == b"", answer


def test_http_clients_are_still_served_beside_it(gateway, pki):
    assert https_request(gateway.port, "/", ca=pki["ca"], cert=pki["alice"])[0] == 200


def test_offering_h2_beside_acme_tls_for_a_name_under_validation_still_gets_no_http(gateway, pki):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(*pki["alice"])
    ctx.set_alpn_protocols(["h2", "acme-tls/1"])
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", gateway.port), timeout=10), server_hostname="acme.test") as sock:
        assert sock.selected_alpn_protocol() == "acme-tls/1"
        received = b""
        try:
            sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            while chunk := sock.recv(65536):
                received += chunk
        except (ssl.SSLError, ConnectionError):
            pass
    assert received == b""


def test_http2_clients_are_served_beside_it(gateway, pki):
    from tests.h2peer import simple_get

    assert simple_get(gateway.port, pki).status == 200
