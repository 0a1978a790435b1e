"""Disclosure checks across the process boundary: computed in the real worker, carried in
the snapshot, shown to the owner, used by rules, written to the audit log; and a hostile
researcher on the raw wire who tries to forge, skip or launder them."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

import duet
from duet import OwnerSession
from duet import protocol as p
from duet.approvals import Request
from duet.audit import AuditLog
from kernel_ext.display import request_html
from tests.helpers.rawwire import new_id, op, send_header, send_raw
from tests.helpers.sessions import Pair, eventually, session_pair

N = 120
AGES = np.r_[[91.0, 92.0, 93.0, 94.0, 95.0], np.linspace(20.0, 80.0, N - 5)]
IDS = np.arange(N, dtype=np.int64)


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    with session_pair(tmp_path / "audit.db") as sessions:
        owner, researcher = sessions
        owner.share(AGES, name="ages", description="patient ages")
        owner.share(IDS, name="ids")
        researcher.store.wait_for("ids", 60)
        yield sessions


def requested(owner: OwnerSession, count: int) -> list[Request]:
    eventually(lambda: len(owner.requests) >= count, timeout=180)
    return list(owner.requests)


def test_checks_arrive_with_every_request_and_rules_decide_on_them(pair: Pair,
                                                                   tmp_path: Path) -> None:
    owner, researcher = pair
    owner.requests.add_rule("approve", checks="pass")
    owner.requests.add_rule("deny", checks="fail")
    ages = researcher.store["ages"]
    assert researcher.np.mean(ages).get("mean age", timeout=180) == pytest.approx(AGES.mean())
    with pytest.raises(duet.RequestDenied, match="min_count"):
        researcher.np.mean(ages[ages > 90]).get("mean of the oldest", timeout=180)
    with pytest.raises(duet.RequestDenied, match="record_level"):
        (ages * 2).get("all ages doubled", timeout=180)
    unknown = researcher.np.sort(ages)[0:60].sum().request("sum of the youngest half")
    first, small, rows, review = requested(owner, 4)
    assert [r.check_status for r in (first, small, rows, review)] == ["pass", "fail", "fail",
                                                                      "review"]
    assert [r.status for r in (first, small, rows, review)] == ["approved", "denied", "denied",
                                                                "pending"]
    assert {c.name for c in small.checks} >= {"provenance", "min_count", "dominance"}
    review.deny("not this one")
    with pytest.raises(duet.RequestDenied):
        unknown.result(180)
    log = AuditLog(tmp_path / "audit.db", readonly=True)
    rows_logged = {e.request_id: e for e in log.events() if e.event == "request"}
    decisions = {e.request_id: e for e in log.events() if e.event == "decision"}
    for request in (first, small, rows, review):
        logged = rows_logged[request.id].detail
        assert logged["check_status"] == request.check_status
        assert [c["name"] for c in logged["checks"]] == [c.name for c in request.checks]
    assert decisions[small.id].detail["by"].startswith("rule:")
    assert any(c["name"] == "min_count" and c["status"] == "fail"
               for c in decisions[small.id].detail["checks"])
    assert "checks" not in decisions[review.id].detail  # decided by hand
    log.close()


def test_min_count_per_share(pair: Pair) -> None:
    owner, researcher = pair
    owner.share(AGES, name="lenient", min_count=5)
    lenient = researcher.store.wait_for("lenient", 60)
    researcher.np.mean(lenient[lenient > 90]).request("five")
    (request,) = requested(owner, 1)
    assert next(c for c in request.checks if c.name == "min_count").status == "pass"
    with pytest.raises(ValueError):
        owner.share(AGES, name="bad", min_count=0)


def test_a_differencing_attempt_does_not_pass_twice(pair: Pair) -> None:
    owner, researcher = pair
    ages, ids = researcher.store["ages"], researcher.store["ids"]
    researcher.np.mean(ages).request("everyone")
    researcher.np.mean(ages[ids != 17]).request("everyone but patient 17")
    first, second = requested(owner, 2)
    assert [first.check_status, second.check_status].count("pass") <= 1
    differencing = next(c for c in second.checks if c.name == "differencing")
    assert differencing.status == "review"
    assert differencing.evidence["overlaps"][0]["differ_by"] == 1


def test_the_owner_sees_status_words_and_one_line_per_check(pair: Pair) -> None:
    owner, researcher = pair
    ages = researcher.store["ages"]
    researcher.np.mean(ages[ages > 90]).request("mean of the oldest")
    (request,) = requested(owner, 1)
    text = repr(owner.requests)
    assert "fail: min_count" in text
    assert "FAIL    min_count: only 5 record(s) of 'ages' contributed" in text
    table = owner.requests._repr_html_()
    assert "FAIL</b>" in table and "#c62828" in table  # the word and the colour
    shown = request_html(request)
    assert shown.count('class="duet-check-line"') == len(request.checks)
    assert 'data-check-status="fail"' in shown and "the minimum is 10" in shown


# -- the hostile researcher ---------------------------------------------------------------
def test_claims_about_checks_in_a_request_are_refused(pair: Pair) -> None:
    owner, researcher = pair
    owner.requests.add_rule("approve", checks="pass")
    ages = researcher.store["ages"]
    rows = ages * 1
    researcher.np.zeros(1).get("sync", timeout=180)
    for extra in ({"checks": [{"name": "min_count", "status": "pass"}]},
                  {"check_status": "pass"}, {"provenance": {}}):
        fields = {"type": "request", "request_id": secrets.token_hex(8),
                  "target": msgpack.ExtType(1, msgpack.packb(rows.id)), "reason": "trust me",
                  **extra}
        send_header(researcher, msgpack.packb(fields))  # written by hand, never validated
    assert researcher.np.mean(ages).get("still up", timeout=180) == pytest.approx(AGES.mean())
    assert all(r.reason != "trust me" for r in owner.requests)  # never became requests
    refused = [e for e in owner.audit.events() if e.event == "protocol_error"]
    assert len(refused) >= 3
    assert owner.connected


def test_laundering_records_through_unmodelled_operations_ends_in_review(pair: Pair) -> None:
    """Record-level values passed through operations whose effect on records is not
    modelled never reach "pass" (the approve rule must leave them pending)."""
    owner, researcher = pair
    owner.requests.add_rule("approve", checks="pass")
    ages, ids = researcher.store["ages"], researcher.store["ids"]
    r = researcher
    attempts: dict[str, Any] = {
        "sorted slice": r.np.sort(ages)[0:1].sum(),
        "split piece": r.np.split(ages, 24)[0].sum(),
        "stacked copies": r.np.concatenate([ages[0:1]] * 20).mean(),
        "argsort order": ages[r.np.argsort(ages)][0:1].mean(),
        "transpose": r.np.transpose(r.np.stack([ages, ages])).sum(axis=0),
        "positions": r.np.where(ids == 3),
        "written into a blank": None,
    }
    blank = r.np.zeros(N)
    blank.put([0], ages[ids == 3])
    attempts["written into a blank"] = blank.sum()
    for name, pointer in attempts.items():
        pointer.request(name)
    found = requested(owner, len(attempts))
    statuses = {req.reason: (req.check_status, req.status) for req in found}
    assert all(status != "pass" and decision == "pending"
               for status, decision in statuses.values()), statuses


def test_raw_ops_cannot_smuggle_provenance(pair: Pair) -> None:
    owner, researcher = pair
    owner.requests.add_rule("approve", checks="pass")
    result = new_id(researcher)
    # an extra field on an op is refused by validation
    with pytest.raises(Exception):  # noqa: B017, PT011 - pydantic's error type
        p.Op.model_validate({"result": result, "kind": "function", "name": "numpy.mean",
                             "args": [p.StoreRef("ages")], "provenance": "aggregate"})
    # a request for a shared object itself: record-level, whatever the name
    send_raw(researcher, p.RequestValue(request_id=secrets.token_hex(8),
                                        target=p.StoreRef("ages"), reason="the whole thing"))
    # an operation that fails in the worker: whether it failed is data
    send_raw(researcher, op(result, "numpy.reshape", args=[p.StoreRef("ages"), 7]))
    send_raw(researcher, p.RequestValue(request_id=secrets.token_hex(8),
                                        target=p.PointerRef(result), reason="a failure"))
    whole, failed = requested(owner, 2)
    assert whole.check_status == "fail" and whole.status == "pending"
    assert failed.failed and failed.check_status == "review" and failed.status == "pending"
    assert owner.connected


def test_an_owner_away_lets_safe_table_results_through(pair: Pair) -> None:
    """The owner sets rules and steps away: group means come back, a mean over five
    patients and the raw rows are refused with the check that failed."""
    import pandas as pd

    owner, researcher = pair
    rng = np.random.default_rng(5)
    frame = pd.DataFrame({"age": np.r_[[95.0, 96.0, 97.0, 98.0, 99.0],
                                       rng.uniform(20, 80, 195)],
                          "ward": np.repeat(["a", "b", "c", "d"], 50),
                          "bmi": rng.normal(25, 4, 200)})
    owner.share(frame, name="patients", description="a clinical extract")
    owner.requests.add_rule("approve", checks="pass")
    owner.requests.add_rule("deny", checks="fail")
    patients = researcher.store.wait_for("patients", 60)
    means = patients.groupby("ward")["bmi"].mean().get("BMI by ward", timeout=180)
    assert isinstance(means, pd.Series)
    assert means.to_dict() == pytest.approx(frame.groupby("ward")["bmi"].mean().to_dict())
    with pytest.raises(duet.RequestDenied, match="min_count"):
        patients[patients["age"] > 90]["bmi"].mean().get("BMI of the oldest", timeout=180)
    with pytest.raises(duet.RequestDenied, match="record_level"):
        patients.get("the rows", timeout=180)
    assert [r.decided_by.startswith("rule:") for r in owner.requests] == [True] * 3
