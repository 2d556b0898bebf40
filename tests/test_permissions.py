"""Unit tests of the permission suffix rule (relay.permissions) against the contract."""

from __future__ import annotations

import itertools

import pytest

from relay.permissions import Mode, can_read, mode_of


@pytest.mark.parametrize(
    ("repo", "expected"),
    [
        ("tasks_760_", Mode(True, True, False)),
        ("tasks_700_", Mode(True, False, False)),
        ("tasks_744_", Mode(True, True, True)),
        ("tasks_004_", Mode(False, False, True)),
        ("tasks", Mode(True, True, False)),  # no suffix reads as 740
        ("tasks_760", Mode(True, True, False)),  # not a suffix: needs both underscores
        ("tasks_789_", Mode(True, True, False)),  # 8 and 9 are not octal
    ],
)
def test_mode_of(repo: str, expected: Mode) -> None:
    assert mode_of(repo) == expected


def test_contract_example_760() -> None:
    mode = mode_of("tasks_760_")
    row_in_1 = ("someone", "1")
    row_in_2 = ("someone", "2")
    assert can_read(mode, "A", "1", *row_in_1)
    assert can_read(mode, "B", "1", *row_in_1)
    assert not can_read(mode, "C", "2", *row_in_1)
    assert can_read(mode, "C", "2", *row_in_2)
    assert not can_read(mode, "A", "1", *row_in_2)


def test_every_mode_matches_the_rule() -> None:
    for o, g, e in itertools.product(range(8), repeat=3):
        mode = Mode.parse(f"{o}{g}{e}")
        for user, account, owner, row_account in itertools.product(
            ["u", "v"], ["1", "2", None], ["u", "v", None], ["1", "2", None]
        ):
            expected = bool(
                e & 4
                or (g & 4 and account is not None and account == row_account)
                or (o & 4 and owner == user)
            )
            assert can_read(mode, user, account, owner, row_account) == expected


def test_null_columns_match_nobody() -> None:
    mode = mode_of("t_770_")
    assert not can_read(mode, "u", None, None, None)
    assert not can_read(mode, "u", "1", None, None)


async def test_sql_and_python_forms_of_the_rule_agree_on_random_rows(db) -> None:
    """The snapshot's WHERE (sql_condition) and the events' filter (can_read) are one rule."""
    import random

    from relay.permissions import sql_condition

    rng = random.Random(7)
    table = f"perm_{rng.randrange(10**9)}"
    await db.execute(f"CREATE TEMP TABLE {table} (id int, owner_id text, account_id int)")
    owners = ["u1", "u2", "", None]
    accounts = [1, 2, None]
    rows = [(i, rng.choice(owners), rng.choice(accounts)) for i in range(200)]
    await db.executemany(f"INSERT INTO {table} VALUES ($1, $2, $3)", rows)
    for digits in itertools.product("01234567", repeat=3):
        mode = Mode.parse("".join(digits))
        for user, account, root in (("u1", "1", False), ("u2", None, False), ("x", "2", True)):
            where, args = sql_condition(mode, user, account, root, "owner_id", "account_id", 1)
            got = {r["id"] for r in await db.fetch(f"SELECT id FROM {table} WHERE {where}", *args)}
            expected = {
                i
                for i, owner, acct in rows
                if root or can_read(mode, user, account, owner, None if acct is None else str(acct))
            }
            assert got == expected, (digits, user, account, root)
