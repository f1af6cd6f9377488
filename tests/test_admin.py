"""The admin API (PROTOCOL.md section 10), against the real server.

Requests go over real HTTP connections (``http.client``); the peers they
concern are real WebSocket clients. Answers are the whole server's: the
topic listing merges every worker's, and a request about one topic is
served by its owner (named by ``X-Signaling-Worker``).
"""

from __future__ import annotations

import datetime as dt
import http.client
import json
import socket
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

import pytest
from conftest import Server, launch, topics_owned
from signaling_sharded._native import topic_owner
from wsclient import RawClient, http_get, websocket_headers

from testkit.processes import free_port
from testkit.proxy import Proxy

TOKEN = "an-admin-token-for-the-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
WORKERS = 4


def call(
    server: Server,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    port: int | None = None,
) -> tuple[int, dict[str, str], Any]:
    """One request (to the server's port, or ``port``); the status, headers
    (lowercased names) and JSON body."""
    connection = http.client.HTTPConnection("127.0.0.1", port or server.port, timeout=10)
    try:
        data = None if body is None else json.dumps(body).encode()
        sent = {**AUTH, **(headers or {})}
        if data is not None:
            sent["Content-Type"] = "application/json"
        connection.request(method, path, body=data, headers=sent)
        response = connection.getresponse()
        raw = response.read()
        headers = {k.lower(): v for k, v in response.getheaders()}
        is_json = headers.get("content-type") == "application/json"
        answer = json.loads(raw) if raw and is_json else raw.decode() or None
        return response.status, headers, answer
    finally:
        connection.close()


@pytest.fixture(scope="module")
def admin_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = launch(
        tmp_path_factory.mktemp("admin"), "--workers", str(WORKERS), "--admin-token", TOKEN
    )
    server.wait_records("listening", count=WORKERS)
    yield server
    server.stop()
    assert "Traceback" not in server.output(), server.output()


def join(server: Server, topic: str, query: str = "") -> tuple[RawClient, str]:
    path = f"/ws/{quote(topic, safe='')}" + (f"?{query}" if query else "")
    return RawClient.join(server.port, path)


def test_off_without_a_token(server: Server) -> None:
    status, _, _ = call(server, "GET", "/admin/v1/topics")
    assert status == 404


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": ""},
        {"Authorization": "Bearer wrong-token-of-some-length"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": f"Bearer {TOKEN}x"},
    ],
)
def test_a_wrong_or_missing_token_is_401(admin_server: Server, headers: dict[str, str]) -> None:
    for method, path in [
        ("GET", "/admin/v1/topics"),
        ("GET", "/admin/v1/topics/room/peers"),
        ("DELETE", "/admin/v1/topics/room/peers/01J00000000000000000000000"),
        ("POST", "/admin/v1/topics/room/messages"),
    ]:
        status, answer_headers, body = call(admin_server, method, path, headers=headers)
        assert status == 401, (method, path)
        assert answer_headers["www-authenticate"] == "Bearer"
        assert body == {"error": "missing or wrong admin token"}


def test_topics_of_every_worker_listed_filtered_and_paged(admin_server: Server) -> None:
    topics = topics_owned(WORKERS, "listed")  # one on each worker
    clients = []
    for n, topic in enumerate(topics):
        for _ in range(n + 1):
            clients.append(join(admin_server, topic)[0])
    other = join(admin_server, "elsewhere")[0]
    status, _, body = call(admin_server, "GET", "/admin/v1/topics?prefix=listed-&limit=1000")
    assert status == 200
    assert body == {
        "topics": [
            {"topic": t, "peers": n + 1} for n, t in sorted(enumerate(topics), key=lambda x: x[1])
        ],
        "cursor": None,
    }
    # Pages of 3: every topic once, in order, the last page's cursor null.
    seen: list[str] = []
    cursor = ""
    while True:
        query = "prefix=listed-&limit=3" + (f"&cursor={cursor}" if cursor else "")
        status, _, body = call(admin_server, "GET", f"/admin/v1/topics?{query}")
        assert status == 200
        seen += [entry["topic"] for entry in body["topics"]]
        if body["cursor"] is None:
            break
        cursor = body["cursor"]
    assert seen == sorted(topics)
    for bad in ("limit=0", "limit=1001", "limit=x", "cursor=%%", "cursor=!!!"):
        status, _, body = call(admin_server, "GET", f"/admin/v1/topics?{bad}")
        assert status == 400, bad
        assert "error" in body
    status, _, _ = call(admin_server, "POST", "/admin/v1/topics", body={})
    assert status == 405
    for client in [*clients, other]:
        client.close()


def test_a_topics_peers_come_from_its_owner(admin_server: Server) -> None:
    topic = "org/room peers"
    before = dt.datetime.now(dt.timezone.utc)
    a, a_id = join(admin_server, topic, "metadata=" + quote('{"name":"ann"}'))
    b, b_id = join(admin_server, topic)
    path = f"/admin/v1/topics/{quote(topic, safe='')}/peers"
    status, headers, body = call(admin_server, "GET", path)
    assert status == 200
    assert headers["x-signaling-worker"] == str(topic_owner(topic, WORKERS))
    assert [peer["id"] for peer in body["peers"]] == [a_id, b_id]
    assert body["peers"][0]["metadata"] == {"name": "ann"}
    assert "metadata" not in body["peers"][1]
    for peer in body["peers"]:
        assert peer["suspended"] is False
        joined = dt.datetime.fromisoformat(peer["since"].replace("Z", "+00:00"))
        assert before - dt.timedelta(seconds=1) <= joined <= dt.datetime.now(dt.timezone.utc)
    status, _, body = call(admin_server, "GET", "/admin/v1/topics/nobody-here/peers")
    assert (status, body) == (404, {"error": "unknown topic"})
    status, _, body = call(admin_server, "GET", "/admin/v1/topics/bad%zz/peers")
    assert (status, body) == (400, {"error": "invalid topic"})
    status, _, _ = call(admin_server, "GET", f"/admin/v1/topics/{quote(topic, safe='')}/nothing")
    assert status == 404
    a.close()
    b.close()


def suspend(server: Server, topic: str) -> tuple[str, str]:
    """A resumable peer of ``topic`` whose connection is reset: suspended.
    Its id and resume token."""
    with Proxy(server.port) as proxy:
        client = RawClient.connect(proxy.port, f"/ws/{topic}?resumable=1")
        welcome = client.recv_json()
        peer, token = welcome["selfId"], welcome["resumeToken"]
        proxy.reset()
        server.wait_records("peer suspended", peer=peer)
        client.close()
    return peer, token


def test_a_suspended_session_is_listed_as_such(admin_server: Server) -> None:
    peer, _ = suspend(admin_server, "suspended-one")
    status, _, body = call(admin_server, "GET", "/admin/v1/topics/suspended-one/peers")
    assert status == 200
    assert [(p["id"], p["suspended"]) for p in body["peers"]] == [(peer, True)]


def test_a_kick_closes_with_4010_and_the_others_see_a_leave(admin_server: Server) -> None:
    topic = "kicks"
    victim, victim_id = join(admin_server, topic)
    other, other_id = join(admin_server, topic)
    assert victim.recv_json() == {"type": "peer-joined", "peerId": other_id}
    status, headers, body = call(
        admin_server, "DELETE", f"/admin/v1/topics/{topic}/peers/{victim_id}"
    )
    assert (status, body) == (204, None)
    assert "content-length" not in headers
    error = victim.recv_json()
    assert (error["type"], error["code"]) == ("error", "kicked")
    assert victim.expect_close() == 4010
    assert other.recv_json() == {"type": "peer-left", "peerId": victim_id}
    records = admin_server.wait_records("peer left", peer=victim_id)
    assert records[-1]["reason"] == "kicked"
    status, _, body = call(admin_server, "DELETE", f"/admin/v1/topics/{topic}/peers/{victim_id}")
    assert (status, body) == (404, {"error": "unknown peer"})
    status, _, _ = call(admin_server, "DELETE", f"/admin/v1/topics/{topic}/peers/not-an-id")
    assert status == 404
    status, _, _ = call(admin_server, "GET", f"/admin/v1/topics/{topic}/peers/{other_id}")
    assert status == 405
    victim.close()
    other.close()


def test_a_kicked_suspended_session_ends_and_cannot_resume(admin_server: Server) -> None:
    other, _ = join(admin_server, "kick-suspended")
    welcome_peer, token = suspend(admin_server, "kick-suspended")
    assert other.recv_json() == {"type": "peer-joined", "peerId": welcome_peer}
    status, _, _ = call(
        admin_server, "DELETE", f"/admin/v1/topics/kick-suspended/peers/{welcome_peer}"
    )
    assert status == 204
    assert other.recv_json() == {"type": "peer-left", "peerId": welcome_peer}
    # Its token resumes nothing now: a fresh start.
    fresh = RawClient.connect(admin_server.port, f"/ws/kick-suspended?resume={token}&seen=1")
    welcome = fresh.recv_json()
    assert welcome["resumed"] is False and welcome["selfId"] != welcome_peer, welcome
    fresh.close()
    other.close()


def test_server_messages_reach_a_topic_or_one_peer(admin_server: Server) -> None:
    topic = "announcements"
    a, _a_id = join(admin_server, topic)
    b, b_id = join(admin_server, topic)
    assert a.recv_json()["type"] == "peer-joined"
    payload = {"text": "maintenance at noon", "n": [1, 2]}
    status, _, body = call(
        admin_server, "POST", f"/admin/v1/topics/{topic}/messages", {"payload": payload}
    )
    assert (status, body) == (202, {"reached": 2})
    for client in (a, b):
        assert client.recv_json() == {"type": "server-message", "payload": payload}
    status, _, body = call(
        admin_server, "POST", f"/admin/v1/topics/{topic}/messages", {"to": b_id, "payload": "hi"}
    )
    assert (status, body) == (202, {"reached": 1})
    assert b.recv_json() == {"type": "server-message", "payload": "hi"}
    a.send_frame(0x1, json.dumps({"type": "ping", "msgId": "x"}).encode())
    assert a.recv_json() == {"type": "pong", "msgId": "x"}, "a got nothing else"
    for bad in ([], {"to": b_id}, {"payload": 1, "to": 5}):
        status, _, _ = call(admin_server, "POST", f"/admin/v1/topics/{topic}/messages", bad)
        assert status == 400, bad
    status, _, body = call(
        admin_server,
        "POST",
        f"/admin/v1/topics/{topic}/messages",
        {"to": "01J00000000000000000000000", "payload": 1},
    )
    assert (status, body) == (404, {"error": "unknown peer"})
    status, _, body = call(
        admin_server, "POST", "/admin/v1/topics/empty-one/messages", {"payload": 1}
    )
    assert (status, body) == (404, {"error": "unknown topic"})
    a.close()
    b.close()


def test_a_body_that_comes_later_or_is_too_large(admin_server: Server) -> None:
    topic = "slow-body"
    a, _ = join(admin_server, topic)
    body = json.dumps({"payload": {"late": True}}).encode()
    head = (
        f"POST /admin/v1/topics/{topic}/messages HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {TOKEN}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", admin_server.port), timeout=10) as sock:
        sock.sendall(head + body[:5])
        sock.sendall(body[5:])
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 202 "), answer
    assert a.recv_json() == {"type": "server-message", "payload": {"late": True}}
    status, _, _ = call(
        admin_server, "POST", f"/admin/v1/topics/{topic}/messages", {"payload": "x" * 70_000}
    )
    assert status == 413
    a.close()


def test_admin_answers_on_one_worker(start_server: Callable[..., Server]) -> None:
    server = start_server("--workers", "1", "--admin-token", TOKEN)
    a, a_id = join(server, "solo")
    status, _, body = call(server, "GET", "/admin/v1/topics")
    assert (status, body) == (200, {"topics": [{"topic": "solo", "peers": 1}], "cursor": None})
    status, _, body = call(server, "GET", "/admin/v1/topics/solo/peers")
    assert [peer["id"] for peer in body["peers"]] == [a_id]
    a.close()


def test_the_openapi_description_names_what_is_served(admin_server: Server) -> None:
    """Every operation of docs/admin-openapi.json is served, and answers
    with a status it declares."""
    from pathlib import Path

    spec = json.loads((Path(__file__).parent.parent / "docs" / "admin-openapi.json").read_text())
    assert spec["openapi"].startswith("3.1")
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            concrete = path.replace("{topic}", "described").replace(
                "{id}", "01J00000000000000000000000"
            )
            body = {"payload": 1} if "requestBody" in operation else None
            status, _, _ = call(admin_server, method.upper(), concrete, body)
            assert str(status) in operation["responses"], (method, path, status)
            status, _, _ = call(admin_server, method.upper(), concrete, body, {"Authorization": ""})
            assert status == 401 and "401" in operation["responses"]


def test_an_admin_port_of_its_own(start_server: Callable[..., Server]) -> None:
    """With --admin-port the API is there only, for every worker, and that
    port serves nothing else."""
    admin_port = free_port()
    server = start_server(
        "--workers", "2", "--admin-token", TOKEN,
        "--admin-port", str(admin_port), "--admin-host", "127.0.0.1",
    )  # fmt: skip
    server.wait_records("listening", count=2)
    topics = topics_owned(2, "own-port")
    clients = [join(server, topic) for topic in topics]
    status, _, _ = call(server, "GET", "/admin/v1/topics")
    assert status == 404, "not on the signaling port"
    status, _, body = call(server, "GET", "/admin/v1/topics?prefix=own-port", port=admin_port)
    assert status == 200
    assert body["topics"] == [{"topic": t, "peers": 1} for t in sorted(topics)]
    for topic, (_, peer) in zip(topics, clients, strict=True):
        path = f"/admin/v1/topics/{topic}/peers"
        status, headers, body = call(server, "GET", path, port=admin_port)
        assert status == 200 and [p["id"] for p in body["peers"]] == [peer]
        assert headers["x-signaling-worker"] == str(topic_owner(topic, 2))
    for path in ("/healthz", "/metrics", "/ws/room"):
        status, _, _ = call(server, "GET", path, port=admin_port)
        assert status == 404, path
    upgrade = http_get(admin_port, "/ws/room", websocket_headers())
    assert upgrade.status == 404, "no joins on the admin port"
    for client, _ in clients:
        client.close()
