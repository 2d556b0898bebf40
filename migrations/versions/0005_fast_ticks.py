"""Ticks committed without waiting for the disk: a guard against reusing lost tick ids.

The listener commits its ticks asynchronously (synchronous_commit = off), so
a PostgreSQL crash can lose the last few ticks, and the tick id sequence
with them. relay.tick_guard is an UNLOGGED table: PostgreSQL empties it in
crash recovery (and it is empty on a promoted standby), so the first tick
after a crash finds it empty and moves the id sequence far past any id a
lost tick could have had, with a synchronous commit (sql/relay.sql,
relay.tick()). A position in a lost tick then names no tick at all and is
answered with "reload", never replayed from the wrong place.

The guard starts full: every tick before this migration was committed
synchronously, so nothing can be lost yet.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from alembic import op

from relay.db import refuse_downgrade

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE UNLOGGED TABLE relay.tick_guard (
            durable boolean PRIMARY KEY DEFAULT true CHECK (durable)
        )
        """
    )
    op.execute("INSERT INTO relay.tick_guard DEFAULT VALUES")


def downgrade() -> None:
    refuse_downgrade()
