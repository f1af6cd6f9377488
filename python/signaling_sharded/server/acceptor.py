"""Accepting connections and sending each to the worker that owns its topic.

Every worker accepts on its own ``SO_REUSEPORT`` listener, so the kernel
spreads connections over them without regard to topics. The
:class:`Acceptor` reads each new connection's request head, has the Rust
core read it (``RequestReader.read``, the reader the upgrade itself uses),
and either serves the connection itself or hands the socket, with the
bytes it read, to the owner of the topic it joins (see :mod:`handoff` and
:func:`routing.owner`). Anything that is not a join (``/healthz``,
``/metrics``, refusals) is answered by the worker that accepted it. A
connection that sends nothing is closed at its handshake deadline, and
waiting for its bytes blocks no one.

At the descriptor limit (``ulimit -n``) ``accept`` fails at once, and
again at once: the acceptor then answers what waits in the listen queue
with 503 through a descriptor it keeps in reserve (:class:`Spare`), stops
accepting for a moment (longer each time, up to a second), says so in the
log once in a while, and carries on by itself once descriptors are free.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import resource
import socket
import time
from dataclasses import dataclass, field

from signaling_sharded._native import Request
from signaling_sharded.server import routing
from signaling_sharded.server.handoff import (
    MAX_RECEIVED,
    Arrival,
    Courier,
    Drained,
    Inbox,
    inbox_ready,
)
from signaling_sharded.server.handshake import RETRY_AFTER, Handshake, Site, http_response
from signaling_sharded.server.logs import log

#: Connections accepted (or hand-offs received) per wake-up before other
#: work gets a turn.
ACCEPT_BATCH = 64
#: Seconds a starting worker waits for the others before accepting.
STARTUP_WAIT = 10.0
#: ``accept`` errors that mean "no room for another descriptor".
AT_LIMIT = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: Seconds accepting pauses at the descriptor limit: first, and longest.
LIMIT_PAUSE = (0.05, 1.0)
#: Seconds between two log lines about the descriptor limit.
LIMIT_LOG_INTERVAL = 10.0


@dataclass
class Unread:
    """A connection whose request head has not fully arrived."""

    sock: socket.socket
    deadline: float
    received: bytearray = field(default_factory=bytearray)
    timer: asyncio.TimerHandle | None = None


class Spare:
    """One descriptor held in reserve. Released, it leaves room for one
    more at the descriptor limit: to accept a connection only to answer
    it, or to receive a handed-off socket that the kernel would otherwise
    drop."""

    def __init__(self) -> None:
        self.fd: int | None = None
        self.restore()

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def restore(self) -> bool:
        """Take the reserve again; False while there is no room for it."""
        if self.fd is None:
            try:
                self.fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return False
        return True


class Acceptor:
    def __init__(self, worker: Site, listeners: list[socket.socket], group: str) -> None:
        """``listeners``: the signaling port's, and the admin port's if any."""
        self.worker = worker
        self.listeners = listeners
        self.group = group
        self.loop = asyncio.get_running_loop()
        sharded = worker.config.workers > 1
        self.inbox = (
            Inbox(
                group,
                worker.index,
                backlog=2 * worker.config.workers,
                on_refused=lambda: worker.hub.count_handoff("refused"),
            )
            if sharded
            else None
        )
        self.courier = Courier(group) if sharded else None
        self.links: list[socket.socket] = []
        #: Connections whose request head has not arrived, by descriptor.
        #: The socket objects live here, so closing one is closing it once.
        self.unread: dict[int, Unread] = {}
        self.adoptions: set[asyncio.Task[object]] = set()
        self.spare = Spare()
        #: At the descriptor limit: accepting is paused, for this long next.
        self.paused = False
        self.pause = LIMIT_PAUSE[0]
        #: Connections answered 503 at the limit since the last log line.
        self.refused_at_limit = 0
        self.limit_logged = 0.0
        self.accepting = False

    async def start(self) -> None:
        """Take hand-offs at once; accept once every worker can take them
        (at start-up, the others may still be booting)."""
        if self.inbox is not None:
            self.loop.add_reader(self.inbox.fileno(), self.on_link)
        others = [i for i in range(self.worker.config.workers) if i != self.worker.index]
        deadline = time.monotonic() + STARTUP_WAIT
        while others and time.monotonic() < deadline:
            others = [i for i in others if not inbox_ready(self.group, i)]
            if others:
                await asyncio.sleep(0.02)
        if others:
            log(logging.WARNING, "workers not ready; accepting anyway", workers=others)
        self.accepting = True
        self.watch_listeners()

    def watch_listeners(self) -> None:
        for listener in self.listeners:
            self.loop.add_reader(listener.fileno(), self.on_acceptable, listener)

    def unwatch_listeners(self) -> None:
        for listener in self.listeners:
            self.loop.remove_reader(listener.fileno())

    def close(self) -> None:
        """Stop accepting; connections still being routed are closed."""
        self.accepting = False
        self.unwatch_listeners()
        for link in self.links:
            self.loop.remove_reader(link.fileno())
            link.close()
        self.links.clear()
        for listener in self.listeners:
            listener.close()
        if self.inbox is not None:
            self.loop.remove_reader(self.inbox.fileno())
            self.inbox.close()
        if self.courier is not None:
            self.courier.close()
        for fd in list(self.unread):
            self.forget(fd).sock.close()
        self.spare.release()

    def on_acceptable(self, listener: socket.socket) -> None:
        deadline = time.monotonic() + self.worker.config.handshake_timeout
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in AT_LIMIT:
                    self.at_limit(listener, exc)
                    return
                continue  # e.g. ECONNABORTED: that connection is gone already
            if self.pause != LIMIT_PAUSE[0]:
                self.below_limit()
            conn.setblocking(False)
            self.unread[conn.fileno()] = Unread(conn, deadline)
            self.on_readable(conn.fileno())

    # --- at the descriptor limit --------------------------------------------

    def at_limit(self, listener: socket.socket, exc: OSError) -> None:
        """Answer the connections waiting on ``listener`` with 503 through
        the spare descriptor, then pause accepting."""
        for _ in range(ACCEPT_BATCH):
            self.spare.release()
            try:
                conn, _ = listener.accept()
            except OSError:
                break
            self.refuse_at_limit(conn)  # closes it: room for the spare again
            self.spare.restore()
        self.spare.restore()
        now = time.monotonic()
        if now - self.limit_logged >= LIMIT_LOG_INTERVAL:
            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
            log(
                logging.WARNING,
                "out of file descriptors: answering 503 and accepting less",
                worker=self.worker.index,
                limit=soft,
                connections=self.worker.hub.connection_count(),
                refused=self.refused_at_limit,
                error=exc.strerror,
            )
            self.limit_logged = now
            self.refused_at_limit = 0
        self.paused = True
        self.unwatch_listeners()
        self.loop.call_later(self.pause, self.resume_accepting)
        self.pause = min(self.pause * 2, LIMIT_PAUSE[1])

    def refuse_at_limit(self, conn: socket.socket) -> None:
        """503 to a connection taken only to be answered; what it sent is
        read first, so that closing sends FIN, not a reset."""
        self.refused_at_limit += 1
        self.worker.count_handshake_failure("503")
        with conn, contextlib.suppress(OSError):
            conn.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                conn.recv(MAX_RECEIVED)
            conn.send(self.limit_response())

    def limit_response(self) -> bytes:
        return http_response(self.worker.index, 503, "out of file descriptors", [RETRY_AFTER])

    def resume_accepting(self) -> None:
        if self.paused and self.accepting:
            self.paused = False
            self.watch_listeners()

    def below_limit(self) -> None:
        """A connection was accepted after the limit was met."""
        self.pause = LIMIT_PAUSE[0]
        if self.limit_logged:
            log(
                logging.INFO,
                "file descriptors available again",
                worker=self.worker.index,
                refused=self.refused_at_limit,
            )
            self.limit_logged = 0.0
            self.refused_at_limit = 0

    # --- hand-offs ----------------------------------------------------------

    def on_link(self) -> None:
        """Another worker connected to send us sockets."""
        assert self.inbox is not None
        for link in self.inbox.accept_links():
            self.links.append(link)
            self.loop.add_reader(link.fileno(), self.on_handoff, link)

    def on_handoff(self, link: socket.socket) -> None:
        """Take the sockets waiting on ``link``, one at a time, each with the
        spare descriptor released so that there is room for it."""
        assert self.inbox is not None
        for _ in range(ACCEPT_BATCH):
            self.spare.release()
            arrival = self.inbox.receive(link)
            room = self.spare.restore()
            if isinstance(arrival, Arrival):
                self.worker.hub.count_handoff("received")
                if room:
                    self.adopt(arrival.sock, arrival.deadline, arrival.received)
                else:
                    self.refuse_at_limit(arrival.sock)
                    self.spare.restore()
            elif arrival is Drained.EMPTY:
                return
            elif arrival is Drained.CLOSED:
                self.loop.remove_reader(link.fileno())
                self.links.remove(link)
                link.close()
                return

    # --- reading the request head -------------------------------------------

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
            return
        assert self.courier is not None
        if self.courier.send(conn, owner, deadline, received):
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
