"""The on-disk piece store: one directory per task, one file per verified piece.

A piece file exists under its final name only after its bytes were verified and written in
full to a temporary file that was then renamed, so a crash never leaves a piece that looks
complete but isn't. Temporary files are swept at start-up.
"""

from __future__ import annotations

import errno
import json
import logging
import mmap
import os
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from p2pdist.content.digest import digest_hex, parse_digest, piece_digest
from p2pdist.content.pieces import Bitmap, PieceLayout, piece_size_for, piece_size_problem, piece_size_read
from p2pdist.errors import StoreError

log = logging.getLogger("p2pdist.store")

_META = "meta.json"
_DIGESTS = "digests.bin"
_VERIFIED = "sha256-verified"


@dataclass
class TaskStore:
    """The pieces of one blob held on this host."""

    task_id: str
    root: Path
    layout: PieceLayout
    pieces: Bitmap
    url: str = ""
    last_used: float = 0.0  # wall-clock time, for the cache quota's LRU order
    # Called with the task id after each piece is renamed into place (Store.on_piece).
    on_piece: Callable[[str], None] | None = field(default=None, repr=False, compare=False)

    def path(self, number: int) -> Path:
        self.layout.check(number)
        return self.root / f"{number:06d}"

    def has(self, number: int) -> bool:
        return number in self.pieces

    def complete(self) -> bool:
        return self.pieces.complete()

    def new_piece(self, number: int) -> PieceWriter:
        self.layout.check(number)
        return PieceWriter(self, number)

    def drop(self, number: int) -> None:
        self.pieces.discard(number)
        try:
            self.path(number).unlink()
        except FileNotFoundError:
            pass

    def save_digests(self, digests: list[bytes]) -> None:
        _atomic_write(self.root / _DIGESTS, b"".join(digests))

    def load_digests(self) -> list[bytes]:
        try:
            raw = (self.root / _DIGESTS).read_bytes()
        except FileNotFoundError:
            return []
        return [raw[i : i + 32] for i in range(0, len(raw) - len(raw) % 32, 32)]

    def mark_verified(self) -> None:
        """The whole blob's sha256 checked out: this host may offer it whole to its site."""
        _atomic_write(self.root / _VERIFIED, b"")

    def verified(self) -> bool:
        """Every piece is held and the blob's sha256 was checked (the marker goes with the
        directory when the task is removed or started afresh)."""
        return self.complete() and (self.root / _VERIFIED).exists()

    def feed(self, number: int, consume: Callable[[memoryview], None]) -> None:
        """Pass a held piece's bytes to `consume` in one call, mapped from the page cache rather
        than copied out of it: hashing a whole blob then reads each byte once."""
        length = self.layout.length(number)
        if length == 0:
            consume(memoryview(b""))
            return
        with open(self.path(number), "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            if len(mapped) < length:
                raise StoreError(f"piece {number} of {self.task_id[:19]} is shorter than expected")
            with memoryview(mapped) as view, view[:length] as piece:
                consume(piece)


class PieceWriter:
    """Writes one piece to a temporary file; `place` renames it to its final name once the
    caller has verified it, and `commit` counts it as held. The file is created at the first
    write: a download receiving in a worker thread creates, writes and renames it there, off
    the event loop (a loaded loop paid for those file operations on every piece)."""

    def __init__(self, task: TaskStore, number: int) -> None:
        self.task = task
        self.number = number
        self.expected = task.layout.length(number)
        self.written = 0
        self.tmp = task.root / f".{number:06d}.{secrets.token_hex(4)}.tmp"
        self._fd: int | None = None
        self._aborted = False
        self._placed = False  # renamed to its final name, not yet counted as held
        self._committed = False

    def _open(self) -> int:
        if self._fd is None:
            if self._aborted:
                raise StoreError(f"piece {self.number} was abandoned")
            try:
                self._fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except OSError as exc:
                raise _store_error(exc, f"cannot create piece {self.number}") from None
        return self._fd

    def write(self, data: bytes | memoryview) -> None:
        if self.written + len(data) > self.expected:
            raise StoreError(f"piece {self.number} longer than {self.expected} bytes")
        fd = self._open()
        view = memoryview(data)
        try:
            while view:
                n = os.write(fd, view)
                view = view[n:]
        except OSError as exc:
            self.abort()
            raise _store_error(exc, f"cannot write piece {self.number}") from None
        self.written += len(data)

    def place(self) -> None:
        """Close the finished piece and rename it to its final name; the caller has verified its
        digest. Touches only the file (a worker thread may call it); `commit` then counts it."""
        if self._placed or self._committed:
            return
        if self.written != self.expected:
            self.abort()
            raise StoreError(f"piece {self.number} has {self.written} of {self.expected} bytes")
        fd = self._open()  # an empty piece was never written to: its empty file
        self._fd = None
        try:
            os.close(fd)
            os.replace(self.tmp, self.task.path(self.number))
        except OSError as exc:
            self.abort()
            raise _store_error(exc, f"cannot store piece {self.number}") from None
        self._placed = True

    def commit(self) -> None:
        """Rename the finished piece into place (unless `place` did) and count it as held. The
        caller has verified its digest."""
        self.place()
        self._placed = False
        self._committed = True
        self.task.pieces.add(self.number)
        if self.task.on_piece is not None:
            self.task.on_piece(self.task.task_id)

    def abort(self) -> None:
        if self._committed:
            return  # a held piece is the store's now
        self._aborted = True
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None
        # Placed but never counted as held (the caller gave up after the rename): not a piece,
        # unless the same piece came in whole another way meanwhile.
        placed, self._placed = self._placed, False
        if placed and self.task.has(self.number):
            return
        try:
            (self.task.path(self.number) if placed else self.tmp).unlink()
        except FileNotFoundError:
            pass


def _store_error(exc: OSError, what: str) -> StoreError:
    if exc.errno == errno.ENOSPC:
        return StoreError(f"{what}: disk full")
    return StoreError(f"{what}: {exc.strerror or exc}")


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _store_error(exc, f"cannot write {path.name}") from None


def _last_used(root: Path) -> float:
    """Across restarts, the newest piece's time stands in for the last use."""
    try:
        return max(p.stat().st_mtime for p in root.iterdir())
    except (OSError, ValueError):
        return 0.0


class Store:
    """All tasks on this host, under `data_dir/tasks/<hex digest>/`."""

    def __init__(self, data_dir: str | Path) -> None:
        self.root = Path(data_dir) / "tasks"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _store_error(exc, f"cannot create {self.root}") from None
        self.tasks: dict[str, TaskStore] = {}
        self._pins: dict[str, int] = {}
        # Told the task id after any task's piece is stored, whoever wrote it (a download, the
        # seed's or a back-to-source intake): piece news (p2pdist/node/news.py) wakes on it.
        self.on_piece: Callable[[str], None] | None = None

    def get(self, task_id: str) -> TaskStore | None:
        task = self.tasks.get(parse_digest(task_id))
        if task is not None:
            task.last_used = time.time()
        return task

    def pin(self, task_id: str) -> None:
        """Mark a task as being read (a piece or blob being sent): the cache quota keeps it."""
        self._pins[task_id] = self._pins.get(task_id, 0) + 1
        task = self.tasks.get(task_id)
        if task is not None:
            task.last_used = time.time()

    def unpin(self, task_id: str) -> None:
        left = self._pins.get(task_id, 0) - 1
        if left > 0:
            self._pins[task_id] = left
        else:
            self._pins.pop(task_id, None)

    def in_use(self, task_id: str) -> bool:
        return task_id in self._pins

    def open(self, task_id: str, content_length: int, url: str = "", piece_size: int | None = None) -> TaskStore:
        """The task's store, created if new, cut at `piece_size` (None: the rule's, for a node
        no scheduler told). A size or piece size different from the one on disk starts afresh:
        pieces cut otherwise are not the task's."""
        layout = PieceLayout(content_length, piece_size or piece_size_for(content_length))
        task = self.tasks.get(task_id)
        if task is not None and task.layout == layout:
            return task
        root = self.root / digest_hex(task_id)
        if task is not None:
            log.info(
                "task %s: starting afresh: held as %d bytes in pieces of %d, now %d in pieces of %d",
                task_id[:19],
                task.layout.blob_size,
                task.layout.piece_size,
                layout.blob_size,
                layout.piece_size,
            )
            shutil.rmtree(root, ignore_errors=True)
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _store_error(exc, "cannot create task directory") from None
        task = TaskStore(task_id, root, layout, Bitmap(layout.count), url, time.time(), self._piece_stored)
        meta = {"task_id": task_id, "content_length": content_length, "piece_size": layout.piece_size, "url": url}
        _atomic_write(root / _META, json.dumps(meta).encode())
        self.tasks[task_id] = task
        return task

    def _piece_stored(self, task_id: str) -> None:
        if self.on_piece is not None:
            self.on_piece(task_id)

    def remove(self, task_id: str) -> None:
        task = self.tasks.pop(task_id, None)
        if task is not None:
            shutil.rmtree(task.root, ignore_errors=True)

    def load(self) -> int:
        """Re-open tasks left by an earlier run: sweep temp files, keep only pieces that verify.

        Returns the number of pieces kept.
        """
        kept = 0
        for root in sorted(self.root.iterdir()):
            if not root.is_dir():
                continue
            for tmp in root.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)
            try:
                meta = json.loads((root / _META).read_text())
                task_id = parse_digest(meta["task_id"])
                content_length = int(meta["content_length"])
                # Written before the piece size travelled with the task: cut by the old rule.
                piece_size = piece_size_read(content_length, meta.get("piece_size"))
                if (problem := piece_size_problem(piece_size)) is not None:
                    raise ValueError(problem)
                layout = PieceLayout(content_length, piece_size)
            except (OSError, ValueError, KeyError, TypeError, Exception):
                log.warning("discarding unreadable task directory %s", root.name)
                shutil.rmtree(root, ignore_errors=True)
                continue
            task = TaskStore(
                task_id,
                root,
                layout,
                Bitmap(layout.count),
                str(meta.get("url", "")),
                _last_used(root),
                self._piece_stored,
            )
            digests = task.load_digests()
            for number in range(layout.count):
                path = task.path(number)
                if not path.exists():
                    continue
                ok = (
                    number < len(digests)
                    and path.stat().st_size == layout.length(number)
                    and piece_digest(path.read_bytes()) == digests[number]
                )
                if ok:
                    task.pieces.add(number)
                    kept += 1
                else:
                    path.unlink(missing_ok=True)
            self.tasks[task_id] = task
        return kept


def load_host_id(data_dir: Path, prefix: str) -> str:
    """A stable id for this host, kept in the data dir so a restart is the same host."""
    path = data_dir / "host-id"
    try:
        value = path.read_text().strip()
        if value:
            return value
    except FileNotFoundError:
        pass
    value = f"{prefix}-{secrets.token_hex(6)}"
    data_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(value + "\n")
    return value


def open_host(data_dir: Path, kind: str) -> tuple[Store, str]:
    """A daemon's store, with the verified pieces of an earlier run reloaded, and its host id."""
    store = Store(data_dir)
    kept = store.load()
    if kept:
        log.info("reusing %d verified piece(s) from %s", kept, data_dir)
    return store, load_host_id(data_dir, kind)
