"""Class 1: whether an operation failed is a channel; failures must be data.

The researcher runs the same attacks against two shared values that differ in the bits the
attacks probe; everything it receives must be identical, with no request made, and a failed
value's request is an ordinary request whose preview says it failed."""

from __future__ import annotations

import re
from pathlib import Path

from tests.duet.hostile.peerkit import script
from tests.helpers.peers import owner_and_researcher

OWNER = script('''
from tests.duet.hostile.peerkit import launch, serve
s = launch(memory_budget=64 * 1024**2)
emit("code", s.code)
# floor(x[3]*10) = 53 = 0b110101 and 79 = 0b1001111: bits 1, 3 and 5 differ ...
s.share(np.array([1.0, 2.0, 3.0, 5.3, 4.0]), name="a")
s.share(np.array([1.0, 2.0, 3.0, 7.9, 4.0]), name="b")
assert s.wait_for_peer(60)
requests = serve(s)
emit("requests", requests)
emit("connected", s.connected)
''')

RESEARCHER = script('''
from tests.duet.hostile.peerkit import join, flag, outcome
from tests.helpers.rawwire import record_received, normalized, send_raw, op, new_id
from duet import protocol as p
r = join()
received = record_received(r)
np_ = r.np
F = r.torch.nn.functional

def attacks(x):
    """Every probe whose failure depends on the value of x[3]; returns the pointers."""
    probe = np_.zeros(1)
    n = np_.floor(x[3] * 10).astype(np_.int64)
    bits = [probe[(n // 2**k) % 2] for k in range(8)]            # the issue's probe
    index = np_.arange(7)[np_.floor(x[3]).astype(np_.int64)]      # 5 fine, 7 out of range
    negative = np_.zeros(np_.floor(x[3] - 6.0).astype(np_.int64) + 3)  # 2 vs 4: both fine
    empty = np_.zeros(np_.floor(6.0 - x[3]).astype(np_.int64) * 5)  # 0 vs -5: ValueError for b
    huge = np_.zeros(np_.clip(np_.floor(x[3] - 6.0), 0, 1).astype(np_.int64) * 10**12 + 1)
    budget = np_.ones(np_.clip(np_.floor(x[3] - 6.0), 0, 1).astype(np_.int64) * 10**7 + 1)
    ce = F.cross_entropy(r.torch.zeros(1, 6),
                         r.torch.tensor(np_.floor(x[3:4]).astype(np_.int64)))  # class 7 of 6
    chol = np_.linalg.cholesky(np_.diag(x - 6.0) + np_.eye(5) * 6.0)  # pos.def. for both
    chol2 = np_.linalg.cholesky(np_.diag(x[3:4] - 6.0))              # fails for a only
    # names refused on objects that may or may not have failed: the refusal must not depend
    # on which (a refusal by name is immediate, so it must look the same either way)
    for k in range(8):
        for name in ("view", "tofile", "no_such_method"):
            send_raw(r, op(new_id(r), name, kind="method", target=p.PointerRef(bits[k].id)))
        send_raw(r, op(new_id(r), "shape", kind="getattr", target=p.PointerRef(bits[k].id)))
    later = [bits[1] + 1, (index * 2).sum(), ce.mean(), chol2 @ chol2, huge.sum(), empty + 1,
             budget.sum()]    # 80 MB for b only: over the owner's 64 MB budget
    # torch: a matrix singular for a only; a class out of range for b only
    singular = r.torch.tensor(np_.clip(np_.floor(x[3:4] - 6.0), 0, 1)).reshape(1, 1)
    solved = r.torch.linalg.solve(singular, singular * 0 + 1)
    one_hot = F.one_hot(r.torch.tensor(np_.floor(x[3:4]).astype(np_.int64)), 6)
    return bits + [index, negative, empty, huge, ce, chol, chol2] + later + [
        solved, one_hot, one_hot.sum(), solved.sum()]

def run(name):
    x = r.store[name]
    before = len(received)
    pointers = attacks(x)
    r.ping()
    try:
        r.np.zeros(1).get("sync", timeout=60)   # ordered after every attack in the worker
    except duet.DuetError as exc:
        emit("error", f"sync failed: {exc!r}")
    r.ping()
    return normalized(received[before:]), pointers

seen_a, pa = run("a")
seen_b, pb = run("b")
emit("types", sorted({m.type for m in received}))
emit("same", seen_a == seen_b)
emit("seen", [seen_a, seen_b])

def requested(name):
    """Requests whose value is too large to freeze or send only for one of the secrets: the
    owner has not decided, so the researcher must hear the same for both."""
    x = r.store[name]
    big = np_.clip(np_.floor(x[3] - 6.0), 0, 1).astype(np_.int64)       # 0 for a, 1 for b
    before = len(received)
    handles = {
        "header over the limit": (np_.ones(big * 3_000_000 + 1)).tolist().request("sized!keep"),
        "mask then tolist": x[x > 7.0].repeat(1_000_000).tolist().request("mask!keep"),
        "freeze larger than memory": np_.broadcast_to(
            x[0:1], (big * 10**11 + 1,)).request("freeze!keep"),
    }
    r.np.zeros(1).get("sync", timeout=60)
    time.sleep(1.0)
    r.np.zeros(1).get("sync", timeout=60)
    outcomes = {k: outcome(lambda: h.result(0.5))[0] for k, h in handles.items()}
    return outcomes, normalized(received[before:])

emit("requested", [requested("a"), requested("b")])

# names alone may be refused at once: these are immediate PolicyViolations
x = r.store["a"]
z = r.np.zeros(5)
refusals = {
    "not allowlisted": outcome(lambda: r.np.save("/tmp/x.npy", x).get("save", timeout=30)),
    "out keyword": outcome(lambda: r.np.add(x, 1.0, out=z).get("out", timeout=30)),
}
# a dtype spelled as a string is an ordinary argument: refused at once, or a failure the
# owner sees as a request
as_string = outcome(lambda: x.astype("float1024").get("dtype", timeout=30))
# private and dunder names, spelled on the raw wire (the Pointer class refuses them locally)
ids = [new_id(r), new_id(r), new_id(r)]
send_raw(r, op(ids[0], "__class__", kind="getattr", target=p.StoreRef("a")))
send_raw(r, op(ids[1], "numpy._pytesttester", kind="function"))
send_raw(r, op(ids[2], "astype", kind="method", target=p.StoreRef("a"),
               args=[p.DTypeRef("float1024")]))     # an unknown dtype name
r.np.zeros(1).get("sync", timeout=60)
policy = {m.result: m.policy for m in received if m.type == "op_failed"}
refusals["private"] = ["PolicyViolation" if all(policy.get(i) for i in ids) else "missing",
                       repr(policy)]
emit("refusals", refusals)
emit("dtype_as_string", as_string)

# a failed value is an ordinary request: the owner decides it
failures = {
    "index!": outcome(lambda: pb[8].get("index", timeout=60)),          # IndexError in b
    "derived!": outcome(lambda: pb[16].get("derived", timeout=60)),    # (index*2).sum()
    "ce!deny": outcome(lambda: pb[12].get("ce!deny", timeout=60)),
    "huge!": outcome(lambda: pb[11].get("huge", timeout=60)),
}
emit("failures", failures)
flag("stop")
''')


def test_failure_is_not_a_channel(signaling_url: str, tmp_path: Path) -> None:
    owner, researcher = owner_and_researcher(OWNER, RESEARCHER, server=signaling_url,
                                             tmp=tmp_path)
    try:
        types = researcher.expect("types", timeout=180)
        seen_a, seen_b = researcher.expect("seen")
        assert "error" not in types, types
        assert seen_a == seen_b, (seen_a, seen_b)
        # what it heard during each attack: refusals by name, and its own sync's answer
        assert [m.get("type") for m in seen_a if m.get("type") != "'op_failed'"] == [
            "'decision'"], seen_a
        assert all(m.get("policy") == "True" for m in seen_a if m.get("type") == "'op_failed'")
        (outcomes_a, heard_a), (outcomes_b, heard_b) = researcher.expect("requested")
        # undecided requests: nothing but "pending" for either secret, whatever their size
        assert outcomes_a == outcomes_b, (outcomes_a, outcomes_b)
        assert set(outcomes_a.values()) == {"RequestTimeout"}, outcomes_a
        assert heard_a == heard_b, (heard_a, heard_b)
        refusals = researcher.expect("refusals")
        for what, (kind, message) in refusals.items():
            assert kind == "PolicyViolation", (what, kind, message)
        assert researcher.expect("dtype_as_string")[0] in ("PolicyViolation", "RemoteError")
        failures = researcher.expect("failures", timeout=180)
        kind, message = failures["index!"]
        assert kind == "RemoteError" and "IndexError" in message, failures
        kind, message = failures["derived!"]
        assert kind == "RemoteError", failures
        assert failures["ce!deny"][0] == "RequestDenied", failures
        kind, message = failures["huge!"]
        assert kind in ("RemoteError", "WorkerRestarted"), failures
        for _, message in failures.values():
            text = re.sub(r"request [0-9a-f]{16}", "request ID", message)  # random hex ids
            for value in ("5.3", "7.9", "53", "79"):
                assert value not in text, message
        requests = owner.expect("requests", timeout=60)
        # no request but the researcher's own syncs reached the owner during the attacks
        made = {reason for reason in requests if reason != "sync"}
        assert made <= {"index", "derived", "ce!deny", "huge", "out", "dtype", "save",
                        "private", "sized!keep", "mask!keep", "freeze!keep"}, made
        assert requests["index"]["preview"].startswith("failed:"), requests["index"]
        assert "IndexError" in requests["index"]["preview"], requests["index"]
        assert requests["derived"]["preview"].startswith("failed:"), requests["derived"]
        assert requests["ce!deny"]["preview"].startswith("failed:"), requests["ce!deny"]
        assert requests["index"]["sources"] == ["b"]
        assert owner.expect("connected") is True
    finally:
        owner.kill()
        researcher.kill()


TIMEOUT_OWNER = script('''
from tests.duet.hostile.peerkit import launch, serve
s = launch(op_timeout=1.0, max_worker_restarts=1)
emit("code", s.code)
s.share(np.array([1.0, 2.0, 3.0, 5.3, 4.0]), name="a")
assert s.wait_for_peer(60)
serve(s)
restarts = s.audit.events(event="worker_restarted")
emit("restarts", [[e.detail.get("crashed"), e.detail.get("reason", "")] for e in restarts])
emit("connected", s.connected)
''')

TIMEOUT_RESEARCHER = script('''
from tests.duet.hostile.peerkit import join, flag, outcome
r = join()
x = r.store["a"]
# an operation that runs past the owner's time limit only when a bit of the secret is set is
# one bit per restart: restarts by timeout must count against the owner's limit like crashes
seen = []
for k in range(4):
    n = (r.np.floor(x[3] * 10).astype(r.np.int64) // 2**k) % 2 + 1     # 1 or 2
    endless = r.np.sum(r.np.broadcast_to(x, (n * 10**15, 5)))         # endless either way
    seen.append(outcome(lambda: endless.get(f"endless {k}", timeout=60)))
seen.append(outcome(lambda: r.np.zeros(3).get("after", timeout=30)))
emit("seen", seen)
flag("stop")
''')


def test_restarts_by_timeout_are_capped(signaling_url: str, tmp_path: Path) -> None:
    owner, researcher = owner_and_researcher(TIMEOUT_OWNER, TIMEOUT_RESEARCHER,
                                             server=signaling_url, tmp=tmp_path)
    try:
        seen = researcher.expect("seen", timeout=240)
        restarts = owner.expect("restarts", timeout=60)
        connected = owner.expect("connected")
    finally:
        owner.kill()
        researcher.kill()
    kinds = [kind for kind, _ in seen]
    assert kinds[0] == "WorkerRestarted", seen
    assert all(kind in ("WorkerRestarted", "PolicyViolation") for kind in kinds), seen
    # past the limit of one restart nothing runs: the channel closes
    assert "stopped" in seen[-1][1] or "nothing runs" in seen[-1][1], seen
    assert len(restarts) == 2 and all(crashed for crashed, _ in restarts), restarts
    assert "longer than the owner's limit" in restarts[0][1], restarts
    assert connected is True
