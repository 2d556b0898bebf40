"""Delivery at the edges: TRUNCATE and dropped repositories in the log, listeners' positions.

- relay.events.op gains 't' (the table was truncated) and 'x' (the table, or
  a column relay reads, was dropped: the repository is gone).
- relay.watched remembers the column numbers of its id, owner and account
  columns, so a rename of one of them rewrites the capture function instead
  of breaking every write to the table.
- relay.listeners records the last tick each listener dispatched, so the
  pruner can say when it prunes what a live listener has not read.
- relay.poll() and relay.events_between() return each event's xid, and
  poll() says when the caller's tick was pruned (sql/relay.sql recreates them).
- Every table watched before this migration gets its TRUNCATE trigger (new
  tables get it from relay.watch()).

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from relay.db import LOCK_WATCHED_TABLES, refuse_downgrade

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(LOCK_WATCHED_TABLES)
    op.drop_constraint("events_op_check", "events", schema="relay")
    op.create_check_constraint(
        "events_op_check", "events", "op IN ('c', 'u', 'd', 't', 'x')", schema="relay"
    )
    for column in ("id_attnum", "owner_attnum", "account_attnum"):
        op.add_column("watched", sa.Column(column, sa.SmallInteger), schema="relay")
    op.execute(
        """
        UPDATE relay.watched w SET
            id_attnum = (SELECT attnum FROM pg_attribute
                         WHERE attrelid = w.table_oid AND attname = w.id_column),
            owner_attnum = (SELECT attnum FROM pg_attribute
                            WHERE attrelid = w.table_oid AND attname = w.owner_column),
            account_attnum = (SELECT attnum FROM pg_attribute
                              WHERE attrelid = w.table_oid AND attname = w.account_column)
        """
    )
    op.add_column("listeners", sa.Column("last_tick", sa.BigInteger), schema="relay")
    # Their rows gain the events' xid (a snapshot join tells apart what it read).
    op.execute("DROP FUNCTION IF EXISTS relay.poll(bigint, integer)")
    op.execute("DROP FUNCTION IF EXISTS relay.events_between(bigint, bigint)")
    op.execute(
        """
        DO $$
        DECLARE
            w record;
        BEGIN
            FOR w IN SELECT table_oid, capture_function FROM relay.watched
                     WHERE EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = table_oid)
            LOOP
                EXECUTE format('DROP TRIGGER IF EXISTS relay_capture_truncate ON %s',
                               w.table_oid);
                EXECUTE format('CREATE TRIGGER relay_capture_truncate AFTER TRUNCATE ON %s
                                FOR EACH STATEMENT EXECUTE FUNCTION relay.%I()',
                               w.table_oid, w.capture_function);
            END LOOP;
        END;
        $$
        """
    )


def downgrade() -> None:
    refuse_downgrade()
