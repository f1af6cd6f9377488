"""The asyncio client `signaling_sharded.client` against the real server.

Connection losses go through `Proxy`, a TCP relay standing for the network:
it can drop every connection at once, refuse new ones, or send them to
another server, so that reconnects happen when the test says so.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import jwt
import pytest
from conftest import Server
from signaling_sharded.client import (
    FINAL_CLOSE_CODES,
    Disconnected,
    Error,
    Event,
    NotConnected,
    PeerJoined,
    PeerLeft,
    Pong,
    Reconnected,
    Relay,
    Resumed,
    ServerMessage,
    SignalingClient,
    SignalingClosed,
)
from wsclient import ULID, run

TIMEOUT = 10.0
"""Seconds to wait for an event; generous, the machine may be busy."""

FAST = (0.05, 0.2)
"""Backoff (base, cap) for the tests: reconnects within a fraction of a second."""

SECRET = "client-test-secret-" + "s" * 40
UNKNOWN_ID = "01ARZ3NDEKTSV4RRFFQ69G5FAV"

E = TypeVar("E")


# --- helpers -----------------------------------------------------------------


class Proxy:
    """A TCP relay in front of a server.

    `cut` drops every open connection (no close frame: both ends just see the
    TCP connection die). New connections go to the server on port `target`,
    or are refused (accepted, then dropped at once) while `target` is None.
    """

    def __init__(self, target: int | None) -> None:
        self.target = target
        self.accepted = 0
        self.refused = 0
        self.port = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def __aenter__(self) -> Proxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        self.cut()
        await self._server.wait_closed()

    def cut(self) -> None:
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            if self.target is None:
                raise ConnectionRefusedError
            upstream_reader, upstream_writer = await asyncio.open_connection(
                "127.0.0.1", self.target
            )
        except OSError:
            self.refused += 1
            writer.transport.abort()
            return
        self._writers |= {writer, upstream_writer}
        await asyncio.gather(
            self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer)
        )

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            self._writers.discard(writer)
            writer.close()


async def next_event(client: SignalingClient, timeout: float = TIMEOUT) -> Event:
    return await asyncio.wait_for(client.__anext__(), timeout)


async def expect(client: SignalingClient, kind: type[E], timeout: float = TIMEOUT) -> E:
    """The next event, which must be a *kind*."""
    event = await next_event(client, timeout)
    assert isinstance(event, kind), event
    return event


async def events_until(
    client: SignalingClient, kind: type[E], timeout: float = TIMEOUT
) -> tuple[list[Event], E]:
    """Every event before the first *kind*, and that one."""
    before: list[Event] = []
    deadline = time.monotonic() + timeout
    while True:
        event = await next_event(client, deadline - time.monotonic())
        if isinstance(event, kind):
            return before, event
        before.append(event)


def replay(view: Mapping[str, Any], events: Iterable[Event]) -> dict[str, Any]:
    """*view* with the presence events applied, each of which must make sense."""
    result = dict(view)
    for event in events:
        if isinstance(event, PeerJoined):
            assert event.peer_id not in result, f"joined twice: {event}"
            result[event.peer_id] = event.metadata
        elif isinstance(event, PeerLeft):
            assert event.peer_id in result, f"an unknown peer left: {event}"
            del result[event.peer_id]
    return result


async def eventually(condition: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def base_url(server: Server) -> str:
    return f"ws://127.0.0.1:{server.port}"


def token(secret: str = SECRET) -> str:
    return jwt.encode({"exp": int(time.time()) + 300}, secret, algorithm="HS256")


# --- joining and presence ------------------------------------------------------


def test_join_gives_an_exact_view_with_metadata(server: Server) -> None:
    topic = "salle é #1?&x=y"  # needs percent-encoding in the path
    alice_meta = {"name": "Alice é", "tags": [1, None, True]}

    async def scenario() -> None:
        async with SignalingClient(base_url(server), topic, metadata=alice_meta) as alice:
            assert ULID.fullmatch(alice.self_id)
            assert alice.peers == {}
            assert alice.ice_servers == []
            assert alice.connected

            async with SignalingClient(base_url(server), topic) as bob:
                assert bob.peers == {alice.self_id: alice_meta}
                assert await expect(alice, PeerJoined) == PeerJoined(bob.self_id, None)
                assert alice.peers == {bob.self_id: None}

                async with SignalingClient(base_url(server), topic, metadata="carol") as carol:
                    assert carol.peers == {alice.self_id: alice_meta, bob.self_id: None}
                    joined = PeerJoined(carol.self_id, "carol")
                    assert await expect(alice, PeerJoined) == joined
                    assert await expect(bob, PeerJoined) == joined
                assert not carol.connected

            assert await expect(alice, PeerLeft) == PeerLeft(carol.self_id)
            assert await expect(alice, PeerLeft) == PeerLeft(bob.self_id)
            assert alice.peers == {}

            # A topic is only its own peers.
            async with SignalingClient(base_url(server), topic + "-other") as elsewhere:
                assert elsewhere.peers == {}

    run(scenario())


def test_after_close_the_iteration_ends_and_sending_raises(server: Server) -> None:
    async def scenario() -> None:
        client = SignalingClient(base_url(server), "closing")
        await client.connect()
        await client.close()
        assert not client.connected
        assert [event async for event in client] == []
        with pytest.raises(NotConnected):
            await client.offer(UNKNOWN_ID, {})
        with pytest.raises(RuntimeError):
            await client.connect()

    run(scenario())


# --- relay, errors, ping -------------------------------------------------------


def test_offer_answer_and_ice_candidates_round_trip(server: Server) -> None:
    sdp = {"type": "offer", "sdp": "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\n"}
    candidate = {"candidate": "candidate:1 1 UDP 2122 192.0.2.2 5000 typ host", "sdpMid": "0"}

    async def scenario() -> None:
        url = base_url(server)
        async with SignalingClient(url, "relay") as alice, SignalingClient(url, "relay") as bob:
            await expect(alice, PeerJoined)

            await alice.offer(bob.self_id, sdp, msg_id="o-1")
            assert await expect(bob, Relay) == Relay("offer", alice.self_id, sdp, "o-1")

            answer = {"type": "answer", "sdp": "v=0\r\n"}
            await bob.answer(alice.self_id, answer, msg_id="a-1")
            assert await expect(alice, Relay) == Relay("answer", bob.self_id, answer, "a-1")

            await alice.ice_candidate(bob.self_id, candidate)
            await alice.ice_candidate(bob.self_id, None)  # end of candidates
            await alice.send("ice-candidate", bob.self_id, [1, "é", {}], msg_id="m")
            assert await expect(bob, Relay) == Relay("ice-candidate", alice.self_id, candidate)
            assert await expect(bob, Relay) == Relay("ice-candidate", alice.self_id, None)
            third = Relay("ice-candidate", alice.self_id, [1, "é", {}], "m")
            assert await expect(bob, Relay) == third

            # No error came back to the sender; the pong is an event too.
            rtt = await alice.ping()
            assert 0 <= rtt < TIMEOUT
            assert isinstance(await expect(alice, Pong), Pong)

    run(scenario())


def test_errors_are_events_and_the_connection_stays(server: Server) -> None:
    async def scenario() -> None:
        async with SignalingClient(base_url(server), "errors") as alice:
            await alice.offer(UNKNOWN_ID, {"sdp": ""}, msg_id="lost")
            error = await expect(alice, Error)
            assert (error.code, error.msg_id) == ("target_not_found", "lost")
            assert error.message

            await alice.send("greeting", UNKNOWN_ID, "hi")
            error = await expect(alice, Error)
            assert (error.code, error.msg_id) == ("invalid_type", None)

            await alice.ping()
            assert alice.connected

    run(scenario())


# --- reconnecting --------------------------------------------------------------


def test_reconnect_after_a_dropped_connection_reports_the_changes(server: Server) -> None:
    async def scenario() -> None:
        url = base_url(server)
        async with Proxy(server.port) as proxy:
            # Not resumable: the drop is a leave and a join (see the resume test).
            alice = SignalingClient(
                proxy.url, "drop", metadata="alice", backoff=FAST, resumable=False
            )
            bob = SignalingClient(url, "drop", metadata="bob")
            carol = SignalingClient(url, "drop", metadata="carol")
            async with alice, bob:
                assert await expect(alice, PeerJoined) == PeerJoined(bob.self_id, "bob")
                assert bob.peers == {alice.self_id: "alice"}
                before = alice.peers
                assert before == {bob.self_id: "bob"}
                old_id = alice.self_id

                # The network fails; alice's first attempts to come back fail too.
                proxy.target = None
                proxy.cut()
                assert await expect(alice, Disconnected) == Disconnected(1006, "")
                assert not alice.connected
                with pytest.raises(NotConnected):
                    await alice.offer(bob.self_id, {})
                assert await expect(bob, PeerLeft) == PeerLeft(old_id)

                # Meanwhile bob leaves and carol joins.
                await bob.close()
                await carol.connect()
                await eventually(lambda: proxy.refused >= 2)
                proxy.target = server.port

                changes, reconnected = await events_until(alice, Reconnected)
                assert alice.self_id == reconnected.self_id != old_id
                assert dict(reconnected.peers) == alice.peers == {carol.self_id: "carol"}
                assert sorted(changes, key=repr) == [
                    PeerJoined(carol.self_id, "carol"),
                    PeerLeft(bob.self_id),
                ]
                assert replay(before, changes) == alice.peers
                assert await expect(carol, PeerJoined) == PeerJoined(alice.self_id, "alice")

                # The new connection relays both ways.
                await alice.offer(carol.self_id, {"n": 1}, msg_id="after")
                assert await expect(carol, Relay) == Relay(
                    "offer", alice.self_id, {"n": 1}, "after"
                )
                await carol.answer(alice.self_id, {"n": 2})
                assert await expect(alice, Relay) == Relay("answer", carol.self_id, {"n": 2})
            await carol.close()

    run(scenario())


def test_reconnect_to_a_restarted_server_after_going_away(
    start_server: Callable[..., Server],
) -> None:
    async def scenario() -> None:
        first = await asyncio.to_thread(start_server)
        async with Proxy(first.port) as proxy:
            alice = SignalingClient(proxy.url, "restart", metadata="alice", backoff=FAST)
            bob = SignalingClient(proxy.url, "restart", metadata="bob", backoff=FAST)
            async with alice, bob:
                await expect(alice, PeerJoined)
                views = {alice: alice.peers, bob: bob.peers}

                # SIGTERM: the server drains with 1001, which is retried; the
                # new connections are refused until the new server is up.
                proxy.target = None
                assert await asyncio.to_thread(first.stop) == 0
                for client in (alice, bob):
                    events, disconnected = await events_until(client, Disconnected)
                    assert disconnected.code == 1001
                    views[client] = replay(views[client], events)
                await eventually(lambda: proxy.refused >= 2)
                second = await asyncio.to_thread(start_server)
                proxy.target = second.port

                for client in (alice, bob):
                    events, _ = await events_until(client, Reconnected)
                    views[client] = replay(views[client], events)
                # Whoever came back first sees the other one join.
                await eventually(lambda: len(alice.peers) == len(bob.peers) == 1)
                assert alice.peers == {bob.self_id: "bob"}
                assert bob.peers == {alice.self_id: "alice"}
                for client in (alice, bob):
                    await client.ping()  # every event owed is queued before the pong
                    events, _ = await events_until(client, Pong)
                    assert replay(views[client], events) == client.peers

    run(scenario())


def test_server_full_is_retried(start_server: Callable[..., Server]) -> None:
    srv = start_server("--workers", "1", "--max-connections", "1")

    async def scenario() -> None:
        async with Proxy(srv.port) as proxy:
            alice = SignalingClient(proxy.url, "full", backoff=FAST, resumable=False)
            async with alice:
                old_id = alice.self_id
                proxy.target = None
                proxy.cut()
                await expect(alice, Disconnected)
                await asyncio.to_thread(srv.wait_records, "peer left", peer=old_id)

                # Another client takes the only slot: alice is refused with 4029...
                async with SignalingClient(base_url(srv), "full") as other:
                    proxy.target = srv.port
                    await asyncio.to_thread(srv.wait_records, "peer refused", reason="server_full")
                    assert not alice.connected
                # ...and gets in once the slot is free again.
                _, reconnected = await events_until(alice, Reconnected)
                assert reconnected.self_id not in (old_id, other.self_id)
                assert reconnected.peers == {}

    run(scenario())


def test_a_dropped_connection_resumes_the_session_unnoticed(server: Server) -> None:
    """Resumable by default: after a drop the client comes back with the same
    id, gets what was sent meanwhile, and the other peers see nothing."""

    async def scenario() -> None:
        async with Proxy(server.port) as proxy:
            alice = SignalingClient(proxy.url, "blip", metadata="alice", backoff=FAST)
            bob = SignalingClient(base_url(server), "blip", metadata="bob")
            async with alice, bob:
                assert await expect(alice, PeerJoined) == PeerJoined(bob.self_id, "bob")
                old_id = alice.self_id
                proxy.cut()
                assert await expect(alice, Disconnected) == Disconnected(1006, "")
                await asyncio.to_thread(server.wait_records, "peer suspended", peer=old_id)
                for n in range(3):
                    await bob.offer(old_id, {"n": n}, msg_id=str(n))
                events, resumed = await events_until(alice, Resumed)
                assert resumed == Resumed(old_id) and events == []
                assert alice.self_id == old_id and alice.peers == {bob.self_id: "bob"}
                for n in range(3):
                    relay = await expect(alice, Relay)
                    assert relay == Relay("offer", bob.self_id, {"n": n}, str(n))
                # bob saw nothing: its next event is the answer to a new relay.
                await alice.answer(bob.self_id, {"back": True}, msg_id="back")
                assert await next_event(bob) == Relay("answer", old_id, {"back": True}, "back")

    run(scenario())


# --- close codes that end the client --------------------------------------------


def test_unauthorized_raises_signaling_closed(start_server: Callable[..., Server]) -> None:
    srv = start_server("--auth-secret", SECRET)

    async def scenario() -> None:
        async with Proxy(srv.port) as proxy:
            with pytest.raises(SignalingClosed) as refused:
                await SignalingClient(proxy.url, "auth", backoff=FAST).connect()
            assert refused.value.code == 4001
            assert refused.value.error is not None
            assert refused.value.error.code == "unauthorized"
            assert proxy.accepted == 1

            async with SignalingClient(base_url(srv), "auth", token=token()) as alice:
                assert ULID.fullmatch(alice.self_id)

    run(scenario())


def test_unauthorized_on_reconnect_ends_the_client_without_retrying(
    start_server: Callable[..., Server],
) -> None:
    srv = start_server("--auth-secret", SECRET)
    other = start_server("--auth-secret", "another-secret-" + "o" * 40)

    async def scenario() -> None:
        async with Proxy(srv.port) as proxy:
            alice = SignalingClient(proxy.url, "auth", token=token(), backoff=FAST)
            await alice.connect()
            # The token is not valid on the server that alice reaches next.
            proxy.target = other.port
            proxy.cut()
            assert await expect(alice, Disconnected) == Disconnected(1006, "")
            with pytest.raises(SignalingClosed) as closed:
                await next_event(alice)
            assert closed.value.code == 4001
            assert not alice.connected
            with pytest.raises(NotConnected):
                await alice.ping()
            # The iteration stays over, and no attempt follows the refusal.
            with pytest.raises(SignalingClosed):
                await next_event(alice)
            await asyncio.sleep(5 * FAST[1])
            assert proxy.accepted == 2
            await alice.close()

    run(scenario())


def test_topic_full_raises_signaling_closed(start_server: Callable[..., Server]) -> None:
    srv = start_server("--max-peers-per-topic", "1")

    async def scenario() -> None:
        async with SignalingClient(base_url(srv), "small"):
            with pytest.raises(SignalingClosed) as refused:
                await SignalingClient(base_url(srv), "small").connect()
            assert refused.value.code == 4009
            assert refused.value.error is not None
            assert refused.value.error.code == "topic_full"

    run(scenario())


@pytest.mark.parametrize(
    ("topic", "metadata", "error"),
    [("x" * 257, None, "invalid_topic"), ("fine", "m" * 2000, "invalid_metadata")],
    ids=["invalid-topic", "invalid-metadata"],
)
def test_an_invalid_join_raises_signaling_closed_without_retrying(
    server: Server, topic: str, metadata: str | None, error: str
) -> None:
    async def scenario() -> None:
        async with Proxy(server.port) as proxy:
            client = SignalingClient(proxy.url, topic, metadata=metadata, backoff=FAST)
            with pytest.raises(SignalingClosed) as refused:
                await client.connect()
            assert refused.value.code == 4400
            assert refused.value.error is not None
            assert refused.value.error.code == error
            assert refused.value.error.message in str(refused.value)
            assert proxy.accepted == 1
        # A reconnect that meets 4400 ends the client too.
        assert 4400 in FINAL_CLOSE_CODES

    run(scenario())


def test_a_server_message_arrives_and_a_kick_ends_the_client(
    start_server: Callable[..., Server],
) -> None:
    """The admin API's two ways of reaching a client: a ``ServerMessage``
    event, and a kick (4010), after which it does not reconnect."""
    import json
    import urllib.request

    admin_token = "client-test-admin-token"
    srv = start_server("--admin-token", admin_token)

    def admin(method: str, path: str, body: Any = None) -> int:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{srv.port}/admin/v1{path}", data=data, method=method
        )
        request.add_header("Authorization", f"Bearer {admin_token}")
        with urllib.request.urlopen(request, timeout=TIMEOUT) as answer:
            return int(answer.status)

    async def scenario() -> None:
        alice = SignalingClient(base_url(srv), "backend", backoff=FAST)
        await alice.connect()
        status = await asyncio.to_thread(
            admin, "POST", "/topics/backend/messages", {"payload": {"x": 1}}
        )
        assert status == 202
        assert await expect(alice, ServerMessage) == ServerMessage({"x": 1})
        status = await asyncio.to_thread(admin, "DELETE", f"/topics/backend/peers/{alice.self_id}")
        assert status == 204
        assert await next_event(alice) == Error("kicked", "removed by the server")
        with pytest.raises(SignalingClosed) as closed:
            await next_event(alice)
        assert closed.value.code == 4010
        assert not alice.connected
        await alice.close()

    run(scenario())
