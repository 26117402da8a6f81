"""A seed's signed word that it checked a whole blob's sha256 ("verify once, not twice").

The seed signs, with its Ed25519 key, the blob's OCI digest, its size and a BLAKE3 hash of
the piece digests it computed from the bytes whose sha256 it checked. A peer holding the
seed's public key, whose every piece matched exactly those digests, holds exactly those
bytes and need not hash the blob again. Only the private key can make a signature: not the
cluster secret, not the scheduler that relays it, not any host announcing as a seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import blake3

from p2pdist.config import ConfigError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

SIGNATURE_BYTES = 64
_CONTEXT = b"p2pdist: this seed checked the blob's sha256; its pieces have these BLAKE3 digests. v1\n"


def attested_message(task_id: str, content_length: int, digests: Sequence[bytes]) -> bytes:
    """What a seed signs: the blob's OCI digest, size, and piece digests (hashed), with a fixed
    context string so no other message of ours can be passed off as one."""
    hasher = blake3.blake3()
    for digest in digests:
        hasher.update(digest)
    return b"%s%s\n%d\n%d\n%s" % (_CONTEXT, task_id.encode("ascii"), content_length, len(digests), hasher.digest())


def _crypto_missing(option: str) -> ConfigError:
    return ConfigError(f"{option} needs the 'cryptography' package (pip install 'p2pdist[attest]')")


class Attester:
    """A seed's signing key."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key

    @classmethod
    def load(cls, path: str) -> Attester:
        try:
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
            from cryptography.hazmat.primitives.serialization import load_pem_private_key
        except ImportError:
            raise _crypto_missing("attest_key") from None
        try:
            key = load_pem_private_key(Path(path).read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"cannot load --attest-key (attest_key) {path}: {_why(exc)}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(
                f"--attest-key (attest_key) {path} is not an Ed25519 key (openssl genpkey -algorithm ed25519)"
            )
        return cls(key)

    def sign(self, task_id: str, content_length: int, digests: Sequence[bytes]) -> bytes:
        return self._key.sign(attested_message(task_id, content_length, digests))


class AttestationCheck:
    """The public keys of the seeds a peer takes an attestation from."""

    def __init__(self, keys: Sequence[Ed25519PublicKey]) -> None:
        self._keys = list(keys)

    @classmethod
    def load(cls, path: str) -> AttestationCheck:
        """One or more PEM public keys, concatenated in one file (a key per seed, or one shared)."""
        try:
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
            from cryptography.hazmat.primitives.serialization import load_pem_public_key
        except ImportError:
            raise _crypto_missing("attest_public_key") from None
        try:
            text = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot load --attest-public-key (attest_public_key) {path}: {_why(exc)}") from None
        end = b"-----END PUBLIC KEY-----"
        keys = []
        for block in text.split(end)[:-1]:
            try:
                key = load_pem_public_key(block.strip() + b"\n" + end + b"\n")
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"cannot load --attest-public-key (attest_public_key) {path}: {_why(exc)}") from None
            if not isinstance(key, Ed25519PublicKey):
                raise ConfigError(f"--attest-public-key (attest_public_key) {path} holds a key that is not Ed25519")
            keys.append(key)
        if not keys:
            raise ConfigError(f"--attest-public-key (attest_public_key) {path} holds no PEM public key")
        return cls(keys)

    def verify(self, signature: bytes, task_id: str, content_length: int, digests: Sequence[bytes]) -> bool:
        """Whether one of the seeds' keys signed exactly this blob, size and list of digests."""
        from cryptography.exceptions import InvalidSignature

        if len(signature) != SIGNATURE_BYTES:
            return False
        message = attested_message(task_id, content_length, digests)
        for key in self._keys:
            try:
                key.verify(signature, message)
            except InvalidSignature:
                continue
            return True
        return False


def _why(exc: BaseException) -> str:
    return str(getattr(exc, "strerror", None) or exc).splitlines()[0][:200]
