"""The owner's worker process: isolation, limits, cancel, crash and restart (in-memory pair)."""

from __future__ import annotations

import array
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import torch

import duet
from duet.config import SessionConfig
from duet.policy import Allowlist
from duet.supervisor import WorkerProcess, WorkerSettings
from tests.helpers.sessions import eventually, session_pair


def test_operations_run_in_a_child_process_not_in_the_kernel(tmp_path: Path) -> None:
    with session_pair(tmp_path / "audit.db") as (owner, researcher):
        pid = owner.worker_pid
        assert pid is not None
        child = psutil.Process(pid)
        assert child.ppid() == psutil.Process().pid
        assert "duet.worker" in " ".join(child.cmdline())
        owner.share(np.arange(4.0), name="x")
        owner.requests.add_rule("approve")
        assert researcher.np.mean(researcher.store.wait_for("x", 5)).get("m", timeout=20) == 1.5


def test_cancel_stops_an_endless_operation_at_once(tmp_path: Path) -> None:
    with session_pair(tmp_path / "audit.db") as (owner, researcher):
        owner.share(np.arange(5.0), name="x")
        owner.requests.add_rule("approve")
        x = researcher.store.wait_for("x", 5)
        endless = researcher.np.sum(researcher.np.broadcast_to(x, (10**15, 5)))
        handle = endless.request("this takes months")
        researcher.ping()
        time.sleep(0.5)  # the worker is inside numpy now
        old = owner.worker_pid
        started = time.monotonic()
        owner.cancel()
        assert time.monotonic() - started < 5  # measured in the note; SIGKILL is immediate
        assert owner.worker_pid != old
        with pytest.raises(duet.WorkerRestarted, match="cancelled by the owner"):
            handle.result(10)
        with pytest.raises(duet.WorkerRestarted):
            (x * 2 + endless).get("old pointers are gone", timeout=10)
        assert researcher.np.mean(researcher.store["x"]).get("after", timeout=20) == 2.0
        events = owner.audit.events(event="worker_restarted")
        assert events[-1].detail["crashed"] is False
        assert owner.connected and researcher.connected


def test_a_crash_in_the_worker_leaves_the_owner_and_its_data_intact(tmp_path: Path) -> None:
    weight = torch.arange(12.0).reshape(4, 3)
    before = weight.clone()
    with session_pair(tmp_path / "audit.db") as (owner, researcher):
        owner.share(weight, name="W")
        owner.requests.add_rule("approve")
        W = researcher.store.wait_for("W", 5)
        idx = researcher.torch.tensor([0, 1])
        # renormalizes W in place: W is mapped read-only in the worker, so the write faults
        renormed = researcher.torch.nn.functional.embedding(idx, W, max_norm=1.0)
        with pytest.raises(duet.WorkerRestarted, match="stopped unexpectedly"):
            renormed.get("the crash", timeout=30)
        assert torch.equal(weight, before)
        assert researcher.torch.sum(researcher.store["W"]).get("still there", timeout=20) == 66
        crash = owner.audit.events(event="worker_restarted")[-1]
        assert crash.detail["crashed"] is True and "SIGSEGV" in crash.detail["reason"]


def test_unexpected_restarts_are_capped(tmp_path: Path) -> None:
    config = SessionConfig(progress=False, max_worker_restarts=1)
    with session_pair(tmp_path / "audit.db", config=config) as (owner, researcher):
        owner.share(torch.ones(4, 3), name="W")
        owner.requests.add_rule("approve")
        W = researcher.store.wait_for("W", 5)
        for expected in ("stopped unexpectedly", "nothing runs until the owner restarts"):
            crash = researcher.torch.nn.functional.embedding(
                researcher.torch.tensor([0]), W, max_norm=0.5)
            with pytest.raises(duet.WorkerRestarted, match=expected):
                crash.get("crash", timeout=30)
        assert owner.worker_pid is None
        with pytest.raises(duet.PolicyViolation, match="stopped"):
            researcher.np.zeros(3).get("refused while stopped", timeout=10)
        owner.cancel()  # the owner decides to start it again
        assert owner.worker_pid is not None
        eventually(lambda: researcher_saw_restart(researcher, "restarted by the owner"))
        assert researcher.torch.sum(researcher.store["W"]).get("back", timeout=30) == 12


def test_memory_and_time_are_bounded_by_the_os(tmp_path: Path) -> None:
    config = SessionConfig(progress=False, worker_memory=3 * 1024**3, op_timeout=2.0)
    with session_pair(tmp_path / "audit.db", config=config, memory_budget=None) as (
            owner, researcher):
        owner.requests.add_rule("approve")
        huge = researcher.np.ones(10**12)  # 8 TB: far beyond the limit and the machine
        with pytest.raises(duet.RemoteError, match="MemoryError"):
            huge.get("larger than the machine", timeout=30)
        x = researcher.np.arange(5.0)
        endless = researcher.np.sum(researcher.np.broadcast_to(x, (10**15, 5)))
        with pytest.raises(duet.WorkerRestarted):
            endless.get("runs past op_timeout", timeout=60)
        reason = owner.audit.events(event="worker_restarted")[-1].detail["reason"]
        assert "longer than the owner's limit of 2 s" in reason
        assert researcher.np.ones(3).sum().get("fine again", timeout=30) == 3


def test_shared_objects_that_could_expose_writable_memory_are_refused(tmp_path: Path) -> None:
    class MyDict(dict):  # type: ignore[type-arg]
        pass

    with session_pair(tmp_path / "audit.db") as (owner, _):
        for bad in (array.array("d", [1.0]), bytearray(b"abc"), memoryview(b"abc"),
                    MyDict(a=1), np.array([object()]), [np.zeros(1), bytearray(1)]):
            with pytest.raises(TypeError):
                owner.share(bad, name="bad")
        assert "bad" not in owner.shared


def test_ten_thousand_queued_requests_leave_the_owner_responsive(tmp_path: Path) -> None:
    with session_pair(tmp_path / "audit.db") as (owner, researcher):
        owner.share(np.arange(3.0), name="x")
        x = researcher.store.wait_for("x", 5)
        handles = [x.request(f"request {i}") for i in range(10_000)]
        eventually(lambda: len(owner.requests) == 10_000, timeout=240)
        assert researcher.ping() < 5
        assert "10000 requests" in repr(owner.requests)
        owner.requests.add_rule("deny", reason="enough")
        with pytest.raises(duet.RequestDenied):
            handles[-1].result(60)


def test_mutation_after_the_request_does_not_change_what_is_sent(tmp_path: Path) -> None:
    with session_pair(tmp_path / "audit.db") as (owner, researcher):
        owner.share(np.array([3.0, 1.0, 2.0]), name="secret")
        z = researcher.np.zeros(3)
        handle = z.request("zeros, surely")
        request = owner.requests.wait(10)
        assert request is not None and request.sources == frozenset()
        secret = researcher.store["secret"]
        z.put(researcher.np.arange(3), secret)  # writes the secret into z after the request
        z.sort()
        researcher.ping()
        request.approve()
        assert handle.result(10).tolist() == [0.0, 0.0, 0.0]
        # the write is recorded: z now depends on the secret, and a new request says so
        second = z.request("and now?")
        assert owner.requests.wait(10).sources == {"secret"}  # type: ignore[union-attr]
        second.withdraw()


def test_positional_out_cannot_smuggle_shared_data(tmp_path: Path) -> None:
    with session_pair(tmp_path / "audit.db") as (owner, researcher):
        owner.share(np.array([7.0, 8.0, 9.0]), name="secret")
        owner.requests.add_rule("deny", name="secret", reason="never the secret")
        owner.requests.add_rule("approve")
        z = researcher.np.zeros(10)
        researcher.store.wait_for("secret", 5).clip(-1e300, 1e300, z[2:5])  # out= by position
        assert z.get("zeros", timeout=20).tolist() == [0.0] * 10


def researcher_saw_restart(researcher: duet.ResearcherSession, reason: str) -> bool:
    """Whether the restart notice has reached the researcher (a pointer made before it
    then says so)."""
    try:
        researcher.check(1)
    except duet.WorkerRestarted as exc:
        return reason in str(exc)
    return False


def test_frozen_copies_and_python_objects_count_against_the_budget(tmp_path: Path) -> None:
    with session_pair(tmp_path / "audit.db", memory_budget=3 * 2**20) as (owner, researcher):
        owner.share(np.zeros(2**18), name="x")  # 2 MiB, shared: not counted
        x = researcher.store.wait_for("x", 5)
        first = x.request("a frozen copy of 2 MiB fits")
        second = x.request("a second one does not")
        requests = [owner.requests.wait(10)]
        eventually(lambda: len(owner.requests) == 2, timeout=10)
        failed = owner.requests[1]
        assert failed.failed.startswith("cannot be sent: MemoryError")
        assert "left in the owner's memory budget" in failed.preview
        assert requests[0] is not None and not requests[0].failed
        requests[0].deny()
        failed.deny()
        for handle in (first, second):
            with pytest.raises(duet.RequestDenied):
                handle.result(10)
        # 262,144 Python floats are ~8 MiB of objects: over the budget, so a failure
        owner.requests.add_rule("approve")
        listed = x.tolist()
        with pytest.raises(duet.RemoteError, match="BudgetExceeded"):
            listed.get("as a list", timeout=30)
        assert owner.worker_usage().used_bytes == 0


class _Hooks:
    """Records what a bare ``WorkerProcess`` says (no session around it)."""

    def __init__(self) -> None:
        self.usage: list[Any] = []
        self.exited: list[str] = []

    def worker_done(self, done: Any) -> None: ...
    def worker_snapshot(self, snapshot: Any, encoded: Any) -> None: ...
    def worker_request_failed(self, failed: Any) -> None: ...
    def worker_released(self, request_id: str, header: bytes, buffers: Any) -> None: ...
    def worker_quiet(self) -> None: ...

    def worker_reported_usage(self, usage: Any) -> None:
        self.usage.append(usage)

    def worker_exited(self, reason: str, crashed: bool) -> None:
        self.exited.append(reason)


def test_an_allowlist_longer_than_a_command_line_argument_reaches_the_worker() -> None:
    """Linux caps one argument at 128 KiB; the settings travel on the socket instead."""
    spec = Allowlist.default().spec()
    spec["attributes"] = [*spec["attributes"],
                          *(f"nothing.attribute_{i:06d}" for i in range(20_000))]
    assert len(json.dumps(spec)) > 4 * 128 * 1024
    hooks = _Hooks()
    worker = WorkerProcess(WorkerSettings(memory=None, op_timeout=None, memory_budget=None,
                                          allowlist=spec, torch=False), hooks)
    try:
        worker.submit("usage")
        eventually(lambda: bool(hooks.usage), timeout=30)
        assert hooks.usage[0].objects == 0
        assert worker.alive and not hooks.exited
    finally:
        worker.kill("the test is over", crashed=False)
        assert worker.wait_exited(10)


class _FailingHooks(_Hooks):
    def worker_reported_usage(self, usage: Any) -> None:
        raise RuntimeError("a bug in the session's handling")


def test_a_failure_handling_the_workers_answer_restarts_it_instead_of_hanging() -> None:
    """The reader thread is the only one that hears the worker: if it stopped on an
    unexpected error, every later request would wait forever."""
    hooks = _FailingHooks()
    worker = WorkerProcess(WorkerSettings(memory=None, op_timeout=None, memory_budget=None,
                                          allowlist=Allowlist.default().spec(), torch=False),
                           hooks)
    worker.submit("usage")
    assert worker.wait_exited(30)
    assert hooks.exited == ["handling the worker's answer failed "
                            "(RuntimeError: a bug in the session's handling)"]
