"""Many peers joining one topic at once all end up with the exact same membership."""

from __future__ import annotations

import asyncio

from conftest import Server
from wsclient import Peer, Peers, run

PEERS = 50


def test_concurrent_joins_give_every_peer_an_exact_view(server: Server) -> None:
    async def scenario() -> None:
        async with Peers() as peers:
            joined = await peers.join_all(*[server.url("crowd")] * PEERS)
            ids = {peer.id for peer in joined}
            assert len(ids) == PEERS

            async def settle(peer: Peer) -> None:
                await peer.wait_until(lambda: len(peer.view) >= PEERS - 1, timeout=20)
                assert set(peer.view) == ids - {peer.id}

            await asyncio.gather(*(settle(peer) for peer in joined))
            counts = [len(peer.events) for peer in joined]
            await asyncio.gather(*(peer.sync() for peer in joined))
            late_events = [len(peer.events) for peer in joined]
            assert late_events == counts, "presence events after everyone had joined"
            for peer in joined:
                assert all(event["type"] == "peer-joined" for event in peer.events)
                assert len(peer.initial_view) + len(peer.events) == PEERS - 1

    run(scenario())


def test_concurrent_joins_and_leaves_keep_views_exact(server: Server) -> None:
    async def scenario() -> None:
        async with Peers() as peers:
            stayers = await peers.join_all(*[server.url("churn")] * 10)
            leavers = await peers.join_all(*[server.url("churn")] * 20)
            late = await peers.join_all(*[server.url("churn")] * 10)
            await asyncio.gather(*(peer.ws.close() for peer in leavers))
            survivors = stayers + late
            ids = {peer.id for peer in survivors}
            left = {peer.id for peer in leavers}

            async def settle(peer: Peer) -> None:
                expected = ids - {peer.id}
                await peer.wait_until(lambda: set(peer.view) == expected, timeout=20)
                # Every leaver was in this peer's view (all joined before any left).
                assert peer.departed == left

            await asyncio.gather(*(settle(peer) for peer in survivors))

    run(scenario())
