"""tests/unit starts no process and talks to nothing beyond loopback, and this conftest checks
it rather than hoping: while a unit test's setup, call or teardown runs, starting a process
(subprocess, os.fork/exec/spawn/system, posix_spawn, multiprocessing) or connecting a socket
to a non-loopback address fails that test. A test that needs the registry or a process
belongs in tests/integration.
"""

from __future__ import annotations

import _posixsubprocess
import ipaddress
import platform
import socket
import sys
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

# Audit events (https://docs.python.org/3/library/audit_events.html) that start a process.
SPAWN_EVENTS = frozenset(
    {
        "subprocess.Popen",
        "os.fork",
        "os.forkpty",
        "os.posix_spawn",
        "os.spawn",
        "os.system",
        "os.exec",
    }
)

_running: list[str] = []  # the node id of the unit test in a phase, while it runs


def _refuse(what: str) -> None:
    pytest.fail(
        f"{_running[-1]} {what}: tests/unit starts no process and reaches only loopback "
        "(move the test to tests/integration)",
        pytrace=True,
    )


def _is_loopback(address: Any) -> bool:
    if not isinstance(address, tuple):
        return True  # an AF_UNIX path or abstract name: local by definition
    try:
        return ipaddress.ip_address(str(address[0]).split("%")[0]).is_loopback
    except ValueError:
        return str(address[0]) == "localhost"


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if not _running:
        return
    if event in SPAWN_EVENTS:
        _refuse(f"starts a process ({event} {args[:2]!r})")
    elif (
        event == "socket.connect" and args[0].family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(args[1])
    ):
        _refuse(f"connects to {args[1]!r}")


# platform.processor() runs `uname -p` once per process and caches it; the simulator's report
# (benchmarks/simulate.py `machine()`) asks for it. Asked here, outside any test, it is not a
# process the test starts.
platform.processor()

sys.addaudithook(_audit)  # audit hooks cannot be removed; outside a unit test phase it returns at once

# multiprocessing's spawn and forkserver start methods call fork_exec directly, with no audit event.
_fork_exec: Callable[..., int] = _posixsubprocess.fork_exec


def _guarded_fork_exec(*args: Any) -> int:
    if _running:
        _refuse("starts a process (_posixsubprocess.fork_exec)")
    return _fork_exec(*args)


_posixsubprocess.fork_exec = _guarded_fork_exec


@contextmanager
def _checked(item: pytest.Item) -> Iterator[None]:
    _running.append(item.nodeid)
    try:
        yield
    finally:
        _running.pop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    with _checked(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    with _checked(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, None, None]:
    with _checked(item):
        return (yield)
