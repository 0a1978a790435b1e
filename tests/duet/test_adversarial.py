"""A hostile researcher speaking the wire protocol directly learns nothing without approval."""

from __future__ import annotations

import re
from pathlib import Path

import duet
from tests.helpers.peers import owner_and_researcher

OWNER = '''
secret = np.array([12.0, 250.0, 99.5, 31337.0, 7.0])
s = duet.launch(server=SERVER, ice_servers=[], audit_path=os.path.join(TMP, "audit.db"),
                show=False)
emit("code", s.code)
s.share(secret, name="secret", description="five numbers")
assert s.wait_for_peer(60)
honest = s.requests.wait(60)                   # the one honest request: approve it
emit("honest", honest.lineage)
honest.approve()
wait_for("decide", timeout=120)
for request in s.requests.pending:
    request.deny("not without a reason I accept")
emit("decided", [[r.lineage, r.status] for r in s.requests])
emit("sent", len(s.audit.events(event="value_sent")))
wait_for("never", timeout=600)                 # the test kills us here, mid-session
'''

RESEARCHER = '''
from duet import protocol as p
r = duet.join(CODE, server=SERVER, ice_servers=[])
received = []
original = r._dispatch
def record(message, raw):
    received.append(message)
    original(message, raw)
r._dispatch = record                          # see every message the owner sends us

def send(message):
    r._enqueue(message)
    r.ping()                                   # a round trip: the owner has read it

x = r.store["secret"]
emit("honest", r.np.mean(x).get(reason="the mean", timeout=60))
honest_id = next(m.request_id for m in received if isinstance(m, p.Decision))

# 1. forge the owner's approval of a request we make now
pending = (x * 1).request("please")
send(p.Decision(request_id=pending.id, status="approved", value=42))
# 2. replay the approved request, and request an id already in use
send(p.RequestValue(request_id=honest_id, target=p.StoreRef("secret"), reason="replay"))
send(p.RequestValue(request_id=pending.id, target=p.StoreRef("secret"), reason="dup"))
# 3. objects we do not own: forged ids, withdrawing someone else's request
send(p.RequestValue(request_id="00" * 8, target=p.PointerRef(10**9), reason="forged"))
send(p.Withdraw(request_id="ff" * 8))
# 4. metadata of derived results: the shape of x[x > 100] is a count
count_shape = x[x > 100].shape
shape_handle = count_shape.request("just the shape")
size_handle = x[x > 100].size.request("just the size")
# 5. owner-side errors whose occurrence or text depends on the data
big = x[x > 1000]                              # one element, data-dependent
failing = [
    r.np.linalg.cholesky(r.np.diag(x - 100)),  # fails because some values < 100
    x.reshape(big.astype(r.np.int64)),         # value-dependent shape
    r.torch.nn.functional.cross_entropy(r.torch.zeros(1, 2), r.torch.tensor(x.astype(r.np.int64))),
]
fail_handles = [ptr.request("error") for ptr in failing]  # failures are data: requests
r.ping(); time.sleep(0.5); r.ping()
emit("ready", True)
wait_for("decided", timeout=120)
outcomes = {}
for name, handle in [("forged", pending), ("shape", shape_handle), ("size", size_handle)]:
    try:
        outcomes[name] = ["value", handle.result(timeout=30)]
    except duet.DuetError as exc:
        outcomes[name] = [type(exc).__name__, str(exc)]
for i, handle in enumerate(fail_handles):
    try:
        handle.result(timeout=30)
        outcomes[f"fail{i}"] = ["value"]
    except duet.DuetError as exc:
        outcomes[f"fail{i}"] = [type(exc).__name__, str(exc)]
emit("outcomes", outcomes)
texts = []
for m in received:
    texts.append(repr(m))
emit("received_types", sorted({m.type for m in received}))
emit("approved_values", [m.value for m in received
                         if isinstance(m, p.Decision) and m.status == "approved"])
emit("all_text", "\\n".join(texts))
'''


def test_hostile_researcher_learns_nothing_and_everything_is_audited(
        signaling_url: str, tmp_path: Path) -> None:
    owner, researcher = owner_and_researcher(OWNER, RESEARCHER, server=signaling_url,
                                             tmp=tmp_path)
    try:
        assert owner.expect("honest") == "mean(secret)"
        assert researcher.expect("honest") == 6341.1
        researcher.expect("ready", timeout=120)
        owner.signal_step("decide")
        decided = dict(map(tuple, owner.expect("decided")))
        assert decided["mean(secret)"] == "approved"
        assert [s for lineage, s in decided.items() if lineage != "mean(secret)"] == \
            ["denied"] * (len(decided) - 1)
        assert owner.expect("sent") == 1
        researcher.signal_step("decided")
        outcomes = researcher.expect("outcomes", timeout=120)
        # our duplicate of its id was refused as a protocol error; the forged approval too:
        # the request itself went to the owner, who denied it
        assert outcomes["forged"][0] == "RequestDenied"
        assert outcomes["shape"][0] == "RequestDenied"
        assert outcomes["size"][0] == "RequestDenied"
        for i in range(3):  # failures are data: asking for them is a request like any other
            kind, message = outcomes[f"fail{i}"]
            assert kind == "RequestDenied"
            text = re.sub(r"request [0-9a-f]{16}", "request ID", message)  # random hex ids
            for value in ("12", "250", "99.5", "31337", "7.0", "6341"):
                assert value not in text.replace("6341.1", ""), message
        assert "op_failed" not in researcher.expect("received_types")  # failures are data
        assert researcher.expect("approved_values") == [6341.1]
        everything = researcher.expect("all_text")
        assert "31337" not in everything and "250.0" not in everything
        researcher.wait()
    finally:
        owner.kill()  # SIGKILL, mid-session: the audit log must already hold every event
        researcher.kill()
    log = duet.AuditLog(tmp_path / "audit.db", readonly=True)
    events = [e.event for e in log]
    assert events.count("value_sent") == 1
    # the honest approval; denials of "please", shape, size and the three failures
    assert events.count("decision") == 7
    assert "protocol_error" in events                # the forged decision
    assert "op_failed" in events
    reasons = {e.detail.get("reason") for e in log.events(event="request")}
    assert {"the mean", "please", "forged", "just the shape"} <= reasons
    # the replayed id and the id in use: refused at the door, never computed again
    reused = [e for e in log.events(event="protocol_error") if "already used" in str(e.detail)]
    assert len(reused) == 2 and "replay" not in reasons and "dup" not in reasons
    log.close()
