"""Who may read a row: the ``_OGE_`` permission suffix of a repository's name.

Three octal digits as in Unix, for the row's owner, its group (the owner's
account) and everyone; bit 4 is read. A name without a suffix reads as 740.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_MODE = "740"
READ = 4
# \Z, not $: "$" also matches before a trailing newline, which PostgreSQL's does not.
_SUFFIX = re.compile(r"_([0-7]{3})_\Z")


@dataclass(frozen=True, slots=True)
class Mode:
    owner_reads: bool
    group_reads: bool
    everyone_reads: bool

    @classmethod
    def parse(cls, digits: str) -> Mode:
        owner, group, everyone = (int(d, 8) for d in digits)
        return cls(bool(owner & READ), bool(group & READ), bool(everyone & READ))


def mode_of(repo: str) -> Mode:
    match = _SUFFIX.search(repo)
    return Mode.parse(match.group(1) if match else DEFAULT_MODE)


def can_read(
    mode: Mode,
    user_id: str,
    account_id: str | None,
    row_owner: str | None,
    row_account: str | None,
) -> bool:
    """The contract's rule, for one subscriber and one row (NULL columns match nobody)."""
    if mode.everyone_reads:
        return True
    if mode.group_reads and account_id is not None and row_account == account_id:
        return True
    return mode.owner_reads and row_owner is not None and row_owner == user_id


def sql_condition(
    mode: Mode,
    user_id: str,
    account_id: str | None,
    is_root: bool,
    owner_column: str | None,
    account_column: str | None,
    first_arg: int,
) -> tuple[str, list[object]]:
    """The same rule as :func:`can_read`, as a WHERE condition for a snapshot query.

    Columns are compared as text, as events compare them; ``tests/test_permissions``
    checks on random rows that the two forms agree.
    """
    if mode.everyone_reads or is_root:
        return "TRUE", []
    terms: list[str] = []
    args: list[object] = []
    if mode.group_reads and account_id is not None and account_column is not None:
        args.append(account_id)
        terms.append(f"{_quote(account_column)}::text = ${first_arg + len(args) - 1}")
    if mode.owner_reads and owner_column is not None:
        args.append(user_id)
        terms.append(f"{_quote(owner_column)}::text = ${first_arg + len(args) - 1}")
    return ("(" + " OR ".join(terms) + ")" if terms else "FALSE"), args


def _quote(column: str) -> str:
    return '"' + column.replace('"', '""') + '"'
