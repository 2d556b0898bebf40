"""alembic environment: runs the relay's migrations on a synchronous psycopg connection."""

from __future__ import annotations

from alembic import context
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, pool, text

from relay.db import read_sql, sqlalchemy_url
from relay.schema import SCHEMA, include_name, metadata

config = context.config
url = config.attributes.get("url") or context.get_x_argument(as_dictionary=True).get("url")
if not url:
    raise SystemExit("no database URL: pass -x url=postgresql://...")
if context.is_offline_mode():
    # Migration 0001 and the functions are raw SQL run on the driver connection,
    # which an offline script would silently leave out. Read migrations/ and sql/.
    raise SystemExit("relay's migrations cannot be rendered offline (--sql): read migrations/")

engine = create_engine(sqlalchemy_url(url), poolclass=pool.NullPool)
with engine.connect() as connection:
    connection.execute(text(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}"))
    connection.commit()
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table_schema=SCHEMA,
        include_schemas=True,
        include_name=include_name,
        compare_type=True,
        compare_server_default=True,
    )
    with context.begin_transaction():
        # Several relay processes may start at once: one migrates, the others wait.
        connection.execute(text("SELECT pg_advisory_xact_lock(hashtext('relay.migrate'))"))
        context.run_migrations()
        # The functions are not frozen in migrations: every migrate to the newest
        # revision brings them (and the capture functions of every watched table)
        # to this release, in the migrations' transaction. They are written for
        # the newest tables, so a database left at an older revision (upgrade
        # to a given revision; a refused downgrade) keeps the functions it has.
        heads = set(ScriptDirectory.from_config(config).get_heads())
        if set(context.get_context().get_current_heads()) == heads:
            # Straight to psycopg with no parameters, so the SQL's % signs stay as written.
            connection.connection.driver_connection.execute(read_sql("relay.sql"))
engine.dispose()
