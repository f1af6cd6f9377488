#!/usr/bin/env python3
"""Benchmark signaling-sharded against the original Go design (the seed).

Every scenario of signaling-bench (relay, connect, churn, fanout) runs against
both servers, interleaved -- seed, ours, seed, ours, ... -- for several rounds.
Each run starts a fresh server pinned to one CPU (taskset) while the load
generator runs pinned to another, so that the two never compete for a core.
The relay scenario is a sweep over the number of offers each peer keeps in
flight (the window); the headline figures are read at window 4.

A run in which something else used the server's or the load generator's core
(other processes, or time stolen by the hypervisor) for more than 10 % of the
wall time is marked disturbed and repeated, up to --retries times; the least
disturbed attempt is kept.

After the rounds, one more relay run per server counts the server's system
calls (with `perf stat`, or from /proc/PID/io when perf is not available).

Results go to bench/results/<time>/: the JSON lines of signaling-bench
(seed.jsonl, ours.jsonl), every attempt with its host figures (runs.jsonl),
server logs, summary.md and summary.json (medians per server and ratios
ours/seed), and relay.png, which a full run also copies to docs/relay.png.

Usage: bench/run.py [--quick] [--rounds N] [--only relay,connect,...]
Environment: ROUNDS, BENCH_QUICK=1, SEED_DIR (the Go design's source),
SEED_BIN (a prebuilt Go binary), OURS_CMD (how to start our server).
Build first: `make build` and `cargo build --release -p signaling-bench`
(`make bench` does both and then runs this script).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH_BIN = ROOT / "target" / "release" / "signaling-bench"
SERVERS = ("seed", "ours")
NAMES = {"seed": "Go design (seed)", "ours": "signaling-sharded, 1 worker"}
SCENARIOS = ("relay", "connect", "churn", "fanout")
DISTURBED_SHARE = 0.10
"""Share of the wall time that others may use on a measured core before a run is repeated."""
READY_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
TICKS_PER_S = os.sysconf("SC_CLK_TCK")

Result = dict[str, Any]
Key = str | Callable[[Result], Any]
"""A field of a result, or a function of it."""


@dataclass(frozen=True)
class Params:
    """Scenario parameters; the defaults suit a 2-core machine (about 10 minutes at 3 rounds)."""

    topics: int = 10
    peers: int = 4
    windows: tuple[int, ...] = (1, 2, 4, 8)
    window: int = 4
    """The window at which the relay targets are read."""
    payload_bytes: int = 200
    relay_duration_s: float = 10.0
    relay_warmup_s: float = 2.0
    connections: int = 3000
    connect_concurrency: int = 100
    connect_topics: int = 300
    churn_duration_s: float = 10.0
    churn_clients: int = 50
    churn_topics: int = 10
    fanout_peers: int = 1000
    fanout_timeout_s: float = 30.0
    syscall_duration_s: float = 5.0


QUICK = Params(
    relay_duration_s=2.0,
    relay_warmup_s=1.0,
    connections=500,
    churn_duration_s=3.0,
    fanout_peers=200,
    fanout_timeout_s=10.0,
    syscall_duration_s=2.0,
)


@dataclass(frozen=True)
class Step:
    """One scenario configuration, run once per server and round."""

    scenario: str
    label: str
    args: tuple[str, ...]
    budget_s: float
    """Expected wall time; the run is abandoned at this plus a margin."""


def relay_args(p: Params, window: int, duration: float, warmup: float) -> tuple[str, ...]:
    return (
        f"--topics={p.topics}",
        f"--peers={p.peers}",
        f"--window={window}",
        f"--duration={duration:g}",
        f"--warmup={warmup:g}",
        f"--payload-bytes={p.payload_bytes}",
    )


def plan(p: Params, scenarios: Sequence[str]) -> list[Step]:
    steps: list[Step] = []
    if "relay" in scenarios:
        for w in p.windows:
            args = relay_args(p, w, p.relay_duration_s, p.relay_warmup_s)
            budget = p.relay_duration_s + p.relay_warmup_s
            steps.append(Step("relay", f"relay-w{w}", args, budget))
    if "connect" in scenarios:
        args = (
            f"--connections={p.connections}",
            f"--concurrency={p.connect_concurrency}",
            f"--topics={p.connect_topics}",
        )
        steps.append(Step("connect", "connect", args, 30.0))
    if "churn" in scenarios:
        args = (
            f"--duration={p.churn_duration_s:g}",
            f"--clients={p.churn_clients}",
            f"--topics={p.churn_topics}",
        )
        steps.append(Step("churn", "churn", args, p.churn_duration_s + 20.0))
    if "fanout" in scenarios:
        args = (f"--peers={p.fanout_peers}", f"--timeout={p.fanout_timeout_s:g}")
        steps.append(Step("fanout", "fanout", args, p.fanout_timeout_s + 10.0))
    return steps


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


# --- host accounting -----------------------------------------------------------------------


def proc_stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name, starting with `state`."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()


def process_tree(root: int) -> list[int]:
    """*root* and all of its descendants."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = proc_stat_fields(int(entry.name))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree = [root]
    for pid in tree:
        tree.extend(children.get(pid, []))
    return tree


def tree_cpu_s(pids: Sequence[int]) -> float:
    """User plus system CPU time of these processes."""
    ticks = 0
    for pid in pids:
        fields = proc_stat_fields(pid)
        if fields is not None:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / TICKS_PER_S


def tree_io_syscalls(pids: Sequence[int]) -> int:
    """Read- and write-class system calls of these processes (syscr + syscw of /proc/PID/io)."""
    total = 0
    for pid in pids:
        try:
            lines = Path(f"/proc/{pid}/io").read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            name, _, value = line.partition(":")
            if name in ("syscr", "syscw"):
                total += int(value)
    return total


def core_times_s(cpu: int) -> tuple[float, float]:
    """(busy, stolen) seconds of one CPU: user, nice, system, irq and softirq; and steal."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{cpu} "):
                v = [int(x) for x in line.split()[1:]] + [0] * 8
                return (v[0] + v[1] + v[2] + v[5] + v[6]) / TICKS_PER_S, v[7] / TICKS_PER_S
    return 0.0, 0.0


def kernel_threads_cpu_s() -> float:
    """CPU time of kernel threads (kworkers, ksoftirqd, ...), which the load itself causes."""
    ticks = 0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = proc_stat_fields(int(entry.name))
            if fields is not None and (fields[1] == "2" or entry.name == "2"):
                ticks += int(fields[11]) + int(fields[12])
    return ticks / TICKS_PER_S


def rusage_s(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Snapshot:
    """CPU counters sampled before and after the load generator runs."""

    server_core: tuple[float, float]
    client_core: tuple[float, float]
    server_tree: float
    children: float
    own: float
    kernel: float

    @classmethod
    def take(cls, server_cpu: int, client_cpu: int, pids: Sequence[int]) -> Snapshot:
        return cls(
            core_times_s(server_cpu),
            core_times_s(client_cpu),
            tree_cpu_s(pids),
            rusage_s(resource.RUSAGE_CHILDREN),
            rusage_s(resource.RUSAGE_SELF),
            kernel_threads_cpu_s(),
        )


def foreign_shares(
    before: Snapshot, after: Snapshot, elapsed: float, same_core: bool
) -> tuple[float, float]:
    """Shares of the wall time that others used on the server's and the client's core.

    Others are user processes other than the server, the load generator and this
    script, plus time stolen by the hypervisor. Kernel threads do work the load
    causes (network softirqs, socket teardown), so they do not count; as they
    are not tied to one core, their time is taken off both cores.
    """
    server = after.server_tree - before.server_tree
    client = (after.children - before.children) + (after.own - before.own)
    kernel = after.kernel - before.kernel
    busy_s = after.server_core[0] - before.server_core[0]
    steal_s = after.server_core[1] - before.server_core[1]
    busy_c = after.client_core[0] - before.client_core[0]
    steal_c = after.client_core[1] - before.client_core[1]
    if same_core:
        other = max(0.0, busy_s - server - client - kernel) + steal_s
        return other / elapsed, other / elapsed
    other_s = max(0.0, busy_s - server - kernel) + steal_s
    other_c = max(0.0, busy_c - client - kernel) + steal_c
    return other_s / elapsed, other_c / elapsed


# --- servers -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def healthy(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1.0)
    try:
        conn.request("GET", "/healthz")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


class Server:
    """A server process pinned to one CPU, its output going to *log_path*."""

    def __init__(
        self, command: Sequence[str], env: dict[str, str], port: int, cpu: int, log_path: Path
    ) -> None:
        self.port = port
        self.log_path = log_path
        with log_path.open("wb") as out:
            self.proc = subprocess.Popen(
                ["taskset", "-c", str(cpu), *command],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited with {self.proc.returncode}\n{self.tail()}")
            if healthy(self.port):
                return
            time.sleep(0.05)
        raise RuntimeError(f"not healthy after {READY_TIMEOUT_S:g} s\n{self.tail()}")

    def tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self) -> None:
        """SIGTERM, then SIGKILL to its process group if it is still there after a while."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log(f"pid {self.pid} ignored SIGTERM for {STOP_TIMEOUT_S:g} s; killing it")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)  # workers left behind, if any
        self.proc.wait()


# --- runs ----------------------------------------------------------------------------------


@dataclass
class Run:
    server: str
    step: Step
    round: int
    attempt: int
    result: Result | None
    elapsed_s: float
    other_share_server_core: float
    other_share_client_core: float
    log: str
    error: str = ""
    chosen: bool = False

    @property
    def ok(self) -> bool:
        return self.result is not None

    @property
    def disturbance(self) -> float:
        return max(self.other_share_server_core, self.other_share_client_core)

    @property
    def disturbed(self) -> bool:
        return self.disturbance > DISTURBED_SHARE

    def record(self) -> dict[str, Any]:
        return {
            "server": self.server,
            "scenario": self.step.scenario,
            "label": self.step.label,
            "round": self.round,
            "attempt": self.attempt,
            "chosen": self.chosen,
            "elapsed_s": round(self.elapsed_s, 3),
            "other_share_server_core": round(self.other_share_server_core, 3),
            "other_share_client_core": round(self.other_share_client_core, 3),
            "disturbed": self.disturbed,
            "log": self.log,
            "error": self.error,
            "result": self.result,
        }


def ms(us: float | None) -> str:
    return "-" if us is None else f"{us / 1000:.1f} ms"


def headline(result: Result) -> str:
    """A few figures of one run for the progress log."""
    s = result["scenario"]
    if s == "relay":
        return (
            f"{result['relays_per_s']:.0f} relays/s, p99 {ms(result['rtt_p99_us'])}, "
            f"server {result.get('server_cpu_us_per_relay')} us/relay, "
            f"cpu share server {result.get('server_cpu_share')} "
            f"client {result.get('client_cpu_share')}"
        )
    if s == "connect":
        return (
            f"{result['joined']}/{result['connections']} joined, "
            f"{result['connections_per_s']:.0f}/s, "
            f"{result.get('rss_per_connection_bytes')} B/connection"
        )
    if s == "churn":
        return (
            f"{result['joins_per_s']:.0f} joins/s, ghosts {result['ghosts']}, "
            f"inconsistent views {result['inconsistent_views']}"
        )
    return (
        f"{result['exact_views']}/{result['peers']} exact views, "
        f"full view after {result['all_complete_s']} s, {result['disconnected']} disconnected"
    )


@dataclass
class Bench:
    params: Params
    rounds: int
    retries: int
    server_cpu: int
    client_cpu: int
    seed_bin: Path
    ours_cmd: list[str]
    out: Path
    perf: str | None
    meta: dict[str, str] = field(default_factory=dict)
    runs: list[Run] = field(default_factory=list)
    servers: list[Server] = field(default_factory=list)

    @property
    def logs(self) -> Path:
        return self.out / "logs"

    def start_server(self, name: str, port: int, log_path: Path) -> Server:
        env = dict(os.environ)
        if name == "seed":
            env.update(PORT=str(port), GOMAXPROCS="1")
            command: list[str] = [str(self.seed_bin)]
        else:
            command = [*self.ours_cmd, "--host", "127.0.0.1", "--port", str(port)]
        server = Server(command, env, port, self.server_cpu, log_path)
        self.servers.append(server)
        return server

    def stop_server(self, server: Server) -> None:
        server.stop()
        self.servers.remove(server)

    def stop_all(self) -> None:
        for server in list(self.servers):
            self.stop_server(server)

    def bench_command(self, scenario: str, port: int, args: Sequence[str], pid: int) -> list[str]:
        return [
            "taskset",
            "-c",
            str(self.client_cpu),
            str(BENCH_BIN),
            scenario,
            f"--url=ws://127.0.0.1:{port}",
            *args,
            f"--server-pid={pid}",
        ]

    def run_once(self, name: str, step: Step, rnd: int, attempt: int) -> Run:
        stem = f"{name}-{step.label}-r{rnd}" + (f"-a{attempt}" if attempt > 1 else "")
        port = free_port()
        server = self.start_server(name, port, self.logs / f"{stem}.log")
        run = Run(name, step, rnd, attempt, None, 0.0, 0.0, 0.0, f"logs/{stem}.log")
        try:
            server.wait_ready()
            pids = process_tree(server.pid)
            command = self.bench_command(step.scenario, port, step.args, server.pid)
            before = Snapshot.take(self.server_cpu, self.client_cpu, pids)
            t0 = time.monotonic()
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=step.budget_s + 120
            )
            run.elapsed_s = time.monotonic() - t0
            after = Snapshot.take(self.server_cpu, self.client_cpu, pids)
            same = self.server_cpu == self.client_cpu
            shares = foreign_shares(before, after, run.elapsed_s, same)
            run.other_share_server_core, run.other_share_client_core = shares
            (self.logs / f"{stem}.bench.txt").write_text(done.stderr)
            lines = [line for line in done.stdout.splitlines() if line.strip()]
            if done.returncode != 0 or not lines:
                run.error = f"signaling-bench exited with {done.returncode}: {done.stderr[-2000:]}"
            else:
                run.result = json.loads(lines[-1])
        except (RuntimeError, subprocess.TimeoutExpired, ValueError) as err:
            run.error = f"{type(err).__name__}: {err}"
        finally:
            self.stop_server(server)
        return run

    def run_step(self, name: str, step: Step, rnd: int) -> Run:
        attempts: list[Run] = []
        for attempt in range(1, self.retries + 2):
            run = self.run_once(name, step, rnd, attempt)
            attempts.append(run)
            where = f"round {rnd}/{self.rounds} {step.label} {name}"
            others = (
                f"others used {run.other_share_server_core:.0%} of the server core, "
                f"{run.other_share_client_core:.0%} of the client core"
            )
            if run.result is None:
                log(f"{where}: FAILED: {run.error.strip()}")
            else:
                flag = " DISTURBED" if run.disturbed else ""
                log(f"{where}: {headline(run.result)} [{others}]{flag}")
            if run.ok and not run.disturbed:
                break
            if attempt <= self.retries:
                log(f"{where}: again")
                time.sleep(2.0)
        best = min(attempts, key=lambda r: (not r.ok, r.disturbance))
        best.chosen = True
        self.runs.extend(attempts)
        with (self.out / "runs.jsonl").open("a") as f:
            for run in attempts:
                f.write(json.dumps(run.record()) + "\n")
        if best.result is not None:
            with (self.out / f"{name}.jsonl").open("a") as f:
                f.write(json.dumps(best.result) + "\n")
        return best

    def measure_syscalls(self, name: str) -> dict[str, Any]:
        """One relay run at the headline window, counting the server's system calls.

        Without warmup, so that the count covers exactly the relays of the measured
        window plus the few calls that set up and tear down 40 connections.
        """
        p = self.params
        args = relay_args(p, p.window, p.syscall_duration_s, 0.0)
        port = free_port()
        server = self.start_server(name, port, self.logs / f"{name}-syscalls.log")
        out: dict[str, Any] = {"server": name}
        perf_out = self.logs / f"{name}-syscalls.perf.txt"
        try:
            server.wait_ready()
            pids = process_tree(server.pid)
            io_before = tree_io_syscalls(pids)
            perf = None
            if self.perf:
                perf = subprocess.Popen(
                    [
                        "taskset",
                        "-c",
                        str(self.client_cpu),
                        self.perf,
                        "stat",
                        "-x,",
                        "-e",
                        "raw_syscalls:sys_enter",
                        "-p",
                        ",".join(map(str, pids)),
                        "-o",
                        str(perf_out),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                time.sleep(0.5)  # attached
            command = self.bench_command("relay", port, args, server.pid)
            done = subprocess.run(command, capture_output=True, text=True, timeout=120)
            io_after = tree_io_syscalls(pids)
            if perf is not None:
                perf.send_signal(signal.SIGINT)
                perf.wait(10)
            (self.logs / f"{name}-syscalls.bench.txt").write_text(done.stderr)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            relays = result["relays"]
            out.update(relays=relays, relays_per_s=result["relays_per_s"])
            out["read_write_syscalls"] = io_after - io_before
            out["read_write_syscalls_per_relay"] = (io_after - io_before) / relays
            count = parse_perf(perf_out) if perf is not None else None
            if count is not None:
                out.update(syscalls=count, syscalls_per_relay=count / relays)
            log(
                f"syscalls {name}: {out.get('syscalls_per_relay', float('nan')):.3f} per relay "
                f"(read/write class {out['read_write_syscalls_per_relay']:.3f}) "
                f"over {relays} relays"
            )
        except (RuntimeError, subprocess.TimeoutExpired, ValueError, IndexError, KeyError) as err:
            out["error"] = f"{type(err).__name__}: {err}"
            log(f"syscalls {name}: FAILED: {out['error']}")
        finally:
            self.stop_server(server)
        return out


def parse_perf(path: Path) -> int | None:
    """The count of `perf stat -x,` output, or None if it was not counted."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line and not line.startswith("#"):
            first = line.split(",")[0].strip()
            if first.isdigit():
                return int(first)
    return None


# --- summary -------------------------------------------------------------------------------


def results(runs: Sequence[Run], server: str, label: str) -> list[Result]:
    return [
        r.result
        for r in runs
        if r.chosen and r.server == server and r.step.label == label and r.result is not None
    ]


def values(rows: Sequence[Result], key: Key) -> list[float]:
    found = [key(r) if callable(key) else r.get(key) for r in rows]
    return [float(v) for v in found if isinstance(v, (int, float))]


def median(rows: Sequence[Result], key: Key) -> float | None:
    v = values(rows, key)
    return statistics.median(v) if v else None


def worst(rows: Sequence[Result], key: str, lowest: bool = False) -> float | None:
    v = values(rows, key)
    if not v:
        return None
    return min(v) if lowest else max(v)


def fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def ratio(ours: float | None, seed: float | None) -> float | None:
    if ours is None or seed is None or seed == 0:
        return None
    return ours / seed


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    align = ["---"] + ["---:"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def problems(r: Result) -> int:
    return int(r.get("errors_total", 0)) + int(r.get("timeouts", 0)) + int(r.get("disconnects", 0))


Metric = tuple[str, Key, int, str]
"""(label, key, decimals, aggregate: median, max or min)."""


@dataclass
class Summary:
    bench: Bench
    syscalls: dict[str, dict[str, Any]]
    markdown: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def rows(self, label: str) -> tuple[list[Result], list[Result]]:
        runs = self.bench.runs
        return results(runs, "seed", label), results(runs, "ours", label)

    def section(self, title: str, label: str, metrics: Sequence[Metric]) -> None:
        seed, ours = self.rows(label)
        if not seed and not ours:
            return
        rows = []
        data: dict[str, Any] = {"runs": {"seed": len(seed), "ours": len(ours)}}
        for name, key, digits, agg in metrics:
            if agg == "median":
                s, o = median(seed, key), median(ours, key)
            else:
                assert isinstance(key, str)
                s, o = worst(seed, key, agg == "min"), worst(ours, key, agg == "min")
            q = ratio(o, s) if agg == "median" else None  # no ratio of counts
            shown = name if agg == "median" else f"{name} ({agg} of runs)"
            rows.append([shown, fmt(s, digits), fmt(o, digits), fmt(q, 3)])
            data[name] = {"seed": s, "ours": o, "ratio": q}
        self.data[label] = data
        self.markdown += [f"## {title}", "", table(["", "seed", "ours", "ours/seed"], rows), ""]

    def build(self) -> None:
        b, p = self.bench, self.bench.params
        w = f"relay-w{p.window}"
        if self.rows(w) != ([], []):
            title = (
                f"relay: {p.topics} topics x {p.peers} peers, window {p.window}, "
                f"{p.payload_bytes} B payload, {p.relay_duration_s:g} s after "
                f"{p.relay_warmup_s:g} s warmup"
            )
            self.section(
                title,
                w,
                [
                    ("relays/s", "relays_per_s", 0, "median"),
                    ("round-trip p50 (µs)", "rtt_p50_us", 0, "median"),
                    ("round-trip p99 (µs)", "rtt_p99_us", 0, "median"),
                    ("server CPU per relayed message (µs)", "server_cpu_us_per_relay", 3, "median"),
                    ("server CPU share", "server_cpu_share", 3, "median"),
                    ("load generator CPU share", "client_cpu_share", 3, "median"),
                    ("errors + timeouts + disconnects", problems, 0, "median"),
                ],
            )
            self.syscall_rows()
            self.sweep()
        self.section(
            f"connect: {p.connections} connections, {p.connect_concurrency} at a time, "
            f"over {p.connect_topics} topics",
            "connect",
            [
                ("connections/s", "connections_per_s", 0, "median"),
                ("join p50 (µs)", "join_p50_us", 0, "median"),
                ("join p99 (µs)", "join_p99_us", 0, "median"),
                ("RSS per idle connection (B)", "rss_per_connection_bytes", 0, "median"),
                ("server CPU per connection (µs)", "server_cpu_us_per_connection", 1, "median"),
                ("failed", "failed", 0, "max"),
            ],
        )
        self.section(
            f"churn: {p.churn_clients} clients over {p.churn_topics} topics for "
            f"{p.churn_duration_s:g} s",
            "churn",
            [
                ("joins/s", "joins_per_s", 0, "median"),
                ("join p99 (µs)", "join_p99_us", 0, "median"),
                ("server CPU per join (µs)", "server_cpu_us_per_join", 1, "median"),
                ("ghosts", "ghosts", 0, "max"),
                ("inconsistent views", "inconsistent_views", 0, "max"),
                ("errors", "errors_total", 0, "max"),
            ],
        )
        self.section(
            f"fanout: {p.fanout_peers} peers join one topic at once "
            f"(views checked after at most {p.fanout_timeout_s:g} s)",
            "fanout",
            [
                ("exact views", "exact_views", 0, "min"),
                ("time to full view (s)", "all_complete_s", 2, "median"),
                ("join p99 (µs)", "join_p99_us", 0, "median"),
                ("server CPU (s)", "server_cpu_s", 2, "median"),
                ("disconnected", "disconnected", 0, "max"),
            ],
        )
        seed, ours = self.rows("fanout")
        for name, rows in (("seed", seed), ("ours", ours)):
            missed = sum(1 for r in rows if r.get("all_complete_s") is None)
            if missed:
                self.markdown += [
                    f"{name}: no full view within {p.fanout_timeout_s:g} s in {missed} "
                    f"of {len(rows)} runs.",
                    "",
                ]
        self.targets()
        self.notes()
        header = [
            "# signaling-sharded vs the Go design",
            "",
            f"{b.meta['date']}; {b.meta['machine']}. Server on CPU {b.server_cpu}, "
            f"load generator on CPU {b.client_cpu}; {b.rounds} round(s) of interleaved "
            "runs (seed, ours), medians unless noted; ratios are ours/seed.",
            "",
        ]
        self.markdown = header + self.markdown

    def syscall_rows(self) -> None:
        seed, ours = self.syscalls.get("seed", {}), self.syscalls.get("ours", {})
        if not seed and not ours:
            return
        rows = []
        for key, name in (
            ("syscalls_per_relay", "system calls per relayed message"),
            ("read_write_syscalls_per_relay", "of which read/write class (/proc/PID/io)"),
        ):
            s, o = seed.get(key), ours.get(key)
            if s is None and o is None:
                continue
            rows.append([name, fmt(s, 3), fmt(o, 3), fmt(ratio(o, s), 3)])
        self.data["syscalls"] = self.syscalls
        p = self.bench.params
        self.markdown += [
            f"System calls, one extra relay run per server (window {p.window}, "
            f"{p.syscall_duration_s:g} s, no warmup):",
            "",
            table(["", "seed", "ours", "ours/seed"], rows),
            "",
        ]

    def sweep(self) -> None:
        p = self.bench.params
        rows = []
        sweep: dict[str, Any] = {}
        for w in p.windows:
            seed, ours = self.rows(f"relay-w{w}")
            if not seed and not ours:
                continue
            rs, ro = median(seed, "relays_per_s"), median(ours, "relays_per_s")
            ps, po = median(seed, "rtt_p99_us"), median(ours, "rtt_p99_us")
            cs, co = median(seed, "client_cpu_share"), median(ours, "client_cpu_share")
            ss, so = median(seed, "server_cpu_share"), median(ours, "server_cpu_share")
            rows.append(
                [
                    str(w),
                    fmt(rs),
                    fmt(ro),
                    fmt(ratio(ro, rs), 2),
                    fmt(ps),
                    fmt(po),
                    fmt(ratio(po, ps), 3),
                    f"{fmt(ss, 2)} / {fmt(cs, 2)}",
                    f"{fmt(so, 2)} / {fmt(co, 2)}",
                ]
            )
            sweep[str(w)] = {
                "seed": {"relays_per_s": rs, "rtt_p99_us": ps, "server": ss, "client": cs},
                "ours": {"relays_per_s": ro, "rtt_p99_us": po, "server": so, "client": co},
            }
        self.data["relay_sweep"] = sweep
        header = [
            "window",
            "seed relays/s",
            "ours relays/s",
            "ratio",
            "seed p99 (µs)",
            "ours p99 (µs)",
            "ratio",
            "seed CPU share server / client",
            "ours CPU share server / client",
        ]
        self.markdown += [
            "Relay sweep over the window (offers each peer keeps in flight):",
            "",
            table(header, rows),
            "",
        ]

    def targets(self) -> None:
        p = self.bench.params
        relay = self.data.get(f"relay-w{p.window}", {})
        connect = self.data.get("connect", {})
        churn = self.data.get("churn", {})
        fanout = self.data.get("fanout", {})
        rows: list[list[str]] = []
        found: list[dict[str, Any]] = []

        def add(name: str, entry: dict[str, Any] | None, limit: float, more: bool, d: int) -> None:
            if not entry:
                return
            q = entry.get("ratio")
            met = q is not None and (q >= limit if more else q <= limit)
            goal = f"{'>=' if more else '<='} {limit:g}x"
            s, o = fmt(entry.get("seed"), d), fmt(entry.get("ours"), d)
            rows.append([f"{name} {goal}", s, o, fmt(q, 3), "met" if met else "NOT met"])
            found.append({"target": name, "goal": goal, **entry, "met": met})

        def check(name: str, seed: str, ours: str, met: bool, q: float | None = None) -> None:
            rows.append([name, seed, ours, fmt(q, 3) if q else "", "met" if met else "NOT met"])
            found.append({"target": name, "seed": seed, "ours": ours, "met": met})

        add(
            "server CPU per relayed message",
            relay.get("server CPU per relayed message (µs)"),
            0.38,
            False,
            3,
        )
        add("relays/s", relay.get("relays/s"), 1.6, True, 0)
        add(
            "round-trip p99 at the same offered load",
            relay.get("round-trip p99 (µs)"),
            0.5,
            False,
            0,
        )
        rss = connect.get("RSS per idle connection (B)")
        if rss:
            o = rss.get("ours")
            met = o is not None and o <= 4096
            s, q = fmt(rss.get("seed")), rss.get("ratio")
            check("RSS per idle connection <= 4 KiB (4,096 B)", s, fmt(o), met, q)
        add("connections/s", connect.get("connections/s"), 1.5, True, 0)
        if churn:
            g, i = churn["ghosts"], churn["inconsistent views"]

            def pair(who: str) -> str:
                return f"{fmt(g[who])} ghosts, {fmt(i[who])} inconsistent"

            check(
                "churn: 0 ghosts, 0 inconsistent views",
                pair("seed"),
                pair("ours"),
                g["ours"] == 0 and i["ours"] == 0,
            )
        if fanout:
            e, dis = fanout["exact views"], fanout["disconnected"]
            n = p.fanout_peers

            def views(who: str) -> str:
                return f"{e[who]:.0f}/{n} exact, {dis[who]:.0f} disconnected"

            check(
                f"fanout: all {n} peers exact, none disconnected",
                views("seed"),
                views("ours"),
                e["ours"] == n and dis["ours"] == 0,
            )
        if rows:
            self.data["targets"] = found
            self.markdown += [
                "## Targets (one core each)",
                "",
                table(["target", "seed", "ours", "ours/seed", ""], rows),
                "",
            ]

    def notes(self) -> None:
        lines = []
        retried = [r for r in self.bench.runs if r.attempt > 1]
        disturbed = [r for r in self.bench.runs if r.chosen and r.disturbed]
        failed = [r for r in self.bench.runs if r.chosen and not r.ok]
        if retried:
            lines.append(f"- {len(retried)} run(s) repeated because the first was disturbed.")
        for r in disturbed:
            lines.append(
                f"- kept although disturbed: {r.server} {r.step.label} round {r.round} "
                f"(others used {r.other_share_server_core:.0%} of the server core, "
                f"{r.other_share_client_core:.0%} of the client core)."
            )
        for r in failed:
            lines.append(f"- FAILED: {r.server} {r.step.label} round {r.round}: {r.error[:300]}")
        for name, s in self.syscalls.items():
            if "error" in s:
                lines.append(f"- system call count of {name} failed: {s['error'][:300]}")
        sweep = self.data.get("relay_sweep", {})
        for name in SERVERS:
            busy = {w: e[name]["client"] for w, e in sweep.items() if e[name]["client"] is not None}
            full = [f"{busy[w]:.0%} at window {w}" for w in busy if busy[w] >= 0.9]
            if full:
                lines.append(
                    f"- relay, {name}: the load generator saturated its core too "
                    f"({', '.join(full)}), so these relays/s are a lower bound."
                )
        worst_share = max((r.disturbance for r in self.bench.runs if r.chosen), default=0.0)
        lines.append(
            f"- largest share of a measured core used by others in a kept run: {worst_share:.1%}."
        )
        self.markdown += ["## Runs", "", *lines, ""]


# --- plot ----------------------------------------------------------------------------------


def plot(bench: Bench, path: Path) -> bool:
    """Relays/s and round-trip p99 against the window, both servers; False without data."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        log("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    p = bench.params
    windows = [w for w in p.windows if any(results(bench.runs, s, f"relay-w{w}") for s in SERVERS)]
    if not windows:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.6))
    style = {"seed": ("tab:gray", "o"), "ours": ("tab:blue", "s")}
    panels = ((left, "relays_per_s", 1.0), (right, "rtt_p99_us", 1e-3))
    medians: dict[tuple[str, str], dict[int, float]] = {}
    for server in SERVERS:
        color, marker = style[server]
        got = [(w, results(bench.runs, server, f"relay-w{w}")) for w in windows]
        got = [(w, rows) for w, rows in got if rows]
        xs = [w for w, _ in got]
        for axis, key, scale in panels:
            runs = [[v * scale for v in values(rows, key)] for _, rows in got]
            mid = [statistics.median(v) for v in runs]
            spread = [
                [m - min(v) for m, v in zip(mid, runs, strict=True)],
                [max(v) - m for m, v in zip(mid, runs, strict=True)],
            ]
            axis.errorbar(
                xs, mid, yerr=spread, color=color, marker=marker, capsize=3, label=NAMES[server]
            )
            medians[(server, key)] = dict(zip(xs, mid, strict=True))
    for axis, key, _ in panels:
        seed = medians.get(("seed", key), {})
        for w, value in medians.get(("ours", key), {}).items():
            if seed.get(w):
                axis.annotate(
                    f"{value / seed[w]:.2f}x",
                    (w, value),
                    textcoords="offset points",
                    xytext=(-7, 7) if key == "relays_per_s" else (7, -12),
                    ha="right" if key == "relays_per_s" else "left",
                    fontsize=8,
                    color=style["ours"][0],
                )
        axis.set_xscale("log", base=2)
        axis.set_xticks(windows, [str(w) for w in windows])
        axis.set_xlim(windows[0] / 1.4, windows[-1] * 1.4)
        axis.set_xlabel("offers in flight per peer (window)")
        axis.grid(True, which="both", alpha=0.3)
    top = max((v for (_, k), d in medians.items() if k == "relays_per_s" for v in d.values()))
    left.set_ylim(0, top * 1.15)
    left.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1000:g}k" if v else "0"))
    left.set_ylabel("relayed messages per second")
    left.set_title("Throughput (higher is better)")
    right.set_yscale("log")
    low = min((v for (_, k), d in medians.items() if k == "rtt_p99_us" for v in d.values()))
    right.set_ylim(bottom=low / 1.6)
    right.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    some = FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "235" else "")
    right.yaxis.set_minor_formatter(some)
    right.tick_params(axis="y", which="minor", labelsize=7)
    right.set_ylabel("round-trip p99 (ms, log scale)")
    right.set_title("Round-trip p99 (lower is better)")
    left.legend(loc="upper left", fontsize=9)
    fig.suptitle(
        f"relay: {p.topics} topics x {p.peers} peers, server on one core, load generator on "
        f"another; medians of {bench.rounds} run(s), bars min-max; "
        f"labels ours/seed ({bench.meta['date_short']})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --- setup ---------------------------------------------------------------------------------


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kib / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return f"{os.cpu_count()} CPUs ({model}){mem}, Linux {platform.release()}"


def git_revision() -> str:
    try:
        rev = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            check=True,
        )
        return rev.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def build_seed(seed_dir: Path, into: Path) -> Path:
    script = seed_dir / "build.sh"
    if not script.exists():
        raise SystemExit(f"no Go design at {seed_dir} (set SEED_DIR or SEED_BIN)")
    log("building the Go design")
    done = subprocess.run([str(script), str(into)], stdout=subprocess.PIPE, text=True)
    if done.returncode != 0 or not done.stdout.strip():
        raise SystemExit(f"building the Go design failed ({done.returncode})")
    return Path(done.stdout.strip().splitlines()[-1])


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "no", "false")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark signaling-sharded against the Go design, scenario by scenario.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        default=env_flag("BENCH_QUICK"),
        help="short runs and 1 round, to try it out (env BENCH_QUICK=1)",
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="rounds of (seed, ours) (env ROUNDS; 3, quick 1)"
    )
    parser.add_argument(
        "--only",
        default=",".join(SCENARIOS),
        help="comma-separated scenarios to run",
    )
    parser.add_argument(
        "--retries", type=int, default=2, help="repetitions of a disturbed or failed run"
    )
    parser.add_argument("--server-cpu", type=int, default=0, help="CPU the server is pinned to")
    parser.add_argument(
        "--client-cpu", type=int, default=1, help="CPU the load generator is pinned to"
    )
    parser.add_argument(
        "--seed-dir",
        type=Path,
        default=Path(os.environ.get("SEED_DIR", ROOT.parent / "shared" / "anchors" / "seed-go")),
        help="source of the Go design, built into a temporary folder (env SEED_DIR)",
    )
    parser.add_argument(
        "--seed-bin",
        type=Path,
        default=os.environ.get("SEED_BIN"),
        help="a prebuilt Go binary; skips the build (env SEED_BIN)",
    )
    parser.add_argument(
        "--ours",
        default=os.environ.get("OURS_CMD"),
        help="command starting our server, to which --host and --port are appended "
        "(env OURS_CMD; default: signaling-sharded of this venv with --workers 1)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="results folder (default bench/results/<time>)"
    )
    parser.add_argument(
        "--figure",
        type=Path,
        default=None,
        help="where a full run also saves the relay plot (default docs/relay.png; "
        "never in quick mode)",
    )
    parser.add_argument("--no-syscalls", action="store_true", help="skip the system call count")
    parser.add_argument(
        "--report",
        type=Path,
        metavar="DIR",
        help="only rewrite the summary and the plot of a finished run from its results folder",
    )
    return parser.parse_args(argv)


def ours_command(spec: str | None) -> list[str]:
    if spec:
        return shlex.split(spec)
    here = Path(sys.executable).parent / "signaling-sharded"
    venv = ROOT / ".venv" / "bin" / "signaling-sharded"
    exe = here if here.exists() else venv
    return [str(exe), "--workers", "1"]


def report(bench: Bench, syscalls: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    """Writes summary.md, summary.json and relay.png into the results folder."""
    summary = Summary(bench, syscalls)
    summary.build()
    if "elapsed_s" in meta:
        summary.markdown.append(f"Whole run: {meta['elapsed_s'] / 60:.1f} min.\n")
    text = "\n".join(summary.markdown).rstrip() + "\n"
    (bench.out / "summary.md").write_text(text)
    summary.data["meta"] = meta
    (bench.out / "summary.json").write_text(json.dumps(summary.data, indent=2) + "\n")
    plot(bench, bench.out / "relay.png")
    return text


def load(folder: Path) -> tuple[Bench, dict[str, dict[str, Any]], dict[str, Any]]:
    """A finished run, read back from its results folder."""
    meta = json.loads((folder / "meta.json").read_text())
    params = Params(**{**meta["params"], "windows": tuple(meta["params"]["windows"])})
    bench = Bench(
        params=params,
        rounds=meta["rounds"],
        retries=0,
        server_cpu=meta["server_cpu"],
        client_cpu=meta["client_cpu"],
        seed_bin=Path(),
        ours_cmd=[],
        out=folder,
        perf=None,
        meta={k: meta[k] for k in ("date", "date_short", "machine")},
    )
    for line in (folder / "runs.jsonl").read_text().splitlines():
        r = json.loads(line)
        step = Step(r["scenario"], r["label"], (), 0.0)
        run = Run(
            r["server"],
            step,
            r["round"],
            r["attempt"],
            r["result"],
            r["elapsed_s"],
            r["other_share_server_core"],
            r["other_share_client_core"],
            r["log"],
            r["error"],
            r["chosen"],
        )
        bench.runs.append(run)
    syscall_file = folder / "syscalls.json"
    syscalls = json.loads(syscall_file.read_text()) if syscall_file.exists() else {}
    return bench, syscalls, meta


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    if args.report:
        print(report(*load(args.report)))
        if args.figure:
            shutil.copyfile(args.report / "relay.png", args.figure)
        return 0
    scenarios = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        raise SystemExit(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    rounds = args.rounds or int(os.environ.get("ROUNDS") or (1 if args.quick else 3))
    params = QUICK if args.quick else Params()
    if shutil.which("taskset") is None:
        raise SystemExit("taskset is required (util-linux)")
    if not BENCH_BIN.exists():
        raise SystemExit(f"{BENCH_BIN} is missing: cargo build --release -p signaling-bench")
    ours = ours_command(args.ours)
    if not Path(ours[0]).exists() and shutil.which(ours[0]) is None:
        raise SystemExit(f"our server {ours[0]} is missing: make build")
    cpus = os.sched_getaffinity(0)
    server_cpu, client_cpu = args.server_cpu, args.client_cpu
    if len(cpus) < 2:
        log("warning: a single CPU; the server and the load generator share it")
        server_cpu = client_cpu = min(cpus)

    now = dt.datetime.now(dt.timezone.utc)
    out: Path = args.out or ROOT / "bench" / "results" / (
        now.strftime("%Y%m%d-%H%M%S") + ("-quick" if args.quick else "")
    )
    (out / "logs").mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    with tempfile.TemporaryDirectory(prefix="seed-go-") as tmp:
        seed_bin = args.seed_bin or build_seed(args.seed_dir, Path(tmp))
        if not Path(seed_bin).exists():
            raise SystemExit(f"Go binary {seed_bin} is missing")
        # The driver itself stays off the server's core.
        os.sched_setaffinity(0, {client_cpu})
        bench = Bench(
            params=params,
            rounds=rounds,
            retries=max(0, args.retries),
            server_cpu=server_cpu,
            client_cpu=client_cpu,
            seed_bin=Path(seed_bin),
            ours_cmd=ours,
            out=out,
            perf=None if args.no_syscalls else shutil.which("perf"),
            meta={
                "date": now.strftime("%Y-%m-%d %H:%M UTC"),
                "date_short": now.strftime("%Y-%m-%d"),
                "machine": machine(),
            },
        )
        meta: dict[str, Any] = {
            **bench.meta,
            "revision": git_revision(),
            "rounds": rounds,
            "quick": args.quick,
            "params": params.__dict__,
            "server_cpu": server_cpu,
            "client_cpu": client_cpu,
            "ours": " ".join(Path(ours[0]).name if i == 0 else a for i, a in enumerate(ours)),
        }
        (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        steps = plan(params, scenarios)
        log(f"results in {out}")
        log(f"{rounds} round(s) of {len(steps)} step(s) x 2 servers")
        syscalls: dict[str, dict[str, Any]] = {}
        try:
            for rnd in range(1, rounds + 1):
                for step in steps:
                    for name in SERVERS:
                        bench.run_step(name, step, rnd)
            if "relay" in scenarios and not args.no_syscalls:
                for name in SERVERS:
                    syscalls[name] = bench.measure_syscalls(name)
                (out / "syscalls.json").write_text(json.dumps(syscalls, indent=2) + "\n")
        finally:
            bench.stop_all()

    meta["elapsed_s"] = round(time.monotonic() - started, 1)
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(report(bench, syscalls, meta))
    figure = args.figure or (None if args.quick else ROOT / "docs" / "relay.png")
    if figure is not None and (out / "relay.png").exists():
        shutil.copyfile(out / "relay.png", figure)
        log(f"plot copied to {figure}")
    log(f"done in {meta['elapsed_s'] / 60:.1f} min; results in {out}")
    return 1 if any(r.chosen and not r.ok for r in bench.runs) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
