"""Soak: churn against `signaling-sharded --workers 2`, then check for leaks.

    make soak                      # 10 minutes
    SOAK_SECONDS=60 make soak      # shorter

Starts the server on both cores, warms it up with a short churn (so that
memory pools the allocator keeps anyway exist before the baseline), records
the RSS and open file descriptors of every process of the server, runs
`signaling-bench churn` for the soak duration, waits for the server to
settle, and compares: every process must be back within 10% of its
baseline and the churn must report 0 ghost peers and 0 inconsistent views.
Exits 1 otherwise. Results go to bench/results/soak-<time>/.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from common import BENCH_BIN, ROOT
from host import process_tree

from testkit.processes import free_port, healthy

SERVER = ROOT / ".venv" / "bin" / "signaling-sharded"
TOLERANCE = 0.10
WARMUP_S = 30.0
SETTLE_S = 5.0
CHURN_ARGS = ("--clients", "50", "--topics", "20", "--stay-max-ms", "50")


@dataclass(frozen=True)
class Usage:
    rss_kib: int
    fds: int


def usage(pid: int) -> Usage | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return Usage(rss, fds)


def snapshot(root: int) -> dict[int, Usage]:
    found = {pid: usage(pid) for pid in process_tree(root)}
    return {pid: use for pid, use in found.items() if use is not None}


def churn(url: str, seconds: float, server_pid: int, out: Path) -> dict[str, object]:
    command = [str(BENCH_BIN), "churn", "--url", url, "--duration", f"{seconds:g}"]
    command += [*CHURN_ARGS, "--server-pid", str(server_pid)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    out.write_text(result.stdout + result.stderr)
    report: dict[str, object] = json.loads(result.stdout.splitlines()[0])
    return report


def within(before: int, after: int) -> bool:
    return after <= before * (1 + TOLERANCE) + 1


def main() -> int:
    seconds = float(os.environ.get("SOAK_SECONDS", "600"))
    folder = ROOT / "bench" / "results" / time.strftime("soak-%Y%m%d-%H%M%S")
    folder.mkdir(parents=True)
    port = free_port()
    with (folder / "server.log").open("wb") as log:
        server = subprocess.Popen(
            [str(SERVER), "--workers", "2", "--host", "127.0.0.1", "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 20
        while not healthy(port):
            if time.monotonic() > deadline or server.poll() is not None:
                print("server did not start; see", folder / "server.log", file=sys.stderr)
                return 1
            time.sleep(0.1)
        url = f"ws://127.0.0.1:{port}"
        churn(url, WARMUP_S, server.pid, folder / "warmup.txt")
        time.sleep(SETTLE_S)
        baseline = snapshot(server.pid)
        print(f"soak: {seconds:g} s of churn against 2 workers, baseline {baseline}")
        report = churn(url, seconds, server.pid, folder / "churn.txt")
        time.sleep(SETTLE_S)
        after = snapshot(server.pid)
    finally:
        server.terminate()
        server.wait(15)
    failures = []
    rows = [
        "| pid | RSS before (KiB) | RSS after (KiB) | fds before | fds after |",
        "|---|---|---|---|---|",
    ]
    for pid, before in sorted(baseline.items()):
        now = after.get(pid)
        if now is None:
            failures.append(f"process {pid} is gone")
            continue
        rows.append(f"| {pid} | {before.rss_kib} | {now.rss_kib} | {before.fds} | {now.fds} |")
        if not within(before.rss_kib, now.rss_kib):
            failures.append(f"RSS of {pid} grew from {before.rss_kib} to {now.rss_kib} KiB")
        if not within(before.fds, now.fds):
            failures.append(f"fds of {pid} grew from {before.fds} to {now.fds}")
    for key in ("ghosts", "inconsistent_views"):
        if report.get(key) != 0:
            failures.append(f"{key}: {report.get(key)}")
    summary = "\n".join(
        [
            f"joins {report.get('joins')} ({report.get('joins_per_s')}/s), "
            f"ghosts {report.get('ghosts')}, inconsistent views "
            f"{report.get('inconsistent_views')} of {report.get('views_checked')}",
            *rows,
            *(f"FAIL {failure}" for failure in failures),
            "PASS" if not failures else "",
        ]
    )
    (folder / "summary.md").write_text(summary + "\n")
    print(summary)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
