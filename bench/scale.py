"""Scale: many idle peers held on one machine, and what they cost the rest.

    make bench-scale                      # 100,000 peers on --workers 6
    PEERS=20000 WORKERS=2 make bench-scale
    SERVER_ARGS="--ping-interval 3600" make bench-scale   # more server flags
    IDLE_PIDS=1 make bench-scale          # PID 1 at SCHED_IDLE meanwhile (root)

One server (``--workers WORKERS``, default 6) on CPU 0; the load on CPU 1:

1. ``before``: relays between PAIRS pairs (``signaling-bench relay``, a
   pair per topic, each peer sending RATE offers per second, each answered:
   a steady load far below what the server can take, so that the round
   trips show its latency, not its queues) for DURATION seconds, nothing
   else held;
2. PEERS idle peers joined by PROCESSES ``signaling-bench connect``
   processes (a process may hold at most its descriptor limit), from
   SOURCE_IPS loopback addresses (127.0.0.1 and up: each gives about 28,000
   ports towards the server's one), ten per topic, answering pings;
3. the server's RSS per idle peer: the growth of its processes' RSS from
   before the joins to when all have joined, over PEERS;
4. ``held``: the same relays while all are held;
5. ``joins``: 1,000 more connections joining while all are held.

Reports each relay phase's round-trip p50/p99/max, relays/s and server CPU
per relay, the RSS per idle peer, the joins' latency, what ended a held
peer early (nothing, in a good run), and how much CPU processes outside the
bench took while all were held (they lengthen the tail the bench sees;
IDLE_PIDS names processes to run at SCHED_IDLE, on a CPU only when nothing
else wants it, until the bench ends). The JSON lines and a summary go to
bench/results/scale-<time>/.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from common import BENCH_BIN, ROOT, log
from host import all_processes, others_cpu_s, process_tree, scheduled_idle, tree_rss_bytes

from testkit.processes import ServerProcess, free_port, pinned

SERVER = ROOT / ".venv" / "bin" / "signaling-sharded"
SERVER_CPU, LOAD_CPU = 0, 1
PEERS_PER_TOPIC = 10
EXTRA_JOINS = 1000


def setting(name: str, default: int) -> int:
    value = os.environ.get(name, str(default))
    if not value.isdigit() or int(value) < 1:
        raise SystemExit(f"{name} must be a positive whole number, not {value!r}")
    return int(value)


def idle_pids() -> list[int]:
    """IDLE_PIDS: processes outside the bench to run at SCHED_IDLE while it
    runs (space-separated pids)."""
    value = os.environ.get("IDLE_PIDS", "")
    pids = []
    for word in value.split():
        if not word.isdigit() or not Path(f"/proc/{word}").exists():
            raise SystemExit(f"IDLE_PIDS must name running processes, not {word!r}")
        pids.append(int(word))
    return pids


def peers_held(port: int) -> int:
    """``signaling_peers`` of the server's metrics: every worker's members."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    found = re.search(r"^signaling_peers (\d+)$", text, re.MULTILINE)
    return int(found.group(1)) if found else 0


def run_bench(args: list[str]) -> dict[str, Any]:
    done = subprocess.run(
        pinned(LOAD_CPU, [str(BENCH_BIN), *args]), capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"signaling-bench {args[0]} failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def relay(url: str, pid: int, pairs: int, rate: int, duration: float) -> dict[str, Any]:
    return run_bench(
        [
            "relay",
            "--url",
            url,
            "--server-pid",
            str(pid),
            "--topics",
            str(pairs),
            "--peers",
            "2",
            "--window",
            "4",
            "--rate",
            str(rate),
            "--duration",
            f"{duration:g}",
            "--warmup",
            "1",
        ]
    )


def hold(url: str, peers: int, processes: int, source_ips: int) -> list[subprocess.Popen[str]]:
    """Start the processes that join ``peers`` idle peers and hold them
    until their standard input closes."""
    share, rest = divmod(peers, processes)
    holders = []
    for index in range(processes):
        count = share + (1 if index < rest else 0)
        command = [str(BENCH_BIN), "connect", "--url", url, "--connections", str(count)]
        command += ["--topics", str(max(1, count // PEERS_PER_TOPIC)), "--concurrency", "100"]
        command += ["--source-ips", str(source_ips), "--hold-until-eof", "--join-timeout", "60"]
        holders.append(
            subprocess.Popen(
                pinned(LOAD_CPU, command),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return holders


def release(holders: list[subprocess.Popen[str]]) -> list[dict[str, Any]]:
    """Close the holders' input; their reports once they have closed their peers."""
    reports = []
    for proc in holders:
        out, err = proc.communicate(input="", timeout=120)
        if proc.returncode != 0:
            raise SystemExit(f"signaling-bench connect failed:\n{err}")
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return reports


def measure(folder: Path) -> dict[str, Any]:
    peers = setting("PEERS", 100_000)
    workers = setting("WORKERS", 6)
    processes = setting("PROCESSES", 6)
    pairs = setting("PAIRS", 100)
    rate = setting("RATE", 20)
    duration = float(setting("DURATION", 15))
    source_ips = setting("SOURCE_IPS", 8)
    port = free_port()
    command = [str(SERVER), "--workers", str(workers), "--host", "127.0.0.1"]
    command += ["--port", str(port), "--log-level", "warning"]
    command += shlex.split(os.environ.get("SERVER_ARGS", ""))
    server = ServerProcess(command, port, folder / "server.log", cpu=SERVER_CPU)
    try:
        server.wait_ready()
    except RuntimeError as exc:
        raise SystemExit(f"the server did not start: {exc}") from None
    url = f"ws://127.0.0.1:{port}"
    holders: list[subprocess.Popen[str]] = []
    try:
        log(f"before: {pairs} pairs relaying, {duration:g} s")
        before = relay(url, server.pid, pairs, rate, duration)
        rss_before = tree_rss_bytes(server.pid)
        log(f"joining {peers:,} idle peers from {processes} processes")
        started = time.monotonic()
        holders = hold(url, peers, processes, source_ips)
        while (held := peers_held(port)) < peers:
            if any(proc.poll() is not None for proc in holders):
                reports = release(holders)
                raise SystemExit(f"a holder ended with {held:,} peers held: {reports}")
            if time.monotonic() - started > 600:
                raise SystemExit(f"only {held:,} of {peers:,} peers joined in 600 s")
            time.sleep(0.5)
        joined_s = time.monotonic() - started
        time.sleep(2.0)  # the last joins' buffers settle
        rss_held = tree_rss_bytes(server.pid)
        log(f"all joined in {joined_s:.1f} s; held: {pairs} pairs relaying, {duration:g} s")
        ticks = all_processes()
        held_from = time.monotonic()
        during = relay(url, server.pid, pairs, rate, duration)
        ours = [os.getpid(), *process_tree(server.pid), *(proc.pid for proc in holders)]
        others = others_cpu_s(ticks, all_processes(), ours)
        others_elapsed = time.monotonic() - held_from
        log(f"joins: {EXTRA_JOINS} more while all are held")
        joins = run_bench(
            ["connect", "--url", url, "--connections", str(EXTRA_JOINS), "--concurrency", "50"]
        )
        still = peers_held(port)
        reports = release(holders)
        holders = []
    finally:
        for proc in holders:
            proc.kill()
        server.stop()
    ended: dict[str, int] = {}
    for report in reports:
        for kind, count in report["closed_while_held"].items():
            ended[kind] = ended.get(kind, 0) + count
    return {
        "scenario": "scale",
        "peers": peers,
        "workers": workers,
        "processes": processes,
        "source_ips": source_ips,
        "pairs": pairs,
        "rate_per_peer": rate,
        "duration_s": duration,
        "joined": sum(r["joined"] for r in reports),
        "join_failed": sum(r["failed"] for r in reports),
        "join_s": round(joined_s, 1),
        "held_at_the_end": still,
        "ended_while_held": ended,
        "pongs_sent": sum(r["pongs_sent"] for r in reports),
        "rss_before_bytes": rss_before,
        "rss_held_bytes": rss_held,
        "rss_per_idle_peer_bytes": round((rss_held - rss_before) / peers, 1),
        "before": before,
        "held": during,
        # What processes outside the bench took while all were held: on
        # the machine these figures come from, its init (PID 1) spent CPU in
        # proportion to the sockets open, in bursts (docs/performance.md).
        "held_others_cpu_share": round(sum(s for _, s in others) / others_elapsed, 4),
        "held_busiest_other": (
            {"pid": others[0][0], "cpu_share": round(others[0][1] / others_elapsed, 4)}
            if others
            else None
        ),
        "joins": joins,
    }


def summary(result: dict[str, Any]) -> str:
    before, held, joins = result["before"], result["held"], result["joins"]
    lines = [
        f"{result['joined']:,} of {result['peers']:,} idle peers held on "
        f"--workers {result['workers']} (joined in {result['join_s']} s); "
        f"ended early: {result['ended_while_held'] or 'none'}",
        f"server RSS per idle peer: {result['rss_per_idle_peer_bytes']:,.0f} B "
        f"({result['rss_per_idle_peer_bytes'] / 1024:.2f} KiB)",
        "",
        f"| {result['pairs']} pairs, {result['rate_per_peer']} offers/s per peer | relays/s "
        "| rtt p50 | rtt p99 | rtt max | server CPU per relay | errors, skipped |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, run in (("nothing else held", before), ("all held", held)):
        lines.append(
            f"| {name} | {run['relays_per_s']:,.0f} | {run['rtt_p50_us'] / 1000:.2f} ms "
            f"| {run['rtt_p99_us'] / 1000:.2f} ms | {run['rtt_max_us'] / 1000:.1f} ms "
            f"| {run['server_cpu_us_per_relay']:.2f} µs | {run['errors_total']}, "
            f"{run['skipped']} |"
        )
    busiest = result["held_busiest_other"]
    lines += [
        "",
        f"other processes while all were held: {result['held_others_cpu_share']:.1%} of a CPU"
        + (f" (busiest: pid {busiest['pid']}, {busiest['cpu_share']:.1%})" if busiest else ""),
        "",
        f"{EXTRA_JOINS} joins while all are held: {joins['joined']} joined, "
        f"{joins['failed']} failed, p50 {joins['join_p50_us'] / 1000:.1f} ms, "
        f"p99 {joins['join_p99_us'] / 1000:.1f} ms",
    ]
    return "\n".join(lines)


def main() -> int:
    out = ROOT / "bench" / "results" / f"scale-{time.strftime('%Y%m%d-%H%M%S')}"
    idle = idle_pids()
    with tempfile.TemporaryDirectory() as scratch, scheduled_idle(idle):
        result = measure(Path(scratch))
    result["idle_pids"] = idle
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps(result) + "\n")
    text = summary(result)
    (out / "summary.md").write_text(text + "\n")
    print(text)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
