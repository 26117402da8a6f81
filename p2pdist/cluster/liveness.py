"""Busy or frozen: a scheduler call with no answer after its timeout is either queued behind
a burst (the scheduler is busy and will answer) or lost (the process is stopped, the link is
down). Only the second should send a task to another scheduler, or its pull to the origin: at
fleet scale, failing over from a busy scheduler turns a registration burst into an origin
stampede.

The scheduler answers a one-datagram probe on UDP at its API port from a thread of its own, so
the answer does not queue behind the HTTP requests (the thread needs the interpreter for
microseconds, which it gets within the switch interval however busy the event loop is). It
answers only while its event loop has run within LOOP_STALE_S: a stopped process answers
nothing, and neither does one whose loop is stuck. The client (SchedulerClient) probes when a
call has waited out its timeout: an answer keeps it waiting, up to the host's patience; no
answer within PROBE_TIMEOUT_S fails it over as before.

    probe:  b"p2pdist alive? " + 8-byte nonce
    answer: b"p2pdist alive " + the same nonce

The probe carries nothing and the answer tells only that the process runs, so it is not
authenticated; someone who can forge the answer can only make a host wait its patience.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from urllib.parse import urlsplit

import trio

PROBE = b"p2pdist alive? "
ANSWER = b"p2pdist alive "
NONCE_BYTES = 8
PROBE_TIMEOUT_S = 0.5  # a live scheduler's thread answers in milliseconds
LOOP_STALE_S = 10.0  # an event loop that has not run this long is stuck, not busy


class LivenessResponder:
    """The scheduler's side: a daemon thread answering probes on UDP (host, port) while
    `beat()` (called by the event loop) was called within LOOP_STALE_S."""

    def __init__(self, host: str, port: int) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            self.sock.bind((host, port))
        except OSError as exc:
            self.sock.close()
            raise OSError(f"cannot bind the liveness probe to udp {host}:{port}: {exc.strerror or exc}") from None
        self.sock.settimeout(1.0)  # to notice close()
        self.beat_at = time.monotonic()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="liveness", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def beat(self) -> None:
        self.beat_at = time.monotonic()

    def _run(self) -> None:
        while not self._closed:
            try:
                data, address = self.sock.recvfrom(64)
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            if len(data) != len(PROBE) + NONCE_BYTES or not data.startswith(PROBE):
                continue
            if time.monotonic() - self.beat_at > LOOP_STALE_S:
                continue  # the loop is stuck: say nothing, as a stopped process would
            try:
                self.sock.sendto(ANSWER + data[len(PROBE) :], address)
            except OSError:
                continue

    def close(self) -> None:
        self._closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the thread's recvfrom
        except OSError:
            pass
        self.sock.close()


async def probe(url: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the scheduler at `url` answers a liveness probe within `timeout_s`."""
    parts = urlsplit(url)
    if not parts.hostname:
        return False
    port = parts.port or (443 if parts.scheme == "https" else 80)
    nonce = os.urandom(NONCE_BYTES)
    with trio.move_on_after(timeout_s):
        try:
            infos = await trio.socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_DGRAM)
            if not infos:
                return False
            family, _, _, _, address = infos[0]
            with trio.socket.socket(family, socket.SOCK_DGRAM) as sock:
                await sock.connect(address)
                await sock.send(PROBE + nonce)
                while True:
                    data = await sock.recv(64)
                    if data == ANSWER + nonce:
                        return True
        except OSError:
            return False  # e.g. ICMP port unreachable: nothing listens there
    return False
