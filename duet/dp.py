"""Differential privacy: what the owner declares, which inputs qualify, and the mechanisms.

The owner shares data with ``dp=DP(epsilon=..., bounds=...)``. The researcher then asks
``r.dp.mean(x, epsilon=0.5)``; each such statistic is released through an OpenDP
measurement, charged to the shared name's budget (``duet.ledger``), and shown to the owner
with its mechanism, noise scale and 95% accuracy before anything leaves.

Three parts, used on both sides of the owner's worker boundary:

- ``DP``: the owner's declaration (privacy unit, per-column bounds, total budget). The
  researcher never chooses bounds, the unit or delta: a ``dp.*`` operation that names one is
  refused.
- ``Derivations``: which of the researcher's objects may feed a DP statistic. An input
  qualifies only if it derives from exactly one DP-shared object through *row-stable* steps,
  where each source row ends up in at most one element: column selection, a boolean filter
  built from the same rows, element-wise arithmetic with scalars. Anything else (merges,
  concatenations, repeats, sorting, fancy indexing, arrays sent by the researcher) loses the
  mark, so the statistic is refused. The tracker reads operation names and argument kinds
  only, never data, so the kernel runs it too and refuses at once with a clear reason; the
  worker runs the same code on what it executed.
- ``QuerySpec`` / ``DPQuery``: a parsed statistic (kernel and worker) and, in the worker, the
  lazy query that copies its input and runs OpenDP only when the kernel asks for the value,
  after it reserved the cost in the ledger.

OpenDP: ``dp.enable_features("contrib")`` opts in to OpenDP components that are not yet
formally vetted by its maintainers' proof review (the Laplace and exponential mechanisms
here are among them); OpenDP requires the opt-in so that nobody uses them unknowingly.
Noise is always drawn by OpenDP (exact samplers), never from floats in Python. Elementwise
preparation happens in numpy (cast to float, grouping by declared categories, squaring for
the variance) and every sensitivity-relevant step is OpenDP's: missing values are imputed
and values clamped to the owner's bounds inside each measurement, and the cost is the
measurement's own privacy map.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from . import protocol as p
from .dp_train import TrainSettings
from .dtypes import canonical
from .errors import PolicyViolation

__all__ = [
    "DP",
    "MAX_CATEGORIES",
    "MAX_QUERY_EPSILON",
    "STATISTICS",
    "DPQuery",
    "Derivations",
    "Derived",
    "Quote",
    "QuerySpec",
    "is_dp_op",
    "parse_op",
]

MAX_QUERY_EPSILON = 100.0  # far beyond any meaningful epsilon: a typo, not a query
MIN_QUERY_EPSILON = 1e-6
MAX_CATEGORIES = 200
MAX_BINS = 200
MAX_CANDIDATES = 1000
MAX_QUANTILES = 20
STATISTICS = ("count", "sum", "mean", "variance", "histogram", "quantile")
_ALLOWED_KWARGS: dict[str, frozenset[str]] = {
    "count": frozenset({"epsilon", "by", "categories"}),
    "sum": frozenset({"epsilon", "by", "categories"}),
    "mean": frozenset({"epsilon", "by", "categories"}),
    "variance": frozenset({"epsilon"}),
    "histogram": frozenset({"epsilon", "bins", "categories"}),
    "quantile": frozenset({"epsilon", "q", "candidates"}),
}
_OWNER_ONLY = ("bounds", "unit", "delta", "contributions", "lower", "upper", "clamp", "scale",
               "sensitivity")


# -- the owner's declaration ----------------------------------------------------------------
@dataclass(frozen=True)
class DP:
    """What differential privacy needs, declared by the owner when sharing.

    ``epsilon``/``delta``: the total budget of the shared name, across sessions (the ledger
    keeps what was spent). ``bounds``: ``{"age": (18, 90)}`` per column of a table, or one
    ``(lower, upper)`` pair for a 1-D array or series; values are clamped to these before any
    sum, mean, variance, histogram or quantile, which is what bounds one person's influence.
    ``unit``: the privacy unit. ``None``: one row is one person. A column name (e.g.
    ``"person_id"``): one person may have several rows; ``contributions`` is the most rows any
    one person has (checked when sharing; if omitted it is measured then, and the noise scale
    the researcher sees reveals it). ``categories``: public group keys per column, e.g.
    ``{"sex": ["F", "M"]}``, used when the researcher groups by that column without naming
    keys (keys are never read from the data: that would leak them).
    """

    epsilon: float
    delta: float = 0.0
    bounds: Mapping[str, tuple[float, float]] | tuple[float, float] = field(default_factory=dict)
    unit: str | None = None
    contributions: int | None = None
    categories: Mapping[str, Sequence[Any]] = field(default_factory=dict)
    # DP-SGD (``r.dp.train``, duet.dp_train): the owner's clipping norm, epoch bound, delta
    # per run, accountant; ``None``: ``duet.TrainSettings()``'s defaults
    training: TrainSettings | None = None

    def __post_init__(self) -> None:
        if self.training is not None and not isinstance(self.training, TrainSettings):
            raise ValueError("DP training takes a duet.TrainSettings(...)")
        if not _positive_number(self.epsilon, allow_zero=True):
            raise ValueError(f"DP epsilon must be a finite number >= 0, got {self.epsilon!r}")
        if not (_number(self.delta) and 0 <= self.delta < 1):
            raise ValueError(f"DP delta must be a number in [0, 1), got {self.delta!r}")
        bounds = self.bounds
        pairs = [("", bounds)] if isinstance(bounds, tuple) else list(dict(bounds).items())
        for column, pair in pairs:
            _check_bounds(column, pair)
        if self.unit is not None and not isinstance(self.unit, str):
            raise ValueError("DP unit must be a column name (or None: one row per person)")
        if self.contributions is not None and not (
                isinstance(self.contributions, int) and not isinstance(self.contributions, bool)
                and 1 <= self.contributions <= 10_000):
            raise ValueError("DP contributions must be an integer between 1 and 10000")
        for column, keys in dict(self.categories).items():
            try:
                _check_categories(list(keys), f"categories of {column!r}")
            except PolicyViolation as exc:
                raise ValueError(str(exc)) from None

    def spec(self, name: str, obj: Any) -> dict[str, Any]:
        """The plain description the kernel keeps and sends to the worker (checked against
        the object): its kind, bounds per column, rows per person and public categories."""
        kind = _kind_of(obj)
        if isinstance(self.bounds, tuple):
            if kind == "table":
                raise ValueError("a table needs bounds per column, e.g. bounds={'age': (18, 90)}")
            bounds = {name: [float(self.bounds[0]), float(self.bounds[1])]}
        else:
            bounds = {str(k): [float(v[0]), float(v[1])] for k, v in dict(self.bounds).items()}
        columns = _columns_of(obj)
        if kind == "table":
            unknown = sorted(set(bounds) - set(columns))
            if unknown:
                raise ValueError(f"bounds name columns the table does not have: {unknown}")
        elif set(bounds) - {name}:
            raise ValueError(f"a 1-D share has one pair of bounds: bounds=(lower, upper) or "
                             f"bounds={{{name!r}: (lower, upper)}}")
        contributions = 1
        if self.unit is not None:
            if kind != "table" or self.unit not in columns:
                raise ValueError(f"unit={self.unit!r} must name a column of the shared table")
            most = _most_rows_per_unit(obj[self.unit])
            if self.contributions is not None and most > self.contributions:
                raise ValueError(f"unit {self.unit!r}: a person has {most} rows, more than "
                                 f"contributions={self.contributions}")
            contributions = self.contributions or most
        elif self.contributions not in (None, 1):
            raise ValueError("contributions needs unit= (the column naming each person)")
        categories = {str(k): list(v) for k, v in dict(self.categories).items()}
        training = None if self.training is None else asdict(self.training)
        return {"kind": kind, "bounds": bounds, "contributions": contributions,
                "unit": self.unit, "categories": categories, "training": training}


def _kind_of(obj: Any) -> Literal["table", "values"]:
    module = type(obj).__module__.split(".")[0]
    if module == "pandas" and type(obj).__name__ == "DataFrame":
        return "table"
    if type(obj) is dict and obj and all(isinstance(k, str) for k in obj):
        # a table as a dict of equally long 1-D columns (numpy arrays or tensors)
        lengths = {_one_d_length(v) for v in obj.values()}
        if len(lengths) == 1 and None not in lengths:
            return "table"
    if _one_d_length(obj) is not None:
        return "values"
    raise TypeError("differential privacy applies to a 1-D numpy array, torch tensor or "
                    "pandas Series, or to a table: a pandas DataFrame, or a dict of equally "
                    "long 1-D columns (rows are records)")


def _one_d_length(obj: Any) -> int | None:
    module = type(obj).__module__.split(".")[0]
    shape = getattr(obj, "shape", None)
    if shape is not None and len(shape) == 1 and module in ("numpy", "torch", "pandas"):
        return int(shape[0])
    return None


def _columns_of(obj: Any) -> list[str]:
    if type(obj) is dict:
        return [str(k) for k in obj]
    columns = getattr(obj, "columns", None)
    return [str(c) for c in columns] if columns is not None else []


def _most_rows_per_unit(column: Any) -> int:
    import numpy as np

    values = _numpy(column)
    if not len(values):
        return 1
    _, counts = np.unique(values.astype(str) if values.dtype.kind == "O" else values,
                          return_counts=True)
    return int(counts.max())


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(
        value)


def _positive_number(value: Any, *, allow_zero: bool = False) -> bool:
    return _number(value) and (value >= 0 if allow_zero else value > 0)


def _check_bounds(column: str, pair: Any) -> None:
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(map(_number, pair))
            and pair[0] < pair[1]):
        raise ValueError(f"bounds{f' of {column!r}' if column else ''} must be a pair of "
                         f"finite numbers (lower, upper) with lower < upper, got {pair!r}")


def _check_categories(keys: list[Any], what: str) -> list[Any]:
    if not keys or len(keys) > MAX_CATEGORIES:
        raise PolicyViolation(f"{what}: between 1 and {MAX_CATEGORIES} keys")
    for key in keys:
        if not (isinstance(key, str) and len(key) <= p.MAX_NAME_CHARS) and not (
                isinstance(key, (int, float)) and not (isinstance(key, float)
                                                       and not math.isfinite(key))):
            raise PolicyViolation(f"{what}: keys must be strings or finite numbers")
    if len({_key(k) for k in keys}) != len(keys):
        raise PolicyViolation(f"{what}: keys must be distinct")
    return keys


def _key(value: Any) -> str:
    return value if isinstance(value, str) else repr(float(value) if not isinstance(
        value, bool) else value)


# -- which inputs qualify -------------------------------------------------------------------
@dataclass(frozen=True)
class Derived:
    """An object derived row-stably from DP-shared ``source``: each source row is in at most
    one element. ``rows`` names the row set (0: all rows; else a number given to the filter
    that made it, never given again, not its object id, which a freed object hands on), so
    two objects combine element-wise only if their rows line up. ``column``: whose bounds
    apply (None: mixed columns, so only counts)."""

    source: str
    column: str | None
    rows: int
    kind: Literal["table", "values", "mask"]


_COMPARE = {f"operator.{n}" for n in ("lt", "le", "gt", "ge", "eq", "ne")}
_ARITH = {f"operator.{n}" for n in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow")}
_UNARY = {"operator.neg", "operator.pos", "operator.abs"}
_LOGIC = {"operator.and_", "operator.or_", "operator.xor"}
_UFUNCS = {f"{lib}.{n}" for lib in ("numpy", "torch")
           for n in ("abs", "log", "log1p", "sqrt", "exp", "round", "floor", "ceil", "square")}
_MASK_UFUNCS = {f"{lib}.{n}" for lib in ("numpy", "torch") for n in ("isnan", "isfinite")}
_MASK_LOGIC = {"numpy.logical_and", "numpy.logical_or", "numpy.logical_xor",
               "torch.logical_and", "torch.logical_or", "torch.logical_xor"}
_SAME_METHODS = {"astype", "abs", "round", "clip", "fillna", "float", "double", "copy",
                 "clone", "to_numpy", "numpy", "detach"}
_MASK_METHODS = {"isna", "isnull", "notna", "notnull"}
_SUBSET_METHODS = {"dropna"}  # keeps some rows, each at most once: a new row set
# _RAISE_FREE: a step keeps the DP mark only if it cannot fail on some rows' values. A step
# that fails on one value (``astype("int64")`` of a column with a missing value, ``x // y``
# with a zero in ``y``) would make the query fail for that value and be answered otherwise:
# a bit about one record that no noise covers. Such steps drop the mark, whatever the data,
# so the query is refused at once.
_DIVIDING = {"operator.floordiv", "operator.mod", "operator.pow"}


class Derivations:
    """Tracks which objects derive row-stably from which DP-shared object (see module doc).

    ``specs``: shared name -> the owner's DP spec (``DP.spec``), for DP-shared names only.
    Fed every operation in order (``observe``); reads names and argument kinds only."""

    def __init__(self, specs: Mapping[str, Mapping[str, Any]]) -> None:
        self.specs = specs
        self._tags: dict[int, Derived] = {}
        self._row_sets = itertools.count(1)

    def tag(self, ref: Any) -> Derived | None:
        if isinstance(ref, p.StoreRef):
            spec = self.specs.get(ref.name)
            if spec is None:
                return None
            if spec["kind"] == "table":
                return Derived(ref.name, None, 0, "table")
            return Derived(ref.name, ref.name, 0, "values")
        if isinstance(ref, p.PointerRef):
            return self._tags.get(ref.id)
        return None

    def observe(self, op: p.Op) -> None:
        derived = self._derive(op)
        if derived is not None:
            self._tags[op.result] = derived

    def forget(self, ids: Sequence[int]) -> None:
        for object_id in ids:
            self._tags.pop(object_id, None)

    def clear(self) -> None:
        self._tags.clear()

    def _derive(self, op: p.Op) -> Derived | None:
        if op.kind == "function":
            return self._function(op)
        if op.kind == "method" and op.target is not None:
            target = self.tag(op.target)
            if target is None or target.kind == "mask" or not _plain_arguments(op):
                return None
            if op.name in _MASK_METHODS:
                return Derived(target.source, None, target.rows, "mask")
            if op.name in _SUBSET_METHODS:
                return Derived(target.source, target.column, next(self._row_sets), target.kind)
            if op.name in _SAME_METHODS:
                if op.name in ("to_numpy", "numpy") and target.kind == "table":
                    return None
                if op.name == "astype" and not _to_float(op):
                    return None  # to int: fails on a missing value (see _RAISE_FREE)
                return target
        return None

    def _function(self, op: p.Op) -> Derived | None:
        name, args = op.name, op.args
        if name == "operator.getitem" and len(args) == 2 and not op.kwargs:
            return self._getitem(self.tag(args[0]), args[1])
        if op.kwargs and name not in ("numpy.round",):
            return None
        if name in _COMPARE and len(args) == 2:
            common = self._elementwise(args, "values", strings=name in (
                "operator.eq", "operator.ne"))
            return None if common is None else Derived(common.source, None, common.rows,
                                                       "mask")
        if name in _DIVIDING and len(args) == 2 and not _scalar(args[1]):
            return None  # x // y, x % y, x ** y with y from the data may fail (see _RAISE_FREE)
        if (name in _ARITH and len(args) == 2) or (name in _UNARY | _UFUNCS and len(args) == 1):
            return self._elementwise(args, "values", strings=False)
        if (name in _LOGIC | _MASK_LOGIC and len(args) == 2) or (
                name in ("operator.invert", "numpy.logical_not", "torch.logical_not")
                and len(args) == 1):
            return self._elementwise(args, "mask", strings=False, scalars=False)
        if name in _MASK_UFUNCS and len(args) == 1:
            common = self._elementwise(args, "values", strings=False)
            return None if common is None else Derived(common.source, None, common.rows,
                                                       "mask")
        return None

    def _getitem(self, target: Derived | None, key: Any) -> Derived | None:
        if target is None or target.kind == "mask":
            return None
        if target.kind == "table" and isinstance(key, str):
            return Derived(target.source, key, target.rows, "values")
        if target.kind == "table" and isinstance(key, list) and key and all(
                isinstance(k, str) for k in key):
            return target
        mask = self.tag(key)
        if (mask is not None and mask.kind == "mask" and mask.source == target.source
                and mask.rows == target.rows):
            return Derived(target.source, target.column, next(self._row_sets), target.kind)
        return None

    def _elementwise(self, args: list[Any], kind: str, *, strings: bool,
                     scalars: bool = True) -> Derived | None:
        """The common derivation of element-wise operands: every reference derived, of
        ``kind``, from the same rows; other operands plain scalars; at least one reference."""
        tags: list[Derived] = []
        for arg in args:
            if isinstance(arg, (p.PointerRef, p.StoreRef)):
                tag = self.tag(arg)
                if tag is None or tag.kind != kind:
                    return None
                tags.append(tag)
            elif not (scalars and (_scalar(arg) or (strings and isinstance(arg, str)))):
                return None
        if not tags or any((t.source, t.rows) != (tags[0].source, tags[0].rows) for t in tags):
            return None
        columns = {t.column for t in tags}
        return Derived(tags[0].source, columns.pop() if len(columns) == 1 else None,
                       tags[0].rows, tags[0].kind)


def _to_float(op: p.Op) -> bool:
    """``astype`` to a floating dtype (never fails on a number, missing or not)."""
    target = op.args[0] if len(op.args) == 1 and not op.kwargs else op.kwargs.get("dtype")
    name = target.name if isinstance(target, p.DTypeRef) else target
    found = canonical(name) if isinstance(name, str) else None
    return found is not None and found[1] in ("float16", "bfloat16", "float32", "float64")


def _scalar(value: Any) -> bool:
    return isinstance(value, (bool, int, float)) and not isinstance(value, complex)


def _plain_arguments(op: p.Op) -> bool:
    return all(_scalar(a) or isinstance(a, (str, p.DTypeRef)) or a is None
               for a in [*op.args, *op.kwargs.values()])


# -- a parsed statistic ---------------------------------------------------------------------
@dataclass(frozen=True)
class QuerySpec:
    """One DP statistic, as the owner's side understood it: everything needed to build the
    measurement and to charge the ledger, and nothing from the data."""

    statistic: str
    source: str
    column: str | None
    epsilon: float
    bounds: tuple[float, float] | None
    contributions: int
    input_id: int | str  # PointerRef id, or the shared name itself
    by_id: int | str | None = None
    by_column: str | None = None
    categories: tuple[Any, ...] = ()
    edges: tuple[float, ...] = ()
    quantiles: tuple[float, ...] = ()
    candidates: tuple[float, ...] = ()

    @property
    def cost(self) -> tuple[float, float]:
        """(epsilon, delta) charged to the ledger. Groups are disjoint, so one row changes
        one group's statistics (parallel composition); a person with several rows may touch
        several groups, which is charged for each group they can reach."""
        groups = len(self.categories) if self.by_id is not None else 1
        return self.epsilon * min(self.contributions, groups), 0.0

    @property
    def lineage(self) -> str:
        extra = []
        if self.by_column is not None:
            extra.append(f"by={self.by_column}")
        if self.quantiles:
            extra.append(f"q={list(self.quantiles)}")
        return f"dp.{self.statistic}(…, epsilon={self.epsilon:g}{', ' if extra else ''}" \
               f"{', '.join(extra)})"


def is_dp_op(op: p.Op) -> bool:
    return op.kind == "function" and op.name.startswith("dp.")


def parse_op(op: p.Op, derivations: Derivations) -> QuerySpec:
    """Check a ``dp.*`` operation against the owner's declarations; ``PolicyViolation`` with
    the reason when it cannot be answered with DP. Depends on names and kinds only."""
    statistic = op.name.removeprefix("dp.")
    if op.target is not None or statistic not in STATISTICS:
        raise PolicyViolation(f"{op.name} is not a DP statistic; there are "
                              f"{', '.join('dp.' + s for s in STATISTICS)}")
    forged = sorted(set(op.kwargs) & set(_OWNER_ONLY))
    if forged:
        raise PolicyViolation(f"{op.name}: {', '.join(forged)} cannot be chosen by the "
                              "researcher; the owner declared them when sharing")
    unknown = sorted(set(op.kwargs) - _ALLOWED_KWARGS[statistic])
    if unknown:
        raise PolicyViolation(f"{op.name} takes epsilon= and "
                              f"{', '.join(sorted(_ALLOWED_KWARGS[statistic] - {'epsilon'}))}"
                              f"; not {', '.join(unknown)}")
    if len(op.args) != 1 or not isinstance(op.args[0], (p.PointerRef, p.StoreRef)):
        raise PolicyViolation(f"{op.name} takes one remote object (a column or an array)")
    epsilon: Any = op.kwargs.get("epsilon")
    if not _number(epsilon) or not (MIN_QUERY_EPSILON <= epsilon <= MAX_QUERY_EPSILON):
        raise PolicyViolation(f"{op.name}: epsilon must be a finite number between "
                              f"{MIN_QUERY_EPSILON:g} and {MAX_QUERY_EPSILON:g}, got "
                              f"{epsilon!r}")
    ref = op.args[0]
    tag = derivations.tag(ref)
    if tag is None:
        raise PolicyViolation(
            f"{op.name}: its input is not derived from a DP-shared object through row-stable "
            "steps only (column selection, a filter built from the same rows, element-wise "
            "arithmetic with numbers). Merges, concatenations, sorting, repeats and values "
            "sent by the researcher are not; nor is data the owner shared without dp=")
    spec = derivations.specs[tag.source]
    if tag.kind == "mask":
        raise PolicyViolation(f"{op.name}: its input is a boolean mask; filter with it first")
    bounds: tuple[float, float] | None = None
    if statistic != "count" or tag.kind == "table":
        if tag.kind == "table" and statistic != "count":
            raise PolicyViolation(f"{op.name} needs one column, e.g. {tag.source}['age']")
        if statistic != "count" and statistic != "histogram" or (
                statistic == "histogram" and "categories" not in op.kwargs):
            known = spec["bounds"].get(tag.column) if tag.column is not None else None
            if known is None:
                what = f"column {tag.column!r}" if tag.column else "a mix of columns"
                raise PolicyViolation(f"{op.name}: the owner declared no bounds for {what} "
                                      f"of {tag.source!r}; only dp.count applies")
            bounds = (float(known[0]), float(known[1]))
    input_id: int | str = ref.id if isinstance(ref, p.PointerRef) else ref.name
    fields: dict[str, Any] = {}
    by = op.kwargs.get("by")
    if by is not None or ("categories" in op.kwargs and statistic in ("count", "sum", "mean")):
        fields.update(_grouping(op, by, tag, spec, derivations))
    if statistic == "histogram":
        fields.update(_histogram(op, bounds))
    if statistic == "quantile":
        fields.update(_quantile(op, bounds))
    return QuerySpec(statistic, tag.source, tag.column, float(epsilon), bounds,
                     int(spec["contributions"]), input_id, **fields)


def _grouping(op: p.Op, by: Any, tag: Derived, spec: Mapping[str, Any],
              derivations: Derivations) -> dict[str, Any]:
    if not isinstance(by, (p.PointerRef, p.StoreRef)):
        raise PolicyViolation(f"{op.name}: by= must be a column of the same rows, e.g. "
                              f"by={tag.source}['sex'], with categories=[...]")
    group = derivations.tag(by)
    if group is None or group.kind == "table" or (group.source, group.rows) != (
            tag.source, tag.rows):
        raise PolicyViolation(f"{op.name}: by= must be a column of the same rows of "
                              f"{tag.source!r} (same filters applied)")
    keys = op.kwargs.get("categories")
    if keys is None:
        keys = spec["categories"].get(group.column or "")
    if keys is None:
        raise PolicyViolation(f"{op.name}: grouping needs public keys, categories=[...]: keys "
                              "found in the data would be data (the owner may declare them)")
    if not isinstance(keys, list):
        raise PolicyViolation(f"{op.name}: categories must be a list")
    by_id = by.id if isinstance(by, p.PointerRef) else by.name
    return {"by_id": by_id, "by_column": group.column,
            "categories": tuple(_check_categories(keys, f"{op.name} categories"))}


def _histogram(op: p.Op, bounds: tuple[float, float] | None) -> dict[str, Any]:
    if "categories" in op.kwargs:
        keys = op.kwargs["categories"]
        if not isinstance(keys, list) or "bins" in op.kwargs:
            raise PolicyViolation(f"{op.name}: categories=[...] or bins=, not both")
        return {"categories": tuple(_check_categories(keys, f"{op.name} categories"))}
    assert bounds is not None
    bins = op.kwargs.get("bins", 10)
    if isinstance(bins, int) and not isinstance(bins, bool):
        if not 1 <= bins <= MAX_BINS:
            raise PolicyViolation(f"{op.name}: bins must be between 1 and {MAX_BINS}")
        lo, hi = bounds
        edges = tuple(lo + (hi - lo) * i / bins for i in range(bins + 1))
    elif isinstance(bins, list) and 2 <= len(bins) <= MAX_BINS + 1 and all(map(_number, bins)):
        edges = tuple(float(b) for b in bins)
        if any(b >= a for a, b in zip(edges[1:], edges[:-1], strict=True)):
            raise PolicyViolation(f"{op.name}: bin edges must increase")
    else:
        raise PolicyViolation(f"{op.name}: bins is a number of bins or a list of edges")
    return {"edges": edges}


def _quantile(op: p.Op, bounds: tuple[float, float] | None) -> dict[str, Any]:
    assert bounds is not None
    q = op.kwargs.get("q", 0.5)
    qs = q if isinstance(q, list) else [q]
    if not qs or len(qs) > MAX_QUANTILES or not all(_number(v) and 0 <= v <= 1 for v in qs):
        raise PolicyViolation(f"{op.name}: q is a number in [0, 1] or a list of up to "
                              f"{MAX_QUANTILES}")
    candidates = op.kwargs.get("candidates")
    if candidates is None:
        lo, hi = bounds
        values = tuple(lo + (hi - lo) * i / 100 for i in range(101))
    elif (isinstance(candidates, list) and 2 <= len(candidates) <= MAX_CANDIDATES
          and all(map(_number, candidates))):
        values = tuple(sorted({float(c) for c in candidates}))
    else:
        raise PolicyViolation(f"{op.name}: candidates is a list of up to {MAX_CANDIDATES} "
                              "numbers")
    return {"quantiles": tuple(float(v) for v in qs), "candidates": values}


# -- the mechanisms (worker) ----------------------------------------------------------------
@dataclass(frozen=True)
class Quote:
    """What the owner sees of a DP release: mechanism, cost, noise and accuracy."""

    statistic: str
    source: str
    epsilon: float
    delta: float
    mechanism: str
    scale: str
    accuracy: str


def _opendp() -> Any:
    import opendp.prelude as dp

    # "contrib": OpenDP components not yet through its formal proof review (see module doc).
    dp.enable_features("contrib")
    return dp


class DPQuery:
    """A DP statistic over a private copy of its input, evaluated only on request.

    Made by a ``dp.*`` operation in the worker: the input (and the group keys) are copied
    then, so later in-place changes of the researcher's objects cannot reach them. Nothing is
    computed until ``evaluate``, which the kernel triggers after reserving the cost."""

    def __init__(self, spec: QuerySpec, values: Any, keys: Any = None) -> None:
        import numpy as np

        self.spec = spec
        # a table given as a dict of columns has as many rows as each column
        self.rows = int(len(next(iter(values.values())) if type(values) is dict else values))
        self.values: Any = None  # a count reads how many rows there are, nothing else
        if spec.statistic == "histogram" and spec.categories:
            self.values = _as_keys(values)
        elif spec.statistic != "count":
            self.values = _as_floats(values)
        self.keys = None if keys is None else _as_keys(keys)
        if self.keys is not None and len(self.keys) != self.rows:
            raise ValueError("the group column does not line up with the values")
        self._np = np

    @property
    def nbytes(self) -> int:
        return sum(getattr(a, "nbytes", 0) for a in (self.values, self.keys))

    def evaluate(self) -> tuple[Any, Quote]:
        """Run the OpenDP measurements on the copy: the released value and its quote."""
        dp = _opendp()
        spec = self.spec
        k = spec.contributions
        stat = spec.statistic
        if spec.by_id is not None:
            return self._grouped(dp)
        if stat == "count":
            count, scale, acc = _count(dp, self.rows, spec.epsilon, k)
            return count, self._quote("discrete Laplace (OpenDP make_laplace on a count)",
                                      spec.epsilon, f"{scale:.4g}", f"±{acc:.4g}")
        if stat == "histogram":
            return self._histogram(dp)
        if stat == "quantile":
            return self._quantiles(dp)
        assert spec.bounds is not None and self.values is not None
        if stat == "sum":
            total, scale, acc = _sum(dp, self.values, spec.bounds, spec.epsilon, k)
            return total, self._quote("Laplace on the clamped sum (OpenDP)", spec.epsilon,
                                      f"{scale:.4g}", f"±{acc:.4g}")
        if stat == "mean":
            mean, scales, spread = _mean(dp, self.values, spec.bounds, spec.epsilon, k)
            return mean, self._quote(
                "noisy clamped sum / noisy count, Laplace (OpenDP), ε split in half",
                spec.epsilon, f"sum {scales[0]:.4g}, count {scales[1]:.4g}",
                f"about ±{spread:.4g} (from the released count)")
        assert stat == "variance"
        lo, hi = spec.bounds
        values = self._np.clip(self._np.nan_to_num(self.values, nan=lo), lo, hi)
        squares = values * values
        sq_bounds = (0.0 if lo <= 0 <= hi else min(lo * lo, hi * hi), max(lo * lo, hi * hi))
        third = spec.epsilon / 3
        n, cs, n_acc = _count(dp, self.rows, third, k)
        s, ss, s_acc = _sum(dp, values, spec.bounds, third, k)
        q, qs, q_acc = _sum(dp, squares, sq_bounds, third, k)
        n = max(n, 1)
        variance = min(max(q / n - (s / n) ** 2, 0.0), (hi - lo) ** 2 / 4)
        # post-processing of released values: first-order spread of Q/n - (S/n)^2
        m = max(abs(lo), abs(hi))
        var_spread = (q_acc + 2 * m * s_acc + 2 * m * m * n_acc) / n
        return variance, self._quote(
            "noisy count, sum and sum of squares, Laplace (OpenDP), ε split in three",
            spec.epsilon, f"count {cs:.4g}, sum {ss:.4g}, squares {qs:.4g}",
            f"about ±{var_spread:.4g} (from the released count)")

    def _quote(self, mechanism: str, epsilon: float, scale: str, accuracy: str) -> Quote:
        cost_epsilon, delta = self.spec.cost
        return Quote(self.spec.statistic, self.spec.source, cost_epsilon, delta, mechanism,
                     scale, accuracy)

    def _histogram(self, dp: Any) -> tuple[Any, Quote]:
        spec = self.spec
        k = spec.contributions
        if spec.categories:
            keys = self.values
            categories = [_key(c) for c in spec.categories]
            counts, scale = _count_by(dp, keys, categories, spec.epsilon, k)
            value: Any = dict(zip([str(c) for c in spec.categories], counts, strict=True))
        else:
            assert spec.bounds is not None and self.values is not None
            counts, scale = _binned(dp, self.values, spec.bounds, list(spec.edges), spec.epsilon,
                                    k)
            value = {"edges": list(spec.edges), "counts": counts}
        acc = dp.discrete_laplacian_scale_to_accuracy(scale, 0.05)
        return value, self._quote("discrete Laplace on each bin count (OpenDP "
                                  "count_by_categories)", spec.epsilon, f"{scale:.4g}",
                                  f"±{acc:.4g} per bin")

    def _quantiles(self, dp: Any) -> tuple[Any, Quote]:
        spec = self.spec
        assert spec.bounds is not None and self.values is not None
        share = spec.epsilon / len(spec.quantiles)
        results = []
        scale = 0.0
        for alpha in spec.quantiles:
            value, scale = _quantile_of(dp, self.values, spec.bounds, list(spec.candidates),
                                        alpha, share, spec.contributions)
            results.append(value)
        released: Any = results[0] if len(results) == 1 else results
        return released, self._quote(
            f"exponential mechanism over {len(spec.candidates)} candidates (OpenDP "
            "make_private_quantile)" + (", ε split evenly" if len(results) > 1 else ""),
            spec.epsilon, f"{scale:.4g}", "one candidate step at best; rank error grows "
            "with the scale")

    def _grouped(self, dp: Any) -> tuple[Any, Quote]:
        spec = self.spec
        k = spec.contributions
        assert self.keys is not None
        codes = [_key(c) for c in spec.categories]
        names = [str(c) for c in spec.categories]
        if spec.statistic == "count":
            counts, scale = _count_by(dp, self.keys, codes, spec.epsilon, k)
            acc = dp.discrete_laplacian_scale_to_accuracy(scale, 0.05)
            return dict(zip(names, counts, strict=True)), self._quote(
                "discrete Laplace on each group's count (OpenDP count_by_categories)",
                spec.epsilon, f"{scale:.4g}", f"±{acc:.4g} per group")
        assert spec.bounds is not None and self.values is not None
        out: dict[str, float] = {}
        scales: tuple[float, float] = (0.0, 0.0)
        worst = 0.0
        for code, name in zip(codes, names, strict=True):
            part = self.values[self.keys == code]
            if spec.statistic == "sum":
                value, scale, worst = _sum(dp, part, spec.bounds, spec.epsilon, k)
                scales = (scale, 0.0)
                out[name] = value
            else:
                out[name], scales, spread = _mean(dp, part, spec.bounds, spec.epsilon, k)
                worst = max(worst, spread)
        acc_text = (f"±{worst:.4g} per group" if spec.statistic == "sum" else
                    f"about ±{worst:.4g} in the least precise group (from its released count)")
        what = "sum" if spec.statistic == "sum" else "noisy sum / noisy count"
        scale_text = f"{scales[0]:.4g}" if spec.statistic == "sum" else (
            f"sum {scales[0]:.4g}, count {scales[1]:.4g}")
        return out, self._quote(f"{what} per group, Laplace (OpenDP); groups are disjoint",
                                spec.epsilon, scale_text, acc_text)


def _as_floats(values: Any) -> Any:
    import numpy as np

    array = _numpy(values)
    if array.dtype.kind not in "biuf":
        raise TypeError(f"DP sums need numbers, not {array.dtype}")
    return np.array(array, dtype=np.float64, copy=True).reshape(-1)


def _as_keys(values: Any) -> Any:
    import numpy as np

    array = _numpy(values).reshape(-1)
    if array.dtype.kind in "biuf":
        return np.array([_key(v) for v in array.tolist()], dtype=object)
    return np.array([v if isinstance(v, str) else "\x00" for v in array.tolist()], dtype=object)


def _numpy(values: Any) -> Any:
    import numpy as np

    if type(values).__module__.startswith("torch"):
        values = values.detach().cpu().numpy()
    elif hasattr(values, "to_numpy"):
        values = values.to_numpy()
    array = np.asarray(values)
    if array.ndim != 1:
        raise TypeError(f"DP statistics take a 1-D column, not {array.ndim}-D data")
    return array


def _contiguous(values: Any) -> Any:
    """float64 values as one contiguous numpy array: OpenDP reads it without a Python list
    (30 to 60 times faster for 100,000 rows)."""
    import numpy as np

    return np.ascontiguousarray(values, dtype=np.float64)


def _np_zeros(rows: int) -> Any:
    import numpy as np

    return np.zeros(rows, dtype=np.float64)


def _float_space(dp: Any) -> Any:
    return dp.vector_domain(dp.atom_domain(T=float, nan=True)), dp.symmetric_distance()


_SCALES: dict[tuple[Any, ...], float] = {}  # the search is costly; its answer never changes


def _calibrated(dp: Any, make: Any, d_in: int, epsilon: float,
                key: tuple[Any, ...]) -> tuple[Any, float]:
    """The measurement with the smallest noise scale whose privacy map, at ``d_in`` rows
    changed, is at most ``epsilon`` (OpenDP's own search over its own map; the map is
    checked again on the measurement actually used)."""
    cache_key = (*key, d_in, epsilon)
    scale = _SCALES.get(cache_key)
    if scale is None:
        scale = float(dp.binary_search_param(make, d_in=d_in, d_out=epsilon))
        if len(_SCALES) < 10_000:
            _SCALES[cache_key] = scale
    measurement = make(scale)
    assert measurement.map(d_in) <= epsilon * (1 + 1e-9)
    return measurement, float(scale)


def _count(dp: Any, rows: int, epsilon: float, k: int) -> tuple[int, float, float]:
    space = _float_space(dp)
    measurement, scale = _calibrated(
        dp, lambda s: space >> dp.t.then_count() >> dp.m.then_laplace(s), k, epsilon,
        ("count",))
    # The count of rows is all the measurement reads: it gets placeholders, not values.
    released = int(measurement(_np_zeros(rows)))
    return released, scale, float(dp.discrete_laplacian_scale_to_accuracy(scale, 0.05))


def _sum(dp: Any, values: Any, bounds: tuple[float, float], epsilon: float,
         k: int) -> tuple[float, float, float]:
    space = _float_space(dp)
    lo, hi = bounds

    def make(scale: float) -> Any:
        return (space >> dp.t.then_impute_constant(lo) >> dp.t.then_clamp((lo, hi))
                >> dp.t.then_sum() >> dp.m.then_laplace(scale))

    measurement, scale = _calibrated(dp, make, k, epsilon, ("sum", lo, hi))
    released = float(measurement(_contiguous(values)))
    return released, scale, float(dp.laplacian_scale_to_accuracy(scale, 0.05))


def _mean(dp: Any, values: Any, bounds: tuple[float, float], epsilon: float,
          k: int) -> tuple[float, tuple[float, float], float]:
    """Noisy clamped sum / noisy count, half of epsilon each; also the scales and the 95%
    spread worked out from the released count (post-processing of released values)."""
    total, sum_scale, sum_acc = _sum(dp, values, bounds, epsilon / 2, k)
    count, count_scale, count_acc = _count(dp, len(values), epsilon / 2, k)
    lo, hi = bounds
    n = max(count, 1)
    mean = min(max(total / n, lo), hi)  # post-processing: the mean lies within the bounds
    # Post-processing of released values only: sum ± a, count ± b at 95% each.
    spread = (sum_acc + max(abs(lo), abs(hi)) * count_acc) / n
    return mean, (sum_scale, count_scale), spread


def _count_by(dp: Any, keys: Any, categories: list[str], epsilon: float,
              k: int) -> tuple[list[int], float]:
    space = dp.vector_domain(dp.atom_domain(T=str)), dp.symmetric_distance()

    def make(scale: float) -> Any:
        return (space >> dp.t.then_count_by_categories(categories=categories,
                                                       null_category=True)
                >> dp.m.then_laplace(scale))

    measurement, scale = _calibrated(dp, make, k, epsilon, ("by", tuple(categories)))
    counts = measurement(list(keys))
    return [int(c) for c in counts[:len(categories)]], scale  # the last is "other": dropped


def _binned(dp: Any, values: Any, bounds: tuple[float, float], edges: list[float],
            epsilon: float, k: int) -> tuple[list[int], float]:
    space = _float_space(dp)
    lo, hi = bounds
    inner = edges[1:-1]
    bins = list(range(len(edges) - 1))

    def make(scale: float) -> Any:
        chain = space >> dp.t.then_impute_constant(lo) >> dp.t.then_clamp((lo, hi))
        if inner:
            chain = chain >> dp.t.then_find_bin(edges=inner)
        else:
            chain = chain >> dp.t.then_find_bin(edges=[hi + 1.0])
        return (chain >> dp.t.then_count_by_categories(categories=bins, null_category=False)
                >> dp.m.then_laplace(scale))

    measurement, scale = _calibrated(dp, make, k, epsilon, ("bins", lo, hi, tuple(edges)))
    return [int(c) for c in measurement(_contiguous(values))], scale


def _quantile_of(dp: Any, values: Any, bounds: tuple[float, float], candidates: list[float],
                 alpha: float, epsilon: float, k: int) -> tuple[float, float]:
    space = dp.vector_domain(dp.atom_domain(T=float, nan=True)), dp.symmetric_distance()
    lo, hi = bounds

    def make(scale: float) -> Any:
        return (space >> dp.t.then_impute_constant(lo) >> dp.t.then_clamp((lo, hi))
                >> dp.m.then_private_quantile(dp.max_divergence(), candidates=candidates,
                                              alpha=alpha, scale=scale))

    measurement, scale = _calibrated(dp, make, k, epsilon,
                                     ("quantile", lo, hi, tuple(candidates), alpha))
    return float(measurement(_contiguous(values))), scale
