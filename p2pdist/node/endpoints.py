"""What every service shares around its HTTP handler: metrics, health, logging set-up, SIGTERM.

A service is `async def serve(config, *, task_status)`; `run_service` runs one from the CLI
until SIGTERM (after draining, see transport/drain.py) or SIGINT, then cancels it with a deadline.
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from p2pdist.errors import P2PError
from p2pdist.transport import drain as drain_module
from p2pdist.transport.drain import Drain
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
    """Run `serve(config)` until a signal. SIGTERM drains: new requests are refused, those in
    flight get up to `config.drain_timeout_s` to finish (a second SIGTERM or SIGINT cuts it
    short); SIGINT stops at once; SIGHUP is logged and ignored. Then the service is cancelled
    and exits within SHUTDOWN_DEADLINE_S."""
    log = logging.getLogger(f"p2pdist.{name}")

    async def main() -> None:
        drain = Drain()
        drain_module.CURRENT.set(drain)  # before the service starts: its tasks inherit it
        async with trio.open_nursery() as nursery:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                await nursery.start(serve, config)
                log.info("%s ready", name)
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        log.info("%s: SIGHUP ignored (the config is read at start: restart to change it)", name)
                        continue
                    log.info("%s stopping on %s", name, signal.Signals(signum).name)
                    if signum == signal.SIGTERM:
                        await _drain(drain, config.drain_timeout_s, signals, log, name)
                    break
            nursery.cancel_scope.deadline = trio.current_time() + SHUTDOWN_DEADLINE_S
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    except BaseExceptionGroup as group:
        raise _first_reportable(group) from None
    return 0


async def _drain(drain: Drain, timeout_s: float, signals: AsyncIterator[int], log: logging.Logger, name: str) -> None:
    """Drain until idle, the deadline, or another SIGTERM/SIGINT (SIGHUP still ignored)."""
    log.info("%s draining: %d request(s) in flight, up to %.0f s", name, drain.in_flight, timeout_s)
    started = trio.current_time()
    async with trio.open_nursery() as nursery:

        async def drain_then_stop() -> None:
            finished = await drain.run(timeout_s)
            took = trio.current_time() - started
            if finished:
                log.info("%s drained in %.1f s", name, took)
            else:
                log.warning(
                    "%s: drain deadline (%.0f s) passed with %d request(s) in flight", name, took, drain.in_flight
                )
            nursery.cancel_scope.cancel()

        nursery.start_soon(drain_then_stop)
        async for signum in signals:
            if signum == signal.SIGHUP:
                log.info("%s: SIGHUP ignored while draining", name)
                continue
            log.info("%s: %s while draining: stopping now", name, signal.Signals(signum).name)
            nursery.cancel_scope.cancel()
            break


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
