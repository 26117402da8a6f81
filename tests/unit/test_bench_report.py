"""benchmarks.report's CPU accounting, read from /proc for this test process."""

from __future__ import annotations

import os
import threading
import time

from benchmarks.report import cpu_by_thread, cpu_seconds


def _burn(seconds: float) -> None:
    start = time.thread_time()
    while time.thread_time() - start < seconds:
        pass


def test_cpu_of_a_finished_worker_thread_counts_for_the_workers_not_the_event_loop() -> None:
    before = cpu_by_thread(os.getpid())
    worker = threading.Thread(target=_burn, args=(0.3,))
    worker.start()
    worker.join()
    after = cpu_by_thread(os.getpid())
    workers = (after["workers_user"] + after["workers_system"]) - (before["workers_user"] + before["workers_system"])
    loop = (after["event_loop_user"] + after["event_loop_system"]) - (
        before["event_loop_user"] + before["event_loop_system"]
    )
    # The thread spent 0.3 s of CPU and has exited; this thread only waited for it.
    assert workers >= 0.2
    assert loop < workers


def test_the_split_adds_up_to_the_process_total() -> None:
    split = cpu_by_thread(os.getpid())
    total = cpu_seconds(os.getpid())
    assert abs(sum(split.values()) - total) < 0.05
