"""Accepting connections and sending each to the worker that owns its topic.

With several workers, every worker accepts on its own ``SO_REUSEPORT``
listener, so the kernel spreads connections over them without regard to
topics. The :class:`Acceptor` peeks at each new connection's request line
(``MSG_PEEK``: nothing is consumed), computes the owner of the topic with
the Rust core's stable hash, and either serves the connection itself or
hands the socket to the owner (see :mod:`handoff`). Anything that is not a
join (``/healthz``, ``/readyz``, errors) is answered by the worker that
accepted it. A connection that sends nothing is closed at its handshake
deadline, and waiting for its bytes blocks no one.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import TYPE_CHECKING

from signaling_sharded import routing
from signaling_sharded._native import topic_owner
from signaling_sharded.handoff import Courier, Inbox, inbox_ready
from signaling_sharded.handshake import Handshake
from signaling_sharded.logs import log

if TYPE_CHECKING:
    from signaling_sharded.worker import Worker

#: Connections accepted per wake-up before other work gets a turn.
ACCEPT_BATCH = 64
#: While a request line is incomplete, how often to look again. MSG_PEEK
#: readiness is level-triggered, so waiting on it would spin.
PEEK_RETRY = 0.02
#: Seconds a starting worker waits for the others before accepting.
STARTUP_WAIT = 10.0


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
        #: Connections whose request line has not arrived, by descriptor.
        self.waiting: dict[int, asyncio.TimerHandle] = {}
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
        for fd, timer in list(self.waiting.items()):
            timer.cancel()
            self.loop.remove_reader(fd)
            socket.close(fd)
        self.waiting.clear()

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
            self.route(conn, deadline)

    def on_link(self) -> None:
        """Another worker connected to send us sockets."""
        for link in self.inbox.accept_links():
            self.links.append(link)
            self.loop.add_reader(link.fileno(), self.on_handoff, link)

    def on_handoff(self, link: socket.socket) -> None:
        arrivals, open_ = self.inbox.receive(link)
        for arrival in arrivals:
            self.worker.hub.count_handoff("received")
            self.adopt(arrival.sock, arrival.deadline)
        if not open_:
            self.loop.remove_reader(link.fileno())
            self.links.remove(link)
            link.close()

    def route(self, conn: socket.socket, deadline: float) -> None:
        """Serve ``conn`` here or hand it to its topic's owner, once its
        request line has arrived."""
        try:
            peeked = conn.recv(routing.MAX_REQUEST_LINE, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            peeked = None
        except OSError:
            conn.close()
            return
        if peeked == b"":
            conn.close()  # closed before sending a request
            return
        topic = routing.INCOMPLETE if peeked is None else routing.topic_of_request(peeked)
        if isinstance(topic, routing.Incomplete):
            self.wait(conn, deadline, readable=peeked is not None)
            return
        workers = self.worker.config.workers
        owner = self.worker.index if topic is None else topic_owner(topic, workers)
        if owner == self.worker.index:
            self.adopt(conn, deadline)
        elif self.courier.send(conn, owner, deadline):
            self.worker.hub.count_handoff("sent")
            conn.close()
        else:
            log(logging.WARNING, "hand-off failed", owner=owner, topic=topic)
            self.worker.hub.count_handoff("failed")
            self.adopt(conn, deadline, unavailable=True)

    def wait(self, conn: socket.socket, deadline: float, *, readable: bool) -> None:
        """Look at ``conn`` again when more of its request may be there:
        when it becomes readable if nothing arrived yet, else shortly."""
        fd = conn.fileno()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            log(logging.DEBUG, "handshake timed out before the request line")
            self.worker.count_handshake_failure("timeout")
            conn.close()
            return

        def again() -> None:
            timer = self.waiting.pop(fd, None)
            if timer is not None:
                timer.cancel()
            self.loop.remove_reader(fd)
            self.route(conn, deadline)

        if readable:
            self.waiting[fd] = self.loop.call_later(min(PEEK_RETRY, remaining), again)
        else:
            self.waiting[fd] = self.loop.call_later(remaining, again)
            self.loop.add_reader(fd, again)

    def adopt(self, conn: socket.socket, deadline: float, *, unavailable: bool = False) -> None:
        """Serve ``conn`` in this worker."""
        worker = self.worker

        def factory() -> Handshake:
            return Handshake(worker, deadline=deadline, unavailable=unavailable)

        task = self.loop.create_task(self.loop.connect_accepted_socket(factory, sock=conn))
        self.adoptions.add(task)

        def adopted(task: asyncio.Task[object]) -> None:
            self.adoptions.discard(task)
            if task.cancelled() or task.exception() is not None:
                log(logging.WARNING, "adopting a connection failed", error=repr(task))
                conn.close()

        task.add_done_callback(adopted)
