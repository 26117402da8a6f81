"""`p2pdist preheat IMAGE`: put an image's blobs on the seeds (or a share of the peers) before a
rollout, through the scheduler's job API (the one Harbor's dragonfly driver calls).

It submits the job, waits until the scheduler has resolved the image (so a missing image or a
refused pull fails here), and with `--wait` follows the job to its end with a progress bar,
then prints what each target holds. Any failure exits non-zero with one line on stderr.
"""

from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import dataclass
from typing import IO, Any

import httpx

from p2pdist.config import CLUSTER_SECRET_ENV, PREHEAT_TOKEN_ENV
from p2pdist.errors import BadRequest, PreheatError
from p2pdist.registry.manifest import parse_platform
from p2pdist.registry.oci import basic_auth, is_registry_host

REGISTRY_TOKEN_ENV = "P2PDIST_REGISTRY_TOKEN"
SCOPES = {"seeds": "single_seed_peer", "all-seeds": "all_seed_peers", "peers": "all_peers"}
POLL_INTERVAL_S = 0.5
DOCKER_HUB_API = "https://registry-1.docker.io"
_REFERENCE = re.compile(
    r"(?P<name>[a-z0-9]+(?:[._/-]+[a-z0-9]+)*)(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?"
)


@dataclass(frozen=True)
class Image:
    base: str  # scheme://registry
    name: str
    reference: str  # tag or digest

    @property
    def manifest_url(self) -> str:
        return f"{self.base}/v2/{self.name}/manifests/{self.reference}"


def parse_image(text: str, *, plain_http: bool = False) -> Image:
    """`registry/name:tag`, `registry/name@sha256:...` (a bare `name:tag` is Docker Hub's)."""
    first, _, rest = text.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        if not is_registry_host(first):
            raise BadRequest(f"invalid registry {first[:100]!r} in {text[:200]}")
        base = f"{'http' if plain_http else 'https'}://{first}"
    else:
        base, rest = DOCKER_HUB_API, text if "/" in text else f"library/{text}"
    m = _REFERENCE.fullmatch(rest)
    if m is None:
        raise BadRequest(f"invalid image {text[:200]!r}: want REGISTRY/NAME:TAG or REGISTRY/NAME@sha256:DIGEST")
    return Image(base, m["name"], m["digest"] or m["tag"] or "latest")


def job_body(
    image: Image,
    *,
    scope: str,
    platforms: list[str],
    percentage: int | None,
    count: int | None,
    authorization: str | None,
    timeout_s: float,
) -> dict[str, Any]:
    args: dict[str, Any] = {
        "type": "image",
        "url": image.manifest_url,
        "scope": SCOPES[scope],
        "headers": {"Authorization": authorization} if authorization else {},
        "platforms": [parse_platform(p) for p in platforms],
        "timeout": int(timeout_s * 1e9),
    }
    if percentage is not None:
        args["percentage"] = percentage
    if count is not None:
        args["count"] = count
    return {"type": "preheat", "args": args}


class Bar:
    """One line on a terminal: blob copies and bytes held across the targets."""

    def __init__(self, stream: IO[str], *, enabled: bool) -> None:
        self.stream = stream
        self.enabled = enabled and stream.isatty()

    def draw(self, progress: dict[str, Any]) -> None:
        if not self.enabled:
            return
        total = progress.get("bytes_total") or 0
        done = progress.get("bytes_done") or 0
        frac = done / total if total else 0.0
        line = (
            f"\r[{'#' * int(frac * 30):<30}] {progress.get('copies_done', 0)}/{progress.get('copies_total', 0)} "
            f"blob copies, {done / 2**20:.1f}/{total / 2**20:.1f} MiB"
        )
        self.stream.write(line)
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")


def preheat(
    image_text: str,
    scheduler: str,
    *,
    platforms: list[str],
    scope: str = "seeds",
    percentage: int | None = None,
    count: int | None = None,
    user: str | None = None,
    plain_http: bool = False,
    wait: bool = False,
    timeout_s: float = 1800.0,
    quiet: bool = False,
    out: IO[str] = sys.stdout,
) -> dict[str, Any]:
    """Submit the job and follow it (to the end with `wait`); return its last view."""
    if (percentage is not None or count is not None) and scope != "peers":
        raise BadRequest("--percentage and --count go with --scope peers")
    image = parse_image(image_text, plain_http=plain_http)
    authorization = None
    if user:
        name, _, password = user.partition(":")
        authorization = basic_auth(name, password)
    elif token := os.environ.get(REGISTRY_TOKEN_ENV):
        authorization = f"Bearer {token}"
    body = job_body(
        image,
        scope=scope,
        platforms=platforms,
        percentage=percentage,
        count=count,
        authorization=authorization,
        timeout_s=timeout_s,
    )
    headers = {"accept": "application/json"}
    if secret := os.environ.get(PREHEAT_TOKEN_ENV) or os.environ.get(CLUSTER_SECRET_ENV):
        headers["authorization"] = f"Bearer {secret}"
    deadline = time.monotonic() + timeout_s
    base = scheduler.rstrip("/")
    with httpx.Client(timeout=30.0, headers=headers) as client:
        job = _answer(client, "POST", f"{base}/oapi/v1/jobs", body)
        bar = Bar(sys.stderr, enabled=wait and not quiet)
        try:
            while job.get("state") == "PENDING" and (wait or not job.get("progress", {}).get("blobs")):
                if time.monotonic() > deadline:
                    raise PreheatError(f"job {job.get('id')} still running after {timeout_s:g}s")
                time.sleep(POLL_INTERVAL_S)
                job = _answer(client, "GET", f"{base}/oapi/v1/jobs/{job['id']}")
                bar.draw(job.get("progress", {}))
        finally:
            bar.close()
    _report(job, out, finished=job.get("state") != "PENDING")
    if job.get("state") == "FAILURE":
        errors = [s.get("error", "") for s in job.get("result", {}).get("job_states", [])]
        raise PreheatError(next((e for e in errors if e), "the job failed without a reason"))
    return job


def _answer(client: httpx.Client, method: str, url: str, body: object = None) -> dict[str, Any]:
    try:
        response = client.request(method, url, json=body)
    except httpx.HTTPError as exc:
        raise PreheatError(f"scheduler {url.split('/oapi/')[0]} unreachable: {type(exc).__name__}") from None
    try:
        doc = response.json()
    except ValueError:
        doc = None
    if response.status_code // 100 != 2 or not isinstance(doc, dict):
        message = doc.get("message") if isinstance(doc, dict) else response.text.strip()[:200]
        raise PreheatError(f"scheduler answered {response.status_code}: {message or 'no reason given'}")
    return doc


def _report(job: dict[str, Any], out: IO[str], *, finished: bool) -> None:
    """Per target: how many blobs it holds, and each failure's reason."""
    progress = job.get("progress", {})
    if not finished:
        print(
            f"preheat job {job.get('id')} running: {progress.get('blobs', 0)} blob(s) "
            f"onto {len(progress.get('targets', []))} host(s)",
            file=out,
        )
        return
    held: dict[str, int] = {}
    failed: dict[str, list[str]] = {}
    ips: dict[str, str] = {}
    for state in job.get("result", {}).get("job_states", []):
        for result in state.get("results", []):
            for task in result.get("success_tasks", []):
                held[task["hostname"]] = held.get(task["hostname"], 0) + 1
                ips[task["hostname"]] = task.get("ip", "")
            for task in result.get("failure_tasks", []):
                digest = task["url"].rsplit("/", 1)[-1]
                failed.setdefault(task["hostname"], []).append(f"{digest[:19]}: {task.get('description', '')}")
                ips[task["hostname"]] = task.get("ip", "")
    blobs = progress.get("blobs", 0)
    for host in progress.get("targets", []):
        mark = "ok" if held.get(host, 0) == blobs and not failed.get(host) else "FAILED"
        print(f"{host} ({ips.get(host, '?')}): {held.get(host, 0)} of {blobs} blob(s) held {mark}", file=out)
        for line in failed.get(host, []):
            print(f"  {line}", file=out)
    print(f"preheat job {job.get('id')}: {job.get('state')}", file=out)
