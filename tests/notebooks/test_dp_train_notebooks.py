"""The private-training notebook pair (notebooks/dp_train/), executed unattended and
concurrently in two real kernels: the researcher trains a digit classifier with DP-SGD on
the owner's side; the owner sees the cost before training and the budget before and after;
a second run the budget cannot pay is refused before it starts."""

from __future__ import annotations

from pathlib import Path

import nbformat

from duet.audit import AuditLog
from duet.demo import run_demo
from tests.helpers.signaling import start_signaling_server
from tests.notebooks.test_notebooks import outputs_text

REPO = Path(__file__).resolve().parents[2]


def test_dp_training_notebooks_run_end_to_end(tmp_path: Path) -> None:
    with start_signaling_server() as url:
        result = run_demo(tmp_path, server=url, notebooks=REPO / "notebooks" / "dp_train",
                          timeout=600)
    assert result.ok, result.error

    summary = result.summary
    assert summary["test_accuracy"] >= 0.7  # ten classes; DP at epsilon 2 scores ~0.9
    assert summary["epsilon"] == 2.0
    assert summary["parameters"] == {"0.weight": [32, 64], "0.bias": [32],
                                     "2.weight": [10, 32], "2.bias": [10]}
    assert summary["second_run"].startswith("refused: privacy budget of 'digits' exceeded")

    # start, parameters, accuracy; then the second run, refused before it reached the owner
    assert result.audit_path is not None
    with AuditLog(result.audit_path, readonly=True) as log:
        events = log.events()
    decisions = {e.request_id: e.detail for e in events if e.event == "decision"}
    asked = list(dict.fromkeys(e.request_id for e in events
                               if e.event in ("request", "decision")))
    assert [decisions.get(i, {}).get("status") for i in asked] == [
        "approved", "approved", "approved", None], result.requests
    assert decisions[asked[1]]["by"] in ("dp.train start", "owner")  # whoever was first
    refused = [e.detail for e in events if e.event == "request" and e.request_id == asked[3]]
    assert refused[-1]["refused"].startswith("privacy budget of 'digits' exceeded")

    owner = outputs_text(nbformat.read(result.notebooks["owner"], as_version=4))
    assert "budget before: budget 'digits': ε 0 spent of 3 (3 left)" in owner
    assert "noise multiplier" in owner and "Poisson sampling at rate" in owner
    after = owner[owner.index("budget after:"):]
    assert "(3 left)" not in after.splitlines()[0]
    assert "('reserved', 2.0), ('spent', 1.99" in owner
