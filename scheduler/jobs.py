"""The scheduler's preheat job API, as Harbor's `dragonfly` preheat driver calls it: `GET /healthy`,
`POST /oapi/v1/jobs`, `GET /oapi/v1/jobs/{id}`; and the runner that carries a job out.

A job resolves the image at the registry with the job's credentials (tag -> manifest, index ->
the wanted platforms' manifests), picks its targets (one seed, every seed, or a share of the
peers), asks each target to hold each config and layer blob (`POST /v1/preheat` on its piece
port, p2pdist/node/preheat.py) and polls how far each is until all are held, one failed, or the
job's time is up. The credentials live only in the running job's frame: never in the record
the status endpoint answers from, never in a log line.
"""

from __future__ import annotations

import hmac
import json
import logging
import random
import time
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import trio

from p2pdist import wire
from p2pdist.config import SchedulerConfig
from p2pdist.errors import BadRequest, Forbidden, P2PError, PreheatError, UpstreamError
from p2pdist.node.preheat import PREHEAT_PATH
from p2pdist.registry.allowlist import registry_allowed
from p2pdist.registry.client import OriginClient
from p2pdist.registry.manifest import ImageBlob, resolve_image
from p2pdist.transport.piececlient import PieceClient
from p2pdist.transport.server import Request, Response
from p2pdist.transport.trust import client_context
from scheduler.preheat import (
    MAX_JOB_BODY_BYTES,
    Job,
    JobBook,
    JobRequest,
    JobState,
    Target,
    TaskResult,
    assign,
    choose_targets,
    parse_job_request,
    summary,
)

if TYPE_CHECKING:
    from scheduler.state import Scheduler

log = logging.getLogger("p2pdist.scheduler.preheat")

HEALTHY_PATH = "/healthy"
JOBS_PATH = "/oapi/v1/jobs"
MAX_JOBS = 1000  # records kept at most, finished or not
POLL_INTERVAL_S = 0.25
REQUEST_TIMEOUT_S = 10.0
# A target that cannot be asked how far it is this many times in a row has failed the copy.
POLL_FAILURES = 8


def json_response(status: int, body: object) -> Response:
    return Response(status, [("content-type", "application/json")], json.dumps(body).encode())


def _error(status: int, message: str) -> Response:
    # Dragonfly's manager answers errors as {"message": ...}; Harbor shows the body as it is.
    return json_response(status, {"message": message})


class JobService:
    """The job endpoints and the runner. `handle` answers a request for one of its paths (None
    for any other); `run` carries the jobs out and runs until cancelled."""

    def __init__(self, config: SchedulerConfig, state: Scheduler, *, rng: random.Random | None = None) -> None:
        self.config = config
        self.state = state
        self.book = JobBook(max_jobs=MAX_JOBS, ttl_s=config.preheat_job_ttl_s)
        self.rng = rng or random.Random()
        self.running = trio.CapacityLimiter(max(1, config.preheat_jobs))
        self._send: trio.MemorySendChannel[tuple[Job, dict[str, str]]]
        self._recv: trio.MemoryReceiveChannel[tuple[Job, dict[str, str]]]
        self._send, self._recv = trio.open_memory_channel(MAX_JOBS)
        self._tokens = [t.encode("ascii") for t in (config.cluster_secret, config.preheat_token) if t]

    # -- HTTP -----------------------------------------------------------------------------

    async def handle(self, request: Request) -> Response | None:
        path = request.path
        if path == HEALTHY_PATH:
            if request.method not in ("GET", "HEAD"):
                return _error(405, f"{HEALTHY_PATH} takes GET")
            return json_response(200, {"status": "ok"})
        if path != JOBS_PATH and not path.startswith(JOBS_PATH + "/"):
            return None
        if not self._authorized(request):
            return Response(
                401,
                [("content-type", "application/json"), ("www-authenticate", 'Bearer realm="p2pdist-preheat"')],
                json.dumps({"message": "send the preheat token or cluster secret as Authorization: Bearer"}).encode(),
            )
        try:
            if path == JOBS_PATH:
                if request.method == "POST":
                    return await self._create(request)
                if request.method in ("GET", "HEAD"):
                    now = trio.current_time()
                    self.book.expire(now)
                    return json_response(200, [job.view() for job in self.book.jobs.values()])
                return _error(405, f"{JOBS_PATH} takes GET or POST")
            if request.method not in ("GET", "HEAD"):
                return _error(405, f"{JOBS_PATH}/<id> takes GET")
            text = path[len(JOBS_PATH) + 1 :]
            if not (text.isascii() and text.isdigit() and len(text) < 12):
                raise BadRequest(f"job id {text[:30]!r} is not a number")
            job = self.book.get(int(text), trio.current_time())
            if job is None:
                return _error(404, f"no preheat job {int(text)} (finished jobs are kept {self.book.ttl_s:.0f}s)")
            return json_response(200, job.view())
        except P2PError as exc:
            return _error(exc.status, str(exc))

    def _authorized(self, request: Request) -> bool:
        if not self._tokens:
            return True  # a cluster without a secret: every API is open, as the rest of this port
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        sent = token.strip().encode("latin-1", "replace")
        # Compare against every token, always: the time taken says nothing about which matched.
        matches = [hmac.compare_digest(sent, expected) for expected in self._tokens]
        return scheme.lower() == "bearer" and any(matches)

    async def _create(self, request: Request) -> Response:
        job_request = parse_job_request(await request.body(limit=MAX_JOB_BODY_BYTES))
        # The seeds would refuse each blob of it: say so now, once, before resolving anything.
        registry = urlsplit(job_request.url).netloc
        if not registry_allowed(registry, self.config.allowed_registries):
            raise Forbidden(f"registry {registry[:100]} is not in allowed_registries")
        job = self.book.add(job_request, wall=time.time(), now=trio.current_time())
        self._send.send_nowait((job, job_request.headers))
        log.info(
            "preheat job %d: %s, scope %s%s",
            job.id,
            job_request.url,
            job_request.scope,
            f", platforms {', '.join(job_request.platforms)}" if job_request.platforms else "",
        )
        return json_response(200, job.view())

    # -- running --------------------------------------------------------------------------

    async def run(self) -> None:
        origin = OriginClient(timeout_s=REQUEST_TIMEOUT_S * 3)
        client = PieceClient(
            connect_timeout_s=REQUEST_TIMEOUT_S,
            secret=self.config.cluster_secret,
            ssl_context=client_context(self.config.tls_ca),
        )
        try:
            async with trio.open_nursery() as nursery:
                async for job, headers in self._recv:
                    nursery.start_soon(self._run_job, origin, client, job, headers)
        finally:
            with trio.CancelScope(shield=True):
                await client.aclose()
                await origin.aclose()

    async def _run_job(self, origin: OriginClient, client: PieceClient, job: Job, headers: dict[str, str]) -> None:
        request = job.request
        limit = self.config.preheat_job_timeout_s
        timeout_s = min(request.timeout_s, limit) if request.timeout_s > 0 else limit
        async with self.running:
            error = ""
            with trio.move_on_after(timeout_s) as scope:
                try:
                    await self._preheat(origin, client, job, request, headers)
                except P2PError as exc:
                    error = str(exc) or type(exc).__name__
            if scope.cancelled_caught:
                error = f"timed out after {timeout_s:g}s with {job.copies_done} of {job.copies_total} blob copies held"
            elif not error and job.failures:
                error = summary(job)
        del headers  # the credentials go no further than this job
        state: JobState = "FAILURE" if error else "SUCCESS"
        self.book.finish(job, state, error, wall=time.time(), now=trio.current_time())
        if error:
            log.warning("preheat job %d failed: %s", job.id, error)
        else:
            log.info("preheat job %d: %d blob(s) held on %d host(s)", job.id, job.blobs, len(job.targets))

    async def _preheat(
        self, origin: OriginClient, client: PieceClient, job: Job, request: JobRequest, headers: dict[str, str]
    ) -> None:
        try:
            blobs = await resolve_image(origin, request.url, headers, request.platforms)
        except P2PError as exc:
            raise PreheatError(f"cannot resolve {request.url}: {exc}") from None
        hosts = [Target(h.host_id, h.url, h.kind) for h in self.state.hosts.values()]
        targets = choose_targets(hosts, request, self.rng)
        if not targets:
            raise UpstreamError(
                "no seed peer to preheat on" if request.scope != "all_peers" else "no peer to preheat on"
            )
        by_digest = {b.digest: b for b in blobs}
        # Blob-major order: with few slots, every target starts on the first blobs at once.
        copies = assign(list(by_digest), targets, request.scope)
        job.targets = sorted({t.host_id for _, t in copies})
        job.blobs = len(blobs)
        job.copies_total = len(copies)
        job.bytes_total = sum(by_digest[d].size for d, _ in copies)
        job.updated_at = time.time()
        per_job = self.config.preheat_job_blobs or 1
        if request.concurrent_count:
            per_job = min(per_job, request.concurrent_count)
        limiter = trio.CapacityLimiter(max(1, per_job))
        async with trio.open_nursery() as nursery:
            for digest, target in copies:
                nursery.start_soon(self._copy, client, job, by_digest[digest], target, headers, limiter)

    async def _copy(
        self,
        client: PieceClient,
        job: Job,
        blob: ImageBlob,
        target: Target,
        headers: dict[str, str],
        limiter: trio.CapacityLimiter,
    ) -> None:
        """One blob onto one host: ask it, then poll it until it holds the blob or gave up."""
        async with limiter:
            description = await self._hold(client, job, blob, target, headers)
        ip = target.url.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
        result = TaskResult(blob.url, target.host_id, ip, description)
        if description:
            job.failures.append(result)
        else:
            job.successes.append(result)
            job.copies_done += 1
            job.bytes_done[(blob.digest, target.host_id)] = blob.size
        job.updated_at = time.time()

    async def _hold(
        self, client: PieceClient, job: Job, blob: ImageBlob, target: Target, headers: dict[str, str]
    ) -> str:
        """'' once `target` holds `blob`, else why not."""
        if target.kind == "seed":
            self.state.preheating(blob.digest, blob.url, target.host_id, trio.current_time())
        message = wire.PreheatBlob(
            task_id=blob.digest, url=blob.url, headers=headers, min_piece_size=self.state.min_piece_size_sent()
        )
        try:
            status, text = await self._call(client, "POST", f"{target.url}{PREHEAT_PATH}", wire.encode(message))
        except (UpstreamError, trio.TooSlowError) as exc:
            return f"could not ask the host: {_reason(exc)}"
        if status != 202:
            return f"the host refused: HTTP {status} {text.decode('utf-8', 'replace').strip()[:200]}"
        failures = 0
        while True:
            await trio.sleep(POLL_INTERVAL_S)
            if target.host_id not in self.state.hosts:
                return "the host left the cluster"
            try:
                status, body = await self._call(client, "GET", f"{target.url}{PREHEAT_PATH}/{blob.digest}")
                if status != 200:
                    raise UpstreamError(f"HTTP {status} {body.decode('utf-8', 'replace').strip()[:200]}")
                progress = wire.decode(wire.PreheatStatus, body)
            except (UpstreamError, BadRequest, trio.TooSlowError) as exc:
                failures += 1
                if failures >= POLL_FAILURES:
                    return f"the host stopped answering: {_reason(exc)}"
                continue
            failures = 0
            if progress.state == "done":
                return ""
            if progress.state == "failed":
                return progress.error or "failed without a reason"
            if progress.state == "unknown":
                return "the host no longer knows the blob (restarted?)"
            job.bytes_done[(blob.digest, target.host_id)] = min(progress.bytes_done, blob.size)

    async def _call(self, client: PieceClient, method: str, url: str, body: bytes = b"") -> tuple[int, bytes]:
        """(status, body) of one small request to a node."""
        with trio.fail_after(REQUEST_TIMEOUT_S):
            async with client.request(method, url, {"content-type": wire.CONTENT_TYPE}, body) as response:
                data = await response.read() if response.length <= wire.MAX_BODY_BYTES else b""
        return response.status, data


def _reason(exc: BaseException) -> str:
    if isinstance(exc, trio.TooSlowError):
        return f"no answer in {REQUEST_TIMEOUT_S:g}s"
    return str(exc) or type(exc).__name__
