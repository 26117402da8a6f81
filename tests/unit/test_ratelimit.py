"""TokenLedger arithmetic on a fake clock, and TokenBucket on trio's virtual clock."""

from __future__ import annotations

import heapq

import pytest
import trio
import trio.testing

from p2pdist.transport.ratelimit import (
    MIN_BURST_BYTES,
    TokenBucket,
    TokenLedger,
    default_burst_bytes,
    maybe_bucket,
)

MiB = 1024 * 1024


def test_full_bucket_lets_a_burst_through_at_once_then_makes_callers_wait() -> None:
    ledger = TokenLedger(rate_bps=1000, burst_bytes=500)
    assert ledger.reserve(500, now=10.0) == 0.0
    assert ledger.reserve(100, now=10.0) == pytest.approx(0.1)


def test_tokens_refill_at_the_rate_up_to_the_burst() -> None:
    ledger = TokenLedger(rate_bps=1000, burst_bytes=500)
    ledger.reserve(500, now=0.0)
    assert ledger.reserve(200, now=0.2) == 0.0  # 0.2 s refilled exactly 200
    assert ledger.reserve(500, now=100.0) == 0.0  # a long idle refills only the burst
    assert ledger.reserve(1, now=100.0) == pytest.approx(0.001)


def test_request_larger_than_the_burst_waits_instead_of_deadlocking() -> None:
    ledger = TokenLedger(rate_bps=1000, burst_bytes=100)
    assert ledger.reserve(5100, now=0.0) == pytest.approx(5.0)
    # the next caller queues behind the debt
    assert ledger.reserve(100, now=0.0) == pytest.approx(5.1)


def test_waiters_are_served_in_arrival_order() -> None:
    ledger = TokenLedger(rate_bps=100, burst_bytes=10)
    waits = [ledger.reserve(10, now=0.0) for _ in range(5)]
    assert waits == sorted(waits)
    assert waits == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])


def test_refund_gives_back_unused_tokens_but_never_above_the_burst() -> None:
    ledger = TokenLedger(rate_bps=100, burst_bytes=10)
    ledger.reserve(10, now=0.0)
    ledger.reserve(50, now=0.0)
    ledger.refund(50, now=0.0)
    assert ledger.reserve(10, now=0.1) == 0.0
    ledger.refund(1000, now=0.1)
    assert ledger.tokens == 10


def test_invalid_arguments_are_rejected() -> None:
    with pytest.raises(ValueError):
        TokenLedger(rate_bps=0, burst_bytes=10)
    with pytest.raises(ValueError):
        TokenLedger(rate_bps=10, burst_bytes=0)
    with pytest.raises(ValueError):
        TokenLedger(rate_bps=10, burst_bytes=10).reserve(-1, now=0.0)


@pytest.mark.parametrize("senders", [1, 8, 64])
def test_many_senders_together_stay_within_3_percent_of_the_rate(senders: int) -> None:
    """Simulate senders that each send 256 KiB chunks back to back and count the bytes
    released over 3 seconds of fake time."""
    rate = 50 * MiB
    ledger = TokenLedger(rate, default_burst_bytes(rate))
    chunk = 256 * 1024
    horizon = 3.0
    # (time the sender asks for its next chunk, sender id)
    asks = [(0.0, i) for i in range(senders)]
    released = 0
    while asks:
        now, sender = heapq.heappop(asks)
        send_at = now + ledger.reserve(chunk, now)
        if send_at > horizon:
            continue
        released += chunk
        heapq.heappush(asks, (send_at, sender))
    assert abs(released - rate * horizon) <= 0.03 * rate * horizon


def test_default_burst_is_a_sixteenth_of_a_second_with_a_floor() -> None:
    assert default_burst_bytes(1000) == MIN_BURST_BYTES
    assert default_burst_bytes(16 * MiB) == 1 * MiB
    assert TokenBucket(16 * MiB).burst_bytes == 1 * MiB
    assert TokenBucket(1000, burst_bytes=10).burst_bytes == 10


def test_maybe_bucket_is_none_when_unlimited() -> None:
    assert maybe_bucket(None) is None
    assert maybe_bucket(0) is None
    bucket = maybe_bucket(1234)
    assert bucket is not None and bucket.rate_bps == 1234


async def test_take_sleeps_for_the_debt(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(60):
        bucket = TokenBucket(rate_bps=1000, burst_bytes=100)
        start = trio.current_time()
        await bucket.take(100)
        assert trio.current_time() == start
        await bucket.take(2000)
        assert trio.current_time() - start == pytest.approx(2.0)


async def test_concurrent_takers_share_the_rate(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(60):
        bucket = TokenBucket(rate_bps=1000, burst_bytes=100)
        finished: list[float] = []
        start = trio.current_time()

        async def sender() -> None:
            for _ in range(10):
                await bucket.take(100)
            finished.append(trio.current_time() - start)

        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(sender)
        # 4000 bytes, 100 of them free at the start: 3.9 s, and nobody starves
        assert max(finished) == pytest.approx(3.9)
        assert min(finished) >= 3.5


async def test_cancelled_take_returns_its_tokens(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(60):
        bucket = TokenBucket(rate_bps=1000, burst_bytes=100)
        await bucket.take(100)
        with trio.move_on_after(0.5):
            await bucket.take(10_000)  # would take 10 s
        start = trio.current_time()
        await bucket.take(100)
        assert trio.current_time() - start <= 0.11
