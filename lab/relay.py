"""A counting TCP relay: put it in front of the origin to measure (and cap) what it sends.

`serve_relay` is a trio nursery service; `python -m lab.relay` runs the same relay as
its own process and keeps its counters in a JSON file (see `procs.RelayProcess`).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import trio

from lab.pump import RECEIVE_BYTES, pump
from p2pdist.transport.ratelimit import TokenBucket

STATS_INTERVAL_S = 0.2


@dataclass
class RelayStats:
    """Counters of one relay; downstream is target → clients, upstream is clients → target."""

    downstream_bytes: int = 0
    upstream_bytes: int = 0
    connections: int = 0
    active_connections: int = 0
    failed_connects: int = 0


async def _one_way(
    source: trio.SocketStream,
    sink: trio.SocketStream,
    stats: RelayStats,
    *,
    downstream: bool,
    bucket: TokenBucket | None,
    receive_bytes: int,
) -> None:
    """Copy `source` to `sink` until EOF, then half-close `sink`."""

    def count(nbytes: int) -> None:
        if downstream:
            stats.downstream_bytes += nbytes
        else:
            stats.upstream_bytes += nbytes

    try:
        await pump(source, sink, receive_bytes=receive_bytes, bucket=bucket, on_bytes=count)
        await sink.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        # One side went away: tear down both directions.
        await trio.aclose_forcefully(source)
        await trio.aclose_forcefully(sink)


async def serve_relay(
    target_host: str,
    target_port: int,
    stats: RelayStats,
    *,
    listen_port: int = 0,
    rate_bps: int | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Relay 127.0.0.1:`listen_port` to the target until cancelled; `started(port)`.

    `rate_bps` caps the downstream rate summed over all connections.
    """
    bucket = TokenBucket(rate_bps) if rate_bps is not None else None
    # Small reads under a low cap keep the rate smooth rather than bursty.
    receive_bytes = RECEIVE_BYTES
    if rate_bps is not None:
        receive_bytes = max(16 * 1024, min(RECEIVE_BYTES, rate_bps // 50))

    async def handle(client: trio.SocketStream) -> None:
        stats.connections += 1
        stats.active_connections += 1
        try:
            try:
                target = await trio.open_tcp_stream(target_host, target_port)
            except OSError:
                stats.failed_connects += 1
                await trio.aclose_forcefully(client)
                return
            async with client, target, trio.open_nursery() as nursery:
                upstream = functools.partial(_one_way, downstream=False, bucket=None, receive_bytes=RECEIVE_BYTES)
                downstream = functools.partial(_one_way, downstream=True, bucket=bucket, receive_bytes=receive_bytes)
                nursery.start_soon(upstream, client, target, stats)
                nursery.start_soon(downstream, target, client, stats)
        finally:
            stats.active_connections -= 1

    listeners = await trio.open_tcp_listeners(listen_port, host="127.0.0.1")
    port: int = listeners[0].socket.getsockname()[1]
    task_status.started(port)
    await trio.serve_listeners(handle, listeners)


def _write_stats(path: Path, stats: RelayStats, listen_port: int) -> None:
    """Replace the stats file atomically; `written_at` is taken before the counters."""
    record: dict[str, object] = {
        "written_at": time.time(),
        "listen_port": listen_port,
        "pid": os.getpid(),
    }
    record.update(asdict(stats))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)


async def run_relay_process(
    target_host: str, target_port: int, listen_port: int, stats_file: Path, rate_bps: int | None
) -> None:
    """The relay as a process: serve, write stats every 0.2 s, and once more on SIGTERM/SIGINT."""
    stats = RelayStats()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            relay = functools.partial(serve_relay, listen_port=listen_port, rate_bps=rate_bps)
            port = await nursery.start(relay, target_host, target_port, stats)

            async def write_periodically() -> None:
                while True:
                    _write_stats(stats_file, stats, port)
                    await trio.sleep(STATS_INTERVAL_S)

            nursery.start_soon(write_periodically)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break
    _write_stats(stats_file, stats, port)


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host, int(port)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lab.relay", description=__doc__)
    parser.add_argument("--target", type=_host_port, required=True, help="HOST:PORT to relay to")
    parser.add_argument("--listen", type=int, default=0, help="port on 127.0.0.1 (0: any)")
    parser.add_argument("--rate-bps", type=int, default=None, help="cap on downstream bytes/s")
    parser.add_argument("--stats-file", type=Path, required=True, help="JSON counters, rewritten")
    args = parser.parse_args(argv)
    if args.rate_bps is not None and args.rate_bps <= 0:
        parser.error("--rate-bps must be positive")
    host, port = args.target
    trio.run(run_relay_process, host, port, args.listen, args.stats_file, args.rate_bps)


if __name__ == "__main__":
    main()
