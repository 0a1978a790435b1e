"""Where the microseconds of a pipelined operation go, on every thread that touches it.

An owner and a researcher session in this process, connected by the in-memory transport
(the real sessions, loop threads and worker process; only the wire is fake, so aiortc's
SCTP/DTLS cost is not in these figures: ``bench/transport.py`` measures it), run a
pipelined workload twice:

1. unprofiled, for wall-clock figures: the researcher's enqueue rate and the whole run;
2. under ``cProfile``, one profiler per thread: the researcher's caller thread (pointers,
   lineage, building ops) and loop thread (batching, encoding, sending); the owner kernel's
   loop thread (decoding, prechecks, forwarding) and its worker writer and reader threads.

The worker process cannot be profiled from here, so the ``peer`` messages the kernel
forwarded in the profiled run are recorded and replayed into an in-process ``Worker``
(the same class, fed the same frames over a socket pair): decoding, policy, execution,
audit events, bookkeeping.

For each thread: seconds, microseconds per operation, own time by module, and the
functions with the most own time, timed by each thread's CPU clock (so load on the machine
does not inflate them). cProfile roughly doubles the cost of Python-heavy code: read the
profiled figures as shares; the unprofiled CPU time of each thread (from /proc) and of the
worker process is the absolute figure.

Workloads: ``add`` (``x = x + 1`` on a 16-element tensor, as ``bench/ops.py``) and ``mlp``
(the training step of ``bench/train.py``: slice, zero_grad, forward, cross_entropy,
backward, step; 7 operations per step).

Usage: ``.venv/bin/python bench/profile_ops.py [--workload add|mlp] [--ops 5000] [--top 12]``
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import os
import pstats
import socket
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")  # as the benchmarks: the worker inherits it

import torch  # noqa: E402

from duet import ipc  # noqa: E402
from duet.config import SessionConfig  # noqa: E402
from duet.owner import OwnerSession  # noqa: E402
from duet.researcher import ResearcherSession  # noqa: E402
from duet.supervisor import WorkerProcess  # noqa: E402
from duet.transport import InMemoryTransport  # noqa: E402
from duet.worker import Worker  # noqa: E402

ROOT = str(Path(__file__).resolve().parent.parent)


# -- profiling helpers ------------------------------------------------------------------
def _module(filename: str, function: str) -> str:
    """A short bucket name for where a function lives."""
    if filename == "~":  # builtins: name them by the C function
        if "msgpack" in function or "packb" in function or "unpackb" in function:
            return "msgpack (C)"
        if "sqlite" in function or "execute" in function:
            return "sqlite (C)"
        if "torch" in function or "_C." in function:
            return "torch (C)"
        if "socket" in function or "send" in function or "recv" in function:
            return "socket (C)"
        if "acquire" in function or "wait" in function or "lock" in function:
            return "locks/waits (C)"
        return "builtins (C)"
    if filename.startswith(ROOT):
        rel = filename[len(ROOT) + 1:]
        return rel
    for lib in ("pydantic_core", "pydantic", "msgpack", "torch", "numpy", "asyncio",
                "threading", "queue", "concurrent", "selectors", "socket", "sqlite3",
                "logging", "typing", "dataclasses"):
        if f"/{lib}/" in filename or filename.endswith(f"/{lib}.py"):
            return lib
    return Path(filename).name


def _profiler() -> cProfile.Profile:
    """Timed by the thread's own CPU clock: other processes on a busy machine (and the
    other threads here) do not inflate the figures; time spent blocked counts nothing."""
    return cProfile.Profile(time.thread_time)


# C calls that block or release the GIL: in one process, their time is mostly waiting for
# another thread (all sessions share a GIL here, unlike the real three processes).
_BLOCKING = ("acquire", "epoll", "select", "recv", "send", "SimpleQueue", "sleep",
             "allocate_lock")


def summarize(profile: cProfile.Profile, ops: int, top: int,
              skip_waits: bool = True) -> dict[str, Any]:
    stats = pstats.Stats(profile)
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    by_module: dict[str, float] = defaultdict(float)
    rows = []
    waiting = 0.0
    for (filename, line, function), (_cc, calls, own, _cum, _callers) in raw.items():
        bucket = _module(filename, function)
        name = f"{bucket}:{function}" if filename == "~" else (
            f"{bucket}:{line}({function})")
        if skip_waits and filename == "~" and any(word in function for word in _BLOCKING):
            waiting += own
            continue
        by_module[bucket] += own
        rows.append((own, calls, name))
    busy = sum(by_module.values())
    rows.sort(reverse=True)
    return {
        "busy_s": round(busy, 4),
        "busy_us_per_op": round(busy / ops * 1e6, 2),
        "blocking_or_gil_wait_s": round(waiting, 4),
        "by_module_us_per_op": {k: round(v / ops * 1e6, 2) for k, v in
                                sorted(by_module.items(), key=lambda kv: -kv[1]) if
                                v / ops * 1e6 >= 0.05},
        "top_functions": [
            {"us_per_op": round(own / ops * 1e6, 2), "calls_per_op": round(calls / ops, 2),
             "function": name} for own, calls, name in rows[:top]],
    }


# -- the workloads ------------------------------------------------------------------------
def add_workload(r: ResearcherSession, ops: int) -> Callable[[], tuple[float, float]]:
    x0 = r.store["x"]

    def run() -> tuple[float, float]:
        x = x0
        start = time.perf_counter()
        for _ in range(ops):
            x = x + 1
        queued = time.perf_counter()
        x.get("profile", timeout=600)
        return queued - start, time.perf_counter() - start

    return run


def mlp_workload(r: ResearcherSession, ops: int) -> Callable[[], tuple[float, float]]:
    nn = r.torch.nn
    r.torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))
    opt = r.torch.optim.SGD(net.parameters(), lr=0.01)
    X, y = r.store["X"], r.store["y"]
    steps = max(1, ops // 7)

    def run() -> tuple[float, float]:
        F = r.torch.nn.functional
        start = time.perf_counter()
        loss = None
        for step in range(steps):
            i = (step * 128) % 6000
            xb, yb = X[i:i + 128], y[i:i + 128]
            opt.zero_grad()
            loss = F.cross_entropy(net(xb), yb)
            loss.backward()
            opt.step()
        queued = time.perf_counter()
        assert loss is not None
        loss.get("profile", timeout=600)
        return queued - start, time.perf_counter() - start

    return run


# -- the worker, replayed in this process --------------------------------------------------
def replay_worker(settings: dict[str, Any], setup_items: list[tuple[bytes, list[Any]]],
                  peer_items: list[tuple[bytes, list[Any]]], ops: int,
                  top: int) -> dict[str, Any]:
    """Feed the recorded kernel->worker frames to an in-process ``Worker``; profile the
    ``peer`` ones (shares and the like are set up first, unprofiled)."""
    kernel_end, worker_end = socket.socketpair()

    def drain() -> None:
        while kernel_end.recv(1 << 20):
            pass

    threading.Thread(target=drain, daemon=True).start()
    worker = Worker(worker_end, settings)
    handlers = {"peer": worker._peer, "share": worker._share, "unshare": worker._unshare,
                "allowlist": worker._allowlist}
    for header, buffers in setup_items:
        message = ipc.unpack(header)
        handlers[message["type"]](message, buffers)
    measured = [(ipc.unpack(header), buffers) for header, buffers in peer_items]
    for message, buffers in measured:  # warm-up (ids are new to this worker)
        worker._peer(message, [memoryview(bytes(b)) for b in buffers])
    worker._executor.free(list(worker._executor._entries))
    start = time.thread_time()
    for message, buffers in measured:
        worker._peer(message, [memoryview(bytes(b)) for b in buffers])
    unprofiled = time.thread_time() - start
    worker._executor.free(list(worker._executor._entries))
    profile = _profiler()
    profile.enable()
    for message, buffers in measured:
        worker._peer(message, [memoryview(bytes(b)) for b in buffers])
    profile.disable()
    worker_end.close()
    kernel_end.close()
    return {"unprofiled_cpu_us_per_op": round(unprofiled / ops * 1e6, 2),
            "messages": len(measured), **summarize(profile, ops, top)}


# -- per-thread CPU time (unprofiled) --------------------------------------------------------
_TICK = os.sysconf("SC_CLK_TCK")


def _thread_cpu(native_id: int) -> float:
    """CPU seconds (user + system) of one thread of this process, from /proc."""
    try:
        with open(f"/proc/self/task/{native_id}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def _threads(owner: OwnerSession, researcher: ResearcherSession) -> dict[str, int]:
    found = {"researcher: caller thread": threading.main_thread().native_id,
             "researcher: loop thread": researcher._loop._thread.native_id,
             "owner: loop thread": owner._loop._thread.native_id}
    for thread in threading.enumerate():
        if thread.name == "duet-worker-writer":
            found["owner: worker writer thread"] = thread.native_id
        elif thread.name == "duet-worker-reader":
            found["owner: worker reader thread"] = thread.native_id
    return {k: v for k, v in found.items() if v is not None}


def _cpu(owner: OwnerSession, tids: dict[str, int]) -> dict[str, float]:
    import psutil

    times = {name: _thread_cpu(tid) for name, tid in tids.items()}
    worker = psutil.Process(owner.worker_pid).cpu_times()
    times["worker process"] = worker.user + worker.system
    return times


@contextmanager
def _pair(tmp: str) -> Iterator[tuple[OwnerSession, ResearcherSession]]:
    owner_end, researcher_end = InMemoryTransport.pair()
    owner = OwnerSession(SessionConfig(progress=False, liveness_timeout=300),
                         audit_path=Path(tmp) / "a.sqlite3")
    researcher = ResearcherSession(SessionConfig(progress=False, liveness_timeout=300))
    owner.start(owner_end.start)
    researcher.start(researcher_end.start)
    try:
        assert researcher._wait_ready(10) and owner._wait_ready(10)
        owner.requests.add_rule("approve")
        owner.share(torch.zeros(16), "x")
        torch.manual_seed(0)
        owner.share(torch.randn(6000, 784), "X")
        owner.share(torch.randint(0, 10, (6000,)), "y")
        researcher.store.wait_for("y", 10)
        yield owner, researcher
    finally:
        researcher.close()
        owner.close()


# -- main ---------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", choices=("add", "mlp"), default="add")
    parser.add_argument("--ops", type=int, default=5000)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(1)
    make = add_workload if args.workload == "add" else mlp_workload
    ops = args.ops if args.workload == "add" else max(1, args.ops // 7) * 7
    result: dict[str, Any] = {"benchmark": "profile_ops", "workload": args.workload,
                              "ops": ops, "transport": "in-memory",
                              "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}

    # 1. unprofiled: wall clock, and CPU seconds of every thread and of the worker process
    with tempfile.TemporaryDirectory(prefix="duet-profile-") as tmp, \
            _pair(tmp) as (owner, researcher):
        run = make(researcher, ops)
        run()  # warm up
        gc.collect()
        tids = _threads(owner, researcher)
        before = _cpu(owner, tids)
        enqueue, total = run()
        after = _cpu(owner, tids)
        result["unprofiled"] = {
            "researcher_enqueue_us_per_op": round(enqueue / ops * 1e6, 2),
            "whole_run_us_per_op": round(total / ops * 1e6, 2),
            "ops_per_s": round(ops / total),
            "cpu_us_per_op": {name: round((after[name] - before[name]) / ops * 1e6, 1)
                              for name in after}}

    # 2. profiled: one cProfile per thread
    profiles: dict[str, cProfile.Profile] = {}
    recorded: list[tuple[bytes, list[Any]]] = []
    batches: list[int] = []
    original_write, original_read = WorkerProcess._write, WorkerProcess._read
    original_submit, original_on_ops = WorkerProcess.submit, OwnerSession._on_ops

    def in_profile(name: str, body: Callable[[], None]) -> None:
        # cProfile switches on only from inside its thread: these run under it from their
        # start (setup and a short warm-up are included, a small share of the run)
        profile = profiles.setdefault(name, _profiler())
        profile.enable()
        try:
            body()
        finally:
            profile.disable()

    def write(self: WorkerProcess) -> None:
        in_profile("owner: worker writer thread", lambda: original_write(self))

    def read(self: WorkerProcess) -> None:
        in_profile("owner: worker reader thread", lambda: original_read(self))

    def submit(self: WorkerProcess, message_type: str, buffers: list[Any] | None = None,
               /, **kwargs: Any) -> None:
        fields = {k: v for k, v in kwargs.items() if k != "answered"}
        recorded.append((ipc.pack(message_type, **fields), list(buffers or [])))
        original_submit(self, message_type, buffers, **kwargs)

    def on_ops(self: OwnerSession, message: Any, raw: Any) -> None:
        batches.append(len(message.ops))
        original_on_ops(self, message, raw)

    WorkerProcess._write = write  # type: ignore[method-assign]
    WorkerProcess._read = read  # type: ignore[method-assign]
    WorkerProcess.submit = submit  # type: ignore[method-assign]
    OwnerSession._on_ops = on_ops  # type: ignore[method-assign]
    with tempfile.TemporaryDirectory(prefix="duet-profile-") as tmp, \
            _pair(tmp) as (owner, researcher):
        recorded_before = len(recorded)  # the workload's setup (a model) is replayed too
        run = make(researcher, ops)
        gc.collect()
        batches.clear()
        for name, session in (("researcher: loop thread", researcher),
                              ("owner: loop thread", owner)):
            _on_loop(session, profiles.setdefault(name, _profiler()), True)
        caller = profiles.setdefault("researcher: caller thread", _profiler())
        caller.enable()
        _, total_p = run()
        caller.disable()
        for name, session in (("researcher: loop thread", researcher),
                              ("owner: loop thread", owner)):
            _on_loop(session, profiles[name], False)
        settings = {"memory": None, "memory_budget": owner.memory_budget,
                    "allowlist": owner.allowlist.spec(), "torch": True}
        setup = [item for item in recorded[:recorded_before] if not _is_peer(item)]
        peer = [item for item in recorded[recorded_before:] if _is_peer(item)]
        # 3. the worker, replayed in this process (while the shared memory is open)
        replayed = replay_worker(settings, setup, peer, ops, args.top)
        result["profiled_run_s"] = round(total_p, 3)
        result["ops_per_message"] = {"messages": len(batches),
                                     "mean": round(sum(batches) / max(1, len(batches)), 1),
                                     "max": max(batches, default=0)}
    WorkerProcess._write, WorkerProcess._read = original_write, original_read  # type: ignore
    WorkerProcess.submit, OwnerSession._on_ops = original_submit, original_on_ops  # type: ignore

    threads = {name: summarize(profiles[name], ops, args.top)
               for name in ("researcher: caller thread", "researcher: loop thread",
                            "owner: loop thread", "owner: worker writer thread",
                            "owner: worker reader thread") if name in profiles}
    threads["worker: main thread (replayed)"] = replayed
    result["threads"] = threads
    result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")


def _is_peer(item: tuple[bytes, list[Any]]) -> bool:
    return bool(ipc.unpack(item[0])["type"] == "peer")


def _on_loop(session: Any, profile: cProfile.Profile, on: bool) -> None:
    """Switch a profiler on or off from inside a session's loop thread."""
    done = threading.Event()

    def switch() -> None:
        if on:
            profile.enable()
        else:
            profile.disable()
        done.set()

    session._loop.call_soon(switch)
    done.wait(10)


if __name__ == "__main__":
    main()
