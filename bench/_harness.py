"""Helpers the ``python -m bench`` scenarios share: servers, CPU and memory of a process,
latency summaries, result rows (not a benchmark itself)."""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
from _common import BENCH_RELAY_ENV, RelayProcess, percentile
from baseline import BaselineProcess
from loadgen import Fleet

Server = RelayProcess | BaselineProcess


@contextlib.contextmanager
def server(side: str, pg_url: str, mode: str = "chat", repo: str = "") -> Iterator[Server]:
    """The relay (side "relay", the benchmark's settings) or a bare baseline server."""
    srv: Server = (
        RelayProcess(pg_url, env=BENCH_RELAY_ENV)
        if side == "relay"
        else BaselineProcess(mode, pg_url, repo)
    )
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@contextlib.contextmanager
def fleets(count: int) -> Iterator[list[Fleet]]:
    started: list[Fleet] = []
    try:
        for _ in range(count):
            started.append(Fleet())
        yield started
    finally:
        for f in started:
            f.stop()


def cpu_of(pid: int) -> float:
    """CPU seconds a process (all its threads) has used so far.

    Read from /proc/<pid>/task/*/schedstat (nanoseconds) where it exists: psutil's
    user+system figures tick in 10 ms steps, too coarse for windows of a few seconds.
    """
    total = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError, IndexError):
                total += int((task / "schedstat").read_text().split()[0])
    except OSError:
        total = 0
    if total:
        return total / 1e9
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def memory_of(pid: int) -> tuple[int, int]:
    """(RSS, USS) of a process in bytes."""
    m = psutil.Process(pid).memory_full_info()
    return int(m.rss), int(m.uss)


def latency_summary(seconds: Sequence[float], points: int = 400) -> dict[str, Any]:
    """p50/p90/p99/max in ms, and ``points`` quantiles for the charts."""
    ms = sorted(1000 * x for x in seconds)
    if not ms:
        return {"n": 0}
    step = max(1, len(ms) // points)
    return {
        "n": len(ms),
        "p50": percentile(ms, 50),
        "p90": percentile(ms, 90),
        "p99": percentile(ms, 99),
        "max": ms[-1],
        "quantiles": [round(v, 3) for v in ms[::step]] + [round(ms[-1], 3)],
    }


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


@dataclass
class Row:
    """One line of the summary table: a measure, relay beside its same-run baseline."""

    scenario: str
    measure: str
    relay: float | None
    baseline: float | None
    baseline_name: str
    unit: str = ""
    better: str = "lower"  # or "higher": which way the relay should differ
    check: str = "ok"  # "ok", or "FAIL: why" / "TIMEOUT"
    runs: dict[str, list[float]] = field(default_factory=dict)  # every run's figure, by side

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_text(problems: Sequence[str]) -> str:
    return "ok" if not problems else "FAIL: " + "; ".join(problems)[:300]
