"""Differential privacy with a budget: the mechanisms, which inputs qualify, the ledger, and
the request flow between a researcher, the owner's kernel and its worker."""

from __future__ import annotations

import math
import statistics
import threading
from pathlib import Path

import numpy as np
import pytest

import duet
from duet import protocol as p
from duet.dp import DP, Derivations, DPQuery, parse_op
from duet.ledger import Ledger
from tests.helpers import rawwire
from tests.helpers.sessions import eventually, session_pair

WAIT = 120  # seconds: generous on a loaded machine; never a timing assertion
AGES = np.random.default_rng(7).uniform(18, 90, 2000)


def op(result: int, name: str, *args: object, **kwargs: object) -> p.Op:
    return rawwire.op(result, name, args=list(args), kwargs=dict(kwargs))


def tracker(kind: str = "values") -> Derivations:
    return Derivations({"ages": {"kind": kind, "bounds": {"ages": [18.0, 90.0]},
                                 "contributions": 1, "unit": None, "categories": {}}})


# -- the owner's declaration --------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [
    {"epsilon": -1.0}, {"epsilon": math.nan}, {"epsilon": math.inf},
    {"epsilon": 1.0, "delta": 1.0}, {"epsilon": 1.0, "bounds": (90, 18)},
    {"epsilon": 1.0, "bounds": (0, math.inf)}, {"epsilon": 1.0, "contributions": 0},
])
def test_bad_declarations_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        DP(**kwargs)  # type: ignore[arg-type]


def test_declared_categories_are_checked_for_the_owner() -> None:
    with pytest.raises(ValueError, match="distinct"):
        DP(epsilon=1.0, categories={"sex": ["F", "F"]})


def test_dp_needs_a_1d_array_or_a_table() -> None:
    with pytest.raises(TypeError):
        DP(epsilon=1.0, bounds=(0, 1)).spec("m", np.zeros((3, 3)))
    with pytest.raises(ValueError):
        DP(epsilon=1.0, bounds={"other": (0, 1)}).spec("m", np.zeros(3))
    assert DP(epsilon=1.0, bounds=(0, 1)).spec("m", np.zeros(3))["bounds"] == {"m": [0.0, 1.0]}


# -- which inputs qualify ------------------------------------------------------------------
def test_row_stable_steps_keep_the_mark() -> None:
    d = tracker()
    x = p.StoreRef("ages")
    d.observe(op(1, "operator.gt", x, 50))                      # mask
    d.observe(op(2, "operator.getitem", x, p.PointerRef(1)))    # filter
    d.observe(op(3, "operator.mul", p.PointerRef(2), 2))        # arithmetic with a number
    d.observe(op(4, "numpy.log", p.PointerRef(3)))              # element-wise function
    spec = parse_op(op(5, "dp.mean", p.PointerRef(4), epsilon=0.5), d)
    assert (spec.source, spec.column, spec.bounds, spec.cost) == ("ages", "ages", (18.0, 90.0),
                                                                  (0.5, 0.0))


@pytest.mark.parametrize("steps", [
    [op(1, "numpy.sort", p.StoreRef("ages"))],                                   # reorders
    [op(1, "numpy.concatenate", [p.StoreRef("ages"), p.StoreRef("ages")])],      # duplicates
    [op(1, "numpy.repeat", p.StoreRef("ages"), 2)],
    [op(1, "numpy.tile", p.StoreRef("ages"), 2)],
    [op(1, "operator.add", p.StoreRef("ages"), np.ones(2000))],                  # sent array
    [op(1, "numpy.argsort", p.StoreRef("ages")),                                 # fancy index
     op(2, "operator.getitem", p.StoreRef("ages"), p.PointerRef(1))],
    [op(1, "operator.getitem", p.StoreRef("ages"), [0, 0, 0])],                  # repeats rows
    [op(2, "operator.gt", p.StoreRef("ages"), 50),                               # two filters:
     op(3, "operator.getitem", p.StoreRef("ages"), p.PointerRef(2)),             # rows differ
     op(1, "operator.add", p.PointerRef(3), p.StoreRef("ages"))],
    [op(2, "operator.gt", p.StoreRef("ages"), 50),
     op(3, "operator.getitem", p.StoreRef("ages"), p.PointerRef(2)),
     op(1, "operator.getitem", p.PointerRef(3), p.PointerRef(2))],               # stale mask
    [op(1, "operator.getitem", p.StoreRef("ages"), slice(None, None, -1))],      # reversed
    [rawwire.op(2, "dropna", kind="method", target=p.StoreRef("ages")),          # rows differ
     op(1, "operator.sub", p.PointerRef(2), p.StoreRef("ages"))],
])
def test_anything_else_loses_the_mark(steps: list[p.Op]) -> None:
    d = tracker()
    for step in steps:
        d.observe(step)
    with pytest.raises(duet.PolicyViolation, match="row-stable"):
        parse_op(op(20, "dp.sum", p.PointerRef(1), epsilon=0.5), d)


@pytest.mark.parametrize("step, kept", [
    (rawwire.op(1, "astype", kind="method", target=p.StoreRef("ages"), args=["int64"]), False),
    (rawwire.op(1, "astype", kind="method", target=p.StoreRef("ages"),
                args=[p.DTypeRef("torch.long")]), False),
    (rawwire.op(1, "astype", kind="method", target=p.StoreRef("ages"), args=["bool"]), False),
    (rawwire.op(1, "astype", kind="method", target=p.StoreRef("ages"), args=["float32"]), True),
    (rawwire.op(1, "astype", kind="method", target=p.StoreRef("ages"),
                args=[p.DTypeRef("float")]), True),
    (op(1, "operator.floordiv", p.StoreRef("ages"), p.StoreRef("ages")), False),
    (op(1, "operator.mod", p.StoreRef("ages"), p.StoreRef("ages")), False),
    (op(1, "operator.pow", p.StoreRef("ages"), p.StoreRef("ages")), False),
    (op(1, "operator.floordiv", p.StoreRef("ages"), 7), True),
    (op(1, "operator.truediv", p.StoreRef("ages"), p.StoreRef("ages")), True),
])
def test_a_step_that_could_fail_on_one_value_loses_the_mark(step: p.Op, kept: bool) -> None:
    """Found by the red team: ``astype("int64")`` fails on a missing value, ``x // y`` on a
    zero in ``y``. A query over such a step failed on one row's value and was answered
    otherwise: a bit about that row no noise covers, charged nothing when it failed. Such
    steps lose the mark whatever the data, so the query is refused at once."""
    d = tracker()
    d.observe(step)
    query = op(20, "dp.count", p.PointerRef(1), epsilon=0.5)
    if kept:
        parse_op(query, d)
    else:
        with pytest.raises(duet.PolicyViolation, match="row-stable"):
            parse_op(query, d)


def test_a_freed_filters_id_names_no_other_row_set() -> None:
    """Ids of freed objects may be used again: a filter given the id of a freed one is
    another row set, and objects over the two do not combine (a DP count that answers
    only when min(x) is above t would be a free bit about one record)."""
    d = tracker()
    ages = p.StoreRef("ages")
    d.observe(op(2, "operator.gt", ages, 50))
    d.observe(op(3, "operator.getitem", ages, p.PointerRef(2)))        # rows over 50
    d.observe(op(4, "operator.mul", p.PointerRef(3), 1.0))             # of those rows
    d.forget([3])                                                      # freed
    d.observe(op(5, "operator.lt", ages, 70))
    d.observe(op(3, "operator.getitem", ages, p.PointerRef(5)))        # rows under 70
    d.observe(op(1, "operator.add", p.PointerRef(4), p.PointerRef(3)))
    with pytest.raises(duet.PolicyViolation, match="row-stable"):
        parse_op(op(20, "dp.sum", p.PointerRef(1), epsilon=0.5), d)
    d.observe(op(6, "operator.add", p.PointerRef(3), p.PointerRef(3)))  # one row set: fine
    parse_op(op(21, "dp.sum", p.PointerRef(6), epsilon=0.5), d)


@pytest.mark.parametrize("kwargs,match", [
    ({"epsilon": 0.5, "bounds": [0, 1000]}, "owner declared"),
    ({"epsilon": 0.5, "delta": 0.5}, "owner declared"),
    ({"epsilon": 0.5, "contributions": 1}, "owner declared"),
    ({"epsilon": -1.0}, "epsilon must be"),
    ({"epsilon": math.nan}, "epsilon must be"),
    ({"epsilon": math.inf}, "epsilon must be"),
    ({"epsilon": 1e308}, "epsilon must be"),
    ({"epsilon": 0.0}, "epsilon must be"),
    ({"epsilon": True}, "epsilon must be"),
    ({"epsilon": "1"}, "epsilon must be"),
    ({}, "epsilon must be"),
    ({"epsilon": 0.5, "by": p.StoreRef("ages")}, "categories"),
    ({"epsilon": 0.5, "eval": "x"}, "not eval"),
])
def test_forged_parameters_are_refused(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(duet.PolicyViolation, match=match):
        parse_op(op(2, "dp.sum", p.StoreRef("ages"), **kwargs), tracker())


def test_dp_on_data_shared_without_dp_is_refused() -> None:
    with pytest.raises(duet.PolicyViolation, match="row-stable"):
        parse_op(op(2, "dp.count", p.StoreRef("other"), epsilon=0.5), tracker())


# -- the mechanisms (OpenDP) -----------------------------------------------------------------
def query(statistic: str, values: np.ndarray, epsilon: float, **kwargs: object) -> DPQuery:
    spec = parse_op(op(2, f"dp.{statistic}", p.StoreRef("ages"), epsilon=epsilon, **kwargs),
                    tracker())
    return DPQuery(spec, values)


def test_count_noise_is_centred_with_the_quoted_scale() -> None:
    q = query("count", AGES[:100], 0.5)
    released = [q.evaluate()[0] for _ in range(400)]
    quote = q.evaluate()[1]
    assert quote.scale == "2" and quote.epsilon == 0.5
    assert abs(statistics.mean(released) - 100) < 0.6  # scale 2: std of the mean ~0.14
    # discrete Laplace with scale 2 has standard deviation about 2.8; exact answers would be 0
    assert 2.0 < statistics.stdev(released) < 3.6
    assert all(isinstance(v, int) for v in released)


def test_mean_clamps_to_the_owners_bounds() -> None:
    outliers = np.concatenate([AGES, [1e9] * 10, [np.nan] * 10])
    value, quote = query("mean", outliers, 50.0).evaluate()
    assert 18 <= value <= 90 and abs(value - AGES.mean()) < 2
    assert "±" in quote.accuracy and "OpenDP" in quote.mechanism


def test_sum_histogram_quantile_and_variance_are_near_the_truth() -> None:
    s = query("sum", AGES, 50.0).evaluate()[0]
    assert abs(s - AGES.sum()) < 0.01 * AGES.sum()
    hist = query("histogram", AGES, 50.0, bins=[18.0, 54.0, 90.0]).evaluate()[0]
    assert hist["edges"] == [18.0, 54.0, 90.0] and sum(hist["counts"]) == pytest.approx(2000,
                                                                                         abs=10)
    median = query("quantile", AGES, 50.0).evaluate()[0]
    assert abs(median - np.median(AGES)) < 3
    var = query("variance", AGES, 50.0).evaluate()[0]
    assert abs(var - AGES.var()) < 0.1 * AGES.var()


# -- the ledger ------------------------------------------------------------------------------
def test_ledger_reserves_commits_and_releases(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    ledger.declare("ages", 1.0, 1e-6)
    ledger.reserve("ages", 0.4, 0.0, "a")
    ledger.reserve("ages", 0.4, 0.0, "b")
    with pytest.raises(duet.PrivacyBudgetExceeded, match="'ages'") as refused:
        ledger.reserve("ages", 0.4, 0.0, "c")
    assert refused.value.budget == "ages" and refused.value.epsilon_left == pytest.approx(0.2)
    ledger.commit("a")
    ledger.release("b")
    budget = ledger.budget("ages")
    assert budget.epsilon_spent == pytest.approx(0.4) and budget.epsilon_left == pytest.approx(0.6)
    ledger.record_unbounded("ages", "exact")
    assert ledger.budget("ages").epsilon_left == 0
    with pytest.raises(duet.PrivacyBudgetExceeded, match="exact value"):
        ledger.reserve("ages", 1e-6, 0.0, "d")


def test_a_reservation_left_by_a_crash_counts_as_spent(tmp_path: Path) -> None:
    first = Ledger(tmp_path / "ledger.sqlite3")
    first.declare("ages", 1.0, 0.0)
    first.reserve("ages", 0.7, 0.0, "left-behind")  # the process dies before deciding
    second = Ledger(tmp_path / "ledger.sqlite3")
    assert second.budget("ages").epsilon_left == pytest.approx(0.3)
    assert second.declare("ages", 1.0, 0.0).epsilon_spent == pytest.approx(0.7)


def test_concurrent_reservations_cannot_overspend(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    Ledger(path).declare("ages", 1.0, 0.0)
    ledgers = [Ledger(path) for _ in range(4)]  # separate connections, like processes
    granted: list[str] = []
    barrier = threading.Barrier(20)

    def spend(i: int) -> None:
        barrier.wait()
        try:
            ledgers[i % 4].reserve("ages", 0.1, 0.0, f"r{i}")
            granted.append(f"r{i}")
        except duet.PrivacyBudgetExceeded:
            pass

    threads = [threading.Thread(target=spend, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(granted) == 10
    assert ledgers[0].budget("ages").epsilon_spent == pytest.approx(1.0)


# -- the request flow ------------------------------------------------------------------------
def shared(owner: duet.OwnerSession, researcher: duet.ResearcherSession,
           epsilon: float = 1.0) -> duet.Pointer:
    owner.share(AGES, name="ages", dp=duet.DP(epsilon=epsilon, bounds=(18, 90)))
    eventually(lambda: "ages" in researcher.store)
    return researcher.store["ages"]


def test_dp_requests_show_the_owner_cost_accuracy_and_budget(tmp_path: Path) -> None:
    with session_pair(tmp_path / "audit.sqlite3") as (owner, researcher):
        x = shared(owner, researcher)
        handle = researcher.dp.mean(x[x > 40], epsilon=0.25).request("mean age over 40")
        request = owner.requests.wait(WAIT)
        assert request is not None and request.dp is not None
        assert request.dp.kind == "dp" and request.dp.epsilon == 0.25
        assert request.dp.epsilon_left == pytest.approx(0.75)  # reserved: counts as spent
        assert "±" in request.dp.accuracy and request.dp.scale
        for text in (repr(owner.requests), owner.requests._repr_html_()):
            assert "ε=0.25" in text and "budget left after: ε=0.75" in text
        request.approve()
        assert 40 <= handle.result(WAIT) <= 90
        assert owner.budget("ages").epsilon_spent == pytest.approx(0.25)
        assert list(owner.budgets) == ["ages"]  # what %duet status lists
        assert "0.25 spent of 1 (0.75 left)" in str(owner.budgets["ages"])
        charges = [e.detail["status"] for e in owner.audit.events(event="dp_charge")]
        assert charges == ["reserved", "spent"]


def test_denied_and_withdrawn_requests_spend_nothing(tmp_path: Path) -> None:
    with session_pair(tmp_path / "audit.sqlite3") as (owner, researcher):
        x = shared(owner, researcher)
        handle = researcher.dp.sum(x, epsilon=0.5).request("total")
        request = owner.requests.wait(WAIT)
        assert request is not None
        request.deny("not now")
        with pytest.raises(duet.RequestDenied):
            handle.result(WAIT)
        handle = researcher.dp.sum(x, epsilon=0.5).request("total again")
        eventually(lambda: len(owner.requests.pending) == 1, WAIT)
        handle.withdraw()
        eventually(lambda: not owner.requests.pending, WAIT)
        eventually(lambda: owner.budget("ages").reserved == 0, WAIT)
        assert owner.budget("ages").epsilon_spent == 0


def test_over_budget_is_refused_before_anything_is_computed(tmp_path: Path) -> None:
    with session_pair(tmp_path / "audit.sqlite3") as (owner, researcher):
        x = shared(owner, researcher, epsilon=0.5)
        owner.requests.add_rule("approve", dp_within_budget=True)
        assert isinstance(researcher.dp.count(x, epsilon=0.4).get("n", timeout=WAIT), int)
        with pytest.raises(duet.PrivacyBudgetExceeded, match="'ages'") as refused:
            researcher.dp.mean(x, epsilon=0.2).get("mean", timeout=WAIT)
        assert refused.value.budget == "ages"
        # nothing reached the queue or the worker: the only request is the first one
        assert len(owner.requests) == 1
        refusals = [e for e in owner.audit.events(event="dp_charge")
                    if e.detail["status"] == "refused"]
        assert len(refusals) == 1 and refusals[0].detail["epsilon"] == 0.2
        budget = owner.budget("ages")
        assert budget.epsilon_spent == pytest.approx(0.4)
        assert budget.epsilon_left == pytest.approx(0.1)


def test_concurrent_requests_cannot_overspend(tmp_path: Path) -> None:
    with session_pair(tmp_path / "audit.sqlite3") as (owner, researcher):
        x = shared(owner, researcher, epsilon=1.0)
        owner.requests.add_rule("approve", dp_within_budget=True)
        handles = [researcher.dp.count(x, epsilon=0.3).request(f"n{i}") for i in range(10)]
        outcomes = []
        for handle in handles:
            try:
                handle.result(WAIT)
                outcomes.append("ok")
            except duet.PrivacyBudgetExceeded:
                outcomes.append("refused")
        assert outcomes.count("ok") == 3 and outcomes.count("refused") == 7
        assert owner.budget("ages").epsilon_spent == pytest.approx(0.9)


def test_exact_release_of_dp_data_is_unbounded_loss_and_never_auto_approved(
        tmp_path: Path) -> None:
    with session_pair(tmp_path / "audit.sqlite3") as (owner, researcher):
        x = shared(owner, researcher)
        owner.requests.add_rule("approve", max_elements=1)  # would release any scalar
        owner.requests.add_rule("approve", dp_within_budget=True)
        handle = researcher.np.mean(x).request("exact mean")
        request = owner.requests.wait(WAIT)
        assert request is not None and request.dp is not None and request.dp.kind == "exact"
        assert request.status == "pending"  # no rule approves unbounded loss
        assert "EXACT release of DP-protected ages" in repr(owner.requests)
        request.approve()
        assert handle.result(WAIT) == pytest.approx(AGES.mean())
        assert owner.budget("ages").unbounded and owner.budget("ages").epsilon_left == 0
        with pytest.raises(duet.PrivacyBudgetExceeded, match="exact value"):
            researcher.dp.count(x, epsilon=0.1).get("n", timeout=WAIT)


def test_grouped_counts_and_means_use_public_keys(tmp_path: Path) -> None:
    with session_pair(tmp_path / "audit.sqlite3") as (owner, researcher):
        x = shared(owner, researcher, epsilon=100.0)
        owner.requests.add_rule("approve", dp_within_budget=True)
        old = x > 60
        groups = researcher.dp.count(x, epsilon=50.0, by=old, categories=[True, False])
        counts = groups.get("old vs young", timeout=WAIT)
        assert set(counts) == {"True", "False"}
        assert counts["True"] == pytest.approx(int((AGES > 60).sum()), abs=5)
        means = researcher.dp.mean(x, epsilon=40.0, by=x > 60, categories=[True, False, 7])
        result = means.get("means", timeout=WAIT)
        assert result["True"] == pytest.approx(AGES[AGES > 60].mean(), abs=1)
        assert set(result) == {"True", "False", "7"}  # keys chosen by the researcher only
        with pytest.raises(duet.PolicyViolation, match="public keys"):
            researcher.dp.mean(x, epsilon=1.0, by=old).get("no keys", timeout=WAIT)


def test_dp_on_a_non_dp_share_or_a_duplicated_input_is_refused_at_once(tmp_path: Path) -> None:
    with session_pair(tmp_path / "audit.sqlite3") as (owner, researcher):
        x = shared(owner, researcher)
        owner.share(AGES, name="plain")
        eventually(lambda: "plain" in researcher.store)
        with pytest.raises(duet.PolicyViolation, match="row-stable"):
            researcher.dp.count(researcher.store["plain"], epsilon=0.1).get("n", timeout=WAIT)
        doubled = researcher.np.concatenate([x, x])
        with pytest.raises(duet.PolicyViolation, match="row-stable"):
            researcher.dp.sum(doubled, epsilon=0.1).get("sum", timeout=WAIT)
        with pytest.raises(TypeError, match="bounds"):  # not even spelled (raw wire: below)
            researcher.dp.sum(x, epsilon=0.1, bounds=[0, 1])  # type: ignore[call-arg]
        assert owner.budget("ages").epsilon_spent == 0 and not owner.requests.pending


def test_raw_wire_forgeries_are_refused_and_charge_nothing(tmp_path: Path) -> None:
    with session_pair(tmp_path / "audit.sqlite3") as (owner, researcher):
        shared(owner, researcher)
        received = rawwire.record_received(researcher)
        forged = [
            {"epsilon": 0.5, "bounds": [0.0, 1e12]},
            {"epsilon": -3.0}, {"epsilon": math.nan}, {"epsilon": 1e300}, {"epsilon": 0.0},
            {"epsilon": 0.5, "scale": 0.0}, {"epsilon": 0.5, "delta": 0.9},
        ]
        ids = []
        for kwargs in forged:
            ids.append(rawwire.new_id(researcher))
            rawwire.send_raw(researcher, rawwire.op(ids[-1], "dp.sum", args=[p.StoreRef("ages")],
                                                    kwargs=kwargs))
        # a DP statistic spelled as a method (the allowlist refuses it), and one that is none
        method = rawwire.new_id(researcher)
        rawwire.send_raw(researcher, rawwire.op(method, "dp.mean", kind="method",
                                                target=p.StoreRef("ages"),
                                                kwargs={"epsilon": 0.5}))
        ids.append(rawwire.new_id(researcher))
        rawwire.send_raw(researcher, rawwire.op(ids[-1], "dp.exact_mean",
                                                args=[p.StoreRef("ages")],
                                                kwargs={"epsilon": 0.5}))
        for object_id in ids:  # ask for every one of them anyway
            rawwire.send_raw(researcher, p.RequestValue(
                request_id=f"{object_id:016x}", target=p.PointerRef(object_id), reason="x"))
        eventually(lambda: sum(m.type == "decision" for m in received) == len(ids), WAIT)
        refusals = [m for m in received if m.type == "op_failed"]
        assert len(refusals) == len(ids) + 1 and all(r.policy for r in refusals)
        assert all(m.status == "error" for m in received if m.type == "decision")
        assert owner.budget("ages").epsilon_spent == 0 and not owner.requests.pending
        assert owner.connected and researcher.connected


def test_the_panel_and_tables_say_privacy_in_words() -> None:
    from duet.approvals import DPInfo, Request, ValueInfo
    from kernel_ext.display import request_html

    info = ValueInfo("float", None, None, 1, 8)
    released = Request(id="a1", reason="", lineage="dp.mean(ages)", sources=frozenset({"ages"}),
                       info=info, preview="55.1",
                       dp=DPInfo("dp", ("ages",), 0.5, 0.0, "Laplace (OpenDP)", "180", "±5.2",
                                 0.25))
    exact = Request(id="b2", reason="", lineage="numpy.mean(ages)", sources=frozenset({"ages"}),
                    info=info, preview="55.2", dp=DPInfo("exact", ("ages",)))
    shown = request_html(released)
    assert "differentially private" in shown and "ε=0.5" in shown and "±5.2" in shown
    assert "noise scale 180" in shown and "budget left after: ε=0.25" in shown
    assert "EXACT release of DP-protected ages" in request_html(exact)
    assert "unbounded" in request_html(exact) and "unbounded" in repr(exact)


def test_a_dict_of_columns_is_a_table_with_a_privacy_unit() -> None:
    people = np.array([1, 1, 2, 3, 3, 3])
    table = {"person": people, "bmi": np.linspace(20, 30, 6)}
    spec = DP(epsilon=1.0, bounds={"bmi": (15, 50)}, unit="person").spec("visits", table)
    assert spec["kind"] == "table" and spec["contributions"] == 3  # person 3 has 3 rows
    with pytest.raises(ValueError, match="3 rows"):
        DP(epsilon=1.0, bounds={"bmi": (15, 50)}, unit="person", contributions=2).spec(
            "visits", table)
    with pytest.raises(TypeError):
        DP(epsilon=1.0).spec("ragged", {"a": np.zeros(3), "b": np.zeros(4)})
    d = Derivations({"visits": spec})
    d.observe(op(1, "operator.getitem", p.StoreRef("visits"), "bmi"))
    d.observe(op(2, "operator.getitem", p.StoreRef("visits"), "person"))
    grouped = parse_op(op(3, "dp.mean", p.PointerRef(1), epsilon=0.5, by=p.PointerRef(2),
                          categories=[1, 2, 3]), d)
    # one person's 3 rows can reach 3 groups: charged for each
    assert grouped.cost == (1.5, 0.0) and grouped.contributions == 3


def test_an_input_changed_in_place_loses_the_mark(tmp_path: Path) -> None:
    """``y.put`` writes other rows' values into y: a DP sum of y (or of what y makes) would
    count some rows twice. The worker refuses; nothing is charged."""
    with session_pair(tmp_path / "audit.sqlite3") as (owner, researcher):
        x = shared(owner, researcher)
        y = x * 1.0
        y.put(researcher.np.arange(1000), x[:1000])  # duplicate the first 1000 rows
        doubled = y + 0.0
        for value in (y, doubled):
            handle = researcher.dp.sum(value, epsilon=0.1).request("sum")
            request = owner.requests.wait(WAIT)
            assert request is not None and request.failed  # not a DP release
            assert request.dp is not None and request.dp.kind == "exact"
            request.deny("no")
            with pytest.raises(duet.RequestDenied):
                handle.result(WAIT)
        assert owner.budget("ages").epsilon_spent == 0 and owner.budget("ages").reserved == 0


def test_frames_columns_filters_groups_and_a_person_unit(tmp_path: Path) -> None:
    import pandas as pd

    rng = np.random.default_rng(3)
    df = pd.DataFrame({"person_id": np.repeat(np.arange(1500), 2),
                       "age": rng.uniform(18, 90, 3000), "bmi": rng.normal(27, 4, 3000),
                       "sex": rng.choice(["F", "M"], 3000)})
    with session_pair(tmp_path / "audit.sqlite3") as (owner, researcher):
        owner.share(df, name="patients", dp=duet.DP(
            epsilon=20.0, bounds={"age": (18, 90), "bmi": (15, 50)},
            categories={"sex": ["F", "M"]}, unit="person_id", contributions=2))
        owner.requests.add_rule("approve", dp_within_budget=True)
        p = researcher.store.wait_for("patients", WAIT)
        means = researcher.dp.mean(p["bmi"], epsilon=4.0, by=p["sex"]).get("m", timeout=WAIT)
        truth = df.groupby("sex")["bmi"].mean()
        assert set(means) == {"F", "M"}
        assert all(abs(means[k] - truth[k]) < 1.5 for k in ("F", "M"))
        older = p[(p["age"] > 60) & (p["sex"] == "F")]
        count = researcher.dp.count(older, epsilon=4.0).get("n", timeout=WAIT)
        assert abs(count - int(((df["age"] > 60) & (df["sex"] == "F")).sum())) < 15
        # a person has 2 rows and can reach both groups: the grouped mean costs 2 x 4.0
        assert owner.budget("patients").epsilon_spent == pytest.approx(12.0)
        merged = researcher.pd.merge(p, p, on="person_id")  # rows repeated per person
        with pytest.raises(duet.PolicyViolation, match="row-stable"):
            researcher.dp.mean(merged["bmi"], epsilon=1.0).get("m", timeout=WAIT)
        with pytest.raises(duet.PolicyViolation, match="no bounds"):
            researcher.dp.mean(p["person_id"], epsilon=1.0).get("ids", timeout=WAIT)
        with pytest.raises(duet.PrivacyBudgetExceeded):
            researcher.dp.count(p, epsilon=8.5).get("n", timeout=WAIT)


def test_a_dp_query_is_read_only_by_a_request(tmp_path: Path) -> None:
    """Its object holds a copy of the data: no operation may use it (kernel and worker)."""
    with session_pair(tmp_path / "audit.sqlite3") as (owner, researcher):
        x = shared(owner, researcher)
        query = researcher.dp.sum(x, epsilon=0.1)
        for attempt in (query + 0, query[0], researcher.np.array([query]),
                        researcher.np.sum([query, query])):
            with pytest.raises(duet.PolicyViolation, match="not an input"):
                attempt.get("inside", timeout=WAIT)
        assert owner.budget("ages").epsilon_spent == 0 and not owner.requests.pending


def test_grouped_sums_and_category_histograms_report_only_the_asked_keys() -> None:
    d = tracker()
    d.observe(op(1, "operator.gt", p.StoreRef("ages"), 60))
    spec = parse_op(op(2, "dp.sum", p.StoreRef("ages"), epsilon=50.0, by=p.PointerRef(1),
                       categories=[True, False]), d)
    sums, quote = DPQuery(spec, AGES, AGES > 60).evaluate()
    assert set(sums) == {"True", "False"} and "per group" in quote.accuracy
    assert sums["True"] == pytest.approx(AGES[AGES > 60].sum(), rel=0.01)
    colours = np.array(["red", "blue", "red", "green"] * 250)
    spec = parse_op(op(3, "dp.histogram", p.StoreRef("ages"), epsilon=50.0,
                       categories=["red", "blue"]), d)
    counts, _ = DPQuery(spec, colours).evaluate()
    assert set(counts) == {"red", "blue"}  # "green" is never reported: not asked for
    assert counts["red"] == pytest.approx(500, abs=5)


def test_a_reused_request_id_is_refused_before_any_charge(tmp_path: Path) -> None:
    with session_pair(tmp_path / "audit.sqlite3") as (owner, researcher):
        x = shared(owner, researcher)
        owner.requests.add_rule("approve", dp_within_budget=True)
        query = researcher.dp.count(x, epsilon=0.1)
        received = rawwire.record_received(researcher)
        for request_id in ("00000000000000aa", "00000000000000aa", "00000000000000cc"):
            rawwire.send_raw(researcher, p.RequestValue(request_id=request_id,
                                                        target=p.PointerRef(query.id)))
        eventually(lambda: sum(m.type == "decision" for m in received) == 2, WAIT)
        assert [m.status for m in received if m.type == "decision"] == ["approved"] * 2
        assert owner.budget("ages").epsilon_spent == pytest.approx(0.2)  # not 0.3
        assert owner.budget("ages").reserved == 0
        # a raw request for the DP-shared object itself is an exact release: never a rule's
        rawwire.send_raw(researcher, p.RequestValue(request_id="00000000000000bb",
                                                    target=p.StoreRef("ages")))
        eventually(lambda: bool(owner.requests.pending), WAIT)
        request = owner.requests.pending[0]
        assert request.dp is not None and request.dp.kind == "exact"
        assert owner.connected and researcher.connected
