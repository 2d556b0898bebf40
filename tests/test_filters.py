"""Unit tests of relay.filters: parsing the Supabase syntax and matching rows by type."""

from __future__ import annotations

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
