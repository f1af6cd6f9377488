"""``GET /metrics``: Prometheus text, exact sums over every worker.

Each test runs known traffic against a server of its own, then scrapes and
checks the counts to the unit. The text is parsed with ``prometheus_client``'s
parser, an independent check of the exposition format.
"""

from __future__ import annotations

import itertools
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest
from conftest import Server
from prometheus_client.parser import text_string_to_metric_families
from signaling_sharded._native import topic_owner
from wsclient import Peer, Peers, http_get, run

WORKERS = 2
Samples = dict[str, float]


def scrape(server: Server) -> Samples:
    response = http_get(server.port, "/metrics")
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(response.body.decode())


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def counters(samples: Samples, prefix: str) -> Samples:
    """The samples of one family whose value is not zero."""
    return {k: v for k, v in samples.items() if k.startswith(prefix + "{") and v}


def topics_owned_by(worker: int, count: int) -> list[str]:
    names = (f"metrics-{n}" for n in itertools.count())
    return list(itertools.islice((t for t in names if topic_owner(t, WORKERS) == worker), count))


def join(peers: Peers, server: Server, topic: str) -> Any:
    # No keepalive pings from the client: every byte it sends is counted.
    return peers.join(server.url(topic), ping_interval=None)


@pytest.fixture
def sharded(start_server: Callable[..., Server]) -> Server:
    return start_server("--workers", str(WORKERS))


def test_counts_are_exact_and_every_worker_reports_the_same(sharded: Server) -> None:
    before = scrape(sharded)
    assert before["signaling_peers_joined_total"] == 0
    assert before['signaling_worker_up{worker="0"}'] == 1
    assert before['signaling_worker_up{worker="1"}'] == 1
    (first,) = topics_owned_by(0, 1)
    (second,) = topics_owned_by(1, 1)

    async def scenario() -> None:
        async with Peers() as peers:
            a = await join(peers, sharded, first)
            b = await join(peers, sharded, first)
            c = await join(peers, sharded, first)
            d = await join(peers, sharded, second)
            await a.wait_joined(b.id, c.id)
            await b.wait_joined(c.id)
            for n in range(3):
                await a.relay("offer", b.id, {"sdp": "x" * n}, msg_id=f"m{n}")
            await a.relay("ice-candidate", "01ARZ3NDEKTSV4RRFFQ69G5FAV", {})
            await a.send("not json")
            await a.send(b"\x00binary")
            await d.relay("answer", a.id, {})  # another topic: not found
            assert (await a.recv_error())["code"] == "target_not_found"
            assert (await a.recv_error())["code"] == "invalid_json"
            assert (await a.recv_error())["code"] == "unsupported_frame"
            assert (await d.recv_error())["code"] == "target_not_found"
            for n in range(3):
                assert (await b.recv())["msgId"] == f"m{n}"
            for peer in (a, b, c, d):
                await peer.sync()
            check_traffic(sharded, [a, b, c, d])
            await b.close()
            await a.wait_left(b.id)
            d.abort()
            for peer in (a, c):
                await peer.sync()
            samples = scrape(sharded)
            assert samples["signaling_peers"] == 2
            assert counters(samples, "signaling_peers_left_total") == {
                'signaling_peers_left_total{reason="closed"}': 1,
                'signaling_peers_left_total{reason="disconnected"}': 1,
            }

    run(scenario())


def check_traffic(sharded: Server, opened: list[Peer]) -> None:
    assert http_get(sharded.port, "/nowhere").status == 404
    samples = scrape(sharded)
    assert samples["signaling_connections"] == 4
    assert samples["signaling_peers"] == 4
    assert samples["signaling_topics"] == 2
    assert samples['signaling_worker_connections{worker="0"}'] == 3
    assert samples['signaling_worker_connections{worker="1"}'] == 1
    assert samples["signaling_peers_joined_total"] == 4
    assert counters(samples, "signaling_peers_left_total") == {}
    assert counters(samples, "signaling_relays_total") == {
        'signaling_relays_total{result="delivered"}': 3,
        'signaling_relays_total{result="target_not_found"}': 2,
    }
    assert counters(samples, "signaling_errors_total") == {
        'signaling_errors_total{code="target_not_found"}': 2,
        'signaling_errors_total{code="invalid_json"}': 1,
        'signaling_errors_total{code="unsupported_frame"}': 1,
    }
    assert counters(samples, "signaling_handshake_failures_total") == {
        'signaling_handshake_failures_total{reason="404"}': 1
    }
    handoffs = counters(samples, "signaling_handoffs_total")
    sent = handoffs.get('signaling_handoffs_total{result="sent"}', 0)
    assert handoffs.get('signaling_handoffs_total{result="received"}', 0) == sent
    assert set(handoffs) <= {
        'signaling_handoffs_total{result="sent"}',
        'signaling_handoffs_total{result="received"}',
    }
    assert sent <= 4
    assert samples["signaling_received_bytes_total"] == sum(p.wire_out for p in opened)
    assert samples["signaling_sent_bytes_total"] == sum(p.wire_in for p in opened)

    # Whichever worker answers, the sums are the same; but the process_*
    # samples, which each worker takes of itself every tick period (its
    # CPU time, RSS), may move between two scrapes.
    def counted(scraped: Samples) -> Samples:
        return {k: v for k, v in scraped.items() if not k.startswith("process_")}

    answered = set()
    for _ in range(16):
        response = http_get(sharded.port, "/metrics")
        answered.add(response.headers["x-signaling-worker"])
        again = parse(response.body.decode())
        assert counted(again) == counted(samples)
        assert set(again) - set(counted(again)) == set(samples) - set(counted(samples))
    assert answered == {"0", "1"}, "one worker answered every scrape: nothing was summed"


def test_counters_outlive_a_killed_worker(sharded: Server) -> None:
    (topic,) = topics_owned_by(1, 1)

    async def joined_two() -> None:
        async with Peers() as peers:
            a = await join(peers, sharded, topic)
            b = await join(peers, sharded, topic)
            await a.wait_joined(b.id)
            served_by = a.response_header("X-Signaling-Worker")
            assert served_by == "1"

    run(joined_two())
    pid = worker_pid(sharded, 1)
    os.kill(pid, signal.SIGKILL)
    sharded.wait_records("worker started", 2, worker=1)
    samples = scrape(sharded)
    assert samples['signaling_worker_restarts_total{worker="1"}'] == 1
    assert samples['signaling_worker_restarts_total{worker="0"}'] == 0
    # The restarted worker carries on from its predecessor's counters.
    assert samples["signaling_peers_joined_total"] == 2
    assert samples['signaling_peers_left_total{reason="closed"}'] == 2
    assert samples["signaling_connections"] == 0


def worker_pid(server: Server, index: int) -> int:
    records = [
        r for r in server.log_records() if r.get("msg") == "worker started" and r["worker"] == index
    ]
    pid: int = records[-1]["pid"]
    return pid


def test_the_operators_view(sharded: Server) -> None:
    """Per worker, the process figures as Prometheus' own clients name
    them; the join latency histogram counts each join once; and every
    query of the Grafana dashboard in docs/ names a metric the server
    exports."""
    import json
    import re
    from pathlib import Path

    async def scenario() -> None:
        async with Peers() as peers:
            await join(peers, sharded, "operator-a")
            await join(peers, sharded, "operator-b")

    before = scrape(sharded)
    run(scenario())
    samples: Samples = {}
    # The process figures are sampled on the workers' ticks.
    for _ in range(50):
        samples = scrape(sharded)
        if all(samples.get(f'process_open_fds{{worker="{w}"}}') for w in range(WORKERS)):
            break
        time.sleep(0.1)
    for worker in range(WORKERS):
        label = f'{{worker="{worker}"}}'
        assert samples[f"process_resident_memory_bytes{label}"] > 10 * 2**20
        assert samples[f"process_open_fds{label}"] >= 5
        assert samples[f"process_max_fds{label}"] >= samples[f"process_open_fds{label}"]
        assert samples[f"process_cpu_seconds_total{label}"] > 0
    joins = samples["signaling_join_seconds_count"] - before.get("signaling_join_seconds_count", 0)
    assert joins == 2
    assert (
        samples['signaling_join_seconds_bucket{le="+Inf"}']
        == samples["signaling_join_seconds_count"]
    )
    assert 0 < samples["signaling_join_seconds_sum"] < 10 * samples["signaling_join_seconds_count"]

    names = {key.split("{")[0] for key in samples}
    dashboard = json.loads(
        (Path(__file__).parent.parent / "docs" / "grafana-dashboard.json").read_text()
    )
    queried = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            queried |= set(re.findall(r"\b(?:signaling|process)_[a-z_]+", target["expr"]))
    assert queried, "the dashboard queries nothing"
    assert queried <= names, f"not exported: {sorted(queried - names)}"
