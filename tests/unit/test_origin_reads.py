"""Blobs streamed with httpx (a seed's origin fetch, the mirror's relays) are read in large
reads: httpcore's 64 KiB default cost 2.5-3.4 CPU-s per GiB here against 0.7-0.8 (issue 18)."""

from __future__ import annotations

import hashlib
import os
from functools import partial

import httpx
import trio

from p2pdist.registry import client as origin_client

BODY = os.urandom(8 << 20)


async def _serve_once(stream: trio.SocketStream) -> None:
    request = b""
    while b"\r\n\r\n" not in request:
        request += await stream.receive_some(65536)
    await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(BODY) + BODY)
    await stream.aclose()


async def test_a_streamed_body_arrives_in_reads_larger_than_httpcores_default() -> None:
    assert origin_client.READ_BYTES >= 1 << 20
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            (listener,) = await nursery.start(partial(trio.serve_tcp, _serve_once, 0, host="127.0.0.1"))
            port = listener.socket.getsockname()[1]
            sizes = []
            digest = hashlib.sha256()
            async with httpx.AsyncClient() as client, client.stream("GET", f"http://127.0.0.1:{port}/") as response:
                async for chunk in response.aiter_raw():
                    sizes.append(len(chunk))
                    digest.update(chunk)
            nursery.cancel_scope.cancel()
    assert digest.digest() == hashlib.sha256(BODY).digest()
    # With 64 KiB reads no chunk could be larger; 8 MiB blasted into loopback fills the buffer.
    assert max(sizes) > 64 * 1024, max(sizes)
