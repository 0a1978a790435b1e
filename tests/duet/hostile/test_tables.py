"""Class 8: tables. The hostile researcher against a shared pandas DataFrame, two real
processes over WebRTC.

1. The owner cannot open pandas' and scikit-learn's code-running doors, by any spelling.
2. Every forbidden entry point (expression strings, files, plots, styles, callables, names
   pandas would look up and call, in-place changes, processes, persistence) is refused
   with a clear error, through the API and on the raw wire.
3. Derived metadata (the length of a filtered table, the index, categories found by
   value_counts/unique/groupby, get_dummies' columns, describe's extremes) is a pointer:
   nothing about it reaches the researcher without a request, which the owner sees.
4. The owner's table is unharmed, in its kernel and in the worker, and the session is up.
"""

from __future__ import annotations

from pathlib import Path

from tests.duet.hostile.peerkit import script
from tests.helpers.peers import owner_and_researcher

# Names the owner may never allow (each raises ValueError and allows nothing).
NEVER = [
    "pandas.eval", "pandas.read_csv", "pandas.read_pickle", "pandas.read_sql",
    "pandas.read_clipboard", "pandas.read_html", "pandas.io.pickle.read_pickle",
    "pandas.core.computation.eval.eval", "pandas.api.extensions.register_dataframe_accessor",
    "pandas.DataFrame.to_pickle", "pandas.DataFrame.query", "DataFrame.query",
    "DataFrame.eval", "DataFrame.to_pickle", "DataFrame.to_csv", "DataFrame.to_sql",
    "DataFrame.to_clipboard", "Series.to_pickle", "DataFrame.style", "DataFrame.plot",
    "Series.plot", "DataFrame.pipe", "GroupBy.apply", "GroupBy.pipe", "DataFrame.map",
    "DataFrame.applymap", "pandas.set_option", "sklearn.datasets.fetch_openml",
    "sklearn.preprocessing.FunctionTransformer", "sklearn.utils.parallel_backend",
    "sklearn.set_config", "sklearn.metrics.make_scorer", "Estimator.set_output",
]

OWNER = script(f'''
import pandas as pd
from tests.duet.hostile.peerkit import launch, serve

rng = np.random.default_rng(7)
n = 300
patients = pd.DataFrame({{
    "age": rng.integers(18, 90, n),
    "bmi": rng.normal(26, 4, n).round(1),
    "sex": rng.choice(["F", "M"], n),
    "group": pd.Categorical(rng.choice(["control", "treated"], n)),
    "outcome": rng.integers(0, 2, n),
}}, index=pd.Index([f"MRN-{{i:06d}}" for i in range(n)], name="mrn"))
before = int(pd.util.hash_pandas_object(patients).sum())
s = launch(max_worker_restarts=50)
emit("code", s.code)
accepted = []
for name in {NEVER!r}:
    for mutating in (False, True):
        try:
            s.allow(name, mutating=mutating)
            accepted.append([name, mutating])
        except ValueError:
            pass
emit("accepted", accepted)
s.share(patients, name="patients", description="a clinic extract")
emit("expected", {{"age": int(patients["age"].sum()), "rows": n,
                  "old": int((patients["age"] > 60).sum())}})
assert s.wait_for_peer(60)
requests = serve(s)
emit("requests", requests)
emit("owner after", {{"unchanged": int(pd.util.hash_pandas_object(patients).sum()) == before,
                     "connected": s.connected,
                     "files": sorted(p for p in os.listdir(TMP) if p.startswith("leak"))}})
''')

RESEARCHER = script('''
from tests.duet.hostile.peerkit import join, flag, outcome
from tests.helpers.rawwire import send_raw, op, new_id, record_received
from duet import protocol as p
r = join()
received = record_received(r)
df = r.store.wait_for("patients", 60)
leak = os.path.join(TMP, "leak")
identity = r.torch.nn.Identity()  # a callable object of the researcher's, on the owner
sk = r.sklearn
attempts = {
    "query": lambda: df.query("age > 60"),
    "DataFrame.eval": lambda: df.eval("age * 2"),
    "pd.eval": lambda: r.pd.eval("1 + 1"),
    "read_csv": lambda: r.pd.read_csv("/etc/passwd"),
    "read_pickle": lambda: r.pd.read_pickle(leak + "0"),
    "to_csv": lambda: df.to_csv(leak + "1"),
    "to_pickle": lambda: df.to_pickle(leak + "2"),
    "to_clipboard": lambda: df.to_clipboard(),
    "style": lambda: df.style,
    "plot": lambda: df.plot(),
    "pipe": lambda: df.pipe(identity),
    "apply(callable)": lambda: df.apply(identity),
    "agg('to_pickle')": lambda: df.agg("to_pickle", leak + "3"),
    "named agg to_csv": lambda: df.groupby("sex").agg(x=("age", "to_csv")),
    "transform('pipe')": lambda: df.transform("pipe"),
    "map('upper')": lambda: df["sex"].map("upper"),
    "pivot_table aggfunc": lambda: r.pd.pivot_table(df, "bmi", "sex", None, "to_pickle"),
    "crosstab aggfunc": lambda: r.pd.crosstab(df["sex"], df["group"], values=df["age"],
                                              aggfunc="to_csv"),
    "sort_values(key=)": lambda: df.sort_values("age", key=identity),
    "assign(callable)": lambda: df.assign(x=identity),
    "loc[callable]": lambda: df.loc[identity],
    "inplace=True": lambda: df.sort_values("age", inplace=True),
    "drop inplace": lambda: df.drop(columns="age", inplace=True),
    "insert": lambda: df.insert(0, "x", 1),
    "update": lambda: df.update(df),
    "FunctionTransformer": lambda: sk.preprocessing.FunctionTransformer(identity),
    "n_jobs=-1": lambda: sk.ensemble.RandomForestClassifier(n_jobs=-1),
    "copy=False": lambda: sk.preprocessing.StandardScaler(copy=False).fit_transform(
        df[["age"]]),
    "metric callable": lambda: sk.neighbors.KNeighborsClassifier(metric=identity),
    "fetch_openml": lambda: sk.datasets.fetch_openml("iris"),
    "pipeline memory": lambda: sk.pipeline.make_pipeline(sk.preprocessing.StandardScaler(),
                                                         memory=leak + "8"),
    "set_params memory": lambda: sk.pipeline.make_pipeline(
        sk.preprocessing.StandardScaler()).set_params(memory=leak + "9"),
    "pre_dispatch expression": lambda: sk.model_selection.cross_val_score(
        sk.linear_model.LogisticRegression(), df[["age"]], df["outcome"],
        pre_dispatch="2*n_jobs"),
    "df[callable]": lambda: df[identity],
    "numpy view sort": lambda: df["age"].to_numpy().sort(),
    "asarray view sort": lambda: r.np.asarray(df["bmi"]).sort(),
    "values view partition": lambda: df["age"].values.partition(3),
}
out = {}
for name, attempt in attempts.items():
    out[name] = outcome(lambda: attempt().get(name, timeout=60))
def setitem(target, key):
    target[key] = 0
out["df[col] = 0"] = outcome(lambda: setitem(df, "age"))
out["df.loc[...] = 0"] = outcome(lambda: setitem(df.loc, 0))
out["len(filtered)"] = outcome(lambda: len(df[df["age"] > 60]))
out["iterate"] = outcome(lambda: list(df))
# the same on the raw wire, spelled as the API would never spell them
store = p.StoreRef("patients")
raw = {
    "raw query": op(new_id(r), "query", kind="method", target=store, args=["age > 60"]),
    "raw eval": op(new_id(r), "eval", kind="method", target=store, args=["age * 2"]),
    "raw to_pickle": op(new_id(r), "to_pickle", kind="method", target=store,
                        args=[leak + "4"]),
    "raw pandas.eval": op(new_id(r), "pandas.eval", args=["1 + 1"]),
    "raw read_csv": op(new_id(r), "pandas.read_csv", args=["/etc/passwd"]),
    "raw io read_pickle": op(new_id(r), "pandas.io.pickle.read_pickle", args=[leak + "5"]),
    "raw DataFrame.to_csv": op(new_id(r), "pandas.core.frame.DataFrame.to_csv",
                               args=[store, leak + "6"]),
    "raw __setitem__": op(new_id(r), "__setitem__", kind="method", target=store,
                          args=["age", 0]),
    "raw operator.setitem": op(new_id(r), "operator.setitem", args=[store, "age", 0]),
    "raw agg name": op(new_id(r), "agg", kind="method", target=store,
                       args=["to_pickle", leak + "7"]),
    "raw apply name": op(new_id(r), "apply", kind="method", target=store, args=["to_csv"]),
    "raw inplace": op(new_id(r), "fillna", kind="method", target=store, args=[0],
                      kwargs={"inplace": True}),
    "raw style": op(new_id(r), "style", kind="getattr", target=store),
    "raw attrs": op(new_id(r), "attrs", kind="getattr", target=store),
    "raw fetch": op(new_id(r), "sklearn.datasets.fetch_openml", args=["iris"]),
    "raw n_jobs": op(new_id(r), "sklearn.model_selection.cross_val_score",
                     kwargs={"n_jobs": 8}),
}
for message in raw.values():
    send_raw(r, message)
r.np.zeros(1).get("sync", timeout=60)
refused = {m.result for m in received if m.type == "op_failed" and m.policy}
for name, message in raw.items():
    out[name] = ["PolicyViolation" if message.result in refused else "not refused", ""]

# Derived metadata is data: pointers, silent until a request (denied here), which the
# owner sees with its lineage and source.
mark = len(received)
old = df[df["age"] > 60]
derived = {
    "filtered rows": old.shape,
    "index": df.index,
    "value_counts categories": df["sex"].value_counts().index,
    "unique": df["group"].unique(),
    "groupby keys": df.groupby("sex").groups,
    "get_dummies columns": r.pd.get_dummies(df["sex"]).columns,
    "describe max": df.describe().loc["max"],
    "missing column": df["no such column"].sum(),
}
r.np.ones(1).get("sync 2", timeout=60)
silent = [m.type for m in received[mark:] if m.type not in ("ping", "pong")]
metadata = {}
for name, pointer in derived.items():
    metadata[name] = outcome(lambda: pointer.get(f"{name}!deny", timeout=60))
# what the owner approves arrives; the shared table is as it was
after = {
    "age": outcome(lambda: df["age"].sum().get("age sum after", timeout=60)),
    "old": outcome(lambda: old.shape.get("old rows after", timeout=60)),
    "rows": outcome(lambda: df.shape.get("rows after", timeout=60)),
}
emit("out", {"out": out, "silent": silent, "metadata": metadata, "after": after})
flag("stop")
''')

# Refusals a researcher sees, by where they happen: on the researcher's side (the name is
# not on the owner's allowlist), in the owner's kernel at once (names and literal arguments),
# or in the worker (what needs the resolved objects: callables, positional function names).
REFUSED = ("PolicyViolation", "local:TypeError")


def refused(result: list[str]) -> bool:
    kind, message = result
    return kind in REFUSED or (kind == "RemoteError" and "PolicyViolation" in message)


def test_the_hostile_researcher_against_a_shared_table(signaling_url: str,
                                                       tmp_path: Path) -> None:
    owner, researcher = owner_and_researcher(OWNER, RESEARCHER, server=signaling_url,
                                             tmp=tmp_path)
    try:
        accepted = owner.expect("accepted")
        expected = owner.expect("expected")
        result = researcher.expect("out", timeout=300)
        requests = owner.expect("requests", timeout=60)
        after = owner.expect("owner after", timeout=60)
    finally:
        owner.kill()
        researcher.kill()
    assert accepted == [], accepted
    out = result["out"]
    not_refused = {name: outcome for name, outcome in out.items() if not refused(outcome)}
    assert not_refused == {}, not_refused
    assert len(out) >= 50, len(out)
    # refusals that depend on names alone say what was refused
    assert "not on the owner's allowlist" in out["query"][1]
    assert "DataFrame.eval is not on the owner's allowlist" in out["DataFrame.eval"][1]
    assert "DataFrame.style is not on the owner's allowlist" in out["style"][1]
    assert "'to_pickle' is not an allowlisted function name" in out["agg('to_pickle')"][1]
    assert "inplace=True is not allowed" in out["inplace=True"][1]
    assert "n_jobs" in out["n_jobs=-1"][1]
    assert "needs the value of a Pointer" in out["len(filtered)"][1]
    # derived metadata: nothing arrived without a request; each needed one, and was denied
    assert result["silent"] == ["decision"], result["silent"]  # the sync request's answer
    metadata = result["metadata"]
    assert all(kind == "RequestDenied" for kind, _ in metadata.values()), metadata
    seen = {reason.removesuffix("!deny"): entry for reason, entry in requests.items()
            if reason.endswith("!deny")}
    assert set(metadata) <= set(seen)
    for name in metadata:
        assert seen[name]["sources"] == ["patients"], (name, seen[name])
        assert seen[name]["status"] == "denied"
    assert ".shape" in seen["filtered rows"]["lineage"]
    assert "get_dummies" in seen["get_dummies columns"]["lineage"]
    assert "KeyError" in seen["missing column"]["failed"]  # the owner sees why, not the peer
    # the owner's table and the worker's copy are unharmed; nothing was written
    assert after == {"unchanged": True, "connected": True, "files": []}, after
    assert not list(tmp_path.glob("leak*"))
    assert result["after"] == {"age": ["value", expected["age"]],
                               "old": ["value", [expected["old"], 5]],
                               "rows": ["value", [expected["rows"], 5]]}, result["after"]
