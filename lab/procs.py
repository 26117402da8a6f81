"""Lab processes: p2pdist services (and other daemons) run as real child processes.

`Service` owns one child in its own process group with its output in a log file; the
`start_*` functions launch the p2pdist CLI on free loopback ports and wait for `/healthz`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from lab import LabError, Stoppable
from lab.ports import free_port

POLL_INTERVAL_S = 0.05
STOP_GRACE_S = 5.0
DEFAULT_READY_TIMEOUT_S = 30.0


def p2pdist_executable() -> Path:
    """The `p2pdist` console script of the running interpreter's environment."""
    return Path(sys.executable).parent / "p2pdist"


CHECKOUT = Path(__file__).resolve().parent.parent


class Service(Stoppable):
    """One child process in its own process group, logging to `log_path`.

    `url` is the address the process serves (its `--listen` address for p2pdist services);
    `proxy_url` is a peer's OCI proxy address.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        url: str,
        *,
        proxy_url: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.url = url
        self.proxy_url = proxy_url
        child_env = dict(os.environ if env is None else env)
        child_env.setdefault("PYTHONUNBUFFERED", "1")
        # `python -m lab.relay` and friends run from the checkout: the lab is never installed.
        child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CHECKOUT), child_env.get("PYTHONPATH")]))
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            try:
                self.process = subprocess.Popen(
                    self.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=child_env,
                    cwd=cwd,
                    start_new_session=True,
                )
            except OSError as exc:
                raise LabError(f"{name}: cannot start {self.argv[0]}: {exc}") from exc

    @property
    def pid(self) -> int:
        return self.process.pid

    def poll(self) -> int | None:
        """The exit code, or None while the process runs."""
        return self.process.poll()

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_http(self, url: str, timeout: float = DEFAULT_READY_TIMEOUT_S, ok: Collection[int] = (200,)) -> None:
        """Poll GET `url` until it answers with a status in `ok`.

        Fails at once, with the end of the log, when the process exits meanwhile.
        """
        deadline = time.monotonic() + timeout
        last = "no answer"
        with httpx.Client(timeout=1.0) as client:
            while True:
                code = self.poll()
                if code is not None:
                    raise LabError(
                        f"{self.name} exited with {code} before {url} was ready; "
                        f"log {self.log_path}:\n{self.log_tail()}"
                    )
                try:
                    status = client.get(url).status_code
                    if status in ok:
                        return
                    last = f"status {status}"
                except httpx.TransportError as exc:
                    last = type(exc).__name__
                if time.monotonic() >= deadline:
                    raise LabError(
                        f"{self.name} not ready at {url} after {timeout:.0f} s ({last}); "
                        f"log {self.log_path}:\n{self.log_tail()}"
                    )
                time.sleep(POLL_INTERVAL_S)

    def wait_healthy(self, timeout: float = DEFAULT_READY_TIMEOUT_S) -> None:
        """Wait until `GET /healthz` answers 200 on `url` (and on `proxy_url` for peers)."""
        deadline = time.monotonic() + timeout
        for base in (self.url, self.proxy_url):
            if base is not None:
                self.wait_http(f"{base}/healthz", max(0.0, deadline - time.monotonic()))

    def _signal_group(self, signum: signal.Signals) -> None:
        try:
            os.killpg(self.process.pid, signum)
        except ProcessLookupError:
            pass

    def stop(self, grace_s: float = STOP_GRACE_S) -> int:
        """SIGTERM the process group, SIGKILL it after `grace_s`; return the exit code."""
        if self.process.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                return self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        return self.kill()

    def kill(self) -> int:
        """SIGKILL the process group at once; return the exit code."""
        self._signal_group(signal.SIGKILL)
        return self.process.wait()

    def __repr__(self) -> str:
        return f"Service({self.name!r}, pid={self.process.pid}, url={self.url!r})"


def _listen(port: int) -> tuple[str, str]:
    """The `--listen` value and the URL for a loopback port."""
    return f"127.0.0.1:{port}", f"http://127.0.0.1:{port}"


# The lab's registries (the origin, relays in front of it) are all on loopback, on ports picked
# at run time: scheduler and seeds allow them unless a test names its own allowed registries.
LAB_REGISTRIES = ("--allowed-registry", "127.0.0.1")


def _allow_lab_registries(extra_args: Iterable[str]) -> list[str]:
    args = list(extra_args)
    return args if "--allowed-registry" in args else [*LAB_REGISTRIES, *args]


def start_scheduler(
    workdir: Path, *, extra_args: Iterable[str] = (), wait: bool = True, name: str = "scheduler"
) -> Service:
    """Start `p2pdist scheduler` on a free port."""
    listen, url = _listen(free_port())
    argv = [str(p2pdist_executable()), "scheduler", "--listen", listen, *_allow_lab_registries(extra_args)]
    service = Service(name, argv, workdir / f"{name}.log", url)
    if wait:
        _wait_or_stop(service)
    return service


def start_seed(
    workdir: Path,
    scheduler_url: str,
    name: str = "seed",
    *,
    extra_args: Iterable[str] = (),
    wait: bool = True,
) -> Service:
    """Start `p2pdist seed` on a free port with its data in `workdir/<name>-data`."""
    listen, url = _listen(free_port())
    data_dir = workdir / f"{name}-data"
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        str(p2pdist_executable()), "seed",
        "--listen", listen,
        "--scheduler", scheduler_url,
        "--data-dir", str(data_dir),
        *_allow_lab_registries(extra_args),
    ]  # fmt: skip
    service = Service(name, argv, workdir / f"{name}.log", url)
    if wait:
        _wait_or_stop(service)
    return service


def start_peer(
    workdir: Path,
    scheduler_url: str,
    name: str,
    extra_args: Iterable[str] = (),
    *,
    wait: bool = True,
) -> Service:
    """Start `p2pdist peer` on two free ports (upload and proxy), data in `workdir/<name>-data`."""
    listen, url = _listen(free_port())
    proxy_listen, proxy_url = _listen(free_port())
    data_dir = workdir / f"{name}-data"
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        str(p2pdist_executable()), "peer",
        "--listen", listen,
        "--proxy-listen", proxy_listen,
        "--scheduler", scheduler_url,
        "--data-dir", str(data_dir),
        *extra_args,
    ]  # fmt: skip
    service = Service(name, argv, workdir / f"{name}.log", url, proxy_url=proxy_url)
    if wait:
        _wait_or_stop(service)
    return service


def _wait_or_stop(service: Service, timeout: float = DEFAULT_READY_TIMEOUT_S) -> None:
    try:
        service.wait_healthy(timeout)
    except BaseException:
        service.stop()
        raise


class RelayProcess(Stoppable):
    """A counting relay (`python -m lab.relay`) run as a child process.

    Its counters come from the JSON stats file it rewrites every 0.2 s.
    """

    def __init__(
        self,
        workdir: Path,
        target_host: str,
        *,
        name: str = "relay",
        rate_bps: int | None = None,
        timeout: float = DEFAULT_READY_TIMEOUT_S,
    ) -> None:
        self.stats_file = workdir / f"{name}-stats.json"
        self.stats_file.unlink(missing_ok=True)
        port = free_port()
        argv = [
            sys.executable, "-m", "lab.relay",
            "--target", target_host,
            "--listen", str(port),
            "--stats-file", str(self.stats_file),
        ]  # fmt: skip
        if rate_bps is not None:
            argv += ["--rate-bps", str(rate_bps)]
        self.host = f"127.0.0.1:{port}"
        self.url = f"http://{self.host}"
        self.service = Service(name, argv, workdir / f"{name}.log", self.url)
        try:
            self.stats(timeout=timeout)
        except BaseException:
            self.service.stop()
            raise

    def stats(self, *, fresh: bool = False, timeout: float = 10.0) -> dict[str, Any]:
        """The relay's latest counters.

        With `fresh`, wait for a write that started after this call, so every byte the
        relay forwarded before the call is included.
        """
        since = time.time() if fresh else 0.0
        deadline = time.monotonic() + timeout
        while True:
            # Read before checking for exit: a stopped relay leaves its final counters.
            code = self.service.poll()
            try:
                stats: dict[str, Any] = json.loads(self.stats_file.read_text())
                if stats["written_at"] > since:
                    return stats
            except (OSError, ValueError):
                pass
            if code is not None:
                raise LabError(f"relay exited with {code}; log {self.service.log_path}:\n{self.service.log_tail()}")
            if time.monotonic() >= deadline:
                raise LabError(f"relay wrote no stats to {self.stats_file} in {timeout:.0f} s")
            time.sleep(POLL_INTERVAL_S)

    def downstream_bytes(self) -> int:
        """Bytes sent from the target to clients so far (fresh read)."""
        value: int = self.stats(fresh=True)["downstream_bytes"]
        return value

    def stop(self) -> int:
        return self.service.stop()
