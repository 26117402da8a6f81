"""Piece math: Dragonfly's piece-size rule, layouts and bitmaps."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pdist.content.pieces import (
    MAX_PIECE_SIZE,
    MIN_PIECE_SIZE,
    OLD_MIN_PIECE_SIZE,
    Bitmap,
    MiB,
    PieceLayout,
    old_piece_size,
    piece_floor_for_upload,
    piece_size_for,
    piece_size_problem,
    piece_size_read,
    piece_size_sent,
)

GiB = 1 << 30


@pytest.mark.parametrize(
    ("blob_size", "expected"),
    [
        (0, 2 * MiB),
        (1, 2 * MiB),
        (128 * MiB, 2 * MiB),  # the 16-host rollout's blob: 64 pieces
        (500 * 2 * MiB, 2 * MiB),  # exactly 500 pieces of 2 MiB
        (500 * 2 * MiB + 1, 4 * MiB),  # one byte more needs the next power of two
        (GiB - 1, 4 * MiB),
        (GiB, 4 * MiB),  # 1 GiB and larger: as before the floor moved
        (500 * 4 * MiB + 1, 8 * MiB),
        (500 * 8 * MiB, 8 * MiB),
        (500 * 8 * MiB + 1, 16 * MiB),
        (10 * GiB, 32 * MiB),  # 10 GiB / 500 = 20.48 MiB -> 32 MiB
        (500 * 64 * MiB, 64 * MiB),
        (500 * 64 * MiB + 1, 64 * MiB),  # clamped
        (1 << 50, MAX_PIECE_SIZE),
    ],
)
def test_piece_size_for(blob_size: int, expected: int) -> None:
    assert piece_size_for(blob_size) == expected


@pytest.mark.parametrize(
    ("blob_size", "expected"),
    [(0, 4 * MiB), (4 * MiB, 4 * MiB), (128 * MiB, 4 * MiB), (500 * 4 * MiB, 4 * MiB), (500 * 4 * MiB + 1, 8 * MiB)],
)
def test_a_floor_of_4_mib_is_the_old_rule(blob_size: int, expected: int) -> None:
    assert piece_size_for(blob_size, OLD_MIN_PIECE_SIZE) == old_piece_size(blob_size) == expected


@given(st.integers(min_value=GiB, max_value=1 << 45))
def test_blobs_of_1_gib_and_more_keep_their_old_piece_size(size: int) -> None:
    assert piece_size_for(size) == old_piece_size(size)


@pytest.mark.parametrize(
    ("upload_rate", "min_piece", "expected"),
    [
        (None, 2 * MiB, 4 * MiB),  # no cap: a hop is fast, pieces as before
        (None, 1 * MiB, 4 * MiB),
        (None, 8 * MiB, 8 * MiB),  # never under min_piece_bytes
        (8 * MiB, 2 * MiB, 2 * MiB),  # 0.25 s of 8 MiB/s
        (4 * MiB, 1 * MiB, 1 * MiB),
        (4 * MiB, 2 * MiB, 2 * MiB),
        (5 * MiB, 1 * MiB, 2 * MiB),  # rounded up to a power of two
        (1 << 30, 2 * MiB, 4 * MiB),  # never over the old floor
        (0, 2 * MiB, 2 * MiB),
        (-5, 1 * MiB, 1 * MiB),  # nonsense from the wire: the floor
    ],
)
def test_the_floor_follows_an_upload_cap(upload_rate: int | None, min_piece: int, expected: int) -> None:
    assert piece_floor_for_upload(upload_rate, min_piece) == expected


def test_a_piece_size_left_out_of_a_message_means_the_old_rule() -> None:
    size = 128 * MiB
    assert piece_size_sent(size, 4 * MiB) is None  # what an older reader assumes anyway
    assert piece_size_sent(size, 2 * MiB) == 2 * MiB
    assert piece_size_read(size, None) == 4 * MiB
    assert piece_size_read(size, 2 * MiB) == 2 * MiB


@pytest.mark.parametrize(
    ("value", "accepted"),
    [(MiB, True), (2 * MiB, True), (64 * MiB, True), (MiB // 2, False), (128 * MiB, False), (3 * MiB, False)]
    + [(0, False), (-2 * MiB, False), (True, False), ("2097152", False), (2.0 * MiB, False)],
)
def test_only_powers_of_two_from_1_to_64_mib_are_piece_sizes(value: object, accepted: bool) -> None:
    assert (piece_size_problem(value) is None) is accepted


def test_piece_size_negative() -> None:
    with pytest.raises(ValueError):
        piece_size_for(-1)


@given(st.integers(min_value=0, max_value=1 << 45))
def test_piece_size_is_clamped_power_of_two(size: int) -> None:
    ps = piece_size_for(size)
    assert MIN_PIECE_SIZE <= ps <= MAX_PIECE_SIZE
    assert ps & (ps - 1) == 0
    if ps < MAX_PIECE_SIZE:
        assert -(-size // ps) <= 500


def test_layout_last_partial_piece() -> None:
    layout = PieceLayout(10 * MiB + 5, 4 * MiB)
    assert layout.count == 3
    assert layout.span(0) == (0, 4 * MiB)
    assert layout.span(1) == (4 * MiB, 8 * MiB)
    assert layout.span(2) == (8 * MiB, 10 * MiB + 5)
    assert layout.length(2) == 2 * MiB + 5
    assert layout.start(2) == 8 * MiB


def test_layout_exact_multiple() -> None:
    layout = PieceLayout(8 * MiB, 4 * MiB)
    assert layout.count == 2
    assert layout.length(1) == 4 * MiB


def test_layout_for_blob() -> None:
    layout = PieceLayout.for_blob(10 * GiB)
    assert layout.piece_size == 32 * MiB
    assert layout.count == 320


def test_empty_blob_has_one_empty_piece() -> None:
    layout = PieceLayout.for_blob(0)
    assert layout.count == 1
    assert layout.span(0) == (0, 0)
    assert layout.length(0) == 0
    assert layout.pieces_for_range(0, 0) == range(0)
    with pytest.raises(IndexError):
        layout.span(1)


@pytest.mark.parametrize("number", [-1, 3, 100])
def test_out_of_range_piece(number: int) -> None:
    layout = PieceLayout(10 * MiB, 4 * MiB)
    for method in (layout.check, layout.start, layout.length, layout.span):
        with pytest.raises(IndexError):
            method(number)


def test_layout_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError):
        PieceLayout(-1, 4 * MiB)
    with pytest.raises(ValueError):
        PieceLayout(10, 0)


def test_pieces_for_range() -> None:
    layout = PieceLayout(10 * MiB, 4 * MiB)
    assert layout.pieces_for_range(0, 10 * MiB) == range(0, 3)
    assert layout.pieces_for_range(0, 1) == range(0, 1)
    assert layout.pieces_for_range(0, 4 * MiB) == range(0, 1)
    assert layout.pieces_for_range(0, 4 * MiB + 1) == range(0, 2)
    assert layout.pieces_for_range(4 * MiB - 1, 4 * MiB + 1) == range(0, 2)
    assert layout.pieces_for_range(4 * MiB, 8 * MiB) == range(1, 2)
    assert layout.pieces_for_range(10 * MiB - 1, 10 * MiB) == range(2, 3)
    assert layout.pieces_for_range(5, 5) == range(0)
    for start, end in [(-1, 5), (5, 4), (0, 10 * MiB + 1)]:
        with pytest.raises(ValueError):
            layout.pieces_for_range(start, end)


@given(
    piece_size=st.integers(min_value=1, max_value=1 << 26),
    pieces=st.integers(min_value=0, max_value=300),
    extra=st.integers(min_value=0, max_value=1 << 26),
)
def test_spans_tile_blob(piece_size: int, pieces: int, extra: int) -> None:
    size = pieces * piece_size + extra % piece_size
    layout = PieceLayout(size, piece_size)
    pos = 0
    for n in range(layout.count):
        start, end = layout.span(n)
        assert start == pos
        assert end > start or size == 0
        assert end - start <= piece_size
        pos = end
    assert pos == size


@given(
    piece_size=st.integers(min_value=1, max_value=1 << 10),
    pieces=st.integers(min_value=0, max_value=100),
    data=st.data(),
)
def test_pieces_for_range_matches_spans(piece_size: int, pieces: int, data: st.DataObject) -> None:
    size = pieces * piece_size + data.draw(st.integers(0, piece_size - 1))
    layout = PieceLayout(size, piece_size)
    start = data.draw(st.integers(0, size))
    end = data.draw(st.integers(start, size))
    expected = [n for n in range(layout.count) if max(start, layout.span(n)[0]) < min(end, layout.span(n)[1])]
    assert list(layout.pieces_for_range(start, end)) == expected


def test_bitmap_basics_and_round_trip() -> None:
    bm = Bitmap(10)
    assert len(bm) == 0 and not bm.complete()
    for n in (0, 7, 8, 9):
        bm.add(n)
    assert bm.to_bytes() == bytes([0b1000_0001, 0b1100_0000])
    assert list(bm) == [0, 7, 8, 9]
    assert len(bm) == 4
    assert 7 in bm and 1 not in bm and 10 not in bm and -1 not in bm and "x" not in bm
    again = Bitmap(10, bm.to_bytes())
    assert list(again) == [0, 7, 8, 9]
    bm.discard(7)
    assert 7 not in bm and len(bm) == 3
    for n in range(10):
        bm.add(n)
    assert bm.complete()


def test_bitmap_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        Bitmap(10, b"\x00")  # needs 2 bytes
    with pytest.raises(ValueError):
        Bitmap(10, b"\x00\x00\x00")
    with pytest.raises(ValueError, match="past its size"):
        Bitmap(10, bytes([0, 0b0010_0000]))  # bit 10 set
    Bitmap(10, bytes([0, 0b0100_0000]))  # bit 9 is fine
    with pytest.raises(ValueError):
        Bitmap(-1)
    bm = Bitmap(3)
    with pytest.raises(IndexError):
        bm.add(3)
    with pytest.raises(IndexError):
        bm.discard(-1)


def test_bitmap_empty() -> None:
    bm = Bitmap(0, b"")
    assert bm.complete() and bm.to_bytes() == b"" and list(bm) == []


@given(st.integers(0, 200), st.data())
def test_bitmap_round_trip_property(size: int, data: st.DataObject) -> None:
    numbers = data.draw(st.sets(st.integers(0, max(0, size - 1))) if size else st.just(set()))
    bm = Bitmap(size)
    for n in numbers:
        bm.add(n)
    raw = bm.to_bytes()
    assert len(raw) == (size + 7) // 8
    assert set(Bitmap(size, raw)) == numbers
    assert len(bm) == len(numbers)
