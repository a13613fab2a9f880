"""A third-party upstream: nginx requiring a client certificate, reached through the gateway."""

from __future__ import annotations


import pytest

from tests.conftest import free_port, gateway_args, https_request
from tests.nginx_peer import MAIN, TEMP_PATHS, start_nginx

pytestmark = pytest.mark.needs("nginx")

CONF = MAIN + """http {{
    access_log {dir}/access.log;
    keepalive_timeout 1s;
""" + TEMP_PATHS + """    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert}; ssl_certificate_key {key};
        ssl_client_certificate {ca}; ssl_verify_client on;
        location / {{
            default_type text/plain;
            return 200 "nginx saw $ssl_client_s_dn; xfcc=$http_x_forwarded_client_cert\\n";
        }}
    }}
}}
"""


@pytest.fixture
def nginx_upstream(procs, pki, tmp_path):
    port = free_port()
    start_nginx(procs, tmp_path, CONF.format(dir=tmp_path, port=port, cert=pki["upstream"][0], key=pki["upstream"][1], ca=pki["ca"]), port)
    return port


def test_gateway_presents_its_client_certificate_to_nginx(start_gateway, pki, nginx_upstream):
    gateway = start_gateway(gateway_args(pki, nginx_upstream))
    status, _, body = https_request(gateway.port, "/", ca=pki["ca"], cert=pki["alice"])
    assert status == 200
    text = body.decode()
    assert "nginx saw CN=gateway" in text
    assert "spiffe://test/ns/prod/sa/alice" in text


def test_the_pool_recovers_when_the_upstream_closes_idle_keepalive_connections(start_gateway, pki, nginx_upstream):
    import time

    gateway = start_gateway(gateway_args(pki, nginx_upstream))
    for _ in range(3):
        status, _, body = https_request(gateway.port, "/", ca=pki["ca"], cert=pki["alice"])
        assert status == 200, body
        time.sleep(1.3)  # past nginx's keepalive_timeout: the pooled connection is closed under the gateway
