"""The lab itself, against the real registry: generated images, skopeo pushes, the counting
relay (in-process and as a process), htpasswd origins and service process handling.
"""

from __future__ import annotations

import hashlib
import sys
import tarfile
import time
from pathlib import Path

import httpx
import pytest
import trio

from lab import LabError
from lab.image import MEDIA_TYPE_MANIFEST, make_oci_layout, push_image
from lab.procs import RelayProcess, Service
from lab.registry import Origin
from tests.conftest import ORIGIN_CREDS, ImageFactory, PushToOrigin, Relay, start_relay

MiB = 1 << 20


async def test_pushed_image_blobs_match_their_digests(
    origin: Origin, push_to_origin: PushToOrigin
) -> None:
    image = push_to_origin((3 * MiB, 1 * MiB), 1, "lab/two-layers")
    with trio.fail_after(30):
        async with httpx.AsyncClient(base_url=origin.url) as client:
            response = await client.get(
                f"/v2/lab/two-layers/manifests/{image.tag}",
                headers={"Accept": MEDIA_TYPE_MANIFEST},
            )
            assert response.status_code == 200
            assert response.headers["Docker-Content-Digest"] == image.manifest_digest
            manifest = response.json()
            assert [layer["digest"] for layer in manifest["layers"]] == [
                layer.digest for layer in image.layers
            ]
            assert manifest["config"]["digest"] == image.config_digest

            for blob in (image.config, *image.layers):
                response = await client.get(f"/v2/lab/two-layers/blobs/{blob.digest}")
                assert response.status_code == 200
                assert len(response.content) == blob.size
                assert "sha256:" + hashlib.sha256(response.content).hexdigest() == blob.digest


def test_generated_layer_is_a_tar_of_one_file_with_the_requested_size(
    image_factory: ImageFactory,
) -> None:
    image = image_factory((3 * MiB, 1 * MiB), 1)
    for index, (layer, size) in enumerate(zip(image.layers, (3 * MiB, 1 * MiB), strict=True)):
        with tarfile.open(image.blob_path(layer.digest)) as tar:
            members = tar.getmembers()
            assert [(m.name, m.size) for m in members] == [(f"layer-{index}.bin", size)]


def test_same_seed_gives_the_same_image_and_another_seed_another(tmp_path: Path) -> None:
    first = make_oci_layout(tmp_path / "a", [100_000, 5_000], seed=3)
    again = make_oci_layout(tmp_path / "b", [100_000, 5_000], seed=3)
    other = make_oci_layout(tmp_path / "c", [100_000, 5_000], seed=4)
    assert first.manifest_digest == again.manifest_digest
    assert len({layer.digest for layer in first.layers + other.layers}) == 4


async def test_relay_counts_the_blob_bytes_fetched_through_it(
    push_to_origin: PushToOrigin, origin_relay: Relay
) -> None:
    image = push_to_origin((3 * MiB, 1 * MiB), 1, "lab/two-layers")
    layer = image.layers[0]
    with trio.fail_after(30):
        async with httpx.AsyncClient(base_url=origin_relay.url) as client:
            response = await client.get(f"/v2/lab/two-layers/blobs/{layer.digest}")
    assert response.status_code == 200
    assert "sha256:" + hashlib.sha256(response.content).hexdigest() == layer.digest
    assert origin_relay.stats.downstream_bytes >= layer.size
    assert origin_relay.stats.upstream_bytes > 0
    assert origin_relay.stats.connections == 1


async def test_relay_rate_cap_holds_downstream_to_the_rate(
    origin: Origin, push_to_origin: PushToOrigin, nursery: trio.Nursery
) -> None:
    image = push_to_origin((3 * MiB, 1 * MiB), 1, "lab/two-layers")
    layer = image.layers[0]
    relay = await start_relay(nursery, origin.host, rate_bps=6 * MiB)
    with trio.fail_after(30):
        async with httpx.AsyncClient(base_url=relay.url) as client:
            started = trio.current_time()
            response = await client.get(f"/v2/lab/two-layers/blobs/{layer.digest}")
            elapsed = trio.current_time() - started
    assert response.status_code == 200
    assert len(response.content) == layer.size
    # 3 MiB at 6 MiB/s: 0.5 s, less the 50 ms burst allowance.
    assert 0.4 < elapsed < 5.0


async def test_private_origin_answers_401_without_credentials_and_200_with(
    private_origin: Origin, image_factory: ImageFactory
) -> None:
    image = image_factory((256 * 1024,), 2)
    push_image(image, private_origin.host, "lab/private", creds=ORIGIN_CREDS)
    blob_path = f"/v2/lab/private/blobs/{image.layers[0].digest}"
    with trio.fail_after(30):
        async with httpx.AsyncClient(base_url=private_origin.url) as client:
            assert (await client.get("/v2/")).status_code == 401
            assert (await client.get(blob_path)).status_code == 401
            authed = await client.get(blob_path, auth=ORIGIN_CREDS)
    assert authed.status_code == 200
    assert "sha256:" + hashlib.sha256(authed.content).hexdigest() == image.layers[0].digest


def test_push_to_private_origin_without_credentials_fails_with_skopeo_message(
    private_origin: Origin, image_factory: ImageFactory
) -> None:
    image = image_factory((256 * 1024,), 2)
    with pytest.raises(LabError, match="skopeo copy .* failed: .*unauthorized"):
        push_image(image, private_origin.host, "lab/denied")


def test_relay_process_writes_its_counters_to_the_stats_file(
    origin: Origin, push_to_origin: PushToOrigin, tmp_path: Path
) -> None:
    image = push_to_origin((3 * MiB, 1 * MiB), 1, "lab/two-layers")
    layer = image.layers[1]
    with RelayProcess(tmp_path, origin.host) as relay:
        before = relay.downstream_bytes()
        response = httpx.get(f"{relay.url}/v2/lab/two-layers/blobs/{layer.digest}", timeout=30)
        assert response.status_code == 200
        stats = relay.stats(fresh=True)
        assert stats["downstream_bytes"] - before >= layer.size
        assert stats["connections"] == 1
        assert relay.stop() == 0
    final = relay.stats()
    assert final["downstream_bytes"] == stats["downstream_bytes"]


def test_service_that_exits_early_fails_fast_with_its_log(tmp_path: Path) -> None:
    script = "import sys; print('cannot bind: boom'); sys.exit(3)"
    argv = [sys.executable, "-c", script]
    service = Service("broken", argv, tmp_path / "broken.log", "http://127.0.0.1:9")
    started = time.monotonic()
    with pytest.raises(LabError, match=r"broken exited with 3[\s\S]*cannot bind: boom"):
        service.wait_healthy(timeout=30)
    assert time.monotonic() - started < 10


def test_service_stop_terminates_the_process_group(tmp_path: Path) -> None:
    script = "import time\nwhile True: time.sleep(1)"
    argv = [sys.executable, "-c", script]
    service = Service("sleeper", argv, tmp_path / "sleeper.log", "http://127.0.0.1:9")
    assert service.poll() is None
    assert service.stop() == -15
