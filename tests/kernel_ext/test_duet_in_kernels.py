"""A duet between two real ipykernel kernels, driven through the %duet magics and the panel.

The owner's decisions arrive the ways a person makes them: typed magics, and widget
clicks sent as comm messages from the "frontend" (this test), exactly as JupyterLab sends
them. Nothing is mocked: real kernels, a real signaling server, a real WebRTC channel.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable

import numpy as np

from tests.kernel_ext.conftest import Kernel, Message

CLICK = {"method": "custom", "content": {"event": "click"}}  # what a frontend sends
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def pair(start_kernel: Callable[[], Kernel]) -> tuple[Kernel, Kernel]:
    """An owner kernel sharing ``ages`` and a researcher kernel joined to it via the magics."""
    owner, researcher = start_kernel(), start_kernel()
    launched = owner.run("%duet launch --no-stun")
    assert launched.mime(WIDGET_VIEW), "the approval panel is displayed at launch"
    match = re.search(r"%duet join (\S+) --server (\S+)", launched.stdout)
    assert match, launched.stdout
    owner.run("import numpy as np\n"
              "ages = np.array([31, 45, 27, 62, 38, 51], dtype=np.int64)\n"
              "session.share(ages, name='ages', description='age in years')")
    joined = researcher.run(f"%duet join {match[1]} --server {match[2]} --no-stun")
    assert "connected to the owner" in joined.stdout
    assert "age in years" in joined.text, "the store listing is displayed after joining"
    assert owner.value("session.wait_for_peer(30)") is True
    researcher.run("ages = session.store.wait_for('ages', 30)")
    return owner, researcher


def request_on_owner(owner: Kernel) -> str:
    """Wait in the owner's kernel for the oldest pending request; return its id."""
    request_id: str = owner.value("session.requests.wait(60).id")
    return request_id


def test_request_approved_and_denied_with_magics(start_kernel: Callable[[], Kernel]) -> None:
    owner, researcher = pair(start_kernel)
    assert "connected" in researcher.run("%duet status").stdout
    status = owner.run("%duet status").stdout
    assert "duet owner session: connected" in status and "shared: ages" in status

    researcher.run("h = session.np.mean(ages * 2).request('mean for the paper')")
    request_id = request_on_owner(owner)
    shown = owner.run("session.requests.get(session.requests.pending[0].id)")
    assert "mean for the paper" in shown.text and "mean((ages * 2))" in shown.text
    approved = owner.run(f"%duet approve {request_id[:6]}")
    assert f"approved {request_id}" in approved.stdout
    assert researcher.value("float(h.result(30))") == 2 * 254 / 6

    researcher.run("h = ages[:2].request('two rows please')")
    request_id = request_on_owner(owner)
    owner.run(f"%duet deny {request_id} rows are personal data")
    denied = researcher.run("h.result(30)", ok=False)
    assert denied.error.startswith("RequestDenied") and "rows are personal data" in denied.error

    twice = owner.run(f"%duet approve {request_id}", ok=False)
    assert twice.status == "error" and "already denied" in twice.text
    assert owner.value("[r.status for r in session.requests]") == ["approved", "denied"]

    researcher.run("%duet close")
    assert owner.eventually("not session.connected", 20)
    assert "the researcher has left" in owner.run("%duet status").stdout


def controls(request_id: str) -> str:
    """Owner-side expression: the widget model ids of a request's Approve/reason/Deny."""
    return (f"[w.model_id for w in __import__('kernel_ext').approval_panel("
            f"session.requests).controls('{request_id}')]")


def _comm_open_with(request_id: str) -> Callable[[Message], bool]:
    return lambda m: m["msg_type"] == "comm_open" and request_id in json.dumps(m["content"])


def test_panel_updates_while_idle_and_decides_on_clicks(
        start_kernel: Callable[[], Kernel]) -> None:
    owner, researcher = pair(start_kernel)

    researcher.run("h = session.np.std(ages).request('spread of ages')")
    # The owner's kernel runs nothing now: the new row must arrive from the session's thread.
    request_id = researcher.value("h.id")
    owner.wait_iopub(_comm_open_with(request_id), timeout=30)
    approve_id, _reason_id, _deny_id = owner.value(controls(request_id))
    owner.send_comm(approve_id, CLICK)
    value = researcher.value("float(h.result(30))")
    assert abs(value - float(np.std([31, 45, 27, 62, 38, 51]))) < 1e-9

    researcher.run("h = ages[ages > 40].request('who is over 40?')")
    request_id = researcher.value("h.id")
    owner.wait_iopub(_comm_open_with(request_id), timeout=30)
    _approve_id, reason_id, deny_id = owner.value(controls(request_id))
    owner.send_comm(reason_id, {"method": "update", "state": {"value": "no individual ages"},
                                "buffer_paths": []})
    owner.send_comm(deny_id, CLICK)
    denied = researcher.run("h.result(30)", ok=False)
    assert denied.error.startswith("RequestDenied") and "no individual ages" in denied.error
    assert owner.value("[(r.status, r.decided_by) for r in session.requests]") == [
        ["approved", "owner"], ["denied", "owner"]]
    assert owner.value("__import__('kernel_ext').approval_panel(session.requests)"
                       "._rows == {}") is True


def test_owner_keeps_working_while_researcher_blocks_in_get(
        start_kernel: Callable[[], Kernel]) -> None:
    owner, researcher = pair(start_kernel)
    blocked = researcher.start("total = (ages + 1).sum().get('total', timeout=300)")
    request_id = request_on_owner(owner)

    started = time.monotonic()
    for step in range(4):  # the owner's notebook goes on with its own work meanwhile
        result = owner.run(f"import time; time.sleep(1); print('cell {step}', ages.sum())")
        assert result.stdout.strip() == f"cell {step} 254"
        assert not researcher.finished(blocked), "the researcher's get() is still waiting"
    assert time.monotonic() - started >= 4

    owner.run(f"%duet approve {request_id}")
    assert researcher.wait(blocked, 60).status == "ok"
    assert researcher.value("int(total)") == 254 + 6


def test_researcher_kernel_restart_disconnects_owner(
        start_kernel: Callable[[], Kernel]) -> None:
    owner, researcher = pair(start_kernel)
    researcher.run("h = session.np.max(ages).request('oldest')")
    request_id = request_on_owner(owner)
    owner.run("from kernel_ext import approval_panel\npanel = approval_panel(session.requests)")

    researcher.manager.restart_kernel(now=True)
    researcher.client.wait_for_ready(timeout=60)

    # The owner learns within the liveness timeout (10 s) plus slack.
    assert owner.eventually("not session.connected", 30)
    assert "the researcher has left" in owner.run("%duet status").stdout
    magic = owner.run(f"%duet approve {request_id}", ok=False)
    assert magic.status == "error" and "the researcher has left" in magic.text
    direct = owner.run("session.requests.pending[0].approve()", ok=False)
    assert direct.error.startswith("RequestError")
    approve, _reason, _deny = owner.value(controls(request_id))
    owner.send_comm(approve, CLICK)
    assert owner.eventually("'the researcher has left' in panel._message.value", 20)
    assert owner.value(f"session.requests.get('{request_id}').status") == "pending"
    # The restarted kernel is a fresh one: no session, and the extension loads again.
    assert researcher.value("'session' in globals()") is False
    researcher.run("%load_ext kernel_ext")
