"""Apps (tenants) and their plans: which app a connection belongs to and its caps.

An app is named by its public key (``SB-PUBLIC-KEY`` header or ``pk`` query
parameter); no key means the default app. Lookups are cached briefly, and
concurrent lookups of one key share one query, so a reconnect storm does not
turn into a query storm. While the database is unreachable, the last known
answer is used (the default app is always known).

The management functions below (``relay app ...`` and ``relay plan ...``)
work on one asyncpg connection, like ``relay.repos``.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import re
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Literal

import asyncpg

from relay.auth import TokenVerifier, load_public_key
from relay.pool import Database
from relay.schema import DEFAULT_APP, DEFAULT_PLAN

log = logging.getLogger("relay.apps")

CACHE_SECONDS = 5.0
# Cached answers kept at most; unknown keys are cached too, so random keys
# cannot grow the cache (or the query rate) without bound.
CACHE_ENTRIES = 10_000
MAX_PUBLIC_KEY = 200
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_DB_DOWN = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError)


class PlanError(Exception):
    """A plan or app command cannot be done; the message says why."""


class AppsUnavailable(Exception):
    """The database is unreachable and this public key has never been looked up."""


_LOOKUP_SQL = """
SELECT a.id, a.public_key, a.origins, a.suspended,
       a.jwt_secret, a.jwt_public_key, a.jwks_url, a.audience, a.issuer,
       p.max_connections, p.max_channels_per_socket, p.messages_per_second,
       EXISTS (
           SELECT 1 FROM relay.apps b
           WHERE b.id <> a.id AND (b.jwt_secret = a.jwt_secret
                OR b.jwt_public_key = a.jwt_public_key OR b.jwks_url = a.jwks_url)
       ) AS shares_key
FROM relay.apps a JOIN relay.plans p ON p.name = a.plan
WHERE {where}
"""
SUSPENDED = "app suspended: its connections are refused; ask the app's operator"
DELETED = "app deleted: this app no longer exists on this relay"
# Names an app may not take: its tables live in a schema of its name.
RESERVED_NAMES = frozenset({"relay", "public", "information_schema"})


@dataclass(frozen=True, slots=True)
class App:
    id: str
    origins: tuple[str, ...] = ()
    max_connections: int | None = None
    max_channels_per_socket: int | None = None
    messages_per_second: int | None = None
    # How this app's session tokens are verified (None: the app cannot authenticate).
    verifier: TokenVerifier | None = None
    public_key: str | None = None
    suspended: bool = False

    def allows_origin(self, origin: str | None) -> bool:
        """Browsers always send Origin; clients that send none (apps, servers) are
        not browsers, and an allow-list cannot stop them anyway."""
        if not self.origins or origin is None:
            return True
        return normalize_origin(origin) in self.origins


class AppDirectory:
    def __init__(
        self,
        pool: Database,
        default_max_connections: int | None,
        default_verifier: TokenVerifier | None = None,
        default_secret: str | None = None,
        default_public_key: str | None = None,
    ) -> None:
        self._pool = pool
        self._default_cap = default_max_connections
        # The default app verifies with the relay's own settings; an app that
        # shares that key (or has none of its own, as apps made before keys
        # were per app) must have its tokens name it in 'aud'.
        self._default_verifier = default_verifier
        self._default_secret = default_secret
        self._default_public_key = default_public_key
        self._default_keys = frozenset(k for k in (default_secret, default_public_key) if k)
        self.account_claim = default_verifier.account_claim if default_verifier else "account_id"
        self._max_ttl = default_verifier.max_ttl_seconds if default_verifier else None
        self._cache: dict[str, tuple[float, App | None]] = {}
        self._inflight: dict[str, asyncio.Future[App | None]] = {}

    async def lookup(self, public_key: str) -> App | None:
        """The app for a public key ('' = the default app), or None if unknown.

        Raises :class:`AppsUnavailable` when the database cannot be asked and
        there is no earlier answer for this key.
        """
        if len(public_key) > MAX_PUBLIC_KEY:
            return None
        hit = self._cache.get(public_key)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        pending = self._inflight.get(public_key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[App | None] = asyncio.get_running_loop().create_future()
        self._inflight[public_key] = future
        try:
            app = await self._resolve(public_key, hit)
        except BaseException as err:
            if isinstance(err, asyncio.CancelledError):
                future.cancel()
            else:
                future.set_exception(err)
                future.exception()  # mark retrieved: there may be no other waiter
            raise
        finally:
            del self._inflight[public_key]
        future.set_result(app)
        return app

    async def _resolve(self, public_key: str, hit: tuple[float, App | None] | None) -> App | None:
        try:
            app = await self._query(public_key)
        except _DB_DOWN as err:
            if hit is not None:
                return hit[1]  # stale, but the best answer there is
            if not public_key:
                return self._default_app()
            raise AppsUnavailable(f"database unreachable ({type(err).__name__})") from err
        self._remember(public_key, app)
        return app

    async def _query(self, public_key: str) -> App | None:
        if public_key:
            row = await self._pool.fetchrow(
                _LOOKUP_SQL.format(where="a.public_key = $1"), public_key
            )
        else:
            row = await self._pool.fetchrow(_LOOKUP_SQL.format(where="a.id = $1"), DEFAULT_APP)
        if row is None:
            return self._default_app() if not public_key else None
        is_default = row["id"] == DEFAULT_APP
        cap = row["max_connections"]
        if is_default and self._default_cap is not None:
            cap = self._default_cap
        return App(
            id=row["id"],
            origins=tuple(row["origins"] or ()),
            max_connections=cap,
            max_channels_per_socket=row["max_channels_per_socket"],
            messages_per_second=row["messages_per_second"],
            verifier=self._default_verifier if is_default else self._verifier(row),
            public_key=row["public_key"],
            suspended=row["suspended"],
        )

    def _default_app(self) -> App:
        return App(
            id=DEFAULT_APP, max_connections=self._default_cap, verifier=self._default_verifier
        )

    def _verifier(self, row: asyncpg.Record) -> TokenVerifier | None:
        keys = {row["jwt_secret"], row["jwt_public_key"], row["jwks_url"]} - {None}
        own = bool(keys)
        if not own and not self._default_keys:
            return None
        try:
            return TokenVerifier(
                secret=row["jwt_secret"] if own else self._default_secret,
                public_key=row["jwt_public_key"] if own else self._default_public_key,
                jwks_url=row["jwks_url"],
                account_claim=self.account_claim,
                audience=row["audience"] or row["id"],
                issuer=row["issuer"],
                audience_required=not own or row["shares_key"] or bool(keys & self._default_keys),
                max_ttl_seconds=self._max_ttl,
            )
        except (OSError, ValueError) as err:  # an unreadable PEM path, say
            log.warning("app key unusable app=%s error=%s", row["id"], type(err).__name__)
            return None

    def _remember(self, public_key: str, app: App | None) -> None:
        now = time.monotonic()
        if len(self._cache) >= CACHE_ENTRIES:
            self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
            if len(self._cache) >= CACHE_ENTRIES:
                self._cache.clear()
        self._cache[public_key] = (now + CACHE_SECONDS, app)

    def forget(self) -> None:
        self._cache.clear()

    async def states(self, app_ids: Iterable[str]) -> dict[str, bool]:
        """Whether each of these apps is suspended; an app missing from the answer is deleted."""
        rows = await self._pool.fetch(
            "SELECT id, suspended FROM relay.apps WHERE id = ANY($1::text[])", list(app_ids)
        )
        return {r["id"]: r["suspended"] for r in rows}


# --- management: relay plan ... / relay app ... ---------------------------------


class _Keep(enum.Enum):
    KEEP = "keep"


# A plan field left out of an update keeps its value; None sets it to unlimited.
KEEP: Final = _Keep.KEEP
LimitChange = int | Literal[_Keep.KEEP] | None


@dataclass(frozen=True, slots=True)
class Plan:
    name: str
    max_connections: int | None = None
    max_channels_per_socket: int | None = None
    messages_per_second: int | None = None


@dataclass(frozen=True, slots=True)
class AppRecord:
    id: str
    public_key: str | None
    plan: str
    origins: tuple[str, ...] = ()
    jwt_secret: str | None = None
    jwt_public_key: str | None = None
    jwks_url: str | None = None
    audience: str | None = None
    issuer: str | None = None
    suspended: bool = False


def normalize_origin(origin: str) -> str:
    """'HTTPS://Example.com/' -> 'https://example.com' (how browsers send it)."""
    return origin.strip().rstrip("/").lower()


def _check_name(kind: str, name: str) -> str:
    if not _NAME.fullmatch(name):
        raise PlanError(f"not a valid {kind} name: {name!r} (1-64 letters, digits, _ . -)")
    return name


def _check_limit(field: str, value: int | None, minimum: int) -> int | None:
    if value is not None and value < minimum:
        raise PlanError(f"{field} must be at least {minimum} (or unlimited), got {value}")
    return value


def _plan(row: asyncpg.Record) -> Plan:
    return Plan(
        row["name"],
        row["max_connections"],
        row["max_channels_per_socket"],
        row["messages_per_second"],
    )


def _app(row: asyncpg.Record) -> AppRecord:
    return AppRecord(
        row["id"],
        row["public_key"],
        row["plan"],
        tuple(row["origins"] or ()),
        jwt_secret=row["jwt_secret"],
        jwt_public_key=row["jwt_public_key"],
        jwks_url=row["jwks_url"],
        audience=row["audience"],
        issuer=row["issuer"],
        suspended=row["suspended"],
    )


async def create_plan(
    conn: asyncpg.Connection,
    name: str,
    max_connections: int | None = None,
    max_channels_per_socket: int | None = None,
    messages_per_second: int | None = None,
) -> Plan:
    """A new plan; None means unlimited (for rate and channels: the relay's default)."""
    _check_name("plan", name)
    try:
        row = await conn.fetchrow(
            "INSERT INTO relay.plans (name, max_connections, max_channels_per_socket,"
            " messages_per_second) VALUES ($1, $2, $3, $4) RETURNING *",
            name,
            _check_limit("max connections", max_connections, 0),
            _check_limit("max channels", max_channels_per_socket, 1),
            _check_limit("messages per second", messages_per_second, 1),
        )
    except asyncpg.UniqueViolationError:
        raise PlanError(f"plan {name!r} already exists: change it with relay plan set") from None
    return _plan(row)


async def update_plan(
    conn: asyncpg.Connection,
    name: str,
    max_connections: LimitChange = KEEP,
    max_channels_per_socket: LimitChange = KEEP,
    messages_per_second: LimitChange = KEEP,
) -> Plan:
    """Change the given fields of a plan (running relays see it within CACHE_SECONDS)."""
    changes = {
        "max_connections": (max_connections, 0),
        "max_channels_per_socket": (max_channels_per_socket, 1),
        "messages_per_second": (messages_per_second, 1),
    }
    sets: list[str] = []
    values: list[int | None] = []
    for column, (value, minimum) in changes.items():
        if value is KEEP:
            continue
        values.append(_check_limit(column.replace("_", " "), value, minimum))
        sets.append(f"{column} = ${len(values) + 1}")
    if sets:
        row = await conn.fetchrow(
            f"UPDATE relay.plans SET {', '.join(sets)} WHERE name = $1 RETURNING *", name, *values
        )
    else:
        row = await conn.fetchrow("SELECT * FROM relay.plans WHERE name = $1", name)
    if row is None:
        raise PlanError(f"no plan named {name!r}: see relay plan list")
    return _plan(row)


async def list_plans(conn: asyncpg.Connection) -> list[Plan]:
    return [_plan(r) for r in await conn.fetch("SELECT * FROM relay.plans ORDER BY name")]


def new_public_key() -> str:
    return "pk_" + secrets.token_urlsafe(24)


async def create_app(
    conn: asyncpg.Connection,
    name: str,
    public_key: str | None = None,
    plan: str = DEFAULT_PLAN,
    origins: Iterable[str] = (),
    jwt_secret: str | None = None,
    jwt_public_key: str | None = None,
    jwks_url: str | None = None,
    audience: str | None = None,
    issuer: str | None = None,
) -> AppRecord:
    """A new app; its public key, and an HS256 secret unless a key is given, are generated."""
    _check_name("app", name)
    if name.lower() in RESERVED_NAMES or name.lower().startswith("pg_"):
        raise PlanError(f"{name!r} is reserved: an app's tables live in a schema of its name")
    key = public_key if public_key is not None else new_public_key()
    if not key or len(key) > MAX_PUBLIC_KEY or not key.isprintable() or " " in key:
        raise PlanError(f"a public key is 1-{MAX_PUBLIC_KEY} printable characters, no spaces")
    given = [k for k in (jwt_secret, jwt_public_key, jwks_url) if k]
    if len(given) > 1:
        raise PlanError("give one of --jwt-secret, --jwt-public-key, --jwks-url")
    if jwt_public_key:
        try:  # stored as PEM text, so every relay reads the same key
            jwt_public_key = load_public_key(jwt_public_key)
            TokenVerifier(public_key=jwt_public_key)
        except (OSError, ValueError) as err:
            raise PlanError(f"cannot read the public key: {err}") from None
    if jwks_url and not jwks_url.startswith(("https://", "http://")):
        raise PlanError(f"not a JWKS URL: {jwks_url!r} (expected https://...)")
    if not given:
        jwt_secret = secrets.token_urlsafe(48)
    try:
        row = await conn.fetchrow(
            "INSERT INTO relay.apps (id, public_key, plan, origins, jwt_secret, jwt_public_key,"
            " jwks_url, audience, issuer) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING *",
            name,
            key,
            plan,
            _origins(origins),
            jwt_secret,
            jwt_public_key,
            jwks_url,
            audience,
            issuer,
        )
    except asyncpg.ForeignKeyViolationError:
        raise PlanError(f"no plan named {plan!r}: create it with relay plan create") from None
    except asyncpg.UniqueViolationError as err:
        what = "public key" if "public_key" in str(err.constraint_name) else "app name"
        raise PlanError(f"an app with this {what} already exists") from None
    return _app(row)


async def get_app(conn: asyncpg.Connection, name: str) -> AppRecord:
    row = await conn.fetchrow("SELECT * FROM relay.apps WHERE id = $1", name)
    if row is None:
        raise PlanError(f"no app named {name!r}: see relay app list")
    return _app(row)


async def suspend_app(conn: asyncpg.Connection, name: str) -> AppRecord:
    """Refuse the app's new connections and close its open ones (within CACHE_SECONDS)."""
    return await _set_suspended(conn, name, True)


async def resume_app(conn: asyncpg.Connection, name: str) -> AppRecord:
    return await _set_suspended(conn, name, False)


async def _set_suspended(conn: asyncpg.Connection, name: str, suspended: bool) -> AppRecord:
    if name == DEFAULT_APP and suspended:
        raise PlanError("the default app cannot be suspended")
    row = await conn.fetchrow(
        "UPDATE relay.apps SET suspended = $2 WHERE id = $1 RETURNING *", name, suspended
    )
    if row is None:
        raise PlanError(f"no app named {name!r}: see relay app list")
    return _app(row)


async def delete_app(conn: asyncpg.Connection, name: str, unwatch: bool = False) -> None:
    """Delete an app; refused while it owns watched tables, unless ``unwatch`` them first."""
    if name == DEFAULT_APP:
        raise PlanError("the default app cannot be deleted")
    async with conn.transaction():
        await get_app(conn, name)
        owned = await conn.fetchval(
            "SELECT count(*) FROM (SELECT 1 FROM relay.watched WHERE app = $1 FOR UPDATE) w",
            name,
        )
        if owned and not unwatch:
            raise PlanError(
                f"app {name!r} still owns {owned} watched table(s): unwatch them "
                "(relay repo unwatch ... --app) or pass --unwatch"
            )
        await conn.execute(
            "SELECT relay.unwatch(table_oid) FROM relay.watched WHERE app = $1"
            " AND EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = table_oid)",
            name,
        )
        await conn.execute("DELETE FROM relay.watched WHERE app = $1", name)  # dropped tables
        await conn.execute("DELETE FROM relay.apps WHERE id = $1", name)


async def list_apps(conn: asyncpg.Connection) -> list[AppRecord]:
    return [_app(r) for r in await conn.fetch("SELECT * FROM relay.apps ORDER BY id")]


async def set_app_plan(conn: asyncpg.Connection, name: str, plan: str) -> AppRecord:
    try:
        row = await conn.fetchrow(
            "UPDATE relay.apps SET plan = $2 WHERE id = $1 RETURNING *", name, plan
        )
    except asyncpg.ForeignKeyViolationError:
        raise PlanError(f"no plan named {plan!r}: create it with relay plan create") from None
    if row is None:
        raise PlanError(f"no app named {name!r}: see relay app list")
    return _app(row)


async def set_app_origins(conn: asyncpg.Connection, name: str, origins: Sequence[str]) -> AppRecord:
    """Replace the app's Origin allow-list; an empty list allows every origin."""
    row = await conn.fetchrow(
        "UPDATE relay.apps SET origins = $2 WHERE id = $1 RETURNING *", name, _origins(origins)
    )
    if row is None:
        raise PlanError(f"no app named {name!r}: see relay app list")
    return _app(row)


def _origins(origins: Iterable[str]) -> list[str]:
    found: list[str] = []
    for origin in origins:
        norm = normalize_origin(origin)
        if "://" not in norm:
            raise PlanError(f"not an origin: {origin!r} (expected scheme://host[:port])")
        if norm not in found:
            found.append(norm)
    return found
