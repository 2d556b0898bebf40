"""Apps (tenants) and their plans: which app a connection belongs to and its caps.

An app is named by its public key (``SB-PUBLIC-KEY`` header or ``pk`` query
parameter); no key means the default app. Lookups are cached briefly so a
reconnect storm does not turn into a query storm.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import asyncpg

from relay.schema import DEFAULT_APP

CACHE_SECONDS = 5.0

_LOOKUP_SQL = """
SELECT a.id, a.origins, p.max_connections, p.max_channels_per_socket, p.messages_per_second
FROM relay.apps a JOIN relay.plans p ON p.name = a.plan
WHERE {where}
"""


@dataclass(frozen=True, slots=True)
class App:
    id: str
    origins: tuple[str, ...] = ()
    max_connections: int | None = None
    max_channels_per_socket: int | None = None
    messages_per_second: int | None = None

    def allows_origin(self, origin: str | None) -> bool:
        return not self.origins or origin in self.origins


class AppDirectory:
    def __init__(self, pool: asyncpg.Pool, default_max_connections: int | None) -> None:
        self._pool = pool
        self._default_cap = default_max_connections
        self._cache: dict[str, tuple[float, App | None]] = {}

    async def lookup(self, public_key: str) -> App | None:
        """The app for a public key ('' = the default app), or None if unknown."""
        now = time.monotonic()
        hit = self._cache.get(public_key)
        if hit is not None and hit[0] > now:
            return hit[1]
        if public_key:
            row = await self._pool.fetchrow(
                _LOOKUP_SQL.format(where="a.public_key = $1"), public_key
            )
        else:
            row = await self._pool.fetchrow(_LOOKUP_SQL.format(where="a.id = $1"), DEFAULT_APP)
        app = None
        if row is not None:
            cap = row["max_connections"]
            if row["id"] == DEFAULT_APP and self._default_cap is not None:
                cap = self._default_cap
            app = App(
                id=row["id"],
                origins=tuple(row["origins"] or ()),
                max_connections=cap,
                max_channels_per_socket=row["max_channels_per_socket"],
                messages_per_second=row["messages_per_second"],
            )
        elif not public_key:
            app = App(id=DEFAULT_APP, max_connections=self._default_cap)
        self._cache[public_key] = (now + CACHE_SECONDS, app)
        return app

    def forget(self) -> None:
        self._cache.clear()
