#!/usr/bin/env python3
"""A webhook receiver for benchmarks: answers every POST 204 at once and
counts the requests and events it took, printed when it stops (SIGINT or
SIGTERM). It checks nothing: the tests check signatures.

Usage: bench/webhook_sink.py PORT

Relay CPU with webhooks on, next to the Go design (run from the root):

    taskset -c 1 bench/webhook_sink.py 9999 &
    OURS_CMD=".venv/bin/signaling-sharded --workers 1 \\
        --webhook-url http://127.0.0.1:9999/ --webhook-secret bench-secret-of-16+" \\
        PYTHONPATH=. bench/run.py --only relay,connect --no-syscalls
"""

from __future__ import annotations

import json
import signal
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer
from types import FrameType


class Sink(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    requests = 0
    events = 0

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        Sink.requests += 1
        Sink.events += len(json.loads(body)["events"])
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> None:
    server = HTTPServer(("127.0.0.1", int(sys.argv[1])), Sink)

    def stop(signum: int, frame: FrameType | None) -> None:
        print(json.dumps({"requests": Sink.requests, "events": Sink.events}), flush=True)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.serve_forever()


if __name__ == "__main__":
    main()
