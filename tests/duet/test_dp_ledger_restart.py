"""The privacy ledger outlives the owner's process: a clean exit, and a crash with a DP
request reserved but undecided (which must count as spent)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# One owner "kernel" per run: a real process with its own worker, sharing "ages" with DP
# under the same name each time, as an owner would after restarting the kernel.
OWNER = r"""
import json, os, sys
import numpy as np
import duet
from tests.helpers.sessions import eventually, session_pair

audit, mode, epsilon = sys.argv[1], sys.argv[2], float(sys.argv[3])
ages = np.random.default_rng(1).uniform(18, 90, 500)
with session_pair(audit) as (s, r):
    s.share(ages, name="ages", dp=duet.DP(epsilon=1.0, bounds=(18, 90)))
    eventually(lambda: "ages" in r.store, 30)
    x = r.store["ages"]
    before = s.budget("ages").epsilon_spent
    outcome = "none"
    if mode == "check":  # 0.4 no longer fits after a crash left 0.3 reserved; 0.3 does
        s.requests.add_rule("approve", dp_within_budget=True)
        try:
            r.dp.count(x, epsilon=0.4).get("n", timeout=60)
            outcome = "released"
        except duet.PrivacyBudgetExceeded:
            outcome = "refused"
        r.dp.count(x, epsilon=epsilon).get("n", timeout=60)
    elif mode == "spend":
        s.requests.add_rule("approve", dp_within_budget=True)
        try:
            r.dp.count(x, epsilon=epsilon).get("n", timeout=60)
            outcome = "released"
        except duet.PrivacyBudgetExceeded:
            outcome = "refused"
    elif mode == "crash":
        r.dp.count(x, epsilon=epsilon).request("n")
        assert s.requests.wait(60) is not None  # reserved, shown, not decided
        print(json.dumps({"before": before, "outcome": "crashing"}), flush=True)
        os._exit(3)  # the owner's kernel dies with the reservation open
    print(json.dumps({"before": before, "outcome": outcome,
                      "after": s.budget("ages").epsilon_spent}), flush=True)
"""


def run_owner(audit: Path, mode: str, epsilon: float) -> tuple[int, dict[str, object]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", OWNER, str(audit), mode, str(epsilon)],
                          capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines, done.stderr[-3000:]
    return done.returncode, json.loads(lines[-1])


def test_the_ledger_survives_restarts_and_crashes_of_the_owner(tmp_path: Path) -> None:
    audit = tmp_path / "data" / "audit.sqlite3"
    code, first = run_owner(audit, "spend", 0.4)
    assert code == 0 and first == {"before": 0.0, "outcome": "released", "after": 0.4}
    assert (audit.parent / "ledger.sqlite3").is_file()  # next to the audit log

    code, crashed = run_owner(audit, "crash", 0.3)
    assert code == 3 and crashed["before"] == 0.4

    # a new kernel, the same name: the crash's reservation counts as spent (0.7 of 1.0), so
    # 0.4 is refused and 0.3 is released
    code, last = run_owner(audit, "check", 0.3)
    assert code == 0 and last["outcome"] == "refused"
    assert abs(float(last["before"]) - 0.7) < 1e-9  # type: ignore[arg-type]
    assert abs(float(last["after"]) - 1.0) < 1e-9  # type: ignore[arg-type]
