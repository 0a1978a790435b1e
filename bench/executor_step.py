"""The worker's executor alone on the training step of ``bench/train.py``, op by op, against
the same step on ``torch`` in the same process and the same minutes; print JSON.

No transport, no worker process, no researcher: ``Op`` messages go straight into an
``Executor`` holding ``X = torch.randn(rows, 784)`` and ``y``, as the worker runs them. The
difference between an op here and the same call locally is duet's own bookkeeping for it
(policy, lineage, provenance, memory accounting, in-place change tracking), which bounds how
close remote training can come to local speed: the worker is the bottleneck of a remote
epoch (``docs/benchmarks.md``). Steps alternate remote and local, one intra-op thread each;
medians over the steps after a warm-up, so load on the machine hits both alike.

``--without`` is an experiment that measures what each layer of the bookkeeping costs by
switching it off in this process (duet itself never runs without them): ``in-place`` (what an
in-place change reaches: lineage notes, what a model learned, recounts), ``provenance`` (the
records behind each result), ``memory`` (the budget, footprints, protection of results).
Listed together they are taken away together; what is left is policy, lineage text and
dispatch, the floor under any remote op.

Usage: ``.venv/bin/python bench/executor_step.py [--steps 600] [--batch 128] [--rows 60000]
[--without in-place provenance memory]``
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit, log, machine  # noqa: E402

OPS = ("X[i:j]", "y[i:j]", "zero_grad", "forward", "cross_entropy", "backward", "step")
LAYERS = ("in-place", "provenance", "memory")


def switch_off(layers: list[str]) -> None:
    """Replace the executor's hooks for ``layers`` with ones that do nothing (an experiment:
    the names are the executor's private ones, checked so a rename cannot go unnoticed)."""
    from duet import executor, memory

    def replace(owner: Any, name: str, stub: Any) -> None:
        if not hasattr(owner, name):
            raise SystemExit(f"--without: {owner.__name__}.{name} is gone; update this bench")
        setattr(owner, name, stub)

    if "in-place" in layers:
        replace(executor.Executor, "_note_modified", lambda self, *args, **kwargs: None)
    if "provenance" in layers:
        replace(executor._Call, "derive", lambda self, value: {})
        replace(executor._Call, "note_provenance", lambda self, value, found: None)
        replace(executor._Call, "provenance", lambda self: {})
    if "memory" in layers:
        replace(executor, "inventory", lambda value: memory.Inventory([], {}, []))
        replace(executor.Executor, "_account", lambda self, *args, **kwargs: 0)
        replace(executor.Executor, "_protect_result", lambda self, arrays: None)
        replace(memory.Footprints, "record", lambda self, *args: None)
        replace(memory.Footprints, "drop", lambda self, *args: None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rows", type=int, default=60_000)
    parser.add_argument("--without", nargs="*", default=[], choices=LAYERS,
                        help="bookkeeping to switch off, to measure what it costs")
    args = parser.parse_args()
    switch_off(args.without)

    import torch

    from duet.executor import Executor
    from duet.policy import Allowlist
    from duet.protocol import Op, PointerRef, StoreRef

    torch.set_num_threads(1)
    torch.manual_seed(0)
    executor = Executor(Allowlist.default())
    executor.share("X", torch.randn(args.rows, 784))
    executor.share("y", torch.randint(0, 10, (args.rows,)))
    ids = itertools.count(1)

    def op(kind: str, name: str, target: Any = None, *op_args: Any, **kwargs: Any) -> PointerRef:
        result = next(ids)
        failure = executor.execute(Op(result=result, kind=kind, name=name, target=target,
                                      args=list(op_args), kwargs=kwargs))
        if failure is not None:
            raise RuntimeError(f"{name} failed: {failure}")
        return PointerRef(result)

    layers = [op("function", "torch.nn.Linear", None, 784, 256),
              op("function", "torch.nn.ReLU"), op("function", "torch.nn.Linear", None, 256, 10)]
    model = op("function", "torch.nn.Sequential", None, *layers)
    parameters = op("method", "parameters", model)
    optimizer = op("function", "torch.optim.SGD", None, parameters, lr=0.01)
    executor.free([ref.id for ref in (*layers, parameters)])  # as the researcher drops them

    F = torch.nn.functional
    net = torch.nn.Sequential(torch.nn.Linear(784, 256), torch.nn.ReLU(),
                              torch.nn.Linear(256, 10))
    local_opt = torch.optim.SGD(net.parameters(), lr=0.01)
    X, y = torch.randn(args.rows, 784), torch.randint(0, 10, (args.rows,))
    samples: dict[str, list[float]] = defaultdict(list)

    def timed(name: str, call: Callable[..., Any], *call_args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        value = call(*call_args, **kwargs)
        samples[name].append(time.perf_counter() - start)
        return value

    log(f"{args.steps} steps, batch {args.batch}")
    for step in range(args.steps):
        i = (step * args.batch) % (args.rows - args.batch)
        rows = slice(i, i + args.batch)
        xb = timed("remote X[i:j]", op, "function", "operator.getitem", None, StoreRef("X"), rows)
        yb = timed("remote y[i:j]", op, "function", "operator.getitem", None, StoreRef("y"), rows)
        done = [timed("remote zero_grad", op, "method", "zero_grad", optimizer)]
        out = timed("remote forward", op, "call", "forward", model, xb)
        loss = timed("remote cross_entropy", op, "function",
                     "torch.nn.functional.cross_entropy", None, out, yb)
        done.append(timed("remote backward", op, "method", "backward", loss))
        done.append(timed("remote step", op, "method", "step", optimizer))
        executor.free([ref.id for ref in (xb, yb, out, loss, *done)])

        xl = timed("local X[i:j]", X.__getitem__, rows)
        yl = timed("local y[i:j]", y.__getitem__, rows)
        timed("local zero_grad", local_opt.zero_grad)
        out_l = timed("local forward", net, xl)
        loss_l = timed("local cross_entropy", F.cross_entropy, out_l, yl)
        timed("local backward", loss_l.backward)
        timed("local step", local_opt.step)

    warm = min(50, args.steps // 5)

    def median_ms(name: str) -> float:
        return round(statistics.median(samples[name][warm:]) * 1e3, 3)

    ops = {name: {"remote_ms": median_ms(f"remote {name}"), "local_ms": median_ms(f"local {name}"),
                  "overhead_ms": round(median_ms(f"remote {name}") - median_ms(f"local {name}"),
                                       3)}
           for name in OPS}
    remote = sum(o["remote_ms"] for o in ops.values())
    local = sum(o["local_ms"] for o in ops.values())
    emit({"benchmark": "executor_step", "params": vars(args), "machine": machine(),
          "ops": ops, "step": {"remote_ms": round(remote, 3), "local_ms": round(local, 3),
                               "overhead_ms": round(remote - local, 3),
                               "ratio_remote_vs_local": round(remote / local, 2)},
          "objects_left": executor.object_count()})


if __name__ == "__main__":
    main()
