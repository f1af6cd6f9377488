"""The HTTP side of a connection, up to the WebSocket upgrade.

A :class:`Handshake` is the asyncio protocol of every accepted socket until
its request is answered. The Rust core reads the request
(``RequestReader.read``) and judges it: an HTTP refusal, a plain path
(``/healthz``, ``/metrics``, the demo's files) answered here and closed, or
a WebSocket upgrade with its ``Sec-WebSocket-Accept``. On upgrade the
transport is handed to the Rust core (``Hub.join``), whose ``Peer``
becomes the transport's protocol: from there on no Python code runs per
message.
"""

from __future__ import annotations

import asyncio
import functools
import http
import logging
import time
from collections.abc import Awaitable, Iterable
from importlib import resources
from typing import Protocol, cast

from signaling_sharded._native import Hub, Peer, Request, RequestReader
from signaling_sharded.server import admin, auth, routing
from signaling_sharded.server.config import Config
from signaling_sharded.server.logs import log

#: The transport's high-water mark after the upgrade: past it, the Rust core
#: queues a peer's bytes itself, bounded by --max-queue-bytes.
WRITE_HIGH_WATER = 64 * 1024
#: Response header naming the worker that served the request, so that
#: operators and tests can see where a topic lives. Every response has it.
WORKER_HEADER = "X-Signaling-Worker"
#: Seconds a refused client is told to wait before retrying.
RETRY_AFTER = admin.RETRY_AFTER
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TEXT_CONTENT_TYPE = "text/plain; charset=utf-8"
#: Seconds an answered connection is read (and its input dropped) before it
#: is closed; see :meth:`Handshake.linger`.
LINGER = 2.0


@functools.cache
def static_file(name: str) -> bytes:
    """A file of the browser demo, read once from the package."""
    return (resources.files("signaling_sharded") / "static" / name).read_bytes()


class Site(Protocol):
    """What serving a connection needs of the worker it is served in (the
    worker is one): the handshake and the acceptor depend on this, not on
    the worker, so imports point one way."""

    index: int
    config: Config
    hub: Hub
    reader: RequestReader
    draining: bool
    handshakes: set[Handshake]

    def count_handshake_failure(self, reason: str) -> None:
        """Count a connection that did not become a peer (see ``Hub``)."""

    def origin_refused(self, origin: str) -> None:
        """Log a browser Origin off the allow-list (rate-limited)."""

    def metrics_text(self) -> str:
        """Every worker's metrics, as Prometheus text."""
        raise NotImplementedError

    async def all_topics(self, authorization: str) -> list[tuple[str, int]] | None:
        """Every worker's topics and peer counts (admin API); None if a
        worker did not answer."""
        raise NotImplementedError

    async def cluster_admin(self, request: Request, body: bytes) -> admin.Answer:
        """The cluster's answer to an admin request (cluster mode)."""
        raise NotImplementedError


def switching_protocols(worker: int, accept: str) -> bytes:
    """The 101 response accepting an upgrade whose key gives ``accept``."""
    return (
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n"
        f"{WORKER_HEADER}: {worker}\r\n\r\n"
    ).encode()


def http_response(
    worker: int,
    status: int,
    body: str | bytes,
    headers: Iterable[tuple[str, str]] = (),
    content_type: str = TEXT_CONTENT_TYPE,
    head_only: bool = False,
) -> bytes:
    """An HTTP/1.1 response that ends the connection, naming ``worker``; a
    text body ends with a newline; ``head_only`` leaves the body out (HEAD)."""
    if isinstance(body, str):
        body = (body + "\n").encode()
    lines = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}", f"{WORKER_HEADER}: {worker}"]
    if status != 204:  # a 204 has no body, nor its headers (RFC 9110)
        lines += [f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
    lines += ["Connection: close", *(f"{name}: {value}" for name, value in headers)]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode()
    return head if head_only else head + body


class Handshake(asyncio.Protocol):
    """Reads one HTTP request and answers it or upgrades the connection.

    ``received`` is what was already read from the socket (by the worker
    that accepted it), and ``request`` that worker's reading of it when it
    is this one; the handshake reads ``received`` itself otherwise.
    """

    def __init__(
        self,
        worker: Site,
        *,
        deadline: float | None = None,
        unavailable: bool = False,
        received: bytes = b"",
        request: Request | None = None,
    ) -> None:
        self.worker = worker
        #: time.monotonic() by which the upgrade must be done; by default
        #: the handshake timeout from now.
        self.deadline = deadline
        #: Refuse upgrades with 503: the topic's owner could not take them.
        self.unavailable = unavailable
        self.transport: asyncio.Transport | None = None
        #: time.monotonic() when the connection was accepted: the join
        #: latency counts from there.
        self.accepted = (
            time.monotonic() if deadline is None else deadline - worker.config.handshake_timeout
        )
        self.buffer = bytearray(received)
        self.request = request
        self.timer: asyncio.TimerHandle | None = None
        #: Answered with an HTTP response; lingering until the client closes.
        self.answered = False
        #: An admin request waiting for its body: the request and the
        #: body's length.
        self.awaiting_body: tuple[Request, int] | None = None
        #: The admin topic listing being gathered from the other workers.
        self.listing: asyncio.Future[None] | None = None
        #: The local port it came to: the signaling port or the admin
        #: port; None for a socket pair between workers.
        self.local_port: int | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses.
        self.transport = cast(asyncio.Transport, transport)
        if self.worker.config.admin_port is not None:  # (a system call)
            sockname = transport.get_extra_info("sockname")
            self.local_port = sockname[1] if isinstance(sockname, tuple) else None
        self.worker.handshakes.add(self)
        if self.request is not None:
            # Read by the worker that accepted it: most often upgraded (or
            # answered) right here, with no timer to set.
            received = bytes(self.buffer)
            self.buffer.clear()
            self.handle(self.request, received[self.request.head_length :])
            if self not in self.worker.handshakes or self.answered:
                return  # upgraded (`finish`) or answered
        loop = asyncio.get_running_loop()
        if self.deadline is None:
            self.timer = loop.call_later(self.worker.config.handshake_timeout, self.time_out)
        else:
            self.timer = loop.call_at(loop.time() + self.deadline - time.monotonic(), self.time_out)
        if self.buffer:
            self.data_received(b"")

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
        if self.timer is None or self.answered:
            return  # answered already: what follows is read and dropped
        if self.awaiting_body is not None:
            self.buffer += data
            waiting, length = self.awaiting_body
            if len(self.buffer) >= length:
                self.awaiting_body = None
                self.answer_admin(waiting, bytes(self.buffer[:length]))
            return
        if self.buffer:
            self.buffer += data
            data = bytes(self.buffer)
        request = self.worker.reader.read(data)
        if request is None:
            if not self.buffer:
                self.buffer += data
            return  # wait for the rest of the head
        self.buffer.clear()
        self.handle(request, data[request.head_length :])

    def handle(self, request: Request, rest: bytes) -> None:
        worker = self.worker
        if self.on_admin_port() and request.path and not admin.is_admin(request.path):
            # The admin port serves nothing else (an unreadable request
            # still gets its 400 below).
            self.respond(404, "not found", request=request)
        elif request.status:
            if request.status == 403 and request.origin is not None:
                worker.origin_refused(request.origin)
            self.respond(request.status, request.reason, request.headers, request=request)
        elif admin.is_admin(request.path) and self.admin_here():
            self.read_admin(request, rest)
        elif not request.joins:
            self.answer_plain(request)
        elif worker.draining:
            self.respond(503, "server is draining", [RETRY_AFTER], request=request)
        elif self.unavailable:
            self.respond(503, "topic owner unavailable", [RETRY_AFTER], request=request)
        elif routing.owner(request, worker.config.workers, worker.index) != worker.index:
            # The worker that read it routes every join to its owner with
            # the same reading, so this is a defect; answer it rather than
            # split the topic between two workers.
            log(logging.ERROR, "join for a topic another worker owns", topic=request.topic)
            self.respond(503, "topic owner unavailable", [RETRY_AFTER], request=request)
        else:
            self.upgrade(request, rest)

    def answer_plain(self, request: Request) -> None:
        path = request.path
        if path not in routing.ENDPOINTS:
            self.respond(404, "not found", request=request)
        elif request.method not in ("GET", "HEAD"):
            self.respond(405, "method not allowed", [("Allow", "GET, HEAD")], request=request)
        elif path == "/readyz" and self.worker.draining:
            self.respond(503, "draining", [RETRY_AFTER], request=request)
        elif path == "/metrics":
            body = self.worker.metrics_text().encode()
            self.respond(200, body, content_type=METRICS_CONTENT_TYPE, request=request)
        elif path in routing.STATIC_FILES:
            name, content_type = routing.STATIC_FILES[path]
            headers = [("Cache-Control", "no-cache")]
            body = static_file(name)
            self.respond(200, body, headers, content_type=content_type, request=request)
        else:
            self.respond(200, "ok", request=request)

    def admin_here(self) -> bool:
        """Whether this connection may use the admin API: it is on, and
        this is its port (or a request from another worker)."""
        config = self.worker.config
        if config.admin_token is None:
            return False
        return config.admin_port is None or self.local_port in (None, config.admin_port)

    def on_admin_port(self) -> bool:
        port = self.worker.config.admin_port
        return port is not None and self.local_port == port

    def read_admin(self, request: Request, rest: bytes) -> None:
        """An admin request: checked, then answered once its body is here."""
        token = self.worker.config.admin_token
        assert token is not None
        if not admin.authorized(token, request.authorization):
            return self.admin_answer(admin.UNAUTHORIZED, request)
        if request.bad_length:
            return self.admin_answer(admin.error(400, "invalid Content-Length"), request)
        length = request.content_length or 0
        if length > admin.MAX_BODY:
            return self.admin_answer(admin.error(413, "body too large"), request)
        if len(rest) < length:
            self.awaiting_body = (request, length)
            self.buffer += rest
            return
        self.answer_admin(request, rest[:length])

    def answer_admin(self, request: Request, body: bytes) -> None:
        worker = self.worker
        if worker.config.redis_url is not None:
            self.listing = asyncio.ensure_future(
                self.answer_later(worker.cluster_admin(request, body), request)
            )
            return
        if request.admin is not None:
            if routing.owner(request, worker.config.workers, worker.index) != worker.index:
                log(logging.ERROR, "admin request for a topic another worker owns")
                answer = admin.unavailable("topic owner unavailable")
            else:
                action = admin.read_action(request, body)
                answer = (
                    action if isinstance(action, admin.Answer) else admin.act(worker.hub, action)
                )
            return self.admin_answer(answer, request)
        if request.path != admin.TOPICS:
            return self.admin_answer(admin.error(404, "not found"), request)
        listing = admin.read_listing(request)
        if isinstance(listing, admin.Answer):
            return self.admin_answer(listing, request)
        if listing.worker_only or worker.config.workers == 1:
            answer = admin.topics_page(listing, worker.hub.admin_topics())
            return self.admin_answer(answer, request)
        assert request.authorization is not None
        self.listing = asyncio.ensure_future(
            self.list_topics(request, listing, request.authorization)
        )

    async def list_topics(
        self, request: Request, listing: admin.Listing, authorization: str
    ) -> None:
        topics = await self.worker.all_topics(authorization)
        if self.transport is None or self.transport.is_closing():
            return
        if topics is None:
            answer = admin.unavailable("a worker did not answer")
        else:
            answer = admin.topics_page(listing, topics)
        self.admin_answer(answer, request)

    async def answer_later(self, answer: Awaitable[admin.Answer], request: Request) -> None:
        answered = await answer
        if self.transport is not None and not self.transport.is_closing():
            self.admin_answer(answered, request)

    def admin_answer(self, answer: admin.Answer, request: Request) -> None:
        body = answer.encoded()
        self.respond(
            answer.status,
            body,
            answer.headers,
            content_type=admin.JSON_CONTENT_TYPE,
            request=request,
            counted=False,
        )

    def respond(
        self,
        status: int,
        body: str | bytes,
        headers: Iterable[tuple[str, str]] = (),
        *,
        content_type: str = TEXT_CONTENT_TYPE,
        request: Request | None = None,
        counted: bool = True,
    ) -> None:
        """Answer with ``status`` and close; a HEAD request gets the headers
        only. An error is counted as a failed handshake unless not
        ``counted`` (the admin API's answers)."""
        head_only = request is not None and request.method == "HEAD"
        data = http_response(self.worker.index, status, body, headers, content_type, head_only)
        if status >= 400 and counted:
            self.worker.count_handshake_failure(str(status))
        assert self.transport is not None
        self.transport.write(data)
        self.linger()

    def linger(self) -> None:
        """Close after an answer without losing it: closing a socket with
        unread input (the rest of an oversized head, a body) sends a reset,
        and a client that has not read the answer yet loses it. So the
        server half-closes and reads (and drops) what comes until the
        client closes, for at most ``LINGER`` seconds (nginx's lingering
        close)."""
        assert self.transport is not None
        self.answered = True
        if self.timer is not None:
            self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_later(LINGER, self.close)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        else:
            self.close()

    def eof_received(self) -> bool:
        return False  # the transport closes itself

    def upgrade(self, request: Request, rest: bytes) -> None:
        """Send the 101 response and hand the connection to the hub, which
        admits it as a peer or refuses it (invalid parameters, a bad token,
        a limit) with an ``error`` and a close code a browser can read."""
        transport = self.transport
        assert transport is not None and request.accept is not None
        worker = self.worker
        self.finish()
        # Written by the hub, in the same write as what follows it.
        head = switching_protocols(worker.index, request.accept)
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        hub = worker.hub
        if request.invalid is not None:
            peer = hub.refuse(transport, request.invalid, head=head)
            self.install(transport, peer, request, rest)
            return
        topic = request.topic
        assert topic is not None
        metadata = request.metadata
        metadata_locked = False
        if worker.config.auth_secret is not None:
            token = request.token or auth.bearer(request.authorization)
            grant = auth.authorize(worker.config.auth_secret, token, topic)
            if grant is None:
                peer = hub.refuse(transport, "unauthorized", head=head)
                self.install(transport, peer, request, rest)
                return
            if grant.metadata is not None:
                metadata = grant.metadata
                metadata_locked = not grant.can_update_metadata
        peer = hub.join(
            transport,
            topic,
            metadata,
            resumable=request.resumable,
            resume=request.resume,
            seen=request.seen,
            waited=time.monotonic() - self.accepted,
            metadata_locked=metadata_locked,
            head=head,
        )
        self.install(transport, peer, request, rest)

    def install(
        self, transport: asyncio.Transport, peer: Peer, request: Request, rest: bytes
    ) -> None:
        # Peer implements the protocol methods in Rust; it is not a subclass.
        transport.set_protocol(cast(asyncio.BaseProtocol, peer))
        if peer.refused is not None:
            self.worker.count_handshake_failure(peer.refused)
            log(
                logging.INFO,
                "peer refused",
                topic=request.topic,
                path=request.path,
                reason=peer.refused,
            )
            return
        if not peer.resumed:  # a resume is logged by the hub
            log(logging.INFO, "peer joined", peer=peer.peer_id, topic=request.topic)
        if rest:
            peer.data_received(rest)
