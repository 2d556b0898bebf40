"""Unit tests of relay.filters: parsing the Supabase syntax and matching rows by type."""

from __future__ import annotations

import json

import pytest

from relay.filters import Filter, FilterError


@pytest.mark.parametrize(
    ("text", "column", "op", "values"),
    [
        ("project_id=eq.42", "project_id", "eq", ("42",)),
        ("status=in.(open,done)", "status", "in", ("open", "done")),
        ('title=in.("a,b",c)', "title", "in", ("a,b", "c")),
        ("n=gte.-3.5", "n", "gte", ("-3.5",)),
        ("name=neq.", "name", "neq", ("",)),
        ("note=eq.a=b.c", "note", "eq", ("a=b.c",)),
    ],
)
def test_parse(text, column, op, values) -> None:
    f = Filter.parse(text)
    assert (f.column, f.op, f.values) == (column, op, values)


@pytest.mark.parametrize(
    "text",
    ["", "status", "status=open", "status=like.x%", "1col=eq.1", "s=in.open", "s=in.()", "x=eq"],
)
def test_invalid_filters_say_why(text) -> None:
    with pytest.raises(FilterError):
        Filter.parse(text)


@pytest.mark.parametrize(
    ("text", "category", "row", "expected"),
    [
        ("n=eq.42", "N", {"n": 42}, True),
        ("n=eq.42", "N", {"n": 42.0}, True),
        ("n=lt.10", "N", {"n": 9}, True),
        ("n=lt.10", "N", {"n": 10}, False),
        ("n=gt.9", "N", {"n": 10}, True),  # as numbers, not as text ("10" < "9")
        ("n=lte.10", "N", {"n": 10}, True),
        ("n=gte.10.5", "N", {"n": 10}, False),
        ("n=neq.1", "N", {"n": None}, False),  # NULL matches no comparison
        ("n=in.(1,2,3)", "N", {"n": 2}, True),
        ("n=in.(1,2,3)", "N", {"n": 4}, False),
        ("s=eq.open", "S", {"s": "open"}, True),
        ("s=neq.open", "S", {"s": "done"}, True),
        ("s=in.(open,done)", "S", {"s": "late"}, False),
        ("b=eq.true", "B", {"b": True}, True),
        ("b=eq.f", "B", {"b": False}, True),
        ("t=gt.2024-01-01T00:00:00+00:00", "D", {"t": "2024-01-01T01:00:00+01:00"}, False),
        ("t=gte.2024-01-01T00:00:00+00:00", "D", {"t": "2024-01-01T01:00:00+01:00"}, True),
        ("d=lt.2024-02-01", "D", {"d": "2024-01-31"}, True),
        (
            "u=eq.ABCDEF00-0000-0000-0000-000000000000",
            "U",
            {"u": "abcdef00-0000-0000-0000-000000000000"},
            True,
        ),
        ("missing=eq.1", "N", {"other": 1}, False),
    ],
)
def test_matching_compares_as_the_column_type(text, category, row, expected) -> None:
    assert Filter.parse(text).matcher(category)(row) is expected


def test_a_value_of_the_wrong_type_is_refused() -> None:
    with pytest.raises(FilterError, match="not a value"):
        Filter.parse("n=eq.abc").matcher("N")


def test_sql_casts_the_values_to_the_column_type() -> None:
    f = Filter.parse("status=in.(open,done)")
    assert f.sql("text", 3) == ('"status" = ANY($3::text[]::text[])', [["open", "done"]])
    assert Filter.parse("n=lte.5").sql("integer", 1) == ('"n" <= $1::text::integer', ["5"])


def message_of(text: str, category: str | None = None) -> str:
    """The text a client is sent for a filter that cannot be applied."""
    with pytest.raises(FilterError) as err:
        f = Filter.parse(text)
        if category is not None:
            f.matcher(category)
    return str(err.value)


def test_refusals_say_exactly_why() -> None:
    long = "x" * 100
    assert message_of(long) == (
        f"not a filter: {long[:80]!r} (expected column=op.value, e.g. status=eq.open)"
    )
    assert message_of("s=like.x%") == (
        "unknown filter operator 'like': use one of eq, neq, lt, lte, gt, gte, in"
    )
    for half_open in ("s=in.(a,b", "s=in.a,b)", "s=in.a,b"):
        assert message_of(half_open) == (
            "an 'in' filter lists its values in parentheses: col=in.(a,b)"
        )
    assert message_of("s=in.()") == "an 'in' filter takes 1 to 100 values"
    assert message_of("n=eq." + "9" * 30 + "z" * 30, "N") == (
        f"{'9' * 30 + 'z' * 10!r} is not a value of column 'n''s type"
    )


def test_in_takes_at_most_100_values() -> None:
    values = [str(i) for i in range(101)]
    assert Filter.parse(f"n=in.({','.join(values[:100])})").values == tuple(values[:100])
    assert message_of(f"n=in.({','.join(values)})") == "an 'in' filter takes 1 to 100 values"


@pytest.mark.parametrize(
    ("text", "values"),
    [
        (r'title=in.("say \"hi\"",x)', ('say "hi"', "x")),  # an escaped quote inside quotes
        ("s=in.(a,)", ("a", "")),  # a trailing comma: the empty string
        ("s=in.(,a)", ("", "a")),
    ],
)
def test_in_lists_unescape_quotes_and_keep_empty_values(text, values) -> None:
    assert Filter.parse(text).values == values


# (SQL type, rows' values of that column, filter values): each filter operator
# on each value, applied as the relay applies it to a snapshot (SQL) and to a
# live event's row (row_to_json, then the matcher).
TYPED_CASES = [
    ("integer", ["1", "5", "9", "10", "11", None], ["5", "10"]),
    ("numeric", ["-3.5", "0", "2.50", "10", "NaN", "Infinity", "-Infinity"], ["2.5", "NaN"]),
    # row_to_json writes NaN and the infinities of floats as strings
    ("double precision", ["1.5", "NaN", "Infinity", "-Infinity"], ["1.5", "NaN", "-Infinity"]),
    ("text", ["a", "b", "open", ""], ["b", ""]),
    (
        "timestamptz",
        [
            "2024-01-01 00:00:00+00",
            "2024-01-01 01:00:00+01",
            "2024-06-01 12:00:00+00",
            "infinity",
            "-infinity",
        ],
        # with a space, as people write times (and a date alone)
        ["2024-01-01 00:00:00+00", "2024-01-01T00:30:00+00:00", "2024-06-01"],
    ),
    ("date", ["2024-01-31", "2024-02-01", "2024-02-02", "infinity"], ["2024-02-01", "infinity"]),
    ("boolean", ["true", "false"], ["t", "true", "y", "yes", "on", "1"]),
    ("boolean", ["true", "false"], ["f", "false", "n", "no", "off", "0", "TRUE", " Off "]),
    ("uuid", ["abcdef00-0000-0000-0000-000000000000"], ["ABCDEF00-0000-0000-0000-000000000000"]),
]


@pytest.mark.parametrize(("sql_type", "rows", "values"), TYPED_CASES)
async def test_the_sql_and_the_matcher_agree(db, sql_type, rows, values) -> None:
    """The same filter selects the same rows in a snapshot and in the live stream."""
    table = "f_" + sql_type.replace(" ", "_")
    await db.execute(f"CREATE TEMP TABLE {table} (id serial, c {sql_type})")
    await db.executemany(
        f"INSERT INTO {table} (c) VALUES ($1::text::{sql_type})", [(r,) for r in rows]
    )
    category = await db.fetchval(
        "SELECT typcategory::text FROM pg_type WHERE oid = $1::regtype", sql_type
    )
    checked = 0
    for op in ("eq", "neq", "lt", "lte", "gt", "gte"):
        for value in values:
            f = Filter.parse(f"c={op}.{value}")
            clause, args = f.sql(sql_type, first_arg=1)
            matches = f.matcher(category)
            for record in await db.fetch(
                f"SELECT row_to_json(t.*)::text AS row, coalesce({clause}, false) AS passes"
                f" FROM {table} t",
                *args,
            ):
                row = json.loads(record["row"])
                assert matches(row) is record["passes"], (op, value, row)
                checked += 1
    assert checked == 6 * len(values) * len(rows)


async def test_a_value_that_cannot_be_compared_passes_no_order_filter(db) -> None:
    """numeric NaN (row_to_json: the string "NaN") is not below 10, in SQL nor in events."""
    row = json.loads(await db.fetchval("SELECT row_to_json(t) FROM (SELECT 'NaN'::numeric AS n) t"))
    assert row == {"n": "NaN"}
    for text in ("n=lt.10", "n=lte.10", "n=eq.10"):
        f = Filter.parse(text)
        clause, args = f.sql("numeric", first_arg=1)
        assert (
            await db.fetchval(f"SELECT {clause} FROM (SELECT 'NaN'::numeric AS n) t", *args)
            is False
        )
        assert f.matcher("N")(row) is False
