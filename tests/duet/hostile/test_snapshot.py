"""Class 2: approved is what was previewed, and provenance is complete.

Every write the researcher can make into its own object after asking for it (methods,
in-place torch ops, functions that renormalize, optimizer steps) must change neither the
preview nor what is sent; every way a shared value flows into an object must name the
shared source, so a deny rule on that name fires."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.duet.hostile.peerkit import script
from tests.helpers.peers import owner_and_researcher

OWNER = script('''
import torch
from tests.duet.hostile.peerkit import launch, serve
s = launch()
emit("code", s.code)
s.share(np.array([7.25, 8.5, 9.75, 11.0, 12.5]), name="secret")
s.share(torch.arange(12.0).reshape(4, 3) + 0.5, name="W")
for i in range(25):
    s.share(np.zeros(2), name=f"part{i:02d}")
s.requests.add_rule("deny", name="secret", reason="never the secret")
s.requests.add_rule("deny", name="W", reason="never W")
assert s.wait_for_peer(60)
requests = serve(s)
emit("requests", requests)
sent = s.audit.events(event="value_sent")
emit("value_sent", [{"request_id": e.request_id, "sha256": e.sha256, "nbytes": e.nbytes}
                    for e in sent])
emit("approved_ids", sorted(r.id for r in s.requests if r.status == "approved"))
emit("connected", s.connected)
''')

RESEARCHER = script('''
import hashlib
from tests.duet.hostile.peerkit import join, flag, outcome
from tests.helpers.rawwire import send_raw, op, new_id
from duet import protocol as p
r = join()
x = r.store["secret"]
W = r.store["W"]
F = r.torch.nn.functional
out = {}

def held(name, pointer, mutate):
    """Request ``pointer`` held by the owner, mutate it, then release the decision."""
    handle = pointer.request("hold:" + name)
    mutate()
    r.np.zeros(1).get("sync", timeout=60)       # the mutation has run in the worker
    flag(name)
    out[name] = outcome(lambda: handle.result(60))

# (b) numpy methods writing into our own object after the request
z = r.np.zeros(5)
held("put", z, lambda: (z.put(r.np.arange(5), x), z.sort()))
z2 = r.np.zeros(5)
held("clip-out", z2, lambda: x.clip(-1e300, 1e300, z2))     # positional out after request
# in-place torch ops
t = r.torch.zeros(3)
held("add_", t, lambda: (t.add_(W[1]), t.mul_(2.0)))
# a function that renormalizes its argument in place
w = r.torch.ones(4, 3) * 5.0
held("embedding", w, lambda: F.embedding(r.torch.tensor([0, 1, 2, 3]), w, max_norm=1.0))
# an optimizer step over the requested parameter, with gradients from W
lin = r.torch.nn.Linear(3, 1)
w0 = lin.weight.get("w0", timeout=60)
out["w0"] = ["value", w0.tolist()]
def step():
    opt = r.torch.optim.SGD(lin.parameters(), lr=1.0)
    lin(W).sum().backward()
    opt.step()
held("sgd", lin.weight, step)
# after the step the weights derive from W: the deny rule on W must fire
out["after-sgd"] = outcome(lambda: lin.weight.get("after-sgd", timeout=60))

# (a) every way data flows in records the source, so the deny rule on "secret" fires
def flow(name, build):
    """Build the object (a local refusal by name counts as refused), then ask for it."""
    try:
        pointer = build()
    except duet.PolicyViolation as exc:
        out["flow:" + name] = ["PolicyViolation", str(exc)]
        return
    out["flow:" + name] = outcome(lambda: pointer.get("flow:" + name, timeout=60))

def into(make, write):
    target = make()
    write(target)
    return target

flow("method-positional-out",                                   # positional out of a method
     lambda: into(lambda: r.np.zeros(10), lambda a: x.clip(-1e300, 1e300, a[2:7])))
flow("ufunc-positional-out",                                    # positional out of a ufunc
     lambda: into(lambda: r.np.zeros(5), lambda b: r.np.add(x, 0.0, b)))
flow("take-out",                                                # take(indices, axis, out)
     lambda: into(lambda: r.np.zeros(8), lambda c: x.take([0, 1, 2], None, c[0:3])))
flow("cumsum-out",                                              # cumsum(axis, dtype, out)
     lambda: into(lambda: r.np.zeros(5), lambda c: x.cumsum(0, None, c)))
flow("setitem", lambda: into(lambda: r.np.zeros(5), lambda d: send_raw(r, op(
    new_id(r), "operator.setitem",
    args=[p.PointerRef(d.id), slice(None), p.StoreRef("secret")]))))   # raw __setitem__
flow("put", lambda: into(lambda: r.np.zeros(5), lambda e: e.put(r.np.arange(5), x)))
flow("add_", lambda: into(lambda: r.torch.zeros(3), lambda f: f.add_(W[0])))
flow("out-keyword",
     lambda: into(lambda: r.torch.zeros(4, 3), lambda g: r.torch.add(g, W, out=g)))
flow("copy_", lambda: into(lambda: r.torch.zeros(3), lambda h: h.copy_(W[2])))
flow("stack", lambda: r.np.stack([r.np.zeros(5), x]))           # a container of values
flow("tensor-of-list", lambda: r.torch.tensor([r.np.zeros(5), x]))  # a nested container
flow("init-then-add_", lambda: into(lambda: r.torch.zeros(3), lambda j: (
    r.torch.nn.init.constant_(j, 0.0), j.add_(W.sum(0)))))
flow("load_state_dict of a dict holding W", lambda: into(
    lambda: r.torch.nn.Linear(3, 4),
    lambda m: m.load_state_dict({"weight": W, "bias": r.torch.zeros(4)})).weight)
flow("scatter_", lambda: into(lambda: r.torch.zeros(3), lambda t: t.scatter_(
    0, r.torch.tensor([0, 1, 2]), W[1])))
flow("masked_fill_", lambda: into(lambda: r.torch.zeros(3), lambda t: t.masked_fill_(
    r.torch.tensor([True, False, True]), W[2, 2])))
flow("lerp_", lambda: into(lambda: r.torch.zeros(3), lambda t: t.lerp_(W[0], 1.0)))
flow("addcmul_", lambda: into(lambda: r.torch.zeros(3), lambda t: t.addcmul_(
    W[0], r.torch.ones(3))))
flow("np.copyto", lambda: into(lambda: r.np.zeros(5), lambda z: r.np.copyto(z, x)))
flow("np.putmask", lambda: into(lambda: r.np.zeros(5), lambda z: r.np.putmask(
    z, r.np.ones(5) > 0, x)))
flow("np.place", lambda: into(lambda: r.np.zeros(5), lambda z: r.np.place(
    z, r.np.ones(5) > 0, x)))
flow("vector_to_parameters", lambda: into(lambda: r.torch.nn.Linear(3, 4), lambda m: (
    r.torch.nn.utils.vector_to_parameters(r.torch.cat([W.flatten(), r.torch.zeros(4)]),
                                          m.parameters()))).weight)
def grad_of_weight():
    lin = r.torch.nn.Linear(3, 1)
    lin(W).sum().backward()                 # the gradient is written into lin.weight.grad
    return lin.weight.grad

def grad_of_leaf():
    t = r.torch.ones(3, requires_grad=True)
    (t * W[0]).sum().backward()             # t.grad is exactly W[0]
    return t.grad

flow("grad after backward", grad_of_weight)
flow("leaf grad equals W row", grad_of_leaf)
flow("index_put_", lambda: into(lambda: r.torch.zeros(3), lambda k: k.index_put_(
    (r.torch.tensor([0, 1, 2]),), W[3])))

# (d) lineage and preview both truncated around the shared part: sources stay whole
parts = [r.np.zeros(100)] * 8 + [x, r.np.zeros(100)]
out["concat"] = outcome(lambda: r.np.concatenate(parts).get("concat", timeout=60))
many = [r.np.zeros(3)] * 60 + [x[0:3]] + [r.np.zeros(3)] * 60
out["concat-many"] = outcome(lambda: r.np.concatenate(many).get("concat-many", timeout=60))

# many sources: every one of them is shown, however long the list
pieces = [r.store[f"part{i:02d}"] for i in range(25)] + [x]
out["25 sources"] = outcome(lambda: r.np.concatenate(pieces).get("25 sources", timeout=60))

# (c) the bytes sent are the frozen bytes: mutate while the approved value is in transfer
big = r.np.zeros(4_000_000)
handle = big.request("hold:transfer")
r.np.zeros(1).get("sync", timeout=60)
flag("transfer")
for _ in range(20):
    big.fill(1.0)
value = handle.result(120)
out["transfer"] = ["value", [float(value.min()), float(value.max()),
                             hashlib.sha256(value.tobytes()).hexdigest()]]
emit("out", out)
flag("stop")
''')


def test_approved_is_what_was_previewed(signaling_url: str, tmp_path: Path) -> None:
    owner, researcher = owner_and_researcher(OWNER, RESEARCHER, server=signaling_url,
                                             tmp=tmp_path)
    try:
        out = researcher.expect("out", timeout=300)
        requests = owner.expect("requests", timeout=60)
        sent = owner.expect("value_sent")
        approved_ids = owner.expect("approved_ids")
        assert owner.expect("connected") is True
    finally:
        owner.kill()
        researcher.kill()
    # mutation after the request changes neither preview nor value
    assert out["put"] == ["value", [0.0] * 5], out["put"]
    assert out["clip-out"] == ["value", [0.0] * 5], out["clip-out"]
    assert out["add_"] == ["value", [0.0] * 3], out["add_"]
    assert out["embedding"] == ["value", [[5.0] * 3] * 4], out["embedding"]
    assert out["sgd"] == out["w0"], (out["sgd"], out["w0"])
    for name in ("put", "clip-out", "add_", "embedding", "sgd"):
        request = requests["hold:" + name]
        assert request["sources"] == [], (name, request)
        assert request["status"] == "approved"
    assert "0." in requests["hold:put"]["preview"] and "7.25" not in requests["hold:put"][
        "preview"]
    assert "5." in requests["hold:embedding"]["preview"]
    # an optimizer step with gradients from W makes the weights depend on W
    assert out["after-sgd"][0] == "RequestDenied", out["after-sgd"]
    assert requests["after-sgd"]["sources"] == ["W"], requests["after-sgd"]
    # every way data flows in names its source: the deny rules fire (or the op was refused)
    for name, result in out.items():
        if name.startswith("flow:"):
            # denied by the rule, refused by name, or (an op refused on the raw wire) zeros
            assert result[0] in ("RequestDenied", "PolicyViolation") or (
                result[0] == "value" and not any(np.ravel(result[1]))), (name, result)
            if result[0] == "RequestDenied":
                assert requests[name]["sources"], (name, requests[name])
                assert requests[name]["status"] == "denied"
    # lineage truncated or not, the owner sees the shared source whole
    for name in ("concat", "concat-many"):
        assert out[name][0] == "RequestDenied", out[name]
        request = requests[name]
        assert request["sources"] == ["secret"], request
        assert "secret" in request["repr"], request["repr"]
    many = requests["25 sources"]
    assert many["sources"] == sorted([f"part{i:02d}" for i in range(25)] + ["secret"]), many
    assert all(f"part{i:02d}" in many["repr"] for i in range(25)), many["repr"]
    assert out["25 sources"][0] == "RequestDenied"
    # the bytes sent are the frozen ones, and the audit hash is theirs
    low, high, digest = out["transfer"][1]
    assert (low, high) == (0.0, 0.0), out["transfer"]
    transfer = requests["hold:transfer"]
    assert transfer["status"] == "approved"
    # the audited hash covers the encoded message the owner froze and then sent
    hashes = [d.get("sha256") for d in sent if d.get("request_id") == transfer["id"]]
    assert hashes == [transfer["sha256"]], (hashes, transfer, sent)
    # exactly one value_sent per approved request, none for anything else
    assert sorted(d["request_id"] for d in sent) == approved_ids, (sent, approved_ids)
