"""
The self-contained demo: a development CA, certificates, an mTLS "echo" upstream that shows what it
received, and the gateway in front of it.  The echo upstream doubles as the tests' upstream:
C{python -m mtlsgate.testing upstream --port P --cert C --key K --client-ca CA}.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import yaml
from twisted.application.service import MultiService

from mtlsgate.config.load import config_from_mapping
from mtlsgate.reactors import IGatewayReactor
from mtlsgate.testing import make_echo_upstream
from mtlsgate.tls.pki import DevCA


def prepare_demo(directory: str, port: int = 8443, upstream_port: int = 9443) -> dict[str, Any]:
    """Make (or reuse) the demo's CA, certificates and config file in C{directory}; returns the config mapping."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    d = os.path.abspath(directory)

    def path(name: str) -> str:
        return os.path.join(d, name)

    ca = DevCA.load_or_create(path("ca"), name="mtlsgate demo CA")
    issued = {
        "gateway": lambda: ca.issue_server(["localhost", "127.0.0.1", "::1"]),
        "upstream": lambda: ca.issue_server(["localhost", "127.0.0.1"]),
        "gateway-client": lambda: ca.issue_client("mtlsgate-demo-gateway", uris=["spiffe://demo.mtlsgate/gateway"]),
        "alice": lambda: ca.issue_client("alice", uris=["spiffe://demo.mtlsgate/alice"], emails=["alice@example.com"]),
    }
    for name, issue in issued.items():
        if not (os.path.exists(path(f"{name}.pem")) and os.path.exists(path(f"{name}-key.pem"))):
            issue().write(path(f"{name}.pem"), path(f"{name}-key.pem"))
    config = {
        "address": f"tcp:{port}:interface=127.0.0.1",
        "certificates": [{"cert": path("gateway.pem"), "key": path("gateway-key.pem")}],
        "downstream_mtls": {"ca_file": path("ca/ca.pem"), "client_auth": "require", "enforcement": "policy"},
        "routes": [
            {
                "from": "https://localhost",
                "to": [f"https://127.0.0.1:{upstream_port}"],
                "tls_custom_ca_file": path("ca/ca.pem"),
                "tls_client_cert_file": path("gateway-client.pem"),
                "tls_client_key_file": path("gateway-client-key.pem"),
                "tls_server_name": "localhost",
            }
        ],
    }
    with open(path("mtlsgate.yaml"), "w") as f:
        f.write("# Written by 'mtlsgate demo'; run it yourself with: twistd -n mtlsgate --config mtlsgate.yaml\n")
        yaml.safe_dump(config, f, sort_keys=False)
    return config


def demo_instructions(directory: str, port: int) -> str:
    d = os.path.abspath(directory)
    return (
        f"\nmtlsgate demo is running: gateway https://localhost:{port}/ -> mTLS echo upstream.\n"
        f"Files (CA, certificates, mtlsgate.yaml) are in {d}\n\n"
        "With a client certificate (admitted; the upstream echoes the identity headers it got):\n"
        f"  curl --cacert {d}/ca/ca.pem --cert {d}/alice.pem --key {d}/alice-key.pem https://localhost:{port}/hello\n\n"
        "Without one (refused with 403 and the reason):\n"
        f"  curl --cacert {d}/ca/ca.pem https://localhost:{port}/hello\n\n"
        "Stop with Ctrl-C.\n"
    )


def make_demo_service(reactor: IGatewayReactor, directory: str, port: int = 8443, upstream_port: int = 9443) -> MultiService:
    """The gateway and its echo upstream, in one service."""
    from mtlsgate.app.service import make_gateway

    data = prepare_demo(directory, port, upstream_port)
    d = os.path.abspath(directory)
    top = MultiService()
    make_echo_upstream(
        reactor, f"tcp:{upstream_port}:interface=127.0.0.1", os.path.join(d, "upstream.pem"), os.path.join(d, "upstream-key.pem"), os.path.join(d, "ca/ca.pem")
    ).setServiceParent(top)
    make_gateway(reactor, config_from_mapping(data)).setServiceParent(top)
    reactor.callWhenRunning(lambda: sys.stdout.write(demo_instructions(directory, port)))
    return top
