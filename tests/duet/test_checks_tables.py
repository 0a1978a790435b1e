"""Disclosure checks on pandas tables and scikit-learn models: provenance through column
selection, filters, value counts, group-by and crosstab, fitting and predicting."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest

from duet.protocol import StoreRef
from tests.duet.test_checks import Lab

N = 200
rng = np.random.default_rng(11)
PATIENTS = pd.DataFrame({
    "age": np.r_[[95.0, 96.0, 97.0, 98.0, 99.0], rng.integers(20, 90, N - 5)],
    "income": np.r_[[5e8], rng.uniform(2e4, 6e4, N - 1)],
    "ward": np.r_[np.repeat(["a", "b", "c", "d"], 49), ["a", "b", "c", "z"]],
    "smoker": rng.integers(0, 2, N).astype(bool),
    "bmi": rng.normal(25, 4, N),
})
patients = StoreRef("patients")


@pytest.fixture
def lab() -> Lab:
    return Lab().sharing("patients", PATIENTS)


def col(lab: Lab, name: str) -> Any:
    return lab.column("patients", name)


def without_ward_z(lab: Lab) -> Any:
    return lab.fn("operator.getitem", patients, lab.fn("operator.ne", col(lab, "ward"), "z"))


def test_a_column_mean_over_everyone_passes(lab: Lab) -> None:
    assert lab.status(lab.method(col(lab, "age"), "mean")) == "pass"
    assert lab.status(lab.method(lab.fn("operator.getitem", patients, ["age", "bmi"]),
                                 "mean")) == "pass"


def test_a_filtered_frame_mean_fails_min_count(lab: Lab) -> None:
    old = lab.fn("operator.getitem", patients, lab.fn("operator.gt", col(lab, "age"), 90))
    found = lab.checks(lab.method(lab.fn("operator.getitem", old, "bmi"), "mean"))
    assert found["min_count"].status == "fail"
    assert found["min_count"].evidence["problems"][0]["records"] == 5


def test_rows_of_a_frame_are_record_level(lab: Lab) -> None:
    for ref in (lab.fn("operator.getitem", patients, "age"),
                lab.method(patients, "dropna"),
                lab.method(col(lab, "age"), "round"),
                lab.attr(patients, "index"),
                lab.method(patients, "reset_index")):
        assert lab.checks(ref)["record_level"].status == "fail"


def test_a_column_total_dominated_by_one_patient_fails(lab: Lab) -> None:
    found = lab.checks(lab.method(col(lab, "income"), "sum"))
    assert found["dominance"].status == "fail"
    # per column: the frame's sums are checked column by column
    both = lab.method(lab.fn("operator.getitem", patients, ["income", "bmi"]), "sum")
    assert lab.checks(both)["dominance"].status == "fail"


def test_sums_across_columns_are_one_per_patient(lab: Lab) -> None:
    both = lab.fn("operator.getitem", patients, ["age", "bmi"])
    for axis in (1, "columns"):
        assert lab.checks(lab.method(both, "sum", axis=axis))["record_level"].status == "fail"


def test_value_counts_checks_every_cell(lab: Lab) -> None:
    kept = without_ward_z(lab)
    assert lab.status(lab.method(lab.fn("operator.getitem", kept, "ward"),
                                 "value_counts")) == "pass"
    found = lab.checks(lab.method(col(lab, "ward"), "value_counts"))
    assert found["min_count"].status == "fail"
    assert found["min_count"].evidence["problems"][0]["below_threshold"] == 1
    # all patients, and all but the one in ward z: a differencing pair
    assert found["differencing"].status == "review"
    assert lab.status(lab.method(col(lab, "ward"), "unique")) == "fail"


def test_group_means_check_each_group(lab: Lab) -> None:
    groups = lab.method(patients, "groupby", "ward")
    found = lab.checks(lab.method(lab.fn("operator.getitem", groups, "bmi"), "mean"))
    assert found["min_count"].status == "fail"  # ward z has one patient
    assert found["min_count"].evidence["smallest"] == 1
    lab = Lab()  # a fresh worker: no earlier request to difference against
    lab.executor.share("patients", PATIENTS)
    groups = lab.method(without_ward_z(lab), "groupby", "ward")
    bmi = lab.fn("operator.getitem", groups, "bmi")
    assert lab.status(lab.method(bmi, "mean")) == "pass"
    assert lab.status(lab.method(bmi, "agg", "mean")) == "pass"
    assert lab.checks(lab.method(lab.fn("operator.getitem", groups, "income"),
                                 "sum"))["dominance"].status == "fail"
    assert lab.status(lab.method(groups, "size")) == "pass"
    assert lab.status(lab.method(bmi, "max")) == "review"
    assert lab.checks(lab.method(bmi, "transform", "mean"))["record_level"].status == "fail"


def test_group_counts_of_a_yes_no_column_are_counts(lab: Lab) -> None:
    groups = lab.method(without_ward_z(lab), "groupby", "ward")
    smokers = lab.method(lab.fn("operator.getitem", groups, "smoker"), "sum")
    found = lab.checks(smokers)["min_count"]
    assert found.status in ("pass", "fail")
    counts = PATIENTS[PATIENTS.ward != "z"].groupby("ward")["smoker"].agg(["sum", "size"])
    small = ((counts["sum"] < 10) | (counts["size"] - counts["sum"] < 10)).any()
    assert (found.status == "fail") == bool(small)


def test_crosstab_cells(lab: Lab) -> None:
    table = lab.fn("pandas.crosstab", col(lab, "ward"), col(lab, "smoker"))
    found = lab.checks(table)["min_count"]
    assert found.status == "fail"  # ward z: one patient
    assert lab.status(lab.fn("pandas.crosstab", col(lab, "ward"), col(lab, "smoker"),
                             normalize=True)) == "review"


def test_describe_and_order_statistics_need_review(lab: Lab) -> None:
    assert lab.status(lab.method(col(lab, "age"), "describe")) == "review"
    assert lab.status(lab.method(col(lab, "age"), "max")) == "review"
    assert lab.status(lab.method(col(lab, "age"), "idxmax")) == "review"


def test_labels_of_derived_tables_are_not_declared(lab: Lab) -> None:
    dummies = lab.fn("pandas.get_dummies", col(lab, "ward"))
    assert lab.status(lab.attr(dummies, "columns")) == "review"
    assert lab.status(lab.attr(patients, "ndim")) == "pass"


def test_a_fitted_model_is_checked_for_degrees_of_freedom(lab: Lab) -> None:
    X = lab.method(lab.fn("operator.getitem", patients, ["age", "bmi"]), "to_numpy")
    y = lab.method(col(lab, "smoker"), "to_numpy")
    model = lab.fn("sklearn.linear_model.LogisticRegression")
    lab.method(model, "fit", X, y)
    found = lab.checks(lab.attr(model, "coef_"), elements=2)
    assert found["degrees_of_freedom"].status == "pass"
    assert found["degrees_of_freedom"].evidence["models"][0]["records"] == N
    assert lab.checks(lab.method(model, "predict", X))["record_level"].status == "fail"
    few = lab.fn("operator.getitem", X, slice(0, 4))
    small = lab.fn("sklearn.linear_model.LinearRegression")
    lab.method(small, "fit", few, lab.fn("operator.getitem", y, slice(0, 4)))
    found = lab.checks(lab.attr(small, "coef_"), elements=2)
    assert found["degrees_of_freedom"].status == "fail"
    assert found["min_count"].status == "fail"


def test_estimator_attributes_that_hold_records_are_not_parameters(lab: Lab) -> None:
    X = lab.method(lab.fn("operator.getitem", patients, ["age", "bmi"]), "to_numpy")
    scaler = lab.fn("sklearn.preprocessing.MinMaxScaler")
    lab.method(scaler, "fit", X)
    assert lab.status(lab.attr(scaler, "data_max_")) == "review"


def test_the_row_count_is_for_review_when_the_owner_hid_it() -> None:
    from duet.checks import CheckSettings

    hidden = Lab(patients=CheckSettings(rows_declared=False))
    hidden.executor.share("patients", PATIENTS)
    found = hidden.checks(hidden.attr(patients, "shape"))
    assert found["row_count"].status == "review"
    declared = Lab()
    declared.executor.share("patients", PATIENTS)
    assert declared.status(declared.attr(patients, "shape")) == "pass"


def test_masking_one_patient_out_without_filtering_is_not_a_plain_total(lab: Lab) -> None:
    """s.where(id != 7).sum() is the total without patient 7, over "all" the rows."""
    income = col(lab, "income")
    keep = lab.fn("operator.ne", lab.attr(patients, "index"), 7)
    for name in ("where", "mask"):
        hidden = lab.method(income, name, keep)
        assert lab.status(lab.method(hidden, "sum")) != "pass", name
