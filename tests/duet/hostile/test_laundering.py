"""Class 11: a summary the disclosure checks would hold cannot be laundered into one they pass.

The hostile researcher asks for nothing the checks would stop directly. Instead:

1. A summary (one patient's mean, a maximum, a median) is folded back into the records'
   values (``x * 0 + summary``, bin edges, a series' name) and summarized again: the summary
   travels with the records and its own checks still apply.
2. A table of text is summed per group: pandas joins the text, every record's value.
3. Rows silently dropped (a missing group key, a value outside ``cut``'s bins, a missing
   value skipped by a sum) are no records of the result, so differencing sees them (and
   sends the pair to review), and the number dropped is a count like any other.
4. Operations that move values between records (``shift``, ``diff``, running totals,
   ``rank``) or combine all of them (``softmax`` and ``normalize`` over the records) are not
   treated as one value per record.
5. Shapes and answers that depend on the data: ``one_hot``'s width is the largest value,
   ``get_dummies``' the values found; a scaler to a range, a median imputer or a nearest
   neighbour fitted on the records answers the researcher's own array with their values.
6. Counts with records left out: the researcher's own mask combined with a condition, the
   rows outside a histogram's bins, a key missing in a crosstab, an empty category of a
   grouping, group counts returned with their keys as a column.
7. Axes written in any spelling (a list, a name given by position, a 0-d array): one that
   cannot be read is record-level, never "all the records".
8. Totals whose records are fewer than their rows (zeros that add nothing, a sum of a
   condition), answers that depend on how many values are present (``min_count=``), a
   model fitted (scikit-learn) or trained (a torch loss, either side) against the
   researcher's own per-record values, one record's columns combined by a row-wise
   reduction, and a dtype the data chose.

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
import torch

import duet
from duet.protocol import DTypeRef, StoreRef
from tests.duet.test_checks import AGES, Lab, ages, ids
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
    return Lab().sharing("patients", PATIENTS)


def column(lab: Lab, name: str) -> Any:
    return lab.column("patients", name)


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


@pytest.mark.parametrize("operation, keywords", [
    ("torch.nn.functional.normalize", {"p": float("inf"), "dim": 0}),  # x / max|x|
    ("torch.log_softmax", {"dim": 0}),
    ("torch.softmax", {"dim": 0}),
])
def test_softmax_and_normalize_over_the_records_are_not_per_record(
        lab: Lab, operation: str, keywords: dict[str, Any]) -> None:
    tensor = lab.fn("torch.as_tensor", ages)
    mean = lab.method(lab.fn(operation, tensor, **keywords), "mean")
    assert lab.status(mean) == "review", reasons(lab, mean)
    if operation.endswith("normalize"):
        assert float(lab.value(lab.method(tensor, "mean"))) / float(lab.value(mean)) == \
            pytest.approx(AGES.max())
    per_record = lab.method(lab.fn(operation, StoreRef("Xt"), **{**keywords, "dim": 1}),
                            "mean")  # along each record's own columns: still per record
    assert lab.status(per_record) == "pass", reasons(lab, per_record)


def test_ranks_are_not_per_record(lab: Lab) -> None:
    """Two rank sums over the same 100 records, one ranked without patient 7: their
    difference is how many of the 100 are older than patient 7."""
    age = column(lab, "age")
    ranked = lab.method(lab.fn("operator.getitem", lab.method(age, "rank"), slice(100, 200)),
                        "sum")
    assert lab.status(ranked) == "review", reasons(lab, ranked)
    per_group = lab.method(lab.method(lab.fn("operator.getitem", lab.method(
        patients, "groupby", "ward"), "age"), "rank"), "sum")
    assert lab.status(per_group) == "review", reasons(lab, per_group)


# -- 5. shapes and answers that depend on the data -----------------------------------------------
def test_one_hots_width_is_the_largest_value(lab: Lab) -> None:
    codes = lab.method(lab.fn("torch.as_tensor", ages), "long")
    shape = lab.attr(lab.fn("torch.nn.functional.one_hot", codes), "shape")
    assert lab.value(shape)[1] - 1 == int(AGES.max())
    assert lab.status(shape) == "review", reasons(lab, shape)
    fixed = lab.attr(lab.fn("torch.nn.functional.one_hot", codes, num_classes=128), "shape")
    assert lab.status(fixed) == "pass", reasons(lab, fixed)


def test_get_dummies_columns_are_the_values_found(lab: Lab) -> None:
    above = lab.fn("operator.gt", column(lab, "age"), 98.5)
    shape = lab.attr(lab.fn("pandas.get_dummies", above), "shape")
    assert lab.value(shape)[1] == 2  # someone is older than 98.5
    assert lab.status(shape) == "review", reasons(lab, shape)


@pytest.mark.parametrize("estimator, keywords, method, probe, expected", [
    ("sklearn.preprocessing.MinMaxScaler", {}, "inverse_transform", [[1.0]], 99.0),
    ("sklearn.preprocessing.RobustScaler", {}, "inverse_transform", [[0.0]],
     float(PATIENTS.age.median())),
    ("sklearn.impute.SimpleImputer", {"strategy": "median"}, "transform", [[np.nan]],
     float(PATIENTS.age.median())),
])
def test_a_fitted_transformer_answers_with_values_of_its_records(
        lab: Lab, estimator: str, keywords: dict[str, Any], method: str, probe: Any,
        expected: float) -> None:
    X = lab.method(lab.fn("operator.getitem", patients, ["age"]), "to_numpy")
    fitted = lab.fn(estimator, **keywords)
    lab.method(fitted, "fit", X)
    out = lab.method(fitted, method, np.array(probe))
    assert float(np.asarray(lab.value(out)).reshape(-1)[0]) == pytest.approx(expected)
    assert lab.status(out) == "review", reasons(lab, out)


def test_a_nearest_neighbour_answers_with_a_record_a_linear_model_does_not(lab: Lab) -> None:
    X = lab.method(lab.fn("operator.getitem", patients, ["age"]), "to_numpy")
    y = lab.method(column(lab, "income"), "to_numpy")
    nearest = lab.fn("sklearn.neighbors.KNeighborsRegressor", n_neighbors=1)
    lab.method(nearest, "fit", X, y)
    out = lab.method(nearest, "predict", np.array([[1000.0]]))
    assert float(lab.value(out)[0]) == 5e8  # the oldest patient's income
    assert lab.status(out) == "review", reasons(lab, out)
    for name, keywords in (("sklearn.linear_model.LinearRegression", {}),
                           ("sklearn.impute.SimpleImputer", {"strategy": "mean"})):
        fitted = lab.fn(name, **keywords)
        lab.method(fitted, "fit", X, y) if name.endswith("Regression") else lab.method(
            fitted, "fit", X)
        answer = lab.method(fitted, "predict" if name.endswith("Regression") else "transform",
                            np.array([[np.nan if "Imputer" in name else 50.0]]))
        assert lab.status(answer) == "pass", (name, reasons(lab, answer))


# -- 6. counts with records left out --------------------------------------------------------------
def test_the_researchers_own_mask_makes_a_count_for_review(lab: Lab) -> None:
    not7 = np.ones(N, dtype=bool)
    not7[7] = False
    whole = lab.fn("numpy.count_nonzero", lab.fn("operator.gt", ages, 50.0))
    assert lab.status(whole) == "pass"
    for keep in (lab.fn("operator.and_", lab.fn("operator.gt", ages, 50.0), not7),
                 lab.fn("operator.mul", lab.fn("operator.gt", ages, 50.0),
                        not7.astype(np.int64))):
        partial = lab.fn("numpy.count_nonzero", keep)
        assert lab.value(whole) - lab.value(partial) == int(AGES[7] > 50.0)
        assert lab.status(partial) == "review", reasons(lab, partial)
    # selecting with such a mask stays exact: the selection knows its records
    selected = lab.fn("numpy.mean", lab.fn("operator.getitem", ages, lab.fn(
        "operator.and_", lab.fn("operator.gt", ages, 30.0), np.arange(N) < 150)))
    assert lab.checks(selected)["min_count"].status == "pass"


def test_counts_whose_counted_records_differ_by_one_are_seen(lab: Lab) -> None:
    """What a count counts are its records: ``count(x > t)`` and the same count without
    patient 7 (by another shared column) differ by patient 7 when patient 7 is over ``t``."""
    t = float(AGES[7]) - 0.5
    whole = lab.fn("numpy.count_nonzero", lab.fn("operator.gt", ages, t))
    partial = lab.fn("numpy.count_nonzero", lab.fn("operator.and_", lab.fn(
        "operator.gt", ages, t), lab.fn("operator.ne", ids, 7)))
    assert lab.value(whole) - lab.value(partial) == 1
    assert lab.status(whole) == "pass"
    assert reasons(lab, partial)["differencing"][0] == "review"


def test_rows_outside_a_histograms_bins_are_a_count(lab: Lab) -> None:
    over_90 = int((AGES > 90.0).sum())
    assert 0 < over_90 < 10
    histogram = lab.fn("numpy.histogram", ages, bins=[0.0, 90.0])
    assert int(lab.value(histogram)[0].sum()) == N - over_90
    assert lab.checks(histogram)["min_count"].status == "fail"
    histc = lab.fn("torch.histc", lab.fn("torch.as_tensor", ages), bins=1, min=0.0, max=90.0)
    assert lab.checks(histc)["min_count"].status == "fail"
    everyone = lab.fn("numpy.histogram", ages, bins=[0.0, 50.0, 150.0])
    assert lab.status(everyone) == "pass", reasons(lab, everyone)


def test_a_key_missing_in_a_crosstab_leaves_a_record_out(lab: Lab) -> None:
    key = np.zeros(N)
    key[7] = np.nan
    table = lab.fn("pandas.crosstab", column(lab, "ward"), key)
    assert int(lab.value(table).to_numpy().sum()) == N - 1
    assert lab.checks(table)["min_count"].status == "fail"


def test_an_empty_category_of_a_grouping_is_a_zero_cell(lab: Lab) -> None:
    band = lab.fn("pandas.cut", column(lab, "age"), [0.0, 50.0, 99.5, 150.0])
    groups = lab.method(patients, "groupby", band, observed=False)
    sizes = lab.method(groups, "size")
    assert lab.value(sizes).iloc[-1] == 0  # nobody is older than 99.5
    means = lab.method(lab.fn("operator.getitem", groups, "bmi"), "mean")
    for table in (sizes, means):
        assert lab.checks(table)["min_count"].status == "fail", reasons(lab, table)


def test_group_counts_with_their_keys_as_a_column_are_checked(lab: Lab) -> None:
    key = np.where(np.arange(N) == 7, "x", "y")  # patient 7 alone in group x
    groups = lab.method(patients, "groupby", key, as_index=False)
    counts = lab.method(lab.fn("operator.getitem", groups, ["ward", "bmi"]), "count")
    assert 1 in lab.value(counts)["bmi"].tolist()
    assert lab.checks(counts)["min_count"].status == "fail", reasons(lab, counts)


@pytest.mark.filterwarnings("ignore:invalid value encountered in sqrt")
def test_a_sum_per_group_skipping_missing_values_counts_only_the_rest(lab: Lab) -> None:
    age = column(lab, "age")
    defined = lab.fn("operator.add", lab.fn("operator.pow", lab.fn(
        "numpy.sqrt", lab.fn("operator.sub", age, 20.5)), 2), 20.5)
    per_group = lab.method(lab.method(defined, "groupby", np.zeros(N)), "sum")
    whole = lab.method(age, "sum")
    assert np.isclose(lab.value(whole) - float(lab.value(per_group).iloc[0]),
                      PATIENTS.age[PATIENTS.age < 20.5].sum())
    assert (lab.status(whole), lab.status(per_group)) == ("pass", "review")


# -- 7. axes in any spelling ---------------------------------------------------------------------
def test_an_axis_in_any_spelling_is_read_and_one_that_cannot_be_is_record_level(
        lab: Lab) -> None:
    X = StoreRef("X")
    age = column(lab, "age")
    for reduced in (
            lab.method(StoreRef("Xt"), "sum", [1]),                            # a list
            lab.method(lab.fn("operator.getitem", patients, ["age", "bmi"]), "sum",
                       "columns"),                                             # a name
            lab.fn("numpy.sum", X, np.array(1))):                              # a 0-d array
        assert lab.status(reduced) != "pass", reasons(lab, reduced)
    every_age = lab.method(lab.fn("operator.getitem", patients, ["age"]), "mean", "columns")
    assert np.array_equal(lab.value(every_age).to_numpy(), PATIENTS.age.to_numpy())
    assert lab.status(every_age) == "fail", reasons(lab, every_age)
    assert lab.status(lab.method(age, "sum", 0)) == "pass"


# -- 8. totals, counts and fits steered record by record ------------------------------------------
def test_a_sum_of_a_condition_counts_what_it_counts(lab: Lab) -> None:
    t = float(AGES[7]) - 0.5  # patient 7 is over t
    whole = lab.fn("numpy.sum", lab.fn("operator.gt", ages, t))
    partial = lab.fn("numpy.sum", lab.fn("operator.and_", lab.fn("operator.gt", ages, t),
                                         lab.fn("operator.ne", ids, 7)))
    assert lab.value(whole) - lab.value(partial) == 1
    assert lab.status(whole) == "pass"
    assert reasons(lab, partial)["differencing"][0] == "review"


@pytest.mark.filterwarnings("ignore:invalid value encountered in sqrt")
def test_zeros_add_nothing_to_a_total(lab: Lab) -> None:
    """``nan_to_num`` turns the rows a NaN-skipping sum would skip into zeros: the total is
    still over the records above ``t`` only."""
    age = column(lab, "age")
    above = lab.fn("numpy.nan_to_num", lab.fn("operator.add", lab.fn(
        "operator.pow", lab.fn("numpy.sqrt", lab.fn("operator.sub", age, 20.5)), 2), 20.5))
    whole, partial = lab.method(age, "sum"), lab.fn("numpy.sum", above)
    assert np.isclose(lab.value(whole) - lab.value(partial),
                      PATIENTS.age[PATIENTS.age < 20.5].sum())
    assert (lab.status(whole), lab.status(partial)) == ("pass", "review")


@pytest.mark.parametrize("keywords", [{"min_count": 198}, {"ddof": 150}])
def test_an_answer_that_depends_on_how_many_values_are_present_is_held(
        lab: Lab, keywords: dict[str, int]) -> None:
    name = "sum" if "min_count" in keywords else "var"
    held = lab.method(column(lab, "age"), name, **keywords)
    assert lab.status(held) == "review", reasons(lab, held)


def test_a_model_fitted_to_the_researchers_own_values_is_held(lab: Lab) -> None:
    one = np.zeros((N, 1))
    one[7] = 1.0  # patient 7 alone
    regression = lab.fn("sklearn.linear_model.LinearRegression")
    lab.method(regression, "fit", one, ages)
    answer = lab.method(regression, "predict", np.array([[1.0]]))
    assert float(lab.value(answer)[0]) == pytest.approx(AGES[7])
    assert lab.status(answer) == "review", reasons(lab, answer)
    assert lab.status(lab.attr(regression, "coef_")) == "review"
    scaler = lab.fn("sklearn.preprocessing.StandardScaler")
    lab.method(scaler, "fit", lab.method(ages, "reshape", N, 1), sample_weight=one[:, 0])
    answer = lab.method(scaler, "inverse_transform", np.array([[0.0]]))
    assert float(lab.value(answer)[0][0]) == pytest.approx(AGES[7])
    assert lab.status(answer) == "review", reasons(lab, answer)


def train_steered(lab: Lab, model: Any, inputs: Any, target: Any, steps: int = 1,
                  lr: float = 100.0, loss_module: bool = False) -> None:
    """Gradient steps of ``mse_loss(model(inputs), target)``, functional or as a module."""
    lab.fn("torch.set_grad_enabled", True)
    optimizer = lab.fn("torch.optim.SGD", lab.method(model, "parameters"), lr=lr)
    mse = lab.fn("torch.nn.MSELoss") if loss_module else None
    for _ in range(steps):
        lab.method(optimizer, "zero_grad")
        prediction = lab.op("call", "forward", model, inputs)
        loss = (lab.op("call", "forward", mse, prediction, target) if mse is not None
                else lab.fn("torch.nn.functional.mse_loss", prediction, target))
        lab.method(loss, "backward")
        lab.method(optimizer, "step")


@pytest.mark.parametrize("loss_module", [False, True], ids=["functional", "module"])
def test_a_torch_model_steered_by_the_researchers_own_values_is_held(
        lab: Lab, loss_module: bool) -> None:
    """``mse_loss(model(e7), ages)``: one weight, one input that is 1 for patient 7 alone,
    and one step of size N/2 sets the weight to patient 7's age. The loss pairs each record
    with a value of the researcher's own, so the model is no more a summary of 200 records
    than sklearn's ``fit(e7, ages)`` is."""
    torch.manual_seed(0)
    e7 = torch.zeros(N, 1)
    e7[7] = 1.0
    ages_t = lab.method(lab.fn("torch.tensor", ages, dtype=DTypeRef("torch.float32")),
                        "unsqueeze", 1)
    model = lab.fn("torch.nn.Linear", 1, 1, bias=False)
    train_steered(lab, model, e7, ages_t, loss_module=loss_module)
    weight = lab.attr(model, "weight")
    assert float(lab.value(weight)[0][0]) == pytest.approx(AGES[7], abs=1e-3)  # the leak
    assert lab.status(weight) == "review", reasons(lab, weight)
    # the other way round: the records as input, the researcher's own one-hot as the target
    model = lab.fn("torch.nn.Linear", 3, 1, bias=False)
    train_steered(lab, model, StoreRef("Xt"), e7, lr=0.1, loss_module=loss_module)
    weight = lab.attr(model, "weight")
    assert lab.status(weight, elements=3) == "review", reasons(lab, weight)


def test_an_ordinary_torch_training_on_the_records_still_passes(lab: Lab) -> None:
    torch.manual_seed(0)
    model = lab.fn("torch.nn.Linear", 3, 1)
    target = lab.method(StoreRef("y"), "unsqueeze", 1)
    train_steered(lab, model, StoreRef("Xt"), target, steps=3, lr=0.1)
    weight = lab.attr(model, "weight")
    assert lab.status(weight, elements=3) == "pass", reasons(lab, weight)
    train_steered(lab, model, StoreRef("Xt"), target, steps=1, lr=0.1, loss_module=True)
    assert lab.status(weight, elements=3) == "pass", reasons(lab, weight)


def test_a_model_trained_first_on_the_records_then_steered_is_held(lab: Lab) -> None:
    """A model that already learned from the records has provenance of its own: its output
    on the researcher's one-hot is still no record of anyone."""
    torch.manual_seed(0)
    model = lab.fn("torch.nn.Linear", 3, 1, bias=False)
    target = lab.method(StoreRef("y"), "unsqueeze", 1)
    train_steered(lab, model, StoreRef("Xt"), target, steps=2, lr=0.1)
    weight = lab.attr(model, "weight")
    assert lab.status(weight, elements=3) == "pass", reasons(lab, weight)
    own = np.zeros((N, 3), dtype=np.float32)
    own[7] = 1.0
    train_steered(lab, model, torch.tensor(own), target, lr=0.1)
    assert lab.status(weight, elements=3) == "review", reasons(lab, weight)


def test_a_shared_summary_added_to_the_researchers_own_values_still_steers(lab: Lab) -> None:
    """``fit(one + 0 * mean(ages), ages)``: the features carry a summary of the records, but
    per record they are still the researcher's own one-hot."""
    one = np.zeros((N, 1))
    one[7] = 1.0
    disguised = lab.fn("operator.add", one, lab.fn("operator.mul", 0.0,
                                                   lab.fn("numpy.mean", ages)))
    regression = lab.fn("sklearn.linear_model.LinearRegression")
    lab.method(regression, "fit", disguised, ages)
    answer = lab.method(regression, "predict", np.array([[1.0]]))
    assert float(lab.value(answer)[0]) == pytest.approx(AGES[7])
    assert lab.status(answer) == "review", reasons(lab, answer)


def test_the_researchers_own_values_disguised_in_shared_rows_still_steer(lab: Lab) -> None:
    """``ages * 0 + e7`` holds ages' rows but is the researcher's one-hot, and a shared
    condition masked with the researcher's own (``(ages > 50) & e7``) is patient 7 alone:
    a fit on either is for review; and they stay so through later element-wise steps."""
    e7 = np.zeros((N, 1))
    e7[7] = 1.0
    column = lab.method(ages, "reshape", N, 1)
    disguised = lab.fn("operator.add", lab.fn("operator.mul", column, 0.0), e7)
    masked = lab.method(lab.fn("operator.and_", lab.fn("operator.gt", column, 50.0),
                               e7.astype(bool)), "astype", DTypeRef("float64"))
    again = disguised
    for _ in range(3):
        again = lab.fn("operator.add", again, e7)  # steered once, not once per step
    assert sum(p.note == "combined with the researcher's own values per record"
               for p in lab.executor.lookup(again).provenance["ages"].carried) == 1
    for features in (disguised, masked, lab.fn("operator.mul", again, 2.0)):
        regression = lab.fn("sklearn.linear_model.LinearRegression")
        lab.method(regression, "fit", features, ages)
        answer = lab.method(regression, "predict", np.array([[1.0]]))
        assert lab.status(answer) == "review", reasons(lab, answer)


def test_features_built_from_shared_columns_alone_still_pass(lab: Lab) -> None:
    """Feature engineering on the records themselves (a product of two columns, a centred
    column, a condition) steers nothing: a small model fitted on it passes."""
    bmi, age = column(lab, "bmi"), column(lab, "age")
    product = lab.fn("operator.mul", bmi, age)
    centred = lab.fn("operator.sub", age, lab.method(age, "mean"))
    older = lab.method(lab.fn("operator.gt", age, 50.0), "astype", DTypeRef("float64"))
    for feature in (product, centred, older):
        regression = lab.fn("sklearn.linear_model.LinearRegression")
        lab.method(regression, "fit", lab.method(feature, "to_frame"), column(lab, "bmi"))
        coef = lab.attr(regression, "coef_")
        assert lab.status(coef) == "pass", reasons(lab, coef)


def test_a_row_wise_reduction_of_several_columns_is_no_column(lab: Lab) -> None:
    """``min(age, 0 if income > 1e8 else big)`` per record, summed: the total minus it is
    the richest patient's age."""
    table = lab.fn("operator.getitem", patients, ["age", "income"])
    scaled = lab.fn("operator.mul", table, np.array([1.0, -1e-8]))
    per_record = lab.method(scaled, "min", axis=1)
    assert lab.status(lab.method(per_record, "sum")) == "review"


def test_a_dtype_the_data_chose_is_held(lab: Lab) -> None:
    shifted = lab.fn("operator.sub", column(lab, "age"), -28.0)  # 99 + 28 = 127: int8
    dtype = lab.attr(lab.method(lab.fn("pandas.to_numeric", shifted, downcast="integer"),
                                "to_numpy"), "dtype")
    assert str(lab.value(dtype)) == "int8"
    assert lab.status(dtype) == "review", reasons(lab, dtype)


def test_the_researchers_mask_through_where_or_a_product_is_seen(lab: Lab) -> None:
    not7 = np.ones(N, dtype=bool)
    not7[7] = False
    over = lab.fn("operator.gt", ages, float(AGES[7]) + 0.5)
    for masked in (lab.fn("numpy.where", not7, over, False), lab.fn("operator.mul", over,
                                                                    not7)):
        counted = lab.fn("numpy.count_nonzero", masked)
        assert lab.status(counted) == "review", reasons(lab, counted)


@pytest.mark.filterwarnings("ignore:invalid value encountered in sqrt")
def test_a_nan_skipping_sum_of_one_column_as_a_matrix_counts_only_the_rest(lab: Lab) -> None:
    age = column(lab, "age")
    defined = lab.fn("operator.add", lab.fn("operator.pow", lab.fn(
        "numpy.sqrt", lab.fn("operator.sub", age, 20.5)), 2), 20.5)
    partial = lab.fn("numpy.nansum", lab.method(lab.method(defined, "to_numpy"), "reshape",
                                                N, 1), axis=0)
    assert lab.status(lab.method(age, "sum")) == "pass"
    assert lab.status(partial) == "review", reasons(lab, partial)
