"""A fake untrusted peer for the fault tests: it announces every piece of a task to the
scheduler with made-up digests and answers piece requests with 404s or wrong bytes."""

from __future__ import annotations

import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

from p2pdist import wire
from p2pdist.content.pieces import Bitmap, PieceLayout, piece_size_sent


class FakePeer:
    """An untrusted peer the test controls: it tells the scheduler it holds every piece of a
    task (with made-up piece digests) and answers piece requests with 404s or wrong bytes.

    It is a plain threaded HTTP server: the point is a parent that lies, not a p2pdist daemon.
    """

    def __init__(self, scheduler_url: str, task_id: str, content_length: int, *, mode: str, host_id: str) -> None:
        assert mode in ("absent", "garbage")
        self.scheduler_url = scheduler_url
        self.task_id = task_id
        self.layout = PieceLayout.for_blob(content_length)
        self.mode = mode
        self.host_id = host_id
        self.requests = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                fake.requests += 1
                number = int(self.path.rsplit("/", 1)[-1]) if self.path.rsplit("/", 1)[-1].isdigit() else -1
                if fake.mode == "absent" or not 0 <= number < fake.layout.count:
                    self.send_response(404)
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                length = fake.layout.length(number)
                self.send_response(200)
                self.send_header("content-length", str(length))
                self.end_headers()
                self.wfile.write(os.urandom(length))

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self.server.serve_forever, daemon=True),
            threading.Thread(target=self._announce_loop, daemon=True),
        ]
        self.announce()
        for thread in self._threads:
            thread.start()

    def announce(self) -> None:
        everything = Bitmap(self.layout.count)
        for number in range(self.layout.count):
            everything.add(number)
        message = wire.AnnounceHost(
            host_id=self.host_id,
            url=self.url,
            kind="peer",
            upload_slots=16,
            tasks=[
                wire.TaskHolding(
                    task_id=self.task_id,
                    content_length=self.layout.blob_size,
                    pieces=everything.to_bytes(),
                    piece_digests=[os.urandom(32) for _ in range(self.layout.count)],
                    # Cut as the scheduler cuts the task (its default rule): a liar in its layout.
                    piece_size=piece_size_sent(self.layout.blob_size, self.layout.piece_size),
                )
            ],
        )
        response = httpx.post(
            f"{self.scheduler_url}/v1/hosts",
            content=wire.encode(message),
            headers={"content-type": wire.CONTENT_TYPE},
            timeout=5,
        )
        response.raise_for_status()

    def _announce_loop(self) -> None:
        while not self._stop.wait(2.0):
            try:
                self.announce()
            except httpx.HTTPError:
                pass

    def stop(self) -> None:
        self._stop.set()
        self.server.shutdown()
        self.server.server_close()
