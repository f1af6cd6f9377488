"""The scenarios, and the steps a run of the benchmark takes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


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
    paced_topics: int = 200
    paced_rate: float = 50.0
    """Offers per second each peer of the paced relay sends: 200 pairs at 50
    offers/s, each answered, are 40,000 relays/s offered to both servers,
    about a tenth of what ours relays flat out on one core here (the Go
    design, woken per message on 400 connections, carries about 35,000 of
    them with its core full)."""
    connections: int = 3000
    connect_concurrency: int = 100
    connect_topics: int = 300
    churn_duration_s: float = 10.0
    churn_clients: int = 50
    churn_topics: int = 10
    fanout_peers: int = 1000
    fanout_timeout_s: float = 30.0
    broadcast_receivers: int = 999
    broadcast_rate: float = 20.0
    """Rounds per second; the server's default broadcast rate."""
    broadcast_duration_s: float = 5.0
    syscall_duration_s: float = 5.0


QUICK = Params(
    relay_duration_s=2.0,
    relay_warmup_s=1.0,
    connections=500,
    churn_duration_s=3.0,
    fanout_peers=200,
    fanout_timeout_s=10.0,
    broadcast_receivers=200,
    broadcast_duration_s=2.0,
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
    seed_args: tuple[str, ...] | None = None
    """Arguments for the Go design where they differ (what it cannot do is left out)."""

    def args_for(self, server: str) -> tuple[str, ...]:
        return self.seed_args if server == "seed" and self.seed_args is not None else self.args


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
    if "paced" in scenarios:
        # The same offered load for both servers (the sweep's load is what
        # each takes), so that their CPU per relay compares at one load.
        args = (
            f"--topics={p.paced_topics}",
            "--peers=2",
            f"--window={p.window}",
            f"--rate={p.paced_rate:g}",
            f"--duration={p.relay_duration_s:g}",
            f"--warmup={p.relay_warmup_s:g}",
            f"--payload-bytes={p.payload_bytes}",
        )
        budget = p.relay_duration_s + p.relay_warmup_s + 10.0
        steps.append(Step("relay", "paced", args, budget))
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
    if "broadcast" in scenarios:
        # The Go design has no broadcast: it runs the relay phase only, the
        # same copies sent one by one, which is what its users do instead.
        args = (
            f"--receivers={p.broadcast_receivers}",
            f"--rate={p.broadcast_rate:g}",
            f"--duration={p.broadcast_duration_s:g}",
            f"--payload-bytes={p.payload_bytes}",
        )
        budget = 2 * p.broadcast_duration_s + 30.0
        steps.append(Step("broadcast", "broadcast", args, budget, (*args, "--phases=relay")))
    return steps
