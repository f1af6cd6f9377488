"""Broadcasts and app-defined relay types (PROTOCOL.md section 9), against
the real server: on 1 and 4 workers, with a full target among 1,000
receivers, the bounds, and across two cluster servers."""

from __future__ import annotations

import asyncio
import json
import selectors
import socket
from collections.abc import Callable
from typing import Any

import pytest
from conftest import Server
from redis_server import RedisServer, redis_server  # noqa: F401
from signaling_sharded.client import Broadcast, Error, Relay, SignalingClient
from test_abuse import ensure_fd_limit
from test_admin import suspend
from test_backpressure import small_buffer_socket
from test_cluster import CONVERGE, converge, start_cluster
from wsclient import OP_TEXT, Peer, Peers, RawClient, run

pytestmark = pytest.mark.timeout(180)

StartServer = Callable[..., Server]


def broadcast(peer: Peer, payload: Any, msg_id: str) -> Any:
    return peer.send({"type": "broadcast", "payload": payload, "msgId": msg_id})


@pytest.mark.parametrize("workers", ["1", "4"])
def test_a_broadcast_reaches_every_other_peer_in_order(
    start_server: StartServer, workers: str
) -> None:
    server = start_server("--workers", workers)

    async def scenario() -> None:
        async with Peers() as peers:
            members = await peers.join_all(*[server.url("room")] * 5)
            await converge(members, CONVERGE)
            sender, others = members[0], members[1:]
            for n in range(20):
                await broadcast(sender, {"n": n}, f"b{n}")
            for peer in others:
                got = [await peer.recv() for _ in range(20)]
                assert got == [
                    {"type": "broadcast", "from": sender.id, "payload": {"n": n}, "msgId": f"b{n}"}
                    for n in range(20)
                ]
            await sender.sync()  # nothing came back to the sender

    run(scenario())


def test_a_full_target_among_a_thousand_misses_and_the_rest_get_all(
    start_server: StartServer,
) -> None:
    """1,000 receivers; one is a suspended session (what it is sent is kept
    up to --max-queue-bytes): past that it misses broadcasts, the sender
    hears one ``dropped`` with ``missed`` 1 per broadcast, and the other 999
    get every one, in order."""
    receivers, count, payload = 1000, 40, "x" * 2000
    ensure_fd_limit(receivers + 200)
    server = start_server(
        "--max-peers-per-topic", "2000", "--max-queue-bytes", "32768", "--broadcast-rate", "1000"
    )
    sockets = [RawClient.join(server.port, "/ws/crowd")[0] for _ in range(receivers - 1)]
    suspend(server, "crowd")
    sender, sender_id = RawClient.join(server.port, "/ws/crowd")
    for n in range(count):
        message = {"type": "broadcast", "payload": payload, "msgId": f"m{n}"}
        sender.send_frame(OP_TEXT, json.dumps(message).encode())
    sender.send_frame(OP_TEXT, b'{"type":"ping","msgId":"done"}')
    answers = []
    while (answer := sender.recv_json())["type"] != "pong":
        answers.append(answer)
    assert answers, "the suspended session's bound was never reached"
    for answer in answers:
        assert (answer["code"], answer["missed"]) == ("dropped", 1), answer
    missed = len(answers)
    assert missed < count

    # Every other receiver got every broadcast, in order: counted on the
    # raw streams (frames are unmasked text), after the presence of the
    # sender's join.
    marker = f'"type":"broadcast","from":"{sender_id}"'.encode()
    last = f'"msgId":"m{count - 1}"'.encode()
    seen = {client.sock.fileno(): bytearray() for client in sockets}
    selector = selectors.DefaultSelector()
    for client in sockets:
        client.sock.setblocking(False)
        selector.register(client.sock, selectors.EVENT_READ)
    open_ = set(seen)
    while open_:
        events = selector.select(timeout=20)
        assert events, f"{len(open_)} receivers still short of the last broadcast"
        for key, _ in events:
            sock: socket.socket = key.fileobj  # type: ignore[assignment]
            data = sock.recv(1 << 20)
            assert data, "a receiver was disconnected"
            buffer = seen[sock.fileno()]
            buffer += data
            if last in buffer[-200:]:
                open_.discard(sock.fileno())
                selector.unregister(sock)
    for buffer in seen.values():
        assert buffer.count(marker) == count
        order = [buffer.find(f'"msgId":"m{n}"'.encode()) for n in range(count)]
        assert order == sorted(order) and -1 not in order
    for client in [*sockets, sender]:
        client.close()


def test_a_stalled_reader_misses_broadcasts_and_stays(start_server: StartServer) -> None:
    server = start_server("--max-queue-bytes", "65536", "--broadcast-rate", "10000")

    async def scenario() -> None:
        async with Peers() as peers:
            url = server.url("stall")
            sender = await peers.join(url)
            stalled = await peers.join(url, sock=small_buffer_socket(server.port))
            bystander = await peers.join(url)
            await converge([sender, stalled, bystander], CONVERGE)
            stalled.pause_reading()
            payload = "y" * 12000
            for n in range(2000):
                await broadcast(sender, payload, f"s{n}")
                await sender.send({"type": "ping", "msgId": f"p{n}"})
                reply = await sender.recv()
                if reply["type"] == "error":
                    assert (reply["code"], reply["missed"], reply["msgId"]) == (
                        "dropped",
                        1,
                        f"s{n}",
                    )
                    break
                assert (await bystander.recv())["msgId"] == f"s{n}"
            else:
                raise AssertionError("the stalled reader never missed a broadcast")
            assert await sender.recv() == {"type": "pong", "msgId": f"p{n}"}
            assert (await bystander.recv())["msgId"] == f"s{n}"
            await bystander.sync()
            assert stalled.id in bystander.view, "a missed broadcast disconnects nobody"

    run(scenario())


@pytest.mark.parametrize(
    ("flags", "message", "code"),
    [
        (("--broadcast", "off"), {"type": "broadcast", "payload": 1}, "forbidden"),
        (
            ("--max-broadcast-size", "100"),
            {"type": "broadcast", "payload": "z" * 100},
            "invalid_message",
        ),
        (("--relay-type", "bye"), {"type": "hello", "to": "x"}, "invalid_type"),
    ],
)
def test_what_is_refused(
    start_server: StartServer, flags: tuple[str, ...], message: dict[str, Any], code: str
) -> None:
    server = start_server(*flags)
    client, _ = RawClient.join(server.port, "/ws/refusals")
    client.send_frame(OP_TEXT, json.dumps({**message, "msgId": "r"}).encode())
    answer = client.recv_json()
    assert (answer["type"], answer["code"], answer["msgId"]) == ("error", code, "r")
    client.close()


def test_the_broadcast_rate_is_bounded(start_server: StartServer) -> None:
    server = start_server("--broadcast-rate", "0.5", "--broadcast-burst", "3")
    client, _ = RawClient.join(server.port, "/ws/rated")
    for n in range(4):
        client.send_frame(OP_TEXT, json.dumps({"type": "broadcast", "msgId": f"b{n}"}).encode())
    client.send_frame(OP_TEXT, b'{"type":"ping","msgId":"p"}')
    answer = client.recv_json()
    assert (answer["code"], answer["msgId"]) == ("rate_limited", "b3")
    assert client.recv_json() == {"type": "pong", "msgId": "p"}
    client.close()


def test_the_clients_broadcast_and_relay_an_allowed_type(start_server: StartServer) -> None:
    server = start_server("--relay-type", "bye", "--relay-type", "renegotiate")
    base = f"ws://127.0.0.1:{server.port}"

    async def scenario() -> None:
        async with (
            SignalingClient(base, "clients") as a,
            SignalingClient(base, "clients") as b,
        ):
            async for event in a:
                if getattr(event, "peer_id", None) == b.self_id:
                    break
            await a.broadcast({"hello": "all"}, msg_id="h")
            await a.send("bye", b.self_id, {"why": "done"})
            got = []
            async for event in b:
                if isinstance(event, (Broadcast, Relay)):
                    got.append(event)
                if len(got) == 2:
                    break
            assert got == [
                Broadcast(a.self_id, {"hello": "all"}, "h"),
                Relay("bye", a.self_id, {"why": "done"}),
            ]
            with pytest.raises(ValueError):
                await a.send("broadcast", b.self_id, 1)

    asyncio.run(asyncio.wait_for(scenario(), 30))
    assert Error("dropped", "delivery failed", "m", 2).missed == 2


def test_a_broadcast_crosses_a_cluster_in_order(
    redis_server: RedisServer,  # noqa: F811
    start_server: StartServer,
) -> None:
    first, second = start_cluster(start_server, redis_server, 2, "--broadcast-rate", "1000")

    async def scenario() -> None:
        async with Peers() as peers:
            here = await peers.join_all(*[first.url("wide")] * 2)
            there = await peers.join_all(*[second.url("wide")] * 3)
            await converge(here + there, CONVERGE)
            sender = here[0]
            for n in range(50):
                await broadcast(sender, n, f"c{n}")
            for where, peer in [("here", here[1])] + [("there", p) for p in there]:
                got = []
                try:
                    for _ in range(50):
                        got.append((await peer.recv())["payload"])
                except asyncio.TimeoutError:
                    raise AssertionError(f"a peer {where} got only {got}") from None
                assert got == list(range(50))
            await sender.sync()

    run(scenario())


def test_a_cluster_broadcast_missed_on_two_servers_is_one_dropped(
    redis_server: RedisServer,  # noqa: F811
    start_server: StartServer,
) -> None:
    """A suspended session on each server, past its bound: the sender hears
    one ``dropped`` per broadcast, counting both, once the other server has
    answered; a live receiver there gets every broadcast, in order."""
    flags = ("--max-queue-bytes", "32768", "--broadcast-rate", "1000")
    flags += ("--resume-secret", "broadcast-test-resume-secret")
    first, second = start_cluster(start_server, redis_server, 2, *flags, workers=1)
    count, payload = 40, "x" * 2000
    receiver, receiver_id = RawClient.join(second.port, "/ws/far")
    suspended = {suspend(server, "far")[0] for server in (first, second)}
    sender = RawClient.connect(first.port, "/ws/far")
    sender_id = sender.recv_json()["selfId"]
    # The sender's node must know every remote member before it broadcasts.
    wanted, seen = suspended | {receiver_id}, set[str]()
    while not wanted <= seen:
        message = sender.recv_json()
        seen |= {p["id"] for p in message.get("peers", [])}
        if message["type"] == "peer-joined":
            seen.add(message["peerId"])
    for n in range(count):
        message = {"type": "broadcast", "payload": payload, "msgId": f"m{n}"}
        sender.send_frame(OP_TEXT, json.dumps(message).encode())
    errors = []
    while not errors or errors[-1]["msgId"] != f"m{count - 1}":
        errors.append(sender.recv_json())
    sender.send_frame(OP_TEXT, b'{"type":"ping","msgId":"done"}')
    while (answer := sender.recv_json())["type"] != "pong":
        errors.append(answer)
    assert {e["code"] for e in errors} == {"dropped"}, errors
    ids = [e["msgId"] for e in errors]
    assert len(ids) == len(set(ids)), f"more than one dropped for a broadcast: {ids}"
    assert {e["missed"] for e in errors} <= {1, 2}, errors
    assert errors[-1]["missed"] == 2, errors  # both bounds were passed by then

    marker = f'"type":"broadcast","from":"{sender_id}"'
    got = []
    while len(got) < count:
        message = receiver.recv_json()
        if message["type"] == "broadcast":
            assert f'"type":"broadcast","from":"{message["from"]}"' == marker
            got.append(message["msgId"])
    assert got == [f"m{n}" for n in range(count)]
    for client in (receiver, sender):
        client.close()
