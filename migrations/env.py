"""alembic environment: runs the relay's migrations on a synchronous psycopg connection."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool, text

from relay.db import read_sql, sqlalchemy_url
from relay.schema import SCHEMA, metadata

config = context.config
url = config.attributes.get("url") or context.get_x_argument(as_dictionary=True).get("url")
if not url:
    raise SystemExit("no database URL: pass -x url=postgresql://...")

engine = create_engine(sqlalchemy_url(url), poolclass=pool.NullPool)
with engine.connect() as connection:
    connection.execute(text(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}"))
    connection.commit()
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table_schema=SCHEMA,
        include_schemas=True,
    )
    with context.begin_transaction():
        # Several relay processes may start at once: one migrates, the others wait.
        connection.execute(text("SELECT pg_advisory_xact_lock(hashtext('relay.migrate'))"))
        context.run_migrations()
        # The functions are not frozen in migrations: every migrate brings them
        # (and the capture functions of every watched table) to this release.
        # Straight to psycopg with no parameters, so the SQL's % signs stay as written.
        connection.connection.driver_connection.execute(read_sql("relay.sql"))
engine.dispose()
