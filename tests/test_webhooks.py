"""Webhooks (PROTOCOL.md section 11) from a real server to a real HTTP
receiver (`webhook_receiver`), which checks every signature and answers
with the statuses a test asks for."""

from __future__ import annotations

import json
import os
import re
import signal
import struct
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import Server, topics_owned
from prometheus_client.parser import text_string_to_metric_families
from redis_server import RedisServer, redis_server  # noqa: F401
from test_admin import TOKEN, call, suspend
from test_cluster import CONVERGE, start_cluster, wait_for_value
from webhook_receiver import Receiver
from wsclient import OP_CLOSE, RawClient, http_get

SECRET = "a-webhook-secret-for-the-tests"
RFC3339_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    hooks = Receiver(SECRET)
    yield hooks
    hooks.close()


def hooked(start_server: Callable[..., Server], receiver: Receiver, *flags: str) -> Server:
    return start_server("--webhook-url", receiver.url, "--webhook-secret", SECRET, *flags)


def join(server: Server, topic: str) -> tuple[RawClient, str]:
    return RawClient.join(server.port, f"/ws/{topic}")


def close(client: RawClient) -> None:
    """A clean close (reason ``closed``)."""
    client.send_frame(OP_CLOSE, struct.pack("!H", 1000))
    client.expect_close()
    client.close()


def of_topic(events: list[dict[str, Any]], topic: str) -> list[dict[str, Any]]:
    return [event for event in events if event["topic"] == topic]


def kinds(events: list[dict[str, Any]]) -> list[tuple[str, str | None, str | None]]:
    return [(e["type"], e.get("peerId"), e.get("reason")) for e in events]


def check_order(events: list[dict[str, Any]]) -> None:
    """Each topic's seq strictly increases; ids are unique; no leave comes
    before its join."""
    by_topic: dict[str, int] = {}
    joined: set[str] = set()
    assert len({event["id"] for event in events}) == len(events), events
    for event in sorted(events, key=lambda e: e["seq"]):
        assert event["seq"] > by_topic.get(event["topic"], 0), event
        by_topic[event["topic"]] = event["seq"]
        assert RFC3339_MS.match(event["time"]), event
        if event["type"] == "peer.joined":
            joined.add(event["peerId"])
        elif event["type"] == "peer.left":
            assert event["peerId"] in joined, f"a leave without its join: {event}"


def metric(server: Server, name: str, **labels: str) -> float:
    text = http_get(server.port, "/metrics").body.decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def sent(server: Server) -> float:
    return metric(server, "signaling_webhook_events_total", result="sent")


def queued(server: Server) -> float:
    return metric(server, "signaling_webhook_queued")


def test_events_come_in_order_signed_and_retried_after_a_500(
    start_server: Callable[..., Server], receiver: Receiver
) -> None:
    receiver.statuses = [500]
    server = hooked(start_server, receiver)
    a, a_id = join(server, "room")
    b, b_id = join(server, "room")
    close(a)
    b.close()  # no close frame: disconnected
    events = receiver.wait(lambda got: any(e["type"] == "topic.closed" for e in got))
    assert kinds(of_topic(events, "room")) == [
        ("topic.opened", None, None),
        ("peer.joined", a_id, None),
        ("peer.joined", b_id, None),
        ("peer.left", a_id, "closed"),
        ("peer.left", b_id, "disconnected"),
        ("topic.closed", None, None),
    ]
    check_order(events)
    assert "metadata" not in events[1]
    # Every request was signed; the first was answered 500 and its events
    # came again, with the same ids.
    assert all(valid for _, valid, _ in receiver.requests)
    first_status, _, first_body = receiver.requests[0]
    assert first_status == 500
    retried = {event["id"] for event in json.loads(first_body)["events"]}
    assert retried <= {event["id"] for event in events}
    assert metric(server, "signaling_webhook_requests_total", result="failed") >= 1
    assert wait_for_value(lambda: sent(server), len(events), 10) == len(events)


def test_metadata_and_the_topics_of_every_worker(
    start_server: Callable[..., Server], receiver: Receiver
) -> None:
    server = hooked(start_server, receiver, "--workers", "4")
    topics = topics_owned(4, "hooked")
    clients = {}
    for topic in topics:
        clients[topic] = RawClient.join(server.port, f"/ws/{topic}?metadata=%7B%22n%22%3A1%7D")
    for client, _ in clients.values():
        client.close()
    events = receiver.wait(lambda got: sum(e["type"] == "topic.closed" for e in got) == len(topics))
    check_order(events)
    for topic, (_, peer) in clients.items():
        assert kinds(of_topic(events, topic)) == [
            ("topic.opened", None, None),
            ("peer.joined", peer, None),
            ("peer.left", peer, "disconnected"),
            ("topic.closed", None, None),
        ]
        (joined,) = [e for e in of_topic(events, topic) if e["type"] == "peer.joined"]
        assert joined["metadata"] == {"n": 1}


def test_a_suspended_session_is_no_leave_until_it_expires(
    start_server: Callable[..., Server], receiver: Receiver
) -> None:
    server = hooked(start_server, receiver, "--resume-window", "1.5")
    other, other_id = join(server, "pause")
    peer, _ = suspend(server, "pause")
    server.wait_records("peer left", peer=peer)
    events = receiver.wait(lambda got: any(e["type"] == "peer.left" for e in got))
    assert kinds(events) == [
        ("topic.opened", None, None),
        ("peer.joined", other_id, None),
        ("peer.joined", peer, None),
        ("peer.left", peer, "expired"),
    ]
    other.close()


def test_a_kick_is_a_leave_with_its_reason(
    start_server: Callable[..., Server], receiver: Receiver
) -> None:
    server = hooked(start_server, receiver, "--admin-token", TOKEN)
    client, peer = join(server, "kicks")
    status, _, _ = call(server, "DELETE", f"/admin/v1/topics/kicks/peers/{peer}")
    assert status == 204
    events = receiver.wait(lambda got: any(e["type"] == "topic.closed" for e in got))
    assert ("peer.left", peer, "kicked") in kinds(events)
    client.close()


def test_a_full_queue_drops_and_counts_and_never_sends_a_leave_alone(
    start_server: Callable[..., Server], receiver: Receiver
) -> None:
    server = hooked(start_server, receiver, "--webhook-queue", "3")
    receiver.holding.set()  # the first request waits: the queue fills
    clients = [join(server, "crowd") for _ in range(10)]
    for client, _ in clients:
        client.close()
    server.wait_records("peer left", count=10)
    assert metric(server, "signaling_webhook_events_total", result="overflow") > 0
    assert wait_for_value(lambda: queued(server), 3, 10) == 3
    receiver.holding.clear()
    assert wait_for_value(lambda: queued(server), 0, 10) == 0
    # A URL gets its events in order: once a later join is in, the rest is.
    _, last = join(server, "later")
    events = receiver.wait(lambda got: any(e.get("peerId") == last for e in got))
    check_order(events)
    assert len(events) < 2 + 2 * 10 + 2
    joined = {e["peerId"] for e in events if e["type"] == "peer.joined"}
    left = {e["peerId"] for e in events if e["type"] == "peer.left"}
    assert left <= joined
    assert wait_for_value(lambda: sent(server), len(events), 10) == len(events)


def test_a_drain_sends_the_leaves_before_it_exits(
    start_server: Callable[..., Server], receiver: Receiver
) -> None:
    server = hooked(start_server, receiver)
    client, peer = join(server, "drained")
    receiver.wait(lambda got: len(got) == 2)
    server.stop()
    events = receiver.wait(lambda got: len(got) == 4, timeout=1)
    assert kinds(events)[2:] == [("peer.left", peer, "shutdown"), ("topic.closed", None, None)]
    client.close()


# --- cluster mode --------------------------------------------------------------


def test_a_cluster_sends_each_event_once_numbered_by_redis(
    redis_server: RedisServer,  # noqa: F811
    start_server: Callable[..., Server],
    receiver: Receiver,
) -> None:
    flags = ("--webhook-url", receiver.url, "--webhook-secret", SECRET)
    first, second = start_cluster(start_server, redis_server, 2, *flags)
    a, a_id = join(first, "shared")
    b, b_id = join(second, "shared")
    c, c_id = join(second, "shared")
    assert a.recv_json()["peerId"] == b_id
    close(b)
    receiver.wait(lambda got: ("peer.left", b_id, "closed") in kinds(got))
    a.close()
    c.close()
    # From two nodes: the last to come may have the lower seq.
    events = receiver.wait(lambda got: len(got) == 8)
    check_order(events)
    ordered = sorted(events, key=lambda e: e["seq"])
    assert kinds(ordered[:4]) == [
        ("topic.opened", None, None),
        ("peer.joined", a_id, None),
        ("peer.joined", b_id, None),
        ("peer.joined", c_id, None),
    ]
    assert kinds(ordered[4:5]) == [("peer.left", b_id, "closed")]
    assert sorted(kinds(ordered[5:7])) == sorted(
        [("peer.left", a_id, "disconnected"), ("peer.left", c_id, "disconnected")]
    )
    assert kinds(ordered[7:]) == [("topic.closed", None, None)]


def test_a_dead_servers_peers_leave_as_node_lost(
    redis_server: RedisServer,  # noqa: F811
    start_server: Callable[..., Server],
    receiver: Receiver,
) -> None:
    flags = ("--webhook-url", receiver.url, "--webhook-secret", SECRET)
    doomed, survivor = start_cluster(start_server, redis_server, 2, *flags)
    living, _ = join(survivor, "lost")
    victim, victim_id = join(doomed, "lost")
    assert living.recv_json()["peerId"] == victim_id
    receiver.wait(lambda got: len(got) == 3)
    os.killpg(doomed.proc.pid, signal.SIGKILL)
    events = receiver.wait(lambda got: len(got) == 4, timeout=CONVERGE + 5)
    assert kinds(events)[3] == ("peer.left", victim_id, "node_lost")
    check_order(events)
    living.close()
    victim.close()
