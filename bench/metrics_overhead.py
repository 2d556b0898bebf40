"""What counting costs per frame: relay's plain counters vs prometheus-client's.

    python bench/metrics_overhead.py

Prints nanoseconds per frame for the write path's count (``Counts.sent``,
which reads the frame type in place), the receive path's (``Counts.received``)
and, for comparison, a prometheus-client ``Counter`` with a ``type`` label.
"""

from __future__ import annotations

import timeit

from prometheus_client import CollectorRegistry, Counter

from relay import protocol
from relay.metrics import Counts

N = 1_000_000


def per_call_ns(stmt: object, number: int = N) -> float:
    best = min(timeit.repeat(stmt, number=number, repeat=5))  # type: ignore[arg-type]
    return best / number * 1e9


def main() -> None:
    counts = Counts()
    frame = protocol.encode("6f1c2a4e-8d7b-4c1e-9a55-0c3e2b1d9f00", "chan_out", "hello", "lobby")
    labelled = Counter("frames", "frames", ["type"], registry=CollectorRegistry())
    child = labelled.labels("x")
    baseline = per_call_ns(lambda: None)
    rows = [
        ("Counts.sent(frame)  [write path]", per_call_ns(lambda: counts.sent(frame))),
        ("Counts.received(type)  [read path]", per_call_ns(lambda: counts.received("chan_in"))),
        ("prometheus Counter.labels(t).inc()", per_call_ns(lambda: labelled.labels("x").inc())),
        ("prometheus child.inc() (pre-bound)", per_call_ns(lambda: child.inc())),
    ]
    print(f"empty call: {baseline:.0f} ns (subtracted below)")
    for name, ns in rows:
        print(f"{name:40s} {ns - baseline:6.0f} ns/frame")


if __name__ == "__main__":
    main()
