"""The %duet magic's edges in a real kernel: no ipywidgets, bad input, both extension names.

The researcher here is this test process itself (``duet.api.join``), a real peer over the
real signaling server, so one kernel is enough.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from duet.api import join
from duet.errors import RequestDenied, WorkerRestarted
from tests.kernel_ext.conftest import Kernel


def test_without_ipywidgets_the_owner_decides_with_html_and_magics(
        start_kernel: Callable[[], Kernel], server_url: str) -> None:
    owner = start_kernel()
    owner.run("import sys; sys.modules['ipywidgets'] = None  # as if not installed")
    launched = owner.run("%duet launch --no-stun --name owner")
    assert not launched.mime("application/vnd.jupyter.widget-view+json")
    assert "ipywidgets is not installed" in "".join(launched.mime("text/html"))
    code = re.search(r'duet\.join\("([^"]+)", server="([^"]+)"\)', launched.stdout)
    assert code and server_url.removeprefix("http://") in code[2]  # normalized to ws://
    owner.run("owner.share([1.5, 2.5, 4.0], name='doses', description='mg per patient')")

    with join(code[1], code[2], ice_servers=[], timeout=30) as researcher:
        doses = researcher.store.wait_for("doses", 30)
        first = researcher.np.sum(doses).request("total dose")
        second = doses.request("every dose")
        assert owner.eventually("len(owner.requests.pending) == 2", 30)
        listed = owner.run("%duet requests")
        html = "".join(listed.mime("text/html"))
        assert "sum(doses)" in html and "total dose" in html and "every dose" in html
        assert "%duet approve ID" in html
        # the disclosure checks, in words: a plain list has no rows of records to count
        assert "disclosure checks:" in html and "REVIEW</b>" in html
        assert "which records of &#x27;doses&#x27; it reveals is unknown" in html
        owner.run(f"%duet approve {first.id}")
        owner.run(f"%duet deny {second.id} only totals leave this hospital")
        assert float(first.result(30)) == 8.0
        try:
            second.result(30)
        except RequestDenied as exc:
            assert "only totals leave this hospital" in str(exc)
        else:
            raise AssertionError("the denied request returned a value")
        endless = researcher.np.sum(researcher.np.broadcast_to(doses, (10**15, 3)))
        stuck = endless.request("runs for months")
        researcher.ping()
        stopped = owner.run("%duet stop")
        assert "operations were stopped" in stopped.stdout
        try:
            stuck.result(30)
        except WorkerRestarted as exc:
            assert "cancelled by the owner" in str(exc)
        else:
            raise AssertionError("the stopped request returned a value")
        assert "worker process: " in owner.run("%duet status").stdout
    owner.run("%duet close")
    assert "session is closed" in owner.run("%duet status").stdout


def test_usage_errors_are_reported_not_raised_into_the_kernel(
        start_kernel: Callable[[], Kernel]) -> None:
    kernel = start_kernel()
    helped = kernel.run("%duet -h")
    assert "launch" in helped.stdout and "approve" in helped.stdout

    for line, message in [
        ("%duet", "the following arguments are required: command"),
        ("%duet fly", "invalid choice: 'fly'"),
        ("%duet status", "which duet session? pass --name (sessions here: none)"),
        ("%duet approve abc", "which duet session?"),
        ("%duet launch --no-stun --ice-server stun:x", "not allowed with argument"),
        ("%duet join NOT-A-CODE --server http://127.0.0.1:9", "duet: "),
    ]:
        result = kernel.run(line, ok=False)
        assert result.status == "error" and result.stderr.startswith("UsageError"), line
        assert message in result.text, (line, result.text)

    kernel.run("data = [1, 2, 3]")
    refused = kernel.run("%duet launch --no-stun --name data", ok=False)
    assert "`data` already holds a list" in refused.text
    assert kernel.value("data") == [1, 2, 3]

    kernel.run("%duet launch --no-stun")
    first_code = kernel.value("session.code")
    kernel.run("%duet launch --no-stun")  # re-running the cell replaces the session
    assert kernel.value("session.code") != first_code
    assert "no request with an id starting 'zz'" in kernel.run("%duet deny zz", ok=False).text
    kernel.run("%duet close")


def test_load_ext_duet_is_the_same_extension(start_kernel: Callable[[], Kernel]) -> None:
    kernel = start_kernel()
    kernel.run("get_ipython().magics_manager.magics['line'].pop('duet')")
    assert "Line magic function `%duet` not found" in kernel.run("%duet status", ok=False).stderr
    kernel.run("%load_ext duet")
    assert "which duet session?" in kernel.run("%duet status", ok=False).text
