"""Keepalive pings: a peer that stops answering is closed, one that answers stays."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise

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


def test_peers_that_join_together_are_pinged_a_part_at_a_time(
    start_server: Callable[..., Server],
) -> None:
    """A tick goes over the connections in parts (ten, 25 ms apart with a
    1 s ping interval), so peers that joined in the same moment are not
    pinged in one burst: their first pings come in several bursts."""
    srv = start_server("--ping-interval", "1", "--ping-timeout", "10")
    joined = [RawClient.join(srv.port, "/ws/together") for _ in range(20)]

    def first_ping_at(client: RawClient) -> float:
        client.answer_pings(1, timeout=10)
        return time.monotonic()

    try:
        with ThreadPoolExecutor(len(joined)) as pool:
            times = sorted(pool.map(first_ping_at, (client for client, _ in joined)))
    finally:
        for client, _ in joined:
            client.close()
    # Bursts: pings less than 10 ms apart are one.
    bursts = 1 + sum(1 for a, b in pairwise(times) if b - a > 0.010)
    spread = [round(t - times[0], 3) for t in times]
    assert bursts >= 5, f"{bursts} bursts: {spread}"
    # Over most of a tick period (0.25 s), not one loop iteration's jitter.
    assert spread[-1] >= 0.1, spread
