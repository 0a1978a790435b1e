"""Benchmark differentially private requests against exact ones, and print JSON.

Owner and researcher sessions in one process over the in-memory transport (their real
loop threads, the owner's real worker process), so the figures are what DP adds on the
owner's side: the kernel's check and ledger reservation (SQLite, synced), the worker's
copy of the input, OpenDP's measurement and noise. The owner auto-approves: a rule for the
exact source, ``dp_within_budget`` for the DP one.

* ``exact_mean_ms`` / ``dp_mean_ms``: median round trip of ``r.np.mean(x).get()`` and of
  ``r.dp.mean(x, epsilon=...).get()`` over ``--rows`` values;
* ``dp_grouped_mean_ms``: a mean per group over two public keys;
* ``over_budget_refusal_ms``: a request refused by the ledger before anything is computed.

Usage: ``.venv/bin/python bench/dp.py [--rows 100000] [--reps 15]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import duet
from duet.config import SessionConfig
from duet.owner import OwnerSession
from duet.researcher import ResearcherSession
from duet.transport import InMemoryTransport


def median_ms(run: Callable[[], Any], reps: int) -> float:
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        run()
        times.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(times), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()
    ages = np.random.default_rng(0).uniform(18, 90, args.rows)
    owner_end, researcher_end = InMemoryTransport.pair()
    with tempfile.TemporaryDirectory() as directory:
        owner = OwnerSession(SessionConfig(progress=False),
                             audit_path=Path(directory) / "audit.sqlite3")
        researcher = ResearcherSession(SessionConfig(progress=False))
        owner.start(owner_end.start)
        researcher.start(researcher_end.start)
        try:
            assert researcher._wait_ready(30) and owner._wait_ready(30)
            owner.share(ages, name="ages", dp=duet.DP(epsilon=1e6, bounds=(18, 90)))
            owner.share(ages, name="plain")
            owner.requests.add_rule("approve", dp_within_budget=True)
            owner.requests.add_rule("approve", name="plain")
            x = researcher.store.wait_for("ages", 30)
            y = researcher.store.wait_for("plain", 30)
            old = x > 60

            def over_budget() -> None:
                try:
                    researcher.dp.count(x, epsilon=99.0).get("too much", timeout=120)
                except duet.PrivacyBudgetExceeded:
                    pass

            def grouped() -> Any:
                return researcher.dp.mean(x, epsilon=0.01, by=old,
                                          categories=[True, False]).get("g", timeout=120)

            # warm-up: the worker imports OpenDP, OpenDP searches each noise scale once
            researcher.dp.mean(x, epsilon=0.01).get("warm", timeout=300)
            grouped()
            researcher.np.mean(y).get("warm", timeout=120)
            exact = median_ms(lambda: researcher.np.mean(y).get("m", timeout=120), args.reps)
            dp_mean = median_ms(
                lambda: researcher.dp.mean(x, epsilon=0.01).get("m", timeout=120), args.reps)
            dp_grouped = median_ms(grouped, args.reps)
            owner.share(ages, name="ages", dp=duet.DP(epsilon=1.0, bounds=(18, 90)))
            refusal = median_ms(over_budget, args.reps)
        finally:
            researcher.close()
            owner.close()
    print(json.dumps({"rows": args.rows, "reps": args.reps, "exact_mean_ms": exact,
                      "dp_mean_ms": dp_mean, "dp_grouped_mean_ms": dp_grouped,
                      "over_budget_refusal_ms": refusal}))


if __name__ == "__main__":
    main()
