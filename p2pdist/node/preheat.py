"""The preheat endpoints of a node's piece port: a preheat job (scheduler/jobs.py) asks a seed
or peer to hold a blob before anyone pulls it (`POST /v1/preheat`) and polls how far it is
(`GET /v1/preheat/<digest>`). The role decides how it fetches (`Node.preheat`) and says how
far it is (`Node.preheat_status`); this module only speaks HTTP and msgpack.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from p2pdist import wire
from p2pdist.content.digest import parse_digest
from p2pdist.storage.store import TaskStore
from p2pdist.transport.server import Request, Response, text_response
from p2pdist.transport.trust import refuse_unauthorized

if TYPE_CHECKING:
    from p2pdist.node.node import Node

PREHEAT_PATH = "/v1/preheat"


def _msgpack(status: int, message: object) -> Response:
    return Response(status, [("content-type", wire.CONTENT_TYPE)], wire.encode(message))


async def preheat_route(node: Node[Any], request: Request) -> Response | None:
    """The answer to a preheat request, or None when the path is not a preheat one."""
    path = request.path
    if path != PREHEAT_PATH and not path.startswith(PREHEAT_PATH + "/"):
        return None
    if (refused := refuse_unauthorized(request, node.config.cluster_secret)) is not None:
        return refused
    if path == PREHEAT_PATH:
        if request.method != "POST":
            return text_response(405, f"{PREHEAT_PATH} takes POST", [("allow", "POST")])
        message = wire.decode(wire.PreheatBlob, await request.body(limit=wire.MAX_BODY_BYTES))
        node.preheat(message)
        return _msgpack(202, wire.Empty())
    if request.method not in ("GET", "HEAD"):
        return text_response(405, f"{PREHEAT_PATH}/<digest> takes GET", [("allow", "GET, HEAD")])
    task_id = parse_digest(path[len(PREHEAT_PATH) + 1 :])
    return _msgpack(200, node.preheat_status(task_id))


def held_status(task_id: str, store: TaskStore | None) -> wire.PreheatStatus:
    """What the store alone says: a complete blob is done, pieces of one are running."""
    if store is None:
        return wire.PreheatStatus(task_id=task_id, state="unknown")
    size = store.layout.blob_size
    state: wire.PreheatState = "done" if store.complete() else "running"
    return wire.PreheatStatus(
        task_id=task_id, state=state, content_length=size, bytes_done=bytes_held(store) if state != "done" else size
    )


def bytes_held(store: TaskStore) -> int:
    return sum(store.layout.length(number) for number in store.pieces)
