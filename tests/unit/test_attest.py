"""Verify once: a seed's signature over a blob's digest, size and piece digests checks only
for exactly those, only with that seed's key, and the scheduler relays it to peers only once
the seed said it checked the whole blob (and forgets it with the digests)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pdist.config import ConfigError, SchedulerConfig
from p2pdist.content.attest import AttestationCheck, Attester
from p2pdist.content.pieces import MiB, PieceLayout
from p2pdist.wire import AnnounceHost, Register, SeedProgress, Sync
from scheduler.state import Scheduler

TASK = "sha256:" + "ab" * 32
SIZE = 10 * MiB
DIGESTS = [bytes([i]) * 32 for i in range(PieceLayout.for_blob(SIZE).count)]


def write_keys(tmp_path: Path, name: str) -> tuple[str, str]:
    key = Ed25519PrivateKey.generate()
    private = tmp_path / f"{name}.pem"
    public = tmp_path / f"{name}.pub.pem"
    private.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return str(private), str(public)


def test_a_signature_checks_for_exactly_the_blob_size_and_digests_it_was_made_for(tmp_path: Path) -> None:
    private, public = write_keys(tmp_path, "seed")
    signature = Attester.load(private).sign(TASK, SIZE, DIGESTS)
    check = AttestationCheck.load(public)
    assert check.verify(signature, TASK, SIZE, DIGESTS)
    other_digests = [*DIGESTS[:-1], b"\xff" * 32]
    assert not check.verify(signature, TASK, SIZE, other_digests)
    assert not check.verify(signature, TASK, SIZE + 1, DIGESTS)
    assert not check.verify(signature, "sha256:" + "cd" * 32, SIZE, DIGESTS)
    assert not check.verify(signature, TASK, SIZE, DIGESTS[:-1])
    assert not check.verify(b"\x00" * 64, TASK, SIZE, DIGESTS)
    assert not check.verify(b"short", TASK, SIZE, DIGESTS)


def test_another_seeds_key_does_not_make_a_signature_the_peer_takes(tmp_path: Path) -> None:
    _, trusted = write_keys(tmp_path, "trusted")
    rogue, _ = write_keys(tmp_path, "rogue")
    signature = Attester.load(rogue).sign(TASK, SIZE, DIGESTS)
    assert not AttestationCheck.load(trusted).verify(signature, TASK, SIZE, DIGESTS)


def test_a_file_of_several_public_keys_takes_any_of_them(tmp_path: Path) -> None:
    first_private, first_public = write_keys(tmp_path, "a")
    second_private, second_public = write_keys(tmp_path, "b")
    both = tmp_path / "both.pem"
    both.write_bytes(Path(first_public).read_bytes() + Path(second_public).read_bytes())
    check = AttestationCheck.load(str(both))
    for private in (first_private, second_private):
        assert check.verify(Attester.load(private).sign(TASK, SIZE, DIGESTS), TASK, SIZE, DIGESTS)


def test_a_key_file_that_is_not_an_ed25519_key_is_a_config_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a key\n")
    with pytest.raises(ConfigError, match="attest_key"):
        Attester.load(str(junk))
    with pytest.raises(ConfigError, match="no PEM public key"):
        AttestationCheck.load(str(junk))
    with pytest.raises(ConfigError, match="cannot load"):
        AttestationCheck.load(str(tmp_path / "missing.pem"))


def _scheduler_with_a_task() -> Scheduler:
    s = Scheduler(SchedulerConfig(), rng=random.Random(7))
    for host, kind in (("seed1", "seed"), ("p1", "peer")):
        s.announce(AnnounceHost(host_id=host, url=f"http://{host}:4000", kind=kind, upload_slots=4, tasks=[]), 0.0)  # type: ignore[arg-type]
    s.register(Register(host_id="p1", task_id=TASK, url="http://o:5000/v2/x/blobs/" + TASK, headers={}), 1.0)
    return s


def _progress(done: bool, attestation: bytes, *, error: str = "") -> SeedProgress:
    return SeedProgress(
        host_id="seed1",
        task_id=TASK,
        content_length=SIZE,
        first_digest=0,
        piece_digests=DIGESTS,
        done=done,
        error=error,
        piece_size=PieceLayout.for_blob(SIZE).piece_size,  # as a seed cutting by the rule says
        attestation=attestation,
    )


def test_the_scheduler_relays_a_seeds_attestation_only_once_the_seed_is_done() -> None:
    s = _scheduler_with_a_task()
    s.seed_progress(_progress(False, b"\x01" * 64), 2.0)
    reply, _ = s.sync(Sync(host_id="p1", task_id=TASK), 3.0)
    assert reply.attestation == b""
    s.seed_progress(_progress(True, b"\x01" * 64), 4.0)
    reply, _ = s.sync(Sync(host_id="p1", task_id=TASK), 5.0)
    assert reply.state == "running" and reply.attestation == b"\x01" * 64


def test_a_seed_failure_that_drops_the_digests_drops_the_attestation_too() -> None:
    s = _scheduler_with_a_task()
    s.seed_progress(_progress(True, b"\x01" * 64), 2.0)
    s.seed_progress(_progress(False, b"", error="origin sent garbage"), 3.0)
    assert s.tasks[TASK].attestation == b""
    assert s.tasks[TASK].digests == []
