"""Host accounting: the CPU time of processes and cores, and what others took of them."""

from __future__ import annotations

import os
import resource
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from common import TICKS_PER_S


def proc_stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name, starting with `state`."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()


def all_processes() -> dict[int, list[str]]:
    """:func:`proc_stat_fields` of every process now."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = proc_stat_fields(int(entry.name))
            if fields is not None:
                found[int(entry.name)] = fields
    return found


def cpu_ticks(fields: list[str]) -> int:
    """User plus system CPU ticks, of :func:`proc_stat_fields`."""
    return int(fields[11]) + int(fields[12])


def is_kernel_thread(pid: int, fields: list[str]) -> bool:
    """kthreadd (PID 2) and its children: kworkers, ksoftirqd, ..."""
    return pid == 2 or fields[1] == "2"


def process_tree(root: int) -> list[int]:
    """*root* and all of its descendants."""
    children: dict[int, list[int]] = {}
    for pid, fields in all_processes().items():
        children.setdefault(int(fields[1]), []).append(pid)
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
            ticks += cpu_ticks(fields)
    return ticks / TICKS_PER_S


def tree_rss_bytes(root: int) -> int:
    """The resident memory of *root* and its descendants."""
    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    for pid in process_tree(root):
        try:
            resident = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
        total += resident * page
    return total


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
    ticks = sum(
        cpu_ticks(fields)
        for pid, fields in all_processes().items()
        if is_kernel_thread(pid, fields)
    )
    return ticks / TICKS_PER_S


def others_cpu_s(
    before: dict[int, list[str]], after: dict[int, list[str]], ours: Sequence[int]
) -> list[tuple[int, float]]:
    """CPU seconds each process but *ours* used between two samples of
    :func:`all_processes` (those alive at both), busiest first; kernel
    threads are left out (the load causes their work)."""
    used = []
    for pid, fields in after.items():
        if pid in before and pid not in ours and not is_kernel_thread(pid, fields):
            spent = cpu_ticks(fields) - cpu_ticks(before[pid])
            if spent > 0:
                used.append((pid, spent / TICKS_PER_S))
    return sorted(used, key=lambda item: -item[1])


@contextmanager
def scheduled_idle(pids: Sequence[int]) -> Iterator[None]:
    """Runs every thread of *pids* at ``SCHED_IDLE`` (only on a CPU nothing
    else wants) until the block ends, then as before: for processes outside
    the bench whose bursts would otherwise land in its figures. Needs
    CAP_SYS_NICE."""
    before: dict[int, tuple[int, int]] = {}
    try:
        for pid in pids:
            for entry in Path(f"/proc/{pid}/task").iterdir():
                tid = int(entry.name)
                policy = os.sched_getscheduler(tid)
                before[tid] = (policy, os.sched_getparam(tid).sched_priority)
                os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
    except OSError as exc:
        for tid, (policy, priority) in before.items():
            os.sched_setscheduler(tid, policy, os.sched_param(priority))
        raise SystemExit(f"cannot run pids {list(pids)} at SCHED_IDLE: {exc}") from None
    try:
        yield
    finally:
        for tid, (policy, priority) in before.items():
            with suppress(OSError):  # the thread ended
                os.sched_setscheduler(tid, policy, os.sched_param(priority))


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
