"""Metadata updates (PROTOCOL.md section 9): ``update-metadata`` reaches
every other peer as ``peer-updated`` in the exact-view stream, later
joiners see it in ``peer-list``, a token can fix it, and webhooks hear of
it. On 1 and 4 workers and across two cluster servers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest
from conftest import Server
from redis_server import RedisServer, redis_server  # noqa: F401
from signaling_sharded.client import PeerUpdated, SignalingClient
from test_auth import SECRET, token
from test_cluster import CONVERGE, behind_proxy, converge, start_cluster
from test_webhooks import SECRET as HOOK_SECRET
from test_webhooks import kinds
from webhook_receiver import Receiver
from wsclient import OP_TEXT, Peers, RawClient, run

from testkit.proxy import Proxy

StartServer = Callable[..., Server]


def update(client: RawClient, metadata: Any, msg_id: str | None = None) -> None:
    message: dict[str, Any] = {"type": "update-metadata", "metadata": metadata}
    if msg_id is not None:
        message["msgId"] = msg_id
    client.send_frame(OP_TEXT, json.dumps(message).encode())


@pytest.mark.parametrize("workers", ["1", "4"])
def test_an_update_reaches_the_others_and_later_joiners(
    start_server: StartServer, workers: str
) -> None:
    server = start_server("--workers", workers)
    a, a_id = RawClient.join(server.port, "/ws/names?metadata=%7B%22name%22%3A%22a%22%7D")
    b, _ = RawClient.join(server.port, "/ws/names")
    assert a.recv_json()["type"] == "peer-joined"
    update(a, {"name": "ada"})
    assert b.recv_json() == {"type": "peer-updated", "peerId": a_id, "metadata": {"name": "ada"}}
    c = RawClient.connect(server.port, "/ws/names")
    c.recv_json()
    listed = {entry["id"]: entry.get("metadata") for entry in c.recv_json()["peers"]}
    assert listed[a_id] == {"name": "ada"}
    update(a, None)
    assert b.recv_json()["type"] == "peer-joined"  # c
    assert b.recv_json() == {"type": "peer-updated", "peerId": a_id, "metadata": None}
    # Too large: refused, and the connection stays.
    update(a, "x" * 1100, "big")
    assert a.recv_json()["type"] == "peer-joined"  # c
    answer = a.recv_json()
    assert (answer["code"], answer["msgId"]) == ("invalid_metadata", "big")
    a.send_frame(OP_TEXT, b'{"type":"ping","msgId":"p"}')
    assert a.recv_json() == {"type": "pong", "msgId": "p"}
    for client in (a, b, c):
        client.close()


def test_a_peer_that_cannot_take_its_updates_is_cut_and_the_others_get_all(
    start_server: StartServer,
) -> None:
    """``peer-updated`` is never skipped: a peer that does not read is cut
    as a slow consumer (4008) once its queue is full, and a reading peer
    gets every update, in order."""
    server = start_server("--max-queue-bytes", "16384")
    updater, updater_id = RawClient.join(server.port, "/ws/cut")
    reader, _ = RawClient.join(server.port, "/ws/cut")
    stalled, stalled_id = RawClient.join(server.port, "/ws/cut", 4096)  # never read
    with stalled:
        for client in (updater, reader):
            while client.recv_json() != {"type": "peer-joined", "peerId": stalled_id}:
                pass
        # The reader takes each update as it comes, until it sees the cut.
        got: list[int] = []
        left = False
        while not left:
            assert len(got) < 5000, "the stalled peer was never cut"
            update(updater, {"n": len(got), "pad": "p" * 900})
            while True:
                message = reader.recv_json()
                if message["type"] == "peer-left":
                    assert message == {"type": "peer-left", "peerId": stalled_id}, message
                    left = True
                    continue
                assert message["type"] == "peer-updated", message
                assert message["peerId"] == updater_id, message
                got.append(message["metadata"]["n"])
                break
        assert got == list(range(len(got)))
        server.wait_records("peer left", peer=stalled_id, reason="slow_consumer")
        messages, code = stalled.read_until_close(10)
        assert code == 4008
        assert messages[-1]["code"] == "slow_consumer", messages[-1]
        kept = [m["metadata"]["n"] for m in messages if m["type"] == "peer-updated"]
        assert kept == list(range(len(kept))), "what it was sent came in order"
    for client in (updater, reader):
        client.close()


def test_a_token_fixes_the_metadata_unless_it_allows_updates(
    start_server: StartServer,
) -> None:
    server = start_server("--auth-secret", SECRET)
    fixed = token({"metadata": {"role": "guest"}})
    free = token({"metadata": {"role": "host"}, "canUpdateMetadata": True})
    guest, _ = RawClient.join(server.port, f"/ws/roles?token={fixed}")
    host, host_id = RawClient.join(server.port, f"/ws/roles?token={free}")
    guest.recv_json()  # host joined
    update(guest, {"role": "host"}, "g")
    answer = guest.recv_json()
    assert (answer["code"], answer["msgId"]) == ("forbidden", "g")
    update(host, {"role": "host", "muted": True})
    assert guest.recv_json() == {
        "type": "peer-updated",
        "peerId": host_id,
        "metadata": {"role": "host", "muted": True},
    }
    guest.close()
    host.close()


def test_webhooks_hear_of_an_update(start_server: StartServer) -> None:
    receiver = Receiver(HOOK_SECRET)
    try:
        server = start_server("--webhook-url", receiver.url, "--webhook-secret", HOOK_SECRET)
        client, peer = RawClient.join(server.port, "/ws/hooked-names")
        update(client, {"name": "b"})
        client.send_frame(OP_TEXT, b'{"type":"ping","msgId":"p"}')
        client.recv_json()
        events = receiver.wait(lambda got: any(e["type"] == "peer.updated" for e in got))
        (updated,) = [e for e in events if e["type"] == "peer.updated"]
        assert (updated["peerId"], updated["metadata"]) == (peer, {"name": "b"})
        assert kinds(events)[:2] == [("topic.opened", None, None), ("peer.joined", peer, None)]
        client.close()
    finally:
        receiver.close()


def test_the_python_client_updates_and_sees_updates(start_server: StartServer) -> None:
    server = start_server()
    base = f"ws://127.0.0.1:{server.port}"

    async def scenario() -> None:
        async with (
            SignalingClient(base, "py-names") as a,
            SignalingClient(base, "py-names", metadata={"name": "b"}) as b,
        ):
            async for event in a:
                if getattr(event, "peer_id", None) == b.self_id:
                    break
            await b.update_metadata({"name": "bea"})
            async for event in a:
                if isinstance(event, PeerUpdated):
                    assert event == PeerUpdated(b.self_id, {"name": "bea"})
                    break
            assert a.peers[b.self_id] == {"name": "bea"}

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_an_update_crosses_a_cluster_and_reaches_later_joiners(
    redis_server: RedisServer,  # noqa: F811
    start_server: StartServer,
) -> None:
    first, second = start_cluster(start_server, redis_server, 2)

    async def scenario() -> None:
        async with Peers() as peers:
            (a,) = await peers.join_all(first.url("cluster-names"))
            (b,) = await peers.join_all(second.url("cluster-names"))
            await converge([a, b], CONVERGE)
            await a.send({"type": "update-metadata", "metadata": {"name": "ada"}})
            await b.wait_until(lambda: b.view.get(a.id) == {"name": "ada"}, CONVERGE)
            assert b.events[-1] == {
                "type": "peer-updated",
                "peerId": a.id,
                "metadata": {"name": "ada"},
            }
            # A later joiner on either server sees the new metadata.
            for server in (first, second):
                c = await peers.join(server.url("cluster-names"))
                assert c.initial_view[a.id] == {"name": "ada"}

    run(scenario())


def test_a_cluster_sends_peer_updated_once_numbered_by_redis(
    redis_server: RedisServer,  # noqa: F811
    start_server: StartServer,
) -> None:
    receiver = Receiver(HOOK_SECRET)
    try:
        flags = ("--webhook-url", receiver.url, "--webhook-secret", HOOK_SECRET)
        first, second = start_cluster(start_server, redis_server, 2, *flags)
        a, a_id = RawClient.join(first.port, "/ws/hooked-cluster")
        b, _ = RawClient.join(second.port, "/ws/hooked-cluster")
        a.recv_json()  # b joined
        update(a, {"name": "ada"})
        assert b.recv_json()["type"] == "peer-updated"
        events = receiver.wait(lambda got: any(e["type"] == "peer.updated" for e in got))
        (updated,) = [e for e in events if e["type"] == "peer.updated"]
        assert (updated["peerId"], updated["metadata"]) == (a_id, {"name": "ada"})
        joined = [e["seq"] for e in events if e["type"] == "peer.joined"]
        assert updated["seq"] > max(joined)
        a.close()
        b.close()
    finally:
        receiver.close()


def test_an_update_lost_with_the_link_to_redis_reaches_the_cluster_after(
    redis_server: RedisServer,  # noqa: F811
    start_server: StartServer,
) -> None:
    """The first server reaches Redis through a proxy. An update sent while
    that link is blackholed never reaches Redis; once the link is back, the
    server's resync rewrites its members and the other server's peers see
    the new metadata."""
    proxy = Proxy(redis_server.port)
    try:
        first, second = behind_proxy(start_server, redis_server, proxy)

        async def scenario() -> None:
            async with Peers() as peers:
                a = await peers.join(first.url("outage-names"))
                b = await peers.join(second.url("outage-names"))
                await converge([a, b], CONVERGE)
                proxy.blackhole("up")
                await a.send({"type": "update-metadata", "metadata": {"name": "late"}})
                await asyncio.to_thread(first.wait_records, "cluster lost", 1, CONVERGE)
                assert b.view[a.id] != {"name": "late"}
                proxy.reset()  # what was held for Redis is gone with it
                proxy.blackholed = frozenset()
                await b.wait_until(lambda: b.view.get(a.id) == {"name": "late"}, CONVERGE)

        run(scenario())
    finally:
        proxy.close()
