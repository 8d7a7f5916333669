"""A webhook receiver on loopback for tests: records every POST, answers scripted statuses."""

from __future__ import annotations

import contextlib
import http.server
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass
class Receiver:
    """Records every POST; answers the statuses in `script` first, then 204."""

    url: str = ""
    calls: list[dict] = field(default_factory=list)
    script: list[int] = field(default_factory=list)

    def wait_for(self, n: int, timeout: float = 30.0) -> list[dict]:
        """The calls once there are at least `n` (polling; AssertionError after `timeout`)."""
        deadline = time.monotonic() + timeout
        while len(self.calls) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(self.calls) >= n, self.calls
        return self.calls


@contextlib.contextmanager
def running_receiver() -> Iterator[Receiver]:
    rec = Receiver()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers["Content-Length"]))
            status = rec.script.pop(0) if rec.script else 204
            rec.calls.append({"headers": dict(self.headers), "body": body, "status": status})
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    rec.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    try:
        yield rec
    finally:
        server.shutdown()
