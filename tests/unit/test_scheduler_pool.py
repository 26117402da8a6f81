"""The client side of several schedulers, against real in-process schedulers on loopback: a
task's calls go to its owner and fall to the next in rank when the owner does not answer, a
refusal (4xx) is not taken for a dead scheduler, and a name resolves to one scheduler per address."""

from __future__ import annotations

import socket

import pytest
import trio

from p2pdist import wire
from p2pdist.cluster.rendezvous import rank
from p2pdist.config import SchedulerConfig
from p2pdist.errors import UpstreamError
from p2pdist.transport.schedclient import SchedulerPool
from scheduler.service import serve as serve_scheduler


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def task_owned_by(url: str, members: list[str]) -> str:
    for n in range(1000):
        task = "sha256:" + f"{n:064x}"
        if rank(task, members)[0] == url:
            return task
    raise AssertionError("no task hashes to " + url)


async def test_a_task_whose_owner_is_down_goes_to_the_next_in_rank_and_stays_there() -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            live = []
            for _ in range(2):
                host, port = await nursery.start(
                    serve_scheduler, SchedulerConfig(listen="127.0.0.1:0", allowed_registries=("registry",))
                )
                live.append(f"http://{host}:{port}")
            down = closed_port_url()
            members = [*live, down]
            pool = SchedulerPool(members, timeout_s=2.0, backoff_s=30.0)
            task = task_owned_by(down, members)
            register = wire.Register(host_id="peer-1", task_id=task, url="http://registry/v2/a/blobs/" + task)

            reply, answered = await pool.call_task(task, "/v1/tasks/register", register, wire.SyncReply)

            assert answered == rank(task, members)[1]
            assert reply.task_id == task
            assert pool.owner(task) == answered  # the dead owner is skipped for the back-off
            with pytest.raises(UpstreamError) as refused:
                await pool.call(answered, "/v1/no-such-endpoint", register, wire.Empty)
            assert refused.value.upstream_status == 404
            assert pool.membership.is_alive(answered, trio.current_time())  # a refusal is not death
            up: list[str] = []
            pool.on_up = up.append
            pool.membership.failed(live[0], trio.current_time())
            await pool.call(live[0], "/v1/hosts/leave", wire.LeaveHost(host_id="peer-1"), wire.Empty)
            assert up == [live[0]]  # answered again: the node announces to it at once
            await pool.aclose()
            nursery.cancel_scope.cancel()


async def test_every_scheduler_down_is_one_clear_error() -> None:
    with trio.fail_after(10):
        pool = SchedulerPool([closed_port_url(), closed_port_url()], timeout_s=2.0, backoff_s=30.0)
        task = "sha256:" + "ab" * 32
        with pytest.raises(UpstreamError, match="no scheduler answered .*cannot connect"):
            await pool.call_task(task, "/v1/tasks/register", wire.Empty(), wire.SyncReply)
        assert pool.membership.alive(trio.current_time()) == []
        # Every one in its back-off: none is tried until a probe (the announce loop) gets an answer.
        assert pool.order(task) == []
        with pytest.raises(UpstreamError, match="no scheduler answered in the last 30s"):
            await pool.call_task(task, "/v1/tasks/register", wire.Empty(), wire.SyncReply)
        await pool.aclose()


async def test_a_scheduler_that_does_not_answer_costs_one_timeout_not_one_per_blob() -> None:
    """The circuit breaker: a frozen scheduler (it accepts, never answers) is skipped for its
    back-off after one timed-out call, so the next blobs fail over at once."""
    with trio.fail_after(10):
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)  # the kernel accepts; nobody ever reads or answers
        frozen = f"http://127.0.0.1:{listener.getsockname()[1]}"
        pool = SchedulerPool([frozen], timeout_s=1.0, backoff_s=30.0)
        try:
            started = trio.current_time()
            with pytest.raises(UpstreamError):
                await pool.call_task("sha256:" + "ab" * 32, "/v1/tasks/register", wire.Empty(), wire.SyncReply)
            assert trio.current_time() - started >= 1.0  # the first blob pays the timeout
            started = trio.current_time()
            for n in range(20):
                with pytest.raises(UpstreamError, match="no scheduler answered in the last"):
                    task = "sha256:" + f"{n:064x}"
                    await pool.call_task(task, "/v1/tasks/register", wire.Empty(), wire.SyncReply)
            assert trio.current_time() - started < 0.5  # the next twenty pay nothing
        finally:
            await pool.aclose()
            listener.close()


async def test_a_name_becomes_one_scheduler_per_address() -> None:
    with trio.fail_after(10):
        pool = SchedulerPool(["http://localhost:8002", "http://127.0.0.2:9000", "https://localhost:8003"])
        told: list[str] = []
        pool.on_up = told.append
        await pool.resolve()
        assert pool.members == ("http://127.0.0.1:8002", "http://127.0.0.2:9000", "https://localhost:8003")
        assert told == ["http://127.0.0.1:8002"]  # new: the node announces to it at once
        await pool.resolve()
        assert told == ["http://127.0.0.1:8002"]  # the same answer changes nothing
        await pool.aclose()
