"""Relaying offers, answers and ICE candidates, and the error replies."""

from __future__ import annotations

import asyncio
import itertools
import json

import pytest
from conftest import Server
from wsclient import RELAY_TYPES, Peer, Peers, run

TARGET = "<target>"
"""Placeholder, in a test case's message, for the id of a peer that is present."""


def with_target(message: dict[str, object], target_id: str) -> dict[str, object]:
    def swap(value: object) -> object:
        if value == TARGET:
            return target_id
        if isinstance(value, list):
            return [swap(item) for item in value]
        return value

    return {key: swap(value) for key, value in message.items()}


async def join_pair(peers: Peers, url: str) -> tuple[Peer, Peer]:
    """Two peers in one topic, each one aware of the other."""
    first = await peers.join(url)
    second = await peers.join(url)
    await first.wait_joined(second.id)
    return first, second


@pytest.mark.parametrize("kind", RELAY_TYPES)
def test_relay_reaches_target_with_server_set_from(server: Server, kind: str) -> None:
    async def scenario() -> None:
        async with Peers() as peers:
            sender, target = await join_pair(peers, server.url(f"relay-{kind}"))
            payload = {"sdp": "v=0\r\n", "list": [1, None, "é"]}
            await sender.relay(kind, target.id, payload, msg_id="m-1")
            assert await target.recv() == {
                "type": kind,
                "from": sender.id,
                "payload": payload,
                "msgId": "m-1",
            }
            await sender.sync()  # and no error came back

    run(scenario())


def test_payload_is_relayed_byte_for_byte(server: Server) -> None:
    raw_payloads = [
        '{"a": [1,  2 ]  ,"b" :{ }}',
        r'"caf\u00e9 \ud83d\ude00 \" \\ \/"',
        '"café 😀"',
        "1.50e+3",
        "-0",
        "[ ]",
        "null",
        "true",
        '{"deep":[[[[[[{"x":[]}]]]]]]}',
    ]

    async def scenario() -> None:
        async with Peers() as peers:
            sender, target = await join_pair(peers, server.url("verbatim"))
            for index, raw in enumerate(raw_payloads):
                frame = (
                    f'{{"type":"offer", "to":"{target.id}",\n'
                    f'"payload":  {raw} , "msgId":"v{index}"}}'
                )
                await sender.send(frame)
                received = await target.recv_text()
                assert raw in received, (raw, received)
                message = json.loads(received)
                assert message["payload"] == json.loads(raw)
                assert message["msgId"] == f"v{index}"

    run(scenario())


def test_from_cannot_be_spoofed(server: Server) -> None:
    async def scenario() -> None:
        async with Peers() as peers:
            sender, target = await join_pair(peers, server.url("spoof"))
            impostor = "01ARZ3NDEKTSV4RRFFQ69G5FAV"
            await sender.send(
                {"type": "answer", "to": target.id, "from": impostor, "payload": {"x": 1}}
            )
            received = await target.recv_text()
            assert impostor not in received
            assert json.loads(received)["from"] == sender.id

    run(scenario())


def test_msg_id_is_omitted_when_not_given_and_unknown_fields_are_ignored(
    server: Server,
) -> None:
    async def scenario() -> None:
        async with Peers() as peers:
            sender, target = await join_pair(peers, server.url("no-msgid"))
            await sender.send(
                {"type": "ice-candidate", "to": target.id, "payload": "c", "extra": [1]}
            )
            assert await target.recv() == {
                "type": "ice-candidate",
                "from": sender.id,
                "payload": "c",
            }

    run(scenario())


def test_ping_is_answered_with_pong(server: Server) -> None:
    async def scenario() -> None:
        async with Peers() as peers:
            peer = await peers.join(server.url("app-ping"))
            await peer.send({"type": "ping", "msgId": "p-1"})
            assert await peer.recv() == {"type": "pong", "msgId": "p-1"}
            await peer.send({"type": "ping"})
            assert await peer.recv() == {"type": "pong"}

    run(scenario())


# Each case: the message to send, then the error code and message expected back.
ERROR_CASES = [
    ({"type": "bogus", "msgId": "e1"}, "invalid_type", "unknown message type"),
    ({"type": "pong", "msgId": "e2"}, "invalid_type", "unknown message type"),
    ({"msgId": "e3", "to": TARGET}, "invalid_type", "unknown message type"),
    ({"type": "offer", "payload": {}, "msgId": "e4"}, "missing_target", "to required"),
    ({"type": "answer", "to": "", "msgId": "e5"}, "missing_target", "to required"),
    (
        {"type": "offer", "to": "01ARZ3NDEKTSV4RRFFQ69G5FAV", "payload": 1, "msgId": "e6"},
        "target_not_found",
        "peer not found",
    ),
    ({"type": "offer", "to": "nobody", "msgId": "e7"}, "target_not_found", "peer not found"),
]


@pytest.mark.parametrize(("message", "code", "text"), ERROR_CASES)
def test_error_reply_echoes_msg_id(
    server: Server, message: dict[str, object], code: str, text: str
) -> None:
    async def scenario() -> None:
        async with Peers() as peers:
            sender, target = await join_pair(peers, server.url(f"errors-{message['msgId']}"))
            await sender.send(with_target(message, target.id))
            assert await sender.recv_error() == {
                "type": "error",
                "code": code,
                "message": text,
                "msgId": message["msgId"],
            }
            await sender.sync()  # still connected, nothing more was sent

    run(scenario())


def test_error_without_msg_id_has_none(server: Server) -> None:
    async def scenario() -> None:
        async with Peers() as peers:
            peer = await peers.join(server.url("errors-no-msgid"))
            await peer.send({"type": "offer", "to": "01ARZ3NDEKTSV4RRFFQ69G5FAV"})
            error = await peer.recv_error()
            assert error["code"] == "target_not_found"
            assert "msgId" not in error

    run(scenario())


@pytest.mark.parametrize(
    "frame", ["not json", "[1,2]", '"str"', "42", "null", "{", "", '{"type":"ping"} {}']
)
def test_frame_that_is_not_a_json_object_is_invalid_json(server: Server, frame: str) -> None:
    async def scenario() -> None:
        async with Peers() as peers:
            peer = await peers.join(server.url("invalid-json"))
            await peer.send(frame)
            error = await peer.recv_error()
            assert error["code"] == "invalid_json"
            assert "msgId" not in error
            await peer.sync()

    run(scenario())


@pytest.mark.parametrize(
    "message",
    [
        {"type": "offer", "to": 5, "payload": {}, "msgId": "w1"},
        {"type": "offer", "to": [TARGET], "msgId": "w2"},
        {"type": 5, "msgId": "w3"},
        {"type": "ping", "msgId": 7},
        {"type": "offer", "to": TARGET, "payload": 1, "msgId": {"id": 1}},
    ],
)
def test_wrong_field_type_is_invalid_message(server: Server, message: dict[str, object]) -> None:
    async def scenario() -> None:
        async with Peers() as peers:
            sender, target = await join_pair(peers, server.url("invalid-message"))
            await sender.send(with_target(message, target.id))
            error = await sender.recv_error()
            assert error["code"] == "invalid_message"
            if isinstance(message["msgId"], str):
                assert error["msgId"] == message["msgId"]
            else:
                assert "msgId" not in error
            await sender.sync()
            await target.sync()  # nothing was relayed

    run(scenario())


def test_binary_frame_is_unsupported_and_connection_stays_open(server: Server) -> None:
    async def scenario() -> None:
        async with Peers() as peers:
            sender, target = await join_pair(peers, server.url("binary"))
            await sender.send(json.dumps({"type": "offer", "to": target.id}).encode())
            assert (await sender.recv_error())["code"] == "unsupported_frame"
            await sender.sync()
            await target.sync()  # the binary frame was not relayed

    run(scenario())


def test_relay_to_a_peer_of_another_topic_is_target_not_found(server: Server) -> None:
    topics = [f"isolated-{i}" for i in range(4)]

    async def scenario() -> None:
        async with Peers() as peers:
            joined = await peers.join_all(*(server.url(topic) for topic in topics))
            for sender, target in itertools.permutations(joined, 2):
                await sender.relay("offer", target.id, {"secret": 1}, msg_id=target.id)
                error = await sender.recv_error()
                assert error["code"] == "target_not_found"
                assert error["msgId"] == target.id
            for peer in joined:
                await peer.sync()

    run(scenario())


def test_pairs_relay_both_ways(server: Server) -> None:
    async def scenario() -> None:
        async with Peers() as peers:
            groups = [
                await peers.join_all(*[server.url(topic)] * size)
                for topic, size in (("mesh-a", 4), ("mesh-b", 3))
            ]
            for group in groups:
                for peer in group:
                    await peer.wait_joined(*(p.id for p in group if p is not peer))

            async def send_to_all(sender: Peer, group: list[Peer]) -> None:
                for target in group:
                    if target is not sender:
                        kind = "offer" if sender.id < target.id else "answer"
                        await sender.relay(kind, target.id, {"to": target.id}, sender.id)

            async def receive_from_all(target: Peer, group: list[Peer]) -> set[str]:
                received = set()
                for _ in range(len(group) - 1):
                    message = await target.recv()
                    assert message["payload"] == {"to": target.id}
                    assert message["msgId"] == message["from"]
                    expected = "offer" if message["from"] < target.id else "answer"
                    assert message["type"] == expected
                    received.add(message["from"])
                return received

            for group in groups:
                results = await asyncio.gather(
                    *(send_to_all(peer, group) for peer in group),
                    *(receive_from_all(peer, group) for peer in group),
                )
                for peer, senders in zip(group, results[len(group) :], strict=True):
                    assert senders == {p.id for p in group if p is not peer}
            for peer in itertools.chain(*groups):
                await peer.sync()

    run(scenario())


def test_relays_keep_fifo_order_per_sender_and_target(server: Server) -> None:
    count = 1000

    async def scenario() -> None:
        async with Peers() as peers:
            sender, target = await join_pair(peers, server.url("fifo"))

            async def send_all() -> None:
                for seq in range(count):
                    await sender.relay("ice-candidate", target.id, {"seq": seq})

            async def receive_all() -> list[int]:
                return [(await target.recv())["payload"]["seq"] for _ in range(count)]

            _, sequence = await asyncio.gather(send_all(), receive_all())
            assert sequence == list(range(count))
            await sender.sync()  # no error for any of them

    run(scenario())
