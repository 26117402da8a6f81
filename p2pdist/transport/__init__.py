"""Bytes on the wire: the HTTP server, the cluster-internal clients, TLS and rate limits."""
