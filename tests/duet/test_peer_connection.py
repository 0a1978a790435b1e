"""Owner and researcher as two OS processes over real aiortc, through the real signaling server."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.helpers.peers import PeerProcess, owner_and_researcher
from tests.helpers.tamper import tampering_relay

# Deterministic payloads both processes can rebuild, so each side hashes its own copy.
PAYLOADS = '''
import hashlib
import torch

NUMPY_DTYPES = ["bool", "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32",
                "uint64", "float16", "float32", "float64", "complex64", "complex128"]
TORCH_DTYPES = ["bool", "uint8", "int8", "int16", "int32", "int64", "float16", "bfloat16",
                "float32", "float64", "complex64", "complex128"]

def numpy_payload(dtype):
    raw = np.random.default_rng(7).integers(0, 256, 3 * 5 * 4 * 16, dtype=np.uint8)
    count = 60 * 16 // np.dtype(dtype).itemsize
    return raw.view(dtype)[:count].reshape(-1, 3)[::2]        # non-contiguous

def torch_payload(dtype):
    base = torch.linspace(-50, 50, 120, dtype=torch.float64).reshape(4, 30)
    t = (base > 0) if dtype == "bool" else base.to(getattr(torch, dtype))
    return t.t()                                              # non-contiguous

def digest(value):
    if isinstance(value, torch.Tensor):
        value = value.contiguous()
        if value.dtype == torch.bfloat16:
            value = value.view(torch.int16)
        value = value.numpy()
    return [str(value.dtype), list(value.shape),
            hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()]
'''


def test_pairing_and_every_dtype_round_trips_bit_exact(signaling_url: str,
                                                        tmp_path: Path) -> None:
    owner_script = PAYLOADS + '''
s = duet.launch(server=SERVER, ice_servers=[], audit_path=os.path.join(TMP, "audit.db"), show=False)
emit("code", s.code)
for d in NUMPY_DTYPES:
    s.share(numpy_payload(d), name=f"np_{d}")
for d in TORCH_DTYPES:
    s.share(torch_payload(d), name=f"torch_{d}")
s.requests.add_rule("approve")
assert s.wait_for_peer(60)
emit("connected", s.connected)
emit("digests", {**{f"np_{d}": digest(numpy_payload(d)) for d in NUMPY_DTYPES},
                 **{f"torch_{d}": digest(torch_payload(d)) for d in TORCH_DTYPES}})
wait_for("done")
s.close()
'''
    researcher_script = PAYLOADS + '''
t0 = time.perf_counter()
r = duet.join(CODE, server=SERVER, ice_servers=[])
emit("setup_s", time.perf_counter() - t0)
emit("store", sorted(r.store))
got = {name: digest(r.store[name].get(reason="round trip", timeout=60)) for name in r.store}
emit("digests", got)
r.close()
'''
    owner, researcher = owner_and_researcher(owner_script, researcher_script,
                                             server=signaling_url, tmp=tmp_path)
    try:
        assert owner.expect("connected") is True
        expected = owner.expect("digests")
        assert len(researcher.expect("store")) == 26
        assert researcher.expect("digests") == expected
        owner.signal_step("done")
        assert researcher.wait() == 0, researcher.output
        assert owner.wait() == 0, owner.output
    finally:
        owner.kill()
        researcher.kill()


def test_256_mib_tensor_arrives_intact(signaling_url: str, tmp_path: Path) -> None:
    owner_script = '''
import hashlib, torch
big = torch.arange(64 * 1024 * 1024, dtype=torch.int32)          # 256 MiB
s = duet.launch(server=SERVER, ice_servers=[], audit_path=os.path.join(TMP, "audit.db"), show=False)
emit("code", s.code)
s.share(big, name="big")
s.requests.add_rule("approve")
assert s.wait_for_peer(60)
emit("sha", hashlib.sha256(big.numpy().tobytes()).hexdigest())
wait_for("done", timeout=600)
emit("sent", [(e.nbytes, e.sha256) for e in s.audit.events(event="value_sent")])
s.close()
'''
    researcher_script = '''
import hashlib
r = duet.join(CODE, server=SERVER, ice_servers=[], progress=False)
t0 = time.perf_counter()
value = r.store.wait_for("big", 120).get(reason="all of it", timeout=600)
emit("seconds", time.perf_counter() - t0)
emit("sha", hashlib.sha256(value.numpy().tobytes()).hexdigest())
emit("shape", [list(value.shape), str(value.dtype)])
r.close()
'''
    owner, researcher = owner_and_researcher(owner_script, researcher_script,
                                             server=signaling_url, tmp=tmp_path)
    try:
        expected = owner.expect("sha")
        researcher.expect("seconds", timeout=600)
        assert researcher.expect("sha") == expected
        assert researcher.expect("shape") == [[64 * 1024 * 1024], "torch.int32"]
        owner.signal_step("done")
        sent = owner.expect("sent")
        assert len(sent) == 1 and sent[0][0] > 256 * 1024 * 1024
        assert researcher.wait() == 0 and owner.wait() == 0
    finally:
        owner.kill()
        researcher.kill()


def test_tampering_signaling_server_cannot_pair_the_peers(signaling_url: str,
                                                          tmp_path: Path) -> None:
    with tampering_relay(signaling_url) as (relay_url, rewritten):
        owner_script = '''
s = duet.launch(server=SERVER, ice_servers=[], audit_path=os.path.join(TMP, "audit.db"),
                show=False, connect_timeout=15)
s.share(np.arange(5), name="secret")
emit("code", s.code)
try:
    s.wait_for_peer(60)
    emit("owner", "connected")
except duet.PairingError as exc:
    emit("owner", f"PairingError: {exc}")
emit("events", [e.event for e in s.audit])
s.close()
'''
        researcher_script = '''
try:
    r = duet.join(CODE, server=SERVER, ice_servers=[], connect_timeout=15)
    emit("researcher", f"connected, store={sorted(r.store)}")
except duet.PairingError as exc:
    emit("researcher", f"PairingError: {exc}")
'''
        owner, researcher = owner_and_researcher(owner_script, researcher_script,
                                                 server=relay_url, tmp=tmp_path)
        try:
            outcome = researcher.expect("researcher", timeout=90)
            assert outcome.startswith("PairingError") and "authentication" in outcome
            owner_outcome = owner.expect("owner", timeout=90)
            assert owner_outcome.startswith("PairingError")
            events = owner.expect("events")
            assert "peer_authenticated" not in events and "request" not in events
            assert "offer" in rewritten
            assert researcher.wait() == 0 and owner.wait() == 0
        finally:
            owner.kill()
            researcher.kill()


@pytest.mark.parametrize("victim", ["owner", "researcher"])
def test_peer_killed_mid_transfer_fails_pending_calls_promptly(
        signaling_url: str, tmp_path: Path, victim: str) -> None:
    owner_script = '''
import torch
s = duet.launch(server=SERVER, ice_servers=[], audit_path=os.path.join(TMP, "audit.db"),
                show=False, liveness_timeout=3)
emit("code", s.code)
s.share(torch.zeros(96 * 1024 * 1024 // 4), name="big")   # 96 MiB: several seconds to send
s.requests.add_rule("approve", name="big")
assert s.wait_for_peer(60)
emit("connected", True)
while s.connected:
    time.sleep(0.05)
emit("lost_at", time.time())
try:
    s.requests.wait(0.01)
    emit("pending_after_loss", len(s.requests.pending))
finally:
    emit("events", [e.event for e in s.audit])
'''
    researcher_script = '''
r = duet.join(CODE, server=SERVER, ice_servers=[], progress=False, liveness_timeout=3)
handle = r.store.wait_for("big", 120).request("all of it")
emit("requested", True)
try:
    handle.result(timeout=120)
    emit("outcome", "value")
except duet.ConnectionLost as exc:
    emit("outcome", f"ConnectionLost: {exc}")
emit("lost_at", time.time())
emit("connected", r.connected)
'''
    owner, researcher = owner_and_researcher(owner_script, researcher_script,
                                             server=signaling_url, tmp=tmp_path)
    try:
        assert owner.expect("connected") is True
        researcher.expect("requested")
        time.sleep(1.0)  # the transfer is under way
        killed_at = time.time()
        survivor: PeerProcess
        if victim == "owner":
            owner.kill()
            survivor = researcher
            assert survivor.expect("outcome", timeout=60).startswith("ConnectionLost")
        else:
            researcher.kill()
            survivor = owner
        lost_at = survivor.expect("lost_at", timeout=60)
        # "promptly": within the liveness timeout plus slack, never the 30 s ICE consent limit
        assert lost_at - killed_at < 20
        if victim == "owner":
            assert survivor.expect("connected") is False
        if victim == "researcher":
            assert "disconnect" in owner.expect("events")
        assert survivor.wait() == 0
    finally:
        owner.kill()
        researcher.kill()


def test_garbage_frames_on_the_data_channel_leave_the_session_up(
        signaling_url: str, tmp_path: Path) -> None:
    owner_script = '''
s = duet.launch(server=SERVER, ice_servers=[], audit_path=os.path.join(TMP, "audit.db"),
                show=False)
emit("code", s.code)
s.share(np.arange(10.0), name="x")
s.requests.add_rule("approve")
assert s.wait_for_peer(60)
wait_for("done")
emit("errors", [e.detail for e in s.audit.events(event="protocol_error")])
emit("connected", s.connected)
s.close()
'''
    researcher_script = '''
import msgpack
r = duet.join(CODE, server=SERVER, ice_servers=[])
channel = r._transport.channel            # a hostile peer writes raw frames
for frame in [b"", b"\\x09junk", b"\\x01\\xc1\\xc1", b"\\x01" + msgpack.packb({"type": "nope"}),
              b"\\x03\\x00\\x00\\x00\\x2a" + b"x" * 100, b"\\x02" + b"\\xff" * 11,
              b"\\x01" + msgpack.packb({"type": "ops", "ops": [{"result": 1, "kind": "eval",
                                                                "name": "os.system"}]}),
              "text frame"]:
    channel.send(frame)
x = r.store["x"]
emit("mean", r.np.mean(x * 2).get(reason="after garbage", timeout=30))
emit("connected", r.connected)
wait_for("release")
r.close()
'''
    owner, researcher = owner_and_researcher(owner_script, researcher_script,
                                             server=signaling_url, tmp=tmp_path)
    try:
        assert researcher.expect("mean") == 9.0
        assert researcher.expect("connected") is True
        owner.signal_step("done")
        errors = owner.expect("errors")
        assert len(errors) >= 6, errors
        assert owner.expect("connected") is True
        owner.signal_step("release")
        assert researcher.wait() == 0 and owner.wait() == 0
    finally:
        owner.kill()
        researcher.kill()


def test_closing_either_side_is_seen_by_the_other(signaling_url: str, tmp_path: Path) -> None:
    owner_script = '''
s = duet.launch(server=SERVER, ice_servers=[], audit_path=os.path.join(TMP, "audit.db"),
                show=False)
emit("code", s.code)
s.share(np.arange(3), name="x")
assert s.wait_for_peer(60)
req = s.requests.wait(60)
emit("request", req.lineage)
t0 = time.monotonic()
while s.connected:
    time.sleep(0.01)
emit("noticed_s", time.monotonic() - t0)
try:
    req.approve()
    emit("approve", "sent?!")
except duet.RequestError as exc:
    emit("approve", f"RequestError: {exc}")
s.close(); s.close()
emit("closed", True)
'''
    researcher_script = '''
r = duet.join(CODE, server=SERVER, ice_servers=[])
handle = r.store["x"].request("please")
time.sleep(0.5)
r.close(); r.close()
try:
    r.store["x"].get("after close", timeout=5)
except duet.ConnectionLost as exc:
    emit("after_close", f"ConnectionLost: {exc}")
emit("handle", handle.status)
'''
    owner, researcher = owner_and_researcher(owner_script, researcher_script,
                                             server=signaling_url, tmp=tmp_path)
    try:
        assert owner.expect("request") == "x"
        assert researcher.expect("after_close").startswith("ConnectionLost")
        assert researcher.expect("handle") == "error"
        assert owner.expect("noticed_s") < 15
        assert owner.expect("approve").startswith("RequestError")
        assert owner.expect("closed") is True
        assert owner.wait() == 0 and researcher.wait() == 0
        audit = json.loads(json.dumps(owner.output))
        assert "Traceback" not in audit
    finally:
        owner.kill()
        researcher.kill()
