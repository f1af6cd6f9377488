"""auth: tokens, as the handshake checks them."""

from __future__ import annotations

import time

import jwt
from signaling_sharded.server import auth

SECRET = "unit-test-secret-" + "s" * 32


def test_a_minted_token_grants_its_topics_and_metadata() -> None:
    token = auth.mint(SECRET, ttl=60, topics=["a", "b"], metadata={"name": "ann"})
    # Metadata a token gives is fixed unless it says the peer may change it.
    assert auth.authorize(SECRET, token, "a") == auth.Grant('{"name":"ann"}', False)
    assert auth.authorize(SECRET, token, "b") is not None
    assert auth.authorize(SECRET, token, "c") is None
    free = auth.mint(SECRET, ttl=60, metadata=1, can_update_metadata=True)
    assert auth.authorize(SECRET, free, "a") == auth.Grant("1", True)
    assert auth.authorize(SECRET, auth.mint(SECRET, ttl=60), "a") == auth.Grant(None, True)


def test_what_is_refused() -> None:
    now = int(time.time())
    expired = jwt.encode({"exp": now - 10}, SECRET, algorithm="HS256")
    no_exp = jwt.encode({"topic": "a"}, SECRET, algorithm="HS256")
    other = auth.mint("another-secret-" + "o" * 32, ttl=60)
    none = jwt.encode({"exp": now + 60}, None, algorithm="none")
    too_big = auth.mint(SECRET, ttl=60, metadata="x" * 2000)
    for token in (None, "", "garbage", expired, no_exp, other, none, too_big):
        assert auth.authorize(SECRET, token, "a") is None, token


def test_bearer() -> None:
    assert auth.bearer("Bearer abc") == "abc"
    assert auth.bearer("bearer  abc ") == "abc"
    assert auth.bearer("Basic abc") is None
    assert auth.bearer("Bearer") is None
    assert auth.bearer(None) is None


def test_weak_secrets() -> None:
    assert auth.weak_secret("short")
    assert not auth.weak_secret("x" * auth.MIN_SECRET_BYTES)
