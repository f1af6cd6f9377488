"""Running the plan: each step against each server, repeated when disturbed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import BENCH_BIN, DISTURBED_SHARE, READY_TIMEOUT_S, STOP_TIMEOUT_S, Result, log
from host import Snapshot, foreign_shares, process_tree, tree_io_syscalls
from plan import Params, Step, relay_args

from testkit.processes import ServerProcess, free_port


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
    if s == "broadcast":
        phases = [(name, result.get(name)) for name in ("relay", "broadcast")]
        return ", ".join(
            f"{name} {p['copies_delivered']}/{p['copies_expected']} copies, "
            f"server {p['server_cpu_us_per_copy']} us/copy"
            for name, p in phases
            if p
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
    servers: list[ServerProcess] = field(default_factory=list)

    @property
    def logs(self) -> Path:
        return self.out / "logs"

    def start_server(self, name: str, port: int, log_path: Path) -> ServerProcess:
        env = dict(os.environ)
        if name == "seed":
            env.update(PORT=str(port), GOMAXPROCS="1")
            command: list[str] = [str(self.seed_bin)]
        else:
            command = [*self.ours_cmd, "--host", "127.0.0.1", "--port", str(port)]
        server = ServerProcess(command, port, log_path, cpu=self.server_cpu, env=env)
        self.servers.append(server)
        return server

    def stop_server(self, server: ServerProcess) -> None:
        server.stop(STOP_TIMEOUT_S)
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
            server.wait_ready(READY_TIMEOUT_S)
            pids = process_tree(server.pid)
            command = self.bench_command(step.scenario, port, step.args_for(name), server.pid)
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
            server.wait_ready(READY_TIMEOUT_S)
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
