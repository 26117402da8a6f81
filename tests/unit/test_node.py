"""The node core shared by peers and seeds: what it announces, the cache quota and the leave
it sends, the endpoints of its piece port, and `serve` on port 0. The scheduler is a fake
object that records calls, so nothing leaves this process."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio

from p2pdist import wire
from p2pdist.config import NodeConfig, SeedConfig
from p2pdist.content.pieces import MiB
from p2pdist.errors import NotFound, UpstreamError
from p2pdist.node.node import Node
from p2pdist.registry.client import OriginClient
from p2pdist.storage.store import TaskStore
from p2pdist.transport.server import FileBody, Request
from seed.daemon import SeedDaemon

OLD = "sha256:" + "ab" * 32
NEW = "sha256:" + "cd" * 32
EMPTY = "sha256:" + "ef" * 32


class FakeScheduler:
    """Stands in for the SchedulerPool: one scheduler; records every call; raises `failure`
    while it is set."""

    members = ("http://scheduler.invalid:8002",)

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.goodbyes: list[str] = []
        self.closed = False
        self.failure: Exception | None = None
        self.announced = trio.Event()

    async def call(self, url: str, path: str, message: object, reply: type[Any]) -> Any:
        self.calls.append((path, message))
        if path == "/v1/hosts":
            self.announced.set()
        if self.failure is not None:
            raise self.failure
        return reply()

    async def call_all(self, path: str, message: object, reply: type[Any]) -> None:
        with contextlib.suppress(UpstreamError):
            await self.call(self.members[0], path, message, reply)

    async def resolve(self) -> None:
        pass

    async def resolve_loop(self, interval_s: float) -> None:
        pass

    async def say_goodbye(self, host_id: str) -> None:
        self.goodbyes.append(host_id)

    async def aclose(self) -> None:
        self.closed = True


class RecordingNode(Node[NodeConfig]):
    kind = "peer"

    def __init__(self, config: NodeConfig) -> None:
        super().__init__(config, origin=OriginClient())
        self.scheduler = FakeScheduler()  # type: ignore[assignment]
        self.writing: set[str] = set()
        self.forgotten: list[str] = []

    def busy(self, task_id: str) -> bool:
        return task_id in self.writing

    def forget(self, task_id: str) -> None:
        self.forgotten.append(task_id)


def node(tmp_path: Path, **config: Any) -> RecordingNode:
    return RecordingNode(NodeConfig(data_dir=str(tmp_path / "node"), listen="127.0.0.1:0", **config))


def put(task: TaskStore, number: int) -> None:
    writer = task.new_piece(number)
    writer.write(bytes([number + 1]) * task.layout.length(number))
    writer.commit()


def request(path: str, method: str = "GET") -> Request:
    return Request(method, path, path, {}, {}, ("127.0.0.1", 1))


def sent(n: RecordingNode, path: str) -> list[Any]:
    return [message for called, message in n.scheduler.calls if called == path]  # type: ignore[attr-defined]


def test_holdings_announce_tasks_with_verified_pieces_only(tmp_path: Path) -> None:
    n = node(tmp_path)
    task = n.store.open(OLD, 9 * MiB, "http://registry/v2/a/blobs/" + OLD)  # 5 pieces: 2 MiB each, 1 MiB
    put(task, 0)
    put(task, 2)
    n.store.open(EMPTY, 1 * MiB)
    [holding] = n.holdings()
    assert holding.task_id == OLD and holding.content_length == 9 * MiB
    assert holding.url == "http://registry/v2/a/blobs/" + OLD
    assert holding.pieces == task.pieces.to_bytes()
    assert holding.piece_digests == []  # a peer's digests are not trusted
    assert holding.piece_size == 2 * MiB


def test_a_holding_cut_by_the_old_rule_announces_no_piece_size(tmp_path: Path) -> None:
    """What an older scheduler, which refuses unknown fields, reads: the field is left out."""
    n = node(tmp_path)
    put(n.store.open(OLD, 9 * MiB, piece_size=4 * MiB), 0)
    [holding] = n.holdings()
    assert holding.piece_size is None
    assert "piece_size" not in msgpack.unpackb(wire.encode(holding))


def test_a_seed_announces_its_piece_digests(tmp_path: Path) -> None:
    seed = SeedDaemon(SeedConfig(data_dir=str(tmp_path / "seed")))
    task = seed.store.open(OLD, 1 * MiB)
    put(task, 0)
    task.save_digests([b"d" * 32])
    [holding] = seed.holdings()
    assert holding.piece_digests == [b"d" * 32]


async def test_quota_evicts_the_least_recently_used_and_tells_the_scheduler(tmp_path: Path) -> None:
    n = node(tmp_path, cache_quota_bytes=6 * MiB)
    old, new = n.store.open(OLD, 4 * MiB, piece_size=4 * MiB), n.store.open(NEW, 4 * MiB, piece_size=4 * MiB)
    put(old, 0)
    put(new, 0)
    old.last_used, new.last_used = 1.0, 2.0
    await n.enforce_quota()
    assert n.store.get(OLD) is None and n.store.get(NEW) is not None
    assert n.forgotten == [OLD]
    assert sent(n, "/v1/tasks/leave") == [wire.Leave(host_id=n.host_id, task_id=OLD)]


async def test_quota_keeps_a_task_the_role_is_busy_with(tmp_path: Path) -> None:
    n = node(tmp_path, cache_quota_bytes=6 * MiB)
    old, new = n.store.open(OLD, 4 * MiB, piece_size=4 * MiB), n.store.open(NEW, 4 * MiB, piece_size=4 * MiB)
    put(old, 0)
    put(new, 0)
    old.last_used, new.last_used = 1.0, 2.0
    n.writing.add(OLD)
    await n.enforce_quota()
    assert n.store.get(OLD) is not None and n.store.get(NEW) is None
    assert sent(n, "/v1/tasks/leave") == [wire.Leave(host_id=n.host_id, task_id=NEW)]


async def test_a_failed_leave_does_not_stop_the_eviction(tmp_path: Path) -> None:
    n = node(tmp_path, cache_quota_bytes=1 * MiB)
    put(n.store.open(OLD, 4 * MiB), 0)
    n.scheduler.failure = UpstreamError("scheduler down")  # type: ignore[attr-defined]
    await n.enforce_quota()
    assert n.store.get(OLD) is None and n.forgotten == [OLD]


async def test_a_repeated_announce_failure_warns_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    n = node(tmp_path)
    n.scheduler.failure = UpstreamError("scheduler answered 401: wrong cluster secret")  # type: ignore[attr-defined]
    with caplog.at_level(logging.DEBUG, logger="p2pdist.peer"):
        for _ in range(3):
            await n.announce()
    levels = [r.levelno for r in caplog.records if "announce to the scheduler failed" in r.message]
    assert levels == [logging.WARNING, logging.DEBUG, logging.DEBUG]
    assert n.metrics.scheduler_errors._value.get() == 3
    n.scheduler.failure = None  # type: ignore[attr-defined]
    await n.announce()
    n.scheduler.failure = UpstreamError("scheduler answered 401: wrong cluster secret")  # type: ignore[attr-defined]
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="p2pdist.peer"):
        await n.announce()
    assert [r.levelno for r in caplog.records] == [logging.WARNING]  # after a success it warns again


async def test_the_piece_port_answers_health_and_metrics_and_404s_unknown_paths(tmp_path: Path) -> None:
    n = node(tmp_path)
    health = await n.handle(request("/healthz"))
    assert (health.status, health.body) == (200, b"ok\n")
    metrics = await n.handle(request("/metrics"))
    assert metrics.status == 200 and isinstance(metrics.body, bytes)
    assert b"p2pdist_peer_upload_bytes_total" in metrics.body
    with pytest.raises(NotFound):
        await n.handle(request("/v1/nothing-here"))
    with pytest.raises(NotFound):
        await n.handle(request(f"/v1/tasks/{OLD}/pieces/0"))  # not held


async def test_a_piece_being_sent_is_pinned_until_the_send_ends(tmp_path: Path) -> None:
    n = node(tmp_path)
    put(n.store.open(OLD, 1 * MiB), 0)
    response = await n.handle(request(f"/v1/tasks/{OLD}/pieces/0"))
    assert response.status == 200 and isinstance(response.body, FileBody)
    assert n.store.in_use(OLD)
    assert response.body.on_done is not None
    response.body.on_done()
    assert not n.store.in_use(OLD)


async def test_a_seed_routes_its_trigger_endpoint_before_pieces(tmp_path: Path) -> None:
    seed = SeedDaemon(SeedConfig(data_dir=str(tmp_path / "seed")))
    refused = await seed.handle(request("/v1/seed/tasks", method="GET"))
    assert refused.status == 405
    with pytest.raises(NotFound):
        await seed.handle(request("/v1/seed/other"))


async def test_serve_binds_port_zero_announces_its_url_and_says_goodbye(tmp_path: Path) -> None:
    n = node(tmp_path)
    fake: FakeScheduler = n.scheduler  # type: ignore[assignment]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(n.serve)
            assert host == "127.0.0.1" and port != 0
            assert n.advertise == f"http://127.0.0.1:{port}"
            await fake.announced.wait()
            [announce] = sent(n, "/v1/hosts")
            assert (announce.url, announce.kind, announce.host_id) == (n.advertise, "peer", n.host_id)
            nursery.cancel_scope.cancel()
    assert fake.goodbyes == [n.host_id] and fake.closed
