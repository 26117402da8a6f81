"""Talking to OCI registries: the blob client (auth, redirects, retries) and reference parsing."""
