"""The admin API (PROTOCOL.md section 10) in cluster mode: two servers of
two workers on one real Redis, and every answer is the cluster's, whichever
server is asked. The topic listing comes from Redis; what concerns a topic's
peers is asked of the nodes that hold them.
"""

from __future__ import annotations

import json

import pytest
from conftest import Server
from redis_server import RedisServer, redis_server  # noqa: F401
from test_admin import TOKEN, call, join, suspend
from test_cluster import CONVERGE, StartServer, start_cluster, wait_for_value
from wsclient import OP_TEXT

pytestmark = pytest.mark.timeout(120)


def cluster(start_server: StartServer, redis: RedisServer) -> list[Server]:
    return start_cluster(start_server, redis, 2, "--admin-token", TOKEN)


def test_the_listing_is_the_clusters_from_either_server(
    redis_server: RedisServer,  # noqa: F811
    start_server: StartServer,
) -> None:
    first, second = cluster(start_server, redis_server)
    clients = []
    # listed-0: 1 peer on each server; listed-1: 3 on the second; listed-2: 1.
    for server, topic in [
        (first, "listed-0"),
        (second, "listed-0"),
        (second, "listed-1"),
        (second, "listed-1"),
        (second, "listed-1"),
        (first, "listed-2"),
        (first, "other"),
    ]:
        clients.append(join(server, topic)[0])
    expected = [
        {"topic": "listed-0", "peers": 2},
        {"topic": "listed-1", "peers": 3},
        {"topic": "listed-2", "peers": 1},
    ]
    for server in (first, second):
        status, _, body = call(server, "GET", "/admin/v1/topics?prefix=listed-")
        assert (status, body) == (200, {"topics": expected, "cursor": None})
        # Pages of two: the cursor leads to the rest, the last one is null.
        status, _, page = call(server, "GET", "/admin/v1/topics?prefix=listed-&limit=2")
        assert status == 200 and page["topics"] == expected[:2] and page["cursor"]
        status, _, rest = call(
            server, "GET", f"/admin/v1/topics?prefix=listed-&limit=2&cursor={page['cursor']}"
        )
        assert (status, rest) == (200, {"topics": expected[2:], "cursor": None})
    status, _, body = call(first, "GET", "/admin/v1/topics")
    assert [entry["topic"] for entry in body["topics"]] == [
        "listed-0",
        "listed-1",
        "listed-2",
        "other",
    ]
    for client in clients:
        client.close()
    # Once every peer has left, nothing is listed.
    listed = wait_for_value(
        lambda: call(second, "GET", "/admin/v1/topics")[2], {"topics": [], "cursor": None}, CONVERGE
    )
    assert listed == {"topics": [], "cursor": None}


def test_peers_on_both_servers_listed_with_a_suspended_one(
    redis_server: RedisServer,  # noqa: F811
    start_server: StartServer,
) -> None:
    first, second = cluster(start_server, redis_server)
    topic = "both-sides"
    a, a_id = join(first, topic, "metadata=%7B%22name%22%3A%22a%22%7D")
    b, b_id = join(second, topic)
    assert a.recv_json() == {"type": "peer-joined", "peerId": b_id}
    suspended, _ = suspend(second, topic)
    assert a.recv_json() == {"type": "peer-joined", "peerId": suspended}
    for server in (first, second):
        status, _, body = call(server, "GET", f"/admin/v1/topics/{topic}/peers")
        assert status == 200
        listed = {peer["id"]: peer for peer in body["peers"]}
        assert [peer["id"] for peer in body["peers"]] == sorted(listed)
        assert set(listed) == {a_id, b_id, suspended}
        assert listed[a_id]["metadata"] == {"name": "a"}
        assert "metadata" not in listed[b_id]
        assert [listed[p]["suspended"] for p in (a_id, b_id, suspended)] == [False, False, True]
    status, _, body = call(first, "GET", "/admin/v1/topics/nobody-here/peers")
    assert (status, body) == (404, {"error": "unknown topic"})
    a.close()
    b.close()


def test_a_kick_reaches_the_node_that_holds_the_peer(
    redis_server: RedisServer,  # noqa: F811
    start_server: StartServer,
) -> None:
    first, second = cluster(start_server, redis_server)
    topic = "kicks"
    near, near_id = join(first, topic)
    victim, victim_id = join(second, topic)
    assert near.recv_json() == {"type": "peer-joined", "peerId": victim_id}
    status, _, body = call(first, "DELETE", f"/admin/v1/topics/{topic}/peers/{victim_id}")
    assert (status, body) == (204, None)
    # Answered once the leave reached Redis: no listing shows it any more.
    status, _, body = call(first, "GET", f"/admin/v1/topics/{topic}/peers")
    assert [peer["id"] for peer in body["peers"]] == [near_id]
    error = victim.recv_json()
    assert (error["type"], error["code"]) == ("error", "kicked")
    assert victim.expect_close() == 4010
    assert near.recv_json() == {"type": "peer-left", "peerId": victim_id}
    assert second.wait_records("peer left", peer=victim_id)[-1]["reason"] == "kicked"
    status, _, body = call(second, "DELETE", f"/admin/v1/topics/{topic}/peers/{victim_id}")
    assert (status, body) == (404, {"error": "unknown peer"})
    status, _, body = call(second, "DELETE", f"/admin/v1/topics/elsewhere/peers/{near_id}")
    assert (status, body) == (404, {"error": "unknown topic"})
    near.close()
    victim.close()


def test_server_messages_reach_every_node_or_one_peer(
    redis_server: RedisServer,  # noqa: F811
    start_server: StartServer,
) -> None:
    first, second = cluster(start_server, redis_server)
    topic = "announcements"
    a, a_id = join(first, topic)
    b, b_id = join(second, topic)
    c, c_id = join(second, topic)
    assert [a.recv_json(), a.recv_json()] == [
        {"type": "peer-joined", "peerId": b_id},
        {"type": "peer-joined", "peerId": c_id},
    ]
    assert b.recv_json() == {"type": "peer-joined", "peerId": c_id}
    status, _, body = call(
        first, "POST", f"/admin/v1/topics/{topic}/messages", {"payload": {"n": 1}}
    )
    assert (status, body) == (202, {"reached": 3})
    for client in (a, b, c):
        assert client.recv_json() == {"type": "server-message", "payload": {"n": 1}}
    status, _, body = call(
        first, "POST", f"/admin/v1/topics/{topic}/messages", {"to": c_id, "payload": "only c"}
    )
    assert (status, body) == (202, {"reached": 1})
    assert c.recv_json() == {"type": "server-message", "payload": "only c"}
    status, _, body = call(
        second, "POST", f"/admin/v1/topics/{topic}/messages", {"to": "nobody", "payload": 1}
    )
    assert (status, body) == (404, {"error": "unknown peer"})
    status, _, body = call(second, "POST", f"/admin/v1/topics/{topic}/messages", {"to": 5})
    assert status == 400
    # What b got next is a relay from a: the messages were not repeated.
    offer = {"type": "offer", "to": b_id, "payload": "after", "msgId": "m"}
    a.send_frame(OP_TEXT, json.dumps(offer).encode())
    assert b.recv_json() == {"type": "offer", "from": a_id, "payload": "after", "msgId": "m"}
    for client in (a, b, c):
        client.close()


def test_without_redis_the_admin_api_answers_503(
    redis_server: RedisServer,  # noqa: F811
    start_server: StartServer,
) -> None:
    (server,) = start_cluster(start_server, redis_server, 1, "--admin-token", TOKEN)
    redis_server.stop()
    server.wait_records("cluster lost", 2)
    for method, path in [
        ("GET", "/admin/v1/topics"),
        ("GET", "/admin/v1/topics/room/peers"),
    ]:
        status, headers, body = call(server, method, path)
        assert (status, body) == (503, {"error": "the cluster is unreachable"})
        assert headers["retry-after"] == "1"
