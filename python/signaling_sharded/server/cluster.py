"""Cluster mode: several servers share topics through Redis.

Every worker process is a *node*, named afresh at each start. It keeps
``{prefix}alive:{node}`` alive (a 10 s TTL, refreshed every 3 s) and
subscribes to its inbox channel ``{prefix}node:{node}``. Presence lives in
Redis and is changed only by the functions of ``cluster.lua``, which publish
each change to the inboxes of the nodes that hold members of the topic; the
Rust core keeps each topic's remote members and turns those events into
``peer-joined``/``peer-left`` for the local peers.

The hub publishes to other nodes itself: the writer connection is its own
once set up (``Hub.attach_redis``), and what one event loop iteration
publishes to a node goes in one ``PUBLISH`` (see the Rust core's
``engine/publish.rs``); a relay that reached no subscriber (the target's
node is gone) gets its sender ``target_not_found``. The rest of the hub's
work comes here (``submit``): joins, leaves, syncs, in the order it must
happen; it is encoded here and written through the hub after what was
published before, on the one connection, so Redis applies and delivers it
all in that order and per-pair FIFO holds. Its replies come back here: a
join's snapshot, a leave's change. The inbox connection is the hub's too
(``Hub.inbox``): messages for peers reach the Rust core with no Python in
between, the admin API's come here.

The admin API (:meth:`Cluster.serve_admin`) answers for the cluster: the topic
listing is read from Redis, and what concerns a topic's peers is asked of
the nodes that hold them, over the same inboxes (a message starting with
``?``), each answering after what it did reached Redis (``!``): after a
kick is answered 204, the peer is gone from every listing.

The writer and the inbox are raw connections (:class:`~.resp.Link`) while
they are set up; redis-py serves the rest.

Failure handling:

- A node whose ``alive`` key expired, or whose inbox has had no subscriber
  for ``DEAD_CHECKS`` checks in a row, is dead. Whoever notices first takes
  the ``{prefix}reap:{node}`` lock (``SET NX``) and removes its members,
  which tells every other node (``peer-left``).
- Redis unreachable: local peers and relays go on; relays to remote peers
  are answered ``dropped``; joins are served with what is known; the admin
  API answers 503. The node
  reconnects with backoff, resubscribes, rewrites its presence (``sync``)
  and applies the differences, so views are exact again. A Redis that lost
  its data has a new mark (``{prefix}epoch``): the members missing from the
  snapshots are then doubted for a while, as their nodes may not be back
  yet (see the Rust core's ``remote.rs``).
- Sentinel (``redis+sentinel://``): see :mod:`.sentinel`. A master turned
  replica answers writes READONLY: the node reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import random
import socket
import time
import traceback
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from importlib import resources
from typing import Any

import hiredis
from redis import asyncio as aioredis
from redis.connection import parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from signaling_sharded._native import (
    AskOp,
    Hub,
    JoinOp,
    LeaveOp,
    MoveOp,
    PublishOp,
    Request,
    UpdateOp,
)
from signaling_sharded.server import admin, sentinel
from signaling_sharded.server.logs import log
from signaling_sharded.server.resp import COMMAND_TIMEOUT, Link, command, text
from signaling_sharded.server.webhooks import Webhooks

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
#: Seconds a joiner waits for its topic's snapshot before it is greeted
#: with what is known (the snapshot then completes its view).
JOIN_WAIT = 1.0
#: Seconds the writer may go without any reply while it waits for some
#: before the connection is deemed lost (a Redis that hangs).
STALL = 3.0
#: Reconnect backoff: first and longest wait, in seconds.
BACKOFF = (0.1, 2.0)
#: Seconds an admin request waits for the answers of the other nodes.
ADMIN_WAIT = 2.0
#: The first byte of an admin request from another node, and of an answer
#: to one of this node's.
ASKED, ANSWERED = b"?", b"!"
#: The webhook reason of the peers of a node found dead, or whose entries
#: expired (their node stopped refreshing them).
NODE_LOST = "node_lost"


@dataclass(frozen=True)
class SyncOp:
    """Rewrite this node's members of ``topic`` (after Redis came back)."""

    topic: str
    members: list[tuple[str, str | None]]


@dataclass(frozen=True)
class TouchOp:
    """Refresh the expiry of this node's ``peers`` of ``topic``."""

    topic: str
    peers: list[str]


@dataclass(frozen=True)
class ReadyOp:
    """A marker, answered once everything sent before it was."""


@dataclass(frozen=True)
class Change:
    """What a function of cluster.lua changed in a topic (see its top): the
    versions it took, from ``first`` to ``version``, numbering its events."""

    version: int
    first: int
    opened: bool
    closed: bool
    #: (peer, node) of each peer that left.
    left: list[tuple[str, str]]
    joined: list[str]


def read_change(reply: list[Any], at: int = 0) -> tuple[Change, int]:
    """The change at ``reply[at:]`` and the index after it."""
    version, first, opened, closed, count = (int(x) for x in reply[at : at + 5])
    at += 5
    left = [(text(reply[at + 2 * i]), text(reply[at + 2 * i + 1])) for i in range(count)]
    at += 2 * count
    count = int(reply[at])
    joined = [text(peer) for peer in reply[at + 1 : at + 1 + count]]
    change = Change(version, first, bool(opened), bool(closed), left, joined)
    return change, at + 1 + count


@dataclass(frozen=True)
class AnswerOp:
    """Answer another node's admin request (``command``: its PUBLISH),
    after what carrying it out sent to Redis."""

    command: bytes


#: Work for Redis: the hub's (JoinOp, LeaveOp, PublishOp, AskOp, MoveOp)
#: and this module's own.
Op = (
    JoinOp | UpdateOp | LeaveOp | PublishOp | AskOp | MoveOp | SyncOp | TouchOp | ReadyOp | AnswerOp
)


def node_name() -> str:
    """A name for this worker process, unique across restarts."""
    host = socket.gethostname().split(".")[0][:24] or "node"
    return f"{host}-{os.getpid()}-{os.urandom(3).hex()}"


class Cluster:
    """One worker's link to the cluster."""

    def __init__(self, url: str, prefix: str, worker: int, flush_delay: float) -> None:
        self.url = url
        #: Seconds the writer's writes are kept apart (``Hub.attach_redis``).
        self.flush_delay = flush_delay
        #: With a ``redis+sentinel://`` URL: where to ask for the master.
        self.sentinels = sentinel.parse(url) if sentinel.is_sentinel_url(url) else None
        #: The address of the Redis this node is connected to, or None.
        self.redis: str | None = None
        #: With Sentinel: the master it named last, as (host, port), and the
        #: one this node last connected to.
        self.named: tuple[str, int] | None = None
        self.master: tuple[str, int] | None = None
        #: The Redis data set's mark (``{prefix}epoch``) last seen, and
        #: whether it changed since (Redis lost its data) with no resync
        #: completed since.
        self.epoch: bytes | None = None
        self.forgot = False
        self.prefix = prefix
        self.worker = worker
        self.node = node_name()
        self.inbox = f"{prefix}node:{self.node}"
        self.hub: Hub | None = None
        self.up = False
        self.closing = False
        #: time.monotonic() since Redis has been unreachable, or None.
        self.down_since: float | None = None
        #: Work sent to Redis whose replies have not come back, in order
        #: (the publishes' replies are read by the hub).
        self.waiting: deque[Op] = deque()
        self.writer: Link | None = None
        self.subscriber: Link | None = None
        #: The replies of `waiting` and the inbox's replies that are not
        #: messages for the hub, as the hub hands them over (whole RESP).
        self.replies = hiredis.Reader()
        self.others = hiredis.Reader()
        self.control: aioredis.Redis | None = None
        #: Consecutive checks each remote node was found without a subscriber.
        self.silent: dict[str, int] = {}
        self.task: asyncio.Task[None] | None = None
        self.subscribed: asyncio.Future[None] | None = None
        self.library = (resources.files("signaling_sharded.server") / "cluster.lua").read_text()
        #: Where this node reports its changes' events (cluster mode sends
        #: each event from the node whose Redis call made the change).
        self.webhooks: Webhooks | None = None
        #: This node's admin requests waiting for other nodes' answers.
        self.asked: dict[int, asyncio.Future[admin.Answer]] = {}
        self.ask_ids = itertools.count(1)

    # --- the hub's side --------------------------------------------------

    def submit(self, ops: list[Op]) -> None:
        """Work from the hub, in order (called by the Rust core). It is
        written to Redis through the hub, after what the hub published
        before: one connection, so Redis applies (and delivers) it in this
        order."""
        if not (self.up and self.writer is not None and self.send(ops)):
            # Not from inside the hub's call: answering may call it again.
            asyncio.get_running_loop().call_soon(self.refuse, ops)

    def refuse(self, ops: Iterable[Op]) -> None:
        """Answer work that cannot reach Redis: joins are served with what
        is known, relays to remote peers are ``dropped``; leaves and the
        rest are rewritten by the next sync."""
        hub = self.hub
        assert hub is not None
        for op in ops:
            topic = wants_snapshot(op)
            if topic is not None:
                hub.snapshot(topic)
            elif isinstance(op, PublishOp) and op.is_relay:
                hub.undeliverable(op, False)
            else:
                failed(hub, op)

    def send(self, ops: list[Op]) -> bool:
        """Writes ``ops``; False if the hub holds no writer any more (the
        only time a PublishOp comes here: the hub publishes itself while it
        holds one)."""
        hub = self.hub
        assert hub is not None
        loop = asyncio.get_running_loop()
        ttl = ms(ENTRY_TTL)
        chunks = []
        for op in ops:
            if isinstance(op, (PublishOp, AnswerOp)):
                chunks.append(op.command)
            elif isinstance(op, JoinOp):
                loop.call_later(JOIN_WAIT, hub.greet_waiting, op.topic)
                chunks.append(
                    command(
                        "FCALL",
                        "signaling_join",
                        0,
                        self.prefix,
                        op.topic,
                        op.peer,
                        self.node,
                        op.metadata or "",
                        1 if op.snapshot else 0,
                        ttl,
                    )
                )
            elif isinstance(op, LeaveOp):
                chunks.append(
                    command(
                        "FCALL",
                        "signaling_leave",
                        0,
                        self.prefix,
                        op.topic,
                        op.peer,
                        self.node,
                        ttl,
                    )
                )
            elif isinstance(op, UpdateOp):
                chunks.append(
                    command(
                        "FCALL",
                        "signaling_update",
                        0,
                        self.prefix,
                        op.topic,
                        op.peer,
                        self.node,
                        op.metadata or "",
                        ttl,
                    )
                )
            elif isinstance(op, SyncOp):
                flat = [item for peer, metadata in op.members for item in (peer, metadata or "")]
                chunks.append(
                    command(
                        "FCALL", "signaling_sync", 0, self.prefix, op.topic, self.node, ttl, *flat
                    )
                )
            elif isinstance(op, AskOp):
                chunks.append(
                    command("FCALL", "signaling_ask", 0, self.prefix, op.topic, op.peer, op.message)
                )
            elif isinstance(op, MoveOp):
                chunks.append(
                    command(
                        "FCALL",
                        "signaling_move",
                        0,
                        self.prefix,
                        op.topic,
                        op.peer,
                        self.node,
                        op.to,
                        ttl,
                        op.conn,
                    )
                )
            elif isinstance(op, TouchOp):
                chunks.append(
                    command(
                        "FCALL",
                        "signaling_touch",
                        0,
                        self.prefix,
                        op.topic,
                        self.node,
                        ttl,
                        *op.peers,
                    )
                )
            else:
                chunks.append(command("PING"))
        if not hub.redis_write(b"".join(chunks), len(ops)):
            return False
        self.waiting.extend(ops)
        return True

    def on_replies(self, raw: bytes, errors: list[str]) -> None:
        """The writer's replies to `waiting` (``raw``, in order), and the
        errors Redis answered the hub's publishes with."""
        hub = self.hub
        assert hub is not None
        resync = demoted = False
        for error in errors:
            demoted = demoted or error.startswith("READONLY")
            log(logging.ERROR, "cluster command failed", op="PublishOp", error=error)
        self.replies.feed(raw)
        while (reply := self.replies.gets()) is not False:
            op = self.waiting.popleft()
            topic = wants_snapshot(op)
            if isinstance(reply, hiredis.ReplyError):
                # A master turned replica (a failover behind a fixed address,
                # or one Sentinel has not told this node of) answers writes
                # READONLY: reconnect, and wait for a master there.
                demoted = demoted or str(reply).startswith("READONLY")
                log(logging.ERROR, "cluster command failed", op=type(op).__name__, error=str(reply))
                if topic is not None:
                    hub.snapshot(topic)
                failed(hub, op)
            elif isinstance(op, AskOp):
                hub.asked(op.conn, bool(reply))
            elif isinstance(op, MoveOp):
                if not reply:
                    hub.move_failed(op.peer)
            elif isinstance(op, (JoinOp, SyncOp)):
                change, at = read_change(reply)
                if isinstance(op, JoinOp):
                    self.report(op.topic, change, {op.peer: op.metadata})
                else:
                    self.report(op.topic, change, dict(op.members))
                if topic is not None:
                    hub.snapshot(topic, change.version, snapshot(reply, at))
            elif isinstance(op, LeaveOp):
                self.report(op.topic, read_change(reply)[0], {}, op.reason)
            elif isinstance(op, UpdateOp):
                change = read_change(reply)[0]
                if self.webhooks is not None and change.version:
                    self.webhooks.updated(op.peer, op.topic, op.metadata, change.first)
            elif isinstance(op, TouchOp) and reply:
                resync = True
            elif isinstance(op, ReadyOp) and not demoted:
                self.forgot = False
                where = {"worker": self.worker, "node": self.node, "redis": self.redis}
                if self.down_since is None:
                    log(logging.INFO, "cluster ready", **where)
                else:
                    after = round(time.monotonic() - self.down_since, 1)
                    log(logging.INFO, "cluster ready", **where, after_s=after)
                    self.down_since = None
        if demoted and self.writer is not None:
            self.writer.close()
        elif resync:
            log(logging.WARNING, "cluster lost some of this node's presence; resyncing")
            self.resync()

    def report(
        self,
        topic: str,
        change: Change,
        metadata: dict[str, str | None],
        reason: str | None = None,
    ) -> None:
        """Sends the webhook events of ``change``, numbered by its versions.
        A peer that left gets ``reason``, else: one of this node's left
        while Redis was away (``disconnected``), another node's was lost."""
        hooks = self.webhooks
        if hooks is None or change.version == 0:
            return
        seq = change.first
        if change.opened:
            hooks.emit("topic.opened", topic, seq)
            seq += 1
        for peer, node in change.left:
            why = reason or ("disconnected" if node == self.node else NODE_LOST)
            hooks.emit("peer.left", topic, seq, peer, reason=why)
            seq += 1
        for peer in change.joined:
            hooks.emit("peer.joined", topic, seq, peer, metadata.get(peer))
            seq += 1
        if change.closed:
            hooks.emit("topic.closed", topic, seq)

    def report_reaped(self, reaped: list[Any], reason: str) -> int:
        """Reports what ``signaling_reap`` removed; how many peers."""
        removed = 0
        for entry in reaped:
            change, _ = read_change(entry, 1)
            removed += len(change.left)
            self.report(text(entry[0]), change, {}, reason)
        return removed

    def on_inbox(self, raw: bytes) -> None:
        """A reply of the inbox connection that the hub does not take (it
        takes the messages for peers), in order with those: the admin
        API's messages, the subscription's confirmation."""
        self.others.feed(raw)
        while (reply := self.others.gets()) is not False:
            if reply[0] == b"message" and reply[2][:1] in (ASKED, ANSWERED):
                self.on_admin(reply[2])
            elif reply[0] == b"subscribe" and self.subscribed and not self.subscribed.done():
                self.subscribed.set_result(None)

    # --- the admin API ------------------------------------------------------

    async def serve_admin(self, request: Request, body: bytes) -> admin.Answer:
        """The cluster's answer to an admin request."""
        if not self.up or self.control is None:
            return admin.unavailable("the cluster is unreachable")
        try:
            if request.admin is None:
                if request.path != admin.TOPICS:
                    return admin.error(404, "not found")
                listing = admin.read_listing(request)
                if isinstance(listing, admin.Answer):
                    return listing
                return await self.topics(listing)
            action = admin.read_action(request, body)
            if isinstance(action, admin.Answer):
                return action
            return await self.carry_out(action)
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            log(logging.WARNING, "admin request failed", error=str(exc))
            return admin.unavailable("the cluster is unreachable")

    async def topics(self, listing: admin.Listing) -> admin.Answer:
        assert self.control is not None
        flat = await self.control.fcall(
            "signaling_topics",
            0,
            self.prefix,
            listing.prefix,
            listing.after or "",
            listing.limit + 1,
        )
        pairs = [(text(flat[i]), int(flat[i + 1])) for i in range(0, len(flat), 2)]
        return admin.topics_page(listing, pairs)

    async def carry_out(self, action: admin.Action) -> admin.Answer:
        """Carries out ``action`` on the nodes that hold the topic's peers,
        or the peer's (``kick``, a message ``to`` one)."""
        assert self.control is not None
        pipe = self.control.pipeline(transaction=False)
        pipe.hkeys(self.key("c", action.topic))
        peer = admin.peer_of(action)
        if peer is not None:
            pipe.hget(self.key("t", action.topic), peer)
        found = await pipe.execute()
        nodes = [text(node) for node in found[0] if node != b"~v"]
        if not nodes:
            return admin.error(404, "unknown topic")
        if peer is not None:
            if found[1] is None:
                return admin.error(404, "unknown peer")
            nodes = [text(found[1]).partition("\n")[0]]
        answers = await asyncio.gather(*(self.ask(node, action) for node in nodes))
        if any(answer is None for answer in answers):
            return admin.unavailable("a node did not answer")
        return admin.merged(action, [answer for answer in answers if answer is not None])

    async def ask(self, node: str, action: admin.Action) -> admin.Answer | None:
        """``node``'s answer to ``action``; None if it did not answer in time."""
        hub, control = self.hub, self.control
        assert hub is not None and control is not None
        if node == self.node:
            return admin.act(hub, action)
        ask_id = next(self.ask_ids)
        answer = asyncio.get_running_loop().create_future()
        self.asked[ask_id] = answer
        message = {"id": ask_id, "from": self.node, **admin.action_to_json(action)}
        try:
            if not await control.publish(
                self.key("node", node), ASKED + json.dumps(message).encode()
            ):
                return None
            return await asyncio.wait_for(answer, ADMIN_WAIT)
        except asyncio.TimeoutError:
            return None
        finally:
            del self.asked[ask_id]

    def on_admin(self, data: bytes) -> None:
        """Another node's admin request, or its answer to one of ours."""
        try:
            message = json.loads(data[1:])
            ask_id = message["id"]
            if data[:1] == ANSWERED:
                waiting = self.asked.get(ask_id)
                if waiting is not None and not waiting.done():
                    waiting.set_result(admin.Answer(message["status"], message.get("body")))
                return
            asked = admin.action_from_json(message)
            node = message["from"]
        except (ValueError, KeyError, TypeError):
            log(logging.ERROR, "cluster: unreadable admin message", message=data[:200])
            return
        hub = self.hub
        assert hub is not None
        answer = admin.error(400, "unknown request") if asked is None else admin.act(hub, asked)
        reply = {"id": ask_id, "status": answer.status, "body": answer.body}
        published = ANSWERED + json.dumps(reply, ensure_ascii=False).encode()
        self.submit([AnswerOp(command("PUBLISH", self.key("node", node), published))])

    # --- lifecycle ---------------------------------------------------------

    def start(self, hub: Hub) -> None:
        self.hub = hub
        self.task = asyncio.get_running_loop().create_task(self.run())

    async def close(self) -> None:
        """Flush what is queued (the leaves of a drain), remove what is left
        of this node from Redis, and disconnect."""
        self.closing = True
        if self.up:
            with contextlib.suppress(RedisError, OSError, asyncio.TimeoutError):
                await asyncio.wait_for(self.drained(), COMMAND_TIMEOUT)
                assert self.control is not None
                reaped = await self.control.fcall(
                    "signaling_reap", 0, self.prefix, self.node, ms(ENTRY_TTL), "0"
                )
                self.report_reaped(reaped, "shutdown")
                await self.control.delete(self.key("alive", self.node))
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        await self.disconnect()

    async def drained(self) -> None:
        """Until everything written to the writer (the hub's publishes, the
        work from here) is answered."""
        assert self.hub is not None
        while self.up and self.hub.redis_busy():
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
                # Said once per outage (then at debug level on every retry),
                # and "cluster ready" says when it is over.
                if self.up:
                    log(logging.WARNING, "cluster lost", worker=self.worker, error=str(exc))
                elif self.down_since is None:
                    log(logging.WARNING, "cluster unreachable", worker=self.worker, error=str(exc))
                else:
                    log(logging.DEBUG, "cluster unreachable", worker=self.worker, error=str(exc))
                if self.down_since is None:
                    self.down_since = time.monotonic()
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
            await self.pause(random.uniform(delay / 2, delay))
            delay = min(delay * 2, BACKOFF[1])

    async def connect(self) -> None:
        hub = self.hub
        assert hub is not None
        url = self.url
        if self.sentinels is not None:
            self.named = await self.sentinels.master()
            url = self.sentinels.master_url(*self.named)
        self.control = aioredis.Redis.from_url(
            url,
            single_connection_client=True,
            socket_timeout=COMMAND_TIMEOUT,
            socket_connect_timeout=COMMAND_TIMEOUT,
            health_check_interval=0,
        )
        self.redis = address_of(url)
        self.replies, self.others = hiredis.Reader(), hiredis.Reader()
        self.writer = await Link.open(url, unasked)
        # HELLO, not ROLE: ROLE is @dangerous, which managed Redis users lack.
        (hello,) = await self.writer.call([command("HELLO")])
        fields = dict(zip(hello[::2], hello[1::2], strict=False))
        role = text(fields.get(b"role", b"master"))
        if role != "master":
            # After a failover, or a URL that names a replica: writes would
            # fail (READONLY). Wait for this one's promotion, or for the
            # Sentinels to name another.
            raise RedisConnectionError(f"Redis at {self.redis} is a {role}, not a master")
        await self.control.function_load(self.library, replace=True)
        # A mark of this data set, kept by whoever comes first: a Redis that
        # restarted empty (or a new master that never had the data) has
        # another, and the resync knows its snapshots may lack members whose
        # nodes are not back yet.
        fresh = os.urandom(8).hex().encode()
        found = await self.control.set(f"{self.prefix}epoch", fresh, nx=True, get=True)
        epoch = found if isinstance(found, bytes) else fresh
        if self.epoch is not None and epoch != self.epoch:
            log(logging.WARNING, "cluster: Redis lost its data; every node rewrites its presence")
            self.forgot = True
        elif self.master is not None and self.master != self.named:
            # A failover: the new master may lack the old one's last writes
            # (replication is asynchronous), whose nodes rewrite them.
            self.forgot = True
        self.epoch = epoch
        self.master = self.named
        await self.control.set(self.key("alive", self.node), b"1", px=ms(ALIVE_TTL))
        self.subscribed = asyncio.get_running_loop().create_future()
        self.subscriber = await Link.open(url, unasked, db=False)
        # From here on uvloop calls into the hub with what the inbox reads.
        lost = self.subscriber.connection_lost
        self.subscriber.hand_over(
            lambda transport: hub.inbox(transport, self.on_inbox, lost, ASKED + ANSWERED)
        )
        self.subscriber.write(command("SUBSCRIBE", self.inbox))
        await asyncio.wait_for(self.subscribed, COMMAND_TIMEOUT)

    async def serve(self) -> None:
        """Subscribed and resynchronised, until a connection fails."""
        writer, hub = self.writer, self.hub
        assert writer is not None and self.subscriber is not None and hub is not None
        # From here on the hub writes to it and reads its replies.
        on_lost = writer.connection_lost
        call_later = asyncio.get_running_loop().call_later
        writer.hand_over(
            lambda transport: hub.attach_redis(
                transport, self.on_replies, on_lost, self.flush_delay, call_later
            )
        )
        self.up = True
        hub.set_cluster_connected(True)
        self.resync(announce=True)
        lost = [writer.lost, self.subscriber.lost]
        tasks = [
            asyncio.ensure_future(self.every(HEARTBEAT, self.heartbeat)),
            asyncio.ensure_future(self.every(CHECK_EVERY, self.check_nodes)),
            asyncio.ensure_future(self.every(STALL / 4, self.watch)),
            asyncio.ensure_future(self.every(TOUCH_EVERY, self.touch)),
        ]
        if self.sentinels is not None:
            tasks.append(asyncio.ensure_future(self.follow(self.sentinels)))
        try:
            done, _ = await asyncio.wait([*tasks, *lost], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # raises what ended it
            raise RedisConnectionError("a connection to Redis was closed")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def follow(self, sentinels: sentinel.Sentinels) -> None:
        """Ends (a reconnect) when the Sentinels move the master."""
        assert self.named is not None
        where = await sentinels.moved(self.named)
        raise RedisConnectionError(f"Sentinel moved the master to {where}")

    async def pause(self, seconds: float) -> None:
        """The wait between attempts to connect; with Sentinel, over as
        soon as the master moves (a failover ends the outage at once)."""
        if self.sentinels is None or self.named is None:
            return await asyncio.sleep(seconds)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.sentinels.moved(self.named), seconds)

    def go_down(self) -> None:
        if not self.up:
            return
        self.up = False
        assert self.hub is not None
        self.hub.set_cluster_connected(False, lost=not self.closing)
        self.hub.detach_redis()
        pending, self.waiting = self.waiting, deque()
        self.refuse(pending)

    async def disconnect(self) -> None:
        for link in (self.writer, self.subscriber):
            if link is not None:
                link.close()
        self.writer = self.subscriber = None
        if self.control is not None:
            with contextlib.suppress(Exception):
                await self.control.aclose()
        self.control = None

    # --- upkeep -------------------------------------------------------------

    def resync(self, *, announce: bool = False) -> None:
        """Rewrite this node's presence and take every topic's snapshot
        again (after a reconnect, or when Redis lost some of it)."""
        hub = self.hub
        assert hub is not None
        hub.begin_resync(self.forgot)
        ops: list[Op] = [SyncOp(topic, members) for topic, members in hub.local_members()]
        if announce:
            ops.append(ReadyOp())
        if ops:
            self.submit(ops)

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
        ops: list[Op] = [
            TouchOp(topic, [peer for peer, _ in members]) for topic, members in hub.local_members()
        ]
        if ops:
            self.submit(ops)

    async def watch(self) -> None:
        """Give up on a Redis that stopped answering the writer."""
        assert self.hub is not None
        stalled = self.hub.redis_stalled()
        if stalled > STALL:
            raise RedisConnectionError(f"Redis has not answered for {stalled:.1f} s")

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
            reaped = await control.fcall("signaling_reap", 0, self.prefix, node, ms(ENTRY_TTL), "1")
            removed = self.report_reaped(reaped, NODE_LOST)
            await control.delete(self.key("alive", node))
            log(logging.WARNING, "cluster: reaped a dead node", node=node, peers=removed)


def unasked(replies: list[Any]) -> None:
    """Replies to a connection's setup come through `Link.call`; after it,
    the hub's protocols take the connection over."""


def failed(hub: Hub, op: Op) -> None:
    """Tell the hub that a resume's ask or move did not happen."""
    if isinstance(op, AskOp):
        hub.asked(op.conn, False)
    elif isinstance(op, MoveOp):
        hub.move_failed(op.peer)


def wants_snapshot(op: Op) -> str | None:
    """The topic whose snapshot the hub waits for on this op's reply."""
    if isinstance(op, JoinOp) and op.snapshot:
        return op.topic
    if isinstance(op, SyncOp):
        return op.topic
    return None


def address_of(url: str) -> str:
    """``host:port`` of a ``redis://`` URL, for the logs."""
    options: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]
    return sentinel.address(options.get("host", "localhost"), options.get("port", 6379))


def ms(seconds: float) -> int:
    return int(seconds * 1000)


def snapshot(result: list[Any], at: int) -> list[tuple[str, str, str | None]]:
    """The snapshot at ``result[at:]``: (peer, node, metadata) per member."""
    members = []
    for index in range(at, len(result) - 2, 3):
        peer, node, metadata = result[index : index + 3]
        members.append((text(peer), text(node), text(metadata) or None))
    return members
