"""What every service shares around its HTTP handler: metrics, health, logging set-up, SIGTERM.

A service is `async def serve(config, *, task_status)`; `run_service` runs one from the CLI
until SIGTERM or SIGINT, then cancels it with a deadline.
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from p2pdist.errors import P2PError
from p2pdist.transport.server import Request, Response

SHUTDOWN_DEADLINE_S = 4.0


def metrics_response(registry: CollectorRegistry) -> Response:
    return Response(200, [("content-type", CONTENT_TYPE_LATEST)], generate_latest(registry))


def health_response() -> Response:
    return Response(200, [("content-type", "text/plain")], b"ok\n")


def open_endpoint(request: Request, registry: CollectorRegistry) -> Response | None:
    """`/healthz` and `/metrics`, which every service answers without a cluster secret; None
    for any other path."""
    if request.path == "/healthz":
        return health_response()
    if request.path == "/metrics":
        return metrics_response(registry)
    return None


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)


def run_service(serve: Callable[..., Awaitable[Any]], config: Any, name: str) -> int:
    """Run `serve(config)` until SIGTERM/SIGINT; exit within SHUTDOWN_DEADLINE_S."""
    log = logging.getLogger(f"p2pdist.{name}")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                await nursery.start(serve, config)
                log.info("%s ready", name)
                async for signum in signals:
                    log.info("%s stopping on %s", name, signal.Signals(signum).name)
                    break
            nursery.cancel_scope.deadline = trio.current_time() + SHUTDOWN_DEADLINE_S
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    except BaseExceptionGroup as group:
        raise _first_reportable(group) from None
    return 0


def _first_reportable(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error a start-up failure is about, out of the nurseries' exception groups: the
    first P2PError or OSError (each names its address, path or flag), else the group itself."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    for leaf in leaves:
        if isinstance(leaf, P2PError | OSError):
            return leaf
    return group
