"""The relay's own schema ("relay"), described with SQLAlchemy.

The event plumbing (watched, events, ticks and their functions) is created
from the plain SQL in ``sql/relay.sql``; it is described here too so that the
whole schema can be read in one place. Apps and plans are created by the
alembic migrations from these definitions.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Integer,
    MetaData,
    Table,
    Text,
    func,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSON

SCHEMA = "relay"
DEFAULT_APP = "default"
DEFAULT_PLAN = "default"

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
    Column("public_key", Text, unique=True, nullable=True),
    Column("plan", Text, ForeignKey(plans.c.name), nullable=False),
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
    Column("suspended", Boolean, nullable=False, server_default="false"),
)

watched = Table(
    "watched",
    metadata,
    Column("app", Text, ForeignKey(apps.c.id), primary_key=True, server_default=DEFAULT_APP),
    Column("repo", Text, primary_key=True),
    Column("table_oid", Text, nullable=False),
    Column("id_column", Text, nullable=False),
    Column("owner_column", Text),
    Column("account_column", Text),
    Column("mode", Text, nullable=False),
    Column("capture_function", Text, nullable=False),
    Column("watched_at", DateTime(timezone=True), nullable=False),
)

events = Table(
    "events",
    metadata,
    Column("seq", BigInteger, nullable=False),
    Column("xid", Text, nullable=False),
    Column("app", Text, nullable=False, server_default=DEFAULT_APP),
    Column("repo", Text, nullable=False),
    Column("op", Text, nullable=False),
    Column("row_id", JSON),
    Column("owner_id", Text),
    Column("account_id", Text),
    Column("old_owner_id", Text),
    Column("old_account_id", Text),
    Column("data", JSON),
)

ticks = Table(
    "ticks",
    metadata,
    Column("id", BigInteger, primary_key=True),
    Column("snapshot", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)
