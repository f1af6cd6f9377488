"""Every flag can also come from a SIGNALING_* environment variable."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from conftest import Server
from wsclient import RawClient


def test_flags_come_from_the_environment(
    start_server: Callable[..., Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIGNALING_PING_INTERVAL", "7")
    monkeypatch.setenv("SIGNALING_MAX_PEERS_PER_TOPIC", "1")
    srv = start_server()
    with RawClient.connect(srv.port, "/ws/env") as first:
        assert first.recv_json()["pingInterval"] == 7
        with RawClient.connect(srv.port, "/ws/env") as second:
            messages, code = second.read_until_close()
    assert [message["code"] for message in messages] == ["topic_full"]
    assert code == 4009


def test_the_command_line_wins_over_the_environment(
    start_server: Callable[..., Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIGNALING_PING_INTERVAL", "7")
    srv = start_server("--ping-interval", "9")
    with RawClient.connect(srv.port, "/ws/env") as client:
        assert client.recv_json()["pingInterval"] == 9
