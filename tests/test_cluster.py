"""Cluster mode: several servers, each with several workers, share one Redis.

Each worker is a node of the cluster; peers of one topic on different servers
see and reach each other. These tests run two servers of two workers on a
throwaway redis-server (see `redis_server`), then kill a server, stop Redis,
and check what the other peers see. Without ``--redis`` nothing changes: the
rest of the suite covers that.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest
from conftest import Server, topics_owned
from prometheus_client.parser import text_string_to_metric_families
from redis import Redis
from redis_server import RedisServer, SentinelServer, find_redis_server, redis_server  # noqa: F401
from wsclient import OP_TEXT, Peer, Peers, RawClient, encode_frame, http_get, run

from testkit.proxy import Proxy

pytestmark = pytest.mark.timeout(180)

WORKERS = 2
"""Workers of every server of these tests; each one is a node."""
CONVERGE = 10.0
"""Seconds within which the cluster must agree again (a dead node, Redis back)."""
MARGIN = 1.0
"""Seconds allowed on top of `CONVERGE` for a loaded test machine."""
OUTAGE = 5.0
"""Seconds Redis is down in the outage test."""
DEFAULT_PREFIX = "signaling:"

StartServer = Callable[..., Server]


# --- helpers -----------------------------------------------------------------


def start_cluster(
    start_server: StartServer,
    redis: RedisServer | SentinelServer,
    count: int = 2,
    *flags: str,
    workers: int = WORKERS,
) -> list[Server]:
    """*count* servers on *redis*, each with every worker's node ready.

    Every node must name itself, and no two nodes of the cluster share a name.
    """
    servers = [
        start_server("--workers", str(workers), "--redis", redis.url, *flags) for _ in range(count)
    ]
    nodes: list[str] = []
    for srv in servers:
        records = srv.wait_records("cluster ready", workers)
        assert {record.get("worker") for record in records} == set(range(workers)), records
        for record in records:
            assert isinstance(record.get("node"), str) and record["node"], record
        nodes += list({record["node"] for record in records})
    assert len(nodes) == len(set(nodes)) == count * workers, f"node names not unique: {nodes}"
    return servers


def behind_proxy(
    start_server: StartServer, redis: RedisServer, proxy: Proxy
) -> tuple[Server, Server]:
    """Two servers of one worker on *redis*, the first reaching it through
    *proxy*; each with its node ready."""
    via_proxy = redis.url.replace(f":{redis.port}", f":{proxy.port}")
    first = start_server("--workers", "1", "--redis", via_proxy)
    first.wait_records("cluster ready", 1)
    (second,) = start_cluster(start_server, redis, 1, workers=1)
    return first, second


async def converge(members: list[Peer], timeout: float) -> None:
    """Wait until the view of every peer of *members* is exactly the others."""
    ids = {peer.id for peer in members}
    assert len(ids) == len(members)

    async def one(peer: Peer) -> None:
        expected = ids - {peer.id}
        try:
            await peer.wait_until(lambda: set(peer.view) == expected, timeout)
        except asyncio.TimeoutError:
            view = set(peer.view)
            raise AssertionError(
                f"view of {peer.id} still wrong after {timeout:.1f} s: "
                f"missing {sorted(expected - view)}, extra {sorted(view - expected)}"
            ) from None

    await asyncio.gather(*(one(peer) for peer in members))


def publishes(redis: Redis) -> int:
    """The PUBLISH commands *redis* has run."""
    stats = redis.info("commandstats").get("cmdstat_publish", {})
    return int(stats.get("calls", 0)) if isinstance(stats, dict) else 0


async def across(peers: Peers, first: Server, second: Server, topic: str) -> tuple[Peer, Peer]:
    """A peer of `topic` on each server, once each sees the other."""
    one = await peers.join(first.url(topic))
    other = await peers.join(second.url(topic))
    await converge([one, other], CONVERGE)
    return one, other


async def expect_relay(
    sender: Peer, target: Peer, kind: str, payload: Any, msg_id: str, timeout: float = 5.0
) -> None:
    """*sender* relays to *target*, which must receive exactly that as its next message."""
    await sender.relay(kind, target.id, payload, msg_id)
    assert await target.recv(timeout) == {
        "type": kind,
        "from": sender.id,
        "payload": payload,
        "msgId": msg_id,
    }


async def expect_error(
    sender: Peer, target_id: str, code: str, msg_id: str, timeout: float = 5.0
) -> None:
    """A relay from *sender* to *target_id* must come back as an error *code*."""
    await sender.relay("offer", target_id, {"sdp": msg_id}, msg_id)
    error = await sender.recv_error(timeout)
    assert error["code"] == code, error
    assert error.get("msgId") == msg_id, error


async def wait_records(srv: Server, msg: str, count: int, timeout: float) -> None:
    """`Server.wait_records` off the event loop, so that peers keep being served."""
    await asyncio.to_thread(srv.wait_records, msg, count, timeout)


def wait_for_value(read: Callable[[], Any], expected: Any, timeout: float) -> Any:
    """Poll *read* until it returns *expected*; return the last value read."""
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if value == expected or time.monotonic() >= deadline:
            return value
        time.sleep(0.05)


# --- presence and relay across servers ---------------------------------------


def test_twenty_peers_on_two_servers_see_each_other(
    redis_server: RedisServer,  # noqa: F811
    start_server: StartServer,
) -> None:
    first, second = start_cluster(start_server, redis_server)
    topic = "twenty"

    async def scenario() -> None:
        async with Peers() as peers:
            urls = [
                (first, second)[n % 2].url(topic, metadata=json.dumps({"n": n})) for n in range(20)
            ]
            group = await peers.join_all(*urls)
            await converge(group, CONVERGE)
            metadata = {peer.id: {"n": n} for n, peer in enumerate(group)}
            for peer in group:
                assert len(peer.view) == 19
                assert peer.view == {
                    other: meta for other, meta in metadata.items() if other != peer.id
                }, "metadata lost on the way between servers"

            # Five of each server leave: the others see exactly the rest.
            leaving, staying = group[:10], group[10:]
            await asyncio.gather(*(peer.close() for peer in leaving))
            await converge(staying, CONVERGE)
            for peer in staying:
                assert peer.departed == {gone.id for gone in leaving}

    run(scenario())


def test_offer_and_200_ice_candidates_cross_servers_complete_and_in_order(
    redis_server: RedisServer,  # noqa: F811
    start_server: StartServer,
) -> None:
    first, second = start_cluster(start_server, redis_server)
    topic = "ice"

    async def scenario() -> None:
        async with Peers() as peers:
            caller, callee = await across(peers, first, second, topic)

            # The payload crosses Redis byte for byte, spacing and escapes included.
            payload = '{ "sdp" : "v=0\\r\\no=- 1 2 IN IP4 127.0.0.1", "n": [1, 2.50, "\\u00e9"] }'
            await caller.send(
                f'{{"type":"offer","to":"{callee.id}","payload":{payload},"msgId":"offer"}}'
            )
            candidates = [
                {
                    "candidate": f"candidate:{n} 1 udp 2122260223 10.0.0.{n % 250} {50000 + n} "
                    "typ host",
                    "sdpMid": "0",
                    "sdpMLineIndex": 0,
                    "seq": n,
                }
                for n in range(200)
            ]
            for n, candidate in enumerate(candidates):
                await caller.relay("ice-candidate", callee.id, candidate, f"ice-{n}")

            offer = await callee.recv_text(CONVERGE)
            assert payload in offer, offer
            assert json.loads(offer) == {
                "type": "offer",
                "from": caller.id,
                "payload": json.loads(payload),
                "msgId": "offer",
            }
            received = [await callee.recv(CONVERGE) for _ in candidates]
            assert received == [
                {
                    "type": "ice-candidate",
                    "from": caller.id,
                    "payload": candidate,
                    "msgId": f"ice-{n}",
                }
                for n, candidate in enumerate(candidates)
            ]

            # And back: an answer, then candidates of the callee.
            await expect_relay(callee, caller, "answer", {"sdp": "answer"}, "answer")
            for n in range(20):
                await expect_relay(callee, caller, "ice-candidate", {"seq": n}, f"back-{n}")
            await asyncio.gather(caller.sync(), callee.sync())

    run(scenario())
    # Each server counts what it forwarded and what it delivered.
    for server, forwarded, delivered in ((first, 201, 21), (second, 21, 201)):
        relays = relay_counts(server)
        assert (relays["forwarded"], relays["delivered"]) == (forwarded, delivered), relays


def relay_counts(server: Server) -> dict[str, float]:
    """``signaling_relays_total`` of *server*, by result."""
    text = http_get(server.port, "/metrics").body.decode()
    return {
        sample.labels["result"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "signaling_relays_total"
    }


def test_ten_senders_thousand_relays_each_to_a_remote_target_in_order(
    redis_server: RedisServer,  # noqa: F811
    start_server: StartServer,
) -> None:
    first, second = start_cluster(start_server, redis_server)
    topic = "fan-in"
    senders_count, messages = 10, 1000

    async def scenario() -> None:
        async with Peers() as peers:
            target = await peers.join(second.url(topic))
            senders = await peers.join_all(*[first.url(topic)] * senders_count)
            await converge([target, *senders], CONVERGE)

            async def send(sender: Peer) -> None:
                for seq in range(messages):
                    await sender.relay("ice-candidate", target.id, {"seq": seq}, str(seq))

            async def receive() -> dict[str, list[int]]:
                # Read all the time, so that the target's queue never fills up.
                received: dict[str, list[int]] = {sender.id: [] for sender in senders}
                for _ in range(senders_count * messages):
                    message = await target.recv(CONVERGE)
                    assert message["type"] == "ice-candidate", message
                    assert message["msgId"] == str(message["payload"]["seq"]), message
                    received[message["from"]].append(message["payload"]["seq"])
                return received

            started = time.monotonic()
            received, *_ = await asyncio.gather(receive(), *(send(s) for s in senders))
            elapsed = time.monotonic() - started
            for sender in senders:
                sequence = received[sender.id]
                assert sequence == list(range(messages)), (
                    f"{sender.id}: {len(sequence)} received, first out of order at "
                    f"{next((i for i, s in enumerate(sequence) if s != i), None)}"
                )
            # No error (dropped or other) for any sender, none left for the target.
            await asyncio.gather(target.sync(), *(sender.sync() for sender in senders))
            print(f"{senders_count * messages} relays across servers in {elapsed:.2f} s")

    run(scenario(), timeout=120)


def test_a_burst_of_relays_to_one_node_is_one_publish(
    redis_server: RedisServer,  # noqa: F811
    start_server: StartServer,
) -> None:
    """What one read brings a node for another node goes through Redis as
    one PUBLISH (an envelope), and arrives whole and in order."""
    first, second = start_cluster(start_server, redis_server)
    topic = "burst"
    burst = 100
    redis = redis_server.client()

    async def scenario() -> None:
        async with Peers() as peers:
            target = await peers.join(second.url(topic))
            sender, sender_id = RawClient.join(first.port, f"/ws/{topic}")
            try:
                await target.wait_until(lambda: sender_id in target.view, CONVERGE)
                before = publishes(redis)
                frames = b"".join(
                    encode_frame(
                        OP_TEXT,
                        json.dumps(
                            {"type": "ice-candidate", "to": target.id, "payload": {"seq": n}}
                        ).encode(),
                    )
                    for n in range(burst)
                )
                sender.send(frames)  # one write: the server reads it at once
                received = [await target.recv(CONVERGE) for _ in range(burst)]
                assert [m["payload"]["seq"] for m in received] == list(range(burst))
                assert {m["from"] for m in received} == {sender_id}
                made = publishes(redis) - before
                # One, unless the kernel split the write over several reads.
                assert 1 <= made <= 10, f"{made} PUBLISH for {burst} relays"
                await target.sync()
            finally:
                sender.sock.close()

    run(scenario())


def test_relays_closer_than_the_flush_delay_wait_for_it_and_cross_together(
    redis_server: RedisServer,  # noqa: F811
    start_server: StartServer,
) -> None:
    """With --redis-flush-delay, a relay after a quiet spell crosses at once;
    the relays that follow it sooner than the delay wait until it has passed
    since that write, and cross in one PUBLISH, in order."""
    delay = 0.1  # the most allowed
    flags = ("--redis-flush-delay", str(delay))
    first, second = start_cluster(start_server, redis_server, 2, *flags, workers=1)
    redis = redis_server.client()

    async def scenario() -> None:
        async with Peers() as peers:
            one, other = await across(peers, first, second, "paced")
            await asyncio.sleep(delay)  # the quiet spell
            before = publishes(redis)
            sent = time.monotonic()
            await expect_relay(one, other, "offer", {"sdp": "alone"}, "m0")
            alone = time.monotonic() - sent
            stream = [f"m{n}" for n in range(1, 6)]
            for msg_id in stream:
                await one.relay("ice-candidate", other.id, {"candidate": msg_id}, msg_id)
            received = [await other.recv(CONVERGE) for _ in stream]
            waited = time.monotonic() - sent
            assert [m["msgId"] for m in received] == stream
            assert alone < delay, f"the relay after a quiet spell took {alone:.3f} s"
            assert waited >= delay * 0.9, f"the stream crossed {waited:.3f} s after the first"
            assert publishes(redis) - before == 2

    run(scenario())


def test_a_publish_redis_refuses_drops_its_relays_and_is_logged(
    redis_server: RedisServer,  # noqa: F811
    start_server: StartServer,
) -> None:
    """A PUBLISH that Redis answers with an error (here an ACL denies the
    command) loses its relays: each sender gets ``dropped`` for its own, the
    error is logged, the target gets nothing, and relays cross again once
    Redis allows it, on the same connection."""
    first, second = start_cluster(start_server, redis_server, workers=1)
    redis = redis_server.client()

    async def scenario() -> None:
        async with Peers() as peers:
            one, other = await across(peers, first, second, "refused")
            redis.execute_command("ACL", "SETUSER", "default", "-publish")
            try:
                await one.relay("offer", other.id, {"sdp": "refused"}, "m1")
                error = await one.recv_error(CONVERGE)
            finally:
                redis.execute_command("ACL", "SETUSER", "default", "+publish")
            assert error["code"] == "dropped" and error.get("msgId") == "m1", error
            # The next thing the target gets is the relay after: m1 never came.
            await expect_relay(one, other, "offer", {"sdp": "allowed"}, "m2")
            records = first.wait_records("cluster command failed", 1, CONVERGE, op="PublishOp")
            assert "NOPERM" in records[0]["error"], records
            assert first.records("cluster lost") == []

    run(scenario())


def test_a_redis_that_answers_garbage_is_reconnected_to(
    redis_server: RedisServer,  # noqa: F811
    start_server: StartServer,
) -> None:
    """Bytes that are not RESP on the links to Redis (here from a proxy in
    between) reset them; the node reconnects and relays cross again, and
    nothing is logged as a bug."""
    with Proxy(redis_server.port) as proxy:
        first, second = behind_proxy(start_server, redis_server, proxy)

        async def scenario() -> None:
            async with Peers() as peers:
                one, other = await across(peers, first, second, "garbage")
                await expect_relay(one, other, "offer", {"sdp": "before"}, "before")
                proxy.inject(b"%not resp\r\n")
                await asyncio.to_thread(first.wait_records, "cluster lost", 1, CONVERGE)
                await asyncio.to_thread(first.wait_records, "cluster ready", 2, CONVERGE)
                await expect_relay(one, other, "offer", {"sdp": "after"}, "after")
                await expect_relay(other, one, "answer", {"sdp": "back"}, "back")

        run(scenario())
    assert not [r for r in first.log_records() if "traceback" in r], first.log_records()


# --- a server dies -------------------------------------------------------------


def test_killed_server_peers_leave_and_relays_to_them_fail(
    redis_server: RedisServer,  # noqa: F811
    start_server: StartServer,
) -> None:
    doomed, survivor = start_cluster(start_server, redis_server)
    topics = topics_owned(WORKERS, "kill")  # both workers of each server hold peers

    async def scenario() -> None:
        async with Peers() as peers:
            victims: dict[str, list[Peer]] = {}
            living: dict[str, list[Peer]] = {}
            for topic in topics:
                victims[topic] = await peers.join_all(*[doomed.url(topic)] * 2)
                living[topic] = await peers.join_all(*[survivor.url(topic)] * 3)
                await converge(victims[topic] + living[topic], CONVERGE)
            sender, target = living[topics[0]][0], victims[topics[0]][0]

            killed = time.monotonic()
            os.killpg(doomed.proc.pid, signal.SIGKILL)
            # Sent before anyone can have noticed: it must fail, not vanish.
            await sender.relay("offer", target.id, {"sdp": "too late"}, "after-kill")
            deadline = killed + CONVERGE + MARGIN

            async def left_in_time(peer: Peer, gone: list[Peer]) -> float:
                if peer is sender:
                    try:
                        error = await sender.recv_error(deadline - time.monotonic())
                    except asyncio.TimeoutError:
                        left = target.id in sender.departed
                        raise AssertionError(
                            "no answer to the relay sent right after the kill within "
                            f"{CONVERGE + MARGIN} s (the target's peer-left "
                            f"{'arrived meanwhile' if left else 'did not arrive either'})"
                        ) from None
                    assert error["code"] == "target_not_found", error
                    assert error.get("msgId") == "after-kill", error
                try:
                    await peer.wait_left(
                        *(victim.id for victim in gone), timeout=deadline - time.monotonic()
                    )
                except asyncio.TimeoutError:
                    raise AssertionError(
                        f"{peer.id} still sees {sorted(set(peer.view) & {v.id for v in gone})} "
                        f"{time.monotonic() - killed:.1f} s after the kill"
                    ) from None
                return time.monotonic() - killed

            waits = [
                left_in_time(peer, victims[topic]) for topic in topics for peer in living[topic]
            ]
            delays = await asyncio.gather(*waits)
            assert max(delays) <= CONVERGE + MARGIN, delays
            print(f"peer-left of a killed server's peers after {max(delays):.2f} s")
            assert doomed.proc.wait(5) == -signal.SIGKILL

            for topic in topics:
                for peer in living[topic]:
                    assert set(peer.view) == {p.id for p in living[topic]} - {peer.id}
                    assert peer.departed == {victim.id for victim in victims[topic]}
            # Once gone, every one of them is unknown, from any worker of the survivor.
            for topic in topics:
                for n, victim in enumerate(victims[topic]):
                    await expect_error(living[topic][n], victim.id, "target_not_found", f"gone-{n}")
            # The survivor's peers still reach each other.
            for topic in topics:
                a, b = living[topic][:2]
                await expect_relay(a, b, "offer", {"sdp": topic}, "still-here")
            await asyncio.gather(*(peer.sync() for group in living.values() for peer in group))

    run(scenario())


# --- Redis goes away and comes back ---------------------------------------------


def test_redis_outage_keeps_local_relays_and_converges_after(
    redis_server: RedisServer,  # noqa: F811
    start_server: StartServer,
) -> None:
    first, second = start_cluster(start_server, redis_server)
    topic = "outage"

    async def scenario() -> None:
        async with Peers() as peers:
            a1, a2 = await peers.join_all(first.url(topic), first.url(topic))
            b1, b2 = await peers.join_all(second.url(topic), second.url(topic))
            await converge([a1, a2, b1, b2], CONVERGE)

            redis_server.stop()
            stopped = time.monotonic()
            await asyncio.gather(
                wait_records(first, "cluster lost", WORKERS, OUTAGE),
                wait_records(second, "cluster lost", WORKERS, OUTAGE),
            )

            # Peers of one server still reach each other, both ways.
            await expect_relay(a1, a2, "offer", {"sdp": "local a"}, "local-1")
            await expect_relay(a2, a1, "answer", {"sdp": "local a"}, "local-2")
            await expect_relay(b1, b2, "offer", {"sdp": "local b"}, "local-3")
            await expect_relay(b2, b1, "answer", {"sdp": "local b"}, "local-4")
            # Relays to the other server fail loudly.
            await expect_error(a1, b1.id, "dropped", "remote-1", timeout=OUTAGE)
            await expect_error(b1, a2.id, "dropped", "remote-2", timeout=OUTAGE)

            # Membership changes on both servers while Redis is away.
            await b2.close()
            await b1.wait_left(b2.id)
            a3 = await peers.join(first.url(topic))
            b3 = await peers.join(second.url(topic))
            await a1.wait_joined(a3.id)
            await b1.wait_joined(b3.id)

            spent = time.monotonic() - stopped
            assert spent < OUTAGE, f"the outage steps took {spent:.1f} s, longer than the outage"
            await asyncio.sleep(OUTAGE - spent)  # the outage lasts this long on purpose
            redis_server.start()
            back = time.monotonic()

            members = [a1, a2, a3, b1, b3]
            await converge(members, CONVERGE + MARGIN)
            print(f"views converged {time.monotonic() - back:.2f} s after Redis came back")
            await asyncio.gather(
                wait_records(first, "cluster ready", 2 * WORKERS, CONVERGE),
                wait_records(second, "cluster ready", 2 * WORKERS, CONVERGE),
            )
            assert b2.id in a1.departed and b2.id in a2.departed

            # Remote relays work again, old and new peers alike.
            await expect_relay(a1, b1, "offer", {"sdp": "again"}, "again-1")
            await expect_relay(b1, a1, "answer", {"sdp": "again"}, "again-2")
            await expect_relay(b3, a3, "offer", {"sdp": "new"}, "again-3")
            await expect_relay(a3, b3, "answer", {"sdp": "new"}, "again-4")
            await expect_relay(a2, b3, "ice-candidate", {"seq": 1}, "again-5")
            await expect_error(a1, b2.id, "target_not_found", "gone")
            await asyncio.gather(*(peer.sync() for peer in members))

    run(scenario())


def test_a_hung_redis_delays_joins_by_a_second_and_relays_fail_loudly(
    redis_server: RedisServer,  # noqa: F811
    start_server: StartServer,
) -> None:
    """Redis stops answering without closing its connections (SIGSTOP): a
    join to a topic new to its server is greeted within about a second, a
    relay to another server gets ``dropped`` once the link is given up, and
    after Redis resumes the views are exact and relays cross again."""
    first, second = start_cluster(start_server, redis_server)
    assert redis_server.proc is not None
    frozen = redis_server.proc.pid

    async def scenario() -> None:
        async with Peers() as peers:
            a1 = await peers.join(first.url("hang"))
            b1 = await peers.join(second.url("hang"))
            await converge([a1, b1], CONVERGE)
            os.kill(frozen, signal.SIGSTOP)
            try:
                await a1.relay("offer", b1.id, {"sdp": "x"}, "frozen")
                started = time.monotonic()
                newcomer = await peers.join(first.url("hang-new-topic"))
                waited = time.monotonic() - started
                assert newcomer.view == {}
                assert waited < 3.0, f"a join waited {waited:.1f} s for a hung Redis"
                error = await a1.recv_error(CONVERGE)
                assert (error["code"], error.get("msgId")) == ("dropped", "frozen"), error
            finally:
                os.kill(frozen, signal.SIGCONT)
            b2 = await peers.join(second.url("hang"))
            await converge([a1, b1, b2], CONVERGE)
            await expect_relay(a1, b2, "offer", {"sdp": "after"}, "after-1")
            await expect_relay(b1, a1, "answer", {"sdp": "after"}, "after-2")

    run(scenario())


def test_a_redis_restarted_empty_makes_nobody_leave_who_did_not(
    redis_server: RedisServer,  # noqa: F811
    start_server: StartServer,
) -> None:
    """Redis comes back empty, and one server rewrites its presence before
    the other (frozen meanwhile) has: the first one's snapshot lacks the
    other's peers, which are still there. Its peers must not be told they
    left (and joined again); a peer that did leave while Redis was away is
    told, within the grace the nodes give each other to come back."""
    first, second = start_cluster(start_server, redis_server)
    topic = "restart"

    async def scenario() -> None:
        async with Peers() as peers:
            a = await peers.join(first.url(topic))
            b1, b2 = await peers.join_all(second.url(topic), second.url(topic))
            await converge([a, b1, b2], CONVERGE)
            redis_server.stop()
            await asyncio.gather(
                wait_records(first, "cluster lost", WORKERS, OUTAGE),
                wait_records(second, "cluster lost", WORKERS, OUTAGE),
            )
            await b2.close()
            await b1.wait_left(b2.id)
            os.killpg(second.pid, signal.SIGSTOP)
            try:
                redis_server.start()
                await wait_records(first, "cluster ready", 2 * WORKERS, CONVERGE)
                # Long enough for the snapshot to reach the peers (a relay
                # behind it is answered after it).
                await expect_error(a, "01ARZ3NDEKTSV4RRFFQ69G5FAV", "target_not_found", "probe")
            finally:
                os.killpg(second.pid, signal.SIGCONT)
            back = time.monotonic()
            await converge([a, b1], CONVERGE)
            print(f"views exact {time.monotonic() - back:.2f} s after the frozen server resumed")
            assert a.departed == {b2.id}, f"{a.id} was told {sorted(a.departed)} left"
            await expect_relay(a, b1, "offer", {"sdp": "after"}, "restart-1")

    run(scenario())


# --- Redis keys ------------------------------------------------------------------


def test_redis_keys_return_to_baseline_after_every_peer_left(
    redis_server: RedisServer,  # noqa: F811
    start_server: StartServer,
) -> None:
    first, second = start_cluster(start_server, redis_server)
    client = redis_server.client()
    baseline = client.dbsize()
    baseline_keys = set(client.keys("*"))
    topics = topics_owned(WORKERS, "keys")

    async def scenario() -> None:
        async with Peers() as peers:
            group = {
                topic: await peers.join_all(*[srv.url(topic) for srv in (first, second) * 3])
                for topic in topics
            }
            for members in group.values():
                await converge(members, CONVERGE)
            keys = client.keys("*")
            assert len(keys) > baseline, "the cluster keeps no state in Redis"
            assert all(key.startswith(DEFAULT_PREFIX) for key in keys), keys

            # Half close cleanly, half vanish without a closing handshake.
            for members in group.values():
                for n, peer in enumerate(members):
                    if n % 2:
                        peer.abort()
                    else:
                        await peer.close()

    run(scenario())
    count = wait_for_value(client.dbsize, baseline, CONVERGE)
    keys = set(client.keys("*"))
    assert count == baseline, (
        f"{count} keys, {baseline} before any peer joined; "
        f"new: {sorted(keys - baseline_keys)}, gone: {sorted(baseline_keys - keys)}"
    )
    client.close()


def test_clusters_with_different_prefixes_do_not_see_each_other(
    redis_server: RedisServer,  # noqa: F811
    start_server: StartServer,
) -> None:
    # One worker per server: four servers on a small machine.
    alpha = start_cluster(start_server, redis_server, 2, "--redis-prefix", "alpha:", workers=1)
    beta = start_cluster(start_server, redis_server, 2, "--redis-prefix", "beta:", workers=1)
    topic = "same-name"

    async def scenario() -> None:
        async with Peers() as peers:
            b1, b2 = await peers.join_all(*(srv.url(topic) for srv in beta))
            await converge([b1, b2], CONVERGE)
            x1, x2 = await peers.join_all(*(srv.url(topic) for srv in alpha))
            await converge([x1, x2], CONVERGE)
            assert set(x1.initial_view) <= {x2.id} and set(x2.initial_view) <= {x1.id}

            # A beta peer joins, then an alpha one: had alpha's nodes followed
            # beta's events, b3's would have come before x3's.
            b3 = await peers.join(beta[0].url(topic))
            await converge([b1, b2, b3], CONVERGE)
            x3 = await peers.join(alpha[1].url(topic))
            await converge([x1, x2, x3], CONVERGE)
            await converge([b1, b2, b3], CONVERGE)

            await expect_error(x1, b1.id, "target_not_found", "to-beta")
            await expect_error(b2, x2.id, "target_not_found", "to-alpha")
            await expect_relay(x1, x2, "offer", {"sdp": "alpha"}, "in-alpha")
            await expect_relay(b1, b3, "offer", {"sdp": "beta"}, "in-beta")

            client = redis_server.client()
            keys = client.keys("*")
            client.close()
            assert any(key.startswith("alpha:") for key in keys), keys
            assert any(key.startswith("beta:") for key in keys), keys
            assert all(key.startswith(("alpha:", "beta:")) for key in keys), keys

    run(scenario())


def test_metrics_show_each_workers_link_to_redis(
    redis_server: RedisServer,  # noqa: F811
    start_server: StartServer,
) -> None:
    (server,) = start_cluster(start_server, redis_server, 1)

    def samples() -> dict[str, float]:
        text = http_get(server.port, "/metrics").body.decode()
        return {
            sample.name + json.dumps(sample.labels, sort_keys=True): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def connected(worker: int) -> float:
        return samples()[f'signaling_worker_cluster_connected{{"worker": "{worker}"}}']

    assert [connected(w) for w in range(WORKERS)] == [1, 1]
    assert samples()["signaling_cluster_disconnects_total{}"] == 0
    redis_server.stop()
    server.wait_records("cluster lost", WORKERS, timeout=CONVERGE)
    assert [connected(w) for w in range(WORKERS)] == [0, 0]
    assert samples()["signaling_cluster_disconnects_total{}"] == WORKERS
    redis_server.start()
    server.wait_records("cluster ready", 2 * WORKERS, timeout=CONVERGE)
    assert [connected(w) for w in range(WORKERS)] == [1, 1]


def test_a_redis_with_a_password_and_another_database(
    tmp_path_factory: pytest.TempPathFactory, start_server: StartServer
) -> None:
    """The URL's password (AUTH) and database (SELECT) reach every one of a
    node's connections: presence and relays work, and the keys are in that
    database only."""
    redis = RedisServer(
        find_redis_server(), tmp_path_factory.mktemp("redis"), password="s3cret-pw", db=3
    )
    redis.start_on_free_port()
    try:
        first, second = start_cluster(start_server, redis)

        async def scenario() -> None:
            async with Peers() as peers:
                a = await peers.join(first.url("auth"))
                b = await peers.join(second.url("auth"))
                await converge([a, b], CONVERGE)
                await expect_relay(a, b, "offer", {"sdp": "x"}, "auth-1")
                with redis.client() as client:
                    keys = list(client.scan_iter(match=DEFAULT_PREFIX + "t:*"))
                    assert keys == [DEFAULT_PREFIX + "t:auth"], keys
                password = redis.password
                with Redis(host="127.0.0.1", port=redis.port, db=0, password=password) as zero:
                    assert zero.dbsize() == 0

        run(scenario())
    finally:
        redis.stop()
