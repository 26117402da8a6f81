"""Which registrations the scheduler takes: a blob URL a seed may fetch (allowed registry, the
task's own digest), from a host within its registration rate, while the tasks nobody holds yet
stay under a global cap. Anything else is refused with its 4xx before it costs any state.

A host is its host id once it has announced itself; before that, the address it connects from,
so a stream of made-up host ids from one address shares one rate.

Pure: messages, counts and `now` in, a refusal (an error carrying its status) out.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass

from p2pdist.config import SchedulerConfig
from p2pdist.errors import BadRequest, Forbidden, TooManyRequests
from p2pdist.registry.allowlist import check_seed_url
from p2pdist.wire import Register

# Every registration's URL is checked, and a pull's burst of them names the same few blobs:
# a URL that passed is remembered (one that failed is checked again and refused again, as
# lru_cache keeps no exception). Few entries: URLs may be 8 KiB long.
_check_seed_url = functools.lru_cache(maxsize=256)(check_seed_url)


@dataclass
class _Bucket:
    tokens: float
    at: float


class Admission:
    """Registration checks. `sweep` (from the expiry loop) recounts waiting tasks and forgets
    idle hosts, so its own memory does not grow with the number of host ids ever seen."""

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.buckets: dict[str, _Bucket] = {}  # "host ID" or "address A" -> its registration tokens
        # Tasks no host holds a piece of: recounted by sweep, plus the new tasks admitted since.
        self.waiting = 0
        # Refusals by reason (host_rate, url, registry, waiting_cap) since the service last took them.
        self.refused: Counter[str] = Counter()

    def admit(self, msg: Register, now: float, *, new_task: bool, known_host: bool, address: str) -> None:
        """Raise the refusal of this registration (TooManyRequests, Forbidden, BadRequest), or take it.

        `known_host`: the host has announced itself; `address`: where the request came from."""
        who = f"host {msg.host_id[:64]}" if known_host else f"address {address} (host not announced)"
        if not self._take_token(who, now):
            self.refused["host_rate"] += 1
            rate = self.config.host_registrations_per_s
            raise TooManyRequests(f"{who} registers more than {rate:g} tasks/s; try again later")
        try:
            _check_seed_url(msg.url, msg.task_id, self.config.allowed_registries)
        except Forbidden:
            self.refused["registry"] += 1
            raise
        except BadRequest:
            self.refused["url"] += 1
            raise
        cap = self.config.max_waiting_tasks
        if new_task and cap and self.waiting >= cap:
            self.refused["waiting_cap"] += 1
            raise TooManyRequests(
                f"{self.waiting} tasks are waiting for a first holder (max_waiting_tasks {cap}); try again later"
            )
        if new_task:
            self.waiting += 1

    def sweep(self, now: float, waiting: int) -> None:
        """Take the current count of waiting tasks; forget hosts whose tokens are full again."""
        self.waiting = waiting
        rate, burst = self.config.host_registrations_per_s, max(1, self.config.host_registration_burst)
        full = [h for h, b in self.buckets.items() if rate and b.tokens + (now - b.at) * rate >= burst]
        for who in full:
            del self.buckets[who]

    def _take_token(self, who: str, now: float) -> bool:
        rate = self.config.host_registrations_per_s
        if not rate:
            return True  # no per-host limit
        burst = max(1.0, float(self.config.host_registration_burst))
        bucket = self.buckets.get(who)
        if bucket is None:
            bucket = self.buckets[who] = _Bucket(burst, now)
        bucket.tokens = min(burst, bucket.tokens + (now - bucket.at) * rate)
        bucket.at = now
        if bucket.tokens < 1.0:
            return False
        bucket.tokens -= 1.0
        return True
