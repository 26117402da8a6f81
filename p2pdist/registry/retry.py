"""How fetches from the origin are retried: one policy for seeds and back-to-source peers.

Pure: the caller sleeps. Every try resumes at the first piece not yet stored, so a retry
costs only the bytes of the piece that was cut.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from p2pdist.errors import OriginError


@dataclass(frozen=True)
class RetryPolicy:
    """`attempts` tries in all; before try k + 1, min(cap_s, base_s · 2^k) seconds, scaled by a
    random factor in [1 - jitter, 1 + jitter) so hosts cut off together do not return together."""

    attempts: int = 5
    base_s: float = 0.25
    cap_s: float = 8.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {self.attempts}")
        if self.base_s < 0 or self.cap_s < 0 or not 0 <= self.jitter <= 1:
            raise ValueError("delays must not be negative and jitter must be within [0, 1]")

    def delay_s(self, failures: int, rng: random.Random) -> float:
        """Seconds to wait after the `failures`-th failed try (1 for the first)."""
        return min(self.cap_s, self.base_s * 2.0**failures) * (1 - self.jitter + 2 * self.jitter * rng.random())

    def retry_after(self, failures: int, error: OriginError, rng: random.Random) -> float | None:
        """Seconds to wait before trying again after the `failures`-th failure, or None to give up.

        A 4xx is the origin's answer about the request (unknown blob, denied), not a failure of
        the origin: asking again gets the same answer, so it is not retried.
        """
        if error.status is not None and 400 <= error.status < 500:
            return None
        if failures >= self.attempts:
            return None
        return self.delay_s(failures, rng)


# The seed's old setting, now everyone's (peers had 4 tries from 0.5 s). The usual failure is a
# body cut mid-stream, and a try resumes at the first missing piece, so tries are cheap: the
# first retry comes after about 0.5 s, and five tries still give an origin that is down about
# 7.5 s (0.5 + 1 + 2 + 4) to come back before the pull fails, what either old policy gave.
ORIGIN_RETRY = RetryPolicy(attempts=5, base_s=0.25, cap_s=8.0, jitter=0.5)
