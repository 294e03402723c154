"""Metadata filters for search: a small JSON language, compiled once and evaluated over an
index's item columns (Arrow arrays, see `clipsearch.index.items`).

    {"colour": "red"}                                   equality (also {"colour": {"$eq": "red"}})
    {"colour": {"$in": ["red", "blue"]}}                 one of ($nin: none of; $ne: not equal)
    {"year": {"$gte": 2000, "$lt": 2010}}                numeric range ($gt, $gte, $lt, $lte)
    {"licence": {"$exists": true}}                       the field is present
    {"$and": [...]}, {"$or": [...]}                      combined; several keys in one object are and-ed

Fields are the items' metadata keys, plus `id` and `text`. A comparison with a field an
item lacks is false for that item (`$ne` and `$nin` included), as in Chroma and Qdrant.
Values compare as JSON values: 1 equals 1.0, but true is not 1 and "1" is not 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipsearch.core.errors import InvalidInput

MISSING = object()
RANGE_OPS = {"$gt": pc.greater, "$gte": pc.greater_equal, "$lt": pc.less, "$lte": pc.less_equal}
VALUE_OPS = ("$eq", "$ne", "$in", "$nin", "$exists", *RANGE_OPS)
MAX_NODES = 256  # a filter is a query, not a program

# What a field holds in one item: its kind, and the value in the typed column of that kind.
ABSENT, NULL, BOOL, NUMBER, STRING, OTHER = range(6)  # OTHER: a list or an object, equal to no filter value
KINDS = {"s": pa.string(), "n": pa.float64(), "i": pa.int64(), "b": pa.bool_()}  # i: numbers that are integers
_INT64 = (-(1 << 63), (1 << 63) - 1)


class InvalidFilter(InvalidInput):
    code = "invalid_filter"


def _integer(v: float | int) -> int | None:
    """`v` as an int64 when it is a whole number that fits one, else None."""
    if isinstance(v, float) and not v.is_integer():
        return None
    return int(v) if _INT64[0] <= v <= _INT64[1] else None


def _float(v: int | float) -> float | None:
    try:
        return float(v)
    except OverflowError:  # an integer past float range equals no stored number
        return None


def typed_value(v: Any) -> tuple[int, dict[str, Any]]:
    """A JSON value's kind and its entries in the typed columns."""
    if v is MISSING:
        return ABSENT, {}
    if v is None:
        return NULL, {}
    if isinstance(v, bool):
        return BOOL, {"b": v}
    if isinstance(v, (int, float)):
        whole = _integer(v)
        return NUMBER, {"n": _float(v), **({"i": whole} if whole is not None else {})}
    if isinstance(v, str):
        return STRING, {"s": v}
    return OTHER, {}


def field_arrays(values: Sequence[Any], kinds: Sequence[str] | None = None) -> dict[str, pa.Array]:
    """One field's values (MISSING where an item lacks it) as Arrow arrays: the kind of each
    (int8 "k") and one array per value kind in `kinds` (default: those that occur), null
    where an item's value is of another kind."""
    kind = np.empty(len(values), np.int8)
    typed: dict[str, list[Any]] = {name: [None] * len(values) for name in KINDS}
    for row, v in enumerate(values):
        kind[row], entries = typed_value(v)
        for name, x in entries.items():
            typed[name][row] = x
    if kinds is None:
        kinds = [name for name, vals in typed.items() if any(x is not None for x in vals)]
    return {"k": pa.array(kind, pa.int8()), **{name: pa.array(typed[name], KINDS[name]) for name in kinds}}


def _true(mask: Any) -> np.ndarray:
    return np.asarray(mask.fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)


@dataclass(frozen=True)
class Field:
    """One field's columns over all items: `k` (kinds; None: a string field present wherever
    `s` is not null, as `id` and `text`) and the typed columns (None: no item has that kind)."""

    count: int
    k: pa.ChunkedArray | None = None
    s: pa.ChunkedArray | None = None
    n: pa.ChunkedArray | None = None
    i: pa.ChunkedArray | None = None
    b: pa.ChunkedArray | None = None

    def present(self) -> np.ndarray:
        if self.k is None:
            return _true(pc.is_valid(self.s)) if self.s is not None else np.zeros(self.count, bool)
        return _true(pc.not_equal(self.k, ABSENT))

    def member(self, targets: Sequence[Any]) -> np.ndarray:
        """True where the item's value equals one of `targets` (JSON scalars)."""
        out = np.zeros(self.count, bool)
        strings = [t for t in targets if isinstance(t, str)]
        bools = [t for t in targets if isinstance(t, bool)]
        numbers = [t for t in targets if isinstance(t, (int, float)) and not isinstance(t, bool)]
        if any(t is None for t in targets) and self.k is not None:
            out |= _true(pc.equal(self.k, NULL))
        if strings and self.s is not None:
            out |= _true(pc.is_in(self.s, value_set=pa.array(strings, pa.string())))
        if bools and self.b is not None:
            out |= _true(pc.is_in(self.b, value_set=pa.array(bools, pa.bool_())))
        if numbers and self.n is not None:
            # whole numbers compare as int64 (exact past 2**53); the rest as floats
            ints = [w for w in (_integer(t) for t in numbers) if w is not None]
            whole = self.i if self.i is not None else pa.chunked_array([pa.nulls(self.count, pa.int64())])
            out |= _true(pc.is_in(whole, value_set=pa.array(ints, pa.int64())))
            floats = [f for f in map(_float, numbers) if f is not None]
            out |= _true(pc.is_null(whole)) & _true(pc.is_in(self.n, value_set=pa.array(floats, pa.float64())))
        return out

    def compare(self, op: str, bound: float) -> np.ndarray:
        if self.n is None:
            return np.zeros(self.count, bool)
        return _true(RANGE_OPS[op](self.n, bound))  # null (not a number) compares False


class Columns(Protocol):
    """What a filter is evaluated over: an index's items, field by field."""

    def __len__(self) -> int: ...

    def field(self, name: str) -> Field: ...


@dataclass(frozen=True)
class Filter:
    """A compiled filter: `mask(columns)` is True for the items it selects."""

    evaluate: Callable[[Columns], np.ndarray]  # a Check
    key: str  # canonical JSON: equal filters share their cached selection

    def mask(self, columns: Columns) -> np.ndarray:
        return self.evaluate(columns)


def _scalar(value: Any, where: str) -> Any:
    if isinstance(value, int) and not isinstance(value, bool) and not _INT64[0] <= value <= _INT64[1]:
        raise InvalidFilter(f"{where}: integer out of the 64-bit range", field=where)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise InvalidFilter(f"{where}: expected a string, number, boolean or null", field=where)


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or _float(value) is None \
            or not math.isfinite(value):
        raise InvalidFilter(f"{where}: expected a finite number", field=where)
    return float(value)


def compile_filter(spec: Any, where: str = "filter") -> Filter:
    """Check and compile a filter; errors are InvalidFilter (400) naming the part at fault."""
    import orjson

    nodes = [0]
    evaluate = _compile(spec, where, nodes)
    return Filter(evaluate, orjson.dumps(spec, option=orjson.OPT_SORT_KEYS).decode())


Check = Callable[[Columns], np.ndarray]


def _all(checks: list[Check]) -> Check:
    return checks[0] if len(checks) == 1 else lambda c: np.logical_and.reduce([ch(c) for ch in checks])


def _any(checks: list[Check]) -> Check:
    return lambda c: np.logical_or.reduce([ch(c) for ch in checks])


def _in(name: str, targets: list[Any], negate: bool) -> Check:
    if negate:
        return lambda c: (f := c.field(name)).present() & ~f.member(targets)
    return lambda c: c.field(name).member(targets)


def _range(name: str, op: str, bound: float) -> Check:
    return lambda c: c.field(name).compare(op, bound)


def _exists(name: str, want: bool) -> Check:
    return lambda c: c.field(name).present() == want


def _compile(spec: Any, where: str, nodes: list[int]) -> Check:
    nodes[0] += 1
    if nodes[0] > MAX_NODES:
        raise InvalidFilter(f"{where}: more than {MAX_NODES} conditions", field=where)
    if not isinstance(spec, dict) or not spec:
        raise InvalidFilter(f"{where}: expected an object of conditions", field=where)
    parts: list[Check] = []
    for key, value in spec.items():
        here = f"{where}.{key}"
        if key in ("$and", "$or"):
            if not isinstance(value, list) or not value:
                raise InvalidFilter(f"{here}: expected a non-empty list of filters", field=here)
            subs = [_compile(v, f"{here}[{i}]", nodes) for i, v in enumerate(value)]
            parts.append(_all(subs) if key == "$and" else _any(subs))
        elif key.startswith("$"):
            raise InvalidFilter(f"{here}: unknown operator (fields may not start with $)", field=here)
        elif isinstance(value, dict):
            parts.append(_field(key, value, here))
        else:
            parts.append(_in(key, [_scalar(value, here)], False))
    return _all(parts)


def _field(name: str, ops: dict[str, Any], where: str) -> Check:
    if not ops:
        raise InvalidFilter(f"{where}: expected at least one operator", field=where)
    checks: list[Check] = []
    for op, value in ops.items():
        here = f"{where}.{op}"
        if op not in VALUE_OPS:
            raise InvalidFilter(f"{here}: unknown operator; use one of {', '.join(VALUE_OPS)}", field=here)
        if op in RANGE_OPS:
            checks.append(_range(name, op, _number(value, here)))
        elif op == "$exists":
            if not isinstance(value, bool):
                raise InvalidFilter(f"{here}: expected true or false", field=here)
            checks.append(_exists(name, value))
        elif op in ("$in", "$nin"):
            if not isinstance(value, list) or not value:
                raise InvalidFilter(f"{here}: expected a non-empty list", field=here)
            checks.append(_in(name, [_scalar(v, f"{here}[{i}]") for i, v in enumerate(value)], op == "$nin"))
        elif op == "$eq":
            checks.append(_in(name, [_scalar(value, here)], False))
        else:
            checks.append(_in(name, [_scalar(value, here)], True))
    return _all(checks)
