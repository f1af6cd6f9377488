"""A peer that stops reading: relays to it are dropped, everyone else carries on."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from typing import Any

from conftest import Server
from wsclient import ABSENT, Peer, Peers, http_get, run

MAX_QUEUE_BYTES = 65536
RELAY_PAYLOAD = "x" * 60000  # one relay is close to the whole bound
SEND_LIMIT = 500  # 30 MB: far beyond any socket buffers, so `dropped` must come


def small_buffer_socket(port: int) -> socket.socket:
    """A connected socket whose receive buffer holds little, so the server backs up fast."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


async def relay_until_dropped(sender: Peer, target_id: str) -> dict[str, Any]:
    """Send large relays to *target_id*, one at a time, until one comes back ``dropped``.

    An application ping after each relay bounds the wait: once its pong is in,
    any error for that relay has been read too.
    """
    for seq in range(SEND_LIMIT):
        await sender.relay("offer", target_id, RELAY_PAYLOAD, msg_id=f"flood-{seq}")
        await sender.send({"type": "ping", "msgId": f"after-{seq}"})
        drops = []
        while (reply := await sender.recv())["type"] == "error":
            assert reply["code"] == "dropped", reply
            drops.append(reply)
        assert reply == {"type": "pong", "msgId": f"after-{seq}"}
        if drops:
            return drops[0]
    raise AssertionError(f"{SEND_LIMIT} relays to a stalled peer and none was dropped")


def test_relays_to_a_stalled_peer_are_dropped(start_server: Callable[..., Server]) -> None:
    srv = start_server("--max-queue-bytes", str(MAX_QUEUE_BYTES))

    async def scenario() -> None:
        async with Peers() as peers:
            url = srv.url("stalled")
            sender = await peers.join(url)
            stalled = await peers.join(url, sock=small_buffer_socket(srv.port))
            bystander = await peers.join(url)
            await sender.wait_joined(stalled.id, bystander.id)
            await bystander.wait_joined(sender.id, stalled.id)
            stalled.pause_reading()

            drop = await relay_until_dropped(sender, stalled.id)
            assert drop["message"] == "delivery failed"
            assert isinstance(drop["msgId"], str) and drop["msgId"].startswith("flood-")

            # Relays between the others still go through, both ways.
            await bystander.relay("answer", sender.id, {"ok": 1}, msg_id="b-to-s")
            while (message := await sender.recv())["type"] == "error":
                # Relays still in flight; the stalled peer may have been cut off by now.
                assert message["code"] in ("dropped", "target_not_found"), message
            assert message == {
                "type": "answer",
                "from": bystander.id,
                "payload": {"ok": 1},
                "msgId": "b-to-s",
            }
            await sender.relay("offer", bystander.id, {"ok": 2}, msg_id="s-to-b")
            assert (await bystander.recv())["msgId"] == "s-to-b"
            await bystander.sync()
            assert bystander.view.get(sender.id) == ABSENT

    run(scenario())


def test_the_wait_of_a_backed_up_queue_is_measured(start_server: Callable[..., Server]) -> None:
    """A peer that stops reading backs its queue up; once it reads again the
    queue is written, and ``signaling_queue_wait_seconds`` counts how long
    it waited."""
    srv = start_server("--max-queue-bytes", str(MAX_QUEUE_BYTES))

    def waits() -> tuple[float, float]:
        text = http_get(srv.port, "/metrics").body.decode()
        values = dict(
            line.rsplit(" ", 1)
            for line in text.splitlines()
            if line.startswith("signaling_queue_wait")
        )
        return float(values["signaling_queue_wait_seconds_count"]), float(
            values["signaling_queue_wait_seconds_sum"]
        )

    async def scenario() -> None:
        async with Peers() as peers:
            url = srv.url("waits")
            sender = await peers.join(url)
            stalled = await peers.join(url, sock=small_buffer_socket(srv.port))
            await sender.wait_joined(stalled.id)
            assert waits() == (0, 0)
            stalled.pause_reading()
            await relay_until_dropped(sender, stalled.id)  # its queue is full
            await asyncio.sleep(0.3)  # it waits at least this long
            stalled.resume_reading()
            deadline = time.monotonic() + 10
            while waits()[0] == 0:
                assert time.monotonic() < deadline, "no queue wait counted"
                await asyncio.sleep(0.05)
            count, total = waits()
            assert count >= 1 and total >= 0.3, (count, total)

    run(scenario())
