"""What an object holds in memory, and the two guards built on it.

The executor uses this to protect shared data (a mutating method is refused on anything whose
memory overlaps a shared object's) and to keep the researcher's objects within the owner's
memory budget (each memory block counted once, however many objects share it; shared memory
is not counted). In the worker, shared arrays and tensors are also mapped read-only, so these
checks give clear refusals; the mapping is what makes a write impossible.
"""

from __future__ import annotations

import bisect
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .protocol import MAX_VALUE_DEPTH

try:
    from numpy.lib.array_utils import byte_bounds
except ImportError:  # numpy < 2
    from numpy import byte_bounds  # type: ignore[attr-defined,no-redef]

__all__ = [
    "Intervals",
    "MemoryBudget",
    "OverBudget",
    "Shared",
    "allocation",
    "buffer_sizes",
    "contents",
    "footprint",
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
                enforce: bool = True) -> int:
        """Count ``value``'s blocks for ``entry_id``; raise ``OverBudget`` (counting nothing)
        if they would not fit. Returns the bytes the value holds."""
        blocks = {start: size for start, size in buffer_sizes(value).items()
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
        return [span for leaf in _graph_leaves(target) for span in footprint(leaf)]
    return list(footprint(target))


# -- what an object holds -----------------------------------------------------------
def _torch() -> Any:
    """torch if the process already imported it; an owner sharing only numpy never does."""
    return sys.modules.get("torch")


def is_tensor(value: Any) -> bool:
    torch = _torch()
    return torch is not None and isinstance(value, torch.Tensor)


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
    ``value``, bounded in depth and item count."""
    torch = _torch()
    stack: list[tuple[Any, int]] = [(value, 0)]
    seen: set[int] = set()
    budget = _WALK_LIMIT
    while stack and budget > 0:
        item, depth = stack.pop()
        budget -= 1
        if id(item) in seen or depth > MAX_VALUE_DEPTH:
            continue
        seen.add(id(item))
        if isinstance(item, np.ndarray):
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
        elif torch is None:
            continue
        elif isinstance(item, torch.Tensor):
            yield item
            if item.is_leaf and item.grad is not None:
                yield item.grad
        elif isinstance(item, torch.nn.Module):
            yield from item.modules()
            stack.extend((t, depth + 1) for t in item.parameters())
            stack.extend((t, depth + 1) for t in item.buffers())
        elif isinstance(item, torch.optim.Optimizer):
            yield item
            for group in item.param_groups:
                stack.extend((p, depth + 1) for p in group["params"])
            for state in item.state.values():
                stack.extend((v, depth + 1) for v in state.values())
        elif isinstance(item, torch.optim.lr_scheduler.LRScheduler):
            yield item
            stack.append((item.optimizer, depth + 1))


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
    if is_tensor(item):
        try:
            storage = item.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse and other storage-less layouts
            return None
        size = storage.nbytes()
        return (int(storage.data_ptr()), int(size)) if size else None
    return None


def footprint(value: Any) -> Iterator[tuple[int, int]]:
    """Memory intervals that identify ``value``: data blocks, plus the objects themselves
    for modules and optimizers (whose mode and settings are state too)."""
    for item in contents(value):
        block = allocation(item)
        if block is not None:
            yield block
        elif not isinstance(item, np.ndarray) and not is_tensor(item):
            yield id(item), 1  # a live object's address is inside no other live block


def buffer_sizes(value: Any) -> dict[int, int]:
    """Data blocks held by ``value``, start -> size, for the memory budget: array and tensor
    buffers, and Python containers with their items (``tolist()`` of a big array is big)."""
    blocks: dict[int, int] = {}
    for item in contents(value):
        block = allocation(item)
        if block is not None:
            blocks[block[0]] = max(block[1], blocks.get(block[0], 0))
        elif _is_estimator(item):
            for start, size in _fitted_blocks(item, 0):
                blocks[start] = max(size, blocks.get(start, 0))
    if _is_table(value):
        blocks.update(_table_python_blocks(value))
    python = python_bytes(value)
    if python:
        blocks[id(value)] = python  # a live object's address is inside no other block
    return blocks


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
