"""A worker process: one uvloop event loop serving WebSocket peers.

The worker owns a Rust ``Hub`` (its topics, peers and their queues). Its
:class:`Acceptor` accepts connections on the port's ``SO_REUSEPORT``
listener it shares with the other workers and sends every join to the
worker that owns its topic, so all peers of a topic live in one process;
there each HTTP upgrade runs in a :class:`Handshake`, which hands the
transport to the hub. A timer drives the hub's pings and timeouts.

SIGTERM drains: ``/readyz`` answers 503, upgrades are refused with 503,
every peer is sent close 1001, and the worker exits once they are gone or
the drain timeout has passed. A SIGTERM while draining changes nothing
(the supervisor kills its workers on a second signal). SIGINT is the
supervisor's to handle (a terminal's Ctrl-C reaches every process of the
group) and is ignored here.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import math
import os
import signal
import socket
import sys
import time

from signaling_sharded._native import CLOSE_CODES, Hub, MetricsTable, Request, RequestReader
from signaling_sharded.server import admin
from signaling_sharded.server.acceptor import Acceptor
from signaling_sharded.server.cluster import Cluster
from signaling_sharded.server.config import Config
from signaling_sharded.server.handshake import WRITE_HIGH_WATER, Handshake
from signaling_sharded.server.logs import configure, flush, log
from signaling_sharded.server.webhooks import Webhooks

#: Close code and reason sent to every peer when the server drains.
CLOSE_GOING_AWAY = CLOSE_CODES["GOING_AWAY"]
GOING_AWAY_REASON = "server going away"
#: Exit code of a worker that could not start (e.g. the port is taken): the
#: supervisor stops the server instead of restarting it.
EXIT_BOOT_ERROR = 3
LISTEN_BACKLOG = 4096
#: Seconds between two log lines about the same refused Origin, and how
#: many origins are remembered.
ORIGIN_LOG_INTERVAL = 60.0
MAX_ORIGINS_LOGGED = 1000


def tick_period(config: Config) -> float:
    """How often the hub checks pings and timeouts: a few times per the
    shortest of them, so a timeout fires at most a quarter late."""
    shortest = min(config.ping_interval, config.ping_timeout, config.close_timeout)
    return min(max(shortest / 4, 0.02), 1.0)


#: The shortest wait between two parts of a tick.
TICK_STEP = 0.01
#: At most this many parts (see ``tick_parts``).
MAX_TICK_PARTS = 10


def tick_parts(config: Config) -> int:
    """In how many parts a tick goes over the connections, one part every
    ``tick_period / parts`` seconds: pings due together (peers that joined
    together) go out a part at a time, and so do their pongs, instead of
    in one burst that holds up every relay behind it."""
    return max(1, min(MAX_TICK_PARTS, round(tick_period(config) / TICK_STEP)))


def bound_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` with ``SO_REUSEPORT``, which every
    worker's listener and the supervisor's reservation share (another
    server on the port is kept out by the port lock, see
    :func:`lock_port`)."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


def bind_listener(
    config: Config, host: str | None = None, port: int | None = None
) -> socket.socket:
    """This worker's listening socket (the signaling port's, or ``host``
    and ``port``'s), one of the port's ``SO_REUSEPORT``
    group. No TCP_DEFER_ACCEPT: the kernel would hold a silent client for
    its own timeout before our handshake deadline even starts."""
    sock = bound_socket(host or config.host, config.port if port is None else port)
    try:
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class PortInUse(Exception):
    """Another signaling-sharded server holds the port on this machine."""


def lock_port(port: int) -> socket.socket:
    """The lock on ``port`` that keeps a second server out of its
    ``SO_REUSEPORT`` group (where it would take half the connections and
    split topics): an abstract Unix socket named after the port, held by
    the supervisor and inherited by every worker, so it lasts while any
    process of the server does. Abstract names belong to the network
    namespace, as ports do."""
    lock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        lock.bind(f"\0signaling-sharded.port.{port}")
    except OSError as exc:
        lock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(f"port {port} is in use by another signaling-sharded server") from None
        raise
    return lock


class Worker:
    def __init__(
        self,
        config: Config,
        index: int = 0,
        group: str = "",
        metrics: MetricsTable | None = None,
    ) -> None:
        self.config = config
        self.index = index
        #: Names this server's hand-off sockets (see handoff.py).
        self.group = group or f"{os.getpid()}.{config.port}"
        self.cluster = (
            Cluster(config.redis_url, config.redis_prefix, index, config.redis_flush_delay)
            if config.redis_url is not None
            else None
        )
        self.webhooks = None
        if config.webhook_urls:
            assert config.webhook_secret is not None
            self.webhooks = Webhooks(
                config.webhook_urls,
                config.webhook_secret,
                config.webhook_queue,
                lambda result, n: self.hub.count_webhook_events(result, n),
                lambda result: self.hub.count_webhook_request(result),
            )
        #: Single-server webhooks follow the hub's joins and leaves (in
        #: cluster mode, Redis's: see cluster.py).
        self.local_webhooks = self.webhooks if self.cluster is None else None
        if self.cluster is not None:
            self.cluster.webhooks = self.webhooks
        # The settings cross into the Rust core once, as this Config.
        self.hub = Hub(
            config,
            self.on_left,
            on_session=self.on_session,
            metrics=metrics,
            worker=index,
            cluster_node=None if self.cluster is None else self.cluster.node,
            on_cluster=None if self.cluster is None else self.cluster.submit,
            on_joined=None if self.local_webhooks is None else self.local_webhooks.joined,
            on_updated=None if self.local_webhooks is None else self.local_webhooks.updated,
        )
        # A request without Origin (a native client) always passes the
        # allow-list.
        self.reader = RequestReader(list(config.allowed_origins) or None)
        self.handshakes: set[Handshake] = set()
        #: When each refused Origin was last logged (time.monotonic()).
        self.origins_logged: dict[str, float] = {}
        self.draining = False
        self.done: asyncio.Future[None] | None = None
        self.acceptor: Acceptor | None = None
        #: In how many parts a tick goes over the connections, one every
        #: tick_step seconds; the part the next goes over, and when (the
        #: loop's clock).
        self.tick_parts = tick_parts(config)
        self.tick_step = tick_period(config) / self.tick_parts
        self.tick_part = 0
        self.next_tick = 0.0
        self.ticker: asyncio.TimerHandle | None = None

    def on_left(self, peer: str, topic: str, reason: str) -> None:
        log(logging.INFO, "peer left", peer=peer, topic=topic, reason=reason)
        if self.local_webhooks is not None:
            self.local_webhooks.left(peer, topic, reason)

    def on_session(self, peer: str, topic: str, event: str) -> None:
        log(logging.INFO, f"peer {event}", peer=peer, topic=topic)

    def metrics_text(self) -> str:
        """Every worker's metrics, as Prometheus text."""
        return self.hub.metrics_text()

    async def all_topics(self, authorization: str) -> list[tuple[str, int]] | None:
        """Every worker's topics and peer counts: this one's, and each
        other's, asked with a request handed to it on one end of a socket
        pair (it answers as to any connection); None if one did not answer
        within the handshake timeout."""
        topics = self.hub.admin_topics()
        others = [k for k in range(self.config.workers) if k != self.index]
        answers = await asyncio.gather(*(self.ask_worker(k, authorization) for k in others))
        for answer in answers:
            if answer is None:
                return None
            topics += answer
        return topics

    async def cluster_admin(self, request: Request, body: bytes) -> admin.Answer:
        assert self.cluster is not None
        return await self.cluster.serve_admin(request, body)

    async def ask_worker(self, index: int, authorization: str) -> list[tuple[str, int]] | None:
        assert self.acceptor is not None and self.acceptor.courier is not None
        loop = asyncio.get_running_loop()
        mine, theirs = socket.socketpair()
        with mine:
            mine.setblocking(False)
            deadline = time.monotonic() + self.config.handshake_timeout
            request = admin.worker_request(authorization)
            with theirs:
                if not self.acceptor.courier.send(theirs, index, deadline, request):
                    self.hub.count_handoff("failed")
                    return None
                self.hub.count_handoff("sent")  # as the other worker counts it received
            answer = bytearray()
            try:
                while chunk := await asyncio.wait_for(
                    loop.sock_recv(mine, 65536), deadline - time.monotonic()
                ):
                    answer += chunk
            except (asyncio.TimeoutError, OSError):
                return None
        return admin.worker_topics(bytes(answer))

    def origin_refused(self, origin: str) -> None:
        """Log a browser Origin off the allow-list, once a minute per origin
        (a misconfigured allow-list shows at once; a flood of requests
        does not flood the log)."""
        now = time.monotonic()
        if len(self.origins_logged) > MAX_ORIGINS_LOGGED:
            self.origins_logged.clear()
        if now - self.origins_logged.get(origin, -ORIGIN_LOG_INTERVAL) >= ORIGIN_LOG_INTERVAL:
            self.origins_logged[origin] = now
            allowed = list(self.config.allowed_origins)
            log(logging.INFO, "origin refused", origin=origin, allowed=allowed, worker=self.index)

    def count_handshake_failure(self, reason: str) -> None:
        self.hub.count_handshake_failure(reason)

    async def serve(self, listener: socket.socket, admin: socket.socket | None = None) -> None:
        """Serve ``listener`` (and ``admin``, the admin API's own listener
        with ``--admin-port``) until drained."""
        loop = asyncio.get_running_loop()
        # What the peers' messages of one loop iteration send a connection
        # goes out in one write, at its end.
        self.hub.defer_writes(loop.call_soon, WRITE_HIGH_WATER)
        self.done = loop.create_future()
        acceptor = Acceptor(self, [listener] if admin is None else [listener, admin], self.group)
        self.acceptor = acceptor
        await acceptor.start()
        loop.add_signal_handler(signal.SIGTERM, self.on_signal, signal.SIGTERM)
        # On the clock every worker shares (the monotonic one), so that a
        # late callback does not stretch the sweep and the workers' parts
        # take turns rather than come in the same moment.
        step = self.tick_step
        turn = self.index / self.config.workers
        self.next_tick = (math.floor(loop.time() / step) + 1 + turn) * step
        self.ticker = loop.call_at(self.next_tick, self.tick)
        if self.cluster is not None:
            self.cluster.start(self.hub)
        if self.webhooks is not None:
            self.webhooks.start()
        log(
            logging.INFO,
            "listening",
            host=self.config.host,
            port=self.config.port,
            worker=self.index,
            pid=os.getpid(),
        )
        try:
            await self.done
        finally:
            if self.ticker is not None:
                self.ticker.cancel()
            acceptor.close()
            for handshake in list(self.handshakes):
                handshake.close()
            if self.cluster is not None:
                await self.cluster.close()
            if self.webhooks is not None:
                await self.webhooks.close()
        log(logging.INFO, "stopped", worker=self.index)

    def tick(self) -> None:
        self.hub.tick(self.tick_part, self.tick_parts)
        self.tick_part = (self.tick_part + 1) % self.tick_parts
        if self.webhooks is not None:
            self.hub.set_webhook_queued(self.webhooks.queued())
        loop = asyncio.get_running_loop()
        if self.draining and self.hub.connection_count() == 0:
            self.stop()
            return
        step = self.tick_step
        self.next_tick += step
        now = loop.time()
        if self.next_tick < now:  # late: the next slot, not a burst to catch up
            self.next_tick += math.ceil((now - self.next_tick) / step) * step
        self.ticker = loop.call_at(self.next_tick, self.tick)

    def on_signal(self, sig: signal.Signals) -> None:
        if self.draining:
            # One SIGTERM to the whole process group (systemd's default
            # KillMode, `timeout`, `kill -- -PGID`) reaches this worker
            # twice: from the sender and forwarded by the supervisor. It is
            # one drain; a second signal to the supervisor kills at once.
            log(logging.DEBUG, "already draining", signal=sig.name, worker=self.index)
            return
        log(
            logging.INFO,
            "draining",
            signal=sig.name,
            worker=self.index,
            peers=self.hub.peer_count(),
        )
        self.draining = True
        self.hub.close_all(CLOSE_GOING_AWAY, GOING_AWAY_REASON)
        loop = asyncio.get_running_loop()
        loop.call_later(self.config.drain_timeout, self.end_drain)

    def end_drain(self) -> None:
        if self.hub.connection_count():
            log(logging.WARNING, "drain timed out", connections=self.hub.connection_count())
            self.hub.abort_all()
        self.stop()

    def stop(self) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(None)


def die_with_parent(parent: int) -> None:
    """Have the kernel send SIGTERM (a drain) to this process when its
    parent dies, so a supervisor killed with SIGKILL leaves no worker
    holding the port."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def run(
    config: Config,
    index: int = 0,
    group: str = "",
    parent: int | None = None,
    metrics_fd: int | None = None,
    port_lock: int | None = None,
) -> None:
    """Run worker ``index`` until it is drained; the entry point of a worker
    process (started by the supervisor with the ``spawn`` method).
    ``metrics_fd`` is the supervisor's metrics table, and ``port_lock`` the
    server's lock on its port (see :func:`lock_port`), both inherited; the
    lock stays open as long as the process runs."""
    configure(config.log_level)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if parent is not None:
        die_with_parent(parent)
    try:
        listener = bind_listener(config)
    except OSError as exc:
        log(logging.ERROR, "cannot listen", host=config.host, port=config.port, error=str(exc))
        sys.exit(EXIT_BOOT_ERROR)
    admin_listener = None
    if config.admin_port is not None:
        try:
            admin_listener = bind_listener(config, config.admin_host, config.admin_port)
        except OSError as exc:
            host = config.admin_host or config.host
            log(logging.ERROR, "cannot listen", host=host, port=config.admin_port, error=str(exc))
            sys.exit(EXIT_BOOT_ERROR)
    metrics = None
    if metrics_fd is not None:
        metrics = MetricsTable(metrics_fd, config.workers)
        os.close(metrics_fd)
    worker = Worker(config, index, group, metrics)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - platforms without uvloop
        asyncio.run(worker.serve(listener, admin_listener))
    else:
        uvloop.run(worker.serve(listener, admin_listener))
    flush()
