"""The worker process: where the researcher's operations run, away from the owner's kernel.

The owner's session starts one worker (``python -m duet.worker``, a fresh interpreter, never a
fork of a kernel with threads) and talks to it over two socket pairs (``duet.ipc``). The worker
holds the executor and everything it computed; shared arrays and tensors are mapped from
sealed, read-only memory the kernel filled, so no write from here can reach the owner's data.
A crash, an out-of-memory kill or a cancel ends only this process; the kernel restarts it.

Two threads: the main thread reads work off the work socket itself and executes it in arrival
order (one thread woken per request, not a reader and then the main thread); a control thread
reads the control socket, answers ``release``/``drop`` of frozen request values at once (so an
approval is never stuck behind a long computation) and exits the process when the kernel goes
away. The settings (allowlist, limits) are the first frame on the work socket.

Limits, applied before any researcher operation runs: address space (``RLIMIT_AS``), no file
can grow (``RLIMIT_FSIZE`` 0, so nothing is written to disk), no core dumps, the first choice
of the kernel's out-of-memory killer, working directory ``/``.
"""

from __future__ import annotations

import mmap
import os
import pickle
import resource
import signal
import socket
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from . import checks, ipc, lineage, tables
from . import protocol as p
from .dp import Derivations, DPQuery, is_dp_op, parse_op
from .dp_train import TRAIN_OP, TrainingRefused, TrainJob, parse_train_op, prepare
from .errors import DuetError, PolicyViolation, ProtocolError, RequestError
from .executor import Executor, ExecutorEvents
from .policy import Allowlist
from .snapshot import Frozen, freeze

__all__ = ["INLINE_BYTES", "main"]

# Frozen values up to this size travel with their snapshot: an auto-approved small result
# then needs no second round trip to the worker.
INLINE_BYTES = 256 * 1024
_MAX_FROM_KERNEL = 1 << 40
_MAX_CONTROL = 1 << 16  # release and drop name a request, nothing more
_TEXT = 10_000  # characters of a failure's text shown to the owner (ipc.Text allows 20,000)


class _Events(ExecutorEvents):
    """Collects the executor's audit events for the kernel, one batch at a time."""

    def __init__(self) -> None:
        self.buffer: list[tuple[str, dict[str, Any]]] = []

    def record(self, event: str, **fields: Any) -> None:
        self.buffer.append((event, fields))

    def take(self) -> list[tuple[str, dict[str, Any]]]:
        events, self.buffer = self.buffer, []
        return events


class Worker:
    def __init__(self, sock: socket.socket, settings: dict[str, Any]) -> None:
        self._sock = sock
        self._send_lock = threading.Lock()
        self._frozen: dict[str, Frozen] = {}
        self._frozen_lock = threading.Lock()
        self._frozen_bytes = 0  # held for undecided requests: counted against the budget
        self._events = _Events()
        allowlist = Allowlist.from_spec(settings["allowlist"])
        self._executor = Executor(allowlist, memory_budget=settings.get("memory_budget"),
                                  events=self._events)
        self._mappings: dict[str, mmap.mmap] = {}
        self._check_settings: dict[str, checks.CheckSettings] = {}
        self._history = checks.History()  # record sets of earlier requests (differencing)
        # DP-shared names -> the owner's declaration; which objects derive from them
        self._dp_specs: dict[str, dict[str, Any]] = {}
        self._derivations = Derivations(self._dp_specs)
        self._dp_ids: set[int] = set()  # objects that are DP queries: only a request reads them

    # -- plumbing ---------------------------------------------------------------------------
    def send(self, header: bytes, buffers: list[memoryview] | tuple[()] = ()) -> None:
        with self._send_lock:
            ipc.send_frame(self._sock, header, buffers)

    def serve_control(self, control: socket.socket) -> None:
        """Control thread: serve frozen values at once, even inside a long operation."""
        try:
            reader = ipc.FrameReader(control, _MAX_CONTROL)
            while (frame := reader.read()) is not None:
                message = ipc.unpack(frame[0])
                if message["type"] == "release":
                    self._release(message["request_id"])
                else:
                    self._take_frozen(message["request_id"])
        finally:
            os._exit(0)  # the kernel is gone: stop at once, even inside a long operation

    def run(self) -> None:
        """Main thread: read work and do it, in order, until the kernel goes away."""
        handlers: dict[str, Callable[[dict[str, Any], list[memoryview]], None]] = {
            "peer": self._peer, "share": self._share, "unshare": self._unshare,
            "allowlist": self._allowlist, "usage": self._usage,
        }
        self.send(ipc.pack("ready", pid=os.getpid()))
        reader = ipc.FrameReader(self._sock, _MAX_FROM_KERNEL)
        while (frame := reader.read()) is not None:
            header, buffers = frame
            message = ipc.unpack(header)
            handlers[message["type"]](message, buffers)

    def _done(self, shared_modified: str = "") -> None:
        self.send(ipc.pack("done", events=self._events.take(), shared_modified=shared_modified))

    # -- work from the kernel -----------------------------------------------------------------
    def _share(self, message: dict[str, Any], buffers: list[memoryview]) -> None:
        name = message["name"]
        if message["form"] == "memory":
            value = self._map(name, message)
        elif message["form"] == "table":
            value = self._map_table(name, message, pickle.loads(buffers[0]))
        else:  # anything else the owner shared, pickled by the owner's own kernel
            value = pickle.loads(buffers[0])
        self._executor.share(name, value)
        self._check_settings[name] = checks.CheckSettings(**message.get("checks", {}))
        if message.get("dp") is not None:
            self._dp_specs[name] = message["dp"]
        else:
            self._dp_specs.pop(name, None)
        self._done()

    def _map(self, name: str, message: dict[str, Any]) -> Any:
        """An array or tensor over the kernel's sealed memory, mapped read-only."""
        dtype = np.dtype(message["dtype"])
        shape = tuple(message["shape"])
        if message["nbytes"] == 0:
            array = np.empty(shape, dtype)
            array.flags.writeable = False
        else:
            mapping = self._map_sealed(name, message)
            array = np.frombuffer(mapping, dtype=dtype).reshape(shape)
        if message["kind"] == "numpy":
            return array
        import torch

        with warnings.catch_warnings():  # torch warns that the memory is not writable: good
            warnings.simplefilter("ignore", UserWarning)
            tensor = torch.from_numpy(array)
        torch_dtype = message.get("torch_dtype")
        return tensor.view(getattr(torch, torch_dtype)) if torch_dtype else tensor

    def _map_sealed(self, name: str, message: dict[str, Any]) -> mmap.mmap:
        """The kernel's sealed memory behind share ``name``, mapped read-only and kept."""
        fd = os.open(message["path"], os.O_RDONLY)
        try:
            mapping = mmap.mmap(fd, message["nbytes"], prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        self._mappings[name] = mapping
        return mapping

    def _map_table(self, name: str, message: dict[str, Any], parts: dict[str, Any]) -> Any:
        """A table whose numeric columns lie in the kernel's sealed memory, mapped read-only."""
        numeric: dict[int, np.ndarray] = {}
        mapping = None
        if message["nbytes"]:
            mapping = self._map_sealed(name, message)
        for column in message["columns"]:
            dtype = np.dtype(column["dtype"])
            if mapping is None or column["length"] == 0:
                array = np.empty(column["length"], dtype)
                array.flags.writeable = False
            else:
                array = np.frombuffer(mapping, dtype, column["length"], column["offset"])
            numeric[column["position"]] = array
        return tables.assemble(numeric, parts)

    def _unshare(self, message: dict[str, Any], buffers: list[memoryview]) -> None:
        self._executor.unshare(message["name"])
        self._dp_specs.pop(message["name"], None)
        self._done()

    def _allowlist(self, message: dict[str, Any], buffers: list[memoryview]) -> None:
        self._executor.allowlist = Allowlist.from_spec(message["spec"])
        self._done()

    def _usage(self, message: dict[str, Any], buffers: list[memoryview]) -> None:
        self.send(ipc.pack("usage", objects=self._executor.object_count(),
                           used_bytes=self._executor.used_bytes(),
                           frozen=len(self._frozen)))

    def _peer(self, message: dict[str, Any], buffers: list[memoryview]) -> None:
        """A message from the researcher, exactly as it arrived (the kernel validated it, so
        it is not validated twice)."""
        decoded = p.decode(bytes(buffers[0]), buffers[1:], validated=True)
        if isinstance(decoded, p.Ops):
            refused: dict[int, str] = dict(message.get("refused", ()))  # by the kernel
            for index, op in enumerate(decoded.ops):
                if index in refused:
                    self._executor.refused_elsewhere(op, refused[index])
                elif is_dp_op(op):
                    self._dp_op(op)
                elif self._uses_dp_query(op):
                    self._executor.refuse(op, _DP_ONLY_GET)
                elif self._executor.execute(op) is None and self._unmodified(op):
                    self._derivations.observe(op)
            self._done(self._executor.shared_modified())
        elif isinstance(decoded, p.Free):
            self._executor.free(decoded.ids)
            self._derivations.forget(decoded.ids)
            self._dp_ids.difference_update(decoded.ids)
            self._done()
        elif isinstance(decoded, p.RequestValue):
            self._snapshot(decoded)
        else:
            raise ProtocolError(f"the worker does not handle {decoded.type!r}")

    def _uses_dp_query(self, op: p.Op) -> bool:
        return any(isinstance(ref, p.PointerRef) and ref.id in self._dp_ids
                   for ref in _references(op))

    def _unmodified(self, op: p.Op) -> bool:
        """Whether no object the op read was changed in place (``put``, ``sort``, through a
        view ...): a changed object may hold any rows, so it and what it makes lose their
        DP mark."""
        changed = []
        for ref in (op.target, *op.args, *op.kwargs.values()):
            if isinstance(ref, p.PointerRef):
                try:
                    if self._executor.lookup(ref).modified_by:
                        changed.append(ref.id)
                except DuetError:
                    changed.append(ref.id)
        self._derivations.forget(changed)
        return not changed

    def _sources_of(self, op: p.Op) -> frozenset[str]:
        found: set[str] = set()
        for ref in (*op.args, *op.kwargs.values()):
            if isinstance(ref, (p.PointerRef, p.StoreRef)):
                try:
                    found |= self._executor.lookup(ref).sources
                except DuetError:  # names nothing (never made, or freed): no source to carry,
                    continue       # and the op is refused whatever it named
        return frozenset(found)

    def _dp_op(self, op: p.Op) -> None:
        """A ``dp.*`` statistic: checked like the kernel checked it, then kept as a lazy
        ``DPQuery`` over a private copy of its input. Nothing is computed until the kernel,
        having reserved the cost, asks for the value."""
        if op.name == TRAIN_OP:
            self._train_op(op)
            return
        try:
            spec = parse_op(op, self._derivations)
        except PolicyViolation as exc:  # a failure derived from its inputs: their sources
            self._executor.refuse(op, str(exc), self._sources_of(op))
            return
        sources = frozenset({spec.source})
        inputs: list[Any] = []
        for object_id in (spec.input_id, spec.by_id):
            if object_id is None:
                inputs.append(None)
                continue
            ref = (p.PointerRef(object_id) if isinstance(object_id, int)
                   else p.StoreRef(object_id))
            try:
                entry = self._executor.lookup(ref)
            except DuetError as exc:
                self._executor.refuse(op, str(exc), sources, error_type="UnknownObject")
                return
            if entry.failure is not None or entry.modified_by:
                why = "failed" if entry.failure is not None else "was modified in place"
                self._executor.refuse(op, f"its input #{object_id} {why}", sources,
                                      error_type="UpstreamFailure")
                return
            inputs.append(entry)
        try:
            query = DPQuery(spec, inputs[0].value, None if inputs[1] is None
                            else inputs[1].value)
        except Exception as exc:  # noqa: BLE001 - e.g. a column of text: the owner reads why
            self._executor.refuse(op, f"{type(exc).__name__}: {exc}", sources,
                                  error_type=type(exc).__name__)
            return
        texts = [inputs[0].lineage, f"epsilon={spec.epsilon:g}"]
        if inputs[1] is not None:
            texts.append(f"by={inputs[1].lineage}")
        text = lineage.function(op.name, texts)
        held = [a for a in (query.values, query.keys) if a is not None]
        if self._executor.adopt(op, query, text, sources, held=held) is None:
            self._dp_ids.add(op.result)

    def _train_op(self, op: p.Op) -> None:
        """``dp.train`` (duet.dp_train): checked like the kernel checked it, then prepared
        on private copies of the model and the data (Opacus' fixes, the row-mixing probe,
        the noise multiplier) and kept as a ``TrainJob``. Nothing trains until the kernel,
        with the start approved, asks for the result."""
        try:
            spec = parse_train_op(op, self._derivations)
        except PolicyViolation as exc:
            self._executor.refuse(op, str(exc))
            return
        sources = frozenset({spec.source})
        entries = []
        for ref in (spec.model, spec.data, spec.labels):
            try:
                entry = self._executor.lookup(ref)
            except DuetError as exc:
                self._executor.refuse(op, str(exc), sources, error_type="UnknownObject")
                return
            if entry.failure is not None:
                self._executor.refuse(op, f"an input of {TRAIN_OP} failed", sources,
                                      error_type="UpstreamFailure")
                return
            entries.append(entry)
        model, data, labels = entries
        if model.sources:  # its weights would leave without DP
            self._executor.refuse(
                op, f"{TRAIN_OP}: the model already depends on shared data "
                f"({', '.join(sorted(model.sources))}); start from a fresh model", sources)
            return
        if data.modified_by or labels.modified_by:
            self._executor.refuse(op, f"an input of {TRAIN_OP} was modified in place", sources,
                                  error_type="UpstreamFailure")
            return
        try:
            prepared = prepare(model.value, data.value, labels.value, spec.request,
                               spec.settings)
        except TrainingRefused as exc:  # the owner reads why, with the request
            self._executor.refuse(op, str(exc), sources, error_type="TrainingRefused")
            return
        job = TrainJob(spec, prepared, op.result)
        text = lineage.function(op.name, [model.lineage, f"data={data.lineage}",
                                          f"labels={labels.lineage}",
                                          f"epsilon={spec.request.epsilon:g}"])
        self._executor.adopt(op, job, text, sources, held=job.held())

    # -- requests -----------------------------------------------------------------------------
    def _snapshot(self, request: p.RequestValue) -> None:
        """Freeze the requested value now; the owner decides on exactly these bytes."""
        pointer_id = request.target.id if isinstance(request.target, p.PointerRef) else None
        try:
            entry = self._executor.lookup(request.target)
        except DuetError as exc:
            self.send(ipc.pack("request_failed", request_id=request.request_id,
                               reason=str(exc)))
            return
        common = {"request_id": request.request_id, "pointer_id": pointer_id,
                  "lineage": entry.lineage, "sources": sorted(entry.sources)}
        empty = {"type": "failed", "elements": 0, "nbytes": 0}
        failed_checks = [c.to_dict() for c in checks.failed_value()]
        if entry.failure is not None:
            failure = entry.failure
            self.send(ipc.pack("snapshot", **common, summary=empty, checks=failed_checks,
                               preview=f"failed: {entry.error or failure.error_type}"[:_TEXT],
                               failed=(entry.error or failure.error_type)[:_TEXT],
                               operation=failure.operation, error_type=failure.error_type))
            return
        value, quote = entry.value, None
        if isinstance(value, TrainJob):  # the start (its plan), or the training itself
            try:
                if pointer_id != value.object_id:
                    raise RequestError("a training job is asked for through its own pointer "
                                       "only")
                value, quote = value.next_value()
            except Exception as exc:  # noqa: BLE001 - reported to the owner, like any failure
                problem = f"{type(exc).__name__}: {exc}"[:_TEXT]
                self.send(ipc.pack("snapshot", **common, summary=empty, checks=failed_checks,
                                   preview=f"failed: {problem}", failed=problem,
                                   operation=TRAIN_OP, error_type=type(exc).__name__))
                return
        if isinstance(value, DPQuery):  # the kernel reserved its cost: draw the noise now
            try:
                value, released = value.evaluate()
                quote = vars(released)
            except Exception as exc:  # noqa: BLE001 - reported to the owner, like any failure
                problem = f"{type(exc).__name__}: {exc}"
                self.send(ipc.pack("snapshot", **common, summary=empty, checks=failed_checks,
                                   preview=f"failed: {problem}", failed=problem,
                                   operation=f"dp.{value.spec.statistic}",
                                   error_type=type(exc).__name__))
                return
        budget = self._executor.memory_budget
        with self._frozen_lock:
            room = None if budget is None else (
                budget - self._executor.used_bytes() - self._frozen_bytes)
        try:
            frozen = freeze(request.request_id, value, room)
        except Exception as exc:  # noqa: BLE001 - the worker outlives any value it holds
            # Whether a value can be sent can depend on the data (a list too long for a
            # message, say): like any failure, it is the owner's to release.
            module = type(value).__module__
            hint = ("a model's weights leave as model.state_dict()"
                    if module.startswith("torch.nn") else
                    "a fitted estimator's results leave as its attributes, e.g. model.coef_"
                    if module.startswith("sklearn") else "")
            problem = f"{type(exc).__name__}: {exc}" + (f"; {hint}" if hint else "")
            self.send(ipc.pack("snapshot", **common, summary=empty, checks=failed_checks,
                               preview=f"failed: cannot be sent: {problem}",
                               failed=f"cannot be sent: {problem}", operation="sending the value",
                               error_type=type(exc).__name__, hint=hint))
            return
        inline = frozen.nbytes <= INLINE_BYTES
        if not inline:
            with self._frozen_lock:
                replaced = self._frozen.get(request.request_id)  # the kernel never reuses an
                if replaced is not None:  # id; should it, the count must still be right
                    self._frozen_bytes -= replaced.nbytes
                self._frozen[request.request_id] = frozen
                self._frozen_bytes += frozen.nbytes
        if quote is not None:  # noise, not output checking, protects a DP release
            found = checks.dp_release(quote["statistic"], quote["epsilon"], quote["delta"])
        else:
            found = checks.evaluate(request.request_id, entry.provenance, entry.sources,
                                    elements=frozen.summary.elements,
                                    settings=self._check_settings, history=self._history)
        header = ipc.pack("snapshot", **common, summary=frozen.summary.model_dump(),
                          preview=frozen.preview, sha256=frozen.sha256, nbytes=frozen.nbytes,
                          inline=inline, dp=quote,
                          checks=[c.to_dict() for c in found])
        self.send(header, [memoryview(frozen.header), *frozen.buffers] if inline else ())

    def _take_frozen(self, request_id: str) -> Frozen | None:
        with self._frozen_lock:
            frozen = self._frozen.pop(request_id, None)
            if frozen is not None:
                self._frozen_bytes -= frozen.nbytes
        return frozen

    def _release(self, request_id: str) -> None:
        frozen = self._take_frozen(request_id)
        if frozen is None:
            self.send(ipc.pack("request_failed", request_id=request_id,
                               reason="the frozen value is gone (withdrawn or never made)"))
            return
        self.send(ipc.pack("released", request_id=request_id),
                  [memoryview(frozen.header), *frozen.buffers])


_DP_ONLY_GET = ("a DP statistic is not an input to other operations: ask for its value with "
                ".get(reason)")


def _references(op: p.Op) -> list[Any]:
    """The references among an op's target and arguments, one level of nesting deep (a
    list or dict of pointers is how several objects are passed)."""
    found: list[Any] = []
    for value in (op.target, *op.args, *op.kwargs.values()):
        items = value if isinstance(value, (list, tuple)) else (
            list(value.values()) if isinstance(value, dict) else [value])
        found.extend(items)
    return found


def _limit(memory: int | None) -> None:
    """OS limits, before any researcher operation runs."""
    if memory:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails, no kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    try:
        with open("/proc/self/oom_score_adj", "w") as adj:
            adj.write("1000")
    except OSError:
        pass
    os.chdir("/")


def main(argv: list[str]) -> None:
    sock = socket.socket(fileno=int(argv[1]))
    control = socket.socket(fileno=int(argv[2]))
    first = ipc.recv_frame(sock, _MAX_FROM_KERNEL)
    if first is None:  # the kernel went away before it said what to run
        os._exit(0)
    settings = ipc.unpack(first[0])
    tempfile.gettempdir()  # found (and cached) while files may still be written: torch asks
    if settings.get("torch"):
        import torch  # noqa: F401  (imported before the limits: it maps a lot of memory)
    # joblib (scikit-learn's) finds it cannot make process semaphores here, and says so
    warnings.filterwarnings("ignore", message=".*joblib will operate in serial mode")
    _limit(settings.get("memory"))
    worker = Worker(sock, settings)
    threading.Thread(target=worker.serve_control, args=(control,), name="duet-worker-control",
                     daemon=True).start()
    try:
        worker.run()
    except OSError:  # the kernel went away mid-answer: nobody is left to tell
        pass
    os._exit(0)  # the kernel is gone: nothing here outlives it


if __name__ == "__main__":
    import faulthandler

    faulthandler.enable()  # a crash prints where it happened on the owner's terminal
    main(sys.argv)
