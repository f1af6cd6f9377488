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

from run import BENCH_BIN, ROOT, free_port, healthy

SERVER = ROOT / ".venv" / "bin" / "signaling-sharded"
RELAY_ARGS = ("--topics", "50", "--peers", "4", "--window", "4", "--warmup", "2")
SETUPS = ("alone", "one", "split")


def pinned(cpu: int, command: list[str]) -> list[str]:
    return ["taskset", "-c", str(cpu), *command] if shutil.which("taskset") else command


class Redis:
    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--save", "", "--appendonly", "no", "--dir", str(folder)]
        self.proc = subprocess.Popen(pinned(0, command), stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not self.answers():
            if time.monotonic() > deadline:
                raise SystemExit("redis-server did not start")
            time.sleep(0.05)

    def answers(self) -> bool:
        ping = ["redis-cli", "-p", str(self.port), "ping"]
        return subprocess.run(ping, capture_output=True, text=True).stdout.strip() == "PONG"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def start_server(redis_url: str | None, log: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    command = [str(SERVER), "--workers", "1", "--port", str(port), "--host", "127.0.0.1"]
    command += ["--log-level", "warning"]
    if redis_url is not None:
        command += ["--redis", redis_url]
    proc = subprocess.Popen(pinned(0, command), stdout=log.open("ab"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while not healthy(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the server did not start; see {log}")
        time.sleep(0.05)
    time.sleep(1.0)  # cluster mode: the worker connects to Redis after it listens
    return proc, port


def measure(setup: str, duration: float, folder: Path) -> dict[str, Any]:
    redis = Redis(folder) if setup != "alone" else None
    servers = []
    try:
        count = 2 if setup == "split" else 1
        for _ in range(count):
            servers.append(start_server(redis.url if redis else None, folder / "servers.log"))
        command = [str(BENCH_BIN), "relay", *RELAY_ARGS, "--duration", f"{duration:g}"]
        for proc, port in servers:
            command += ["--url", f"ws://127.0.0.1:{port}", "--server-pid", str(proc.pid)]
        if redis is not None:
            command += ["--redis-pid", str(redis.proc.pid)]
        done = subprocess.run(pinned(1, command), capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"signaling-bench failed:\n{done.stderr}")
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        result["setup"] = setup
        return result
    finally:
        for proc, _ in servers:
            proc.terminate()
            proc.wait()
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
