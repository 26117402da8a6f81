"""A registry that could not be reached is dialled with a short connect timeout for a while
(peer/upstream.py): the requests of one pull with the WAN link down do not each wait out the
full connect timeout, and a registry that answers again is used at once."""

from __future__ import annotations

import socket

import pytest
import trio

from p2pdist.errors import OriginError
from peer.upstream import UpstreamClient


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens once it is closed


async def _answer_200(stream: trio.SocketStream) -> None:
    await stream.receive_some(65536)
    await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
    await stream.aclose()


async def test_after_a_failure_the_registry_is_dialled_with_a_short_connect_timeout_until_it_answers(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(10):
        client = UpstreamClient(connect_timeout_s=2.0, down_s=5.0, probe_connect_s=0.3)
        port = closed_port()
        url = f"http://127.0.0.1:{port}/v2/"
        try:
            with pytest.raises(OriginError) as first:
                await client.send("GET", url, {})
            assert first.value.upstream_status is None and "refused" in str(first.value)
            host = f"127.0.0.1:{port}"
            assert host in client._down_until  # dialled with the short connect timeout from now on
            until = client._down_until[host]
            with pytest.raises(OriginError):
                await client.send("GET", url, {})
            # A short dial's failure does not extend the window: a link slower to connect than
            # the short timeout gets the full one again when the window ends.
            assert client._down_until[host] == until
            # The registry answers again (here: something listens on the port now): used at once,
            # and the window ends.
            listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
            nursery.start_soon(trio.serve_listeners, _answer_200, listeners)
            response = await client.send("GET", url, {})
            assert response.status_code == 200
            await response.aclose()
            assert host not in client._down_until
        finally:
            await client.aclose()
