"""A real HTTP server that takes webhook requests, for the tests: it checks
each request's signature, answers with the statuses it is told to (500 for
the first requests, say), can hold requests unanswered, and keeps every
event of the requests it answered 2xx.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

#: Seconds a signature's timestamp may be off the receiver's clock.
TOLERANCE = 300


def verify(secret: str, header: str, body: bytes, now: float | None = None) -> bool:
    """Whether ``header`` (``t=...,v1=...``) signs ``body`` with ``secret``,
    recently: what a receiver should check before it trusts a request."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        unix = int(fields["t"])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - unix) > TOLERANCE:
        return False
    expected = hmac.new(secret.encode(), f"{unix}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, fields.get("v1", ""))


class Receiver:
    """Listens on a free loopback port until closed."""

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.lock = threading.Condition()
        #: Every request: (status answered, signature valid, body).
        self.requests: list[tuple[int, bool, bytes]] = []
        #: Events of the requests answered 2xx, in the order answered.
        self.events: list[dict[str, Any]] = []
        #: Statuses for the next requests; then 200.
        self.statuses: list[int] = []
        #: While set, requests wait (unanswered) until it is cleared.
        self.holding = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                while receiver.holding.is_set():
                    time.sleep(0.01)
                valid = verify(receiver.secret, self.headers.get("Signaling-Signature", ""), body)
                with receiver.lock:
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                    if not valid:
                        status = 401
                    receiver.requests.append((status, valid, body))
                    if status < 300:
                        receiver.events.extend(json.loads(body)["events"])
                    receiver.lock.notify_all()
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hooks"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def wait(
        self, condition: Callable[[list[dict[str, Any]]], bool], timeout: float = 20.0
    ) -> list[dict[str, Any]]:
        """The events received, once ``condition`` holds for them."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while not condition(self.events):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"webhook events still not as expected: {self.events}")
                self.lock.wait(left)
            return list(self.events)

    def close(self) -> None:
        self.holding.clear()
        self.server.shutdown()
        self.server.server_close()
