"""Keepalive pings: a peer that stops answering is closed, one that answers stays."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from conftest import Server
from wsclient import Peers, RawClient, run

PING_INTERVAL = 0.3


def start_fast_pings(start_server: Callable[..., Server]) -> Server:
    """A server that pings every 0.3 s and gives up on a peer 0.3 s after a ping."""
    return start_server("--ping-interval", str(PING_INTERVAL), "--ping-timeout", str(PING_INTERVAL))


def test_unresponsive_peer_is_closed_and_answering_peers_stay(
    start_server: Callable[..., Server],
) -> None:
    srv = start_fast_pings(start_server)

    async def scenario() -> None:
        async with Peers() as peers:
            library = await peers.join(srv.url("liveness"))
            assert library.welcome["pingInterval"] == pytest.approx(PING_INTERVAL)
            answering, answering_id = RawClient.join(srv.port, "/ws/liveness")
            silent, silent_id = RawClient.join(srv.port, "/ws/liveness")
            with answering, silent:
                await library.wait_joined(answering_id, silent_id)
                # Six answered pings span well over the silent peer's deadline.
                pings = asyncio.to_thread(answering.answer_pings, 6, 10)
                await asyncio.gather(pings, library.wait_left(silent_id, timeout=5))
                await asyncio.to_thread(silent.wait_disconnected, 5)
                assert set(library.view) == {answering_id}
                await library.sync()  # the library answers pings on its own

    run(scenario())


def test_paused_client_is_closed_after_ping_timeout(
    start_server: Callable[..., Server],
) -> None:
    srv = start_fast_pings(start_server)

    async def scenario() -> None:
        async with Peers() as peers:
            watcher = await peers.join(srv.url("paused"))
            frozen = await peers.join(srv.url("paused"))
            await watcher.wait_joined(frozen.id)
            frozen.pause_reading()
            await watcher.wait_left(frozen.id, timeout=5)
            assert watcher.view == {}
            await watcher.sync()

    run(scenario())
