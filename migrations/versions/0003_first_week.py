"""Databases made in relay's first week get what migration 0001 grew since.

Until 0001's SQL was frozen (migrations/sql/0001_relay.sql), migration 0001
ran whatever sql/relay.sql held at the time, and that file gained a table and
an index after the first release: a database migrated by an earlier relay has
revision 0001 but lacks them, and its writers' capture functions (rewritten by
every migrate) would fail on the missing ``relay.listeners``. Its first
``relay.prune`` also takes an ``integer`` where today's takes a ``bigint``, so
both would exist and every prune call would be ambiguous.

Each statement is a no-op on a database whose 0001 ran the frozen SQL. On a
first-week database, building the BRIN index holds writers of watched tables
for as long as one pass over the log takes.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from alembic import op

from relay.db import refuse_downgrade

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE IF NOT EXISTS relay.listeners (
            pid         integer PRIMARY KEY,
            sleeping    boolean NOT NULL DEFAULT false,
            since       timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    op.execute("CREATE INDEX IF NOT EXISTS events_seq ON relay.events USING brin (seq)")
    op.execute("DROP FUNCTION IF EXISTS relay.prune(interval, integer)")


def downgrade() -> None:
    refuse_downgrade()
