"""Several gateways behind a load balancer, sharing certificates, ACME and revocation through Redis (docs/cluster.md)."""
