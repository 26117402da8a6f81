"""The simulator's scheduler as a one-core server: requests queue, answers come after their service."""

from __future__ import annotations

from benchmarks.simulate import SimConfig, simulate

MiB = 1 << 20


def config(service_s: float) -> SimConfig:
    return SimConfig(
        peers=30,
        blob_bytes=24 * MiB,
        peer_upload_bps=50 * MiB,
        peer_download_bps=50 * MiB,
        origin_bps=200 * MiB,
        scheduler_service_s=service_s,
    )


def test_a_free_scheduler_reports_no_server() -> None:
    result, _ = simulate(config(0.0))
    assert "scheduler_server" not in result
    assert result["p2p"]["hosts_with_all_pieces"] == 30


def test_a_slow_scheduler_queues_requests_and_slows_the_swarm() -> None:
    free, _ = simulate(config(0.0))
    # 20 ms a request: 30 peers syncing every 0.2 s ask for 150 requests/s, three times what
    # one core can serve, so requests wait in line and piece news arrives late.
    slow, sim = simulate(config(0.020))
    server = slow["scheduler_server"]
    assert slow["p2p"]["hosts_with_all_pieces"] == 30 and slow["p2p"]["back_to_source"] == 0
    assert server["requests"] == len(sim.sched_latency) > 0
    assert min(sim.sched_latency) >= 0.020 - 1e-12  # nobody is answered faster than the service
    assert server["latency_p99_ms"] > 100  # a line formed
    assert server["utilisation_peak"] > 0.95
    assert all(0.0 <= u <= 1.0 + 1e-9 for _, u in server["utilisation"])
    assert slow["p2p"]["p99_s"] > free["p2p"]["p99_s"]
    # One core serves at most 1/service requests a second.
    assert server["requests_per_s"] <= 1 / 0.020 + 1e-6
