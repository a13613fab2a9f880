"""
twistd plugins: C{twistd mtlsgate ...} (the gateway), and the C{mtls:} endpoint string for any
Twisted server (C{twistd web --listen mtls:8443:cert=gate.pem:key=gate-key.pem:client_ca=ca.pem}).
"""

from twisted.application.service import ServiceMaker

from mtlsgate.tls.endpoint import MTLSEndpointParser

mtlsgate = ServiceMaker(
    "mtlsgate",
    "mtlsgate.app.tap",
    "A zero-trust TLS/mTLS gateway: terminate TLS, verify client certificates, proxy to mTLS upstreams.",
    "mtlsgate",
)

mtlsEndpoint = MTLSEndpointParser()
