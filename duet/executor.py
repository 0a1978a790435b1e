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

import sys
import types
from collections.abc import ItemsView, Iterable, KeysView, ValuesView
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import lineage, provenance
from .errors import PolicyViolation, RequestError
from .lineage import MAX_LINEAGE
from .memory import (
    Footprints,
    Intervals,
    MemoryBudget,
    OverBudget,
    Shared,
    allocation,
    buffer_sizes,
    contents,
    footprint,
    inventory,
    is_tensor,
    protected,
    touched_by,
)
from .policy import Allowlist, check_name
from .protocol import MAX_VALUE_DEPTH, DTypeRef, Op, OpFailed, PointerRef, StoreRef
from .provenance import EMPTY, Provenance

__all__ = ["MAX_LINEAGE", "Entry", "Executor", "ExecutorEvents"]

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
    # which records of each source the value depends on, and how (duet.provenance)
    provenance: Provenance = field(default_factory=dict)
    # the memory blocks found at the last count, and their sizes as counted against the
    # budget: an in-place change that leaves both alike needs no recount
    footprint: list[tuple[int, int]] = field(default_factory=list)
    counted: dict[int, int] = field(default_factory=dict)
    origin: str = field(init=False)

    def __post_init__(self) -> None:
        self.origin = self.lineage

    def note_modification(self, note: str, sources: frozenset[str], by: Provenance = EMPTY,
                          seen: dict[tuple[int, bool], tuple[Provenance, Provenance]]
                          | None = None) -> None:
        """Record an in-place change, so that a model trained by ``opt.step()`` says so, and
        on which shared data, in its lineage. The operations are kept in ``modified_by``; the
        lineage stays short enough to read in an approval table. A model, its parameters or
        an optimizer learn from the records ``by`` names; anything else changed in place
        loses its row alignment (``provenance.modified``).

        ``seen``: the provenances already worked out for this same change, by the identity
        of the one they replaced. A step reaches the model, its layers, its parameter list
        and its optimizer, which share one provenance object after their first step: it is
        worked out once, and they keep sharing it."""
        if by:
            trained = _learns(self.value)
            key = (id(self.provenance), trained)
            known = seen.get(key) if seen is not None else None
            if known is None:
                known = (self.provenance, provenance.modified(self.provenance, by,
                                                              trained=trained))
                if seen is not None:
                    seen[key] = known  # the old one is kept alive with it: its id stays its own
            self.provenance = known[1]
        if note in self.modified_by and sources <= self.sources:
            return  # every training step says the same: the lineage would not change
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
        self._shared: dict[str, Shared] = {}
        self._intervals = Intervals({})
        self._budget = MemoryBudget(memory_budget)
        # entry id -> memory intervals, to find the entries an in-place change reaches
        self._footprints = Footprints()
        # torch bumps a tensor's version counter on every in-place change: shared tensors
        # (parameters of a shared model, say) must keep theirs
        self._shared_versions: dict[str, list[tuple[Any, int]]] = {}
        self._shared_provenance: dict[str, Provenance] = {}

    # -- shared objects -----------------------------------------------------------------------
    def share(self, name: str, obj: Any) -> None:
        """Make ``obj`` reachable as ``StoreRef(name)``, protected against modification."""
        if not isinstance(name, str) or not name:
            raise ValueError("a shared object needs a non-empty name")
        value = protected(obj, 0)
        self._shared[name] = Shared(value, list(footprint(value)))
        self._shared_provenance[name] = provenance.of_shared(name, value)
        self._intervals = Intervals(self._shared)
        self._shared_versions[name] = [(t, t._version) for t in contents(value)
                                       if is_tensor(t)]

    def unshare(self, name: str) -> None:
        if self._shared.pop(name, None) is None:
            raise KeyError(f"nothing is shared under the name {name!r}")
        self._shared_provenance.pop(name, None)
        self._intervals = Intervals(self._shared)
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
            return self._report(op, _Call(op.name), failure, store=False)
        call = _Call(op.name)
        try:
            value = self._run(op, call)
            self._taint_written_inputs(call)
            value = _materialized(value)
            held = inventory(value)  # one walk: protection, budget and footprint
            self._protect_result(held.arrays)
            derived = call.derive(value)
            # the record numbers provenance keeps count too (a mean over a selection holds
            # them after the selection is freed)
            counted = _with_blocks(held.sizes, _array_blocks(provenance.arrays(derived)))
            nbytes = self._account(op.result, value, counted)
        except PolicyViolation as exc:
            return self._report(op, call, _Failure("PolicyViolation", str(exc)), policy=True)
        except _Failure as failure:
            return self._report(op, call, failure)
        except Exception as exc:  # noqa: BLE001 - any error of the op is reported, never raised
            # Only the type crosses the channel: the text may hold data values.
            raised = _Failure(type(exc).__name__, error=f"{type(exc).__name__}: {exc}")
            return self._report(op, call, raised)
        self._entries[op.result] = Entry(value, call.text, nbytes,
                                         sources=frozenset(call.sources),
                                         provenance=derived, footprint=held.footprint,
                                         counted=counted)
        self._footprints.record(op.result, held.footprint)
        self._events.executed(call.operation, call.text, op.result)
        return None

    def adopt(self, op: Op, value: Any, text: str, sources: frozenset[str],
              held: Any = None) -> OpFailed | None:
        """Store ``value``, made for ``op`` outside the allowlist by the worker's own code
        (a DP query), like an executed op; ``held`` is what counts against the memory
        budget (default: the value)."""
        call = _Call(op.name, set(sources), text)
        if op.result in self._entries:
            return self._report(op, call, _Failure("DuplicateId", f"object #{op.result} "
                                                   "already exists"), store=False)
        try:
            nbytes = self._account(op.result, value if held is None else held)
        except _Failure as failure:
            return self._report(op, call, failure)
        self._entries[op.result] = Entry(value, text, nbytes, sources=frozenset(sources))
        self._events.executed(op.name, text, op.result)
        return None

    def refuse(self, op: Op, detail: str, sources: frozenset[str] = frozenset(), *,
               error_type: str = "PolicyViolation") -> OpFailed:
        """Store ``op`` as refused (or failed, for another ``error_type``) with ``detail``."""
        call = _Call(op.name, set(sources), f"{op.name}(…)")
        return self._report(op, call, _Failure(error_type, detail),
                            policy=error_type == "PolicyViolation")

    def refused_elsewhere(self, op: Op, detail: str) -> None:
        """Hold the refusal of an op the owner's kernel refused (and answered, and audited):
        it never runs, and what refers to it fails as it would here. An id in use keeps its
        object (the kernel refused the op for reusing it)."""
        if op.result not in self._entries:
            self._report(op, _Call(op.name), _Failure("PolicyViolation", detail),
                         policy=True, audited=False)

    def free(self, ids: Iterable[int]) -> None:
        """Drop entries (unknown ids are ignored: the researcher may free a failed op twice)."""
        for entry_id in ids:
            if self._entries.pop(entry_id, None) is not None:
                self._budget.release(entry_id)
                self._footprints.drop(entry_id)

    def lookup(self, ref: PointerRef | StoreRef) -> Entry:
        """The entry behind a reference, for requests; a failed entry is returned as is."""
        if isinstance(ref, StoreRef):
            shared = self._shared.get(ref.name)
            if shared is None:
                raise RequestError(f"nothing is shared under the name {ref.name!r}")
            size = sum(buffer_sizes(shared.value).values())
            return Entry(shared.value, ref.name, size, sources=frozenset([ref.name]),
                         provenance=self._shared_provenance[ref.name])
        entry = self._entries.get(ref.id)
        if entry is None:
            raise RequestError(f"object #{ref.id} does not exist (never created, or freed)")
        return entry

    def used_bytes(self) -> int:
        return self._budget.used

    def object_count(self) -> int:
        return len(self._entries)

    # -- running one op -----------------------------------------------------------------------
    def _run(self, op: Op, call: _Call) -> Any:
        """Run one op; ``call`` collects its sources and lineage text on the way."""
        if op.kind == "function":
            return self._run_function(op, call)
        if op.target is None:
            raise _Failure("BadOperation", f"a {op.kind} operation needs a target")
        target, target_text = self._input(op.target, call)
        family = self.allowlist.family(target)
        run = {"getattr": self._run_getattr, "method": self._run_method,
               "call": self._run_call}[op.kind]
        return run(op, call, target, target_text, family)

    def _run_function(self, op: Op, call: _Call) -> Any:
        if op.target is not None:
            raise _Failure("BadOperation", "a function call takes no target")
        fn = self.allowlist.resolve_function(op.name)
        args, kwargs, arguments = self._arguments(op, call, torch=op.name.startswith("torch."))
        subscript = len(op.args) == 2 and isinstance(op.args[1], tuple) and len(op.args[1])
        call.text = lineage.function(op.name, arguments, subscript=bool(subscript))
        self.allowlist.check_arguments(fn, args, kwargs, qualname=op.name)
        call.inputs = provenance.Call(op.name, args, kwargs, method=False)
        return fn(*args, **kwargs)

    def _run_getattr(self, op: Op, call: _Call, target: Any, target_text: str,
                     family: str | None) -> Any:
        call.operation = f"{family}.{op.name}" if family else op.name
        call.text = lineage.attribute(target_text, op.name)
        if op.args or op.kwargs:
            raise _Failure("BadOperation", "reading an attribute takes no arguments")
        call.inputs = provenance.Call(call.operation, (target,), {}, method=True)
        return self.allowlist.resolve_attribute(target, op.name)

    def _run_method(self, op: Op, call: _Call, target: Any, target_text: str,
                    family: str | None) -> Any:
        assert op.target is not None
        call.operation = f"{family}.{op.name}" if family else op.name
        mutating = self.allowlist.is_mutating(target, op.name)
        touched = touched_by(target, op.name) if mutating else []
        shared = self._shared_name(op.target, touched)
        method = self.allowlist.resolve_method(target, op.name, shared=shared or False)
        args, kwargs, arguments = self._arguments(op, call, torch=family in _TORCH_FAMILIES)
        call.text = lineage.method(target_text, op.name, arguments)
        self.allowlist.check_arguments(method, args, kwargs)
        call.inputs = provenance.Call(call.operation, (target, *args), kwargs, method=True)
        value = method(*args, **kwargs)
        if mutating:
            shown = ", ".join(arguments)
            note = f"{call.operation}({shown if len(shown) <= 40 else '…'})"
            # ``backward`` writes the grads of the graph's leaves, never the loss itself
            self._note_modified(op.target, touched, note, call.sources, call.steering(),
                                target_changed=op.name != "backward")
        return value

    def _run_call(self, op: Op, call: _Call, target: Any, target_text: str,
                  family: str | None) -> Any:
        assert op.target is not None
        call.operation = "Module.forward" if family == "Module" else "call"
        mutating = self.allowlist.call_mutates(target)
        touched = list(footprint(target)) if mutating else []
        self.allowlist.check_call(target, shared=self._shared_name(op.target, touched) or False)
        args, kwargs, arguments = self._arguments(op, call, torch=True)
        call.text = lineage.call(target_text, arguments)
        self.allowlist.check_arguments(target, args, kwargs)
        operation = "Module.forward" if family == "Module" else "call"
        call.inputs = provenance.Call(operation, (target, *args), kwargs, method=True)
        value = target(*args, **kwargs)
        if mutating:
            self._note_modified(op.target, touched, f"{call.operation}()", call.sources,
                                call.provenance())
        return value

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
                original = item
                item = item.view()  # an argument is read, never written (positional out)
                item.flags.writeable = False
                call.alias(original, item)
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
        if is_tensor(value):
            return value, lineage.array("tensor", str(value.dtype), value.shape)
        raise _Failure("BadArgument", f"cannot use a {type(value).__name__} as an argument")

    def _input(self, ref: PointerRef | StoreRef, call: _Call) -> tuple[Any, str]:
        """The value and lineage of a reference, refusing unknown and failed objects."""
        if isinstance(ref, StoreRef):
            shared = self._shared.get(ref.name)
            if shared is None:
                raise _Failure("UnknownObject", f"nothing is shared under the name {ref.name!r}")
            call.sources.add(ref.name)
            call.note_provenance(shared.value, self._shared_provenance[ref.name])
            return shared.value, ref.name
        entry = self._entries.get(ref.id)
        if entry is None:
            raise _Failure("UnknownObject", f"object #{ref.id} does not exist "
                           "(never created, already freed, or from another session)")
        if entry.failure is not None:
            call.sources |= entry.sources  # what failed came from these
            upstream = entry.failure
            # the root cause only: a chain of 2,000 failed ops must not make a 2,000-deep text
            cause = upstream.detail.split(": ", 1)[-1] if (
                upstream.error_type == "UpstreamFailure") else (
                f"{upstream.operation} failed with {upstream.error_type}")
            raise _Failure("UpstreamFailure", f"input #{ref.id} is unusable: {cause}")
        call.sources |= entry.sources
        call.note_provenance(entry.value, entry.provenance)
        return entry.value, entry.lineage

    # -- protecting shared data ---------------------------------------------------------------
    def _taint_written_inputs(self, call: _Call) -> None:
        """An argument changed in place (``F.embedding(..., max_norm=)`` renormalizes its
        weight, say) now depends on everything the call read: record it, on every entry
        sharing its memory, so provenance stays complete."""
        for ref, tensor, version in call.versions:
            if tensor._version != version:
                self._note_modified(ref, list(footprint(tensor)), call.operation, call.sources,
                                    call.provenance())
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

    def _protect_result(self, arrays: list[np.ndarray]) -> None:
        """A numpy view of shared memory (e.g. ``t.numpy()`` of a shared tensor) among a
        result's ``arrays`` becomes read-only, so no positional ``out`` argument can write
        through it."""
        for item in arrays:
            if item.flags.writeable:
                block = allocation(item)
                if block is not None and self._intervals.find(*block) is not None:
                    item.flags.writeable = False

    def _note_modified(
        self, ref: PointerRef | StoreRef, touched: list[tuple[int, int]], operation: str,
        sources: set[str], by: Provenance = EMPTY, *, target_changed: bool = True,
    ) -> None:
        """Note the in-place change in the lineage of every entry it reached (a trained
        model's lineage names the training steps and their data), and recount their memory.
        ``ref`` (the target) is among them when ``target_changed``, whatever its memory."""
        note = f"{operation} using {', '.join(sorted(sources))}" if sources else operation
        reached = self._footprints.reached_by(touched)
        if target_changed and isinstance(ref, PointerRef):
            reached.add(ref.id)
        seen: dict[tuple[int, bool], tuple[Provenance, Provenance]] = {}
        kept: dict[int, dict[int, int]] = {}  # array blocks by provenance, shared ones once
        changed_sources = frozenset(sources)
        for entry_id in sorted(reached):
            entry = self._entries.get(entry_id)
            if entry is None:
                continue
            entry.note_modification(note, changed_sources, by, seen)
            held = inventory(entry.value)
            blocks = kept.get(id(entry.provenance))
            if blocks is None:
                blocks = kept[id(entry.provenance)] = _array_blocks(
                    provenance.arrays(entry.provenance))
            counted = _with_blocks(held.sizes, blocks)
            if held.footprint == entry.footprint and counted == entry.counted:
                continue  # the same blocks (``opt.step()`` of SGD): nothing to recount
            self._budget.release(entry_id)
            entry.nbytes = self._budget.account(entry_id, entry.value, self._intervals,
                                                enforce=False, sizes=counted)
            entry.footprint, entry.counted = held.footprint, counted
            self._footprints.record(entry_id, held.footprint)

    def _account(self, entry_id: int, value: Any, sizes: dict[int, int] | None = None) -> int:
        """``sizes``: what to count for ``value`` when known (its ``buffer_sizes`` with its
        provenance's arrays), so the value is not walked twice."""
        try:
            return self._budget.account(entry_id, value, self._intervals, sizes=sizes)
        except OverBudget as exc:
            raise _Failure(
                "BudgetExceeded",
                "the result would exceed the owner's memory budget for this session; "
                "free pointers you no longer need",
                error=str(exc),  # sizes of results depend on data: only the owner's log
            ) from None

    # -- reporting ----------------------------------------------------------------------------
    def _report(
        self, op: Op, call: _Call, failure: _Failure, *, policy: bool = False,
        store: bool = True, audited: bool = True,
    ) -> OpFailed:
        """Record a failed op. Its entry keeps every shared source the inputs had (a failure
        is data derived from them) and a lineage naming the operation. ``audited=False``:
        whoever refused it wrote the audit row already."""
        operation = call.operation
        message = OpFailed(
            result=op.result, operation=operation, error_type=failure.error_type,
            policy=policy, detail=failure.detail,
        )
        if store:
            error = failure.error if failure.error.startswith(failure.error_type) else (
                f"{failure.error_type}: {failure.error}")
            self._entries[op.result] = Entry(None, call.text or f"{operation}(…)", 0, message,
                                             error, sources=frozenset(call.sources))
        if audited and policy:
            self._events.refused(operation, failure.detail, op.result)
        elif audited:
            self._events.failed(operation, failure.error_type, failure.error, op.result)
        return message


@dataclass
class _Call:
    operation: str  # what failure reports name: refined once the target's family is known
    sources: set[str] = field(default_factory=set)  # shared objects among the inputs
    text: str = ""  # the lineage, once the arguments are known
    # tensors among the arguments with their version counters before the call
    versions: list[tuple[PointerRef, Any, int]] = field(default_factory=list)
    # the resolved inputs, and the provenance of each input object (by identity: the
    # objects are alive for the whole call)
    inputs: provenance.Call | None = None
    provenances: dict[int, Provenance] = field(default_factory=dict)

    def note_provenance(self, value: Any, found: Provenance) -> None:
        known = self.provenances.get(id(value))
        self.provenances[id(value)] = found if known is None or known is found else (
            provenance.merge_all([known, found]))

    def alias(self, original: Any, view: Any) -> None:
        found = self.provenances.get(id(original))
        if found is not None:
            self.provenances[id(view)] = found

    def provenance(self) -> Provenance:
        """Everything the call read, merged (what an in-place change learns from)."""
        return provenance.merge_all(list(self.provenances.values()))

    def steering(self) -> Provenance:
        """What a method changing its object in place learns: everything it read, and
        whether the researcher's own per-record arrays steered it (``provenance.steered``)."""
        read = self.provenance()
        if self.inputs is None or not read:
            return read
        provenances = self.provenances
        return provenance.steered(self.inputs, read, lambda item: provenances.get(id(item)))

    def derive(self, value: Any) -> Provenance:
        if self.inputs is None or not self.provenances:
            return EMPTY
        provenances = self.provenances
        return provenance.derive(self.inputs, value, lambda item: provenances.get(id(item)))

    def note_input(self, ref: PointerRef, value: Any) -> None:
        items = value if isinstance(value, (list, tuple)) else (value,)
        for item in items:
            if is_tensor(item):
                self.versions.append((ref, item, item._version))


def _learns(value: Any) -> bool:
    """Whether changing ``value`` in place is learning: a torch module, an optimizer,
    trainable tensors (alone or in a list or dict), a scikit-learn estimator."""
    torch = sys.modules.get("torch")
    items = list(value.values()) if isinstance(value, dict) else (
        value if isinstance(value, (list, tuple)) else [value])
    return bool(items) and all(
        type(item).__module__.startswith("sklearn.")
        or (torch is not None and (
            isinstance(item, (torch.nn.Module, torch.optim.Optimizer))
            or (isinstance(item, torch.Tensor) and item.requires_grad)))
        for item in items)


def _array_blocks(arrays: list[np.ndarray]) -> dict[int, int]:
    """The memory blocks of the arrays a provenance keeps (record numbers, per-cell evidence):
    they count against the budget too (a mean over a selection keeps them after the selection
    is freed; a model keeps the set of records it learned)."""
    blocks: dict[int, int] = {}
    for array in arrays:
        block = allocation(array)
        if block is not None:
            blocks[block[0]] = max(block[1], blocks.get(block[0], 0))
    return blocks


def _with_blocks(sizes: dict[int, int], blocks: dict[int, int]) -> dict[int, int]:
    """A value's blocks (``sizes``) with ``blocks`` kept alongside it, each counted once."""
    if not blocks:
        return sizes
    combined = dict(sizes)
    for start, size in blocks.items():
        combined[start] = max(size, combined.get(start, 0))
    return combined


def _materialized(value: Any) -> Any:
    """Generators and dict views become lists, so ``model.parameters()`` can be used twice."""
    if isinstance(value, (types.GeneratorType, KeysView, ValuesView, ItemsView)):
        return list(value)
    return value
