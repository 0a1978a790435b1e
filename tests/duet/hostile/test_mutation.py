"""Class 4: the researcher cannot modify the owner's data.

Each attack tries to write into a shared array, tensor or module (functions that write in
place, aliases, optimizers, module containers, writes after unshare). The worker may crash
doing so; the owner's objects must stay bit-identical (hashed in the owner's own process)
and its session up. Objects exposing writable memory through the buffer protocol cannot be
shared at all."""

from __future__ import annotations

from pathlib import Path

from tests.duet.hostile.peerkit import script
from tests.helpers.peers import owner_and_researcher

OWNER = script('''
import array, ctypes, mmap, threading
import torch
from tests.duet.hostile.peerkit import launch, serve, sha, flag, flagged

class D(dict):
    pass

class L(list):
    pass


s = launch(max_worker_restarts=100)
emit("code", s.code)
refused = {}
probe = duet.launch(server=SERVER, ice_servers=[], show=False)  # sharing needs no peer
for name, bad in [("array.array", array.array("d", [1.0, 2.0])),
                  ("bytearray", bytearray(b"abcd")),
                  ("memoryview", memoryview(bytearray(b"abcd"))),
                  ("dict subclass", D(a=np.zeros(2))),
                  ("list subclass", L([np.zeros(2)])),
                  ("mmap", mmap.mmap(-1, 16)),
                  ("ctypes array", (ctypes.c_double * 3)()),
                  ("bytearray in a list", [np.zeros(2), bytearray(4)]),
                  ("array.array in a dict", {"a": array.array("b", [1])}),
                  ("memoryview of an array", memoryview(np.zeros(3)))]:
    try:
        probe.share(bad, name="bad")
        refused[name] = "accepted"
    except (TypeError, ValueError) as exc:
        refused[name] = type(exc).__name__
refused["left shared"] = sorted(probe.shared)
probe.close()
emit("refused", refused)
X = np.array([7.25, 8.5, 9.75, 11.0, 12.5])
X2 = np.arange(6.0)
W = torch.arange(12.0).reshape(4, 3) + 0.5
WT = torch.arange(6.0)
model = torch.nn.Linear(3, 2)
D0 = {"a": np.arange(4.0), "b": torch.ones(2)}
objects = {"X": X, "X2": X2, "W": W, "WT": WT, "model": model, "D0": D0}
before = {name: sha(obj) for name, obj in objects.items()}
flags_before = [X.flags.writeable, D0["a"].flags.writeable, X2.flags.writeable]
for name, obj in objects.items():
    s.share(obj, name=name)
assert s.wait_for_peer(60)

def unshare_on_request():
    while not flagged("unshare"):
        time.sleep(0.02)
    s.unshare("X2")
    s.unshare("WT")
    flag("unshared")

threading.Thread(target=unshare_on_request, daemon=True).start()
requests = serve(s)
emit("requests", {k: v["status"] for k, v in requests.items()})
after = {name: sha(obj) for name, obj in objects.items()}
emit("changed", sorted(name for name in objects if before[name] != after[name]))
emit("flags", flags_before == [X.flags.writeable, D0["a"].flags.writeable, X2.flags.writeable])
emit("restarts", len(s.audit.events(event="worker_restarted")))
emit("connected", s.connected)
''')

RESEARCHER = script('''
from tests.duet.hostile.peerkit import join, flag, flagged, outcome
r = join()
F = r.torch.nn.functional
results = {}

def attack(name, fn):
    """Run one attack, then a round trip through the worker; record what we were told."""
    try:
        fn()
        detail = outcome(lambda: r.np.zeros(1).get("sync:" + name, timeout=120))
    except duet.DuetError as exc:
        detail = [type(exc).__name__, str(exc)]
    results[name] = detail

def store(name):
    return r.store[name]

def embedding():
    F.embedding(r.torch.tensor([0, 1, 2, 3]), store("W"), max_norm=1.0).sum().get("emb", 60)

def load_into_sequential():
    seq = r.torch.nn.Sequential(store("model"))
    seq.load_state_dict({"0.weight": r.torch.zeros(2, 3), "0.bias": r.torch.zeros(2)})

def module_list():
    ident = r.torch.nn.Identity()
    ml = r.torch.nn.ModuleList([ident] * 20_000 + [store("model")])
    ml.load_state_dict({"20000.weight": r.torch.zeros(2, 3), "20000.bias": r.torch.zeros(2)})
    ml[20_000].weight.detach().zero_()

def sgd():
    model = store("model")
    opt = r.torch.optim.SGD(model.parameters(), lr=100.0)
    model(r.torch.ones(1, 3)).sum().backward()
    opt.step()

# what the worker itself sees of the shared model before the attacks
model_sum = outcome(lambda: r.torch.sum(r.store["model"].weight).get("model before", 60))
attack("embedding max_norm", embedding)
attack("load_state_dict through Sequential", load_into_sequential)
attack("ModuleList of 20,001", module_list)
attack("asarray fill", lambda: r.np.asarray(store("X")).fill(0.0))
attack("asarray put", lambda: r.np.asarray(store("X")).put([0, 1], [0.0, 0.0]))
attack("from_numpy zero_", lambda: r.torch.from_numpy(store("X")).zero_())
attack("from_numpy of numpy()", lambda: r.torch.from_numpy(store("W").numpy()).zero_())
attack("as_tensor mul_", lambda: r.torch.as_tensor(store("X")).mul_(0.0))
attack("detach zero_", lambda: store("W").detach().zero_())
attack("init.zeros_ on a parameter", lambda: r.torch.nn.init.zeros_(store("model").weight))
attack("optimizer over shared parameters", sgd)
attack("dict value fill", lambda: store("D0")["a"].fill(0.0))
attack("dict tensor add_", lambda: store("D0")["b"].add_(1.0))
attack("clip into shared", lambda: store("X").clip(0.0, 1.0, store("X")))
attack("ParameterList around a shared parameter, load_state_dict",
       lambda: r.torch.nn.ParameterList([store("model").weight]).load_state_dict(
           {"0": r.torch.zeros(2, 3)}))
attack("state_dict entry zero_", lambda: store("model").state_dict()["weight"].zero_())
attack("state_dict keep_vars entry mul_",
       lambda: store("model").state_dict(keep_vars=True)["bias"].mul_(0.0))
attack("module half() in place", lambda: store("model").half())
attack("module requires_grad_", lambda: store("model").requires_grad_(False))
attack("parameter requires_grad_", lambda: store("model").weight.requires_grad_(False))
attack("module zero_grad after backward", lambda: (
    store("model")(r.torch.ones(1, 3)).sum().backward(), store("model").zero_grad()))
attack("ufunc out shared", lambda: r.np.multiply(store("X"), 0.0, store("X")))

# writes through aliases made before unshare
aliases = [r.np.asarray(store("X2")), store("X2")[0:3], r.torch.from_numpy(store("X2")),
           store("WT")[:], store("WT").detach()]
r.np.zeros(1).get("sync:aliases", timeout=60)
flag("unshare")
while not flagged("unshared"):
    time.sleep(0.02)
attack("fill after unshare", lambda: aliases[0].fill(0.0))
attack("slice put after unshare", lambda: aliases[1].put([0], [99.0]))
attack("from_numpy zero_ after unshare", lambda: aliases[2].zero_())
attack("torch slice zero_ after unshare", lambda: aliases[3].zero_())
attack("torch detach add_ after unshare", lambda: aliases[4].add_(5.0))
# the session still works for honest use
results["after"] = outcome(lambda: r.torch.sum(r.store["W"]).get("after", timeout=60))
# ... and the worker's own view of the shared data is unchanged too
results["X after"] = outcome(lambda: r.np.sum(r.store["X"]).get("X after", timeout=60))
results["D0 after"] = outcome(lambda: r.np.sum(r.store["D0"]["a"]).get("D0 after", timeout=60))
results["model after"] = outcome(
    lambda: r.torch.sum(r.store["model"].weight).get("model after", timeout=60))
results["model before"] = model_sum
emit("results", results)
flag("stop")
''')


def test_the_researcher_cannot_modify_owner_data(signaling_url: str, tmp_path: Path) -> None:
    owner, researcher = owner_and_researcher(OWNER, RESEARCHER, server=signaling_url,
                                             tmp=tmp_path)
    try:
        refused = owner.expect("refused")
        results = researcher.expect("results", timeout=400)
        owner.expect("requests", timeout=60)
        changed = owner.expect("changed")
        flags = owner.expect("flags")
        restarts = owner.expect("restarts")
        connected = owner.expect("connected")
    finally:
        owner.kill()
        researcher.kill()
    assert refused.pop("left shared") == []
    assert {name: kind for name, kind in refused.items() if kind == "accepted"} == {}, refused
    assert changed == [], (changed, results)
    assert flags is True
    assert connected is True
    # every crash the researcher was told about is in the owner's audit log
    told = sum(kind == "WorkerRestarted" and "unexpectedly" in message
               for kind, message in results.values())
    assert restarts >= min(told, 1), (restarts, results)
    assert results["after"] == ["value", 72.0], results["after"]
    assert results["X after"] == ["value", 49.0], results["X after"]
    assert results["D0 after"] == ["value", 6.0], results["D0 after"]
    assert results["model before"][0] == "value"
    assert results["model after"] == results["model before"]
    # a crash is one clear error, never the end of the session
    for name, (kind, message) in results.items():
        assert kind in ("value", "WorkerRestarted", "PolicyViolation", "RemoteError",
                        "RequestDenied"), (name, kind, message)
