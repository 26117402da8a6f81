"""The piece server every peer and seed runs: GET /v1/tasks/<digest>/pieces/<n>, with Range,
and the task's piece news (GET /v1/tasks/<digest>/news, p2pdist/node/news.py).

Serves only pieces already verified and renamed into the store, straight from disk with
sendfile, and answers 503 when its upload slots are all taken so children try elsewhere.
Every answer about a piece of a task held here (the piece, busy, not held yet) says what the
node holds of the task now (PIECES_HEADER), so a child fetching from it hears its news
without a news poll. With a cluster secret, a request without it is a 401.
"""

from __future__ import annotations

import base64
import collections
import re
from collections.abc import Callable

import trio

from p2pdist.content.digest import parse_digest
from p2pdist.errors import BadRequest, NotFound, RangeNotSatisfiable
from p2pdist.node.metrics import DaemonMetrics
from p2pdist.node.news import NEWS_PATH, PieceNews
from p2pdist.storage.store import Store, TaskStore
from p2pdist.transport.server import FileBody, Request, Response, text_response
from p2pdist.transport.trust import refuse_unauthorized

QUEUE_WAIT_S = 0.5
# What a piece server is (peer or seed), on every piece it sends: a label for the child's metrics.
KIND_HEADER = "x-p2pdist-kind"
# What the node holds of the task as it answers: "<version> <bitmap, base64>", the version and
# bitmap of its piece news (p2pdist/node/news.py).
PIECES_HEADER = "x-p2pdist-pieces"
PIECE_PATH = re.compile(r"/v1/tasks/(?P<task>[^/]+)/pieces/(?P<number>[^/]+)")
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def parse_range(header: str, length: int) -> tuple[int, int] | None:
    """A single `bytes=a-b` range → half-open (start, end); None if absent. Bad ranges raise."""
    if not header:
        return None
    m = _RANGE.fullmatch(header.strip())
    if not m or (not m.group(1) and not m.group(2)):
        raise BadRequest(f"unsupported Range {header[:60]!r}: want one bytes=START-END range")
    first, last = m.group(1), m.group(2)
    if not first:  # suffix range: the last N bytes
        n = int(last)
        if n == 0:
            raise RangeNotSatisfiable(length)
        return max(0, length - n), length
    start = int(first)
    end = length if not last else min(length, int(last) + 1)
    if start >= length or (last and int(last) < start):
        raise RangeNotSatisfiable(length)
    return start, end


def pieces_header(task: TaskStore) -> tuple[str, str]:
    return PIECES_HEADER, f"{len(task.pieces)} {base64.b64encode(task.pieces.to_bytes()).decode('ascii')}"


def parse_pieces_header(value: str, count: int) -> tuple[int, bytes] | None:
    """(version, bitmap) from a PIECES_HEADER value for a blob of `count` pieces; None if it is
    not one (a parent's word is only a hint: the child checks every piece anyway)."""
    version, _, encoded = value.partition(" ")
    if not (version.isascii() and version.isdigit()) or len(version) > 9:
        return None
    try:
        bitmap = base64.b64decode(encoded, validate=True)
    except ValueError:
        return None
    if len(bitmap) != (count + 7) // 8:
        return None
    return int(version), bitmap


class PieceServer:
    def __init__(
        self,
        store: Store,
        metrics: DaemonMetrics,
        upload_slots: int,
        *,
        secret: str | None = None,
        kind: str = "peer",
        digests: Callable[[TaskStore], list[bytes]] | None = None,
    ) -> None:
        self.store = store
        # Only a seed's digests are worth sending: children trust no one else's.
        self.news = PieceNews(store, digests if kind == "seed" else None)
        self.kind = kind  # told to the child in KIND_HEADER, so it counts seed and peer bytes apart
        self.metrics = metrics
        self.upload_slots = upload_slots
        self.secret = secret
        self.active = 0
        self._queue: collections.deque[trio.Event] = collections.deque()

    def match(self, request: Request) -> bool:
        return request.path.startswith("/v1/tasks/")

    async def handle(self, request: Request) -> Response:
        if PIECE_PATH.fullmatch(request.path) is None:
            if (refused := refuse_unauthorized(request, self.secret)) is not None:
                self.metrics.pieces_served.labels("401").inc()
                return refused
            if news := NEWS_PATH.fullmatch(request.path):
                return await self.news.handle(request, news.group("task"))
            raise NotFound(f"no such endpoint {request.path[:100]}")
        checked = self._check(request)
        if isinstance(checked, Response):
            return checked
        if not await self._take_slot():
            return self._busy(checked[0])
        return self._send(*checked)

    def answer_now(self, request: Request) -> Response | None:
        """handle() for a piece request whose answer needs no wait: the piece when an upload
        slot is free, busy when the line is full too, or a refusal. No coroutine and no handler
        deadline (the HTTP server's quick handler): most piece requests in a rollout are
        answered busy at once, and the coroutine, its cancel scope and the handler chain cost
        more than the answer. None for anything else (a news poll, a request that would wait
        in line), which handle() takes from the start."""
        if PIECE_PATH.fullmatch(request.path) is None:
            return None
        checked = self._check(request)
        if isinstance(checked, Response):
            return checked
        slot = self._slot_now()
        if slot is None:
            return None
        return self._send(*checked) if slot else self._busy(checked[0])

    def _check(self, request: Request) -> Response | tuple[TaskStore, int, tuple[int, int] | None]:
        """Everything about a piece request before its upload slot: a refusal, not held, a bad
        range; or (task, piece number, byte range) to send."""
        if (refused := refuse_unauthorized(request, self.secret)) is not None:
            self.metrics.pieces_served.labels("401").inc()
            return refused
        m = PIECE_PATH.fullmatch(request.path)
        assert m is not None
        if request.method not in ("GET", "HEAD"):
            return text_response(405, "pieces are read-only: use GET", [("allow", "GET, HEAD")])
        task_id = parse_digest(m.group("task"))
        # isascii: str.isdigit() is also true of "²" and "٣", which int() refuses or misreads.
        if not (m.group("number").isascii() and m.group("number").isdigit()) or len(m.group("number")) > 9:
            raise BadRequest(f"invalid piece number {m.group('number')[:20]!r}")
        number = int(m.group("number"))
        task = self.store.get(task_id)
        if task is None:
            self.metrics.pieces_served.labels("404").inc()
            raise NotFound(f"task {task_id[:19]} not held here")
        if not 0 <= number < task.layout.count:
            raise BadRequest(f"piece {number} out of range: {task_id[:19]} has {task.layout.count} pieces")
        if not task.has(number):
            self.metrics.pieces_served.labels("404").inc()
            return text_response(404, f"piece {number} of {task_id[:19]} not held here yet", [pieces_header(task)])
        length = task.layout.length(number)
        try:
            span = parse_range(request.headers.get("range", ""), length)
        except RangeNotSatisfiable as exc:
            return text_response(416, str(exc), [("content-range", f"bytes */{exc.length}")])
        return task, number, span

    def _busy(self, task: TaskStore) -> Response:
        self.metrics.pieces_served.labels("503").inc()
        return text_response(503, "all upload slots busy", [("retry-after", "1"), pieces_header(task)])

    def _send(self, task: TaskStore, number: int, span: tuple[int, int] | None) -> Response:
        length = task.layout.length(number)
        status, start, end = (200, 0, length) if span is None else (206, *span)
        headers = [
            ("content-type", "application/octet-stream"),
            ("accept-ranges", "bytes"),
            (KIND_HEADER, self.kind),
            pieces_header(task),
        ]
        if status == 206:
            headers.append(("content-range", f"bytes {start}-{end - 1}/{length}"))
        self.metrics.pieces_served.labels(str(status)).inc()
        body = FileBody(task.path(number), start, end - start, on_done=self._upload_done)
        return Response(status, headers, body)

    def _slot_now(self) -> bool | None:
        """True: a free upload slot, taken. False: slots and line full, the answer is busy.
        None: there is room in the line, to wait in."""
        if self.active < self.upload_slots:
            self.active += 1
            self.metrics.uploads_active.set(self.active)
            return True
        if len(self._queue) >= self.upload_slots:
            return False
        return None

    async def _take_slot(self) -> bool:
        """An upload slot, waiting briefly in line for one: a request already waiting when an
        upload ends starts at once, so the link does not idle while a refused child backs off.
        Past a short line, or after the wait, the answer is busy and the child asks elsewhere."""
        if (slot := self._slot_now()) is not None:
            return slot
        turn = trio.Event()
        self._queue.append(turn)
        with trio.move_on_after(QUEUE_WAIT_S):
            await turn.wait()
        if turn.is_set():
            return True  # the finishing upload handed its slot over
        self._queue.remove(turn)
        return False

    def _upload_done(self) -> None:
        if self._queue:
            self._queue.popleft().set()  # the slot passes straight to the next in line
            return
        self.active -= 1
        self.metrics.uploads_active.set(self.active)
