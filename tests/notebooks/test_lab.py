"""``make lab`` starts JupyterLab on 127.0.0.1 with the demo notebooks, behind a token."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.helpers.signaling import free_port

ROOT = Path(__file__).resolve().parents[2]


def test_make_lab_serves_the_notebooks_on_loopback_with_a_token() -> None:
    port = free_port()
    lab = subprocess.Popen(["make", "-s", "lab"], cwd=ROOT, env={**os.environ,
                           "DUET_LAB_PORT": str(port)}, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        assert lab.stdout is not None
        seen, url = [], None
        deadline = time.monotonic() + 90
        while url is None and time.monotonic() < deadline:
            line = lab.stdout.readline()
            assert line or lab.poll() is None, "".join(seen)
            seen.append(line)
            found = re.search(rf"http://127\.0\.0\.1:{port}/lab\?token=(\w+)", line)
            if found:
                url = found
        assert url is not None, "".join(seen)
        assert "owner.ipynb and researcher.ipynb side by side" in "".join(seen)
        token = url[1]
        api = f"http://127.0.0.1:{port}/api/contents"
        for _ in range(100):  # the banner can come a moment before the socket listens
            try:
                with urllib.request.urlopen(f"{api}?token={token}", timeout=10) as response:
                    names = {item["name"] for item in json.load(response)["content"]}
                break
            except urllib.error.URLError as exc:
                if isinstance(exc, urllib.error.HTTPError):
                    raise
                time.sleep(0.2)
        assert {"owner.ipynb", "researcher.ipynb"} <= names
        try:
            urllib.request.urlopen(api, timeout=10)  # no token: refused
            raise AssertionError("JupyterLab answered without its token")
        except urllib.error.HTTPError as exc:
            assert exc.code == 403
    finally:
        if lab.poll() is None:
            os.killpg(lab.pid, signal.SIGTERM)
            try:
                lab.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(lab.pid, signal.SIGKILL)
