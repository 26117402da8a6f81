"""Registry clients given a redirect they cannot follow: an OriginError, never a crash."""

from __future__ import annotations

import pytest
import trio

from p2pdist.errors import OriginError
from p2pdist.registry.client import OriginClient
from peer.upstream import UpstreamClient


async def serve_redirect(nursery: trio.Nursery, location: str) -> str:
    """A loopback server that answers every request with a 302 to `location`."""

    async def handle(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(
            f"HTTP/1.1 302 Found\r\nlocation: {location}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".encode()
        )
        await stream.aclose()

    listeners = await nursery.start(trio.serve_tcp, handle, 0)
    return f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"


# "..": the resolver's IDNA step raised UnicodeError from inside httpx; "[::1": httpx.InvalidURL.
@pytest.mark.parametrize("location", ["http://../v2/x", "http://a..b/v2/x", "http://[::1/v2/x"])
async def test_a_redirect_to_an_undiallable_host_is_an_origin_error(nursery: trio.Nursery, location: str) -> None:
    base = await serve_redirect(nursery, location)
    url = f"{base}/v2/a/blobs/sha256:{'0' * 64}"
    upstream = UpstreamClient(timeout_s=5)
    origin = OriginClient(timeout_s=5)
    try:
        with trio.fail_after(10):
            with pytest.raises(OriginError):
                await upstream.send("GET", url, {})
            with pytest.raises(OriginError):
                async with origin.open_blob(url, {}):
                    pass
    finally:
        await upstream.aclose()
        await origin.aclose()
