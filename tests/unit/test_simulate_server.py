"""The simulator's scheduler as a one-core server: requests queue, answers come after their service."""

from __future__ import annotations

from pathlib import Path

from benchmarks.simulate import SimConfig, simulate
from p2pdist.config import PeerConfig

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


def test_service_times_per_request_type_are_charged_per_type() -> None:
    import dataclasses

    # Syncs are nearly all of the requests: charging them 20 ms and the rest nothing puts the
    # syncs, not the registrations, in line.
    slow_syncs = dataclasses.replace(config(0.0), scheduler_service_s_by_type={"sync": 0.020})
    result, sim = simulate(slow_syncs)
    by_type = result["scheduler_server"]["by_type"]
    assert result["scheduler_server"]["service_ms_by_type"] == {"sync": 20.0}
    assert by_type["sync"]["requests"] == len(sim.sched_latency_by_type["sync"]) > 0
    assert min(sim.sched_latency_by_type["sync"]) >= 0.020 - 1e-12
    assert by_type["register"]["requests"] == 30 and by_type["seed"]["requests"] > 0
    assert result["p2p"]["hosts_with_all_pieces"] == 30


def test_a_register_answered_after_the_daemons_timeout_sends_the_host_back_to_source() -> None:
    import dataclasses

    # 30 registers at 150 ms each: the 21st waits over 3 s (scheduler_timeout_s), where a
    # daemon without patience stops waiting and goes to the origin; the scheduler still handles
    # it in its turn.
    impatient = PeerConfig(scheduler_patience_s=0.0)
    result, sim = simulate(
        dataclasses.replace(config(0.0), scheduler_service_s_by_type={"register": 0.150}, peer=impatient)
    )
    late = [t for t in sim.sched_latency_by_type["register"] if t > 3.0]
    assert late
    assert result["p2p"]["back_to_source"] == len(late) <= result["scheduler_timeouts"]  # syncs behind them too
    assert result["p2p"]["hosts_complete"] == 30 - len(late)
    assert len(sim.sched.tasks[next(iter(sim.sched.tasks))].peers) == 31  # every host and the seed joined


def test_with_patience_a_busy_scheduler_is_waited_for_and_nobody_goes_to_the_origin() -> None:
    import dataclasses

    # The same line of registers: the modelled scheduler is busy, never frozen, so it answers the
    # daemon's liveness probe and a patient peer (the default, 30 s) waits past its 3 s timeout.
    result, sim = simulate(dataclasses.replace(config(0.0), scheduler_service_s_by_type={"register": 0.150}))
    assert max(sim.sched_latency_by_type["register"]) > 3.0
    assert result["p2p"]["back_to_source"] == 0 and result["scheduler_timeouts"] == 0
    assert result["p2p"]["hosts_complete"] == 30
    assert result["scheduler_patience_s"] == PeerConfig().scheduler_patience_s


def test_the_service_flag_takes_one_time_or_one_per_type() -> None:
    import argparse

    import pytest

    from benchmarks.simulate import parse_service_ms

    assert parse_service_ms("0.3") == (0.3, {})
    assert parse_service_ms("register=0.4,sync=0.25,seed=0.2,leave=0.1") == (
        0.0,
        {"register": 0.4, "sync": 0.25, "seed": 0.2, "leave": 0.1},
    )
    assert parse_service_ms("0.3, sync=0.25") == (0.3, {"sync": 0.25})
    for bad in ("fast", "sync=x", "announce=1", "sync=-1", "sync=1,0.3"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_service_ms(bad)


def test_a_trace_holds_every_request_the_scheduler_received_as_the_daemon_encoded_it(tmp_path: Path) -> None:
    import dataclasses

    from benchmarks.trace import read_trace
    from p2pdist import wire

    path = tmp_path / "trace.msgpack"
    result, sim = simulate(dataclasses.replace(config(0.0), trace_out=path))
    header, records = read_trace(path)
    assert header["peers"] == 30
    kinds = [r.kind for r in records]
    assert kinds.count("announce") == 31 and kinds.count("register") == sim.stats["registers"]
    assert kinds.count("sync") > 0 and kinds.count("seed") > 0
    assert [r.time_s for r in records] == sorted(r.time_s for r in records)
    sync = next(r for r in records if r.kind == "sync")
    assert sync.path == "/v1/tasks/sync" and wire.decode(wire.Sync, sync.body).host_id == sync.host_id
    assert result["p2p"]["hosts_with_all_pieces"] == 30
