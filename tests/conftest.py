"""Shared fixtures: one real origin registry per session (and a private one with credentials),
generated images pushed into it, a counting relay in front of it, clusters of real processes on
it, and TLS files from a throwaway CA. Plain helpers live in tests/support/.

Where a test goes: tests/unit starts no process and no registry (checked by its conftest);
tests/integration runs against the real registry or a few real processes; tests/e2e runs
multi-process clusters and real container runtimes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import trio
import trustme

from lab.image import ImageInfo, make_oci_layout, push_image
from lab.registry import Origin
from tests.support.cluster import Cluster, ClusterFactory
from tests.support.origin import ORIGIN_CREDS, TOKEN_USERS, ImageFactory, PushToOrigin, Relay, start_relay


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
def token_origin() -> Iterator[Origin]:
    """A real Distribution registry with `auth: token`, trusting the lab's token issuer; its
    users and their grants are `TOKEN_USERS` (PUSHER pushes, TEAM_READER pulls `team/*`)."""
    with Origin(token_users=TOKEN_USERS) as registry:
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


@pytest.fixture
async def origin_relay(origin: Origin, nursery: trio.Nursery) -> Relay:
    """A counting relay in front of `origin`, stopped when the test ends."""
    return await start_relay(nursery, origin.host)


@pytest.fixture
def cluster_factory(origin: Origin, tmp_path: Path) -> Iterator[ClusterFactory]:
    """`make(seeds=1, seed_args=(), relay_rate_bps=None, schedulers=1)`: a cluster of real
    processes on `origin` in the test's tmp_path; every cluster made is stopped when the test ends."""
    made: list[Cluster] = []

    def make(
        *, seeds: int = 1, seed_args: Sequence[str] = (), relay_rate_bps: int | None = None, schedulers: int = 1
    ) -> Cluster:
        cluster = Cluster(
            tmp_path,
            origin.host,
            seeds=seeds,
            seed_args=seed_args,
            relay_rate_bps=relay_rate_bps,
            schedulers=schedulers,
        )
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        cluster.stop()


@pytest.fixture
def tls_files(tmp_path: Path) -> dict[str, str]:
    """`tls_cert`, `tls_key` and `tls_ca` files for 127.0.0.1, from a throwaway CA."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    paths = {"tls_cert": tmp_path / "cert.pem", "tls_key": tmp_path / "key.pem", "tls_ca": tmp_path / "ca.pem"}
    paths["tls_cert"].write_bytes(b"".join(pem.bytes() for pem in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(paths["tls_key"]))
    ca.cert_pem.write_to_path(str(paths["tls_ca"]))
    return {k: str(v) for k, v in paths.items()}
