"""`p2pdist get`: download one blob URL through the local peer daemon, like Dragonfly's dfget.

Writes to a temporary file beside the output, checks the sha256 digest named in the URL,
then renames; on any failure exits non-zero with one line on stderr and leaves no output.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import http.client
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import IO
from urllib.parse import urlencode, urlsplit

from p2pdist.cli.receive import receive_to_file, receive_to_stream, splice_works
from p2pdist.errors import GetError
from p2pdist.registry.oci import SCHEME_HEADER, basic_auth, is_registry_host, parse_blob_url


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return (
        f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else (f"{seconds // 60}:{seconds % 60:02d}")
    )


def progress_line(done: int, total: int | None, elapsed_s: float, rate_bps: float, width: int) -> str:
    """One status line that fits `width` columns: bar (when there is room), percent, bytes,
    current rate, elapsed time and ETA. Pure, for tests."""
    if done == 0:
        return "waiting for the first piece ..."[:width]
    figures = f"{human(done)}"
    if total:
        figures = f"{done / total:6.1%} {human(done)}/{human(total)}"
    eta = ""
    if total and rate_bps > 0:
        eta = f" ETA {clock((total - done) / rate_bps)}"
    text = f"{figures} {human(rate_bps)}/s {clock(elapsed_s)}{eta}"
    room = width - len(text) - 3
    if total and room >= 10:
        bar_width = min(30, room)
        filled = int(done / total * bar_width)
        text = f"[{'#' * filled:<{bar_width}}] {text}"
    return text[:width]


class Progress:
    """A one-line progress display on a terminal (silent otherwise): elapsed time, the rate
    over the last few seconds, the ETA, fitted to the terminal's width."""

    RATE_WINDOW_S = 3.0

    def __init__(self, total: int | None, stream: IO[str] = sys.stderr, *, enabled: bool = True) -> None:
        self.total = total
        self.stream = stream
        self.enabled = enabled and stream.isatty()
        self.done = 0
        self.started = time.monotonic()
        self._last = 0.0
        self._samples: collections.deque[tuple[float, int]] = collections.deque([(self.started, 0)])
        if self.enabled:
            self._draw(self.started)  # "waiting for the first piece", not a blank line

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._samples[-1][0] > 0.2:
            self._samples.append((now, self.done))
            while len(self._samples) > 2 and now - self._samples[0][0] > self.RATE_WINDOW_S:
                self._samples.popleft()
        if self.enabled and (now - self._last > 0.1 or self.done == self.total):
            self._last = now
            self._draw(now)

    def columns(self) -> int:
        """The width of the terminal the line is drawn on (stderr's, not stdout's)."""
        try:
            columns = os.get_terminal_size(self.stream.fileno()).columns
        except (OSError, ValueError, AttributeError):
            columns = 0
        return columns or shutil.get_terminal_size((80, 24)).columns

    def rate(self, now: float) -> float:
        first_at, first_done = self._samples[0]
        return (self.done - first_done) / max(1e-6, now - first_at)

    def _draw(self, now: float) -> None:
        width = self.columns() - 1
        line = progress_line(self.done, self.total, now - self.started, self.rate(now), width)
        self.stream.write(f"\r{line:<{width}}")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(time.monotonic())
            self.stream.write("\n")


def summary(received: int, elapsed_s: float, output: str, came: dict[str, int] | None) -> str:
    """The line `get` ends with: bytes, time, mean rate, where the peer got them."""
    line = f"{human(received)} in {elapsed_s:.1f} s ({human(received / max(elapsed_s, 1e-6))}/s) to {output}"
    if came is None:
        return line
    if not any(came.values()):
        return f"{line}: the peer held it already"
    parts = [
        f"{human(came.get(k, 0))} from {name}"
        for k, name in (("peer", "peers"), ("seed", "the seed"), ("origin", "the origin"))
    ]
    return f"{line}: {', '.join(parts)}"


def get(
    url: str, output: str, peer: str, *, user: str | None = None, timeout_s: float = 600.0, quiet: bool = False
) -> int:
    """Download `url` to `output` through the daemon at `peer`; returns the byte count.

    A URL that names no blob is a BadRequest; every later failure a GetError."""
    name, digest = parse_blob_url(url)
    parts = urlsplit(url)
    if not is_registry_host(parts.netloc):
        raise GetError(f"invalid registry {parts.netloc[:100]!r} in {url[:200]}: want HOST[:PORT]")
    headers = {SCHEME_HEADER: parts.scheme}
    if user:
        username, _, password = user.partition(":")
        headers["authorization"] = basic_auth(username, password)
    out = Path(output)
    # A device or pipe (-o /dev/null, -o -) is written to as it is: renaming a temporary
    # file over it would replace the device with a regular file.
    in_place = output == "-" or (out.exists() and not out.is_file())
    tmp = None if in_place else out.with_name(f".{out.name}.part")
    sha = hashlib.sha256()
    received = 0
    held = False
    peer_parts = urlsplit(peer)
    if peer_parts.scheme != "http" or not peer_parts.hostname or not is_registry_host(peer_parts.netloc):
        raise GetError(f"invalid --peer {peer!r}: want http://HOST:PORT")
    # http.client reads straight into our buffer; httpx's iterator measured 4x slower here.
    conn = http.client.HTTPConnection(peer_parts.hostname, peer_parts.port or 80, timeout=timeout_s)
    started = time.monotonic()
    try:
        path = f"/v2/{name}/blobs/{digest}?{urlencode({'ns': parts.netloc})}"
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        if response.status != 200:
            raise GetError(f"{response.status} from {peer}: {_reason(response.read())}")
        total = int(response.getheader("content-length") or 0) or None
        held = response.getheader("x-p2pdist-held") == "1"
        progress = Progress(total, sys.stderr, enabled=not quiet)
        local = tmp or out
        try:
            # Read too: the hashing thread maps what was written (p2pdist.cli.receive).
            mode = "w+b" if tmp is not None else "wb"
            sink = contextlib.nullcontext(sys.stdout.buffer) if output == "-" else open(local, mode)
        except OSError as exc:
            raise GetError(f"cannot write {local}: {exc.strerror or exc}") from None

        def count(n: int) -> None:
            nonlocal received
            received += n
            progress.update(n)

        with sink as f:
            if total is not None and conn.sock is not None and splice_works(f.fileno()):
                # What http.client read past the head is the body's start; the rest is
                # spliced from the socket into the file.
                first = response.fp.read(len(response.fp.peek(total)[:total])) if total else b""
                receive_to_file(conn.sock, first, total, f.fileno(), sha, count, str(local))
            else:
                receive_to_stream(response.readinto, f.write, sha, count, str(local))
        progress.close()
        if total is not None and received != total:
            raise GetError(
                _why_cut(peer_parts.hostname, peer_parts.port or 80, digest, timeout_s)
                or f"transfer from {peer} ended after {received} of {total} bytes"
            )
    except (OSError, http.client.HTTPException) as exc:
        _discard(tmp)
        what = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}"
        cut = received and _why_cut(peer_parts.hostname, peer_parts.port or 80, digest, timeout_s)
        raise GetError(cut or f"transfer from {peer} failed: {what}") from None
    except GetError:
        _discard(tmp)
        raise
    finally:
        conn.close()
    actual = "sha256:" + sha.hexdigest()
    if actual != digest:
        _discard(tmp)
        raise GetError(f"digest mismatch: got {actual}, want {digest}")
    if tmp is not None:
        try:
            os.replace(tmp, out)
        except OSError as exc:
            _discard(tmp)
            raise GetError(f"cannot write {out}: {exc.strerror or exc}") from None
    if not quiet:
        came = (
            {"peer": 0, "seed": 0, "origin": 0}  # served from its cache: nothing fetched for us
            if held
            else _sources(peer_parts.hostname, peer_parts.port or 80, digest, timeout_s)
        )
        print(summary(received, time.monotonic() - started, output, came), file=sys.stderr)
    return received


def _sources(host: str, port: int, digest: str, timeout_s: float) -> dict[str, int] | None:
    """Bytes by where the peer got them (peer, seed, origin), if it says."""
    status = _download_status(host, port, digest, timeout_s)
    came = status.get("from") if status else None
    if isinstance(came, dict) and all(isinstance(v, int) for v in came.values()):
        return came
    return None


def _download_status(host: str, port: int, digest: str, timeout_s: float) -> dict[str, object] | None:
    """The peer's /v1/downloads/<digest> answer, or None."""
    conn = http.client.HTTPConnection(host, port, timeout=min(timeout_s, 10.0))
    try:
        conn.request("GET", f"/v1/downloads/{digest}")
        response = conn.getresponse()
        status = json.loads(response.read()) if response.status == 200 else {}
    except (OSError, http.client.HTTPException, ValueError):
        return None
    finally:
        conn.close()
    return status if isinstance(status, dict) else None


def _why_cut(host: str, port: int, digest: str, timeout_s: float) -> str | None:
    """The peer's reason a download it had started streaming failed, if it knows one."""
    status = _download_status(host, port, digest, timeout_s)
    if not status or status.get("state") != "failed":
        return None
    return f"the peer could not deliver {digest[:19]}: {status.get('reason') or 'no reason given'}"


def _discard(tmp: Path | None) -> None:
    if tmp is not None:
        # Not there, or its directory is not one: nothing to remove, and the error said why.
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def _reason(body: bytes) -> str:
    try:
        errors = json.loads(body).get("errors") or []
        if errors:
            return f"{errors[0].get('code', '')}: {errors[0].get('message', '')}"
    except (ValueError, AttributeError):
        pass
    text = body.decode("utf-8", "replace").strip()
    return text.splitlines()[0][:200] if text else "no reason given"
