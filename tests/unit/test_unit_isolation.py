"""The unit conftest's check holds: a unit test that starts a process, the registry or a
service, or connects beyond loopback, fails with a message saying where it belongs."""

from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
from pathlib import Path

import pytest
import trio

from lab import procs
from lab.registry import Origin

REFUSED = pytest.fail.Exception  # what pytest.fail raises: a BaseException no `except Exception` swallows


def test_subprocess_is_refused() -> None:
    with pytest.raises(REFUSED, match=r"starts a process \(subprocess.Popen.*move the test to tests/integration"):
        subprocess.run(["true"], check=False)


async def test_trio_run_process_is_refused() -> None:
    with trio.fail_after(10), pytest.raises(REFUSED, match="starts a process"):
        await trio.run_process(["true"])


def test_fork_is_refused() -> None:
    with pytest.raises(REFUSED, match=r"os\.fork"):
        if os.fork() == 0:  # only if the check is broken: the child leaves at once
            os._exit(0)


def test_multiprocessing_spawn_is_refused() -> None:
    child = multiprocessing.get_context("spawn").Process(target=int)
    with pytest.raises(REFUSED, match="fork_exec"):
        child.start()


def test_the_registry_cannot_start() -> None:
    with pytest.raises(REFUSED, match="starts a process"):
        Origin()


def test_a_service_process_cannot_start(tmp_path: Path) -> None:
    with pytest.raises(REFUSED, match="starts a process"):
        procs.start_scheduler(tmp_path)


def test_connecting_beyond_loopback_is_refused() -> None:
    with pytest.raises(REFUSED, match=r"connects to \('192\.0\.2\.1', 9\)"):
        socket.create_connection(("192.0.2.1", 9), timeout=0.5)  # TEST-NET-1: never routed


def test_loopback_sockets_are_fine() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        with socket.create_connection(server.getsockname()[:2], timeout=5):
            pass
