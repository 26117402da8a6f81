"""The swarm simulator end to end at a size that runs in seconds: real scheduler, real selection."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.report import percentile
from benchmarks.simulate import SimConfig, main, simulate

MiB = 1 << 20


def test_small_swarm_every_host_completes_with_all_pieces(tmp_path: Path) -> None:
    out = tmp_path / "sim"
    assert (
        main(
            [
                "--peers",
                "40",
                "--blob-size",
                "48MiB",
                "--peer-rate",
                "100MiB",
                "--origin-rate",
                "400MiB",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    result = json.loads((out / "result.json").read_text())
    for key in ("peers", "blob_bytes", "lower_bound_s", "p2p", "direct"):
        assert key in result
    assert result["peers"] == 40 and result["blob_bytes"] == 48 * MiB
    # T_min = max(F/u_s, F/d, N·F/(u_s + N·u)) = max(0.12, 0.48, 1920/4400) s
    assert abs(result["lower_bound_s"] - 0.48) < 1e-9
    for scheme in ("p2p", "direct"):
        r = result[scheme]
        assert len(r["completion_s"]) == 40
        assert all(t >= result["lower_bound_s"] - 1e-6 for t in r["completion_s"])
        assert r["p50_s"] <= r["p99_s"] <= max(r["completion_s"]) + 1e-9
    assert result["p2p"]["hosts_with_all_pieces"] == 40
    assert result["p2p"]["back_to_source"] == 0
    assert result["p2p"]["origin_bytes"] == 48 * MiB  # one seed fetched it once
    assert result["direct"]["origin_bytes"] == 40 * 48 * MiB
    # Direct: 40 hosts share 400 MiB/s, 10 MiB/s each: about 4.8 s (early starters go faster).
    assert 4.4 <= result["direct"]["p50_s"] <= 5.0
    assert result["p2p"]["p99_s"] < result["direct"]["p50_s"]
    assert (out / "report.md").read_text().count("| p2p |") == 1
    assert (out / "cdf.png").stat().st_size > 1000
    # Where the upload went: every sample's idle shares and the share in use make up the whole.
    assert (out / "idle.png").stat().st_size > 1000
    samples = dict(result["upload_utilization"])
    for row in result["idle_upload"]:
        idle = sum(v for k, v in row.items() if k not in ("t", "downloading", "in_flight_per_host", "queued_per_host"))
        assert abs(samples[row["t"]] + idle - 1.0) < 0.01, row


def test_every_simulated_peer_holds_every_piece() -> None:
    result, sim = simulate(
        SimConfig(
            peers=25,
            blob_bytes=20 * MiB + 123,
            peer_upload_bps=50 * MiB,
            peer_download_bps=80 * MiB,
            origin_bps=200 * MiB,
            seed=3,
        )
    )
    assert sim.layout.count == 6  # 4 MiB pieces (50 MiB/s uploads), a short last piece too
    assert all(p.have == sim.all_pieces and p.done_s is not None for p in sim.peers)
    assert not any(sim.f_live)  # no transfer left running
    task = next(iter(sim.sched.tasks.values()))
    assert all(task.peers[p.host_id].done for p in sim.peers)  # the scheduler saw every one finish
    assert result["p2p"]["hosts_complete"] == 25


def test_percentile_interpolates_like_numpy() -> None:
    values = [1.0, 2.0, 3.0, 4.0]
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 4.0
    assert percentile(values, 50) == 2.5
    assert abs(percentile(values, 99) - 3.97) < 1e-9


def test_sites_each_piece_crosses_each_sites_uplink_about_once() -> None:
    """40 hosts in 4 sites of 10 behind 50 MiB/s uplinks: with the site rule each site takes
    the blob in about once and finishes near the site bound; without it, many times over."""
    common = {
        "peers": 40,
        "blob_bytes": 48 * MiB,
        "peer_upload_bps": 100 * MiB,
        "peer_download_bps": 100 * MiB,
        "origin_bps": 1024 * MiB,
        "sites": 4,
        "site_uplink_bps": 50 * MiB,
    }
    aware, sim = simulate(SimConfig(**common))  # type: ignore[arg-type]
    sites = aware["sites"]
    assert aware["p2p"]["hosts_complete"] == 40 and aware["p2p"]["back_to_source"] == 0
    # bound = max(F/u_wan, ...) + P/d = 48/50 + 4/100 s (pieces of 4 MiB: hosts at 100 MiB/s)
    assert abs(sites["site_lower_bound_s"] - 1.0) < 1e-9
    # staged = max(F/u_wan, F/u_core) + max(F/d, N_s·F/(u_wan + N_s·u)) = 0.96 + max(0.48, 480/1050) s
    assert abs(sites["site_staged_bound_s"] - 1.44) < 1e-9
    assert [s["site"] for s in sites["per_site"]] == ["site-000", "site-001", "site-002", "site-003"]
    assert all(0.99 * 48 * MiB <= s["bytes_in"] <= 1.05 * 48 * MiB for s in sites["per_site"])
    assert sites["bytes_in_max_F"] <= 1.05
    assert aware["p2p"]["p99_s"] >= sites["site_lower_bound_s"]
    assert sites["p99_over_site_bound"] < 3.0
    assert all(len(f) == 0 for f in sim.sched.tasks[next(iter(sim.sched.tasks))].wan_fetchers.values())
    blind, _ = simulate(SimConfig(**common, site_aware=False))  # type: ignore[arg-type]
    assert blind["sites"]["bytes_in_mean_F"] > 3 * sites["bytes_in_mean_F"]
    assert blind["p2p"]["p99_s"] > 2 * aware["p2p"]["p99_s"]
