"""Apps are sealed tenants: their own token verification, tables and events.

- relay.apps: how the app's session tokens are verified (an HS256 secret, a
  PEM public key or a JWKS URL; the expected audience and issuer) and whether
  it is suspended.
- relay.watched: each watched table belongs to an app; repository names are
  unique within an app (two apps may each have a ``tasks_760_``).
- relay.events: the app of each event. Existing rows, and rows written by
  capture functions created before this migration, belong to the default app
  (the column default), so writers need no restart and nothing is lost.

The functions whose result shape changes are dropped here; ``sql/relay.sql``,
applied after every migrate, creates them anew in the same transaction.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from relay.db import LOCK_WATCHED_TABLES, refuse_downgrade

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(LOCK_WATCHED_TABLES)
    op.add_column("apps", sa.Column("jwt_secret", sa.Text), schema="relay")
    op.add_column("apps", sa.Column("jwt_public_key", sa.Text), schema="relay")
    op.add_column("apps", sa.Column("jwks_url", sa.Text), schema="relay")
    op.add_column("apps", sa.Column("audience", sa.Text), schema="relay")
    op.add_column("apps", sa.Column("issuer", sa.Text), schema="relay")
    op.add_column(
        "apps",
        sa.Column("suspended", sa.Boolean, nullable=False, server_default=sa.false()),
        schema="relay",
    )
    # A constant default: PostgreSQL adds the column without rewriting the log.
    op.add_column(
        "events",
        sa.Column("app", sa.Text, nullable=False, server_default="default"),
        schema="relay",
    )
    op.add_column(
        "watched",
        sa.Column(
            "app",
            sa.Text,
            sa.ForeignKey("relay.apps.id"),
            nullable=False,
            server_default="default",
        ),
        schema="relay",
    )
    op.drop_constraint("watched_pkey", "watched", schema="relay")
    op.create_primary_key("watched_pkey", "watched", ["app", "repo"], schema="relay")
    for signature in (
        "relay.events_between(bigint, bigint)",
        "relay.poll(bigint, integer)",
        "relay.events_page(bigint, bigint, bigint, integer, text)",
        "relay.watch(regclass, text, text, text)",
    ):
        op.execute(f"DROP FUNCTION IF EXISTS {signature}")


def downgrade() -> None:
    refuse_downgrade()
