"""Load: 200 clients pulling one blob at once through one peer daemon, 1,000 simulated peers
registering and syncing with one scheduler, and a flood of bogus registrations during a real
pull. No errors, the daemon's peak RSS stays far below what holding a copy per client would
take, and after the flood expires scheduler and seed come back near their idle RSS. Prints
the figures (`-s`); `python -m benchmarks.load` runs the same loads as a script.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import trio

from benchmarks.load import REPO, LoadResult, pull_through_mirror, run_flood, simulate_peers
from benchmarks.report import cpu_seconds
from lab import procs
from lab.procs import Service
from lab.registry import Origin
from tests.support.origin import PushToOrigin

MiB = 1 << 20
PULLS = 200
BLOB_BYTES = 8 * MiB
PEERS = 1000
# Measured here: about 50 MiB for the peer and 40 MiB for the scheduler. A copy of the blob
# per client would be 1.6 GB; the bounds leave room for a busy machine, not for buffering.
PEER_RSS_LIMIT_KIB = 160 * 1024
SCHEDULER_RSS_LIMIT_KIB = 128 * 1024

T = TypeVar("T")


def run_with_deadline(seconds: float, load: Callable[[], Awaitable[T]]) -> T:
    async def bounded() -> T:
        with trio.fail_after(seconds):
            return await load()

    return trio.run(bounded)


@pytest.fixture
def scheduler(tmp_path: Path) -> Iterator[Service]:
    service = procs.start_scheduler(tmp_path)
    try:
        yield service
    finally:
        service.stop()


def report(result: LoadResult) -> None:
    print(f"\n{result.summary()}")
    assert not result.errors, sorted(set(result.errors))[:10]


def test_200_concurrent_pulls_through_one_peer(
    scheduler: Service, tmp_path: Path, origin: Origin, push_to_origin: PushToOrigin
) -> None:
    image = push_to_origin((BLOB_BYTES,), 81, REPO)
    digest = image.layers[0].digest
    seed = procs.start_seed(tmp_path, scheduler.url)
    peer = procs.start_peer(tmp_path, scheduler.url, "peer")
    try:
        assert peer.proxy_url is not None
        proxy_url = peer.proxy_url
        before = cpu_seconds(peer.pid)
        result = run_with_deadline(150, lambda: pull_through_mirror(proxy_url, origin.host, digest, PULLS))
        result.measure(peer.pid, before)
        report(result)
        assert len(result.latencies_s) == PULLS
        assert result.peak_rss_kib < PEER_RSS_LIMIT_KIB
        assert peer.poll() is None and seed.poll() is None
    finally:
        peer.stop()
        seed.stop()
    assert "Traceback" not in peer.log_path.read_text()


def test_1000_simulated_peers_register_and_sync_with_one_scheduler(scheduler: Service) -> None:
    before = cpu_seconds(scheduler.pid)
    result = run_with_deadline(150, lambda: simulate_peers(scheduler.url, PEERS, syncs=2))
    result.measure(scheduler.pid, before)
    report(result)
    assert len(result.latencies_s) == 1 + PEERS * 5  # the seed, then announce, register, 3 syncs each
    assert result.peak_rss_kib < SCHEDULER_RSS_LIMIT_KIB
    assert scheduler.poll() is None


# A small flood (the benchmark sends 20,000 in 30 s): 3,000 in 6 s, with the flood's state
# expiring after 4 s instead of 60, so the test takes well under a minute.
FLOOD = 3000
FLOOD_SECONDS = 6.0
FLOOD_EXPIRY_S = 4.0
RSS_RETURN = 1.2  # after expiry, within 20% of the idle figure


def test_flood_of_bogus_registrations_gets_429s_while_a_real_pull_succeeds_and_memory_returns(
    tmp_path: Path, origin: Origin
) -> None:
    report = run_flood(
        tmp_path, origin, count=FLOOD, seconds=FLOOD_SECONDS, expiry_s=FLOOD_EXPIRY_S, blob_size=BLOB_BYTES
    )
    print(f"\n{report.summary()}")
    assert not report.pull.errors and len(report.pull.latencies_s) == 1  # its sha256 was checked
    assert report.flood.statuses[429] > FLOOD // 2
    assert not report.flood.errors and set(report.flood.statuses) <= {200, 429}
    for name, rss in report.rss_kib.items():
        assert rss["after"] <= rss["before"] * RSS_RETURN, (name, rss)
