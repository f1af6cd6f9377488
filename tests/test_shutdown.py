"""SIGTERM drains the server: every peer is told to go away, then the process exits."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

from conftest import Server
from wsclient import Peers, RawClient, run


def test_sigterm_closes_every_peer_with_1001_and_exits_0(
    start_server: Callable[..., Server],
) -> None:
    srv = start_server()

    async def scenario() -> None:
        async with Peers() as peers:
            joined = await peers.join_all(
                *(srv.url(topic) for topic in ("drain-a", "drain-a", "drain-b", "drain-c"))
            )
            raw, _ = RawClient.join(srv.port, "/ws/drain-b")
            with raw:
                assert srv.status("/readyz") == 200
                srv.proc.send_signal(signal.SIGTERM)
                codes = await asyncio.gather(*(peer.wait_closed(timeout=10) for peer in joined))
                assert codes == [1001] * len(joined)
                assert await asyncio.to_thread(raw.expect_close, 10) == 1001
        assert await asyncio.to_thread(srv.wait_exit, 10) == 0

    run(scenario())
