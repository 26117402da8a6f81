"""Piece news: a node tells the children fetching from it what it holds the moment a piece is
stored, so they do not learn it from the scheduler (issue 17). The child's side is peer/parentnews.py.

    GET /v1/tasks/<digest>/news?since=<version>&wait_ms=<ms>&digests=<n>

A long-poll: it answers at once when the node's version of the task differs from `since`, else
when the next piece is stored or after `wait_ms` (capped at MAX_WAIT_MS), with a wire.PieceNews
body. The version is the number of pieces held, which only grows while a task is held. A seed
adds the digests it computed, from index `digests` on (the child has the ones before).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import trio

from p2pdist import wire
from p2pdist.content.digest import parse_digest
from p2pdist.errors import BadRequest
from p2pdist.storage.store import Store, TaskStore
from p2pdist.transport.drain import current as current_drain
from p2pdist.transport.server import Request, Response, text_response

NEWS_PATH = re.compile(r"/v1/tasks/(?P<task>[^/]+)/news")
MAX_WAIT_MS = 10_000  # a poll is answered within this even when nothing happens
MAX_QUERY_INT = 1 << 62


def _query_int(request: Request, name: str, default: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    # isascii: str.isdigit() is also true of "²", which int() refuses.
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
        raise BadRequest(f"invalid {name} {raw[:20]!r}: want a non-negative integer")
    value = int(raw)
    if value >= MAX_QUERY_INT:
        raise BadRequest(f"invalid {name} {raw[:20]!r}: too large")
    return value


class PieceNews:
    """The news endpoint of one node's piece server, woken by its store."""

    def __init__(self, store: Store, digests: Callable[[TaskStore], list[bytes]] | None = None) -> None:
        self.store = store
        self.digests = digests  # a seed's: the digests it computed for a task
        self._stored: dict[str, trio.Event] = {}  # task id -> set when its next piece is stored
        self._drain_hooked = False
        store.on_piece = self.piece_stored

    def piece_stored(self, task_id: str) -> None:
        event = self._stored.pop(task_id, None)
        if event is not None:
            event.set()

    async def _drained(self) -> None:
        """Draining started: every waiting poll answers now, so children move on."""
        stored, self._stored = self._stored, {}
        for event in stored.values():
            event.set()

    async def handle(self, request: Request, task: str) -> Response:
        if request.method != "GET":
            return text_response(405, "news is read with GET", [("allow", "GET")])
        task_id = parse_digest(task)
        since = _query_int(request, "since", 0)
        wait_ms = min(_query_int(request, "wait_ms", 0), MAX_WAIT_MS)
        known = _query_int(request, "digests", 0)
        news = await self.wait(task_id, since, wait_ms / 1000, known)
        return Response(200, [("content-type", wire.CONTENT_TYPE)], wire.encode(news))

    async def wait(self, task_id: str, since: int, wait_s: float, known_digests: int) -> wire.PieceNews:
        """The task's news once its version differs from `since`, or after `wait_s` as it is."""
        deadline = trio.current_time() + wait_s
        drain = current_drain()
        if drain is not None and not self._drain_hooked:
            # Woken by the drain rather than looking every second: a node holds a poll per
            # child and parent, and a timer firing costs about what a piece request does.
            drain.on_drain(self._drained)
            self._drain_hooked = True
        while True:
            # Not store.get: a poll is not a use, and must not keep a task from the cache quota.
            task = self.store.tasks.get(task_id)
            version = 0 if task is None else len(task.pieces)
            if version != since or trio.current_time() >= deadline or (drain is not None and drain.draining):
                return self._news(task_id, task, version, known_digests)
            event = self._stored.setdefault(task_id, trio.Event())
            with trio.move_on_at(deadline):
                await event.wait()

    def _news(self, task_id: str, task: TaskStore | None, version: int, known_digests: int) -> wire.PieceNews:
        if task is None:
            return wire.PieceNews(task_id=task_id, version=0)
        first = 0
        digests: list[bytes] = []
        if self.digests is not None:
            held = self.digests(task)
            first = min(known_digests, len(held))
            digests = held[first:]
        return wire.PieceNews(
            task_id=task_id,
            version=version,
            pieces=task.pieces.to_bytes(),
            complete=task.complete(),
            first_digest=first,
            piece_digests=digests,
        )
