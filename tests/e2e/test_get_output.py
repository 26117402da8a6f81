"""`p2pdist get` as a person sees it on a terminal: a progress line from before the first
byte to the end, then a one-line summary of bytes, time and where they came from (checked
against the cluster's own counts); a local failure names the local path."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import termios
import time
from pathlib import Path

from tests.support.cluster import ClusterFactory, p2pdist_bin, sha256_file
from tests.support.origin import PushToOrigin

MiB = 1 << 20
COLUMNS = 64


def run_on_a_terminal(argv: list[str], timeout_s: float) -> tuple[int, str]:
    """Run `argv` with its stderr on a pseudo-terminal; its exit code and what it drew."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, COLUMNS, 0, 0))
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=follower, stdin=subprocess.DEVNULL)
    os.close(follower)
    drawn = bytearray()
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                drawn += chunk
            elif process.poll() is not None:
                break
        code = process.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        os.close(leader)
        if process.poll() is None:
            process.kill()
    return code, drawn.decode(errors="replace")


def test_get_on_a_terminal_shows_progress_then_a_summary_of_where_the_bytes_came_from(
    cluster_factory: ClusterFactory, push_to_origin: PushToOrigin, tmp_path: Path
) -> None:
    cluster = cluster_factory(seed_args=("--upload-rate", "16MiB"))
    image = push_to_origin((24 * MiB,), 167, "get/app")
    layer = image.layers[0]
    (peer,) = cluster.add_peers(1, ("--insecure-registry", cluster.relay.host))
    assert peer.proxy_url is not None
    out = tmp_path / "layer.tar"
    url = cluster.blob_url("get/app", layer.digest)
    code, drawn = run_on_a_terminal([p2pdist_bin(), "get", url, "-o", str(out), "--peer", peer.proxy_url], 120)
    assert code == 0, drawn
    assert sha256_file(out) == layer.digest
    assert "waiting for the first piece" in drawn
    assert re.search(r"ETA \d+:\d\d", drawn) and "MiB/s" in drawn
    lines = [line.rstrip() for line in re.split(r"[\r\n]+", drawn) if line.strip()]
    # The progress lines fit the terminal's width (the summary after them may wrap).
    assert all(len(line) < COLUMNS for line in lines[:-1]), max(lines[:-1], key=len)
    assert re.fullmatch(
        rf"24\.0 MiB in [\d.]+ s \([\d.]+ [KM]iB/s\) to {re.escape(str(out))}: 0 B from peers, "
        r"24\.0 MiB from the seed, 0 B from the origin",
        lines[-1],
    ), lines[-1]

    again = tmp_path / "again.tar"
    code, drawn = run_on_a_terminal([p2pdist_bin(), "get", url, "-o", str(again), "--peer", peer.proxy_url], 60)
    assert code == 0 and drawn.strip().splitlines()[-1].strip().endswith("the peer held it already"), drawn


def test_a_local_write_failure_names_the_local_path(
    cluster_factory: ClusterFactory, push_to_origin: PushToOrigin, tmp_path: Path
) -> None:
    cluster = cluster_factory()
    image = push_to_origin((5 * MiB,), 168, "get/local")
    (peer,) = cluster.add_peers(1, ("--insecure-registry", cluster.relay.host))
    assert peer.proxy_url is not None
    (tmp_path / "a-file").write_text("not a directory")
    out = tmp_path / "a-file" / "layer.tar"
    result = subprocess.run(
        [p2pdist_bin(), "get", cluster.blob_url("get/local", image.layers[0].digest), "-o", str(out),
         "--peer", peer.proxy_url, "-q"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert (
        result.stderr.strip() == f"p2pdist get: error: cannot write {out.with_name('.layer.tar.part')}: Not a directory"
    )
