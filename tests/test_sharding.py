"""Several workers behind one port: topic ownership, hand-offs, restarts, timeouts, drain.

Every worker listens on the server's port and the kernel spreads connections
over them; a join is served by the worker that owns its topic
(``topic_owner(topic, N)``), which names itself in ``X-Signaling-Worker``.
"""

from __future__ import annotations

import array
import asyncio
import itertools
import os
import signal
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Server, free_port, launch
from signaling_sharded._native import topic_owner
from websockets.exceptions import InvalidStatus, WebSocketException
from wsclient import Peer, Peers, connect_from, http_get, run, websocket_headers

WORKERS = 4
WORKER_HEADER = "X-Signaling-Worker"
RESTART_WITHIN = 2.0
"""Seconds from a worker's death until its topics can be joined again."""
RETRY_DELAY = 0.05
"""Seconds between two attempts to join a topic whose worker is down."""


def owned_topics(prefix: str, per_worker: int = 1) -> dict[int, list[str]]:
    """Topic names ``{prefix}-{n}``: *per_worker* of them owned by each worker."""
    topics: dict[int, list[str]] = {index: [] for index in range(WORKERS)}
    for n in itertools.count():
        topic = f"{prefix}-{n}"
        mine = topics[topic_owner(topic, WORKERS)]
        if len(mine) < per_worker:
            mine.append(topic)
        if all(len(names) == per_worker for names in topics.values()):
            return topics
    raise AssertionError("unreachable")


def wait_workers(srv: Server) -> dict[int, int]:
    """Wait until every worker accepts; return the pid of each, by index."""
    srv.wait_records("listening", count=WORKERS)
    return worker_pids(srv)


def worker_pids(srv: Server) -> dict[int, int]:
    """The pid of the latest process started for each worker index."""
    return {record["worker"]: record["pid"] for record in srv.log_records() if is_start(record)}


def is_start(record: dict[str, Any]) -> bool:
    return record.get("msg") == "worker started"


def start_sharded(start_server: Callable[..., Server], *flags: str) -> Server:
    srv = start_server("--workers", str(WORKERS), *flags)
    wait_workers(srv)
    return srv


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server with four workers, shared by the tests that do not stop or slow it."""
    srv = launch(tmp_path_factory.mktemp("server"), "--workers", str(WORKERS))
    wait_workers(srv)
    yield srv
    assert srv.stop() == 0
    assert "Traceback" not in srv.output(), srv.output()


@pytest.fixture(scope="module")
def impatient(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Four workers that give a client one second to complete its upgrade."""
    srv = launch(
        tmp_path_factory.mktemp("server"),
        "--workers",
        str(WORKERS),
        "--handshake-timeout",
        "1",
    )
    wait_workers(srv)
    yield srv
    assert srv.stop() == 0
    assert "Traceback" not in srv.output(), srv.output()


async def join_group(peers: Peers, url: str, size: int) -> list[Peer]:
    """*size* peers joined to *url* concurrently, each one seeing all the others."""
    group = await peers.join_all(*[url] * size)
    await settle(group)
    return group


async def settle(group: list[Peer]) -> None:
    """Wait until every peer of *group* sees exactly the others."""
    ids = {peer.id for peer in group}
    assert len(ids) == len(group)

    async def settle_one(peer: Peer) -> None:
        await peer.wait_until(lambda: len(peer.view) >= len(group) - 1, timeout=20)
        assert set(peer.view) == ids - {peer.id}, "the view of a peer is not its topic"

    await asyncio.gather(*(settle_one(peer) for peer in group))


async def exchange(first: Peer, second: Peer) -> None:
    """An offer one way, an answer the other; then neither has an error pending."""
    await first.relay("offer", second.id, {"sdp": f"from {first.id}"})
    assert await second.recv() == {
        "type": "offer",
        "from": first.id,
        "payload": {"sdp": f"from {first.id}"},
    }
    await second.relay("answer", first.id, {"sdp": f"from {second.id}"})
    assert await first.recv() == {
        "type": "answer",
        "from": second.id,
        "payload": {"sdp": f"from {second.id}"},
    }
    await asyncio.gather(first.sync(), second.sync())


def served_by(peer: Peer) -> int:
    header = peer.response_header(WORKER_HEADER)
    assert header is not None, f"no {WORKER_HEADER} header in the upgrade response"
    return int(header)


async def join_when_back(peers: Peers, url: str, deadline: float) -> tuple[Peer, float, list[str]]:
    """Join *url*, trying again while its worker is down, until *deadline* (monotonic).

    Returns the peer, when it joined, and what each failed attempt got. A
    refusal must be a 503 with ``Retry-After``; a connection lost while the
    worker dies is retried.
    """
    failures: list[str] = []
    while True:
        try:
            peer = await peers.join(url)
            return peer, time.monotonic(), failures
        except InvalidStatus as exc:
            response = exc.response
            assert response.status_code == 503, (response.status_code, response.body)
            assert response.headers.get("Retry-After"), response.headers
            failures.append("503")
        except (OSError, EOFError, asyncio.TimeoutError, WebSocketException) as exc:
            failures.append(repr(exc))
        if time.monotonic() >= deadline:
            raise AssertionError(f"could not join {url} in time; attempts: {failures}")
        await asyncio.sleep(RETRY_DELAY)


def wait_gone(pid: int, timeout: float = 2.0) -> bool:
    """Whether process *pid* no longer exists, waiting up to *timeout* for it to be reaped."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def running_in_group(pgid: int) -> list[int]:
    """The processes of group *pgid* that still run (exited ones not yet reaped excluded)."""
    running = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # it exited meanwhile
        # "pid (name) state ppid pgrp ...": the name may hold spaces and parentheses.
        state, _, pgrp = stat.rpartition(")")[2].split()[:3]
        if int(pgrp) == pgid and state != "Z":
            running.append(int(entry.name))
    return running


def wait_group_gone(pgid: int, timeout: float = 2.0) -> list[int]:
    """The processes of group *pgid* still running after up to *timeout* s."""
    deadline = time.monotonic() + timeout
    while (running := running_in_group(pgid)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return running


# --- many peers, many topics --------------------------------------------------

TOPICS = 50
PER_TOPIC = 4


def test_200_peers_over_50_topics_get_exact_views_and_relay_both_ways(sharded: Server) -> None:
    topics = [f"mesh-{n}" for n in range(TOPICS)]

    async def scenario() -> None:
        async with Peers() as peers:
            urls = [sharded.url(topic) for topic in topics for _ in range(PER_TOPIC)]
            joined = await peers.join_all(*urls)
            groups = {
                topic: joined[n * PER_TOPIC : (n + 1) * PER_TOPIC] for n, topic in enumerate(topics)
            }
            await asyncio.gather(*(settle(group) for group in groups.values()))

            async def send_all(sender: Peer, group: list[Peer]) -> None:
                for target in group:
                    if target is not sender:
                        await sender.relay("offer", target.id, {"route": [sender.id, target.id]})

            async def receive_all(target: Peer, group: list[Peer]) -> None:
                senders = {peer.id for peer in group} - {target.id}
                received = set()
                for _ in senders:
                    message = await target.recv(timeout=20)
                    assert message["type"] == "offer", message
                    assert message["payload"] == {"route": [message["from"], target.id]}
                    received.add(message["from"])
                assert received == senders
                await target.sync()  # no error and no extra message came
                assert set(target.view) == senders

            await asyncio.gather(
                *(send_all(peer, group) for group in groups.values() for peer in group),
                *(receive_all(peer, group) for group in groups.values() for peer in group),
            )
            used = set()
            for topic, group in groups.items():
                owner = topic_owner(topic, WORKERS)
                assert [served_by(peer) for peer in group] == [owner] * PER_TOPIC, topic
                used.add(owner)
            assert len(used) > 1, "every topic was served by one worker"

    run(scenario())


def test_every_peer_of_a_topic_is_served_by_its_owner(sharded: Server) -> None:
    topics = owned_topics("owner", per_worker=3)

    async def scenario() -> None:
        async with Peers() as peers:
            pairs = [(owner, topic) for owner, names in topics.items() for topic in names]
            groups = await asyncio.gather(
                *(join_group(peers, sharded.url(topic), 3) for _, topic in pairs)
            )
            for (owner, topic), group in zip(pairs, groups, strict=True):
                assert [served_by(peer) for peer in group] == [owner] * 3, topic

    run(scenario())


def test_a_join_accepted_by_another_worker_is_handed_to_the_owner(sharded: Server) -> None:
    # Connections from one source port reach the same listener: /healthz,
    # which the accepting worker answers itself, tells which one that is.
    source = free_port()

    def accepting_worker() -> int:
        response = http_get(sharded.port, "/healthz", source_port=source)
        assert response.status == 200
        return int(response.headers[WORKER_HEADER.lower()])

    acceptor = accepting_worker()
    if accepting_worker() != acceptor:
        pytest.skip("this kernel does not send one source port to one listener")
    topic = next(
        topic
        for topic in (f"handoff-{n}" for n in itertools.count())
        if topic_owner(topic, WORKERS) != acceptor
    )
    owner = topic_owner(topic, WORKERS)

    async def scenario() -> None:
        async with Peers() as peers:
            handed = await peers.join(sharded.url(topic), sock=connect_from(sharded.port, source))
            other = await peers.join(sharded.url(topic))
            await settle([handed, other])
            assert (served_by(handed), served_by(other)) == (owner, owner)
            await exchange(handed, other)

    run(scenario())
    assert accepting_worker() == acceptor, "the source port moved to another listener"


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_any_worker_answers_health_checks(sharded: Server, path: str) -> None:
    answered = set()
    for _ in range(32):
        response = http_get(sharded.port, path)
        assert response.status == 200
        answered.add(int(response.headers[WORKER_HEADER.lower()]))
    assert answered <= set(range(WORKERS))
    assert len(answered) > 1, f"32 requests all reached worker {answered}"


# --- a worker dies ------------------------------------------------------------


def test_killed_worker_is_restarted_and_only_its_peers_are_disconnected(
    start_server: Callable[..., Server],
) -> None:
    srv = start_sharded(start_server)
    topics = owned_topics("crash", per_worker=2)
    victim = topic_owner("crash-0", WORKERS)
    old_pid = worker_pids(srv)[victim]

    async def scenario() -> None:
        async with Peers() as peers:
            groups = {
                index: await join_group(peers, srv.url(names[0]), 2)
                for index, names in topics.items()
            }
            for index, group in groups.items():
                assert [served_by(peer) for peer in group] == [index, index]
            survivors = [group for index, group in groups.items() if index != victim]
            events = [len(peer.events) for group in survivors for peer in group]

            os.kill(old_pid, signal.SIGKILL)
            killed_at = time.monotonic()
            rejoin = asyncio.create_task(
                join_when_back(peers, srv.url(topics[victim][0]), killed_at + 10)
            )
            # No close frame comes from a killed process: an abnormal closure.
            codes = await asyncio.gather(*(peer.wait_closed() for peer in groups[victim]))
            assert codes == [1006, 1006]
            await asyncio.gather(*(exchange(*group) for group in survivors))
            assert all(peer.ws.close_code is None for group in survivors for peer in group)
            assert [len(peer.events) for group in survivors for peer in group] == events

            first, joined_at, failures = await rejoin
            back_after = joined_at - killed_at
            assert back_after < RESTART_WITHIN, (
                f"the topics of worker {victim} could be joined again only {back_after:.2f} s "
                f"after it was killed; attempts: {failures}"
            )
            started = srv.wait_records("worker started", count=2, timeout=1, worker=victim)
            new_pid = started[-1]["pid"]
            assert new_pid != old_pid
            srv.wait_records("listening", timeout=1, worker=victim, pid=new_pid)
            assert served_by(first) == victim
            assert first.initial_view == {}, "the restarted worker still lists the lost peers"
            second = await peers.join(srv.url(topics[victim][0]))
            await settle([first, second])
            await exchange(first, second)
            fresh = await join_group(peers, srv.url(topics[victim][1]), 2)
            assert [served_by(peer) for peer in fresh] == [victim, victim]
            await exchange(*fresh)

    run(scenario())
    died = srv.wait_records("worker died", worker=victim, pid=old_pid)
    assert died[-1]["exit_code"] != 0


def test_joins_for_a_dead_workers_topics_get_503_with_retry_after(
    start_server: Callable[..., Server],
) -> None:
    srv = start_sharded(start_server)
    topics = owned_topics("down")
    victim = topic_owner("down-0", WORKERS)
    topic = topics[victim][0]

    async def scenario() -> None:
        async with Peers() as peers:
            lost = await join_group(peers, srv.url(topic), 2)
            # A stopped supervisor cannot restart the worker: it stays down.
            os.kill(srv.proc.pid, signal.SIGSTOP)
            try:
                os.kill(worker_pids(srv)[victim], signal.SIGKILL)
                assert await asyncio.gather(*(peer.wait_closed() for peer in lost)) == [1006] * 2
                for _ in range(8):
                    response = await asyncio.to_thread(
                        http_get, srv.port, f"/ws/{topic}", websocket_headers()
                    )
                    assert response.status == 503, response
                    assert int(response.headers["retry-after"]) > 0, response
                    assert int(response.headers[WORKER_HEADER.lower()]) != victim, response
                others = await asyncio.gather(
                    *(
                        join_group(peers, srv.url(names[0]), 2)
                        for index, names in topics.items()
                        if index != victim
                    )
                )
                await asyncio.gather(*(exchange(*group) for group in others))
            finally:
                os.kill(srv.proc.pid, signal.SIGCONT)
            back, _, _ = await join_when_back(peers, srv.url(topic), time.monotonic() + 10)
            assert served_by(back) == victim

    run(scenario())


# --- slow clients -------------------------------------------------------------


def wait_closed_by_server(sock: socket.socket, timeout: float) -> tuple[float, bytes]:
    """Read until the server closes *sock*; return when it did and what it sent."""
    deadline = time.monotonic() + timeout
    data = b""
    try:
        while True:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    except ConnectionResetError:
        pass
    return time.monotonic(), data


@pytest.mark.parametrize(
    "sent",
    [b"", b"GET /ws/idle", b"GET /ws/idle HTTP/1.1\r\nHost: 127.0.0.1\r\n"],
    ids=["nothing", "part-of-request-line", "headers-unfinished"],
)
def test_silent_client_is_closed_at_the_handshake_timeout_and_blocks_no_one(
    impatient: Server, sent: bytes
) -> None:
    topics = owned_topics("busy")

    async def scenario() -> None:
        with socket.create_connection(("127.0.0.1", impatient.port)) as silent:
            connected_at = time.monotonic()
            silent.sendall(sent)
            closed = asyncio.ensure_future(asyncio.to_thread(wait_closed_by_server, silent, 10))
            # Peers on every worker, so the one holding the silent client is among them.
            async with Peers() as peers:
                groups = await asyncio.gather(
                    *(join_group(peers, impatient.url(names[0]), 2) for names in topics.values())
                )
                assert {served_by(group[0]) for group in groups} == set(range(WORKERS))
                await asyncio.gather(*(exchange(*group) for group in groups))
                relayed_at = time.monotonic()
            closed_at, data = await closed
        assert not data.startswith(b"HTTP/1.1 101"), data
        assert relayed_at < closed_at, "the other clients were served only after it was closed"
        after = closed_at - connected_at
        assert 0.8 <= after <= 3.0, (
            f"closed {after:.2f} s after connecting, with a 1 s handshake timeout"
        )

    run(scenario())


# --- drain --------------------------------------------------------------------


def test_sigterm_drains_every_worker_and_leaves_no_process(
    start_server: Callable[..., Server],
) -> None:
    srv = start_sharded(start_server)
    pids = worker_pids(srv)
    assert sorted(pids) == list(range(WORKERS))
    topics = owned_topics("drain")

    async def scenario() -> None:
        async with Peers() as peers:
            groups = await asyncio.gather(
                *(join_group(peers, srv.url(names[0]), 3) for names in topics.values())
            )
            everyone = [peer for group in groups for peer in group]
            assert {served_by(peer) for peer in everyone} == set(range(WORKERS))
            srv.proc.send_signal(signal.SIGTERM)
            codes = await asyncio.gather(*(peer.wait_closed(timeout=10) for peer in everyone))
            assert codes == [1001] * len(everyone)
        assert await asyncio.to_thread(srv.wait_exit, 10) == 0

    run(scenario())
    started = [record["pid"] for record in srv.log_records() if is_start(record)]
    assert sorted(started) == sorted(pids.values()), "a worker was started during the drain"
    assert [pid for pid in started if not wait_gone(pid)] == [], "workers outlived the supervisor"
    assert wait_group_gone(srv.proc.pid) == [], "processes of the server are left"


def test_a_worker_that_keeps_dying_stops_the_server(
    start_server: Callable[..., Server],
) -> None:
    """The crash-loop guard: three deaths within seconds of each start end the
    server with an error instead of restarting forever."""
    srv = start_sharded(start_server)
    pid = wait_workers(srv)[0]
    for death in range(1, 4):
        os.kill(pid, signal.SIGKILL)
        srv.wait_records("worker died", count=death, worker=0)
        if death < 3:
            starts = srv.wait_records("worker started", count=death + 1, worker=0)
            pid = starts[-1]["pid"]
    assert srv.wait_exit(10) == 1
    (stopping,) = srv.wait_records("stopping the server", timeout=1)
    assert "worker 0 died 3 times" in stopping["reason"]
    others = [record["pid"] for record in srv.log_records() if is_start(record)]
    assert all(wait_gone(other) for other in others)


def test_a_worker_never_joins_a_peer_to_a_topic_it_does_not_own(sharded: Server) -> None:
    """Defence in depth: a socket handed to the wrong worker (here by the
    test itself, over the workers' own hand-off link) is refused with 503,
    not joined to a second copy of the topic."""
    topic = next(
        name
        for name in (f"stray-{n}" for n in itertools.count())
        if topic_owner(name, WORKERS) != 0
    )
    receiver = 0  # worker 0 does not own `topic`
    request = (
        f"GET /ws/{topic} HTTP/1.1\r\nHost: 127.0.0.1:{sharded.port}\r\n"
        + "".join(f"{name}: {value}\r\n" for name, value in websocket_headers().items())
        + "\r\n"
    ).encode()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    link = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs, link:
        link.connect(f"\0signaling-sharded.{sharded.proc.pid}.{sharded.port}.{receiver}")
        payload = struct.pack("!d", time.monotonic() + 5) + request
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [theirs.fileno()]))]
        link.sendmsg([payload], rights)
        theirs.close()
        ours.settimeout(5)
        response = b""
        while b"\r\n\r\n" not in response:
            chunk = ours.recv(4096)
            assert chunk, f"closed without an answer: {response!r}"
            response += chunk
    head = response.split(b"\r\n\r\n")[0].decode().lower()
    assert head.startswith("http/1.1 503"), head
    assert f"{WORKER_HEADER.lower()}: {receiver}" in head
    sharded.wait_records("join for a topic another worker owns", topic=topic)
