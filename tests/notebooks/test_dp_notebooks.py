"""The differential-privacy demo pair, executed unattended and concurrently in two real
kernels (nbclient): the owner sets a budget and rules and steps away; the researcher gets
DP answers (group means among them) automatically, an exact mean is denied with the rule's
reason, and a request over the budget is refused before anything is computed."""

from __future__ import annotations

from pathlib import Path

import nbformat

from duet.demo import run_demo
from duet.ledger import Ledger
from tests.helpers.signaling import start_signaling_server
from tests.notebooks.test_notebooks import outputs_text


def test_dp_notebooks_answer_within_the_budget_while_the_owner_is_away(tmp_path: Path) -> None:
    with start_signaling_server() as url:
        result = run_demo(tmp_path, server=url, timeout=300, pair="_dp")
    assert result.ok, result.error

    summary = result.summary
    assert 500 < summary["patients"] < 640  # 569 patients, noise of scale 10
    means = summary["radius_by_diagnosis"]
    assert set(means) == {"benign", "malignant"}  # the owner's declared keys, no others
    assert 10 < means["benign"] < means["malignant"] < 20  # about 12.1 and 17.5 in the data
    assert len(summary["histogram"]["counts"]) == 5 and len(summary["quartiles"]) == 3
    assert summary["exact_mean"].startswith("denied: exact values of patient data")
    assert "disclosure checks" in summary["exact_mean_of_few"]  # 5 patients
    assert "min_count" in summary["exact_mean_of_few"]
    assert "record_level" in summary["records"]
    assert summary["over_budget"] == "refused: patients"

    decisions = [(r["lineage"], r["status"], r.get("by", "")) for r in result.requests]
    approved = [d for d in decisions if d[1] == "approved"]
    assert len(approved) == 4 and all(by == "rule:1" for _, _, by in approved)
    denied = [d for d in decisions if d[1] == "denied"]
    assert sorted(by for _, _, by in denied) == ["rule:2", "rule:2", "rule:3"]
    assert result.events["value_sent"] == 4

    assert result.audit_path is not None
    ledger = Ledger.beside(result.audit_path)
    budget = ledger.budget("patients")
    assert abs(budget.epsilon_spent - 1.2) < 1e-9 and budget.reserved == 0
    assert [c.status for c in ledger.charges("patients")] == ["spent"] * 4
    ledger.close()

    owner = nbformat.read(result.notebooks["owner"], as_version=4)
    shown = outputs_text(owner)
    assert "budget 'patients': ε 0 spent of 2" in shown  # before
    assert "budget 'patients': ε 1.2 spent of 2 (0.8 left)" in shown  # after
    assert "DP ε=0.5" in shown and "EXACT release of DP-protected patients" in shown
    researcher = nbformat.read(result.notebooks["researcher"], as_version=4)
    assert "privacy budget of 'patients' exceeded" in outputs_text(researcher)
