"""Class 6: the owner's allowlist cannot re-open the denylist, by any spelling.

The owner tries to allow names that write files, expose raw memory or run hooks, spelled
every way that reaches the same object; each raises ValueError and allows nothing. The
researcher then tries them all, through the API and on the raw wire."""

from __future__ import annotations

from pathlib import Path

from tests.duet.hostile.peerkit import script
from tests.helpers.peers import owner_and_researcher

DENIED = [
    "numpy.ndarray.tofile", "numpy.ndarray.dump", "numpy.ndarray.dumps",
    "numpy.ndarray.setflags", "torch.Tensor.untyped_storage", "torch.Tensor.data_ptr",
    "torch.UntypedStorage.from_file", "torch.nn.Module.apply",
    "torch.nn.Module.register_forward_hook",
    # other spellings of the same objects
    "ndarray.tofile", "ndarray.dump", "ndarray.setflags", "Tensor.untyped_storage",
    "Tensor.data_ptr", "Module.apply", "Module.register_forward_hook",
    "torch.nn.Linear.apply", "torch.nn.modules.module.Module.apply",
    "torch.nn.Sequential.register_forward_hook", "torch.storage.UntypedStorage.from_file",
    "numpy.memmap.tofile", "numpy.matrix.dump", "numpy.recarray.tofile",
    "torch.nn.Parameter.data_ptr", "torch.Tensor.storage", "Tensor.storage",
    "torch.Tensor.register_hook", "Module.register_forward_pre_hook",
    "Module.register_full_backward_hook", "torch.Tensor.share_memory_", "Tensor.set_",
    # files and processes by function
    "numpy.save", "numpy.load", "numpy.fromfile", "numpy.memmap", "numpy.lib.format.open_memmap",
    "torch.save", "torch.load", "torch.from_file", "numpy.ctypeslib.as_array",
    # whole packages
    "numpy", "torch",
]
# Names the owner may allow as callables (constructors), which contain denied members: the
# researcher must still be refused every denied member after the owner allows them.
CONTAINERS = ["numpy.ndarray", "torch.Tensor", "torch.nn.Module", "torch.UntypedStorage"]

OWNER = script(f'''
import torch
from tests.duet.hostile.peerkit import launch, serve
s = launch()
emit("code", s.code)
s.share(np.array([7.25, 8.5, 9.75, 11.0, 12.5]), name="x")
s.share(torch.arange(12.0).reshape(4, 3), name="W")
s.share(torch.nn.Linear(3, 2), name="model")
accepted = []
for name in {DENIED!r}:
    for mutating in (False, True):
        try:
            s.allow(name, mutating=mutating)
            accepted.append([name, mutating])
        except ValueError:
            pass
emit("accepted", accepted)
for name in {CONTAINERS!r}:
    try:
        s.allow(name)
    except ValueError:
        pass
# a mixed call: one harmless name, one denied: the call fails and allows nothing
try:
    s.allow("numpy.fft.fft", "numpy.ndarray.tofile")
    emit("mixed", "accepted")
except ValueError:
    emit("mixed", "ValueError")
s.allow("numpy.fft.ifft")          # a later, valid allow publishes the allowlist again
assert s.wait_for_peer(60)
requests = serve(s)
emit("files", sorted(p for p in os.listdir(TMP) if p.startswith("leak")))
emit("connected", s.connected)
''')

RESEARCHER = script('''
from tests.duet.hostile.peerkit import join, flag, outcome
from tests.helpers.rawwire import send_raw, op, new_id, record_received
from duet import protocol as p
r = join()
received = record_received(r)
x, W, model = r.store["x"], r.store["W"], r.store["model"]
leak = os.path.join(TMP, "leak")
tries = {
    "tofile": lambda: x.tofile(leak + "1"),
    "dump": lambda: x.dump(leak + "2"),
    "setflags": lambda: x.setflags(write=True),
    "untyped_storage": lambda: W.untyped_storage(),
    "data_ptr": lambda: W.data_ptr(),
    "UntypedStorage.from_file": lambda: r.torch.UntypedStorage.from_file(leak + "3", True, 8),
    "apply": lambda: model.apply(r.torch.nn.Identity()),
    "register_forward_hook": lambda: model.register_forward_hook(r.torch.nn.Identity()),
    "numpy.save": lambda: r.np.save(leak + "4", x),
    "torch.save": lambda: r.torch.save(W, leak + "5"),
    "fft (mixed allow)": lambda: r.np.fft.fft(x),
    "ifft (allowed)": lambda: r.np.fft.ifft(x).real.sum(),
}
out = {}
for name, attempt in tries.items():
    out[name] = outcome(lambda: attempt().get(name, timeout=30))
# the same on the raw wire, spelled as the owner would have allowed them
raw = {
    "raw tofile": op(new_id(r), "tofile", kind="method", target=p.StoreRef("x"),
                     args=[leak + "6"]),
    "raw numpy.ndarray.tofile": op(new_id(r), "numpy.ndarray.tofile",
                                   args=[p.StoreRef("x"), leak + "7"]),
    "raw from_file": op(new_id(r), "torch.UntypedStorage.from_file", args=[leak + "8", True, 8]),
    "raw apply": op(new_id(r), "apply", kind="method", target=p.StoreRef("model"),
                    args=[p.StoreRef("model")]),
    "raw data_ptr": op(new_id(r), "data_ptr", kind="method", target=p.StoreRef("W")),
    "raw setflags": op(new_id(r), "setflags", kind="method", target=p.StoreRef("x"),
                       kwargs={"write": True}),
    "raw torch.Tensor.data_ptr": op(new_id(r), "torch.Tensor.data_ptr",
                                    args=[p.StoreRef("W")]),
    "raw numpy.ndarray.dump": op(new_id(r), "numpy.ndarray.dump",
                                 args=[p.StoreRef("x"), leak + "9"]),
    "raw Module.apply": op(new_id(r), "torch.nn.Module.apply",
                           args=[p.StoreRef("model"), p.StoreRef("model")]),
}
for message in raw.values():
    send_raw(r, message)
r.np.zeros(1).get("sync", timeout=60)
refused = {m.result for m in received if m.type == "op_failed" and m.policy}
for name, message in raw.items():
    out[name] = ["PolicyViolation" if message.result in refused else "not refused", ""]
# a constructor over a shared buffer must not write the shared data
for name, attempt in [
        ("ndarray over the shared buffer",
         lambda: r.np.ndarray((5,), "f8", x).fill(0.0)),
        ("Tensor over the shared tensor", lambda: r.torch.Tensor(W).zero_())]:
    try:
        attempt()
    except duet.DuetError:
        pass
out["x after"] = outcome(lambda: r.np.sum(r.store["x"]).get("x after", timeout=60))
out["W after"] = outcome(lambda: r.torch.sum(r.store["W"]).get("W after", timeout=60))
emit("out", out)
flag("stop")
''')


def test_the_denylist_wins(signaling_url: str, tmp_path: Path) -> None:
    owner, researcher = owner_and_researcher(OWNER, RESEARCHER, server=signaling_url,
                                             tmp=tmp_path)
    try:
        accepted = owner.expect("accepted")
        mixed = owner.expect("mixed")
        out = researcher.expect("out", timeout=180)
        files = owner.expect("files", timeout=60)
        connected = owner.expect("connected")
    finally:
        owner.kill()
        researcher.kill()
    assert accepted == [], accepted
    assert files == [] and not list(tmp_path.glob("leak*")), files
    assert connected is True
    not_refused = {name: result for name, result in out.items()
                   if name not in ("fft (mixed allow)", "x after", "W after", "ifft (allowed)")
                   and result[0] != "PolicyViolation"}
    assert not_refused == {}, not_refused
    assert out["x after"] == ["value", 49.0] and out["W after"] == ["value", 66.0], out
    # an allow call that raises allows nothing, not even its harmless names
    assert mixed == "ValueError"
    assert out["ifft (allowed)"][0] == "value", out["ifft (allowed)"]
    assert out["fft (mixed allow)"][0] == "PolicyViolation", out["fft (mixed allow)"]
