"""Reads and writes straight on a plain TCP socket, for the HTTP server and the piece client.

trio's send_all and receive_some (a conflict detector, a checkpoint before and after) cost
several times the syscall on every small request and answer; these try the syscall first.
"""

from __future__ import annotations

import os

import trio


def write_now(sock: trio.socket.SocketType, data: bytes) -> bytes:
    """Write what the socket takes now; what is left to send (b"" when all of it went).
    OSError other than a full buffer propagates."""
    try:
        sent = os.write(sock.fileno(), data)
    except BlockingIOError:
        return data
    return data[sent:] if sent < len(data) else b""


async def receive_now(sock: trio.socket.SocketType, max_bytes: int, *, ready: bool = True) -> bytes:
    """Up to `max_bytes` from the socket (b"" once the peer closed its side), waiting until it
    is readable. `ready`: bytes may be there already, so a read is tried first; if they were,
    a checkpoint still lets other tasks run. OSError propagates."""
    fd = sock.fileno()
    if ready:
        try:
            data = os.read(fd, max_bytes)
        except BlockingIOError:
            pass
        else:
            await trio.lowlevel.checkpoint()
            return data
    while True:
        await trio.lowlevel.wait_readable(sock)
        try:
            return os.read(fd, max_bytes)
        except BlockingIOError:
            continue
