"""Observing the gateway: metrics, the access log, the admin listener, start-up summaries."""
