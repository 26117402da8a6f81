"""No single point of failure, with real processes and the real Distribution registry: three
schedulers and two seeds; the scheduler owning the largest layer SIGKILLed mid-rollout, the
seed fetching it SIGKILLed mid-blob, every scheduler down, and a scheduler SIGSTOPped for 10 s.
Every pulled blob's sha256 is checked.

The image is the issue's 128 MiB (a 96 MiB and a 32 MiB layer); the origin's cap is set so
that the largest layer still takes about 12 s, and a kill lands mid-rollout.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lab.image import ImageInfo
from lab.procs import Service
from lab.registry import Origin
from p2pdist.cli.get import get
from p2pdist.cluster.rendezvous import owner
from p2pdist.content.pieces import PieceLayout
from tests.support.cluster import Cluster, ClusterFactory, MiB, restart, sha256_file, wait_until
from tests.support.metrics import metric
from tests.support.origin import PushToOrigin

LAYERS = (96 * MiB, 32 * MiB)
PEERS = 8
# In the seed test, seeds fetch from the origin at this rate, so the largest layer takes 12 s and a kill lands
# in the middle of the rollout (peers follow the seed closely); peers are not capped.
ORIGIN_RATE = "8MiB"
KILL_AFTER_BYTES = 72 * MiB  # from the origin: the 32 MiB layer and 40 MiB of the 96 MiB one


@dataclass
class Rollout:
    host_s: dict[str, float]  # per peer: seconds from the start until its last layer was written
    origin_bytes: int
    back_to_source: float

    @property
    def slowest_s(self) -> float:
        return max(self.host_s.values())


def roll_out(cluster: Cluster, image: ImageInfo, repo: str, *, during: Callable[[], None] = lambda: None) -> Rollout:
    """Every peer pulls every layer at once through its mirror port, with the `p2pdist get`
    client code run in a thread per blob of this process (16 client processes starting at once
    would cost a loaded 2-core machine more seconds than anything measured here); `during`
    runs meanwhile. Asserts every pull and each blob's sha256."""
    finished: dict[tuple[str, str], float] = {}
    errors: list[str] = []
    threads = []
    started = time.monotonic()

    def run(peer: Service, url: str, digest: str, out: Path) -> None:
        assert peer.proxy_url is not None
        try:
            get(url, str(out), peer.proxy_url, quiet=True, timeout_s=300)
        except Exception as exc:  # reported below, with the others
            errors.append(f"{peer.name}: {exc}")
        finished[(peer.name, digest)] = time.monotonic() - started

    outs = []
    for peer in cluster.peers:
        for layer in image.layers:
            out = cluster.workdir / f"{repo.replace('/', '-')}-{peer.name}-{layer.digest[7:19]}.blob"
            url = cluster.blob_url(repo, layer.digest)
            thread = threading.Thread(target=run, args=(peer, url, layer.digest, out))
            thread.start()
            threads.append(thread)
            outs.append((out, layer.digest))
    during()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for out, digest in outs:
        assert sha256_file(out) == digest, out
    return Rollout(
        host_s={p.name: max(t for (name, _), t in finished.items() if name == p.name) for p in cluster.peers},
        origin_bytes=cluster.relay.downstream_bytes(),
        back_to_source=sum(metric(p.url, "p2pdist_peer_back_to_source_total") for p in cluster.peers),
    )


def seed_origin_bytes(seed: Service) -> float:
    return metric(seed.url, "p2pdist_seed_download_bytes_total", 'source="origin"') if seed.poll() is None else 0.0


def ha_cluster(make: Callable[[], Cluster]) -> Cluster:
    cluster = make()
    cluster.add_peers(PEERS)
    return cluster


def test_scheduler_owning_the_largest_layer_killed_mid_rollout_costs_no_origin_traffic(
    cluster_factory: ClusterFactory, push_to_origin: PushToOrigin, origin: Origin, tmp_path: Path
) -> None:
    image = push_to_origin(LAYERS, 141, "ha/scheduler")
    largest = max(image.layers, key=lambda layer: layer.size)
    total = sum(layer.size for layer in image.layers)
    # The origin is capped for the whole cluster (at the relay), not per seed: which seed gets
    # which layer is a hash of random host ids, and with per-seed caps a run whose two layers
    # fell to one seed would be slower for that alone.
    relay_rate = 10 * MiB

    def without_the_kill(name: str) -> Rollout:
        """The same rollout without the kill, on its own cluster: what the kill is measured against."""
        baseline_cluster = Cluster(tmp_path / name, origin.host, schedulers=3, seeds=2, relay_rate_bps=relay_rate)
        try:
            baseline_cluster.add_peers(PEERS)
            return roll_out(baseline_cluster, image, "ha/scheduler")
        finally:
            baseline_cluster.stop()

    before = without_the_kill("baseline")
    cluster = ha_cluster(lambda: cluster_factory(schedulers=3, seeds=2, relay_rate_bps=relay_rate))
    doomed_url = owner(largest.digest, [s.url for s in cluster.schedulers])
    doomed = next(s for s in cluster.schedulers if s.url == doomed_url)

    def kill_the_owner_mid_rollout() -> None:
        # The seeds are 40% through the image, the peers close behind them (the origin is the
        # bottleneck); read from the relay's own counters, which answer however busy the seeds are.
        wait_until(lambda: cluster.relay.downstream_bytes() >= 0.4 * total, 120, "the rollout to be under way")
        doomed.kill()

    killed = roll_out(cluster, image, "ha/scheduler", during=kill_the_owner_mid_rollout)
    # Measured again after: this VM's speed drifts by seconds over a minute (benchmarks/README.md,
    # "The other targets re-run"), and a yardstick taken once judged the kill by that drift.
    after = without_the_kill("baseline-after")
    baseline = max(before, after, key=lambda rollout: rollout.slowest_s)

    assert doomed.poll() is not None  # not restarted
    assert killed.back_to_source == 0
    assert killed.origin_bytes <= 1.05 * total, f"origin sent {killed.origin_bytes} for {total}"
    moved = [p.name for p in cluster.peers if f"(was {doomed_url})" in p.log_path.read_text()]
    assert moved, "no peer re-registered its task with another scheduler"
    assert killed.slowest_s <= baseline.slowest_s + 3.0, (
        killed.host_s,
        before.host_s,
        after.host_s,
        [line for p in cluster.peers for line in p.log_path.read_text().splitlines() if "scheduler" in line][-40:],
    )
    print(
        f"slowest host: {before.slowest_s:.1f}s and {after.slowest_s:.1f}s without the kill (before, after), "
        f"{killed.slowest_s:.1f}s with it; "
        f"origin sent {killed.origin_bytes / total:.3f} F"
    )


def test_seed_fetching_the_largest_layer_killed_mid_blob_is_replaced_and_resumed_from_peers(
    cluster_factory: ClusterFactory, push_to_origin: PushToOrigin
) -> None:
    image = push_to_origin(LAYERS, 142, "ha/seed")
    total = sum(layer.size for layer in image.layers)
    cluster = ha_cluster(lambda: cluster_factory(schedulers=3, seeds=2, seed_args=("--origin-rate", ORIGIN_RATE)))
    found: list[Service] = []

    def kill_its_seed_mid_blob() -> None:
        # The relay's own counters answer however busy the seeds are. Past the small layer and
        # a third of the large one, the seed that fetched the most from the origin is fetching
        # the large one (alone, or beside the small one), and is still short of its end.
        wait_until(
            lambda: cluster.relay.downstream_bytes() >= KILL_AFTER_BYTES, 120, "the seeds to be part-way through"
        )
        found.append(max(cluster.seeds, key=seed_origin_bytes))
        found[0].kill()

    killed = roll_out(cluster, image, "ha/seed", during=kill_its_seed_mid_blob)

    assert killed.back_to_source == 0
    assert killed.origin_bytes <= 1.2 * total, f"origin sent {killed.origin_bytes} for {total}"
    survivor = next(seed for seed in cluster.seeds if seed is not found[0])
    resumed = re.search(r"resumed with (\d+) of \d+ pieces from peers", survivor.log_path.read_text())
    assert resumed is not None and int(resumed.group(1)) >= 1, "the new seed started from byte 0"
    piece_size = PieceLayout.for_blob(max(layer.size for layer in image.layers)).piece_size
    assert (
        metric(survivor.url, "p2pdist_seed_download_bytes_total", 'source="peer"') >= int(resumed.group(1)) * piece_size
    )
    print(
        f"seed killed: new seed took {resumed.group(1)} pieces from peers; origin sent {killed.origin_bytes / total:.3f} F"
    )


def test_with_every_scheduler_down_pulls_go_to_the_origin_and_p2p_resumes_when_one_comes_back(
    cluster_factory: ClusterFactory, push_to_origin: PushToOrigin
) -> None:
    first, second = (push_to_origin((12 * MiB,), seed, "ha/down").layers[0] for seed in (143, 144))
    cluster = cluster_factory(schedulers=3)
    for scheduler in cluster.schedulers:
        scheduler.kill()
    (peer,) = cluster.add_peers(1)

    (out,) = cluster.pull_all([peer], cluster.blob_url("ha/down", first.digest), "down-1")

    assert sha256_file(out) == first.digest
    assert metric(peer.url, "p2pdist_peer_back_to_source_total") == 1
    log = peer.log_path.read_text()
    assert re.search(r"going back to source: scheduler unreachable \(no scheduler answered", log), log[-2000:]
    # No crash and no spin: idle, it probes the schedulers every announce and warns once about each.
    cpu_before = cpu_seconds(peer.pid)
    time.sleep(3.0)  # an idle stretch to measure, not a readiness wait
    assert cpu_seconds(peer.pid) - cpu_before < 0.5
    assert peer.poll() is None
    assert peer.log_path.read_text().count("announce to the scheduler failed") <= 3

    back = restart(cluster, cluster.schedulers[1])
    # The peer takes it back once its announce loop (every 3 s) gets an answer; pulls before
    # that go to the origin at once rather than each waiting for a scheduler.
    wait_until(lambda: f"scheduler {back.url} answers again" in peer.log_path.read_text(), 30, "the peer to see it")
    (out,) = cluster.pull_all([peer], cluster.blob_url("ha/down", second.digest), "down-2")

    assert sha256_file(out) == second.digest
    assert metric(peer.url, "p2pdist_peer_back_to_source_total") == 1  # not again
    from_origin = metric(peer.url, "p2pdist_peer_download_bytes_total", 'source="origin"')
    assert from_origin == first.size  # the second blob came from the seed, not the origin
    assert metric(peer.url, "p2pdist_peer_download_bytes_total") - from_origin >= second.size
    assert metric(back.url, "p2pdist_scheduler_seeds_woken_total") == 1


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_stopped_scheduler_loses_its_tasks_within_the_timeout_and_gets_them_back_when_it_resumes(
    cluster_factory: ClusterFactory, push_to_origin: PushToOrigin
) -> None:
    layer = push_to_origin((48 * MiB,), 145, "ha/stop").layers[0]
    # 48 MiB at 2 MiB/s: the pull outlasts the 10 s stop and the return.
    cluster = cluster_factory(schedulers=3, seed_args=("--origin-rate", "2MiB"))
    peers = cluster.add_peers(3)
    stopped_url = owner(layer.digest, [s.url for s in cluster.schedulers])
    stopped = next(s for s in cluster.schedulers if s.url == stopped_url)
    url = cluster.blob_url("ha/stop", layer.digest)
    jobs = [
        (cluster.workdir / f"stop-{p.name}", cluster.start_get(p, url, cluster.workdir / f"stop-{p.name}"))
        for p in peers
    ]
    wait_until(lambda: sum(metric(p.url, "p2pdist_peer_download_bytes_total") for p in peers) > 0, 60, "first piece")

    os.killpg(stopped.pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        # Each peer's next sync waits out scheduler_timeout_s (3 s), then registers with the next
        # scheduler in rank; allow for the sync back-off and a loaded machine.
        wait_until(
            lambda: all(f"(was {stopped_url})" in p.log_path.read_text() for p in peers),
            3.0 + 2.0 + 3.0,
            "every peer to move its task to another scheduler",
        )
        time.sleep(max(0.0, stopped_at + 10.0 - time.monotonic()))  # the stop lasts 10 s, not a readiness wait
    finally:
        os.killpg(stopped.pid, signal.SIGCONT)
    decisions = metric(stopped.url, "p2pdist_scheduler_schedule_decisions_total")
    # Its next announce answers (every 3 s, then up to a 3 s call), and the task goes back.
    wait_until(
        lambda: all(f"scheduler {stopped_url} owns it now" in p.log_path.read_text() for p in peers),
        3.0 + 3.0 + 3.0,
        "every peer to bring its task back to the resumed scheduler",
    )

    for out, job in jobs:
        _, err = job.communicate(timeout=120)
        assert job.returncode == 0, err
        assert sha256_file(out) == layer.digest
    assert metric(stopped.url, "p2pdist_scheduler_schedule_decisions_total") > decisions
    assert sum(metric(p.url, "p2pdist_peer_back_to_source_total") for p in peers) == 0
    # Split ownership never woke a second seed: the origin sent the blob once.
    assert cluster.relay.downstream_bytes() <= 1.05 * layer.size
