"""Bytes entering the swarm: the origin's stream cut into verified pieces (p2pdist/node/intake.py),
the one origin retry policy, and the seed's fetch over a fake in-memory origin."""

from __future__ import annotations

import hashlib
import random
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
import trio

from p2pdist.config import SeedConfig
from p2pdist.content.digest import piece_digest
from p2pdist.content.pieces import MiB, PieceLayout
from p2pdist.errors import OriginError
from p2pdist.node.intake import PieceIntake
from p2pdist.node.metrics import DaemonMetrics
from p2pdist.registry.retry import ORIGIN_RETRY, RetryPolicy
from p2pdist.storage.store import Store, TaskStore
from p2pdist.wire import SeedTrigger
from seed.fetch import SeedFetch

PIECE = 4 * MiB
BLOB = bytes(range(251)) * (9 * MiB // 251) + b"tail"  # three pieces, the last short
TASK = "sha256:" + hashlib.sha256(BLOB).hexdigest()
URL = "http://origin.test/v2/x/blobs/" + TASK


def origin_error(status: int | None = None) -> OriginError:
    error = OriginError(f"origin answered HTTP {status}" if status else "origin reset the connection")
    if status is not None:
        error.status = status
    return error


async def chunks_of(data: bytes, size: int = MiB, *, fail_after: int | None = None) -> AsyncIterator[bytes]:
    """`data` in chunks; an OriginError once `fail_after` bytes are out (a body cut off)."""
    for offset in range(0, len(data), size):
        if fail_after is not None and offset >= fail_after:
            raise origin_error()
        yield data[offset : offset + size]
    if fail_after is not None and fail_after >= len(data):
        raise origin_error()


def span(number: int) -> bytes:
    return BLOB[number * PIECE : (number + 1) * PIECE]


@pytest.fixture
def task(tmp_path: Path) -> TaskStore:
    return Store(tmp_path).open(TASK, len(BLOB), URL, PIECE)


def tmp_files(task: TaskStore) -> list[str]:
    return [p.name for p in task.root.iterdir() if p.name.endswith(".tmp")]


async def test_pieces_are_committed_with_their_blake3_digests(task: TaskStore) -> None:
    committed: list[tuple[int, bytes]] = []
    received: list[int] = []
    intake = PieceIntake(task, on_piece=lambda n, d: committed.append((n, d)), on_bytes=received.append)
    await intake.write(0, chunks_of(BLOB, 3 * MiB + 7))  # chunks that straddle pieces
    assert committed == [(n, piece_digest(span(n))) for n in range(3)]
    assert task.complete() and sum(received) == len(BLOB)
    assert b"".join(task.path(n).read_bytes() for n in range(3)) == BLOB


async def test_a_cut_stream_resumes_at_a_piece_boundary_and_the_sha_counts_each_piece_once(task: TaskStore) -> None:
    intake = PieceIntake(task, sha=hashlib.sha256())
    with pytest.raises(OriginError):
        await intake.write(0, chunks_of(BLOB, fail_after=6 * MiB))  # cut in the middle of piece 1
    assert list(task.pieces) == [0] and intake.sha_pieces == 1
    assert tmp_files(task) == []  # piece 1's first 2 MiB were dropped, not kept
    await intake.write(PIECE, chunks_of(BLOB[PIECE:]))
    assert task.complete()
    assert intake.sha is not None and "sha256:" + intake.sha.hexdigest() == TASK


async def test_a_start_off_a_piece_boundary_is_refused(task: TaskStore) -> None:
    with pytest.raises(OriginError, match="not at the start of a piece"):
        await PieceIntake(task).write(PIECE + 1, chunks_of(BLOB[PIECE + 1 :]))
    assert len(task.pieces) == 0


async def test_a_stream_ending_before_the_blob_is_an_origin_error_and_leaves_no_partial_piece(task: TaskStore) -> None:
    with pytest.raises(OriginError, match="ended"):
        await PieceIntake(task).write(0, chunks_of(BLOB[: 5 * MiB]))
    assert list(task.pieces) == [0]
    assert tmp_files(task) == [] and not task.path(1).exists()


async def test_pieces_already_held_are_skipped(task: TaskStore) -> None:
    writer = task.new_piece(1)
    writer.write(span(1))
    writer.commit()
    committed: list[int] = []
    intake = PieceIntake(task, sha=hashlib.sha256(), on_piece=lambda n, d: committed.append(n))
    await intake.write(0, chunks_of(BLOB))
    assert committed == [0, 2] and task.complete()
    assert intake.sha is not None and "sha256:" + intake.sha.hexdigest() == TASK  # its bytes still hashed, once


async def test_the_one_empty_piece_of_an_empty_blob_is_committed(tmp_path: Path) -> None:
    empty = Store(tmp_path).open("sha256:" + hashlib.sha256(b"").hexdigest(), 0)
    committed: list[tuple[int, bytes]] = []
    await PieceIntake(empty, on_piece=lambda n, d: committed.append((n, d))).write(0, chunks_of(b""))
    assert empty.complete() and committed == [(0, piece_digest(b""))]


# -- the retry policy ---------------------------------------------------------------------


def test_retry_policy_backs_off_with_jitter_and_gives_up() -> None:
    policy = RetryPolicy(attempts=3, base_s=0.25, cap_s=0.6, jitter=0.5)
    rng = random.Random(4)
    assert 0.25 <= policy.retry_after(1, origin_error(), rng) <= 0.75  # type: ignore[operator]
    assert 0.3 <= policy.retry_after(2, origin_error(), rng) <= 0.9  # type: ignore[operator]
    assert policy.retry_after(3, origin_error(), rng) is None
    assert policy.retry_after(1, origin_error(503), rng) is not None
    for status in (401, 403, 404, 429):
        assert policy.retry_after(1, origin_error(status), rng) is None  # the origin's answer, not a failure


# -- the seed's fetch over a fake origin ----------------------------------------------------


@dataclass
class FakeBody:
    blob_size: int
    start: int
    data: bytes
    fail_after: int | None

    def chunks(self) -> AsyncIterator[bytes]:
        return chunks_of(self.data[self.start :], fail_after=self.fail_after)


@dataclass
class FakeOrigin:
    """Answers open_blob from memory; `plan[k]` decides the k-th request: a status to refuse it
    with, ("cut", n) to fail after n body bytes, "whole" to ignore the range, None to serve it."""

    data: bytes
    plan: list[Any] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    asked: list[tuple[str, str | None]] = field(default_factory=list)  # (url, through_mirror)

    @asynccontextmanager
    async def open_blob(
        self,
        url: str,
        headers: dict[str, str],
        *,
        start: int = 0,
        end: int | None = None,
        through_mirror: str | None = None,
    ) -> AsyncIterator[FakeBody]:
        self.starts.append(start)
        self.asked.append((url, through_mirror))
        step = self.plan.pop(0) if self.plan else None
        await trio.lowlevel.checkpoint()
        if isinstance(step, int):
            raise origin_error(step)
        if step == "unreachable":
            raise origin_error()
        if step == "whole":
            start = 0
        yield FakeBody(len(self.data), start, self.data, step[1] if isinstance(step, tuple) else None)


class FakeSeed:
    def __init__(self, tmp_path: Path, origin: FakeOrigin, config: SeedConfig | None = None) -> None:
        self.config = config or SeedConfig()
        self.origin = origin
        self.store = Store(tmp_path)
        self.metrics = DaemonMetrics("seed")

    async def enforce_quota(self) -> None:
        await trio.lowlevel.checkpoint()


async def seed_fetch(
    tmp_path: Path, plan: Sequence[Any], config: SeedConfig | None = None
) -> tuple[SeedFetch, FakeOrigin]:
    origin = FakeOrigin(BLOB, list(plan))
    fetch = SeedFetch(cast(Any, FakeSeed(tmp_path, origin, config)), SeedTrigger(task_id=TASK, url=URL))
    await fetch.run()
    return fetch, origin


async def test_seed_fetch_resumes_after_the_origin_cuts_the_body(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    fetch, origin = await seed_fetch(tmp_path, [("cut", 6 * MiB), ("cut", 4 * MiB)])
    assert fetch.error == ""
    assert origin.starts == [0, PIECE, 2 * PIECE]  # each try from the first piece not stored
    assert fetch.digests == [piece_digest(span(n)) for n in range(3)]
    assert fetch.store is not None and fetch.store.complete()
    assert fetch.store.load_digests() == fetch.digests


async def test_seed_fetch_survives_an_origin_that_ignores_the_range(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    fetch, origin = await seed_fetch(tmp_path, [("cut", 6 * MiB), "whole"])
    assert fetch.error == "" and origin.starts == [0, PIECE]
    assert fetch.digests == [piece_digest(span(n)) for n in range(3)]  # sha256 checked: piece 0 not hashed twice


async def test_seed_fetch_does_not_retry_a_4xx(tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    fetch, origin = await seed_fetch(tmp_path, [404])
    assert origin.starts == [0] and "404" in fetch.error
    assert fetch.seed.store.get(TASK) is None


async def test_a_seed_fetch_that_keeps_storing_pieces_earns_fresh_retries(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    # Four failures, a cut after piece 0 was stored, three more failures: eight in all, but
    # never five in a row without progress, which is what a slow, flaky WAN link looks like.
    plan = [503] * 4 + [("cut", PIECE + 10)] + [503] * 3 + [None]
    fetch, origin = await seed_fetch(tmp_path, plan)
    assert fetch.error == ""
    assert origin.starts[-1] == PIECE
    assert fetch.store is not None and fetch.store.complete()


async def test_a_site_seed_asks_its_upstream_mirror_and_fails_at_once_when_it_cannot_reach_it(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    config = SeedConfig(upstream="http://core-mirror:4001")
    fetch, origin = await seed_fetch(tmp_path, ["unreachable"], config)
    # One try: the WAN link is down, the site's peers must hear it now, not after the retries.
    assert len(origin.starts) == 1
    assert origin.asked == [("http://core-mirror:4001/v2/x/blobs/" + TASK + "?ns=origin.test", "http")]
    assert fetch.error.startswith("upstream ")


async def test_a_site_seed_resumes_from_its_upstream_by_range_after_a_cut(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    config = SeedConfig(upstream="http://core-mirror:4001")
    fetch, origin = await seed_fetch(tmp_path, [("cut", 6 * MiB)], config)
    assert fetch.error == ""
    assert origin.starts == [0, PIECE]
    assert fetch.store is not None and fetch.store.complete()


async def test_seed_fetch_gives_up_after_the_policy_s_attempts(tmp_path: Path, autojump_clock: trio.abc.Clock) -> None:
    fetch, origin = await seed_fetch(tmp_path, [503] * 10)
    assert len(origin.starts) == ORIGIN_RETRY.attempts and fetch.error


@pytest.mark.parametrize(
    ("trigger", "piece_size"),
    [
        # From a scheduler before the piece size travelled (or one at min_piece_bytes 4 MiB): the old rule.
        (SeedTrigger(task_id=TASK, url=URL), 4 * MiB),
        (SeedTrigger(task_id=TASK, url=URL, min_piece_size=2 * MiB), 2 * MiB),
        (SeedTrigger(task_id=TASK, url=URL, min_piece_size=MiB), MiB),
        # Resuming: the task's own piece size, whatever the floor.
        (SeedTrigger(task_id=TASK, url=URL, content_length=len(BLOB), piece_size=MiB, min_piece_size=2 * MiB), MiB),
    ],
)
async def test_a_seed_cuts_the_blob_as_the_scheduler_says(
    tmp_path: Path, autojump_clock: trio.abc.Clock, trigger: SeedTrigger, piece_size: int
) -> None:
    fetch = SeedFetch(cast(Any, FakeSeed(tmp_path, FakeOrigin(BLOB, []))), trigger)
    await fetch.run()
    assert fetch.error == "" and fetch.store is not None and fetch.store.complete()
    assert fetch.store.layout == PieceLayout(len(BLOB), piece_size)
    assert fetch.digests == [
        piece_digest(BLOB[n * piece_size : (n + 1) * piece_size]) for n in range(fetch.store.layout.count)
    ]
