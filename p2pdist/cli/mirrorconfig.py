"""`p2pdist mirror-config`: the settings that make containerd or docker pull through the local peer.

containerd gets one `hosts.toml` per registry naming the peer's proxy as mirror (the registry
stays the fallback); docker gets `registry-mirrors` in daemon.json (Docker Hub only). Printed,
or with `--write` installed, keeping a backup of every file it changes.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

from p2pdist.errors import MirrorConfigError

DEFAULT_PROXY = "http://127.0.0.1:4001"
DEFAULT_REGISTRIES = ("docker.io",)
CONTAINERD_HOSTS_DIR = "/etc/containerd/certs.d"
DOCKER_DAEMON_JSON = "/etc/docker/daemon.json"
DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "https://registry-1.docker.io"
# What containerd may ask the mirror: read-only, by tag (resolve) and by digest (pull).
CAPABILITIES = ("pull", "resolve")

_REGISTRY = re.compile(
    r"(?:(?P<scheme>https?)://)?(?P<host>[A-Za-z0-9.-]+(?::\d{1,5})?|\[[0-9a-fA-F:]+\](?::\d{1,5})?)/?"
)
_PROXY = re.compile(r"https?://[A-Za-z0-9.-]+(?::\d{1,5})?|https?://\[[0-9a-fA-F:]+\](?::\d{1,5})?")


def parse_registry(value: str) -> tuple[str, str]:
    """`ghcr.io` → (`ghcr.io`, `https://ghcr.io`); `http://10.0.0.5:5000` → (`10.0.0.5:5000`, that URL).

    The first is how image references name the registry (containerd's hosts.toml directory),
    the second the registry's API server.
    """
    m = _REGISTRY.fullmatch(value.strip())
    if not m:
        raise MirrorConfigError(f"invalid registry {value!r}: want HOST[:PORT] or http(s)://HOST[:PORT]")
    host, scheme = m.group("host"), m.group("scheme")
    if host == DOCKER_HUB and scheme is None:
        return host, DOCKER_HUB_API
    return host, f"{scheme or 'https'}://{host}"


def parse_proxy(value: str) -> str:
    value = value.strip().rstrip("/")
    if not _PROXY.fullmatch(value):
        raise MirrorConfigError(f"invalid --proxy {value!r}: want http://HOST:PORT of the peer's proxy")
    return value


def containerd_hosts_toml(server: str, proxy: str) -> str:
    """containerd's hosts.toml: try the peer's proxy first, then the registry itself."""
    return (
        "# Written by `p2pdist mirror-config containerd`: pull through the local p2pdist peer,\n"
        "# falling back to the registry itself when the peer does not answer.\n"
        f'server = "{server}"\n'
        "\n"
        f'[host."{proxy}"]\n'
        f"  capabilities = [{', '.join(json.dumps(c) for c in CAPABILITIES)}]\n"
    )


def containerd_files(proxy: str, registries: Iterable[str]) -> dict[str, str]:
    """Relative path under the hosts dir (`<registry>/hosts.toml`) → content."""
    files: dict[str, str] = {}
    for value in registries:
        host, server = parse_registry(value)
        files[f"{host}/hosts.toml"] = containerd_hosts_toml(server, proxy)
    return files


def docker_daemon_json(existing: dict[str, Any], proxy: str) -> dict[str, Any]:
    """`existing` daemon.json settings with the peer's proxy first among `registry-mirrors`."""
    merged = dict(existing)
    others = [m for m in existing.get("registry-mirrors", []) if str(m).rstrip("/") != proxy]
    merged["registry-mirrors"] = [proxy, *others]
    return merged


def peer_notes(registries: Iterable[str]) -> list[str]:
    """What the peer needs to reach these registries as its upstreams."""
    notes = []
    for value in registries:
        host, server = parse_registry(value)
        if server.startswith("http://"):
            notes.append(f"{host} speaks plain HTTP: start the peer with --insecure-registry {host}")
    return notes


def install(path: Path, content: str, *, stamp: str) -> Path | None:
    """Write `content` to `path`; a different file already there is kept as a backup first."""
    backup = None
    if path.exists():
        if path.read_text() == content:
            return None
        backup = path.with_name(f"{path.name}.p2pdist-backup-{stamp}")
        backup.write_bytes(path.read_bytes())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.p2pdist-tmp")
    tmp.write_text(content)
    tmp.replace(path)
    return backup


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runtime", choices=("containerd", "docker"), help="the container runtime to configure")
    parser.add_argument(
        "--proxy", default=DEFAULT_PROXY, help=f"the local peer's --proxy-listen URL (default: {DEFAULT_PROXY})"
    )
    parser.add_argument(
        "--registry",
        action="append",
        metavar="HOST",
        help="registry to pull through the peer, HOST[:PORT] or http://HOST:PORT for plain HTTP; "
        "repeatable (default: docker.io; docker mirrors Docker Hub only)",
    )
    parser.add_argument("--write", action="store_true", help="install the files, backing up what was there")
    parser.add_argument(
        "--hosts-dir",
        default=CONTAINERD_HOSTS_DIR,
        help=f"containerd's registry config_path (default: {CONTAINERD_HOSTS_DIR})",
    )
    parser.add_argument(
        "--daemon-json", default=DOCKER_DAEMON_JSON, help=f"docker's daemon.json (default: {DOCKER_DAEMON_JSON})"
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="then ask the peer for each registry's /v2/ (and --image's manifest) as the runtime would, "
        "and say whether the peer reached the registry; exit 1 if it did not",
    )
    parser.add_argument("--image", metavar="NAME[:TAG]", help="with --check: a manifest to fetch through the peer")


def run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    proxy = parse_proxy(args.proxy)
    registries: Sequence[str] = args.registry or DEFAULT_REGISTRIES
    stamp = time.strftime("%Y%m%d%H%M%S")
    if args.runtime == "containerd":
        files = containerd_files(proxy, registries)
        for relative, content in files.items():
            path = Path(args.hosts_dir) / relative
            if args.write:
                backup = install(path, content, stamp=stamp)
                print(f"wrote {path}" + (f" (previous file kept as {backup})" if backup else ""), file=out)
            else:
                print(f"# {path}\n{content}", file=out)
        print(
            f"containerd reads these when its CRI registry config_path is {args.hosts_dir} "
            f"(`ctr image pull --hosts-dir {args.hosts_dir}` for ctr); no restart is needed.",
            file=err,
        )
    else:
        hosts = [parse_registry(r)[0] for r in registries]
        if [h for h in hosts if h != DOCKER_HUB]:
            print(
                "note: docker's registry-mirrors mirror Docker Hub only; other registries are pulled "
                "directly (use containerd's hosts.toml for them)",
                file=err,
            )
        path = Path(args.daemon_json)
        existing: dict[str, Any] = {}
        if path.exists():
            try:
                loaded = json.loads(path.read_text() or "{}")
            except ValueError as exc:
                raise MirrorConfigError(f"{path} is not valid JSON ({exc}); fix it first") from None
            if not isinstance(loaded, dict):
                raise MirrorConfigError(f"{path} must hold a JSON object")
            existing = loaded
        merged = docker_daemon_json(existing, proxy)
        content = json.dumps(merged, indent=2) + "\n"
        if args.write:
            backup = install(path, content, stamp=stamp)
            print(f"wrote {path}" + (f" (previous file kept as {backup})" if backup else ""), file=out)
            print("apply it with `systemctl reload docker` (registry-mirrors reload on SIGHUP)", file=err)
        else:
            print(f"# {path}\n{content}", end="", file=out)
        print(
            f"the peer answers docker's requests from its default upstream: start it with "
            f"--registry-mirror {DOCKER_HUB_API}",
            file=err,
        )
    for note in peer_notes(registries):
        print(f"note: {note}", file=err)
    if args.check:
        hosts = [parse_registry(r)[0] for r in registries]
        # docker sends no ?ns=: the peer answers it from its --registry-mirror.
        results = [check_through_peer(proxy, None if args.runtime == "docker" else h, args.image) for h in hosts]
        for host, (ok, line) in zip(hosts, results, strict=True):
            print(f"{'ok' if ok else 'FAILED'}: {host}: {line}", file=out)
        return 0 if all(ok for ok, _ in results) else 1
    return 0


MANIFEST_TYPES = (
    "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, "
    "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"
)
CHECK_TIMEOUT_S = 30.0


def check_through_peer(proxy: str, ns: str | None, image: str | None) -> tuple[bool, str]:
    """Ask the peer's proxy what a runtime asks first (`/v2/`, then the image's manifest),
    and whether the answer came from the registry (the peer relays it with OCI-Namespace) or
    from the peer failing to reach it (its own error, which says what it tried and why)."""
    import httpx

    paths = ["/v2/"]
    if image:
        name, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "latest")
        paths.append(f"/v2/{name}/manifests/{tag}")
    params = {"ns": ns} if ns else {}
    said = []
    try:
        with httpx.Client(timeout=CHECK_TIMEOUT_S) as client:
            for path in paths:
                response = client.get(f"{proxy}{path}", params=params, headers={"accept": MANIFEST_TYPES})
                if "oci-namespace" not in response.headers:
                    if ns is None and response.status_code == 200:
                        return (
                            False,
                            "the peer answered itself: start it with --registry-mirror URL (docker sends no ?ns=)",
                        )
                    return False, f"the peer did not reach the registry: {_peer_reason(response)}"
                said.append(f"{path} → {response.status_code}{_meaning(response.status_code)}")
    except httpx.HTTPError as exc:
        return False, (
            f"the peer's proxy {proxy} does not answer ({type(exc).__name__}): is the peer running "
            f"with --proxy-listen at that address?"
        )
    return True, "the peer reached the registry: " + ", ".join(said)


def _meaning(status: int) -> str:
    return {
        200: "",
        401: " (the registry wants credentials: the runtime sends them)",
        404: " (not in the registry)",
    }.get(status, "")


def _peer_reason(response: Any) -> str:
    try:
        message = str(response.json()["errors"][0]["message"])
    except (ValueError, KeyError, IndexError, TypeError):
        message = response.text.strip()[:300]
    return f"{response.status_code} {message}"
