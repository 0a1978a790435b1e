"""Class 5: the owner's process survives anything the researcher sends.

Hostile frames (deeply nested extension types, array headers whose shape overflows, a
stream that claims exabytes, operation batches past the limits), a flood of the largest
batches the owner accepts, an allocation larger than the machine, endless operations the
owner cancels, a segfaulting operation, 10,000 queued requests, and crashes past the
owner's restart limit. The owner's kernel and session stay up throughout."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.duet.hostile.peerkit import script
from tests.helpers.peers import owner_and_researcher

OWNER = script('''
import threading
import torch
from tests.duet.hostile.peerkit import launch, serve, flag, flagged
s = launch(max_worker_restarts=2)
emit("code", s.code)
s.share(np.array([7.25, 8.5, 9.75, 11.0, 12.5]), name="x")
s.share(torch.arange(12.0).reshape(4, 3), name="W")
assert s.wait_for_peer(60)
cancels = []

def owner_side():
    for name in ("endless-numpy", "endless-torch"):
        while not flagged(name):
            time.sleep(0.02)
        time.sleep(0.5)                    # the worker is deep inside the operation now
        started = time.monotonic()
        s.cancel()
        cancels.append(time.monotonic() - started)
        flag(name + "-cancelled")
    while not flagged("flood-sent"):
        time.sleep(0.05)
    started = time.monotonic()
    while sum(r.reason.startswith("flood") for r in list(s.requests)) < 10_000:
        time.sleep(0.05)
    emit("flood_seen_s", time.monotonic() - started)
    flag("flood-seen")
    s.requests.add_rule("deny", predicate=lambda q: q.reason.startswith("flood"),
                        reason="enough")
    flag("flood-denied")

threading.Thread(target=owner_side, daemon=True).start()
requests = serve(s, timeout=900)
emit("cancel_s", cancels)
emit("protocol_errors", len(s.audit.events(event="protocol_error")))
restarts = s.audit.events(event="worker_restarted")
emit("restarts", [[e.detail.get("crashed"), e.detail.get("reason", "")] for e in restarts])
emit("worker_pid", s.worker_pid)
emit("requests", len(s.requests))
emit("connected", s.connected)
''')

RESEARCHER = script('''
import struct
import msgpack
from tests.duet.hostile.peerkit import join, flag, flagged, outcome
from tests.helpers.rawwire import send_header, send_frame, new_id
r = join()
out = {}

def wait(name):
    while not flagged(name):
        time.sleep(0.02)

def ops_header(args):
    return msgpack.packb({"type": "ops", "ops": [
        {"result": new_id(r), "kind": "function", "name": "numpy.sum", "args": args}]},
        use_bin_type=True)

# 1. hostile frames
nested = msgpack.packb(None)
for _ in range(600):                                      # ~1.8 KB of nested tuples
    nested = msgpack.packb(msgpack.ExtType(3, nested))
send_header(r, ops_header([msgpack.ExtType(3, nested)]))
deep = b"\\x91" * 100_000 + b"\\xc0"                       # 100,000 nested msgpack arrays
send_header(r, ops_header([msgpack.ExtType(3, deep)]))
for shape in ([2**40, 2**40, 2**40], [2**63 - 1, 2], [-1, 8], [1] * 65):
    header = msgpack.ExtType(8, msgpack.packb(["numpy", "float64", shape, 0]))
    send_header(r, ops_header([header]), [b"\\0" * 8])
for dtype in ("object", "V8", "O"):
    header = msgpack.ExtType(8, msgpack.packb(["numpy", dtype, [1], 0]))
    send_header(r, ops_header([header]), [b"\\0" * 8])
send_frame(r, struct.pack("!BIIH", 2, 99, 10, 2) + struct.pack("!QQ", 2**62, 2**62))
send_frame(r, struct.pack("!BIIH", 2, 98, 2**31, 0))     # a 2 GiB header
send_frame(r, struct.pack("!BIHQQ", 4, 2, 2, 2**62, 2**62) + b"hh")  # one frame, exabytes
send_frame(r, struct.pack("!BIH", 4, 2**31, 0) + b"h")   # one frame with a 2 GiB header
send_frame(r, struct.pack("!BIH", 4, 0, 65535))          # 65,535 buffers announced, none sent
send_header(r, ops_header([msgpack.ExtType(1, msgpack.packb(2**64 - 1))]))
# a flood of operation batches: the owner checks them, its loop must keep answering
import threading
flood_pings = []
flooding = threading.Event()

def ping_meanwhile():
    while not flooding.is_set():
        try:
            flood_pings.append(r.ping(timeout=60))
        except duet.DuetError as exc:
            flood_pings.append(repr(exc))
            return
        time.sleep(0.05)

pinger = threading.Thread(target=ping_meanwhile)
pinger.start()

def op_batch(size, args):
    first = new_id(r)
    for _ in range(size - 1):
        new_id(r)
    return msgpack.packb({"type": "ops", "ops": [
        {"result": first + i, "kind": "function", "name": "operator.add", "args": args(i)}
        for i in range(size)]}, use_bin_type=True)

# over the limits, each refused before the kernel walks it: 60,000 ops (3 MB), and 4,096
# ops holding a million nested lists (1.2 MB), a walk of seconds in the owner's loop
send_header(r, op_batch(60_000, lambda i: [i, 1]))
send_header(r, op_batch(duet.protocol.MAX_OPS, lambda i: [[[[[1]]]] * 60, 1]))
for _ in range(118):  # 483,000 operations in the largest batches the owner accepts
    send_header(r, op_batch(duet.protocol.MAX_OPS, lambda i: [i, 1]))
x = r.store["x"]
out["after op flood"] = outcome(lambda: r.np.sum(x).get("after op flood", timeout=300))
flooding.set()
pinger.join()
numbers = [t for t in flood_pings if isinstance(t, float)]
emit("op_flood_pings", {"count": len(numbers), "max_s": max(numbers, default=None),
                        "errors": [t for t in flood_pings if not isinstance(t, float)]})
out["after frames"] = outcome(lambda: r.np.sum(x).get("after frames", timeout=60))
out["connected after frames"] = r.connected

# 2. an allocation larger than the machine
for name, build in [("np.ones 10**13", lambda: r.np.ones(10**13)),
                    ("torch.ones 10**13", lambda: r.torch.ones(10**13)),
                    ("np.zeros 10**7 squared", lambda: r.np.zeros((10**7, 10**7)))]:
    out[name] = outcome(lambda: build().sum().get(name, timeout=120))

# 3. endless operations the owner cancels
for name, build in [("endless-numpy",
                     lambda x: r.np.sum(r.np.broadcast_to(x, (10**15, 5)))),
                    ("endless-torch",
                     lambda x: r.torch.ones(1).expand(10**13).sum())]:
    x = r.store["x"]
    old = x * 2                               # a pointer made before the restart
    handle = build(x).request(name + "!keep")
    flag(name)
    out[name] = outcome(lambda: handle.result(60))
    out[name + " old pointer"] = outcome(lambda: (old + 1).get("old", timeout=60))
    out[name + " old pointer again"] = outcome(lambda: old.get("old again", timeout=60))
    out[name + " new pointer"] = outcome(lambda: r.np.sum(r.store["x"]).get("new", timeout=60))

# 4. 10,000 queued requests
x = r.store["x"]
handles = [x.request(f"flood {i}!keep") for i in range(10_000)]
flag("flood-sent")
pings = []
while not flagged("flood-seen"):
    pings.append(r.ping(timeout=60))
    time.sleep(0.05)
emit("pings", {"count": len(pings), "max_s": max(pings, default=0.0),
               "median_s": sorted(pings)[len(pings) // 2] if pings else 0.0})
out["flood pinged"] = len(pings) > 0 and r.ping(timeout=60) > 0
out["flood last"] = outcome(lambda: handles[-1].result(180))

# 5. a segfaulting operation, then crashes until the owner's restart limit
W = r.store["W"]
crashes = []
for i in range(4):
    crash = r.torch.nn.functional.embedding(r.torch.tensor([0]), r.store["W"], max_norm=0.5)
    crashes.append(outcome(lambda: crash.get(f"crash {i}", timeout=60)))
out["crashes"] = crashes
out["after the limit"] = outcome(lambda: r.np.zeros(3).get("after limit", timeout=30))
out["ping after the limit"] = r.ping(timeout=30) > 0
emit("out", out)
flag("stop")
''')


@pytest.mark.timeout(900)   # floods of 10,000 requests and ops: about 140 s alone, more under load
def test_the_owner_survives(signaling_url: str, tmp_path: Path) -> None:
    owner, researcher = owner_and_researcher(OWNER, RESEARCHER, server=signaling_url,
                                             tmp=tmp_path)
    try:
        op_flood = researcher.expect("op_flood_pings", timeout=600)
        flood_seen = owner.expect("flood_seen_s", timeout=600)
        pings = researcher.expect("pings", timeout=120)
        out = researcher.expect("out", timeout=600)
        cancels = owner.expect("cancel_s", timeout=60)
        protocol_errors = owner.expect("protocol_errors")
        restarts = owner.expect("restarts")
        worker_pid = owner.expect("worker_pid")
        owner.expect("requests")
        connected = owner.expect("connected")
    finally:
        owner.kill()
        researcher.kill()
    print({"cancel_s": cancels, "flood_seen_s": flood_seen, "pings": pings,
           "op_flood_pings": op_flood})
    assert out["after op flood"] == ["value", 49.0], out["after op flood"]
    assert op_flood["errors"] == [] and op_flood["count"] > 0, op_flood
    # frames: each one a protocol error, the session up and working
    assert out["after frames"] == ["value", 49.0], out["after frames"]
    assert out["connected after frames"] is True
    assert protocol_errors >= 12, protocol_errors   # 10 frames, 2 ops messages too large
    # allocations: data (a failure the owner approved releasing) or a worker restart
    for name in ("np.ones 10**13", "torch.ones 10**13", "np.zeros 10**7 squared"):
        assert out[name][0] in ("RemoteError", "WorkerRestarted"), (name, out[name])
    # cancel: one clear error, old pointers gone, new ones work
    assert len(cancels) == 2
    for name in ("endless-numpy", "endless-torch"):
        assert out[name][0] == "WorkerRestarted", (name, out[name])
        assert out[name + " old pointer"][0] == "WorkerRestarted", out[name + " old pointer"]
        assert out[name + " old pointer again"][0] == "WorkerRestarted"
        assert out[name + " new pointer"] == ["value", 49.0], out[name + " new pointer"]
    # 10,000 requests: all reached the queue, the owner answered pings meanwhile
    assert out["flood pinged"] is True
    assert out["flood last"][0] == "RequestDenied", out["flood last"]
    # crashes: restarts audited; past the limit a clear refusal, the session still up
    kinds = [kind for kind, _ in out["crashes"]]
    assert kinds[0] == "WorkerRestarted", out["crashes"]
    assert all(kind in ("WorkerRestarted", "PolicyViolation") for kind in kinds), out["crashes"]
    assert any("stopped" in message or "nothing runs" in message
               for _, message in out["crashes"][1:]), out["crashes"]
    assert out["after the limit"][0] in ("PolicyViolation", "WorkerRestarted"), out[
        "after the limit"]
    assert "stopped" in out["after the limit"][1] or "restart" in out["after the limit"][1]
    assert out["ping after the limit"] is True
    crashed = [reason for was_crash, reason in restarts if was_crash]
    cancelled = [reason for was_crash, reason in restarts if not was_crash]
    assert len(cancelled) >= 2 and len(crashed) >= 2, restarts
    assert worker_pid is None
    assert connected is True


MEMORY_OWNER = script('''
import psutil
from tests.duet.hostile.peerkit import launch, flag, flagged
s = launch(memory_budget=64 * 1024**2)
emit("code", s.code)
s.requests.add_rule("approve", predicate=lambda q: q.reason in ("sync", "warm up"))
s.share(np.arange(5.0), name="x")
assert s.wait_for_peer(60)
kernel = psutil.Process()

def worker_rss():
    return psutil.Process(s.worker_pid).memory_info().rss

def settle():
    s.requests.wait(1)
    time.sleep(1.0)

while not flagged("baseline"):
    time.sleep(0.02)
rss = {"kernel_before": kernel.memory_info().rss, "worker_before": worker_rss()}
flag("measured")
started = time.monotonic()
while len([q for q in s.requests if q.reason.startswith("held")]) < 40:
    time.sleep(0.05)
settle()
rss["kernel_held"] = kernel.memory_info().rss
rss["worker_held"] = worker_rss()
emit("held_s", time.monotonic() - started)
s.requests.add_rule("deny", predicate=lambda q: q.reason.startswith("held"))
settle()
rss["worker_denied"] = worker_rss()
flag("denied")
# freed once decided: 40 more requests reuse the memory (RSS alone cannot tell, since the
# allocator may keep freed pages)
while len([q for q in s.requests if q.reason.startswith("again")]) < 40:
    time.sleep(0.05)
settle()
rss["worker_again"] = worker_rss()
s.requests.add_rule("deny", predicate=lambda q: q.reason.startswith("again"))
flag("denied again")
while not flagged("objects"):
    time.sleep(0.05)
settle()
rss["worker_objects"] = worker_rss()
emit("rss", rss)
emit("connected", s.connected)
# close() during an endless operation: returns at once, and the process can exit
while not flagged("endless"):
    time.sleep(0.02)
time.sleep(0.5)
emit("worker_pid", s.worker_pid)
started = time.monotonic()
s.close()
emit("close_s", time.monotonic() - started)
flag("stop")
''')

MEMORY_RESEARCHER = script('''
from tests.duet.hostile.peerkit import join, flag, flagged, outcome
r = join()
r.np.zeros(1).sum().request("warm up")       # the worker has imported what it needs
time.sleep(2.0)
flag("baseline")
while not flagged("measured"):
    time.sleep(0.02)
big = r.np.ones(2_000_000)                     # 16 MB, within the 64 MB budget
handles = [big.request(f"held {i}") for i in range(40)]
while not flagged("denied"):
    time.sleep(0.05)
last = outcome(lambda: handles[-1].result(120))
handles = [big.request(f"again {i}") for i in range(40)]
while not flagged("denied again"):
    time.sleep(0.05)
del big
# Python objects count against the budget too: each list is ~160 MB of floats
lists = [r.np.ones(5_000_000).tolist() for _ in range(4)]
synced = outcome(lambda: r.np.sum(r.np.zeros(1)).get("sync", timeout=120))
flag("objects")
emit("last", last)
emit("synced", synced)
endless = r.np.sum(r.np.broadcast_to(r.store["x"], (10**15, 5))).request("endless")
flag("endless")
while not flagged("stop"):
    time.sleep(0.05)
''')


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_memory_is_bounded_and_close_stops_everything(signaling_url: str,
                                                        tmp_path: Path) -> None:
    owner, researcher = owner_and_researcher(MEMORY_OWNER, MEMORY_RESEARCHER,
                                             server=signaling_url, tmp=tmp_path)
    try:
        held_s = owner.expect("held_s", timeout=400)
        rss = owner.expect("rss", timeout=400)
        connected = owner.expect("connected")
        worker_pid = owner.expect("worker_pid", timeout=120)
        close_s = owner.expect("close_s", timeout=120)
        exit_code = owner.wait(60)                 # nothing keeps the owner's process alive
        last = researcher.expect("last", timeout=60)
        synced = researcher.expect("synced", timeout=60)
    finally:
        owner.kill()
        researcher.kill()
    mb = {k: round(v / 2**20) for k, v in rss.items()}
    print({"rss_mb": mb, "held_s": held_s, "close_during_endless_s": close_s})
    assert exit_code == 0
    assert worker_pid is not None and not _alive(worker_pid)
    assert last[0] == "RequestDenied", last
    assert synced == ["value", 0.0], synced
    assert connected is True
    # 40 frozen copies of 16 MB are 640 MB: never in the owner's kernel ...
    assert mb["kernel_held"] - mb["kernel_before"] < 300, mb
    # ... freed once decided ...
    assert mb["worker_again"] - mb["worker_denied"] < 300, mb
    # ... and, while pending, counted against the owner's 64 MB budget
    assert mb["worker_held"] - mb["worker_before"] < 64 + 300, mb
    # 4 lists of 5 million Python floats (~640 MB) under a 64 MB budget
    assert mb["worker_objects"] - mb["worker_before"] < 64 + 300, mb
