"""Run a benchmark of this tree and of an earlier commit alternately, and compare them.

Each side runs its own copy of the script (``bench/<script>`` in its own tree, its own
``duet`` first on ``PYTHONPATH``) in a fresh process, one run of each in turn, so that
load on the machine hits both alike. Prints JSON: for every number both sides report, the
median over the runs of each side and the ratio this/base (the runs themselves too).

Usage: ``.venv/bin/python bench/versus.py --base 2ae024f [--runs 3] ops.py [script args]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit, log, machine  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def numbers(tree: Any, prefix: str = "") -> dict[str, float]:
    """Every numeric leaf of a JSON document, keyed by its path (``a.b.c``)."""
    found: dict[str, float] = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            found.update(numbers(value, f"{prefix}{key}."))
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        found[prefix.rstrip(".")] = float(tree)
    return found


def run(tree: Path, script: str, args: list[str]) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run([sys.executable, str(tree / "bench" / script), *args], cwd=tree,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          check=True, timeout=3600)
    return numbers(json.loads(done.stdout))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="the commit to compare with")
    parser.add_argument("--runs", type=int, default=3, help="runs of each side")
    parser.add_argument("script", help="a script in bench/, e.g. ops.py")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")
    options = parser.parse_args()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as scratch:
        base = Path(scratch) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(base), options.base],
                       cwd=ROOT, check=True)
        try:
            this_runs, base_runs = [], []
            for i in range(options.runs):
                log(f"run {i + 1}/{options.runs}: base {options.base}")
                base_runs.append(run(base, options.script, options.args))
                log(f"run {i + 1}/{options.runs}: this tree ({head})")
                this_runs.append(run(ROOT, options.script, options.args))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT,
                           check=False)
    common = sorted(set.intersection(*(set(r) for r in this_runs + base_runs)))
    compared = {}
    for key in common:
        ours = statistics.median(r[key] for r in this_runs)
        theirs = statistics.median(r[key] for r in base_runs)
        compared[key] = {"this": round(ours, 4), "base": round(theirs, 4),
                         "this_over_base": round(ours / theirs, 3) if theirs else None,
                         "this_runs": [r[key] for r in this_runs],
                         "base_runs": [r[key] for r in base_runs]}
    emit({"benchmark": "versus", "script": options.script, "args": options.args,
          "this": head, "base": options.base, "runs": options.runs, "machine": machine(),
          "compared": compared})


if __name__ == "__main__":
    main()
