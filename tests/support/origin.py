"""The origin registry as the tests see it: the private origin's credentials, the types of the
image fixtures, and a counting relay started in a test's nursery."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import trio

from lab.image import ImageInfo
from lab.relay import RelayStats, serve_relay
from lab.tokenauth import User, pull, push_pull

ORIGIN_CREDS = ("lab-user", "lab-password")

# The token-auth origin's users: one that pushes everything, one that may pull `team/*` only,
# one that may pull only `other/*`.
PUSHER = ("lab-pusher", "pusher-password")
TEAM_READER = ("team-reader", "team-reader-password")
OUTSIDER = ("outsider", "outsider-password")
TOKEN_USERS = {
    PUSHER[0]: User(PUSHER[1], push_pull("*")),
    TEAM_READER[0]: User(TEAM_READER[1], pull("team/*")),
    OUTSIDER[0]: User(OUTSIDER[1], pull("other/*")),
}

ImageFactory = Callable[[tuple[int, ...], int], ImageInfo]
"""`make(layer_sizes, seed)`, the `image_factory` fixture."""
PushToOrigin = Callable[[tuple[int, ...], int, str], ImageInfo]
"""`push(layer_sizes, seed, repo)`, the `push_to_origin` fixture."""


@dataclass
class Relay:
    """A counting relay running in the test's nursery."""

    url: str
    stats: RelayStats


async def start_relay(nursery: trio.Nursery, target_host: str, *, rate_bps: int | None = None) -> Relay:
    host, _, port = target_host.rpartition(":")
    stats = RelayStats()
    relay = functools.partial(serve_relay, rate_bps=rate_bps)
    listen_port: int = await nursery.start(relay, host, int(port), stats)
    return Relay(f"http://127.0.0.1:{listen_port}", stats)
