"""Cluster mode: what a relay and a join cost when they go through Redis.

    make bench-cluster                       # 3 rounds
    ROUNDS=1 DURATION=5 make bench-cluster   # quicker (WARMUP: 2 s)
    RATE=100 make bench-cluster              # offers per peer and second, paced

Relays are measured with `signaling-bench relay` (50 topics of 4 peers; the
peers of each topic alternate between the servers given) in three setups:

- ``alone``: one server without Redis (the single-machine default);
- ``one``: one server in cluster mode, every peer on it (relays stay in the
  process; Redis only sees joins and leaves);
- ``two``: two servers in cluster mode, each topic's peers all on one of them
  (the topics alternate), so that relays stay local on the same two nodes;
- ``split``: the same two servers, each topic's peers alternating between
  them, so that every relay crosses Redis.

A cross-node relay is compared with a local one on the same two nodes
(``split`` against ``two``): here both servers share one core, and two
processes taking turns on a core cost more per relay than one process
alone (``two`` against ``one``), which nodes on machines of their own do
not pay.

Each setup runs twice. **Paced**: every peer offers ``RATE`` times a second
(50 by default: 20,000 relays/s in all), a load that every setup carries with
the core to spare, so the CPU per relay of the servers and of Redis is what a
relay costs. **Flat out**: 4 offers in flight per peer, the core saturated:
the relays/s that the servers and Redis reach together on one core.

Joins are measured with `signaling-bench connect` (``JOINS`` connections, 100
at a time, over 100 topics, to one server): alone and in cluster mode, the
server's CPU and Redis' per join.

From the paced figures: a cross-node relay's CPU (servers and Redis) against
a local one's, and the relays and joins per second that one Redis core
carries (a million over Redis' microseconds per relay or per join).

Every server has one worker. Servers and Redis share CPU 0, the load
generator has CPU 1. The JSON lines go to bench/results/cluster-<time>/.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import BENCH_BIN, ROOT

from testkit.processes import RedisProcess, ServerProcess, free_port, pinned

SERVER = ROOT / ".venv" / "bin" / "signaling-sharded"
RELAY_ARGS = ("--topics", "50", "--peers", "4", "--window", "4")
SETUPS = ("alone", "one", "two", "split")
MODES = ("paced", "flat out")
JOIN_SETUPS = ("alone", "one")
#: The servers and Redis share one core; the load generator has the other.
SERVER_CPU, LOAD_CPU = 0, 1


def start_redis(folder: Path) -> RedisProcess:
    executable = shutil.which("redis-server")
    if executable is None:
        raise SystemExit("redis-server is not installed")
    redis = RedisProcess(executable, folder, cpu=SERVER_CPU)
    redis.start()
    return redis


def start_server(redis_url: str | None, folder: Path) -> ServerProcess:
    port = free_port()
    command = [str(SERVER), "--workers", "1", "--port", str(port), "--host", "127.0.0.1"]
    command += ["--log-level", "warning"]
    if redis_url is not None:
        command += ["--redis", redis_url]
    server = ServerProcess(command, port, folder / f"server-{port}.log", cpu=SERVER_CPU)
    try:
        server.wait_ready()
    except RuntimeError as exc:
        raise SystemExit(f"the server did not start: {exc}") from None
    time.sleep(1.0)  # cluster mode: the worker connects to Redis after it listens
    return server


def run_bench(command: list[str]) -> dict[str, Any]:
    done = subprocess.run(pinned(LOAD_CPU, command), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"signaling-bench failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def measure(setup: str, mode: str, settings: dict[str, float], folder: Path) -> dict[str, Any]:
    """One run of ``setup``: relays in ``mode``, or joins (mode ``joins``)."""
    redis = start_redis(folder) if setup != "alone" else None
    servers = []
    try:
        count = 2 if setup in ("two", "split") else 1
        for _ in range(count):
            servers.append(start_server(redis.url if redis else None, folder))
        if mode == "joins":
            command = [str(BENCH_BIN), "connect", "--url", f"ws://127.0.0.1:{servers[0].port}"]
            command += ["--server-pid", str(servers[0].pid), "--concurrency", "100"]
            command += ["--connections", f"{settings['joins']:g}", "--topics", "100"]
        else:
            command = [str(BENCH_BIN), "relay", *RELAY_ARGS]
            command += ["--duration", f"{settings['duration']:g}"]
            command += ["--warmup", f"{settings['warmup']:g}"]
            if mode == "paced":
                command += ["--rate", f"{settings['rate']:g}"]
            if setup == "two":
                command += ["--whole-topics"]
            for server in servers:
                command += ["--url", f"ws://127.0.0.1:{server.port}"]
                command += ["--server-pid", str(server.pid)]
        if redis is not None and redis.proc is not None:
            command += ["--redis-pid", str(redis.proc.pid)]
        result = run_bench(command)
        result.update(setup=setup, mode=mode)
        return result
    finally:
        for server in servers:
            server.stop()
        if redis is not None:
            redis.stop()


def main() -> int:
    rounds = int(os.environ.get("ROUNDS", "3"))
    settings = {
        "duration": float(os.environ.get("DURATION", "10")),
        "warmup": float(os.environ.get("WARMUP", "2")),
        "rate": float(os.environ.get("RATE", "50")),
        "joins": float(os.environ.get("JOINS", "5000")),
    }
    out = ROOT / "bench" / "results" / f"cluster-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    plan = [(setup, mode) for mode in MODES for setup in SETUPS]
    plan += [(setup, "joins") for setup in JOIN_SETUPS]
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {key: [] for key in plan}
    with tempfile.TemporaryDirectory() as scratch:
        for round_ in range(rounds):
            for setup, mode in plan:
                result = measure(setup, mode, settings, Path(scratch))
                runs[setup, mode].append(result)
                with (out / "runs.jsonl").open("a") as jsonl:
                    jsonl.write(json.dumps(result) + "\n")
                if mode == "joins":
                    said = (
                        f"{result['connections_per_s']:>9,.0f} joins/s, failed {result['failed']}"
                    )
                else:
                    said = (
                        f"{result['relays_per_s']:>9,.0f} relays/s, errors {result['errors_total']}"
                    )
                print(f"round {round_ + 1} {mode:8} {setup:5}: {said}", file=sys.stderr)
    text = summary(runs, rounds, settings)
    (out / "summary.md").write_text(text + "\n")
    print(text)
    return 0


def summary(
    runs: dict[tuple[str, str], list[dict[str, Any]]], rounds: int, settings: dict[str, float]
) -> str:
    def med(setup: str, mode: str, key: str) -> float:
        values = [r[key] for r in runs[setup, mode] if r.get(key) is not None]
        return statistics.median(values) if values else float("nan")

    def us(value: float) -> str:
        return "-" if value != value else f"{value:.2f}"

    def total(setup: str, mode: str, unit: str) -> float:
        redis = med(setup, mode, f"redis_cpu_us_per_{unit}")
        return med(setup, mode, f"server_cpu_us_per_{unit}") + (0.0 if redis != redis else redis)

    lines = [
        f"Relays: 50 topics of 4 peers; paced at {settings['rate']:g} offers/s per peer, "
        f"flat out with 4 in flight per peer; medians of {rounds} rounds of "
        f"{settings['duration']:g} s.",
        "",
        "| load | setup | relays/s | rtt p50 (us) | rtt p99 (us) | servers' CPU | "
        "servers (us/relay) | Redis (us/relay) | total (us/relay) | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mode in MODES:
        for setup in SETUPS:
            lines.append(
                f"| {mode} | {setup} | {med(setup, mode, 'relays_per_s'):,.0f} "
                f"| {med(setup, mode, 'rtt_p50_us'):,.0f} | {med(setup, mode, 'rtt_p99_us'):,.0f} "
                f"| {med(setup, mode, 'server_cpu_share') * 100:.0f}% "
                f"| {us(med(setup, mode, 'server_cpu_us_per_relay'))} "
                f"| {us(med(setup, mode, 'redis_cpu_us_per_relay'))} "
                f"| {us(total(setup, mode, 'relay'))} "
                f"| {sum(r['errors_total'] for r in runs[setup, mode])} |"
            )
    lines += [
        "",
        f"Joins: {settings['joins']:g} connections, 100 at a time, over 100 topics, to one server.",
        "",
        "| setup | joins/s | join p99 (us) | server (us/join) | Redis (us/join) | failed |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for setup in JOIN_SETUPS:
        lines.append(
            f"| {setup} | {med(setup, 'joins', 'connections_per_s'):,.0f} "
            f"| {med(setup, 'joins', 'join_p99_us'):,.0f} "
            f"| {us(med(setup, 'joins', 'server_cpu_us_per_connection'))} "
            f"| {us(med(setup, 'joins', 'redis_cpu_us_per_connection'))} "
            f"| {sum(r['failed'] for r in runs[setup, 'joins'])} |"
        )
    paced = "paced"
    redis_relay = med("split", paced, "redis_cpu_us_per_relay")
    redis_join = med("one", "joins", "redis_cpu_us_per_connection")
    flat_split, flat_one, flat_two = (
        med(s, "flat out", "relays_per_s") for s in ("split", "one", "two")
    )
    crossing = total("split", paced, "relay")
    lines += [
        "",
        f"A cross-node relay costs {crossing / total('two', paced, 'relay'):.2f}x "
        "the CPU of a local one on the same two nodes, servers and Redis together, paced "
        f"({crossing / total('one', paced, 'relay'):.2f}x a local one on one node in "
        f"cluster mode, {crossing / total('alone', paced, 'relay'):.2f}x one without Redis).",
        f"One Redis core carries about {per_core(redis_relay)} cross-node relays/s "
        f"({us(redis_relay)} us each) or {per_core(redis_join)} joins/s "
        f"({us(redis_join)} us each).",
        f"Flat out on one shared core: split / two {flat_split / flat_two:.2f}x relays/s, "
        f"split / one server {flat_split / flat_one:.2f}x.",
    ]
    return "\n".join(lines)


def per_core(us: float) -> str:
    """How many a second one core carries at ``us`` microseconds each;
    "-" if the CPU time was too short to read (clock ticks of 10 ms)."""
    return f"{1e6 / us:,.0f}" if us > 0 else "-"


if __name__ == "__main__":
    sys.exit(main())
