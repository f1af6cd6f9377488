"""signaling-bench against the real server: every scenario runs briefly and reports sane fields.

Speed is not asserted here (`make bench` measures it); these tests keep the load
generator and its report working. The binary is built once per test run if missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Server
from redis_server import RedisServer, redis_server  # noqa: F401
from test_cluster import start_cluster
from test_metrics import scrape

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "target" / "release" / "signaling-bench"


@pytest.fixture(scope="session")
def bench_binary() -> Path:
    """The release build of signaling-bench, built here if it is not there yet."""
    if not BENCH.exists():
        if shutil.which("cargo") is None:
            pytest.fail(f"{BENCH} not found and cargo is not installed to build it")
        subprocess.run(
            ["cargo", "build", "--release", "--quiet", "-p", "signaling-bench"],
            cwd=ROOT,
            check=True,
            timeout=900,
        )
    return BENCH


def bench(binary: Path, server: Server, scenario: str, *args: str) -> dict[str, Any]:
    """Runs one scenario against *server* and returns its JSON report."""
    done = subprocess.run(
        [
            str(binary),
            scenario,
            f"--url=ws://127.0.0.1:{server.port}",
            f"--server-pid={server.proc.pid}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1, done.stdout
    report: dict[str, Any] = json.loads(lines[0])
    assert report["scenario"] == scenario
    assert report["server_pid"] == server.proc.pid
    return report


def test_relay(bench_binary: Path, server: Server) -> None:
    r = bench(
        bench_binary,
        server,
        "relay",
        "--topics=2",
        "--peers=2",
        "--window=2",
        "--duration=2",
        "--warmup=1",
    )
    assert r["connections"] == 4
    assert r["relays"] > 0
    assert r["relays"] == 2 * r["round_trips"]
    assert r["relays_per_s"] > 0
    assert 0 < r["rtt_p50_us"] <= r["rtt_p90_us"] <= r["rtt_p99_us"] <= r["rtt_max_us"]
    assert r["errors"] == {}
    assert r["errors_total"] == 0
    assert r["timeouts"] == 0
    assert r["bad_messages"] == 0
    assert r["disconnects"] == 0
    assert r["server_processes"] >= 2  # the supervisor and its worker
    assert r["server_cpu_s"] > 0
    assert r["server_cpu_us_per_relay"] > 0
    # The server's event loop sleeps between messages (and is woken for
    # them), so its voluntary switches in the window are not zero.
    assert r["server_sleeps_per_1k_relays"] > 0
    assert r["server_preemptions_per_1k_relays"] >= 0
    assert r["client_cpu_s"] > 0


def test_relay_at_a_rate(bench_binary: Path, server: Server) -> None:
    r = bench(
        bench_binary,
        server,
        "relay",
        "--topics=2",
        "--peers=2",
        "--rate=50",
        "--duration=2",
        "--warmup=1",
    )
    # 4 peers, 50 offers/s each, each answered: 400 round trips in 2 s,
    # where a closed loop makes thousands.
    assert 300 <= r["round_trips"] <= 500, r["round_trips"]
    assert r["rate_per_peer"] == 50
    assert r["skipped"] == r["errors_total"] == r["timeouts"] == 0


def test_connect(bench_binary: Path, server: Server) -> None:
    r = bench(bench_binary, server, "connect", "--connections=50", "--concurrency=10", "--topics=5")
    assert r["joined"] == r["connections"] == 50
    assert r["failed"] == 0
    assert r["failures"] == {}
    assert r["connections_per_s"] > 0
    assert 0 < r["join_p50_us"] <= r["join_p99_us"] <= r["join_max_us"]
    assert r["rss_total_kib"] > 0
    assert isinstance(r["rss_per_connection_bytes"], (int, float))
    assert r["server_cpu_s"] is not None


def assert_exact_churn(r: dict[str, Any]) -> None:
    """Churn happened, and presence stayed exact through it."""
    assert r["joins"] > 0
    assert r["leaves_close"] + r["leaves_drop"] > 0
    assert r["errors_total"] == 0, r["errors"]
    assert r["impossible_events"] == {}
    assert r["observer_disconnects"] == 0
    assert r["ghosts"] == 0
    assert r["views_checked"] > 0
    assert r["inconsistent_views"] == 0
    assert r["missing_entries"] == r["extra_entries"] == 0


def assert_exact_updates(r: dict[str, Any]) -> None:
    """Every view ended with every member's last metadata, and the
    observers heard every churn update but those sent right before a
    dropped connection that the server never read (updates_lost_at_drop);
    the check peers hear the check's updates on top."""
    assert r["stale_metadata"] == r["stale_at_leave"] == 0
    assert r["leaves_unseen"] == r["updates_unsettled"] == 0
    assert r["check_updates_sent"] > 0
    assert r["updates_received"] >= r["updates_sent"] - r["updates_lost_at_drop"] > 0


def test_churn(bench_binary: Path, server: Server) -> None:
    r = bench(bench_binary, server, "churn", "--duration=2", "--clients=10", "--topics=3")
    assert_exact_churn(r)


@pytest.mark.parametrize("workers", ["1", "4"])
def test_churn_with_metadata_updates(
    bench_binary: Path, start_server: Callable[..., Server], workers: str
) -> None:
    """Churn whose peers join with metadata and update it during their stays,
    and whose final check updates it while fresh peers join: every
    peer-updated comes in order for a peer in the view, and every view ends
    with every member's last metadata."""
    server = start_server("--workers", workers)
    r = bench(
        bench_binary,
        server,
        "churn",
        "--duration=2",
        "--clients=10",
        "--topics=4",
        "--updates=3",
    )
    assert r["updates"] == 3
    assert_exact_churn(r)
    assert_exact_updates(r)


def test_churn_with_metadata_updates_across_a_cluster(
    bench_binary: Path,
    start_server: Callable[..., Server],
    redis_server: RedisServer,  # noqa: F811
) -> None:
    """The same on two cluster servers: each join picks one at random, so
    views hold peers of both and updates cross Redis."""
    first, second = start_cluster(start_server, redis_server, 2, workers=2)
    r = bench(
        bench_binary,
        first,
        "churn",
        f"--url=ws://127.0.0.1:{second.port}",
        "--duration=2",
        "--clients=10",
        "--topics=4",
        "--updates=3",
    )
    assert_exact_churn(r)
    assert_exact_updates(r)


def test_broadcast(bench_binary: Path, server: Server) -> None:
    """Both phases deliver every copy once and in order, and report the
    server's CPU per copy."""
    r = bench(
        bench_binary,
        server,
        "broadcast",
        "--receivers=50",
        "--rate=20",
        "--duration=1",
        "--idle=0.2",
    )
    assert r["joined"] == r["receivers"] == 50
    for name in ("relay", "broadcast"):
        phase = r[name]
        assert phase["rounds"] == 20
        assert phase["copies_delivered"] == phase["copies_expected"] == 1000, phase
        assert phase["missing"] == phase["out_of_order"] == 0
        assert phase["sender_errors"] == {} and phase["missed"] == 0
        assert 0 < phase["latency_p50_us"] <= phase["latency_p99_us"] <= phase["latency_max_us"]
        # Tens of milliseconds of CPU, counted in clock ticks: only present.
        assert phase["server_cpu_us_per_copy"] >= 0
    assert r["disconnected"] == r["unexpected_messages"] == 0


def test_broadcast_relay_phase_only(bench_binary: Path, server: Server) -> None:
    """What the Go design runs: the relay phase alone."""
    r = bench(
        bench_binary, server, "broadcast", "--receivers=10", "--duration=0.5", "--phases=relay"
    )
    assert r["relay"]["copies_delivered"] == r["relay"]["copies_expected"] == 100
    assert r["broadcast"] is None and r["cpu_per_copy_ratio"] is None


def test_fanout(bench_binary: Path, server: Server) -> None:
    r = bench(bench_binary, server, "fanout", "--peers=50", "--timeout=20")
    assert r["joined"] == 50
    assert r["join_failures"] == {}
    assert not r["timed_out"]
    assert r["all_complete_s"] is not None
    assert r["views_checked"] == r["exact_views"] == r["complete"] == 50
    assert r["incomplete_views"] == 0
    assert r["missing_entries"] == r["extra_entries"] == 0
    assert r["disconnected"] == 0
    assert r["impossible_events"] == {}
    assert r["error_messages"] == 0


def test_resume(bench_binary: Path, start_server: Callable[..., Server]) -> None:
    """Cuts at random, some found dead only by ping: nothing lost, nothing repeated."""
    server = start_server("--ping-interval=0.5", "--ping-timeout=0.5")
    r = bench(
        bench_binary,
        server,
        "resume",
        "--duration=4",
        "--pairs=5",
        "--cut-every-ms=150",
        "--blackhole-fraction=0.4",
        "--blackhole-max-ms=2000",
        "--suspended=200",
    )
    assert r["relays_sent"] > 0
    assert r["relays_received"] == r["relays_sent"]
    assert r["lost"] == r["duplicated"] == r["dropped"] == 0
    assert r["resets"] > 0 and r["blackholes"] > 0
    assert r["resumes"] == r["resets"] + r["blackholes"]
    assert r["resumes_moved"] == 0, "one server"
    assert sum(r["blackholes_ended"].values()) == r["blackholes"]
    assert set(r["blackholes_ended"]) <= {"taken_over", "found_dead"}, r["blackholes_ended"]
    assert 0 < r["resume_p50_us"] <= r["resume_p99_us"] <= r["resume_max_us"]
    assert r["presence_seen_by_senders"] == r["presence_seen_by_receivers"] == 0
    assert r["unfinished"] == 0
    assert r["errors_total"] == 0, r["first_error"]
    memory = r["memory"]
    assert memory["sessions"] == memory["resumed"] == 200
    assert memory["rss_suspended_kib"] > 0


def test_resume_across_a_cluster(
    bench_binary: Path,
    start_server: Callable[..., Server],
    redis_server: RedisServer,  # noqa: F811
) -> None:
    """Every connection picks one of two cluster servers: sessions move
    between them on resume, and still nothing is lost or repeated."""
    servers = [
        start_server("--workers=1", f"--redis={redis_server.url}", "--resume-secret=shared")
        for _ in range(2)
    ]
    for server in servers:
        server.wait_records("cluster ready")
    r = bench(
        bench_binary,
        servers[0],
        "resume",
        f"--url=ws://127.0.0.1:{servers[1].port}",
        "--duration=4",
        "--pairs=5",
        "--cut-every-ms=150",
        "--suspended=0",
    )
    assert r["relays_sent"] > 0
    assert r["lost"] == r["duplicated"] == r["dropped"] == 0
    assert r["resumes"] == r["resets"] + r["blackholes"]
    assert r["resumes_moved"] > 0
    assert r["presence_seen_by_senders"] == r["presence_seen_by_receivers"] == 0
    assert r["unfinished"] == 0
    assert r["errors_total"] == 0, r["first_error"]


def test_connect_holds_until_its_input_ends(bench_binary: Path, server: Server) -> None:
    command = [str(bench_binary), "connect", f"--url=ws://127.0.0.1:{server.port}"]
    command += ["--connections=40", "--topics=4", "--hold-until-eof"]
    proc = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stderr is not None
        said = proc.stderr.readline()
        assert said == "holding 40 connections until the input ends\n", said
        # Held: every peer is still there until the input ends.
        assert scrape(server)["signaling_peers"] == 40
        assert proc.poll() is None
        out, err = proc.communicate(input="", timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    assert report["joined"] == 40
    assert report["closed_while_held"] == {}
    assert scrape(server)["signaling_peers"] == 0


def bench_script(name: str, **settings: str) -> subprocess.CompletedProcess[str]:
    """Runs bench/*name*.py with these environment settings; it must succeed."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **settings}
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / f"{name}.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return done


def test_the_scale_bench(bench_binary: Path) -> None:
    """`make bench-scale`, small: every peer held to the end, relays and joins served meanwhile."""
    done = bench_script(
        "scale",
        PEERS="300",
        WORKERS="2",
        PROCESSES="2",
        PAIRS="5",
        DURATION="1",
        SOURCE_IPS="2",
        RATE="20",
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["joined"] == 300
    assert result["join_failed"] == 0
    assert result["ended_while_held"] == {}
    assert result["held_at_the_end"] == 300
    assert result["rss_held_bytes"] > result["rss_before_bytes"] > 0
    for phase in ("before", "held"):
        assert result[phase]["errors_total"] == result[phase]["skipped"] == 0
        # 10 peers, 20 offers/s each, for about 1 s: each answered.
        assert 100 <= result[phase]["round_trips"] <= 300
        assert 0 < result[phase]["rtt_p50_us"] <= result[phase]["rtt_p99_us"]
    assert result["joins"]["joined"] == 1000
    assert "idle peers held on --workers 2" in done.stdout
    # What other processes took meanwhile is reported; none was made idle.
    assert 0 <= result["held_others_cpu_share"] < 2
    assert result["idle_pids"] == []
    assert "other processes while all were held" in done.stdout


def test_the_cluster_bench(bench_binary: Path) -> None:
    """`make bench-cluster`, small: every setup runs, and the CPU of the
    servers and of Redis per relay and per join is reported."""
    done = bench_script("cluster", ROUNDS="1", DURATION="1", WARMUP="0.5", RATE="20", JOINS="200")
    folder = max((ROOT / "bench" / "results").glob("cluster-*"))
    runs = [json.loads(line) for line in (folder / "runs.jsonl").read_text().splitlines()]
    assert len(runs) == 10, runs
    relays = {(r["setup"], r["mode"]) for r in runs if r["mode"] != "joins"}
    setups = ("alone", "one", "two", "split")
    assert relays == {(s, m) for s in setups for m in ("paced", "flat out")}, relays
    for run in runs:
        through_redis = run["setup"] != "alone"
        if run["mode"] == "joins":
            assert run["joined"] == 200 and run["failed"] == 0, run
            assert run["server_cpu_us_per_connection"] > 0, run
            assert (run["redis_cpu_us_per_connection"] is not None) == through_redis, run
        else:
            assert run["errors_total"] == 0 and run["relays"] > 0, run
            assert run["server_cpu_us_per_relay"] > 0, run
            assert (run["redis_cpu_us_per_relay"] is not None) == through_redis, run
    split = [r for r in runs if r["setup"] == "split" and r["mode"] == "paced"]
    assert split[0]["redis_cpu_us_per_relay"] > 0, split
    assert "the CPU of a local one on the same two nodes" in done.stdout
    assert "One Redis core carries about" in done.stdout
