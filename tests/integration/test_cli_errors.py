"""What a person sees when a service cannot start: one line on stderr naming the address,
path or flag to fix, exit 2 for unusable input and 1 for a failure on this host, never a
traceback; `--version`; the effective config logged at start with the secret hidden."""

from __future__ import annotations

import os
import re
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.ports import free_port
from lab.procs import Service
from tests.support.cluster import p2pdist_bin

# A log line starts with its timestamp; anything else on stderr is what the command said.
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")


def run(*args: str) -> tuple[int, list[str]]:
    """Exit code and the non-log lines of stderr of `p2pdist ARGS` (a service that does
    start is a test failure: the timeout kills it)."""
    result = subprocess.run([p2pdist_bin(), *args], capture_output=True, text=True, timeout=60)
    said = [line for line in result.stderr.splitlines() if not LOG_LINE.match(line)]
    assert "Traceback" not in result.stderr and "ExceptionGroup" not in result.stderr, result.stderr
    return result.returncode, said


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_a_port_in_use_is_one_line_naming_the_address(taken_port: int, tmp_path: Path) -> None:
    code, said = run("scheduler", "--listen", f"127.0.0.1:{taken_port}")
    assert code == 1 and said == [
        f"p2pdist scheduler: error: scheduler: cannot listen on 127.0.0.1:{taken_port}: Address already in use"
    ]
    code, said = run(
        "peer", "--listen", "127.0.0.1:0", "--proxy-listen", f"127.0.0.1:{taken_port}",
        "--data-dir", str(tmp_path / "peer"), "--scheduler", "http://127.0.0.1:1",
    )  # fmt: skip
    assert code == 1 and len(said) == 1 and f"proxy: cannot listen on 127.0.0.1:{taken_port}" in said[0]


def test_a_data_dir_under_a_file_is_one_line_naming_the_path(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    data_dir = tmp_path / "file" / "seed"
    code, said = run(
        "seed", "--listen", "127.0.0.1:0", "--data-dir", str(data_dir), "--scheduler", "http://127.0.0.1:1"
    )
    assert code == 1 and len(said) == 1
    assert f"--data-dir (data_dir) {data_dir} is unusable" in said[0] and "Not a directory" in said[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["peer", "--upload-rate", "8M"], "--upload-rate (upload_rate_bps): invalid rate '8M': want bytes/s"),
        (["peer", "--download-rate", "100Mb"], "--download-rate (download_rate_bps): invalid rate '100Mb'"),
        (["seed", "--cache-quota", "50G"], "--cache-quota (cache_quota_bytes): invalid size '50G'"),
        (["scheduler", "--log-level", "verbose"], "--log-level (log_level): invalid log level 'verbose'"),
        (["peer", "--listen", "0.0.0.0:4000"], "add --advertise http://HOST:4000"),
        (["seed", "--advertise", "http://0.0.0.0:4010"], "--advertise (advertise): 'http://0.0.0.0:4010' cannot"),
        (["peer", "--tls-cert", "/nonexistent/cert.pem", "--tls-key", "/nonexistent/key.pem"],
         "cannot load --tls-cert (tls_cert) /nonexistent/cert.pem"),
        (["peer", "--no-such-flag"], "unrecognized arguments: --no-such-flag (see p2pdist --help)"),
    ],
)  # fmt: skip
def test_unusable_input_is_one_line_naming_the_flag_and_exit_2(args: list[str], message: str, tmp_path: Path) -> None:
    extra = [] if args[0] == "scheduler" or "--listen" in args else ["--listen", "127.0.0.1:0"]
    if args[0] == "peer" and "--no-such-flag" not in args:
        extra += ["--proxy-listen", "127.0.0.1:0"]
    if args[0] != "scheduler" and "--no-such-flag" not in args:
        extra += ["--data-dir", str(tmp_path / "d")]
    code, said = run(*args, *extra)
    assert code == 2, said
    assert len(said) == 1 and message in said[0], said


def test_a_config_file_error_names_the_file_the_key_and_the_flag(tmp_path: Path) -> None:
    config = tmp_path / "peer.yaml"
    config.write_text("upload_rate_bps: 100Mb\n")
    code, said = run("peer", "--config", str(config))
    assert code == 2 and said == [
        f"p2pdist peer: error: {config}: upload_rate_bps (--upload-rate): invalid rate '100Mb': want bytes/s as "
        "a number of bytes, or with a unit: 8MiB, 500KiB, 1GiB (binary) or 8MB, 500kB (SI); or bits/s: 100Mbit "
        "or 100Mbps, 1Gbit"
    ]


def test_version() -> None:
    result = subprocess.run([p2pdist_bin(), "--version"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and re.fullmatch(r"p2pdist \d+\.\d+\.\d+\S*\n", result.stdout), result


def test_the_effective_config_is_logged_at_start_with_the_secret_hidden(tmp_path: Path) -> None:
    port = free_port()
    secret = "an-operator-secret-0123"
    service = Service(
        "scheduler",
        [p2pdist_bin(), "scheduler", "--listen", f"127.0.0.1:{port}", "--candidate-parents", "3"],
        tmp_path / "s.log",
        f"http://127.0.0.1:{port}",
        env={**os.environ, "P2PDIST_CLUSTER_SECRET": secret},
    )
    try:
        service.wait_healthy(30)
    finally:
        assert service.stop() == 0
    log = service.log_path.read_text()
    assert re.search(r"p2pdist \S+ scheduler: log_level=info cluster_secret=<set> .*candidate_parents=3 ", log), log
    assert secret not in log
