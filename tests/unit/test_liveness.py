"""Busy or frozen, on loopback sockets: the liveness probe is answered while the event loop runs
and not once it is stale, and a scheduler call past its timeout waits on for a scheduler that
answers the probe (up to the patience) and fails over at the timeout for one that does not."""

from __future__ import annotations

import socket
import time

import pytest
import trio

from p2pdist import wire
from p2pdist.cluster import liveness
from p2pdist.cluster.liveness import LivenessResponder, probe
from p2pdist.errors import UpstreamError
from p2pdist.transport.schedclient import SchedulerClient
from p2pdist.transport.server import Request, Response, serve_http


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_running_scheduler_answers_the_probe_and_a_stuck_or_closed_one_does_not() -> None:
    port = free_port()
    responder = LivenessResponder("127.0.0.1", port)
    responder.start()
    url = f"http://127.0.0.1:{port}"
    try:
        assert await probe(url)
        responder.beat_at = time.monotonic() - liveness.LOOP_STALE_S - 1  # the loop stopped running
        assert not await probe(url, 0.3)
        responder.beat()
        assert await probe(url)
    finally:
        responder.close()
    started = trio.current_time()
    assert not await probe(url)  # nothing listens: the port is unreachable
    assert trio.current_time() - started < liveness.PROBE_TIMEOUT_S + 0.2


def test_a_taken_udp_port_is_a_one_line_error_naming_it() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"liveness probe to udp 127.0.0.1:{port}"):
            LivenessResponder("127.0.0.1", port)


async def slow_scheduler(nursery: trio.Nursery, delay_s: float) -> str:
    """An API that answers every call after `delay_s`, with the liveness probe answered meanwhile."""

    async def handle(request: Request) -> Response:
        await request.body()
        await trio.sleep(delay_s)
        return Response(200, [("content-type", wire.CONTENT_TYPE)], wire.encode(wire.Empty()))

    host, port = await nursery.start(
        lambda task_status: serve_http(handle, "127.0.0.1", 0, name="slow", task_status=task_status)
    )
    responder = LivenessResponder(host, port)
    responder.start()
    nursery.start_soon(keep_beating, responder)
    return f"http://{host}:{port}"


async def keep_beating(responder: LivenessResponder) -> None:
    try:
        while True:
            responder.beat()
            await trio.sleep(0.1)
    finally:
        responder.close()


async def test_a_busy_scheduler_is_waited_for_up_to_the_patience() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            url = await slow_scheduler(nursery, delay_s=1.2)
            waits: list[str] = []
            patient = SchedulerClient(url, timeout_s=0.5, patience_s=5.0, on_wait=waits.append)
            started = trio.current_time()
            assert await patient.call("/v1/hosts/leave", wire.LeaveHost(host_id="a"), wire.Empty) == wire.Empty()
            assert 1.2 <= trio.current_time() - started < 2.0
            assert waits == ["busy", "busy"]  # probed before each 0.5 s deadline it outlived

            short = SchedulerClient(url, timeout_s=0.5, patience_s=0.8, on_wait=waits.append)
            started = trio.current_time()
            with pytest.raises(UpstreamError, match="no answer in 0.8"):
                await short.call("/v1/hosts/leave", wire.LeaveHost(host_id="a"), wire.Empty)
            assert trio.current_time() - started < 1.0  # out of patience: no more waiting

            impatient = SchedulerClient(url, timeout_s=0.5)
            started = trio.current_time()
            with pytest.raises(UpstreamError, match="no answer in 0.5"):
                await impatient.call("/v1/hosts/leave", wire.LeaveHost(host_id="a"), wire.Empty)
            assert trio.current_time() - started < 0.7
            for client in (patient, short, impatient):
                await client.aclose()
            nursery.cancel_scope.cancel()


async def test_a_frozen_scheduler_fails_over_at_the_timeout_whatever_the_patience() -> None:
    with trio.fail_after(10):
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)  # the kernel accepts; nothing answers, nor the probe
        waits: list[str] = []
        client = SchedulerClient(
            f"http://127.0.0.1:{listener.getsockname()[1]}", timeout_s=0.6, patience_s=30.0, on_wait=waits.append
        )
        try:
            started = trio.current_time()
            with pytest.raises(UpstreamError, match="unreachable: no answer in 0.6"):
                await client.call("/v1/hosts/leave", wire.LeaveHost(host_id="a"), wire.Empty)
            assert 0.6 <= trio.current_time() - started < 0.9
            assert waits == ["silent"]
        finally:
            await client.aclose()
            listener.close()
