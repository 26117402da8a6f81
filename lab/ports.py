"""Loopback port allocation for lab processes.

Ports come from below the kernel's ephemeral range, so the source port of some outgoing
connection cannot take a port between our check and the service's bind (with dozens of
processes connecting to each other, that race was real). The choice is random so that
concurrent test runs rarely pick the same port; the remaining race is accepted.
"""

import random
import socket

# Linux hands out ephemeral ports from 32768 up by default (net.ipv4.ip_local_port_range).
LAB_PORTS = range(12000, 32000)
_rng = random.Random()
# Ports handed out by this process: a port is free until its service binds it, so without
# this two services started together could be given the same one (a 3% chance per
# 16-peer rollout, seen).
_given: set[int] = set()


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is currently free and outside the ephemeral range."""
    top = min(LAB_PORTS.stop, _ephemeral_low())
    for _ in range(200):
        port = _rng.randrange(LAB_PORTS.start, top)
        if port in _given:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            _given.add(port)
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        found: int = sock.getsockname()[1]
        return found
