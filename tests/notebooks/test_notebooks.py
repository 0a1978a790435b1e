"""The demo notebooks, executed unattended and concurrently in two real kernels (nbclient).

The owner's notebook shares scikit-learn's breast-cancer set and decides requests in code;
the researcher's trains a model remotely, receives its accuracy and weights, and is denied
raw rows. These tests check what each notebook shows, and that ``python -m duet.demo`` (the
``make demo`` command) works on the zero-setup default: a server embedded in the owner.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_notebook

from duet.demo import run_demo
from tests.helpers.signaling import start_signaling_server

ACCURACY_FLOOR = 0.90  # a small MLP on this set scores about 0.95 on the held-out split
REPO = Path(__file__).resolve().parents[2]


def outputs_text(notebook: nbformat.NotebookNode) -> str:
    """Everything the notebook shows, as text and HTML."""
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            parts.append(output.get("text", ""))
            parts += [str(v) for k, v in output.get("data", {}).items() if k.startswith("text/")]
    return "\n".join(parts)


def test_demo_notebooks_run_concurrently_and_show_the_duet(tmp_path: Path) -> None:
    with start_signaling_server() as url:
        result = run_demo(tmp_path, server=url, timeout=300)
    assert result.ok, result.error

    summary = result.summary
    assert summary["test_accuracy"] >= ACCURACY_FLOOR
    assert 0 < summary["training_loss"] < 0.69  # below chance level: it learned
    assert summary["weights"] == {"hidden.weight": [16, 30], "hidden.bias": [16],
                                  "out.weight": [2, 16], "out.bias": [2]}
    assert summary["raw_rows"].startswith("denied: individual patient records")

    decisions = {r["lineage"]: r["status"] for r in result.requests}
    assert decisions.pop("X_test[:5]") == "denied"
    assert len(decisions) == 5 and set(decisions.values()) == {"approved"}
    assert result.events["value_sent"] == 5 and result.events["share"] == 4

    researcher = nbformat.read(result.notebooks["researcher"], as_version=4)
    shown = outputs_text(researcher)
    assert "denied: request" in shown and "test accuracy: 0." in shown
    assert "X_train" in shown and "training split" in shown  # the store listing

    owner = nbformat.read(result.notebooks["owner"], as_version=4)
    shown = outputs_text(owner)
    assert "the researcher is connected" in shown
    assert re.search(r"<Request \w+ denied \(.*\) lineage='X_test\[:5\]'", shown), shown
    assert "RequestQueue: 6 requests, 0 pending" in shown


def test_tables_demo_describes_a_cohort_and_fits_a_model_without_rows(tmp_path: Path) -> None:
    """The tables pair: a clinical table read from SQLite, pandas and scikit-learn remotely,
    decided by the owner's rules alone."""
    with start_signaling_server() as url:
        result = run_demo(tmp_path, server=url, timeout=300, pair="_tables")
    assert result.ok, result.error

    summary = result.summary
    assert summary["cohort"] == {"F": 235, "M": 207}  # load_diabetes: sex coded 1 and 2
    assert summary["mean_age"] == {"F": 46.4, "M": 50.9}
    assert set(summary["coefficients"]) == {"age", "bmi", "bp", "log_triglycerides",
                                            "glucose"}
    assert summary["coefficients"]["bmi"] > 0  # a higher BMI, more progression
    assert 0.7 < summary["cv_auc"] < 0.95
    assert summary["raw_rows"] == "denied: individual patient records stay in the clinic"

    statuses = {r["reason"]: (r["status"], r["by"]) for r in result.requests}
    assert statuses.pop("a few patients to sanity-check the columns") == ("denied", "rule:1")
    assert set(statuses.values()) == {("approved", "rule:2")} and len(statuses) == 4
    assert result.events["share"] == 1 and result.events["value_sent"] == 4

    researcher = nbformat.read(result.notebooks["researcher"], as_version=4)
    shown = outputs_text(researcher)
    assert "442 rows x 8 columns" in shown  # the store listing: what the owner declared
    assert "log_triglycerides: float64" in shown
    assert "P0001" not in shown  # the index (patient ids) never reached the researcher
    assert "cross-validated AUC: 0." in shown and "denied: request" in shown
    assert "<table" in shown and "progression" in shown  # approved frames shown as tables

    owner = nbformat.read(result.notebooks["owner"], as_version=4)
    shown = outputs_text(owner)
    assert "442 patients from clinic.sqlite3" in shown
    assert "RequestQueue: 5 requests, 0 pending" in shown


def test_make_demo_runs_on_the_embedded_server(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DUET_SIGNALING_URL"}
    done = subprocess.run([sys.executable, "-m", "duet.demo", "--build-dir", "build/demo"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "requests: 6 (5 approved, 1 denied)" in done.stdout
    # both kernels were shut down, not left to notice that their parent is gone
    assert "Parent appears to have exited" not in done.stdout + done.stderr
    assert "owner's answer: 'individual patient records" in done.stdout
    built = tmp_path / "build" / "demo"
    assert {p.name for p in built.iterdir()} >= {"owner.ipynb", "researcher.ipynb",
                                                  "audit.sqlite3", "tables"}
    # the tables pair ran next to it
    assert "owner_tables.ipynb and researcher_tables.ipynb ran side by side" in done.stdout
    assert "requests: 5 (4 approved, 1 denied)" in done.stdout
    assert {p.name for p in (built / "tables").iterdir()} >= {
        "owner_tables.ipynb", "researcher_tables.ipynb", "audit.sqlite3"}


def test_demo_fails_loudly_and_stops_the_other_notebook(tmp_path: Path) -> None:
    """A broken owner notebook: the researcher's, waiting for a join code, is stopped."""
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    shutil.copy(REPO / "notebooks" / "researcher.ipynb", notebooks)
    broken = new_notebook(cells=[new_code_cell("raise RuntimeError('the owner notebook broke')")])
    nbformat.write(broken, notebooks / "owner.ipynb")
    done = subprocess.run([sys.executable, "-m", "duet.demo", "--build-dir",
                           str(tmp_path / "build"), "--notebooks", str(notebooks)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "FAILED" in done.stdout and "the owner notebook broke" in done.stdout
    assert "researcher.ipynb: stopped because the other notebook failed" in done.stdout
    assert "Parent appears to have exited" not in done.stdout + done.stderr
    assert "was never awaited" not in done.stderr  # each kernel's cleanup really ran
    saved = nbformat.read(tmp_path / "build" / "owner.ipynb", as_version=4)
    assert "the owner notebook broke" in json.dumps(saved.cells[0].outputs)
