"""Metadata filters for search: a small JSON language, compiled once and evaluated over an
index's items as numpy column operations.

    {"colour": "red"}                                   equality (also {"colour": {"$eq": "red"}})
    {"colour": {"$in": ["red", "blue"]}}                 one of ($nin: none of; $ne: not equal)
    {"year": {"$gte": 2000, "$lt": 2010}}                numeric range ($gt, $gte, $lt, $lte)
    {"licence": {"$exists": true}}                       the field is present
    {"$and": [...]}, {"$or": [...]}                      combined; several keys in one object are and-ed

Fields are the items' metadata keys, plus `id` and `text`. A comparison with a field an
item lacks is false for that item (`$ne` and `$nin` included), as in Chroma and Qdrant.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from clipsearch.core.errors import InvalidInput

MISSING = object()
RANGE_OPS: dict[str, Callable[[np.ndarray, float], np.ndarray]] = {
    "$gt": np.greater, "$gte": np.greater_equal, "$lt": np.less, "$lte": np.less_equal}
VALUE_OPS = ("$eq", "$ne", "$in", "$nin", "$exists", *RANGE_OPS)
MAX_NODES = 256  # a filter is a query, not a program


class InvalidFilter(InvalidInput):
    code = "invalid_filter"


class Columns:
    """An index's items as columns, made on first use of each field: the values as an object
    array (MISSING where absent), and as floats (NaN where absent or not a number)."""

    def __init__(self, items: Sequence[Mapping[str, Any]]) -> None:
        self._items = items
        self._values: dict[str, np.ndarray] = {}
        self._numbers: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._items)

    def values(self, field: str) -> np.ndarray:
        if field not in self._values:
            out = np.empty(len(self._items), dtype=object)
            if field in ("id", "text"):
                out[:] = [item.get(field, MISSING) for item in self._items]
            else:
                out[:] = [(item.get("metadata") or {}).get(field, MISSING) for item in self._items]
            self._values[field] = out
        return self._values[field]

    def numbers(self, field: str) -> np.ndarray:
        if field not in self._numbers:
            self._numbers[field] = np.fromiter(
                (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan
                 for v in self.values(field)), np.float64, len(self._items))
        return self._numbers[field]


@dataclass(frozen=True)
class Filter:
    """A compiled filter: `mask(columns)` is True for the items it selects."""

    evaluate: Callable[[Columns], np.ndarray]  # a Check
    key: str  # canonical JSON: equal filters share their cached selection

    def mask(self, columns: Columns) -> np.ndarray:
        return self.evaluate(columns)


def _scalar(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise InvalidFilter(f"{where}: expected a string, number, boolean or null", field=where)


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidFilter(f"{where}: expected a finite number", field=where)
    return float(value)


def _same(v: Any, value: Any) -> bool:
    """JSON equality: 1 equals 1.0, but true is not 1, and "1" is not 1."""
    if isinstance(v, bool) or isinstance(value, bool):
        return type(v) is type(value) and v == value
    if isinstance(v, (int, float)) and isinstance(value, (int, float)):
        return bool(v == value)
    return type(v) is type(value) and bool(v == value)


def _equal(values: np.ndarray, value: Any) -> np.ndarray:
    return np.fromiter((_same(v, value) for v in values), bool, len(values))


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


def _equals(field: str, target: Any) -> Check:
    return lambda c: _equal(c.values(field), target)


def _not_equals(field: str, target: Any) -> Check:
    return lambda c: (c.values(field) != MISSING) & ~_equal(c.values(field), target)


def _in(field: str, targets: list[Any], negate: bool) -> Check:
    return lambda c: _membership(c.values(field), targets, negate)


def _range(field: str, compare: Callable[[np.ndarray, float], np.ndarray], bound: float) -> Check:
    return lambda c: compare(c.numbers(field), bound)  # NaN (absent, not a number) compares False


def _exists(field: str, want: bool) -> Check:
    return lambda c: (c.values(field) != MISSING) == want


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
            parts.append(_equals(key, _scalar(value, here)))
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
            checks.append(_range(name, RANGE_OPS[op], _number(value, here)))
        elif op == "$exists":
            if not isinstance(value, bool):
                raise InvalidFilter(f"{here}: expected true or false", field=here)
            checks.append(_exists(name, value))
        elif op in ("$in", "$nin"):
            if not isinstance(value, list) or not value:
                raise InvalidFilter(f"{here}: expected a non-empty list", field=here)
            checks.append(_in(name, [_scalar(v, f"{here}[{i}]") for i, v in enumerate(value)], op == "$nin"))
        elif op == "$eq":
            checks.append(_equals(name, _scalar(value, here)))
        else:
            checks.append(_not_equals(name, _scalar(value, here)))
    return _all(checks)


def _key(value: Any) -> Any:
    """A hashable key under which JSON-equal values meet (1 and 1.0; not true and 1)."""
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, (int, float)):
        return ("number", float(value))
    if isinstance(value, (str, type(None))):
        return ("scalar", value)
    return ("other", id(value))  # lists and objects in metadata equal no filter value


def _membership(values: np.ndarray, targets: list[Any], negate: bool) -> np.ndarray:
    keys = {_key(t) for t in targets}  # one set lookup per item, however long the list
    found = np.fromiter((v is not MISSING and _key(v) in keys for v in values), bool, len(values))
    return (values != MISSING) & ~found if negate else found
