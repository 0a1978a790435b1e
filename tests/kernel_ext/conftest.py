"""Real ipykernel kernels driven over ZMQ with jupyter_client, as a notebook frontend does.

``Kernel`` keeps every IOPub message it reads, so a test can look for messages the kernel
sent while idle (widget updates from the session's threads) as well as the outputs of the
cells it executed. Kernels run this venv's interpreter: the ``python3`` kernelspec says
``python``, which jupyter_client replaces with ``sys.executable``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty
from typing import Any

import pytest
from jupyter_client.manager import KernelManager

from tests.helpers.signaling import start_signaling_server

REPO = Path(__file__).resolve().parents[2]
Message = dict[str, Any]


@dataclass
class Execution:
    """What one executed cell produced."""

    status: str
    stdout: str = ""
    stderr: str = ""
    data: list[dict[str, Any]] = field(default_factory=list)  # display/execute_result bundles
    error: str = ""  # "EName: evalue" of an error, if any

    def mime(self, mimetype: str) -> list[Any]:
        return [bundle[mimetype] for bundle in self.data if mimetype in bundle]

    @property
    def text(self) -> str:
        """Everything a person would read in the output area."""
        plain = "\n".join(str(t) for t in self.mime("text/plain") + self.mime("text/html"))
        return "\n".join([self.stdout, self.stderr, plain, self.error])


class Kernel:
    """One ipykernel process and a blocking client of it."""

    def __init__(self, env: dict[str, str]) -> None:
        self.manager = KernelManager(kernel_name="python3")
        self.manager.start_kernel(env={**os.environ, **env}, cwd=str(REPO))
        self.client = self.manager.client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=60)
        self.iopub: list[Message] = []
        self._replies: dict[str, Message] = {}

    def start(self, code: str) -> str:
        """Send a cell without waiting for it (a frontend can do this while it runs)."""
        msg_id: str = self.client.execute(code, store_history=False)
        return msg_id

    def _pump(self, timeout: float) -> None:
        try:
            self.iopub.append(self.client.get_iopub_msg(timeout=timeout))
        except Empty:
            pass

    def finished(self, msg_id: str) -> bool:
        """Whether the cell ``msg_id`` finished (reads what has arrived so far)."""
        while True:
            try:
                self.iopub.append(self.client.get_iopub_msg(timeout=0.05))
            except Empty:
                break
        return any(_is_idle_for(m, msg_id) for m in self.iopub)

    def wait(self, msg_id: str, timeout: float = 120) -> Execution:
        deadline = time.monotonic() + timeout
        while not any(_is_idle_for(m, msg_id) for m in self.iopub):
            if time.monotonic() > deadline:
                raise TimeoutError(f"cell {msg_id} did not finish within {timeout} s")
            self._pump(0.2)
        reply = self._reply(msg_id, deadline)
        result = Execution(status=reply["content"]["status"])
        for message in self.iopub:
            if message["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = message["msg_type"], message["content"]
            if kind == "stream":
                if content["name"] == "stdout":
                    result.stdout += content["text"]
                else:
                    result.stderr += content["text"]
            elif kind in ("display_data", "execute_result"):
                result.data.append(content["data"])
            elif kind == "error":
                result.error = f"{content['ename']}: {content['evalue']}"
        return result

    def _reply(self, msg_id: str, deadline: float) -> Message:
        while msg_id not in self._replies:
            remaining = max(deadline - time.monotonic(), 0.1)
            reply = self.client.get_shell_msg(timeout=remaining)
            self._replies[reply["parent_header"].get("msg_id")] = reply
        return self._replies.pop(msg_id)

    def run(self, code: str, timeout: float = 120, *, ok: bool = True) -> Execution:
        """Execute a cell and wait; fail the test if it raised, unless ``ok=False``."""
        result = self.wait(self.start(code), timeout)
        if ok:
            assert result.status == "ok", f"cell failed: {result.error}\n{result.text}\n{code}"
        return result

    def value(self, expression: str, timeout: float = 120) -> Any:
        """The JSON value of a Python expression evaluated in the kernel."""
        out = self.run(f"import json as _j; print(_j.dumps({expression}))", timeout).stdout
        return json.loads(out.strip().splitlines()[-1])

    def eventually(self, condition: str, timeout: float) -> bool:
        """Whether ``condition`` holds in the kernel within ``timeout`` seconds (polled there)."""
        self.run(f"import time as _t\n_end = _t.monotonic() + {timeout}\n"
                 f"while not ({condition}) and _t.monotonic() < _end:\n    _t.sleep(0.1)")
        return bool(self.value(f"bool({condition})"))

    def wait_iopub(self, predicate: Callable[[Message], bool], timeout: float = 60) -> Message:
        """The first IOPub message (already read or arriving) matching ``predicate``."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for message in self.iopub[seen:]:
                if predicate(message):
                    return message
            seen = len(self.iopub)
            if time.monotonic() > deadline:
                raise TimeoutError("no matching IOPub message")
            self._pump(0.2)

    def send_comm(self, comm_id: str, data: dict[str, Any]) -> None:
        """What a frontend sends when the person clicks or types in a widget."""
        message = self.client.session.msg("comm_msg", {"comm_id": comm_id, "data": data})
        self.client.shell_channel.send(message)

    def shutdown(self) -> None:
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=True)


def _is_idle_for(message: Message, msg_id: str) -> bool:
    return (message["msg_type"] == "status"
            and message["content"]["execution_state"] == "idle"
            and message["parent_header"].get("msg_id") == msg_id)


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    with start_signaling_server() as url:
        yield url


@pytest.fixture
def start_kernel(server_url: str, tmp_path: Path) -> Iterator[Callable[[], Kernel]]:
    """Start kernels with the extension loaded, pointed at the test server; shut them down."""
    kernels: list[Kernel] = []

    def start() -> Kernel:
        kernel = Kernel({"DUET_SIGNALING_URL": server_url,
                         "DUET_AUDIT_PATH": str(tmp_path / f"audit{len(kernels)}.sqlite3")})
        kernels.append(kernel)
        assert kernel.value("__import__('sys').executable") == sys.executable
        kernel.run("%load_ext kernel_ext")
        return kernel

    yield start
    for kernel in kernels:
        kernel.shutdown()
