"""The HTTP side of a connection, up to the WebSocket upgrade.

A :class:`Handshake` is the asyncio protocol of every accepted socket until
its request is answered. Plain HTTP requests (``/healthz``, ``/readyz``,
errors) get a response and the socket is closed. Requests are answered by
the ``websockets`` library's sans-I/O ``ServerProtocol``, except the common,
well-formed upgrade to a valid topic, which the Rust core recognises and
accepts in a few microseconds (``upgrade_request``; it only ever accepts
what ``ServerProtocol`` would). On upgrade the transport is handed to the
Rust core (``Hub.join``), whose ``Peer`` becomes the transport's protocol:
from there on no Python code runs per message.
"""

from __future__ import annotations

import asyncio
import functools
import http
import logging
import time
from importlib import resources
from typing import TYPE_CHECKING, cast

from websockets.datastructures import Headers
from websockets.http11 import Request, Response
from websockets.server import ServerProtocol

from signaling_sharded import auth, routing
from signaling_sharded._native import Peer, upgrade_request
from signaling_sharded.logs import log

if TYPE_CHECKING:
    from signaling_sharded.worker import Worker

#: Largest request head (request line and headers) accepted, in bytes.
MAX_HEAD_BYTES = 16 * 1024
#: The transport's high-water mark after the upgrade: past it, the Rust core
#: queues a peer's bytes itself, bounded by --max-queue-bytes.
WRITE_HIGH_WATER = 64 * 1024
#: Response header naming the worker that served the request, so that
#: operators and tests can see where a topic lives.
WORKER_HEADER = "X-Signaling-Worker"
#: Seconds a refused client is told to wait before retrying.
RETRY_AFTER = "1"
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@functools.cache
def static_file(name: str) -> bytes:
    """A file of the browser demo, read once from the package."""
    return (resources.files("signaling_sharded") / "static" / name).read_bytes()


class Handshake(asyncio.Protocol):
    """Reads one HTTP request and answers it or upgrades the connection."""

    def __init__(
        self, worker: Worker, *, deadline: float | None = None, unavailable: bool = False
    ) -> None:
        self.worker = worker
        #: time.monotonic() by which the upgrade must be done; by default
        #: the handshake timeout from now.
        self.deadline = deadline
        #: Refuse upgrades with 503: the topic's owner could not take them.
        self.unavailable = unavailable
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses.
        self.transport = cast(asyncio.Transport, transport)
        self.worker.handshakes.add(self)
        loop = asyncio.get_running_loop()
        if self.deadline is None:
            self.timer = loop.call_later(self.worker.config.handshake_timeout, self.time_out)
        else:
            self.timer = loop.call_at(loop.time() + self.deadline - time.monotonic(), self.time_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self.finish()

    def finish(self) -> None:
        """Stop tracking this handshake (answered, upgraded or gone)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.worker.handshakes.discard(self)

    def time_out(self) -> None:
        self.timer = None
        log(logging.DEBUG, "handshake timed out")
        self.worker.count_handshake_failure("timeout")
        self.close()

    def close(self) -> None:
        self.finish()
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.timer is None:
            return  # answered already; the socket is closing
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        head_length = len(self.buffer) if end < 0 else end + 4
        if head_length > MAX_HEAD_BYTES:
            self.refuse_raw(431, "request header fields too large")
            return
        if end < 0:
            return  # wait for the rest of the head
        head = bytes(self.buffer[: end + 4])
        rest = bytes(self.buffer[end + 4 :])
        self.buffer = bytearray()
        self.handle(head, rest)

    def handle(self, head: bytes, rest: bytes) -> None:
        worker = self.worker
        if not (worker.draining or self.unavailable):
            fast = upgrade_request(head, worker.allowed_origins)
            if fast is not None:
                path, accept, authorization = fast
                join = routing.route(path)
                if isinstance(join, routing.Join):
                    self.upgrade(worker.switching_protocols(accept), join, authorization, rest)
                    return
        protocol = ServerProtocol(
            origins=worker.origins,
            max_size=worker.config.max_message_size,
            logger=_quiet,
        )
        protocol.receive_data(head)
        events = protocol.events_received()
        if not events or not isinstance(events[0], Request):
            # websockets wrote 414/431 itself, or nothing for a malformed request.
            data = b"".join(protocol.data_to_send())
            if data:
                self.write_and_close(data)
            else:
                self.refuse_raw(400, "malformed HTTP request")
            return
        request = events[0]
        target = routing.route(request.path)
        if isinstance(target, routing.Endpoint):
            self.answer_endpoint(protocol, request, target)
            return
        if isinstance(target, routing.Refusal):
            self.respond(protocol, request, target.status, target.reason)
            return
        if worker.draining:
            self.respond(protocol, request, 503, "server is draining", retry_after=True)
            return
        if self.unavailable:
            self.respond(protocol, request, 503, "topic owner unavailable", retry_after=True)
            return
        response = protocol.accept(request)
        if response.status_code != 101:
            worker.count_handshake_failure(str(response.status_code))
            self.send(protocol, response)
            return
        response.headers[WORKER_HEADER] = str(worker.index)
        protocol.send_response(response)
        # A repeated header is no credential (and .get() would raise on it).
        values = request.headers.get_all("Authorization")
        authorization = values[0] if len(values) == 1 else None
        self.upgrade(b"".join(protocol.data_to_send()), target, authorization, rest)

    def answer_endpoint(
        self, protocol: ServerProtocol, request: Request, endpoint: routing.Endpoint
    ) -> None:
        if request.method not in ("GET", "HEAD"):
            self.respond(protocol, request, 405, "method not allowed", allow="GET, HEAD")
        elif endpoint.path == "/readyz" and self.worker.draining:
            self.respond(protocol, request, 503, "draining", retry_after=True)
        elif endpoint.path == "/metrics":
            body = self.worker.metrics_text().encode()
            self.respond_body(protocol, request, body, METRICS_CONTENT_TYPE)
        elif endpoint.path in routing.STATIC_FILES:
            name, content_type = routing.STATIC_FILES[endpoint.path]
            self.respond_body(protocol, request, static_file(name), content_type)
        else:
            self.respond(protocol, request, 200, "ok")

    def respond_body(
        self, protocol: ServerProtocol, request: Request, body: bytes, content_type: str
    ) -> None:
        """Answer 200 with ``body`` (only its length for HEAD)."""
        headers = Headers(
            [
                ("Content-Type", content_type),
                ("Content-Length", str(len(body))),
                ("Cache-Control", "no-cache"),
                ("Connection", "close"),
            ]
        )
        if request.method == "HEAD":
            body = b""
        self.send(protocol, Response(200, "OK", headers, body))

    def respond(
        self,
        protocol: ServerProtocol,
        request: Request,
        status: int,
        text: str,
        *,
        retry_after: bool = False,
        allow: str | None = None,
    ) -> None:
        response = protocol.reject(status, text + "\n")
        if retry_after:
            response.headers["Retry-After"] = RETRY_AFTER
        if allow is not None:
            response.headers["Allow"] = allow
        if request.method == "HEAD":
            response.body = b""
        if status >= 400:
            self.worker.count_handshake_failure(str(status))
        self.send(protocol, response)

    def send(self, protocol: ServerProtocol, response: Response) -> None:
        response.headers[WORKER_HEADER] = str(self.worker.index)
        protocol.send_response(response)
        self.write_and_close(b"".join(protocol.data_to_send()))

    def refuse_raw(self, status: int, text: str) -> None:
        """Answer a request that could not be parsed."""
        body = (text + "\n").encode()
        headers = Headers(
            [
                ("Connection", "close"),
                ("Content-Length", str(len(body))),
                ("Content-Type", "text/plain; charset=utf-8"),
            ]
        )
        phrase = http.HTTPStatus(status).phrase
        self.worker.count_handshake_failure(str(status))
        self.write_and_close(Response(status, phrase, headers, body).serialize())

    def write_and_close(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)
        self.close()

    def upgrade(
        self, response: bytes, join: routing.Join, authorization: str | None, rest: bytes
    ) -> None:
        """Send the 101 ``response`` and hand the connection to the hub,
        which admits it as a peer or refuses it (a bad token, a limit) with
        an ``error`` and a close code a browser can read."""
        transport = self.transport
        assert transport is not None
        worker = self.worker
        self.finish()
        transport.write(response)
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        metadata = join.metadata
        if worker.config.auth_secret is not None:
            token = join.token or auth.bearer(authorization)
            grant = auth.authorize(worker.config.auth_secret, token, join.topic)
            if grant is None:
                self.install(transport, worker.hub.refuse(transport, "unauthorized"), join, rest)
                return
            if grant.metadata is not None:
                metadata = grant.metadata
        self.install(transport, worker.hub.join(transport, join.topic, metadata), join, rest)

    def install(
        self, transport: asyncio.Transport, peer: Peer, join: routing.Join, rest: bytes
    ) -> None:
        # Peer implements the protocol methods in Rust; it is not a subclass.
        transport.set_protocol(cast(asyncio.BaseProtocol, peer))
        if peer.refused is not None:
            self.worker.count_handshake_failure(peer.refused)
            log(logging.INFO, "peer refused", topic=join.topic, reason=peer.refused)
            return
        log(logging.INFO, "peer joined", peer=peer.peer_id, topic=join.topic)
        if rest:
            peer.data_received(rest)


_quiet = logging.getLogger("signaling_sharded.websockets")
_quiet.setLevel(logging.WARNING)
