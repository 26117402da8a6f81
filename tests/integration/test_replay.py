"""benchmarks.load --replay end to end: a small simulated rollout's control traffic, written
down by the simulator, sent to a real scheduler process over its HTTP API and reported."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from benchmarks.simulate import main as simulate_main
from benchmarks.trace import read_trace

CHECKOUT = Path(__file__).resolve().parents[2]


def test_replay_sends_every_request_of_a_trace_to_a_real_scheduler_and_reports_a_verdict(tmp_path: Path) -> None:
    trace = tmp_path / "trace.msgpack"
    args = ["--peers", "16", "--blob-size", "24MiB", "--peer-rate", "50MiB", "--origin-rate", "200MiB"]
    assert simulate_main([*args, "--out", str(tmp_path / "sim"), "--quiet", "--trace-out", str(trace)]) == 0
    _, records = read_trace(trace)
    announces = [r for r in records if r.kind == "announce"]
    timed = [r for r in records if r.kind != "announce"]
    assert len(announces) == 17 and timed  # 16 peers and the seed; then registers, syncs, seed reports

    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.load", "--replay", str(trace)],
        cwd=CHECKOUT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    out = run.stdout
    assert f"17 hosts, {len(timed)} requests over" in out and "after 17 announces" in out
    # Every request reached the real scheduler and was answered 200: the trace's messages are
    # the daemons' own, valid as they stand.
    assert re.search(rf"answered {len(timed)} in [\d.]+ s \(\d+/s\), 0 errors", out), out
    for kind in ("register", "sync", "seed"):
        count = sum(1 for r in timed if r.kind == kind)
        assert re.search(rf"  {kind}\s+{count} requests, latency p50", out), out
    # The verdict names its grounds; on a loaded 2-core machine it may be any of the three.
    assert re.search(r"^verdict: (KEPT UP|NOT KEPT UP|INCONCLUSIVE) - \S", out, re.MULTILINE), out
    assert re.search(r"scheduler CPU [\d.]+ s = \d+% of its core, [\d.]+ ms per request", out), out
