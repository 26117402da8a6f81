"""benchmarks.replay's generator loop: every request sent at or after its time, one at a time
per host, each answer read whole, against a server on a real socket in a thread."""

from __future__ import annotations

import select
import socket
import threading

from benchmarks.replay import Sent, _answer, _drive, _request_bytes
from benchmarks.trace import TraceRecord


def test_an_answer_is_taken_only_once_all_of_its_body_is_there() -> None:
    buffered = bytearray(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nab")
    assert _answer(buffered) is None
    buffered += b"cdeHTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n"
    assert _answer(buffered) == 200
    assert _answer(buffered) == 503
    assert buffered == b""


def _serve(listener: socket.socket, connections: int, stop: threading.Event) -> None:
    """Answer every request head with 200 and a 2-byte body (the bodies the test sends are
    read with their heads: each is sent in one write and is small)."""
    conns = [listener.accept()[0] for _ in range(connections)]
    while not stop.is_set():
        readable, _, _ = select.select(conns, [], [], 0.05)
        for conn in readable:
            data = conn.recv(65536)
            for _ in range(data.count(b"POST ")):
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
    for conn in conns:
        conn.close()


def test_every_request_is_sent_in_its_hosts_order_after_its_time_and_answered() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    address = listener.getsockname()[:2]
    hosts = [f"host-{i}" for i in range(3)]
    stop = threading.Event()
    server = threading.Thread(target=_serve, args=(listener, len(hosts), stop))
    server.start()
    sockets = {h: socket.create_connection(address) for h in hosts}
    per_host = {
        h: [Sent(TraceRecord(t, h, "sync", "/v1/tasks/sync", b"x" * 10), scheduled_s=t) for t in (0.0, 0.0, 0.02, 0.05)]
        for h in hosts
    }
    requests = {
        h: [_request_bytes("127.0.0.1", "", s.record.path, s.record.body) for s in sents]
        for h, sents in per_host.items()
    }
    try:
        wall = _drive(sockets, per_host, requests, address)
    finally:
        stop.set()
        server.join()
        for sock in sockets.values():
            sock.close()
        listener.close()
    assert wall >= 0.05
    for sents in per_host.values():
        assert [s.status for s in sents] == [200] * 4
        assert not any(s.error for s in sents)
        for before, after in zip(sents, sents[1:], strict=False):
            assert after.sent_s >= before.answered_s  # the next only once the previous is answered
        assert all(s.sent_s >= s.scheduled_s and s.answered_s >= s.sent_s for s in sents)
