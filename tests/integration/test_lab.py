"""The lab itself, against the real registry: skopeo pushes, the counting relay (in-process and
as a process), the fault-injecting relay, htpasswd origins and service process handling.
(The generated images alone are tested in tests/unit/test_lab_image.py.)
"""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

import httpx
import pytest
import trio

from lab import LabError
from lab.faultrelay import FaultPlan, FaultRelay, serve_fault_relay
from lab.image import MEDIA_TYPE_MANIFEST, push_image
from lab.procs import RelayProcess, Service
from lab.registry import Origin
from p2pdist.errors import OriginError
from p2pdist.registry.client import OriginClient
from tests.support.origin import ORIGIN_CREDS, ImageFactory, PushToOrigin, Relay, start_relay

MiB = 1 << 20


async def test_pushed_image_blobs_match_their_digests(origin: Origin, push_to_origin: PushToOrigin) -> None:
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
            assert [layer["digest"] for layer in manifest["layers"]] == [layer.digest for layer in image.layers]
            assert manifest["config"]["digest"] == image.config_digest

            for blob in (image.config, *image.layers):
                response = await client.get(f"/v2/lab/two-layers/blobs/{blob.digest}")
                assert response.status_code == 200
                assert len(response.content) == blob.size
                assert "sha256:" + hashlib.sha256(response.content).hexdigest() == blob.digest


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


async def test_fault_relay_fails_cuts_and_stalls_blob_gets_in_plan_order(
    origin: Origin, push_to_origin: PushToOrigin
) -> None:
    image = push_to_origin((3 * MiB,), 41, "faults/relay")
    layer = image.layers[0]
    relay = FaultRelay(
        FaultPlan(
            fail_blob_gets=1, resets=1, reset_after_bytes=MiB + 7, stalls=1, stall_after_bytes=MiB // 2, stall_s=5
        )
    )
    host, _, port = origin.host.rpartition(":")
    client = OriginClient(timeout_s=1.0)
    outcomes: list[object] = []
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            relay_port = await nursery.start(serve_fault_relay, host, int(port), relay)
            url = f"http://127.0.0.1:{relay_port}/v2/faults/relay/blobs/{layer.digest}"
            for _ in range(4):
                sha = hashlib.sha256()
                try:
                    async with client.open_blob(url, {}, start=0) as body:
                        async for chunk in body.chunks():
                            sha.update(chunk)
                    outcomes.append("sha256:" + sha.hexdigest() == layer.digest)
                except OriginError as exc:
                    outcomes.append(exc.upstream_status or str(exc).split(":")[-1].strip())
            nursery.cancel_scope.cancel()
    await client.aclose()
    assert outcomes == [503, "ReadError", "ReadTimeout", True]
    stats = relay.stats
    assert (stats.blob_gets, stats.failed, stats.resets, stats.stalls) == (4, 1, 1, 1)
    assert stats.blob_body_bytes == MiB + 7 + MiB // 2 + layer.size
