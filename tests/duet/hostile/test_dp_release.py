"""Class 12: no DP release leaves without its charge, and a DP-SGD run spends what its plan
said.

1. A withdrawal that lands while the owner's kernel turns a DP snapshot into a request gives
   the reservation back; a ``dp_within_budget`` rule approving the request a moment later
   must then send nothing (repeated, free releases would average to the exact value).
2. The noise of a DP-SGD run is calibrated for exactly the steps it takes: 750 rows in
   batches of 10 for 3 epochs is 225 steps, for which Opacus' epochs-based calibration
   counts 224, so the run spent more than its plan and the kernel killed the worker as
   misbehaving (four such requests stopped it for the session).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

import duet
from tests.helpers import rawwire
from tests.helpers.sessions import eventually, session_pair

AGES = np.random.default_rng(7).uniform(18, 90, 2000)


def test_a_withdrawal_racing_its_snapshot_gets_no_release(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    with session_pair(tmp_path / "audit.sqlite3") as (owner, researcher):
        owner.share(AGES, name="ages", dp=duet.DP(epsilon=1.0, bounds=(18, 90)))
        researcher.store.wait_for("ages", 60)
        owner.requests.add_rule("approve", dp_within_budget=True)
        ages = researcher.store["ages"]
        inside = threading.Event()
        privacy_of = owner._privacy_of

        def pausing(snapshot: Any) -> Any:  # the kernel between its checks and its queue
            found = privacy_of(snapshot)
            inside.set()
            time.sleep(1.0)
            return found

        monkeypatch.setattr(owner, "_privacy_of", pausing)
        received = rawwire.record_received(researcher)
        handle = researcher.dp.mean(ages, epsilon=0.5).request("mean age")
        assert inside.wait(60)
        handle.withdraw()
        eventually(lambda: any(q.reason == "mean age" and q.status != "pending"
                               for q in owner.requests), 60)
        request = next(q for q in owner.requests if q.reason == "mean age")
        assert request.status == "withdrawn", (request.status, request.decision_reason)
        assert "nothing was sent or charged" in request.decision_reason
        monkeypatch.undo()
        time.sleep(0.5)  # anything sent would be here by now
        assert [m for m in received if m.type == "decision"] == []
        assert owner.budget("ages").epsilon_spent == 0.0
        assert owner.audit.events(event="value_sent") == []
        with pytest.raises(duet.RequestError, match="already withdrawn"):  # nor by hand
            request.approve()
        # the session goes on: the next query is answered and charged
        again = researcher.dp.mean(ages, epsilon=0.5).get("mean age again", timeout=120)
        assert 18 <= again <= 90
        assert owner.budget("ages").epsilon_spent == pytest.approx(0.5)


def test_a_training_run_spends_exactly_its_plan(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(750, 4)).astype(np.float32)
    table = pd.DataFrame(x, columns=list("abcd")).assign(y=(x[:, 0] > 0).astype(np.int64))
    with session_pair(tmp_path / "audit.sqlite3") as (owner, researcher):
        owner.share(table, "t", dp=duet.DP(epsilon=10.0, delta=1e-4))
        researcher.store.wait_for("t", 60)
        owner.requests.add_rule("approve", dp_within_budget=True)
        t = researcher.store["t"]
        nn = researcher.torch.nn
        pid = owner.worker_pid
        job = researcher.dp.train(nn.Sequential(nn.Linear(4, 2)), data=t[list("abcd")],
                                  labels=t["y"], loss="cross_entropy", epochs=3, batch_size=10,
                                  lr=0.5, epsilon=3.0)
        result = job.get("a tiny model", timeout=300)
        assert "parameters" in result
        assert owner.audit.events(event="worker_restarted") == []
        assert owner.worker_pid == pid
        assert 0 < owner.budget("t").epsilon_spent <= 3.0
