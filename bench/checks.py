"""What a load-generator socket checks about each frame it receives (see loadgen.py).

:class:`ChatMember` checks chat frames (seq exactly 0, 1, 2, ... and a sample decoded
in full) and notes publish->receive latency; :class:`DbSubscriber` notes the row of
each ``db_created`` frame and checks its ``pos`` order.
"""

from __future__ import annotations

import asyncio
import json
import re
from array import array
from typing import Any

SAMPLE_EVERY = 64
_N = re.compile(rb'\\"n\\": ?(\d+)')


class ChatMember:
    """Checks one member's chat frames; latencies go to the fleet-wide array."""

    __slots__ = ("bad", "channel", "count", "k", "last_at", "lat", "next_seq", "problems", "waiter")

    def __init__(self, lat: array[float], channel: str) -> None:
        self.lat, self.channel = lat, channel
        self.next_seq = 0
        self.count = 0
        self.bad = 0
        self.k = 0
        self.last_at = 0.0
        self.problems: list[str] = []
        self.waiter: tuple[int, asyncio.Future[None]] | None = None

    def __call__(self, p: bytes, now: float) -> None:
        if b'"type":"chan_out"' not in p:
            if b'"type":"ok"' not in p:
                self.problem(f"unexpected frame {p[:160]!r}")
            return
        i = p.find(b'"data":"') + 8
        j = p.find(b'"', i)
        sp = p.find(b" ", i, j)
        try:
            seq = int(p[i:sp])
            self.lat.append(now - float(p[sp + 1 : j]))
        except ValueError:
            self.bad += 1
            self.problem(f"malformed frame {p[:160]!r}")
            return
        if seq != self.next_seq:
            self.bad += 1
            self.problem(f"seq {seq}, expected {self.next_seq}")
        self.next_seq = seq + 1
        self.count += 1
        self.last_at = now
        self.k += 1
        if self.k % SAMPLE_EVERY == 0:
            f = json.loads(p)
            if f["type"] != "chan_out" or f["channel"] != self.channel:
                self.bad += 1
                self.problem(f"bad frame {p[:160]!r}")
        w = self.waiter
        if w is not None and self.next_seq >= w[0]:
            self.waiter = None
            if not w[1].done():
                w[1].set_result(None)

    def problem(self, text: str) -> None:
        if len(self.problems) < 3:
            self.problems.append(text)

    async def wait_for(self, seq: int, within: float) -> None:
        if self.next_seq >= seq:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiter = (seq, fut)
        await asyncio.wait_for(fut, within)


class DbSubscriber:
    __slots__ = ("account", "dups", "last_pos", "ns", "order_bad", "other", "seen", "ts")

    def __init__(self, account: str, ns: array[int], ts: array[float]) -> None:
        self.account = account
        self.ns, self.ts = ns, ts
        self.seen: set[int] = set()
        self.dups = 0
        self.order_bad = 0
        self.other: list[bytes] = []
        self.last_pos: Any = ()

    def __call__(self, p: bytes, now: float) -> None:
        if b'"type":"db_created"' not in p:
            if len(self.other) < 3:
                self.other.append(p[:160])
            return
        m = _N.search(p)
        if m is None:
            self.other.append(p[:160])
            return
        n = int(m.group(1))
        i = p.find(b'"pos":"')
        if i >= 0:
            i += 7
            raw = p[i : p.find(b'"', i)]
            try:
                pos: tuple[int, ...] | tuple[bytes] = tuple(int(x) for x in raw.split(b"-"))
            except ValueError:  # an opaque pos: compared as a string
                pos = (raw,)
            if pos <= self.last_pos:
                self.order_bad += 1
            self.last_pos = pos
        if n in self.seen:
            self.dups += 1
        else:
            self.seen.add(n)
        self.ns.append(n)
        self.ts.append(now)
