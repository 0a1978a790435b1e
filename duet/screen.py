"""Text the researcher wrote, made safe to show the owner.

Reasons, lineage, names and values reach the owner's terminal and notebook (the approval
queue, the panel, the audit log). A character that moves the cursor, recolours or reorders
a line, hides text or draws over other lines would let the researcher change what the owner
reads; each is shown escaped instead, as Python's ``unicode_escape`` writes it.
"""

from __future__ import annotations

import re

__all__ = ["safe_text"]

# Letters that draw nothing at all (Hangul fillers, the braille blank): printable to Python,
# invisible to the owner.
_BLANK_LETTERS = frozenset("\u115f\u1160\u2800\u3164\uffa0")
# Stacks of combining marks ("zalgo" text) draw far above and below their line, over the
# owner's other lines (the sources, the status); real text stacks one or two.
_MARK_STACK = re.compile("[\u0300-\u036f\u0483-\u0489\u1ab0-\u1aff\u1dc0-\u1dff"
                         "\u20d0-\u20ff\ufe20-\ufe2f]{3,}")


def _escaped(text: str) -> str:
    return text.encode("unicode_escape").decode("ascii")


def safe_text(text: str) -> str:
    """``text`` with control, zero-width and bidirectional-override characters escaped, so
    what the researcher wrote cannot move the cursor, recolour or reorder the owner's screen.

    Everything Python does not call printable is escaped too (the test ``repr`` uses for
    strings): format characters beyond the usual ones (the invisible "tag" letters that
    smuggle hidden text, the soft hyphen, the Mongolian vowel separator, interlinear
    annotations), unassigned and private-use code points, and unusual spaces; letters that
    draw nothing; and stacks of three or more combining marks. Common text passes through
    at C speed."""
    if not text.isprintable() or not _BLANK_LETTERS.isdisjoint(text):
        text = "".join(ch if ch.isprintable() and ch not in _BLANK_LETTERS else _escaped(ch)
                       for ch in text)
    return _MARK_STACK.sub(lambda m: _escaped(m.group()), text)
