"""Class 8: the owner's screen cannot lie.

Control, zero-width and bidirectional characters in anything the researcher writes that the
owner reads (reasons, lineage keys, string arguments, string values in previews) are
escaped in ``repr(s.requests)``, ``repr(request)`` and the HTML table; a fake table row
cannot be injected. Previews of huge lists are bounded and built without stalling the
owner's network loop (ping round trips measured while the owner builds them)."""

from __future__ import annotations

import re
from pathlib import Path

from tests.duet.hostile.peerkit import script
from tests.helpers.peers import owner_and_researcher

REASONS = [
    "\x1b[2J\x1b[31mclear the screen, paint it red\x1b[0m",
    "fine\rSTATUS: approved by the owner",
    "\u202eevil reversed\u202c",
    "zero\u200bwidth\u200d joiners",
    "\u2066isolate\u2069 and \u2067rtl isolate\u2069",
    "nul\x00 and del\x7f",
    "C1 CSI \x9b31m and NEL \x85",
    "fake row\nabc1234567890123  12:00:00  approved  mean(x)",
    "arabic letter mark \u061c, bom \ufeff, line separator \u2028, paragraph \u2029",
    "backspaces\x08\x08\x08\x08 and bell \x07 and vertical tab \x0b and form feed \x0c",
]
# what must never reach a terminal unescaped (\n is allowed only between table rows)
UNSAFE = re.compile(
    "[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff]")

OWNER = script('''
import torch
from tests.duet.hostile.peerkit import launch, serve
s = launch()
emit("code", s.code)
s.share(np.arange(5.0), name="x")
s.share({"a": np.arange(3.0)}, name="D")
assert s.wait_for_peer(60)
requests = serve(s)
# the notebook side: the approval panel's HTML and the %duet magics' printed lines
from kernel_ext.display import request_html
emit("panel_html", [request_html(q) for q in s.requests])
import contextlib, io
from IPython.core.interactiveshell import InteractiveShell
from tests.duet.hostile.peerkit import flag
ip = InteractiveShell.instance()
ip.user_ns["s"] = s
ip.extension_manager.load_extension("kernel_ext")
printed = io.StringIO()
with contextlib.redirect_stdout(printed):
    for q in list(s.requests.pending):
        if q.reason in ("lineage key!keep", "string argument!keep"):
            ip.run_line_magic("duet", f"deny {q.id} not today")
emit("magic_output", printed.getvalue())
flag("owner-done")
emit("queue_repr", repr(s.requests))
emit("queue_html", s.requests._repr_html_())
emit("request_reprs", [repr(q) for q in s.requests])
emit("count", len(s.requests))
emit("previews", {k: v["preview_len"] for k, v in requests.items() if k.startswith("huge")})
emit("connected", s.connected)
''')

RESEARCHER = script(f'''
from tests.duet.hostile.peerkit import join, flag, outcome
r = join()
x = r.store["x"]
HANDLES = {{}}
def ask(pointer, reason):
    HANDLES[reason] = pointer.request(reason)
for reason in {REASONS!r}:
    ask(x.sum(), reason + "!keep")
# researcher-controlled text in lineage keys, string arguments and string values
evil = "\\x1b[31m\\u202ekey\\r"
ask(r.store["D"][evil], "lineage key!keep")
ask(x.astype(evil), "string argument!keep")
ask(r.np.full(2, evil), "string value!keep")
ask(r.np.array([evil, "\\x1b]0;title\\x07"]), "string array!keep")
r.np.zeros(1).get("sync", timeout=60)

def pings_while(build, reason):
    ask(build(), reason + "!keep")
    times = []
    started = time.monotonic()
    while time.monotonic() - started < 2.5:
        times.append(r.ping(timeout=60))
    return {{"count": len(times), "max_s": max(times), "median_s": sorted(times)[len(times) // 2]}}

pings = {{
    "huge list": pings_while(lambda: r.np.arange(3_000_000).tolist(), "huge list"),
    "huge nested list": pings_while(
        lambda: r.np.arange(3_000_000).reshape(1000, 3000).tolist(), "huge nested list"),
    "huge torch list": pings_while(lambda: r.torch.arange(3_000_000).tolist(),
                                   "huge torch list"),
    # lists that still fit in one message reach the owner's queue
    "huge 400k list": pings_while(lambda: r.np.arange(400_000).tolist(), "huge 400k list"),
    "huge 600x600 list": pings_while(lambda: r.np.ones((600, 600)).tolist(),
                                     "huge 600x600 list"),
}}
r.np.zeros(1).get("sync", timeout=120)
emit("handles", {{k: outcome(lambda: h.result(0.1)) for k, h in HANDLES.items()}})
emit("pings", pings)
flag("stop")
while not os.path.exists(os.path.join(TMP, "owner-done")):
    time.sleep(0.05)
''')


def test_the_owner_screen_cannot_lie(signaling_url: str, tmp_path: Path) -> None:
    owner, researcher = owner_and_researcher(OWNER, RESEARCHER, server=signaling_url,
                                             tmp=tmp_path)
    try:
        handles = researcher.expect("handles", timeout=300)
        pings = researcher.expect("pings", timeout=60)
        panel_html = owner.expect("panel_html", timeout=120)
        magic_output = owner.expect("magic_output", timeout=60)
        queue_repr = owner.expect("queue_repr", timeout=60)
        queue_html = owner.expect("queue_html")
        request_reprs = owner.expect("request_reprs")
        count = owner.expect("count")
        previews = owner.expect("previews")
        connected = owner.expect("connected")
    finally:
        owner.kill()
        researcher.kill()
    print({"pings_while_building_previews": pings, "preview_chars": previews})
    assert count >= len(REASONS) + 2 + 2
    # the text table: one line per request plus title, header and rule; nothing else
    assert UNSAFE.findall(queue_repr) == [], UNSAFE.findall(queue_repr)
    lines = queue_repr.splitlines()
    assert len(lines[:count + 3]) == count + 3 and not lines[count + 2].startswith("checks of")
    # then the disclosure checks of pending requests: a title and one line per check, each
    # written by duet (no researcher text can add a line)
    check_line = re.compile(r"(checks of [0-9a-f]+ \((PASS|FAIL|REVIEW)\):"
                            r"|  (PASS|FAIL|REVIEW) +[a-z_]+: .*)")
    assert all(check_line.fullmatch(line) for line in lines[count + 3:]), lines[count + 3:]
    assert "\\x1b" in queue_repr and "\\u202e" in queue_repr
    assert UNSAFE.findall(queue_html) == [], UNSAFE.findall(queue_html)
    assert "\\x1b" in queue_html
    # the approval panel (kernel_ext) and what %duet prints show the same text escaped
    assert magic_output.count("denied") == 2, magic_output
    raw = {f"panel {i}": sorted(set(UNSAFE.findall(text))) for i, text in enumerate(panel_html)}
    raw["%duet deny"] = sorted(set(UNSAFE.findall(magic_output)))
    unescaped = {where: chars for where, chars in raw.items() if chars}
    assert unescaped == {}, f"unescaped in {sorted(unescaped)}: {unescaped}"
    for text in request_reprs:
        assert "\n" not in text and UNSAFE.findall(text) == [], text
    assert sum("\\x1b" in text for text in request_reprs) >= 3  # a reason, a key, an argument
    # huge previews: bounded, and the owner answered pings while building them
    for name, stats in pings.items():
        assert stats["count"] > 0, name
    # too large to send at all: refused when frozen, never in the owner's queue
    for name in ("huge list!keep", "huge nested list!keep", "huge torch list!keep"):
        assert name in previews or handles[name][0] == "RequestError", (name, handles[name])
    assert {"huge 400k list!keep", "huge 600x600 list!keep"} <= set(previews), previews
    assert all(0 < length < 100_000 for length in previews.values()), previews
    assert connected is True
