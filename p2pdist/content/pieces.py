"""Piece math: how a blob is cut into pieces, and which byte ranges each piece covers.

Pure functions only; every service and the simulator share them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

MiB = 1 << 20
# The piece sizes any node accepts, from a scheduler or a store: powers of two within these.
MIN_PIECE_SIZE = 1 * MiB
MAX_PIECE_SIZE = 64 * MiB
PIECES_TARGET = 500
# The floor of the piece size rule: 2 MiB pieces for blobs up to 1,000 MiB (a 4 MiB piece took
# 0.5 s to cross one 8 MiB/s upload, and every hop of a rollout's ramp-up and tail paid it);
# 1 GiB and larger get what they got before. The scheduler's `min_piece_bytes` sets it.
DEFAULT_MIN_PIECE_SIZE = 2 * MiB
# The floor before the piece size travelled with the task: what a field left out of a message,
# or a store's meta without one, means (written by a version that cut every blob this way).
OLD_MIN_PIECE_SIZE = 4 * MiB
# Small pieces pay on slow uploads only: a piece should cross one hop in about this long at the
# upload cap of the host that first asks for the blob. A host with no cap gets the old floor
# (on a fast link a 4 MiB piece crosses in milliseconds, and every extra piece costs both ends
# CPU: about 3 ms per piece measured on loopback, benchmarks/README.md, issue 18).
PIECE_HOP_S = 0.25


def piece_size_problem(piece_size: object) -> str | None:
    """Why `piece_size` is not a piece size any node accepts (None: it is one)."""
    if isinstance(piece_size, bool) or not isinstance(piece_size, int):
        return "piece size must be an integer"
    if not MIN_PIECE_SIZE <= piece_size <= MAX_PIECE_SIZE or piece_size & (piece_size - 1):
        return f"piece size {piece_size} is not a power of two from {MIN_PIECE_SIZE} to {MAX_PIECE_SIZE} bytes"
    return None


def piece_floor_for_upload(upload_rate_bps: int | None, min_piece_size: int) -> int:
    """The floor of the piece size rule for a blob first asked for by a host that uploads at
    most `upload_rate_bps` (None: no cap): a piece takes about PIECE_HOP_S at that rate, a power
    of two between `min_piece_size` and the old floor (never under `min_piece_size`)."""
    if min_piece_size >= OLD_MIN_PIECE_SIZE or upload_rate_bps is None:
        return max(min_piece_size, OLD_MIN_PIECE_SIZE)
    return min(OLD_MIN_PIECE_SIZE, max(min_piece_size, _power_of_two_at_least(int(upload_rate_bps * PIECE_HOP_S))))


def piece_size_for(blob_size: int, min_piece_size: int = DEFAULT_MIN_PIECE_SIZE) -> int:
    """The piece size rule (Dragonfly's, with our floor): the next power of two of size/500,
    clamped to [min_piece_size, 64 MiB]. The scheduler decides a task's piece size with it;
    a node without one (back to source, no scheduler) uses it with the default floor."""
    if blob_size < 0:
        raise ValueError(f"blob size must not be negative: {blob_size}")
    size = _power_of_two_at_least(-(-blob_size // PIECES_TARGET))
    return min(MAX_PIECE_SIZE, max(min_piece_size, size))


def _power_of_two_at_least(n: int) -> int:
    """The smallest power of two not under `n` (1 for n <= 1)."""
    return 1 << (max(1, n) - 1).bit_length()


def old_piece_size(blob_size: int) -> int:
    """The piece size a version from before the piece size travelled gave `blob_size`."""
    return piece_size_for(blob_size, OLD_MIN_PIECE_SIZE)


def piece_size_sent(blob_size: int, piece_size: int) -> int | None:
    """A piece size as messages carry it: left out (None) when it is the old rule's, so an older
    reader, which refuses unknown fields, reads every message that agrees with it."""
    return None if piece_size == old_piece_size(blob_size) else piece_size


def piece_size_read(blob_size: int, sent: int | None) -> int:
    """The piece size a message or a store's meta means: the old rule's when left out."""
    return old_piece_size(blob_size) if sent is None else sent


@dataclass(frozen=True)
class PieceLayout:
    """The pieces of one blob of `blob_size` bytes cut at `piece_size`."""

    blob_size: int
    piece_size: int

    @classmethod
    def for_blob(cls, blob_size: int, min_piece_size: int = DEFAULT_MIN_PIECE_SIZE) -> PieceLayout:
        """The layout the piece size rule gives a blob of `blob_size` bytes."""
        return cls(blob_size, piece_size_for(blob_size, min_piece_size))

    def __post_init__(self) -> None:
        if self.blob_size < 0:
            raise ValueError(f"blob size must not be negative: {self.blob_size}")
        if self.piece_size <= 0:
            raise ValueError(f"piece size must be positive: {self.piece_size}")

    @property
    def count(self) -> int:
        """Number of pieces; an empty blob still has one (empty) piece so it can be transferred."""
        return max(1, -(-self.blob_size // self.piece_size))

    def check(self, number: int) -> None:
        if not 0 <= number < self.count:
            raise IndexError(f"piece {number} out of range 0..{self.count - 1}")

    def start(self, number: int) -> int:
        self.check(number)
        return number * self.piece_size

    def length(self, number: int) -> int:
        self.check(number)
        return min(self.piece_size, self.blob_size - number * self.piece_size)

    def span(self, number: int) -> tuple[int, int]:
        """Half-open byte range [start, end) of a piece within the blob."""
        start = self.start(number)
        return start, start + self.length(number)

    def pieces_for_range(self, start: int, end: int) -> range:
        """Pieces that hold any byte of the half-open range [start, end)."""
        if not 0 <= start <= end <= self.blob_size:
            raise ValueError(f"range {start}-{end} outside blob of {self.blob_size} bytes")
        if start == end:
            return range(0)
        return range(start // self.piece_size, (end - 1) // self.piece_size + 1)


# Bitmap packs piece 0 into the most significant bit of byte 0; reversing the bits of every
# byte and reading little-endian puts piece n at bit n of an int.
_REVERSED = bytes(int(f"{b:08b}"[::-1], 2) for b in range(256))


def bits_from_bytes(data: bytes) -> int:
    """A Bitmap's bytes (as in `Bitmap.to_bytes()` and `wire.Parent.pieces`) as an int, piece n at bit n."""
    return int.from_bytes(data.translate(_REVERSED), "little")


class Bitmap:
    """A set of piece numbers packed into bytes (bit i of byte i//8, most significant first)."""

    __slots__ = ("size", "_bits")

    def __init__(self, size: int, data: bytes | None = None) -> None:
        if size < 0:
            raise ValueError("bitmap size must not be negative")
        self.size = size
        nbytes = (size + 7) // 8
        if data is None:
            self._bits = bytearray(nbytes)
        else:
            if len(data) != nbytes:
                raise ValueError(f"bitmap of {size} pieces needs {nbytes} bytes, got {len(data)}")
            self._bits = bytearray(data)
            spare = nbytes * 8 - size
            if spare and self._bits[-1] & ((1 << spare) - 1):
                raise ValueError("bitmap has bits set past its size")

    @classmethod
    def from_int(cls, size: int, bits: int) -> Bitmap:
        """The set of an int with bit n set for piece n (the inverse of `to_int`)."""
        if bits < 0 or bits >> size:
            raise ValueError(f"pieces past the bitmap's {size}")
        bitmap = cls.__new__(cls)
        bitmap.size = size
        bitmap._bits = bytearray(bits.to_bytes((size + 7) // 8, "little").translate(_REVERSED))
        return bitmap

    def add(self, number: int) -> None:
        self._check(number)
        self._bits[number >> 3] |= 0x80 >> (number & 7)

    def discard(self, number: int) -> None:
        self._check(number)
        self._bits[number >> 3] &= ~(0x80 >> (number & 7)) & 0xFF

    def __contains__(self, number: object) -> bool:
        if not isinstance(number, int) or not 0 <= number < self.size:
            return False
        return bool(self._bits[number >> 3] & (0x80 >> (number & 7)))

    def __iter__(self) -> Iterator[int]:
        for number in range(self.size):
            if number in self:
                yield number

    def __len__(self) -> int:
        return sum(bin(b).count("1") for b in self._bits)

    def complete(self) -> bool:
        return len(self) == self.size

    def to_bytes(self) -> bytes:
        return bytes(self._bits)

    def to_int(self) -> int:
        """The set as an int with bit n set for piece n."""
        return bits_from_bytes(bytes(self._bits))

    def _check(self, number: int) -> None:
        if not 0 <= number < self.size:
            raise IndexError(f"piece {number} out of range 0..{self.size - 1}")
