"""
A route with C{upstream_protocol: http2}, through the real gateway process, to real HTTP/2 upstreams
requiring the gateway's client certificate: nginx (ALPN h2), for headers, identity, and bodies
large enough for flow control to be the back-pressure both ways (256 MiB down in bounded memory;
256 MiB up is in test_grpc.py, against a server that reads it: nginx's `return` answers first); and what an HTTP/1.1 upstream
gets instead (the ALPN refusal is a 502, not a hang).
"""

from __future__ import annotations

import hashlib
import os

import pytest
import yaml

from tests.conftest import free_port, gateway_config, https_request
from tests.nginx_peer import MAIN, TEMP_PATHS, access_lines, start_nginx

CONF = MAIN + """http {{
    log_format withlength '$request $status request_length=$request_length';
    access_log {dir}/access.log withlength;
""" + TEMP_PATHS + """    client_max_body_size 512m;
    server {{
        listen 127.0.0.1:{port} ssl http2;
        ssl_certificate {cert}; ssl_certificate_key {key};
        ssl_client_certificate {ca}; ssl_verify_client on;
        location /big {{ alias {dir}/big.bin; }}
        location /huge {{ alias {dir}/huge.bin; }}
        location / {{
            default_type text/plain;
            return 200 "proto=$server_protocol saw=$ssl_client_s_dn xfcc=$http_x_forwarded_client_cert te=$http_te host=$host conn=$http_connection\\n";
        }}
    }}
}}
"""

BIG = 8 * 1024 * 1024
HUGE = 256 * 1024 * 1024


@pytest.fixture
def nginx_h2(procs, pki, tmp_path):
    port = free_port()
    (tmp_path / "big.bin").write_bytes(os.urandom(BIG))
    with open(tmp_path / "huge.bin", "wb") as f:
        f.truncate(HUGE)  # sparse: no disk used
    start_nginx(procs, tmp_path, CONF.format(dir=tmp_path, port=port, cert=pki["upstream"][0], key=pki["upstream"][1], ca=pki["ca"]), port)
    return port


def _gateway(start_gateway, pki, tmp_path, upstream_port: int, **route):
    port = free_port()
    config = gateway_config(pki, port, [f"https://127.0.0.1:{upstream_port}"], {"upstream_protocol": "http2", **route})
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(config))
    return start_gateway(["--config", str(path)], port=port)


@pytest.mark.needs("nginx")
def test_requests_reach_nginx_over_http2_with_the_gateways_certificate_and_clean_headers(start_gateway, pki, tmp_path, nginx_h2):
    gateway = _gateway(start_gateway, pki, tmp_path, nginx_h2)
    for _ in range(3):  # the same connection carries them (streams 1, 3, 5)
        status, _, body = https_request(gateway.port, "/x", ca=pki["ca"], cert=pki["alice"], headers={"TE": "trailers", "Connection": "TE"})
        assert status == 200, body
        text = body.decode()
        assert "proto=HTTP/2.0" in text
        assert "saw=CN=gateway" in text
        assert "spiffe://test/ns/prod/sa/alice" in text
        assert "te=trailers" in text
        assert "conn= " in text or text.rstrip().endswith("conn=")  # no Connection header on HTTP/2
        assert "host=127.0.0.1" in text
    lines = access_lines(tmp_path / "access.log", 3)
    assert len(lines) == 3 and all(line.startswith("GET /x HTTP/2.0") for line in lines)
    assert [int(line.rsplit("=", 1)[1]) for line in lines][1:] < [int(lines[0].rsplit("=", 1)[1])] * 2  # HPACK: one connection


@pytest.mark.needs("nginx")
def test_large_bodies_both_ways_stream_through_http2_flow_control(start_gateway, pki, tmp_path, nginx_h2):
    gateway = _gateway(start_gateway, pki, tmp_path, nginx_h2)
    status, headers, body = https_request(gateway.port, "/big", ca=pki["ca"], cert=pki["alice"], timeout=60)
    assert status == 200 and len(body) == BIG
    assert hashlib.sha256(body).digest() == hashlib.sha256((tmp_path / "big.bin").read_bytes()).digest()
    status, _, body = https_request(gateway.port, "/upload", ca=pki["ca"], cert=pki["alice"], method="POST", body=os.urandom(BIG), timeout=60)
    assert status == 200, body
    assert "proto=HTTP/2.0" in body.decode()


def test_an_http1_only_upstream_is_a_502_not_a_hang(start_gateway, pki, tmp_path, echo_upstream):
    gateway = _gateway(start_gateway, pki, tmp_path, echo_upstream)
    status, _, body = https_request(gateway.port, "/", ca=pki["ca"], cert=pki["alice"], timeout=30)
    assert status == 502, body


@pytest.mark.needs("nginx")
def test_256_mib_from_an_http2_upstream_in_bounded_gateway_memory(start_gateway, pki, tmp_path, nginx_h2):
    from tests.e2e.test_streaming import RSS_LIMIT_KIB, _connection, peak_rss_kib

    gateway = _gateway(start_gateway, pki, tmp_path, nginx_h2, timeout="120s")
    conn = _connection(gateway.port, pki)
    conn.request("GET", "/huge", headers={"Host": "localhost"})
    response = conn.getresponse()
    assert response.status == 200 and int(response.getheader("content-length")) == HUGE
    received = 0
    while data := response.read(1 << 20):
        received += len(data)
    assert received == HUGE
    assert peak_rss_kib(gateway.proc.popen.pid) < RSS_LIMIT_KIB
