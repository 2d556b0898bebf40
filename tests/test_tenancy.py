"""Apps (tenants) are sealed from each other, end to end.

A real relay, the session's real PostgreSQL, real WebSocket clients, several
apps at once. Covers each cross-tenant attempt (refused or silent, always
after a positive control on the same or a same-app socket): an app's token on
another app's socket and on the default app's socket; two apps sharing one
HS256 secret, or sharing the default app's secret (``aud`` decides); joining
another app's repository; the same repository name and the same user and
account ids in several apps; root tokens; chat channels of the same name;
suspended and deleted apps. Then a seeded randomized run of four tenants
writing to same-named ``_744_``, ``_760_`` and ``_700_`` tables while their
users listen; apps verifying with a PEM public key and with a JWKS URL whose
keys rotate; and the ``relay app`` / ``relay token --app`` / ``relay repo
create --app`` commands used on a real relay.

The database is shared by the whole test session: every app here has a fresh
name and is deleted (its tables unwatched) when its test ends.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import os
import random
import re
import secrets
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from relay import plans
from relay.auth import mint_token
from relay.config import Settings
from relay.db import read_migration_sql, run_migrations
from relay.plans import AppRecord, PlanError
from relay.repos import RepoError, create_repo, list_repos, repo_table_sql, watch
from relay.server import create_app as create_relay_app
from tests.conftest import JWT_SECRET, RelayHandle, WsClient, free_port, random_name

CLI = [sys.executable, "-m", "relay.cli"]
POLICY = 1008  # the close code of a refused or ended app
# Long enough for the relay's background app check (0.2 s in these tests) on a
# busy machine; a bound on waiting, never a measured duration.
SHUT_WAIT = 15.0


def fresh_app_name() -> str:
    """A unique app name that is also a plain SQL identifier (it names the app's schema)."""
    return f"a{secrets.token_hex(4)}"


def fresh_repo(suffix: str) -> str:
    return f"t{secrets.token_hex(4)}{suffix}"


@dataclass(frozen=True)
class Tenant:
    """An app as its clients see it: the key they connect with and how its tokens are signed."""

    name: str
    pk: str | None  # None: the default app (no key sent)
    secret: str
    audience: str | None  # the 'aud' its tokens carry (None: no 'aud' claim)

    def token(self, user: str, account: str, **kw: Any) -> str:
        return mint_token(self.secret, user, account, audience=self.audience, **kw)

    def table(self, repo: str) -> str:
        """The quoted SQL name of this app's repository table."""
        if self.pk is None:
            return f'"{repo}"'
        return f'"{self.name}"."{repo}"'

    async def create_repo(self, conn: asyncpg.Connection, repo: str) -> str:
        if self.pk is None:
            return await create_repo(conn, repo)
        return await create_repo(conn, repo, app=self.name)


# The default app: the relay's own settings (conftest's secret), tokens without 'aud'.
DEFAULT = Tenant("default", None, JWT_SECRET, None)


class Tenants:
    """Creates apps with fresh names; deletes them (unwatching their tables) afterwards."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.created: list[str] = []

    async def create(self, **kw: Any) -> AppRecord:
        name = kw.pop("name", None) or fresh_app_name()
        self.created.append(name)
        return await plans.create_app(self.conn, name, **kw)

    async def new(self, **kw: Any) -> Tenant:
        """An app with its own generated HS256 secret; its tokens name it in 'aud'."""
        rec = await self.create(**kw)
        assert rec.public_key and rec.jwt_secret, rec
        return Tenant(rec.id, rec.public_key, rec.jwt_secret, rec.id)

    async def cleanup(self) -> None:
        for name in reversed(self.created):
            try:
                await plans.delete_app(self.conn, name, unwatch=True)
            except PlanError:
                pass  # deleted by the test itself
            except Exception:
                # Best effort: never leave behind an app that shares a key other tests use.
                with contextlib.suppress(Exception):
                    await self.conn.execute(
                        "UPDATE relay.apps SET jwt_secret = $2, suspended = true WHERE id = $1",
                        name,
                        secrets.token_hex(24),
                    )
            with contextlib.suppress(Exception):
                await self.conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


@pytest.fixture
async def tenants(db: asyncpg.Connection) -> AsyncIterator[Tenants]:
    made = Tenants(db)
    yield made
    await made.cleanup()


# --- helpers -------------------------------------------------------------------------------------


async def member(
    handle: RelayHandle,
    client: Callable[..., Any],
    tenant: Tenant,
    user: str,
    account: str,
    *channels: str,
    root: bool = False,
) -> WsClient:
    """A socket of ``tenant``'s app, authenticated as ``user``, joined to ``channels``."""
    c: WsClient = await client(handle, pk=tenant.pk)
    await c.auth(tenant.token(user, account, root=root))
    for channel in channels:
        await c.join(channel)
    return c


async def expect_invalid_token(c: WsClient, session_token: str) -> None:
    await c.send(type="auth", data=session_token, token=None)
    frame = await c.expect("error")
    assert frame["data"] == "invalid token", frame


async def expect_error(c: WsClient, *fragments: str) -> dict[str, Any]:
    frame = await c.expect("error")
    for fragment in fragments:
        assert fragment in frame["data"], f"{fragment!r} not in error {frame['data']!r}"
    return frame


async def all_silent(*clients: WsClient, window: float = 0.4) -> None:
    await asyncio.gather(*(c.silent(window) for c in clients))


async def expect_shut(c: WsClient, prefix: str) -> None:
    """An ``error`` frame whose data starts with ``prefix``, then a close frame with 1008."""
    frame = await c.recv(timeout=SHUT_WAIT)
    assert frame["type"] == "error", f"expected error {prefix!r}, got {frame}"
    assert frame["data"].startswith(prefix), frame
    msg = await asyncio.wait_for(c.ws.receive(), 5)
    assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), msg
    # The code in the close frame itself (the client's own close_code may read 1006 when
    # the server drops the connection right after its close frame).
    code = msg.data if msg.type is aiohttp.WSMsgType.CLOSE else c.ws.close_code
    assert code == POLICY, f"close {code} ({msg}), expected {POLICY}"


async def insert(
    db: asyncpg.Connection,
    table: str,
    owner: str | None,
    account: str | None,
    data: dict[str, Any] | None = None,
) -> str:
    row_id: str = await db.fetchval(
        f"INSERT INTO {table} (owner_id, account_id, data) VALUES ($1, $2, $3::jsonb)"
        " RETURNING id::text",
        owner,
        account,
        json.dumps(data or {}),
    )
    return row_id


def row_of(frame: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = json.loads(frame["data"])
    return row


async def expect_row(c: WsClient, type_: str, row_id: str, channel: str) -> dict[str, Any]:
    frame = await c.expect(type_)
    assert frame["channel"] == channel, frame
    row = row_of(frame)
    assert row["id"] == row_id, f"expected row {row_id}, got {row}"
    return row


def may_read(
    mode: str, user: str, account: str, owner: str | None, row_account: str | None
) -> bool:
    """DESIGN.md's rule, written out independently of relay.permissions."""
    o, g, e = (int(d) for d in mode)
    return bool(e & 4 or (g & 4 and account == row_account) or (o & 4 and user == owner))


def sign_jwt(key: Any, algorithm: str, kid: str | None = None, **claims: Any) -> str:
    """A token with an expiry an hour away plus ``claims`` (exp=None leaves exp out)."""
    body: dict[str, Any] = {"iat": int(time.time()), "exp": int(time.time()) + 3600, **claims}
    if body["exp"] is None:
        del body["exp"]
    headers = {"kid": kid} if kid else None
    return jwt.encode(body, key, algorithm=algorithm, headers=headers)


def new_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_pem(key: rsa.RSAPrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


# --- tokens: an app's tokens work only on its own sockets ----------------------------------------


async def test_a_token_works_only_on_its_own_apps_sockets(relay, client, tenants):
    r = await relay()
    a, b = await tenants.new(), await tenants.new()
    everyone = (a, b, DEFAULT)
    for home in everyone:
        for foreign in everyone:
            if foreign is home:
                continue
            c = await client(r, pk=home.pk)
            await expect_invalid_token(c, foreign.token("u1", "1"))
            await expect_invalid_token(c, foreign.token("svc", "1", root=True))
            # Positive control: the same socket accepts a token of its own app.
            await c.auth(home.token("u1", "1"))
            await c.send(type="echo", data="alive")
            assert (await c.expect("echo"))["data"] == "echo: alive"

    # Naming the app by header instead of query changes nothing.
    by_header = await client(r, headers={"SB-PUBLIC-KEY": b.pk})
    await expect_invalid_token(by_header, a.token("u1", "1"))
    await by_header.auth(b.token("u1", "1"))

    # A's key is A's alone, so a token of A without 'aud' is accepted on A and only there.
    no_aud = mint_token(a.secret, "u1", "1")
    await (await client(r, pk=a.pk)).auth(no_aud)
    for other in (b, DEFAULT):
        await expect_invalid_token(await client(r, pk=other.pk), no_aud)

    # 'aud' naming another app, or no 'exp', is refused even when signed with A's own key.
    c = await client(r, pk=a.pk)
    await expect_invalid_token(c, mint_token(a.secret, "u1", "1", audience=b.name))
    await expect_invalid_token(c, sign_jwt(a.secret, "HS256", sub="u1", aud=a.name, exp=None))
    await c.auth(a.token("u1", "1"))


async def test_a_refused_token_is_logged_with_its_reason_but_never_shown(
    relay, client, tenants, caplog
):
    caplog.set_level(logging.INFO)
    r = await relay()
    shared = secrets.token_urlsafe(32)
    a, b = await tenants.new(), await tenants.new()
    c_rec = await tenants.create(jwt_secret=shared)
    d_rec = await tenants.create(jwt_secret=shared)
    c = Tenant(c_rec.id, c_rec.public_key, shared, c_rec.id)
    d = Tenant(d_rec.id, d_rec.public_key, shared, d_rec.id)

    def logged() -> str:
        return "\n".join(rec.getMessage() for rec in caplog.records if rec.name.startswith("relay"))

    # Another app's key: the signature does not verify.
    wrong_key = a.token("u1", "1")
    on_b = await client(r, pk=b.pk)
    caplog.clear()
    await expect_invalid_token(on_b, wrong_key)
    assert "signature" in logged().lower(), logged()
    await on_b.auth(b.token("u1", "1"))  # positive control

    # The same key, another app's audience.
    wrong_aud = c.token("u1", "1")
    on_d = await client(r, pk=d.pk)
    caplog.clear()
    await expect_invalid_token(on_d, wrong_aud)
    assert "aud" in logged().lower(), logged()
    await on_d.auth(d.token("u1", "1"))

    for token in (wrong_key, wrong_aud):
        _, payload, signature = token.split(".")
        assert payload not in caplog.text and signature not in caplog.text


async def test_two_apps_sharing_one_hs256_secret_are_told_apart_by_aud(relay, client, tenants):
    r = await relay()
    shared = secrets.token_urlsafe(32)
    recs = [await tenants.create(jwt_secret=shared) for _ in range(2)]
    assert all(rec.jwt_secret == shared for rec in recs)
    a, b = (Tenant(rec.id, rec.public_key, shared, rec.id) for rec in recs)
    room = random_name()

    on_a = await client(r, pk=a.pk)
    on_b = await client(r, pk=b.pk)
    await expect_invalid_token(on_a, b.token("u1", "1"))
    await expect_invalid_token(on_b, a.token("u1", "1"))
    # The key is shared, so a token that names no app is nobody's.
    no_aud = mint_token(shared, "u1", "1")
    await expect_invalid_token(on_a, no_aud)
    await expect_invalid_token(on_b, no_aud)
    await expect_invalid_token(on_a, mint_token(shared, "u1", "1", audience="someone-else"))

    await on_a.auth(a.token("u1", "1"))
    await on_b.auth(b.token("u1", "1"))
    await on_a.join(room)
    await on_b.join(room)
    await on_a.publish(room, "for a")
    assert (await on_a.expect("chan_out"))["data"] == "for a"
    await on_b.silent()

    # An app with an explicit audience: that audience, not the app's name, is what 'aud' names.
    aud = f"https://api.example/{secrets.token_hex(4)}"
    rec = await tenants.create(jwt_secret=shared, audience=aud)
    assert rec.audience == aud
    on_c = await client(r, pk=rec.public_key)
    await expect_invalid_token(on_c, mint_token(shared, "u1", "1", audience=rec.id))
    await expect_invalid_token(on_c, a.token("u1", "1"))
    await on_c.auth(mint_token(shared, "u1", "1", audience=aud))
    await expect_invalid_token(on_a, mint_token(shared, "u1", "1", audience=aud))


async def test_an_app_that_shares_the_default_apps_secret_needs_aud(relay, client, tenants):
    r = await relay()
    rec = await tenants.create(jwt_secret=JWT_SECRET)
    twin = Tenant(rec.id, rec.public_key, JWT_SECRET, rec.id)
    r.state.apps.forget()

    on_twin = await client(r, pk=twin.pk)
    on_default = await client(r)
    await expect_invalid_token(on_default, twin.token("u1", "1"))
    await expect_invalid_token(on_default, twin.token("svc", "1", root=True))
    await expect_invalid_token(on_twin, mint_token(JWT_SECRET, "u1", "1", audience="default"))
    no_aud = mint_token(JWT_SECRET, "u1", "1")
    await expect_invalid_token(on_twin, no_aud)

    await on_twin.auth(twin.token("u1", "1"))
    await on_default.auth(mint_token(JWT_SECRET, "u1", "1", audience="default"))
    room = random_name()
    await on_twin.join(room)
    await on_default.join(room)
    await on_default.publish(room, "default only")
    assert (await on_default.expect("chan_out"))["data"] == "default only"
    await on_twin.silent()

    # The twin, whose key is shared, takes only tokens naming it, so a token of that
    # key naming no app can only be the default app's: single-tenant tokens keep working.
    plain = await client(r)
    await plain.auth(no_aud)
    await plain.join(room)


async def test_an_apps_issuer_is_checked_when_set(relay, client, tenants):
    r = await relay()
    issuer = f"https://idp.example/{secrets.token_hex(4)}"
    rec = await tenants.create(issuer=issuer)
    assert rec.issuer == issuer and rec.jwt_secret
    c = await client(r, pk=rec.public_key)
    good = {"sub": "u1", "account_id": "1", "aud": rec.id}
    await expect_invalid_token(c, sign_jwt(rec.jwt_secret, "HS256", **good))
    await expect_invalid_token(c, sign_jwt(rec.jwt_secret, "HS256", iss="https://evil", **good))
    await c.auth(sign_jwt(rec.jwt_secret, "HS256", iss=issuer, **good))


# --- repositories: db-NAME resolves inside the socket's app --------------------------------------


async def test_same_repo_name_and_same_ids_in_three_apps_stay_apart(relay, client, db, tenants):
    r = await relay()
    a, b = await tenants.new(), await tenants.new()
    name = fresh_repo("_760_")
    channel = f"db-{name}"
    everyone = (a, b, DEFAULT)
    for t in everyone:
        assert await t.create_repo(db, name) == name
    # The same user and account ids in every app.
    socks = {
        t.name: {
            (user, account): await member(r, client, t, user, account, channel)
            for user, account in (("u1", "1"), ("u2", "1"), ("u3", "2"))
        }
        for t in everyone
    }

    for t in everyone:
        mine = socks[t.name]
        others = [c for other, cs in socks.items() if other != t.name for c in cs.values()]
        row_id = await insert(db, t.table(name), "u1", "1", {"app": t.name})
        for reader in (("u1", "1"), ("u2", "1")):
            row = await expect_row(mine[reader], "db_created", row_id, channel)
            assert row["data"] == {"app": t.name}
        await all_silent(mine[("u3", "2")], *others)

        await db.execute(f"DELETE FROM {t.table(name)} WHERE id = $1", row_id)
        for reader in (("u1", "1"), ("u2", "1")):
            assert row_of(await mine[reader].expect("db_deleted")) == {"id": row_id}
        await all_silent(mine[("u3", "2")], *others)


async def test_joining_a_repo_of_another_app_is_refused(relay, client, db, tenants):
    r = await relay()
    a, b = await tenants.new(), await tenants.new()
    name = fresh_repo("_744_")
    await a.create_repo(db, name)
    channel = f"db-{name}"
    reader_a = await member(r, client, a, "u1", "1", channel)

    outsiders = [await member(r, client, t, "u1", "1") for t in (b, DEFAULT)]
    for c in outsiders:
        for attempt in (channel, f"db-{a.name}.{name}", f'db-"{a.name}"."{name}"'):
            await c.send(type="join", data=attempt, token=c.token)
            frame = await c.expect("error")
            if attempt == channel:
                assert "not a watched table" in frame["data"], frame

    row_id = await insert(db, a.table(name), "z", "9")
    await expect_row(reader_a, "db_created", row_id, channel)
    await all_silent(*outsiders)

    # B's own table of that name can be joined, and carries only B's rows.
    await b.create_repo(db, name)
    reader_b = outsiders[0]
    await reader_b.join(channel)
    row_b = await insert(db, b.table(name), "z", "9")
    await expect_row(reader_b, "db_created", row_b, channel)
    row_a = await insert(db, a.table(name), "z", "9")
    await expect_row(reader_a, "db_created", row_a, channel)
    await all_silent(reader_a, reader_b, outsiders[1])


async def test_a_resumed_subscription_replays_only_its_own_apps_events(relay, client, db, tenants):
    r = await relay()
    a, b = await tenants.new(), await tenants.new()
    name = fresh_repo("_744_")
    channel = f"db-{name}"
    for t in (a, b, DEFAULT):
        await t.create_repo(db, name)
    live = {t.name: await member(r, client, t, "u1", "1") for t in (a, b, DEFAULT)}
    start = (await live[b.name].join(channel))["pos"]
    for t in (a, DEFAULT):
        await live[t.name].join(channel)

    written: dict[str, list[str]] = {t.name: [] for t in (a, b, DEFAULT)}
    for t in (a, b, a, DEFAULT, a, b):
        written[t.name].append(await insert(db, t.table(name), "z", "9", {"app": t.name}))
    for t in (a, b, DEFAULT):  # all dispatched: the replays below come from the log
        for row_id in written[t.name]:
            await expect_row(live[t.name], "db_created", row_id, channel)

    for t in (a, b, DEFAULT):
        for root in (False, True):
            c = await member(r, client, t, "u2", "1", root=root)
            await c.send(type="join", data=channel, token=c.token, after=start)
            await c.expect("joined")
            got = [row_of(await c.expect("db_created")) for _ in written[t.name]]
            assert [row["id"] for row in got] == written[t.name]
            assert all(row["data"] == {"app": t.name} for row in got)
            await c.silent()


async def test_truncating_or_dropping_one_apps_table_tells_only_that_app(
    relay, client, db, tenants
):
    r = await relay()
    a, b = await tenants.new(), await tenants.new()
    name = fresh_repo("_744_")
    channel = f"db-{name}"
    everyone = (a, b, DEFAULT)
    for t in everyone:
        await t.create_repo(db, name)
    readers = {}
    for t in everyone:
        readers[t.name] = await member(r, client, t, "u1", "1")
        joined = await readers[t.name].join(channel)
    start = joined["pos"]  # the default app's reader, before anything below

    await db.execute(f"TRUNCATE {a.table(name)}")
    notice = await readers[a.name].expect("error")
    assert notice["reason"] == "truncated" and notice["channel"] == channel, notice
    await all_silent(readers[b.name], readers[DEFAULT.name])

    await db.execute(f"DROP TABLE {a.table(name)}")
    notice = await readers[a.name].expect("error")
    assert notice["reason"] == "dropped" and notice["channel"] == channel, notice
    await all_silent(readers[b.name], readers[DEFAULT.name])
    listed = {(x.app, x.repo) for x in await list_repos(db)}
    assert (a.name, name) not in listed
    assert {(b.name, name), (DEFAULT.name, name)} <= listed

    # The other apps' tables of that name carry on, live and on resume.
    for t in (b, DEFAULT):
        row_id = await insert(db, t.table(name), "z", "9")
        await expect_row(readers[t.name], "db_created", row_id, channel)
    resumed = await member(r, client, DEFAULT, "u2", "1")
    await resumed.send(type="join", data=channel, token=resumed.token, after=start)
    await resumed.expect("joined")
    await expect_row(resumed, "db_created", row_id, channel)
    await all_silent(resumed, *readers.values())


async def test_a_snapshot_lists_only_its_own_apps_rows(relay, client, db, tenants):
    r = await relay()
    a, b = await tenants.new(), await tenants.new()
    name = fresh_repo("_760_")
    channel = f"db-{name}"
    everyone = (a, b, DEFAULT)
    readable: dict[str, set[str]] = {}
    every: dict[str, set[str]] = {}
    for t in everyone:
        await t.create_repo(db, name)
        # The same ids in every app: account 1 reads the first two rows.
        ids = [
            await insert(db, t.table(name), owner, account, {"app": t.name})
            for owner, account in (("u1", "1"), ("u9", "1"), ("u3", "2"))
        ]
        readable[t.name], every[t.name] = set(ids[:2]), set(ids)

    async def snapshot(c: WsClient, app: str) -> set[str]:
        await c.send(type="join", data=channel, token=c.token, snapshot="true")
        await c.expect("joined")
        got: set[str] = set()
        while (frame := await c.recv())["type"] == "db_created":
            row = row_of(frame)
            assert row["data"] == {"app": app}, row
            got.add(row["id"])
        assert frame["type"] == "db_synced", frame
        return got

    sockets: dict[WsClient, str] = {}
    for t in everyone:
        user = await member(r, client, t, "u2", "1")
        root = await member(r, client, t, "svc", "0", root=True)
        sockets[user] = sockets[root] = t.name
        assert await snapshot(user, t.name) == readable[t.name]
        assert await snapshot(root, t.name) == every[t.name]

    # Then the stream, still per app.
    row_id = await insert(db, a.table(name), "z", "1", {"app": a.name})
    for c, app in sockets.items():
        if app == a.name:
            await expect_row(c, "db_created", row_id, channel)
    await all_silent(*sockets)


async def test_a_filter_is_checked_against_its_own_apps_table(relay, client, db, tenants):
    """Same repository name, different columns: a filter resolves in the socket's app."""
    r = await relay()
    a, b = await tenants.new(), await tenants.new()
    name = f"items_{secrets.token_hex(3)}_744_"
    channel = f"db-{name}"
    columns = {a.name: "status text", b.name: "level integer"}
    for t in (a, b):
        await db.execute(f'CREATE SCHEMA IF NOT EXISTS "{t.name}"')
        await db.execute(
            f"CREATE TABLE {t.table(name)} (id serial PRIMARY KEY, who text, org text,"
            f" {columns[t.name]})"
        )
        await watch(db, f"{t.name}.{name}", owner_column="who", account_column="org", app=t.name)
    on_a = await member(r, client, a, "u1", "1")
    on_b = await member(r, client, b, "u1", "1")

    await on_b.send(type="join", data=channel, token=on_b.token, filter="status=eq.open")
    await expect_error(on_b, "invalid filter")
    await on_a.send(type="join", data=channel, token=on_a.token, filter="level=gt.3")
    await expect_error(on_a, "invalid filter")
    await on_a.join(channel, filter="status=eq.open")
    await on_b.join(channel, filter="level=gt.3")

    await db.execute(f"INSERT INTO {a.table(name)} (status) VALUES ('closed'), ('open')")
    await db.execute(f"INSERT INTO {b.table(name)} (level) VALUES (1), (5)")
    assert row_of(await on_a.expect("db_created"))["status"] == "open"
    assert row_of(await on_b.expect("db_created"))["level"] == 5
    await all_silent(on_a, on_b)


async def test_root_tokens_read_every_event_of_their_own_app_only(relay, client, db, tenants):
    r = await relay()
    a, b = await tenants.new(), await tenants.new()
    name = fresh_repo("_700_")
    channel = f"db-{name}"
    everyone = (a, b, DEFAULT)
    for t in everyone:
        await t.create_repo(db, name)
    roots = {t.name: await member(r, client, t, "svc", "0", channel, root=True) for t in everyone}
    users = {t.name: await member(r, client, t, "u1", "1", channel) for t in everyone}

    for t in everyone:
        row_id = await insert(db, t.table(name), "z", "9", {"app": t.name})
        assert (await expect_row(roots[t.name], "db_created", row_id, channel))["data"] == {
            "app": t.name
        }
        await all_silent(*roots.values(), *users.values())

    # A root token of one app is no token at all on another app's socket.
    for t in (b, DEFAULT):
        c = await client(r, pk=t.pk)
        await expect_invalid_token(c, a.token("svc", "0", root=True))
        await c.auth(t.token("svc", "0", root=True))


async def test_repos_belong_to_their_app(relay, client, db, tenants, repo):
    r = await relay()
    a, b = await tenants.new(), await tenants.new()
    name = fresh_repo("_744_")
    assert await create_repo(db, name, app=a.name) == name
    assert await db.fetchval("SELECT to_regclass($1) IS NOT NULL", f'"{a.name}"."{name}"')
    assert await db.fetchval("SELECT to_regclass($1) IS NULL", f'public."{name}"')
    old = await repo("_760_")  # made as before tenancy: the default app's
    listed = {(x.app, x.repo) for x in await list_repos(db)}
    assert (a.name, name) in listed and (DEFAULT.name, old) in listed
    assert (b.name, name) not in listed and (DEFAULT.name, name) not in listed

    # An existing table with its own columns, watched for B.
    schema = f"s{secrets.token_hex(4)}"
    table = f"notes_{secrets.token_hex(3)}_760_"
    await db.execute(f'CREATE SCHEMA "{schema}"')
    try:
        await db.execute(
            f'CREATE TABLE "{schema}"."{table}" (pk serial PRIMARY KEY, who text, org text)'
        )
        assert (
            await watch(
                db,
                f"{schema}.{table}",
                id_column="pk",
                owner_column="who",
                account_column="org",
                app=b.name,
            )
            == table
        )
        assert (b.name, table) in {(x.app, x.repo) for x in await list_repos(db)}
        with pytest.raises(RepoError):
            await watch(db, f"{schema}.{table}", id_column="pk", app=a.name)

        reader_b = await member(r, client, b, "u1", "org1", f"db-{table}")
        reader_a = await member(r, client, a, "u1", "org1")
        await reader_a.send(type="join", data=f"db-{table}", token=reader_a.token)
        await expect_error(reader_a, "not a watched table")
        await db.execute(f"INSERT INTO \"{schema}\".\"{table}\" (who, org) VALUES ('z', 'org1')")
        assert row_of(await reader_b.expect("db_created")) == {"pk": 1, "who": "z", "org": "org1"}
        await reader_a.silent()
    finally:
        with contextlib.suppress(Exception):
            await db.execute("SELECT relay.unwatch($1::regclass)", f'"{schema}"."{table}"')
        await db.execute(f'DROP SCHEMA "{schema}" CASCADE')


async def test_an_app_whose_name_needs_quoting_owns_its_schema_and_repos(
    relay, client, db, tenants
):
    r = await relay()
    odd = await tenants.new(name=f"Shop-{secrets.token_hex(3)}.v2")
    plain = await tenants.new()
    name = fresh_repo("_744_")
    channel = f"db-{name}"
    for t in (odd, plain):
        assert await t.create_repo(db, name) == name
    assert await db.fetchval("SELECT to_regclass($1) IS NOT NULL", odd.table(name))
    assert (odd.name, name) in {(x.app, x.repo) for x in await list_repos(db)}
    reader = await member(r, client, odd, "u1", "1", channel)
    outsider = await member(r, client, plain, "u1", "1", channel)
    row_id = await insert(db, odd.table(name), "z", "9", {"app": odd.name})
    assert (await expect_row(reader, "db_created", row_id, channel))["data"] == {"app": odd.name}
    await outsider.silent()


# --- chat channels -------------------------------------------------------------------------------


@pytest.mark.parametrize("broker", ["memory", "redis"])
async def test_chat_channels_of_the_same_name_are_per_app(request, relay, client, tenants, broker):
    """With Redis, two relays: each app's members are spread over both nodes."""
    if broker == "redis":
        url = request.getfixturevalue("redis_url")
        nodes = [await relay(broker_url=url), await relay(broker_url=url)]
    else:
        nodes = [await relay()]
    a, b = await tenants.new(), await tenants.new()
    room = random_name()
    everyone = (a, b, DEFAULT)
    rooms = {
        t.name: [
            await member(nodes[0], client, t, "u1", "1", room),
            await member(nodes[-1], client, t, "u2", "1", room),
        ]
        for t in everyone
    }
    for t in everyone:
        for sender in rooms[t.name]:
            text = f"from {t.name} via {sender.sid}"
            await sender.publish(room, text)
            for c in rooms[t.name]:
                assert (await c.expect("chan_out"))["data"] == text
            await all_silent(*(c for other, cs in rooms.items() if other != t.name for c in cs))


# --- suspended and deleted apps ------------------------------------------------------------------


async def test_a_suspended_app_refuses_new_sockets_and_closes_open_ones(relay, client, db, tenants):
    r = await relay(app_check_seconds=0.2)
    a, b = await tenants.new(), await tenants.new()
    room = random_name()
    a_member = await member(r, client, a, "u1", "1", room)
    a_anonymous = await client(r, pk=a.pk)
    b_member = await member(r, client, b, "u1", "1", room)

    rec = await plans.suspend_app(db, a.name)
    assert rec.suspended
    assert {x.id: x.suspended for x in await plans.list_apps(db)}[a.name] is True
    r.state.apps.forget()
    await asyncio.gather(
        expect_shut(a_member, "app suspended"), expect_shut(a_anonymous, "app suspended")
    )

    refused = await client(r, pk=a.pk, init=False)
    await expect_shut(refused, "app suspended")
    # Another app on the same relay carries on.
    await b_member.publish(room, "still here")
    assert (await b_member.expect("chan_out"))["data"] == "still here"

    rec = await plans.resume_app(db, a.name)
    assert not rec.suspended
    r.state.apps.forget()
    back = await member(r, client, a, "u1", "1", room)
    await back.publish(room, "back")
    assert (await back.expect("chan_out"))["data"] == "back"
    await b_member.silent()


async def test_deleting_an_app_waits_for_its_tables_then_closes_its_sockets(
    relay, client, db, tenants
):
    r = await relay(app_check_seconds=0.2)
    a, b = await tenants.new(), await tenants.new()
    name = fresh_repo("_744_")
    channel = f"db-{name}"
    await a.create_repo(db, name)
    await b.create_repo(db, name)
    reader_a = await member(r, client, a, "u1", "1", channel)
    reader_b = await member(r, client, b, "u1", "1", channel)

    with pytest.raises(PlanError):
        await plans.delete_app(db, a.name)
    with pytest.raises(PlanError):
        await plans.delete_app(db, "default", unwatch=True)
    assert a.name in {x.id for x in await plans.list_apps(db)}
    row_id = await insert(db, a.table(name), "z", "9")
    await expect_row(reader_a, "db_created", row_id, channel)  # still alive, still served

    await plans.delete_app(db, a.name, unwatch=True)
    r.state.apps.forget()
    await expect_shut(reader_a, "app deleted")
    assert a.name not in {x.id for x in await plans.list_apps(db)}
    assert all(x.app != a.name for x in await list_repos(db))
    gone = await client(r, pk=a.pk, init=False)
    frame = await gone.recv()
    assert frame["type"] == "error" and "unknown app" in frame["data"], frame

    # B's table of the same name is untouched.
    row_b = await insert(db, b.table(name), "z", "9")
    await expect_row(reader_b, "db_created", row_b, channel)


# --- randomized: four tenants, colliding ids, same table names -----------------------------------

SEED = int(os.environ.get("RELAY_TENANCY_SEED", "20261203"))
MODES = ("744", "760", "700")
USERS = (("u1", "1"), ("u2", "1"), ("u3", "2"))
OWNERS = ("u1", "u2", "u3", "u9", None)
ACCOUNTS = ("1", "2", "3", None)
EVENTS_TO_CHECK = 10_000
MAX_LAG = 2_000  # frames the writer may be ahead of the readers


@dataclass
class Listening:
    """One socket of one tenant, and every frame it received."""

    tenant: Tenant
    user: str
    account: str
    root: bool
    ws: WsClient
    frames: list[dict[str, Any]] = field(default_factory=list)
    expected: dict[str, list[tuple[str, str, int | None]]] = field(default_factory=dict)

    def sees(self, mode: str, owner: str | None, account: str | None) -> bool:
        return self.root or may_read(mode, self.user, self.account, owner, account)


async def test_randomized_tenants_receive_exactly_their_own_readable_events(
    relay, client, db, tenants
):
    rng = random.Random(SEED)
    r = await relay(send_queue_frames=100_000)
    world = [await tenants.new() for _ in range(3)] + [DEFAULT]
    prefix = f"m{secrets.token_hex(3)}"
    names = {mode: f"{prefix}_{mode}_" for mode in MODES}
    for t in world:
        for name in names.values():
            await t.create_repo(db, name)

    listeners: list[Listening] = []
    for t in world:
        for user, account, root in [(u, a, False) for u, a in USERS] + [("u1", "1", True)]:
            ws = await member(
                r, client, t, user, account, *(f"db-{n}" for n in names.values()), root=root
            )
            ln = Listening(t, user, account, root, ws)
            ln.expected = {f"db-{n}": [] for n in names.values()}
            listeners.append(ln)
    by_tenant = {t.name: [ln for ln in listeners if ln.tenant is t] for t in world}

    received = 0
    progress = asyncio.Event()

    async def read(ln: Listening) -> None:
        nonlocal received
        while True:
            frame = await ln.ws.recv(timeout=30)
            ln.frames.append(frame)
            received += 1
            progress.set()
            data = row_of(frame).get("data")
            if isinstance(data, dict) and data.get("marker") == ln.tenant.name:
                break
        with contextlib.suppress(TimeoutError):  # anything after the marker is a stray
            while True:
                ln.frames.append(await ln.ws.recv(timeout=0.5))

    readers = [asyncio.create_task(read(ln)) for ln in listeners]

    rows: dict[tuple[str, str], dict[str, tuple[str | None, str | None]]] = {
        (t.name, mode): {} for t in world for mode in MODES
    }
    owner_of: dict[str, str] = {}  # row id -> tenant
    expected_total = 0
    version = 0

    def expect(t: Tenant, mode: str, old: Any, new: Any, row_id: str, v: int) -> None:
        nonlocal expected_total
        for ln in by_tenant[t.name]:
            before = old is not None and ln.sees(mode, *old)
            after = new is not None and ln.sees(mode, *new)
            if before and after:
                item: tuple[str, str, int | None] = ("db_updated", row_id, v)
            elif after:
                item = ("db_created", row_id, v)
            elif before:
                item = ("db_deleted", row_id, None)
            else:
                continue
            ln.expected[f"db-{names[mode]}"].append(item)
            expected_total += 1

    try:
        while expected_total < EVENTS_TO_CHECK:
            async with db.transaction():
                for _ in range(rng.randint(1, 25)):
                    t = rng.choice(world)
                    mode = rng.choice(MODES)
                    live = rows[(t.name, mode)]
                    table = t.table(names[mode])
                    version += 1
                    data = json.dumps({"app": t.name, "v": version})
                    op = rng.random() if live else 0.0
                    if op < 0.5:
                        new = (rng.choice(OWNERS), rng.choice(ACCOUNTS))
                        row_id = await db.fetchval(
                            f"INSERT INTO {table} (owner_id, account_id, data)"
                            " VALUES ($1, $2, $3::jsonb) RETURNING id::text",
                            *new,
                            data,
                        )
                        live[row_id] = new
                        owner_of[row_id] = t.name
                        expect(t, mode, None, new, row_id, version)
                    elif op < 0.8:
                        row_id = rng.choice(list(live))
                        old = live[row_id]
                        new = (
                            rng.choice(OWNERS) if rng.random() < 0.5 else old[0],
                            rng.choice(ACCOUNTS) if rng.random() < 0.5 else old[1],
                        )
                        await db.execute(
                            f"UPDATE {table} SET owner_id = $2, account_id = $3,"
                            " data = $4::jsonb WHERE id = $1",
                            row_id,
                            *new,
                            data,
                        )
                        live[row_id] = new
                        expect(t, mode, old, new, row_id, version)
                    else:
                        row_id = rng.choice(list(live))
                        old = live.pop(row_id)
                        await db.execute(f"DELETE FROM {table} WHERE id = $1", row_id)
                        expect(t, mode, old, None, row_id, version)
            while expected_total - received > MAX_LAG:
                progress.clear()
                try:
                    await asyncio.wait_for(progress.wait(), 30)
                except TimeoutError:
                    raise AssertionError(
                        f"seed {SEED}: frames stopped arriving ({received} of {expected_total})"
                    ) from None

        # One marker per tenant, readable by everyone: each socket's last expected frame.
        async with db.transaction():
            for t in world:
                table = t.table(names["744"])
                marker = json.dumps({"app": t.name, "marker": t.name})
                row_id = await db.fetchval(
                    f"INSERT INTO {table} (owner_id, account_id, data)"
                    " VALUES (NULL, NULL, $1::jsonb) RETURNING id::text",
                    marker,
                )
                owner_of[row_id] = t.name
                for ln in by_tenant[t.name]:
                    ln.expected[f"db-{names['744']}"].append(("db_created", row_id, None))
        await asyncio.gather(*readers)
    finally:
        for task in readers:
            task.cancel()

    checked = 0
    for ln in listeners:
        who = f"seed {SEED}: {ln.tenant.name}/{ln.user}/{ln.account}{'/root' if ln.root else ''}"
        got: dict[str, list[tuple[str, str, int | None]]] = {ch: [] for ch in ln.expected}
        for frame in ln.frames:
            row = row_of(frame)
            assert frame["type"] in ("db_created", "db_updated", "db_deleted"), (who, frame)
            assert frame["channel"] in got, (who, frame)
            app = owner_of.get(row["id"])
            assert app == ln.tenant.name, f"{who} got a frame of app {app}: {frame}"
            mode = frame["channel"].rsplit("_", 2)[-2]
            if frame["type"] != "db_deleted":
                assert row["data"]["app"] == ln.tenant.name, (who, frame)
                assert ln.sees(mode, row["owner_id"], row["account_id"]), (
                    f"{who} may not read {row}"
                )
            v = row["data"].get("v") if frame["type"] != "db_deleted" else None
            got[frame["channel"]].append((frame["type"], row["id"], v))
        for channel, expected in ln.expected.items():
            assert got[channel] == expected, f"{who} on {channel}: {diff(got[channel], expected)}"
            checked += len(expected)
    assert checked >= EVENTS_TO_CHECK


def diff(got: list[Any], expected: list[Any]) -> str:
    for i, (g, e) in enumerate(zip(got, expected, strict=False)):
        if g != e:
            return f"first difference at {i}: got {g}, expected {e}"
    return f"got {len(got)} frames, expected {len(expected)}"


# --- apps verifying with a public key, or a JWKS URL ---------------------------------------------


async def test_an_app_verifying_with_a_pem_public_key(relay, client, tenants, tmp_path):
    r = await relay()
    key = new_rsa_key()
    pem = public_pem(key)
    rec = await tenants.create(jwt_public_key=pem)
    assert rec.jwt_secret is None and rec.jwt_public_key and "PUBLIC KEY" in rec.jwt_public_key
    claims = {"sub": "u1", "account_id": "1", "aud": rec.id}
    c = await client(r, pk=rec.public_key)
    await expect_invalid_token(c, sign_jwt(new_rsa_key(), "RS256", **claims))
    await expect_invalid_token(c, sign_jwt(JWT_SECRET, "HS256", **claims))
    await expect_invalid_token(c, sign_jwt(key, "RS256", **{**claims, "exp": None}))
    # HS256 keyed with the public key's text: the classic algorithm confusion.
    await expect_invalid_token(c, hs256_with_raw_key(pem, claims))
    good = sign_jwt(key, "RS256", **claims)
    await expect_invalid_token(await client(r), good)
    await c.auth(good)

    # The key may be given as a file's path; the app keeps the PEM text itself.
    other = new_rsa_key()
    path = tmp_path / "idp.pem"
    path.write_text(public_pem(other))
    by_path = await tenants.create(jwt_public_key=str(path))
    assert by_path.jwt_public_key == public_pem(other)
    on_path = await client(r, pk=by_path.public_key)
    await expect_invalid_token(on_path, good)
    await on_path.auth(sign_jwt(other, "RS256", **{**claims, "aud": by_path.id}))


def hs256_with_raw_key(raw_key: str, claims: dict[str, Any]) -> str:
    """HS256 over the claims with ``raw_key`` as the secret (PyJWT refuses to sign with a PEM)."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps({**claims, "exp": int(time.time()) + 3600}).encode())
    signature = hmac.new(raw_key.encode(), f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{b64(signature)}"


class KeySet:
    """The key set a local JWKS endpoint serves; ``fetches`` counts its requests."""

    def __init__(self) -> None:
        self.keys: dict[str, rsa.RSAPrivateKey] = {}
        self.fetches = 0

    def publish(self, *kids: str) -> None:
        for kid in kids:
            self.keys.setdefault(kid, new_rsa_key())

    def withdraw(self, kid: str) -> rsa.RSAPrivateKey:
        return self.keys.pop(kid)

    async def serve(self, request: web.Request) -> web.Response:
        self.fetches += 1
        keys = []
        for kid, key in self.keys.items():
            jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
            keys.append({**jwk, "kid": kid, "use": "sig", "alg": "RS256"})
        return web.json_response({"keys": keys})


@pytest.fixture
async def jwks() -> AsyncIterator[tuple[KeySet, str]]:
    keyset = KeySet()
    app = web.Application()
    app.router.add_get("/.well-known/jwks.json", keyset.serve)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield keyset, f"http://127.0.0.1:{port}/.well-known/jwks.json"
    await runner.cleanup()


# PyJWT's PyJWKClient refetches a key set for an unknown kid at most once per
# cooldown_duration (30 s by default), so a just-rotated key may wait that long.
ROTATION_WAIT = 60.0


async def accepted_eventually(
    client: Callable[..., Any], handle: RelayHandle, pk: str | None, session_token: str
) -> WsClient:
    """A socket that ``session_token`` authenticated, retrying on fresh sockets until accepted."""
    deadline = time.monotonic() + ROTATION_WAIT
    while True:
        c: WsClient = await client(handle, pk=pk)
        await c.send(type="auth", data=session_token, token=None)
        frame = await c.recv()
        if frame["type"] == "token":
            c.token = frame["data"]
            return c
        assert frame == {**frame, "type": "error", "data": "invalid token"}, frame
        assert time.monotonic() < deadline, "a token of the rotated key was never accepted"
        await c.close()
        await asyncio.sleep(1.0)


async def test_jwks_keys_rotate_without_a_restart(relay, client, tenants, jwks):
    keyset, url = jwks
    keyset.publish("k1")
    rec = await tenants.create(jwks_url=url)
    assert rec.jwks_url == url and rec.jwt_secret is None
    r = await relay()

    def token(kid: str, key: rsa.RSAPrivateKey | None = None, **extra: Any) -> str:
        claims = {"sub": "u1", "account_id": "1", "aud": rec.id, **extra}
        return sign_jwt(key or keyset.keys[kid], "RS256", kid=kid, **claims)

    room = random_name()
    first = await client(r, pk=rec.public_key)
    await first.auth(token("k1"))
    await first.join(room)
    fetched = keyset.fetches
    assert fetched >= 1
    for _ in range(4):  # the key set is cached, not fetched per token
        await (await client(r, pk=rec.public_key)).auth(token("k1"))
    assert keyset.fetches == fetched

    # Rotate: k2 is published and k1 withdrawn; the running relay follows.
    keyset.publish("k2")
    old = keyset.withdraw("k1")
    second = await accepted_eventually(client, r, rec.public_key, token("k2"))
    await second.join(room)
    await second.publish(room, "rotated")
    for c in (first, second):
        assert (await c.expect("chan_out"))["data"] == "rotated"

    refused = await client(r, pk=rec.public_key)
    await expect_invalid_token(refused, token("k1", old))
    await expect_invalid_token(refused, token("k9", new_rsa_key()))  # a kid never published
    await expect_invalid_token(refused, token("k2", new_rsa_key()))  # right kid, wrong key
    await expect_invalid_token(await client(r), token("k2"))  # not on the default app
    await refused.auth(token("k2"))


# --- the commands --------------------------------------------------------------------------------


async def run_relay(pg_url: str, *args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env["RELAY_DATABASE_URL"] = pg_url
    env["RELAY_DATA_DIR"] = tempfile.mkdtemp(prefix="relay-tenancy-cli-")
    proc = await asyncio.create_subprocess_exec(
        *CLI,
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 180)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def run_ok(pg_url: str, *args: str) -> str:
    code, out, err = await run_relay(pg_url, *args)
    assert code == 0, f"relay {' '.join(args)}: exit {code}\n{out}\n{err}"
    return out


async def test_cli_app_token_and_repo_on_a_real_relay(relay, client, db, pg_url, tenants):
    name = fresh_app_name()
    tenants.created.append(name)  # cleaned up like the others
    out = await run_ok(pg_url, "app", "--database-url", pg_url, "create", name)
    public_key = re.search(r"^public key: (pk_\S+)$", out, re.M)
    secret = re.search(r"^jwt secret: (\S+)$", out, re.M)
    assert public_key and secret, out
    token = (await run_ok(pg_url, "token", "--app", name, "--user", "u1", "--account", "1")).strip()
    claims = jwt.decode(token, secret[1], algorithms=["HS256"], audience=name)
    assert claims["sub"] == "u1" and claims["account_id"] == "1" and claims["aud"] == name
    repo_name = fresh_repo("_760_")
    await run_ok(pg_url, "repo", "--database-url", pg_url, "create", repo_name, "--app", name)

    r = await relay()
    c = await client(r, pk=public_key[1])
    await c.auth(token)
    await c.join(f"db-{repo_name}")
    row_id = await insert(db, f'"{name}"."{repo_name}"', "u2", "1")
    await expect_row(c, "db_created", row_id, f"db-{repo_name}")
    await expect_invalid_token(await client(r), token)

    code, _, err = await run_relay(pg_url, "app", "--database-url", pg_url, "delete", name)
    assert code != 0 and err.strip(), "delete must refuse while the app owns a watched table"
    await run_ok(pg_url, "app", "--database-url", pg_url, "delete", name, "--unwatch")
    listed = await run_ok(pg_url, "app", "--database-url", pg_url, "list")
    assert name not in listed.split()


# --- the migration: what was watched before tenancy is the default app's -------------------------

# What revision 0001 made besides its frozen SQL (migrations/versions/0001_initial.py).
SCHEMA_0001 = """
CREATE TABLE relay.plans (name text PRIMARY KEY, max_connections integer,
    max_channels_per_socket integer, messages_per_second integer);
CREATE TABLE relay.apps (id text PRIMARY KEY, public_key text UNIQUE,
    plan text NOT NULL REFERENCES relay.plans (name), origins text[] NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now());
INSERT INTO relay.plans (name) VALUES ('default');
INSERT INTO relay.apps (id, public_key, plan) VALUES ('default', NULL, 'default');
CREATE TABLE relay.alembic_version (version_num varchar(32) NOT NULL,
    CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num));
INSERT INTO relay.alembic_version VALUES ('0001');
"""


@pytest.fixture
async def database_at_0001(db: asyncpg.Connection, pg_url: str) -> AsyncIterator[str]:
    """A new database of the session's server, at the relay schema of revision 0001."""
    name = f"premig_{secrets.token_hex(4)}"
    url = urlunsplit(urlsplit(pg_url)._replace(path="/" + name))
    await db.execute(f'CREATE DATABASE "{name}"')
    try:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(read_migration_sql("0001_relay.sql"))
            await conn.execute(SCHEMA_0001)
        finally:
            await conn.close()
        yield url
    finally:
        await db.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def test_tables_watched_before_tenancy_belong_to_the_default_app(
    client, database_at_0001: str
):
    url = database_at_0001
    name = fresh_repo("_760_")
    # A writer connected before the upgrade keeps writing through it, unrestarted.
    writer = await asyncpg.connect(url)
    try:
        await writer.execute(repo_table_sql(f'"{name}"'))
        await writer.execute(
            "SELECT relay.watch($1::regclass, 'id', 'owner_id', 'account_id')", name
        )
        before = await insert(writer, f'"{name}"', "u1", "1")

        await asyncio.to_thread(run_migrations, url)

        check = await asyncpg.connect(url)
        try:
            assert [(x.app, x.repo) for x in await list_repos(check)] == [("default", name)]
            assert await check.fetchval("SELECT array_agg(DISTINCT app) FROM relay.events") == [
                "default"
            ]
            other = await plans.create_app(check, fresh_app_name())
        finally:
            await check.close()

        settings = Settings(jwt_secret=JWT_SECRET, database_url=url, poll_seconds=0.5)
        runner = web.AppRunner(create_relay_app(settings, url, JWT_SECRET), shutdown_timeout=2)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            r = RelayHandle(runner.app, runner, port, JWT_SECRET)
            reader = await member(r, client, DEFAULT, "u2", "1", f"db-{name}")
            stranger = await client(r, pk=other.public_key)
            assert other.jwt_secret is not None
            await stranger.auth(mint_token(other.jwt_secret, "u2", "1", audience=other.id))
            await stranger.send(type="join", data=f"db-{name}", token=stranger.token)
            await expect_error(stranger, "not a watched table")

            after = await insert(writer, f'"{name}"', "u1", "1")
            await expect_row(reader, "db_created", after, f"db-{name}")
            await writer.execute(f'DELETE FROM "{name}" WHERE id = $1', before)
            assert row_of(await reader.expect("db_deleted")) == {"id": before}
            await stranger.silent()
        finally:
            await runner.cleanup()
    finally:
        await writer.close()
