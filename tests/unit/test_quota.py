"""The cache quota: high and low watermarks, least recently used first, never a blob in use;
the rule as a pure function, on a real store, and its flags. (A real peer process over its
quota is tests/integration/test_eviction.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pdist.config import PeerConfig, SeedConfig, flag_names, from_mapping
from p2pdist.content.digest import digest_hex, piece_digest
from p2pdist.content.pieces import MiB
from p2pdist.errors import ConfigError
from p2pdist.storage.quota import CachedTask, CacheQuota, choose_evictions
from p2pdist.storage.store import Store


def cached(task_id: str, size: int, last_used: float, in_use: bool = False) -> CachedTask:
    return CachedTask(task_id, size, last_used, in_use)


def test_nothing_is_evicted_at_or_under_the_high_watermark() -> None:
    tasks = [cached("a", 45, 1.0), cached("b", 45, 2.0)]
    assert choose_evictions(tasks, 100, 0.9, 0.5) == []
    assert choose_evictions(tasks, None, 0.9, 0.5) == []  # no quota


def test_least_recently_used_go_first_until_the_low_watermark() -> None:
    tasks = [cached("new", 30, 9.0), cached("old", 30, 1.0), cached("mid", 30, 5.0), cached("x", 5, 7.0)]
    # 95 bytes > 90: oldest first, down to at most the low mark.
    assert choose_evictions(tasks, 100, 0.9, 0.7) == ["old"]
    assert choose_evictions(tasks, 100, 0.9, 0.5) == ["old", "mid"]


def test_a_task_in_use_is_never_evicted_even_if_the_quota_stays_exceeded() -> None:
    tasks = [cached("served", 80, 1.0, in_use=True), cached("idle", 30, 5.0)]
    assert choose_evictions(tasks, 100, 0.9, 0.5) == ["idle"]
    assert choose_evictions([cached("served", 120, 1.0, in_use=True)], 100, 0.9, 0.5) == []


def _fill(store: Store, n: int, size: int) -> str:
    task_id = "sha256:" + f"{n:02x}" * 32
    task = store.open(task_id, size)
    digests = []
    for number in range(task.layout.count):
        data = bytes([n]) * task.layout.length(number)
        writer = task.new_piece(number)
        writer.write(data)
        writer.commit()
        digests.append(piece_digest(data))
    task.save_digests(digests)
    return task_id


def test_quota_on_a_real_store_removes_lru_blobs_but_not_pinned_or_busy_ones(tmp_path: Path) -> None:
    store = Store(tmp_path)
    ids = [_fill(store, n, 4 * MiB) for n in range(5)]
    for age, task_id in enumerate(ids):
        store.tasks[task_id].last_used = 1000.0 + age  # ids[0] is the least recently used
    store.pin(ids[0])  # a piece of it is being sent
    quota = CacheQuota(store, 16 * MiB, 0.9, 0.5, busy=lambda task_id: task_id == ids[1])  # downloading

    evicted = quota.enforce()

    # 20 MiB > 14.4: down to 8 MiB, skipping the pinned and the busy blob.
    assert evicted == [ids[2], ids[3], ids[4]]
    assert set(store.tasks) == {ids[0], ids[1]}
    assert sorted(p.name for p in (tmp_path / "tasks").iterdir()) == sorted(digest_hex(t) for t in (ids[0], ids[1]))
    store.unpin(ids[0])
    store.tasks[ids[0]].last_used = 0.0
    assert quota.enforce() == []  # 8 MiB is under the high watermark
    # What is left still loads and verifies after a restart.
    assert Store(tmp_path).load() == 4  # the two blobs, each in two pieces of 2 MiB


def test_cache_flags_exist_and_watermarks_are_checked() -> None:
    for cls in (PeerConfig, SeedConfig):
        flags = flag_names(cls)
        assert flags["cache_quota_bytes"] == "--cache-quota"
        assert flags["cache_high_watermark"] == "--cache-high-watermark"
        config = from_mapping(
            cls, {"cache_quota_bytes": "10GiB", "cache_high_watermark": 0.8, "cache_low_watermark": "0.6"}
        )
        assert (config.cache_quota_bytes, config.cache_high_watermark, config.cache_low_watermark) == (
            10 << 30,
            0.8,
            0.6,
        )
        with pytest.raises(ConfigError, match="cache_low_watermark"):
            from_mapping(cls, {"cache_high_watermark": 0.5, "cache_low_watermark": 0.7})
        with pytest.raises(ConfigError, match="fraction"):
            from_mapping(cls, {"cache_high_watermark": 1.5})
        assert from_mapping(cls, {}).cache_quota_bytes is None  # unlimited by default
