"""Load-generator processes: many :class:`wsclient.WsClient` sockets, and their checks.

A :class:`Fleet` is a spawned process driven over a pipe (one command at a time). It
opens sockets to the relay (``init`` -> ``auth`` with a session JWT -> ``token`` ->
``join``, the real protocol) or to a bare baseline server (``/ws?account=A``, no
protocol), and gives each socket a role:

``chat``  a channel member. Every publish carries ``"<seq> <send time>"`` as its data;
          a member checks that the seqs it gets are exactly 0, 1, 2, ... (exactly once,
          in order: any gap, duplicate or reordering is counted), checks the frame type
          on every frame with a substring test and decodes every 64th frame with
          ``json.loads`` to check type and channel, and notes publish->receive latency.
          The fleet's first chat socket can publish (``publish``), and its last one is
          the publisher's flow-control view of the fan-out (it joined after all others).
``db``    a ``db-`` subscriber. It notes the row number ``n`` of each ``db_created`` frame
          (found with a regex at the ``\\"n\\": `` key, not a full decode), checks that
          ``pos`` increases, and at ``check_db`` that it got exactly the rows it may read.
``idle``  holds the socket (answers pings), for the memory scenario.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing as mp
import re
import threading
import time
from array import array
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from _common import quiet_logs, raise_fd_limit, self_cpu, token
from checks import ChatMember, DbSubscriber
from wsclient import WsClient


def run_fast(coro: Coroutine[Any, Any, None]) -> None:
    """Run a load generator on uvloop when it is installed (the bench extra has it): an
    asyncio read costs a load generator more than parsing the frames in it, and uvloop's
    reads are some 2-3x cheaper. The servers measured keep the standard event loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)


def _idle(_p: bytes, _now: float) -> None:
    pass


@dataclass
class FleetState:
    kind: str = "relay"
    sockets: list[WsClient] = field(default_factory=list)
    chat: list[ChatMember] = field(default_factory=list)
    db: list[DbSubscriber] = field(default_factory=list)
    lat: array[float] = field(default_factory=lambda: array("d"))
    ns: array[int] = field(default_factory=lambda: array("q"))
    ts: array[float] = field(default_factory=lambda: array("d"))
    tokens: list[str] = field(default_factory=list)
    channel: str = ""
    retried: int = 0  # joins answered "try again" and sent again


async def _open_one(st: FleetState, cmd: dict[str, Any], i: int) -> str | None:
    """Open socket i; return an error text or None."""
    user = f"{cmd['user_prefix']}{i}"
    account = cmd.get("account") or f"{cmd['account_prefix']}{i % cmd['accounts']}"
    path = "/ws" if cmd["kind"] == "relay" else f"/ws?account={account}"
    try:
        ws = await WsClient.connect("127.0.0.1", cmd["port"], path, deflate=cmd["deflate"])
    except (OSError, TimeoutError) as exc:
        return f"connect: {type(exc).__name__} {exc}"[:120]
    sock_token = ""
    try:
        if cmd["kind"] == "relay":
            init = json.loads(await ws.recv())
            if init["type"] != "init":
                raise RuntimeError(f"expected init: {init}")
            ws.send(json.dumps({"type": "auth", "data": token(user, account)}).encode())
            reply = json.loads(await ws.recv())
            if reply["type"] != "token":
                raise RuntimeError(f"auth: {reply}")
            sock_token = reply["data"]
            if cmd["channel"]:
                join = {"type": "join", "data": cmd["channel"], "token": sock_token}
                for attempt in range(1, 6):
                    ws.send(json.dumps(join).encode())
                    reply = json.loads(await ws.recv())
                    if reply["type"] != "error" or "try again" not in reply["data"]:
                        break
                    # What a real client does when told to try again; counted and reported.
                    st.retried += 1
                    await asyncio.sleep(0.2 * attempt)
                if reply["type"] != "joined":
                    raise RuntimeError(f"join: {reply}")
    except (OSError, TimeoutError, RuntimeError, ValueError, KeyError) as exc:
        ws.close()
        return f"{type(exc).__name__}: {exc}"[:120]
    role = cmd["role"]
    if role == "chat":
        member = ChatMember(st.lat, cmd["channel"])
        ws.handler = member
        st.chat.append(member)
    elif role == "db":
        sub = DbSubscriber(account, st.ns, st.ts)
        ws.handler = sub
        st.db.append(sub)
    else:
        ws.handler = _idle
    st.sockets.append(ws)
    st.tokens.append(sock_token)
    return None


async def op_open(st: FleetState, cmd: dict[str, Any]) -> dict[str, Any]:
    st.kind, st.channel = cmd["kind"], cmd["channel"]
    sem = asyncio.Semaphore(cmd.get("concurrency", 100))
    errors: dict[str, int] = {}

    async def one(i: int) -> None:
        async with sem:
            err = await _open_one(st, cmd, i)
        if err:
            key = re.sub(r"[0-9a-f-]{36}", "<id>", err)
            errors[key] = errors.get(key, 0) + 1

    # Sockets that must come first/last (publisher, flow-control tail) are opened
    # one by one (concurrency 1), so their order in the fleet is their join order.
    before, retried = len(st.sockets), st.retried
    await asyncio.gather(*(one(i) for i in range(cmd["first"], cmd["first"] + cmd["count"])))
    deflate = sum(1 for s in st.sockets[before:] if s.deflate)
    return {
        "open": len(st.sockets) - before,
        "errors": errors,
        "deflate": deflate,
        "retried": st.retried - retried,
    }


def _publish_frame(st: FleetState, seq: int) -> bytes:
    data = f"{seq} {time.monotonic():.6f}"
    if st.kind == "relay":
        return (
            f'{{"type":"chan_in","channel":"{st.channel}","token":"{st.tokens[0]}",'
            f'"data":"{data}"}}'
        ).encode()
    return (
        f'{{"sid":"","type":"chan_out","data":"{data}","channel":"{st.channel}","token":""}}'
    ).encode()


async def op_publish(st: FleetState, cmd: dict[str, Any]) -> dict[str, Any]:
    """Publish on the first socket; the last socket (joined last) is the flow control.

    bursty: bursts of ``burst`` publishes back to back, at most two bursts in flight
    (burst k+1 is sent once the tail member has received burst k-1).
    steady: ``rate`` publishes/s on an open-loop schedule; fails if the tail member
    falls more than ``max_lag`` publishes behind.
    """
    pub, tail = st.sockets[0], st.chat[-1]
    seq = start = cmd["start_seq"]
    seconds, within = cmd["seconds"], cmd.get("tail_within", 10.0)
    failure = ""
    t0 = time.monotonic()
    end = t0 + seconds
    try:
        if cmd["mode"] == "bursty":
            burst = cmd["burst"]
            while time.monotonic() < end:
                for _ in range(burst):
                    pub.send(_publish_frame(st, seq))
                    seq += 1
                await tail.wait_for(seq - burst, within)
        else:
            rate, max_lag = cmd["rate"], cmd.get("max_lag", 2000)
            i = 0
            while True:
                due = t0 + i / rate
                if due >= end:
                    break
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                pub.send(_publish_frame(st, seq))
                seq += 1
                i += 1
                if seq - tail.next_seq > max_lag:
                    failure = f"the tail member fell {seq - tail.next_seq} publishes behind"
                    break
        sent_s = time.monotonic() - t0
        if not failure:
            await tail.wait_for(seq, within)
    except TimeoutError:
        sent_s = time.monotonic() - t0
        failure = f"the tail member got {tail.next_seq} of {seq} publishes within {within} s"
    return {"published": seq - start, "end_seq": seq, "seconds": sent_s, "failure": failure}


def op_chat_stats(st: FleetState, cmd: dict[str, Any]) -> dict[str, Any]:
    """Per-phase figures and checks against ``end_seq`` (publishes so far)."""
    end_seq = cmd["end_seq"]
    done = sum(1 for m in st.chat if m.next_seq >= end_seq)
    problems = [p for m in st.chat for p in m.problems][:5]
    closed = sum(1 for s in st.sockets if s.closed.done())
    res = {
        "members": len(st.chat),
        "done": done,
        "received": sum(m.count for m in st.chat),
        "bad": sum(m.bad for m in st.chat),
        "closed": closed,
        "close_codes": sorted({s.close_code for s in st.sockets if s.closed.done()}),
        "problems": problems,
        "last_at": max((m.last_at for m in st.chat), default=0.0),
        "cpu": self_cpu(),
    }
    if cmd.get("collect"):
        res["lat"] = st.lat.tobytes()
        del st.lat[:]
        for m in st.chat:
            m.count = 0
    return res


def op_db_stats(st: FleetState, cmd: dict[str, Any]) -> dict[str, Any]:
    """How far the subscribers are; the checks: exactly the rows each may read.

    The phase's rows are numbered base..base+total-1; with ``mod`` the row n belongs to
    account ``<prefix><n % mod>``, else every row belongs to account ``hot``.
    """
    base, total, mod, hot = cmd["base"], cmd["total"], cmd.get("mod", 0), cmd.get("hot", "")
    prefix = cmd.get("account_prefix", "a")
    end = base + total
    missing = unexpected = complete = 0
    problems: list[str] = []
    for sub in st.db:
        if mod:
            k = int(sub.account[len(prefix) :])
            want = len(range(base + (k - base) % mod, end, mod))
            wrong = sum(1 for n in sub.seen if n % mod != k or not base <= n < end)
        elif sub.account == hot:
            want = total
            wrong = sum(1 for n in sub.seen if not base <= n < end)
        else:
            want, wrong = 0, len(sub.seen)
        got = len(sub.seen) - wrong
        missing += want - got
        unexpected += wrong
        complete += got == want
        if sub.other and len(problems) < 3:
            problems.append(f"{sub.account}: other frame {sub.other[0]!r}")
    res: dict[str, Any] = {
        "subscribers": len(st.db),
        "received": len(st.ns),
        "complete": complete,
        "missing": missing,
        "unexpected": unexpected,
        "dups": sum(s.dups for s in st.db),
        "order_bad": sum(s.order_bad for s in st.db),
        "closed": sum(1 for s in st.sockets if s.closed.done()),
        "problems": problems,
        "last_at": max(st.ts, default=0.0),
        "cpu": self_cpu(),
    }
    if cmd.get("collect"):
        res["ns"], res["ts"] = st.ns.tobytes(), st.ts.tobytes()
        del st.ns[:]
        del st.ts[:]
        for sub in st.db:
            sub.seen.clear()
            sub.dups = sub.order_bad = 0
    return res


def _fleet_main(conn: Any) -> None:
    quiet_logs()
    raise_fd_limit()
    st = FleetState()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        async def handle(cmd: dict[str, Any]) -> None:
            op = cmd["op"]
            try:
                if op == "open":
                    res = await op_open(st, cmd)
                elif op == "publish":
                    res = await op_publish(st, cmd)
                elif op == "chat_stats":
                    res = op_chat_stats(st, cmd)
                elif op == "db_stats":
                    res = op_db_stats(st, cmd)
                elif op == "close":
                    for s in st.sockets:
                        s.close()
                    await asyncio.sleep(0.2)
                    res = {}
                    stop.set()
                else:
                    res = {"error": f"unknown op {op}"}
            except Exception as exc:  # reported to the parent, which fails the scenario
                res = {"error": f"{op}: {type(exc).__name__}: {exc}"}
            conn.send(res)

        def dispatch(cmd: dict[str, Any] | None) -> None:
            if cmd is None:
                stop.set()
            else:
                tasks.add(asyncio.ensure_future(handle(cmd)))

        def read_commands() -> None:
            # A thread blocks on the pipe: an event-loop reader would make the pipe
            # non-blocking (libuv does), and a large reply would then be cut short.
            while not stop.is_set():
                try:
                    cmd = conn.recv()
                except (EOFError, OSError):
                    cmd = None
                loop.call_soon_threadsafe(dispatch, cmd)
                if cmd is None or cmd.get("op") == "close":
                    return

        tasks: set[asyncio.Future[None]] = set()
        conn.send({"ready": True})
        reader = threading.Thread(target=read_commands, daemon=True)
        reader.start()
        await stop.wait()

    with contextlib.suppress(KeyboardInterrupt):
        run_fast(main())


class Fleet:
    """A load-generator process; :meth:`call` sends one command and waits for its reply."""

    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_fleet_main, args=(child,), daemon=True)
        self.proc.start()
        if not self._conn.poll(60):
            raise RuntimeError("load generator did not start")
        self._conn.recv()

    def send(self, **cmd: Any) -> None:
        self._conn.send(cmd)

    def reply(self, within: float) -> dict[str, Any]:
        if not self._conn.poll(within):
            raise TimeoutError(f"load generator gave no answer within {within:.0f} s")
        res: dict[str, Any] = self._conn.recv()
        if res.get("error"):
            raise RuntimeError(res["error"])
        return res

    def call(self, within: float = 120, **cmd: Any) -> dict[str, Any]:
        self.send(**cmd)
        return self.reply(within)

    def stop(self) -> None:
        if self.proc.is_alive():
            with contextlib.suppress(OSError, EOFError, TimeoutError, RuntimeError):
                self.call(within=10, op="close")
            self.proc.join(5)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)


async def call_all(fleets: list[Fleet], within: float = 120, **cmd: Any) -> list[dict[str, Any]]:
    """The same command to several fleets at once; their replies in order."""
    for f in fleets:
        f.send(**cmd)
    return await asyncio.to_thread(lambda: [f.reply(within) for f in fleets])


async def open_spread(
    fleets: list[Fleet], first: int, count: int, within: float = 600, **cmd: Any
) -> list[dict[str, Any]]:
    """Open ``count`` sockets numbered from ``first``, spread evenly over the fleets
    (``op="open"`` with ``cmd``); the fleets' replies in order."""
    per = [count // len(fleets) + (i < count % len(fleets)) for i in range(len(fleets))]
    start = first
    for f, n in zip(fleets, per, strict=True):
        f.send(op="open", first=start, count=n, **cmd)
        start += n
    return await asyncio.to_thread(lambda: [f.reply(within) for f in fleets])
