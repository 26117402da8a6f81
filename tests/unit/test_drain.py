"""The drain rule alone: refuse new requests (metrics excepted) once draining, wait for those
in flight, give up at the deadline, and run the leave hooks first."""

from __future__ import annotations

import trio
import trio.testing

from p2pdist.transport.drain import Drain


async def test_draining_refuses_new_requests_but_metrics_and_waits_for_those_in_flight() -> None:
    drain = Drain()
    left: list[str] = []

    async def leave() -> None:
        left.append("told the scheduler")

    drain.on_drain(leave)
    assert not drain.refuses("/healthz")
    finished = trio.Event()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def stream() -> None:
                with drain.request():
                    await finished.wait()

            nursery.start_soon(stream)
            await trio.testing.wait_all_tasks_blocked()
            assert drain.in_flight == 1

            async def finish_soon() -> None:
                await trio.sleep(0.05)
                assert drain.refuses("/healthz") and drain.refuses("/v2/") and not drain.refuses("/metrics")
                finished.set()

            nursery.start_soon(finish_soon)
            assert await drain.run(timeout_s=5)
    assert left == ["told the scheduler"] and drain.in_flight == 0


async def test_the_drain_deadline_ends_the_wait_with_requests_still_in_flight() -> None:
    drain = Drain()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def stuck() -> None:
                with drain.request():
                    await trio.sleep_forever()

            nursery.start_soon(stuck)
            await trio.testing.wait_all_tasks_blocked()
            assert not await drain.run(timeout_s=0.1)
            assert drain.in_flight == 1
            nursery.cancel_scope.cancel()
