"""Real container runtimes for the lab: containerd (driven with `ctr`) and dockerd, each with its
own root, state, socket and config in a private temporary directory, run as child processes.

Nothing touches the machine's own containerd or docker: every path and socket is private,
dockerd runs with vfs storage, no iptables and no bridge, and is pointed at its own containerd.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from lab import LabError, Stoppable
from lab.procs import POLL_INTERVAL_S, Service
from p2pdist.cli.mirrorconfig import containerd_hosts_toml

READY_TIMEOUT_S = 30.0
# Unix socket paths must stay under 108 bytes: keep the runtime dirs short, under /tmp.
_SHORT_TMP = "/tmp"


def _binary(name: str) -> str:
    found = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None)
    if found is None:
        raise LabError(f"{name} not found: install it (make setup)")
    return found


def _wait(service: Service, probe: Sequence[str], timeout: float) -> None:
    """Poll `probe` until it exits 0; fail with the log's end if the service dies first."""
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        code = service.poll()
        if code is not None:
            raise LabError(f"{service.name} exited with {code}; log {service.log_path}:\n{service.log_tail()}")
        result = subprocess.run(probe, capture_output=True, text=True, check=False, timeout=10)
        if result.returncode == 0:
            return
        last = result.stderr.strip()[-300:]
        if time.monotonic() > deadline:
            service.stop()
            raise LabError(
                f"{service.name} not ready after {timeout:.0f} s ({last}); log {service.log_path}:\n"
                f"{service.log_tail()}"
            )
        time.sleep(POLL_INTERVAL_S)


def write_hosts_toml(hosts_dir: Path, registry_host: str, server: str, mirror: str | None) -> Path:
    """containerd's `<hosts_dir>/<registry_host>/hosts.toml`, as `p2pdist mirror-config` writes it
    (with no mirror: the registry alone)."""
    path = hosts_dir / registry_host / "hosts.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = containerd_hosts_toml(server, mirror) if mirror else f'server = "{server}"\n'
    path.write_text(text)
    return path


class Containerd(Stoppable):
    """A private containerd. `pull` runs `ctr image pull --hosts-dir` and returns its seconds."""

    def __init__(
        self, workdir: Path, name: str = "containerd", *, timeout: float = READY_TIMEOUT_S, netns: str | None = None
    ) -> None:
        self.name = name
        # In a network namespace (a host of a site in lab/netns.py), containerd and ctr run
        # there both: ctr itself fetches what it pulls.
        self.prefix = ["ip", "netns", "exec", netns] if netns else []
        self.dir = Path(tempfile.mkdtemp(prefix=f"p2pd-{name}-", dir=_SHORT_TMP))
        self.socket = self.dir / "containerd.sock"
        config = self.dir / "config.toml"
        config.write_text(
            "version = 2\n"
            f'root = "{self.dir / "root"}"\n'
            f'state = "{self.dir / "state"}"\n'
            # Kubernetes' CRI plugin is not needed to pull and would want a CNI setup.
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            "[grpc]\n"
            f'  address = "{self.socket}"\n'
            "[ttrpc]\n"
            f'  address = "{self.socket}.ttrpc"\n'
        )
        self.ctr_bin = _binary("ctr")
        self.service = Service(
            name,
            [*self.prefix, _binary("containerd"), "--config", str(config)],
            workdir / f"{name}.log",
            f"unix://{self.socket}",
        )
        try:
            _wait(self.service, [*self.prefix, self.ctr_bin, "--address", str(self.socket), "version"], timeout)
        except BaseException:
            self.stop()
            raise

    def ctr(self, *args: str, timeout: float = 300.0, namespace: str = "default") -> subprocess.CompletedProcess[str]:
        argv = [*self.prefix, self.ctr_bin, "--address", str(self.socket), "--namespace", namespace, *args]
        return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=timeout)

    def pull(self, ref: str, hosts_dir: Path, *, user: str | None = None, timeout: float = 300.0) -> float:
        """`ctr image pull --hosts-dir` (layers fetched and unpacked); the seconds it took."""
        args = ["image", "pull", "--hosts-dir", str(hosts_dir)]
        if user:
            args += ["--user", user]
        started = time.monotonic()
        result = self.ctr(*args, ref, timeout=timeout)
        took = time.monotonic() - started
        if result.returncode != 0:
            raise LabError(f"ctr pull {ref} failed: {result.stderr.strip()[-800:]}")
        return took

    def content_digests(self) -> set[str]:
        """Digests of every blob in the content store."""
        result = self.ctr("content", "ls", "-q")
        if result.returncode != 0:
            raise LabError(f"ctr content ls failed: {result.stderr.strip()}")
        return set(result.stdout.split())

    def remove_image(self, ref: str) -> None:
        """Forget the image and its content, so the next pull fetches every blob again."""
        self.ctr("image", "rm", "--sync", ref)
        digests = self.content_digests()
        if digests:
            self.ctr("content", "rm", *sorted(digests))

    def stop(self) -> None:
        if hasattr(self, "service"):
            self.service.stop()
        # Snapshots are not mounted once the pull is done; nothing else holds the dir.
        shutil.rmtree(self.dir, ignore_errors=True)


class Dockerd(Stoppable):
    """A private dockerd on its own socket, data-root and exec-root, using `containerd`."""

    def __init__(
        self,
        workdir: Path,
        containerd: Containerd,
        *,
        registry_mirrors: Sequence[str] = (),
        insecure_registries: Sequence[str] = (),
        name: str = "dockerd",
        timeout: float = READY_TIMEOUT_S,
    ) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"p2pd-{name}-", dir=_SHORT_TMP))
        self.socket = self.dir / "docker.sock"
        self.host = f"unix://{self.socket}"
        config = {
            "data-root": str(self.dir / "data"),
            "exec-root": str(self.dir / "exec"),
            "pidfile": str(self.dir / "docker.pid"),
            "hosts": [self.host],
            "containerd": str(containerd.socket),
            "storage-driver": "vfs",
            "iptables": False,
            "ip6tables": False,
            "bridge": "none",
            "registry-mirrors": list(registry_mirrors),
            "insecure-registries": list(insecure_registries),
        }
        self.config_path = self.dir / "daemon.json"
        self.config_path.write_text(json.dumps(config, indent=2))
        self.docker_bin = _binary("docker")
        self.service = Service(
            name, [_binary("dockerd"), "--config-file", str(self.config_path)], workdir / f"{name}.log", self.host
        )
        try:
            _wait(self.service, [self.docker_bin, "-H", self.host, "version"], timeout)
        except BaseException:
            self.stop()
            raise

    def docker(self, *args: str, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.docker_bin, "-H", self.host, *args], capture_output=True, text=True, check=False, timeout=timeout
        )

    def pull(self, ref: str, *, timeout: float = 300.0) -> float:
        started = time.monotonic()
        result = self.docker("pull", "--quiet", ref, timeout=timeout)
        if result.returncode != 0:
            raise LabError(f"docker pull {ref} failed: {result.stderr.strip()[-800:]}")
        return time.monotonic() - started

    def image_id(self, ref: str) -> str:
        result = self.docker("image", "inspect", "-f", "{{.Id}}", ref)
        if result.returncode != 0:
            raise LabError(f"docker image inspect {ref} failed: {result.stderr.strip()}")
        return result.stdout.strip()

    def stop(self) -> None:
        if hasattr(self, "service"):
            self.service.stop(grace_s=15.0)
        shutil.rmtree(self.dir, ignore_errors=True)
