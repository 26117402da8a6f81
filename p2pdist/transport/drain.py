"""Draining a daemon on SIGTERM: stop taking new requests, let those in flight finish.

`run_service` installs one `Drain` per process in a context variable before it starts the
service, so every task the service spawns (each HTTP connection, the node's loops) sees it
without it being threaded through every constructor. Once draining, the HTTP servers answer
new requests 503 (`/healthz` included, so a runtime or load balancer moves away; `/metrics`
stays readable), and the node stops announcing and says goodbye to the scheduler.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from contextvars import ContextVar

import trio

log = logging.getLogger("p2pdist.drain")

# Paths still answered while draining: reading metrics changes nothing.
OPEN_WHILE_DRAINING = frozenset({"/metrics"})
HOOK_TIMEOUT_S = 3.0


class Drain:
    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self._idle = trio.Event()
        self._idle.set()
        self._hooks: list[Callable[[], Awaitable[None]]] = []

    def refuses(self, path: str) -> bool:
        """Whether a new request for `path` is to be answered 503."""
        return self.draining and path not in OPEN_WHILE_DRAINING

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        """Count one request from its head to the end of its response."""
        if self.in_flight == 0:
            self._idle = trio.Event()
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    def on_drain(self, hook: Callable[[], Awaitable[None]]) -> None:
        """Run `hook` when draining starts (a node tells the scheduler it is leaving)."""
        self._hooks.append(hook)

    async def run(self, timeout_s: float) -> bool:
        """Start draining and wait until nothing is in flight, up to `timeout_s`; whether
        everything in flight finished."""
        self.draining = True
        for hook in self._hooks:
            with trio.move_on_after(HOOK_TIMEOUT_S):
                await hook()
        with trio.move_on_after(timeout_s):
            await self._idle.wait()
        return self.in_flight == 0


CURRENT: ContextVar[Drain | None] = ContextVar("p2pdist_drain", default=None)


def current() -> Drain | None:
    """The process's Drain (None outside `run_service`, e.g. a service started by a test)."""
    return CURRENT.get()
