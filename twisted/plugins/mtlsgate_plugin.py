"""twistd plugin: C{twistd mtlsgate ...}."""

from twisted.application.service import ServiceMaker

mtlsgate = ServiceMaker(
    "mtlsgate",
    "mtlsgate.tap",
    "A zero-trust TLS/mTLS gateway: terminate TLS, verify client certificates, proxy to mTLS upstreams.",
    "mtlsgate",
)
