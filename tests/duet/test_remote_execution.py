"""Remote execution between two real processes: results, training, the forbidden, no leaks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers.peers import owner_and_researcher

OWNER_COMMON = '''
import torch
s = duet.launch(server=SERVER, ice_servers=[], audit_path=os.path.join(TMP, "audit.db"),
                show=False, memory_budget=int(os.environ.get("BUDGET", 2 * 1024**3)))
emit("code", s.code)
'''


def run_pair(tmp_path: Path, url: str, owner_body: str, researcher_body: str,
             timeout: float = 120) -> tuple[object, object]:
    owner, researcher = owner_and_researcher(OWNER_COMMON + owner_body, researcher_body,
                                             server=url, tmp=tmp_path)
    return owner, researcher


def test_elementwise_and_reductions_equal_local_results(signaling_url: str,
                                                        tmp_path: Path) -> None:
    owner_body = '''
rng = np.random.default_rng(3)
ages = rng.integers(18, 90, 500).astype(np.float64)
w = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
s.share(ages, name="ages", description="patient ages")
s.share(w, name="w")
s.requests.add_rule("approve")
local = {
    "mean2": float(np.mean(ages * 2)),
    "masked": float(np.mean((ages * 2)[ages > 30])),
    "std": float(ages.std()),
    "pct": np.percentile(ages, [10, 50, 90]).tolist(),
    "hist": np.histogram(ages, bins=5)[0].tolist(),
    "sorted_head": np.sort(ages)[:3].tolist(),
    "where": float(np.where(ages > 50, 1.0, 0.0).sum()),
    "matmul": (w.T @ w).sum().item(),
    "softmax": torch.softmax(w, dim=1)[0].tolist(),
    "norm": float(np.linalg.norm(ages)),
    "neg_abs": float(np.abs(-ages + 40).max()),
}
emit("local", local)
assert s.wait_for_peer(60)
wait_for("done")
emit("lineages", [r.lineage for r in s.requests])
s.close()
'''
    researcher_body = '''
r = duet.join(CODE, server=SERVER, ice_servers=[])
ages, w = r.store["ages"], r.store["w"]
remote = {
    "mean2": r.np.mean(ages * 2),
    "masked": r.np.mean((ages * 2)[ages > 30]),
    "std": ages.std(),
    "pct": r.np.percentile(ages, [10, 50, 90]),
    "hist": r.np.histogram(ages, bins=5)[0],
    "sorted_head": r.np.sort(ages)[:3],
    "where": r.np.where(ages > 50, 1.0, 0.0).sum(),
    "matmul": (w.T @ w).sum(),
    "softmax": r.torch.softmax(w, dim=1)[0],
    "norm": r.np.linalg.norm(ages),
    "neg_abs": abs(-ages + 40).max(),
}
values = {}
for key, ptr in remote.items():
    value = ptr.get(reason=key, timeout=60)
    values[key] = value.tolist() if hasattr(value, "tolist") else value
emit("remote", values)
r.close()
'''
    owner, researcher = run_pair(tmp_path, signaling_url, owner_body, researcher_body)
    try:
        local = owner.expect("local")
        remote = researcher.expect("remote")
        assert set(remote) == set(local)
        for key, expected in local.items():
            assert remote[key] == pytest.approx(expected), key
        owner.signal_step("done")
        lineages = owner.expect("lineages")
        assert "mean((ages * 2)[(ages > 30)])" in lineages
        assert owner.wait() == 0 and researcher.wait() == 0
    finally:
        owner.kill()
        researcher.kill()


def test_remote_training_reduces_the_loss_without_the_data_leaving(signaling_url: str,
                                                                  tmp_path: Path) -> None:
    owner_body = '''
g = torch.Generator().manual_seed(0)
X = torch.randn(400, 10, generator=g)
y = (X[:, 0] + 0.5 * X[:, 1] > 0).long()
s.share(X, name="X", description="features")
s.share(y, name="y", description="labels")
# Losses (one number each) are approved automatically; nothing else is.
s.requests.add_rule("approve", max_elements=1)
assert s.wait_for_peer(60)
wait_for("done", timeout=300)
assert s.requests.wait(60) is not None       # the weights request, left pending
losses = [float(r.preview) for r in s.requests if r.reason.startswith("loss")]
emit("owner_losses", losses)
emit("sent_bytes", [e.nbytes for e in s.audit.events(event="value_sent")])
emit("trained_lineage", [[r.lineage, sorted(r.sources)] for r in s.requests
                         if r.status == "pending"])
s.close()
'''
    researcher_body = '''
r = duet.join(CODE, server=SERVER, ice_servers=[])
nn, F = r.torch.nn, r.torch.nn.functional

class Net(duet.RemoteModule):
    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(10, 32)
        self.out = nn.Linear(32, 2)

    def forward(self, x):
        return self.out(r.torch.relu(self.hidden(x)))

model = Net()
opt = r.torch.optim.SGD(model.parameters(), lr=0.5)
X, y = r.store["X"], r.store["y"]
losses = []
for step in range(20):
    opt.zero_grad()
    loss = F.cross_entropy(model(X), y)
    loss.backward()
    opt.step()
    losses.append(loss.item())
values = [l.get(reason=f"loss {i}", timeout=120) for i, l in enumerate(losses)]
emit("losses", values)
with r.torch.no_grad():
    accuracy = (model(X).argmax(dim=1) == y).float().mean().item()
emit("accuracy", accuracy.get(reason="train accuracy", timeout=120))
handle = model.state_dict().request("trained weights")   # stays pending: owner did not approve
emit("weights_status", handle.status)
emit("received_types", sorted({type(v).__name__ for v in values}))
wait_for("release", timeout=300)
r.close()
'''
    owner, researcher = run_pair(tmp_path, signaling_url, owner_body, researcher_body)
    try:
        losses = researcher.expect("losses", timeout=300)
        assert len(losses) == 20
        assert losses[-1] < losses[0] * 0.8
        assert researcher.expect("accuracy") > 0.8
        assert researcher.expect("weights_status") == "pending"
        assert researcher.expect("received_types") == ["float"]
        owner.signal_step("done")
        owner_losses = owner.expect("owner_losses")
        # checked on the owner's side: the losses it released went down
        assert owner_losses[-1] < owner_losses[0] * 0.8
        sent = owner.expect("sent_bytes")
        assert max(sent) < 1024, "something larger than a scalar left the owner"
        pending = owner.expect("trained_lineage")
        assert any(sources == ["X", "y"] for _, sources in pending), pending
        owner.signal_step("release")
        assert owner.wait() == 0 and researcher.wait() == 0
    finally:
        owner.kill()
        researcher.kill()


def test_forbidden_attempts_are_refused_and_the_owner_is_unharmed(signaling_url: str,
                                                                 tmp_path: Path) -> None:
    owner_body = '''
ages = np.arange(100, 200, dtype=np.float64)
s.share(ages, name="ages")
s.share(torch.nn.Linear(3, 1), name="model")
s.requests.add_rule("approve")
before = sorted(os.listdir(TMP)), sorted(os.listdir(os.getcwd()))
assert s.wait_for_peer(60)
wait_for("done", timeout=120)
after = sorted(os.listdir(TMP)), sorted(os.listdir(os.getcwd()))
harness = {"done", "researcher.py"}   # the test's own files: researcher.py may come after before
emit("files_unchanged", [sorted(set(a) - set(b) - harness) for a, b in zip(after, before)])
emit("ages_intact", bool((ages == np.arange(100, 200)).all()))
emit("refused", len(s.audit.events(event="op_refused")))
emit("connected", s.connected)
s.close()
'''
    researcher_body = '''
from duet import protocol as p
r = duet.join(CODE, server=SERVER, ice_servers=[])
x, model = r.store["ages"], r.store["model"]
import tempfile
other = duet.launch(server=SERVER, ice_servers=[], show=False,
                    audit_path=os.path.join(tempfile.mkdtemp(), "other.db"))
outcomes = {}

def attempt(name, fn):
    try:
        result = fn()
        if isinstance(result, duet.Pointer):
            result.get(reason=name, timeout=30)
        outcomes[name] = "ALLOWED"
    except (duet.PolicyViolation, TypeError, AttributeError, duet.RemoteError,
            duet.RequestError, duet.DuetError) as exc:
        outcomes[name] = type(exc).__name__

def raw(kind, name, target=None, args=()):
    """Bypass the researcher-side checks: send an operation the owner must refuse itself."""
    op = p.Op(result=r.new_id(), kind=kind, name=name, target=target, args=list(args))
    r.submit_op(op)
    return duet.Pointer(r, p.PointerRef(op.result), name)

def local_class():
    if x.__class__ is duet.Pointer:       # Python's own attribute: the owner is never asked
        raise TypeError("x.__class__ is the researcher's local Pointer class")

attempt("x.__class__ is local", local_class)
attempt("x.__reduce__", lambda: x.__reduce__())
attempt("x.__reduce_ex__", lambda: x.__reduce_ex__(2))
attempt("getattr __dict__", lambda: getattr(x, "__dict__"))
attempt("getattr _private", lambda: getattr(x, "_ref_on_owner"))
attempt("r.np.load", lambda: r.np.load("/etc/passwd"))
attempt("r.np.save", lambda: r.np.save(os.path.join(TMP, "leak.npy"), x))
attempt("r.np.lib", lambda: r.np.lib)
attempt("r.np.fromfile", lambda: r.np.fromfile("/etc/passwd"))
attempt("r.np.memmap", lambda: r.np.memmap("/tmp/m", mode="w+", shape=(3,)))
attempt("r.torch.load", lambda: r.torch.load("/etc/passwd"))
attempt("r.torch.save", lambda: r.torch.save(x, "/tmp/x.pt"))
attempt("r.torch.hub", lambda: r.torch.hub)
attempt("x.tofile", lambda: x.tofile(os.path.join(TMP, "leak.bin")))
attempt("x.dump", lambda: x.dump(os.path.join(TMP, "leak.pkl")))
attempt("x.ctypes", lambda: x.ctypes)
attempt("x.sort in place on shared", lambda: x.sort())
attempt("model.apply", lambda: model.apply(print))
attempt("raw numpy.load", lambda: raw("function", "numpy.load", args=["/etc/passwd"]))
attempt("raw builtins.eval", lambda: raw("function", "builtins.eval", args=["1+1"]))
attempt("raw os.system", lambda: raw("function", "os.system", args=["touch pwned"]))
attempt("raw subprocess.run", lambda: raw("function", "subprocess.run", args=[["id"]]))
attempt("raw getattr dunder", lambda: raw("getattr", "__class__", target=p.StoreRef("ages")))
attempt("raw method __reduce__", lambda: raw("method", "__reduce__", target=p.StoreRef("ages")))
attempt("raw method tofile", lambda: raw("method", "tofile", target=p.StoreRef("ages"),
                                         args=[os.path.join(TMP, "leak2.bin")]))
attempt("raw call a shared array", lambda: raw("call", "forward", target=p.StoreRef("ages")))
attempt("raw np.lib.format", lambda: raw("function", "numpy.lib.format.open_memmap",
                                         args=[os.path.join(TMP, "m.npy")]))
attempt("forged pointer id", lambda: raw("function", "numpy.mean", args=[p.PointerRef(987654)]))
attempt("unknown store name", lambda: raw("function", "numpy.mean", args=[p.StoreRef("nope")]))
attempt("call a non-allowlisted function", lambda: r.np.genfromtxt("/etc/passwd"))
attempt("pointer from another session", lambda: r.np.mean(
    duet.Pointer(other, p.StoreRef("ages"), "ages")))
attempt("unicode lookalike", lambda: raw("function", "numpy.lоad", args=["/etc/passwd"]))
emit("outcomes", outcomes)
emit("still_works", r.np.mean(x).get(reason="after the attempts", timeout=30))
other.close()
wait_for("release")
r.close()
'''
    owner, researcher = run_pair(tmp_path, signaling_url, owner_body, researcher_body)
    try:
        outcomes = researcher.expect("outcomes", timeout=120)
        assert len(outcomes) >= 25
        allowed = [name for name, outcome in outcomes.items() if outcome == "ALLOWED"]
        assert allowed == [], allowed
        policy = [n for n in outcomes if n.startswith(("r.", "raw", "x.t", "x.d", "x.c", "x.s",
                                                        "model", "call", "unicode"))]
        assert {n: outcomes[n] for n in policy if outcomes[n] != "PolicyViolation"} == {}
        # which objects exist is known to the owner's kernel without any data: refused at once
        assert outcomes["forged pointer id"] == "PolicyViolation"
        assert outcomes["unknown store name"] == "PolicyViolation"
        assert outcomes["pointer from another session"] == "DuetError"
        assert researcher.expect("still_works") == 149.5
        owner.signal_step("done")
        assert owner.expect("files_unchanged") == [[], []]
        assert owner.expect("ages_intact") is True
        assert owner.expect("refused") >= 8  # the raw attempts reached the owner and were refused
        assert owner.expect("connected") is True
        assert not any(os.path.exists(tmp_path / f) for f in ("leak.npy", "leak.bin",
                                                               "leak.pkl", "leak2.bin"))
        assert not os.path.exists("pwned")
        owner.signal_step("release")
        assert owner.wait() == 0 and researcher.wait() == 0
    finally:
        owner.kill()
        researcher.kill()


def test_owner_errors_and_budgets_leak_no_values(signaling_url: str, tmp_path: Path) -> None:
    owner_body = '''
labels = torch.tensor([0, 1, 98765])            # a data value that must not leak
s.share(labels, name="labels")
s.share(torch.zeros(3, 2), name="logits")
s.requests.add_rule("approve")              # releases failures too: only op and error type
assert s.wait_for_peer(60)
wait_for("done", timeout=120)
emit("used", s.worker_usage().used_bytes)
emit("errors", [e.detail for e in s.audit.events(event="op_failed")])
s.close()
'''
    researcher_body = '''
r = duet.join(CODE, server=SERVER, ice_servers=[])
loss = r.torch.nn.functional.cross_entropy(r.store["logits"], r.store["labels"])
messages = []
time.sleep(1)
for use in (lambda: loss + 1, lambda: loss.get(reason="loss", timeout=30)):
    try:
        use()
        messages.append("no error")
    except duet.RemoteError as exc:
        messages.append(str(exc))
emit("messages", messages)
big = [r.torch.zeros(1024, 1024) for _ in range(10)]     # 40 MiB > the 16 MiB budget
time.sleep(1)
try:
    big[-1].get(reason="too big", timeout=30)
    emit("budget", "no error")
except (duet.RemoteError, duet.RequestError) as exc:
    emit("budget", str(exc))
del big
loss.delete()
import gc; gc.collect()
r.ping()
time.sleep(1)
emit("freed", True)
r.close()
'''
    os.environ["BUDGET"] = str(16 * 1024 * 1024)
    try:
        owner, researcher = run_pair(tmp_path, signaling_url, owner_body, researcher_body)
    finally:
        del os.environ["BUDGET"]
    try:
        messages = researcher.expect("messages")
        # using a failed pointer says nothing; asking for it, approved, says what failed
        assert messages[0] == "no error"
        assert "cross_entropy" in messages[1] and "98765" not in messages[1]
        assert "BudgetExceeded" in researcher.expect("budget")
        researcher.expect("freed")
        owner.signal_step("done")
        assert owner.expect("used") == 0  # every dropped pointer was freed on the owner
        assert owner.wait() == 0 and researcher.wait() == 0
    finally:
        owner.kill()
        researcher.kill()
