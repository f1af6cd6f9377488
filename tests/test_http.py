"""HTTP endpoints and everything refused before the WebSocket upgrade."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from urllib.parse import quote

import pytest
from conftest import Server
from wsclient import Peers, RawClient, run, websocket_headers


def test_healthz_and_readyz(server: Server) -> None:
    assert server.status("/healthz") == 200
    assert server.status("/readyz") == 200


@pytest.mark.parametrize("path", ["/nope", "/index.html", "/healthz/x", "/ws", "/wss/room"])
def test_unknown_path_is_404(server: Server, path: str) -> None:
    assert server.status(path) == 404


def test_plain_get_on_a_topic_is_426(server: Server) -> None:
    assert server.status("/ws/room") == 426


@pytest.mark.parametrize(
    "drop, override",
    [
        ("Sec-WebSocket-Key", {}),
        (None, {"Sec-WebSocket-Key": "too-short"}),
        (None, {"Connection": "keep-alive"}),
    ],
    ids=["missing-key", "malformed-key", "no-connection-upgrade"],
)
def test_bad_handshake_headers_are_refused(
    server: Server, drop: str | None, override: dict[str, str]
) -> None:
    headers = {**websocket_headers(), **override}
    if drop:
        del headers[drop]
    assert server.status("/ws/room", headers) in (400, 426)


@pytest.mark.parametrize(
    "segment",
    [
        "",
        quote("x" * 257),
        quote("é" * 128 + "x"),  # 257 bytes once decoded
        "%FF",  # not UTF-8
    ],
    ids=["empty", "257-bytes", "257-bytes-utf8", "not-utf8"],
)
def test_bad_topic_is_upgraded_then_refused_with_4400(server: Server, segment: str) -> None:
    """A valid upgrade to a bad topic is accepted, then refused in a way a browser
    can read: one ``invalid_topic`` error and close 4400. The empty topic may get
    404 instead."""
    path = f"/ws/{segment}"
    if not segment and server.status(path, websocket_headers()) == 404:
        return
    with RawClient.connect(server.port, path) as client:
        messages, code = client.read_until_close()
    assert [(m.get("type"), m.get("code")) for m in messages] == [("error", "invalid_topic")]
    assert code == 4400


@pytest.mark.parametrize("topic", ["x" * 256, "é" * 128, "salle 1", "a:b?c#d", "a/b", "/"])
def test_topic_up_to_256_bytes_is_accepted(server: Server, topic: str) -> None:
    with RawClient.join(server.port, f"/ws/{quote(topic, safe='')}")[0]:
        pass


@pytest.mark.parametrize(
    "metadata",
    ["{not json", "", '{"a":1} trailing', '"' + "x" * 1023 + '"'],
    ids=["invalid", "empty", "trailing-garbage", "1025-bytes"],
)
def test_bad_metadata_is_upgraded_then_refused_with_4400(server: Server, metadata: str) -> None:
    path = f"/ws/room?metadata={quote(metadata, safe='')}"
    with RawClient.connect(server.port, path) as client:
        messages, code = client.read_until_close()
    assert [(m.get("type"), m.get("code")) for m in messages] == [("error", "invalid_metadata")]
    assert code == 4400


def test_metadata_of_exactly_1024_bytes_is_accepted(server: Server) -> None:
    metadata = '"' + "é" * 511 + '"'
    assert len(metadata.encode()) == 1024
    path = f"/ws/room?metadata={quote(metadata, safe='')}"
    assert server.status(path, websocket_headers()) == 101


def test_origin_allow_list(start_server: Callable[..., Server]) -> None:
    srv = start_server("--allowed-origin", "https://good.example")

    def status_with(origin: str | None) -> int:
        headers = websocket_headers()
        if origin is not None:
            headers["Origin"] = origin
        return srv.status("/ws/room", headers)

    assert status_with("https://evil.example") == 403
    assert status_with("https://good.example.evil") == 403
    assert status_with("http://good.example") == 403
    assert status_with(None) == 101
    assert status_with("https://good.example") == 101


def test_logs_are_json_lines_naming_peer_and_topic(server: Server) -> None:
    client, peer_id = RawClient.join(server.port, "/ws/log-check")
    client.close()
    deadline = time.monotonic() + 5
    while True:
        records = server.log_records()
        if any(r.get("peer") == peer_id and r.get("topic") == "log-check" for r in records):
            break
        assert time.monotonic() < deadline, f"no log record for peer {peer_id}: {records}"
        time.sleep(0.05)
    for record in records:
        assert {"time", "level", "msg"} <= set(record), json.dumps(record)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"subprotocols": ["chat"]},
        {"additional_headers": {"Connection": "Upgrade, keep-alive", "X-Extra": "1"}},
        {"origin": "https://anywhere.example"},
    ],
    ids=["subprotocol-requested", "extra-headers", "origin"],
)
def test_every_valid_upgrade_is_accepted_with_the_worker_header(
    server: Server, kwargs: dict[str, object]
) -> None:
    """Well-formed upgrades are accepted whichever path handles them (the
    common request is recognised in Rust, a subprotocol request goes through
    the websockets library); both answer 101 with the worker's index."""

    async def scenario() -> None:
        async with Peers() as peers:
            peer = await peers.join(server.url("any-upgrade"), **kwargs)
            assert peer.response_header("X-Signaling-Worker") is not None
            assert peer.response_header("Sec-WebSocket-Protocol") is None

    run(scenario())
