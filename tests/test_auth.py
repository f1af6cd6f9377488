"""Opt-in auth: HS256 tokens from ``?token=`` or ``Authorization: Bearer``."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote, urlencode

import jwt
import pytest
from conftest import EXECUTABLE, Server, launch
from wsclient import ABSENT, TIMEOUT, Peer, Peers, RawClient, run, websocket_headers

SECRET = "test-secret-" + "k" * 52  # 64 bytes: no short-key warning, even for HS512
UNAUTHORIZED = {
    "type": "error",
    "code": "unauthorized",
    "message": "missing, invalid or expired token",
}
VIAS = ["query", "header"]


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = launch(tmp_path_factory.mktemp("server"), "--workers", "1", "--auth-secret", SECRET)
    yield srv
    srv.stop()
    assert "Traceback" not in srv.output(), srv.output()


def token(claims: dict[str, Any] | None = None, *, secret: str = SECRET, ttl: int = 60) -> str:
    """An HS256 token with ``exp`` *ttl* seconds from now, plus *claims*."""
    payload: dict[str, Any] = {"exp": int(time.time()) + ttl, **(claims or {})}
    return jwt.encode(payload, secret, algorithm="HS256")


def b64url(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def unsigned_token() -> str:
    """``alg: none``: a valid header and payload, and an empty signature."""
    header = b64url({"alg": "none", "typ": "JWT"})
    return f"{header}.{b64url({'exp': int(time.time()) + 60})}."


def path_for(topic: str, tok: str | None, via: str, **query: str) -> tuple[str, dict[str, str]]:
    """The request path and extra headers carrying *tok* by *via*."""
    headers = {}
    if tok is not None and via == "query":
        query["token"] = tok
    elif tok is not None:
        headers["Authorization"] = f"Bearer {tok}"
    path = f"/ws/{quote(topic, safe='')}"
    if query:
        path += "?" + urlencode(query, quote_via=quote)
    return path, headers


def assert_refused(port: int, topic: str, tok: str | None, via: str) -> None:
    """The upgrade succeeds, then only the error and close 4001 come."""
    path, headers = path_for(topic, tok, via)
    with RawClient.connect(port, path, headers) as client:
        messages, code = client.read_until_close()
    assert messages == [UNAUTHORIZED]  # no welcome, no peer-list
    assert code == 4001


async def join_with(
    peers: Peers, srv: Server, topic: str, tok: str, via: str, **query: str
) -> Peer:
    """Join *topic* with *tok* sent by *via*."""
    if via == "query":
        return await peers.join(srv.url(topic, token=tok, **query))
    headers = {"Authorization": f"Bearer {tok}"}
    return await peers.join(srv.url(topic, **query), additional_headers=headers)


REFUSED_TOKENS: dict[str, Callable[[], str | None]] = {
    "missing": lambda: None,
    "empty": lambda: "",
    "malformed": lambda: "not-a-token",
    "three-garbage-parts": lambda: "abc.def.ghi",
    "expired": lambda: token(ttl=-30),
    "wrong-key": lambda: token(secret="another-secret-" + "z" * 32),
    "alg-none": unsigned_token,
    "no-exp": lambda: jwt.encode({"topic": "guarded"}, SECRET, algorithm="HS256"),
    "exp-not-a-number": lambda: jwt.encode({"exp": "soon"}, SECRET, algorithm="HS256"),
    "not-yet-valid": lambda: token({"nbf": int(time.time()) + 600}),
    "hs512": lambda: jwt.encode({"exp": int(time.time()) + 60}, SECRET, algorithm="HS512"),
    "other-topic": lambda: token({"topic": "elsewhere"}),
    "topic-list-without-it": lambda: token({"topic": ["a", "b", "guarded-x"]}),
    "topic-not-a-string": lambda: token({"topic": 5}),
    "tampered-claims": lambda: tamper(token({"topic": "elsewhere"}), {"topic": "guarded"}),
}


def tamper(tok: str, claims: dict[str, Any]) -> str:
    """*tok* with its payload replaced, signature kept."""
    header, _, signature = tok.split(".")
    return f"{header}.{b64url({'exp': int(time.time()) + 60, **claims})}.{signature}"


@pytest.mark.parametrize("via", VIAS)
@pytest.mark.parametrize("case", list(REFUSED_TOKENS))
def test_bad_token_is_refused_and_learns_nothing(auth_server: Server, case: str, via: str) -> None:
    srv = auth_server

    async def scenario() -> None:
        async with Peers() as peers:
            member = await peers.join(srv.url("guarded", token=token()))
            await asyncio.to_thread(
                assert_refused, srv.port, "guarded", REFUSED_TOKENS[case](), via
            )
            await member.sync()  # a peer-joined would have come before the pong
            assert member.events == []
            assert member.view == {}

    run(scenario())


def test_other_authorization_schemes_are_refused(auth_server: Server) -> None:
    for value in (f"Basic {token()}", f"Token {token()}", "Bearer", "Bearer "):
        headers = {"Authorization": value}
        with RawClient.connect(auth_server.port, "/ws/guarded", headers) as client:
            assert client.read_until_close() == ([UNAUTHORIZED], 4001), value


@pytest.mark.parametrize("via", VIAS)
@pytest.mark.parametrize(
    "claims",
    [{}, {"topic": "room-1"}, {"topic": ["other", "room-1"]}],
    ids=["any-topic", "this-topic", "topic-list"],
)
def test_valid_token_is_admitted(auth_server: Server, claims: dict[str, Any], via: str) -> None:
    async def scenario() -> None:
        async with Peers() as peers:
            first = await peers.join(auth_server.url("room-1", token=token()))
            second = await join_with(peers, auth_server, "room-1", token(claims), via)
            assert second.view == {first.id: ABSENT}
            await first.wait_joined(second.id)
            await first.relay("offer", second.id, {"sdp": "x"}, msg_id="auth-1")
            assert (await second.recv())["payload"] == {"sdp": "x"}

    run(scenario())


@pytest.mark.parametrize("via", VIAS)
def test_metadata_claim_replaces_the_query_metadata(auth_server: Server, via: str) -> None:
    claimed = {"name": "from-token", "roles": ["a", "b"], "n": 1.5}

    async def scenario() -> None:
        async with Peers() as peers:
            watcher = await peers.join(auth_server.url("meta", token=token()))
            tok = token({"metadata": claimed, "topic": "meta"})
            peer = await join_with(peers, auth_server, "meta", tok, via, metadata='{"name":"q"}')
            await watcher.wait_joined(peer.id)
            assert watcher.view[peer.id] == claimed
            later = await peers.join(auth_server.url("meta", token=token()))
            assert later.view == {watcher.id: ABSENT, peer.id: claimed}

    run(scenario())


def test_query_metadata_is_kept_without_a_metadata_claim(auth_server: Server) -> None:
    async def scenario() -> None:
        async with Peers() as peers:
            watcher = await peers.join(auth_server.url("meta-q", token=token()))
            peer = await peers.join(auth_server.url("meta-q", token=token(), metadata='"q"'))
            await watcher.wait_joined(peer.id)
            assert watcher.view[peer.id] == "q"

    run(scenario())


# --- the token subcommand ------------------------------------------------------


def mint(*args: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [str(EXECUTABLE), "token", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        env={**os.environ, **(env or {})},
    )
    lines = done.stdout.split()
    assert len(lines) == 1, done.stdout
    return lines[0]


def test_token_subcommand_output_is_accepted(auth_server: Server) -> None:
    tok = mint("--secret", SECRET, "--topic", "cli", "--ttl", "120", "--metadata", '{"by":"cli"}')
    claims = jwt.decode(tok, SECRET, algorithms=["HS256"])
    assert claims["topic"] == "cli"
    assert claims["metadata"] == {"by": "cli"}
    assert 115 <= claims["exp"] - time.time() <= 125

    two_topics = mint("--topic", "t1", "--topic", "t2", env={"SIGNALING_AUTH_SECRET": SECRET})
    assert jwt.decode(two_topics, SECRET, algorithms=["HS256"])["topic"] == ["t1", "t2"]

    async def scenario() -> None:
        async with Peers() as peers:
            watcher = await peers.join(auth_server.url("cli", token=token()))
            peer = await peers.join(auth_server.url("cli", token=tok))
            await watcher.wait_joined(peer.id)
            assert watcher.view[peer.id] == {"by": "cli"}
            for topic in ("t1", "t2"):
                await peers.join(auth_server.url(topic, token=two_topics))
        await asyncio.to_thread(assert_refused, auth_server.port, "other", tok, "header")
        await asyncio.to_thread(assert_refused, auth_server.port, "t3", two_topics, "query")

    run(scenario())


def test_server_without_a_secret_needs_no_token(server: Server) -> None:
    async def scenario() -> None:
        async with Peers() as peers:
            first = await peers.join(server.url("open"))
            second = await peers.join(server.url("open", token="ignored"))
            third = await peers.join(
                server.url("open"), additional_headers={"Authorization": "Bearer nonsense"}
            )
            await first.wait_joined(second.id, third.id)

    run(scenario())


def test_origin_is_checked_before_the_token(start_server: Callable[..., Server]) -> None:
    srv = start_server("--auth-secret", SECRET, "--allowed-origin", "https://app.example")

    def status(origin: str | None, tok: str | None) -> int:
        headers = websocket_headers()
        if origin is not None:
            headers["Origin"] = origin
        path = "/ws/o" if tok is None else f"/ws/o?token={tok}"
        return srv.status(path, headers)

    assert status("https://evil.example", token()) == 403
    assert status("https://evil.example", None) == 403
    assert status("https://app.example", token()) == 101
    assert status(None, token()) == 101
    for origin in ("https://app.example", None):
        headers = {} if origin is None else {"Origin": origin}
        with RawClient.connect(srv.port, "/ws/o", headers) as client:
            assert client.read_until_close() == ([UNAUTHORIZED], 4001)


@pytest.mark.parametrize("secret", [True, False], ids=["auth", "no-auth"])
def test_repeated_authorization_header_gets_an_answer(
    start_server: Callable[..., Server], secret: bool
) -> None:
    """Two Authorization headers: refused (HTTP 400, or the upgrade then 4001),
    or ignored without auth; never a connection dropped without an answer."""
    srv = start_server(*(("--auth-secret", SECRET) if secret else ()))
    tok = token()
    head = ["GET /ws/dup HTTP/1.1", f"Host: 127.0.0.1:{srv.port}"]
    head += [f"{name}: {value}" for name, value in websocket_headers().items()]
    head += [f"Authorization: Bearer {tok}", f"Authorization: Bearer {tok}"]
    with socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        assert answer, "connection closed without an HTTP response"
        status = int(answer.split(b" ", 2)[1])
        assert status in (400, 101), answer
        if status == 101:
            client = RawClient(sock, answer.split(b"\r\n\r\n", 1)[1])
            if secret:
                assert client.read_until_close() == ([UNAUTHORIZED], 4001)
            else:
                assert client.recv_json()["type"] == "welcome"
    assert "Traceback" not in srv.output(), srv.output()
