"""Class 11: a summary the disclosure checks would hold cannot be laundered into one they pass.

The hostile researcher asks for nothing the checks would stop directly. Instead:

1. A summary (one patient's mean, a maximum, a median) is folded back into the records'
   values (``x * 0 + summary``, bin edges, a series' name) and summarized again: the summary
   travels with the records and its own checks still apply.
2. A table of text is summed per group: pandas joins the text, every record's value.
3. Rows silently dropped (a missing group key, a value outside ``cut``'s bins, a missing
   value skipped by a sum) are no records of the result, so differencing sees them (and
   sends the pair to review), and the number dropped is a count like any other.
4. Operations that move values between records (``shift``, ``diff``, running totals) are
   not treated as one value per record.

The first two end to end with the documented rules (approve on pass, deny on fail). What
the checks still do not catch is listed in docs/disclosure.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

import duet
from duet.protocol import StoreRef
from tests.duet.test_checks import AGES, Lab, ages
from tests.helpers.sessions import Pair, eventually, session_pair

N = 200
rng = np.random.default_rng(11)
PATIENTS = pd.DataFrame({
    "age": np.r_[[99.0], rng.integers(20, 90, N - 1)].astype(float),
    "bmi": rng.normal(25, 4, N),
    "income": np.r_[[5e8], rng.uniform(2e4, 6e4, N - 1)],
    "ward": np.repeat(["a", "b", "c", "d"], N // 4),
    "name": [f"patient-{i:03d}" for i in range(N)],
})
patients = StoreRef("patients")


@pytest.fixture
def lab() -> Lab:
    lab = Lab()
    lab.executor.share("patients", PATIENTS)
    return lab


def column(lab: Lab, name: str) -> Any:
    return lab.fn("operator.getitem", patients, name)


def reasons(lab: Lab, ref: Any) -> dict[str, tuple[str, str]]:
    return {c.name: (c.status, c.reason) for c in lab.checks(ref).values()}


# -- 1. summaries folded into the records -------------------------------------------------------
def test_one_patients_mean_added_to_every_row_fails_like_the_mean_itself(lab: Lab) -> None:
    one = lab.fn("numpy.mean", lab.fn("operator.getitem", ages, slice(7, 8)))
    assert lab.status(one) == "fail"
    laundered = lab.fn("numpy.mean", lab.fn("operator.add", lab.fn("operator.mul", ages, 0.0),
                                            one))
    assert lab.value(laundered) == AGES[7]
    assert lab.status(laundered) == "fail", reasons(lab, laundered)


def test_a_maximum_added_to_every_row_is_held_like_the_maximum(lab: Lab) -> None:
    top = lab.fn("numpy.max", ages)
    assert lab.status(top) == "review"
    laundered = lab.fn("numpy.mean", lab.fn("operator.add", lab.fn("operator.mul", ages, 0.0),
                                            top))
    assert lab.value(laundered) == AGES.max()
    assert lab.status(laundered) == "review", reasons(lab, laundered)
    # through another column of the same table, and through a selection of the rows
    income_max = lab.method(column(lab, "income"), "max")
    bmi = column(lab, "bmi")
    for carrier in (bmi, lab.fn("operator.getitem", bmi, slice(0, 150))):
        folded = lab.method(lab.fn("operator.add", lab.fn("operator.mul", carrier, 0.0),
                                   income_max), "mean")
        assert lab.value(folded) == PATIENTS.income.max()
        assert lab.status(folded) == "review", reasons(lab, folded)


def test_summaries_over_everyone_still_pass_when_folded_in(lab: Lab) -> None:
    """The everyday use stays friction-free: a variance written out, a standardized mean."""
    age = column(lab, "age")
    centered = lab.fn("operator.sub", age, lab.method(age, "mean"))
    variance = lab.method(lab.fn("operator.pow", centered, 2), "mean")
    assert lab.value(variance) == pytest.approx(PATIENTS.age.var(ddof=0))
    assert lab.status(variance) == "pass", reasons(lab, variance)


def test_bin_edges_placed_by_the_data_are_held_as_what_they_are(lab: Lab) -> None:
    """``cut(age, [0, median, max]).value_counts()``: two cells of ~100, but the interval
    labels are the median and the oldest patient's exact age."""
    age = column(lab, "age")
    edges = lab.fn("numpy.array", [0.0, lab.method(age, "median"), lab.method(age, "max")])
    table = lab.method(lab.fn("pandas.cut", age, edges), "value_counts")
    assert max(interval.right for interval in lab.value(table).index) == 99.0
    assert lab.status(table) == "review", reasons(lab, table)


def test_a_series_named_after_a_summary_carries_it(lab: Lab) -> None:
    renamed = lab.method(column(lab, "ward"), "rename", lab.method(column(lab, "income"), "max"))
    table = lab.method(renamed, "value_counts")
    assert lab.value(table).index.name == 5e8
    assert lab.status(table) == "review", reasons(lab, table)


def test_a_summary_per_group_repeated_on_its_rows_is_held(lab: Lab) -> None:
    groups = lab.method(patients, "groupby", "ward")
    top = lab.method(lab.fn("operator.getitem", groups, "income"), "transform", "max")
    laundered = lab.method(lab.fn("operator.getitem", top, slice(0, 50)), "mean")  # ward a
    assert lab.value(laundered) == 5e8
    assert lab.status(laundered) == "review", reasons(lab, laundered)


# -- 2. text summed per group -------------------------------------------------------------------
def test_a_sum_per_group_that_joins_text_is_not_passed(lab: Lab) -> None:
    table = lab.fn("operator.getitem", patients, ["ward", "bmi", "name"])
    summed = lab.method(lab.method(table, "groupby", "ward"), "sum")
    assert "patient-000" in lab.value(summed)["name"].iloc[0]
    assert lab.status(summed) == "review", reasons(lab, summed)
    numbers = lab.fn("operator.getitem", patients, ["ward", "bmi"])
    assert lab.status(lab.method(lab.method(numbers, "groupby", "ward"), "sum")) == "pass"


# -- 3. rows dropped without a trace ------------------------------------------------------------
def test_a_group_key_missing_for_one_patient_is_seen_by_differencing(lab: Lab) -> None:
    key = np.zeros(N)
    key[123] = np.nan  # the researcher's own key: everyone in one group but patient 123
    per_group = lab.method(lab.fn("operator.getitem", lab.method(patients, "groupby", key),
                                  "bmi"), "sum")
    whole = lab.method(column(lab, "bmi"), "sum")
    assert np.isclose(lab.value(whole) - float(lab.value(per_group).iloc[0]),
                      PATIENTS.bmi[123])
    assert lab.status(whole) == "pass"
    found = reasons(lab, per_group)
    assert found["differencing"][0] == "review" and "by only 1" in found["differencing"][1]


def test_values_outside_the_bins_are_no_records_of_the_groups(lab: Lab) -> None:
    band = lab.fn("pandas.cut", column(lab, "age"), [0.0, 98.5])  # all but the oldest
    per_band = lab.method(lab.fn("operator.getitem", lab.method(patients, "groupby", band),
                                 "bmi"), "sum")
    whole = lab.method(column(lab, "bmi"), "sum")
    assert np.isclose(lab.value(whole) - float(lab.value(per_band).iloc[0]), PATIENTS.bmi[0])
    assert (lab.status(whole), lab.status(per_band)) == ("pass", "review")


def test_the_rows_value_counts_leaves_out_are_a_count(lab: Lab) -> None:
    """199 in the one cell of a declared 200 says one patient is over 98.5."""
    every = lab.method(lab.fn("pandas.cut", column(lab, "age"), [0.0, 50.0, 100.0]),
                       "value_counts")
    assert lab.status(every) == "pass", reasons(lab, every)
    counts = lab.method(lab.fn("pandas.cut", column(lab, "age"), [0.0, 98.5]), "value_counts")
    assert int(lab.value(counts).iloc[0]) == N - 1
    found = reasons(lab, counts)
    assert found["min_count"][0] == "fail", found


@pytest.mark.filterwarnings("ignore:invalid value encountered in sqrt")
def test_a_sum_that_skips_missing_values_counts_only_the_rest(lab: Lab) -> None:
    """``nansum(sqrt(x - t) ** 2 + t)`` is ``x`` where ``x > t`` and missing elsewhere: a
    total over everyone but the youngest, which differencing against the plain total gives
    away."""
    age = column(lab, "age")
    root = lab.fn("numpy.sqrt", lab.fn("operator.sub", age, 20.5))
    defined = lab.fn("operator.add", lab.fn("operator.pow", root, 2), 20.5)
    partial = lab.fn("numpy.nansum", defined)
    whole = lab.fn("numpy.sum", age)
    youngest = PATIENTS.age[PATIENTS.age < 20.5].sum()
    assert np.isclose(lab.value(whole) - lab.value(partial), youngest)
    assert lab.status(whole) == "pass"
    assert lab.status(partial) == "review", reasons(lab, partial)


# -- 4. values moved between records ------------------------------------------------------------
@pytest.mark.parametrize("operation, args", [
    ("shift", (1,)), ("diff", ()), ("pct_change", ()), ("cumsum", ()), ("cummax", ()),
    ("ffill", ()), ("bfill", ()),
])
def test_operations_that_move_values_between_records_are_not_per_record(
        lab: Lab, operation: str, args: tuple[Any, ...]) -> None:
    moved = lab.method(lab.fn("operator.getitem", column(lab, "bmi"), slice(0, 11)), operation,
                       *args)
    summed = lab.method(moved, "sum")
    assert lab.status(summed) == "review", reasons(lab, summed)
    groups = lab.fn("operator.getitem", lab.method(patients, "groupby", "ward"), "bmi")
    if operation not in ("pct_change", "ffill", "bfill"):
        per_group = lab.method(lab.method(groups, operation, *args), "sum")
        assert lab.status(per_group) == "review", reasons(lab, per_group)


# -- end to end, with the documented rules ------------------------------------------------------
@pytest.fixture
def ruled(tmp_path: Path) -> Iterator[Pair]:
    with session_pair(tmp_path / "audit.db") as (owner, researcher):
        owner.share(PATIENTS, name="patients", description="patients")
        researcher.store.wait_for("patients", 60)
        owner.requests.add_rule("approve", checks="pass")
        owner.requests.add_rule("deny", checks="fail")
        yield owner, researcher


def test_the_documented_rules_release_neither_a_patient_nor_the_names(ruled: Pair) -> None:
    owner, researcher = ruled
    df = researcher.store["patients"]
    age = df["age"]
    one = age[df["name"] == "patient-042"].mean()
    with pytest.raises(duet.RequestDenied):
        one.get("patient 42", timeout=180)
    with pytest.raises(duet.RequestDenied):
        (age * 0 + one).mean().get("mean age (adjusted)", timeout=180)
    names = df[["ward", "bmi", "name"]].groupby("ward").sum().request("bmi totals per ward")
    eventually(lambda: any(q.reason == "bmi totals per ward" for q in owner.requests), 180)
    held = next(q for q in owner.requests if q.reason == "bmi totals per ward")
    assert held.status == "pending" and held.check_status == "review", held.checks
    held.deny("text columns")
    with pytest.raises(duet.RequestDenied):
        names.result(60)
    assert researcher.np.mean(df["age"]).get("mean age", timeout=180) == pytest.approx(
        PATIENTS.age.mean())
