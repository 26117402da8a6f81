"""Loopback port allocation for lab processes.

The port is free when returned; a process started right after binds it. The small race with
other programs on the machine is accepted: everything here runs on 127.0.0.1.
"""

import socket


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is currently free."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
