"""A node's own view for `p2pdist status --peer URL`: the blobs it holds (bytes, last use),
its cache quota and use, and the recent downloads that went back to the origin and why.
Reads the node, changes nothing."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from p2pdist.storage.quota import held_bytes

if TYPE_CHECKING:
    from p2pdist.node.node import Node

STATUS_PATH = "/v1/status"


def node_status(node: Node[Any]) -> dict[str, Any]:
    now = time.time()
    tasks = [
        {
            "task_id": t.task_id,
            "size": t.layout.blob_size,
            "held_bytes": held_bytes(t),
            "pieces": len(t.pieces),
            "piece_count": t.layout.count,
            "complete": t.complete(),
            "last_used_s": round(max(0.0, now - t.last_used), 1),
        }
        for t in sorted(node.store.tasks.values(), key=lambda t: -t.last_used)
    ]
    return {
        "role": node.kind,
        "host_id": node.host_id,
        "advertise": node.advertise,
        "cache": {
            "quota_bytes": node.cache.quota_bytes,
            "used_bytes": node.cache.used_bytes(),
            "free_disk_bytes": node.cache.free_bytes(),
        },
        "tasks": tasks,
        "back_to_source": node.back_to_source_log(),
    }
