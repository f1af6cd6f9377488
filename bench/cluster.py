"""Cluster mode: relays/s of topics split over two servers vs one server.

    make bench-cluster             # 3 rounds of 10 s per setup
    ROUNDS=1 make bench-cluster

Setups, each measured with `signaling-bench relay` (peers of a topic
alternate between the servers given):

- ``alone``: one server without Redis (the single-machine default);
- ``one``: one server in cluster mode, every peer on it (relays stay in the
  process; Redis only sees joins and leaves);
- ``split``: two servers in cluster mode, each topic's peers alternating
  between them, so every relay crosses Redis.

Every server has one worker. Servers and Redis share CPU 0, the load
generator has CPU 1, so the setups are compared on the same core budget.
Reports relays/s, round-trip percentiles, the servers' and Redis' CPU; the
JSON lines go to bench/results/cluster-<time>/.
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
RELAY_ARGS = ("--topics", "50", "--peers", "4", "--window", "4", "--warmup", "2")
SETUPS = ("alone", "one", "split")
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


def measure(setup: str, duration: float, folder: Path) -> dict[str, Any]:
    redis = start_redis(folder) if setup != "alone" else None
    servers = []
    try:
        count = 2 if setup == "split" else 1
        for _ in range(count):
            servers.append(start_server(redis.url if redis else None, folder))
        command = [str(BENCH_BIN), "relay", *RELAY_ARGS, "--duration", f"{duration:g}"]
        for server in servers:
            command += ["--url", f"ws://127.0.0.1:{server.port}", "--server-pid", str(server.pid)]
        if redis is not None and redis.proc is not None:
            command += ["--redis-pid", str(redis.proc.pid)]
        done = subprocess.run(
            pinned(LOAD_CPU, command), capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise SystemExit(f"signaling-bench failed:\n{done.stderr}")
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        result["setup"] = setup
        return result
    finally:
        for server in servers:
            server.stop()
        if redis is not None:
            redis.stop()


def main() -> int:
    rounds = int(os.environ.get("ROUNDS", "3"))
    duration = float(os.environ.get("DURATION", "10"))
    out = ROOT / "bench" / "results" / f"cluster-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict[str, Any]]] = {setup: [] for setup in SETUPS}
    with tempfile.TemporaryDirectory() as scratch:
        for round_ in range(rounds):
            for setup in SETUPS:
                result = measure(setup, duration, Path(scratch))
                runs[setup].append(result)
                with (out / "runs.jsonl").open("a") as jsonl:
                    jsonl.write(json.dumps(result) + "\n")
                print(
                    f"round {round_ + 1} {setup:5}: {result['relays_per_s']:>9,.0f} relays/s, "
                    f"errors {result['errors_total']}",
                    file=sys.stderr,
                )

    def med(setup: str, key: str) -> float:
        values = [r[key] for r in runs[setup] if r.get(key) is not None]
        return statistics.median(values) if values else float("nan")

    lines = [
        "| setup | relays/s | rtt p50 (us) | rtt p99 (us) | servers' CPU | Redis CPU | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for setup in SETUPS:
        redis = med(setup, "redis_cpu_share")
        lines.append(
            f"| {setup} | {med(setup, 'relays_per_s'):,.0f} | {med(setup, 'rtt_p50_us'):,.0f} "
            f"| {med(setup, 'rtt_p99_us'):,.0f} | {med(setup, 'server_cpu_share') * 100:.0f}% "
            f"| {'-' if redis != redis else f'{redis * 100:.0f}%'} "
            f"| {sum(r['errors_total'] for r in runs[setup])} |"
        )
    split, one = med("split", "relays_per_s"), med("one", "relays_per_s")
    lines.append("")
    lines.append(f"split / one server: {split / one:.2f}x relays/s (medians of {rounds} rounds)")
    text = "\n".join(lines)
    (out / "summary.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
