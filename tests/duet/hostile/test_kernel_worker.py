"""Class 10: the owner's worker holds exactly what its kernel accepted, and outlives the
researcher.

The kernel checks each message (allowlist, references, DP inputs, request ids) and the worker
runs it. Every way the two could part (an op the kernel refused that the worker runs anyway,
a batch the kernel half-recorded and never forwarded, a request id used twice, a withdrawal
that overtakes its own snapshot) or the worker could be made to exit by a message (a value
nested too deeply to freeze; a withdrawal too long for its control socket is in
test_wire_types.py) is a case here. Each one failed on the code before the fix."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

import duet
from duet import protocol as p
from tests.helpers import rawwire
from tests.helpers.sessions import Pair, eventually, session_pair

WAIT = 60
AGES = np.random.default_rng(7).uniform(18, 90, 2000)


def _nested(value: object, levels: int) -> object:
    for _ in range(levels):
        value = [value]
    return value


def test_a_value_nested_too_deeply_to_send_is_a_failure_not_a_crash(pair: Pair) -> None:
    """One op nests its arguments at most ``MAX_VALUE_DEPTH`` deep, but ops chained nest
    their result without bound: freezing it hit the interpreter's recursion limit and the
    worker's main thread died."""
    owner, researcher = pair
    owner.requests.add_rule("approve")
    worker = owner.worker_pid
    previous = rawwire.new_id(researcher)
    rawwire.send_raw(researcher, rawwire.op(previous, "copy.copy", args=[_nested(1.0, 30)]))
    for _ in range(40):
        deeper = rawwire.new_id(researcher)
        rawwire.send_raw(researcher, rawwire.op(
            deeper, "copy.copy", args=[_nested(p.PointerRef(previous), 30)]))
        previous = deeper
    deep = duet.Pointer(researcher, p.PointerRef(previous), "deep")
    try:
        deep.get("deep", timeout=WAIT)
        raise AssertionError("a value nested 1,200 levels deep was sent")
    except duet.RemoteError as exc:
        assert "ProtocolError" in str(exc)  # the researcher learns the type, the owner why
    assert "nested too deeply" in list(owner.requests)[-1].failed
    assert owner.worker_pid == worker
    assert not owner.audit.events(event="worker_restarted")


def test_an_op_the_kernel_refuses_never_runs_in_the_worker(pair: Pair) -> None:
    """The kernel refused an op and forwarded the whole message anyway: the worker ran its
    own checks again, audited the refusal a second time, and ran an op built on the refused
    one that the kernel had refused too."""
    owner, researcher = pair
    owner.share(np.arange(4.0), name="x")
    researcher.store.wait_for("x", 5)
    received = rawwire.record_received(researcher)
    refused, later = rawwire.new_id(researcher), rawwire.new_id(researcher)
    rawwire.send_raw(researcher, rawwire.op(refused, "os.system", args=["true"]))
    rawwire.send_raw(researcher, rawwire.op(later, "numpy.add",
                                            args=[p.PointerRef(refused), 1.0]))
    eventually(lambda: sum(m.type == "op_failed" for m in received) == 2, WAIT)
    failed = {m.result: m.detail for m in received if m.type == "op_failed"}
    assert "not on the owner's allowlist" in failed[refused]
    assert "its operation was refused" in failed[later]
    owner.worker_usage(WAIT)
    owner.worker_quiet()
    rows = [(e.event, e.pointer_id) for e in owner.audit.events()
            if e.pointer_id in (refused, later)]
    assert sorted(rows) == sorted([("op_refused", refused), ("op_refused", later)])
    # the worker holds both refusals: asked for, the owner sees why
    owner.requests.add_rule("approve")
    rawwire.send_raw(researcher, p.RequestValue(request_id="00000000000000c1",
                                                target=p.PointerRef(later), reason="later"))
    eventually(lambda: any(m.type == "decision" for m in received), WAIT)
    decision = next(m for m in received if m.type == "decision")
    assert (decision.status, decision.error_type) == ("failed", "PolicyViolation")
    assert "its operation was refused" in list(owner.requests)[-1].failed


def test_an_op_refused_for_a_nested_dp_statistic_never_runs(tmp_path: Path) -> None:
    """The kernel walks arguments at any depth and refused ``copy.copy([[query]])``; the
    worker walked one level and ran it with the DP query (its private copy of the data)."""
    with session_pair(tmp_path / "audit.db") as (owner, researcher):
        owner.share(AGES, name="ages", dp=duet.DP(epsilon=1.0, bounds=(18, 90)))
        ages = researcher.store.wait_for("ages", 5)
        query = researcher.dp.sum(ages, epsilon=0.1)
        received = rawwire.record_received(researcher)
        copied = rawwire.new_id(researcher)
        rawwire.send_raw(researcher, rawwire.op(copied, "copy.copy",
                                                args=[[[p.PointerRef(query.id)]]]))
        eventually(lambda: any(m.type == "op_failed" and m.result == copied
                               for m in received), WAIT)
        owner.worker_usage(WAIT)
        owner.worker_quiet()
        assert not [e for e in owner.audit.events(event="op_executed")
                    if e.pointer_id == copied]


def test_a_batch_with_an_uncheckable_argument_loses_only_that_op(pair: Pair) -> None:
    """An array where the allowlist compares a keyword (``engine``) raised ValueError in the
    kernel's check: the kernel had recorded the batch's first op, never forwarded the batch
    and answered nothing. An op reusing the first op's id was then refused by the kernel but
    ran in the worker, and a request for that id released the refused op's value."""
    owner, researcher = pair
    owner.share(np.arange(4.0), name="x")
    owner.requests.add_rule("approve")
    researcher.store.wait_for("x", 5)
    received = rawwire.record_received(researcher)
    first, second = rawwire.new_id(researcher), rawwire.new_id(researcher)
    rawwire.send_raw(researcher, p.Ops(ops=[
        rawwire.op(first, "numpy.add", args=[p.StoreRef("x"), 1.0]),
        rawwire.op(second, "numpy.mean", args=[p.StoreRef("x")],
                   kwargs={"engine": np.array([1.0, 2.0])})]))
    eventually(lambda: any(m.type == "op_failed" and m.result == second for m in received),
               WAIT)
    refusal = next(m for m in received if m.type == "op_failed")
    assert "could not be checked (ValueError)" in refusal.detail
    rawwire.send_raw(researcher, rawwire.op(first, "numpy.multiply",
                                            args=[p.StoreRef("x"), 100.0]))
    eventually(lambda: any(m.type == "op_failed" and m.result == first for m in received),
               WAIT)
    rawwire.send_raw(researcher, p.RequestValue(request_id="00000000000000a1",
                                                target=p.PointerRef(first), reason="first"))
    eventually(lambda: any(m.type == "decision" for m in received), WAIT)
    decision = next(m for m in received if m.type == "decision")
    assert decision.status == "approved"  # the accepted op's value, not the refused one's
    assert decision.value.tolist() == [1.0, 2.0, 3.0, 4.0]


def test_a_used_request_id_is_refused_and_leaves_nothing_frozen(tmp_path: Path) -> None:
    """A decided request's id could be sent again: the worker froze the value again under
    it, the kernel's queue refused the duplicate and the frozen copy stayed (counted twice
    over), until the worker's memory budget refused every later request."""
    budget = 4 * 1024**2
    big = np.arange(100_000, dtype=np.float64)  # 800 KB: frozen in the worker, not inline
    with session_pair(tmp_path / "audit.db", memory_budget=budget) as (owner, researcher):
        owner.share(big, name="big")
        owner.share(np.arange(4.0), name="x")
        x = researcher.store.wait_for("x", 5)
        owner.requests.add_rule("deny")
        received = rawwire.record_received(researcher)
        errors = len(owner.audit.events(event="protocol_error"))
        for n in range(8):
            rawwire.send_raw(researcher, p.RequestValue(
                request_id="00000000000000b1", target=p.StoreRef("big"), reason=f"#{n}"))
        eventually(lambda: len(owner.audit.events(event="protocol_error")) == errors + 7
                   and any(m.type == "decision" for m in received), WAIT)
        assert [m.status for m in received if m.type == "decision"] == ["denied"]
        # the denied value's drop travels on the control socket, apart from this question
        eventually(lambda: owner.worker_usage(WAIT).frozen == 0, WAIT)
        owner.requests.remove_rule(1)
        owner.requests.add_rule("approve")
        assert (x + 1).get("small", timeout=WAIT).tolist() == [1.0, 2.0, 3.0, 4.0]


def test_a_request_withdrawn_before_its_snapshot_is_never_shown(pair: Pair) -> None:
    """A withdrawal right behind its request reached the kernel before the worker's
    snapshot: the queue knew no such request, the snapshot came next and waited for the
    owner's approval as if never withdrawn."""
    owner, researcher = pair
    owner.share(np.arange(4.0), name="x")
    x = researcher.store.wait_for("x", 5)
    for n in range(5):
        request_id = f"00000000000000d{n}"
        rawwire.send_raw(researcher, p.RequestValue(request_id=request_id,
                                                    target=p.StoreRef("x"), reason="w"))
        rawwire.send_raw(researcher, p.Withdraw(request_id=request_id))
    owner.worker_usage(WAIT)
    owner.requests.add_rule("approve")
    assert (x + 1).get("after", timeout=WAIT).tolist() == [1.0, 2.0, 3.0, 4.0]
    time.sleep(0.5)  # any late snapshot of the withdrawn ones has been handled by now
    shown = [r.status for r in owner.requests if r.id.startswith("00000000000000d")]
    assert all(status == "withdrawn" for status in shown), shown
    assert not [e for e in owner.audit.events(event="value_sent")
                if e.request_id.startswith("00000000000000d")]
