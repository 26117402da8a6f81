"""Edge sites in network namespaces: a core namespace (registry, scheduler, seed) and one
namespace per site, whose hosts share a bridge behind one veth uplink to the core, shaped
with tbf each way. The bytes crossing an uplink are read from the kernel's interface counters.
Both shapes: the central one (every peer uses the core's scheduler), and the tiered one (a
site runs its own scheduler and a seed whose upstream is a core peer's mirror).

Addresses are 10.213.x.y and exist only inside these namespaces: 10.213.0.1 in the core,
10.213.<k>.0/24 for site k (1, 2, ...: the core's end of its uplink .1, a tiered site's
scheduler and seed .2, its hosts .10 up).
Every namespace is named from one run id and removed by that exact name in `stop()`, which
also runs when setting up fails half way.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from lab import LabError, Stoppable
from lab.procs import Service, p2pdist_executable
from lab.registry import REGISTRY_BINARY

CORE_ADDRESS = "10.213.0.1"
REGISTRY_PORT = 5000
SCHEDULER_PORT = 8002
SEED_PORT = 4010
PEER_PORT = 4000
PROXY_PORT = 4001
READY_TIMEOUT_S = 30.0


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise LabError(f"ip {' '.join(args)}: {result.stderr.strip()}")


def in_netns(ns: str, argv: Sequence[str]) -> list[str]:
    """`argv` run inside namespace `ns`."""
    return ["ip", "netns", "exec", ns, *argv]


@dataclass(frozen=True)
class SiteHost:
    """A host of a site: where its peer listens (pieces) and where its clients pull (proxy)."""

    site: str  # the site's name, as the peer announces it
    netns: str
    address: str

    @property
    def url(self) -> str:
        return f"http://{self.address}:{PEER_PORT}"

    @property
    def proxy_url(self) -> str:
        return f"http://{self.address}:{PROXY_PORT}"


class SiteLab(Stoppable):
    """`sites` sites of `hosts_per_site` hosts around a core, each site's uplink shaped to
    `uplink_bps` each way. The namespaces exist once the constructor returns."""

    def __init__(self, workdir: Path, sites: int, hosts_per_site: int, *, uplink_bps: int) -> None:
        if not 1 <= sites <= 200 or not 1 <= hosts_per_site <= 200:
            raise ValueError("1..200 sites of 1..200 hosts")
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.run_id = f"p2s{secrets.token_hex(3)}"  # unique per run: namespaces of runs side by side never clash
        self.core = f"{self.run_id}-core"
        self.site_names = [f"site-{k}" for k in range(1, sites + 1)]
        self.site_netns = {name: f"{self.run_id}-s{k}" for k, name in enumerate(self.site_names, 1)}
        self.uplink_bps = uplink_bps
        self.hosts: dict[str, list[SiteHost]] = {}
        self.tiered_sites: set[str] = set()  # sites with their own scheduler and seed
        self.services: list[Service] = []
        self._created: list[str] = []
        try:
            self._build(hosts_per_site)
        except BaseException:
            self.stop()
            raise

    # -- the network ----------------------------------------------------------------------

    def _add_netns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._created.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def _build(self, hosts_per_site: int) -> None:
        self._add_netns(self.core)
        _ip("-n", self.core, "addr", "add", f"{CORE_ADDRESS}/32", "dev", "lo")
        self._sysctl(self.core, "net.ipv4.ip_forward=1")  # site to site goes through the core
        for k, site in enumerate(self.site_names, 1):
            ns = self.site_netns[site]
            self._add_netns(ns)
            wan = self.uplink_name(site)
            # Created inside the namespaces: no interface of this lab ever exists in the host's.
            _ip("-n", ns, "link", "add", "uplink", "type", "veth", "peer", "name", wan, "netns", self.core)
            _ip("-n", ns, "link", "add", "br0", "type", "bridge")
            _ip("-n", ns, "link", "set", "uplink", "master", "br0")
            for dev in ("uplink", "br0"):
                _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", self.core, "addr", "add", f"10.213.{k}.1/24", "dev", wan)
            _ip("-n", self.core, "link", "set", wan, "up")
            self.hosts[site] = []
            for h in range(hosts_per_site):
                address = f"10.213.{k}.{10 + h}"
                _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "br0")
                self.hosts[site].append(SiteHost(site, ns, address))
            _ip("-n", ns, "route", "add", "default", "via", f"10.213.{k}.1")
            self._shape(self.core, wan)  # into the site
            self._shape(ns, "uplink")  # out of the site

    def _sysctl(self, ns: str, setting: str) -> None:
        result = subprocess.run(in_netns(ns, ["sysctl", "-qw", setting]), capture_output=True, text=True)
        if result.returncode != 0:
            raise LabError(f"sysctl {setting} in {ns}: {result.stderr.strip()}")

    def _shape(self, ns: str, dev: str) -> None:
        # tbf, not netem (netem is not available here). A burst of 128 KiB passes a GSO
        # segment whole; at 8 MiB/s and up it is under 16 ms of the link.
        argv = ["tc", "qdisc", "add", "dev", dev, "root", "tbf"]
        argv += ["rate", f"{self.uplink_bps * 8}bit", "burst", "128kb", "latency", "200ms"]
        result = subprocess.run(in_netns(ns, argv), capture_output=True, text=True)
        if result.returncode != 0:
            raise LabError(f"tc on {dev} in {ns}: {result.stderr.strip()}")

    def uplink_name(self, site: str) -> str:
        """The core's end of `site`'s uplink: what it sends goes into the site."""
        return f"wan{self.site_names.index(site) + 1}"

    def uplink_bytes(self, site: str) -> tuple[int, int]:
        """(bytes into the site, bytes out of it) so far, from the kernel's counters of the
        uplink's core end (Ethernet frames: headers included)."""
        result = subprocess.run(
            ["ip", "-n", self.core, "-s", "-j", "link", "show", "dev", self.uplink_name(site)],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise LabError(f"counters of {site}'s uplink: {result.stderr.strip()}")
        stats = json.loads(result.stdout)[0]["stats64"]
        return int(stats["tx"]["bytes"]), int(stats["rx"]["bytes"])

    def bytes_into_sites(self) -> dict[str, int]:
        """Bytes into every site so far (as `uplink_bytes`), from one read of the counters:
        cheap enough to sample while a rollout runs."""
        result = subprocess.run(
            ["ip", "-n", self.core, "-s", "-j", "link", "show"], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise LabError(f"counters of the uplinks: {result.stderr.strip()}")
        tx = {link["ifname"]: int(link["stats64"]["tx"]["bytes"]) for link in json.loads(result.stdout)}
        return {site: tx[self.uplink_name(site)] for site in self.site_names}

    def set_uplink(self, site: str, up: bool) -> None:
        """Cut or restore `site`'s WAN link (`ip link set ... down|up` on its core end)."""
        _ip("-n", self.core, "link", "set", self.uplink_name(site), "up" if up else "down")

    # -- processes ------------------------------------------------------------------------

    def start(self, name: str, ns: str, argv: Sequence[str], url: str, *, proxy_url: str | None = None) -> Service:
        """Start `argv` inside `ns`, owned by the lab (stopped first in `stop()`)."""
        service = Service(name, in_netns(ns, argv), self.workdir / f"{name}.log", url, proxy_url=proxy_url)
        self.services.append(service)
        return service

    def wait_healthy(self, service: Service, ns: str, timeout: float = READY_TIMEOUT_S) -> None:
        """Wait until GET /healthz answers 200 on the service's URL (and proxy URL)."""
        urls = [f"{u}/healthz" for u in (service.url, service.proxy_url) if u]
        self.wait_ready(service, ns, urls, timeout)

    def wait_ready(self, service: Service, ns: str, urls: Sequence[str], timeout: float = READY_TIMEOUT_S) -> None:
        """Poll each of `urls` from inside `ns` (the test process has no address there) until
        it answers 200; fail with the end of the service's log if it does not or exits."""
        code = (
            "import sys, time, httpx\n"
            "deadline = time.monotonic() + float(sys.argv[1])\n"
            "for url in sys.argv[2:]:\n"
            "    while True:\n"
            "        try:\n"
            "            if httpx.get(url, timeout=1.0).status_code == 200:\n"
            "                break\n"
            "        except httpx.TransportError:\n"
            "            pass\n"
            "        if time.monotonic() > deadline:\n"
            "            sys.exit(f'{url} not ready')\n"
            "        time.sleep(0.05)\n"
        )
        result = subprocess.run(
            in_netns(ns, [sys.executable, "-c", code, str(timeout), *urls]),
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0 or service.poll() is not None:
            raise LabError(f"{service.name} not ready: {result.stderr.strip()[-300:]}\n{service.log_tail()}")

    def start_registry(self, storage_dir: Path) -> Service:
        """The real Distribution registry in the core, serving the blobs under `storage_dir`
        (pushed beforehand to a registry on loopback that used the same directory)."""
        config = {
            "version": 0.1,
            "log": {"level": "warn", "accesslog": {"disabled": True}},
            "storage": {
                "filesystem": {"rootdirectory": str(storage_dir)},
                "redirect": {"disable": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {"addr": f"{CORE_ADDRESS}:{REGISTRY_PORT}"},
        }
        path = self.workdir / "core-registry.yml"
        path.write_text(yaml.safe_dump(config))
        service = self.start("registry", self.core, [REGISTRY_BINARY, "serve", str(path)], self.registry_url)
        self.wait_ready(service, self.core, [f"{self.registry_url}/v2/"])
        return service

    @property
    def registry_url(self) -> str:
        return f"http://{CORE_ADDRESS}:{REGISTRY_PORT}"

    @property
    def scheduler_url(self) -> str:
        return f"http://{CORE_ADDRESS}:{SCHEDULER_PORT}"

    def start_core(self, scheduler_args: Iterable[str] = (), seed_args: Iterable[str] = ()) -> None:
        """The scheduler and one seed (in site `core`) in the core namespace."""
        exe = str(p2pdist_executable())
        listen = f"{CORE_ADDRESS}:{SCHEDULER_PORT}"
        # The core's registry is the only origin; scheduler and seed refuse any other.
        allowed = ["--allowed-registry", CORE_ADDRESS]
        scheduler = self.start(
            "scheduler",
            self.core,
            [exe, "scheduler", "--listen", listen, *allowed, *scheduler_args],
            self.scheduler_url,
        )
        self.wait_healthy(scheduler, self.core)
        data = self.workdir / "seed-data"
        data.mkdir(parents=True, exist_ok=True)
        seed_url = f"http://{CORE_ADDRESS}:{SEED_PORT}"
        argv = [
            exe, "seed", "--listen", f"{CORE_ADDRESS}:{SEED_PORT}", "--scheduler", self.scheduler_url,
            "--data-dir", str(data), "--site", "core", *allowed, *seed_args,
        ]  # fmt: skip
        self.wait_healthy(self.start("seed", self.core, argv, seed_url), self.core)

    def start_peers(self, peer_args: Iterable[str] = (), hosts: Iterable[SiteHost] | None = None) -> list[Service]:
        """A peer on every host of every site (or on `hosts`), announcing its site, pointed at
        its site's scheduler in the tiered shape and at the core's otherwise; waits until all
        are healthy."""
        exe = str(p2pdist_executable())
        started = []
        chosen = [h for site_hosts in self.hosts.values() for h in site_hosts] if hosts is None else list(hosts)
        for host in chosen:
            name = f"{host.site}-h{self.hosts[host.site].index(host)}"
            data = self.workdir / f"{name}-data"
            data.mkdir(parents=True, exist_ok=True)
            scheduler = self.site_scheduler_url(host.site) if host.site in self.tiered_sites else self.scheduler_url
            argv = [
                exe, "peer", "--listen", f"{host.address}:{PEER_PORT}",
                "--proxy-listen", f"{host.address}:{PROXY_PORT}", "--scheduler", scheduler,
                "--data-dir", str(data), "--site", host.site, *peer_args,
            ]  # fmt: skip
            started.append((host, self.start(name, host.netns, argv, host.url, proxy_url=host.proxy_url)))
        for host, service in started:
            self.wait_healthy(service, host.netns)
        return [service for _, service in started]

    def add_host(self, site: str) -> SiteHost:
        """One more host address in `site` (its peer is started with `start_peers(hosts=...)`):
        works with the uplink down, as a machine that joins a cut-off site."""
        k = self.site_names.index(site) + 1
        host = SiteHost(site, self.site_netns[site], f"10.213.{k}.{10 + len(self.hosts[site])}")
        _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "br0")
        self.hosts[site].append(host)
        return host

    # -- the tiered shape -----------------------------------------------------------------

    @property
    def core_mirror_url(self) -> str:
        """The core peer's registry mirror: the upstream of every site's seed."""
        return f"http://{CORE_ADDRESS}:{PROXY_PORT}"

    def start_core_peer(self, peer_args: Iterable[str] = ()) -> Service:
        """A peer in the core (site `core`) whose mirror port, open to the sites, is what the
        sites' seeds pull through: the core cluster's mirror endpoint."""
        exe = str(p2pdist_executable())
        data = self.workdir / "core-peer-data"
        data.mkdir(parents=True, exist_ok=True)
        argv = [
            exe, "peer", "--listen", f"{CORE_ADDRESS}:{PEER_PORT}", "--proxy-listen", f"{CORE_ADDRESS}:{PROXY_PORT}",
            "--scheduler", self.scheduler_url, "--data-dir", str(data), "--site", "core", *peer_args,
        ]  # fmt: skip
        url = f"http://{CORE_ADDRESS}:{PEER_PORT}"
        service = self.start("core-peer", self.core, argv, url, proxy_url=self.core_mirror_url)
        self.wait_healthy(service, self.core)
        return service

    def site_services_address(self, site: str) -> str:
        """Where a tiered site's own scheduler and seed listen (a host of the site's bridge)."""
        return f"10.213.{self.site_names.index(site) + 1}.2"

    def site_scheduler_url(self, site: str) -> str:
        return f"http://{self.site_services_address(site)}:{SCHEDULER_PORT}"

    def site_seed_url(self, site: str) -> str:
        return f"http://{self.site_services_address(site)}:{SEED_PORT}"

    def start_site_cluster(
        self, site: str, scheduler_args: Iterable[str] = (), seed_args: Iterable[str] = ()
    ) -> tuple[Service, Service]:
        """The tiered shape for `site`: its own scheduler and seed inside the site, the seed's
        upstream the core's mirror. Peers started after this use the site's scheduler."""
        exe = str(p2pdist_executable())
        ns = self.site_netns[site]
        address = self.site_services_address(site)
        _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "br0")
        allowed = ["--allowed-registry", CORE_ADDRESS]
        scheduler = self.start(
            f"{site}-scheduler",
            ns,
            [exe, "scheduler", "--listen", f"{address}:{SCHEDULER_PORT}", *allowed, *scheduler_args],
            self.site_scheduler_url(site),
        )
        self.wait_healthy(scheduler, ns)
        data = self.workdir / f"{site}-seed-data"
        data.mkdir(parents=True, exist_ok=True)
        argv = [
            exe, "seed", "--listen", f"{address}:{SEED_PORT}", "--scheduler", self.site_scheduler_url(site),
            "--data-dir", str(data), "--site", site, "--upstream", self.core_mirror_url, *allowed, *seed_args,
        ]  # fmt: skip
        seed = self.start(f"{site}-seed", ns, argv, self.site_seed_url(site))
        self.wait_healthy(seed, ns)
        self.tiered_sites.add(site)
        return scheduler, seed

    def get(self, host: SiteHost, url: str, out: Path) -> subprocess.Popen[str]:
        """`p2pdist get url` on `host`, through its own peer."""
        argv = [str(p2pdist_executable()), "get", url, "-o", str(out), "--peer", host.proxy_url, "-q"]
        return subprocess.Popen(in_netns(host.netns, argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    # -- teardown -------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop every process, then delete every namespace by its exact name (the links and
        bridges inside go with them)."""
        for service in reversed(self.services):
            if service.poll() is None:
                service.stop()
        errors = []
        for name in reversed(self._created):
            result = subprocess.run(["ip", "netns", "del", name], capture_output=True, text=True, check=False)
            if result.returncode != 0 and os.path.exists(f"/run/netns/{name}"):
                errors.append(f"{name}: {result.stderr.strip()}")
        self._created.clear()
        if errors:
            raise LabError("could not delete namespace(s): " + "; ".join(errors))
