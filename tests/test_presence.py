"""Joining a topic: welcome, peer-list, metadata and presence events."""

from __future__ import annotations

import json

from conftest import Server
from wsclient import ABSENT, Peers, RawClient, run


def test_welcome_then_empty_peer_list_when_alone(server: Server) -> None:
    async def scenario() -> None:
        async with Peers() as peers:
            alone = await peers.join(server.url("alone"))
            assert set(alone.welcome) >= {"type", "selfId", "pingInterval"}
            assert alone.welcome["pingInterval"] == 30
            assert alone.view == {}

    run(scenario())


def test_peer_ids_are_unique(server: Server) -> None:
    async def scenario() -> None:
        async with Peers() as peers:
            joined = await peers.join_all(*(server.url(f"ids-{i % 3}") for i in range(12)))
            assert len({peer.id for peer in joined}) == 12

    run(scenario())


def test_peer_list_and_peer_joined_carry_metadata(server: Server) -> None:
    alice_meta = {"name": "Alice é", "tags": [1, 2.5, None, True], "nested": {"k": "v w"}}

    async def scenario() -> None:
        async with Peers() as peers:
            alice = await peers.join(server.url("meta", metadata=json.dumps(alice_meta)))
            bob = await peers.join(server.url("meta"))
            assert bob.view == {alice.id: alice_meta}
            await alice.wait_joined(bob.id)
            assert alice.events == [{"type": "peer-joined", "peerId": bob.id}]

            carol = await peers.join(server.url("meta", metadata='"just a string"'))
            assert carol.view == {alice.id: alice_meta, bob.id: ABSENT}
            await alice.wait_joined(carol.id)
            await bob.wait_joined(carol.id)
            expected = {"type": "peer-joined", "peerId": carol.id, "metadata": "just a string"}
            assert alice.events[-1] == expected
            assert bob.events[-1] == expected

    run(scenario())


def test_normal_close_sends_peer_left(server: Server) -> None:
    async def scenario() -> None:
        async with Peers() as peers:
            first, second, third = await peers.join_all(*[server.url("bye")] * 3)
            for peer in (first, second):
                await peer.wait_joined(*(p.id for p in (first, second, third) if p is not peer))
            await third.ws.close()
            assert third.ws.close_code == 1000
            await first.wait_left(third.id)
            await second.wait_left(third.id)
            assert first.view == {second.id: ABSENT}
            assert second.view == {first.id: ABSENT}
            assert first.events[-1] == {"type": "peer-left", "peerId": third.id}

    run(scenario())


def test_killed_client_sends_peer_left(server: Server) -> None:
    async def scenario() -> None:
        async with Peers() as peers:
            watcher = await peers.join(server.url("killed"))
            victim = await peers.join(server.url("killed"))
            await watcher.wait_joined(victim.id)
            victim.abort()
            await watcher.wait_left(victim.id)
            assert watcher.view == {}

    run(scenario())


def test_raw_socket_closed_without_close_frame_sends_peer_left(server: Server) -> None:
    async def scenario() -> None:
        async with Peers() as peers:
            watcher = await peers.join(server.url("dropped-socket"))
            client, client_id = RawClient.join(server.port, "/ws/dropped-socket")
            await watcher.wait_joined(client_id)
            client.close()
            await watcher.wait_left(client_id)

    run(scenario())


def test_topic_is_the_percent_decoded_segment(server: Server) -> None:
    async def scenario() -> None:
        async with Peers() as peers:
            plain = await peers.join(f"ws://127.0.0.1:{server.port}/ws/caf%C3%A9-abc")
            encoded = await peers.join(f"ws://127.0.0.1:{server.port}/ws/caf%C3%A9-%61%62c")
            assert encoded.view == {plain.id: ABSENT}
            await plain.wait_joined(encoded.id)

    run(scenario())


def test_topics_do_not_see_each_other(server: Server) -> None:
    async def scenario() -> None:
        async with Peers() as peers:
            red = await peers.join(server.url("colour-red"))
            blue = await peers.join(server.url("colour-blue"))
            red_two = await peers.join(server.url("colour-red"))
            assert blue.view == {}
            assert red_two.view == {red.id: ABSENT}
            await red.wait_joined(red_two.id)
            await red_two.ws.close()
            await red.wait_left(red_two.id)
            await blue.sync()
            assert blue.events == []

    run(scenario())
