"""Copying bytes from one stream to another, paced and counted: the loop under the lab's relays."""

from __future__ import annotations

from collections.abc import Callable

import trio

from p2pdist.transport.ratelimit import TokenBucket

RECEIVE_BYTES = 1024 * 1024


async def pump(
    source: trio.abc.ReceiveStream,
    sink: trio.abc.SendStream,
    *,
    receive_bytes: int = RECEIVE_BYTES,
    bucket: TokenBucket | None = None,
    on_bytes: Callable[[int], None] | None = None,
    limit: int | None = None,
) -> bool:
    """Copy `source` to `sink` until EOF, or until `limit` bytes when one is set; True if it
    stopped at the limit. `bucket` paces the copy; `on_bytes(n)` is told of every n bytes sent.
    Broken or closed streams raise as trio raises them; the caller decides what that means."""
    copied = 0
    while limit is None or copied < limit:
        want = receive_bytes if limit is None else min(receive_bytes, limit - copied)
        data = await source.receive_some(want)
        if not data:
            return False
        if bucket is not None:
            await bucket.take(len(data))
        await sink.send_all(data)
        copied += len(data)
        if on_bytes is not None:
            on_bytes(len(data))
    return True
