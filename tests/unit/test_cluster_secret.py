"""Untrusted hosts: with a cluster secret, every scheduler, seed-trigger and piece request must
carry it as a Bearer token (401 with a one-line reason otherwise, /healthz and /metrics stay
open), and with a certificate the scheduler and piece ports speak TLS; all on in-process
services. (A blob over TLS from the real registry is tests/integration/test_cluster_tls.py.)"""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx
import msgpack
import pytest
import trio
import trustme

from p2pdist import wire
from p2pdist.config import CLUSTER_SECRET_ENV, PeerConfig, SchedulerConfig, load
from p2pdist.errors import ConfigError
from tests.support.inprocess import start_cluster
from tests.support.metrics import sample

SECRET = "s3cr3t-cluster-token-0123456789"
DIGEST = "sha256:" + "ab" * 32


def announce() -> bytes:
    return wire.encode(wire.AnnounceHost(host_id="h1", url="http://127.0.0.1:1", kind="peer", upload_slots=1))


def assert_401(response: httpx.Response, reason: str) -> None:
    assert response.status_code == 401, (response.status_code, response.text)
    text = response.text.strip()
    assert reason in text and "\n" not in text
    assert "Bearer" in response.headers["www-authenticate"]
    assert SECRET not in text and "wrong-" not in text  # never echoes what was sent


async def poll_metric(client: httpx.AsyncClient, url: str, key: str) -> float:
    """Wait (under the test's fail_after) until a sample at `url` is non-zero."""
    while True:
        value = sample((await client.get(url)).text, key)
        if value:
            return value
        await trio.sleep(0.05)


def files_under(path: Path) -> set[Path]:
    return {p for p in path.rglob("*") if p.is_file()}


async def test_scheduler_api_needs_the_cluster_secret(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            cluster = await start_cluster(nursery, tmp_path, cluster_secret=SECRET)
            url = cluster.scheduler_url
            async with httpx.AsyncClient(timeout=10) as client:
                post = f"{url}/v1/hosts"
                assert_401(await client.post(post, content=announce()), "missing cluster secret")
                for wrong in ("Bearer wrong-" + SECRET[6:], f"Basic {SECRET}", "Bearer", "Bearer " + SECRET[:-1]):
                    assert_401(
                        await client.post(post, content=announce(), headers={"authorization": wrong}),
                        "wrong cluster secret",
                    )
                # Not even a malformed body or an unknown endpoint is looked at without the secret.
                assert_401(await client.post(f"{url}/v1/tasks/register", content=b"\xc1junk"), "missing")
                assert_401(await client.post(f"{url}/v1/nope"), "missing")
                ok = await client.post(post, content=announce(), headers={"authorization": f"Bearer {SECRET}"})
                assert ok.status_code == 200
                assert (await client.get(f"{url}/healthz")).status_code == 200
                metrics = await client.get(f"{url}/metrics")
                assert metrics.status_code == 200 and SECRET not in metrics.text
                # The in-process seed and peer carry the secret: both announced themselves.
                while (
                    'p2pdist_scheduler_hosts{kind="seed"} 1.0' not in metrics.text
                    or 'p2pdist_scheduler_hosts{kind="peer"} 2.0' not in metrics.text
                ):
                    await trio.sleep(0.05)
                    metrics = await client.get(f"{url}/metrics")
            nursery.cancel_scope.cancel()


async def test_piece_server_and_seed_trigger_need_the_cluster_secret(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            cluster = await start_cluster(nursery, tmp_path, cluster_secret=SECRET)
            seed_files = files_under(cluster.seed_dir)
            trigger = msgpack.packb({"task_id": DIGEST, "url": "http://127.0.0.1:1/v2/a/blobs/" + DIGEST})
            async with httpx.AsyncClient(timeout=10) as client:
                for base in (cluster.peer_url, cluster.seed_url):
                    piece = f"{base}/v1/tasks/{DIGEST}/pieces/0"
                    assert_401(await client.get(piece), "missing cluster secret")
                    assert_401(await client.get(piece, headers={"authorization": "Bearer nope-nope"}), "wrong")
                    held = await client.get(piece, headers={"authorization": f"Bearer {SECRET}"})
                    assert held.status_code == 404  # past the check: the task is simply not held
                    assert (await client.get(f"{base}/healthz")).status_code == 200
                    assert (await client.get(f"{base}/metrics")).status_code == 200
                assert_401(await client.post(f"{cluster.seed_url}/v1/seed/tasks", content=trigger), "missing")
                assert files_under(cluster.seed_dir) == seed_files  # nothing started
                # The proxy port serves local clients: no cluster secret there.
                assert (await client.get(f"{cluster.proxy_url}/v2/")).status_code == 200
            nursery.cancel_scope.cancel()


async def test_untrusted_certificate_is_refused_by_members(tmp_path: Path, tls_files: dict[str, str]) -> None:
    """A peer that trusts another CA cannot reach a TLS scheduler: it reports the failure and the
    scheduler never hears of it."""
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    verify = ssl.create_default_context(cafile=tls_files["tls_ca"])
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            from peer.daemon import serve as serve_peer
            from scheduler.service import serve as serve_scheduler

            bound = await nursery.start(
                serve_scheduler,
                SchedulerConfig(listen="127.0.0.1:0", tls_cert=tls_files["tls_cert"], tls_key=tls_files["tls_key"]),
            )
            url = f"https://{bound[0]}:{bound[1]}"
            peer = PeerConfig(
                listen="127.0.0.1:0",
                proxy_listen="127.0.0.1:0",
                scheduler=(url,),
                data_dir=str(tmp_path / "peer"),
                tls_ca=str(other_ca),
            )
            (peer_bound, _) = await nursery.start(serve_peer, peer)
            async with httpx.AsyncClient(timeout=10, verify=verify) as client:
                peer_metrics = f"http://{peer_bound[0]}:{peer_bound[1]}/metrics"
                await poll_metric(client, peer_metrics, "p2pdist_peer_scheduler_errors_total")
                assert 'p2pdist_scheduler_hosts{kind="peer"} 0.0' in (await client.get(f"{url}/metrics")).text
            nursery.cancel_scope.cancel()


def test_cluster_secret_comes_from_the_env_and_stays_out_of_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CLUSTER_SECRET_ENV, SECRET)
    config = load(PeerConfig, None)
    assert config.cluster_secret == SECRET
    assert SECRET not in repr(config)
    # The config file or flag wins over the env var.
    other = "another-secret-of-enough-length"
    assert load(PeerConfig, None, {"cluster_secret": other}).cluster_secret == other
    monkeypatch.setenv(CLUSTER_SECRET_ENV, "tiny-val")
    with pytest.raises(ConfigError) as bad:
        load(SchedulerConfig, None)
    assert CLUSTER_SECRET_ENV in str(bad.value) and "tiny-val" not in str(bad.value)
    monkeypatch.delenv(CLUSTER_SECRET_ENV)
    assert load(PeerConfig, None).cluster_secret is None


async def test_tls_cert_without_key_is_a_config_error(tmp_path: Path, tls_files: dict[str, str]) -> None:
    from scheduler.service import serve as serve_scheduler

    with trio.fail_after(10), pytest.raises(ConfigError, match=r"\(tls_cert\) and --tls-key \(tls_key\) go together"):
        await serve_scheduler(SchedulerConfig(listen="127.0.0.1:0", tls_cert=tls_files["tls_cert"]))
