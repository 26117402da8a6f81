"""The client side of the scheduler API, shared by peers and seeds."""

from __future__ import annotations

import contextlib
import ssl
from typing import TypeVar

import httpx
import trio

from p2pdist import wire
from p2pdist.errors import UpstreamError
from p2pdist.trust import bearer_headers

R = TypeVar("R")


class SchedulerClient:
    def __init__(self, url: str, *, timeout_s: float = 3.0, secret: str | None = None,
                 verify: ssl.SSLContext | bool = True) -> None:
        self.url = url.rstrip("/")
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s),
                                        limits=httpx.Limits(max_connections=16),
                                        headers=bearer_headers(secret), verify=verify)

    async def call(self, path: str, message: object, reply: type[R]) -> R:
        """POST a message; raise UpstreamError with a one-line reason on any failure."""
        try:
            response = await self.client.post(
                self.url + path, content=wire.encode(message),
                headers={"content-type": wire.CONTENT_TYPE, "x-p2pdist": "1"})
        except httpx.HTTPError as exc:
            raise UpstreamError(f"scheduler {self.url} unreachable: {type(exc).__name__}") from None
        if response.status_code != 200:
            raise UpstreamError(f"scheduler answered {response.status_code}: {response.text.strip()[:200]}")
        return wire.decode(reply, response.content)

    async def say_goodbye(self, host_id: str) -> None:
        """Best effort, on shutdown: tell the scheduler to stop offering this host."""
        with trio.move_on_after(1.0), contextlib.suppress(UpstreamError):
            await self.call("/v1/hosts/leave", wire.LeaveHost(host_id=host_id), wire.Empty)

    async def aclose(self) -> None:
        await self.client.aclose()
