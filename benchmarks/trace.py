"""Traces of the control traffic a scheduler receives: what `benchmarks.simulate --trace-out`
records (every request of the simulated rollout, with its simulated time, host, type and the
daemon's own wire message as encoded) and `benchmarks.load --replay` sends to a real scheduler.

A trace is a msgpack stream: a header map, then one array per request,
[time_s, host_id, type, path, body], as the simulator handled them (its ticks can hand the
scheduler a request a few ms older than the one before; read_trace sorts them by time).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import msgpack

from p2pdist import wire
from p2pdist.config import SchedulerConfig
from p2pdist.wire import AnnounceHost, Register, SeedProgress, Sync, SyncReply
from scheduler.state import Scheduler, WakeSeed

FORMAT = "p2pdist scheduler requests"
VERSION = 1
# The request types a trace holds, and the API path each is sent to.
PATHS = {
    "announce": "/v1/hosts",
    "register": "/v1/tasks/register",
    "sync": "/v1/tasks/sync",
    "seed": "/v1/tasks/seed",
    "leave": "/v1/tasks/leave",
}


@dataclass(frozen=True)
class TraceRecord:
    time_s: float
    host_id: str
    kind: str  # a key of PATHS
    path: str
    body: bytes  # the wire message as the daemon encodes it


class TraceWriter:
    def __init__(self, path: Path, header: dict[str, Any]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: BinaryIO = open(path, "wb")  # noqa: SIM115 - closed by close()
        self._packer = msgpack.Packer(use_bin_type=True)
        self._file.write(self._packer.pack({"format": FORMAT, "version": VERSION, **header}))
        self.records = 0

    def add(self, time_s: float, host_id: str, kind: str, message: object) -> None:
        body = wire.encode(message)
        self._file.write(self._packer.pack([round(time_s, 6), host_id, kind, PATHS[kind], body]))
        self.records += 1

    def close(self) -> None:
        self._file.close()


def read_trace(path: Path) -> tuple[dict[str, Any], list[TraceRecord]]:
    """The header and the records of a trace; ValueError if the file is not one."""
    with open(path, "rb") as file:
        unpacker = msgpack.Unpacker(file, raw=False, strict_map_key=True)
        items: Iterator[Any] = iter(unpacker)
        header = next(items, None)
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise ValueError(f"{path}: not a trace of scheduler requests")
        if header.get("version") != VERSION:
            raise ValueError(f"{path}: trace version {header.get('version')!r}, this reads {VERSION}")
        records = []
        for item in items:
            time_s, host_id, kind, request_path, body = item
            records.append(TraceRecord(float(time_s), str(host_id), str(kind), str(request_path), bytes(body)))
    records.sort(key=lambda r: r.time_s)  # stable: one host's requests keep their order
    return header, records


class TracingScheduler(Scheduler):
    """The simulator's scheduler, writing down each request it receives before acting on it."""

    def __init__(self, config: SchedulerConfig, *, rng: random.Random, writer: TraceWriter) -> None:
        super().__init__(config, rng=rng)
        self.writer = writer

    def announce(self, msg: AnnounceHost, now: float) -> None:
        self.writer.add(now, msg.host_id, "announce", msg)
        super().announce(msg, now)

    def register(self, msg: Register, now: float) -> tuple[SyncReply, WakeSeed | None]:
        self.writer.add(now, msg.host_id, "register", msg)
        return super().register(msg, now)

    def sync(self, msg: Sync, now: float) -> tuple[SyncReply, WakeSeed | None]:
        self.writer.add(now, msg.host_id, "sync", msg)
        return super().sync(msg, now)

    def seed_progress(self, msg: SeedProgress, now: float) -> None:
        self.writer.add(now, msg.host_id, "seed", msg)
        super().seed_progress(msg, now)
