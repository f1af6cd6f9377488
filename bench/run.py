#!/usr/bin/env python3
"""Benchmark signaling-sharded against the original Go design (the seed).

Every scenario of signaling-bench (relay, paced, connect, churn, fanout, broadcast) runs against
both servers, interleaved -- seed, ours, seed, ours, ... -- for several rounds.
Each run starts a fresh server pinned to one CPU (taskset) while the load
generator runs pinned to another, so that the two never compete for a core.
The relay scenario is a sweep over the number of offers each peer keeps in
flight (the window); the headline figures are read at window 4. Each server
relays what it can there, so the loads differ; `paced` offers both the same
one (200 pairs, 40,000 relays/s) and compares their CPU per relay at it.

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

Usage: PYTHONPATH=. bench/run.py [--quick] [--rounds N] [--only relay,connect,...]
(from the repository root: it shares testkit/ with the tests)
Environment: ROUNDS, BENCH_QUICK=1, SEED_DIR (the Go design's source),
SEED_BIN (a prebuilt Go binary), OURS_CMD (how to start our server).
Build first: `make build` and `cargo build --release -p signaling-bench`
(`make bench` does both and then runs this script).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common import BENCH_BIN, ROOT, SCENARIOS, SERVERS, log
from plan import QUICK, Params, Step, plan
from runs import Bench, Run
from summary import Summary, plot


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
