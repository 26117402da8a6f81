"""`p2pdist get`'s receiving end: a response body to a file, its sha256 computed beside it.

Into a regular file the body moves with splice (socket → pipe → file): the kernel copies each
byte once, into the page cache, where read-then-write copies it twice. A second thread hashes
what has been written, mapped from the page cache, while the next bytes arrive: on two cores
the sha256 costs no wall time. Other outputs (a pipe, /dev/null) are read into a large buffer
and written, with the same hashing thread behind them.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import queue
import select
import socket
import stat
import threading
from collections.abc import Callable
from typing import Protocol

from p2pdist.errors import GetError

PIPE_BYTES = 1 << 20  # the pipe splice goes through: Linux's default pipe-max-size
HASH_BYTES = 8 << 20  # the hashing thread is handed the file this much at a time
RECV_BYTES = 4 << 20
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


class RunningHash(Protocol):
    def update(self, data: bytes | memoryview, /) -> None: ...


class _FileHasher:
    """Hashes a file's bytes in a thread, in the order and spans it is told they were written,
    mapped from the page cache. Hashlib releases the GIL for large updates, so this runs beside
    the receiving thread."""

    def __init__(self, fd: int, sha: RunningHash) -> None:
        self.fd = fd
        self.sha = sha
        self.error: BaseException | None = None
        self._spans: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="get-sha256", daemon=True)
        self._thread.start()

    def written(self, offset: int, length: int) -> None:
        self._spans.put((offset, length))

    def finish(self) -> None:
        """Wait until every span handed over is hashed; re-raise what the thread hit."""
        self._spans.put(None)
        self._thread.join()
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        while (span := self._spans.get()) is not None:
            if self.error is not None:
                continue
            offset, length = span
            try:
                # mmap offsets are page-aligned; spans start at multiples of HASH_BYTES but
                # the first may follow a few bytes read with the head.
                aligned = offset - offset % mmap.ALLOCATIONGRANULARITY
                with mmap.mmap(self.fd, offset + length - aligned, offset=aligned, access=mmap.ACCESS_READ) as mapped:
                    with memoryview(mapped) as view, view[offset - aligned :] as data:
                        self.sha.update(data)
            except BaseException as exc:  # re-raised in the receiving thread by finish()
                self.error = exc


def _wait_readable(sock: socket.socket, timeout_s: float | None) -> None:
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    if not poller.poll(None if timeout_s is None else int(timeout_s * 1000)):
        raise TimeoutError("timed out waiting for the peer")


def receive_to_file(
    sock: socket.socket,
    first: bytes,
    length: int,
    fd: int,
    sha: RunningHash,
    on_bytes: Callable[[int], None],
    output: str,
) -> int:
    """Move `first` and then `length - len(first)` more bytes of the socket into the regular
    file `fd` (at its start; opened for reading too), hashing all of them into `sha`; returns the bytes received,
    short of `length` only if the peer closed the connection. A write error is a GetError
    naming `output`; a socket error raises its OSError."""
    hasher = _FileHasher(fd, sha)
    received = hashed = 0
    try:
        if first:
            _write_all(fd, first, output)
            received = len(first)
            on_bytes(received)
        read_pipe, write_pipe = os.pipe()
        try:
            with contextlib.suppress(OSError):  # a smaller pipe only means more calls
                fcntl.fcntl(write_pipe, _F_SETPIPE_SZ, PIPE_BYTES)
            timeout_s = sock.gettimeout()
            while received < length:
                try:
                    n = os.splice(sock.fileno(), write_pipe, min(PIPE_BYTES, length - received))
                except BlockingIOError:
                    _wait_readable(sock, timeout_s)
                    continue
                if n == 0:
                    break
                moved = 0
                while moved < n:
                    try:
                        moved += os.splice(read_pipe, fd, n - moved)
                    except OSError as exc:
                        raise _write_failed(output, exc) from None
                received += n
                on_bytes(n)
                if received - hashed >= HASH_BYTES:
                    hasher.written(hashed, received - hashed)
                    hashed = received
        finally:
            os.close(read_pipe)
            os.close(write_pipe)
    finally:
        if received > hashed:
            hasher.written(hashed, received - hashed)
        hasher.finish()
    return received


def splice_works(fd: int) -> bool:
    """Whether `fd` is a regular file splice can write to (it can on every local filesystem
    Linux has; the check keeps devices and pipes on the plain path)."""
    try:
        return hasattr(os, "splice") and stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        return False


def receive_to_stream(
    read_into: Callable[[memoryview], int],
    write: Callable[[memoryview], object],
    sha: RunningHash,
    on_bytes: Callable[[int], None],
    output: str,
) -> int:
    """Read with `read_into` until it returns 0, writing each buffer with `write` and hashing
    it in a second thread meanwhile (two buffers take turns). Returns the bytes received; a
    write error is a GetError naming `output`."""
    buffers = [bytearray(RECV_BYTES), bytearray(RECV_BYTES)]
    received = 0
    hashing: threading.Thread | None = None
    failure: list[BaseException] = []

    def hash_view(view: memoryview) -> None:
        try:
            sha.update(view)
        except BaseException as exc:
            failure.append(exc)

    turn = 0
    try:
        while True:
            view = memoryview(buffers[turn])
            n = read_into(view)
            if not n:
                break
            try:
                write(view[:n])
            except OSError as exc:
                raise _write_failed(output, exc) from None
            if hashing is not None:
                hashing.join()  # its buffer is the next one read into
            hashing = threading.Thread(target=hash_view, args=(view[:n],), daemon=True)
            hashing.start()
            received += n
            on_bytes(n)
            turn ^= 1
    finally:
        if hashing is not None:
            hashing.join()
    if failure:
        raise failure[0]
    return received


def _write_all(fd: int, data: bytes, output: str) -> None:
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view) :]
    except OSError as exc:
        raise _write_failed(output, exc) from None


def _write_failed(output: str, exc: OSError) -> GetError:
    return GetError(f"cannot write {output}: {exc.strerror or exc}")
