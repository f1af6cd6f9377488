"""A worker process: one uvloop event loop serving WebSocket peers.

The worker owns a Rust ``Hub`` (its topics, peers and their queues). It
accepts connections, runs each HTTP upgrade in a :class:`Handshake`, then
hands the transport to the hub. A timer drives the hub's pings and
timeouts. SIGTERM or SIGINT drains: ``/readyz`` answers 503, upgrades are
refused with 503, every peer is sent close 1001, and the worker exits once
they are gone or the drain timeout has passed; a second signal exits at
once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections import Counter

from websockets.typing import Origin

from signaling_sharded._native import Hub
from signaling_sharded.config import Config
from signaling_sharded.handshake import Handshake
from signaling_sharded.logs import log

#: Close code and reason sent to every peer when the server drains.
CLOSE_GOING_AWAY = 1001
GOING_AWAY_REASON = "server going away"


def tick_period(config: Config) -> float:
    """How often the hub checks pings and timeouts: a few times per the
    shortest of them, so a timeout fires at most a quarter late."""
    shortest = min(config.ping_interval, config.ping_timeout, config.close_timeout)
    return min(max(shortest / 4, 0.02), 1.0)


class Worker:
    def __init__(self, config: Config, index: int = 0) -> None:
        self.config = config
        self.index = index
        self.hub = Hub(
            max_message_size=config.max_message_size,
            max_queue_bytes=config.max_queue_bytes,
            ping_interval=config.ping_interval,
            ping_timeout=config.ping_timeout,
            close_timeout=config.close_timeout,
            on_left=self.on_left,
        )
        # What ServerProtocol checks Origin against; None (no Origin header,
        # a native client) always passes the allow-list.
        self.origins: list[Origin | None] | None = (
            [Origin(origin) for origin in config.allowed_origins] + [None]
            if config.allowed_origins
            else None
        )
        self.handshakes: set[Handshake] = set()
        self.handshake_failures: Counter[str] = Counter()
        self.draining = False
        self.done: asyncio.Future[None] | None = None

    def on_left(self, peer: str, topic: str, reason: str) -> None:
        log(logging.INFO, "peer left", peer=peer, topic=topic, reason=reason)

    def count_handshake_failure(self, reason: str) -> None:
        self.handshake_failures[reason] += 1

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        self.done = loop.create_future()
        server = await loop.create_server(
            lambda: Handshake(self),
            host=self.config.host,
            port=self.config.port,
            reuse_address=True,
            backlog=4096,
        )
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.on_signal, sig)
        ticker = loop.call_later(tick_period(self.config), self.tick)
        log(
            logging.INFO,
            "listening",
            host=self.config.host,
            port=self.config.port,
            worker=self.index,
        )
        try:
            await self.done
        finally:
            ticker.cancel()
            server.close()
            for handshake in list(self.handshakes):
                handshake.close()
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
            log(logging.WARNING, "second signal: exiting now", signal=sig.name)
            self.hub.abort_all()
            self.stop()
            return
        log(logging.INFO, "draining", signal=sig.name, peers=self.hub.peer_count())
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


def run(config: Config, index: int = 0) -> None:
    """Run one worker until it is drained."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - platforms without uvloop
        asyncio.run(Worker(config, index).serve())
    else:
        uvloop.run(Worker(config, index).serve())
