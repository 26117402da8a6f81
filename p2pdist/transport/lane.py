"""The parked-connection lane: kept-alive plain connections between requests, watched by one
task that answers what the quick handler can answer without waking the connections' tasks.

Each connection has a trio task (server.py's `_Connection`). Between requests that task used
to wait on its socket, so every small API call cost a wake-up of its task, a cancel scope's
deadline moved twice, trio's registration of the socket with its epoll and taken off again,
and a checkpoint: 92-97 us of the scheduler's CPU per call with a handler that does nothing,
against 23-26 us for a bare epoll loop answering the same calls (`benchmarks.load
--http-floor`, 200 connections). With the lane, a connection that has had its first request
answered parks here instead: its socket joins the lane's own epoll set, and its task sleeps
until it is handed something to do. The lane's task wakes once per batch of readable sockets
(the lane's epoll is itself one file trio waits on), and for each reads, parses (the same
`ServerProtocol`), asks the quick handler and writes the answer in one go.

Anything else goes back to the connection's task, as is, to take the usual path with its
deadlines: a request the quick handler leaves (or one of h11's, or a refusal), an answer that
did not fit the socket buffer, a head that arrived in part, the client's close, a socket
error, a drain under way, and a connection idle past its timeout (the lane sweeps for those,
so the timeout holds as before). A connection's task that is cancelled while parked (the
server stopping) takes its socket out of the lane first.
"""

from __future__ import annotations

import logging
import os
import select
from dataclasses import dataclass
from typing import TYPE_CHECKING

import outcome
import trio

from p2pdist.transport.drain import current as current_drain
from p2pdist.transport.plainsock import write_now
from p2pdist.transport.protocol import (
    ClientClosed,
    NeedData,
    ProtocolEvent,
    RequestReceived,
    Response,
)

if TYPE_CHECKING:
    from p2pdist.transport.server import _Connection

log = logging.getLogger("p2pdist.http")

# Readable sockets served per wake-up of the lane before other tasks get a turn.
BATCH = 256
RECEIVE_BYTES = 64 * 1024


class Declined(RequestReceived):
    """A request the lane asked the quick handler about, which left it: the handler's."""


@dataclass
class Answered:
    """A quick answer the lane could not finish: `rest` still to write (all of the response
    when `rest` is None: it is not one the lean lane frames), then the end of the cycle."""

    response: Response
    rest: bytes | None


class Gone:
    """The socket failed under the lane (the client reset it): the connection ends."""

    def __init__(self, why: str) -> None:
        self.why = why


class Resume:
    """Bytes were taken in but make no request yet (a head in part, the client's close):
    the connection's task reads on as it would have."""


RESUME = Resume()
Handed = ProtocolEvent | Answered | Gone | Resume


@dataclass(eq=False)
class _Parked:
    connection: _Connection
    fd: int
    task: trio.lowlevel.Task
    since: float  # the last time a request or its bytes came


class Lane:
    """The parked connections of one server, and the task that watches them (`run`)."""

    def __init__(self, idle_timeout_s: float) -> None:
        self.idle_timeout_s = idle_timeout_s
        self._epoll = select.epoll()
        self._parked: dict[int, _Parked] = {}
        # How often idle connections are looked for: often enough that none outstays its
        # timeout by more than a quarter of it, or a second.
        self._sweep_every = min(1.0, idle_timeout_s / 4)

    async def run(self) -> None:
        """Serve the parked connections until cancelled."""
        epoll = self._epoll
        next_sweep = trio.current_time() + self._sweep_every
        try:
            while True:
                with trio.move_on_at(next_sweep):
                    await trio.lowlevel.wait_readable(epoll.fileno())
                now = trio.current_time()
                for fd, _ in epoll.poll(0, BATCH):
                    parked = self._parked.get(fd)
                    if parked is not None:
                        self._serve(parked, now)
                if now >= next_sweep:
                    self._sweep(now)
                    next_sweep = now + self._sweep_every
        finally:
            for parked in list(self._parked.values()):
                self._hand_back(parked, ClientClosed())
            epoll.close()

    async def park(self, connection: _Connection) -> Handed:
        """Wait here for the next request on `connection` (its plain socket idle between
        requests); what its task must do next."""
        fd = connection.socket_stream.socket.fileno()
        parked = _Parked(connection, fd, trio.lowlevel.current_task(), trio.current_time())
        self._parked[fd] = parked
        self._epoll.register(fd, select.EPOLLIN)

        def abort(_: object) -> trio.lowlevel.Abort:
            self._unpark(parked)
            return trio.lowlevel.Abort.SUCCEEDED

        handed: Handed = await trio.lowlevel.wait_task_rescheduled(abort)
        return handed

    # --- inside the lane's task ------------------------------------------------------------

    def _unpark(self, parked: _Parked) -> None:
        if self._parked.get(parked.fd) is parked:
            del self._parked[parked.fd]
            if not self._epoll.closed:
                self._epoll.unregister(parked.fd)

    def _hand_back(self, parked: _Parked, handed: Handed) -> None:
        self._unpark(parked)
        trio.lowlevel.reschedule(parked.task, outcome.Value(handed))

    def _sweep(self, now: float) -> None:
        for parked in list(self._parked.values()):
            if now - parked.since > self.idle_timeout_s:
                self._hand_back(parked, ClientClosed())

    def _serve(self, parked: _Parked, now: float) -> None:
        try:
            handed = self._answer(parked, now)
        except Exception as exc:  # a bug here must not stop the lane for every connection
            log.exception("HTTP lane: serving %s failed", parked.connection.client_label)
            handed = Gone(f"{type(exc).__name__}: {exc}")
        if handed is not None:
            self._hand_back(parked, handed)

    def _answer(self, parked: _Parked, now: float) -> Handed | None:
        """Read what came and answer every request in it that the quick handler answers at
        once and that fits the socket; what is left for the connection's task, else None (it
        stays parked)."""
        try:
            data = os.read(parked.fd, RECEIVE_BYTES)
        except BlockingIOError:
            return None
        except OSError as exc:
            return Gone(exc.strerror or type(exc).__name__)
        connection = parked.connection
        protocol = connection.protocol
        protocol.receive_data(data)
        if not data:
            return RESUME  # the client's close: the task sees it as it would have
        parked.since = now
        while True:
            event = protocol.next_request(connection._read_body)
            if type(event) is NeedData:
                return None if event.idle else RESUME
            if not isinstance(event, RequestReceived):
                return event  # a close, a refusal or an answer without the handler
            connection.requests += 1
            drain = current_drain()
            if drain is not None and drain.draining:
                return event  # the usual path answers 503 and counts what is in flight
            response = connection._answer_now(event.request)
            if response is None:
                return Declined(event.request)
            framed = protocol.lean_answer(response)
            if framed is None:
                return Answered(response, None)
            try:
                rest = write_now(connection.socket_stream.socket, framed)
            except OSError as exc:
                protocol.response_failed()
                return Gone(exc.strerror or type(exc).__name__)
            if rest or connection._next_cycle_now() is not True:
                return Answered(response, rest)  # the rest, and the end of the cycle, are the task's
