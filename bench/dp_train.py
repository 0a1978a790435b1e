"""Benchmark DP-SGD (duet/dp_train.py, Opacus) against the same training without DP; JSON.

One model (a 64-32-10 MLP), one dataset (scikit-learn's shipped handwritten digits,
``load_digits``: 1,797 8x8 images, 75% to train, 25% to test), the same loss, optimizer,
learning rate, epochs and expected batch size. The non-private run shuffles into fixed
batches; the private run is the engine's: Poisson sampling, per-row clipping, noise for the
target epsilon. Reported: training seconds (median of ``--reps``), test accuracy (median),
the DP/non-DP time ratio, and the epsilon the accountant reports as spent.

``--remote``: the same trainings through a duet session (owner and researcher in two
processes over loopback WebRTC): ``r.dp.train`` against ordinary remote training written
with pointers (pipelined), each timed from the first operation to the parameters back.

Reference point (quoted in issue 17, not measured here): an MNIST experiment with Opacus
measured about +31% training compute for DP, with similar accuracy. Small models on a small
CPU are dominated by per-step overhead, so the ratio here is not expected to match it.

Usage: ``.venv/bin/python bench/dp_train.py [--reps 3] [--epochs 8] [--epsilon 2]
[--remote]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    DuetOwner,
    DuetResearcher,
    emit,
    log,
    machine,
    peers,
    signaling_server,
)

PIXELS = [f"pixel_{i}_{j}" for i in range(8) for j in range(8)]
REFERENCE = {
    "source": "MNIST with Opacus, as quoted in issue 17",
    "dp_training_compute_overhead": "+31%",
    "accuracy": "similar to non-private",
}


def digits() -> tuple[Any, Any, Any, Any]:
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    return tuple(train_test_split(x, y, test_size=0.25, random_state=0, stratify=y))  # type: ignore[return-value]


def model() -> Any:
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(),
                               torch.nn.Linear(32, 10))


def accuracy(net: Any, x: Any, y: Any) -> float:
    import torch

    with torch.no_grad():
        return float((net(torch.tensor(x)).argmax(1).numpy() == y).mean())


def non_private(x: Any, y: Any, epochs: int, batch_size: int, lr: float) -> Any:
    import torch

    net = model()
    data = torch.utils.data.TensorDataset(torch.tensor(x), torch.tensor(y))
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    loss = torch.nn.CrossEntropyLoss()
    for _ in range(epochs):
        for batch, target in loader:
            optimizer.zero_grad()
            loss(net(batch), target).backward()
            optimizer.step()
    return net


def local(args: argparse.Namespace) -> dict[str, Any]:
    from duet.dp_train import TrainRequest, prepare

    x_train, x_test, y_train, y_test = digits()
    request = TrainRequest(loss="cross_entropy", epochs=args.epochs,
                           batch_size=args.batch_size, lr=args.lr, epsilon=args.epsilon)
    plain_s, plain_acc, dp_s, dp_acc, prepare_s, spent = [], [], [], [], [], []
    non_private(x_train, y_train, 1, args.batch_size, args.lr)  # warm up torch
    for rep in range(args.reps):
        start = time.perf_counter()
        net = non_private(x_train, y_train, args.epochs, args.batch_size, args.lr)
        plain_s.append(time.perf_counter() - start)
        plain_acc.append(accuracy(net, x_test, y_test))

        start = time.perf_counter()
        prepared = prepare(model(), x_train, y_train, request)
        prepare_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        result = prepared.run()
        dp_s.append(time.perf_counter() - start)
        net = model()
        net.load_state_dict(result.parameters)
        dp_acc.append(accuracy(net, x_test, y_test))
        spent.append(result.epsilon)
        log(f"rep {rep}: non-DP {plain_s[-1]:.2f} s acc {plain_acc[-1]:.3f}; "
            f"DP {dp_s[-1]:.2f} s acc {dp_acc[-1]:.3f} eps {result.epsilon:.3f}")
    plan = prepared.plan
    return {
        "non_private": {"train_s_median": round(statistics.median(plain_s), 3),
                        "test_accuracy_median": round(statistics.median(plain_acc), 4),
                        "test_accuracy_all": [round(a, 4) for a in plain_acc]},
        "dp": {"train_s_median": round(statistics.median(dp_s), 3),
               "prepare_s_median": round(statistics.median(prepare_s), 3),
               "test_accuracy_median": round(statistics.median(dp_acc), 4),
               "test_accuracy_all": [round(a, 4) for a in dp_acc],
               "epsilon_target": args.epsilon,
               "epsilon_spent": [round(e, 4) for e in spent],
               "delta": plan.delta, "noise_multiplier": round(plan.noise_multiplier, 4),
               "sample_rate": round(plan.sample_rate, 5), "steps": plan.steps,
               "max_grad_norm": plan.max_grad_norm},
        "dp_over_non_private_time": round(statistics.median(dp_s)
                                          / statistics.median(plain_s), 2),
        "accuracy_drop": round(statistics.median(plain_acc) - statistics.median(dp_acc), 4),
    }


class TrainOwner(DuetOwner):
    """The owner, in its own process: the training split shared with a DP budget (and the
    same rows without DP, for the non-private remote baseline); approves what rules allow."""

    def share_digits(self, budget: float) -> None:
        import pandas as pd
        import torch

        import duet

        x_train, _, y_train, _ = digits()
        frame = pd.DataFrame(x_train, columns=PIXELS).assign(target=y_train)
        self.session.share(frame, "digits", dp=duet.DP(epsilon=budget, delta=1e-3))
        self.session.share(torch.tensor(x_train), "plain_x")
        self.session.share(torch.tensor(y_train), "plain_y")
        self.session.requests.add_rule("approve", dp_within_budget=True)


class TrainResearcher(DuetResearcher):
    """The researcher, in its own process: the same model trained remotely with and
    without DP; seconds from the first operation to the parameters back."""

    def _model(self) -> Any:
        nn = self.r.torch.nn
        self.r.torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def dp(self, epochs: int, batch_size: int, lr: float, epsilon: float) -> dict[str, Any]:
        self.wait_store(["digits"])
        table = self.r.store["digits"]
        start = time.perf_counter()
        result = self.r.dp.train(self._model(), data=table[PIXELS], labels=table["target"],
                                 loss="cross_entropy", epochs=epochs, batch_size=batch_size,
                                 lr=lr, epsilon=epsilon).get("bench", timeout=600)
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "accuracy": self._accuracy(result["parameters"])}

    def plain(self, epochs: int, batch_size: int, lr: float) -> dict[str, Any]:
        """Ordinary remote training: shuffled fixed batches, pipelined, one get at the end."""
        self.wait_store(["plain_x", "plain_y"])
        torch = self.r.torch
        x, y = self.r.store["plain_x"], self.r.store["plain_y"]
        rows = 1347
        start = time.perf_counter()
        model = self._model()
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        for _ in range(epochs):
            order = torch.randperm(rows)
            for first in range(0, rows, batch_size):
                batch = order[first:first + batch_size]
                optimizer.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
                loss.backward()
                optimizer.step()
        weights = model.state_dict().get("bench", timeout=600)
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "accuracy": self._accuracy(dict(weights))}

    def _accuracy(self, parameters: dict[str, Any]) -> float:
        _, x_test, _, y_test = digits()
        net = model()
        net.load_state_dict(parameters)
        return accuracy(net, x_test, y_test)


def remote(args: argparse.Namespace) -> dict[str, Any]:
    plain_s, plain_acc, dp_s, dp_acc = [], [], [], []
    with signaling_server() as url, peers(("duet-owner", TrainOwner, (url, {})),
                                          ("duet-researcher", TrainResearcher, (url, {}))) as (
            owner, researcher):
        code = owner.call("launch")
        researcher.call("join", code, timeout=120)
        owner.call("setup_seconds")
        owner.call("share_digits", args.epsilon * (args.reps + 1) + 0.5)
        researcher.call("plain", 1, args.batch_size, args.lr)  # warm up both sides' imports
        researcher.call("dp", 1, args.batch_size, args.lr, args.epsilon)
        for rep in range(args.reps):
            plain = researcher.call("plain", args.epochs, args.batch_size, args.lr)
            private = researcher.call("dp", args.epochs, args.batch_size, args.lr, args.epsilon)
            plain_s.append(plain["seconds"])
            plain_acc.append(plain["accuracy"])
            dp_s.append(private["seconds"])
            dp_acc.append(private["accuracy"])
            log(f"remote rep {rep}: non-DP {plain['seconds']:.2f} s acc {plain['accuracy']:.3f}"
                f"; DP {private['seconds']:.2f} s acc {private['accuracy']:.3f}")
    return {
        "what": "seconds from the first operation to the parameters back, owner and "
                "researcher in two processes over loopback WebRTC, rules approving",
        "non_private": {"seconds_median": round(statistics.median(plain_s), 3),
                        "test_accuracy_median": round(statistics.median(plain_acc), 4),
                        "how": "remote ops: randperm batches, forward, loss, backward, SGD "
                               "step, pipelined; state_dict().get() at the end"},
        "dp": {"seconds_median": round(statistics.median(dp_s), 3),
               "test_accuracy_median": round(statistics.median(dp_acc), 4),
               "how": "r.dp.train(...).get(): start request, training in the worker, "
                      "parameters request"},
        "dp_over_non_private_time": round(statistics.median(dp_s)
                                          / statistics.median(plain_s), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1.0)
    parser.add_argument("--epsilon", type=float, default=2.0)
    parser.add_argument("--remote", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    result: dict[str, Any] = {
        "benchmark": "dp_train",
        "machine": machine(),
        "setup": {"dataset": "sklearn load_digits (1347 train / 450 test)",
                  "model": "Linear(64,32)-ReLU-Linear(32,10)", "loss": "cross_entropy",
                  "optimizer": "SGD", "lr": args.lr, "epochs": args.epochs,
                  "batch_size": args.batch_size, "reps": args.reps, "torch_threads": 1},
        "reference": REFERENCE,
        "local": local(args),
    }
    if args.remote:
        result["remote"] = remote(args)
    emit(result)


if __name__ == "__main__":
    main()
