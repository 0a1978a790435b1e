"""The owner's kernel side of the worker process: start it, feed it, watch it, stop it.

``WorkerProcess`` starts ``python -m duet.worker`` (a fresh interpreter: never a fork of a
kernel that has threads, and no re-import of the owner's ``__main__``), writes work to it from
a writer thread and reads its answers on a reader thread, so the session's network loop never
waits on the worker. Two sockets lead there: work (operations, requests, shares), read by the
worker's main thread itself, so a request wakes one thread, not a reader and then the main
thread; and control (release or drop a frozen value), read by a thread of its own, so an
approved value leaves while a long operation runs. The worker answers on the work socket. Its
settings are the first frame on it (a command line caps one argument at 128 KiB, which a
long allowlist would pass). A watchdog kills it when work is outstanding and nothing came
back for ``op_timeout`` seconds. However the process ends (crash, kill, timeout), ``WorkerHooks``
hears about it once, with the reason.

Shared arrays and tensors are copied once into sealed memory (``memfd`` with write, grow and
shrink seals): the worker maps them read-only, and no process can write to them any more.
"""

from __future__ import annotations

import fcntl
import logging
import os
import pickle
import queue
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from . import ipc, tables
from .errors import ProtocolError

__all__ = ["SealedArray", "SealedColumns", "WorkerHooks", "WorkerProcess", "WorkerSettings",
           "prepare_share"]

log = logging.getLogger(__name__)
_MAX_FROM_WORKER = 1 << 36  # 64 GiB: a frozen value larger than this is refused
_CONTROL = frozenset({"release", "drop"})  # served by the worker even while it computes


@dataclass(frozen=True)
class WorkerSettings:
    """How the owner bounds the worker (``launch(worker_memory=..., op_timeout=...)``)."""

    memory: int | None  # address-space limit in bytes; None: no limit
    op_timeout: float | None  # seconds without progress while work is outstanding
    memory_budget: int | None  # bytes the researcher's objects may hold (accounting)
    allowlist: dict[str, Any]
    torch: bool


class WorkerHooks(Protocol):
    """What the owner's session does with the worker's answers (reader thread)."""

    def worker_done(self, done: ipc.Done) -> None: ...
    def worker_snapshot(self, snapshot: ipc.Snapshot,
                        encoded: tuple[bytes, list[memoryview]] | None) -> None: ...
    def worker_request_failed(self, failed: ipc.RequestFailed) -> None: ...
    def worker_released(self, request_id: str, header: bytes,
                        buffers: list[memoryview]) -> None: ...
    def worker_reported_usage(self, usage: ipc.Usage) -> None: ...
    def worker_quiet(self) -> None:
        """Nothing more is waiting on the pipe right now (a moment to write what was held)."""
    def worker_exited(self, reason: str, crashed: bool) -> None: ...


class SealedArray:
    """An array's bytes in a sealed memory file that the worker maps read-only."""

    def __init__(self, array: np.ndarray, kind: str, torch_dtype: str | None) -> None:
        data = np.ascontiguousarray(array)
        self.fd = os.memfd_create("duet-shared", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        view = memoryview(data.reshape(-1).view(np.uint8).data)
        while view.nbytes:
            view = view[os.write(self.fd, view):]
        fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK
                    | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
        self.message = {"form": "memory", "kind": kind, "dtype": data.dtype.str,
                        "shape": list(data.shape), "nbytes": int(data.nbytes),
                        "torch_dtype": torch_dtype,
                        "path": f"/proc/{os.getpid()}/fd/{self.fd}"}

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class SealedColumns:
    """Several arrays (a table's numeric columns) in one sealed memory file, each at an
    aligned offset; the worker maps the file once, read-only."""

    _ALIGN = 64

    def __init__(self, columns: list[tuple[int, np.ndarray]]) -> None:
        self.fd = os.memfd_create("duet-table", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        described, offset = [], 0
        for position, array in columns:
            data = np.ascontiguousarray(array)
            offset += -offset % self._ALIGN
            os.lseek(self.fd, offset, os.SEEK_SET)
            view = memoryview(data.reshape(-1).view(np.uint8).data)
            while view.nbytes:
                view = view[os.write(self.fd, view):]
            described.append({"position": position, "dtype": data.dtype.str,
                              "length": int(data.shape[0]), "offset": offset})
            offset += int(data.nbytes)
        os.ftruncate(self.fd, offset)
        fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK
                    | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
        self.message = {"form": "table", "columns": described, "nbytes": offset,
                        "path": f"/proc/{os.getpid()}/fd/{self.fd}"}

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def prepare_share(
    obj: Any,
) -> tuple[dict[str, Any], list[bytes], SealedArray | SealedColumns | None]:
    """The share message for ``obj``: arrays and tensors as sealed memory, tables as sealed
    numeric columns plus a pickled rest, anything else pickled (the worker is the kernel's
    own child: this direction is trusted)."""
    if tables.is_table(obj):
        numeric, rest = tables.split(obj)
        sealed_columns = SealedColumns(numeric)
        return sealed_columns.message, [pickle.dumps(rest, pickle.HIGHEST_PROTOCOL)], (
            sealed_columns)
    torch = sys.modules.get("torch")
    if isinstance(obj, np.ndarray) and not obj.dtype.hasobject:
        sealed = SealedArray(obj, "numpy", None)
        return sealed.message, [], sealed
    if torch is not None and isinstance(obj, torch.Tensor) and obj.layout == torch.strided:
        tensor = obj.detach().cpu().resolve_conj()
        name = str(tensor.dtype).removeprefix("torch.")
        torch_dtype = None
        if name == "bfloat16":  # numpy cannot hold it: carry the bits as int16
            tensor, torch_dtype = tensor.contiguous().view(torch.int16), name
        sealed = SealedArray(tensor.numpy(), "torch", torch_dtype)
        return sealed.message, [], sealed
    return {"form": "pickle"}, [pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)], None


class _Pipe:
    """One socket to the worker and what is still queued for it, so frames keep their order
    on it whether ``submit`` or the writer thread writes them."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lock = threading.Lock()  # held while deciding who writes the next frame
        self.queued = 0  # frames handed to the writer thread and not yet written


class WorkerProcess:
    """One worker process; create a new one to restart."""

    def __init__(self, settings: WorkerSettings, hooks: WorkerHooks) -> None:
        self.settings = settings
        self._hooks = hooks
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        control, control_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._pipes = {"work": _Pipe(parent), "control": _Pipe(control)}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "duet.worker", str(child.fileno()),
             str(control_child.fileno())],
            pass_fds=(child.fileno(), control_child.fileno()), stdin=subprocess.DEVNULL,
            close_fds=True)
        child.close()
        control_child.close()
        self._outbox: queue.SimpleQueue[tuple[_Pipe, list[memoryview]] | None] = (
            queue.SimpleQueue())
        self._lock = threading.Lock()
        self._outstanding = 0  # units of work sent and not yet answered
        self._progress = time.monotonic()
        self._ready = False
        self._kill_reason: tuple[str, bool] | None = None
        self._exited = threading.Event()
        self.submit("settings", answered=False, memory=settings.memory,
                    memory_budget=settings.memory_budget, allowlist=settings.allowlist,
                    torch=settings.torch)
        for target, name in ((self._write, "writer"), (self._read, "reader"),
                             (self._watch, "watchdog")):
            threading.Thread(target=target, name=f"duet-worker-{name}", daemon=True).start()

    @property
    def alive(self) -> bool:
        return not self._exited.is_set()

    # -- sending (any thread) -------------------------------------------------------------------
    def submit(self, message_type: str, buffers: list[Any] | None = None, /, *,
               answered: bool = True, **fields: Any) -> None:
        """Send a message: written at once when nothing is queued on its socket and the
        socket takes it, else by the writer thread, in order. ``answered``: the worker
        replies with one done/snapshot message."""
        if answered:
            with self._lock:
                if self._outstanding == 0:
                    self._progress = time.monotonic()
                self._outstanding += 1
        pipe = self._pipes["control" if message_type in _CONTROL else "work"]
        parts = ipc.frame_parts(ipc.pack(message_type, **fields), buffers or [])
        with pipe.lock:
            if pipe.queued == 0:  # nothing ahead of it: write what the socket takes now,
                parts = ipc.send_without_waiting(pipe.sock, parts)  # never blocking
                if not parts:
                    return
            pipe.queued += 1  # the writer thread writes the rest, in order
            self._outbox.put((pipe, parts))

    def _write(self) -> None:
        """Writes what ``submit`` could not write at once (a full socket, a large frame),
        so that no caller, the session's loop least of all, ever waits for the worker."""
        while True:
            item = self._outbox.get()
            if item is None:
                return
            pipe, parts = item
            try:
                ipc.send_parts(pipe.sock, parts)
            except OSError:
                return  # the worker is gone; the reader reports why
            with pipe.lock:
                pipe.queued -= 1

    # -- receiving (reader thread) -------------------------------------------------------------
    def _read(self) -> None:
        why = "the worker closed its end"
        try:
            sock = self._pipes["work"].sock  # the worker answers on its work socket
            reader = ipc.FrameReader(sock, _MAX_FROM_WORKER)
            while (frame := reader.read()) is not None:
                header, buffers = frame
                self._dispatch(ipc.parse_worker_message(header), buffers)
                if not reader.pending and not select.select([sock], [], [], 0)[0]:
                    self._hooks.worker_quiet()
        except ProtocolError as exc:
            why = f"the worker sent a malformed message: {exc}"
            self.kill(why, crashed=True)
        except OSError as exc:
            why = f"the pipe to the worker broke: {exc}"
        except Exception as exc:  # noqa: BLE001 - a reader that stops would leave the session
            # waiting for answers forever: the worker goes instead, and the owner hears why
            log.exception("handling the worker's answer failed")
            why = f"handling the worker's answer failed ({type(exc).__name__}: {exc})"
            self.kill(why, crashed=True)
        self._finish(why)

    def _dispatch(self, message: ipc.WorkerMessage, buffers: list[memoryview]) -> None:
        if isinstance(message, ipc.Released):
            if not buffers:
                raise ProtocolError("a released value without its bytes")
            self._hooks.worker_released(message.request_id, bytes(buffers[0]), buffers[1:])
            return
        with self._lock:
            self._progress = time.monotonic()
            if isinstance(message, ipc.Ready):
                self._ready = True
                return
            self._outstanding = max(0, self._outstanding - 1)
        if isinstance(message, ipc.Done):
            self._hooks.worker_done(message)
        elif isinstance(message, ipc.Snapshot):
            encoded = None
            if message.inline:
                if not buffers:
                    raise ProtocolError("an inline snapshot without its bytes")
                encoded = (bytes(buffers[0]), buffers[1:])
            self._hooks.worker_snapshot(message, encoded)
        elif isinstance(message, ipc.RequestFailed):
            self._hooks.worker_request_failed(message)
        elif isinstance(message, ipc.Usage):
            self._hooks.worker_reported_usage(message)

    def _finish(self, why: str) -> None:
        self._outbox.put(None)
        try:
            code = self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        for pipe in self._pipes.values():
            pipe.sock.close()
        if self._kill_reason is not None:
            reason, crashed = self._kill_reason
        elif code < 0:
            reason, crashed = f"the worker died from signal {signal.Signals(-code).name}", True
        elif code != 0:
            reason, crashed = f"the worker exited with status {code}", True
        else:
            reason, crashed = why, True
        self._exited.set()
        self._hooks.worker_exited(reason, crashed)

    # -- the watchdog and stopping ---------------------------------------------------------
    def _watch(self) -> None:
        timeout = self.settings.op_timeout
        while not self._exited.wait(0.1):
            if timeout is None:
                continue
            with self._lock:
                stuck = (self._ready and self._outstanding > 0
                         and time.monotonic() - self._progress > timeout)
            if stuck:
                self.kill(f"an operation ran longer than the owner's limit of {timeout:g} s",
                          crashed=True)

    def kill(self, reason: str, *, crashed: bool) -> None:
        """Stop the worker at once (SIGKILL); ``worker_exited`` follows with ``reason``."""
        if self._kill_reason is None:
            self._kill_reason = (reason, crashed)
        if self.process.poll() is None:
            try:
                self.process.kill()
            except ProcessLookupError:
                pass

    def wait_exited(self, timeout: float | None = None) -> bool:
        return self._exited.wait(timeout)
