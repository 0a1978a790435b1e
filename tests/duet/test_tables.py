"""Tables: sharing pandas objects, the frame codec, r.pd and r.sklearn (in-memory pair).

The hostile side of tables (raw wire, forbidden entry points, derived metadata) is in
tests/duet/hostile/test_tables.py, between real processes over WebRTC."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import msgpack
import numpy as np
import pandas as pd
import pytest
import torch

import duet
from duet import ProtocolError, tables
from duet import protocol as p
from duet.supervisor import SealedColumns
from tests.helpers.sessions import session_pair


def roundtrip(value: object) -> object:
    header, buffers = p.encode(p.Decision(request_id="ab" * 4, status="approved", value=value))
    decoded = p.decode(header, [bytearray(b) for b in buffers])
    assert isinstance(decoded, p.Decision)
    return decoded.value


def patients(n: int = 400, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    age = rng.integers(18, 90, n)
    bmi = rng.normal(26, 4, n).round(1)
    return pd.DataFrame({
        "age": age,
        "bmi": bmi,
        "sex": rng.choice(["F", "M"], n),
        "group": pd.Categorical(rng.choice(["control", "treated"], n)),
        "visits": pd.array(rng.integers(0, 5, n), dtype="Int64"),
        "outcome": ((age / 90 + bmi / 40 + rng.normal(0, 0.3, n)) > 1.3).astype(int),
    }, index=pd.Index([f"patient-{i:04d}" for i in range(n)], name="patient_id"))


# -- the codec ---------------------------------------------------------------------------------
def every_kind() -> pd.DataFrame:
    return pd.DataFrame({
        "i": [1, 2, 3], "f": [1.5, np.nan, -0.0], "b": [True, False, True],
        "c": [1 + 2j, 0j, -1j], "s": ["x", None, "é✓"], "o": [1, "two", None],
        "string": pd.array(["a", None, "c"], dtype="string"),
        "cat": pd.Categorical(["lo", "hi", "lo"], categories=["lo", "hi"], ordered=True),
        "Int64": pd.array([1, None, 3], dtype="Int64"),
        "UInt8": pd.array([1, 2, None], dtype="UInt8"),
        "Float32": pd.array([0.5, None, 2.0], dtype="Float32"),
        "boolean": pd.array([True, None, False], dtype="boolean"),
        "when": pd.to_datetime(["2020-01-01 00:00", None, "2024-02-29 12:00"]),
        "tz": pd.to_datetime(["2020-01-01", "2021-06-01", None]).tz_localize("Europe/Paris"),
        "delta": pd.to_timedelta([1, 2, 3], unit="D"),
        "bins": pd.cut([1, 5, 9], 3),
    }, index=pd.Index(["p1", "p2", "p3"], name="patient_id"))


def test_every_column_kind_round_trips_with_its_dtype_and_index() -> None:
    frame = every_kind()
    out = roundtrip(frame)
    pd.testing.assert_frame_equal(out, frame)  # values, dtypes, index and its name
    for name in frame:
        series = roundtrip(frame[name])
        pd.testing.assert_series_equal(series, frame[name])


@pytest.mark.parametrize("make", [
    lambda f: f.groupby(["sex", "cat"], observed=True)["f"].agg(["mean", "count"]),
    lambda f: pd.crosstab(f["sex"], f["cat"]),
    lambda f: f[["i", "f", "Int64"]].describe(),
    lambda f: f["bins"].value_counts(),
    lambda f: f.set_index(["s", "i"]),
    lambda f: f.index,
    lambda f: f.columns,
    lambda f: pd.RangeIndex(2, 20, 3, name="r"),
    lambda f: f.iloc[:0],
    lambda f: pd.DataFrame(),
    lambda f: f.T.iloc[:3],
], ids=["multi-index", "crosstab", "describe", "interval index", "set_index", "index",
        "columns", "range", "empty rows", "empty", "transposed"])
def test_derived_tables_round_trip(make: object) -> None:
    frame = every_kind().assign(sex=["F", "M", "F"])
    value = make(frame)  # type: ignore[operator]
    out = roundtrip(value)
    if isinstance(value, pd.DataFrame):
        pd.testing.assert_frame_equal(out, value)
    elif isinstance(value, pd.Series):
        pd.testing.assert_series_equal(out, value)
    else:
        pd.testing.assert_index_equal(out, value, exact=True)


def test_pandas_scalars_travel_as_numpy_and_plain_values() -> None:
    assert roundtrip(pd.Timestamp("2020-01-02")) == np.datetime64("2020-01-02")
    assert roundtrip(pd.Timedelta(days=2)) == np.timedelta64(2, "D")
    assert roundtrip(pd.NA) is None
    assert np.isnat(roundtrip(pd.NaT))


def test_values_the_codec_has_no_form_for_are_refused_clearly() -> None:
    with pytest.raises(ProtocolError, match="holding dict"):
        p.encode(p.Decision(request_id="ab" * 4, status="approved",
                            value=pd.Series([{"a": 1}, {"b": 2}])))
    with pytest.raises(ProtocolError, match=r"dtype period\[M\]"):
        p.encode(p.Decision(request_id="ab" * 4, status="approved",
                            value=pd.Series(pd.period_range("2020", periods=2, freq="M"))))


def frame_message(spec: object, buffers: list[bytes]) -> tuple[bytes, list[bytes]]:
    """A Decision whose value is a hand-made frame spec (the peer chooses every byte)."""
    encoder = p._Encoder()
    ext = msgpack.ExtType(9, encoder.pack(spec))
    header = msgpack.packb({"type": "decision", "request_id": "ab" * 4, "status": "approved",
                            "value": ext}, use_bin_type=True)
    return header, buffers


def array_ext(dtype: str, shape: list[int], index: int) -> msgpack.ExtType:
    return msgpack.ExtType(8, msgpack.packb(["numpy", dtype, shape, index]))


RANGE3 = {"k": "range", "start": 0, "stop": 3, "step": 1, "name": None}
COLS1 = {"k": "index", "name": None, "data": {"t": "obj", "v": ["a"]}}


@pytest.mark.parametrize("spec,buffers,match", [
    ({"k": "pickle"}, [], "unknown pandas object"),
    ({"k": "frame", "cols": COLS1, "index": RANGE3, "data": []}, [], "do not match"),
    ({"k": "frame", "cols": COLS1, "index": RANGE3,
      "data": [{"t": "np", "v": array_ext("int64", [2], 0)}]}, [bytes(16)], "length"),
    ({"k": "series", "index": RANGE3, "name": None,
      "data": {"t": "np", "v": array_ext("object", [3], 0)}}, [bytes(24)], "object"),
    ({"k": "series", "index": RANGE3, "name": None,
      "data": {"t": "cat", "codes": array_ext("int8", [3], 0), "ordered": False,
               "categories": {"t": "obj", "v": ["a"]}}}, [bytes([0, 1, 0])], "out of range"),
    ({"k": "series", "index": RANGE3, "name": None,
      "data": {"t": "str", "dtype": "str", "bytes": array_ext("uint8", [2], 0),
               "offsets": array_ext("int64", [4], 1), "mask": array_ext("bool", [3], 2)}},
     [b"ab", np.array([0, 5, 1, 2]).tobytes(), bytes(3)], "offsets"),
    ({"k": "series", "index": RANGE3, "name": None,
      "data": {"t": "tz", "v": array_ext("int64", [3], 0), "unit": "ns",
               "tz": "../../etc/passwd"}}, [bytes(24)], "timezone"),
    ({"k": "series", "index": RANGE3, "name": None,
      "data": {"t": "masked", "dtype": "object", "v": array_ext("int64", [3], 0),
               "mask": array_ext("bool", [3], 1)}}, [bytes(24), bytes(3)], "nullable"),
    ({"k": "series", "index": RANGE3, "name": {"a": 1},
      "data": {"t": "obj", "v": [1, 2, 3]}}, [], "label"),
    ({"k": "series", "index": {"k": "range", "start": 0, "stop": 3, "step": 0, "name": None},
      "data": {"t": "obj", "v": [1, 2, 3]}}, [], "step 0"),
    ({"k": "series", "index": RANGE3, "name": None, "data": {"t": "eval", "v": "1+1"}}, [],
     "unknown column kind"),
], ids=["kind", "columns", "length", "object array", "codes", "offsets", "tz path", "masked",
        "label", "range step", "column kind"])
def test_malformed_frame_specs_are_refused(spec: object, buffers: list[bytes],
                                           match: str) -> None:
    header, raw = frame_message(spec, buffers)
    with pytest.raises(ProtocolError, match=match):
        p.decode(header, [bytearray(b) for b in raw])


# -- sharing -------------------------------------------------------------------------------
def test_numeric_columns_live_in_sealed_read_only_memory() -> None:
    frame = patients(50)
    numeric, rest = tables.split(frame)
    assert [i for i, _ in numeric] == [0, 1, 5]  # age, bmi, outcome
    sealed = SealedColumns(numeric)
    try:
        fd = os.open(sealed.message["path"], os.O_RDWR)
        try:
            with pytest.raises(OSError) as info:
                os.write(fd, b"\0" * 8)
            assert info.value.errno == errno.EPERM  # sealed: nobody can write, not even us
        finally:
            os.close(fd)
        import mmap

        fd = os.open(sealed.message["path"], os.O_RDONLY)
        mapping = mmap.mmap(fd, sealed.message["nbytes"], prot=mmap.PROT_READ)
        os.close(fd)
        arrays = {c["position"]: np.frombuffer(mapping, np.dtype(c["dtype"]), c["length"],
                                               c["offset"]) for c in sealed.message["columns"]}
        rebuilt = tables.assemble(arrays, rest)
        pd.testing.assert_frame_equal(rebuilt, frame)
        assert np.shares_memory(rebuilt["age"].to_numpy(), arrays[0])
        with pytest.raises(ValueError, match="read-only"):
            rebuilt["age"].to_numpy()[0] = 1
        del rebuilt, arrays
    finally:
        sealed.close()


@pytest.mark.parametrize("obj,match", [
    (pd.DataFrame({"x": [{"a": 1}]}), "object columns may hold only strings"),
    (pd.DataFrame({"p": pd.period_range("2020", periods=2, freq="M")}), "cannot share"),
    (pd.DataFrame({"s": pd.arrays.SparseArray([0, 1])}), "cannot share"),
    (pd.DataFrame([[1]], columns=pd.Index([frozenset([1])], dtype=object)), "labels"),
    (pd.Series([1, 2], index=pd.Index([object(), object()])), "the index"),
], ids=["dicts", "period", "sparse", "label", "index objects"])
def test_tables_that_cannot_be_shared_safely_are_refused(obj: object, match: str,
                                                          tmp_path: Path) -> None:
    class Sub(pd.DataFrame):
        pass

    with session_pair(tmp_path / "audit.db") as (owner, _):
        with pytest.raises(TypeError, match=match):
            owner.share(obj, name="bad")
        with pytest.raises(TypeError, match="not a subclass"):
            owner.share(Sub({"a": [1]}), name="bad")
        assert owner.shared == {}


def test_the_listing_shows_columns_dtypes_and_rows_never_the_index(tmp_path: Path) -> None:
    frame = patients(120)
    with session_pair(tmp_path / "audit.db") as (owner, researcher):
        owner.share(frame, name="patients", description="clinic extract", tags=("phi",))
        owner.share(frame["age"], name="ages", declare_rows=False)
        researcher.store.wait_for("ages", 10)
        info = researcher.store.info("patients")
        assert info.type == "pandas.DataFrame" and info.rows == 120
        assert info.shape == [120, 6]
        assert info.columns == ["age", "bmi", "sex", "group", "visits", "outcome"]
        assert info.dtypes == ["int64", "float64", "str", "category", "Int64", "int64"]
        hidden = researcher.store.info("ages")
        assert hidden.rows is None and hidden.shape is None and hidden.dtype == "int64"
        listing = repr(researcher.store) + researcher.store._repr_html_()
        assert "120 rows x 6 columns" in listing and "? rows" in listing
        assert "patient" not in listing.replace("patients", "")  # no index label or value
        assert "age: int64" in listing


def test_an_analysis_on_a_shared_table(tmp_path: Path) -> None:
    frame = patients()
    with session_pair(tmp_path / "audit.db") as (owner, researcher):
        owner.share(frame, name="patients")
        owner.requests.add_rule("approve")
        r = researcher
        df = r.store.wait_for("patients", 10)
        old = df[df["age"] >= 65]
        by_group = old.groupby("group", observed=True)["bmi"].agg(["mean", "count"])
        expected = frame[frame["age"] >= 65].groupby("group", observed=True)["bmi"].agg(
            ["mean", "count"])
        pd.testing.assert_frame_equal(by_group.get("bmi by group", timeout=60), expected)
        table = r.pd.crosstab(df["sex"], df["group"])
        pd.testing.assert_frame_equal(table.get("crosstab", timeout=60),
                                      pd.crosstab(frame["sex"], frame["group"]))
        dummies = r.pd.get_dummies(df[["sex", "group"]], dtype=float).sum()
        pd.testing.assert_series_equal(
            dummies.get("dummies", timeout=60),
            pd.get_dummies(frame[["sex", "group"]], dtype=float).sum())
        bands = r.pd.cut(df["age"], [0, 40, 65, 120]).value_counts().sort_index()
        pd.testing.assert_series_equal(
            bands.get("bands", timeout=60),
            pd.cut(frame["age"], [0, 40, 65, 120]).value_counts().sort_index())
        described = df[["age", "bmi"]].describe().get("describe", timeout=60)
        pd.testing.assert_frame_equal(described, frame[["age", "bmi"]].describe())
        numeric = df[["age", "bmi"]]
        assigned = numeric.assign(ratio=df["bmi"] / df["age"]).fillna(0).clip(0, 100)
        corr = assigned[["age", "bmi", "ratio"]].corr().get("corr", timeout=60)
        local = frame[["age", "bmi"]].assign(ratio=frame["bmi"] / frame["age"]).fillna(
            0).clip(0, 100)
        pd.testing.assert_frame_equal(corr, local[["age", "bmi", "ratio"]].corr())
        pivot = r.pd.pivot_table(df, index="sex", columns="group", values="bmi",
                                 aggfunc="mean", observed=True)
        pd.testing.assert_frame_equal(
            pivot.get("pivot", timeout=60),
            pd.pivot_table(frame, index="sex", columns="group", values="bmi", aggfunc="mean",
                           observed=True))
        tensor = r.torch.tensor(df[["age", "bmi"]].to_numpy(), dtype=r.torch.float32)
        got = tensor.sum(0).get("tensor", timeout=60)
        assert torch.allclose(got, torch.tensor(frame[["age", "bmi"]].to_numpy(),
                                                dtype=torch.float32).sum(0))
        visits = df["visits"].fillna(0).astype("int64").sum().get("visits", timeout=60)
        assert visits == int(frame["visits"].fillna(0).sum())
        assert all(sorted(q.sources) == ["patients"] for q in owner.requests)


def test_merge_and_join_of_two_shared_tables(tmp_path: Path) -> None:
    frame = patients(60)
    labs = pd.DataFrame({"patient": frame.index[::2], "hba1c": np.linspace(5, 9, 30)})
    with session_pair(tmp_path / "audit.db") as (owner, researcher):
        owner.share(frame.reset_index(), name="patients")
        owner.share(labs, name="labs")
        owner.requests.add_rule("approve")
        a = researcher.store.wait_for("patients", 10)
        b = researcher.store.wait_for("labs", 10)
        merged = researcher.pd.merge(a, b, left_on="patient_id", right_on="patient")
        expected = pd.merge(frame.reset_index(), labs, left_on="patient_id",
                            right_on="patient")
        out = merged.groupby("sex")["hba1c"].mean().get("merged", timeout=60)
        pd.testing.assert_series_equal(out, expected.groupby("sex")["hba1c"].mean())
        joined = a.set_index("patient_id").join(b.set_index("patient"), how="inner")
        count = joined["hba1c"].count().get("joined", timeout=60)
        assert count == 30
        assert owner.requests[-1].sources == frozenset({"patients", "labs"})


def test_scikit_learn_on_pointers(tmp_path: Path) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    frame = patients()
    with session_pair(tmp_path / "audit.db") as (owner, researcher):
        owner.share(frame, name="patients")
        owner.requests.add_rule("approve")
        sk = researcher.sklearn
        df = researcher.store.wait_for("patients", 10)
        X, y = df[["age", "bmi"]], df["outcome"]
        model = sk.linear_model.LogisticRegression(max_iter=200)
        pipe = sk.pipeline.make_pipeline(sk.preprocessing.StandardScaler(), model)
        pipe.fit(X, y)
        local = make_pipeline(StandardScaler(), LogisticRegression(max_iter=200))
        local.fit(frame[["age", "bmi"]], frame["outcome"])
        coef = model.coef_.get("coefficients", timeout=60)
        assert np.allclose(coef, local[-1].coef_)
        request = owner.requests[-1]
        assert request.sources == frozenset({"patients"})  # the step was fitted on them
        assert "modified in place using patients" in request.lineage
        score = pipe.score(X, y).get("score", timeout=60)
        assert score == pytest.approx(local.score(frame[["age", "bmi"]], frame["outcome"]))
        cv = sk.model_selection.cross_val_score(sk.linear_model.LogisticRegression(), X, y,
                                                cv=5).get("cv", timeout=60)
        assert np.allclose(cv, cross_val_score(LogisticRegression(), frame[["age", "bmi"]],
                                               frame["outcome"], cv=5))
        X_train, X_test, y_train, y_test = sk.model_selection.train_test_split(
            X, y, test_size=0.25, random_state=0)
        forest = sk.ensemble.RandomForestClassifier(n_estimators=20, random_state=0)
        forest.fit(X_train, y_train)
        importances = forest.feature_importances_.get("importances", timeout=60)
        assert importances.shape == (2,) and importances.sum() == pytest.approx(1.0)
        accuracy = sk.metrics.accuracy_score(y_test, forest.predict(X_test))
        assert 0.0 <= accuracy.get("accuracy", timeout=60) <= 1.0


def test_a_fitted_estimator_itself_cannot_be_sent(tmp_path: Path) -> None:
    with session_pair(tmp_path / "audit.db") as (owner, researcher):
        owner.share(patients(), name="patients")
        owner.requests.add_rule("approve")
        df = researcher.store.wait_for("patients", 10)
        model = researcher.sklearn.linear_model.LinearRegression()
        model.fit(df[["age"]], df["bmi"])
        with pytest.raises(duet.RemoteError, match="sending the value"):
            model.get("the model object", timeout=60)
        assert model.intercept_.get("intercept", timeout=60) == pytest.approx(
            np.polyfit(patients()["age"], patients()["bmi"], 1)[1])


def test_every_table_name_resolves_and_is_vetted_on_first_use() -> None:
    from duet.policy import Allowlist

    allowlist = Allowlist.default()
    lazy = [q for q in allowlist.spec()["functions"] if q.split(".")[0] in ("pandas", "sklearn")]
    assert "pandas.crosstab" in lazy and "sklearn.linear_model.LogisticRegression" in lazy
    for qualname in lazy:
        assert callable(allowlist.resolve_function(qualname)), qualname
    rebuilt = Allowlist.from_spec(allowlist.spec())
    assert rebuilt.spec() == allowlist.spec()


def test_a_long_chain_on_a_failed_pointer_keeps_the_worker_up(tmp_path: Path) -> None:
    """Each op on a failed input names its root cause once: 1,500 of them used to build a
    1,500-deep text that broke the worker's message limit (and restarted it)."""
    with session_pair(tmp_path / "audit.db") as (owner, researcher):
        owner.share(patients(50), name="patients")
        owner.requests.add_rule("approve")
        df = researcher.store.wait_for("patients", 10)
        pid = owner.worker_pid
        chain = df["no such column"]
        for _ in range(1500):
            chain = chain + 1
        with pytest.raises(duet.RemoteError, match="UpstreamFailure"):
            chain.get("the end of the chain", timeout=120)
        request = owner.requests[-1]
        assert "KeyError" in request.failed and len(request.failed) < 500
        assert owner.worker_pid == pid
        assert df["age"].count().get("still working", timeout=60) == 50


def test_callables_and_looked_up_names_are_refused_wherever_pandas_is_involved() -> None:
    """The worker's check on resolved arguments (the raw wire reaches it with objects the
    researcher made on the owner's side: here a torch module, which can be called)."""
    from duet.errors import PolicyViolation
    from duet.policy import Allowlist

    allowlist = Allowlist.default()
    frame = patients(20)
    module = torch.nn.Identity()
    pivot = allowlist.resolve_function("pandas.pivot_table")
    refused = [
        (frame.sort_values, ("age",), {"key": module}),
        (frame.assign, (), {"x": module}),
        (allowlist.resolve_function("operator.getitem"), (frame.loc, module), {}),
        (allowlist.resolve_function("operator.getitem"), (frame, module), {}),
        (frame.agg, ("to_pickle", "/tmp/x"), {}),
        (frame.groupby("sex").agg, (), {"n": ("age", "to_csv")}),
        (pivot, (frame, "bmi", "sex", None, "to_pickle"), {}),
        (frame["sex"].map, ("upper",), {}),
        (frame.apply, (module,), {}),
    ]
    for fn, args, kwargs in refused:
        with pytest.raises(PolicyViolation):
            allowlist.check_arguments(fn, args, kwargs)
    allowed = [
        (frame.agg, ({"age": ["mean", "max"], "bmi": "median"},), {}),
        (frame.groupby("sex").agg, (), {"n": ("age", "count")}),
        (frame["sex"].map, ({"F": 0, "M": 1},), {}),
        (pivot, (frame, "bmi", "sex", None, "mean"), {}),
        (torch.nn.Sequential, (module,), {}),  # torch keeps taking its modules
    ]
    for fn, args, kwargs in allowed:
        allowlist.check_arguments(fn, args, kwargs)


def test_a_restarted_worker_maps_the_shared_table_again(tmp_path: Path) -> None:
    frame = patients(80)
    with session_pair(tmp_path / "audit.db") as (owner, researcher):
        owner.share(frame, name="patients")
        df = researcher.store.wait_for("patients", 10)
        pending = df["bmi"].sum().request("left pending")
        assert owner.requests.wait(30) is not None
        old = owner.worker_pid
        owner.cancel()
        assert owner.worker_pid != old
        with pytest.raises(duet.WorkerRestarted):
            pending.result(30)  # the researcher has heard of the restart
        owner.requests.add_rule("approve")
        before = frame["bmi"].sum()
        after = researcher.store["patients"]["bmi"].sum().get("after", timeout=60)
        assert before == after == pytest.approx(frame["bmi"].sum())
        got = researcher.store["patients"][["sex", "group"]].value_counts().get(
            "strings and categories after the restart", timeout=60)
        pd.testing.assert_series_equal(got, frame[["sex", "group"]].value_counts())


def test_the_owner_previews_a_table_with_its_extremes_and_its_size() -> None:
    from duet.snapshot import freeze

    frame = patients(1000)
    described = freeze("ab" * 4, frame[["age", "bmi"]].describe())
    assert "max" in described.preview and "min" in described.preview  # all 8 rows shown
    assert described.summary.type == "pandas.DataFrame" and described.summary.shape == [8, 2]
    assert described.summary.elements == 8 * 2 + 8 + 2  # cells, index entries, labels
    whole = freeze("ab" * 4, frame)
    assert "[1000 rows x 6 columns]" in whole.preview and len(whole.preview) < 1200
    assert "patient-0000" in whole.preview  # the owner sees the index; it is data


def test_a_fitted_estimator_counts_against_the_memory_budget() -> None:
    from duet.executor import Executor
    from duet.policy import Allowlist

    rng = np.random.default_rng(0)
    X = rng.random((2000, 4))
    y = (X[:, 0] + rng.normal(0, 0.3, 2000) > 0.5).astype(int)
    executor = Executor(Allowlist.default(), memory_budget=None)
    executor.share("X", X)
    executor.share("y", y)
    assert executor.execute(p.Op(result=1, kind="function",
                                 name="sklearn.ensemble.RandomForestClassifier",
                                 kwargs={"n_estimators": 10, "random_state": 0})) is None
    empty = executor.used_bytes()
    assert executor.execute(p.Op(result=2, kind="method", name="fit", target=p.PointerRef(1),
                                 args=[p.StoreRef("X"), p.StoreRef("y")])) is None
    fitted = executor.used_bytes()
    assert fitted > empty + 10 * 64  # ten trees, each at least a node
    assert executor.lookup(p.PointerRef(1)).sources == frozenset({"X", "y"})
