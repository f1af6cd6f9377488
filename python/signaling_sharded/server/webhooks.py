"""Webhooks (PROTOCOL.md section 11): the server tells the application's
backend when peers join and leave and topics open and close.

Each worker sends the events of the topics it holds, so one sender sees a
topic's every change, in order (cluster mode: the node whose Redis call
made the change sends it, numbered by Redis, see cluster.py). An event is
encoded once, when it happens, and kept for each URL in a bounded queue
(``--webhook-queue``): what does not fit is dropped and counted
(``signaling_webhook_events_total{result="overflow"}``), and so is the
``peer.left`` or ``topic.closed`` of a dropped ``peer.joined`` or
``topic.opened``: a receiver never sees an end without its start.

Each URL has one request in flight: events that come meanwhile make the
next batch (at most ``MAX_BATCH``), so a busy server sends a request per
round trip rather than one per event. A batch is retried (the same body,
signed again with a fresh timestamp) with backoff until it is answered 2xx
or ``RETRY_FOR`` seconds have passed; later events wait behind it, so a URL
gets its events in order. A redirect is a failure: it would turn the POST
into a GET.

The client is aiohttp: the asyncio HTTP client the field uses and keeps
(aio-libs), on any event loop (uvloop here), with pooled keep-alive
connections, TLS from the standard library and per-request timeouts.
httpx's async client adds anyio and httpcore for the same job. It is
imported only when webhooks are on.

Nothing here runs on the relay path: joins and leaves only queue bytes.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from signaling_sharded import __version__
from signaling_sharded.server.logs import log, timestamp

if TYPE_CHECKING:
    import aiohttp

#: Events per request, at most.
MAX_BATCH = 500
#: Seconds a batch is retried before its events are given up.
RETRY_FOR = 120.0
#: Retry backoff: first and longest wait, in seconds (jittered).
BACKOFF = (0.5, 10.0)
#: Seconds one request may take.
REQUEST_TIMEOUT = 10.0
#: Seconds a stopping worker keeps sending what is queued (a drain's leaves).
FLUSH_ON_STOP = 3.0
#: Seconds between two warnings about one URL.
WARN_EVERY = 10.0
SIGNATURE_HEADER = "Signaling-Signature"
#: The events that start what another ends, and those that end it.
STARTS = frozenset(("peer.joined", "topic.opened"))
ENDS = frozenset(("peer.left", "topic.closed"))


def signature(secret: bytes, unix: int, body: bytes) -> str:
    """The ``Signaling-Signature`` of ``body`` sent at ``unix`` seconds."""
    digest = hmac.new(secret, b"%d." % unix + body, hashlib.sha256).hexdigest()
    return f"t={unix},v1={digest}"


class Event(NamedTuple):
    """One encoded event. ``opens``/``closes``: the peer id (or topic) whose
    start or end it is, ``about``: whose update, so that what follows a
    dropped start is dropped too."""

    data: bytes
    opens: str | None
    closes: str | None
    about: str | None = None


#: A str as JSON (quoted and escaped; the json module's own, in C).
quoted: Callable[[str], str] = json.encoder.encode_basestring


@dataclass
class Sender:
    """One URL: its queue and its loop."""

    url: str
    limit: int
    queue: deque[Event] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    #: Starts whose events were dropped: their ends are dropped too.
    dropped: set[str] = field(default_factory=set)
    #: A batch is on its way.
    busy: bool = False
    warned: float = float("-inf")

    def put(self, event: Event) -> bool:
        """Queues ``event``; False if it was dropped."""
        if event.closes is not None and event.closes in self.dropped:
            self.dropped.discard(event.closes)
            return False
        if event.about is not None and event.about in self.dropped:
            return False
        if len(self.queue) >= self.limit:
            if event.opens is not None:
                self.dropped.add(event.opens)
            return False
        self.queue.append(event)
        self.wake.set()
        return True

    def forget(self, batch: list[Event]) -> None:
        """``batch`` was given up: its starts count as dropped."""
        self.dropped.update(event.opens for event in batch if event.opens is not None)


class Webhooks:
    """A worker's webhooks."""

    def __init__(
        self,
        urls: tuple[str, ...],
        secret: str,
        queue: int,
        count: Callable[[str, int], object],
        count_request: Callable[[str], object],
    ) -> None:
        self.secret = secret.encode()
        self.senders = [Sender(url, queue) for url in urls]
        self.count = count
        self.count_request = count_request
        #: Event ids: this process's prefix, then a counter.
        self.prefix = os.urandom(6).hex()
        self.next_id = 0
        #: Single-server: each topic's local members, and the last seq.
        self.members: dict[str, int] = {}
        self.last_seq = 0
        self.tasks: list[asyncio.Task[None]] = []
        self.session: aiohttp.ClientSession | None = None

    # --- events -------------------------------------------------------------

    def seq(self) -> int:
        """The next seq of this worker's topics: microseconds since the
        epoch, strictly increasing, so it also increases across restarts."""
        self.last_seq = max(time.time_ns() // 1000, self.last_seq + 1)
        return self.last_seq

    def joined(self, peer: str, topic: str, metadata: str | None) -> None:
        """A peer joined ``topic`` here (single-server mode)."""
        count = self.members.get(topic, 0)
        self.members[topic] = count + 1
        if count == 0:
            self.emit("topic.opened", topic, self.seq())
        self.emit("peer.joined", topic, self.seq(), peer, metadata)

    def updated(self, peer: str, topic: str, metadata: str | None, seq: int | None = None) -> None:
        """A peer of ``topic`` changed its metadata; ``metadata`` None: it
        has none now (sent as ``null``). ``seq``: the change's (cluster
        mode), else the next of this worker's."""
        self.emit(
            "peer.updated", topic, self.seq() if seq is None else seq, peer, metadata or "null"
        )

    def left(self, peer: str, topic: str, reason: str) -> None:
        """A peer left ``topic`` here (single-server mode)."""
        self.emit("peer.left", topic, self.seq(), peer, reason=reason)
        count = self.members.pop(topic, 1) - 1
        if count > 0:
            self.members[topic] = count
        else:
            self.emit("topic.closed", topic, self.seq())

    def emit(
        self,
        kind: str,
        topic: str,
        seq: int,
        peer: str | None = None,
        metadata: str | None = None,
        *,
        reason: str | None = None,
    ) -> None:
        """Queues one event for every URL; ``metadata`` is JSON text."""
        self.next_id += 1
        if peer is None:
            key, about = f"t{topic}", ""
        else:
            key, about = f"p{peer}", f',"peerId":"{peer}"'
        if metadata is not None:
            about += f',"metadata":{metadata}'
        if reason is not None:
            about += f',"reason":"{reason}"'
        data = (
            f'{{"id":"{self.prefix}-{self.next_id}","type":"{kind}","topic":{quoted(topic)}'
            f'{about},"time":"{timestamp()}","seq":{seq}}}'
        ).encode()
        event = Event(
            data,
            key if kind in STARTS else None,
            key if kind in ENDS else None,
            key if kind == "peer.updated" else None,
        )
        for sender in self.senders:
            if not sender.put(event):
                self.count("overflow", 1)
                self.warn(sender, "webhook queue full: events dropped", queued=len(sender.queue))

    def queued(self) -> int:
        return sum(len(sender.queue) for sender in self.senders)

    # --- sending ------------------------------------------------------------

    def start(self) -> None:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
        self.session = aiohttp.ClientSession(timeout=timeout, raise_for_status=False)
        loop = asyncio.get_running_loop()
        self.tasks = [loop.create_task(self.run(sender)) for sender in self.senders]

    async def close(self) -> None:
        """Sends what is queued for at most ``FLUSH_ON_STOP`` seconds, then
        stops."""
        deadline = time.monotonic() + FLUSH_ON_STOP
        while time.monotonic() < deadline and any(s.queue or s.busy for s in self.senders):
            await asyncio.sleep(0.02)
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.session is not None:
            await self.session.close()
        left = self.queued()
        if left:
            log(logging.WARNING, "webhook events not sent at stop", events=left)

    async def run(self, sender: Sender) -> None:
        while True:
            while not sender.queue:
                sender.wake.clear()
                await sender.wake.wait()
            count = min(len(sender.queue), MAX_BATCH)
            batch = [sender.queue.popleft() for _ in range(count)]
            sender.busy = True
            try:
                await self.deliver(sender, batch)
            finally:
                sender.busy = False

    async def deliver(self, sender: Sender, batch: list[Event]) -> None:
        """POSTs ``batch`` until it is answered 2xx or ``RETRY_FOR`` passed."""
        import aiohttp

        session = self.session
        assert session is not None
        body = b'{"events":[' + b",".join(event.data for event in batch) + b"]}"
        started = time.monotonic()
        delay = BACKOFF[0]
        while True:
            headers = {
                "Content-Type": "application/json",
                "User-Agent": f"signaling-sharded/{__version__}",
                SIGNATURE_HEADER: signature(self.secret, int(time.time()), body),
            }
            try:
                async with session.post(
                    sender.url, data=body, headers=headers, allow_redirects=False
                ) as response:
                    await response.read()
                    if 200 <= response.status < 300:
                        self.count_request("ok")
                        self.count("sent", len(batch))
                        return
                    failure = f"HTTP {response.status}"
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                failure = f"{type(exc).__name__}: {exc}"
            self.count_request("failed")
            if time.monotonic() - started >= RETRY_FOR:
                sender.forget(batch)
                self.count("expired", len(batch))
                log(
                    logging.ERROR,
                    "webhook events given up",
                    url=sender.url,
                    events=len(batch),
                    error=failure,
                )
                return
            self.warn(sender, "webhook request failed; retrying", error=failure)
            await asyncio.sleep(random.uniform(delay / 2, delay))
            delay = min(delay * 2, BACKOFF[1])

    def warn(self, sender: Sender, message: str, **fields: object) -> None:
        now = time.monotonic()
        if now - sender.warned >= WARN_EVERY:
            sender.warned = now
            log(logging.WARNING, message, url=sender.url, **fields)
