"""Chat over WebRTC DataChannels, signaled through a signaling-sharded server.

    pip install aiortc
    python examples/aiortc_chat.py ws://127.0.0.1:8081 some-topic --name alice

Start two or more instances on the same topic: each newcomer sends an offer to
every peer already in the topic, and the lines you type go to every peer whose
DataChannel is open. The SDP carries the ICE candidates (aiortc gathers them
before the offer is ready); candidates that other peers trickle as
``ice-candidate`` messages, as browsers do, are added too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import threading
from typing import Any

from aiortc import (
    RTCConfiguration,
    RTCDataChannel,
    RTCIceServer,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.sdp import candidate_from_sdp
from signaling_sharded.client import (
    Disconnected,
    Error,
    PeerJoined,
    PeerLeft,
    Reconnected,
    Relay,
    SignalingClient,
)


class Chat:
    """One RTCPeerConnection, with one DataChannel, per other peer in the topic."""

    def __init__(self, client: SignalingClient) -> None:
        self.client = client
        self.names: dict[str, str] = {}
        self.pcs: dict[str, RTCPeerConnection] = {}
        self.channels: dict[str, RTCDataChannel] = {}

    def name(self, peer_id: str) -> str:
        return self.names.get(peer_id, peer_id[-6:])

    def learn(self, peers: dict[str, Any]) -> None:
        for peer_id, metadata in peers.items():
            if isinstance(metadata, dict) and isinstance(metadata.get("name"), str):
                self.names[peer_id] = metadata["name"]

    def connection(self, peer_id: str) -> RTCPeerConnection:
        if peer_id not in self.pcs:
            keys = ("urls", "username", "credential")
            servers = [
                RTCIceServer(**{k: v for k, v in server.items() if k in keys})
                for server in self.client.ice_servers
            ]
            pc = self.pcs[peer_id] = RTCPeerConnection(RTCConfiguration(iceServers=servers))
            pc.on("datachannel", lambda channel: self.attach(peer_id, channel))
        return self.pcs[peer_id]

    def attach(self, peer_id: str, channel: RTCDataChannel) -> None:
        def opened() -> None:
            self.channels[peer_id] = channel
            print(f"* {self.name(peer_id)} is connected")

        channel.on("message", lambda text: print(f"[{self.name(peer_id)}] {text}"))
        if channel.readyState == "open":
            opened()
        else:
            channel.on("open", opened)

    async def call(self, peer_id: str) -> None:
        pc = self.connection(peer_id)
        self.attach(peer_id, pc.createDataChannel("chat"))
        await pc.setLocalDescription(await pc.createOffer())
        await self.client.offer(peer_id, {"type": "offer", "sdp": pc.localDescription.sdp})

    async def hang_up(self, peer_id: str) -> None:
        self.channels.pop(peer_id, None)
        pc = self.pcs.pop(peer_id, None)
        if pc is not None:
            await pc.close()

    async def relayed(self, event: Relay) -> None:
        payload = event.payload
        if event.type == "offer":
            pc = self.connection(event.sender)
            await pc.setRemoteDescription(RTCSessionDescription(payload["sdp"], "offer"))
            await pc.setLocalDescription(await pc.createAnswer())
            answer = {"type": "answer", "sdp": pc.localDescription.sdp}
            await self.client.answer(event.sender, answer)
        elif event.type == "answer" and event.sender in self.pcs:
            description = RTCSessionDescription(payload["sdp"], "answer")
            await self.pcs[event.sender].setRemoteDescription(description)
        elif event.type == "ice-candidate" and event.sender in self.pcs and payload:
            # A trickled candidate; aiortc's own are in the SDP already.
            candidate = candidate_from_sdp(payload["candidate"].split(":", 1)[1])
            candidate.sdpMid = payload.get("sdpMid")
            candidate.sdpMLineIndex = payload.get("sdpMLineIndex")
            await self.pcs[event.sender].addIceCandidate(candidate)

    async def signaling(self) -> None:
        self.learn(self.client.peers)
        for peer_id in self.client.peers:
            await self.call(peer_id)
        async for event in self.client:
            if isinstance(event, Relay):
                await self.relayed(event)
            elif isinstance(event, PeerJoined):
                self.learn({event.peer_id: event.metadata})
                print(f"* {self.name(event.peer_id)} joined")
            elif isinstance(event, PeerLeft):
                await self.hang_up(event.peer_id)
                print(f"* {self.name(event.peer_id)} left")
            elif isinstance(event, Disconnected):
                print(f"* signaling lost (code {event.code}), reconnecting")
            elif isinstance(event, Reconnected):
                # Our id changed, so the others dropped their connections to us: call again.
                for peer_id in list(self.pcs):
                    await self.hang_up(peer_id)
                self.learn(dict(event.peers))
                for peer_id in event.peers:
                    await self.call(peer_id)
            elif isinstance(event, Error):
                print(f"! {event.code}: {event.message}")

    async def typing(self) -> None:
        """Send every line of stdin to every open channel, until end of file."""
        loop = asyncio.get_running_loop()
        lines: asyncio.Queue[str | None] = asyncio.Queue()

        def read() -> None:  # in a thread: reading stdin blocks
            for line in sys.stdin:
                loop.call_soon_threadsafe(lines.put_nowait, line.rstrip("\n"))
            loop.call_soon_threadsafe(lines.put_nowait, None)

        threading.Thread(target=read, daemon=True).start()
        while (line := await lines.get()) is not None:
            for channel in self.channels.values():
                channel.send(line)
            if not self.channels:
                print("* nobody connected yet")


async def main() -> None:
    parser = argparse.ArgumentParser(description="Chat over WebRTC DataChannels.")
    parser.add_argument("server", help="the server's url, e.g. ws://127.0.0.1:8081")
    parser.add_argument("topic", help="peers in the same topic chat together")
    parser.add_argument("--name", default=f"guest-{os.getpid()}", help="shown to the others")
    args = parser.parse_args()

    async with SignalingClient(args.server, args.topic, metadata={"name": args.name}) as client:
        print(f"* joined {args.topic!r} as {args.name}, with {len(client.peers)} other peer(s)")
        chat = Chat(client)
        tasks = [asyncio.create_task(chat.typing()), asyncio.create_task(chat.signaling())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # raises if signaling failed
        finally:
            for task in tasks:
                task.cancel()
            for peer_id in list(chat.pcs):
                await chat.hang_up(peer_id)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
