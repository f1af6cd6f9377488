"""Resume: relays to sessions whose connections are cut at random.

    make bench-resume              # 30 s, 1 worker
    DURATION=10 WORKERS=4 make bench-resume
    SERVERS=2 make bench-resume    # two servers in cluster mode on a fresh Redis

Starts `signaling-sharded` on CPU 0 with a short ping (1 s, timeout 1 s)
so that some blackholed connections are found dead by ping before their
client comes back, and runs `signaling-bench resume` on CPU 1: 50 pairs,
each a sender relaying every 5 ms to a receiver whose connection is cut
every 0.5 s on average (a reset, or a blackhole held up to 3 s). Reports
the relays lost and duplicated (both must be 0: the run fails otherwise),
the resume latency. With SERVERS=2 the servers (and Redis, all on CPU 0)
form a cluster and every connection picks one at random, so most resumes
move their session to the other server. Then, on a fresh server, 5,000 sessions are suspended
(opened and reset in batches of 100) to measure what one costs in server
memory, and resumed to measure a connected one. Results go to bench/results/resume-<time>/.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from cluster import start_redis
from common import BENCH_BIN, READY_TIMEOUT_S, ROOT

from testkit.processes import ServerProcess, free_port, pinned

SERVER = ROOT / ".venv" / "bin" / "signaling-sharded"
SERVER_CPU, LOAD_CPU = 0, 1
SERVER_ARGS = ("--ping-interval", "1", "--ping-timeout", "1", "--log-level", "warning")
RESUME_ARGS = ("--pairs", "50", "--interval-ms", "5", "--cut-every-ms", "500")
MEMORY_ARGS = ["--pairs", "0", "--duration", "0", "--suspended", "5000"]
CLUSTER_LINK = "signaling_worker_cluster_connected{"
MUST_BE_ZERO = ("lost", "duplicated", "unfinished", "errors_total", "presence_seen_by_senders")


def cluster_ready(port: int, workers: int) -> bool:
    """Whether every worker of the server on ``port`` is linked to Redis."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as answer:
            text = answer.read().decode()
    except OSError:
        return False
    linked = [line for line in text.splitlines() if line.startswith(CLUSTER_LINK)]
    return len(linked) == workers and all(line.endswith(" 1") for line in linked)


def run(workers: str, args: list[str], out: Path, name: str, servers: int = 1) -> dict[str, Any]:
    """Fresh servers (``servers`` > 1: a cluster on a fresh Redis, sharing
    one resume secret), one `signaling-bench resume` run against them; its
    clients pick a server at random for every connection."""
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        extra: list[str] = []
        redis = None
        if servers > 1:
            redis = start_redis(folder)
            extra = ["--redis", redis.url, "--resume-secret", secrets.token_hex(16)]
        started: list[ServerProcess] = []
        try:
            for n in range(servers):
                port = free_port()
                command = [str(SERVER), "--workers", workers, "--port", str(port)]
                command += ["--host", "127.0.0.1", *SERVER_ARGS, *extra]
                server = ServerProcess(command, port, folder / f"server-{n}.log", cpu=SERVER_CPU)
                started.append(server)
                try:
                    server.wait_ready()
                except RuntimeError as exc:
                    raise SystemExit(f"the server did not start: {exc}") from None
                deadline = time.monotonic() + READY_TIMEOUT_S
                while redis and not cluster_ready(port, int(workers)):
                    if time.monotonic() > deadline:
                        raise SystemExit("the server did not link to Redis")
                    time.sleep(0.05)
            bench = [str(BENCH_BIN), "resume", *args, "--server-pid", str(started[0].pid)]
            for server in started:
                bench += ["--url", f"ws://127.0.0.1:{server.port}"]
            done = subprocess.run(
                pinned(LOAD_CPU, bench), capture_output=True, text=True, check=False
            )
        finally:
            for n, server in enumerate(started):
                server.stop()
                (out / f"{name}-server-{n}.log").write_text(server.output())
            if redis is not None:
                redis.stop()
    (out / f"{name}.txt").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"signaling-bench failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    duration = float(os.environ.get("DURATION", "30"))
    workers = os.environ.get("WORKERS", "1")
    servers = int(os.environ.get("SERVERS", "1"))
    out = ROOT / "bench" / "results" / f"resume-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    cuts = [*RESUME_ARGS, "--duration", f"{duration:g}", "--suspended", "0"]
    result = run(workers, cuts, out, "cuts", servers)
    # Memory on a fresh server, which has no freed memory to reuse.
    memory = run(workers, MEMORY_ARGS, out, "memory")["memory"]
    where = f", {servers} servers in cluster mode" if servers > 1 else ""
    lines = [
        f"signaling-sharded --workers {workers}{where}, {result['pairs']} pairs, "
        f"{result['duration_s']:g} s",
        "",
        "| | |",
        "|---|---:|",
        f"| relays sent | {result['relays_sent']:,} |",
        f"| lost | {result['lost']} |",
        f"| duplicated | {result['duplicated']} |",
        f"| dropped (queue full) | {result['dropped']} |",
        f"| cuts: resets | {result['resets']:,} |",
        f"| cuts: blackholes | {result['blackholes']:,} "
        f"({', '.join(f'{k} {v}' for k, v in result['blackholes_ended'].items())}) |",
        f"| resumes (on another server) | {result['resumes']:,} ({result['resumes_moved']:,}) |",
        f"| resume latency p50 / p99 / max | {result['resume_p50_us'] / 1000:.2f} / "
        f"{result['resume_p99_us'] / 1000:.2f} / {result['resume_max_us'] / 1000:.2f} ms |",
        f"| presence events the senders saw | {result['presence_seen_by_senders']} |",
        f"| server RSS per suspended session ({memory['sessions']:,}) "
        f"| {memory['bytes_per_suspended']:,.0f} B |",
        f"| server RSS per connected session, after their resume "
        f"| {memory['bytes_per_connected']:,.0f} B |",
    ]
    failures = [key for key in MUST_BE_ZERO if result.get(key) != 0]
    if memory["resumed"] != memory["sessions"]:
        failures.append("memory: not every suspended session resumed")
    lines += ["", *(f"FAIL {key}: {result.get(key)}" for key in failures)]
    lines.append("PASS" if not failures else "")
    text = "\n".join(lines)
    (out / "summary.md").write_text(text + "\n")
    print(text)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
