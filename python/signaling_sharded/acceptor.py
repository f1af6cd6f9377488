"""Accepting connections and sending each to the worker that owns its topic.

With several workers, every worker accepts on its own ``SO_REUSEPORT``
listener, so the kernel spreads connections over them without regard to
topics. The :class:`Acceptor` reads each new connection's request head,
has the Rust core read it (``RequestReader.read``, the reader the upgrade
itself uses), and either serves the connection itself or hands the socket,
with the bytes it read, to the owner of the topic it joins (see
:mod:`handoff` and :func:`routing.owner`). Anything that is not a join
(``/healthz``, ``/metrics``, refusals) is answered by the worker that
accepted it. A connection that sends nothing is closed at its handshake
deadline, and waiting for its bytes blocks no one.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from signaling_sharded import routing
from signaling_sharded._native import Request
from signaling_sharded.handoff import MAX_RECEIVED, Courier, Inbox, inbox_ready
from signaling_sharded.handshake import Handshake
from signaling_sharded.logs import log

if TYPE_CHECKING:
    from signaling_sharded.worker import Worker

#: Connections accepted per wake-up before other work gets a turn.
ACCEPT_BATCH = 64
#: Seconds a starting worker waits for the others before accepting.
STARTUP_WAIT = 10.0


@dataclass
class Unread:
    """A connection whose request head has not fully arrived."""

    sock: socket.socket
    deadline: float
    received: bytearray = field(default_factory=bytearray)
    timer: asyncio.TimerHandle | None = None


class Acceptor:
    def __init__(self, worker: Worker, listener: socket.socket, group: str) -> None:
        self.worker = worker
        self.listener = listener
        self.group = group
        self.inbox = Inbox(
            group,
            worker.index,
            backlog=2 * worker.config.workers,
            on_refused=lambda: worker.hub.count_handoff("refused"),
        )
        self.links: list[socket.socket] = []
        self.courier = Courier(group)
        self.loop = asyncio.get_running_loop()
        #: Connections whose request head has not arrived, by descriptor.
        #: The socket objects live here, so closing one is closing it once.
        self.unread: dict[int, Unread] = {}
        self.adoptions: set[asyncio.Task[object]] = set()

    async def start(self) -> None:
        """Take hand-offs at once; accept once every worker can take them
        (at start-up, the others may still be booting)."""
        self.loop.add_reader(self.inbox.fileno(), self.on_link)
        others = [i for i in range(self.worker.config.workers) if i != self.worker.index]
        deadline = time.monotonic() + STARTUP_WAIT
        while others and time.monotonic() < deadline:
            others = [i for i in others if not inbox_ready(self.group, i)]
            if others:
                await asyncio.sleep(0.02)
        if others:
            log(logging.WARNING, "workers not ready; accepting anyway", workers=others)
        self.loop.add_reader(self.listener.fileno(), self.on_acceptable)

    def close(self) -> None:
        """Stop accepting; connections still being routed are closed."""
        self.loop.remove_reader(self.listener.fileno())
        self.loop.remove_reader(self.inbox.fileno())
        for link in self.links:
            self.loop.remove_reader(link.fileno())
            link.close()
        self.links.clear()
        self.listener.close()
        self.inbox.close()
        self.courier.close()
        for fd in list(self.unread):
            self.forget(fd).sock.close()

    def on_acceptable(self) -> None:
        deadline = time.monotonic() + self.worker.config.handshake_timeout
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE, ENFILE, ENOBUFS...
                log(logging.WARNING, "accept failed", error=str(exc))
                return
            conn.setblocking(False)
            self.unread[conn.fileno()] = Unread(conn, deadline)
            self.on_readable(conn.fileno())

    def on_link(self) -> None:
        """Another worker connected to send us sockets."""
        for link in self.inbox.accept_links():
            self.links.append(link)
            self.loop.add_reader(link.fileno(), self.on_handoff, link)

    def on_handoff(self, link: socket.socket) -> None:
        arrivals, open_ = self.inbox.receive(link)
        for arrival in arrivals:
            self.worker.hub.count_handoff("received")
            self.adopt(arrival.sock, arrival.deadline, arrival.received)
        if not open_:
            self.loop.remove_reader(link.fileno())
            self.links.remove(link)
            link.close()

    def on_readable(self, fd: int) -> None:
        """Read what ``fd`` sent; once its head is there, route it."""
        unread = self.unread[fd]
        try:
            data = unread.sock.recv(MAX_RECEIVED - len(unread.received))
        except (BlockingIOError, InterruptedError):
            data = None
        except OSError:
            self.forget(fd).sock.close()
            return
        if data == b"":
            self.forget(fd).sock.close()  # closed before sending a request
            return
        if data is None:
            request = None
        else:
            unread.received += data
            request = self.worker.reader.read(bytes(unread.received))
        if request is not None:
            self.forget(fd)
            self.route(unread.sock, unread.deadline, bytes(unread.received), request)
        elif unread.timer is None:
            self.loop.add_reader(fd, self.on_readable, fd)
            delay = unread.deadline - time.monotonic()
            unread.timer = self.loop.call_later(delay, self.time_out, fd)

    def time_out(self, fd: int) -> None:
        log(logging.DEBUG, "handshake timed out before the request head")
        self.worker.count_handshake_failure("timeout")
        self.forget(fd).sock.close()

    def forget(self, fd: int) -> Unread:
        """Stop waiting for ``fd``'s head; the caller owns its socket."""
        unread = self.unread.pop(fd)
        if unread.timer is not None:
            unread.timer.cancel()
            self.loop.remove_reader(fd)
        return unread

    def route(
        self, conn: socket.socket, deadline: float, received: bytes, request: Request
    ) -> None:
        """Serve ``conn`` here or hand it to the owner of its topic."""
        worker = self.worker
        owner = routing.owner(request, worker.config.workers, worker.index)
        if owner == worker.index:
            self.adopt(conn, deadline, received, request)
        elif self.courier.send(conn, owner, deadline, received):
            worker.hub.count_handoff("sent")
            conn.close()
        else:
            log(logging.WARNING, "hand-off failed", owner=owner, topic=request.topic)
            worker.hub.count_handoff("failed")
            self.adopt(conn, deadline, received, request, unavailable=True)

    def adopt(
        self,
        conn: socket.socket,
        deadline: float,
        received: bytes,
        request: Request | None = None,
        *,
        unavailable: bool = False,
    ) -> None:
        """Serve ``conn`` in this worker; ``request`` is this worker's reading
        of ``received``, if it has one."""
        worker = self.worker

        def factory() -> Handshake:
            return Handshake(
                worker,
                deadline=deadline,
                unavailable=unavailable,
                received=received,
                request=request,
            )

        task = self.loop.create_task(self.loop.connect_accepted_socket(factory, sock=conn))
        self.adoptions.add(task)

        def adopted(task: asyncio.Task[object]) -> None:
            self.adoptions.discard(task)
            if task.cancelled() or task.exception() is not None:
                log(logging.WARNING, "adopting a connection failed", error=repr(task))
                conn.close()

        task.add_done_callback(adopted)
