"""Piece math: how a blob is cut into pieces, and which byte ranges each piece covers.

Pure functions only; every service and the simulator share them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

MiB = 1 << 20
MIN_PIECE_SIZE = 4 * MiB
MAX_PIECE_SIZE = 64 * MiB
PIECES_TARGET = 500


def piece_size_for(blob_size: int) -> int:
    """Dragonfly's rule: next power of two of size/500, clamped to [4 MiB, 64 MiB]."""
    if blob_size < 0:
        raise ValueError(f"blob size must not be negative: {blob_size}")
    want = max(1, -(-blob_size // PIECES_TARGET))
    size = 1 << (want - 1).bit_length()
    return min(MAX_PIECE_SIZE, max(MIN_PIECE_SIZE, size))


@dataclass(frozen=True)
class PieceLayout:
    """The pieces of one blob of `blob_size` bytes cut at `piece_size`."""

    blob_size: int
    piece_size: int

    @classmethod
    def for_blob(cls, blob_size: int) -> PieceLayout:
        return cls(blob_size, piece_size_for(blob_size))

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
