"""The relay schema: event plumbing (migrations/sql/0001_relay.sql), plus plans and apps.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import ARRAY

from relay.db import read_migration_sql, refuse_downgrade

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Straight to psycopg with no parameters, so the SQL's % signs stay as written.
    op.get_bind().connection.driver_connection.execute(read_migration_sql("0001_relay.sql"))
    op.create_table(
        "plans",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("max_connections", sa.Integer, nullable=True),
        sa.Column("max_channels_per_socket", sa.Integer, nullable=True),
        sa.Column("messages_per_second", sa.Integer, nullable=True),
        schema="relay",
    )
    op.create_table(
        "apps",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("public_key", sa.Text, unique=True, nullable=True),
        sa.Column("plan", sa.Text, sa.ForeignKey("relay.plans.name"), nullable=False),
        sa.Column("origins", ARRAY(sa.Text), nullable=False, server_default="{}"),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        schema="relay",
    )
    op.execute("INSERT INTO relay.plans (name) VALUES ('default')")
    op.execute("INSERT INTO relay.apps (id, public_key, plan) VALUES ('default', NULL, 'default')")


def downgrade() -> None:
    # Until December this dropped schema relay, with the event log, every capture
    # function (so the triggers on watched tables) and alembic's version table.
    # Changed to refuse: a landed migration's upgrade never changes, but making a
    # downgrade refuse can only prevent data loss.
    refuse_downgrade()
