"""Class 7: no operation changes process-wide state of the owner's kernel.

The researcher reseeds torch and numpy, turns off autograd, changes the default dtype, the
floating-point error mode and the thread count; the owner's own RNG streams (compared with
a locally seeded reference) and settings are unchanged. Seeding is per session: the same
seed gives the researcher the same draws."""

from __future__ import annotations

from pathlib import Path

from tests.duet.hostile.peerkit import script
from tests.helpers.peers import owner_and_researcher

OWNER = script('''
import torch
from tests.duet.hostile.peerkit import launch, serve
s = launch()
emit("code", s.code)
s.share(np.arange(5.0), name="x")
torch.manual_seed(1234)
torch_reference = torch.rand(6)
np.random.seed(99)
numpy_reference = np.random.rand(6)
torch.manual_seed(1234)
np.random.seed(99)
torch_first = torch.rand(3)
numpy_first = np.random.rand(3)
def settings():
    return [str(torch.get_default_dtype()), torch.is_grad_enabled(), torch.get_num_threads(),
            np.geterr(), torch.are_deterministic_algorithms_enabled()]
before = settings()
assert s.wait_for_peer(60)
serve(s)
emit("torch_rng", torch.equal(torch.cat([torch_first, torch.rand(3)]), torch_reference))
emit("numpy_rng", bool((np.concatenate([numpy_first, np.random.rand(3)])
                        == numpy_reference).all()))
emit("settings", [repr(before), repr(settings())])
emit("connected", s.connected)
''')

RESEARCHER = script('''
from tests.duet.hostile.peerkit import join, flag, outcome
r = join()
tried = {}

def attempt(name, build):
    try:
        tried[name] = outcome(lambda: build().get(name, timeout=60))
    except duet.DuetError as exc:
        tried[name] = [type(exc).__name__, str(exc)]

attempt("torch.manual_seed", lambda: r.torch.manual_seed(0))
attempt("torch.seed", lambda: r.torch.seed())
attempt("torch.random.manual_seed", lambda: r.torch.random.manual_seed(0))
attempt("np.random.seed", lambda: r.np.random.seed(0))
attempt("torch.set_grad_enabled", lambda: r.torch.set_grad_enabled(False))
attempt("torch.set_default_dtype", lambda: r.torch.set_default_dtype(r.torch.float64))
attempt("np.seterr", lambda: r.np.seterr(all="raise"))
attempt("torch.set_num_threads", lambda: r.torch.set_num_threads(1))
attempt("torch.use_deterministic_algorithms",
        lambda: r.torch.use_deterministic_algorithms(True))
# per-session seeding: the same seed, the same draws
draws = []
for _ in range(2):
    try:
        r.torch.manual_seed(7)
        draws.append(r.torch.rand(3).get("draw", timeout=60).tolist())
    except duet.DuetError as exc:
        draws.append([type(exc).__name__])
emit("tried", tried)
emit("draws", draws)
flag("stop")
''')


def test_process_wide_state_is_untouched(signaling_url: str, tmp_path: Path) -> None:
    owner, researcher = owner_and_researcher(OWNER, RESEARCHER, server=signaling_url,
                                             tmp=tmp_path)
    try:
        tried = researcher.expect("tried", timeout=180)
        draws = researcher.expect("draws")
        torch_rng = owner.expect("torch_rng", timeout=60)
        numpy_rng = owner.expect("numpy_rng")
        before, after = owner.expect("settings")
        connected = owner.expect("connected")
    finally:
        owner.kill()
        researcher.kill()
    assert tried["torch.manual_seed"][0] != "PolicyViolation", tried  # allowlisted: it ran
    assert torch_rng is True
    assert numpy_rng is True
    assert before == after
    assert connected is True
    assert draws[0] == draws[1] and len(draws[0]) == 3, draws
