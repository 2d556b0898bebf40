"""Failures a person can act on: one line saying what is wrong and what to do.

The CLI turns every foreseeable failure (a port in use, a database that
refuses or cannot be reached, a wrong password, missing privileges) into one
of these lines and a non-zero exit; ``--debug`` shows the traceback instead.
:func:`explain` never echoes a password: URLs are shown redacted.
"""

from __future__ import annotations

import errno
import socket

from relay.db import redact_url


def explain(err: BaseException, *, database_url: str | None = None, listen: str = "") -> str | None:
    """The one-line explanation of ``err``, or None when it is not a foreseen failure."""
    where = f" at {redact_url(database_url)}" if database_url else ""
    for exc in _chain(err):
        if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
            return (
                f"cannot listen on {listen or 'the configured address'}: the port is already in"
                " use (another relay?); stop that process or choose another with --port or"
                " RELAY_PORT"
            )
        if isinstance(exc, OSError) and exc.errno == errno.EADDRNOTAVAIL and listen:
            return (
                f"cannot listen on {listen}: no such address on this machine; use --host or"
                " RELAY_HOST (127.0.0.1, or 0.0.0.0 for every interface)"
            )
        if isinstance(exc, PermissionError) and listen and exc.errno == errno.EACCES:
            return f"cannot listen on {listen}: permission denied; choose a port above 1023"
        text = _message(exc)
        if _is_database_error(exc) or database_url:
            found = _database_problem(exc, text, where)
            if found is not None:
                return found
    return None


def _chain(err: BaseException) -> list[BaseException]:
    """The exception, what caused it, and what it wraps (SQLAlchemy's ``orig``)."""
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [err]
    while todo:
        exc = todo.pop(0)
        if exc is None or any(exc is s for s in seen):
            continue
        seen.append(exc)
        todo.extend([getattr(exc, "orig", None), exc.__cause__, exc.__context__])
        if isinstance(exc, BaseExceptionGroup):
            todo.extend(exc.exceptions)
    return seen


def _message(exc: BaseException) -> str:
    return str(exc).lower()


def _is_database_error(exc: BaseException) -> bool:
    module = type(exc).__module__ or ""
    return module.startswith(("asyncpg", "psycopg", "sqlalchemy"))


def _database_problem(exc: BaseException, text: str, where: str) -> str | None:
    name = type(exc).__name__
    if "password authentication failed" in text or name == "InvalidPasswordError":
        return (
            f"the database{where} refused the password: fix the password in RELAY_DATABASE_URL"
            " (or --database-url)"
        )
    if "no password supplied" in text or "password is required" in text:
        return f"the database{where} wants a password: put it in RELAY_DATABASE_URL"
    if name in ("InsufficientPrivilegeError", "InsufficientPrivilege") or (
        "permission denied" in text and _is_database_error(exc)
    ):
        return (
            f"the database role{where} lacks a privilege relay needs ({str(exc).splitlines()[0]}):"
            " run relay migrate as a role that may create schemas, or grant it; see docs/dba.md"
        )
    if name in ("InvalidCatalogNameError", "InvalidCatalogName") or (
        "database" in text and "does not exist" in text
    ):
        return f"the database{where} does not exist: create it (createdb) or fix the URL"
    if name in ("InvalidAuthorizationSpecificationError",) or (
        "role" in text and "does not exist" in text
    ):
        return f"the database{where} has no such role: create it or fix the user in the URL"
    if "no pg_hba.conf entry" in text:
        return f"the database{where} does not accept this client (pg_hba.conf): ask its DBA"
    if isinstance(exc, ConnectionRefusedError) or "connection refused" in text:
        return (
            f"the database{where} refused the connection: is PostgreSQL running and listening"
            " there? Check RELAY_DATABASE_URL"
        )
    if isinstance(exc, socket.gaierror) or any(
        m in text for m in ("could not translate host name", "failed to resolve host")
    ):
        return f"the database host{where} is unknown: check the host in RELAY_DATABASE_URL"
    if isinstance(exc, TimeoutError) or "timeout" in text or "timed out" in text:
        return (
            f"the database{where} did not answer in time: check the network and that"
            " PostgreSQL runs"
        )
    if isinstance(exc, OSError) and exc.errno in (
        errno.ENETUNREACH,
        errno.EHOSTUNREACH,
        errno.ENOENT,
        errno.ECONNRESET,
    ):
        return (
            f"cannot reach the database{where} ({exc.strerror or exc}): check RELAY_DATABASE_URL"
            " and the network"
        )
    if "connection" in text and ("failed" in text or "closed" in text) and _is_database_error(exc):
        return (
            f"cannot reach the database{where}: {str(exc).splitlines()[0][:200]};"
            " check RELAY_DATABASE_URL"
        )
    return None
