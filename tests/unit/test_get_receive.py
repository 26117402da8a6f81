"""`p2pdist get`'s receiving end: what lands in the file, and its sha256, are the bytes sent,
whether spliced into a file or read into a stream; a short body is reported short."""

from __future__ import annotations

import hashlib
import io
import os
import socket
import threading
from pathlib import Path

import pytest

from p2pdist.cli.receive import HASH_BYTES, receive_to_file, receive_to_stream, splice_works
from p2pdist.errors import GetError


def _send_in_thread(sock: socket.socket, data: bytes) -> threading.Thread:
    def send() -> None:
        sock.sendall(data)
        sock.close()

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("size", [0, 1, 4096 + 3, HASH_BYTES, 2 * HASH_BYTES + 12345])
def test_a_spliced_body_lands_whole_in_the_file_and_its_sha256_is_of_those_bytes(tmp_path: Path, size: int) -> None:
    body = os.urandom(size)
    first, rest = body[:100], body[100:]
    ours, theirs = socket.socketpair()
    ours.settimeout(10)
    sender = _send_in_thread(theirs, rest)
    sha = hashlib.sha256()
    counted: list[int] = []
    with open(tmp_path / "out", "w+b") as f:
        assert splice_works(f.fileno())
        got = receive_to_file(ours, first, len(body), f.fileno(), sha, counted.append, "out")
    sender.join()
    ours.close()
    assert got == size == sum(counted)
    assert (tmp_path / "out").read_bytes() == body
    assert sha.hexdigest() == hashlib.sha256(body).hexdigest()


def test_a_body_cut_short_is_reported_by_its_count(tmp_path: Path) -> None:
    ours, theirs = socket.socketpair()
    ours.settimeout(10)
    sender = _send_in_thread(theirs, b"x" * 1000)
    with open(tmp_path / "out", "w+b") as f:
        got = receive_to_file(ours, b"", 5000, f.fileno(), hashlib.sha256(), lambda n: None, "out")
    sender.join()
    ours.close()
    assert got == 1000


def test_a_stream_body_is_written_in_order_and_hashed(tmp_path: Path) -> None:
    body = os.urandom(9 << 20)
    source = io.BytesIO(body)
    sink = io.BytesIO()
    sha = hashlib.sha256()
    got = receive_to_stream(source.readinto, sink.write, sha, lambda n: None, "out")
    assert got == len(body)
    assert sink.getvalue() == body
    assert sha.hexdigest() == hashlib.sha256(body).hexdigest()


def test_a_failed_write_is_a_write_failure_not_a_transfer_failure() -> None:
    def full(_: memoryview) -> int:
        raise OSError(28, "No space left on device")

    with pytest.raises(GetError, match="^cannot write out: No space left on device$"):
        receive_to_stream(io.BytesIO(b"abc").readinto, full, hashlib.sha256(), lambda n: None, "out")


def test_a_device_is_not_spliced_into() -> None:
    with open(os.devnull, "wb") as f:
        assert not splice_works(f.fileno())
