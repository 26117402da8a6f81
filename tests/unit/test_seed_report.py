"""The seed's report loop against a scheduler stand-in: what reaches the scheduler, in order."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import trio

from p2pdist import wire
from p2pdist.content.pieces import PieceLayout
from seed.fetch import SeedFetch

TASK = "sha256:" + "ab" * 32
MiB = 1 << 20


class SlowScheduler:
    """Takes each report, holding the first one's answer until `release` is set."""

    def __init__(self) -> None:
        self.reports: list[wire.SeedProgress] = []
        self.first_arrived = trio.Event()
        self.release = trio.Event()

    def owner(self, task_id: str) -> str:
        return "http://scheduler"

    async def call_task(self, task_id: str, path: str, message: Any, reply: type[Any]) -> tuple[Any, str]:
        self.reports.append(message)
        if len(self.reports) == 1:
            self.first_arrived.set()
            await self.release.wait()
        return wire.Empty(), "http://scheduler"


async def test_a_fetch_that_fails_while_a_report_is_in_flight_still_reports_its_failure() -> None:
    """The fetch fails (its sha256 check) while the report of its last digests is on the way:
    the loop must not stop on 'every digest reported', or the scheduler never hears of the
    failure and keeps the digests of corrupt bytes."""
    with trio.fail_after(5):
        scheduler = SlowScheduler()
        seed = SimpleNamespace(scheduler=scheduler, host_id="seed-1", attester=None)
        fetch = SeedFetch(seed, wire.SeedTrigger(task_id=TASK, url="http://registry/v2/a/blobs/" + TASK))  # type: ignore[arg-type]
        fetch.store = SimpleNamespace(layout=PieceLayout.for_blob(8 * MiB))  # type: ignore[assignment]
        fetch.digests = [b"\x01" * 32, b"\x02" * 32]  # every piece stored and digested
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fetch.report_loop)
            await scheduler.first_arrived.wait()
            fetch.error = "origin sent sha256:d7757fc0424b for sha256:abab"  # the check failed meanwhile
            fetch.done = True
            scheduler.release.set()
        assert [len(r.piece_digests) for r in scheduler.reports][0] == 2
        assert scheduler.reports[-1].error.startswith("origin sent")
        assert not any(r.done for r in scheduler.reports)
