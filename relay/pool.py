"""The relay's pool of PostgreSQL connections, with every wait on it bounded.

Checking a connection out waits at most ``acquire_timeout`` seconds and every
query at most ``query_timeout`` seconds, so no client, however it behaves,
can keep the pool's connections for itself: code that must wait on a client
(a replay waiting for a slow reader) gives its connection back first. The
pool remembers when each connection it lent went out; ``wedged`` reports a
pool whose connections are all lent and one of them for far longer than any
query may take, which the liveness check turns into a failure.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

ACQUIRE_TIMEOUT = 5.0
QUERY_TIMEOUT = 10.0
# A connection lent for longer than this is stuck, not busy: nothing the
# relay does holds one across a wait on a client.
STUCK_SECONDS = 60.0


class Database:
    """An asyncpg pool whose checkouts and queries are all timed."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        max_size: int,
        acquire_timeout: float = ACQUIRE_TIMEOUT,
        query_timeout: float = QUERY_TIMEOUT,
        stuck_seconds: float = STUCK_SECONDS,
    ) -> None:
        self._pool = pool
        self.max_size = max_size
        self.acquire_timeout = acquire_timeout
        self.query_timeout = query_timeout
        self.stuck_seconds = stuck_seconds
        self._lent: dict[int, float] = {}  # id of the checkout -> monotonic time lent

    @classmethod
    async def connect(
        cls,
        url: str,
        max_size: int = 10,
        acquire_timeout: float = ACQUIRE_TIMEOUT,
        query_timeout: float = QUERY_TIMEOUT,
        stuck_seconds: float = STUCK_SECONDS,
    ) -> Database:
        pool = await asyncpg.create_pool(
            url,
            min_size=1,
            max_size=max_size,
            timeout=acquire_timeout,  # connecting a new pool member
            command_timeout=query_timeout,
        )
        return cls(pool, max_size, acquire_timeout, query_timeout, stuck_seconds)

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[asyncpg.Connection]:
        """A connection for a few queries; raises TimeoutError when none frees up in time."""
        conn = await self._pool.acquire(timeout=self.acquire_timeout)
        token = id(conn)
        self._lent[token] = time.monotonic()
        try:
            yield conn
        finally:
            self._lent.pop(token, None)
            await self._pool.release(conn)

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        async with self.acquire() as conn:
            rows: list[asyncpg.Record] = await conn.fetch(query, *args)
            return rows

    async def fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None:
        async with self.acquire() as conn:
            row: asyncpg.Record | None = await conn.fetchrow(query, *args)
            return row

    async def fetchval(self, query: str, *args: Any) -> Any:
        async with self.acquire() as conn:
            return await conn.fetchval(query, *args)

    def longest_checkout(self) -> float:
        """Seconds the longest-lent connection has been out (0 when none is)."""
        if not self._lent:
            return 0.0
        return time.monotonic() - min(self._lent.values())

    @property
    def wedged(self) -> bool:
        """Every connection lent, and one of them stuck: new work would wait forever."""
        return len(self._lent) >= self.max_size and self.longest_checkout() > self.stuck_seconds

    def stats(self) -> dict[str, Any]:
        return {
            "size": self.max_size,
            "in_use": len(self._lent),
            "longest_checkout_seconds": round(self.longest_checkout(), 3),
        }

    async def close(self) -> None:
        await self._pool.close()
