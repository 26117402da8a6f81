"""Shared fixtures: one real origin registry per session, generated images pushed into it,
and a counting relay in front of the origin for tests that measure origin traffic.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import trio

from lab.image import ImageInfo, make_oci_layout, push_image
from lab.registry import Origin
from lab.relay import RelayStats, serve_relay

ORIGIN_CREDS = ("lab-user", "lab-password")

ImageFactory = Callable[[tuple[int, ...], int], ImageInfo]
PushToOrigin = Callable[[tuple[int, ...], int, str], ImageInfo]


@pytest.fixture(scope="session")
def origin() -> Iterator[Origin]:
    """A real Distribution registry without auth, shared by the whole session."""
    with Origin() as registry:
        yield registry


@pytest.fixture(scope="session")
def private_origin() -> Iterator[Origin]:
    """A real Distribution registry with htpasswd auth; credentials are `ORIGIN_CREDS`."""
    with Origin(creds=ORIGIN_CREDS) as registry:
        yield registry


@pytest.fixture(scope="session")
def image_factory(tmp_path_factory: pytest.TempPathFactory) -> ImageFactory:
    """`make(layer_sizes, seed)`: an OCI layout on disk, generated once per session."""
    root = tmp_path_factory.mktemp("images")
    cache: dict[tuple[tuple[int, ...], int], ImageInfo] = {}

    def make(layer_sizes: tuple[int, ...], seed: int) -> ImageInfo:
        key = (layer_sizes, seed)
        if key not in cache:
            layout = root / f"seed{seed}-{'-'.join(map(str, layer_sizes))}"
            cache[key] = make_oci_layout(layout, list(layer_sizes), seed)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def push_to_origin(origin: Origin, image_factory: ImageFactory) -> PushToOrigin:
    """`push(layer_sizes, seed, repo)`: generate (cached) and push an image into `origin`."""
    pushed: set[tuple[tuple[int, ...], int, str]] = set()

    def push(layer_sizes: tuple[int, ...], seed: int, repo: str) -> ImageInfo:
        image = image_factory(layer_sizes, seed)
        key = (layer_sizes, seed, repo)
        if key not in pushed:
            push_image(image, origin.host, repo)
            pushed.add(key)
        return image

    return push


@dataclass
class Relay:
    """A counting relay running in the test's nursery."""

    url: str
    stats: RelayStats


async def start_relay(
    nursery: trio.Nursery, target_host: str, *, rate_bps: int | None = None
) -> Relay:
    host, _, port = target_host.rpartition(":")
    stats = RelayStats()
    relay = functools.partial(serve_relay, rate_bps=rate_bps)
    listen_port: int = await nursery.start(relay, host, int(port), stats)
    return Relay(f"http://127.0.0.1:{listen_port}", stats)


@pytest.fixture
async def origin_relay(origin: Origin, nursery: trio.Nursery) -> Relay:
    """A counting relay in front of `origin`, stopped when the test ends."""
    return await start_relay(nursery, origin.host)
