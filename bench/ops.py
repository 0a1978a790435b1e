"""Benchmark remote execution (pointers, pipelining, round trips, training) and print JSON.

Owner and researcher in two spawned processes over a real signaling server on loopback,
the owner auto-approving every request; a bare aiortc data channel between two more
processes gives the reference round trip, measured in the same run:

* **pipelined**: 10,000 ``x = x + 1`` on a small tensor, then one ``x.get()``; ops/s for
  the whole (enqueue + execute + the final round trip) and for enqueueing alone;
* **op + round trip**: ``(x + 1).get()`` repeated; median/p99, against ``r.ping()`` and
  the bare channel's ping round trip; with the CPU each process (researcher, owner's
  kernel, owner's worker) spends per round trip (``round_trip_cpu_ms``);
* **training**: one step of a 20-64-2 MLP on a batch of 256 (zero_grad, forward,
  cross-entropy, backward, SGD step) remote vs the same step locally; synchronous steps
  (each ends with ``loss.get()``) and pipelined steps (many steps, then one ``get``).

* **tables**: a 100,000-row DataFrame (ints, floats, strings, a categorical, a string
  index) shared by the owner: pipelined pandas ops/s on a column, a groupby-mean round
  trip, the whole table's round trip (``df.get()``, 3 times; bytes, MB/s) next to the codec alone
  in one process (encode + decode, and pickle's time and size for reference only), and
  scikit-learn (after one warm-up fit: the worker imports it on first use):
  LogisticRegression fit + ``coef_`` remote vs local, a 5-fold
  ``cross_val_score``, ``predict`` + ``accuracy_score``.

Targets (reported as booleans, never asserted): >= 5,000 pipelined ops/s; an op plus a
round trip within 2x the bare channel's ping round trip.

Usage: ``.venv/bin/python bench/ops.py [--ops 10000] [--reps 200] [--steps 50] [--quick]
[--tables-only]``
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    DuetResearcher,
    bare_rtc_pair,
    cpu_seconds,
    duet_pair,
    emit,
    log,
    machine,
    patients_table,
    payload,
    signaling_server,
    summary_ms,
)


class OpsResearcher(DuetResearcher):
    """The researcher's side of the ops benchmark (runs in its own process)."""

    def pipelined(self, n: int) -> dict[str, Any]:
        x = self.r.store["x"]
        start = time.perf_counter()
        for _ in range(n):
            x = x + 1
        queued = time.perf_counter()
        value = x.get("benchmark", timeout=600)
        done = time.perf_counter()
        return {"ops": n, "enqueue_s": queued - start, "total_s": done - start,
                "value_ok": bool((value == n).all())}

    def op_roundtrip(self, n: int, warmup: int = 10) -> list[float]:
        x = self.r.store["x"]
        samples = []
        for i in range(warmup + n):
            start = time.perf_counter()
            (x + 1).get("benchmark", timeout=60)
            if i >= warmup:
                samples.append(time.perf_counter() - start)
        return samples

    def get_roundtrip(self, n: int) -> list[float]:
        """A request for a shared object, no op: the request/approval path alone."""
        x = self.r.store["x"]
        samples = []
        for _ in range(n):
            start = time.perf_counter()
            x.get("benchmark", timeout=60)
            samples.append(time.perf_counter() - start)
        return samples

    def training(self, steps: int, warmup: int = 5) -> dict[str, Any]:
        import torch

        r = self.r
        nn, F = r.torch.nn, r.torch.nn.functional
        X, y = r.store["X"], r.store["y"]
        r.torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 2))
        opt = r.torch.optim.SGD(net.parameters(), lr=0.1)

        def remote_step() -> Any:
            opt.zero_grad()
            loss = F.cross_entropy(net(X), y)
            loss.backward()
            opt.step()
            return loss

        first = float(remote_step().get("loss", timeout=60))
        for _ in range(warmup):
            remote_step().get("loss", timeout=60)
        sync = []
        for _ in range(steps):
            start = time.perf_counter()
            remote_step().get("loss", timeout=60)
            sync.append(time.perf_counter() - start)
        start = time.perf_counter()
        for _ in range(steps):
            loss = remote_step()
        last = float(loss.get("loss", timeout=120))
        pipelined = (time.perf_counter() - start) / steps

        # the same step here, on a local copy of the same data (the benchmark's own copy)
        Xl = torch.from_numpy(payload(256 * 20 * 4, seed=1).reshape(256, 20)) - 0.5
        yl = (Xl[:, 0] + Xl[:, 1] > 0).long()
        torch.manual_seed(0)
        tnn = torch.nn
        lnet = tnn.Sequential(tnn.Linear(20, 64), tnn.ReLU(), tnn.Linear(64, 2))
        lopt = torch.optim.SGD(lnet.parameters(), lr=0.1)

        def local_step() -> Any:
            lopt.zero_grad()
            lloss = torch.nn.functional.cross_entropy(lnet(Xl), yl)
            lloss.backward()
            lopt.step()
            return lloss

        for _ in range(warmup):
            local_step().item()
        local = []
        for _ in range(max(steps, 200)):
            start = time.perf_counter()
            local_step().item()
            local.append(time.perf_counter() - start)
        return {"sync": sync, "pipelined_per_step_s": pipelined, "local": local,
                "loss_first": first, "loss_last": last}


    def tables(self, ops: int, reps: int) -> dict[str, Any]:
        """pandas and scikit-learn on the owner's 100,000-row table."""
        import numpy as np
        from sklearn.linear_model import LogisticRegression

        r = self.r
        p = r.store["patients"]
        column = p["bmi"]
        start = time.perf_counter()
        for _ in range(ops):
            column = column + 1
        total = float(column.sum().get("benchmark", timeout=600))
        pipelined = time.perf_counter() - start
        groupby = []
        for _ in range(reps):
            start = time.perf_counter()
            p.groupby("sex")["bmi"].mean().get("benchmark", timeout=60)
            groupby.append(time.perf_counter() - start)
        table = []
        for _ in range(3):
            start = time.perf_counter()
            frame = p.get("the whole table", timeout=600)
            table.append(time.perf_counter() - start)
        same_bytes = r.np.ones(5_900_000 // 8)  # a plain array of the table's wire size
        array = []
        for _ in range(3):
            start = time.perf_counter()
            same_bytes.get("an array as large", timeout=600)
            array.append(time.perf_counter() - start)
        X, y = p[["age", "bmi", "bp"]], p["outcome"]
        sk = r.sklearn
        warm = sk.linear_model.LogisticRegression()  # the worker imports scikit-learn once
        warm.fit(X.head(100), y.head(100))
        warm.coef_.get("warm up", timeout=600)
        start = time.perf_counter()
        model = sk.linear_model.LogisticRegression(max_iter=200)
        model.fit(X, y)
        coef = model.coef_.get("benchmark", timeout=600)
        fit_remote = time.perf_counter() - start
        start = time.perf_counter()
        local = LogisticRegression(max_iter=200).fit(frame[["age", "bmi", "bp"]],
                                                     frame["outcome"])
        fit_local = time.perf_counter() - start
        start = time.perf_counter()
        cv = sk.model_selection.cross_val_score(sk.linear_model.LogisticRegression(max_iter=200),
                                                X, y, cv=5).get("benchmark", timeout=600)
        cv_s = time.perf_counter() - start
        predict = []
        for _ in range(max(3, reps // 10)):
            start = time.perf_counter()
            sk.metrics.accuracy_score(y, model.predict(X)).get("benchmark", timeout=60)
            predict.append(time.perf_counter() - start)
        return {"ops": ops, "pipelined_s": pipelined, "sum_ok": bool(np.isfinite(total)),
                "groupby": groupby, "table_s": table, "array_s": array,
                "rows": int(len(frame)),
                "dtypes": [str(t) for t in frame.dtypes], "index": str(frame.index.dtype),
                "fit_remote_s": fit_remote, "fit_local_s": fit_local,
                "coef_match": bool(np.allclose(coef, local.coef_, atol=1e-4)),
                "cv_s": cv_s, "cv_mean": float(cv.mean()), "predict_score": predict}


def codec_alone(rows: int = 100_000) -> dict[str, Any]:
    """The frame codec in one process: encode + decode of the same table (no network), and
    pickle's time and size next to it, for reference only (duet never pickles peer data)."""
    import pickle

    from duet import protocol as p

    frame = patients_table(rows)
    message = p.Decision(request_id="ab" * 4, status="approved", value=frame)
    timings = []
    for _ in range(5):
        start = time.perf_counter()
        header, buffers = p.encode(message)
        copies = [bytearray(b) for b in buffers]
        decoded = p.decode(header, copies)
        timings.append(time.perf_counter() - start)
    assert isinstance(decoded, p.Decision)
    wire = len(header) + sum(len(b) for b in copies)
    pickled = []
    for _ in range(5):
        start = time.perf_counter()
        blob = pickle.dumps(frame, protocol=pickle.HIGHEST_PROTOCOL)
        pickle.loads(blob)
        pickled.append(time.perf_counter() - start)
    return {"rows": rows, "wire_bytes": wire, "header_bytes": len(header),
            "encode_decode_ms": round(min(timings) * 1e3, 1),
            "round_trips_equal": bool(decoded.value.equals(frame)),
            "pickle_ms_for_reference": round(min(pickled) * 1e3, 1),
            "pickle_bytes_for_reference": len(blob)}


def tables_section(researcher: Any, ops: int, reps: int) -> dict[str, Any]:
    log("tables: 100,000-row DataFrame")
    t = researcher.call("tables", ops, reps, timeout=1800)
    codec = codec_alone()
    table_mb = codec["wire_bytes"] / 1e6
    return {
        "table": {"rows": t["rows"], "dtypes": t["dtypes"], "index": t["index"]},
        "pandas_pipelined": {"ops": ops, "ops_per_s": round(ops / t["pipelined_s"]),
                             "ok": t["sum_ok"]},
        "groupby_mean_round_trip": summary_ms(t["groupby"]),
        "frame_round_trip": {"rows": t["rows"], "wire_mb": round(table_mb, 2),
                             "seconds": [round(x, 3) for x in t["table_s"]],
                             "mb_per_s_best": round(table_mb / min(t["table_s"]), 1),
                             "same_size_array_seconds": [round(x, 3) for x in t["array_s"]]},
        "codec_alone": codec,
        "sklearn": {
            "logistic_regression_fit_and_coef_remote_s": round(t["fit_remote_s"], 3),
            "logistic_regression_fit_local_s": round(t["fit_local_s"], 3),
            "coefficients_match_local": t["coef_match"],
            "cross_val_score_5_fold_s": round(t["cv_s"], 3),
            "cv_accuracy": round(t["cv_mean"], 4),
            "predict_and_score_round_trip": summary_ms(t["predict_score"]),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ops", type=int, default=10_000, help="pipelined x = x + 1 count")
    parser.add_argument("--reps", type=int, default=200, help="op + round trip repetitions")
    parser.add_argument("--steps", type=int, default=50, help="training steps to time")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (~20 s)")
    parser.add_argument("--tables-only", action="store_true",
                        help="only the pandas and scikit-learn section")
    args = parser.parse_args()
    if args.quick:
        args.ops, args.reps = min(args.ops, 2000), min(args.reps, 50)
        args.steps = min(args.steps, 10)

    started = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "ops",
        "machine": machine(),
        "params": {"ops": args.ops, "reps": args.reps, "steps": args.steps, "quick": args.quick},
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    with signaling_server() as url, \
            duet_pair(url, {}, OpsResearcher) as (owner, researcher, setup), \
            bare_rtc_pair() as (_sender, receiver, _bare_setup):
        owner.call("share", "x", "small")
        owner.call("share", "X", "mlp_X")
        owner.call("share", "y", "mlp_y")
        owner.call("share", "patients", "patients")
        researcher.call("wait_store", ["x", "X", "y", "patients"])
        result["setup"] = setup
        if args.tables_only:
            result["tables"] = tables_section(researcher, min(args.ops, 2000), args.reps // 4)
            result["wall_seconds"] = round(time.perf_counter() - started, 1)
            emit(result)
            return

        result["audit_record_before"] = owner.call("audit_probe")
        log(f"pipelined: {args.ops} x = x + 1")
        researcher.call("pipelined", 200)  # warm up
        runs = [researcher.call("pipelined", args.ops, timeout=900) for _ in range(2)]
        best = min(runs, key=lambda run: run["total_s"])
        result["pipelined"] = {
            "ops": args.ops,
            "runs_total_s": [round(run["total_s"], 3) for run in runs],
            "ops_per_s": round(args.ops / best["total_s"]),
            "enqueue_ops_per_s": round(args.ops / best["enqueue_s"]),
            "value_ok": all(run["value_ok"] for run in runs),
        }
        log(f"pipelined: {result['pipelined']['ops_per_s']} ops/s")

        log("round trips")
        researcher.call("ping", 0)
        receiver.call("ping", 20)
        op_rt: list[float] = []
        get_rt: list[float] = []
        pings: list[float] = []
        bare: list[float] = []
        blocks, warmup = 5, 2
        # CPU of each process during the round trips: on two cores a round trip is mostly
        # CPU spent one process after another, so this says where its time goes
        pids = {"researcher": researcher.pid, "owner_kernel": owner.pid,
                "owner_worker": owner.call("worker_pid")}
        cpu = {kind: dict.fromkeys(pids, 0.0) for kind in ("op_plus_get", "get")}

        def timed(kind: str, method: str, *method_args: int) -> list[float]:
            before = cpu_seconds(pids)
            samples: list[float] = researcher.call(method, *method_args)
            for name, seconds in cpu_seconds(pids).items():
                cpu[kind][name] += seconds - before[name]
            return samples

        for _ in range(blocks):  # alternate, so load on the machine hits all alike
            op_rt += timed("op_plus_get", "op_roundtrip", args.reps // blocks, warmup)
            get_rt += timed("get", "get_roundtrip", args.reps // blocks)
            pings += researcher.call("ping", args.reps // blocks, 0)
            bare += receiver.call("ping", args.reps // blocks)
        result["op_plus_round_trip"] = summary_ms(op_rt)
        result["get_shared_round_trip"] = summary_ms(get_rt)
        counts = {"op_plus_get": (args.reps // blocks + warmup) * blocks, "get": len(get_rt)}
        result["round_trip_cpu_ms"] = {kind: {name: round(seconds / counts[kind] * 1e3, 3)
                                              for name, seconds in used.items()}
                                       for kind, used in cpu.items()}
        result["duet_ping"] = summary_ms(pings)
        result["bare_aiortc_ping"] = summary_ms(bare)
        op_median = result["op_plus_round_trip"]["median_ms"]
        bare_median = result["bare_aiortc_ping"]["median_ms"]
        result["op_round_trip_vs_bare_ping"] = round(op_median / bare_median, 2)
        result["op_round_trip_vs_duet_ping"] = round(
            op_median / result["duet_ping"]["median_ms"], 2)
        log(f"op+rt {op_median} ms, bare ping {bare_median} ms")

        result["audit_record_after"] = owner.call("audit_probe")
        log("training")
        train = researcher.call("training", args.steps, timeout=900)
        sync, local = summary_ms(train["sync"]), summary_ms(train["local"])
        result["training_step"] = {
            "model": "Linear(20,64)-ReLU-Linear(64,2), batch 256, SGD, cross_entropy",
            "remote_sync": sync,
            "remote_pipelined_per_step_ms": round(train["pipelined_per_step_s"] * 1e3, 3),
            "local": local,
            "ratio_remote_sync_vs_local": round(sync["median_ms"] / local["median_ms"], 1),
            "ratio_remote_pipelined_vs_local": round(
                train["pipelined_per_step_s"] * 1e3 / local["median_ms"], 1),
            "loss_first": round(train["loss_first"], 4),
            "loss_last": round(train["loss_last"], 4),
        }
        log(f"training: remote {sync['median_ms']} ms/step, local {local['median_ms']} ms/step")
        result["tables"] = tables_section(researcher, min(args.ops, 2000), args.reps // 4)

    result["targets"] = {
        "pipelined_ge_5000_ops_per_s": result["pipelined"]["ops_per_s"] >= 5000,
        "op_round_trip_within_2x_bare_ping": result["op_round_trip_vs_bare_ping"] <= 2.0,
    }
    result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    emit(result)


if __name__ == "__main__":
    main()
