"""What every part of the benchmark shares: paths, names, the log."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH_BIN = ROOT / "target" / "release" / "signaling-bench"
SERVERS = ("seed", "ours")
NAMES = {"seed": "Go design (seed)", "ours": "signaling-sharded, 1 worker"}
SCENARIOS = ("relay", "paced", "connect", "churn", "fanout", "broadcast")
DISTURBED_SHARE = 0.10
"""Share of the wall time that others may use on a measured core before a run is repeated."""
READY_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
TICKS_PER_S = os.sysconf("SC_CLK_TCK")

Result = dict[str, Any]
Key = str | Callable[[Result], Any]
"""A field of a result, or a function of it."""


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)
