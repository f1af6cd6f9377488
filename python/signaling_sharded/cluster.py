"""Cluster mode: several servers share topics through Redis.

Every worker process is a *node*, named afresh at each start. It keeps
``{prefix}alive:{node}`` alive (a 10 s TTL, refreshed every 3 s) and
subscribes to its inbox channel ``{prefix}node:{node}``. Presence lives in
Redis and is changed only by the functions of ``cluster.lua``, which publish
each change to the inboxes of the nodes that hold members of the topic; the
Rust core keeps each topic's remote members and turns those events into
``peer-joined``/``peer-left`` for the local peers.

The hub hands this module its work (``submit``): joins, leaves and
publishes, in the order they must happen. They go to Redis on one
connection, pipelined: what was submitted while a batch was on its way
goes in the next one, so per-pair FIFO holds. Replies come back to the hub:
a join's snapshot, and relays that reached no subscriber (the target's node
is gone: its sender gets ``target_not_found``).

Failure handling:

- A node whose ``alive`` key expired, or whose inbox has had no subscriber
  for ``DEAD_CHECKS`` checks in a row, is dead. Whoever notices first takes
  the ``{prefix}reap:{node}`` lock (``SET NX``) and removes its members,
  which tells every other node (``peer-left``).
- Redis unreachable: local peers and relays go on; relays to remote peers
  are answered ``dropped``; joins are served with what is known. The node
  reconnects with backoff, resubscribes, rewrites its presence (``sync``)
  and applies the differences, so views are exact again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import traceback
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import TYPE_CHECKING, Any

from redis import asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from signaling_sharded.logs import log

if TYPE_CHECKING:
    from signaling_sharded._native import Hub

#: Seconds the ``alive`` key lives, and between its refreshes.
ALIVE_TTL = 10.0
HEARTBEAT = 3.0
#: Seconds a presence entry lives unless its node refreshes it, and how
#: often nodes refresh theirs.
ENTRY_TTL = 60.0
TOUCH_EVERY = 20.0
#: Seconds between checks of the nodes this one shares topics with, and
#: the checks in a row without a subscriber that make a node dead.
CHECK_EVERY = 1.0
DEAD_CHECKS = 2
#: Seconds a Redis command may take before the connection is deemed lost.
COMMAND_TIMEOUT = 5.0
#: Reconnect backoff: first and longest wait, in seconds.
BACKOFF = (0.1, 2.0)

Op = tuple[Any, ...]


def node_name() -> str:
    """A name for this worker process, unique across restarts."""
    host = socket.gethostname().split(".")[0][:24] or "node"
    return f"{host}-{os.getpid()}-{os.urandom(3).hex()}"


class Cluster:
    """One worker's link to the cluster."""

    def __init__(self, url: str, prefix: str, worker: int) -> None:
        self.url = url
        self.prefix = prefix
        self.worker = worker
        self.node = node_name()
        self.inbox = f"{prefix}node:{self.node}".encode()
        self.hub: Hub | None = None
        self.up = False
        self.closing = False
        self.queue: list[Op] = []
        #: Set when the queue has work; made in `start`, inside the loop.
        self.wakeup: asyncio.Event = None  # type: ignore[assignment]
        #: A batch is on its way to Redis.
        self.busy = False
        self.writer: aioredis.Redis | None = None
        self.control: aioredis.Redis | None = None
        #: Consecutive checks each remote node was found without a subscriber.
        self.silent: dict[str, int] = {}
        self.task: asyncio.Task[None] | None = None
        self.library = (resources.files("signaling_sharded") / "cluster.lua").read_text()

    # --- the hub's side --------------------------------------------------

    def submit(self, ops: list[Op]) -> None:
        """Work from the hub, in order (called by the Rust core)."""
        if self.up:
            self.queue.extend(ops)
            self.wakeup.set()
        else:
            # Not from inside the hub's call: answering may call it again.
            asyncio.get_running_loop().call_soon(self.refuse, ops)

    def refuse(self, ops: list[Op]) -> None:
        """Answer work that cannot reach Redis: joins are served with what
        is known, relays to remote peers are ``dropped``; leaves and the
        rest are rewritten by the next sync."""
        hub = self.hub
        assert hub is not None
        for op in ops:
            kind = op[0]
            if wants_snapshot(op):
                hub.snapshot(op[1])
            elif kind == "publish" and op[2][:1] == b"R":
                hub.undeliverable(op[2], False)

    # --- lifecycle ---------------------------------------------------------

    def start(self, hub: Hub) -> None:
        self.hub = hub
        self.wakeup = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self.run())

    async def close(self) -> None:
        """Flush what is queued (the leaves of a drain), remove what is left
        of this node from Redis, and disconnect."""
        self.closing = True
        if self.up:
            with contextlib.suppress(RedisError, OSError, asyncio.TimeoutError):
                await asyncio.wait_for(self.drained(), COMMAND_TIMEOUT)
                assert self.control is not None
                await self.control.fcall(
                    "signaling_reap", 0, self.prefix, self.node, ms(ENTRY_TTL), "0"
                )
                await self.control.delete(self.key("alive", self.node))
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        await self.disconnect()

    async def drained(self) -> None:
        while self.queue or self.wakeup.is_set() or self.busy:
            await asyncio.sleep(0.01)

    def key(self, kind: str, name: str) -> str:
        return f"{self.prefix}{kind}:{name}"

    async def run(self) -> None:
        delay = BACKOFF[0]
        while not self.closing:
            try:
                await self.connect()
                delay = BACKOFF[0]
                await self.serve()
            except (RedisError, OSError, asyncio.TimeoutError) as exc:
                if self.up:
                    log(logging.WARNING, "cluster lost", worker=self.worker, error=str(exc))
                else:
                    log(logging.DEBUG, "cluster unreachable", worker=self.worker, error=str(exc))
            except Exception as exc:  # a bug: start over rather than stay cut off
                log(
                    logging.ERROR,
                    "cluster lost",
                    worker=self.worker,
                    error=f"{type(exc).__name__}: {exc}",
                    traceback=traceback.format_exc(),
                )
            finally:
                self.go_down()
                await self.disconnect()
            if self.closing:
                return
            await asyncio.sleep(random.uniform(delay / 2, delay))
            delay = min(delay * 2, BACKOFF[1])

    async def connect(self) -> None:
        options: dict[str, Any] = {
            "socket_timeout": COMMAND_TIMEOUT,
            "socket_connect_timeout": COMMAND_TIMEOUT,
            "health_check_interval": 0,
        }
        # One connection each, never a pool: the writer's order is the
        # order Redis applies (and delivers) the work in.
        self.writer = aioredis.Redis.from_url(self.url, single_connection_client=True, **options)
        self.control = aioredis.Redis.from_url(self.url, single_connection_client=True, **options)
        await self.control.function_load(self.library, replace=True)
        await self.control.set(self.key("alive", self.node), b"1", px=ms(ALIVE_TTL))
        await self.writer.ping()

    async def serve(self) -> None:
        """Subscribed and resynchronised, until a connection fails."""
        assert self.control is not None and self.hub is not None
        pubsub = self.control.pubsub()
        await pubsub.subscribe(self.inbox)
        try:
            await self.receive_confirmation(pubsub)
            self.up = True
            self.resync(announce=True)
            tasks = [
                asyncio.ensure_future(self.read(pubsub)),
                asyncio.ensure_future(self.write()),
                asyncio.ensure_future(self.every(HEARTBEAT, self.heartbeat)),
                asyncio.ensure_future(self.every(CHECK_EVERY, self.check_nodes)),
                asyncio.ensure_future(self.every(TOUCH_EVERY, self.touch)),
            ]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
                for task in done:
                    task.result()  # raises what ended it
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def receive_confirmation(self, pubsub: Any) -> None:
        message = await pubsub.get_message(timeout=COMMAND_TIMEOUT)
        if message is None or message.get("type") != "subscribe":
            raise RedisError(f"no subscription confirmation: {message!r}")

    def go_down(self) -> None:
        if not self.up:
            return
        self.up = False
        pending, self.queue = self.queue, []
        self.refuse(pending)
        self.wakeup.clear()

    async def disconnect(self) -> None:
        for client in (self.writer, self.control):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.aclose()
        self.writer = self.control = None

    # --- the connections' loops -----------------------------------------

    def resync(self, *, announce: bool = False) -> None:
        """Rewrite this node's presence and take every topic's snapshot
        again (after a reconnect, or when Redis lost some of it)."""
        hub = self.hub
        assert hub is not None
        hub.begin_resync()
        for topic, members in hub.local_members():
            self.queue.append(("sync", topic, members))
        if announce:
            self.queue.append(("ready",))
        self.wakeup.set()

    async def read(self, pubsub: Any) -> None:
        hub = self.hub
        assert hub is not None
        while True:
            message = await pubsub.get_message(timeout=None)
            if message is not None and message["type"] == "message":
                hub.deliver(message["data"])

    async def write(self) -> None:
        while True:
            await self.wakeup.wait()
            self.wakeup.clear()
            while self.queue:
                batch, self.queue = self.queue, []
                self.busy = True
                try:
                    await self.send(batch)
                except BaseException:
                    self.refuse(batch)
                    raise
                finally:
                    self.busy = False

    async def send(self, batch: list[Op]) -> None:
        writer, hub = self.writer, self.hub
        assert writer is not None and hub is not None
        pipe = writer.pipeline(transaction=False)
        expected: list[Op] = []
        ttl = ms(ENTRY_TTL)
        for op in batch:
            kind = op[0]
            if kind == "publish":
                pipe.publish(self.prefix.encode() + b"node:" + op[1].encode(), op[2])
            elif kind == "join":
                _, topic, peer, metadata, want = op
                pipe.fcall(
                    "signaling_join",
                    0,
                    self.prefix,
                    topic,
                    peer,
                    self.node,
                    metadata or "",
                    "1" if want else "0",
                    ttl,
                )
            elif kind == "leave":
                _, topic, peer = op
                pipe.fcall("signaling_leave", 0, self.prefix, topic, peer, self.node, ttl)
            elif kind == "sync":
                _, topic, members = op
                flat = [item for peer, metadata in members for item in (peer, metadata or "")]
                pipe.fcall("signaling_sync", 0, self.prefix, topic, self.node, ttl, *flat)
            elif kind == "touch":
                _, topic, peers = op
                pipe.fcall("signaling_touch", 0, self.prefix, topic, self.node, ttl, *peers)
            else:
                continue
            expected.append(op)
        results = await pipe.execute(raise_on_error=False) if expected else []
        resync = False
        for op, result in zip(expected, results):
            kind = op[0]
            if isinstance(result, Exception):
                if isinstance(result, (RedisConnectionError, RedisTimeoutError, OSError)):
                    raise result
                log(logging.ERROR, "cluster command failed", op=kind, error=str(result))
                if wants_snapshot(op):
                    hub.snapshot(op[1])
                continue
            if kind == "publish":
                if result == 0 and op[2][:1] == b"R":
                    hub.undeliverable(op[2], True)
            elif wants_snapshot(op):
                hub.snapshot(op[1], *snapshot(result))
            elif kind == "touch" and result:
                resync = True
        if any(op[0] == "ready" for op in batch):
            log(logging.INFO, "cluster ready", worker=self.worker, node=self.node)
        if resync:
            log(logging.WARNING, "cluster lost some of this node's presence; resyncing")
            self.resync()

    async def every(self, seconds: float, step: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(seconds)
            await step()

    async def heartbeat(self) -> None:
        control = self.control
        assert control is not None
        alive = self.key("alive", self.node)
        if not await control.set(alive, b"1", px=ms(ALIVE_TTL), xx=True):
            # The key expired: others may have reaped this node.
            await control.set(alive, b"1", px=ms(ALIVE_TTL))
            log(logging.WARNING, "cluster: this node was deemed dead; resyncing")
            self.resync()

    async def touch(self) -> None:
        hub = self.hub
        assert hub is not None
        for topic, members in hub.local_members():
            self.queue.append(("touch", topic, [peer for peer, _ in members]))
        self.wakeup.set()

    async def check_nodes(self) -> None:
        """Reap the nodes this one shares topics with that are dead."""
        control, hub = self.control, self.hub
        assert control is not None and hub is not None
        nodes = hub.remote_nodes()
        self.silent = {node: self.silent.get(node, 0) for node in nodes}
        if not nodes:
            return
        pipe = control.pipeline(transaction=False)
        for node in nodes:
            pipe.exists(self.key("alive", node))
            pipe.pubsub_numsub(self.key("node", node))
        results = await pipe.execute()
        for index, node in enumerate(nodes):
            alive = results[2 * index]
            (_, subscribers), *_ = results[2 * index + 1]
            self.silent[node] = 0 if subscribers else self.silent[node] + 1
            if not alive or self.silent[node] >= DEAD_CHECKS:
                await self.reap(node)

    async def reap(self, node: str) -> None:
        control = self.control
        assert control is not None
        lock = self.key("reap", node)
        if await control.set(lock, self.node.encode(), nx=True, px=ms(ALIVE_TTL)):
            removed = await control.fcall(
                "signaling_reap", 0, self.prefix, node, ms(ENTRY_TTL), "1"
            )
            await control.delete(self.key("alive", node))
            log(logging.WARNING, "cluster: reaped a dead node", node=node, peers=removed)


def wants_snapshot(op: Op) -> bool:
    """Whether the hub waits for this op's snapshot of its topic."""
    return (op[0] == "join" and bool(op[4])) or op[0] == "sync"


def ms(seconds: float) -> int:
    return int(seconds * 1000)


def snapshot(result: list[Any]) -> tuple[int, list[tuple[str, str, str | None]]]:
    """A function's snapshot reply: the version and (peer, node, metadata)."""
    version = int(result[0])
    members = []
    for index in range(1, len(result) - 2, 3):
        peer, node, metadata = result[index : index + 3]
        members.append((text(peer), text(node), text(metadata) or None))
    return version, members


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
