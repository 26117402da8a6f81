"""The on-disk piece store: atomic piece writes, restart verification, disk-full handling."""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path

import pytest

from p2pdist.content.digest import piece_digest
from p2pdist.content.pieces import MiB, PieceLayout
from p2pdist.errors import BadRequest, StoreError
from p2pdist.storage.store import PieceWriter, Store, TaskStore

TASK = "sha256:" + "ab" * 32
TASK2 = "sha256:" + "cd" * 32
SIZE = 5 * MiB  # pieces of 2, 2, 1 MiB
PIECE = 2 * MiB


def piece_bytes(task: TaskStore, number: int) -> bytes:
    return bytes([number + 1]) * task.layout.length(number)


def put(task: TaskStore, number: int, data: bytes | None = None) -> None:
    writer = task.new_piece(number)
    payload = piece_bytes(task, number) if data is None else data
    for i in range(0, len(payload), 1 << 20):
        writer.write(payload[i : i + (1 << 20)])
    writer.commit()


def files(task: TaskStore) -> set[str]:
    return {p.name for p in task.root.iterdir()}


def tmp_files(task: TaskStore) -> list[str]:
    return [n for n in files(task) if n.endswith(".tmp")]


def fed(task: TaskStore, number: int) -> bytes:
    """A piece's bytes as TaskStore.feed hands them over."""
    got: list[bytes] = []
    task.feed(number, lambda view: got.append(bytes(view)))
    return b"".join(got)


def test_feed_refuses_a_piece_file_shorter_than_its_piece(store: Store) -> None:
    task = store.open(TASK, SIZE)
    put(task, 1)
    with open(task.path(1), "r+b") as f:
        f.truncate(100)
    with pytest.raises(StoreError, match="shorter than expected"):
        fed(task, 1)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "data")


def test_write_commit_makes_piece_visible(store: Store) -> None:
    task = store.open(TASK, SIZE, "http://o/x")
    assert task.layout.count == 3
    assert not task.has(2)
    put(task, 2)
    assert task.has(2) and not task.has(0)
    assert fed(task, 2) == piece_bytes(task, 2)
    assert task.path(2).name == "000002"
    assert task.path(2).read_bytes() == piece_bytes(task, 2)
    assert tmp_files(task) == []
    assert store.get(TASK) is task
    with pytest.raises(BadRequest):
        store.get("nope")


def test_not_visible_before_commit(store: Store) -> None:
    task = store.open(TASK, SIZE)
    writer = task.new_piece(0)
    writer.write(b"x" * 100)
    assert not task.has(0)
    assert not task.path(0).exists()
    assert len(tmp_files(task)) == 1
    writer.abort()
    assert tmp_files(task) == []


def test_abort_leaves_nothing(store: Store) -> None:
    task = store.open(TASK, SIZE)
    writer = task.new_piece(1)
    writer.write(piece_bytes(task, 1))  # complete but not committed (e.g. digest mismatch)
    writer.abort()
    writer.abort()  # idempotent
    assert not task.has(1)
    assert not task.path(1).exists()
    assert tmp_files(task) == []


def test_exception_path_leaves_nothing(store: Store) -> None:
    task = store.open(TASK, SIZE)
    writer: PieceWriter | None = None
    with pytest.raises(RuntimeError):
        try:
            writer = task.new_piece(0)
            writer.write(b"a" * 1000)
            raise RuntimeError("connection dropped")
        finally:
            if writer is not None:
                writer.abort()
    assert not task.has(0) and tmp_files(task) == [] and not task.path(0).exists()


@pytest.mark.parametrize("length", [0, 1 << 20, PIECE - 1])
def test_commit_wrong_length(store: Store, length: int) -> None:
    task = store.open(TASK, SIZE)
    writer = task.new_piece(0)
    writer.write(b"z" * length)
    with pytest.raises(StoreError, match=f"{length} of {PIECE} bytes"):
        writer.commit()
    assert not task.has(0)
    assert not task.path(0).exists()
    assert tmp_files(task) == []


def test_write_past_piece_length_rejected(store: Store) -> None:
    task = store.open(TASK, SIZE)
    writer = task.new_piece(2)
    writer.write(b"z" * MiB)
    with pytest.raises(StoreError, match="longer than"):
        writer.write(b"z")
    writer.abort()
    assert tmp_files(task) == [] and not task.path(2).exists()


def test_new_piece_out_of_range(store: Store) -> None:
    task = store.open(TASK, SIZE)
    with pytest.raises(IndexError):
        task.new_piece(3)


def test_drop(store: Store) -> None:
    task = store.open(TASK, SIZE)
    put(task, 0)
    task.drop(0)
    task.drop(0)
    assert not task.has(0) and not task.path(0).exists()


def test_empty_blob(store: Store) -> None:
    task = store.open(TASK, 0)
    assert task.layout.count == 1
    writer = task.new_piece(0)
    writer.commit()
    assert task.complete()
    assert fed(task, 0) == b""


def test_open_with_other_size_starts_afresh(store: Store) -> None:
    task = store.open(TASK, SIZE)
    put(task, 0)
    assert store.open(TASK, SIZE) is task
    fresh = store.open(TASK, SIZE + 1)
    assert fresh is not task
    assert not fresh.has(0)
    assert not fresh.path(0).exists()


def test_open_with_another_piece_size_starts_afresh(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    """A scheduler that cuts the task otherwise than the store holds it: the pieces held are
    not the task's pieces, so none is kept (they would fail at every child)."""
    task = store.open(TASK, SIZE, piece_size=4 * MiB)
    put(task, 0)
    assert store.open(TASK, SIZE, piece_size=4 * MiB) is task
    with caplog.at_level(logging.INFO, logger="p2pdist.store"):
        fresh = store.open(TASK, SIZE, piece_size=PIECE)
    assert fresh is not task and fresh.layout.piece_size == PIECE and fresh.layout.count == 3
    assert not fresh.has(0) and not fresh.path(0).exists()
    assert "starting afresh" in caplog.text
    # No piece size: the rule's (a node no scheduler told, back to source).
    assert store.open(TASK, SIZE) is fresh


def test_the_piece_size_is_kept_in_the_meta_and_reloaded(tmp_path: Path) -> None:
    first = Store(tmp_path)
    task = first.open(TASK, SIZE, piece_size=MiB)
    put(task, 4)
    task.save_digests(digests_of(task))
    assert json.loads((task.root / "meta.json").read_text())["piece_size"] == MiB

    again = Store(tmp_path)
    assert again.load() == 1
    loaded = again.get(TASK)
    assert loaded is not None and loaded.layout == PieceLayout(SIZE, MiB) and sorted(loaded.pieces) == [4]
    assert fed(loaded, 4) == piece_bytes(task, 4)


def test_a_meta_without_piece_size_reloads_with_the_old_rule(tmp_path: Path) -> None:
    """A store written by a version from before the piece size travelled with the task: its
    pieces were cut by the old rule (4 MiB for this blob), and they are reused as such."""
    first = Store(tmp_path)
    task = first.open(TASK, SIZE, "http://o/blob", piece_size=4 * MiB)
    put(task, 0)
    put(task, 1)
    task.save_digests(digests_of(task))
    (task.root / "meta.json").write_text(json.dumps({"task_id": TASK, "content_length": SIZE, "url": "http://o/blob"}))

    again = Store(tmp_path)
    assert again.load() == 2
    loaded = again.get(TASK)
    assert loaded is not None and loaded.layout == PieceLayout(SIZE, 4 * MiB)
    assert fed(loaded, 1) == piece_bytes(task, 1)
    # The scheduler now cuts it in 2 MiB pieces: those 4 MiB pieces are not reused.
    assert not again.open(TASK, SIZE, piece_size=PIECE).pieces.to_int()


@pytest.mark.parametrize("piece_size", [3 * MiB, 0, "2MiB", 128 * MiB])
def test_a_meta_with_a_bad_piece_size_is_discarded(tmp_path: Path, piece_size: object) -> None:
    first = Store(tmp_path)
    task = first.open(TASK, SIZE)
    put(task, 0)
    task.save_digests(digests_of(task))
    meta = {"task_id": TASK, "content_length": SIZE, "piece_size": piece_size}
    (task.root / "meta.json").write_text(json.dumps(meta))
    again = Store(tmp_path)
    assert again.load() == 0 and again.get(TASK) is None and not task.root.exists()


def digests_of(task: TaskStore) -> list[bytes]:
    return [piece_digest(piece_bytes(task, n)) for n in range(task.layout.count)]


def test_load_after_restart_keeps_verified_pieces(tmp_path: Path) -> None:
    first = Store(tmp_path)
    task = first.open(TASK, SIZE, "http://o/blob")
    put(task, 0)
    put(task, 2)
    task.save_digests(digests_of(task))
    assert task.load_digests() == digests_of(task)

    again = Store(tmp_path)
    assert again.load() == 2
    loaded = again.get(TASK)
    assert loaded is not None
    assert loaded.url == "http://o/blob"
    assert loaded.layout.blob_size == SIZE
    assert sorted(loaded.pieces) == [0, 2]
    assert fed(loaded, 2) == piece_bytes(loaded, 2)


def test_load_drops_corrupted_and_unverifiable_pieces(tmp_path: Path) -> None:
    first = Store(tmp_path)
    task = first.open(TASK, SIZE)
    for n in range(3):
        put(task, n)
    task.save_digests(digests_of(task))
    # Flip one byte of piece 1 on disk; truncate piece 2.
    raw = bytearray(task.path(1).read_bytes())
    raw[12345] ^= 0xFF
    task.path(1).write_bytes(bytes(raw))
    with open(task.path(2), "r+b") as f:
        f.truncate(100)
    # A second task whose digests were never saved: nothing can be verified.
    other = first.open(TASK2, 1000)
    put(other, 0)

    again = Store(tmp_path)
    assert again.load() == 1
    loaded = again.get(TASK)
    assert loaded is not None and sorted(loaded.pieces) == [0]
    assert not loaded.path(1).exists()
    assert not loaded.path(2).exists()
    loaded2 = again.get(TASK2)
    assert loaded2 is not None and len(loaded2.pieces) == 0
    assert not loaded2.path(0).exists()


def test_load_sweeps_temp_files(tmp_path: Path) -> None:
    first = Store(tmp_path)
    task = first.open(TASK, SIZE)
    put(task, 0)
    task.save_digests(digests_of(task))
    writer = task.new_piece(1)  # a crash mid-write leaves this behind
    writer.write(b"q" * 10)
    (task.root / ".digests.bin.dead.tmp").write_bytes(b"junk")
    assert len(tmp_files(task)) == 2

    again = Store(tmp_path)
    assert again.load() == 1
    assert tmp_files(task) == []
    assert {"000000", "meta.json", "digests.bin"} == files(task)


def test_load_discards_unreadable_task_dir(tmp_path: Path) -> None:
    first = Store(tmp_path)
    task = first.open(TASK, SIZE)
    put(task, 0)
    (task.root / "meta.json").write_text("{not json")
    (first.root / "stray-file").write_text("x")
    again = Store(tmp_path)
    assert again.load() == 0
    assert again.get(TASK) is None
    assert not task.root.exists()


def test_disk_full_on_write(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    task = store.open(TASK, SIZE)
    writer = task.new_piece(0)
    writer.write(b"a" * 1000)

    def full(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(StoreError, match="disk full"):
        writer.write(b"b" * 1000)
    monkeypatch.undo()
    assert not task.has(0)
    assert not task.path(0).exists()
    assert tmp_files(task) == []
    # The writer aborted: committing afterwards must not publish anything.
    with pytest.raises((StoreError, AssertionError)):
        writer.commit()
    assert not task.path(0).exists()


def test_disk_full_on_digests(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    task = store.open(TASK, SIZE)

    def full(self: Path, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(StoreError, match="disk full"):
        task.save_digests([b"x" * 32])
    monkeypatch.undo()
    assert not (task.root / "digests.bin").exists()
    assert tmp_files(task) == []


def test_other_os_error_reported(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    task = store.open(TASK, SIZE)
    writer = task.new_piece(0)

    def broken(fd: int, data: object) -> int:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "write", broken)
    with pytest.raises(StoreError, match="Input/output error"):
        writer.write(b"a")
    monkeypatch.undo()
    assert tmp_files(task) == []


def test_remove(store: Store) -> None:
    task = store.open(TASK, SIZE)
    put(task, 0)
    store.remove(TASK)
    assert store.get(TASK) is None
    assert not task.root.exists()
    store.remove(TASK)  # twice is fine


def test_a_piece_placed_then_abandoned_is_not_left_behind(store: Store) -> None:
    """A download renames a verified piece in its receiving thread (place), then counts it on
    the event loop (commit); cancelled in between, it must leave no piece file the store does
    not count."""
    task = store.open(TASK, SIZE)
    writer = task.new_piece(0)
    assert tmp_files(task) == []  # the file is made at the first write, where that runs
    writer.write(b"a" * task.layout.length(0))
    writer.place()
    assert task.path(0).exists() and not task.has(0)
    writer.abort()
    assert not task.path(0).exists() and tmp_files(task) == []
    again = task.new_piece(0)
    again.write(b"b" * task.layout.length(0))
    again.place()
    again.commit()
    again.abort()  # after commit: the piece is the store's
    assert task.has(0) and task.path(0).read_bytes() == b"b" * task.layout.length(0)
