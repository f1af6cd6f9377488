"""Cluster mode behind Redis Sentinel, and a master demoted behind a fixed address.

Two servers of two workers find their Redis through a real Sentinel that
watches a master and its replica (`sentinel_set`). The master dies, or the
Sentinel is told to fail over while it lives: every node must move to the
new master, and the peers' views must be exact again within seconds, with
no peer seen to leave that did not. Without Sentinel, a master turned replica
under the node's feet (a managed Redis failing over behind one DNS name)
answers writes READONLY: the node must give it up and wait for a master there.
"""

from __future__ import annotations

import asyncio
import time
from importlib import resources

import pytest
from conftest import Server
from redis_server import (  # noqa: F401
    RedisServer,
    SentinelServer,
    find_redis_server,
    redis_server,
    sentinel_set,
)
from test_cluster import (
    CONVERGE,
    WORKERS,
    StartServer,
    across,
    converge,
    expect_relay,
    start_cluster,
)
from wsclient import Peer, Peers, run

pytestmark = pytest.mark.timeout(180)

FAILOVER = 20.0
"""Seconds the Sentinel may take to promote the replica (it deems the master
down after 1 s; the rest is its election and the promotion)."""

SentinelSet = tuple[RedisServer, RedisServer, SentinelServer]
LIBRARY = (resources.files("signaling_sharded.server") / "cluster.lua").read_text()


async def on_master(servers: list[Server], port: int, timeout: float) -> float:
    """Wait until every node of `servers` is ready on the Redis at `port`;
    returns the seconds it took."""
    began = time.monotonic()
    where = f"127.0.0.1:{port}"
    await asyncio.gather(
        *(
            asyncio.to_thread(srv.wait_records, "cluster ready", WORKERS, timeout, redis=where)
            for srv in servers
        )
    )
    return time.monotonic() - began


async def wait_promoted(sentinel: SentinelServer, port: int) -> float:
    """Wait until the Sentinel names the Redis at `port` the master."""
    began = time.monotonic()
    while sentinel.master_port() != port:
        if time.monotonic() - began > FAILOVER:
            raise AssertionError(f"the Sentinel did not promote :{port} within {FAILOVER} s")
        await asyncio.sleep(0.05)
    return time.monotonic() - began


async def exact_after(old: list[Peer], joiner: Peer) -> None:
    """Every old peer sees exactly the others and `joiner`, and never saw
    one leave; `joiner` was greeted with exactly the old ones."""
    await converge([*old, joiner], CONVERGE)
    assert set(joiner.initial_view) == {peer.id for peer in old}, joiner.initial_view
    for peer in old:
        assert not peer.departed, f"{peer.id} saw {sorted(peer.departed)} leave"


def test_a_dead_master_is_replaced_and_views_are_exact_again(
    sentinel_set: SentinelSet,  # noqa: F811
    start_server: StartServer,
) -> None:
    master, replica, sentinel = sentinel_set
    first, second = start_cluster(start_server, sentinel)
    for srv in (first, second):
        srv.wait_records("cluster ready", WORKERS, redis=f"127.0.0.1:{master.port}")
    topic = "failover"

    async def scenario() -> None:
        async with Peers() as peers:
            a, b = await across(peers, first, second, topic)
            await expect_relay(a, b, "offer", {"sdp": "before"}, "before-1")
            with master.client() as client:
                assert client.execute_command("WAIT", 1, 5000) == 1  # the replica has it all

            master.stop()  # SIGKILL: the master is gone, not shut down
            killed = time.monotonic()
            # A peer joins while there is no master: served with what is known.
            c = await peers.join(first.url(topic))
            assert set(c.initial_view) == {a.id, b.id}, c.initial_view
            promoted = await wait_promoted(sentinel, replica.port)
            moved = await on_master([first, second], replica.port, CONVERGE)
            await converge([a, b, c], CONVERGE)
            print(
                f"promoted {promoted:.1f} s after the kill; every node on the new master "
                f"{moved:.1f} s later; views exact {time.monotonic() - killed:.1f} s after the kill"
            )
            for peer in (a, b, c):
                assert not peer.departed, f"{peer.id} saw {sorted(peer.departed)} leave"
            await expect_relay(b, c, "offer", {"sdp": "after"}, "after-1")
            await expect_relay(c, b, "answer", {"sdp": "after"}, "after-2")
            await exact_after([a, b, c], await peers.join(second.url(topic)))

    run(scenario(), timeout=120)


def test_a_failover_with_the_old_master_alive_moves_every_node_at_once(
    sentinel_set: SentinelSet,  # noqa: F811
    start_server: StartServer,
) -> None:
    """`SENTINEL FAILOVER` promotes the replica while the master still runs.
    Sentinel demotes the old master only once it has gone on saying it is a
    master for about 8 s; the nodes must not wait for that (they follow the
    Sentinel's +switch-master)."""
    master, replica, sentinel = sentinel_set
    first, second = start_cluster(start_server, sentinel)
    topic = "switch"

    async def scenario() -> None:
        async with Peers() as peers:
            a, b = await across(peers, first, second, topic)
            with sentinel.client() as client:
                assert client.execute_command("SENTINEL", "FAILOVER", SentinelServer.SERVICE)
            await wait_promoted(sentinel, replica.port)
            # Well within the ~8 s Sentinel waits before demoting the old
            # master (checked below): what moved the nodes was the switch.
            moved = await on_master([first, second], replica.port, 3.0)
            print(f"every node on the new master {moved:.1f} s after the Sentinel named it")
            with master.client() as client:
                role = client.execute_command("ROLE")[0]
            assert role == "master", "the old master was demoted already: the test proves nothing"
            await expect_relay(a, b, "offer", {"sdp": "after"}, "switch-1")
            await expect_relay(b, a, "answer", {"sdp": "after"}, "switch-2")
            await exact_after([a, b], await peers.join(first.url(topic)))

    run(scenario(), timeout=120)


def test_a_master_turned_replica_behind_its_address_is_given_up_until_promoted(
    redis_server: RedisServer,  # noqa: F811
    start_server: StartServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    other = RedisServer(find_redis_server(), tmp_path_factory.mktemp("other"))
    other.start_on_free_port()
    try:
        # At debug level: a failed retry is logged once per outage otherwise.
        (srv,) = start_cluster(start_server, redis_server, 1, "--log-level", "debug")
        topic = "demoted"

        async def scenario() -> None:
            async with Peers() as peers:
                a = await peers.join(srv.url(topic))
                with other.client() as client:
                    # Its data replaces this one's, functions too: with the
                    # library there, a write is refused for being one.
                    client.function_load(LIBRARY)
                with redis_server.client() as client:
                    client.execute_command("REPLICAOF", "127.0.0.1", other.port)
                # The next write (this join, well before the next heartbeat)
                # is answered READONLY.
                b = await peers.join(srv.url(topic))
                assert set(b.initial_view) == {a.id}
                await asyncio.to_thread(srv.wait_records, "cluster lost", 1, CONVERGE)
                failed = srv.records("cluster command failed", op="JoinOp")
                assert failed and failed[0]["error"].startswith("READONLY"), failed
                refused = await asyncio.to_thread(
                    srv.wait_records, "cluster unreachable", 1, CONVERGE
                )
                assert "is a replica, not a master" in refused[0]["error"], refused
                with redis_server.client() as client:
                    client.execute_command("REPLICAOF", "NO", "ONE")
                # (Workers without a write in between may not have noticed.)
                await asyncio.to_thread(srv.wait_records, "cluster ready", WORKERS + 1, CONVERGE)
                await expect_relay(a, b, "offer", {"sdp": "x"}, "demoted-1")
                c = await peers.join(srv.url(topic))
                assert set(c.initial_view) == {a.id, b.id}
                with redis_server.client() as client:
                    listed = client.hkeys(f"signaling:t:{topic}")
                assert {a.id, b.id, c.id} <= set(listed), listed

        run(scenario(), timeout=120)
    finally:
        other.stop()
