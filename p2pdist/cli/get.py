"""`p2pdist get`: download one blob URL through the local peer daemon, like Dragonfly's dfget.

Writes to a temporary file beside the output, checks the sha256 digest named in the URL,
then renames; on any failure exits non-zero with one line on stderr and leaves no output.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import sys
import time
from pathlib import Path
from typing import IO
from urllib.parse import urlencode, urlsplit

from p2pdist.errors import GetError
from p2pdist.registry.oci import SCHEME_HEADER, basic_auth, is_registry_host, parse_blob_url


class Progress:
    """A one-line progress bar on a terminal; silent otherwise."""

    def __init__(self, total: int | None, stream: IO[str] = sys.stderr, *, enabled: bool = True) -> None:
        self.total = total
        self.stream = stream
        self.enabled = enabled and stream.isatty()
        self.done = 0
        self.started = time.monotonic()
        self._last = 0.0

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self._last > 0.1 or self.done == self.total):
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        rate = self.done / max(1e-6, now - self.started)
        if self.total:
            frac = self.done / self.total
            bar = "#" * int(frac * 30)
            line = f"\r[{bar:<30}] {frac:6.1%} {self.done / 2**20:8.1f}/{self.total / 2**20:.1f} MiB {rate / 2**20:7.1f} MiB/s"
        else:
            line = f"\r{self.done / 2**20:8.1f} MiB {rate / 2**20:7.1f} MiB/s"
        self.stream.write(line)
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(time.monotonic())
            self.stream.write("\n")


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
    peer_parts = urlsplit(peer)
    if peer_parts.scheme != "http" or not peer_parts.hostname or not is_registry_host(peer_parts.netloc):
        raise GetError(f"invalid --peer {peer!r}: want http://HOST:PORT")
    # http.client reads straight into our buffer; httpx's iterator measured 4x slower here.
    conn = http.client.HTTPConnection(peer_parts.hostname, peer_parts.port or 80, timeout=timeout_s)
    try:
        path = f"/v2/{name}/blobs/{digest}?{urlencode({'ns': parts.netloc})}"
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        if response.status != 200:
            raise GetError(f"{response.status} from {peer}: {_reason(response.read())}")
        total = int(response.getheader("content-length") or 0) or None
        progress = Progress(total, sys.stderr, enabled=not quiet)
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        sink = contextlib.nullcontext(sys.stdout.buffer) if output == "-" else open(tmp or out, "wb")
        with sink as f:
            while True:
                n = response.readinto(buf)
                if not n:
                    break
                f.write(view[:n])
                sha.update(view[:n])
                received += n
                progress.update(n)
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
        os.replace(tmp, out)
    return received


def _why_cut(host: str, port: int, digest: str, timeout_s: float) -> str | None:
    """The peer's reason a download it had started streaming failed, if it knows one."""
    conn = http.client.HTTPConnection(host, port, timeout=min(timeout_s, 10.0))
    try:
        conn.request("GET", f"/v1/downloads/{digest}")
        response = conn.getresponse()
        status = json.loads(response.read()) if response.status == 200 else {}
    except (OSError, http.client.HTTPException, ValueError):
        return None
    finally:
        conn.close()
    if not isinstance(status, dict) or status.get("state") != "failed":
        return None
    return f"the peer could not deliver {digest[:19]}: {status.get('reason') or 'no reason given'}"


def _discard(tmp: Path | None) -> None:
    if tmp is not None:
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
