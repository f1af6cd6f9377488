"""A worker process: one uvloop event loop serving WebSocket peers.

The worker owns a Rust ``Hub`` (its topics, peers and their queues). It
accepts connections, runs each HTTP upgrade in a :class:`Handshake`, then
hands the transport to the hub. With several workers, each listens on the
same port (``SO_REUSEPORT``) and an :class:`Acceptor` sends every join to
the worker that owns its topic, so all peers of a topic live in one
process. A timer drives the hub's pings and timeouts.

SIGTERM drains: ``/readyz`` answers 503, upgrades are refused with 503,
every peer is sent close 1001, and the worker exits once they are gone or
the drain timeout has passed; a second SIGTERM exits at once. SIGINT is
the supervisor's to handle (a terminal's Ctrl-C reaches every process of
the group) and is ignored here.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import socket
import sys
from typing import Any

from signaling_sharded._native import Hub, MetricsTable, RequestReader
from signaling_sharded.cluster import Cluster
from signaling_sharded.config import Config
from signaling_sharded.handshake import WORKER_HEADER, Handshake
from signaling_sharded.logs import configure, flush, log

#: Close code and reason sent to every peer when the server drains.
CLOSE_GOING_AWAY = 1001
GOING_AWAY_REASON = "server going away"
#: Exit code of a worker that could not start (e.g. the port is taken): the
#: supervisor stops the server instead of restarting it.
EXIT_BOOT_ERROR = 3
LISTEN_BACKLOG = 4096


def tick_period(config: Config) -> float:
    """How often the hub checks pings and timeouts: a few times per the
    shortest of them, so a timeout fires at most a quarter late."""
    shortest = min(config.ping_interval, config.ping_timeout, config.close_timeout)
    return min(max(shortest / 4, 0.02), 1.0)


def bind_listener(config: Config) -> socket.socket:
    """This worker's listening socket; shared with the others through
    SO_REUSEPORT when there are several."""
    family, kind, proto, _, address = socket.getaddrinfo(
        config.host, config.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if config.workers > 1:
            # No TCP_DEFER_ACCEPT: the kernel would hold a silent client for
            # its own timeout before our handshake deadline even starts.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


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
        self.cluster: Cluster | None = None
        cluster_options: dict[str, Any] = {}
        if config.redis_url is not None:
            self.cluster = Cluster(config.redis_url, config.redis_prefix, index)
            cluster_options = {
                "cluster_node": self.cluster.node,
                "cluster_prefix": config.redis_prefix,
                "on_cluster": self.cluster.submit,
            }
        self.hub = Hub(
            max_message_size=config.max_message_size,
            max_queue_bytes=config.max_queue_bytes,
            ping_interval=config.ping_interval,
            ping_timeout=config.ping_timeout,
            close_timeout=config.close_timeout,
            on_left=self.on_left,
            max_peers_per_topic=config.max_peers_per_topic,
            max_connections=config.max_connections,
            rate_limit=config.rate_limit,
            rate_burst=config.rate_burst,
            stun_uris=list(config.stun_uris),
            turn_uris=list(config.turn_uris),
            turn_secret=config.turn_secret,
            turn_ttl=config.turn_ttl,
            metrics=metrics,
            worker=index,
            **cluster_options,
        )
        # A request without Origin (a native client) always passes the
        # allow-list.
        self.reader = RequestReader(list(config.allowed_origins) or None)
        self.handshakes: set[Handshake] = set()
        self.draining = False
        self.done: asyncio.Future[None] | None = None

    def switching_protocols(self, accept: str) -> bytes:
        """The 101 response accepting an upgrade whose key gives ``accept``."""
        return (
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n"
            f"{WORKER_HEADER}: {self.index}\r\n\r\n"
        ).encode()

    def on_left(self, peer: str, topic: str, reason: str) -> None:
        log(logging.INFO, "peer left", peer=peer, topic=topic, reason=reason)

    def metrics_text(self) -> str:
        """Every worker's metrics, as Prometheus text."""
        return self.hub.metrics_text()

    def count_handshake_failure(self, reason: str) -> None:
        self.hub.count_handshake_failure(reason)

    async def serve(self, listener: socket.socket) -> None:
        from signaling_sharded.acceptor import Acceptor

        loop = asyncio.get_running_loop()
        self.done = loop.create_future()
        acceptor: Acceptor | None = None
        server: asyncio.AbstractServer | None = None
        if self.config.workers > 1:
            acceptor = Acceptor(self, listener, self.group)
            await acceptor.start()
        else:
            server = await loop.create_server(
                lambda: Handshake(self), sock=listener, backlog=LISTEN_BACKLOG
            )
        loop.add_signal_handler(signal.SIGTERM, self.on_signal, signal.SIGTERM)
        ticker = loop.call_later(tick_period(self.config), self.tick)
        if self.cluster is not None:
            self.cluster.start(self.hub)
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
            ticker.cancel()
            if acceptor is not None:
                acceptor.close()
            if server is not None:
                server.close()
            for handshake in list(self.handshakes):
                handshake.close()
            if self.cluster is not None:
                await self.cluster.close()
        log(logging.INFO, "stopped", worker=self.index)

    def tick(self) -> None:
        self.hub.tick()
        loop = asyncio.get_running_loop()
        if self.draining and self.hub.connection_count() == 0:
            self.stop()
            return
        loop.call_later(tick_period(self.config), self.tick)

    def on_signal(self, sig: signal.Signals) -> None:
        if self.draining:
            log(logging.WARNING, "second signal: exiting now", signal=sig.name, worker=self.index)
            self.hub.abort_all()
            self.stop()
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
) -> None:
    """Run worker ``index`` until it is drained; the entry point of a worker
    process (started by the supervisor with the ``spawn`` method).
    ``metrics_fd`` is the supervisor's metrics table, inherited."""
    configure(config.log_level)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if parent is not None:
        die_with_parent(parent)
    try:
        listener = bind_listener(config)
    except OSError as exc:
        log(logging.ERROR, "cannot listen", host=config.host, port=config.port, error=str(exc))
        sys.exit(EXIT_BOOT_ERROR)
    metrics = None
    if metrics_fd is not None:
        metrics = MetricsTable(metrics_fd, config.workers)
        os.close(metrics_fd)
    worker = Worker(config, index, group, metrics)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - platforms without uvloop
        asyncio.run(worker.serve(listener))
    else:
        uvloop.run(worker.serve(listener))
    flush()
