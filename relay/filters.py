"""Row filters on db- channels, in the syntax Supabase users know: ``column=op.value``.

Operators: ``eq``, ``neq``, ``lt``, ``lte``, ``gt``, ``gte`` and ``in``
(``status=in.(open,done)``; values in ``in`` are separated by commas and may
be double-quoted to hold a comma). A filter is applied twice with one meaning:
in SQL to a snapshot (the value cast to the column's type, so PostgreSQL
compares), and in Python to each event's row (the JSON value compared as the
column's type category compares: numbers as numbers, times as instants,
booleans, text by code point). Text ordering (``lt``/``gt`` on text) follows
code points in events and the column's collation in a snapshot; they agree
for the C collation, and ``eq``/``neq``/``in`` agree always.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

OPERATORS = ("eq", "neq", "lt", "lte", "gt", "gte", "in")
_SQL_OP = {"eq": "=", "neq": "<>", "lt": "<", "lte": "<=", "gt": ">", "gte": ">="}
_FILTER = re.compile(r"([A-Za-z_][A-Za-z0-9_$]{0,62})=([a-z]+)\.(.*)", re.DOTALL)
_IN_ITEM = re.compile(r'\s*(?:"((?:[^"\\]|\\.)*)"|([^,]*?))\s*(?:,|\Z)')
MAX_IN_VALUES = 100


class FilterError(ValueError):
    """A filter that cannot be applied; the message says why, for the client."""


@dataclass(frozen=True, slots=True)
class Filter:
    column: str
    op: str
    values: tuple[str, ...]  # one value, or the list of ``in``
    column_type: str = "text"  # the column's SQL type, once checked against the table

    @classmethod
    def parse(cls, text: str) -> Filter:
        match = _FILTER.fullmatch(text.strip())
        if match is None:
            raise FilterError(
                f"not a filter: {text[:80]!r} (expected column=op.value, e.g. status=eq.open)"
            )
        column, op, raw = match.groups()
        if op not in OPERATORS:
            raise FilterError(f"unknown filter operator {op!r}: use one of {', '.join(OPERATORS)}")
        if op != "in":
            return cls(column, op, (raw,))
        if not (raw.startswith("(") and raw.endswith(")")):
            raise FilterError("an 'in' filter lists its values in parentheses: col=in.(a,b)")
        values = tuple(_split_in(raw[1:-1]))
        if not values or len(values) > MAX_IN_VALUES:
            raise FilterError(f"an 'in' filter takes 1 to {MAX_IN_VALUES} values")
        return cls(column, op, values)

    def sql(self, column_type: str, first_arg: int) -> tuple[str, list[object]]:
        """A WHERE condition on the quoted column, with the values as text parameters
        (``column_type`` comes from format_type(), so it is safe to write in)."""
        col = '"' + self.column.replace('"', '""') + '"'
        if self.op == "in":
            return f"{col} = ANY(${first_arg}::text[]::{column_type}[])", [list(self.values)]
        return f"{col} {_SQL_OP[self.op]} ${first_arg}::text::{column_type}", [self.values[0]]

    def matcher(self, category: str) -> Callable[[dict[str, Any]], bool]:
        """A test of one row (as decoded from row_to_json) for a column of this type category."""
        convert: Callable[[Any], Any] = _CONVERTERS.get(category, _as_text)
        try:
            wanted = [convert(v) for v in self.values]
        except (ValueError, InvalidOperation, TypeError):
            raise FilterError(
                f"{self.values[0][:40]!r} is not a value of column {self.column!r}'s type"
            ) from None
        column, op = self.column, self.op

        def matches(row: dict[str, Any]) -> bool:
            value = row.get(column)
            if value is None:
                return False  # NULL matches no comparison, as in SQL
            try:
                have = convert(value)
                if op == "in":
                    return have in wanted
                return bool(_COMPARE[op](have, wanted[0]))
            except (ValueError, InvalidOperation, TypeError):
                return False

        return matches


def _split_in(body: str) -> list[str]:
    values: list[str] = []
    pos = 0
    while pos < len(body):
        m = _IN_ITEM.match(body, pos)
        if m is None or m.end() == pos:
            raise FilterError("malformed 'in' list: col=in.(a,b,\"c,d\")")
        quoted, bare = m.groups()
        values.append(quoted.replace('\\"', '"') if quoted is not None else bare)
        pos = m.end()
    if body.endswith(","):
        values.append("")
    return values


def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else str(value)


def _as_number(value: Any) -> tuple[int, Decimal]:
    """A number as PostgreSQL orders it: NaN equals NaN and sorts above every other value."""
    if isinstance(value, bool):
        raise TypeError("not a number")
    number = Decimal(str(value))
    return (1, _ZERO) if number.is_nan() else (0, number)


def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("t", "true", "y", "yes", "on", "1"):
        return True
    if text in ("f", "false", "n", "no", "off", "0"):
        return False
    raise ValueError("not a boolean")


def _as_instant(value: Any) -> tuple[int, datetime.datetime]:
    """Dates and times as instants, ordered as PostgreSQL orders them (``-infinity``
    before every instant, ``infinity`` after); a value without a zone is read as UTC."""
    text = str(value).strip()
    if text.lower() in _INFINITIES:
        return _INFINITIES[text.lower()], _EPOCH
    text = text.replace(" ", "T", 1)
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        day = datetime.date.fromisoformat(text)
        moment = datetime.datetime(day.year, day.month, day.day)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return 0, moment


_ZERO = Decimal(0)
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
_INFINITIES = {"infinity": 1, "+infinity": 1, "-infinity": -1}


def _as_folded_text(value: Any) -> str:
    """uuid and other user types: text, case-folded."""
    return str(value).lower()


_CONVERTERS: dict[str, Callable[[Any], Any]] = {
    "N": _as_number,  # numeric types
    "B": _as_bool,
    "D": _as_instant,  # date/time types
    "S": _as_text,
    "U": _as_folded_text,
}
_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "eq": lambda a, b: a == b,
    "neq": lambda a, b: a != b,
    "lt": lambda a, b: a < b,
    "lte": lambda a, b: a <= b,
    "gt": lambda a, b: a > b,
    "gte": lambda a, b: a >= b,
}
