"""Sessions over the in-memory transport: store, requests, rules, lifecycle, audit (fast)."""

from __future__ import annotations

import gc
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch

import duet
from duet import OwnerSession
from duet import protocol as p
from duet.config import SessionConfig
from tests.helpers.sessions import Pair, eventually, session_pair


def test_store_lists_declared_metadata_and_updates_live(pair: Pair) -> None:
    owner, researcher = pair
    owner.share(np.zeros((3, 4), dtype=np.float32), name="grid", description="a grid <b>",
                tags=("demo",))
    researcher.store.wait_for("grid", timeout=5)
    info = researcher.store.info("grid")
    assert (info.type, info.shape, info.dtype, info.tags) == ("numpy.ndarray", [3, 4],
                                                              "float32", ["demo"])
    assert "a grid" in repr(researcher.store) and "<table>" in researcher.store._repr_html_()
    assert "a grid &lt;b&gt;" in researcher.store._repr_html_()  # declared text is escaped
    owner.unshare("grid")
    eventually(lambda: "grid" not in researcher.store)
    with pytest.raises(KeyError, match="has not shared 'grid'"):
        researcher.store["grid"]


@pytest.mark.parametrize("name", ["", "1x", "_hidden", "a b", "__class__"])
def test_share_names_must_be_plain_identifiers(pair: Pair, name: str) -> None:
    with pytest.raises(ValueError):
        pair[0].share(np.zeros(1), name=name)


def test_approve_and_deny(pair: Pair) -> None:
    owner, researcher = pair
    owner.share(np.arange(10.0), name="ages")
    ages = researcher.store.wait_for("ages", 5)
    mean = researcher.np.mean(ages * 2)
    handle = mean.request("mean for the paper")
    request = owner.requests.wait(5)
    assert request is not None
    assert (request.reason, request.lineage, request.status) == (
        "mean for the paper", "mean((ages * 2))", "pending")
    assert "9.0" in request.preview and request.nbytes == 8
    request.approve()
    assert handle.result(5) == 9.0 and handle.status == "approved"
    raw = ages.request("all rows")
    owner.requests.wait(5).deny("too specific")  # type: ignore[union-attr]
    with pytest.raises(duet.RequestDenied, match="too specific") as denied:
        raw.result(5)
    assert denied.value.reason == "too specific"
    # the traceback ends at the user's call, without concurrent.futures' frames
    assert "concurrent" not in "".join(traceback.format_tb(denied.value.__traceback__))
    assert denied.value.__suppress_context__
    assert [r.status for r in owner.requests] == ["approved", "denied"]
    assert "denied" in repr(owner.requests) and "<table>" in owner.requests._repr_html_()


def test_timeout_leaves_the_request_pending_then_it_can_still_be_approved(pair: Pair) -> None:
    owner, researcher = pair
    owner.share(np.ones(3), name="x")
    handle = researcher.store.wait_for("x", 5).sum().request("sum")
    with pytest.raises(duet.RequestTimeout):
        handle.result(0.2)
    assert handle.status == "pending"
    owner.requests.wait(5).approve()  # type: ignore[union-attr]
    assert handle.result(5) == 3.0
    with pytest.raises(duet.RequestTimeout):
        researcher.store["x"].get("again", timeout=0.2)


def test_many_pending_requests_are_decided_independently(pair: Pair) -> None:
    owner, researcher = pair
    owner.share(np.arange(50), name="x")
    x = researcher.store.wait_for("x", 5)
    handles = [x[i].request(f"element {i}") for i in range(50)]
    eventually(lambda: len(owner.requests.pending) == 50)
    for request in owner.requests.pending[::-1]:
        if int(request.reason.split()[1]) % 2:
            request.deny("odd")
        else:
            request.approve()
    for i, handle in enumerate(handles):
        if i % 2:
            with pytest.raises(duet.RequestDenied):
                handle.result(5)
        else:
            assert handle.result(5) == i


def test_rules_decide_automatically_and_are_recorded(pair: Pair) -> None:
    owner, researcher = pair
    owner.share(np.arange(100.0), name="ages")
    owner.share(np.arange(5.0), name="ids")
    small = owner.requests.add_rule("approve", max_elements=1)
    no_ids = owner.requests.add_rule("deny", name="ids", reason="ids never leave")
    lineage = owner.requests.add_rule("deny", lineage=r"\[.*\]", reason="no slices")
    assert [r.id for r in owner.requests.rules] == [small.id, no_ids.id, lineage.id]
    assert "max_elements=1" in str(small)
    ages, ids = researcher.store.wait_for("ages", 5), researcher.store.wait_for("ids", 5)
    assert researcher.np.mean(ages).get("mean", timeout=5) == 49.5
    with pytest.raises(duet.RequestDenied, match="ids never leave"):
        (ids * 2).get("ids", timeout=5)
    with pytest.raises(duet.RequestDenied, match="no slices"):
        ages[:10].get("slice", timeout=5)
    owner.requests.remove_rule(lineage)
    handle = ages[:10].request("slice again")
    eventually(lambda: len(owner.requests.pending) == 1)
    with pytest.raises(ValueError):
        owner.requests.remove_rule(lineage.id)
    owner.requests.add_rule("approve", predicate=lambda r: r.reason == "slice again")
    assert list(handle.result(5)) == list(range(10))
    decisions = owner.audit.events(event="decision")
    assert [d.detail["by"] for d in decisions] == [
        f"rule:{small.id}", f"rule:{no_ids.id}", f"rule:{lineage.id}", "rule:4"]


def test_deciding_twice_or_a_withdrawn_request_is_an_error(pair: Pair) -> None:
    owner, researcher = pair
    owner.share(np.arange(3), name="x")
    x = researcher.store.wait_for("x", 5)
    handle = x.request("first")
    request = owner.requests.wait(5)
    assert request is not None
    request.approve()
    with pytest.raises(duet.RequestError, match="already approved"):
        request.deny()
    handle.result(5)
    second = x.request("second")
    eventually(lambda: len(owner.requests.pending) == 1)
    second.withdraw()
    eventually(lambda: owner.requests[1].status == "withdrawn")
    with pytest.raises(duet.RequestError, match="withdrawn"):
        owner.requests[1].approve()
    assert len(owner.audit.events(event="value_sent")) == 1


def test_failures_are_data_released_only_by_approval(pair: Pair) -> None:
    owner, researcher = pair
    owner.share(np.arange(4.0), name="x")
    x = researcher.store.wait_for("x", 5)
    singular = researcher.np.linalg.inv(x)
    later = singular + 1  # no error: whether inv failed is the owner's to release
    handle = later.request("inverse plus one")
    request = owner.requests.wait(10)
    assert request is not None and request.failed.startswith("UpstreamFailure")
    assert "numpy.linalg.inv failed with LinAlgError" in request.failed
    assert request.preview.startswith("failed:") and request.sources == {"x"}
    request.approve()
    with pytest.raises(duet.RemoteError, match="UpstreamFailure"):
        handle.result(5)
    assert owner.audit.events(event="value_sent") == []


def test_requests_for_freed_objects_get_clear_errors(pair: Pair) -> None:
    owner, researcher = pair
    owner.share(np.arange(4.0), name="x")
    x = researcher.store.wait_for("x", 5)
    freed = x * 2
    freed_ref = freed._resolve()
    researcher.ping()  # the op has reached the owner, so the worker has it before we ask
    assert owner.worker_usage().used_bytes > 0
    freed.delete()
    researcher.ping()
    assert owner.worker_usage().used_bytes == 0
    # a hostile researcher asks for the freed object anyway
    handle = researcher.request(freed_ref, "after delete", "x * 2")
    with pytest.raises(duet.RequestError, match="does not exist"):
        handle.result(5)
    with pytest.raises(duet.DuetError, match="was deleted"):
        freed.get("deleted", timeout=5)
    assert owner.requests.pending == []


def test_dropped_pointers_are_freed_on_the_owner(pair: Pair) -> None:
    owner, researcher = pair
    owner.share(np.zeros(1000), name="x")
    x = researcher.store.wait_for("x", 5)
    pointers = [x + i for i in range(20)]
    researcher.ping()
    assert owner.worker_usage().used_bytes == 20 * 8000
    del pointers
    gc.collect()
    researcher.ping()
    assert owner.worker_usage().used_bytes == 0
    assert owner.worker_usage().objects == 0


def test_bool_len_iter_and_local_numpy_explain_themselves(pair: Pair) -> None:
    owner, researcher = pair
    owner.share(np.arange(3), name="x")
    x = researcher.store.wait_for("x", 5)
    for use in (lambda: bool(x > 1), lambda: len(x), lambda: list(x), lambda: np.asarray(x),
                lambda: float(x), lambda: [0, 1][x]):
        with pytest.raises(TypeError, match="lives on the owner"):
            use()
    with pytest.raises(TypeError, match="pickled"):
        import pickle

        pickle.dumps(x)
    owner.requests.add_rule("approve")
    reflected = np.arange(3) + x  # numpy defers to the pointer: computed remotely
    assert isinstance(reflected, duet.Pointer)
    assert list(reflected.get("reflected", timeout=5)) == [0, 2, 4]


def test_no_grad_and_remote_modules(pair: Pair) -> None:
    owner, researcher = pair
    owner.share(torch.randn(8, 4), name="X")
    owner.requests.add_rule("approve")
    X = researcher.store.wait_for("X", 5)
    layer = researcher.torch.nn.Linear(4, 2)
    with researcher.torch.no_grad():
        out = layer(X)
    assert out.requires_grad.get("flag", timeout=5) is False
    assert layer(X).requires_grad.get("flag", timeout=5) is True
    state = layer.state_dict().get("weights", timeout=5)
    assert set(state) == {"weight", "bias"} and state["weight"].shape == (2, 4)


@pytest.mark.parametrize("hello, message", [
    (p.Hello(version=999, role="researcher"), "protocol version 999"),
    (p.Hello(version=p.PROTOCOL_VERSION, role="owner"), "both peers are owners"),
])
def test_incompatible_peer_is_refused(tmp_path: Path, hello: p.Hello, message: str) -> None:
    from duet.loop import LoopThread
    from duet.transport import InMemoryTransport

    owner = OwnerSession(audit_path=tmp_path / "audit.db")
    peer_loop = LoopThread()
    a, b = InMemoryTransport.pair()
    try:
        owner.start(a.start)
        peer_loop.run(b.start(), timeout=5)
        b.set_handlers(lambda header, buffers: None, lambda reason: None)
        peer_loop.run(b.send(*p.encode(hello)), timeout=5)
        with pytest.raises(duet.PairingError, match=message):
            owner._wait_ready(5)
        assert not owner.connected
    finally:
        owner.close()
        peer_loop.stop()


def test_close_is_idempotent_and_fails_pending_calls(pair: Pair) -> None:
    owner, researcher = pair
    owner.share(np.arange(3), name="x")
    handle = researcher.store.wait_for("x", 5).request("later")
    owner.requests.wait(5)
    researcher.close()
    researcher.close()
    with pytest.raises(duet.ConnectionLost):
        handle.result(5)
    eventually(lambda: not owner.connected)
    with pytest.raises(duet.RequestError, match="left|closed"):
        owner.requests[0].approve()
    assert owner.audit.events(event="value_sent") == []
    with pytest.raises(duet.ConnectionLost):
        researcher.store["x"] + 1


def test_audit_log_records_a_whole_session(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    with session_pair(path) as (owner, researcher):
        owner.share(np.arange(10.0), name="ages")
        ages = researcher.store.wait_for("ages", 5)
        handle = researcher.np.mean(ages).request("mean")
        owner.requests.wait(5).approve()  # type: ignore[union-attr]
        handle.result(5)
        denied = ages.request("raw")
        owner.requests.wait(5).deny("no")  # type: ignore[union-attr]
        with pytest.raises(duet.RequestDenied):
            denied.result(5)
    events = [e.event for e in duet.AuditLog(path, readonly=True)]
    for expected in ["session_started", "peer_authenticated", "share", "op_executed",
                     "request", "decision", "value_sent", "disconnect", "session_closed"]:
        assert expected in events, expected
    assert events.index("decision") < events.index("value_sent")


def test_owner_changes_the_allowlist_mid_session(pair: Pair) -> None:
    owner, researcher = pair
    owner.share(np.arange(8.0), name="x")
    owner.requests.add_rule("approve")
    x = researcher.store.wait_for("x", 5)
    with pytest.raises(duet.PolicyViolation):
        researcher.np.fft.rfft(x)
    owner.allow("numpy.fft.rfft")
    eventually(lambda: "numpy.fft.rfft" in researcher.allowlist.functions)
    assert len(researcher.np.fft.rfft(x).get("spectrum", timeout=5)) == 5
    owner.deny("numpy.mean")
    eventually(lambda: "numpy.mean" not in researcher.allowlist.functions)
    with pytest.raises(duet.PolicyViolation):
        researcher.np.mean(x)
    with pytest.raises(ValueError):
        owner.allow("numpy.load")
    changes = [e.detail for e in owner.audit.events(event="allowlist_changed")]
    assert changes == [{"change": "allow", "names": ["numpy.fft.rfft"]},
                       {"change": "deny", "names": ["numpy.mean"]}]


def test_scalars_containers_and_modules_can_be_shared(pair: Pair) -> None:
    owner, researcher = pair
    owner.share(41, name="answer")
    owner.share({"a": np.arange(3), "b": torch.ones(2)}, name="bundle")
    owner.share(torch.nn.Linear(2, 1), name="model", description="the owner's model")
    owner.requests.add_rule("approve")
    researcher.store.wait_for("model", 5)
    assert (researcher.store["answer"] + 1).get("answer", timeout=5) == 42
    assert researcher.store["bundle"]["a"].sum().get("sum", timeout=5) == 3
    out = researcher.store["model"](researcher.torch.ones(1, 2))
    assert out.shape.get("shape", timeout=5) == (1, 1)
    with pytest.raises(duet.RemoteError, match="state_dict"):  # approved by the rule
        researcher.store["model"].get("the module itself", timeout=5)
    weights = researcher.store["model"].state_dict().get("weights", timeout=5)
    assert set(weights) == {"weight", "bias"}
    assert researcher.store.info("model").type.endswith("Linear")


def test_large_transfers_show_a_progress_bar(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    config = duet.SessionConfig(progress=True, progress_threshold=1024 * 1024)
    with session_pair(tmp_path / "audit.db", researcher_config=config) as (owner, researcher):
        owner.share(np.zeros(512 * 1024), name="big")  # 4 MiB
        owner.share(np.zeros(10), name="small")
        owner.requests.add_rule("approve")
        researcher.store.wait_for("small", 5)
        assert researcher.store["small"].get("small", timeout=5).shape == (10,)
        assert "duet transfer" not in capsys.readouterr().err
        assert researcher.store["big"].get("big", timeout=10).nbytes == 4 * 1024 * 1024
        err = capsys.readouterr().err
        assert "duet transfer" in err and "4.00M" in err


def test_traffic_keeps_flowing_while_the_owner_computes(pair: Pair) -> None:
    owner, researcher = pair
    owner.share(np.random.default_rng(0).random((1200, 1200)), name="m")
    owner.requests.add_rule("approve")
    m = researcher.store.wait_for("m", 5)
    slow = m
    for _ in range(4):  # seconds of linear algebra, in order, on the owner's worker
        slow = researcher.np.linalg.inv(slow @ m.T + m)
    handle = slow.sum().request("after the long computation")
    for _ in range(3):
        researcher.ping()  # the owner's loop answers while its worker is busy
    assert not handle.done
    assert owner.connected and researcher.connected
    assert isinstance(handle.result(120), float)


def test_researcher_and_owner_read_the_same_lineage(pair: Pair) -> None:
    owner, researcher = pair
    owner.share(np.arange(12.0).reshape(3, 4), name="x")
    x = researcher.store.wait_for("x", 5)
    expressions = [
        researcher.np.mean(x * 2, axis=0), -x[0, 1:3], abs(x[..., ::2]) @ x[:2],
        x.astype(float).sum(), researcher.np.concatenate([x, x[:1]]), (1 - x) / 3,
        researcher.np.where(x > 5, x, 0.5), x.reshape((4, 3)).T[1],
    ]
    for pointer in expressions:
        handle = pointer.request("same text?")
        request = owner.requests.wait(10)
        assert request is not None and request.lineage == handle.lineage == pointer.lineage
        request.deny()


def test_a_session_lowers_the_gil_switch_interval_and_never_raises_it(tmp_path: Path) -> None:
    """The loop shares the GIL with the kernel's other threads: a session asks for short
    slices (``SessionConfig.switch_interval``), leaves a shorter setting alone, and with
    ``None`` does not touch the interpreter."""
    before = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.005)
        OwnerSession(audit_path=tmp_path / "a.db").close()
        assert sys.getswitchinterval() == pytest.approx(SessionConfig().switch_interval)
        sys.setswitchinterval(0.0001)
        OwnerSession(audit_path=tmp_path / "b.db").close()
        assert sys.getswitchinterval() == pytest.approx(0.0001)
        sys.setswitchinterval(0.005)
        OwnerSession(SessionConfig(switch_interval=None), audit_path=tmp_path / "c.db").close()
        assert sys.getswitchinterval() == pytest.approx(0.005)
    finally:
        sys.setswitchinterval(before)


def test_a_stall_of_this_loop_is_not_the_peers_silence() -> None:
    """A loop held up past the liveness timeout (a flood of huge op batches decoded on a busy
    machine) has the peer's frames still unread behind it: the peer gets the whole timeout
    again from the end of the stall, and a peer that stays silent is then still found."""
    from duet.session import Liveness

    liveness = Liveness(interval=1.0, timeout=10.0, now=0.0)
    assert [liveness.silence(float(t), last_heard=0.0) for t in range(1, 11)] == [None] * 10
    assert liveness.silence(11.0, last_heard=0.0) == 11.0  # silent for longer than 10 s
    liveness = Liveness(interval=1.0, timeout=10.0, now=0.0)
    assert liveness.silence(1.0, last_heard=1.0) is None
    assert liveness.silence(30.0, last_heard=1.0) is None  # this loop stalled for 29 s
    assert [liveness.silence(float(t), last_heard=1.0) for t in range(31, 41)] == [None] * 10
    assert liveness.silence(41.0, last_heard=1.0) == 11.0  # silent 11 s since the stall
    assert liveness.silence(42.0, last_heard=41.5) is None  # heard again
