"""The charts of ``python -m bench``: matplotlib (Agg backend) PNGs from results.json.

- ``latency.png``: latency distributions (CDFs) per scenario, relay beside its baseline;
- ``cpu_per_delivery.png``: server CPU per delivery (or per event), relay vs baseline;
- ``memory.png``: server memory per idle joined socket.

Run by itself to redraw from a saved result: ``python bench/charts.py bench/results``.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

COLORS = {"relay": "#1f77b4", "baseline": "#ff7f0e"}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def latency_chart(results: dict[str, Any], path: Path) -> bool:
    series: dict[str, dict[str, list[float]]] = {}
    for scen in results["scenarios"].values():
        series.update((scen.get("result") or {}).get("latency_quantiles_ms", {}))
    series = {k: v for k, v in series.items() if any(v.values())}
    if not series:
        return False
    plt = _plt()
    cols = 2
    rows = math.ceil(len(series) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(12, 3.2 * rows), squeeze=False)
    for ax, (label, sides) in zip(axes.flat, series.items(), strict=False):
        for side, q in sides.items():
            if not q:
                continue
            ys = [(i + 1) / len(q) for i in range(len(q))]
            xs = [max(v, 0.01) for v in q]
            name = "relay" if side == "relay" else "baseline"
            ax.plot(xs, ys, label=name, color=COLORS[side], linewidth=1.6)
        ax.set_xscale("log")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("latency, ms (log)", fontsize=8)
        ax.set_ylabel("fraction of deliveries", fontsize=8)
        ax.axhline(0.5, color="grey", linewidth=0.5, linestyle=":")
        ax.axhline(0.99, color="grey", linewidth=0.5, linestyle=":")
        ax.grid(True, which="both", linewidth=0.3)
        ax.legend(fontsize=8, loc="lower right")
    for ax in list(axes.flat)[len(series) :]:
        ax.set_visible(False)
    fig.suptitle(
        "publish->receive / commit->frame latency (CDF), same run; values under 0.01 ms"
        " (a NOTIFY can arrive before its COMMIT returns) are drawn at 0.01",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def _bars(groups: list[tuple[str, list[dict[str, Any]]]], unit: str, path: Path) -> bool:
    """Horizontal bars, relay beside baseline, one panel (own scale) per group."""
    groups = [
        (t, [r for r in rows if r["relay"] is not None or r["baseline"] is not None])
        for t, rows in groups
    ]
    groups = [(t, rows) for t, rows in groups if rows]
    if not groups:
        return False
    plt = _plt()
    heights = [len(rows) + 1 for _, rows in groups]
    fig, axes = plt.subplots(
        len(groups),
        1,
        figsize=(12, 0.55 * sum(heights) + 1.0),
        squeeze=False,
        gridspec_kw={"height_ratios": heights},
    )
    h = 0.38
    for ax, (title, rows) in zip(axes[:, 0], groups, strict=True):
        ys = list(range(len(rows)))
        for off, side in ((-h / 2, "relay"), (h / 2, "baseline")):
            vals = [r[side] or 0.0 for r in rows]
            bars = ax.barh([y + off for y in ys], vals, height=h, color=COLORS[side], label=side)
            for bar, v in zip(bars, vals, strict=True):
                if v:
                    y = bar.get_y() + h / 2
                    ax.text(bar.get_width(), y, f" {v:.1f}", va="center", fontsize=7)
        top = max((r[side] or 0.0) for r in rows for side in ("relay", "baseline"))
        ax.set_xlim(0, top * 1.25 or 1)
        ax.set_yticks(ys)
        ax.set_yticklabels(
            [f"{r['scenario']}\n(baseline: {r['baseline_name']})" for r in rows], fontsize=7
        )
        ax.invert_yaxis()
        ax.set_xlabel(unit, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8, loc="lower right")
        ax.grid(True, axis="x", linewidth=0.3)
    fig.tight_layout()
    fig.subplots_adjust(left=0.3)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def draw(results: dict[str, Any], out: Path) -> list[Path]:
    """Draw every chart there is data for; return the files written."""
    rows = results["rows"]
    written = []
    if latency_chart(results, out / "latency.png"):
        written.append(out / "latency.png")
    per_delivery = [r for r in rows if r["measure"] == "server CPU per delivery"]
    per_event = [r for r in rows if r["measure"] == "server CPU per event"]
    groups = [
        ("server CPU per delivery (lower is better)", per_delivery),
        ("server CPU per event (10 receivers each; lower is better)", per_event),
    ]
    if _bars(groups, "us", out / "cpu_per_delivery.png"):
        written.append(out / "cpu_per_delivery.png")
    mem = [r for r in rows if r["measure"] == "server USS per socket"]
    title = "server memory per idle joined socket (lower is better)"
    if _bars([(title, mem)], "KB", out / "memory.png"):
        written.append(out / "memory.png")
    return written


if __name__ == "__main__":
    directory = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results")
    for p in draw(json.loads((directory / "results.json").read_text()), directory):
        print(p)
