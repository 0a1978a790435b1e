"""Class 3: ``add_rule("approve", max_elements=1)`` never approves more than one element.

Each variant packs a whole shared array into something that could look like one element:
a slice object, a structured dtype, containers, a dict, a module, bytes and strings."""

from __future__ import annotations

from pathlib import Path

from tests.duet.hostile.peerkit import script
from tests.helpers.peers import owner_and_researcher

OWNER = script('''
import torch
from tests.duet.hostile.peerkit import launch, serve
s = launch()
emit("code", s.code)
s.share(np.array([7.25, 8.5, 9.75, 11.0, 12.5]), name="secret")
s.share(torch.arange(12.0).reshape(4, 3), name="W")
model = torch.nn.Linear(1, 1)
s.share(model, name="model")
s.requests.add_rule("approve", max_elements=1)
assert s.wait_for_peer(60)
requests = serve(s)          # every reason ends in !keep: only the rule decides
emit("requests", requests)
emit("connected", s.connected)
''')

RESEARCHER = script('''
import secrets
from tests.duet.hostile.peerkit import join, flag, outcome
from tests.helpers.rawwire import send_raw, op, new_id
from duet import protocol as p
r = join()
x = r.store["secret"]
W = r.store["W"]
model = r.store["model"]
local = {}
handles = {}

def ask(name, build):
    try:
        pointer = build()
        handles[name] = pointer.request(name + "!keep")
    except duet.PolicyViolation as exc:
        local[name] = str(exc)

def ask_raw(name, result):
    send_raw(r, p.RequestValue(request_id=secrets.token_hex(8), target=p.PointerRef(result),
                               reason=name + "!keep"))

ask("control: one sum", lambda: r.np.sum(x))
# a slice object wrapping the array, built on the raw wire (and with a shared stop too)
for name, args in [("slice", [p.StoreRef("secret"), None, None]),
                   ("slice3", [0, p.StoreRef("W"), p.StoreRef("secret")])]:
    result = new_id(r)
    send_raw(r, op(result, "builtins.slice", args=args))
    ask_raw(name, result)
ask("structured array", lambda: r.np.array([(x,)], dtype=[("f", "f8", (5,))]))
ask("structured tolist", lambda: r.np.array([(x,)], dtype=[("f", "f8", (5,))]).tolist())
ask("structured item", lambda: r.np.array([(x,)], dtype=[("f", "f8", (5,))]).item())
ask("structured view", lambda: x.view([("f", "<f8", (5,))]))
ask("structured via torch", lambda: r.np.array([(W.numpy(),)], dtype=[("f", "f4", (4, 3))]))
ask("split list", lambda: r.np.split(x, 5))
ask("torch split tuple", lambda: r.torch.split(W.flatten(), 1))
ask("nested", lambda: r.np.split(r.np.stack([x, x]), 2))
ask("state_dict", lambda: model.state_dict())
ask("module", lambda: model)
ask("parameters", lambda: model.parameters())
ask("tolist", lambda: x.tolist())
ask("tobytes", lambda: x.tobytes())
ask("array2string", lambda: r.np.array2string(x))
ask("broadcast view", lambda: r.np.broadcast_to(x[0:1], (1000,)))
ask("object array", lambda: r.np.array([x], dtype=object))
ask("unique tuple", lambda: r.torch.unique(W, return_counts=True))
r.np.zeros(1).get("sync", timeout=60)
time.sleep(1.0)
r.np.zeros(1).get("sync", timeout=60)
emit("local", local)
emit("handles", {k: outcome(lambda: h.result(0.5)) for k, h in handles.items()})
flag("stop")
''')


def test_max_elements_one_approves_one_element_only(signaling_url: str, tmp_path: Path) -> None:
    owner, researcher = owner_and_researcher(OWNER, RESEARCHER, server=signaling_url,
                                             tmp=tmp_path)
    try:
        local = researcher.expect("local", timeout=180)
        handles = researcher.expect("handles", timeout=60)
        requests = owner.expect("requests", timeout=60)
        assert owner.expect("connected") is True
    finally:
        owner.kill()
        researcher.kill()
    statuses = {reason.removesuffix("!keep"): info["status"] for reason, info in requests.items()
                if reason.endswith("!keep")}
    assert statuses.pop("control: one sum") == "approved"  # the rule works
    assert handles.pop("control: one sum") == ["value", 49.0]
    # every variant was asked for, and none came back as a value
    assert len(handles) + len(local) + 2 == 19, (handles, local)
    assert {name: result for name, result in handles.items() if result[0] == "value"} == {}
    # the rule approved nothing that holds data: only failures (refusals by name, values that
    # cannot be sent), which hold no elements and release only the kind of failure
    approved = {name: requests[name + "!keep"]["preview"] for name, status in statuses.items()
                if status == "approved"}
    assert all(preview.startswith("failed:") for preview in approved.values()), approved


NAME_OWNER = script('''
from tests.duet.hostile.peerkit import launch, serve
s = launch()
emit("code", s.code)
s.share(np.array([7.25, 8.5, 9.75, 11.0, 12.5]), name="secret")
s.share(np.array([1.0, 2.0, 3.0, 4.0, 5.0]), name="public", description="published")
# "approve what derives from the public table": nothing that also derives from the secret
s.requests.add_rule("approve", name="public")
assert s.wait_for_peer(60)
requests = serve(s)          # every reason ends in !keep: only the rule decides
emit("requests", {k: [v["status"], v["sources"]] for k, v in requests.items()})
''')

NAME_RESEARCHER = script('''
from tests.duet.hostile.peerkit import join, flag, outcome
r = join()
x, public = r.store["secret"], r.store["public"]
asks = {
    "control: public only": public * 2,
    "concatenate": r.np.concatenate([public, x]),
    "public plus a secret sum": public + x.sum(),
    "where on the secret": r.np.where(x > 10, public, -public),
    "sorted by the secret": public[r.np.argsort(x)],
}
handles = {name: pointer.request(name + "!keep") for name, pointer in asks.items()}
r.np.zeros(1).request("sync").result(60)
time.sleep(0.5)
emit("outcomes", {name: outcome(lambda: h.result(0.5)) for name, h in handles.items()})
flag("stop")
''')


def test_an_approve_rule_by_name_releases_nothing_from_other_sources(
        signaling_url: str, tmp_path: Path) -> None:
    owner, researcher = owner_and_researcher(NAME_OWNER, NAME_RESEARCHER,
                                             server=signaling_url, tmp=tmp_path)
    try:
        outcomes = researcher.expect("outcomes", timeout=120)
        requests = owner.expect("requests", timeout=60)
    finally:
        owner.kill()
        researcher.kill()
    assert outcomes.pop("control: public only") == ["value", [2.0, 4.0, 6.0, 8.0, 10.0]]
    for name in outcomes:
        assert requests[name + "!keep"][1] == ["public", "secret"], requests[name + "!keep"]
    released = {name: result for name, result in outcomes.items() if result[0] == "value"}
    assert released == {}, released
