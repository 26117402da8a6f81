"""Benchmark results on disk: result.json, a Markdown table and a completion-time CDF plot.

Shared by the benchmarks that compare p2p against direct pulls (simulate, rollout) so their
outputs have one shape: every time is also given as a ratio to the lower bound T_min.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SCHEMES = ("p2p", "direct")


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between ranks, like numpy's default."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    below = math.floor(rank)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (rank - below)


def summarize(completion_s: Sequence[float], origin_bytes: int) -> dict[str, Any]:
    """The per-scheme fields: every completion time, p50, p99, max and bytes taken from the origin."""
    return {
        "completion_s": [round(t, 4) for t in completion_s],
        "p50_s": percentile(completion_s, 50),
        "p99_s": percentile(completion_s, 99),
        "max_s": max(completion_s),
        "origin_bytes": origin_bytes,
    }


def _user_system(stat: Path) -> tuple[float, float]:
    fields = stat.read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far."""
    return sum(_user_system(Path(f"/proc/{pid}/stat")))


def cpu_by_thread(pid: int) -> dict[str, float]:
    """A process's CPU time so far, user and system, split between its main thread (a daemon's
    event loop) and all its other threads together, those that have exited included (the
    kernel adds a thread's time to its process when it ends)."""
    user, system = _user_system(Path(f"/proc/{pid}/stat"))
    loop_user, loop_system = _user_system(Path(f"/proc/{pid}/task/{pid}/stat"))
    return {
        "event_loop_user": loop_user,
        "event_loop_system": loop_system,
        "workers_user": max(0.0, user - loop_user),
        "workers_system": max(0.0, system - loop_system),
    }


def lower_bound_s(peers: int, blob_bytes: int, origin_bps: float, upload_bps: float, download_bps: float) -> float:
    """Kumar & Ross (2006): no scheme finishes N hosts before max(F/u_s, F/d, N·F/(u_s + N·u))."""
    return max(
        blob_bytes / origin_bps, blob_bytes / download_bps, peers * blob_bytes / (origin_bps + peers * upload_bps)
    )


def preheated_lower_bound_s(
    peers: int, blob_bytes: int, seed_bps: float, upload_bps: float, download_bps: float
) -> float:
    """The same bound when a seed already holds the blob before the rollout: the origin is out
    of the picture, and the seed's upload u_seed takes its place, max(F/d, N·F/(u_seed + N·u))."""
    return max(blob_bytes / download_bps, peers * blob_bytes / (seed_bps + peers * upload_bps))


def site_lower_bound_s(
    *,
    sites: int,
    site_hosts: int,
    blob_bytes: int,
    piece_bytes: int,
    origin_bps: float,
    uplink_bps: float,
    upload_bps: float,
    download_bps: float,
) -> float:
    """No scheme that passes whole pieces on (as p2pdist does) finishes every host of `sites`
    sites of `site_hosts`, each site behind a WAN uplink of `uplink_bps` each way, before this.

    The blob must cross a site's uplink (F/u_wan) and leave the core (F/u_core, the origin's
    rate), each host must take it in (F/d); all sites together take S·F in, which only the
    origin and the other sites' uplinks can send (S·F/(u_s + S·u_wan)); a site's own swarm
    (Kumar & Ross inside it, the uplink as its server) needs N_s·F/(u_wan + N_s·u). The largest
    of these is the time the last byte can enter; with more than one host in a site, the last
    piece then still has to reach another host inside (P/d).
    """
    return max(
        blob_bytes / uplink_bps,
        blob_bytes / origin_bps,
        blob_bytes / download_bps,
        sites * blob_bytes / (origin_bps + sites * uplink_bps),
        site_hosts * blob_bytes / (uplink_bps + site_hosts * upload_bps),
    ) + (piece_bytes / download_bps if site_hosts > 1 else 0.0)


def site_staged_bound_s(
    *, site_hosts: int, blob_bytes: int, origin_bps: float, uplink_bps: float, upload_bps: float, download_bps: float
) -> float:
    """The bound issue 13 states for a site: the blob into the site first, max(F/u_wan, F/u_core)
    (u_core: the origin's rate), then the site's own swarm with the uplink as its server
    (Kumar & Ross inside the site: max(F/d, N_s·F/(u_wan + N_s·u))). Pipelining overlaps the
    two stages, so a scheme can beat it; site_lower_bound_s is the bound nothing beats."""
    return max(blob_bytes / uplink_bps, blob_bytes / origin_bps) + max(
        blob_bytes / download_bps, site_hosts * blob_bytes / (uplink_bps + site_hosts * upload_bps)
    )


def write_results(out_dir: Path, result: dict[str, Any]) -> None:
    """Write result.json, report.md and cdf.png for `result`.

    `result` needs `peers`, `blob_bytes`, `lower_bound_s` and, for "p2p" and "direct", a dict
    with `completion_s`, `p50_s`, `p99_s`, `origin_bytes` (see `summarize`). Optional: `title`,
    `command`, `machine`, `runtime_s`, `notes` (list of lines) and anything else worth keeping.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    (out_dir / "report.md").write_text(markdown(result))
    plot_cdf(out_dir / "cdf.png", result)


def markdown(result: dict[str, Any]) -> str:
    bound = result["lower_bound_s"]
    blob = result["blob_bytes"]
    lines = [f"# {result.get('title', 'p2p against direct pull')}", ""]
    lines.append(f"{result['peers']} hosts, blob {blob / (1 << 20):.0f} MiB, lower bound T_min = {bound:.2f} s.")
    lines += ["", "| scheme | hosts done | p50 | p99 | max | origin bytes |", "|---|---|---|---|---|---|"]
    for scheme in SCHEMES:
        r = result.get(scheme)
        if r is None:
            continue
        times = r["completion_s"]
        worst = r.get("max_s", max(times))
        lines.append(
            f"| {scheme} | {len(times)} | {r['p50_s']:.2f} s ({r['p50_s'] / bound:.2f}·T_min) "
            f"| {r['p99_s']:.2f} s ({r['p99_s'] / bound:.2f}·T_min) "
            f"| {worst:.2f} s ({worst / bound:.2f}·T_min) "
            f"| {r['origin_bytes'] / blob:.2f}·F |"
        )
    lines.append("")
    for key in ("command", "machine", "runtime_s", "cpu_s"):
        if key in result:
            lines.append(f"- {key}: `{result[key]}`")
    for note in result.get("notes", []):
        lines.append(f"- {note}")
    return "\n".join(lines) + "\n"


def step_cdf(ax: Any, completion: Sequence[float], style: str, label: str) -> None:
    """Draw the fraction of hosts done against completion time, as steps."""
    times = sorted(completion)
    n = len(times)
    ax.step(times, [(i + 1) / n for i in range(n)], style, where="post", label=label)


def plot_cdf(path: Path, result: dict[str, Any]) -> None:
    """Completion-time CDFs of both schemes on a log time axis, T_min marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bound = result["lower_bound_s"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=90)
    for scheme, style in zip(SCHEMES, ("-", "--"), strict=True):
        r = result.get(scheme)
        if r is None or not r["completion_s"]:
            continue
        step_cdf(
            ax, r["completion_s"], style, f"{scheme}: p50 {r['p50_s'] / bound:.2f}, p99 {r['p99_s'] / bound:.2f} ·T_min"
        )
    ax.axvline(bound, color="grey", linestyle=":", label=f"T_min = {bound:.2f} s")
    ax.set_xscale("log")
    ax.set_xlabel("completion time per host (s, log scale)")
    ax.set_ylabel("fraction of hosts done")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{result['peers']} hosts, {result['blob_bytes'] / (1 << 20):.0f} MiB blob")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
