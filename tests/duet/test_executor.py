"""The owner-side executor, driven with real ``Op`` messages (no transport)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from duet.errors import RequestError
from duet.executor import MAX_LINEAGE, Executor, ExecutorEvents
from duet.policy import Allowlist
from duet.protocol import DTypeRef, Op, PointerRef, StoreRef
from tests.helpers.executor import Driver

AGES = np.array([25.0, 31.0, 47.0, 19.0, 38.0, 52.0])


class Recorder(ExecutorEvents):
    """Keeps every executor event, as the worker does for the audit log."""

    def __init__(self, sink: Any) -> None:
        self.sink = sink

    def record(self, event: str, **fields: Any) -> None:
        self.sink(event, fields)


@pytest.fixture
def events() -> list[tuple[str, dict[str, Any]]]:
    return []


@pytest.fixture
def executor(events: list[tuple[str, dict[str, Any]]]) -> Executor:
    ex = Executor(Allowlist.default(), events=Recorder(lambda event, f: events.append((event, f))))
    ex.share("ages", AGES)
    ex.share("weights", torch.arange(6.0).reshape(2, 3))
    ex.share("labels", torch.tensor([0, 2, 1, 98765]))
    ex.share("model", torch.nn.Linear(3, 2))
    ex.share("table", {"a": np.arange(3), "b": [1, 2]})
    return ex


@pytest.fixture
def r(executor: Executor) -> Driver:
    return Driver(executor)


ages, weights, labels, model = (StoreRef(n) for n in ("ages", "weights", "labels", "model"))


# -- results equal the local computation -----------------------------------------------------
def test_elementwise_and_reductions_equal_numpy(r: Driver) -> None:
    doubled = r.fn("operator.mul", ages, 2)
    mask = r.fn("operator.gt", ages, 30)
    selected = r.fn("operator.getitem", doubled, mask)
    np.testing.assert_array_equal(r.value(selected), (AGES * 2)[AGES > 30])
    assert r.value(r.fn("numpy.mean", selected)) == np.mean((AGES * 2)[AGES > 30])
    assert r.value(r.method(ages, "std", ddof=1)) == AGES.std(ddof=1)
    assert r.value(r.fn("numpy.percentile", ages, [25, 75])).tolist() == (
        np.percentile(AGES, [25, 75]).tolist()
    )
    np.testing.assert_allclose(r.value(r.fn("numpy.sqrt", r.fn("operator.invert", mask))),
                               np.sqrt(~(AGES > 30)))
    counts, edges = r.value(r.fn("numpy.histogram", ages, bins=3))
    expected_counts, expected_edges = np.histogram(AGES, bins=3)
    np.testing.assert_array_equal(counts, expected_counts)
    np.testing.assert_array_equal(edges, expected_edges)
    assert r.value(r.method(ages, "astype", DTypeRef("int32"))).dtype == np.int32
    assert r.value(r.fn("operator.getitem", ages, (slice(1, None, 2),))).tolist() == [31, 19, 52]
    assert r.value(r.method(r.fn("operator.getitem", StoreRef("table"), "b"), "count", 2)) == 1


def test_tensor_ops_equal_torch(r: Driver) -> None:
    w = torch.arange(6.0).reshape(2, 3)
    product = r.fn("operator.matmul", weights, r.attr(weights, "T"))
    torch.testing.assert_close(r.value(product), w @ w.T)
    softmax = r.method(weights, "softmax", dim=1)
    torch.testing.assert_close(r.value(softmax), w.softmax(dim=1))
    as_float64 = r.method(weights, "to", DTypeRef("float64"))  # a torch dtype for Tensor.to
    assert r.value(as_float64).dtype is torch.float64
    summed = r.fn("torch.sum", weights, dim=0)
    torch.testing.assert_close(r.value(summed), w.sum(dim=0))
    assert r.value(r.method(r.fn("torch.max", weights), "item")) == 5.0
    indices = r.attr(r.fn("torch.max", weights, dim=1), "indices")
    assert r.value(indices).tolist() == [2, 2]


# -- lineage -----------------------------------------------------------------------------------
def test_lineage_reads_as_the_expression_from_shared_objects(r: Driver) -> None:
    doubled = r.fn("operator.mul", ages, 2)
    mask = r.fn("operator.gt", ages, 30)
    mean = r.fn("numpy.mean", r.fn("operator.getitem", doubled, mask))
    assert r.lineage(mean) == "mean((ages * 2)[(ages > 30)])"
    assert r.lineage(r.method(ages, "sum", axis=0)) == "ages.sum(axis=0)"
    assert r.lineage(r.fn("operator.neg", ages)) == "(-ages)"
    assert r.lineage(r.fn("operator.getitem", weights, (0, slice(1, 3)))) == "weights[0, 1:3]"
    assert r.lineage(r.fn("operator.getitem", ages, slice(None, None, -1))) == "ages[::-1]"
    assert r.lineage(r.fn("numpy.linalg.norm", ages)) == "linalg.norm(ages)"
    assert r.lineage(r.method(ages, "astype", DTypeRef("float32"))) == "ages.astype(float32)"
    sent = np.zeros((3, 4), dtype=np.float32)
    assert r.lineage(r.fn("numpy.add", sent, 1)) == "add(array(float32[3,4]), 1)"
    assert r.lineage(r.fn("torch.as_tensor", torch.ones(2, 2))) == "as_tensor(tensor(float32[2,2]))"
    assert r.lineage(r.fn("numpy.array", list(range(20)))) == (
        "array([0, 1, 2, 3, 4, 5, 6, 7, …(+12)])"
    )
    linear = r.fn("torch.nn.Linear", 4, 2, bias=False)
    assert r.lineage(linear) == "Linear(4, 2, bias=False)"
    grad = r.attr(r.attr(model, "weight"), "grad")
    assert r.lineage(grad) == "model.weight.grad"


def test_lineage_is_capped(r: Driver) -> None:
    ref: Any = ages
    for _ in range(500):
        ref = r.fn("operator.add", ref, 1)
    lineage = r.lineage(ref)
    assert len(lineage) == MAX_LINEAGE
    assert lineage.endswith("…")


def test_in_place_changes_are_written_into_the_lineage(r: Driver) -> None:
    copy = r.method(ages, "copy")
    r.method(copy, "sort")
    r.method(copy, "sort")
    r.method(copy, "fill", 0)
    assert r.lineage(copy) == "ages.copy() [modified in place using ages]"
    assert r.entry(copy).modified_by == ["ndarray.sort() using ages", "ndarray.fill(0) using ages"]
    assert r.entry(copy).sources == {"ages"}
    assert r.value(copy).tolist() == [0.0] * len(AGES)


def test_executed_ops_are_reported(r: Driver, events: list[tuple[str, dict[str, Any]]]) -> None:
    ref = r.fn("numpy.sum", ages)
    assert events[-1] == (
        "op_executed", {"operation": "numpy.sum", "lineage": "sum(ages)", "pointer_id": ref.id}
    )


# -- forbidden attempts: refused, nothing executed, nothing written -------------------------
def forbidden_attempts(path: str) -> list[tuple[str, str, Any, tuple[Any, ...], dict[str, Any]]]:
    """(kind, name, target, args, kwargs) a researcher might try; ``path`` is in the cwd."""
    return [
        ("getattr", "__class__", ages, (), {}),
        ("method", "__reduce__", ages, (), {}),
        ("method", "__reduce_ex__", ages, (2,), {}),
        ("getattr", "_private", ages, (), {}),
        ("getattr", "__array_interface__", ages, (), {}),
        ("function", "numpy.load", None, (path,), {}),
        ("function", "numpy.save", None, (path, ages), {}),
        ("function", "torch.load", None, (path,), {}),
        ("function", "torch.save", None, (weights, path), {}),
        ("function", "numpy.lib", None, (), {}),
        ("function", "numpy.lib.format.open_memmap", None, (path,),
         {"mode": "w+", "shape": [3]}),
        ("method", "tofile", ages, (path,), {}),
        ("method", "dump", ages, (path,), {}),
        ("getattr", "ctypes", ages, (), {}),
        ("function", "numpy.fromfile", None, (path,), {}),
        ("function", "numpy.memmap", None, (path,), {"mode": "w+", "shape": [3]}),
        ("function", "builtins.eval", None, ("open('x', 'w')",), {}),
        ("function", "builtins.open", None, (path, "w"), {}),
        ("function", "os.system", None, (f"touch {path}",), {}),
        ("function", "subprocess.run", None, (["touch", path],), {}),
        ("function", "getattr", None, (ages, "__class__"), {}),
        ("function", "torch.hub.load", None, ("pytorch/vision", "resnet18"), {}),
        ("method", "apply", model, (), {}),
        ("method", "register_hook", weights, (), {}),
        ("method", "storage", weights, (), {}),
        ("method", "untyped_storage", weights, (), {}),
        ("function", "numpy.\uff4coad", None, (path,), {}),  # fullwidth l
        ("function", "numpy..save", None, (path, ages), {}),
        ("function", "numpy.save.", None, (path, ages), {}),
        ("function", "numpy.mean.__globals__", None, (), {}),
        ("method", "sum.__self__", ages, (), {}),
        ("method", "sort", ages, (), {}),  # mutating a shared array
        ("method", "add_", weights, (1,), {}),  # mutating a shared tensor
        ("method", "requires_grad_", weights, (), {}),
        ("method", "eval", model, (), {}),  # changes the shared module's mode
        ("method", "zero_grad", model, (), {}),
        ("function", "numpy.add", None, (ages, 1), {"out": ages}),
        ("function", "torch.nn.functional.relu", None, (weights,), {"inplace": True}),
        ("function", "torch.nn.functional.relu", None, (weights, True), {}),
        ("function", "numpy.mean", None, (ages,), {"_hidden": 1}),
        ("function", "operator.attrgetter", None, ("__class__",), {}),
        ("function", "copy.deepcopy.__globals__", None, (), {}),
        ("call", "forward", ages, (), {}),  # only modules can be called
        ("call", "__call__", StoreRef("table"), (), {}),
    ]


@pytest.mark.parametrize("index", range(len(forbidden_attempts(""))))
def test_forbidden_attempts_are_refused(
    executor: Executor, events: list[tuple[str, dict[str, Any]]], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, index: int,
) -> None:
    monkeypatch.chdir(tmp_path)
    path = str(tmp_path / "pwned.bin")
    kind, name, target, args, kwargs = forbidden_attempts(path)[index]
    before = (AGES.copy(), executor.lookup(weights).value.clone(),
              executor.lookup(model).value.weight.detach().clone())

    failure = executor.execute(Op(result=1, kind=kind, name=name, target=target, args=list(args),
                                  kwargs=kwargs))

    assert failure is not None
    assert failure.policy and failure.error_type == "PolicyViolation", failure
    assert failure.detail
    assert events[-1][0] == "op_refused"
    assert executor.lookup(PointerRef(1)).failure == failure
    assert list(tmp_path.iterdir()) == []
    assert not os.path.exists(path)
    shared_model = executor.lookup(model).value
    assert shared_model.training
    assert shared_model.weight.grad is None
    np.testing.assert_array_equal(executor.lookup(ages).value, before[0])
    assert torch.equal(executor.lookup(weights).value, before[1])
    assert torch.equal(shared_model.weight, before[2])
    assert not executor.lookup(weights).value.requires_grad


def test_aliases_of_shared_data_cannot_be_modified(r: Driver, executor: Executor) -> None:
    view = r.fn("operator.getitem", weights, slice(0, 1))
    r.method(view, "zero_")
    assert r.last_failure is not None and "shared object 'weights'" in r.last_failure.detail

    as_numpy = r.method(weights, "numpy")  # a numpy view of the shared tensor's memory
    assert not r.value(as_numpy).flags.writeable
    r.method(as_numpy, "fill", 0)
    assert r.last_failure is not None and r.last_failure.policy
    r.method(as_numpy, "sum", 0, None, r.value(as_numpy))  # positional out=
    assert r.last_failure is not None and r.last_failure.error_type == "ValueError"

    tensor = r.fn("torch.from_numpy", ages)  # copies: the shared array is read-only
    r.method(tensor, "zero_")
    assert r.last_failure is None
    assert r.value(r.fn("numpy.ravel", ages)).flags.writeable is False

    params = r.method(model, "parameters")
    optimizer = r.fn("torch.optim.SGD", params, lr=1.0)
    output = r.call(model, r.fn("torch.ones", 1, 3))
    r.method(r.method(output, "sum"), "backward")
    assert r.last_failure is not None and "shared object 'model'" in r.last_failure.detail
    r.method(optimizer, "step")
    assert r.last_failure is not None and r.last_failure.policy
    wrapper = r.fn("torch.nn.Sequential", model, r.fn("torch.nn.ReLU"))
    r.method(wrapper, "train", False)
    assert r.last_failure is not None and r.last_failure.policy

    assert torch.equal(executor.lookup(weights).value, torch.arange(6.0).reshape(2, 3))
    assert executor.lookup(model).value.weight.grad is None
    assert executor.lookup(model).value.training
    assert executor.lookup(ages).value.tolist() == AGES.tolist()


def test_a_copy_of_a_shared_model_can_be_fine_tuned(r: Driver, executor: Executor) -> None:
    original = executor.lookup(model).value.weight.detach().clone()
    tuned = r.fn("copy.deepcopy", model)
    optimizer = r.fn("torch.optim.SGD", r.method(tuned, "parameters"), lr=0.5)
    loss = r.method(r.call(tuned, r.fn("torch.ones", 4, 3)), "sum")
    r.method(loss, "backward")
    r.method(optimizer, "step")
    assert r.last_failure is None
    assert not torch.equal(r.value(tuned).weight, original)
    assert torch.equal(executor.lookup(model).value.weight, original)


# -- bad references ----------------------------------------------------------------------------
def test_forged_ids_get_clear_failures(r: Driver, executor: Executor) -> None:
    first = r.fn("numpy.sum", ages)
    r.fn("numpy.mean", PointerRef(424242))
    assert r.last_failure is not None and r.last_failure.error_type == "UnknownObject"
    assert "424242" in r.last_failure.detail
    r.method(PointerRef(31337), "sum")
    assert r.last_failure is not None and r.last_failure.error_type == "UnknownObject"
    r.fn("numpy.mean", StoreRef("salaries"))
    assert r.last_failure is not None and r.last_failure.error_type == "UnknownObject"

    reused = executor.execute(Op(result=first.id, kind="function", name="numpy.zeros", args=[3]))
    assert reused is not None and reused.error_type == "DuplicateId"
    assert r.value(first) == AGES.sum()  # the existing object is untouched

    other = Executor(Allowlist.default())  # a pointer from another session means nothing here
    assert other.execute(Op(result=5, kind="function", name="numpy.mean",
                            args=[first])) is not None
    with pytest.raises(RequestError, match="does not exist"):
        executor.lookup(PointerRef(999))
    with pytest.raises(RequestError):
        executor.lookup(StoreRef("salaries"))

    executor.free([first.id, 123456])  # unknown ids are ignored
    with pytest.raises(RequestError):
        executor.lookup(first)


def test_bad_operation_shapes_fail_cleanly(r: Driver) -> None:
    r.op("getattr", "shape", ages, 1)
    assert r.last_failure is not None and r.last_failure.error_type == "BadOperation"
    r.op("method", "sum", None)
    assert r.last_failure is not None and r.last_failure.error_type == "BadOperation"
    r.op("function", "numpy.sum", ages)
    assert r.last_failure is not None and r.last_failure.error_type == "BadOperation"
    nested: Any = 1
    for _ in range(40):
        nested = [nested]
    r.fn("numpy.array", nested)
    assert r.last_failure is not None and r.last_failure.error_type == "BadArgument"


def test_owner_side_exception_text_does_not_leak(
    r: Driver, events: list[tuple[str, dict[str, Any]]]
) -> None:
    logits = r.fn("torch.zeros", 4, 3)
    loss = r.fn("torch.nn.functional.cross_entropy", logits, labels)  # target 98765 is invalid
    failure = r.last_failure
    assert failure is not None and not failure.policy
    assert failure.operation == "torch.nn.functional.cross_entropy"
    assert failure.error_type == "IndexError"
    assert "98765" not in failure.model_dump_json()
    # the owner keeps the full text for the audit log
    assert "98765" in r.executor.lookup(loss).error
    assert events[-1][0] == "op_failed" and "98765" in events[-1][1]["error"]


def test_failures_propagate_downstream(r: Driver) -> None:
    bad = r.fn("numpy.reshape", ages, [7])
    assert r.last_failure is not None and r.last_failure.error_type == "ValueError"
    assert r.last_failure.detail == ""
    child = r.fn("operator.add", bad, 1)
    assert r.last_failure is not None and r.last_failure.error_type == "UpstreamFailure"
    assert "numpy.reshape failed with ValueError" in r.last_failure.detail
    r.method(child, "sum")
    assert r.last_failure is not None and r.last_failure.error_type == "UpstreamFailure"
    assert "numpy.reshape" in r.last_failure.detail  # names the root cause, not the middle
    assert r.executor.lookup(child).failure is not None


# -- memory budget -----------------------------------------------------------------------------
def test_memory_budget(events: list[tuple[str, dict[str, Any]]]) -> None:
    executor = Executor(Allowlist.default(), memory_budget=1000,
                        events=Recorder(lambda e, f: events.append((e, f))))
    executor.share("big", np.zeros(10_000))  # shared data does not count
    r = Driver(executor)
    first = r.fn("numpy.zeros", 100)
    assert executor.used_bytes() == 800
    view = r.fn("operator.getitem", first, slice(0, 50))
    assert r.last_failure is None and executor.used_bytes() == 800  # a view holds no new memory
    r.fn("operator.getitem", StoreRef("big"), slice(None))
    assert r.last_failure is None and executor.used_bytes() == 800

    second = r.fn("numpy.ones", 50)
    assert r.last_failure is not None and r.last_failure.error_type == "BudgetExceeded"
    assert "400" not in r.last_failure.detail  # sizes of results are not told
    assert events[-1][0] == "op_failed" and "400 more bytes" in events[-1][1]["error"]
    assert executor.used_bytes() == 800

    executor.free([first.id])
    assert executor.used_bytes() == 800  # the view still holds the block
    executor.free([view.id, second.id])
    assert executor.used_bytes() == 0
    r.fn("numpy.ones", 50)
    assert r.last_failure is None and executor.used_bytes() == 400


def test_module_parameters_count_towards_the_budget() -> None:
    executor = Executor(Allowlist.default(), memory_budget=10_000)
    r = Driver(executor)
    layer = r.fn("torch.nn.Linear", 10, 10)
    assert executor.used_bytes() == (100 + 10) * 4
    r.method(layer, "parameters")
    assert executor.used_bytes() == (100 + 10) * 4
    r.fn("torch.nn.Linear", 100, 100)
    assert r.last_failure is not None and r.last_failure.error_type == "BudgetExceeded"


# -- training ----------------------------------------------------------------------------------
def test_twenty_step_training_loop_reduces_the_loss(executor: Executor) -> None:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(200, 4, generator=generator)
    classes = (features[:, 0] + features[:, 1] > 0).long()
    executor.share("X", features)
    executor.share("y", classes)
    r = Driver(executor)
    X, y = StoreRef("X"), StoreRef("y")

    r.fn("torch.manual_seed", 0)
    net = r.fn("torch.nn.Sequential", r.fn("torch.nn.Linear", 4, 16), r.fn("torch.nn.ReLU"),
               r.fn("torch.nn.Linear", 16, 2))
    optimizer = r.fn("torch.optim.SGD", r.method(net, "parameters"), lr=0.5)
    losses = []
    for _ in range(20):
        r.method(optimizer, "zero_grad")
        out = r.call(net, X)
        loss = r.fn("torch.nn.functional.cross_entropy", out, y)
        r.method(loss, "backward")
        r.method(optimizer, "step")
        assert r.last_failure is None
        losses.append(r.value(loss).item())
        r.executor.free([out.id, loss.id])

    assert losses[-1] < 0.7 * losses[0]
    assert r.lineage(net) == (
        "Sequential(Linear(4, 16), ReLU(), Linear(16, 2)) [modified in place using X, y]"
    )
    assert r.entry(net).modified_by == [
        "Optimizer.zero_grad()", "Tensor.backward() using X, y", "Optimizer.step() using X, y",
        "Optimizer.zero_grad() using X, y"]
    assert r.entry(net).sources == {"X", "y"}
    assert torch.equal(executor.lookup(X).value, features)

    r.fn("torch.set_grad_enabled", False)
    try:
        predictions = r.method(r.call(net, X), "argmax", dim=1)
        assert not r.value(predictions).requires_grad
        accuracy = r.fn("operator.eq", predictions, y)
        assert r.value(r.method(r.method(accuracy, "float"), "mean")).item() > 0.8
    finally:
        r.fn("torch.set_grad_enabled", True)
    assert torch.is_grad_enabled()


def test_training_counts_grads_and_learned_records_and_leaves_the_loss_unmodified() -> None:
    """After each in-place step the budget holds exactly the model's weights, its grads while
    they exist, and the record numbers it learned (which grow by the batch); ``backward``
    writes grads, never the loss, so the loss keeps its lineage."""
    executor = Executor(Allowlist.default())
    executor.share("X", torch.randn(1000, 4))
    executor.share("y", torch.randn(1000, 1))
    r = Driver(executor)
    layer = r.fn("torch.nn.Linear", 4, 1)
    optimizer = r.fn("torch.optim.SGD", r.method(layer, "parameters"), lr=0.1)
    r.executor.free([optimizer.id - 1])  # the parameters() list, as the researcher drops it
    weights = (4 + 1) * 4

    def learned_sets() -> list[np.ndarray]:
        sets = {id(p.rows): p.rows for state in executor.lookup(layer).provenance.values()
                for p in state.parts if p.kind == "model"}
        return list(sets.values())

    def learned() -> int:
        return sum(rows.nbytes for rows in learned_sets())

    for batch in range(3):
        rows = slice(100 * batch, 100 * batch + 100)
        r.method(optimizer, "zero_grad")
        prediction = r.call(layer, r.fn("operator.getitem", StoreRef("X"), rows))
        loss = r.fn("torch.nn.functional.mse_loss", prediction,
                    r.fn("operator.getitem", StoreRef("y"), rows))
        before = r.lineage(loss)
        r.method(loss, "backward")
        assert r.lineage(loss) == before and r.entry(loss).modified_by == []
        r.executor.free(list(range(prediction.id - 1, loss.id + 1)))  # the batch, the loss
        # the layer and the optimizer both hold the weights, the grads and the learned set
        # (the blocks are counted once): 100 more record numbers each step; X's and y's are
        # the same records, held once after the first union
        sets = learned_sets()
        assert [rows.nbytes for rows in sets] == [8 * 100 * (batch + 1)] * len(sets)
        assert len(sets) == (2 if batch == 0 else 1)
        assert executor.used_bytes() == 2 * weights + learned()
        r.method(optimizer, "step")  # same blocks: nothing recounted, nothing lost
        assert executor.used_bytes() == 2 * weights + learned()
    r.method(optimizer, "zero_grad")  # the grads are gone
    assert executor.used_bytes() == weights + learned()
    r.executor.free([layer.id, optimizer.id])
    assert executor.used_bytes() == 0


def test_module_helpers_are_usable_twice(r: Driver) -> None:
    net = r.fn("torch.nn.Sequential", r.fn("torch.nn.Linear", 2, 2))
    params = r.method(net, "parameters")
    assert len(r.value(params)) == 2
    assert len(r.value(params)) == 2  # a list, not an exhausted generator
    names = r.value(r.method(r.method(net, "state_dict"), "keys"))
    assert names == ["0.weight", "0.bias"]


def test_a_researcher_can_send_weights_into_a_model_built_remotely(r: Driver) -> None:
    layer = r.fn("torch.nn.Linear", 2, 1)
    weights_sent = {"weight": torch.tensor([[2.0, 3.0]]), "bias": torch.tensor([1.0])}
    r.method(layer, "load_state_dict", weights_sent)
    assert r.last_failure is None
    output = r.call(layer, r.fn("torch.tensor", [[1.0, 1.0]]))
    assert r.value(output).item() == 6.0
    assert "Module.load_state_dict" in r.lineage(layer)


def test_forward_runs_only_through_call(r: Driver) -> None:
    bn = r.fn("torch.nn.BatchNorm1d", 3)
    r.method(bn, "forward", r.fn("torch.ones", 2, 3))
    assert r.last_failure is not None and r.last_failure.policy
    r.call(bn, r.fn("torch.ones", 2, 3))  # the researcher's own module may update its stats
    assert r.last_failure is None


def test_events_are_accepted_by_the_audit_log(tmp_path: Path) -> None:
    from duet.audit import AuditLog

    with AuditLog(tmp_path / "audit.sqlite") as log:
        executor = Executor(Allowlist.default(), memory_budget=100,
                            events=Recorder(lambda event, f: log.record(event, session="s", **f)))
        executor.share("ages", AGES)
        r = Driver(executor)
        r.fn("numpy.mean", ages)
        r.fn("numpy.load", "x.npy")
        r.fn("numpy.reshape", ages, [7])
        r.fn("numpy.zeros", 1000)
        recorded = [(e.event, e.operation) for e in log]
    assert recorded[-4:] == [
        ("op_executed", "numpy.mean"), ("op_refused", "numpy.load"),
        ("op_failed", "numpy.reshape"), ("op_failed", "numpy.zeros"),
    ]
