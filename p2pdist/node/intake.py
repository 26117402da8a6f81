"""Bytes entering the swarm: an in-order stream of one blob (the origin's body) cut into pieces,
each BLAKE3-digested and committed to the store. Seeds and back-to-source peers share it."""

from __future__ import annotations

from collections.abc import AsyncIterable, Callable
from typing import Protocol

from p2pdist.content.digest import PieceHasher
from p2pdist.errors import OriginError
from p2pdist.storage.store import PieceWriter, TaskStore
from p2pdist.transport.ratelimit import TokenBucket


class RunningHash(Protocol):
    """A hashlib object (the blob's sha256)."""

    def update(self, data: bytes | memoryview, /) -> None: ...

    def copy(self) -> RunningHash: ...

    def hexdigest(self) -> str: ...


class PieceIntake:
    """Writes the pieces of one blob from in-order byte streams, possibly several (a stream cut
    off mid-body is resumed with a new one from a piece boundary). Pieces already held are
    skipped, not rewritten.

    `sha`, if given, is extended over the blob's bytes in order, each piece once and only when
    the piece is whole: the copy taken at each piece's start is what a piece cut mid-body
    leaves behind, so its first bytes are not hashed twice when it is fetched again. It covers
    the first `sha_pieces` pieces.
    """

    def __init__(
        self,
        store: TaskStore,
        *,
        sha: RunningHash | None = None,
        bucket: TokenBucket | None = None,
        on_bytes: Callable[[int], None] | None = None,
        on_piece: Callable[[int, bytes], None] | None = None,
    ) -> None:
        self.store = store
        self.sha = sha
        self.sha_pieces = 0
        self.bucket = bucket
        self.on_bytes = on_bytes  # every byte received, stored or not
        self.on_piece = on_piece  # (number, BLAKE3 digest) of each piece committed

    async def write(self, start: int, chunks: AsyncIterable[bytes | memoryview]) -> None:
        """Store the pieces of the stream `chunks`, which holds the blob's bytes from `start` on.

        Returns once the blob's last piece is stored; a stream that ends before is an
        OriginError (retry from the first missing piece). The piece being written when the
        stream fails is dropped, never left in the store.
        """
        layout = self.store.layout
        number, into = divmod(start, layout.piece_size)
        if into or not 0 <= number < layout.count:
            raise OriginError(f"origin's body starts at byte {start}, not at the start of a piece")
        piece = _Piece(self, number)
        try:
            if piece.length == 0:  # the one piece of an empty blob: no byte to wait for
                piece.end()
                return
            async for chunk in chunks:
                if self.bucket is not None:
                    await self.bucket.take(len(chunk))
                if self.on_bytes is not None:
                    self.on_bytes(len(chunk))
                view = memoryview(chunk)
                while view:
                    part, view = view[: piece.length - piece.filled], view[piece.length - piece.filled :]
                    piece.add(part)
                    if piece.filled == piece.length:
                        piece.end()
                        if piece.number + 1 >= layout.count:
                            return
                        piece = _Piece(self, piece.number + 1)
            raise OriginError(
                f"origin's body ended at byte {layout.start(piece.number) + piece.filled} of {layout.blob_size}"
            )
        finally:
            piece.abort()


class _Piece:
    """One piece on its way in: written and digested unless held, hashed into the sha if next."""

    __slots__ = ("intake", "number", "length", "filled", "writer", "hasher", "sha")

    def __init__(self, intake: PieceIntake, number: int) -> None:
        self.intake = intake
        self.number = number
        self.length = intake.store.layout.length(number)
        self.filled = 0
        held = intake.store.has(number)
        self.writer: PieceWriter | None = None if held else intake.store.new_piece(number)
        self.hasher = None if held else PieceHasher()
        self.sha = intake.sha.copy() if intake.sha is not None and number == intake.sha_pieces else None

    def add(self, part: memoryview) -> None:
        if self.writer is not None and self.hasher is not None:
            self.writer.write(part)
            self.hasher.update(part)
        if self.sha is not None:
            self.sha.update(part)
        self.filled += len(part)

    def end(self) -> None:
        intake = self.intake
        committed = self.writer is not None
        if self.writer is not None:
            self.writer.commit()
            self.writer = None
        if self.sha is not None:
            intake.sha = self.sha
            intake.sha_pieces += 1
            self.sha = None
        if committed and self.hasher is not None and intake.on_piece is not None:
            intake.on_piece(self.number, self.hasher.digest())

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()
            self.writer = None
