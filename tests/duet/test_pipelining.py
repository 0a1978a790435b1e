"""The fast path of pipelined operations (issue 12): batching, frees, audit order, encoding.

What got faster must not have got weaker: frees still free on the owner, even when they
race with the operations of the same flush; every executed operation's audit row is
written before a value derived from it leaves; an argument that cannot be sent is refused
at the call instead of silently taking its batch with it; the worker's second decoding of
already validated operations gives the same operations; the owner's cached name checks
follow the allowlist when it changes; and a long pipeline leaves in messages within the
owner's limits (``protocol.MAX_OPS``, ``MAX_VALUES``).
"""

from __future__ import annotations

import gc
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import duet
from duet import protocol as p
from duet.audit import AuditLog
from duet.errors import PolicyViolation
from duet.policy import Allowlist, check_name
from tests.helpers import rawwire
from tests.helpers.sessions import Pair, eventually


def test_a_pipelined_chain_frees_every_intermediate_on_the_owner(pair: Pair) -> None:
    owner, researcher = pair
    owner.share(np.zeros(1000), name="x")
    owner.requests.add_rule("approve")
    x = researcher.store.wait_for("x", 5)
    for _ in range(500):  # each step drops the previous pointer: frees ride with the ops
        x = x + 1
    assert float(x.get("chain", timeout=60)[0]) == 500.0
    gc.collect()
    researcher.ping()
    assert owner.worker_usage().objects == 1  # only the last x is alive
    assert owner.worker_usage().used_bytes == 8000
    del x
    gc.collect()
    researcher.ping()
    assert owner.worker_usage().objects == 0


def test_frees_from_another_thread_while_ops_are_queued(pair: Pair) -> None:
    owner, researcher = pair
    owner.share(np.zeros(100), name="x")
    x = researcher.store.wait_for("x", 5)
    pointers = [x * i for i in range(300)]

    def drop() -> None:  # garbage collection may run in any thread, mid-flush
        while pointers:
            pointers.pop()

    dropper = threading.Thread(target=drop)
    dropper.start()
    kept = [x + i for i in range(300)]
    dropper.join()
    gc.collect()
    researcher.ping()
    eventually(lambda: owner.worker_usage().objects == 300, timeout=30)
    assert owner.worker_usage().used_bytes == 300 * 800
    del kept


def test_audit_rows_of_the_ops_are_written_before_the_value_leaves(
        pair: Pair, tmp_path: Path) -> None:
    owner, researcher = pair
    owner.share(torch.arange(4.0), name="x")
    owner.requests.add_rule("approve")
    x = researcher.store.wait_for("x", 5)
    y = (x * 2) + 1
    assert y.get("value", timeout=30).tolist() == [1.0, 3.0, 5.0, 7.0]
    # read from another connection at once: what is there was committed before the value left
    with AuditLog(tmp_path / "audit.db", readonly=True) as log:
        rows = [e for e in log.events() if e.event in (
            "op_executed", "request", "decision", "value_sent")]
    kinds = [e.event for e in rows]
    assert kinds == ["op_executed", "op_executed", "request", "decision", "value_sent"]
    assert [e.lineage for e in rows[:2]] == ["(x * 2)", "((x * 2) + 1)"]
    assert [e.id for e in rows] == sorted(e.id for e in rows)


def test_many_audit_rows_in_one_batch_get_their_own_ids(tmp_path: Path) -> None:
    with AuditLog(tmp_path / "a.db") as log:
        first = log.record("session_started", session="s")
        ids = log.record_many([("op_executed", {"session": "s", "pointer_id": i,
                                                "operation": "operator.add"})
                               for i in range(1, 1001)], sync=False)
        last = log.record("session_closed", session="s")
        assert ids == list(range(first + 1, first + 1001))
        assert last == ids[-1] + 1
        events = log.events(event="op_executed")
        assert [e.id for e in events] == ids
        assert [e.pointer_id for e in events] == list(range(1, 1001))
        assert all(e.detail == {} for e in events)


def test_an_argument_that_cannot_be_sent_is_refused_at_the_call(pair: Pair) -> None:
    owner, researcher = pair
    owner.share(np.arange(3.0), name="x")
    owner.requests.add_rule("approve")
    x = researcher.store.wait_for("x", 5)
    y = x + 1
    with pytest.raises(TypeError, match="cannot be sent"):
        researcher.np.add(y, {1, 2})  # a set: nothing on the wire carries it
    with pytest.raises(TypeError, match="cannot be sent"):
        researcher.np.add(y, [object()])
    with pytest.raises(PolicyViolation, match="allowlisted functions"):
        researcher.np.add(y, lambda v: v)  # code never travels
    # the operations queued around it were not lost with it
    assert (y * 2).get("still there", timeout=30).tolist() == [2.0, 4.0, 6.0]


def test_arguments_nested_past_the_executors_depth_are_refused_at_once(pair: Pair) -> None:
    owner, researcher = pair
    owner.share(np.arange(3.0), name="x")
    owner.requests.add_rule("approve")
    x = researcher.store.wait_for("x", 5)
    nested: list[object] = [1]
    for _ in range(p.MAX_VALUE_DEPTH + 2):
        nested = [nested]
    deep = rawwire.new_id(researcher)
    rawwire.send_raw(researcher, rawwire.op(deep, "numpy.asarray", args=[nested]))
    after = x + 1  # in the same batch: runs
    refused = duet.Pointer(researcher, p.PointerRef(deep), "deep")
    with pytest.raises(PolicyViolation, match="nested too deeply"):
        refused.get("deep", timeout=30)
    assert after.get("after", timeout=30).tolist() == [1.0, 2.0, 3.0]
    assert owner.audit.events(event="op_refused")[-1].pointer_id == deep


def test_the_worker_decodes_validated_ops_to_the_same_operations() -> None:
    array = np.arange(6, dtype=np.int32).reshape(2, 3)
    ops = p.Ops(ops=[
        p.Op(result=1, kind="function", name="numpy.add",
             args=[p.StoreRef("x"), (1, slice(0, 2), ...)], kwargs={"dtype": p.DTypeRef("int64")}),
        p.Op(result=2, kind="method", name="sum", target=p.PointerRef(1), args=[array]),
        p.Op(result=3, kind="getattr", name="T", target=p.PointerRef(2)),
    ])
    header, buffers = p.encode(ops)
    checked = p.decode(header, buffers)
    trusted = p.decode(header, buffers, validated=True)
    assert isinstance(trusted, p.Ops) and isinstance(checked, p.Ops)
    for a, b in zip(checked.ops, trusted.ops, strict=True):
        assert (a.result, a.kind, a.name, a.target, a.kwargs) == (
            b.result, b.kind, b.name, b.target, b.kwargs)
        assert repr(a.args) == repr(b.args)
    assert (trusted.ops[1].args[0] == array).all()


@pytest.mark.parametrize("message", [
    p.RequestValue(request_id="0123456789abcdef", target=p.PointerRef(7), reason="a mean"),
    p.RequestValue(request_id="0123456789abcdef", target=p.StoreRef("x")),
    p.Free(ids=[1, 2, 3]),
    p.Withdraw(request_id="0123456789abcdef"),
    p.Decision(request_id="r1", status="approved",
               value={"w": torch.arange(4.0), "n": (1, 2.5, None)}),
], ids=lambda m: m.type)
def test_the_worker_decodes_other_validated_messages_to_the_same_message(message: Any) -> None:
    """The worker rebuilds the kernel's validated messages (and reads back the value it froze)
    without validating them again: the result must be what a validating decode gives."""
    header, buffers = p.encode(message)
    checked = p.decode(header, buffers)
    trusted = p.decode(header, buffers, validated=True)
    assert type(trusted) is type(checked)
    assert repr(trusted) == repr(checked)


def test_name_checks_are_remembered_only_for_names_that_pass() -> None:
    assert check_name("numpy.mean") == ["numpy", "mean"]
    assert check_name("numpy.mean") == ["numpy", "mean"]  # remembered, a fresh list
    for bad in ("numpy.__class__", "numpy..mean", "numpy.méan", "os.system "):
        for _ in range(2):  # refused every time, never remembered as good
            with pytest.raises(PolicyViolation):
                check_name(bad)
    with pytest.raises(PolicyViolation):
        check_name("mean.sum", dotted=False)
    assert check_name("mean", dotted=False) == ["mean"]


def test_method_prechecks_follow_the_allowlist_when_it_changes() -> None:
    allowlist = Allowlist.default()

    def method(name: str) -> p.Op:
        return p.Op(result=1, kind="method", name=name, target=p.PointerRef(2))

    allowlist.precheck(method("trace"))  # ndarray.trace, in no other family
    allowlist.deny("ndarray.trace")
    with pytest.raises(PolicyViolation):
        allowlist.precheck(method("trace"))
    allowlist.allow("ndarray.trace")
    allowlist.precheck(method("trace"))
    allowlist.deny("ndarray")  # a whole family
    with pytest.raises(PolicyViolation):
        allowlist.precheck(method("trace"))
    copy = allowlist.copy()
    copy.allow("ndarray.trace")
    copy.precheck(method("trace"))
    with pytest.raises(PolicyViolation):  # the original is unchanged
        allowlist.precheck(method("trace"))


def test_a_requests_row_is_written_before_its_decision_when_decided_by_hand(
        pair: Pair) -> None:
    """The owner decides by hand while the worker's pipe goes quiet (which writes held rows):
    for every request, its ``request`` row precedes its ``decision`` row in the log."""
    owner, researcher = pair
    owner.share(np.arange(10.0), name="x")
    x = researcher.store.wait_for("x", 5)
    decided: list[str] = []

    def decide_by_hand() -> None:
        while len(decided) < 40:
            request = owner.requests.wait(30)
            assert request is not None
            request.approve()
            decided.append(request.id)

    hand = threading.Thread(target=decide_by_hand)
    hand.start()
    handles = [(x + i).sum().request(f"sum {i}") for i in range(40)]
    assert [h.result(60) for h in handles] == [45.0 + 10 * i for i in range(40)]
    hand.join(30)
    owner.worker_quiet()  # whatever is still held is written now
    order: dict[str, list[str]] = {}
    for event in owner.audit.events():
        if event.event in ("request", "decision") and event.request_id is not None:
            order.setdefault(event.request_id, []).append(event.event)
    assert sorted(order) == sorted(decided)
    assert all(kinds == ["request", "decision"] for kinds in order.values()), order


def _sharing(pair: Pair, value: np.ndarray) -> tuple[Any, Any, Any, list[tuple[str, int]]]:
    """The owner shares ``value`` as ``x`` and approves everything; returns the owner, the
    researcher, their pointer to ``x``, and each message the owner's kernel handles from now
    on: its type and its count of operations (ops) or ids (free)."""
    owner, researcher = pair
    owner.share(value, name="x")
    owner.requests.add_rule("approve")
    x = researcher.store.wait_for("x", 5)
    seen: list[tuple[str, int]] = []
    handle = owner._handle

    def spy(message: p.Message, raw: Any) -> None:
        seen.append((message.type, len(getattr(message, "ops", getattr(message, "ids", [])))))
        handle(message, raw)

    owner._handle = spy
    return owner, researcher, x, seen


def test_a_long_pipeline_leaves_in_messages_the_owner_accepts(pair: Pair) -> None:
    """10,000 operations queued at once go as several messages of at most MAX_OPS, and so do
    the frees of their 9,999 dropped intermediates: none is refused as too large."""
    owner, researcher, x, seen = _sharing(pair, np.zeros(3))
    with researcher._flush_lock:  # the loop's flush waits: everything goes in one flush
        for _ in range(10_000):
            x = x + 1
    assert x.get("long", timeout=120).tolist() == [10_000.0] * 3
    gc.collect()
    researcher.ping()
    eventually(lambda: owner.worker_usage().objects == 1, timeout=60)
    ops = [n for kind, n in seen if kind == "ops"]
    frees = [n for kind, n in seen if kind == "free"]
    assert sum(ops) == 10_000 and max(ops) == p.MAX_OPS and len(ops) == 3, ops
    assert sum(frees) == 9_999 and max(frees) <= p.MAX_OPS, frees
    assert owner.audit.events(event="protocol_error") == []


def test_operations_with_many_values_are_split_by_their_values(pair: Pair) -> None:
    owner, researcher, x, seen = _sharing(pair, np.arange(10.0))
    indices = [3] * 5_000
    with researcher._flush_lock:
        taken = [researcher.np.take(x, indices) for _ in range(40)]  # 200,000 values
    assert [float(t.sum().get("taken", timeout=60)) for t in taken[::13]] == [15_000.0] * 4
    ops = [n for kind, n in seen if kind == "ops"]
    assert sum(ops) >= 40 and len(ops) >= 2, ops  # more than MAX_VALUES: two messages
    assert owner.audit.events(event="protocol_error") == []


def test_an_operation_over_the_values_limit_is_refused_at_the_call(pair: Pair) -> None:
    owner, researcher, x, seen = _sharing(pair, np.arange(3.0))
    y = x + 1
    with pytest.raises(ValueError, match="np.asarray"):
        researcher.np.take(x, [0] * p.MAX_VALUES)
    assert (y * 2).get("after", timeout=30).tolist() == [2.0, 4.0, 6.0]
    assert sum(n for kind, n in seen if kind == "ops") == 2  # y and y * 2: not the refused
    assert owner.audit.events(event="protocol_error") == []
