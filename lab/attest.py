"""A seed signing key for verify once, as `openssl genpkey -algorithm ed25519` would make it,
and the flags that hand it to a seed (the private half) and to peers (the public half)."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


def write_key_pair(directory: Path, name: str) -> tuple[Path, Path]:
    """An Ed25519 private key and its public key, PEM, in `directory`."""
    key = Ed25519PrivateKey.generate()
    private, public = directory / f"{name}.pem", directory / f"{name}.pub.pem"
    private.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return private, public


def attest_args(directory: Path) -> tuple[list[str], list[str]]:
    """A fresh seed key: (the seed's flags, the peers' flags)."""
    private, public = write_key_pair(directory, "seed-attest")
    return ["--attest-key", str(private)], ["--attest-public-key", str(public)]
