"""The owner's approval panel in a real JupyterLab, in a real browser, as a person uses it.

JupyterLab serves copies of the demo notebooks on 127.0.0.1; Playwright drives Debian's
chromium (``make test`` installs it; Playwright's own browser download cannot run here) in two
tabs: the owner runs the first cells (launch, share), the researcher runs its cells up to a
blocking ``.get()``, the request shows up in the owner's rendered panel, a click on Approve
sends the value, and a Deny with a typed reason reaches the researcher as RequestDenied.
The test asserts on the DOM; screenshots of each step go to build/browser/ for people.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from jupyter_core.paths import jupyter_data_dir
from playwright.sync_api import Page, expect, sync_playwright
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

from tests.helpers.signaling import free_port

ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / "build" / "browser"


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[str]:
    for name in ("owner.ipynb", "researcher.ipynb"):
        shutil.copy(ROOT / "notebooks" / name, tmp_path / name)
    port, token = free_port(), secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if k not in ("DUET_DEMO_CODE_FILE",
                                                            "DUET_SIGNALING_URL")}
    # The same-machine invitation lives in the user's data directory: a duet launched
    # elsewhere on this machine meanwhile (another run, a benchmark) would hand the
    # researcher its code. This lab's kernels get their own; Jupyter keeps its own.
    env["JUPYTER_DATA_DIR"] = jupyter_data_dir()
    env["XDG_DATA_HOME"] = str(tmp_path / "data")
    # JupyterLab's settings and workspaces of this run only: the user's own are neither read
    # nor changed (the test switches the theme), and every run starts as a first one does.
    # A first run asks whether to fetch Jupyter's news, in a toast that takes the keyboard's
    # focus when dismissed; the answer is given here: no (and nothing is fetched).
    settings = tmp_path / "lab-settings"
    notification = settings / "@jupyterlab" / "apputils-extension"
    notification.mkdir(parents=True)
    (notification / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false"}))
    env["JUPYTERLAB_SETTINGS_DIR"] = str(settings)
    env["JUPYTERLAB_WORKSPACES_DIR"] = str(tmp_path / "lab-workspaces")
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("jupyter")), "lab", "--no-browser",
         "--ip", "127.0.0.1", "--port", str(port), "--ServerApp.port_retries=0",
         f"--ServerApp.root_dir={tmp_path}", f"--IdentityProvider.token={token}",
         "--allow-root"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
                break
            except OSError:
                time.sleep(0.2)
        yield f"{base}|{token}"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


def open_notebook(page: Page, base: str, token: str, name: str) -> None:
    page.goto(f"{base}/lab/tree/{name}?token={token}")
    page.locator(".jp-Notebook .jp-Cell").first.wait_for(timeout=60_000)
    # the status bar's kernel item, not the toolbar's indicator: the indicator says "idle" from
    # the moment the notebook opens, before any kernel exists, and a cell run then is cleared
    # without running (JupyterLab's CodeCell.execute needs a connected kernel)
    expect(page.get_by_role("button", name=re.compile(r"\(ipykernel\) \| Idle$"))
           ).to_be_visible(timeout=90_000)


def run_cells(page: Page, count: int, start_text: str | None = None) -> None:
    """Select the first cell (or the one containing ``start_text``), then Shift+Enter."""
    cells = page.locator(".jp-Notebook .jp-Cell")
    target = cells.filter(has_text=start_text).first if start_text else cells.first
    target.click()
    page.keyboard.press("Escape")  # command mode: Shift+Enter runs and moves on
    # the status bar's "Cell k/n" moves on with each press that ran its cell: a press lost on
    # a loaded machine fails here, by name, not minutes later as a request that never came
    position = page.get_by_role("button", name=re.compile(r"^Cell \d+\/\d+$"))
    for _ in range(count):
        before = position.inner_text()
        active = page.locator(".jp-Notebook .jp-Cell.jp-mod-active")
        code = "jp-CodeCell" in (active.get_attribute("class") or "")
        prompt = active.locator(".jp-InputPrompt").element_handle() if code else None
        page.keyboard.press("Shift+Enter")
        expect(position).not_to_have_text(before, timeout=30_000)
        if prompt is not None:
            # a code cell that ran shows [*] or its count; JupyterLab moves past a cell it
            # did not send to the kernel and leaves it [ ]: say so here, by the cell's number
            try:
                page.wait_for_function("p => p.textContent.trim() !== '[ ]:'", arg=prompt,
                                       timeout=30_000)
            except PlaywrightTimeoutError:
                raise AssertionError(f"JupyterLab moved past {before} without running it") from None


def brightness(css_colour: str) -> float:
    """0 (black) to 255 (white) for an ``rgb(...)``/``rgba(...)`` CSS colour."""
    red, green, blue = (float(v) for v in re.findall(r"[\d.]+", css_colour)[:3])
    return 0.299 * red + 0.587 * green + 0.114 * blue


@contextlib.contextmanager
def explained_on_failure(pages: dict[str, Page]) -> Iterator[None]:
    """On a failure, what each tab showed: a screenshot (``failed-<tab>.png``) and the text of
    every cell output in the test's report. "Not visible after 240 s" alone says nothing of
    which side stopped, or why."""
    try:
        yield
    except Exception:
        for name, page in pages.items():
            shot(page, f"failed-{name}")
            print(f"--- {name}: cell outputs ---")
            for text in page.locator(".jp-OutputArea-output").all_inner_texts():
                print(text[:2000])
        raise


def shot(page: Page, name: str, focus: str | None = None) -> None:
    """A screenshot for people; ``focus``: scroll to the output containing that text and
    take just that output."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    if focus is not None:
        area = page.locator(".jp-OutputArea", has_text=focus).first
        area.scroll_into_view_if_needed()
        area.screenshot(path=str(SHOTS / f"{name}.png"))
    else:
        page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=False)


def test_the_owner_approves_and_denies_in_the_rendered_panel(lab: str, tmp_path: Path) -> None:
    base, token = lab.split("|")
    chromium = shutil.which("chromium")
    assert chromium, "chromium is missing: make test installs Debian's chromium"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True,
                                             args=["--no-sandbox"])
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        owner, researcher = context.new_page(), context.new_page()
        with explained_on_failure({"owner": owner, "researcher": researcher}):
            open_notebook(owner, base, token, "owner.ipynb")
            run_cells(owner, 12)  # imports, data, %duet launch (panel), share, wait for the peer
            panel = owner.locator(".widget-html", has_text="duet approval panel").first
            expect(panel).to_be_visible(timeout=120_000)
            shot(owner, "1-owner-launched")

            # the owner's kernel is busy with a cell of its own when the request arrives: the panel
            # must show it anyway (clicks wait for the kernel, as any widget's do)
            owner.keyboard.press("b")
            owner.keyboard.press("Enter")
            # busy until the test releases it (a file in the kernel's directory), however long a
            # loaded machine takes for the researcher's side: a fixed sleep could end too early
            owner.keyboard.type("import os, time; t = time.time(); [time.sleep(0.2) for _ in "
                                "iter(lambda: os.path.exists('release-owner') or "
                                "time.time() - t > 900, True)]; print('owner cell done')")
            owner.keyboard.press("Shift+Enter")
            owner.get_by_text("Kernel status: Busy").first.wait_for(state="attached")

            open_notebook(researcher, base, token, "researcher.ipynb")
            run_cells(researcher, 10)  # join (same-machine invitation), pointers, a blocking get
            # a fresh checkout's first kernels compile and import torch: be patient, step by step
            expect(researcher.locator(".jp-OutputArea-output",
                                      has_text="joining the duet launched on this machine").first
                   ).to_be_visible(timeout=240_000)
            pending = owner.locator(".widget-vbox", has_text="class balance of the training set")
            expect(pending.last).to_be_visible(timeout=240_000)
            assert owner.get_by_text("Kernel status: Busy").count() > 0  # still busy: it updated
            assert owner.locator(".jp-OutputArea-output", has_text="owner cell done").count() == 0
            card = pending.last.inner_text()
            assert "y_train.float().mean()" in card and "sources" in card.lower()
            shot(owner, "2-owner-pending-request", focus="duet approval panel")
            (tmp_path / "release-owner").touch()

            expect(owner.locator(".jp-OutputArea-output", has_text="owner cell done").first
                   ).to_be_visible(timeout=120_000)  # idle again: clicks reach the kernel now
            for reason in ("class balance of the training set", "average of each measurement"):
                card = owner.locator(".widget-vbox", has_text=reason).last
                expect(card).to_be_visible(timeout=120_000)
                card.get_by_role("button", name="Approve").click()
            expect(researcher.locator(".jp-OutputArea-output",
                                      has_text=re.compile(r"of training patients are benign"))
                   .first).to_be_visible(timeout=120_000)
            expect(owner.locator(".widget-html", has_text="approved").first).to_be_visible()
            shot(owner, "3-owner-after-approval", focus="duet approval panel")
            shot(researcher, "4-researcher-value", focus="of training patients are benign")

            run_cells(researcher, 1, start_text="a few patients to sanity-check")
            deny_card = owner.locator(".widget-vbox", has_text="a few patients to sanity-check")
            expect(deny_card.last).to_be_visible(timeout=120_000)
            deny_card.last.get_by_placeholder("reason for denying").fill("no patient rows leave")
            deny_card.last.get_by_role("button", name="Deny").click()
            expect(researcher.locator(".jp-OutputArea-output",
                                      has_text="no patient rows leave").first).to_be_visible(
                timeout=120_000)
            shot(owner, "5-owner-after-deny", focus="duet approval panel")
            shot(researcher, "6-researcher-denied", focus="no patient rows leave")

            # the dark theme: the panel's text must stay light on the dark background
            owner.get_by_role("menuitem", name="Settings").click()
            owner.get_by_text("Theme", exact=True).hover()
            owner.get_by_text("JupyterLab Dark", exact=True).click()
            owner.wait_for_timeout(1500)
            header = owner.locator(".widget-html", has_text="duet approval panel").first
            colour = header.evaluate("e => getComputedStyle(e).color")
            assert brightness(colour) > 150, colour  # light text: readable on the dark theme
            shot(owner, "7-owner-dark-theme", focus="duet approval panel")
        browser.close()
    assert json.dumps(sorted(p.name for p in SHOTS.glob("*.png")))
