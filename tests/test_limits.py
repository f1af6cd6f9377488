"""Limits: peers per topic, connections per worker, message rate, slow consumers."""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import Server, launch
from websockets.exceptions import ConnectionClosed
from wsclient import ABSENT, Peer, Peers, RawClient, run

TOPIC_FULL = {"type": "error", "code": "topic_full", "message": "topic is full"}
SERVER_FULL = {"type": "error", "code": "server_full", "message": "server is full"}


def refused(port: int, path: str) -> tuple[list[dict[str, Any]], int]:
    """Upgrade on *path* (it must succeed); return the messages before the close, and its code."""
    with RawClient.connect(port, path) as client:
        return client.read_until_close()


# --- peers per topic -----------------------------------------------------------


def test_topic_full_refuses_the_next_joiner_unseen(start_server: Callable[..., Server]) -> None:
    srv = start_server("--max-peers-per-topic", "2")

    async def scenario() -> None:
        async with Peers() as peers:
            first = await peers.join(srv.url("pair"))
            second = await peers.join(srv.url("pair"))
            await first.wait_joined(second.id)

            messages, code = await asyncio.to_thread(refused, srv.port, "/ws/pair")
            assert messages == [TOPIC_FULL]  # no welcome, no peer-list
            assert code == 4009

            # The members heard nothing of it; the pong comes after any event.
            await first.sync()
            await second.sync()
            assert first.events == [{"type": "peer-joined", "peerId": second.id}]
            assert second.events == []
            assert set(first.view) == {second.id} and set(second.view) == {first.id}

            # Other topics are not affected.
            elsewhere = await peers.join(srv.url("elsewhere"))
            assert elsewhere.view == {}

            # Once a member leaves, there is room again.
            await second.close()
            await first.wait_left(second.id)
            third = await peers.join(srv.url("pair"))
            assert third.view == {first.id: ABSENT}
            await first.wait_joined(third.id)

    run(scenario())


# --- connections per worker ----------------------------------------------------


def test_server_full_refuses_connections_over_the_limit(
    start_server: Callable[..., Server],
) -> None:
    srv = start_server("--workers", "1", "--max-connections", "2")

    async def scenario() -> None:
        async with Peers() as peers:
            watcher = await peers.join(srv.url("a"))
            leaving = await peers.join(srv.url("b"))

            for path in ("/ws/a", "/ws/c"):  # a topic in use, and a new one
                messages, code = await asyncio.to_thread(refused, srv.port, path)
                assert messages == [SERVER_FULL]
                assert code == 4029
            await watcher.sync()
            assert watcher.events == []

            # Connections count until they are fully closed: retry briefly.
            await leaving.close()
            admitted, admitted_id = await asyncio.to_thread(join_when_admitted, srv.port, "/ws/a")
            with admitted:
                await watcher.wait_joined(admitted_id)
                assert set(watcher.view) == {admitted_id}

    run(scenario())


def join_when_admitted(port: int, path: str, timeout: float = 5.0) -> tuple[RawClient, str]:
    """Connect until the server has room (it answers server_full until then).

    Returns the client and its peer id.
    """
    deadline = time.monotonic() + timeout
    while True:
        client = RawClient.connect(port, path)
        first = client.recv_json()
        if first.get("type") == "welcome":
            assert client.recv_json()["type"] == "peer-list"
            return client, first["selfId"]
        with client:
            assert first == SERVER_FULL
            client.read_until_close()
        assert time.monotonic() < deadline, "never admitted after a peer left"
        time.sleep(0.05)


# --- message rate --------------------------------------------------------------

RATE = 5
BURST = 5
ABUSE_LIMIT = 10
"""Violations within 10 s that disconnect."""


@pytest.fixture(scope="module")
def rate_limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = launch(
        tmp_path_factory.mktemp("server"),
        *("--workers", "1", "--rate-limit", str(RATE), "--rate-burst", str(BURST)),
    )
    yield srv
    srv.stop()
    assert "Traceback" not in srv.output(), srv.output()


def rate_limited_error(msg_id: str | None = None) -> dict[str, Any]:
    error = {"type": "error", "code": "rate_limited", "message": "message rate limit exceeded"}
    if msg_id is not None:
        error["msgId"] = msg_id
    return error


def test_rate_limit_drops_messages_then_disconnects_the_abuser(rate_limited: Server) -> None:
    srv = rate_limited

    async def scenario() -> None:
        async with Peers() as peers:
            sender = await peers.join(srv.url("rate"))
            watcher = await peers.join(srv.url("rate"))
            await sender.wait_joined(watcher.id)

            # The burst is answered; the next messages, sent at once, are not.
            for seq in range(BURST + 1):
                await sender.send({"type": "ping", "msgId": f"burst-{seq}"})
            await sender.send({"type": "ping"})
            await sender.send({"type": "ping", "msgId": 7})
            await sender.send(b"binary counts too")
            await sender.relay("offer", watcher.id, {"n": 1}, msg_id="relay-over")
            for seq in range(BURST):
                assert await sender.recv() == {"type": "pong", "msgId": f"burst-{seq}"}
            assert await sender.recv() == rate_limited_error("burst-5")
            assert await sender.recv() == rate_limited_error()
            assert await sender.recv() == rate_limited_error()  # a number is not echoed
            assert await sender.recv() == rate_limited_error()
            assert await sender.recv() == rate_limited_error("relay-over")

            # Five violations so far: the connection stays open, and the
            # bucket refills at RATE per second.
            await asyncio.sleep(2 / RATE)
            await sender.sync()
            await sender.relay("answer", watcher.id, {"n": 2}, msg_id="relay-ok")
            relayed = await watcher.recv()
            assert relayed["msgId"] == "relay-ok", "the dropped relay was delivered"

            # A flood: the tenth violation within 10 s disconnects.
            for seq in range(20):
                await sender.send({"type": "ping", "msgId": f"flood-{seq}"})
            replies = await read_until_closed(sender)
            assert replies[-1]["type"] == "error" and replies[-1]["code"] == "slow_consumer"
            limited = [r for r in replies[:-1] if r["type"] == "error"]
            assert limited == [rate_limited_error(r["msgId"]) for r in limited], (
                replies
            )  # only rate_limited errors before the close, msgIds echoed
            assert len(limited) == ABUSE_LIMIT - 5 - 1, replies
            assert all(r["type"] == "pong" for r in replies[:-1] if r not in limited)
            assert sender.ws.close_code == 4008
            await watcher.wait_left(sender.id)
            assert watcher.view == {}

    run(scenario())


async def read_until_closed(peer: Peer) -> list[dict[str, Any]]:
    """Every message *peer* receives until the server closes the connection."""
    messages = []
    while True:
        try:
            messages.append(await peer.recv())
        except ConnectionClosed:
            return messages


def test_peer_under_the_rate_is_never_limited(rate_limited: Server) -> None:
    """Twice the burst, at 4 messages a second: the bucket refills in time."""
    srv = rate_limited

    async def scenario() -> None:
        async with Peers() as peers:
            sender = await peers.join(srv.url("polite"))
            target = await peers.join(srv.url("polite"))
            await sender.wait_joined(target.id)
            for seq in range(2 * BURST):
                await sender.relay("offer", target.id, {"seq": seq}, msg_id=f"m{seq}")
                relayed = await target.recv()
                assert relayed["msgId"] == f"m{seq}", relayed
                await asyncio.sleep(1 / (RATE - 1))
            await sender.sync()  # no error came before the pong

    run(scenario())


# --- a slow consumer in a busy topic -------------------------------------------

MAX_QUEUE_BYTES = 65536
ROUNDS = 200
BIG = "x" * 16000  # relays that fill a stalled peer's buffers quickly
SMALL = "y" * 500
JOINER_METADATA = json.dumps("z" * 1000)  # its peer-joined cannot fit after SMALL is dropped


class Relayer:
    """One busy peer: relays offers to the next peer, answers its predecessor's.

    A single task reads the peer's messages and sorts them.
    """

    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self.answers: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.pongs: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.offers_from: dict[str, list[str]] = defaultdict(list)
        self.stalled_errors: list[str] = []

    async def read(self) -> None:
        while True:
            message = await self.peer.recv(timeout=30)
            kind = message["type"]
            if kind == "offer":
                self.offers_from[message["from"]].append(message["msgId"])
                await self.peer.relay("answer", message["from"], None, message["msgId"])
            elif kind == "answer":
                await self.answers.put(message)
            elif kind == "pong":
                await self.pongs.put(message)
            else:
                assert kind == "error", message
                assert message["code"] == "dropped", message
                assert message["msgId"].startswith("to-stalled-"), message
                self.stalled_errors.append(message["msgId"])

    async def round_trips(self, target: str, stalled: str) -> None:
        """ROUNDS offers to *target*, each awaiting its answer; a big relay to *stalled* each."""
        for seq in range(ROUNDS):
            await self.peer.relay("offer", stalled, BIG, f"to-stalled-{seq}")
            await self.peer.relay("offer", target, {"seq": seq}, f"{self.peer.id}-{seq}")
            answer = await asyncio.wait_for(self.answers.get(), 10)
            assert answer["from"] == target and answer["msgId"] == f"{self.peer.id}-{seq}"

    async def relay_until_dropped(self, stalled: str, payload: str) -> None:
        """Relay *payload* to *stalled* until one relay is dropped."""
        before = len(self.stalled_errors)
        for seq in range(500):
            await self.peer.relay("ice-candidate", stalled, payload, f"to-stalled-{seq}")
            # Replies come in order: once the pong is in, any error for the relay is too.
            await self.peer.send({"type": "ping", "msgId": f"fill-{seq}"})
            pong = await asyncio.wait_for(self.pongs.get(), 10)
            assert pong == {"type": "pong", "msgId": f"fill-{seq}"}
            if len(self.stalled_errors) > before:
                return
        raise AssertionError("relays to a stalled peer were never dropped")


def test_non_reader_in_a_busy_topic_is_cut_and_the_others_keep_relaying(
    start_server: Callable[..., Server],
) -> None:
    srv = start_server("--max-queue-bytes", str(MAX_QUEUE_BYTES))

    async def scenario() -> None:
        async with Peers() as peers:
            busy = [await peers.join(srv.url("busy")) for _ in range(3)]
            stalled, stalled_id = await asyncio.to_thread(
                RawClient.join, srv.port, "/ws/busy", 4096
            )
            with stalled:  # not read from until the end
                for peer in busy:
                    await peer.wait_joined(stalled_id, *(p.id for p in busy if p is not peer))
                relayers = [Relayer(peer) for peer in busy]
                readers = [asyncio.create_task(r.read()) for r in relayers]
                try:
                    await asyncio.gather(
                        *(
                            r.round_trips(busy[(i + 1) % 3].id, stalled_id)
                            for i, r in enumerate(relayers)
                        )
                    )
                    # Leave less room in the stalled peer's queue than a peer-joined takes.
                    await relayers[0].relay_until_dropped(stalled_id, BIG)
                    await relayers[0].relay_until_dropped(stalled_id, SMALL)
                finally:
                    for task in readers:
                        task.cancel()
                    await asyncio.gather(*readers, return_exceptions=True)

                # Every relay between the busy peers arrived, in order.
                for i, relayer in enumerate(relayers):
                    sender = busy[(i - 1) % 3].id
                    expected = [f"{sender}-{seq}" for seq in range(ROUNDS)]
                    assert relayer.offers_from[sender] == expected
                    assert set(relayer.offers_from) == {sender}

                # A join is a presence event the stalled peer cannot take: it is cut.
                joiner = await peers.join(srv.url("busy", metadata=JOINER_METADATA))
                for peer in [*busy, joiner]:
                    await peer.wait_left(stalled_id)
                    assert stalled_id not in peer.view
                assert joiner.initial_view.keys() == {stalled_id, *(p.id for p in busy)}
                srv.wait_records("peer left", peer=stalled_id, reason="slow_consumer")

                messages, code = await asyncio.to_thread(stalled.read_until_close, 10)
                assert code == 4008
                assert messages[-1]["type"] == "error", messages[-1]
                assert messages[-1]["code"] == "slow_consumer"
                relayed = messages[:-1]
                assert relayed, "the stalled peer was sent nothing before the close"
                assert all(m["from"] in {p.id for p in busy} for m in relayed)

    run(scenario())
