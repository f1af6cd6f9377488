"""End to end: two aiortc peers connect through the server and talk over a DataChannel.

Each side strips the ICE candidates out of its SDP and sends them one by one
as ``ice-candidate`` messages, then an end-of-candidates (payload ``null``).
The peers can therefore only connect if the server relayed the offer, the
answer and the candidates, in order.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
from conftest import Server
from signaling_sharded.client import PeerJoined, Relay, SignalingClient
from wsclient import run

aiortc = pytest.importorskip(
    "aiortc", reason="aiortc is not installed (pip install 'aiortc>=1.13')"
)
from aiortc import (  # noqa: E402
    RTCConfiguration,
    RTCDataChannel,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.sdp import candidate_from_sdp  # noqa: E402

TIMEOUT = 30.0
"""Seconds for ICE, DTLS and SCTP to come up on a busy machine."""

T = TypeVar("T")


def split_candidates(sdp: str) -> tuple[str, list[dict[str, Any]]]:
    """*sdp* without its candidates, and the candidates as ``ice-candidate`` payloads."""
    kept: list[str] = []
    found: list[tuple[str, int]] = []
    mids: dict[int, str] = {}
    index = -1
    for line in sdp.splitlines():
        if line.startswith("m="):
            index += 1
        elif line.startswith("a=mid:"):
            mids[index] = line[len("a=mid:") :]
        if line.startswith("a=candidate:"):
            found.append((line[len("a=") :], index))
        elif line != "a=end-of-candidates":
            kept.append(line)
    candidates = [
        {"candidate": text, "sdpMid": mids.get(i), "sdpMLineIndex": i} for text, i in found
    ]
    return "\r\n".join(kept) + "\r\n", candidates


class Side:
    """One aiortc peer connection, signaled through its own `SignalingClient`."""

    def __init__(self, client: SignalingClient) -> None:
        self.client = client
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))  # host candidates only
        self.received: Counter[str] = Counter()
        self.offer_msg_ids: list[str | None] = []
        self.sent_candidates = 0
        self.done_sending = asyncio.Event()
        self.channel: asyncio.Future[RTCDataChannel] = asyncio.get_running_loop().create_future()
        self.messages: asyncio.Queue[str] = asyncio.Queue()
        self.pc.on("datachannel", self._attach)

    def _attach(self, channel: RTCDataChannel) -> None:
        channel.on("message", self.messages.put_nowait)
        if channel.readyState == "open":
            self.channel.set_result(channel)
        else:
            channel.on("open", lambda: self.channel.set_result(channel))

    async def call(self, peer_id: str) -> None:
        """Open a DataChannel and send the offer, then the candidates."""
        self._attach(self.pc.createDataChannel("chat"))
        await self.pc.setLocalDescription(await self.pc.createOffer())
        await self._send_description(peer_id, msg_id="offer-1")

    async def signal(self) -> None:
        """Apply every relayed message to the peer connection, answering an offer."""
        async for event in self.client:
            if not isinstance(event, Relay):
                assert isinstance(event, PeerJoined), f"unexpected event: {event}"
                continue
            self.received[event.type] += 1
            if event.type in ("offer", "answer"):
                description = RTCSessionDescription(event.payload["sdp"], event.payload["type"])
                assert "a=candidate" not in description.sdp
                await self.pc.setRemoteDescription(description)
            if event.type == "offer":
                self.offer_msg_ids.append(event.msg_id)
                await self.pc.setLocalDescription(await self.pc.createAnswer())
                await self._send_description(event.sender)
            elif event.type == "ice-candidate":
                await self.pc.addIceCandidate(parse_candidate(event.payload))

    async def _send_description(self, peer_id: str, msg_id: str | None = None) -> None:
        local = self.pc.localDescription
        sdp, candidates = split_candidates(local.sdp)
        await self.client.send(local.type, peer_id, {"type": local.type, "sdp": sdp}, msg_id)
        for candidate in candidates:
            await self.client.ice_candidate(peer_id, candidate)
        await self.client.ice_candidate(peer_id, None)  # end of candidates
        self.sent_candidates += len(candidates)
        self.done_sending.set()


def parse_candidate(payload: dict[str, Any] | None) -> Any:
    """An aiortc RTCIceCandidate from an ``ice-candidate`` payload; None: end of candidates."""
    if payload is None or not payload.get("candidate"):
        return None
    candidate = candidate_from_sdp(payload["candidate"].split(":", 1)[1])
    candidate.sdpMid = payload.get("sdpMid")
    candidate.sdpMLineIndex = payload.get("sdpMLineIndex")
    return candidate


async def watched(awaitable: Awaitable[T], pumps: list[asyncio.Task[None]]) -> T:
    """Await *awaitable*, but fail at once if a signaling task fails meanwhile."""
    task = asyncio.ensure_future(awaitable)
    done, _ = await asyncio.wait([task, *pumps], timeout=TIMEOUT, return_when="FIRST_COMPLETED")
    if task not in done:
        task.cancel()
        for pump in done:
            pump.result()  # raises what went wrong
        raise AssertionError(f"nothing after {TIMEOUT} s" if not done else "signaling ended")
    return task.result()


async def eventually(condition: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def test_two_aiortc_peers_open_a_datachannel_through_the_server(server: Server) -> None:
    url = f"ws://127.0.0.1:{server.port}"

    async def scenario() -> None:
        alice_client = SignalingClient(url, "aiortc", metadata={"name": "alice"})
        bob_client = SignalingClient(url, "aiortc", metadata={"name": "bob"})
        async with alice_client, bob_client:
            alice, bob = Side(alice_client), Side(bob_client)
            pumps = [asyncio.create_task(side.signal()) for side in (alice, bob)]
            try:
                # The newcomer calls the peer it found in the topic.
                assert bob_client.peers == {alice_client.self_id: {"name": "alice"}}
                await bob.call(alice_client.self_id)
                alice_channel, bob_channel = await watched(
                    asyncio.gather(alice.channel, bob.channel), pumps
                )
                assert alice_channel.label == bob_channel.label == "chat"

                bob_channel.send("hello from bob")
                assert await watched(alice.messages.get(), pumps) == "hello from bob"
                alice_channel.send("hello from alice, é")
                assert await watched(bob.messages.get(), pumps) == "hello from alice, é"

                # Everything went through the server: the SDPs held no candidates.
                await asyncio.wait_for(alice.done_sending.wait(), TIMEOUT)
                assert bob.done_sending.is_set()
                assert alice.sent_candidates >= 1 and bob.sent_candidates >= 1
                await eventually(
                    lambda: (
                        alice.received["ice-candidate"] == bob.sent_candidates + 1
                        and bob.received["ice-candidate"] == alice.sent_candidates + 1
                    )
                )
                assert alice.received == {"offer": 1, "ice-candidate": bob.sent_candidates + 1}
                assert bob.received == {"answer": 1, "ice-candidate": alice.sent_candidates + 1}
                assert alice.offer_msg_ids == ["offer-1"]
            finally:
                for pump in pumps:
                    pump.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
                await asyncio.gather(alice.pc.close(), bob.pc.close())

    run(scenario(), timeout=90)
