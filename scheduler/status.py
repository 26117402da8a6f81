"""The scheduler's cluster view for `p2pdist status`: hosts and tasks as the state machine
holds them, as plain data. Pure: reads the state and `now`, changes nothing."""

from __future__ import annotations

from typing import Any

from scheduler.state import Scheduler

STATUS_PATH = "/v1/status"


def cluster_status(state: Scheduler, now: float) -> dict[str, Any]:
    """Hosts (kind, site, URL, upload slots, children being served, seconds since last heard)
    and tasks (size, holders, done and in-progress peers, the seed fetching it, a failure)."""
    children: dict[str, int] = {}
    for task in state.tasks.values():
        for parent, kids in task.children.items():
            children[parent] = children.get(parent, 0) + len(kids)
    hosts = [
        {
            "host_id": h.host_id,
            "kind": h.kind,
            "site": h.site,
            "location": h.location,
            "url": h.url,
            "upload_slots": h.upload_slots,
            "children": children.get(h.host_id, 0),
            "last_seen_s": round(max(0.0, now - h.last_seen), 1),
        }
        for h in sorted(state.hosts.values(), key=lambda h: (h.kind, h.site, h.host_id))
    ]
    tasks = [
        {
            "task_id": task_id,
            "size": task.content_length,
            "holders": len(task.holders),
            "done": len(task.done_peers),
            "in_progress": len(task.peers) - len(task.done_peers),
            "seed": task.seed,
            "failed": task.failed,
        }
        for task_id, task in sorted(state.tasks.items())
    ]
    return {"role": "scheduler", "hosts": hosts, "tasks": tasks}
