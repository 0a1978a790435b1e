"""What an object holds in memory, and the two guards built on it.

The executor uses this to protect shared data (a mutating method is refused on anything whose
memory overlaps a shared object's) and to keep the researcher's objects within the owner's
memory budget (each memory block counted once, however many objects share it; shared memory
is not counted). In the worker, shared arrays and tensors are also mapped read-only, so these
checks give clear refusals; the mapping is what makes a write impossible.
"""

from __future__ import annotations

import bisect
import itertools
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .protocol import MAX_VALUE_DEPTH

try:
    from numpy.lib.array_utils import byte_bounds
except ImportError:  # numpy < 2
    from numpy import byte_bounds  # type: ignore[attr-defined,no-redef]

__all__ = [
    "Footprints",
    "Intervals",
    "Inventory",
    "MemoryBudget",
    "OverBudget",
    "Shared",
    "allocation",
    "buffer_sizes",
    "contents",
    "footprint",
    "inventory",
    "is_tensor",
    "protected",
    "touched_by",
]

_WALK_LIMIT = 100_000  # container items inspected when looking for arrays


@dataclass
class Shared:
    value: Any
    footprint: list[tuple[int, int]]


class Intervals:
    """Memory intervals of shared objects, answering "does [start, end) overlap one?" fast."""

    def __init__(self, shared: dict[str, Shared]) -> None:
        spans = sorted(
            (start, start + size, name)
            for name, item in shared.items()
            for start, size in item.footprint
        )
        self._starts = [s for s, _, _ in spans]
        self._spans = spans
        self._max_end: list[int] = []
        for _, end, _ in spans:
            self._max_end.append(max(end, self._max_end[-1]) if self._max_end else end)

    def find(self, start: int, size: int) -> str | None:
        end = start + size
        i = bisect.bisect_left(self._starts, end) - 1
        while i >= 0 and self._max_end[i] > start:
            if self._spans[i][1] > start:
                return self._spans[i][2]
            i -= 1
        return None


class Footprints:
    """Each entry's footprint, answering "which entries does a write to these blocks reach?"
    for every in-place change (three per training step).

    A pipelined training loop keeps hundreds of entries alive in the worker (the researcher's
    frees follow each batch of ops), and a walk over every entry's blocks per change cost
    more than the step's arithmetic. Here all blocks sit in one table of (row number, entry,
    start, end) rows, appended to as entries are recorded, in row-number order; the rows of
    a dropped or re-recorded entry are emptied in place (found by a binary search on the
    row number) and compacted away once they are the majority."""

    _DEAD = np.iinfo(np.int64).min  # the end of an emptied row: it overlaps nothing

    def __init__(self) -> None:
        # the table by columns (row number, entry, start, end), so each is contiguous
        self._table = np.empty((4, 0), dtype=np.int64)
        self._pending: list[tuple[int, int, int, int]] = []  # rows not yet in the table
        self._rows: dict[int, tuple[int, int]] = {}  # live entry -> (first row number, count)
        self._next_row = 0
        self._live_rows = 0

    def record(self, entry_id: int, footprint: list[tuple[int, int]]) -> None:
        """``entry_id`` holds ``footprint`` now ((start, size) blocks), whatever it held."""
        self.drop(entry_id)
        first = self._next_row
        self._next_row += len(footprint)
        self._rows[entry_id] = (first, len(footprint))
        self._live_rows += len(footprint)
        self._pending.extend((first + i, entry_id, start, start + size)
                             for i, (start, size) in enumerate(footprint))

    def drop(self, entry_id: int) -> None:
        first, count = self._rows.pop(entry_id, (0, 0))
        if not count:
            return
        self._live_rows -= count
        pending_first = self._next_row - len(self._pending)
        if first >= pending_first:
            for row in range(first, first + count):  # row numbers stay in order
                self._pending[row - pending_first] = (row, entry_id, 0, self._DEAD)
        else:
            at = int(np.searchsorted(self._table[0], first))
            self._table[3, at:at + count] = self._DEAD

    def reached_by(self, touched: list[tuple[int, int]]) -> set[int]:
        """Live entries with a block overlapping any of ``touched`` ((start, size) each).

        The written blocks are few (a model's parameters and grads) and sorted in Python;
        the table's rows are many and compared at once: a row is reached when the furthest
        end among the written blocks starting before the row ends lies past its start."""
        _, entries, starts, ends = self._current_table()
        if not touched or not len(entries):
            return set()
        written = sorted(touched)
        written_starts = np.array([start for start, _ in written], dtype=np.int64)
        furthest = np.array(list(itertools.accumulate((start + size for start, size in written),
                                                      max)), dtype=np.int64)
        last = np.searchsorted(written_starts, ends, side="left") - 1
        hit = last >= 0
        hit[hit] = furthest[last[hit]] > starts[hit]
        return set(entries[hit].tolist())

    def _current_table(self) -> np.ndarray:
        if self._pending:
            added = np.array(self._pending, dtype=np.int64).reshape(-1, 4).T
            self._pending = []
            self._table = np.concatenate([self._table, added], axis=1)
        if self._table.shape[1] > 2 * self._live_rows + 64:  # mostly emptied rows: compact
            self._table = self._table[:, self._table[3] != self._DEAD]
        return self._table


class OverBudget(Exception):
    """A result would take the researcher's objects past the memory budget."""

    def __init__(self, added: int, used: int, budget: int) -> None:
        super().__init__(f"the result needs {added} more bytes; {used} of {budget} bytes "
                         "are in use")


class MemoryBudget:
    """Bytes held by the researcher's objects; each block counted once while referenced."""

    def __init__(self, budget: int | None) -> None:
        self.budget = budget
        self.used = 0
        self._held: dict[int, list[int]] = {}  # allocation start -> [size, reference count]
        self._allocations: dict[int, list[tuple[int, int]]] = {}  # entry id -> its blocks

    def account(self, entry_id: int, value: Any, shared: Intervals, *,
                enforce: bool = True, sizes: dict[int, int] | None = None) -> int:
        """Count ``value``'s blocks for ``entry_id``; raise ``OverBudget`` (counting nothing)
        if they would not fit. Returns the bytes the value holds. ``sizes``: the value's
        ``buffer_sizes`` when the caller already has them (one walk of the value, not two)."""
        if sizes is None:
            sizes = buffer_sizes(value)
        blocks = {start: size for start, size in sizes.items()
                  if shared.find(start, size) is None}
        added = sum(size for start, size in blocks.items() if start not in self._held)
        if enforce and self.budget is not None and self.used + added > self.budget:
            raise OverBudget(added, self.used, self.budget)
        for start, size in blocks.items():
            held = self._held.setdefault(start, [0, 0])
            if size > held[0]:
                self.used += size - held[0]
                held[0] = size
            held[1] += 1
        self._allocations[entry_id] = list(blocks.items())
        return sum(blocks.values())

    def release(self, entry_id: int) -> None:
        for start, _ in self._allocations.pop(entry_id, []):
            held = self._held[start]
            held[1] -= 1
            if held[1] == 0:
                self.used -= held[0]
                del self._held[start]


def touched_by(target: Any, name: str) -> list[tuple[int, int]]:
    """Memory a mutating method changes: ``backward`` writes the grads of the graph's
    leaves, a module or optimizer changes its parameters, anything else itself."""
    if name == "backward" and is_tensor(target):
        return inventory(_graph_leaves(target)).footprint
    return inventory(target).footprint


# -- what an object holds -----------------------------------------------------------
_torch_module: Any = None


def _torch() -> Any:
    """torch if the process already imported it; an owner sharing only numpy never does.
    (Found once: this runs for every object of every operation.)"""
    global _torch_module
    if _torch_module is None:
        _torch_module = sys.modules.get("torch")
    return _torch_module


def is_tensor(value: Any) -> bool:
    torch = _torch()
    return torch is not None and isinstance(value, torch.Tensor)


def _torch_classes() -> tuple[type, type, type, type] | None:
    """(Tensor, Module, Optimizer, LRScheduler) once torch is loaded; None before."""
    global _classes
    if _classes is None:
        torch = _torch()
        if torch is not None:
            _classes = (torch.Tensor, torch.nn.Module, torch.optim.Optimizer,
                        torch.optim.lr_scheduler.LRScheduler)
    return _classes


_classes: tuple[type, type, type, type] | None = None


def protected(value: Any, depth: int) -> Any:
    """The form in which an object is shared: read-only numpy views, detached tensors."""
    if depth > MAX_VALUE_DEPTH:
        raise ValueError("the shared object is nested too deeply")
    if isinstance(value, np.ndarray):
        view = value.view()
        view.flags.writeable = False
        return view
    if is_tensor(value):
        return value.detach()  # same memory, but no gradient can flow into the owner's tensor
    if type(value) is list:
        return [protected(v, depth + 1) for v in value]
    if type(value) is tuple:
        return tuple(protected(v, depth + 1) for v in value)
    if type(value) is dict:
        return {k: protected(v, depth + 1) for k, v in value.items()}
    return value


def contents(value: Any) -> Iterator[Any]:
    """Arrays, tensors (with their grads), modules, optimizers and schedulers inside
    ``value``, bounded in depth and item count. (This runs several times per operation of a
    training step: the checks are ordered by how often each kind turns up, and the tensors
    of a module or an optimizer are taken at once, not pushed and popped one by one.)"""
    classes: Any = _torch_classes() or (_Never, _Never, _Never, _Never)
    tensor, module, optimizer, scheduler = classes
    stack: list[tuple[Any, int]] = [(value, 0)]
    seen: set[int] = set()
    budget = _WALK_LIMIT

    def tensors(found: Iterable[Any]) -> Iterator[Any]:
        nonlocal budget
        for item in found:
            if item is None or id(item) in seen:
                continue
            seen.add(id(item))
            budget -= 1
            yield item
            if item.is_leaf:
                grad = item.grad
                if grad is not None:
                    yield grad

    while stack and budget > 0:
        item, depth = stack.pop()
        budget -= 1
        key = id(item)
        if key in seen or depth > MAX_VALUE_DEPTH:
            continue
        if isinstance(item, tensor):
            yield from tensors((item,))
            continue
        seen.add(key)
        if isinstance(item, module):
            # what modules(), parameters() and buffers() yield, read from the module tree
            # directly (torch's generators cost several times more); submodules at the same
            # depth, as modules() knows no depth limit
            yield item
            stack.extend((m, depth) for m in item._modules.values() if m is not None)
            yield from tensors(item._parameters.values())
            yield from tensors(item._buffers.values())
        elif isinstance(item, optimizer):
            yield item
            for group in item.param_groups:
                yield from tensors(group["params"])
            for state in item.state.values():
                stack.extend((v, depth + 1) for v in state.values())
        elif isinstance(item, np.ndarray):
            yield item
        elif isinstance(item, (list, tuple)):
            stack.extend((v, depth + 1) for v in item)
        elif isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif _is_table(item):
            yield from _table_arrays(item)
        elif _is_estimator(item):
            # the estimator itself (its settings and fitted state are what fit changes) and
            # the estimators it holds (a pipeline's steps are the same objects)
            yield item
            stack.extend((v, depth + 1) for v in item.get_params(deep=False).values())
        elif isinstance(item, scheduler):
            yield item
            stack.append((item.optimizer, depth + 1))


class _Never:
    """Stands for torch.Tensor when torch is not loaded: nothing is an instance of it."""


def _is_table(value: Any) -> bool:
    pd = sys.modules.get("pandas")
    return pd is not None and isinstance(value, (pd.DataFrame, pd.Series, pd.Index))


def _is_estimator(value: Any) -> bool:
    base = sys.modules.get("sklearn.base")
    return base is not None and isinstance(value, base.BaseEstimator)


def _columns(table: Any) -> Iterator[tuple[Any, Any, Any]]:
    """(dtype, values, holder) of a DataFrame's columns, a Series or an Index, and of its
    index: numpy columns as numpy arrays (no copy), others as pandas arrays; ``holder`` is
    the object that keeps the values alive (the same object in every result that shares
    them, so their bytes are counted once)."""
    import pandas as pd

    if isinstance(table, pd.DataFrame):
        for i in range(table.shape[1]):
            yield from _columns(table.iloc[:, i])
    elif isinstance(table, pd.MultiIndex):
        for i in range(table.nlevels):
            yield from _columns(table.levels[i])
        return
    elif isinstance(table, pd.RangeIndex):
        return
    if isinstance(table, (pd.Series, pd.Index)):
        dtype = table.dtype
        numpy = isinstance(dtype, np.dtype)
        values = table.to_numpy(copy=False) if numpy else table.array
        yield dtype, values, values
    if isinstance(table, (pd.DataFrame, pd.Series)):
        yield from _columns(table.index)


def _table_arrays(table: Any) -> Iterator[np.ndarray]:
    """The numpy arrays a pandas object holds without copying: numpy columns and the codes
    of categoricals (the Python objects in other columns are counted by ``buffer_sizes``)."""
    import pandas as pd

    for _, values, _ in _columns(table):
        if isinstance(values, np.ndarray):
            yield values
        elif isinstance(values, pd.Categorical):
            yield values.codes


def _table_python_blocks(table: Any) -> dict[int, int]:
    """Bytes a pandas object holds outside plain numpy arrays (strings, nullable and
    categorical columns, string indexes), per holder: strings are sampled."""
    blocks: dict[int, int] = {}
    for dtype, values, holder in _columns(table):
        if isinstance(values, np.ndarray) and dtype.kind != "O":
            continue
        size = 0 if isinstance(values, np.ndarray) else int(values.nbytes)
        if getattr(dtype, "kind", "") == "O" or str(dtype) in ("str", "string"):
            sample = np.asarray(values[:_STRING_SAMPLE], dtype=object)
            per_item = sum(sys.getsizeof(v) for v in sample) / max(1, len(sample))
            size += int(per_item * len(values))
        blocks[id(holder)] = max(size, blocks.get(id(holder), 0))
    return blocks


def allocation(item: Any) -> tuple[int, int] | None:
    """(start address, size) of the memory block behind an array or tensor."""
    if is_tensor(item):
        return _storage_block(item)
    if isinstance(item, np.ndarray):
        root = item
        while isinstance(root.base, np.ndarray):
            root = root.base
        if is_tensor(root.base):  # tensor.numpy() aliases the tensor's storage
            return allocation(root.base)
        if root.nbytes == 0:
            return None
        low, high = byte_bounds(root)
        return int(low), int(high - low)
    return None


def _storage_block(tensor: Any) -> tuple[int, int] | None:
    try:
        storage = tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse and other storage-less layouts
        return None
    size = storage.nbytes()
    return (storage.data_ptr(), size) if size else None


@dataclass
class Inventory:
    """What one walk of a value finds: its ``footprint``, its ``buffer_sizes`` and the
    numpy arrays inside it. The executor needs all three for every result; one walk."""

    footprint: list[tuple[int, int]]
    sizes: dict[int, int]
    arrays: list[np.ndarray]


def inventory(value: Any) -> Inventory:
    classes = _torch_classes()
    plain_tensor = classes is not None and type(value) is classes[0]
    if plain_tensor and (not value.is_leaf or value.grad is None):  # most results
        block = _storage_block(value)
        return Inventory([block], {block[0]: block[1]}, []) if block else Inventory([], {}, [])
    footprint: list[tuple[int, int]] = []
    sizes: dict[int, int] = {}
    arrays: list[np.ndarray] = []
    tensor = classes[0] if classes is not None else _Never
    for item in contents(value):
        if isinstance(item, tensor):
            block = _storage_block(item)
        elif isinstance(item, np.ndarray):
            arrays.append(item)
            block = allocation(item)
        else:  # a module, optimizer, scheduler or estimator: its address is in no other block
            footprint.append((id(item), 1))
            if _is_estimator(item):
                for start, size in _fitted_blocks(item, 0):
                    sizes[start] = max(size, sizes.get(start, 0))
            continue
        if block is not None:
            footprint.append(block)
            sizes[block[0]] = max(block[1], sizes.get(block[0], 0))
    if _is_table(value):
        sizes.update(_table_python_blocks(value))
    python = python_bytes(value)
    if python:
        sizes[id(value)] = python  # a live object's address is inside no other block
    return Inventory(footprint, sizes, arrays)


def footprint(value: Any) -> Iterator[tuple[int, int]]:
    """Memory intervals that identify ``value``: data blocks, plus the objects themselves
    for modules and optimizers (whose mode and settings are state too)."""
    yield from inventory(value).footprint


def buffer_sizes(value: Any) -> dict[int, int]:
    """Data blocks held by ``value``, start -> size, for the memory budget: array and tensor
    buffers, and Python containers with their items (``tolist()`` of a big array is big)."""
    return inventory(value).sizes


def _fitted_blocks(estimator: Any, depth: int) -> Iterator[tuple[int, int]]:
    """Memory a fitted scikit-learn estimator holds: its arrays (coefficients, a k-NN's
    training rows), its fitted sub-estimators (a forest's trees) and their tree structures.
    Read from the estimator's own attributes (our object, not a name from the peer)."""
    if depth > 4:
        return
    for value in vars(estimator).values():
        items = value if isinstance(value, (list, tuple)) else [value]
        for item in items[:_WALK_LIMIT]:
            if isinstance(item, np.ndarray):
                block = allocation(item)
                if block is not None:
                    yield block
            elif _is_estimator(item):
                yield from _fitted_blocks(item, depth + 1)
            elif type(item).__module__ == "sklearn.tree._tree" and hasattr(item, "node_count"):
                # a tree: ~64 bytes per node plus its values per node
                yield id(item), int(item.node_count) * 64 + int(item.value.nbytes)


def python_bytes(value: Any) -> int:
    """Bytes of the Python objects in a list, tuple or dict tree (not their arrays), estimated
    from a bounded sample when there are very many."""
    if not isinstance(value, (list, tuple, dict)):
        return 0
    total, seen = 0, 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, tuple, dict)) and depth <= MAX_VALUE_DEPTH:
            total += sys.getsizeof(item)
            children = list(item.values()) if isinstance(item, dict) else item
            if len(children) > _SAMPLE:  # a long flat list: measure a sample, scale it up
                sample = children[:_SAMPLE]
                scale = len(children) / _SAMPLE
                total += int(scale * sum(python_bytes(c) or _scalar_bytes(c) for c in sample))
                continue
            stack.extend((c, depth + 1) for c in children)
        elif not isinstance(item, np.ndarray) and not is_tensor(item):
            total += _scalar_bytes(item)
        seen += 1
        if seen > _WALK_LIMIT:
            break
    return total if total >= _SMALL else 0  # a handful of small objects is not worth a block


def _scalar_bytes(item: Any) -> int:
    if isinstance(item, (np.ndarray, list, tuple, dict)) or is_tensor(item):
        return 0
    return sys.getsizeof(item)


_SAMPLE = 1000
_STRING_SAMPLE = 64  # strings measured to estimate a text column's bytes
_SMALL = 64 * 1024


def _graph_leaves(tensor: Any) -> list[Any]:
    """The leaf tensors whose ``.grad`` a ``backward`` from ``tensor`` would write."""
    if tensor.grad_fn is None:
        return [tensor] if tensor.requires_grad else []
    leaves, seen, stack = [], set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)  # AccumulateGrad nodes hold their leaf
        if variable is not None:
            leaves.append(variable)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return leaves
