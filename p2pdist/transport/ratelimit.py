"""Upload rate limiting: a token bucket shared by every connection of one daemon.

`TokenLedger` is the arithmetic (refill, reservation, refund) with the clock passed in, so it
can be tested with a fake clock; `TokenBucket` is the thin trio shell that sleeps on it.
"""

from __future__ import annotations

import trio

# Smallest default burst: a few socket writes' worth, so low rates still move data in
# reasonably sized chunks.
MIN_BURST_BYTES = 64 * 1024
# Default burst as a fraction of a second of traffic. The bucket can let at most
# `burst + rate * t` bytes through in any window of t seconds, so 1/16 s keeps the overshoot
# within 3% over a 2 s window however many senders share it. Smaller bursts cost CPU: every
# burst is a sleep and a wake-up on both ends of each upload (1/50 s cost a 16-host rollout
# on 2 cores 2 CPU-seconds more).
DEFAULT_BURST_S = 1 / 16


def default_burst_bytes(rate_bps: int) -> int:
    return max(MIN_BURST_BYTES, int(rate_bps * DEFAULT_BURST_S))


class TokenLedger:
    """Token-bucket arithmetic with reservations: no I/O, no trio, the clock is an argument.

    `reserve` always succeeds at once and returns how long the caller must wait before using
    its tokens; the balance may go negative (debt), which queues later callers behind earlier
    ones in arrival order. A request larger than the burst therefore never deadlocks: it just
    waits until the debt it created has been paid back by the refill.
    """

    def __init__(self, rate_bps: int, burst_bytes: int) -> None:
        if rate_bps <= 0:
            raise ValueError(f"rate_bps must be positive, got {rate_bps}")
        if burst_bytes <= 0:
            raise ValueError(f"burst_bytes must be positive, got {burst_bytes}")
        self.rate_bps = rate_bps
        self.burst_bytes = burst_bytes
        self.tokens = float(burst_bytes)
        self._last: float | None = None

    def refill(self, now: float) -> None:
        if self._last is None:
            self._last = now
            return
        elapsed = now - self._last
        if elapsed > 0:
            self.tokens = min(float(self.burst_bytes), self.tokens + elapsed * self.rate_bps)
            self._last = now

    def reserve(self, nbytes: int, now: float) -> float:
        """Take `nbytes` tokens now; return the seconds to wait before sending them."""
        if nbytes < 0:
            raise ValueError(f"cannot take a negative number of tokens: {nbytes}")
        self.refill(now)
        self.tokens -= nbytes
        if self.tokens >= 0:
            return 0.0
        return -self.tokens / self.rate_bps

    def refund(self, nbytes: int, now: float) -> None:
        """Give back tokens a caller reserved but will not use (e.g. it was cancelled)."""
        self.refill(now)
        self.tokens = min(float(self.burst_bytes), self.tokens + nbytes)


class TokenBucket:
    """A token bucket in bytes per second, shared by all the connections of one daemon."""

    def __init__(self, rate_bps: int, burst_bytes: int | None = None) -> None:
        if burst_bytes is None:
            burst_bytes = default_burst_bytes(rate_bps)
        self._ledger = TokenLedger(rate_bps, burst_bytes)

    @property
    def rate_bps(self) -> int:
        return self._ledger.rate_bps

    @property
    def burst_bytes(self) -> int:
        return self._ledger.burst_bytes

    async def take(self, nbytes: int) -> None:
        """Wait until `nbytes` may be sent. Cancelling the wait gives the tokens back."""
        wait_s = self._ledger.reserve(nbytes, trio.current_time())
        if wait_s <= 0:
            await trio.lowlevel.checkpoint()
            return
        try:
            await trio.sleep(wait_s)
        except BaseException:
            self._ledger.refund(nbytes, trio.current_time())
            raise


def maybe_bucket(rate_bps: int | None) -> TokenBucket | None:
    """A bucket for `rate_bps`, or None (unlimited) when it is None or 0."""
    if not rate_bps:
        return None
    return TokenBucket(rate_bps)
