"""A small rollout benchmark run end to end: real origin, scheduler, seed and peers, every
blob checked, and the result files in the shape the full runs use."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_small_rollout_writes_results_and_every_blob_is_right(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.rollout",
            "--peers",
            "3",
            "--blob-size",
            "12MiB",
            "--layers",
            "2",
            "--peer-upload-rate",
            "32MiB",
            "--origin-rate",
            "16MiB",
            "--timeout",
            "120",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads((out / "result.json").read_text())
    assert result["peers"] == 3 and result["layers"] == 2
    assert result["blob_bytes"] >= 12 << 20
    assert result["lower_bound_s"] > 0
    for scheme in ("p2p", "direct"):
        r = result[scheme]
        assert len(r["completion_s"]) == 3 and all(t > 0 for t in r["completion_s"])
        assert r["p50_s"] <= r["p99_s"]
        assert r["blobs_verified"] == 3 * 2  # every layer on every host matched its digest
    # The origin sent the image about once for p2p, once per host for direct.
    assert result["p2p"]["origin_bytes"] <= 1.05 * result["blob_bytes"] + (64 << 10)
    assert result["direct"]["origin_bytes"] >= 3 * result["blob_bytes"]
    # Verify once is the benchmark's default: the seed signs, and a peer whose pieces all matched
    # the signed digests skips the blob's sha256 (one that got no signature in time hashes).
    assert result["verify_once"] is True
    peers = [v for k, v in result["p2p_detail"].items() if k.startswith("peer-")]
    attested = sum(v.get('blob_checks_total{how="attested"}', 0) for v in peers)
    hashed = sum(v.get('blob_checks_total{how="hashed"}', 0) for v in peers)
    assert attested + hashed == 3 * 2 and attested >= 1, (attested, hashed)
    # The peers' CPU split by thread covers the same processes and phase as their role total
    # (each figure rounded to 0.1 s).
    by_thread = result["p2p_peer_cpu_by_thread_s"]
    assert set(by_thread) == {"event_loop_user", "event_loop_system", "workers_user", "workers_system"}
    assert all(v >= 0 for v in by_thread.values())
    assert abs(sum(by_thread.values()) - result["p2p_cpu_s"]["peers"]) <= 0.25, by_thread
    assert (out / "report.md").read_text().startswith("# Rollout")
    assert (out / "cdf.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
