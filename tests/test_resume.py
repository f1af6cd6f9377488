"""Sessions that survive the network (PROTOCOL.md section 5, resume).

Every fault is real: a TCP proxy between the client and the server resets
the connection (RST both ways) or blackholes it (stops forwarding, sockets
open). The other peers must see nothing of a blip: no ``peer-left``, no
``peer-joined``; the resumed client gets every message it had not
received, once, in order.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from conftest import Server
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
