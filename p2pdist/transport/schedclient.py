"""The client side of the scheduler API, shared by peers and seeds."""

from __future__ import annotations

import contextlib
import ssl
from typing import TypeVar

import trio

from p2pdist import wire
from p2pdist.errors import UpstreamError
from p2pdist.transport.piececlient import PieceClient

R = TypeVar("R")
# Far above any real reply (a parent list for one task), far below what would hurt.
MAX_REPLY_BYTES = 16 << 20


class SchedulerClient:
    def __init__(
        self, url: str, *, timeout_s: float = 3.0, secret: str | None = None, verify: ssl.SSLContext | None = None
    ) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.client = PieceClient(connect_timeout_s=timeout_s, secret=secret, ssl_context=verify)

    async def call(self, path: str, message: object, reply: type[R]) -> R:
        """POST a message; raise UpstreamError with a one-line reason on any failure."""
        headers = {"content-type": wire.CONTENT_TYPE, "x-p2pdist": "1"}
        try:
            with trio.fail_after(self.timeout_s):
                async with self.client.request("POST", self.url + path, headers, wire.encode(message)) as response:
                    if response.length > MAX_REPLY_BYTES:
                        raise UpstreamError(f"scheduler sent a {response.length}-byte reply")
                    body = await response.read()
        except UpstreamError as exc:
            raise UpstreamError(f"scheduler {self.url} unreachable: {exc}") from None
        except trio.TooSlowError:
            raise UpstreamError(f"scheduler {self.url} unreachable: no answer in {self.timeout_s:g}s") from None
        if response.status != 200:
            text = body.decode("utf-8", "replace").strip()
            raise UpstreamError(f"scheduler answered {response.status}: {text[:200]}")
        return wire.decode(reply, body)

    async def say_goodbye(self, host_id: str) -> None:
        """Best effort, on shutdown: tell the scheduler to stop offering this host."""
        with trio.move_on_after(1.0), contextlib.suppress(UpstreamError):
            await self.call("/v1/hosts/leave", wire.LeaveHost(host_id=host_id), wire.Empty)

    async def aclose(self) -> None:
        await self.client.aclose()
