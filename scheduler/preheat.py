"""Preheat jobs, pure: the job request Harbor's dragonfly driver (and `p2pdist preheat`) sends,
parsed and checked; the job record and its JSON view; the book that bounds how many are kept
and for how long; and which hosts a job's scope picks. scheduler/jobs.py runs them.

A job's registry credentials (`headers`) are never part of its record: the runner holds them
only while the job runs, so no status answer, log line or file can show them.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import random
from dataclasses import dataclass, field
from typing import Any, Literal

from p2pdist.cluster.rendezvous import owner
from p2pdist.errors import BadRequest, JobsBusy
from p2pdist.registry.manifest import parse_manifest_url, parse_platform
from p2pdist.registry.oci import basic_auth

Scope = Literal["single_seed_peer", "all_seed_peers", "all_peers"]
SCOPES: tuple[Scope, ...] = ("single_seed_peer", "all_seed_peers", "all_peers")
JobState = Literal["PENDING", "SUCCESS", "FAILURE"]
MAX_JOB_BODY_BYTES = 64 * 1024
NS_PER_S = 1_000_000_000
# The one scheduler cluster this scheduler is, as Dragonfly's results name it.
SCHEDULER_CLUSTER_ID = 1


@dataclass(frozen=True)
class JobRequest:
    """A preheat job as asked for. `headers` go to the registry (and the seeds fetching from
    it) for this job only; they are never logged, stored or answered."""

    url: str
    scope: Scope = "single_seed_peer"
    platforms: tuple[str, ...] = ()
    percentage: int | None = None
    count: int | None = None
    concurrent_count: int = 0
    timeout_s: float = 0.0
    headers: dict[str, str] = field(default_factory=dict, repr=False)

    def public(self) -> dict[str, object]:
        """The arguments as a status answer shows them: everything but the headers."""
        args: dict[str, object] = {"type": "image", "url": self.url, "scope": self.scope}
        if self.platforms:
            args["platforms"] = list(self.platforms)
        if self.percentage is not None:
            args["percentage"] = self.percentage
        if self.count is not None:
            args["count"] = self.count
        return args


def _nullable(value: object, kind: type, where: str) -> Any:
    """`value` if of `kind`, None if null or empty; else a BadRequest naming `where`."""
    if value is None or value == "" or (isinstance(value, list | dict) and not value):
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BadRequest(f"{where}: want {kind.__name__}, got {type(value).__name__}")
    return value


def parse_job_request(body: bytes) -> JobRequest:
    """A POST /oapi/v1/jobs body: `{"type": "preheat", "args": {...}, "scheduler_cluster_ids": [...]}`.

    Every field Harbor's driver sends may be empty or null. Besides Dragonfly's `url`, `scope`,
    `headers`, `concurrent_count`, `timeout` (a Go duration: nanoseconds), `platform`,
    `percentage`, `count`, `username`/`password`, p2pdist takes `platforms` (a list). Keys
    it does not know (`tag`, `filtered_query_params`, ...) are ignored, as Dragonfly's manager does.
    """
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("body is not JSON") from None
    if not isinstance(doc, dict):
        raise BadRequest("body must be a JSON object")
    job_type = _nullable(doc.get("type"), str, "type")
    if job_type not in (None, "preheat"):
        raise BadRequest(f"unsupported job type {job_type[:40]!r}: only preheat")
    clusters = _nullable(doc.get("scheduler_cluster_ids"), list, "scheduler_cluster_ids")
    if clusters is not None and not all(isinstance(c, int) and not isinstance(c, bool) for c in clusters):
        raise BadRequest("scheduler_cluster_ids: want a list of integers")
    args = _nullable(doc.get("args"), dict, "args")
    if args is None:
        raise BadRequest("args.url is required")
    preheat_type = _nullable(args.get("type"), str, "args.type")
    if preheat_type not in (None, "image"):
        raise BadRequest(f"unsupported args.type {preheat_type[:40]!r}: only image")
    url = _nullable(args.get("url"), str, "args.url")
    if url is None:
        raise BadRequest("args.url is required")
    parse_manifest_url(url)
    scope = _nullable(args.get("scope"), str, "args.scope") or "single_seed_peer"
    if scope not in SCOPES:
        raise BadRequest(f"args.scope {scope[:40]!r}: want one of {', '.join(SCOPES)}")
    headers = _nullable(args.get("headers"), dict, "args.headers") or {}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
        raise BadRequest("args.headers: want an object of strings")
    headers = {k.lower(): v for k, v in headers.items()}
    username = _nullable(args.get("username"), str, "args.username")
    if username is not None and "authorization" not in headers:
        headers["authorization"] = basic_auth(username, _nullable(args.get("password"), str, "args.password") or "")
    platforms: list[str] = []
    if (one := _nullable(args.get("platform"), str, "args.platform")) is not None:
        platforms.append(one)
    many = _nullable(args.get("platforms"), list, "args.platforms") or []
    if not all(isinstance(p, str) for p in many):
        raise BadRequest("args.platforms: want a list of OS/ARCH strings")
    platforms.extend(many)
    percentage = _nullable(args.get("percentage"), int, "args.percentage")
    if percentage is not None and not 1 <= percentage <= 100:
        raise BadRequest("args.percentage: want 1 to 100")
    count = _nullable(args.get("count"), int, "args.count")
    if count is not None and count < 1:
        raise BadRequest("args.count: want at least 1")
    if (percentage is not None or count is not None) and scope != "all_peers":
        raise BadRequest("args.percentage and args.count apply to scope all_peers only")
    concurrent = _nullable(args.get("concurrent_count"), int, "args.concurrent_count") or 0
    timeout_ns = _nullable(args.get("timeout"), int, "args.timeout") or 0
    if concurrent < 0 or timeout_ns < 0:
        raise BadRequest("args.concurrent_count and args.timeout must not be negative")
    return JobRequest(
        url=url,
        scope=scope,
        platforms=tuple(dict.fromkeys(parse_platform(p) for p in platforms)),
        percentage=percentage,
        count=count,
        concurrent_count=concurrent,
        timeout_s=timeout_ns / NS_PER_S,
        headers=headers,
    )


@dataclass(frozen=True)
class Target:
    """A host a job puts blobs on."""

    host_id: str
    url: str  # its piece server
    kind: str


@dataclass
class TaskResult:
    """One blob on one host: Dragonfly's success_tasks / failure_tasks entry."""

    url: str  # the blob's URL
    hostname: str
    ip: str
    description: str = ""

    def view(self, *, failed: bool) -> dict[str, str]:
        out = {"url": self.url, "hostname": self.hostname, "ip": self.ip}
        if failed:
            out["description"] = self.description
        return out


def rfc3339(wall: float) -> str:
    return datetime.datetime.fromtimestamp(wall, datetime.UTC).isoformat().replace("+00:00", "Z")


@dataclass
class Job:
    id: int
    request: JobRequest  # without headers
    created_at: float  # wall clock
    updated_at: float
    state: JobState = "PENDING"
    error: str = ""
    finished_at: float | None = None  # the book's clock, for dropping the record
    targets: list[str] = field(default_factory=list)
    blobs: int = 0
    copies_total: int = 0  # blobs x targets
    copies_done: int = 0
    bytes_total: int = 0
    bytes_done: dict[tuple[str, str], int] = field(default_factory=dict)  # (blob, host) -> bytes held
    successes: list[TaskResult] = field(default_factory=list)
    failures: list[TaskResult] = field(default_factory=list)

    def progress(self) -> dict[str, object]:
        return {
            "blobs": self.blobs,
            "targets": list(self.targets),
            "copies_total": self.copies_total,
            "copies_done": self.copies_done,
            "bytes_total": self.bytes_total,
            "bytes_done": sum(self.bytes_done.values()),
        }

    def view(self) -> dict[str, object]:
        """The job as GET /oapi/v1/jobs/{id} answers it: Dragonfly's fields, and `progress`."""
        results = {
            "success_tasks": [r.view(failed=False) for r in self.successes],
            "failure_tasks": [r.view(failed=True) for r in self.failures],
            "scheduler_cluster_id": SCHEDULER_CLUSTER_ID,
        }
        return {
            "id": self.id,
            "type": "preheat",
            "state": self.state,
            "created_at": rfc3339(self.created_at),
            "updated_at": rfc3339(self.updated_at),
            "args": self.request.public(),
            "result": {
                "state": self.state,
                "job_states": [
                    {
                        "task_name": "preheat",
                        "state": self.state,
                        "error": self.error,
                        "results": [results],
                    }
                ],
            },
            "progress": self.progress(),
        }


class JobBook:
    """The job records: at most `max_jobs`, a finished one dropped `ttl_s` after it finished."""

    def __init__(self, *, max_jobs: int, ttl_s: float) -> None:
        self.max_jobs = max_jobs
        self.ttl_s = ttl_s
        self.jobs: dict[int, Job] = {}
        self.next_id = 1

    def add(self, request: JobRequest, *, wall: float, now: float) -> Job:
        self.expire(now)
        if len(self.jobs) >= self.max_jobs:
            finished = [j for j in self.jobs.values() if j.finished_at is not None]
            if not finished:
                raise JobsBusy(f"{len(self.jobs)} preheat jobs are pending; try again later")
            del self.jobs[min(finished, key=lambda j: j.finished_at or 0.0).id]
        job = Job(self.next_id, dataclasses.replace(request, headers={}), wall, wall)
        self.next_id += 1
        self.jobs[job.id] = job
        return job

    def get(self, job_id: int, now: float) -> Job | None:
        self.expire(now)
        return self.jobs.get(job_id)

    def finish(self, job: Job, state: JobState, error: str, *, wall: float, now: float) -> None:
        job.state = state
        job.error = error
        job.updated_at = wall
        job.finished_at = now

    def expire(self, now: float) -> None:
        for job_id in [
            j.id for j in self.jobs.values() if j.finished_at is not None and now - j.finished_at > self.ttl_s
        ]:
            del self.jobs[job_id]


def choose_targets(hosts: list[Target], request: JobRequest, rng: random.Random) -> list[Target]:
    """The hosts a job's scope may use: the seeds (one of them per blob for single_seed_peer,
    see `assign`), or peers (all, `count` of them, or `percentage` of them rounded up), chosen
    at random so repeated jobs spread out."""
    if request.scope != "all_peers":
        return sorted((h for h in hosts if h.kind == "seed"), key=lambda h: h.host_id)
    peers = sorted((h for h in hosts if h.kind == "peer"), key=lambda h: h.host_id)
    wanted = len(peers)
    if request.count is not None:
        wanted = min(request.count, len(peers))
    elif request.percentage is not None:
        wanted = math.ceil(len(peers) * request.percentage / 100)
    return sorted(rng.sample(peers, wanted), key=lambda h: h.host_id)


def assign(digests: list[str], targets: list[Target], scope: Scope) -> list[tuple[str, Target]]:
    """Which blob goes on which host. With single_seed_peer, each blob on the seed that a pull
    would wake for it (rendezvous over the seeds, as scheduler/state.py picks), so the image
    spreads over the seeds and every scheduler agrees; else every blob on every target."""
    if scope == "single_seed_peer":
        by_id = {t.host_id: t for t in targets}
        return [(d, by_id[chosen]) for d in digests if (chosen := owner(d, by_id)) is not None]
    return [(d, t) for d in digests for t in targets]


def summary(job: Job) -> str:
    """Why a job that ran to the end failed: how many copies, and the first reason."""
    first = job.failures[0]
    return (
        f"{len(job.failures)} of {job.copies_total} blob copies failed; "
        f"first: {first.url.rsplit('/', 1)[-1][:19]} on {first.hostname}: {first.description}"
    )
