"""`p2pdist status`: what the cluster (from a scheduler) or one host (from its piece port)
holds and does, as tables on a terminal or JSON for scripts. It reads the services'
read-only `/v1/status` endpoints, with the cluster secret from P2PDIST_CLUSTER_SECRET where
one is set."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import httpx

from p2pdist.config import CLUSTER_SECRET_ENV
from p2pdist.errors import UpstreamError
from p2pdist.transport.trust import bearer_headers

DEFAULT_SCHEDULER = "http://127.0.0.1:8002"
TIMEOUT_S = 10.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--scheduler", default=DEFAULT_SCHEDULER, help=f"cluster view (default: {DEFAULT_SCHEDULER})")
    where.add_argument("--peer", metavar="URL", help="one host's view: its piece server URL (--advertise)")
    parser.add_argument("--json", action="store_true", help="print the JSON the service answered")


def fetch(base: str) -> dict[str, Any]:
    url = f"{base.rstrip('/')}/v1/status"
    try:
        response = httpx.get(url, headers=bearer_headers(os.environ.get(CLUSTER_SECRET_ENV)), timeout=TIMEOUT_S)
    except httpx.HTTPError as exc:
        raise UpstreamError(f"{url}: no answer ({type(exc).__name__}: {exc})") from None
    if response.status_code == 401:
        raise UpstreamError(f"{url}: 401: set {CLUSTER_SECRET_ENV} to the cluster secret")
    if response.status_code != 200:
        raise UpstreamError(f"{url}: {response.status_code} {response.text.strip()[:200]}")
    try:
        data = response.json()
    except ValueError:
        raise UpstreamError(f"{url}: the answer is not JSON: is this a p2pdist scheduler or piece port?") from None
    if not isinstance(data, dict):
        raise UpstreamError(f"{url}: unexpected answer")
    return data


def short(task_id: str) -> str:
    algo, _, hexdigest = task_id.partition(":")
    return f"{algo}:{hexdigest[:12]}"


def size(n: object) -> str:
    if not isinstance(n, int | float) or n != n:
        return "?"
    if n == float("inf"):
        return "unlimited"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)


def render_table(headers: Sequence[str], rows: Sequence[Sequence[object]], out: TextIO) -> None:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip(), file=out)
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(), file=out)


def render(data: dict[str, Any], out: TextIO) -> None:
    if data.get("role") == "scheduler":
        hosts = data.get("hosts", [])
        print(f"hosts ({len(hosts)})", file=out)
        render_table(
            ("HOST", "KIND", "SITE", "URL", "SLOTS", "CHILDREN", "LAST SEEN"),
            [
                (h["host_id"], h["kind"], h["site"] or "-", h["url"], h["upload_slots"], h["children"],
                 f"{h['last_seen_s']:.0f}s ago")
                for h in hosts
            ],
            out,
        )  # fmt: skip
        tasks = data.get("tasks", [])
        print(f"\ntasks ({len(tasks)})", file=out)
        render_table(
            ("TASK", "SIZE", "HOLDERS", "DONE", "IN PROGRESS", "SEED", "FAILED"),
            [
                (short(t["task_id"]), size(t["size"]), t["holders"], t["done"], t["in_progress"],
                 t["seed"] or "-", t["failed"] or "-")
                for t in tasks
            ],
            out,
        )  # fmt: skip
        return
    cache = data.get("cache", {})
    quota = cache.get("quota_bytes")
    print(f"{data.get('role')} {data.get('host_id')} at {data.get('advertise')}", file=out)
    print(
        f"cache: {size(cache.get('used_bytes'))} held of {size(quota) if quota is not None else 'no quota'}, "
        f"{size(cache.get('free_disk_bytes'))} free on disk",
        file=out,
    )
    tasks = data.get("tasks", [])
    print(f"\ntasks ({len(tasks)})", file=out)
    render_table(
        ("TASK", "SIZE", "HELD", "PIECES", "LAST USE"),
        [
            (short(t["task_id"]), size(t["size"]), size(t["held_bytes"]), f"{t['pieces']}/{t['piece_count']}",
             f"{t['last_used_s']:.0f}s ago")
            for t in tasks
        ],
        out,
    )  # fmt: skip
    went = data.get("back_to_source", [])
    if went:
        print(f"\nback to source ({len(went)})", file=out)
        render_table(("TASK", "REASON"), [(short(b["task_id"]), b["reason"]) for b in went], out)


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    data = fetch(args.peer or args.scheduler)
    if args.json:
        json.dump(data, out, indent=2)
        print(file=out)
    else:
        render(data, out)
    return 0
