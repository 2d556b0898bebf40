"""``python -m bench``: the whole relay benchmark, one command, one table.

It starts an embedded PostgreSQL, then runs each scenario in its own process (its own
session, so a scenario that overruns its time is killed with everything it started and
reported as TIMEOUT); each scenario starts the relay (``RelayProcess``), the same-run
baseline servers and the load generators in processes of their own, and checks that
every expected frame arrived exactly once and in order (a fast wrong answer is a FAIL).

    python -m bench                    # everything, about 7-9 minutes on 2 cores
    python -m bench --quick            # shorter and smaller, under 3 minutes
    python -m bench --only fanout,db   # some scenarios (memory fanout db catchup storm write_cost)
    python -m bench --smoke            # tiny sizes, ~1 minute: does it all still work?

Output: a header (machine, CPU model, PostgreSQL, relay commit), one table of relay
beside its same-run baselines, and in ``--out`` (default bench/results/): results.json
(every figure, every run), table.txt and table.md, latency.png, cpu_per_delivery.png, memory.png,
and logs/<scenario>.log (each scenario's full output). Exit status 0 only when every
scenario completed and every check passed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from _common import (  # noqa: E402
    _git,
    embedded_pg,
    machine_header,
    pg_version,
    print_table,
    quiet_logs,
    raise_fd_limit,
)
from profiles import PROFILES, SCENARIOS  # noqa: E402


def relay_source() -> dict[str, Any]:
    import relay

    src = Path(relay.__file__).resolve().parent.parent
    dirty = _git(src, "status", "--porcelain", "--", "relay", "sql", "migrations").splitlines()
    return {
        "path": str(src),
        "commit": _git(src, "rev-parse", "--short", "HEAD") or "?",
        "subject": _git(src, "log", "-1", "--format=%s")[:100],
        "uncommitted": [line[3:] for line in dirty],
    }


def cpu_model() -> str:
    """The CPU model from /proc/cpuinfo (else lscpu), with its family/model numbers."""
    info: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    if "model name" not in info:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
            for line in text.splitlines():
                key, _, value = line.partition(":")
                info.setdefault({"Model name": "model name"}.get(key.strip(), key), value.strip())
    name = info.get("model name", "?")
    numbers = [f"{k} {info[k]}" for k in ("cpu family", "model", "stepping") if k in info]
    return name + (f" ({', '.join(numbers)})" if numbers else "")


async def run_scenario(
    name: str, cfg: dict[str, Any], limit: float, pg: Any, out: Path, relay_path: str
) -> dict[str, Any]:
    """Run one scenario in a child process (own session); kill it all at ``limit``."""
    result_file = out / "logs" / f"{name}.json"
    log_file = out / "logs" / f"{name}.log"
    result_file.unlink(missing_ok=True)
    env = dict(os.environ)
    # The children import the relay the header names, whatever their working directory.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (relay_path, env.get("PYTHONPATH")) if p)
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(BENCH_DIR / "_scenario.py"),
        name,
        pg.url,
        str(pg.pgdata),
        json.dumps(cfg),
        str(result_file),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
        env=env,
    )
    status = "ok"
    lines: list[str] = []

    async def pump() -> None:
        assert proc.stdout is not None
        with log_file.open("w") as log:
            async for raw in proc.stdout:
                line = raw.decode(errors="replace").rstrip()
                log.write(line + "\n")
                lines.append(line)
                if line.startswith("  ") and not line.startswith("    "):
                    print(line, flush=True)

    try:
        await asyncio.wait_for(asyncio.gather(pump(), proc.wait()), limit)
        if proc.returncode != 0:
            status = "ERROR"
    except TimeoutError:
        status = "TIMEOUT"
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 10)
    seconds = time.monotonic() - t0
    res: dict[str, Any] = {"status": status, "seconds": seconds, "config": cfg, "limit": limit}
    if status == "ok" and result_file.exists():
        res["result"] = json.loads(result_file.read_text())
        result_file.unlink()
    elif status == "ok":
        res["status"] = "ERROR"
    if res["status"] != "ok":
        res["log_tail"] = lines[-15:]
        print(f"  {name}: {res['status']} after {seconds:.0f} s; the end of {log_file}:")
        for line in lines[-15:]:
            print("    | " + line)
    else:
        print(f"  {name}: done in {seconds:.0f} s", flush=True)
    return res


def fmt(value: float | None, unit: str) -> str:
    if value is None or value != value:  # None or NaN
        return "-"
    if unit == "/s":
        return f"{value:,.0f}"
    if unit == "s":
        return f"{value:.2f} s"
    if unit == "x":
        return f"{value:.2f}x"
    text = f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.1f}"
    return f"{text} {unit}"


def table_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    out = []
    for r in rows:
        rel, base = r["relay"], r["baseline"]
        ratio = f"{rel / base:.2f}x" if rel is not None and base and base == base else "-"
        check = r["check"].split(":")[0]  # ok, FAIL, TIMEOUT, ERROR; details below the table
        out.append(
            [
                r["scenario"],
                r["measure"],
                fmt(rel, r["unit"]),
                fmt(base, r["unit"]),
                r["baseline_name"],
                ratio,
                check,
            ]
        )
    return out


HEADERS = ["scenario", "measure", "relay", "baseline", "baseline is", "relay/base", "check"]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The same table in Markdown (results/table.md, for the README)."""
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    for cells in table_rows(rows):
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"


async def main_async(args: argparse.Namespace, names: list[str], out: Path) -> int:
    profile = PROFILES[args.profile]
    src = relay_source()
    started = time.monotonic()
    with embedded_pg() as pg:
        pgv = await pg_version(pg.url)
        title = f"relay benchmark ({args.profile}: {', '.join(names)})"
        how = ["python -m bench"] if __package__ == "bench" else ["python", sys.argv[0]]
        header = machine_header(title, pgv, [*how, *sys.argv[1:]])
        header += f"\ncpu     : {cpu_model()}, {os.cpu_count()} CPUs"
        print(header, flush=True)
        scenarios: dict[str, Any] = {}
        for name in names:
            cfg, limit = profile[name]
            limit *= args.limit_factor
            print(f"-- {name} (limit {limit:.0f} s)", flush=True)
            scenarios[name] = await run_scenario(name, cfg, limit, pg, out, src["path"])
    rows: list[dict[str, Any]] = []
    for name in names:
        scen = scenarios[name]
        if scen["status"] == "ok":
            rows += scen["result"]["rows"]
        else:
            rows.append(
                {
                    "scenario": name,
                    "measure": "-",
                    "relay": None,
                    "baseline": None,
                    "baseline_name": "-",
                    "unit": "",
                    "better": "",
                    "check": f"{scen['status']} after {scen['seconds']:.0f} s",
                }
            )
    elapsed = time.monotonic() - started
    results = {
        "profile": args.profile,
        "header": {
            "text": header,
            "nproc": os.cpu_count(),
            "cpu_model": cpu_model(),
            "postgresql": pgv,
            "relay": src,
            "python": sys.version.split()[0],
        },
        "seconds": elapsed,
        "rows": rows,
        "scenarios": scenarios,
    }
    failed = [r for r in rows if r["check"] != "ok"]
    notes = [n for name in names for n in (scenarios[name].get("result") or {}).get("notes", [])]
    results["notes"] = notes
    print()
    print(header)
    print(f"run time: {elapsed:.0f} s\n")
    print_table(HEADERS, table_rows(rows))
    with (out / "table.txt").open("w") as f, contextlib.redirect_stdout(f):
        print(header)
        print(f"run time: {elapsed:.0f} s\n")
        print_table(HEADERS, table_rows(rows))
    for note in notes:
        print(f"note: {note}")
    if failed:
        print("\nFAILED checks:")
        for r in failed:
            print(f"  {r['scenario']} / {r['measure']}: {r['check']}")
    print(
        "\nrelay/base: the relay's figure over the baseline's, both from this run"
        " (for /s higher is better, for us, ms, KB and s lower is better)."
        "\nserver CPU: the server process only (psutil//proc), during the measured window."
    )
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "table.md").write_text(markdown_table(rows))
    if not args.no_charts:
        import charts

        for path in charts.draw(results, out):
            print(f"chart: {path}")
    print(f"results: {out / 'results.json'}")
    return 1 if failed else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Run the relay benchmark: every scenario, same-run baselines, one table.",
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--quick",
        action="store_const",
        dest="profile",
        const="quick",
        help="the same scenarios, shorter and smaller (under 3 minutes)",
    )
    size.add_argument(
        "--smoke",
        action="store_const",
        dest="profile",
        const="smoke",
        help="tiny sizes: does everything still work and check out (about a minute)",
    )
    p.set_defaults(profile="full")
    p.add_argument(
        "--only",
        type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
        help="comma-separated scenarios: " + ",".join(SCENARIOS),
    )
    p.add_argument(
        "--out",
        type=Path,
        default=BENCH_DIR / "results",
        help="directory for results.json, table.txt, charts, logs (default bench/results)",
    )
    p.add_argument("--no-charts", action="store_true", help="skip the matplotlib charts")
    p.add_argument(
        "--limit-factor",
        type=float,
        default=1.0,
        metavar="F",
        help="multiply every scenario's time limit by F (a slower machine: 2)",
    )
    args = p.parse_args(argv)
    unknown = set(args.only or []) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [s for s in SCENARIOS if not args.only or s in args.only]
    out: Path = args.out.resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    quiet_logs()
    raise_fd_limit()
    return asyncio.run(main_async(args, names, out))


if __name__ == "__main__":
    sys.exit(main())
