"""The piece server's upload slots: a full server keeps a short line, hands a finished upload's
slot to the next in line, and answers busy when the wait runs out; every answer about a held
task's piece says what the server holds (its news, without a poll)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import trio

from p2pdist.node.metrics import DaemonMetrics
from p2pdist.node.pieceserver import PIECES_HEADER, QUEUE_WAIT_S, PieceServer, parse_pieces_header
from p2pdist.storage.store import Store
from p2pdist.transport.server import FileBody, Request

BLOB = bytes(range(256)) * 4096  # 1 MiB: one piece
TASK = "sha256:" + hashlib.sha256(BLOB).hexdigest()


def server(tmp_path: Path, *, slots: int) -> PieceServer:
    store = Store(tmp_path)
    task = store.open(TASK, len(BLOB))
    writer = task.new_piece(0)
    writer.write(BLOB)
    writer.commit()
    return PieceServer(store, DaemonMetrics("peer"), slots)


def get(pieces: PieceServer) -> Request:
    path = f"/v1/tasks/{TASK}/pieces/0"
    return Request("GET", path, path, {}, {}, ("127.0.0.1", 1))


async def test_a_full_server_queues_then_answers_busy(tmp_path: Path) -> None:
    pieces = server(tmp_path, slots=1)
    first = await pieces.handle(get(pieces))
    assert first.status == 200 and isinstance(first.body, FileBody)
    started = trio.current_time()
    second = await pieces.handle(get(pieces))
    assert second.status == 503
    assert trio.current_time() - started >= QUEUE_WAIT_S * 0.9  # it waited in line first


async def wait_in_line(pieces: PieceServer, statuses: list[int]) -> None:
    """Ask for a piece and note the status of the answer, after any wait in the server's line."""
    statuses.append((await pieces.handle(get(pieces))).status)


async def test_a_finished_upload_hands_its_slot_to_the_next_in_line(tmp_path: Path) -> None:
    pieces = server(tmp_path, slots=1)
    first = await pieces.handle(get(pieces))
    statuses: list[int] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait_in_line, pieces, statuses)
        await trio.sleep(QUEUE_WAIT_S / 5)
        assert isinstance(first.body, FileBody) and first.body.on_done is not None
        first.body.on_done()
    assert statuses == [200]


async def test_piece_and_busy_answers_say_what_the_server_holds(tmp_path: Path) -> None:
    pieces = server(tmp_path, slots=1)
    first = await pieces.handle(get(pieces))
    busy = await pieces.handle(get(pieces))
    assert (first.status, busy.status) == (200, 503)
    for answer in (first, busy):
        said = dict(answer.headers)[PIECES_HEADER]
        assert said == "1 gA=="  # one piece held: version 1, bitmap 0b1000_0000
        assert parse_pieces_header(said, 1) == (1, b"\x80")


def test_a_pieces_header_that_is_not_one_is_ignored() -> None:
    assert parse_pieces_header("3 4A==", 3) == (3, b"\xe0")
    for bad in ("", "3", "x 4A==", "-1 4A==", "3 4A=", "3 !!!!", "3 4OA=", "\u00b2 4A==", "1234567890 4A=="):
        assert parse_pieces_header(bad, 3) is None, bad


async def test_answers_that_need_no_wait_are_given_at_once_and_a_wait_in_line_is_left_to_handle(
    tmp_path: Path,
) -> None:
    pieces = server(tmp_path, slots=1)
    first = pieces.answer_now(get(pieces))
    assert first is not None and first.status == 200 and isinstance(first.body, FileBody)
    assert pieces.answer_now(get(pieces)) is None  # the line has room: handle() waits in it
    statuses: list[int] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait_in_line, pieces, statuses)
        await trio.sleep(QUEUE_WAIT_S / 5)
        busy = pieces.answer_now(get(pieces))  # slot and line full: busy, at once
        assert busy is not None and busy.status == 503
        assert dict(busy.headers)[PIECES_HEADER] == "1 gA=="
        assert first.body.on_done is not None
        first.body.on_done()
    assert statuses == [200]
    path = f"/v1/tasks/{TASK}/news"
    assert pieces.answer_now(Request("GET", path, path, {}, {}, ("127.0.0.1", 1))) is None
