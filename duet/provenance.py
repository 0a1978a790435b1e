"""Provenance with record counts: which shared records every derived value depends on.

The executor keeps, next to each value, a ``Provenance``: for every shared object the value
derives from, one *state* saying how the value relates to that object's records (its rows,
axis 0 of an array or tensor):

``Rows``        the value is row-aligned with the source: its axis 0 (or, ``single``, the
                whole value) holds individual records, ``index`` says which. Element-wise
                transforms, column selection, boolean filters, slices and a model's forward
                pass keep this state. Releasing such a value releases records.
``Aggregated``  the value summarizes records: one ``Part`` per summary that went into it
                (``mean(x[a]) - mean(x[b])`` has two), each with the set of records that
                contributed and per-cell evidence (counts, largest contributions).
``Declared``    the value reveals only what the owner declared when sharing (a dtype, the
                number of dimensions, the row count of an unfiltered array).
``Unknown``     any operation whose effect on records is not modelled here. Checks on it
                end in "review", never "pass".

Rules are chosen so that a mistake errs towards record-level or unknown, never towards a
larger aggregate than the truth: an operation missing from the tables below turns every
state into ``Unknown``; a claimed row alignment is dropped when the value's first axis does
not have the expected length; records are counted distinct (a row selected twice is one
record).

Cost: deriving a value's provenance is a few dictionary lookups. Work proportional to the
number of rows happens only where the operation itself is that size and in numpy's C code
(turning a boolean mask into row numbers, largest contributions of a sum), never in Python
loops over rows.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

__all__ = [
    "DECLARED",
    "ROW_COUNT",
    "arrays",
    "EMPTY",
    "Aggregated",
    "Call",
    "Declared",
    "Part",
    "Provenance",
    "Rows",
    "State",
    "Unknown",
    "derive",
    "merge_all",
    "merge_states",
    "modified",
    "of_shared",
    "steered",
    "state_of",
]

MAX_CELLS = 10_000  # per-cell evidence beyond this many cells is not kept (checks: review)


@dataclass(frozen=True, eq=False)
class Rows:
    """Row-aligned with ``total`` records; ``index[i]`` is the record of value row ``i``
    (``None``: all records in order). ``single``: the value is one record's data."""

    index: np.ndarray | None
    total: int
    distinct: bool = True  # no record appears twice in ``index``
    single: bool = False
    ordered: bool = True  # ``index`` is increasing (records() needs no sort)
    # combined element-wise with other per-record values (another column, an array the
    # researcher sent): a sum of it is a weighted sum, not a total of records
    mixed: bool = False
    # computed per record by the researcher's model (its forward): still one row per record,
    # but a sum of it is no plain total either
    modelled: bool = False
    # summaries of the same records folded into these values (``x * 0 + x.max()``): any
    # later summary of the rows still reveals them, so it carries their parts along
    carried: tuple[Part, ...] = ()

    @property
    def plain(self) -> bool:
        return not (self.mixed or self.modelled)

    @property
    def length(self) -> int:
        return self.total if self.index is None else int(self.index.size)

    def records(self) -> np.ndarray | None:
        """The contributing records, sorted and distinct (``None``: all of them)."""
        if self.index is None:
            return None
        if self.distinct and self.ordered:
            return self.index
        return np.unique(self.index)


@dataclass(frozen=True, eq=False)
class Part:
    """One summary of records: ``n`` distinct records contributed (``rows``, sorted and
    distinct, ``None`` for all ``total``). ``kind`` says which checks apply:

    - ``magnitude``: sums, means, variances; ``cells`` holds per output cell ``n`` (records
      that are not NaN), ``top1``/``top2``/``total`` (largest absolute contributions and
      their total) and, when every record contributes one of at most two values (then the
      sum is a count in disguise), ``counts`` of each.
    - ``frequency``: counts of records (``count_nonzero``, the length of a filtered array);
      ``cells["counts"]`` holds each count and its complement.
    - ``table``: a frequency table (``unique``, ``bincount``, histograms); ``cells["counts"]``
      per cell.
    - ``order``: a minimum, maximum, quantile or other single record's value.
    - ``model``: parameters fitted on ``n`` records.
    - ``statistic``: other summaries over ``n`` records (a loss, a correlation).
    """

    kind: str
    rows: np.ndarray | None
    total: int
    n: int
    cells: Mapping[str, np.ndarray] = field(default_factory=dict)
    note: str = ""


@dataclass(frozen=True, eq=False)
class Aggregated:
    parts: tuple[Part, ...]


@dataclass(frozen=True, eq=False)
class Declared:
    """Reveals nothing beyond the owner's declared metadata; ``what="rows"``: the number of
    all the source's records (declared for arrays, optional for tables)."""

    what: str = ""


@dataclass(frozen=True, eq=False)
class Unknown:
    why: str


State = Rows | Aggregated | Declared | Unknown
Provenance = Mapping[str, State]
"""Shared name -> how the value relates to its records. Never mutated once built."""

EMPTY: Provenance = {}
DECLARED = Declared()
ROW_COUNT = Declared("rows")


def arrays(provenance: Provenance) -> list[np.ndarray]:
    """The arrays a provenance holds (record numbers, per-cell evidence), so the owner's
    memory budget counts them."""
    found: list[np.ndarray] = []
    for state in provenance.values():
        parts: tuple[Part, ...] = ()
        if isinstance(state, Rows):
            if state.index is not None:
                found.append(state.index)
            parts = state.carried
        elif isinstance(state, Aggregated):
            parts = state.parts
        for part in parts:
            if part.rows is not None:
                found.append(part.rows)
            found.extend(part.cells.values())
    return found


def state_of(provenance: Provenance, name: str) -> State:
    """The state for a source; a source missing from the provenance is unknown."""
    return provenance.get(name) or Unknown("no provenance was recorded for it")


# -- shared objects ---------------------------------------------------------------------------
def records_of(value: Any) -> int | None:
    """The number of records of a shared value (rows of axis 0), or None if it has none."""
    if is_frame(value):
        return int(len(value))
    if type(value) is dict and value:  # a table as equally long columns (one row a record)
        lengths = {records_of(column) if getattr(column, "ndim", 0) == 1 else None
                   for column in value.values()}
        return lengths.pop() if len(lengths) == 1 else None
    shape = getattr(value, "shape", None)
    if isinstance(shape, tuple) and shape and isinstance(value, np.ndarray):
        return int(shape[0])
    if _is_tensor(value) and value.dim() >= 1:
        return int(value.shape[0])
    return None


def of_shared(name: str, value: Any) -> Provenance:
    total = records_of(value)
    if total is None:
        return {name: Unknown(f"shared object {name!r} has no rows of records")}
    return {name: Rows(None, total)}


# -- deriving ---------------------------------------------------------------------------------
ProvenanceOf = Callable[[Any], Provenance | None]
"""The provenance of a resolved input object (``None``: a literal the researcher sent)."""

_ELEMENTWISE = frozenset("""
    add sub mul truediv floordiv mod pow neg pos abs invert and_ or_ xor lt le eq ne gt ge
    exp expm1 exp2 log log1p log2 log10 sqrt square absolute sin cos tan arcsin arccos arctan
    arctan2 sinh cosh tanh clip round around floor ceil trunc rint sign isnan isinf isfinite
    maximum minimum fmax fmin subtract multiply divide true_divide floor_divide power remainder
    negative positive reciprocal logical_and logical_or logical_not logical_xor greater
    greater_equal less less_equal equal not_equal nan_to_num isclose clamp div sigmoid relu
    softmax log_softmax leaky_relu gelu silu elu masked_fill digitize searchsorted
    one_hot normalize dropout
""".split())
# Same value, another form: the provenance is unchanged (a single input).
_IDENTITY = frozenset("""
    astype copy deepcopy clone detach contiguous cpu to float double half int long bool
    type_as numpy tensor as_tensor from_numpy array asarray atleast_1d tolist item values
""".split())
# Reshaping that keeps axis 0 when its length is unchanged (C or F order alike).
_RESHAPE = frozenset("""reshape ravel flatten squeeze view reshape_as view_as unsqueeze
    expand_dims expand expand_as atleast_2d broadcast_to""".split())
_MAGNITUDE = frozenset("sum nansum mean nanmean average std var nanstd nanvar sem".split())
_SPREAD = frozenset("std var nanstd nanvar sem".split())
_FREQUENCY = frozenset("count_nonzero any all count_nonnull".split())
_ORDER = frozenset("""min max amin amax nanmin nanmax median nanmedian percentile quantile
    nanpercentile nanquantile ptp argmin argmax nanargmin nanargmax topk kthvalue describe
    mode idxmin idxmax""".split())
_STATISTIC = frozenset("""corrcoef cov skew kurt nunique corr prod mse_loss cross_entropy
    nll_loss binary_cross_entropy
    binary_cross_entropy_with_logits l1_loss smooth_l1_loss kl_div logsumexp norm""".split())
# Arguments of a reduction that do not change which records count; any other (where=,
# initial=, weights=, ...) makes the result unknown.
_REDUCTION_KEYWORDS = frozenset("""axis dim keepdims keepdim dtype ddof correction unbiased
    reduction rowvar bias method numeric_only skipna min_count""".split())
_QUANTILES = frozenset("""percentile quantile nanpercentile nanquantile topk kthvalue""".split())
_LENGTH_ATTRIBUTES = frozenset("shape size nbytes numel".split())
_METADATA = frozenset("ndim dtype itemsize device requires_grad is_leaf dim training".split())
# Functions whose name collides with an element-wise one but which reduce to one value.
_NOT_ELEMENTWISE = frozenset({"torch.equal", "Tensor.equal", "numpy.array_equal",
                              "numpy.allclose", "torch.allclose", "Tensor.allclose"})
_STACK_ROWS = frozenset("concatenate concat cat vstack".split())
# Element-wise in form, but along an axis: over the records, each value depends on all of
# them (softmax divides by their total, normalize by their largest).
_ALONG_AXIS = frozenset("softmax log_softmax normalize".split())
# A boolean combined with a per-record mask from outside the source (the researcher's own
# array, another shared object): only the mask's records are counted.
_AND = frozenset("and_ logical_and bitwise_and mul multiply minimum where".split())
# Moves values between axes: rows no longer line up, summaries stay summaries.
_REARRANGE = frozenset("T mT transpose swapaxes moveaxis permute flip t".split())
# What a model, optimizer or container is made of, or wraps: the provenance of its inputs.
_CONTAINS = frozenset("""weight bias running_mean running_var parameters named_parameters
    buffers named_buffers children named_children modules named_modules state_dict
    get keys items index count param_groups defaults SGD Adam AdamW RMSprop Adagrad StepLR
    ExponentialLR CosineAnnealingLR Sequential ModuleList ModuleDict Parameter
    get_last_lr last_epoch""".split())


@dataclass
class Call:
    """One executed operation as provenance sees it: ``operation`` is the qualified name
    (``numpy.mean``, ``ndarray.sum``, ``Module.forward``), ``inputs`` the resolved target
    (first, for methods, attributes and calls) and arguments."""

    operation: str
    args: tuple[Any, ...]
    kwargs: Mapping[str, Any]
    method: bool  # the first of ``args`` is the object the method or attribute belongs to


def derive(call: Call, value: Any, provenance_of: ProvenanceOf) -> Provenance:
    """The provenance of ``value``, the result of ``call``. Never raises: any surprise in
    the evidence makes the sources involved ``Unknown``."""
    inputs = _collect(call.args, call.kwargs, provenance_of)
    if not inputs:
        return EMPTY
    try:
        derived = _derive(call, value, inputs, provenance_of)
    except Exception as exc:  # noqa: BLE001 - evidence must never fail the operation
        why = f"provenance of {call.operation} could not be derived ({type(exc).__name__})"
        derived = {name: Unknown(why) for name in _names(inputs)}
    return _check_alignment(derived, value)


def _derive(call: Call, value: Any, inputs: list[Provenance],
            provenance_of: ProvenanceOf) -> Provenance:
    operation = call.operation
    name = operation.rsplit(".", 1)[-1]
    family = operation.split(".", 1)[0]
    if family in _TABLE_FAMILIES or operation.startswith(("pandas.", "sklearn.")):
        modelled = _table_rule(call, name, family, value, inputs, provenance_of)
        if modelled is not None:
            return modelled
    if name in _METADATA and (call.method or family in ("ndarray", "Tensor", "Module")):
        # a dtype the data chose (to_numeric's downcast) is what the rows carry
        return {source: _summary(state) if isinstance(state, Rows) and state.carried
                else DECLARED for source, state in _merge(inputs).items()}
    if operation == "operator.getitem" or name in ("take", "masked_select", "extract",
                                                   "compress"):
        return _getitem(call, value, provenance_of)
    if name in _LENGTH_ATTRIBUTES or operation == "builtins.len":
        return _length(_first(call, provenance_of))
    if operation in _NOT_ELEMENTWISE:
        return _unknown(inputs, f"{operation} is not modelled")
    if name in _IDENTITY and len(inputs) == 1:
        return inputs[0]
    if name == "where" and len(call.args) == 1:  # positions of matching records
        return _unknown(inputs, "positions of records (where with one argument)")
    if name in _ALONG_AXIS and _along_records(call, name):
        return _unknown(inputs, f"{name} over the records combines all of them")
    if name == "one_hot" and call.kwargs.get("num_classes", call.args[1] if len(call.args) > 1
                                            else -1) in (-1, None):
        return _carrying(_merge(inputs), "one_hot's width: the largest value")
    if name in _AND and _is_boolean(value):
        return _masked(call, _merge(inputs), provenance_of)
    if name in _ELEMENTWISE or name in _IDENTITY or name == "where":
        return _mark_mixed(call, value, _merge(inputs), provenance_of)
    if name in _RESHAPE:
        return _merge(inputs)  # alignment is re-checked against the value's axis 0
    if name in _REARRANGE:
        merged = _merge(inputs)
        return {source: Unknown(f"{name} moves records off axis 0")
                if isinstance(state, Rows) and not state.single else state
                for source, state in merged.items()}
    if name in _CONTAINS:
        return _merge(inputs)
    if name in _MAGNITUDE or name in _FREQUENCY or name in _ORDER or name in _STATISTIC:
        return _reduce(call, name, value, provenance_of)
    if name in ("unique", "bincount", "histogram", "histc"):
        return _table(call, name, value, provenance_of)
    if name in _STACK_ROWS:
        return _stack(call, inputs, provenance_of)
    if operation == "Module.forward":
        return _forward(call, value, provenance_of)
    if operation == "call":
        return _unknown(inputs, "calling an object is not modelled")
    return _unknown(inputs, f"{operation} is not modelled")


# -- helpers over provenances ----------------------------------------------------------------
def _names(inputs: Iterable[Provenance]) -> list[str]:
    seen: dict[str, None] = {}
    for provenance in inputs:
        for name in provenance:
            seen[name] = None
    return list(seen)


def _unknown(inputs: Iterable[Provenance], why: str) -> Provenance:
    return {name: Unknown(why) for name in _names(inputs)}


def _collect(args: Iterable[Any], kwargs: Mapping[str, Any],
             provenance_of: ProvenanceOf) -> list[Provenance]:
    """The provenances of every input found in the arguments (nested lists included)."""
    found: list[Provenance] = []

    def walk(value: Any, depth: int) -> None:
        provenance = provenance_of(value)
        if provenance is not None:
            if provenance:
                found.append(provenance)
            return
        if depth < 8 and isinstance(value, (list, tuple)):
            for item in value:
                walk(item, depth + 1)
        elif depth < 8 and isinstance(value, dict):
            for item in value.values():
                walk(item, depth + 1)
        elif depth < 8 and isinstance(value, slice):
            for item in (value.start, value.stop, value.step):
                walk(item, depth + 1)

    for arg in args:
        walk(arg, 0)
    for arg in kwargs.values():
        walk(arg, 0)
    return found


def _provenance(value: Any, provenance_of: ProvenanceOf) -> Provenance:
    return _merge(_collect((value,), {}, provenance_of))


def _first(call: Call, provenance_of: ProvenanceOf) -> Provenance:
    return _provenance(call.args[0], provenance_of) if call.args else EMPTY


def _same_rows(a: Rows, b: Rows) -> bool:
    if a.total != b.total or a.single != b.single:
        return False
    if a.index is b.index:
        return True
    if a.index is None or b.index is None:
        return False
    return a.index.shape == b.index.shape and bool(np.array_equal(a.index, b.index))


def merge_states(states: list[State]) -> State:
    """One source seen through several inputs of an element-wise operation."""
    if len(states) == 1:
        return states[0]
    unknown = [s for s in states if isinstance(s, Unknown)]
    if unknown:
        return unknown[0]
    rows = [s for s in states if isinstance(s, Rows)]
    if rows:
        if all(_same_rows(rows[0], other) for other in rows[1:]):
            mixed, modelled = any(r.mixed for r in rows), any(r.modelled for r in rows)
            # record-level, and the summaries added to the rows travel with them
            carried = _dedupe((*(p for r in rows for p in r.carried),
                               *(p for s in states if isinstance(s, Aggregated)
                                 for p in s.parts)))
            first = rows[0]
            if (mixed, modelled, len(carried)) != (first.mixed, first.modelled,
                                                   len(first.carried)):
                first = replace(first, mixed=mixed, modelled=modelled, carried=carried)
            return first
        return Unknown("combines differently selected records element-wise")
    parts = tuple(p for s in states if isinstance(s, Aggregated) for p in s.parts)
    if parts:
        return Aggregated(_dedupe(parts))
    return next((s for s in states if isinstance(s, Declared) and s.what), DECLARED)


def _summary(state: Rows, *parts: Part) -> Aggregated:
    """A summary of ``state``'s records, with the summaries its values carried."""
    return Aggregated(_dedupe((*parts, *state.carried)))


def _dedupe(parts: tuple[Part, ...]) -> tuple[Part, ...]:
    seen: dict[int, Part] = {}
    for part in parts:
        seen.setdefault(id(part), part)
    return tuple(seen.values())


def _data_and_rest(call: Call, provenance_of: ProvenanceOf) -> tuple[Provenance, Provenance]:
    """A summarizing call's first argument (the data it summarizes) and everything else it
    read (weights, bins, keys): the rest is carried along, merged, not summarized."""
    return (_provenance(call.args[0], provenance_of),
            _merge(_collect(call.args[1:], call.kwargs, provenance_of)))


def _with_rest(result: Provenance, rest: Provenance) -> Provenance:
    return _merge([result, rest]) if rest else result


def merge_all(inputs: list[Provenance]) -> Provenance:
    """Several inputs combined element-wise (``merge_states`` per source)."""
    return _merge(inputs)


def _merge(inputs: list[Provenance]) -> Provenance:
    if not inputs:
        return EMPTY
    if len(inputs) == 1:
        return inputs[0]
    by_name: dict[str, list[State]] = {}
    for provenance in inputs:
        for name, state in provenance.items():
            by_name.setdefault(name, []).append(state)
    return {name: merge_states(states) for name, states in by_name.items()}


_COMBINED_WITH_OWN = "combined with the researcher's own values per record"


def _mark_mixed(call: Call, value: Any, provenance: Provenance,
                provenance_of: ProvenanceOf) -> Provenance:
    """An element-wise operation on two or more per-record operands (``x * w``,
    ``where(c, x, y)``, ``a + b``) weighs or swaps records' values: its row alignment is kept,
    marked ``mixed``, so that a sum of it is never cleared as a plain total. Booleans are
    exempt: their sums are counts, checked as counts.

    When one of the operands is the researcher's own (``ages * 0 + e7``), the rows are also
    steered (``_steer``): whatever is fitted or trained on them is for review, as it is for
    ``e7`` itself."""
    rows = [s for s in provenance.values() if isinstance(s, Rows) and not s.single]
    if not rows:
        return provenance
    length = rows[0].length
    per_record = [operand for operand in (*call.args, *call.kwargs.values())
                  if _length_of(operand) == length]
    if len(per_record) >= 2 and _own_lengths(per_record, provenance_of):
        provenance = _steer(provenance, length, _COMBINED_WITH_OWN)
    if all(r.mixed for r in rows) or _is_boolean(value):
        return provenance
    name = call.operation.rsplit(".", 1)[-1]
    if name in ("where", "masked_fill", "mask") and len(call.args) >= 2:
        # a condition per record swaps some records' values for others (a constant, NaN):
        # sum(where(id == 7, 0, x)) is sum(x) without patient 7, over "all" the rows
        condition = call.args[0] if name == "where" else call.args[1]
        if _length_of(condition) == length:
            per_record = [condition, condition]
    if len(per_record) < 2:
        return provenance
    return {name: replace(state, mixed=True) if isinstance(state, Rows) else state
            for name, state in provenance.items()}


def _along_records(call: Call, name: str) -> bool:
    """Whether a softmax or normalize runs along axis 0 (the records)."""
    data = call.args[0] if call.args else None
    ndim = int(getattr(data, "ndim", 0) or 0)
    position = 2 if name == "normalize" else 1  # normalize(input, p, dim), softmax(x, dim)
    default = 1 if name == "normalize" else None
    dim = call.kwargs.get("dim", call.args[position] if len(call.args) > position else default)
    if not isinstance(dim, (int, np.integer, type(None))):
        return True
    return _over_records(dim, ndim)


def _masked(call: Call, provenance: Provenance, provenance_of: ProvenanceOf) -> Provenance:
    """``condition & keep`` where ``keep`` is the researcher's own per-record mask (no shared
    data in it): a count of it counts only ``keep``'s records, which the rows cannot say, so
    they are marked ``mixed`` and a count of them is for review (``count(x > t)`` against
    ``count((x > t) & not7)`` is patient 7's answer, whatever it is). Selecting rows with it
    stays exact: the selection knows its records. Conditions on shared data combine as
    before: a count of them is a count of records (differencing compares what they count).
    """
    own = _own_lengths(call.args, provenance_of)
    result: Provenance = {
        source: replace(state, mixed=True)
        if isinstance(state, Rows) and not state.single and state.length in own else state
        for source, state in provenance.items()}
    for length in own:  # as a model's input, the mask chooses the records it learns from
        result = _steer(result, length, _COMBINED_WITH_OWN)
    return result


def _carrying(provenance: Provenance, note: str) -> Provenance:
    """Rows whose values (or shape) depend on all the records: they carry an ``order``
    part, so every summary of them, their length included, is for review."""
    return {source: replace(state, carried=_dedupe((*state.carried, _order_part(state, note))))
            if isinstance(state, Rows) else state for source, state in provenance.items()}


def _is_boolean(value: Any) -> bool:
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        return False
    if isinstance(dtype, np.dtype):
        return dtype == np.bool_
    text = str(dtype)
    return text in ("torch.bool", "bool", "boolean")


def _check_alignment(provenance: Provenance, value: Any) -> Provenance:
    """Keep a row alignment only where the value's axis 0 has the length it claims."""
    if _is_groupby(value):
        return provenance  # the groups of those rows, until a reduction per group
    length = _length_of(value)
    changed = None
    for name, state in provenance.items():
        if isinstance(state, Rows) and not state.single and length != state.length:
            changed = changed or dict(provenance)
            changed[name] = Unknown("its rows no longer line up with the source's records")
    return changed if changed is not None else provenance


def _length_of(value: Any) -> int | None:
    if isinstance(value, np.ndarray) or _is_tensor(value):  # the common case first
        return int(value.shape[0]) if value.ndim else None
    if isinstance(value, list):
        return len(value)
    pd = _pandas()
    if pd is not None and isinstance(value, (pd.DataFrame, pd.Series, pd.Index)):
        return int(len(value))
    return None


# -- indexing -----------------------------------------------------------------------------
def _getitem(call: Call, value: Any, provenance_of: ProvenanceOf) -> Provenance:
    """``x[key]``, ``take``, ``masked_select``, ``extract``: a selection of x's rows."""
    operation = call.operation.rsplit(".", 1)[-1]
    if operation in ("extract", "compress"):  # numpy.extract(condition, array)
        if len(call.args) < 2 or call.kwargs.get("axis") is not None:
            return _unknown(_collect(call.args, call.kwargs, provenance_of),
                            f"{operation} is not modelled with these arguments")
        target, key = call.args[1], call.args[0]
    else:
        if len(call.args) < 2:
            return _unknown(_collect(call.args, call.kwargs, provenance_of),
                            f"{operation} is not modelled with these arguments")
        target, key = call.args[0], call.args[1]
        if operation == "take" and (call.kwargs.get("axis") not in (None, 0)
                                    or len(call.args) > 2 or getattr(target, "ndim", 0) != 1):
            return _unknown(_collect(call.args, call.kwargs, provenance_of),
                            "take is modelled on one-dimensional arrays only")
        if operation == "masked_select" and getattr(target, "ndim", 0) != 1:
            return _unknown(_collect(call.args, call.kwargs, provenance_of),
                            "masked_select flattens records of several columns")
    target_provenance = _provenance(target, provenance_of)
    rows_key, rest = (key[0], key[1:]) if isinstance(key, tuple) and key else (key, ())
    key_provenance = _merge(_collect((rows_key,), {}, provenance_of))
    rest_provenance = _merge(_collect(rest, {}, provenance_of))
    ndim = getattr(target, "ndim", None)
    selector = _selector(rows_key, ndim)
    if _names_columns(rows_key) and not rest and (
            _is_groupby(target) or (is_frame(target) and target.ndim == 2)
            or (type(target) is dict and isinstance(rows_key, str))):
        selector = slice(None)  # df["age"], df[["age", "bmi"]]: columns, every row
    if any(item is None or item is Ellipsis for item in rest):
        selector = None
    result: dict[str, State] = {}
    for name, state in target_provenance.items():
        if isinstance(state, Rows) and not state.single:
            result[name] = _select(state, selector) if selector is not None else Unknown(
                "indexed in a way that is not modelled")
        else:
            result[name] = state  # a summary indexed is still that summary
    mask_sources = isinstance(selector, _Mask)
    for name, state in key_provenance.items():
        if mask_sources and isinstance(state, Rows) and not state.single \
                and state.length == selector.size:
            selected = _select(state, selector)
            if isinstance(selected, Rows) and not selected.plain:
                # the mask's own values were combined (``young & (ids != 7)``); what it
                # selects are the records themselves, exactly
                selected = replace(selected, mixed=False, modelled=False)
        elif isinstance(state, (Aggregated, Declared)):
            selected = state
        else:
            selected = Unknown("selected by positions derived from its records")
        result[name] = merge_states([s for s in (result.get(name), selected) if s is not None])
    for name, state in rest_provenance.items():
        extra = state if isinstance(state, (Aggregated, Declared)) else Unknown(
            "columns chosen by values derived from its records")
        result[name] = merge_states([s for s in (result.get(name), extra) if s is not None])
    return result


def _selector(key: Any, ndim: int | None) -> Any:
    """What a row key selects: an int, a slice, a bool mask or an int array; ``None``
    when the key is not modelled."""
    if isinstance(key, (bool, np.bool_)):
        return None
    if isinstance(key, (int, np.integer)):
        return int(key)
    if isinstance(key, slice):
        if all(v is None or isinstance(v, (int, np.integer)) for v in
               (key.start, key.stop, key.step)):
            return key
        return None
    if _is_tensor(key):
        key = key.detach().cpu().numpy()
    if is_frame(key) and key.ndim == 1:
        key = key.to_numpy()
    if isinstance(key, list) and len(key) <= 1_000_000:
        try:
            key = np.asarray(key)
        except (ValueError, TypeError):
            return None
    if isinstance(key, np.ndarray) and key.ndim == 1:
        if key.dtype == bool:
            return _Mask(np.flatnonzero(key), key.size)  # once, for every source
        if key.dtype.kind in "iu":
            return key
    return None


@dataclass(frozen=True, eq=False)
class _Mask:
    """A boolean row mask, as the positions it selects."""

    positions: np.ndarray
    size: int


def _names_columns(key: Any) -> bool:
    return isinstance(key, str) or (isinstance(key, list) and bool(key)
                                    and all(isinstance(k, str) for k in key))


def _select(state: Rows, selector: Any) -> State:
    length = state.length
    index = state.index if state.index is not None else None
    if isinstance(selector, int):
        if not -length <= selector < length:
            return Unknown("indexed out of range")
        row = (index[selector] if index is not None else selector % length)
        return Rows(np.array([row], dtype=np.int64), state.total, True, single=True,
                    mixed=state.mixed, modelled=state.modelled, carried=state.carried)
    if isinstance(selector, slice):
        if selector == slice(None):
            return state
        positions = range(length)[selector]
        if index is None:
            new = np.arange(positions.start, positions.stop, positions.step, dtype=np.int64)
        else:
            new = index[selector]
        return Rows(new, state.total, state.distinct,
                    ordered=state.ordered and positions.step > 0, mixed=state.mixed,
                    modelled=state.modelled, carried=state.carried)
    if isinstance(selector, _Mask):
        if selector.size != length:
            return Unknown("a mask of another length")
        chosen = selector.positions
        return Rows(chosen if index is None else index[chosen], state.total, state.distinct,
                    ordered=state.ordered, mixed=state.mixed, modelled=state.modelled,
                    carried=state.carried)
    if selector.size and (selector.min() < -length or selector.max() >= length):
        return Unknown("indexed out of range")
    positions = selector % length if selector.size else selector.astype(np.int64)
    new = positions.astype(np.int64) if index is None else index[positions]
    return Rows(new, state.total, distinct=False, ordered=False, mixed=state.mixed,
                modelled=state.modelled, carried=state.carried)


def _length(provenance: Provenance) -> Provenance:
    """The length of a value: for rows of a source, how many records were selected."""
    result: dict[str, State] = {}
    for name, state in provenance.items():
        if isinstance(state, Rows) and not state.single:
            if state.index is None:
                result[name] = _summary(state) if state.carried else ROW_COUNT
            else:
                records = state.records()
                n = state.total if records is None else int(records.size)
                counts = np.array([[n], [state.total - n]], dtype=np.int64)
                result[name] = _summary(state, Part("frequency", records, state.total, n,
                                                    {"counts": counts},
                                                    "the number of selected records"))
        elif isinstance(state, Rows):
            result[name] = _summary(state) if state.carried else DECLARED
        else:
            result[name] = state
    return result


# -- reductions -----------------------------------------------------------------------------
def _axis(call: Call, name: str) -> Any:
    """The axis a reduction runs along: None when none is given (all of them), else as
    written (an int, a name, a tuple of them); ``_UNREAD`` when it cannot be read."""
    for key in ("axis", "dim"):
        if key in call.kwargs:
            return _readable(call.kwargs[key])
    positional = call.args[1:2]
    if name in ("percentile", "quantile", "nanpercentile", "nanquantile", "topk",
                "kthvalue"):
        positional = call.args[2:3]  # (a, q, axis) / (x, k, dim)
    if name in ("mse_loss", "cross_entropy", "nll_loss", "binary_cross_entropy",
                "binary_cross_entropy_with_logits", "l1_loss", "smooth_l1_loss", "kl_div",
                "corrcoef", "cov"):
        return None
    return _readable(positional[0]) if positional else None


_UNREAD = object()  # an axis argument that is no axis we can read: treated as row-wise


def _readable(axis: Any) -> Any:
    if axis is None or isinstance(axis, (int, np.integer, str)):
        return axis
    if isinstance(axis, (list, tuple)) and all(isinstance(a, (int, np.integer, str))
                                               for a in axis):
        return tuple(axis)
    if isinstance(axis, np.ndarray) and axis.ndim == 0 and axis.dtype.kind in "iu":
        return int(axis)
    return _UNREAD  # np.sum(x, np.array(1)) is read; weights passed by position are not


def _over_records(axis: Any, ndim: int) -> bool:
    """Whether reducing over ``axis`` reduces over the records (axis 0)."""
    if axis is _UNREAD:
        return False  # record-level: never taken for a summary of the records
    if axis is None:
        return True
    axes = axis if isinstance(axis, (tuple, list)) else (axis,)
    named = {"index": 0, "rows": 0, "columns": 1}
    try:
        return any(int(named.get(a, a) if isinstance(a, str) else a) % max(ndim, 1) == 0
                   for a in axes)
    except (TypeError, ValueError):
        return False  # an axis we cannot read: treated as row-wise (record-level)


def _reduce(call: Call, name: str, value: Any, provenance_of: ProvenanceOf) -> Provenance:
    if not call.args:
        return EMPTY
    data = call.args[0]
    provenance, other = _data_and_rest(call, provenance_of)
    ndim = int(getattr(data, "ndim", 0) or 0)
    unknown = sorted(set(call.kwargs) - _REDUCTION_KEYWORDS)
    positional = 3 if name in _QUANTILES else 2
    if unknown or len(call.args) > positional:
        # where=, initial=, weights passed by position ...: which records count is unclear
        how = f"{unknown[0]}=" if unknown else "these positional arguments"
        return _unknown([provenance, other], f"{name} with {how} is not modelled")
    counting = [key for key in ("min_count", "ddof", "correction")
                if call.kwargs.get(key, 0) not in (0, 1, None, True, False)]
    if counting:  # NaN exactly when fewer values are present: a count of them
        return _unknown([provenance, other], f"{name} with {counting[0]}= is not modelled")
    steering: set[int] = set()
    if name in _STATISTIC and name not in ("logsumexp", "norm"):
        # losses and correlations reduce everything they get (unless reduction="none")
        if call.kwargs.get("reduction") == "none":
            return _merge([provenance, other])
        if name in _LOSS_NOTES:
            steering = _own_lengths([*call.args, *call.kwargs.values()], provenance_of)
        provenance = _merge([provenance, other])
        other = EMPTY
        axis: Any = None
    else:
        axis = _axis(call, name)
        if axis is None and is_frame(data) and name not in ("describe",):
            axis = 0  # pandas reduces each column unless told otherwise
    if not _over_records(axis, ndim):
        # row-wise: still one result per record, but one that combines several of its
        # columns (``min(age, 0 if income > t)``) is no value of one column any more
        merged = _merge([provenance, other])
        columns = int(np.prod(getattr(data, "shape", (0, 1))[1:] or (1,)))
        if columns > 1 or axis is _UNREAD:
            merged = {source: replace(state, mixed=True)
                      if isinstance(state, Rows) and not state.single else state
                      for source, state in merged.items()}
        return merged
    kind = ("magnitude" if name in _MAGNITUDE else "frequency" if name in _FREQUENCY
            else "order" if name in _ORDER else "statistic")
    result: dict[str, State] = {}
    cells: dict[str, np.ndarray] | None = None
    column: np.ndarray | None = None  # the values of one column, read once for all sources
    for source, state in provenance.items():
        if not isinstance(state, Rows) or state.single:
            result[source] = state  # a summary of a summary, or still one record
            continue
        if column is None and kind in ("magnitude", "frequency"):
            column = _one_column(data)
        part_kind = ("statistic" if kind in ("magnitude", "frequency") and not state.plain
                     else kind)
        if kind == "magnitude":
            present = _present(column, state)
            if not isinstance(present, Rows):
                result[source] = present
                continue
            state = present
        if part_kind in ("magnitude", "frequency") and cells is None:
            cells = _cells(data, name, part_kind, axis)
        note = name
        if state.mixed or (part_kind != kind and state.modelled):
            # a loss over weighed values is no training signal; a sum of them no total
            note = f"{name} of values weighed, combined or modelled per record"
        elif state.length in steering:
            note = _steered_note(name)
        part = _part(part_kind, state, cells or {}, note)
        if part.kind in ("frequency", "magnitude"):
            part = _counting(part, column, name, state)
        result[source] = _summary(state, part)
    return _with_rest(result, other)


def _one_column(data: Any) -> np.ndarray | None:
    """A reduction's input as one column of numbers (an (n, 1) matrix too), or None."""
    array = _numeric(data)
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    return array if array.ndim == 1 else None


def _present(column: np.ndarray | None, state: Rows) -> State:
    """The rows of one column that a summary skipping missing values reads: the others
    contribute nothing, so they are no records of it (for differencing too: a total over
    ``sqrt(x - t)``'s defined rows is a total over the records above ``t``)."""
    if column is None or column.dtype.kind != "f" or column.shape[0] != state.length:
        return state
    return _kept(state, ~np.isnan(column))


def _counting(part: Part, column: np.ndarray | None, name: str, state: Rows) -> Part:
    """A count or total of one column, for differencing: its records are the ones it counts
    or that add something to it, so two whose sets differ by one record are seen to
    (``count(x > t)`` and ``count((x > t) & (id != 7))``, ``sum(x)`` and ``sum(x > t ? x :
    0)``), though both cover every row."""
    if column is None or column.shape[0] != state.length or column.dtype.kind not in "biuf":
        return part
    values = column.astype(np.float64, copy=False)
    counted = (~np.isnan(values) if name == "count_nonnull"
               else (values != 0) & ~np.isnan(values))
    if counted.all():
        return part  # every row counts: its records are the rows'
    selected = _kept(state, counted)
    return replace(part, rows=selected.records()) if isinstance(selected, Rows) else part


def _part(kind: str, state: Rows, cells: Mapping[str, np.ndarray], name: str) -> Part:
    records = state.records()
    n = state.total if records is None else int(records.size)
    if not state.distinct and kind in ("magnitude", "frequency"):
        # a record selected twice would count twice in the evidence: keep counts only
        kind, cells = "statistic", {}
    return Part(kind, records, state.total, n, cells, name)


def _numeric(data: Any) -> np.ndarray:
    if is_frame(data):
        return _numeric_frame(data)
    if _is_tensor(data):
        data = data.detach().cpu()
        if str(data.dtype) == "torch.bfloat16":
            data = data.float()
        data = data.numpy()
    array = np.asarray(data)
    if array.dtype.kind == "c":
        array = np.abs(array)
    return array


def _cells(data: Any, name: str, kind: str, axis: Any) -> dict[str, np.ndarray]:
    """Per output cell: records counted, largest contributions, and two-valued counts."""
    array = _numeric(data)
    if array.ndim == 0 or array.dtype.kind not in "biuf":
        return {}
    if name == "count_nonnull":  # pandas' count: the records that are not missing
        array = ~np.isnan(array.astype(np.float64, copy=False))
    n = array.shape[0]
    matrix = array.reshape(n, -1)
    if axis is None and matrix.shape[1] > 1:
        if name in _SPREAD:
            return {}  # the spread of all cells of many records at once: not modelled
        matrix = matrix.sum(axis=1, keepdims=True, dtype=np.float64)
    if matrix.shape[1] > MAX_CELLS:
        return {}
    if kind == "frequency" or matrix.dtype == bool:
        nonzero = np.count_nonzero(matrix, axis=0)
        flags = np.ones(matrix.shape[1], dtype=bool)
        return {"n": np.full(matrix.shape[1], n, dtype=np.int64), "indicator": flags,
                "two_valued": flags,
                "counts": np.stack([nonzero, n - nonzero]).astype(np.int64)}
    values = matrix.astype(np.float64, copy=False)
    cells_count = values.shape[1]
    missing = np.isnan(values)
    if missing.any():
        records = n - missing.sum(axis=0)
        values = np.where(missing, 0.0, values)
    else:
        records = np.full(cells_count, n, dtype=np.int64)
    if name in _SPREAD:
        mean = values.sum(axis=0) / np.maximum(records, 1)
        contributions = (values - mean) ** 2
        if missing.any():
            contributions[missing] = 0.0
    else:
        contributions = np.abs(values)
    total = contributions.sum(axis=0)
    if not np.isfinite(total).all():
        contributions[~np.isfinite(contributions)] = 0.0  # an infinite sum reveals no more
        total = contributions.sum(axis=0)
    cells: dict[str, np.ndarray] = {"n": records.astype(np.int64), "total": total,
                                    "nonzero": np.count_nonzero(values, axis=0)}
    if n >= 2:  # the two largest, without sorting: the copy is ours to change
        columns = np.arange(cells_count)
        largest = np.argmax(contributions, axis=0)
        cells["top1"] = contributions[largest, columns].copy()
        contributions[largest, columns] = -1.0
        cells["top2"] = contributions.max(axis=0)
    elif n == 1:
        cells["top1"], cells["top2"] = contributions[0], np.zeros(cells_count)
    else:
        return {}
    # Records that all contribute one of two values make the sum a count of each.
    if _many_values(values[:256]):  # most data: a glance at the first rows settles it
        cells["two_valued"] = cells["indicator"] = np.zeros(cells_count, dtype=bool)
        cells["counts"] = np.zeros((2, cells_count), dtype=np.int64)
        return cells
    first = values[0]
    differs = values != first
    others = np.count_nonzero(differs, axis=0)
    second = values[np.argmax(differs, axis=0), np.arange(cells_count)]
    seconds = n - np.count_nonzero(values != second, axis=0)
    two_valued = ((n - others) + np.where(others > 0, seconds, 0) == n) & ~missing.any(axis=0)
    indicator = two_valued & np.isin(first, (0.0, 1.0)) & np.isin(second, (0.0, 1.0))
    ones = np.where(first == 1.0, n - others, others)
    counts = np.where(indicator, ones, n - others)
    complement = np.where(indicator, n - ones, others)
    cells["two_valued"] = two_valued
    cells["indicator"] = indicator
    cells["counts"] = np.stack([counts, complement]).astype(np.int64)
    return cells


def _many_values(sample: np.ndarray) -> bool:
    """Whether every column of ``sample`` has more than two distinct values."""
    ordered = np.sort(sample, axis=0)
    distinct = 1 + np.count_nonzero(ordered[1:] != ordered[:-1], axis=0)
    return bool((distinct > 2).all())


# -- tables -------------------------------------------------------------------------------
def _table(call: Call, name: str, value: Any, provenance_of: ProvenanceOf) -> Provenance:
    if not call.args:
        return EMPTY
    data = call.args[0]
    provenance, other = _data_and_rest(call, provenance_of)
    table_keywords = {"unique": {"return_counts", "sorted"}, "bincount": {"minlength"},
                      "histogram": {"bins", "range"}, "histc": {"bins", "min", "max"}}[name]
    positional = {"unique": 1, "bincount": 1, "histogram": 3, "histc": 4}[name]
    extra = sorted(k for k, v in call.kwargs.items() if k not in table_keywords and v not in
                   (None, False))
    if extra or len(call.args) > positional:
        # weights, return_index/return_inverse (positions of records), density ...
        how = f"{extra[0]}=" if extra else "these positional arguments"
        return _unknown([provenance, other], f"{name} with {how} is not modelled")
    if name == "unique" and (call.kwargs.get("axis") is not None
                             or call.kwargs.get("dim") is not None):
        return _unknown([provenance, other], "unique along an axis is not modelled")
    result: dict[str, State] = {}
    counts: np.ndarray | None = None
    for source, state in provenance.items():
        if not isinstance(state, Rows) or state.single:
            result[source] = state
            continue
        if getattr(data, "ndim", 0) != 1 or not state.distinct:
            result[source] = Unknown(f"{name} of several values per record is not modelled")
            continue
        if counts is None:
            counts = _table_counts(name, data, value)
            if name in ("histogram", "histc"):  # rows outside the bins (or NaN) are a count
                outside = state.length - int(counts.sum())
                if outside > 0:
                    counts = np.append(counts, outside)
        records = state.records()
        n = state.total if records is None else int(records.size)
        parts = [Part("table", records, state.total, n, {"counts": counts}, name)]
        if _edges_from_data(name, call):
            parts.append(Part("order", records, state.total, n, {},
                              f"{name} bin edges placed at the smallest and largest value"))
        result[source] = _summary(state, *parts)
    return _with_rest(result, other)


def _table_counts(name: str, data: Any, value: Any) -> np.ndarray:
    if name == "unique":
        _, counts = np.unique(_numeric(data), return_counts=True)
    elif name == "bincount":
        counts = _numeric(value)
    elif name == "histogram":
        counts = _numeric(value[0])
    else:  # histc
        counts = _numeric(value)
    counts = np.asarray(counts).reshape(-1)
    if counts.size > MAX_CELLS:
        raise ValueError("too many cells")
    return counts.astype(np.int64)


def _edges_from_data(name: str, call: Call) -> bool:
    if name == "histogram":
        bins = call.kwargs.get("bins", call.args[1] if len(call.args) > 1 else 10)
        given_range = call.kwargs.get("range", call.args[2] if len(call.args) > 2 else None)
        return isinstance(bins, (int, np.integer, str)) and given_range is None
    if name == "histc":
        low = call.kwargs.get("min", call.args[2] if len(call.args) > 2 else 0)
        high = call.kwargs.get("max", call.args[3] if len(call.args) > 3 else 0)
        return bool(low == high)
    return False


# -- stacking and models ----------------------------------------------------------------------
def _stack(call: Call, inputs: list[Provenance], provenance_of: ProvenanceOf) -> Provenance:
    """``concatenate([x[a], x[b]])`` along axis 0: the rows of each, in turn."""
    axis = call.kwargs.get("axis", call.kwargs.get("dim", 0))
    items = call.args[0] if call.args and isinstance(call.args[0], (list, tuple)) else None
    if items is None or axis not in (0, None) or len(call.args) > 1:
        return _unknown(inputs, "stacking along another axis is not modelled")
    names = _names(inputs)
    indexes: dict[str, list[np.ndarray]] = {name: [] for name in names}
    summaries: list[Provenance] = []
    for item in items:
        provenance = _provenance(item, provenance_of)
        length = _length_of(item)
        for name in names:
            state = provenance.get(name)
            if isinstance(state, Rows) and not state.single:
                index = state.index if state.index is not None else np.arange(state.total)
                indexes[name].append(index)
            elif state is None or isinstance(state, (Aggregated, Declared)):
                if length is None:
                    return _unknown(inputs, "stacks values without rows")
                indexes[name].append(np.full(length, -1, dtype=np.int64))
                if state is not None:
                    summaries.append({name: state})
            else:
                return _unknown(inputs, "stacks records of unknown provenance")
    result: dict[str, State] = {}
    for name in names:
        joined = np.concatenate(indexes[name]) if indexes[name] else np.empty(0, np.int64)
        stacked = [s for s in (_provenance(i, provenance_of).get(name) for i in items)
                   if isinstance(s, Rows)]
        if not stacked or (joined < 0).any():
            result[name] = Unknown("stacks records with other values")
        else:
            result[name] = Rows(joined, stacked[0].total, distinct=False, ordered=False,
                                mixed=True,
                                carried=_dedupe(tuple(p for s in stacked for p in s.carried)))
    return _merge([result, *summaries])


def _forward(call: Call, value: Any, provenance_of: ProvenanceOf) -> Provenance:
    """``model(x)``: one output row per input row; a loss module reduces unless told not."""
    module = call.args[0] if call.args else None
    inputs = _collect(call.args[1:], call.kwargs, provenance_of)
    model = _provenance(module, provenance_of)
    if type(module).__name__.endswith("Loss"):
        if getattr(module, "reduction", "mean") == "none":
            return _merge([model, *inputs])
        data = _merge(inputs)
        steering = _own_lengths([*call.args[1:], *call.kwargs.values()], provenance_of)
        result: dict[str, State] = {}
        for source, state in data.items():
            if isinstance(state, Rows) and not state.single:
                note = ("loss of weighed or combined values" if state.mixed
                        else _steered_note("loss") if state.length in steering else "loss")
                result[source] = _summary(state, _part("statistic", state, {}, note))
            else:
                result[source] = state
        return _merge([model, result])
    merged = _merge([model, *inputs])
    # the researcher's parameters applied to each record (an embedding table indexed by
    # ids, say): its sum is no plain total
    return {name: replace(state, modelled=True) if isinstance(state, Rows) and not state.single
            else state for name, state in merged.items()}


def modified(existing: Provenance, by: Provenance, *, trained: bool) -> Provenance:
    """An object changed in place by an operation whose inputs had provenance ``by``: a
    model (``trained``) learns from the records involved; anything else is unknown.

    Only training signals become a ``model`` part: records themselves, losses, other models.
    Any other summary that reaches a model (``p.add_(x.max())``, a loss over weighed values)
    is carried along unchanged, so its own checks still apply."""
    result = dict(existing)
    for name, state in by.items():
        if trained and isinstance(state, (Rows, Aggregated)):
            if isinstance(state, Rows):
                learned: list[Part] | None = None
                carried: tuple[Part, ...] = state.carried
            else:
                learned = [p for p in state.parts if p.kind == "model"
                           or (p.kind == "statistic" and p.note in _LOSS_NOTES)]
                carried = tuple(p for p in state.parts if all(p is not q for q in learned))
            old = result.get(name)
            if isinstance(old, (Rows, Unknown)):
                result[name] = Unknown("trained after an unmodelled change") if isinstance(
                    old, Rows) else old
                continue
            parts = (*(old.parts if isinstance(old, Aggregated) else ()), *carried)
            new = _trained_part(state, learned, _model_of(parts))
            if new is not None:
                parts = _union_models(_dedupe(parts), new)
            parts = _dedupe(parts)
            if isinstance(old, Aggregated) and _same_parts(parts, old.parts):
                continue  # nothing new (an optimizer's own state read by its step): keep it
            result[name] = Aggregated(parts) if parts else (old or DECLARED)
        elif trained and isinstance(state, Declared):
            result.setdefault(name, DECLARED)
        else:
            result[name] = Unknown(state.why if isinstance(state, Unknown)
                                   else "changed in place")
    if all(state is existing.get(name) for name, state in result.items()):
        return existing  # the same object: what shares it keeps sharing it
    return result


def _same_parts(parts: tuple[Part, ...], old: tuple[Part, ...]) -> bool:
    return len(parts) == len(old) and all(p is q for p, q in zip(parts, old, strict=True))


_LOSS_NOTES = frozenset("""loss mse_loss cross_entropy nll_loss binary_cross_entropy
    binary_cross_entropy_with_logits l1_loss smooth_l1_loss kl_div""".split())


def _model_of(parts: tuple[Part, ...]) -> Part | None:
    return next((p for p in parts if p.kind == "model"), None)


def _trained_part(state: Rows | Aggregated, learned: list[Part] | None,
                  known: Part | None) -> Part | None:
    """What training on ``state`` teaches a model that already knows ``known``: ``None``
    when nothing new. The model's own set, coming back through its forward output (the
    loss of the step), is left out of the union: it is the very object ``known`` holds."""
    if isinstance(state, Rows):
        records = state.records()
        total = state.total
    else:
        if not learned:
            return None
        total = max(p.total for p in learned)
        if known is not None and known.rows is None:
            return None  # it has learned from every record already
        sets = [p.rows for p in learned if known is None or p.rows is not known.rows]
        if not sets:
            return None
        if any(s is None for s in sets):
            records = None
        else:
            records = functools.reduce(_sorted_union, [s for s in sets if s is not None])
    n = total if records is None else int(records.size)
    return Part("model", records, total, n, {}, "training")


def _union_models(parts: tuple[Part, ...], new: Part) -> tuple[Part, ...]:
    old = _model_of(parts)
    if old is None:
        return (*parts, new)
    others = tuple(p for p in parts if p.kind != "model")
    if old.rows is None or new.rows is None:
        rows = None
    else:
        rows = _sorted_union(old.rows, new.rows)
        if rows is old.rows:  # nothing new learned (every step after the first epoch)
            return parts
    n = old.total if rows is None else int(rows.size)
    return (*others, Part("model", rows, old.total, n, {}, "training"))


# The last unions and their inputs, by identity. One training step reaches the model and
# its optimizer, which learn the same batch (of each shared source): with this, they share
# one set, so their next unions find it by identity instead of comparing two equal copies
# of every record. The inputs (larger first) are kept alive with the result, so their ids
# stay theirs. Features and labels (``X[i:j]``, ``y[i:j]``) are two sources with equal
# record numbers: a union whose inputs equal a recent one's is that one's result (the
# batches compared first, 128 numbers; the large sets by identity once they are shared),
# so both sources share one set and each step copies it once, not once per source.
_recent_unions: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
_RECENT_UNIONS = 16


def _recent_equal_union(big: np.ndarray, small: np.ndarray) -> np.ndarray | None:
    for old, new, union in reversed(_recent_unions.values()):
        if (new.size == small.size and old.size == big.size and np.array_equal(new, small)
                and (old is big or np.array_equal(old, big))):
            return union
    return None


def _sorted_union(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The sorted distinct union of two record sets, each sorted and distinct already (as
    every ``Part.rows`` is), returning the larger one itself when the smaller adds nothing.

    A training step adds a batch (~100 records) to a model's set (up to every row): a
    binary search per batch record and at most one insert, never a pass over every row
    beyond that copy. (A check or a ``unique`` of the larger set per mutating op, and
    unions of two equal copies, cost milliseconds a step for the 60,000 rows of a training
    loop.)"""
    if a is b:
        return a
    key = (id(a), id(b))
    recent = _recent_unions.get(key)
    if recent is not None:
        return recent[2]
    big, small = (a, b) if a.size >= b.size else (b, a)
    at = np.searchsorted(big, small)
    present = at < big.size
    present[present] = big[at[present]] == small[present]
    if present.all():
        union = big
    else:
        recent_equal = _recent_equal_union(big, small)
        union = recent_equal if recent_equal is not None else np.insert(
            big, at[~present], small[~present])
    if len(_recent_unions) >= _RECENT_UNIONS:
        del _recent_unions[next(iter(_recent_unions))]
    _recent_unions[key] = (big, small, union)
    return union


# -- pandas and scikit-learn ------------------------------------------------------------------
_TABLE_FAMILIES = frozenset({"DataFrame", "Series", "Index", "GroupBy", "StringMethods",
                             "Datetimelike", "CategoricalAccessor", "Estimator"})
# Row-wise on a table: one result row per input row (alignment re-checked by length).
_TABLE_ROWWISE = frozenset("""isna notna isnull notnull isin between fillna
    convert_dtypes replace mask round clip abs astype to_numpy to_list tolist to_frame copy
    rename assign get_dummies select_dtypes drop filter get reset_index set_index
    radd rsub rmul rdiv truediv floordiv mod pow
    add sub mul div eq ne lt le gt ge where index values squeeze map isnull""".split())
# One result row per input row, but computed from other rows too (a neighbour's value, a
# running total): sum(x) - sum(x.shift(1)) is the last record, so none of them is per record.
_TABLE_MOVES = frozenset("""shift diff pct_change cumsum cumprod cummax cummin ffill bfill
    cumcount ngroup rank""".split())
_TABLE_ORDER = frozenset("""median min max quantile describe mode idxmin idxmax nlargest
    nsmallest first last""".split())
_TABLE_STATISTIC = frozenset("skew kurt corr cov nunique".split())
_TABLE_MAGNITUDE = frozenset("sum mean std var sem".split())
_TABLE_KEYWORDS = frozenset("axis numeric_only skipna min_count ddof".split())
_ESTIMATOR_PARAMETERS = frozenset("coef_ intercept_ feature_importances_".split())
_FIT = frozenset("fit partial_fit".split())
_FIT_ROWS = frozenset("fit_transform fit_predict".split())
_PREDICT = frozenset("""predict predict_proba predict_log_proba decision_function transform
    inverse_transform""".split())
_GROUP_MAGNITUDE = frozenset("sum mean std var sem".split())
# Estimators whose fitted state is parameters (weights, means, variances), whose answers on
# new data the model part's checks cover. Any other (scalers to a range, medians, nearest
# neighbours, trees) keeps values of single records: its answers are for review.
_PARAMETRIC = frozenset("""LinearRegression LogisticRegression Ridge RidgeClassifier Lasso
    ElasticNet SGDClassifier SGDRegressor LinearSVC LinearSVR StandardScaler PCA
    GaussianNB LinearDiscriminantAnalysis""".split())
_GROUP_COUNTS = frozenset("size count".split())


def _pandas() -> Any:
    return sys.modules.get("pandas")


def is_frame(value: Any) -> bool:
    pd = _pandas()
    return pd is not None and isinstance(value, (pd.DataFrame, pd.Series))


def _is_groupby(value: Any) -> bool:
    pd = _pandas()
    return pd is not None and isinstance(value, pd.core.groupby.GroupBy)


def _table_rule(call: Call, name: str, family: str, value: Any, inputs: list[Provenance],
                provenance_of: ProvenanceOf) -> Provenance | None:
    """The pandas and scikit-learn operations provenance models; None: not one of them."""
    operation = call.operation
    if family == "GroupBy":
        return _grouped(call, name, value, provenance_of)
    if family == "Estimator":
        target = _first(call, provenance_of)
        data = _merge(_collect(call.args[1:], call.kwargs, provenance_of))
        if name in _FIT or name in _FIT_ROWS:
            data = steered(call, data, provenance_of)
        if name in _FIT:
            return modified(target, data, trained=True)
        if name in _FIT_ROWS or name in _PREDICT:
            trained = modified(target, data, trained=True) if name in _FIT_ROWS else target
            if not _parametric(call.args[0]):
                # it keeps values of its records (a maximum, a median, the records
                # themselves): what it answers, even about the researcher's own array, is
                # for review
                trained = {source: _keeps_values(state, type(call.args[0]).__name__)
                           for source, state in trained.items()}
            return _merge([trained, data])  # one result per input row: record-level
        if name in _ESTIMATOR_PARAMETERS:
            return target
        return _unknown(inputs, f"{operation} is not modelled")
    if family in ("DataFrame", "Series"):
        if name in _LENGTH_ATTRIBUTES or name == "ndim":
            return None  # the generic rules: lengths are counts, ndim is declared
        if name == "empty":
            return _length(_first(call, provenance_of))
        if name in ("dtype", "dtypes", "columns", "name", "names"):
            # labels of a derived table can be values (get_dummies, value_counts)
            return _unknown(inputs, f"the {name} of a derived table are data")
        if name == "groupby":
            return _group(call, provenance_of)
        if name == "value_counts" or (name == "unique" and family == "Series"):
            return _value_counts(call, name, provenance_of)
        if name == "dropna":
            return _dropna(call, provenance_of)
        if name in ("count",):
            return _reduce(call, "count_nonnull", value, provenance_of)
        if name in _TABLE_MAGNITUDE or name in _TABLE_ORDER or name in _TABLE_STATISTIC \
                or name in ("any", "all", "prod"):
            return _reduce(call, name, value, provenance_of)
        if name in _TABLE_MOVES:
            return _unknown(inputs, f"{name} moves values between records")
        if name in ("convert_dtypes", "infer_objects"):  # the dtype found says what all hold
            return _carrying(_merge(inputs), f"{name}: the dtype found in the values")
        if name in _TABLE_ROWWISE:
            return _mark_mixed(call, value, _merge(inputs), provenance_of)
        if name in ("T", "transpose"):
            return None  # the generic rule: rows move off axis 0
        return _unknown(inputs, f"{operation} is not modelled")
    if operation == "pandas.crosstab":
        return _crosstab(call, value, provenance_of)
    if operation in ("pandas.get_dummies", "pandas.isna", "pandas.notna", "pandas.to_numeric",
                     "pandas.Series", "pandas.DataFrame"):
        if len(call.args) > 1:
            return _unknown(inputs, f"{operation} with these arguments is not modelled")
        if operation == "pandas.get_dummies":  # one column per value found: its width is data
            return _carrying(_merge(inputs), "get_dummies' columns: the values found")
        if operation == "pandas.to_numeric" and call.kwargs:  # downcast: the dtype is data
            return _carrying(_merge(inputs), "to_numeric's dtype: the range of the values")
        return _merge(inputs)
    if operation == "pandas.cut":
        bins = call.kwargs.get("bins", call.args[1] if len(call.args) > 1 else None)
        if isinstance(bins, (list, tuple, np.ndarray)):
            return _merge(inputs)
        return _unknown(inputs, "cut with bins placed by the data")
    if operation.startswith(("pandas.", "sklearn.")):
        return _unknown(inputs, f"{operation} is not modelled")
    return None


def _group(call: Call, provenance_of: ProvenanceOf) -> Provenance:
    """``df.groupby(key)``: the groups of these rows (kept row-aligned until reduced)."""
    inputs = _collect(call.args, call.kwargs, provenance_of)
    allowed = {"by", "sort", "dropna", "observed", "as_index"}
    if len(call.args) > 2 or set(call.kwargs) - allowed:
        return _unknown(inputs, "groupby with these arguments is not modelled")
    return _merge(inputs)


def _grouped(call: Call, name: str, value: Any, provenance_of: ProvenanceOf) -> Provenance:
    """A reduction per group: one cell per group (and column), each checked on its own."""
    group = call.args[0] if call.args else None
    provenance = _first(call, provenance_of)
    inputs = _collect(call.args, call.kwargs, provenance_of)
    if name in ("agg", "aggregate") and len(call.args) == 2 and not call.kwargs:
        names = call.args[1] if isinstance(call.args[1], (list, tuple)) else [call.args[1]]
        if all(isinstance(n, str) for n in names):
            kinds = {"magnitude" if n in _GROUP_MAGNITUDE else "table" if n in _GROUP_COUNTS
                     else "order" for n in names}
            name = ("order" if "order" in kinds else "sum" if "magnitude" in kinds
                    else "count")
    if name in _TABLE_MOVES:
        return _unknown(inputs, f"GroupBy.{name} moves values between records")
    if name == "transform":  # each group's summary, repeated on its rows
        return _carrying(_merge(inputs), "a summary per group (transform)")
    if name in ("size", "count"):
        kind = "table"
    elif name in _GROUP_MAGNITUDE:
        kind = "magnitude"
    elif name in ("min", "max", "median", "first", "last", "quantile", "describe",
                  "nunique", "idxmin", "idxmax", "order", "head", "tail", "value_counts"):
        kind = "order" if name not in ("head", "tail") else "rows"
    else:
        return _unknown(inputs, f"GroupBy.{name} is not modelled")
    if kind == "rows" or (set(call.kwargs) - _TABLE_KEYWORDS):
        return _unknown(inputs, f"GroupBy.{name} with these arguments is not modelled")
    if kind == "magnitude" and not _numeric_table(value):
        # pandas sums text by joining it: every record's value, in one cell per group
        return _unknown(inputs, f"GroupBy.{name} of columns that are not numbers")
    result: dict[str, State] = {}
    cells: dict[str, np.ndarray] | None = None
    codes = _group_codes(group)
    kept = codes >= 0  # rows whose key is missing belong to no group: no records of it
    pd = _pandas()
    obj = getattr(group, "obj", None)
    if kind == "magnitude" and isinstance(obj, pd.Series):
        kept &= ~np.asarray(obj.isna(), dtype=np.bool_)  # nor are missing values
    for source, state in provenance.items():
        if not isinstance(state, Rows) or state.single or not state.distinct:
            result[source] = state if not isinstance(state, Rows) else Unknown(
                "grouped records that are not distinct")
            continue
        selected = _kept(state, kept)
        if not isinstance(selected, Rows):
            result[source] = selected
            continue
        state = selected
        if cells is None:
            cells = _group_cells(group, codes, kind, name, value)
        records = state.records()
        n = state.total if records is None else int(records.size)
        part_kind = "statistic" if kind == "magnitude" and not state.plain else kind
        result[source] = _summary(state, Part(part_kind, records, state.total, n,
                                              cells if part_kind == kind else {},
                                              f"{name} per group"))
    other = _merge(_collect(call.args[1:], call.kwargs, provenance_of))
    return _with_rest(result, other)


def _group_codes(group: Any) -> np.ndarray:
    """Each row's group number; -1 for rows in no group (a missing key)."""
    numbers = np.asarray(group.ngroup(), dtype=np.float64)
    return np.where(np.isnan(numbers), -1, numbers).astype(np.int64)


def _numeric_table(value: Any) -> bool:
    pd = _pandas()
    if isinstance(value, pd.DataFrame):
        return all(pd.api.types.is_numeric_dtype(dtype) for dtype in value.dtypes)
    if isinstance(value, pd.Series):
        return bool(pd.api.types.is_numeric_dtype(value.dtype))
    return True


def _parametric(estimator: Any) -> bool:
    name = type(estimator).__name__
    return name in _PARAMETRIC or (name == "SimpleImputer" and getattr(
        estimator, "strategy", None) in ("mean", "constant"))


def _keeps_values(state: State, estimator: str) -> State:
    return _flag_models(state, "order", f"{estimator} keeps values of its records")


def steered(call: Call, by: Provenance, provenance_of: ProvenanceOf) -> Provenance:
    """What an in-place change (a fit) learns, when the call also got a per-record array of
    the researcher's own (targets, features or ``sample_weight`` with no shared data in
    them): ``fit(e7, ages).predict([[1]])`` is patient 7's age. The records then carry a
    ``statistic`` part into the model, so what it answers is for review."""
    for length in _own_lengths([*call.args[1:], *call.kwargs.values()], provenance_of):
        by = _steer(by, length, "fitted to the researcher's own values per record")
    return by


def _steer(provenance: Provenance, length: int, note: str) -> Provenance:
    """Rows of ``length`` records paired with per-record values of the researcher's own: they
    carry a ``statistic`` part (``note``) wherever they go, so a model they train, or any
    summary of them, is for review."""
    steering = {source: replace(state, carried=(*state.carried, Part(
        "statistic", state.records(), state.total, state.length, {}, note)))
        for source, state in provenance.items()
        if isinstance(state, Rows) and not state.single and state.length == length
        and all(part.note != note for part in state.carried)}  # once: loops add no more
    return {**provenance, **steering} if steering else provenance


def _own_lengths(values: Iterable[Any], provenance_of: ProvenanceOf) -> set[int]:
    """The lengths of the per-record values among ``values`` that hold no shared record: the
    researcher's own (a one-hot of patient 7, perhaps plus a shared summary times zero), or a
    model's answers to them. Paired record by record with shared rows, in a fit or a loss,
    they choose which record teaches the model what."""
    lengths = set()
    for value in values:
        if any(isinstance(state, Rows) and not state.single
               for state in _provenance(value, provenance_of).values()):
            continue
        length = _length_of(value)
        if length is not None:
            lengths.add(length)
    return lengths


def _steered_note(loss: str) -> str:
    """A loss that is no training signal: the model it trains is for review."""
    return f"{loss} against the researcher's own values per record"


def _flag_models(state: State, kind: str, note: str) -> State:
    """``state`` with a part of ``kind`` (for review) beside each model part."""
    if not isinstance(state, Aggregated):
        return state
    flags = tuple(Part(kind, p.rows, p.total, p.n, {}, note) for p in state.parts
                  if p.kind == "model")
    return Aggregated(_dedupe((*state.parts, *flags))) if flags else state


def _group_columns(group: Any) -> list[Any]:
    """The columns a reduction per group summarizes (the keys named by column left out)."""
    frame = group.obj
    pd = _pandas()
    if isinstance(frame, pd.Series):
        return [frame]
    keys = getattr(group, "keys", None)
    named = {keys} if isinstance(keys, str) else (
        {k for k in keys if isinstance(k, str)} if isinstance(keys, list) else set())
    return [frame[c] for c in frame.columns if c not in named]


def _order_part(state: Rows, note: str) -> Part:
    records = state.records()
    n = state.total if records is None else int(records.size)
    return Part("order", records, state.total, n, {}, note)


def _group_cells(group: Any, codes: np.ndarray, kind: str, name: str,
                 value: Any) -> dict[str, np.ndarray]:
    # every group, the empty ones too (categories with observed=False): an empty cell is a
    # zero count
    groups = max(int(codes.max()) + 1 if codes.size else 0, int(getattr(group, "ngroups", 0)))
    kept = codes >= 0  # rows whose key is missing belong to no group
    sizes = np.bincount(codes[kept], minlength=groups)
    dropped = np.array([int((~kept).sum())] if not kept.all() else [], dtype=np.int64)
    if kind == "table":  # the rows left out are a count as well (199 of 200 says 1)
        if name == "count":  # values present per group and column, from the codes
            present = [np.bincount(codes[kept & ~np.asarray(column.isna(), dtype=bool)],
                                   minlength=groups) for column in _group_columns(group)]
            if present:
                sizes = np.stack(present, axis=-1).reshape(-1)
        return {"counts": np.concatenate([sizes.astype(np.int64), dropped])}
    if kind == "order":
        return {"n": sizes.astype(np.int64)}
    pd = _pandas()
    columns = [c for c in _group_columns(group) if pd.api.types.is_numeric_dtype(c.dtype)]
    if len(columns) * max(groups, 1) > MAX_CELLS or not columns:
        return {}
    parts: dict[str, list[np.ndarray]] = {"n": [], "nonzero": [], "total": [], "top1": [],
                                           "top2": [], "two_valued": [], "indicator": [],
                                           "counts": []}
    for column in columns:
        values = np.asarray(column.to_numpy(dtype=np.float64, na_value=np.nan))
        for key, array in _group_column(codes, kept, groups, values, name).items():
            parts[key].append(array)
    cells = {key: np.concatenate(arrays, axis=-1) for key, arrays in parts.items()}
    return cells


def _group_column(codes: np.ndarray, kept: np.ndarray, groups: int, values: np.ndarray,
                  name: str) -> dict[str, np.ndarray]:
    valid = kept & ~np.isnan(values)
    codes, values = codes[valid], values[valid]
    n = np.bincount(codes, minlength=groups)
    if name in ("std", "var", "sem"):
        means = np.bincount(codes, weights=values, minlength=groups) / np.maximum(n, 1)
        contributions = (values - means[codes]) ** 2
    else:
        contributions = np.abs(values)
    contributions = np.where(np.isfinite(contributions), contributions, 0.0)
    total = np.bincount(codes, weights=contributions, minlength=groups)
    order = np.lexsort((-contributions, codes))
    ordered_codes, ordered = codes[order], contributions[order]
    starts = np.searchsorted(ordered_codes, np.arange(groups))
    present = n > 0
    top1 = np.where(present, ordered[np.minimum(starts, max(ordered.size - 1, 0))]
                    if ordered.size else 0.0, 0.0)
    second = np.minimum(starts + 1, max(ordered.size - 1, 0))
    top2 = np.where(n > 1, ordered[second] if ordered.size else 0.0, 0.0)
    distinct = np.unique(values[:256])
    if distinct.size <= 2:
        distinct = np.unique(values)
    two_valued = np.full(groups, distinct.size <= 2)
    indicator = two_valued & bool(np.isin(distinct, (0.0, 1.0)).all())
    first = distinct[0] if distinct.size else 0.0
    if indicator.any():
        ones = np.bincount(codes, weights=(values == 1.0), minlength=groups)
    else:
        ones = n - np.bincount(codes, weights=(values == first), minlength=groups)
    counts = np.stack([ones, n - ones]).astype(np.int64) if indicator.any() else np.stack(
        [n - ones, ones]).astype(np.int64)
    nonzero = np.bincount(codes, weights=(values != 0), minlength=groups).astype(np.int64)
    return {"n": n.astype(np.int64), "nonzero": nonzero, "total": total, "top1": top1,
            "top2": top2,
            "two_valued": two_valued, "indicator": indicator, "counts": counts}


def _value_counts(call: Call, name: str, provenance_of: ProvenanceOf) -> Provenance:
    """``s.value_counts()``, ``s.unique()``: one cell per distinct value (or row)."""
    data = call.args[0]
    provenance = _first(call, provenance_of)
    inputs = _collect(call.args, call.kwargs, provenance_of)
    allowed = {"normalize", "sort", "ascending", "dropna", "subset"}
    if len(call.args) > 1 or set(call.kwargs) - allowed:
        return _unknown(inputs, f"{name} with these arguments is not modelled")
    result: dict[str, State] = {}
    counts: np.ndarray | None = None
    present: np.ndarray | None = None
    for source, state in provenance.items():
        if not isinstance(state, Rows) or state.single or not state.distinct:
            result[source] = state if not isinstance(state, Rows) else Unknown(
                f"{name} of records that are not distinct")
            continue
        if counts is None:
            dropna = bool(call.kwargs.get("dropna", name != "unique"))
            found = data.value_counts(dropna=dropna)
            counts = np.asarray(found.to_numpy(), dtype=np.int64)
            if counts.size > MAX_CELLS:
                raise ValueError("too many cells")
            present = _counted(data, call.kwargs.get("subset"), dropna)
            if present is not None:  # 199 of 200 says that one record is missing
                counts = np.append(counts, present.size - int(present.sum()))
        if present is not None:
            selected = _kept(state, present)
            if not isinstance(selected, Rows):
                result[source] = selected
                continue
            state = selected
        records = state.records()
        n = state.total if records is None else int(records.size)
        result[source] = _summary(state, Part("table", records, state.total, n,
                                              {"counts": counts}, name))
    return _merge([result, *[p for p in inputs[1:]]]) if len(inputs) > 1 else result


def _kept(state: Rows, keep: np.ndarray) -> State:
    """The rows a result keeps (``keep``, one flag per row); the others are no records
    of it."""
    if keep.all():
        return state
    return _select(state, _Mask(np.flatnonzero(keep), keep.size))


def _counted(data: Any, subset: Any, dropna: bool) -> np.ndarray | None:
    """Which rows ``value_counts`` counts, when it leaves some out (missing values)."""
    if not dropna:
        return None
    missing = data.isna()
    if hasattr(missing, "columns"):
        if subset is not None:
            missing = missing[list(subset) if isinstance(subset, (list, tuple)) else [subset]]
        missing = missing.any(axis=1)
    present = ~np.asarray(missing, dtype=bool)
    return None if present.all() else present


def _dropna(call: Call, provenance_of: ProvenanceOf) -> Provenance:
    """``dropna()``: the rows without missing values (a filter by the data)."""
    data = call.args[0]
    inputs = _collect(call.args, call.kwargs, provenance_of)
    axis = call.kwargs.get("axis", 0)
    if len(call.args) > 1 or axis not in (0, "index", "rows") or \
            set(call.kwargs) - {"axis", "how", "subset", "ignore_index"}:
        return _unknown(inputs, "dropna with these arguments is not modelled")
    missing = data.isna()
    if hasattr(missing, "columns"):
        subset = call.kwargs.get("subset")
        if subset is not None:
            missing = missing[list(subset) if isinstance(subset, (list, tuple)) else [subset]]
        missing = missing.all(axis=1) if call.kwargs.get("how") == "all" else missing.any(
            axis=1)
    keep = _Mask(np.flatnonzero(~np.asarray(missing, dtype=bool)), len(data))
    result: dict[str, State] = {}
    for source, state in _first(call, provenance_of).items():
        result[source] = _select(state, keep) if isinstance(state, Rows) and not \
            state.single else state
    return result


def _crosstab(call: Call, value: Any, provenance_of: ProvenanceOf) -> Provenance:
    """``pd.crosstab(a, b)``: a table of counts, one cell per pair of values."""
    inputs = _collect(call.args, call.kwargs, provenance_of)
    allowed = {"margins", "dropna", "rownames", "colnames", "margins_name"}
    if len(call.args) > 2 or set(call.kwargs) - allowed:
        return _unknown(inputs, "crosstab with values, aggfunc or normalize is not modelled")
    merged = _merge(inputs)
    counts = _numeric_frame(value).reshape(-1)
    if counts.size > MAX_CELLS:
        return _unknown(inputs, "a table with too many cells")
    pd = _pandas()
    present = np.logical_and.reduce([~np.asarray(pd.isna(key), dtype=bool).reshape(-1)
                                     for key in call.args])
    if not present.all():  # rows with a missing key are in no cell: they are a count too
        counts = np.append(counts, present.size - int(present.sum()))
    result: dict[str, State] = {}
    for source, state in merged.items():
        if not isinstance(state, Rows) or state.single or not state.distinct:
            result[source] = state if not isinstance(state, Rows) else Unknown(
                "crosstab of records that are not distinct")
            continue
        selected = _kept(state, present)
        if not isinstance(selected, Rows):
            result[source] = selected
            continue
        state = selected
        records = state.records()
        n = state.total if records is None else int(records.size)
        result[source] = _summary(state, Part("table", records, state.total, n,
                                              {"counts": counts.astype(np.int64)},
                                              "crosstab"))
    return result


def _numeric_frame(value: Any) -> np.ndarray:
    try:
        return np.asarray(value.to_numpy(dtype=np.float64, na_value=np.nan))
    except (TypeError, ValueError, AttributeError):
        return np.empty(0, dtype=object)


# -- small things -------------------------------------------------------------------------
def _is_tensor(value: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)



