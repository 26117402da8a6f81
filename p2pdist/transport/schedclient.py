"""The client side of the scheduler API, shared by peers and seeds: one scheduler
(SchedulerClient), and every scheduler a host knows (SchedulerPool), which sends each task's
calls to its owner by rendezvous hash over the schedulers that answer, and finds schedulers
behind a DNS name."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import ssl
from collections.abc import Callable, Sequence
from typing import TypeVar
from urllib.parse import urlsplit

import trio

from p2pdist import wire
from p2pdist.cluster.liveness import PROBE_TIMEOUT_S, probe
from p2pdist.cluster.membership import Membership
from p2pdist.errors import UpstreamError
from p2pdist.transport.piececlient import PieceClient

log = logging.getLogger("p2pdist.schedulers")

R = TypeVar("R")
# Far above any real reply (a parent list for one task), far below what would hurt.
MAX_REPLY_BYTES = 16 << 20


class SchedulerClient:
    """One scheduler. A call that waited out `timeout_s` probes the scheduler's liveness
    (p2pdist/cluster/liveness.py): while the probe is answered (busy, not frozen) the call keeps
    waiting, `timeout_s` at a time, for up to `patience_s` in all; with no answer it fails as
    not answering. `on_wait(outcome)` counts each probe: "busy" or "silent"."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 3.0,
        patience_s: float = 0.0,
        secret: str | None = None,
        verify: ssl.SSLContext | None = None,
        on_wait: Callable[[str], None] | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.patience_s = patience_s
        self.on_wait = on_wait
        self.client = PieceClient(connect_timeout_s=timeout_s, secret=secret, ssl_context=verify)

    async def call(self, path: str, message: object, reply: type[R]) -> R:
        """POST a message; raise UpstreamError with a one-line reason on any failure."""
        headers = {"content-type": wire.CONTENT_TYPE, "x-p2pdist": "1"}
        started = trio.current_time()
        scope = trio.CancelScope(deadline=started + self.timeout_s)
        answer: tuple[int, bytes] | None = None
        async with trio.open_nursery() as nursery:
            if self.patience_s > self.timeout_s:
                nursery.start_soon(self._watch, scope, started + self.patience_s)
            try:
                with scope:
                    async with self.client.request("POST", self.url + path, headers, wire.encode(message)) as response:
                        if response.length > MAX_REPLY_BYTES:
                            raise UpstreamError(f"scheduler sent a {response.length}-byte reply")
                        answer = (response.status, await response.read())
            except Exception as exc:
                # Raised below, not out of the nursery, which would wrap it in an exception group.
                failed: Exception | None = exc
            else:
                failed = None
            nursery.cancel_scope.cancel()  # the watch
        if isinstance(failed, UpstreamError):
            raise UpstreamError(f"scheduler {self.url} unreachable: {failed}") from None
        if failed is not None:
            raise failed
        if answer is None:
            waited = trio.current_time() - started
            raise UpstreamError(f"scheduler {self.url} unreachable: no answer in {waited:.3g}s")
        status, body = answer
        if status != 200:
            text = body.decode("utf-8", "replace").strip()
            raise UpstreamError(f"scheduler answered {status}: {text[:200]}", upstream_status=status)
        return wire.decode(reply, body)

    async def _watch(self, scope: trio.CancelScope, give_up_at: float) -> None:
        """Probe just before the call's deadline; a live scheduler moves it on by timeout_s."""
        lead = min(PROBE_TIMEOUT_S, self.timeout_s / 2)
        while True:
            await trio.sleep_until(scope.deadline - lead)
            if scope.deadline >= give_up_at:
                return  # out of patience: the deadline stands
            alive = await probe(self.url, lead)
            if self.on_wait is not None:
                self.on_wait("busy" if alive else "silent")
            if not alive:
                return
            scope.deadline = min(give_up_at, scope.deadline + self.timeout_s)

    async def say_goodbye(self, host_id: str) -> None:
        """Best effort, on shutdown: tell the scheduler to stop offering this host."""
        with trio.move_on_after(1.0), contextlib.suppress(UpstreamError):
            await self.call("/v1/hosts/leave", wire.LeaveHost(host_id=host_id), wire.Empty)

    async def aclose(self) -> None:
        await self.client.aclose()


def _down(exc: UpstreamError) -> bool:
    """Whether a failed call says the scheduler is down (no answer, or a 5xx), rather than
    that it refused this one message (a 4xx, which another scheduler would refuse too)."""
    return exc.upstream_status is None or exc.upstream_status >= 500


class SchedulerPool:
    """The schedulers this host knows: each task's calls go to its owner, the highest in
    rendezvous rank among those alive (p2pdist/cluster/membership.py); a scheduler that does not
    answer is skipped for the back-off, and its tasks go to the next in rank.

    `on_up(url)` is called when a scheduler is new (DNS) or answers again after failing, so the
    node tells it at once what it holds instead of at the next announce.
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        timeout_s: float = 3.0,
        backoff_s: float = 10.0,
        patience_s: float = 0.0,
        secret: str | None = None,
        verify: ssl.SSLContext | None = None,
        on_wait: Callable[[str], None] | None = None,
    ) -> None:
        self.configured = tuple(u.rstrip("/") for u in urls)
        self.membership = Membership(self.configured, backoff_s=backoff_s)
        self.timeout_s = timeout_s
        self.patience_s = patience_s
        self.on_wait = on_wait
        self._secret = secret
        self._verify = verify
        self._clients: dict[str, SchedulerClient] = {}
        self.on_up: Callable[[str], None] | None = None

    @property
    def members(self) -> tuple[str, ...]:
        return self.membership.members

    def client(self, url: str) -> SchedulerClient:
        client = self._clients.get(url)
        if client is None:
            client = self._clients[url] = SchedulerClient(
                url,
                timeout_s=self.timeout_s,
                patience_s=self.patience_s,
                secret=self._secret,
                verify=self._verify,
                on_wait=self.on_wait,
            )
        return client

    def order(self, task_id: str) -> list[str]:
        """The schedulers to try for `task_id`, its owner first; none while every one is in its
        back-off. That is the circuit breaker: a scheduler that stopped answering (a frozen
        process, a dropped link) would cost every blob its timeout, so between failures only
        the announce loop, which calls every scheduler every announce interval, probes it."""
        return self.membership.order(task_id, trio.current_time())

    def owner(self, task_id: str) -> str | None:
        """The scheduler that owns `task_id` now."""
        order = self.order(task_id)
        return order[0] if order else None

    async def call(self, url: str, path: str, message: object, reply: type[R]) -> R:
        """One call to one scheduler; its outcome updates whether that scheduler counts as alive."""
        try:
            result = await self.client(url).call(path, message, reply)
        except UpstreamError as exc:
            if _down(exc) and self.membership.failed(url, trio.current_time()):
                log.warning(
                    "scheduler %s is not answering (%s); its tasks go to the next scheduler for %.0fs",
                    url,
                    exc,
                    self.membership.backoff_s,
                )
            raise
        if self.membership.answered(url, trio.current_time()):
            log.info("scheduler %s answers again; its tasks go back to it", url)
            if self.on_up is not None:
                self.on_up(url)
        return result

    async def call_task(self, task_id: str, path: str, message: object, reply: type[R]) -> tuple[R, str]:
        """Call the owner of `task_id`, falling back in rank order; return the reply and who gave it."""
        order = self.order(task_id)
        if not order:
            raise UpstreamError(
                f"no scheduler answered in the last {self.membership.backoff_s:g}s "
                f"({len(self.members)} known; the announce loop retries them)"
            )
        errors = []
        for url in order:
            try:
                return await self.call(url, path, message, reply), url
            except UpstreamError as exc:
                if not _down(exc):
                    raise
                errors.append(str(exc))
        raise UpstreamError(f"no scheduler answered ({'; '.join(errors)})")

    async def call_all(self, path: str, message: object, reply: type[R]) -> None:
        """Best effort, to every scheduler at once (a task left, a host leaving)."""
        async with trio.open_nursery() as nursery:
            for url in self.members:
                nursery.start_soon(self._call_quietly, url, path, message, reply)

    async def _call_quietly(self, url: str, path: str, message: object, reply: type[R]) -> None:
        with contextlib.suppress(UpstreamError):
            await self.call(url, path, message, reply)

    async def say_goodbye(self, host_id: str) -> None:
        """Best effort, on shutdown: tell every scheduler to stop offering this host."""
        with trio.move_on_after(1.0):
            await self.call_all("/v1/hosts/leave", wire.LeaveHost(host_id=host_id), wire.Empty)

    # -- DNS ------------------------------------------------------------------------------

    async def resolve(self) -> None:
        """Look the configured names up again: each address is one scheduler. A name that does
        not resolve keeps the schedulers it had (or stays itself, to be tried as given)."""
        resolved: list[str] = []
        for url in self.configured:
            found = await _addresses(url)
            if found is None:
                resolved.extend(m for m in self.members if _came_from(m, url) or m == url)
            else:
                resolved.extend(found)
        if not resolved or tuple(dict.fromkeys(resolved)) == self.members:
            return
        before = self.members
        added = self.membership.set_members(resolved)
        log.info("schedulers now %s (were %s)", ", ".join(self.members), ", ".join(before))
        for url in added:
            if self.on_up is not None:
                self.on_up(url)

    async def resolve_loop(self, interval_s: float) -> None:
        if not any(_needs_lookup(u) for u in self.configured) or interval_s <= 0:
            return
        while True:
            await trio.sleep(interval_s)
            await self.resolve()

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()


def _needs_lookup(url: str) -> bool:
    """An http:// URL naming a host, not an address. https:// URLs stay as given: the
    scheduler's certificate names the host, not each address."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        return False
    try:
        ipaddress.ip_address(parts.hostname)
    except ValueError:
        return True
    return False


def _came_from(member: str, url: str) -> bool:
    """Whether `member` (http://ADDRESS:PORT) could have come from resolving `url`."""
    return urlsplit(member).port == (urlsplit(url).port or 80) and urlsplit(member).path == urlsplit(url).path


async def _addresses(url: str) -> list[str] | None:
    """The URL once per IPv4 address of its host (IPv6 when it has none), sorted; `[url]` when
    it names an address already; None when the lookup failed."""
    if not _needs_lookup(url):
        return [url]
    parts = urlsplit(url)
    port = parts.port or 80
    try:
        infos = await trio.socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        log.warning("cannot resolve scheduler name %s: %s", parts.hostname, exc)
        return None
    v4 = sorted({str(info[4][0]) for info in infos if info[0] == socket.AF_INET})
    v6 = sorted({str(info[4][0]) for info in infos if info[0] == socket.AF_INET6})
    hosts = v4 or [f"[{a}]" for a in v6]
    path = parts.path.rstrip("/")
    return [f"http://{host}:{port}{path}" for host in hosts] or None
