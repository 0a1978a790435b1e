"""Lineage text: how a value was computed, written as the expression a researcher types.

One module renders it for both ends, so what the researcher's pointer shows
(``ptr.lineage``) and what the owner reads in the approval queue cannot disagree: the
researcher renders from its pointers and local values, the owner's worker from the
operations it ran, through the same functions. Lineage is for reading, not for deciding:
rules and checks use a request's ``sources``, which are always complete.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "MAX_LINEAGE",
    "array",
    "attribute",
    "call",
    "cap",
    "function",
    "method",
    "scalar",
    "sequence",
    "slice_text",
]

MAX_LINEAGE = 2000
MAX_ITEMS = 8  # literal container items shown

INFIX = {
    "add": "+", "sub": "-", "mul": "*", "truediv": "/", "floordiv": "//", "mod": "%",
    "pow": "**", "matmul": "@", "and_": "&", "or_": "|", "xor": "^", "lt": "<", "le": "<=",
    "eq": "==", "ne": "!=", "gt": ">", "ge": ">=",
}
PREFIX = {"neg": "-", "pos": "+", "invert": "~"}
# Namespaces dropped from function names: mean(x), Linear(4, 2), linalg.norm(x).
_SHORT = (
    "operator.", "copy.", "numpy.", "torch.nn.functional.", "torch.optim.lr_scheduler.",
    "torch.optim.", "torch.nn.", "torch.",
)
# pandas functions read as a researcher writes them (pd.merge(a, b)); scikit-learn's by their
# own name (LogisticRegression(max_iter=200), cross_val_score(...)).
_RENAMED = (("pandas.", "pd."),)


def cap(text: str) -> str:
    return text if len(text) <= MAX_LINEAGE else text[: MAX_LINEAGE - 1] + "…"


def scalar(value: object) -> str:
    """A literal argument: ``2``, ``'age'``, ``None``, ``...``."""
    if value is Ellipsis:
        return "..."
    text = repr(value)
    return text if len(text) <= 60 else text[:59] + "…"


def array(kind: str, dtype: str, shape: Sequence[int]) -> str:
    """An array literal the researcher sent: its kind, dtype and shape, never its values."""
    return f"{kind}({dtype.removeprefix('torch.')}[{','.join(map(str, shape))}])"


def sequence(texts: list[str], open_: str, close: str) -> str:
    shown = texts[:MAX_ITEMS]
    more = f", …(+{len(texts) - MAX_ITEMS})" if len(texts) > MAX_ITEMS else ""
    if open_ == "(" and len(texts) == 1:
        close = ",)"
    return f"{open_}{', '.join(shown)}{more}{close}"


def slice_text(start: str | None, stop: str | None, step: str | None) -> str:
    text = f"{start or ''}:{stop or ''}"
    return text if step is None else f"{text}:{step}"


def function(qualname: str, arguments: list[str], *, subscript: bool = False) -> str:
    """``mean(x)``, ``(x + 1)``, ``-x``, ``x[0, 1:3]`` (``subscript``: the index is a tuple,
    written without its parentheses)."""
    short = qualname
    for prefix in _SHORT:
        if qualname.startswith(prefix):
            short = qualname[len(prefix):]
            break
    for prefix, shown in _RENAMED:
        if qualname.startswith(prefix):
            short = shown + qualname[len(prefix):]
    if qualname.startswith("sklearn."):
        short = qualname.rsplit(".", 1)[-1]
    if qualname.startswith("operator."):
        if short in INFIX and len(arguments) == 2:
            return cap(f"({arguments[0]} {INFIX[short]} {arguments[1]})")
        if short in PREFIX and len(arguments) == 1:
            return cap(f"({PREFIX[short]}{arguments[0]})")
        if short == "getitem" and len(arguments) == 2:
            key = arguments[1][1:-1].removesuffix(",") if subscript else arguments[1]
            return cap(f"{arguments[0]}[{key}]")
    return cap(f"{short}({', '.join(arguments)})")


def method(target: str, name: str, arguments: list[str]) -> str:
    return cap(f"{target}.{name}({', '.join(arguments)})")


def attribute(target: str, name: str) -> str:
    return cap(f"{target}.{name}")


def call(target: str, arguments: list[str]) -> str:
    return cap(f"{target}({', '.join(arguments)})")
