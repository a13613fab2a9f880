"""The proxy: routing, the exchange (one request from route to response), upstream groups, balancing and health checks."""
