"""``python -m duet.demo`` (``make demo``): complete duets between the demo notebook pairs.

Runs ``notebooks/owner.ipynb`` and ``notebooks/researcher.ipynb`` at the same time in two
fresh Jupyter kernels, unattended, then each further pair the same way: the tables pair
(``owner_tables.ipynb`` and ``researcher_tables.ipynb``: pandas and scikit-learn on a
clinical table read from SQLite) and the privacy pair (``owner_dp.ipynb`` with
``researcher_dp.ipynb``: differential privacy with a budget). It prints what happened: each
request and its decision (from the owner's audit log), the researcher's results, and where
the executed notebooks were saved. By default the owner's kernel starts the embedded
signaling server, exactly as ``duet.launch()`` does on one machine; ``--server URL`` uses a
running ``duet-signaling``. The owner notebook hands its join code to the researcher's
through the file named by ``$DUET_DEMO_CODE_FILE``, standing in for the person who would
paste it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DemoResult", "main", "run_demo"]

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
ROLES = ("owner", "researcher")
# notebook name suffixes: owner{pair}.ipynb + researcher{pair}.ipynb
PAIRS = ("", "_tables", "_dp")
ENV_CODE_FILE = "DUET_DEMO_CODE_FILE"


@dataclass
class DemoResult:
    """What the two notebooks did; ``error`` is set when a notebook failed."""

    build_dir: Path
    seconds: float
    notebooks: dict[str, Path]
    error: str = ""
    summary: dict[str, Any] = field(default_factory=dict)  # the researcher's summary cell
    requests: list[dict[str, Any]] = field(default_factory=list)  # from the audit log
    events: Counter[str] = field(default_factory=Counter)
    audit_path: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.error


def _summary_cell(notebook: Any) -> dict[str, Any]:
    """The JSON output of the researcher's cell tagged ``summary``."""
    for cell in notebook.cells:
        if "summary" in cell.get("metadata", {}).get("tags", []):
            for output in cell.get("outputs", []):
                data = output.get("data", {})
                if "application/json" in data:
                    value: dict[str, Any] = data["application/json"]
                    return value
    return {}


def _requests_from_audit(audit_path: Path) -> tuple[list[dict[str, Any]], Counter[str]]:
    from .audit import AuditLog

    with AuditLog(audit_path, readonly=True) as log:
        events = log.events()
    requests: dict[str, dict[str, Any]] = {}
    for event in events:
        if event.event == "request" and event.request_id:
            requests[event.request_id] = {"id": event.request_id, "lineage": event.lineage or "",
                                          "reason": event.detail.get("reason", ""),
                                          "status": "pending"}
        elif event.event == "decision" and event.request_id in requests:
            requests[event.request_id].update(status=event.detail.get("status", ""),
                                              by=event.detail.get("by", ""),
                                              why=event.detail.get("reason", ""))
    return list(requests.values()), Counter(e.event for e in events)


async def _execute(notebook: Any, directory: Path, env: dict[str, str], timeout: float) -> None:
    """Run every cell in a new kernel; nbclient fills in ``notebook``'s outputs as it goes."""
    from jupyter_client.manager import AsyncKernelManager
    from nbclient import NotebookClient

    # IPC sockets in the run's own directory: a local demo has no business on TCP ports.
    ipc_prefix = directory / f"kernel-{notebook.metadata.get('duet_role', id(notebook))}"
    manager = AsyncKernelManager(kernel_name="python3", transport="ipc", ip=str(ipc_prefix))
    client = NotebookClient(notebook, km=manager, timeout=timeout,
                            resources={"metadata": {"path": str(directory)}})
    try:
        await client.async_execute(env=env)
    finally:
        # nbclient shuts down only kernels it created itself: stop ours, so the kernel does
        # not outlive us and log "Parent appears to have exited" on its own.
        if await manager.is_alive():
            await manager.shutdown_kernel(now=False)  # cleans up its files too
        else:  # (an async manager's cleanup is a coroutine: never awaited, it did nothing)
            await manager.cleanup_resources()


async def _run_both(notebooks: list[Any], directory: Path, env: dict[str, str],
                    timeout: float) -> list[str]:
    """Both at once, as two people would; if one fails the other, left waiting, is stopped.

    Returns an error message per notebook ("" when it ran through).
    """
    from nbclient.exceptions import CellExecutionError

    tasks = [asyncio.create_task(_execute(nb, directory, env, timeout)) for nb in notebooks]
    await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    stopped = [not task.done() for task in tasks]
    for task in tasks:
        task.cancel()  # no-op for finished tasks; nbclient shuts the kernel down on cancel
    await asyncio.gather(*tasks, return_exceptions=True)
    errors = []
    for task, was_stopped in zip(tasks, stopped, strict=True):
        exc = None if was_stopped else task.exception()
        if was_stopped:
            errors.append("stopped because the other notebook failed")
        elif exc is None:
            errors.append("")
        elif isinstance(exc, CellExecutionError):  # the cell's own error, without colours
            errors.append(f"a cell raised {exc.ename}: {exc.evalue}")
        else:
            errors.append(f"{type(exc).__name__}: {exc}")
    return errors


def run_demo(build_dir: Path, *, server: str | None = None, notebooks: Path = NOTEBOOKS,
             timeout: float = 600, pair: str = "") -> DemoResult:
    """Execute both notebooks of ``pair`` (the suffix of their names) concurrently; save them
    (run or failed) under ``build_dir``, which gets a fresh audit log (and privacy ledger)."""
    import nbformat

    build_dir = build_dir.resolve()  # the kernels run in the notebooks' directory
    build_dir.mkdir(parents=True, exist_ok=True)
    audit_path = build_dir / "audit.sqlite3"
    code_file = build_dir / "join-code.json"
    for stale in (audit_path, code_file, *build_dir.glob("audit.sqlite3-*"),
                  *build_dir.glob("ledger.sqlite3*")):
        stale.unlink(missing_ok=True)
    env = {**os.environ, ENV_CODE_FILE: str(code_file), "DUET_AUDIT_PATH": str(audit_path)}
    if server is not None:
        env["DUET_SIGNALING_URL"] = server
    runs = [nbformat.read(notebooks / f"{role}{pair}.ipynb", as_version=4) for role in ROLES]
    saved = {role: build_dir / f"{role}{pair}.ipynb" for role in ROLES}

    started = time.monotonic()
    outcomes = asyncio.run(_run_both(runs, notebooks, env, timeout))
    result = DemoResult(build_dir, time.monotonic() - started, saved, audit_path=audit_path)
    for role, notebook in zip(ROLES, runs, strict=True):
        nbformat.write(notebook, saved[role])
    result.summary = _summary_cell(runs[ROLES.index("researcher")])
    result.error = "\n".join(f"{role}{pair}.ipynb: {error}"
                             for role, error in zip(ROLES, outcomes, strict=True) if error)
    if audit_path.exists():
        result.requests, result.events = _requests_from_audit(audit_path)
    return result


def _shown(path: Path | None) -> str:
    """A path as the user would type it: relative to where they ran the demo, if inside."""
    if path is None:
        return ""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _report(result: DemoResult) -> str:
    owner, researcher = (path.name for path in result.notebooks.values())
    lines = [f"duet demo: {owner} and {researcher} ran side by side in two kernels "
             f"({result.seconds:.1f} s)"]
    decided = Counter(r["status"] for r in result.requests)
    lines.append(f"  requests: {len(result.requests)} ("
                 + ", ".join(f"{n} {status}" for status, n in sorted(decided.items())) + ")")
    for request in result.requests:
        lineage = request["lineage"] if len(request["lineage"]) <= 48 else \
            request["lineage"][:47] + "…"
        lines.append(f"    {request['status']:<8} {lineage:<49} asked: {request['reason']!r}")
        if request["status"] == "denied":
            lines.append(f"             owner's answer: {request.get('why', '')!r}")
    summary = result.summary
    if "test_accuracy" in summary:
        lines.append("  the researcher trained a model on data they never saw: training loss "
                     f"{summary['training_loss']:.3f}, "
                     f"test accuracy {summary['test_accuracy']:.3f}")
        lines.append(f"  trained weights received: {json.dumps(summary.get('weights', {}))}")
        lines.append(f"  raw patient rows: {summary.get('raw_rows')}")
    if "cv_auc" in summary:
        lines.append("  the researcher described the cohort "
                     f"({json.dumps(summary.get('cohort', {}))} patients by sex) and fitted a "
                     f"logistic regression: cross-validated AUC {summary['cv_auc']:.3f}")
        coefficients = {k: round(v, 2) for k, v in summary.get("coefficients", {}).items()}
        lines.append(f"  coefficients received: {json.dumps(coefficients)}")
        lines.append(f"  raw patient rows: {summary.get('raw_rows')}")
    if "radius_by_diagnosis" in summary:
        lines.append("  differentially private answers: about "
                     f"{summary['patients']} patients; mean radius by diagnosis "
                     f"{json.dumps(summary['radius_by_diagnosis'])}")
        lines.append(f"  exact mean: {summary.get('exact_mean')}; over budget: "
                     f"{summary.get('over_budget')}")
    if result.events:
        top = ", ".join(f"{name} {n}" for name, n in result.events.most_common(6))
        lines.append(f"  audit log: {sum(result.events.values())} events in "
                     f"{_shown(result.audit_path)} ({top})")
    lines.append("  executed notebooks: "
                 + ", ".join(_shown(path) for path in result.notebooks.values()))
    if result.error:
        lines.append(f"FAILED:\n{result.error}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m duet.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--build-dir", type=Path, default=Path("build/demo"),
                        help="where the executed notebooks and the audit log go")
    parser.add_argument("--server", help="a running signaling server (default: the owner's "
                                         "kernel embeds one, or $DUET_SIGNALING_URL)")
    parser.add_argument("--notebooks", type=Path, default=NOTEBOOKS,
                        help="the directory holding owner.ipynb and researcher.ipynb")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per cell")
    parser.add_argument("--pair", action="append", choices=PAIRS,
                        help="run only this pair (by its suffix; '' is the first pair)")
    args = parser.parse_args(argv)
    ok = True
    for pair in args.pair or PAIRS:
        if not all((args.notebooks / f"{role}{pair}.ipynb").exists() for role in ROLES):
            continue  # a notebooks directory with fewer pairs
        print(f"duet demo: running owner{pair}.ipynb and researcher{pair}.ipynb…", flush=True)
        result = run_demo(args.build_dir / pair.strip("_") if pair else args.build_dir,
                          server=args.server, notebooks=args.notebooks, timeout=args.timeout,
                          pair=pair)
        print(_report(result), flush=True)
        ok = ok and result.ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
