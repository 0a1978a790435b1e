"""The owner-side executor: runs the researcher's operations in order, under the allowlist.

Each operation's result is kept as an ``Entry`` under the id the researcher chose, with its
*lineage*: the expression that produced it from shared objects, as text the owner can read
when deciding a request. Failures are stored too, so later operations that use a failed
result fail with ``UpstreamFailure`` instead of running on garbage.

Shared data must not change under the researcher's operations: numpy arrays are shared as
read-only views, torch tensors detached, and mutating methods are refused on any object whose
memory overlaps shared memory (views, ``.numpy()`` aliases, modules built around shared
layers, optimizers over shared parameters, a ``backward`` reaching shared parameters).

Not thread-safe: the session calls it from one worker thread, in order, off the network loop.
"""

from __future__ import annotations

import bisect
import sys
import types
from collections.abc import ItemsView, Iterable, Iterator, KeysView, ValuesView
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import lineage
from .errors import PolicyViolation, RequestError
from .lineage import MAX_LINEAGE
from .policy import Allowlist, check_name
from .protocol import MAX_VALUE_DEPTH, DTypeRef, Op, OpFailed, PointerRef, StoreRef

try:
    from numpy.lib.array_utils import byte_bounds
except ImportError:  # numpy < 2
    from numpy import byte_bounds  # type: ignore[attr-defined,no-redef]

__all__ = ["MAX_LINEAGE", "Entry", "Executor", "ExecutorEvents"]

_WALK_LIMIT = 100_000  # container items inspected when looking for arrays
_TORCH_FAMILIES = {"Tensor", "Module", "Optimizer", "Scheduler"}


@dataclass
class Entry:
    """An object created by the researcher's operations (or a shared object, for lookups)."""

    value: Any
    lineage: str
    nbytes: int
    failure: OpFailed | None = None
    error: str = ""  # the owner-side exception text; may contain data values, never sent
    # Names of the shared objects the value was derived from, in-place changes included.
    sources: frozenset[str] = frozenset()
    modified_by: list[str] = field(default_factory=list)
    origin: str = field(init=False)

    def __post_init__(self) -> None:
        self.origin = self.lineage

    def note_modification(self, note: str, sources: frozenset[str]) -> None:
        """Record an in-place change, so that a model trained by ``opt.step()`` says so, and
        on which shared data, in its lineage. The operations are kept in ``modified_by``; the
        lineage stays short enough to read in an approval table."""
        self.sources |= sources
        if note not in self.modified_by:
            self.modified_by.append(note)
        if self.sources:  # the data it was changed with is what the owner must know
            how = f"using {', '.join(sorted(self.sources))}"
        else:
            how = "by " + "; ".join(self.modified_by[:3]) + ("; …" if len(self.modified_by) > 3
                                                             else "")
        self.lineage = lineage.cap(f"{self.origin} [modified in place {how}]")


class _Failure(Exception):
    """An operation that cannot run; ``detail`` names things, never data values."""

    def __init__(self, error_type: str, detail: str = "", *, error: str = "") -> None:
        super().__init__(detail)
        self.error_type = error_type
        self.detail = detail
        self.error = error or detail


@dataclass
class _Shared:
    value: Any
    footprint: list[tuple[int, int]]


class _Intervals:
    """Memory intervals of shared objects, answering "does [start, end) overlap one?" fast."""

    def __init__(self, shared: dict[str, _Shared]) -> None:
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


class ExecutorEvents:
    """What the executor reports for the audit log; the default records nothing.

    Subclass and override ``record`` (every event) or the named hooks."""

    def record(self, event: str, **fields: Any) -> None:
        """One audit event (``duet.audit.EVENTS`` names it)."""

    def executed(self, operation: str, lineage: str, pointer_id: int) -> None:
        self.record("op_executed", operation=operation, lineage=lineage, pointer_id=pointer_id)

    def refused(self, operation: str, policy: str, pointer_id: int) -> None:
        self.record("op_refused", operation=operation, policy=policy, pointer_id=pointer_id)

    def failed(self, operation: str, error_type: str, error: str, pointer_id: int) -> None:
        self.record("op_failed", operation=operation, error_type=error_type, error=error,
                    pointer_id=pointer_id)


class Executor:
    """Runs ``Op``s against shared objects and the entries earlier ops created."""

    def __init__(
        self,
        allowlist: Allowlist,
        *,
        memory_budget: int | None = 2 * 1024**3,
        events: ExecutorEvents | None = None,
    ) -> None:
        self.allowlist = allowlist
        self.memory_budget = memory_budget
        self._events = events or ExecutorEvents()
        self._entries: dict[int, Entry] = {}
        self._shared: dict[str, _Shared] = {}
        self._intervals = _Intervals({})
        self._held: dict[int, list[int]] = {}  # allocation start -> [size, reference count]
        self._allocations: dict[int, list[tuple[int, int]]] = {}  # entry id -> counted blocks
        self._used = 0
        # entry id -> memory intervals, to find the entries an in-place change reaches
        self._footprints: dict[int, list[tuple[int, int]]] = {}
        # torch bumps a tensor's version counter on every in-place change: shared tensors
        # (parameters of a shared model, say) must keep theirs
        self._shared_versions: dict[str, list[tuple[Any, int]]] = {}

    # -- shared objects -----------------------------------------------------------------------
    def share(self, name: str, obj: Any) -> None:
        """Make ``obj`` reachable as ``StoreRef(name)``, protected against modification."""
        if not isinstance(name, str) or not name:
            raise ValueError("a shared object needs a non-empty name")
        value = _protected(obj, 0)
        self._shared[name] = _Shared(value, list(_footprint(value)))
        self._intervals = _Intervals(self._shared)
        self._shared_versions[name] = [(t, t._version) for t in _contents(value)
                                       if _is_tensor(t)]

    def unshare(self, name: str) -> None:
        if self._shared.pop(name, None) is None:
            raise KeyError(f"nothing is shared under the name {name!r}")
        self._intervals = _Intervals(self._shared)
        self._shared_versions.pop(name, None)

    def shared_modified(self) -> str:
        """The name of a shared object whose tensors changed in place, or "" (then the
        worker must be restarted from the owner's originals)."""
        for name, versions in self._shared_versions.items():
            if any(tensor._version != version for tensor, version in versions):
                return name
        return ""

    # -- operations ---------------------------------------------------------------------------
    def execute(self, op: Op) -> OpFailed | None:
        """Run ``op`` and store its result; a failure is stored and returned, never raised."""
        if op.result in self._entries:
            # Keep the existing object: a reused id must not replace (or free) it.
            failure = _Failure("DuplicateId", f"object #{op.result} already exists")
            return self._report(op, op.name, failure, store=False)
        call = _Call(op.name)
        try:
            value, lineage = self._run(op, call)
            self._taint_written_inputs(call)
            value = _materialized(value)
            self._protect_result(value)
            nbytes = self._account(op.result, value)
        except PolicyViolation as exc:
            return self._report(op, call.operation, _Failure("PolicyViolation", str(exc)),
                                policy=True, sources=call.sources)
        except _Failure as failure:
            return self._report(op, call.operation, failure, sources=call.sources)
        except Exception as exc:  # noqa: BLE001 - any error of the op is reported, never raised
            # Only the type crosses the channel: the text may hold data values.
            raised = _Failure(type(exc).__name__, error=f"{type(exc).__name__}: {exc}")
            return self._report(op, call.operation, raised, sources=call.sources)
        self._entries[op.result] = Entry(value, lineage, nbytes, sources=frozenset(call.sources))
        self._footprints[op.result] = list(_footprint(value))
        self._events.executed(call.operation, lineage, op.result)
        return None

    def free(self, ids: Iterable[int]) -> None:
        """Drop entries (unknown ids are ignored: the researcher may free a failed op twice)."""
        for entry_id in ids:
            if self._entries.pop(entry_id, None) is not None:
                self._release(entry_id)
                self._footprints.pop(entry_id, None)

    def lookup(self, ref: PointerRef | StoreRef) -> Entry:
        """The entry behind a reference, for requests; a failed entry is returned as is."""
        if isinstance(ref, StoreRef):
            shared = self._shared.get(ref.name)
            if shared is None:
                raise RequestError(f"nothing is shared under the name {ref.name!r}")
            size = sum(_buffer_sizes(shared.value).values())
            return Entry(shared.value, ref.name, size, sources=frozenset([ref.name]))
        entry = self._entries.get(ref.id)
        if entry is None:
            raise RequestError(f"object #{ref.id} does not exist (never created, or freed)")
        return entry

    def used_bytes(self) -> int:
        return self._used

    def object_count(self) -> int:
        return len(self._entries)

    # -- running one op -----------------------------------------------------------------------
    def _run(self, op: Op, call: _Call) -> tuple[Any, str]:
        if op.kind == "function":
            if op.target is not None:
                raise _Failure("BadOperation", "a function call takes no target")
            fn = self.allowlist.resolve_function(op.name)
            args, kwargs, arguments = self._arguments(op, call, torch=op.name.startswith("torch."))
            self.allowlist.check_arguments(fn, args, kwargs, qualname=op.name)
            subscript = len(op.args) == 2 and isinstance(op.args[1], tuple) and len(op.args[1])
            text = lineage.function(op.name, arguments, subscript=bool(subscript))
            return fn(*args, **kwargs), text

        if op.target is None:
            raise _Failure("BadOperation", f"a {op.kind} operation needs a target")
        target, target_text = self._input(op.target, call)
        family = self.allowlist.family(target)
        torch = family in _TORCH_FAMILIES

        if op.kind == "getattr":
            call.operation = f"{family}.{op.name}" if family else op.name
            if op.args or op.kwargs:
                raise _Failure("BadOperation", "reading an attribute takes no arguments")
            value = self.allowlist.resolve_attribute(target, op.name)
            return value, lineage.attribute(target_text, op.name)

        if op.kind == "method":
            call.operation = f"{family}.{op.name}" if family else op.name
            mutating = self.allowlist.is_mutating(target, op.name)
            touched = self._touched(target, op.name) if mutating else []
            shared = self._shared_name(op.target, touched)
            method = self.allowlist.resolve_method(target, op.name, shared=shared or False)
            args, kwargs, arguments = self._arguments(op, call, torch=torch)
            self.allowlist.check_arguments(method, args, kwargs)
            text = lineage.method(target_text, op.name, arguments)
            value = method(*args, **kwargs)
            if mutating:
                shown = ", ".join(arguments)
                note = f"{call.operation}({shown if len(shown) <= 40 else '…'})"
                self._note_modified(op.target, touched, note, call.sources)
            return value, text

        call.operation = "Module.forward" if family == "Module" else "call"
        mutating = self.allowlist.call_mutates(target)
        touched = list(_footprint(target)) if mutating else []
        self.allowlist.check_call(target, shared=self._shared_name(op.target, touched) or False)
        args, kwargs, arguments = self._arguments(op, call, torch=True)
        self.allowlist.check_arguments(target, args, kwargs)
        text = lineage.call(target_text, arguments)
        value = target(*args, **kwargs)
        if mutating:
            self._note_modified(op.target, touched, f"{call.operation}()", call.sources)
        return value, text

    def _arguments(
        self, op: Op, call: _Call, *, torch: bool
    ) -> tuple[tuple[Any, ...], dict[str, Any], list[str]]:
        """Resolve references in the arguments; also return them as lineage text."""
        args, texts = [], []
        for arg in op.args:
            value, text = self._resolve(arg, call, torch, 0)
            args.append(value)
            texts.append(text)
        kwargs = {}
        for key, arg in op.kwargs.items():
            check_name(key, dotted=False)
            kwargs[key], text = self._resolve(arg, call, torch, 0)
            texts.append(f"{key}={text}")
        return tuple(args), kwargs, texts

    def _resolve(self, value: Any, call: _Call, torch: bool, depth: int) -> tuple[Any, str]:
        if depth > MAX_VALUE_DEPTH:
            raise _Failure("BadArgument", "arguments are nested too deeply")
        if isinstance(value, (PointerRef, StoreRef)):
            item, text = self._input(value, call)
            if isinstance(value, PointerRef):
                call.note_input(value, item)
            if isinstance(item, np.ndarray) and item.flags.writeable:
                item = item.view()  # an argument is read, never written (positional out)
                item.flags.writeable = False
            return item, text
        if isinstance(value, DTypeRef):
            return self.allowlist.resolve_dtype(value.name, torch=torch), value.name
        if isinstance(value, (list, tuple)):
            items = [self._resolve(v, call, torch, depth + 1) for v in value]
            resolved = [v for v, _ in items]
            texts = [t for _, t in items]
            if isinstance(value, list):
                return resolved, lineage.sequence(texts, "[", "]")
            return tuple(resolved), lineage.sequence(texts, "(", ")")
        if isinstance(value, dict):
            resolved_dict, texts = {}, []
            for key, item in value.items():
                resolved_dict[key], text = self._resolve(item, call, torch, depth + 1)
                texts.append(f"{key!r}: {text}")
            return resolved_dict, lineage.sequence(texts, "{", "}")
        if isinstance(value, slice):
            parts = [self._resolve(v, call, torch, depth + 1) for v in (value.start, value.stop,
                                                                  value.step)]
            start, stop, step = (None if v is None else t for v, t in parts)
            return slice(*(v for v, _ in parts)), lineage.slice_text(start, stop, step)
        if value is None or value is Ellipsis or isinstance(
            value, (bool, int, float, complex, str, bytes)
        ):
            return value, lineage.scalar(value)
        if isinstance(value, np.ndarray):
            return value, lineage.array("array", str(value.dtype), value.shape)
        if _is_tensor(value):
            return value, lineage.array("tensor", str(value.dtype), value.shape)
        raise _Failure("BadArgument", f"cannot use a {type(value).__name__} as an argument")

    def _input(self, ref: PointerRef | StoreRef, call: _Call) -> tuple[Any, str]:
        """The value and lineage of a reference, refusing unknown and failed objects."""
        if isinstance(ref, StoreRef):
            shared = self._shared.get(ref.name)
            if shared is None:
                raise _Failure("UnknownObject", f"nothing is shared under the name {ref.name!r}")
            call.sources.add(ref.name)
            return shared.value, ref.name
        entry = self._entries.get(ref.id)
        if entry is None:
            raise _Failure("UnknownObject", f"object #{ref.id} does not exist "
                           "(never created, already freed, or from another session)")
        if entry.failure is not None:
            call.sources |= entry.sources  # what failed came from these
            upstream = entry.failure
            cause = upstream.detail if upstream.error_type == "UpstreamFailure" else (
                f"{upstream.operation} failed with {upstream.error_type}"
            )
            raise _Failure("UpstreamFailure", f"input #{ref.id} is unusable: {cause}")
        call.sources |= entry.sources
        return entry.value, entry.lineage

    # -- protecting shared data ---------------------------------------------------------------
    def _taint_written_inputs(self, call: _Call) -> None:
        """An argument changed in place (``F.embedding(..., max_norm=)`` renormalizes its
        weight, say) now depends on everything the call read: record it, on every entry
        sharing its memory, so provenance stays complete."""
        for ref, tensor, version in call.versions:
            if tensor._version != version:
                self._note_modified(ref, list(_footprint(tensor)), call.operation, call.sources)
    def _touched(self, target: Any, name: str) -> list[tuple[int, int]]:
        """Memory a mutating method changes: ``backward`` writes the grads of the graph's
        leaves, a module or optimizer changes its parameters, anything else itself."""
        if name == "backward" and _is_tensor(target):
            return [span for leaf in _graph_leaves(target) for span in _footprint(leaf)]
        return list(_footprint(target))

    def _shared_name(
        self, ref: PointerRef | StoreRef, touched: list[tuple[int, int]]
    ) -> str | None:
        if isinstance(ref, StoreRef):
            return ref.name
        for start, size in touched:
            name = self._intervals.find(start, size)
            if name is not None:
                return name
        return None

    def _protect_result(self, value: Any) -> None:
        """A numpy view of shared memory (e.g. ``t.numpy()`` of a shared tensor) becomes
        read-only, so no positional ``out`` argument can write through it."""
        for item in _contents(value):
            if isinstance(item, np.ndarray) and item.flags.writeable:
                block = _allocation(item)
                if block is not None and self._intervals.find(*block) is not None:
                    item.flags.writeable = False

    def _note_modified(
        self, ref: PointerRef | StoreRef, touched: list[tuple[int, int]], operation: str,
        sources: set[str],
    ) -> None:
        """Note the in-place change in the lineage of every entry it reached (a trained
        model's lineage names the training steps and their data), and recount their memory."""
        note = f"{operation} using {', '.join(sorted(sources))}" if sources else operation
        touched_index = _Intervals({"": _Shared(None, touched)})
        for entry_id, entry in self._entries.items():
            reached = (isinstance(ref, PointerRef) and ref.id == entry_id) or any(
                touched_index.find(start, size) is not None
                for start, size in self._footprints.get(entry_id, ())
            )
            if reached:
                entry.note_modification(note, frozenset(sources))
                self._release(entry_id)
                entry.nbytes = self._account(entry_id, entry.value, enforce=False)
                self._footprints[entry_id] = list(_footprint(entry.value))

    # -- memory budget ------------------------------------------------------------------------
    def _account(self, entry_id: int, value: Any, *, enforce: bool = True) -> int:
        """Count ``value``'s memory blocks (each once, however many entries share it) and
        refuse a result that would exceed the budget. Shared memory is not counted."""
        blocks = {
            start: size for start, size in _buffer_sizes(value).items()
            if self._intervals.find(start, size) is None
        }
        added = sum(size for start, size in blocks.items() if start not in self._held)
        if enforce and self.memory_budget is not None and self._used + added > self.memory_budget:
            raise _Failure(
                "BudgetExceeded",
                "the result would exceed the owner's memory budget for this session; "
                "free pointers you no longer need",
                # sizes of results depend on data: only the owner's log has them
                error=f"the result needs {added} more bytes; {self._used} of "
                f"{self.memory_budget} bytes are in use",
            )
        for start, size in blocks.items():
            held = self._held.setdefault(start, [0, 0])
            if size > held[0]:
                self._used += size - held[0]
                held[0] = size
            held[1] += 1
        self._allocations[entry_id] = list(blocks.items())
        return sum(blocks.values())

    def _release(self, entry_id: int) -> None:
        for start, _ in self._allocations.pop(entry_id, []):
            held = self._held[start]
            held[1] -= 1
            if held[1] == 0:
                self._used -= held[0]
                del self._held[start]

    # -- reporting ----------------------------------------------------------------------------
    def _report(
        self, op: Op, operation: str, failure: _Failure, *, policy: bool = False,
        store: bool = True, sources: set[str] | None = None,
    ) -> OpFailed:
        """Record a failed op. Its entry keeps every shared source the inputs had (a failure
        is data derived from them) and a lineage naming the operation."""
        message = OpFailed(
            result=op.result, operation=operation, error_type=failure.error_type,
            policy=policy, detail=failure.detail,
        )
        if store:
            error = failure.error if failure.error.startswith(failure.error_type) else (
                f"{failure.error_type}: {failure.error}")
            self._entries[op.result] = Entry(None, f"{operation}(…)", 0, message, error,
                                             sources=frozenset(sources or ()))
        if policy:
            self._events.refused(operation, failure.detail, op.result)
        else:
            self._events.failed(operation, failure.error_type, failure.error, op.result)
        return message


@dataclass
class _Call:
    operation: str  # what failure reports name: refined once the target's family is known
    sources: set[str] = field(default_factory=set)  # shared objects among the inputs
    # tensors among the arguments with their version counters before the call
    versions: list[tuple[PointerRef, Any, int]] = field(default_factory=list)

    def note_input(self, ref: PointerRef, value: Any) -> None:
        items = value if isinstance(value, (list, tuple)) else (value,)
        for item in items:
            if _is_tensor(item):
                self.versions.append((ref, item, item._version))


# -- memory: what an object holds -----------------------------------------------------------
def _torch() -> Any:
    """torch if the process already imported it; an owner sharing only numpy never does."""
    return sys.modules.get("torch")


def _is_tensor(value: Any) -> bool:
    torch = _torch()
    return torch is not None and isinstance(value, torch.Tensor)


def _protected(value: Any, depth: int) -> Any:
    """The form in which an object is shared: read-only numpy views, detached tensors."""
    if depth > MAX_VALUE_DEPTH:
        raise ValueError("the shared object is nested too deeply")
    if isinstance(value, np.ndarray):
        view = value.view()
        view.flags.writeable = False
        return view
    if _is_tensor(value):
        return value.detach()  # same memory, but no gradient can flow into the owner's tensor
    if type(value) is list:
        return [_protected(v, depth + 1) for v in value]
    if type(value) is tuple:
        return tuple(_protected(v, depth + 1) for v in value)
    if type(value) is dict:
        return {k: _protected(v, depth + 1) for k, v in value.items()}
    return value


def _materialized(value: Any) -> Any:
    """Generators and dict views become lists, so ``model.parameters()`` can be used twice."""
    if isinstance(value, (types.GeneratorType, KeysView, ValuesView, ItemsView)):
        return list(value)
    return value


def _contents(value: Any) -> Iterator[Any]:
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


def _allocation(item: Any) -> tuple[int, int] | None:
    """(start address, size) of the memory block behind an array or tensor."""
    if isinstance(item, np.ndarray):
        root = item
        while isinstance(root.base, np.ndarray):
            root = root.base
        if _is_tensor(root.base):  # tensor.numpy() aliases the tensor's storage
            return _allocation(root.base)
        if root.nbytes == 0:
            return None
        low, high = byte_bounds(root)
        return int(low), int(high - low)
    if _is_tensor(item):
        try:
            storage = item.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse and other storage-less layouts
            return None
        size = storage.nbytes()
        return (int(storage.data_ptr()), int(size)) if size else None
    return None


def _footprint(value: Any) -> Iterator[tuple[int, int]]:
    """Memory intervals that identify ``value``: data blocks, plus the objects themselves
    for modules and optimizers (whose mode and settings are state too)."""
    for item in _contents(value):
        block = _allocation(item)
        if block is not None:
            yield block
        elif not isinstance(item, np.ndarray) and not _is_tensor(item):
            yield id(item), 1  # a live object's address is inside no other live block


def _buffer_sizes(value: Any) -> dict[int, int]:
    """Data blocks held by ``value``, start -> size, for the memory budget."""
    blocks: dict[int, int] = {}
    for item in _contents(value):
        block = _allocation(item)
        if block is not None:
            blocks[block[0]] = max(block[1], blocks.get(block[0], 0))
    return blocks


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
