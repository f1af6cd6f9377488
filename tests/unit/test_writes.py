"""The hub's deferred writes, at the seam between the event loop and Rust.

With ``Hub.defer_writes`` what the calls of one event loop iteration decide
is written at its end, each connection's in one write. What happens within
one iteration cannot be timed by a client over a socket, so here the test
is the loop: ``call_soon`` only records, and the iteration ends when the
test runs what was recorded. The transports record what the hub does to
them and, like uvloop's, pause their protocol past a high-water mark.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Callable
from typing import Any

import pytest
from signaling_sharded._native import Hub
from signaling_sharded.server.config import Config
from wsclient import OP_CLOSE, OP_TEXT, encode_frame

HIGH_WATER = 64 * 1024


class Iteration:
    """The event loop, as far as the hub sees it: its ``call_soon``."""

    def __init__(self) -> None:
        self.callbacks: list[Callable[[], object]] = []

    def call_soon(self, callback: Callable[[], object]) -> None:
        self.callbacks.append(callback)

    def end(self) -> None:
        """Run what the iteration scheduled, and what that schedules."""
        while self.callbacks:
            self.callbacks.pop(0)()


class Transport:
    """Records the hub's calls. A stalled one keeps every byte written to it
    in its buffer and pauses its protocol past the high-water mark, as a
    transport whose client stopped reading does. Once lost, it refuses
    writes as uvloop's does."""

    def __init__(self, *, stalled: bool = False) -> None:
        self.stalled = stalled
        self.protocol: Any = None
        self.writes: list[bytes] = []
        self.calls: list[str] = []
        self.buffered = 0
        self.paused = False
        self.closed = False

    def lose(self) -> None:
        """The socket is gone: the protocol is told."""
        self.closed = True
        self.protocol.connection_lost(None)

    def write(self, data: bytes) -> None:
        if self.closed:
            self.calls.append("write after loss")
            raise RuntimeError("unable to perform operation: the handler is closed")
        self.calls.append("write")
        self.writes.append(bytes(data))
        if self.stalled:
            self.buffered += len(data)
            if self.buffered > HIGH_WATER and not self.paused:
                self.paused = True
                self.protocol.pause_writing()

    def write_eof(self) -> None:
        if self.closed:
            self.calls.append("write_eof after loss")
            raise RuntimeError("unable to perform operation: the handler is closed")
        self.calls.append("write_eof")

    def close(self) -> None:
        self.calls.append("close")

    def abort(self) -> None:
        self.calls.append("abort")

    def drain(self) -> None:
        """The client read everything: the protocol may write again."""
        self.buffered = 0
        if self.paused:
            self.paused = False
            self.protocol.resume_writing()

    def messages(self) -> list[dict[str, Any]]:
        """The text messages written, in order (server frames: unmasked, unfragmented)."""
        data = b"".join(self.writes)
        found = []
        while data:
            opcode, size = data[0] & 0x0F, data[1] & 0x7F
            at = 2
            if size == 126:
                (size,) = struct.unpack("!H", data[2:4])
                at = 4
            elif size == 127:
                (size,) = struct.unpack("!Q", data[2:10])
                at = 10
            if opcode == OP_TEXT:
                found.append(json.loads(data[at : at + size]))
            data = data[at + size :]
        return found


class Setup:
    """A hub whose writes are deferred to the test's iterations."""

    def __init__(self, **settings: Any) -> None:
        self.sessions: list[tuple[str, str, str]] = []
        config = Config(resume_secret="k" * 32, **settings)
        self.hub = Hub(config, on_left=lambda *_: None, on_session=self.on_session)
        self.loop = Iteration()
        self.hub.defer_writes(self.loop.call_soon, HIGH_WATER)

    def on_session(self, peer: str, topic: str, event: str) -> None:
        self.sessions.append((peer, topic, event))

    def join(self, transport: Transport, topic: str = "room", **how: Any) -> Any:
        peer = self.hub.join(transport, topic, **how)
        transport.protocol = peer
        return peer


def relay(to: str, payload: str, msg_id: str) -> bytes:
    message = {"type": "offer", "to": to, "payload": payload, "msgId": msg_id}
    return encode_frame(OP_TEXT, json.dumps(message).encode())


def welcomed(setup: Setup, *transports: Transport) -> list[tuple[Any, str]]:
    """Joins a peer on each transport and ends the iteration: the peers and
    their ids, with what the transports recorded so far forgotten."""
    peers = [setup.join(t) for t in transports]
    setup.loop.end()
    ids = [t.messages()[0]["selfId"] for t in transports]
    for t in transports:
        t.writes.clear()
        t.calls.clear()
    return list(zip(peers, ids, strict=True))


def test_writes_wait_for_the_end_of_the_iteration_and_go_out_as_one() -> None:
    setup = Setup()
    a, b = Transport(), Transport()
    (sender, _), (_, b_id) = welcomed(setup, a, b)
    sender.data_received(b"".join(relay(b_id, f"p{i}", f"m{i}") for i in range(5)))
    assert b.writes == [], "written before the iteration ended"
    setup.loop.end()
    assert len(b.writes) == 1
    assert [m["payload"] for m in b.messages()] == [f"p{i}" for i in range(5)]


def test_a_join_is_timed_to_its_welcome_write() -> None:
    setup = Setup()
    setup.join(Transport())

    def joins() -> int:
        text = setup.hub.metrics_text()
        line = next(x for x in text.splitlines() if x.startswith("signaling_join_seconds_count"))
        return int(line.split()[-1])

    assert joins() == 0
    setup.loop.end()
    assert joins() == 1


def test_bytes_waiting_for_the_flush_count_against_the_queue_bound() -> None:
    queue = 64 * 1024
    setup = Setup(max_queue_bytes=queue)
    a, b = Transport(), Transport(stalled=True)
    (sender, _), (_, b_id) = welcomed(setup, a, b)
    # 300 KB to one peer in one iteration, read by read: past the
    # transport's mark they are written, the transport pauses, the rest
    # waits in the bounded queue, and what it cannot hold is dropped.
    payload = "x" * 1000
    count = 300
    for i in range(count):
        sender.data_received(relay(b_id, payload, f"m{i}"))
    assert b.paused, "not written before the iteration's end"
    setup.loop.end()
    dropped = [m["msgId"] for m in a.messages() if m.get("code") == "dropped"]
    kept = count - len(dropped)
    assert dropped, "a stalled peer was sent 300 KB in one iteration and nothing was dropped"
    assert kept * len(payload) <= HIGH_WATER + queue + len(payload)
    # The sender reads: its errors, past the mark too, were written at once
    # rather than queued, and did not cut it as a slow consumer.
    assert not [m for m in a.messages() if m.get("code") == "slow_consumer"]
    # What was kept arrives, in order, once the peer reads again.
    b.drain()
    setup.loop.end()
    received = [m["msgId"] for m in b.messages()]
    assert received == [f"m{i}" for i in range(count) if f"m{i}" not in dropped]
    assert received == [f"m{i}" for i in range(kept)]


def test_a_peer_sent_more_than_the_mark_is_written_before_the_iteration_ends() -> None:
    setup = Setup()
    a, b = Transport(), Transport()
    (sender, _), (_, b_id) = welcomed(setup, a, b)
    count = 200
    for i in range(count):
        sender.data_received(relay(b_id, "x" * 1000, f"m{i}"))
    early = len(b.writes)
    setup.loop.end()
    assert 2 <= early < count
    assert [m["msgId"] for m in b.messages()] == [f"m{i}" for i in range(count)]
    assert not [m for m in a.messages() if m.get("type") == "error"]


def test_an_abort_due_to_a_session_taken_over_in_the_same_iteration_is_made() -> None:
    setup = Setup(ping_interval=0.05, ping_timeout=0.05)
    old = Transport()
    setup.join(old, resumable=True)
    setup.loop.end()
    welcome, _peer_list = old.messages()
    deadline = time.monotonic() + 10
    # The ping goes unanswered: a tick suspends the session and aborts the
    # connection, and the abort waits for the iteration's end.
    while not setup.sessions:
        assert time.monotonic() < deadline, "the session was not suspended"
        setup.loop.end()
        time.sleep(0.01)
        setup.hub.tick()
    assert setup.sessions[-1][2] == "suspended"
    assert "abort" not in old.calls
    # In the same iteration the client resumes: the old record is gone.
    new = Transport()
    resumed = setup.join(new, resume=welcome["resumeToken"], seen=1)
    assert resumed.resumed
    setup.loop.end()
    assert "abort" in old.calls
    assert new.messages()[0]["selfId"] == welcome["selfId"]


def test_a_connection_lost_in_the_same_iteration_is_not_written_to() -> None:
    setup = Setup()
    a, b, c = Transport(), Transport(), Transport()
    (sender, _), (_, b_id), (_, c_id) = welcomed(setup, a, b, c)
    sender.data_received(relay(b_id, "p", "m1") + relay(c_id, "p", "m2"))
    b.lose()
    setup.loop.end()
    assert b.calls == []
    assert "m2" in [m.get("msgId") for m in c.messages()]
    assert {"type": "peer-left", "peerId": b_id} in a.messages()


def test_writes_then_a_close_in_one_iteration_go_out_in_order() -> None:
    setup = Setup()
    a, b = Transport(), Transport()
    (sender, _), (closer, b_id) = welcomed(setup, a, b)
    sender.data_received(relay(b_id, "p", "m1"))
    closer.data_received(encode_frame(OP_CLOSE, struct.pack("!H", 1000)))
    sender.data_received(relay(b_id, "p", "m2"))
    setup.loop.end()
    # The relay, then the close frame's echo, in one write, then the close;
    # the relay after the close is not written.
    assert b.calls == ["write", "close"]
    data = b.writes[0]
    assert [m["msgId"] for m in b.messages()] == ["m1"]
    assert data[-4] == 0x80 | OP_CLOSE and data[-2:] == struct.pack("!H", 1000)


@pytest.mark.parametrize(
    ("pause", "call_later"), [(-0.001, print), (float("nan"), print), (0.5, None)]
)
def test_a_pause_of_the_redis_writes_must_be_seconds_with_a_timer(
    pause: float, call_later: Callable[..., object] | None
) -> None:
    hub = Setup().hub
    with pytest.raises(ValueError, match="pause"):
        hub.attach_redis(Transport(), print, print, pause, call_later)


class Timers:
    """The event loop's ``call_later``, recorded; ``fire`` runs them."""

    def __init__(self, *, broken: bool = False) -> None:
        self.broken = broken
        self.set: list[tuple[float, Callable[[], object]]] = []

    def call_later(self, seconds: float, callback: Callable[[], object]) -> None:
        if self.broken:
            raise RuntimeError("the loop is closed")
        self.set.append((seconds, callback))

    def fire(self) -> None:
        timers, self.set = self.set, []
        for _, callback in timers:
            callback()


def test_redis_writes_sooner_than_the_pause_wait_for_one_timer() -> None:
    setup, timers, writer = Setup(), Timers(), Transport()
    hub = setup.hub
    hub.attach_redis(writer, print, print, 0.5, timers.call_later)
    hub.redis_write(b"first ", 0)
    setup.loop.end()
    assert writer.writes == [b"first "] and timers.set == []
    hub.redis_write(b"second ", 0)
    setup.loop.end()
    assert writer.writes == [b"first "]
    assert [round(seconds, 1) for seconds, _ in timers.set] == [0.5]
    # The timer takes care of what comes meanwhile: no flush, no timer more.
    hub.redis_write(b"third", 0)
    assert setup.loop.callbacks == [] and len(timers.set) == 1
    timers.fire()
    assert writer.writes == [b"first ", b"second third"]
    assert not hub.redis_busy()


# The hub reports the failed call_later as unraisable, then writes.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_redis_writes_go_at_once_when_no_timer_can_be_set() -> None:
    setup, timers, writer = Setup(), Timers(broken=True), Transport()
    hub = setup.hub
    hub.attach_redis(writer, print, print, 0.5, timers.call_later)
    hub.redis_write(b"first", 0)
    setup.loop.end()
    hub.redis_write(b"second", 0)
    setup.loop.end()
    assert writer.writes == [b"first", b"second"]


def test_a_new_writer_does_not_wait_for_the_timer_of_the_last() -> None:
    setup, timers = Setup(), Timers()
    hub = setup.hub
    old, new = Transport(), Transport()
    hub.attach_redis(old, print, print, 0.5, timers.call_later)
    hub.redis_write(b"first", 0)
    setup.loop.end()
    hub.redis_write(b"lost", 0)
    setup.loop.end()
    assert len(timers.set) == 1
    hub.detach_redis()
    hub.attach_redis(new, print, print, 0.5, timers.call_later)
    hub.redis_write(b"again", 0)
    setup.loop.end()
    assert new.writes == [b"again"] and old.writes == [b"first"]
    timers.fire()
    assert old.writes == [b"first"]
