"""Shared helpers for the peer benchmarks (``bench/transport.py``, ``bench/ops.py``).

* a ``duet-signaling`` subprocess on 127.0.0.1 (``signaling_server()``);
* ``Peer``: an object living in its own OS process (multiprocessing, spawn), driven by
  synchronous calls over a pipe, so owner and researcher never share an interpreter;
* ``RssSampler``: peak resident memory of the current process, sampled in a thread;
* ``BareRtcPeer``: a bare aiortc data channel (the baseline), with loopback-only ICE and
  the SDP exchanged through the parent process (no signaling server);
* ``TcpPeer``: a plain asyncio TCP socket on 127.0.0.1 (the other baseline).

Nothing here imports ``tests/``; nothing here asserts a target: benches only report.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import multiprocessing
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
import traceback
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

MiB = 1024 * 1024
KiB = 1024


# -- small utilities ----------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """User and system CPU seconds each process has used so far (all its threads)."""
    return {name: sum(psutil.Process(pid).cpu_times()[:2]) for name, pid in pids.items()}


def summary_ms(samples_s: Sequence[float]) -> dict[str, float]:
    """Median / p99 / mean / min / max of durations given in seconds, reported in ms."""
    values = sorted(samples_s)
    if not values:
        return {}
    p99 = values[min(len(values) - 1, int(round(0.99 * (len(values) - 1))))]
    return {
        "n": len(values),
        "median_ms": round(statistics.median(values) * 1e3, 3),
        "p99_ms": round(p99 * 1e3, 3),
        "mean_ms": round(statistics.fmean(values) * 1e3, 3),
        "min_ms": round(values[0] * 1e3, 3),
        "max_ms": round(values[-1] * 1e3, 3),
    }


def sha256(buffer: Any) -> str:
    return hashlib.sha256(memoryview(buffer).cast("B")).hexdigest()


def payload(nbytes: int, seed: int = 0) -> Any:
    """``nbytes`` of pseudo-random float32 as a numpy array (not compressible, not zeros)."""
    import numpy as np

    return np.random.default_rng(seed).random(nbytes // 4, dtype=np.float32)


def patients_table(rows: int = 100_000, seed: int = 0) -> Any:
    """A clinical-looking table: ints, floats, strings, a categorical, a string index."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    age = rng.integers(18, 90, rows)
    bmi = rng.normal(26, 4, rows).round(1)
    return pd.DataFrame({
        "age": age, "bmi": bmi, "bp": rng.normal(90, 12, rows).round(0),
        "sex": rng.choice(["F", "M"], rows),
        "group": pd.Categorical(rng.choice(["control", "treated", "placebo"], rows)),
        "outcome": ((age / 90 + bmi / 40 + rng.normal(0, 0.3, rows)) > 1.3).astype(int),
    }, index=pd.Index([f"P{i:06d}" for i in range(rows)], name="patient_id"))


def udp_rcvbuf_errors() -> int:
    """Datagrams the kernel dropped because a UDP socket's receive buffer was full.

    System-wide (this network namespace): loopback SCTP-over-DTLS-over-UDP loses packets
    this way when the receiver falls behind, and aiortc then retransmits.
    """
    try:
        with open("/proc/net/snmp") as f:
            lines = [line.split() for line in f if line.startswith("Udp:")]
        return int(lines[1][lines[0].index("RcvbufErrors")])
    except (OSError, ValueError, IndexError):
        return -1


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 1024**3, 1),
    }


def emit(result: dict[str, Any]) -> None:
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    sys.stdout.flush()


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- signaling server subprocess ------------------------------------------------------------
@contextmanager
def signaling_server() -> Iterator[str]:
    """``duet-signaling`` on a free port of 127.0.0.1 for the duration; yields its URL."""
    port = free_port()
    command = [str(Path(sys.executable).with_name("duet-signaling")),
               "--host", "127.0.0.1", "--port", str(port), "--log-level", "WARNING"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the signaling server did not come up") from None
                time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# -- an object in another process ---------------------------------------------------------
def _serve(factory: Callable[..., Any], args: tuple[Any, ...], conn: Any) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        obj = factory(*args)
    except BaseException:
        conn.send(("err", traceback.format_exc()))
        return
    conn.send(("ok", os.getpid()))
    while True:
        try:
            message = conn.recv()
        except EOFError:
            break
        if message is None:
            break
        name, call_args, call_kwargs = message
        try:
            conn.send(("ok", getattr(obj, name)(*call_args, **call_kwargs)))
        except BaseException:
            conn.send(("err", traceback.format_exc()))
    close = getattr(obj, "close", None)
    if close is not None:
        try:
            close()
        except Exception:
            pass
    conn.close()


class PeerError(RuntimeError):
    pass


class Peer:
    """``factory(*args)`` constructed in a fresh (spawned) process; call its methods by name."""

    def __init__(self, name: str, factory: Callable[..., Any], *args: Any) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.name = name
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(factory, args, child), name=name,
                                   daemon=True)
        self.process.start()
        child.close()
        self.pid = self._result(120)

    def _result(self, timeout: float | None) -> Any:
        if not self._conn.poll(timeout):
            raise PeerError(f"{self.name}: no answer within {timeout} s")
        status, value = self._conn.recv()
        if status == "err":
            raise PeerError(f"{self.name} failed:\n{value}")
        return value

    def send(self, name: str, *args: Any, **kwargs: Any) -> None:
        """Start a call without waiting for it (collect with ``result``)."""
        self._conn.send((name, args, kwargs))

    def result(self, timeout: float | None = 600) -> Any:
        return self._result(timeout)

    def call(self, name: str, *args: Any, timeout: float | None = 600, **kwargs: Any) -> Any:
        self.send(name, *args, **kwargs)
        return self._result(timeout)

    def close(self, timeout: float = 20) -> None:
        try:
            self._conn.send(None)
        except (OSError, BrokenPipeError):
            pass
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)


@contextmanager
def peers(*specs: tuple[str, Callable[..., Any], tuple[Any, ...]]) -> Iterator[list[Peer]]:
    started: list[Peer] = []
    try:
        for name, factory, args in specs:
            started.append(Peer(name, factory, *args))
        yield started
    finally:
        for peer in started:
            peer.close()


# -- memory -------------------------------------------------------------------------------
class RssSampler:
    """Peak RSS of this process, sampled every ``interval`` seconds in a daemon thread."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.baseline = 0
        self.peak = 0

    def start(self) -> None:
        import gc

        gc.collect()
        self.baseline = self.peak = self._process.memory_info().rss
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            self._stop.wait(self.interval)

    def stop(self, payload_bytes: int) -> dict[str, Any]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)
        extra = self.peak - self.baseline
        return {
            "baseline_mib": round(self.baseline / MiB, 1),
            "peak_mib": round(self.peak / MiB, 1),
            "peak_extra_mib": round(extra / MiB, 1),
            "peak_extra_x_payload": round(extra / payload_bytes, 3),
        }


class LoopThread:
    """An asyncio loop in a daemon thread; ``run(coro)`` from the calling thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Any, timeout: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


# -- baseline (a): a bare aiortc data channel ------------------------------------------
def _loopback_ice_only() -> None:
    """As duet's loopback mode: 127.0.0.1 is the only host candidate (aioice omits it)."""
    import aioice.ice

    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"]


class BareRtcPeer:
    """One end of a bare aiortc data channel. The "sender" offers and holds the payloads.

    Protocol on the channel (text messages are control, binary are data):
    ``go <nbytes> <chunk> <high_water>`` (receiver -> sender), then the sender streams the
    payload in ``chunk``-byte binary messages, pausing while ``bufferedAmount > high_water``
    and resuming on ``bufferedamountlow`` (threshold ``high_water // 2``);
    ``ping``/``pong`` for round trips.
    """

    def __init__(self, role: str) -> None:
        _loopback_ice_only()
        self.role = role
        self.lt = LoopThread()
        self.pc: Any = None
        self.channel: Any = None
        self.payloads: dict[int, Any] = {}
        self.rss = RssSampler()
        self._opened_at = 0.0
        self._t0 = 0.0

    # signaling (SDP through the parent process)
    def offer(self) -> str:
        async def go() -> str:
            from aiortc import RTCPeerConnection

            self._t0 = time.perf_counter()
            self.pc = RTCPeerConnection()
            self.channel = self.pc.createDataChannel("bench", ordered=True)
            self._wire(self.channel)
            await self.pc.setLocalDescription(await self.pc.createOffer())
            return str(self.pc.localDescription.sdp)

        return str(self.lt.run(go(), 30))

    def answer(self, sdp: str) -> str:
        async def go() -> str:
            from aiortc import RTCPeerConnection, RTCSessionDescription

            self._t0 = time.perf_counter()
            self.pc = RTCPeerConnection()
            self._got_channel = asyncio.Event()

            @self.pc.on("datachannel")
            def on_channel(channel: Any) -> None:
                self.channel = channel
                self._wire(channel)
                self._got_channel.set()

            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            await self.pc.setLocalDescription(await self.pc.createAnswer())
            return str(self.pc.localDescription.sdp)

        return str(self.lt.run(go(), 30))

    def accept(self, sdp: str) -> None:
        async def go() -> None:
            from aiortc import RTCSessionDescription

            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))

        self.lt.run(go(), 30)

    def wait_open(self, timeout: float = 30) -> float:
        """Seconds from offer/answer creation to the channel open on this side."""

        async def go() -> float:
            if self.role == "receiver":
                await asyncio.wait_for(self._got_channel.wait(), timeout)
            if self.channel.readyState != "open":
                opened = asyncio.Event()
                self.channel.on("open", opened.set)
                if self.channel.readyState != "open":
                    await asyncio.wait_for(opened.wait(), timeout)
            return time.perf_counter() - self._t0

        return float(self.lt.run(go(), timeout + 5))

    def _wire(self, channel: Any) -> None:
        self._low = asyncio.Event()
        self._low.set()
        self._rx: Any = None
        self._rx_done: asyncio.Future[float] | None = None
        self._pong: asyncio.Future[float] | None = None
        channel.on("bufferedamountlow", self._low.set)
        channel.on("message", self._on_message)

    def _on_message(self, data: Any) -> None:
        if isinstance(data, str):
            if data.startswith("go "):
                _, n, chunk, high = data.split()
                asyncio.ensure_future(self._stream(int(n), int(chunk), int(high)))
            elif data == "ping":
                self.channel.send("pong")
            elif data == "pong" and self._pong is not None and not self._pong.done():
                self._pong.set_result(time.perf_counter())
            return
        buf, filled = self._rx
        buf[filled : filled + len(data)] = data
        filled += len(data)
        self._rx = (buf, filled)
        if filled >= len(buf) and self._rx_done is not None and not self._rx_done.done():
            self._rx_done.set_result(time.perf_counter())

    async def _stream(self, nbytes: int, chunk: int, high: int) -> None:
        data = memoryview(self.payloads[nbytes]).cast("B")
        channel = self.channel
        channel.bufferedAmountLowThreshold = high // 2
        for offset in range(0, nbytes, chunk):
            while channel.bufferedAmount > high:
                self._low.clear()
                await self._low.wait()
            channel.send(bytes(data[offset : offset + chunk]))

    # sender side
    def prepare(self, nbytes: int) -> str:
        self.payloads.clear()
        self.payloads[nbytes] = payload(nbytes)
        return sha256(self.payloads[nbytes])

    # receiver side
    def transfer(self, nbytes: int, chunk: int, high_water: int,
                 measure_rss: bool = False) -> dict[str, Any]:
        """Ask the sender for ``nbytes``; seconds from the request to the last byte here."""
        self._rx = None
        import gc

        gc.collect()
        if measure_rss:
            self.rss.start()

        async def go() -> float:
            self._rx = (bytearray(nbytes), 0)
            self._rx_done = asyncio.get_running_loop().create_future()
            start = time.perf_counter()
            self.channel.send(f"go {nbytes} {chunk} {high_water}")
            end = await self._rx_done
            return end - start

        drops = udp_rcvbuf_errors()
        seconds = float(self.lt.run(go(), 900))
        result: dict[str, Any] = {"seconds": seconds, "sha256": sha256(self._rx[0]),
                                  "udp_drops": udp_rcvbuf_errors() - drops}
        if measure_rss:
            result["rss"] = self.rss.stop(nbytes)
        self._rx = None
        return result

    def rss_start(self) -> None:
        self.rss.start()

    def rss_stop(self, nbytes: int) -> dict[str, Any]:
        return self.rss.stop(nbytes)

    def udp_buffers(self, size: int) -> list[int]:
        async def go() -> list[int]:
            return set_udp_buffers(self.pc, size)

        return list(self.lt.run(go(), 10))

    def ping(self, n: int) -> list[float]:
        async def go() -> list[float]:
            samples = []
            for _ in range(n):
                self._pong = asyncio.get_running_loop().create_future()
                start = time.perf_counter()
                self.channel.send("ping")
                samples.append(await self._pong - start)
            return samples

        return list(self.lt.run(go(), 300))

    def close(self) -> None:
        if self.pc is not None:
            try:
                self.lt.run(self.pc.close(), 10)
            except Exception:
                pass
        self.lt.stop()


def bare_rtc_pair() -> Any:
    """Context manager: (sender, receiver) Peers with an open bare data channel, and setup s."""

    @contextmanager
    def pair() -> Iterator[tuple[Peer, Peer, dict[str, float]]]:
        with peers(("bare-sender", BareRtcPeer, ("sender",)),
                   ("bare-receiver", BareRtcPeer, ("receiver",))) as (sender, receiver):
            start = time.perf_counter()
            offer = sender.call("offer")
            answer = receiver.call("answer", offer)
            sender.call("accept", answer)
            receiver.send("wait_open")
            sender_open = sender.call("wait_open")
            receiver_open = receiver.result(60)
            setup = {"offer_to_open_s": round(sender_open, 4),
                     "receiver_open_s": round(receiver_open, 4),
                     "wall_s_incl_ipc": round(time.perf_counter() - start, 4)}
            yield sender, receiver, setup

    return pair()


# -- baseline (b): plain asyncio TCP on loopback ----------------------------------------
class _Receive(asyncio.BufferedProtocol):
    def __init__(self, owner: TcpPeer) -> None:
        self.owner = owner

    def connection_made(self, transport: Any) -> None:
        self.owner._transport = transport
        self.owner._connected.set()

    def get_buffer(self, sizehint: int) -> memoryview:
        buf, filled = self.owner._rx
        return buf[filled:] if filled < len(buf) else memoryview(bytearray(65536))

    def buffer_updated(self, nbytes: int) -> None:
        buf, filled = self.owner._rx
        filled += nbytes
        self.owner._rx = (buf, filled)
        done = self.owner._rx_done
        if filled >= len(buf) and done is not None and not done.done():
            done.set_result(time.perf_counter())


class TcpPeer:
    """Receiver listens on 127.0.0.1; sender connects and streams on ``go <nbytes>``."""

    def __init__(self, role: str) -> None:
        self.role = role
        self.lt = LoopThread()
        self.payloads: dict[int, Any] = {}
        self._rx: Any = (memoryview(bytearray(0)), 0)
        self._rx_done: asyncio.Future[float] | None = None
        self._connected: asyncio.Event | None = None
        self._transport: Any = None
        self.rss = RssSampler()

    def listen(self) -> int:
        async def go() -> int:
            self._connected = asyncio.Event()
            self._server = await asyncio.get_running_loop().create_server(
                lambda: _Receive(self), "127.0.0.1", 0)
            return int(self._server.sockets[0].getsockname()[1])

        return int(self.lt.run(go(), 10))

    def connect(self, port: int) -> None:
        async def go() -> None:
            self._reader, self._writer = await asyncio.open_connection("127.0.0.1", port)
            self._task = asyncio.ensure_future(self._serve())

        self.lt.run(go(), 10)

    async def _serve(self) -> None:
        while True:
            line = await self._reader.readline()
            if not line:
                return
            nbytes = int(line.split()[1])
            data = memoryview(self.payloads[nbytes]).cast("B")
            for offset in range(0, nbytes, MiB):
                self._writer.write(data[offset : offset + MiB])
                await self._writer.drain()

    def prepare(self, nbytes: int) -> str:
        self.payloads.clear()
        self.payloads[nbytes] = payload(nbytes)
        return sha256(self.payloads[nbytes])

    def transfer(self, nbytes: int, measure_rss: bool = False) -> dict[str, Any]:
        import gc

        gc.collect()
        if measure_rss:
            self.rss.start()

        async def go() -> float:
            assert self._connected is not None
            await self._connected.wait()
            self._rx = (memoryview(bytearray(nbytes)), 0)
            self._rx_done = asyncio.get_running_loop().create_future()
            start = time.perf_counter()
            self._transport.write(f"go {nbytes}\n".encode())
            return await self._rx_done - start

        seconds = float(self.lt.run(go(), 300))
        result: dict[str, Any] = {"seconds": seconds, "sha256": sha256(self._rx[0])}
        if measure_rss:
            result["rss"] = self.rss.stop(nbytes)
        self._rx = (memoryview(bytearray(0)), 0)
        return result

    def close(self) -> None:
        async def go() -> None:
            task = getattr(self, "_task", None)
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            writer = getattr(self, "_writer", None)
            if writer is not None:
                writer.close()
            if self._transport is not None:
                self._transport.close()

        try:
            self.lt.run(go(), 5)
        except Exception:
            pass
        self.lt.stop()


# -- duet's two ends ------------------------------------------------------------------------
class DuetOwner:
    """The data owner, in its own process: launches, shares, auto-approves every request."""

    def __init__(self, server: str, options: dict[str, Any]) -> None:
        import torch  # noqa: F401

        import duet  # noqa: F401  (import cost paid before any timing)

        self.server = server
        self.options = {"progress": False, **options}
        self.session: Any = None
        self.rss = RssSampler()
        self._t0 = 0.0
        self._ready_at: float | None = None
        self._ready = threading.Event()

    def launch(self) -> str:
        import tempfile

        import duet

        # A throwaway audit log: benchmarks must not fill the user's real one.
        self._audit_dir = tempfile.TemporaryDirectory(prefix="duet-bench-")
        audit_path = Path(self._audit_dir.name) / "audit.sqlite3"
        self._t0 = time.perf_counter()
        self.session = duet.launch(server=self.server, ice_servers=[], show=False,
                                   audit_path=audit_path, **self.options)
        self.session.requests.add_rule("approve")

        def wait() -> None:
            if self.session.wait_for_peer(60):
                self._ready_at = time.perf_counter()
            self._ready.set()

        threading.Thread(target=wait, daemon=True).start()
        return str(self.session.code)

    def worker_pid(self) -> int:
        return int(self.session.worker_pid)

    def setup_seconds(self) -> float:
        self._ready.wait(90)
        if self._ready_at is None:
            raise RuntimeError("the researcher never connected")
        return self._ready_at - self._t0

    def share_payload(self, name: str, nbytes: int) -> str:
        import torch

        array = payload(nbytes)
        self.session.share(torch.from_numpy(array), name)
        return sha256(array)

    def share(self, name: str, kind: str) -> None:
        import torch

        if kind == "small":
            value: Any = torch.zeros(16)
        elif kind == "mlp_X":
            value = torch.from_numpy(payload(256 * 20 * 4, seed=1).reshape(256, 20)) - 0.5
        elif kind == "mlp_y":
            X = torch.from_numpy(payload(256 * 20 * 4, seed=1).reshape(256, 20)) - 0.5
            value = (X[:, 0] + X[:, 1] > 0).long()
        elif kind == "patients":
            value = patients_table()
        else:
            raise ValueError(kind)
        self.session.share(value, name)

    def unshare(self, name: str) -> None:
        self.session.unshare(name)

    def audit_probe(self, n: int = 100) -> dict[str, float]:
        """Latency of one durable audit record (fsync'd SQLite insert) on this disk, now."""
        from duet.audit import AuditLog

        probe = AuditLog(Path(self._audit_dir.name) / "probe.sqlite3")
        samples = []
        try:
            for i in range(n):
                start = time.perf_counter()
                probe.record("op_executed", session="probe", operation="operator.add",
                             lineage="(x + 1)", pointer_id=i)
                samples.append(time.perf_counter() - start)
        finally:
            probe.close()
        return summary_ms(samples)

    def rss_start(self) -> None:
        self.rss.start()

    def rss_stop(self, nbytes: int) -> dict[str, Any]:
        return self.rss.stop(nbytes)

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None


class DuetResearcher:
    """The researcher, in its own process."""

    def __init__(self, server: str, options: dict[str, Any]) -> None:
        import torch  # noqa: F401

        import duet  # noqa: F401

        self.server = server
        self.options = {"progress": False, **options}
        self.r: Any = None
        self.rss = RssSampler()

    def join(self, code: str) -> float:
        import duet

        start = time.perf_counter()
        self.r = duet.join(code, server=self.server, ice_servers=[], **self.options)
        return time.perf_counter() - start

    def wait_store(self, names: Sequence[str], timeout: float = 30) -> None:
        """Until the owner's shares reached this side (the store updates asynchronously)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                for name in names:
                    self.r.store[name]
                return
            except KeyError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.005)

    def get(self, name: str, nbytes: int, measure_rss: bool = False) -> dict[str, Any]:
        import gc

        gc.collect()
        self.wait_store([name])
        pointer = self.r.store[name]
        if measure_rss:
            self.rss.start()
        drops = udp_rcvbuf_errors()
        start = time.perf_counter()
        value = pointer.get("benchmark", timeout=600)
        seconds = time.perf_counter() - start
        result: dict[str, Any] = {"seconds": seconds, "udp_drops": udp_rcvbuf_errors() - drops}
        if measure_rss:
            result["rss"] = self.rss.stop(nbytes)
        array = value.numpy() if hasattr(value, "numpy") else value
        result["sha256"] = sha256(array)
        result["type"] = type(value).__module__ + "." + type(value).__name__
        result["nbytes"] = int(array.nbytes)
        del value, array
        return result

    def ping(self, n: int, warmup: int = 20) -> list[float]:
        for _ in range(warmup):
            self.r.ping()
        return [self.r.ping() for _ in range(n)]

    def close(self) -> None:
        if self.r is not None:
            self.r.close()
            self.r = None


@contextmanager
def duet_pair(
    server: str, options: dict[str, Any], researcher_class: Any = DuetResearcher,
    owner_class: Any = DuetOwner,
) -> Iterator[tuple[Peer, Peer, dict[str, float]]]:
    """Owner and researcher in two fresh processes, connected; yields them and setup times."""
    with peers(("duet-owner", owner_class, (server, options)),
               ("duet-researcher", researcher_class, (server, options))) as (owner, researcher):
        code = owner.call("launch")
        join_s = researcher.call("join", code, timeout=120)
        setup = {"launch_to_connected_s": round(owner.call("setup_seconds"), 4),
                 "join_s": round(join_s, 4)}
        yield owner, researcher, setup


def set_udp_buffers(pc: Any, size: int) -> list[int]:
    """Raise SO_RCVBUF/SO_SNDBUF of a peer connection's ICE sockets (capped by rmem_max).

    An experiment, not something duet does: returns the receive sizes the kernel granted.
    """
    granted = []
    ice = pc.sctp.transport.transport  # RTCDtlsTransport -> RTCIceTransport
    for protocol in getattr(ice._connection, "_protocols", []):
        sock = protocol.transport.get_extra_info("socket")
        if sock is None:
            continue
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
        granted.append(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))
    return granted
