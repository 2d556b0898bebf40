"""The relay's own schema ("relay"), described with SQLAlchemy as the migrations leave it.

The tables are created and changed only by the numbered migrations
(``migrations/versions``); this module describes the result, column for column,
so the schema can be read in one place and so that alembic's autogenerate
comparison of these models against a migrated database finds nothing
(``tests/test_migrations.py`` runs it in CI). A migration that changes a table
changes its model here in the same commit.

PostgreSQL types SQLAlchemy does not know (``xid8``, ``pg_snapshot``,
``"char"``) are declared below and registered for reflection, so that the
comparison checks those columns' types too instead of skipping them.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    Table,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSON, REGCLASS
from sqlalchemy.dialects.postgresql.base import ischema_names
from sqlalchemy.types import UserDefinedType

SCHEMA = "relay"
DEFAULT_APP = "default"
DEFAULT_PLAN = "default"


class _PgType(UserDefinedType[Any]):
    """A PostgreSQL type named ``pg_name``, carried as text by the relay's own queries."""

    pg_name = ""
    cache_ok = True

    def get_col_spec(self, **kw: Any) -> str:
        return self.pg_name


class XID8(_PgType):
    """A 64-bit transaction id (``pg_current_xact_id()``)."""

    pg_name = "xid8"


class PG_SNAPSHOT(_PgType):  # named as PostgreSQL names it, like REGCLASS
    """A transaction snapshot (``pg_current_snapshot()``)."""

    pg_name = "pg_snapshot"


class CHAR1(_PgType):
    """PostgreSQL's one-byte internal ``"char"`` (not ``char(1)``)."""

    pg_name = '"char"'


# What the catalog calls them (format_type), for reflection.
for _type in (XID8, PG_SNAPSHOT, CHAR1):
    ischema_names[_type.pg_name] = _type

metadata = MetaData(schema=SCHEMA)

plans = Table(
    "plans",
    metadata,
    Column("name", Text, primary_key=True),
    # NULL means unlimited.
    Column("max_connections", Integer, nullable=True),
    Column("max_channels_per_socket", Integer, nullable=True),
    Column("messages_per_second", Integer, nullable=True),
)

apps = Table(
    "apps",
    metadata,
    Column("id", Text, primary_key=True),
    Column("public_key", Text, nullable=True),
    Column("plan", Text, ForeignKey(plans.c.name, name="apps_plan_fkey"), nullable=False),
    # Allowed Origin header values; empty means any origin.
    Column("origins", ARRAY(Text), nullable=False, server_default="{}"),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # How the app's session tokens are verified: one of the three keys (none:
    # the relay's own key, with 'aud' required), the audience and issuer.
    Column("jwt_secret", Text),
    Column("jwt_public_key", Text),
    Column("jwks_url", Text),
    Column("audience", Text),
    Column("issuer", Text),
    Column("suspended", Boolean, nullable=False, server_default=text("false")),
    UniqueConstraint("public_key", name="apps_public_key_key"),
)

# Tables whose changes are captured. "repo" is the name clients use in
# "db-<repo>" (the table's own name, unique within its app); "mode" is the
# permission suffix, e.g. '760'; "capture_function" the generated trigger
# function in schema relay.
watched = Table(
    "watched",
    metadata,
    Column(
        "app",
        Text,
        ForeignKey(apps.c.id, name="watched_app_fkey"),
        primary_key=True,
        server_default=DEFAULT_APP,
    ),
    Column("repo", Text, primary_key=True),
    Column("table_oid", REGCLASS, nullable=False),
    Column("id_column", Text, nullable=False),
    Column("owner_column", Text),
    Column("account_column", Text),
    Column("mode", Text, nullable=False),
    Column("capture_function", Text, nullable=False),
    Column("watched_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # The column numbers of id, owner and account: renames are followed by number.
    Column("id_attnum", SmallInteger),
    Column("owner_attnum", SmallInteger),
    Column("account_attnum", SmallInteger),
    UniqueConstraint("table_oid", name="watched_table_oid_key"),
    CheckConstraint("mode ~ '^[0-7]{3}$'", name="watched_mode_check"),
)

# The durable event log, in insertion order (seq) and by writer transaction
# (xid); sql/relay.sql cuts it into commit-ordered ticks. "data" is the full
# new row (NULL for deletes); owner/account are the new row's (the old row's
# for deletes) and old_* the old row's on updates.
events = Table(
    "events",
    metadata,
    Column("seq", BigInteger, Identity(always=True), nullable=False),
    Column("xid", XID8, nullable=False),
    Column("repo", Text, nullable=False),
    Column("op", CHAR1, nullable=False),
    Column("row_id", JSON),
    Column("owner_id", Text),
    Column("account_id", Text),
    Column("old_owner_id", Text),
    Column("old_account_id", Text),
    Column("data", JSON),
    # Events of capture functions older than the tenancy migration are the default app's.
    Column("app", Text, nullable=False, server_default=DEFAULT_APP),
    # c/u/d: a row created, updated, deleted; t: the table truncated; x: the
    # table (or a column relay reads) dropped.
    CheckConstraint("op IN ('c', 'u', 'd', 't', 'x')", name="events_op_check"),
    Index("events_xid", "xid"),
    # seq only grows, so a BRIN index is tiny and nearly free to maintain.
    Index("events_seq", "seq", postgresql_using="brin"),
)

# One row per relay listener connection (by backend pid): asleep or polling.
listeners = Table(
    "listeners",
    metadata,
    Column("pid", Integer, primary_key=True, autoincrement=False),
    Column("sleeping", Boolean, nullable=False, server_default=text("false")),
    Column("since", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # The last tick it dispatched (written about once a second, for the pruner).
    Column("last_tick", BigInteger),
)

# Consecutive snapshots that cut the log into commit-ordered batches.
ticks = Table(
    "ticks",
    metadata,
    Column("id", BigInteger, Identity(always=True), primary_key=True),
    Column("snapshot", PG_SNAPSHOT, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

# One row while every tick id handed out is on disk. UNLOGGED: crash recovery
# empties it, and the next relay.tick() then skips the ids a lost tick may have had.
tick_guard = Table(
    "tick_guard",
    metadata,
    Column("durable", Boolean, primary_key=True, server_default=text("true")),
    CheckConstraint("durable", name="tick_guard_durable_check"),
    prefixes=["UNLOGGED"],
)


def include_name(name: str | None, type_: str, parent_names: Any) -> bool:
    """For autogenerate: only schema relay, and not alembic's own version table."""
    if type_ == "schema":
        return name == SCHEMA
    if type_ == "table":
        return name != "alembic_version"
    return True
