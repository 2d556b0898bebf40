"""Smoke test of the benchmark command: ``python -m bench --smoke`` (tiny sizes).

It asserts only that the command completes with exit status 0, which it gives only
when every scenario ran and every delivery check passed (every frame exactly once,
in order), and that results.json holds every scenario. No timing is asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCENARIOS = {"memory", "fanout", "db", "catchup", "storm", "write_cost"}


@pytest.mark.timeout(420)
def test_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results["scenarios"]) == SCENARIOS
    assert all(s["status"] == "ok" for s in results["scenarios"].values())
    assert results["rows"] and all(r["check"] == "ok" for r in results["rows"])
    assert (out / "latency.png").exists() and (out / "cpu_per_delivery.png").exists()
