"""Plans and apps: the management functions, the ``relay plan`` / ``relay app`` commands,
and a running relay picking up a changed plan.

The session PostgreSQL is shared, so every plan and app here has a fresh
name, and nothing touches the default plan or the default app.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sys

import asyncpg
import pytest

from relay import plans
from relay.plans import PlanError
from tests.conftest import app_token

CLI = [sys.executable, "-m", "relay.cli"]


def fresh(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


# --- functions -----------------------------------------------------------------------------------


async def test_create_list_and_update_a_plan(db: asyncpg.Connection):
    name = fresh("gold")
    plan = await plans.create_plan(db, name, max_connections=50, messages_per_second=20)
    assert plan == plans.Plan(name, 50, None, 20)
    assert plan in await plans.list_plans(db)

    # Only the fields given change; None makes a cap unlimited.
    changed = await plans.update_plan(db, name, max_channels_per_socket=5)
    assert changed == plans.Plan(name, 50, 5, 20)
    changed = await plans.update_plan(db, name, max_connections=None)
    assert changed == plans.Plan(name, None, 5, 20)
    assert await plans.update_plan(db, name) == changed


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "has space"}, "not a valid plan name"),
        ({"name": ""}, "not a valid plan name"),
        ({"max_connections": -1}, "at least 0"),
        ({"messages_per_second": 0}, "at least 1"),
        ({"max_channels_per_socket": 0}, "at least 1"),
    ],
)
async def test_bad_plans_are_refused_with_a_reason(db: asyncpg.Connection, kwargs, message):
    args = {"name": fresh("p"), **kwargs}
    with pytest.raises(PlanError, match=message):
        await plans.create_plan(db, **args)


async def test_plan_names_are_unique_and_updates_need_a_plan(db: asyncpg.Connection):
    name = fresh("dup")
    await plans.create_plan(db, name, max_connections=1)
    with pytest.raises(PlanError, match="already exists"):
        await plans.create_plan(db, name, max_connections=2)
    with pytest.raises(PlanError, match="no plan named"):
        await plans.update_plan(db, fresh("missing"), max_connections=3)


async def test_create_apps_with_generated_or_given_keys(db: asyncpg.Connection):
    plan = await plans.create_plan(db, fresh("p"), max_connections=10)
    a = await plans.create_app(db, fresh("a"), plan=plan.name)
    b = await plans.create_app(db, fresh("b"), plan=plan.name)
    assert a.public_key and b.public_key and a.public_key != b.public_key
    assert a.public_key.startswith("pk_") and len(a.public_key) > 20
    given = "sb-" + secrets.token_hex(8)
    c = await plans.create_app(db, fresh("c"), public_key=given)
    assert c.public_key == given and c.plan == "default" and c.origins == ()
    listed = {app.id: app for app in await plans.list_apps(db)}
    assert listed[a.id] == a and listed[c.id] == c
    assert "default" in listed

    with pytest.raises(PlanError, match="public key already exists"):
        await plans.create_app(db, fresh("d"), public_key=given)
    with pytest.raises(PlanError, match="app name already exists"):
        await plans.create_app(db, a.id)
    with pytest.raises(PlanError, match="no plan named"):
        await plans.create_app(db, fresh("e"), plan=fresh("nope"))
    with pytest.raises(PlanError, match="public key"):
        await plans.create_app(db, fresh("f"), public_key="has a space")


async def test_app_plan_and_origins_can_change(db: asyncpg.Connection):
    plan = await plans.create_plan(db, fresh("p"), max_connections=1)
    app = await plans.create_app(db, fresh("a"), origins=["HTTPS://App.Example/"])
    assert app.origins == ("https://app.example",)

    moved = await plans.set_app_plan(db, app.id, plan.name)
    assert moved.plan == plan.name and moved.public_key == app.public_key
    widened = await plans.set_app_origins(
        db, app.id, ["https://app.example", "http://localhost:3000", "https://app.example"]
    )
    assert widened.origins == ("https://app.example", "http://localhost:3000")
    cleared = await plans.set_app_origins(db, app.id, [])
    assert cleared.origins == ()

    with pytest.raises(PlanError, match="not an origin"):
        await plans.set_app_origins(db, app.id, ["app.example"])
    with pytest.raises(PlanError, match="no app named"):
        await plans.set_app_plan(db, fresh("ghost"), plan.name)
    with pytest.raises(PlanError, match="no plan named"):
        await plans.set_app_plan(db, app.id, fresh("ghost"))
    with pytest.raises(PlanError, match="no app named"):
        await plans.set_app_origins(db, fresh("ghost"), [])


async def test_a_running_relay_sees_a_raised_cap_within_seconds(relay, client, db):
    plan = await plans.create_plan(db, fresh("p"), max_connections=1)
    app = await plans.create_app(db, fresh("a"), plan=plan.name)
    assert app.public_key is not None
    r = await relay()
    first = await client(r, pk=app.public_key)
    # Authenticated: an unauthenticated socket would give up its slot to a newcomer.
    await first.auth(app_token(app, "u", "1"))
    refused = await client(r, pk=app.public_key, init=False)
    assert "connection limit reached" in (await refused.expect("error"))["data"]

    await plans.update_plan(db, plan.name, max_connections=2)
    # Lookups are cached for plans.CACHE_SECONDS; after that the new cap holds.
    deadline = asyncio.get_running_loop().time() + plans.CACHE_SECONDS + 10
    while True:
        c = await client(r, pk=app.public_key, init=False)
        frame = await c.recv()
        if frame["type"] == "init":
            break
        assert "connection limit reached" in frame["data"]
        assert asyncio.get_running_loop().time() < deadline, "the new cap was never applied"
        await asyncio.sleep(0.5)
    await first.send(type="echo", data="x")
    assert (await first.expect("echo"))["data"] == "echo: x"


class CountingPool:
    """A real pool that counts the lookups it serves."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.queries = 0

    async def fetchrow(self, *args: object) -> asyncpg.Record | None:
        self.queries += 1
        return await self.pool.fetchrow(*args)


async def test_a_storm_of_lookups_costs_one_query_per_key(pg_url: str, db: asyncpg.Connection):
    app = await plans.create_app(db, fresh("storm"))
    assert app.public_key is not None
    pool = await asyncpg.create_pool(pg_url, min_size=1, max_size=4)
    try:
        counting = CountingPool(pool)
        directory = plans.AppDirectory(counting, None)  # type: ignore[arg-type]
        keys = [app.public_key] * 300 + ["pk_nobody_" + secrets.token_hex(4)] * 300 + [""] * 300
        found = await asyncio.gather(*(directory.lookup(k) for k in keys))
        assert {f.id for f in found[:300]} == {app.id}
        assert found[300:600] == [None] * 300
        assert {f.id for f in found[600:]} == {"default"}
        assert counting.queries == 3
        await directory.lookup(app.public_key)  # cached
        assert counting.queries == 3
        assert await directory.lookup("k" * 5000) is None  # too long to be a key: no query
        assert counting.queries == 3
    finally:
        await pool.close()


# --- the commands --------------------------------------------------------------------------------


async def relay_cli(pg_url: str, *args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env["RELAY_DATABASE_URL"] = pg_url
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


async def ok(pg_url: str, *args: str) -> str:
    code, out, err = await relay_cli(pg_url, *args)
    assert code == 0, f"relay {' '.join(args)}: exit {code}\n{out}\n{err}"
    return out


async def test_plan_commands(pg_url: str):
    name = fresh("cli-plan")
    out = await ok(
        pg_url, "plan", "create", name, "--max-connections", "5", "--messages-per-second", "20"
    )
    assert out.strip() == f"{name}\tmax_connections=5\tmax_channels=default\tmessages_per_second=20"
    out = await ok(pg_url, "plan", "set", name, "--max-connections", "unlimited")
    assert "max_connections=unlimited" in out and "messages_per_second=20" in out
    out = await ok(pg_url, "plan", "set", name, "--max-channels", "3")
    assert "max_connections=unlimited\tmax_channels=3\tmessages_per_second=20" in out
    listed = await ok(pg_url, "plan", "list")
    assert any(line.startswith(name + "\t") for line in listed.splitlines())

    code, _, err = await relay_cli(pg_url, "plan", "create", fresh("p"))
    assert code == 2 and "--max-connections" in err
    code, _, err = await relay_cli(pg_url, "plan", "create", name, "--max-connections", "1")
    assert code == 2 and "already exists" in err
    code, _, err = await relay_cli(pg_url, "plan", "set", name, "--max-connections", "many")
    assert code == 2 and "whole number or 'unlimited'" in err


async def test_app_commands(pg_url: str, db: asyncpg.Connection):
    plan = fresh("cli-plan")
    await ok(pg_url, "plan", "create", plan, "--max-connections", "2")
    app = fresh("cli-app")
    out = await ok(pg_url, "app", "create", app, "--plan", plan, "--origin", "https://a.example")
    fields = dict(part.split("=", 1) for part in out.strip().split("\t")[1:])
    assert out.startswith(app + "\t")
    assert fields["public_key"].startswith("pk_")
    assert fields["plan"] == plan and fields["origins"] == "https://a.example"

    keyed = fresh("cli-keyed")
    out = await ok(pg_url, "app", "create", keyed, "--public-key", "my-own-key-" + keyed)
    assert f"public_key=my-own-key-{keyed}\tplan=default\torigins=any" in out

    out = await ok(pg_url, "app", "set-plan", keyed, plan)
    assert f"plan={plan}" in out
    out = await ok(pg_url, "app", "set-origins", app, "https://b.example", "https://c.example")
    assert "origins=https://b.example,https://c.example" in out
    out = await ok(pg_url, "app", "set-origins", app)
    assert "origins=any" in out
    listed = await ok(pg_url, "app", "list")
    assert any(line.startswith(app + "\t") for line in listed.splitlines())
    assert any(line.startswith(keyed + "\t") for line in listed.splitlines())
    stored = await db.fetchrow("SELECT plan, origins FROM relay.apps WHERE id = $1", keyed)
    assert stored["plan"] == plan and stored["origins"] == []

    code, _, err = await relay_cli(pg_url, "app", "set-plan", fresh("ghost"), plan)
    assert code == 2 and "no app named" in err
    code, _, err = await relay_cli(pg_url, "app", "create", fresh("x"), "--plan", fresh("ghost"))
    assert code == 2 and "no plan named" in err
    code, _, err = await relay_cli(pg_url, "app", "set-origins", app, "not-an-origin")
    assert code == 2 and "not an origin" in err
