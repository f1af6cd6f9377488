"""Sessions that survive the network (PROTOCOL.md section 5, resume).

Every fault is real: a TCP proxy between the client and the server resets
the connection (RST both ways) or blackholes it (stops forwarding, sockets
open). The other peers must see nothing of a blip: no ``peer-left``, no
``peer-joined``; the resumed client gets every message it had not
received, once, in order.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from conftest import Server
from redis_server import RedisServer, redis_server  # noqa: F401
from wsclient import OP_CLOSE, OP_TEXT, RawClient, http_get

from testkit.proxy import Proxy

STREAM = 50
"""Relays sent to a peer in the lossless-replay test."""


def connect(port: int, topic: str, query: str) -> tuple[RawClient, dict[str, Any]]:
    """A raw client on ``/ws/{topic}?{query}`` and its welcome."""
    client = RawClient.connect(port, f"/ws/{topic}?{query}")
    welcome = client.recv_json()
    assert welcome["type"] == "welcome", welcome
    return client, welcome


def offer(sender: RawClient, to: str, msg_id: str) -> None:
    message = {"type": "offer", "to": to, "payload": {"n": msg_id}, "msgId": msg_id}
    sender.send_frame(OP_TEXT, json.dumps(message).encode())


def nothing_pending(client: RawClient, tag: str) -> None:
    """What ``client`` receives next is the pong of a ping sent now: it was
    sent nothing else meanwhile."""
    client.send_frame(OP_TEXT, json.dumps({"type": "ping", "msgId": tag}).encode())
    assert client.recv_json() == {"type": "pong", "msgId": tag}


def until_pong(client: RawClient, tag: str) -> list[dict[str, Any]]:
    """What ``client`` receives before the pong of a ping sent now."""
    client.send_frame(OP_TEXT, json.dumps({"type": "ping", "msgId": tag}).encode())
    before = []
    while (message := client.recv_json()) != {"type": "pong", "msgId": tag}:
        before.append(message)
    return before


def until_present(client: RawClient, peer: str) -> list[dict[str, Any]]:
    """What ``client`` receives until it has seen everything sent before a
    ping sent now and ``peer`` is in its view (it was, before)."""
    present, received = True, until_pong(client, "present")
    for message in received:
        if message.get("peerId") == peer:
            present = message["type"] == "peer-joined"
    while not present:
        message = client.recv_json()
        received.append(message)
        present = message.get("type") == "peer-joined" and message.get("peerId") == peer
    return received


class Pair:
    """``a`` (resumable, through ``proxy``) and ``b`` (direct) in one topic;
    ``a`` has received ``seen`` messages since its welcome."""

    def __init__(self, server: Server, proxy: Proxy, topic: str, query: str = "resumable=1"):
        self.server, self.proxy, self.topic = server, proxy, topic
        self.a, self.welcome = connect(proxy.port, topic, query)
        self.a_id: str = self.welcome["selfId"]
        assert self.a.recv_json() == {"type": "peer-list", "peers": []}
        self.b, self.b_id = RawClient.join(server.port, f"/ws/{topic}")
        assert self.a.recv_json() == {"type": "peer-joined", "peerId": self.b_id}
        self.seen = 2

    @property
    def token(self) -> str:
        token: str = self.welcome["resumeToken"]
        return token

    def cut(self) -> None:
        """Reset ``a``'s connection and wait until the server suspends it."""
        self.proxy.reset()
        self.server.wait_records("peer suspended", peer=self.a_id)

    def resume(self, token: str | None = None, seen: int | None = None) -> RawClient:
        """``a`` back, directly, with its token; checks the resumed welcome."""
        token = self.token if token is None else token
        seen = self.seen if seen is None else seen
        client, welcome = connect(self.server.port, self.topic, f"resume={token}&seen={seen}")
        assert welcome["selfId"] == self.a_id, welcome
        assert welcome["resumed"] is True, welcome
        assert welcome["resumeToken"] != token
        self.welcome = welcome
        return client

    def close(self) -> None:
        self.a.close()
        self.b.close()


def test_a_reset_connection_resumes_with_what_it_missed(server: Server) -> None:
    with Proxy(server.port) as proxy:
        pair = Pair(server, proxy, "reset")
        pair.cut()
        for n in range(3):
            offer(pair.b, pair.a_id, f"gap-{n}")
        nothing_pending(pair.b, "no-error")  # relays to a suspended peer are kept
        resumed = pair.resume()
        for n in range(3):
            message = resumed.recv_json()
            assert (message["type"], message["from"], message["msgId"]) == (
                "offer",
                pair.b_id,
                f"gap-{n}",
            )
        nothing_pending(resumed, "after-replay")
        nothing_pending(pair.b, "b-saw-nothing")  # no peer-left, no peer-joined
        offer(pair.b, pair.a_id, "live")
        assert resumed.recv_json()["msgId"] == "live"
        resumed.close()
        pair.close()


def test_a_stream_cut_midway_is_replayed_without_loss_or_repeat(server: Server) -> None:
    with Proxy(server.port) as proxy:
        pair = Pair(server, proxy, "stream")
        for n in range(STREAM):
            offer(pair.b, pair.a_id, str(n))
        read = STREAM // 3
        for n in range(read):
            assert pair.a.recv_json()["msgId"] == str(n)
        pair.seen += read
        pair.cut()  # the rest was sent, and may or may not have arrived
        resumed = pair.resume()
        got = [resumed.recv_json()["msgId"] for _ in range(STREAM - read)]
        assert got == [str(n) for n in range(read, STREAM)]
        nothing_pending(resumed, "no-repeat")
        resumed.close()
        pair.close()


def test_a_resume_takes_over_a_half_dead_connection(server: Server) -> None:
    with Proxy(server.port) as proxy:
        pair = Pair(server, proxy, "half-dead")
        proxy.blackhole()  # the server cannot tell: the old socket stays open
        resumed = pair.resume()
        server.wait_records("peer resumed", peer=pair.a_id)
        nothing_pending(pair.b, "b-saw-nothing")
        offer(pair.b, pair.a_id, "to-the-new-one")
        assert resumed.recv_json()["msgId"] == "to-the-new-one"
        resumed.close()
        pair.close()


def test_a_connection_dead_upstream_is_found_by_ping_and_resumed(
    start_server: Callable[..., Server],
) -> None:
    """Only the client's bytes are lost: what the server sends still arrives
    (and counts as seen), its pings go unanswered, and it suspends the
    session; the resume replays nothing the client already has."""
    server = start_server("--ping-interval", "0.5", "--ping-timeout", "1")
    with Proxy(server.port) as proxy:
        pair = Pair(server, proxy, "upstream")
        proxy.blackhole("up")
        for n in range(3):
            offer(pair.b, pair.a_id, f"still-{n}")
        assert [pair.a.recv_json()["msgId"] for _ in range(3)] == [f"still-{n}" for n in range(3)]
        pair.seen += 3
        # b stays alive meanwhile: a ping unanswered for 1 s ends a peer.
        while not server.records("peer suspended", peer=pair.a_id):
            pair.b.answer_pings(1)
        offer(pair.b, pair.a_id, "gap")
        resumed = pair.resume()
        first = resumed.recv_json()
        assert first.get("msgId") == "gap", first
        nothing_pending(resumed, "no-repeat")
        nothing_pending(pair.b, "b-saw-nothing")
        resumed.close()
        pair.close()


def test_a_connection_dead_downstream_is_taken_over_with_what_it_missed(
    server: Server,
) -> None:
    """Only the server's bytes are lost: they sit unread on the way; the
    client resumes (the server still thinks the old connection alive) and
    gets them again."""
    with Proxy(server.port) as proxy:
        pair = Pair(server, proxy, "downstream")
        proxy.blackhole("down")
        for n in range(3):
            offer(pair.b, pair.a_id, f"lost-{n}")
        nothing_pending(pair.b, "sent")  # the server has written them
        resumed = pair.resume()
        assert [resumed.recv_json()["msgId"] for _ in range(3)] == [f"lost-{n}" for n in range(3)]
        nothing_pending(resumed, "no-repeat")
        records = server.wait_records("peer resumed", peer=pair.a_id)
        assert records
        nothing_pending(pair.b, "b-saw-nothing")
        resumed.close()
        pair.close()


def test_tokens_that_cannot_resume_start_afresh_and_end_no_one(server: Server) -> None:
    with Proxy(server.port) as proxy:
        pair = Pair(server, proxy, "tokens")
        pair.cut()
        token = pair.token
        forged = token[:-2] + ("AA" if token[-2:] != "AA" else "BB")
        for attempt in (forged, "garbage", ""):
            fresh, welcome = connect(server.port, "tokens", f"resume={attempt}&seen=2")
            assert welcome["selfId"] != pair.a_id
            assert welcome["resumed"] is False, welcome
            peers = fresh.recv_json()["peers"]
            assert pair.a_id in {peer["id"] for peer in peers}, "a's session lives on"
            assert pair.b.recv_json() == {"type": "peer-joined", "peerId": welcome["selfId"]}
            # A fresh start is resumable too; a close frame ends it at once.
            assert welcome["resumeToken"]
            fresh.send_frame(OP_CLOSE, (1000).to_bytes(2, "big"))
            left = pair.b.recv_json()
            assert left == {"type": "peer-left", "peerId": welcome["selfId"]}, "not a"
            fresh.close()
        resumed = pair.resume(token)
        # The token is used: a second resume with it starts afresh.
        again, welcome = connect(server.port, "tokens", f"resume={token}&seen=0")
        assert welcome["selfId"] != pair.a_id and welcome["resumed"] is False
        again.close()
        resumed.close()
        pair.close()


def test_a_close_frame_or_no_opt_in_leaves_at_once(server: Server) -> None:
    with Proxy(server.port) as proxy:
        pair = Pair(server, proxy, "closes")
        pair.a.send_frame(OP_CLOSE, (1000).to_bytes(2, "big"))
        assert pair.b.recv_json() == {"type": "peer-left", "peerId": pair.a_id}
        # Its token now resumes nothing.
        fresh, welcome = connect(server.port, "closes", f"resume={pair.token}&seen=2")
        assert welcome["selfId"] != pair.a_id and welcome["resumed"] is False
        fresh.close()
        pair.close()
    with Proxy(server.port) as proxy:
        plain = Pair(server, proxy, "plain", query="x=1")
        assert "resumeToken" not in plain.welcome
        proxy.reset()
        assert plain.b.recv_json() == {"type": "peer-left", "peerId": plain.a_id}
        plain.close()


def test_a_suspended_session_expires_with_its_window(
    start_server: Callable[..., Server],
) -> None:
    server = start_server("--resume-window", "0.5")
    with Proxy(server.port) as proxy:
        pair = Pair(server, proxy, "expiry")
        pair.cut()
        assert pair.b.recv_json() == {"type": "peer-left", "peerId": pair.a_id}
        records = server.wait_records("peer left", peer=pair.a_id)
        assert records[-1]["reason"] == "expired"
        pair.close()


def test_resumes_are_counted(server: Server) -> None:
    with Proxy(server.port) as proxy:
        pair = Pair(server, proxy, "metrics")
        pair.cut()
        text = http_get(server.port, "/metrics").body.decode()
        assert "signaling_sessions_suspended " in text
        suspended = next(
            float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith("signaling_sessions_suspended ")
        )
        assert suspended >= 1
        resumed = pair.resume()
        text = http_get(server.port, "/metrics").body.decode()
        assert 'signaling_resumes_total{result="resumed"}' in text
        resumed.close()
        pair.close()


@pytest.mark.parametrize("workers", ["4"])
def test_resume_reaches_the_topics_worker(
    start_server: Callable[..., Server], workers: str
) -> None:
    server = start_server("--workers", workers)
    server.wait_records("listening", count=int(workers))
    with Proxy(server.port) as proxy:
        for n in range(4):
            pair = Pair(server, proxy, f"sharded-{n}")
            pair.cut()
            offer(pair.b, pair.a_id, "gap")
            resumed = pair.resume()
            assert resumed.recv_json()["msgId"] == "gap"
            nothing_pending(pair.b, "b-saw-nothing")
            resumed.close()
            pair.close()


# --- cluster mode: the client comes back to another server ---------------------

SECRET = "a secret every node of the test cluster shares"
"""``--resume-secret`` of the cluster tests: each node accepts the others' tokens."""
ASK_WAIT = 2.0
"""Seconds the new node waits for the old one's answer (engine::migrate::ASK_WAIT)."""
BOUNDED = ASK_WAIT + 1.5
"""Seconds within which a resume the old node does not answer starts
afresh: the wait, plus the tick that ends it and a margin for a loaded
test machine."""


def start_node(
    start_server: Callable[..., Server], redis: RedisServer, workers: int = 1, *flags: str
) -> Server:
    """A server of the cluster on ``redis``, every worker's node ready."""
    server = start_server(
        "--workers", str(workers), "--redis", redis.url, "--resume-secret", SECRET, *flags
    )
    server.wait_records("cluster ready", count=workers)
    return server


class Spread:
    """``a`` (resumable, through ``proxy``) and ``b`` on ``first``, ``c`` on
    ``second``, all in ``topic`` and seeing each other."""

    def __init__(self, first: Server, second: Server, proxy: Proxy, topic: str) -> None:
        self.first, self.second, self.proxy, self.topic = first, second, proxy, topic
        self.a, welcome = connect(proxy.port, topic, "resumable=1")
        self.a_id: str = welcome["selfId"]
        self.token: str = welcome["resumeToken"]
        assert self.a.recv_json() == {"type": "peer-list", "peers": []}
        self.b, self.b_id = RawClient.join(first.port, f"/ws/{topic}")
        assert self.a.recv_json() == {"type": "peer-joined", "peerId": self.b_id}
        self.c, welcome = connect(second.port, topic, "x=1")
        self.c_id: str = welcome["selfId"]
        view = {peer["id"] for peer in self.c.recv_json()["peers"]}
        while view != {self.a_id, self.b_id}:  # b's join may still be on its way
            joined = self.c.recv_json()
            assert joined["type"] == "peer-joined", joined
            view.add(joined["peerId"])
        assert self.a.recv_json() == {"type": "peer-joined", "peerId": self.c_id}
        assert self.b.recv_json() == {"type": "peer-joined", "peerId": self.c_id}
        self.seen = 3

    def cut(self) -> None:
        self.proxy.reset()
        self.first.wait_records("peer suspended", peer=self.a_id)

    def resume_at_second(self) -> tuple[RawClient, dict[str, Any]]:
        return connect(self.second.port, self.topic, f"resume={self.token}&seen={self.seen}")

    def close(self) -> None:
        for client in (self.a, self.b, self.c):
            client.close()


def test_a_session_resumes_on_another_server_with_nothing_lost_or_repeated(
    redis_server: RedisServer,  # noqa: F811
    start_server: Callable[..., Server],
) -> None:
    """Peers on both servers relay to ``a`` without pause while its
    connection is cut and it resumes on the other server: ``a`` gets every
    relay once, in each sender's order, and no one sees it leave or join."""
    first = start_node(start_server, redis_server, workers=2)
    second = start_node(start_server, redis_server, workers=2)
    with Proxy(first.port) as proxy:
        spread = Spread(first, second, proxy, "moving")
        stop = threading.Event()
        sent: dict[str, int] = {}

        def stream(client: RawClient, name: str) -> None:
            n = 0
            while not stop.is_set() or n < 20:
                offer(client, spread.a_id, f"{name}-{n}")
                n += 1
                time.sleep(0.002)
            sent[name] = n

        senders = [
            threading.Thread(target=stream, args=(spread.b, "b")),
            threading.Thread(target=stream, args=(spread.c, "c")),
        ]
        for sender in senders:
            sender.start()
        got: dict[str, list[int]] = {"b": [], "c": []}

        def take(message: dict[str, Any]) -> None:
            assert message["type"] == "offer", message
            name, n = message["msgId"].split("-")
            assert message["from"] == {"b": spread.b_id, "c": spread.c_id}[name]
            got[name].append(int(n))

        for _ in range(10):
            take(spread.a.recv_json())
            spread.seen += 1
        spread.cut()
        resumed, welcome = spread.resume_at_second()
        assert welcome["selfId"] == spread.a_id, welcome
        assert welcome["resumed"] is True, welcome
        assert welcome["resumeToken"] != spread.token
        second.wait_records("peer resumed", peer=spread.a_id)
        stop.set()
        for sender in senders:
            sender.join()
        while len(got["b"]) + len(got["c"]) < sum(sent.values()):
            take(resumed.recv_json())
        assert got == {name: list(range(count)) for name, count in sent.items()}
        nothing_pending(resumed, "no-repeat")
        nothing_pending(spread.b, "b-saw-nothing")  # no error, no peer-left
        nothing_pending(spread.c, "c-saw-nothing")
        # The session lives on the second server now, both ways.
        offer(resumed, spread.b_id, "to-b")
        assert spread.b.recv_json()["msgId"] == "to-b"
        offer(resumed, spread.c_id, "to-c")
        assert spread.c.recv_json()["msgId"] == "to-c"
        offer(spread.b, spread.a_id, "from-b")
        assert resumed.recv_json()["msgId"] == "from-b"
        # And it can move back, with its new token: a lost connection
        # (no close frame) again.
        seen = sum(sent.values()) - 10 + 2  # the replay, live, a pong and from-b
        resumed.close()
        second.wait_records("peer suspended", peer=spread.a_id)
        offer(spread.c, spread.a_id, "kept-at-second")
        token = welcome["resumeToken"]
        back, welcome = connect(first.port, "moving", f"resume={token}&seen={seen}")
        assert (welcome["selfId"], welcome["resumed"]) == (spread.a_id, True), welcome
        assert back.recv_json()["msgId"] == "kept-at-second"
        nothing_pending(back, "moved-back")
        nothing_pending(spread.b, "b-saw-nothing-again")
        nothing_pending(spread.c, "c-saw-nothing-again")
        back.close()
        spread.close()


def test_a_resume_whose_old_server_died_starts_afresh_at_once(
    redis_server: RedisServer,  # noqa: F811
    start_server: Callable[..., Server],
) -> None:
    """Once Redis knows the old server gone (its inbox has no subscriber),
    the ask reaches no one and the client starts afresh without waiting."""
    first = start_node(start_server, redis_server)
    second = start_node(start_server, redis_server)
    (ready,) = first.records("cluster ready")
    inbox = f"signaling:node:{ready['node']}"
    with Proxy(first.port) as proxy:
        spread = Spread(first, second, proxy, "dead-node")
        spread.cut()
        os.killpg(first.proc.pid, signal.SIGKILL)
        assert first.proc.wait(5) == -signal.SIGKILL
        redis = redis_server.client()
        while redis.pubsub_numsub(inbox) != [(inbox, 0)]:
            time.sleep(0.01)
        started = time.monotonic()
        fresh, welcome = spread.resume_at_second()
        waited = time.monotonic() - started
        assert welcome["resumed"] is False, welcome
        assert welcome["selfId"] != spread.a_id
        assert fresh.recv_json()["type"] == "peer-list"
        assert waited < ASK_WAIT, f"the fresh start took {waited:.2f} s"
        second.wait_records("peer joined", peer=welcome["selfId"])
        fresh.close()
        spread.close()


def test_a_resume_whose_old_server_is_silent_starts_afresh_within_the_wait(
    redis_server: RedisServer,  # noqa: F811
    start_server: Callable[..., Server],
) -> None:
    """The old server is frozen (SIGSTOP): Redis still takes the ask, no one
    answers. The client starts afresh within the bounded wait; the old
    session, once its server wakes and hands it over too late, ends: no
    peer stays in a view without a session."""
    first = start_node(start_server, redis_server)
    second = start_node(start_server, redis_server)
    with Proxy(first.port) as proxy:
        spread = Spread(first, second, proxy, "silent-node")
        spread.cut()
        os.killpg(first.proc.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            fresh, welcome = spread.resume_at_second()
            waited = time.monotonic() - started
        finally:
            os.killpg(first.proc.pid, signal.SIGCONT)
        assert welcome["resumed"] is False, welcome
        assert welcome["selfId"] != spread.a_id
        assert 1.5 < waited < BOUNDED, f"the fresh start took {waited:.2f} s"
        listed = {peer["id"] for peer in fresh.recv_json()["peers"]}
        assert listed == {spread.a_id, spread.b_id, spread.c_id}, "the old session still lives"
        assert spread.c.recv_json() == {"type": "peer-joined", "peerId": welcome["selfId"]}
        # The late hand-over ends the old session, for everyone.
        for client in (spread.b, spread.c, fresh):
            message = client.recv_json()
            if message["type"] == "peer-joined":  # b learns of the new peer first
                message = client.recv_json()
            assert message == {"type": "peer-left", "peerId": spread.a_id}, message
        fresh.close()
        spread.close()


def test_a_session_suspended_while_redis_restarts_resumes_on_another_server(
    redis_server: RedisServer,  # noqa: F811
    start_server: Callable[..., Server],
) -> None:
    first = start_node(start_server, redis_server)
    second = start_node(start_server, redis_server)
    with Proxy(first.port) as proxy:
        spread = Spread(first, second, proxy, "redis-restart")
        spread.cut()
        redis_server.stop()
        first.wait_records("cluster lost")
        offer(spread.b, spread.a_id, "during-outage")  # local to the first server
        redis_server.start()
        first.wait_records("cluster ready", count=2)
        second.wait_records("cluster ready", count=2)
        # Views may blip while Redis refills (docs/cluster.md): c may have
        # seen a leave when the second server took its snapshot before the
        # first had put a back, and not yet a's return. A relay is promised
        # to a peer the sender sees, so c waits until it sees a again.
        blips = until_present(spread.c, spread.a_id)
        assert {m["type"] for m in blips} <= {"peer-left", "peer-joined"}, blips
        offer(spread.c, spread.a_id, "after-restart")  # through the new Redis
        for client in (spread.b, spread.c):
            before = until_pong(client, "delivered")
            assert {m["type"] for m in before} <= {"peer-left", "peer-joined"}, before
        resumed, welcome = spread.resume_at_second()
        assert (welcome["selfId"], welcome["resumed"]) == (spread.a_id, True), welcome
        replay = until_pong(resumed, "no-repeat")  # with the views' blips, if any
        got = [m["msgId"] for m in replay if m["type"] == "offer"]
        assert got == ["during-outage", "after-restart"], replay
        resumed.close()
        spread.close()
