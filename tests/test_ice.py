"""ICE servers in welcome: STUN entries and coturn use-auth-secret TURN credentials."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Callable

from conftest import Server
from wsclient import RawClient

SECRET = "turn-shared-secret"
TTL = 600
TURN_URIS = ["turn:turn.example.org:3478?transport=udp", "turns:turn.example.org:5349"]


def test_welcome_carries_stun_and_turn_credentials(start_server: Callable[..., Server]) -> None:
    srv = start_server(
        "--stun-uri",
        "stun:stun.example.org:3478",
        "--turn-uri",
        TURN_URIS[0],
        "--turn-uri",
        TURN_URIS[1],
        "--turn-secret",
        SECRET,
        "--turn-ttl",
        str(TTL),
    )
    before = int(time.time())
    with RawClient.connect(srv.port, "/ws/ice") as client:
        welcome = client.recv_json()
    after = int(time.time())
    stun, turn = welcome["iceServers"]
    assert stun == {"urls": ["stun:stun.example.org:3478"]}
    assert turn["urls"] == TURN_URIS
    expiry, peer = turn["username"].split(":")
    assert peer == welcome["selfId"]
    assert before + TTL <= int(expiry) <= after + TTL
    # The credential, computed independently: base64(HMAC-SHA1(secret, username)).
    digest = hmac.new(SECRET.encode(), turn["username"].encode(), hashlib.sha1).digest()
    assert turn["credential"] == base64.b64encode(digest).decode()


def test_no_ice_servers_unless_configured(server: Server) -> None:
    with RawClient.connect(server.port, "/ws/no-ice") as client:
        assert "iceServers" not in client.recv_json()
