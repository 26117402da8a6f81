"""Every service as a real process: ready on /healthz, metrics from its own registry,
config files with unknown keys refused, and a clean exit within 5 s of SIGTERM."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx
import pytest

from lab import procs
from lab.ports import free_port
from lab.procs import Service
from tests.support.cluster import p2pdist_bin


@pytest.fixture
def trio_of_services(tmp_path: Path) -> list[Service]:
    scheduler = procs.start_scheduler(tmp_path)
    services = [scheduler]
    try:
        services.append(procs.start_seed(tmp_path, scheduler.url))
        services.append(procs.start_peer(tmp_path, scheduler.url, "peer"))
    except BaseException:
        for s in services:
            s.stop()
        raise
    return services


def test_services_answer_health_and_metrics_and_stop_on_sigterm(trio_of_services: list[Service]) -> None:
    scheduler, seed, peer = trio_of_services
    assert peer.proxy_url is not None
    for url in (scheduler.url, seed.url, peer.url, peer.proxy_url):
        assert httpx.get(f"{url}/healthz").status_code == 200
    assert "p2pdist_scheduler_requests_total" in httpx.get(f"{scheduler.url}/metrics").text
    assert "p2pdist_seed_download_bytes" in httpx.get(f"{seed.url}/metrics").text
    peer_metrics = httpx.get(f"{peer.url}/metrics").text
    assert "p2pdist_peer_upload_bytes_total" in peer_metrics
    assert "p2pdist_seed" not in peer_metrics  # a registry of its own
    # Both hosts announced themselves.
    wait = time.monotonic() + 10
    while 'p2pdist_scheduler_hosts{kind="peer"} 1.0' not in httpx.get(f"{scheduler.url}/metrics").text:
        assert time.monotonic() < wait, "peer never announced itself"
        time.sleep(0.05)
    for service in (peer, seed, scheduler):
        started = time.monotonic()
        assert service.stop(grace_s=5.0) == 0, service.log_tail()
        assert time.monotonic() - started < 5.0
    # The peer said goodbye on its way out; the scheduler logged it before stopping.
    assert "left" in scheduler.log_path.read_text()


def test_config_file_with_unknown_key_is_a_one_line_error(tmp_path: Path) -> None:
    config = tmp_path / "peer.yaml"
    config.write_text("listen: 127.0.0.1:0\nupload_rate_bps: 8MiB\nuplaod_slots: 4\n")
    result = subprocess.run(
        [p2pdist_bin(), "peer", "--config", str(config)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown key(s) uplaod_slots" in lines[0]


def test_config_file_values_apply_and_flags_override(tmp_path: Path) -> None:
    config = tmp_path / "scheduler.yaml"
    config.write_text("listen: 127.0.0.1:1\ncandidate_parents: 2\n")
    port = free_port()
    service = Service(
        "scheduler",
        [p2pdist_bin(), "scheduler", "--config", str(config), "--listen", f"127.0.0.1:{port}"],
        tmp_path / "s.log",
        f"http://127.0.0.1:{port}",
    )
    try:
        service.wait_healthy(30)
    finally:
        assert service.stop() == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["peer", "--upload-rate", "8 parsecs"], "invalid rate"),
        (["seed", "--listen", "nowhere"], "want HOST:PORT"),
        (["scheduler", "--config", "/nonexistent.yaml"], "cannot read config"),
    ],
)
def test_bad_flags_are_one_line_errors(args: list[str], message: str) -> None:
    result = subprocess.run([p2pdist_bin(), *args], capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_get_reports_unreachable_peer_in_one_line(tmp_path: Path) -> None:
    url = "http://127.0.0.1:1/v2/a/blobs/sha256:" + "0" * 64
    result = subprocess.run(
        [p2pdist_bin(), "get", url, "-o", str(tmp_path / "x"), "--peer", "http://127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1 and "failed" in result.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "url, peer, message",
    [
        ("http://../v2/a/blobs/sha256:" + "0" * 64, "http://127.0.0.1:1", "invalid registry '..'"),
        ("http://127.0.0.1:1/v2/a/blobs/sha256:" + "0" * 64, "http://..:4001", "invalid --peer"),
        ("http://127.0.0.1:1/v2/a/blobs/sha256:" + "0" * 64, "http://127.0.0.1:99999", "invalid --peer"),
    ],
)
def test_get_refuses_hosts_that_cannot_be_dialled_in_one_line(
    tmp_path: Path, url: str, peer: str, message: str
) -> None:
    # These reached the resolver and ended in a UnicodeError (or ValueError) traceback.
    result = subprocess.run(
        [p2pdist_bin(), "get", url, "-o", str(tmp_path / "x"), "--peer", peer],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr
    assert not (tmp_path / "x").exists()
