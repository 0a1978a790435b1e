"""Benchmark remote training against the same training locally, in the same run; print JSON.

The workload of issue 12, as a new user writes it: the owner shares
``X = torch.randn(60000, 784)`` and ``y = torch.randint(0, 10, (60000,))``; the researcher
trains on them through pointers with plain PyTorch code (``r.torch.nn``, ``r.torch.optim``,
``loss.backward()``), slicing ``X[i:i+batch]`` every step, and asks for the last loss at the
end of the epoch. Owner and researcher run in separate processes (plus the owner's worker);
the local run is the very same loop on ``torch`` itself, in the researcher's process, on its
own copy of data of the same shape. Both sides use one intra-op thread (``OMP_NUM_THREADS=1``
in the benchmark's processes, inherited by the owner's worker), so the ratio compares the
same computation.

Workloads (``--quick`` runs fewer steps and extrapolates the epoch from the per-step time):

* ``mlp_b128``: ``Linear(784,256) -> ReLU -> Linear(256,10)``, SGD, batch 128 (the target:
  remote epoch <= 1.5x local);
* ``mlp_b32``: the same at batch 32 (four times the operations per sample);
* ``cnn_b128``: a small CNN on ``X[i:i+128].reshape(-1, 1, 28, 28)`` (two 3x3 convolutions
  with max pooling, then a linear layer).

Local and remote epochs alternate, so load on the machine hits both alike. Each workload
also reports the CPU time per remote step of the researcher, the owner's kernel and its
worker: a worker busy for nearly the whole step is the bottleneck. Then, for the
memory check, five more remote epochs of ``mlp_b128``: the owner's kernel and worker RSS
after each (the researcher's dropped pointers must be freed on the owner; RSS stays flat).

With ``--dp``, the report also carries ``bench/dp_train.py --remote``: DP-SGD (``r.dp.train``)
against ordinary remote training of the same model on scikit-learn's digits, time and
accuracy, next to the published Opacus reference point (issue 17).

Usage: ``.venv/bin/python bench/train.py [--quick] [--reps 2] [--rows 60000] [--dp]``
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    DuetOwner,
    DuetResearcher,
    cpu_seconds,
    duet_pair,
    emit,
    log,
    machine,
    signaling_server,
)

FEATURES = 784
CLASSES = 10
MiB = 1024 * 1024


def build(tt: Any, model: str) -> Any:
    """The model on ``tt``: the ``torch`` module locally, ``r.torch`` remotely."""
    nn = tt.nn
    if model == "mlp":
        return nn.Sequential(nn.Linear(FEATURES, 256), nn.ReLU(), nn.Linear(256, CLASSES))
    if model == "cnn":
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(16 * 7 * 7, CLASSES))
    raise ValueError(model)


def train(tt: Any, net: Any, opt: Any, X: Any, y: Any, rows: int, batch: int, steps: int,
          image: bool) -> Any:
    """``steps`` SGD steps, written the way a user writes them; returns the last loss."""
    F = tt.nn.functional
    loss = None
    for step in range(steps):
        i = (step * batch) % rows
        xb, yb = X[i:i + batch], y[i:i + batch]
        if image:
            xb = xb.reshape(-1, 1, 28, 28)
        opt.zero_grad()
        loss = F.cross_entropy(net(xb), yb)
        loss.backward()
        opt.step()
    return loss


class TrainOwner(DuetOwner):
    """Shares the MNIST-sized data; reports its kernel's and its worker's memory."""

    def share_data(self, rows: int) -> None:
        import torch

        torch.manual_seed(0)
        self.session.share(torch.randn(rows, FEATURES), "X")
        self.session.share(torch.randint(0, CLASSES, (rows,)), "y")

    def memory(self) -> dict[str, Any]:
        """RSS of the kernel and the worker, and what the worker holds for the researcher
        (``worker_usage`` waits behind the work already queued, frees included)."""
        import psutil

        usage = self.session.worker_usage(60)
        worker = psutil.Process(self.session.worker_pid)
        return {
            "kernel_rss_mib": round(psutil.Process().memory_info().rss / MiB, 1),
            "worker_rss_mib": round(worker.memory_info().rss / MiB, 1),
            "worker_objects": usage.objects,
            "worker_used_mib": round(usage.used_bytes / MiB, 2),
        }


class TrainResearcher(DuetResearcher):
    """The researcher: the same training loop remotely (``r.torch``) and locally (``torch``)."""

    def prepare(self, rows: int, model: str, batch: int) -> dict[str, Any]:
        import torch

        self.wait_store(["X", "y"])
        self.rows, self.batch, self.image = rows, batch, model == "cnn"
        r = self.r
        r.torch.manual_seed(0)
        self.remote = build(r.torch, model)
        self.remote_opt = r.torch.optim.SGD(self.remote.parameters(), lr=0.01)
        torch.manual_seed(0)
        if getattr(self, "X", None) is None or len(self.X) != rows:
            self.X = torch.randn(rows, FEATURES)
            self.y = torch.randint(0, CLASSES, (rows,))
        self.local = build(torch, model)
        self.local_opt = torch.optim.SGD(self.local.parameters(), lr=0.01)
        # warm up both (first calls allocate, import and fill caches)
        self.run("remote", 5)
        self.run("local", 5)
        return {"torch_threads": torch.get_num_threads()}

    def run(self, where: str, steps: int) -> dict[str, float]:
        """``steps`` steps, then the loss: ``get`` remotely (waits until all ran), ``item``
        locally. Seconds from the first step to the loss in hand."""
        import torch

        if where == "remote":
            tt, net, opt = self.r.torch, self.remote, self.remote_opt
            X, y = self.r.store["X"], self.r.store["y"]
        else:
            tt, net, opt, X, y = torch, self.local, self.local_opt, self.X, self.y
        gc.collect()
        start = time.perf_counter()
        loss = train(tt, net, opt, X, y, self.rows, self.batch, steps, self.image)
        value = float(loss.get("epoch loss", timeout=900) if where == "remote" else loss.item())
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "loss": value}

    def settle(self) -> None:
        """Drop what the last epoch left and make sure the frees left this side: the flush
        is queued on the loop before the ping's round trip."""
        gc.collect()
        self.r.ping()

    def rss_mib(self) -> float:
        import psutil

        return round(psutil.Process().memory_info().rss / MiB, 1)

    def drop(self) -> None:
        for name in ("remote", "remote_opt"):
            setattr(self, name, None)
        self.settle()


def measure(owner: Any, researcher: Any, name: str, model: str, batch: int, rows: int,
            steps: int, reps: int) -> dict[str, Any]:
    log(f"{name}: {steps} steps x {reps} reps, remote and local alternating")
    prepared = researcher.call("prepare", rows, model, batch, timeout=300)
    local: list[dict[str, float]] = []
    remote: list[dict[str, float]] = []
    # CPU of each process during the remote runs: the worker's against the wall time says
    # whether it is the bottleneck (busy throughout) or waits for the others
    pids = {"researcher": researcher.pid, "owner_kernel": owner.pid,
            "owner_worker": owner.call("worker_pid")}
    cpu = dict.fromkeys(pids, 0.0)
    for _ in range(reps):
        local.append(researcher.call("run", "local", steps, timeout=900))
        before = cpu_seconds(pids)
        remote.append(researcher.call("run", "remote", steps, timeout=900))
        for name, seconds in cpu_seconds(pids).items():
            cpu[name] += seconds - before[name]
    researcher.call("drop")
    per_epoch = math.ceil(rows / batch)
    local_s = statistics.median(run["seconds"] for run in local)
    remote_s = statistics.median(run["seconds"] for run in remote)
    scale = per_epoch / steps
    result = {
        "model": model,
        "batch": batch,
        "steps_timed": steps,
        "steps_per_epoch": per_epoch,
        "epoch_extrapolated": steps != per_epoch,
        "local_epoch_s": round(local_s * scale, 3),
        "remote_epoch_s": round(remote_s * scale, 3),
        "ratio_remote_vs_local": round(remote_s / local_s, 2),
        "local_step_ms": round(local_s / steps * 1e3, 3),
        "remote_step_ms": round(remote_s / steps * 1e3, 3),
        "remote_runs_s": [round(run["seconds"], 3) for run in remote],
        "local_runs_s": [round(run["seconds"], 3) for run in local],
        "remote_cpu_ms_per_step": {name: round(seconds / (reps * steps) * 1e3, 3)
                                   for name, seconds in cpu.items()},
        "loss_remote_last": round(remote[-1]["loss"], 4),
        "loss_local_last": round(local[-1]["loss"], 4),
        **prepared,
    }
    log(f"{name}: local {result['local_epoch_s']} s/epoch, remote {result['remote_epoch_s']} "
        f"s/epoch ({result['ratio_remote_vs_local']}x)")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer steps per timed run, epochs extrapolated (~40 s)")
    parser.add_argument("--reps", type=int, default=2, help="timed runs each of local, remote")
    parser.add_argument("--rows", type=int, default=60_000, help="rows of X and y")
    parser.add_argument("--memory-epochs", type=int, default=5)
    parser.add_argument("--dp", action="store_true",
                        help="also DP-SGD vs non-DP remote training (bench/dp_train.py)")
    args = parser.parse_args()

    def steps(batch: int, quick_steps: int) -> int:
        full = math.ceil(args.rows / batch)
        return min(full, quick_steps) if args.quick else full

    started = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "train",
        "machine": machine(),
        "params": {"quick": args.quick, "reps": args.reps, "rows": args.rows,
                   "memory_epochs": args.memory_epochs},
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    with signaling_server() as url, \
            duet_pair(url, {}, TrainResearcher, TrainOwner) as (owner, researcher, setup):
        result["setup"] = setup
        owner.call("share_data", args.rows, timeout=300)
        workloads = {}
        for name, model, batch, quick_steps in (("mlp_b128", "mlp", 128, 120),
                                                ("mlp_b32", "mlp", 32, 240),
                                                ("cnn_b128", "cnn", 128, 60)):
            workloads[name] = measure(owner, researcher, name, model, batch, args.rows,
                                      steps(batch, quick_steps), args.reps)
        result["workloads"] = workloads

        epoch_steps = steps(128, 120)
        log(f"memory: {args.memory_epochs} remote epochs of mlp_b128 ({epoch_steps} steps each)")
        researcher.call("prepare", args.rows, "mlp", 128, timeout=300)
        researcher.call("settle")
        samples = [{"after_epoch": 0, **owner.call("memory"),
                    "researcher_rss_mib": researcher.call("rss_mib")}]
        for epoch in range(1, args.memory_epochs + 1):
            researcher.call("run", "remote", epoch_steps, timeout=900)
            researcher.call("settle")
            samples.append({"after_epoch": epoch, **owner.call("memory"),
                            "researcher_rss_mib": researcher.call("rss_mib")})
        first, last = samples[1], samples[-1]
        result["memory"] = {
            "steps_per_epoch": epoch_steps,
            "samples": samples,
            "kernel_rss_growth_mib_epoch1_to_last": round(
                last["kernel_rss_mib"] - first["kernel_rss_mib"], 1),
            "worker_rss_growth_mib_epoch1_to_last": round(
                last["worker_rss_mib"] - first["worker_rss_mib"], 1),
            "worker_objects_after_each_epoch": [s["worker_objects"] for s in samples],
        }
        log(f"memory: kernel {[s['kernel_rss_mib'] for s in samples]} MiB, worker "
            f"{[s['worker_rss_mib'] for s in samples]} MiB")

    mlp = result["workloads"]["mlp_b128"]
    result["targets"] = {
        "mlp_b128_remote_epoch_le_1_5x_local": mlp["ratio_remote_vs_local"] <= 1.5,
        # flat: less than 2 MiB more after the last epoch than after the first
        "owner_kernel_rss_flat": result["memory"]["kernel_rss_growth_mib_epoch1_to_last"] < 2,
        "owner_worker_rss_flat": result["memory"]["worker_rss_growth_mib_epoch1_to_last"] < 2,
    }
    if args.dp:
        log("DP-SGD vs non-DP training: bench/dp_train.py --remote")
        dp_run = subprocess.run(
            [sys.executable, str(Path(__file__).with_name("dp_train.py")), "--remote",
             "--reps", "1" if args.quick else "3"],
            check=True, stdout=subprocess.PIPE, text=True)
        result["dp_vs_non_dp"] = json.loads(dp_run.stdout)
    result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    emit(result)


if __name__ == "__main__":
    main()
