"""TLS: server contexts, SNI and ALPN, client-certificate verification and the verdict it produces, the mtls: endpoint, PEM and the development CA."""
