"""A child's side of piece news: one long-poll of a parent's news endpoint (p2pdist/node/news.py)
per parent, on the cluster's kept-alive HTTP client, until the parent is dropped or lost.

A connection that fails, or a poll unanswered well past its wait, means the parent is gone:
the child hears it here at once, not from the scheduler. A child fetching from a parent hears
its news on the piece answers themselves (PIECES_HEADER), so it polls only while it is out of
touch with that parent (`quiet`): a poll is answered on every piece the parent stores, which
per child and parent cost as much as the pieces.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Awaitable, Callable

import trio

from p2pdist import wire
from p2pdist.errors import BadRequest, UpstreamError
from p2pdist.transport.piececlient import PieceClient

log = logging.getLogger("p2pdist.peer")

NEWS_WAIT_MS = 10_000  # how long a parent holds a poll with nothing new (its cap, MAX_WAIT_MS)
# An answer later than the wait by this much: the parent is frozen or its link is gone. Loose,
# since a loaded host answers late and a wrong verdict costs the parent for BLOCK_S.
NEWS_SLACK_S = 10.0
REFUSED_PAUSE_S = 1.0  # after a 503 (draining, or at its connection cap): ask again this much later
REFUSALS = 5  # 503s in a row before the parent counts as lost
MAX_NEWS_BYTES = 1 << 20


class NewsEnd(enum.Enum):
    LOST = "lost"  # the connection failed, or no answer in time: the parent is gone
    UNSUPPORTED = "unsupported"  # a parent without a news endpoint (older version): no news from it


async def follow_news(
    client: PieceClient,
    parent_url: str,
    task_id: str,
    *,
    known_digests: Callable[[], int],
    on_news: Callable[[wire.PieceNews], None],
    heard: Callable[[], int] = lambda: 0,
    quiet: Callable[[], Awaitable[None]] | None = None,
) -> tuple[NewsEnd, str]:
    """Poll a parent's news until cancelled, calling `on_news` with each answer; return why it
    ended otherwise, and a reason for the log. `heard()` is the newest version the child has
    heard of otherwise (on piece answers): a poll waits for news past it. `quiet`, awaited
    before each poll but the first, returns once the child wants to poll again."""
    since: int | None = None  # the first poll answers at once, whatever the version
    refusals = 0
    while True:
        if since is not None:
            if quiet is not None:
                await quiet()
            since = max(since, heard())
        wait_ms = 0 if since is None else NEWS_WAIT_MS
        url = f"{parent_url}/v1/tasks/{task_id}/news?since={since or 0}&wait_ms={wait_ms}&digests={known_digests()}"
        try:
            with trio.fail_after(wait_ms / 1000 + NEWS_SLACK_S):
                async with client.get(url, {"x-p2pdist": "1"}) as response:
                    status = response.status
                    body = await response.read() if status == 200 and response.length <= MAX_NEWS_BYTES else b""
        except trio.TooSlowError:
            return NewsEnd.LOST, f"no news answer within {wait_ms / 1000 + NEWS_SLACK_S:.0f}s"
        except UpstreamError as exc:
            return NewsEnd.LOST, str(exc)
        if status in (404, 405):
            return NewsEnd.UNSUPPORTED, f"news answered HTTP {status}"
        if status == 503:
            refusals += 1
            if refusals >= REFUSALS:
                return NewsEnd.LOST, f"news refused {refusals} times in a row"
            await trio.sleep(REFUSED_PAUSE_S)
            continue
        if status != 200:
            return NewsEnd.LOST, f"news answered HTTP {status}"
        try:
            news = wire.decode(wire.PieceNews, body)
        except BadRequest as exc:
            return NewsEnd.LOST, f"malformed news: {exc}"
        if news.task_id != task_id:
            return NewsEnd.LOST, "news of another task"
        refusals = 0
        since = news.version
        on_news(news)
