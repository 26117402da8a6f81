"""A blob still travels origin -> seed -> peer -> client when every member speaks TLS and
carries the cluster secret: in-process scheduler, seed and peer, the real registry as origin.
(The secret and TLS checks themselves are tests/unit/test_cluster_secret.py.)"""

from __future__ import annotations

import hashlib
import ssl
from pathlib import Path

import httpx
import pytest
import trio

from lab.registry import Origin
from p2pdist.registry.oci import SCHEME_HEADER
from tests.support.inprocess import start_cluster
from tests.support.metrics import sample
from tests.support.origin import PushToOrigin

SECRET = "s3cr3t-cluster-token-0123456789"
MiB = 1 << 20


async def test_blob_travels_over_tls_between_members_carrying_the_secret(
    tmp_path: Path, tls_files: dict[str, str], origin: Origin, push_to_origin: PushToOrigin
) -> None:
    image = push_to_origin((9 * MiB,), 61, "secret/tls")
    digest = image.layers[0].digest
    verify = ssl.create_default_context(cafile=tls_files["tls_ca"])
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            cluster = await start_cluster(nursery, tmp_path, tls=True, cluster_secret=SECRET, **tls_files)
            async with httpx.AsyncClient(timeout=60) as client:
                sha = hashlib.sha256()
                async with client.stream(
                    "GET",
                    f"{cluster.proxy_url}/v2/secret/tls/blobs/{digest}",
                    params={"ns": origin.host},
                    headers={SCHEME_HEADER: "http"},
                ) as response:
                    assert response.status_code == 200
                    async for chunk in response.aiter_raw():
                        sha.update(chunk)
                assert "sha256:" + sha.hexdigest() == digest
                # A plain-HTTP client cannot talk to a TLS port, and the port keeps serving.
                for base in (cluster.scheduler_url, cluster.seed_url, cluster.peer_url):
                    with pytest.raises(httpx.TransportError):
                        await client.get(base.replace("https://", "http://") + "/healthz")
            async with httpx.AsyncClient(timeout=10, verify=verify) as tls_client:
                for base in (cluster.scheduler_url, cluster.seed_url, cluster.peer_url):
                    assert (await tls_client.get(f"{base}/healthz")).status_code == 200
                # The blob went seed → peer over TLS, not from the origin by the peer itself.
                peer_metrics = (await tls_client.get(f"{cluster.peer_url}/metrics")).text
                assert sample(peer_metrics, 'p2pdist_peer_download_bytes_total{source="seed"}') == image.layers[0].size
                assert sample(peer_metrics, 'p2pdist_peer_download_bytes_total{source="origin"}') == 0
                seed_metrics = (await tls_client.get(f"{cluster.seed_url}/metrics")).text
                # (piece bodies only; a piece sent again after a timeout counts twice, hence >=)
                assert sample(seed_metrics, "p2pdist_seed_upload_bytes_total") >= image.layers[0].size
                assert SECRET not in peer_metrics + seed_metrics
            nursery.cancel_scope.cancel()
