"""The summary of a finished run: medians, ratios against the Go design, the plot."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import NAMES, SERVERS, Key, Result, log
from runs import Bench, Run


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


def phase(name: str, key: str) -> Key:
    """A field of one phase of a broadcast run (None if the phase did not run)."""

    def get(r: Result) -> Any:
        return (r.get(name) or {}).get(key)

    return get


def lost(r: Result) -> int:
    """Copies a broadcast run did not deliver once and in order, over its phases."""
    phases = [r.get(name) or {} for name in ("relay", "broadcast")]
    return sum(int(p.get("missing", 0)) + int(p.get("out_of_order", 0)) for p in phases)


Metric = tuple[str, Key, int, str]
"""(label, key, decimals, aggregate: median, max or min)."""

RELAY_METRICS: list[Metric] = [
    ("relays/s", "relays_per_s", 0, "median"),
    ("round-trip p50 (µs)", "rtt_p50_us", 0, "median"),
    ("round-trip p99 (µs)", "rtt_p99_us", 0, "median"),
    ("server CPU per relayed message (µs)", "server_cpu_us_per_relay", 3, "median"),
    ("server CPU share", "server_cpu_share", 3, "median"),
    ("server sleeps per 1,000 relays", "server_sleeps_per_1k_relays", 2, "median"),
    ("server preemptions per 1,000 relays", "server_preemptions_per_1k_relays", 2, "median"),
    ("errors + timeouts + disconnects", problems, 0, "median"),
]
"""What a relay section shows (the sweep's adds the load generator's share)."""


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
            client = ("load generator CPU share", "client_cpu_share", 3, "median")
            self.section(title, w, [*RELAY_METRICS[:-1], client, RELAY_METRICS[-1]])
            self.syscall_rows()
            self.sweep()
        self.section(
            f"paced relay: {p.paced_topics} topics x 2 peers, each sending "
            f"{p.paced_rate:g} offers/s (window {p.window}), each answered: the same "
            f"{4 * p.paced_topics * p.paced_rate:,.0f} relays/s offered to both servers",
            "paced",
            RELAY_METRICS,
        )
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
        self.section(
            f"broadcast: one sender, {p.broadcast_receivers} receivers, "
            f"{p.broadcast_rate:g} rounds/s for {p.broadcast_duration_s:g} s per phase; "
            "relay: one offer to each receiver per round (the Go design runs this phase "
            "only), broadcast: one broadcast per round",
            "broadcast",
            [
                (
                    "relay: server CPU per delivered copy (µs)",
                    phase("relay", "server_cpu_us_per_copy"),
                    3,
                    "median",
                ),
                ("relay: copy latency p99 (µs)", phase("relay", "latency_p99_us"), 0, "median"),
                (
                    "broadcast: server CPU per delivered copy (µs)",
                    phase("broadcast", "server_cpu_us_per_copy"),
                    3,
                    "median",
                ),
                (
                    "broadcast: copy latency p99 (µs)",
                    phase("broadcast", "latency_p99_us"),
                    0,
                    "median",
                ),
                ("broadcast per copy / relay per copy", "cpu_per_copy_ratio", 3, "median"),
                ("copies missing or out of order", lost, 0, "median"),
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
