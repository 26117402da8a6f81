"""Prometheus metrics of the data-plane daemons (peers and seeds), one registry per daemon.

Names are `p2pdist_<role>_...` so a dashboard can tell peers from seeds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, PlatformCollector, ProcessCollector

from p2pdist.errors import P2PError

_SECONDS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# Task durations are compared within a size class: a 2 GiB layer is not slow next to a 1 MiB one.
SIZE_CLASSES = ((4 << 20, "le_4MiB"), (64 << 20, "le_64MiB"), (512 << 20, "le_512MiB"))


def size_class(size: int | None) -> str:
    """The `size_class` label of a blob of `size` bytes (`unknown` before its size is known)."""
    if size is None:
        return "unknown"
    for limit, name in SIZE_CLASSES:
        if size <= limit:
            return name
    return "gt_512MiB"


def add_process_metrics(registry: CollectorRegistry, role: str) -> None:
    """What every service's registry carries besides its own figures: the version it runs
    (`p2pdist_build_info`) and the process's memory, CPU and file descriptors (`process_*`)."""
    from p2pdist.cli.main import version

    Info("p2pdist_build", "The p2pdist version this service runs", registry=registry).info(
        {"version": version(), "role": role}
    )
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)


class DaemonMetrics:
    def __init__(self, role: str) -> None:
        self.registry = CollectorRegistry()
        r, p = self.registry, f"p2pdist_{role}"
        self.download_bytes = Counter(f"{p}_download_bytes", "Blob bytes received", ["source"], registry=r)
        self.upload_bytes = Counter(f"{p}_upload_bytes", "Piece bytes sent to other peers", registry=r)
        self.pieces = Counter(f"{p}_pieces", "Pieces fetched, by outcome", ["source", "result"], registry=r)
        self.pieces_served = Counter(f"{p}_pieces_served", "Piece requests answered", ["status"], registry=r)
        self.tasks = Counter(f"{p}_tasks", "Tasks finished, by outcome", ["result"], registry=r)
        self.back_to_source = Counter(
            f"{p}_back_to_source", "Tasks that went to the origin themselves", ["reason"], registry=r
        )
        self.task_seconds = Histogram(
            f"{p}_task_duration_seconds",
            "Time to hold a whole blob, by size class",
            ["size_class"],
            registry=r,
            buckets=_SECONDS,
        )
        self.piece_seconds = Histogram(
            f"{p}_piece_duration_seconds", "Time to fetch one piece", ["source"], registry=r, buckets=_SECONDS
        )
        self.scheduler_errors = Counter(f"{p}_scheduler_errors", "Failed calls to the scheduler", registry=r)
        self.scheduler_probes = Counter(
            f"{p}_scheduler_probes",
            "Liveness probes of a scheduler that had not answered a call in its timeout: "
            "busy (answered; the call waits on) or silent (it fails over)",
            ["outcome"],
            registry=r,
        )
        self.uploads_active = Gauge(f"{p}_uploads_active", "Piece uploads in progress", registry=r)
        self.tasks_active = Gauge(f"{p}_tasks_active", "Tasks downloading now", registry=r)
        self.upload_slots = Gauge(f"{p}_upload_slots", "Concurrent piece uploads allowed", registry=r)
        add_process_metrics(r, role)

    @contextmanager
    def task_run(self, size: Callable[[], int | None] = lambda: None) -> Iterator[Callable[[], float]]:
        """Count one task while the block runs: active inside it, then done with its duration,
        or failed when a P2PError leaves it. Yields the seconds elapsed so far, for logs."""
        started = time.monotonic()
        self.tasks_active.inc()
        try:
            yield lambda: time.monotonic() - started
        except P2PError:
            self.tasks.labels("failed").inc()
            raise
        else:
            self.tasks.labels("done").inc()
            self.task_seconds.labels(size_class(size())).observe(time.monotonic() - started)
        finally:
            self.tasks_active.dec()
