"""Parameterised SQL on the application database, inside the transaction
that acknowledges the event: a failed attempt leaves no writes.
Placeholders are the backend's own (`$1` on PostgreSQL, `?` or `$1` on
SQLite).

    n = sql.execute("UPDATE t SET v = $1 WHERE k = $2", "x", 7)
    for row in sql.query("SELECT k, v FROM t WHERE k > $1", 0):
        row["k"], row["v"]

Parameters convert by themselves: None, bool, int (64-bit signed), float,
str, bytes; dict and list as their JSON text; anything with isoformat()
(datetime, date, time) as that text; Decimal and UUID as str()."""

from __future__ import annotations

import json
from typing import Any, Iterator, List, Optional

from . import CapabilityError, _wit

_I64 = (-(2**63), 2**63 - 1)


def value(v: Any, index: int = 0) -> Any:
    """One Python value as a wit `sql.value`. index (1-based) names the
    parameter in errors."""
    w = _wit.sql()
    if v is None:
        return w.Value_Null()
    if isinstance(v, bool):  # before int: bool is an int
        return w.Value_Boolean(v)
    if isinstance(v, int):
        if not _I64[0] <= v <= _I64[1]:
            raise CapabilityError(
                "invalid", f"parameter ${index}: {v} does not fit a 64-bit signed integer"
            )
        return w.Value_Int(v)
    if isinstance(v, float):
        return w.Value_Float(v)
    if isinstance(v, str):
        return w.Value_Text(v)
    if isinstance(v, (bytes, bytearray, memoryview)):
        return w.Value_Blob(bytes(v))
    if isinstance(v, (dict, list, tuple)):
        return w.Value_Text(json.dumps(v))
    if hasattr(v, "isoformat"):
        return w.Value_Text(v.isoformat())
    if type(v).__name__ in ("Decimal", "UUID"):
        return w.Value_Text(str(v))
    raise CapabilityError(
        "invalid",
        f"parameter ${index}: cannot pass a {type(v).__name__} to SQL; "
        "use None, bool, int, float, str, bytes, dict or list",
    )


def _python(v: Any) -> Any:
    name = type(v).__name__
    if name == "Value_Null":
        return None
    return v.value


class Rows:
    """The result of query(): `columns`, `rows` (lists of Python values).
    Iterating yields one dict per row."""

    def __init__(self, columns: List[str], rows: List[List[Any]]):
        self.columns = columns
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict]:
        for row in self.rows:
            yield dict(zip(self.columns, row))

    def first(self) -> Optional[dict]:
        """The first row as a dict, None if there is none."""
        return dict(zip(self.columns, self.rows[0])) if self.rows else None

    def scalar(self) -> Any:
        """The first column of the first row, None if there is no row."""
        return self.rows[0][0] if self.rows and self.rows[0] else None

    def __repr__(self) -> str:
        return f"Rows(columns={self.columns!r}, rows={self.rows!r})"


def _params(params: tuple) -> list:
    return [value(p, i + 1) for i, p in enumerate(params)]


def execute(statement: str, *params: Any) -> int:
    """Run a statement; returns the number of rows it affected."""
    return _wit.call(_wit.sql().execute, statement, _params(params))


def query(statement: str, *params: Any) -> Rows:
    """Run a statement that returns rows."""
    raw = _wit.call(_wit.sql().query, statement, _params(params))
    return Rows(list(raw.columns), [[_python(v) for v in row] for row in raw.rows])
