"""Freezing a requested value, where the data is (the worker).

"Approved is what was previewed": when a request arrives, the value is encoded at once into
a private copy (the bytes that will be sent if the owner approves), and the preview, the size
summary and the SHA-256 the audit log records are all computed from that copy. Nothing the
researcher does afterwards (mutating the object, freeing it) reaches the copy.

Previews are bounded in cost: containers show their first items, arrays and tensors their
corners, text its beginning, so a 3-million-item list costs no more than a short one.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import protocol as p
from .audit import sha256_of
from .frames import is_pandas
from .ipc import ValueSummary

__all__ = ["LABEL_CHARS", "Frozen", "PREVIEW_CHARS", "freeze", "preview_of", "summarize"]

PREVIEW_CHARS = 400
TABLE_PREVIEW_CHARS = 1200  # a table needs its rows and columns lined up to be read
_ITEMS = 8  # container items shown in a preview
_UNKNOWN = sys.maxsize  # elements of an object we cannot count: no size rule matches it


@dataclass(frozen=True)
class Frozen:
    """A value's encoded decision message (private copies) and what the owner sees of it."""

    header: bytes
    buffers: list[memoryview]
    sha256: str
    summary: ValueSummary
    preview: str

    @property
    def nbytes(self) -> int:
        return len(self.header) + sum(b.nbytes for b in self.buffers)


def freeze(request_id: str, value: Any, room: int | None = None) -> Frozen:
    """Encode ``value`` as the approved decision for ``request_id``, copying every buffer;
    raises ``ProtocolError`` for values the wire cannot carry, and ``MemoryError`` when the
    copy would need more than ``room`` bytes (what is left of the owner's memory budget)."""
    header, views = p.encode(p.Decision(request_id=request_id, status="approved", value=value))
    size = len(header) + sum(view.nbytes for view in views)
    if room is not None and size > room:
        raise MemoryError(f"the frozen copy needs {size} bytes; {max(room, 0)} are left in the "
                          "owner's memory budget")
    buffers = [memoryview(bytearray(view)) for view in views]  # the private copy
    copy = p.decode(header, buffers, validated=True)  # our own encoding, read back
    assert isinstance(copy, p.Decision)
    return Frozen(header, buffers, sha256_of([header, *buffers]), summarize(copy.value),
                  preview_of(copy.value))


# -- size -----------------------------------------------------------------------------------
def summarize(value: Any) -> ValueSummary:
    """Type, shape and a count of elements that never undercounts."""
    shape = dtype = None
    if isinstance(value, np.ndarray) or _is_tensor(value):
        shape = [int(n) for n in value.shape]
        dtype = str(value.dtype).removeprefix("torch.")
        nbytes = int(value.nbytes) if isinstance(value, np.ndarray) else int(
            value.numel() * value.element_size())
    elif is_pandas(value):
        shape = [int(n) for n in value.shape]
        dtype = None if value.ndim == 2 else str(value.dtype)
        nbytes = _table_bytes(value)
    else:
        nbytes = _nbytes(value, 0)
    return ValueSummary(type=_type_name(value), shape=shape, dtype=dtype,
                        elements=_elements(value, 0), nbytes=nbytes)


def _elements(value: Any, depth: int) -> int:
    if depth > p.MAX_VALUE_DEPTH:
        return _UNKNOWN
    if isinstance(value, np.ndarray):
        # structured records and sub-arrays hold several numbers per element: count bytes
        plain = value.dtype.fields is None and value.dtype.subdtype is None
        return int(value.size) if plain else int(value.nbytes)
    if _is_tensor(value):
        return int(value.numel())
    if is_pandas(value):
        # every cell, every index entry (the index is data) and every column label (the
        # columns of get_dummies or a pivot are values too)
        labels = len(value.columns) if value.ndim == 2 else 0
        index = getattr(value, "index", None)  # an Index has none
        entries = 0 if index is None else len(index) * index.nlevels
        return int(value.size) * getattr(value, "nlevels", 1) + entries + labels
    if value is None or isinstance(value, (bool, int, float, complex, np.generic)):
        return 1
    if isinstance(value, (str, bytes)):
        return len(value)
    if isinstance(value, (list, tuple)):
        return _total(_elements(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return _total([len(value), *(_elements(v, depth + 1) for v in value.values())])
    if isinstance(value, slice):
        return _total(_elements(v, depth + 1) for v in (value.start, value.stop, value.step))
    return _UNKNOWN


def _total(counts: Any) -> int:
    total = 0
    for count in counts:
        total += count
        if total >= _UNKNOWN:
            return _UNKNOWN
    return total


def _nbytes(value: Any, depth: int) -> int:
    if depth > p.MAX_VALUE_DEPTH:
        return 0
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if _is_tensor(value):
        return int(value.numel() * value.element_size())
    if isinstance(value, (str, bytes)):
        return len(value)
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return sum(_nbytes(v, depth + 1) for v in value.values())
    return 8


# -- preview ----------------------------------------------------------------------------------
def preview_of(value: Any) -> str:
    """The value as the owner sees it, abbreviated at bounded cost."""
    text = _preview(value, 0)
    limit = TABLE_PREVIEW_CHARS if is_pandas(value) else PREVIEW_CHARS
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _preview(value: Any, depth: int) -> str:
    if depth > 3:
        return "…"
    if is_pandas(value):
        import pandas as pd

        # up to 10 rows (else 4 corner rows), 8 columns, and the dimensions
        with pd.option_context("display.max_rows", 10, "display.min_rows", 4,
                               "display.max_columns", 8, "display.width", 100,
                               "display.max_colwidth", 16, "display.precision", 4,
                               "display.max_seq_items", _ITEMS):
            return repr(_short_labels(value))
    if isinstance(value, np.ndarray):
        plain = value.dtype in (np.float64, np.int64, np.bool_)
        return _array_text(value, "array", "" if plain else f", dtype={value.dtype}")
    if _is_tensor(value):
        return _tensor_text(value)
    if isinstance(value, (list, tuple)):
        items = [_preview(v, depth + 1) for v in value[:_ITEMS]]
        if len(value) > _ITEMS:
            items.append(f"… (+{len(value) - _ITEMS} more)")
        open_, close = ("[", "]") if isinstance(value, list) else ("(", ")")
        return open_ + ", ".join(items) + close
    if isinstance(value, dict):
        shown = list(value.items())[:_ITEMS]
        items = [f"{_preview(k, depth + 1)}: {_preview(v, depth + 1)}" for k, v in shown]
        if len(value) > _ITEMS:
            items.append(f"… (+{len(value) - _ITEMS} more)")
        return "{" + ", ".join(items) + "}"
    if isinstance(value, (str, bytes)):
        return repr(value[:PREVIEW_CHARS])
    return repr(value)[:PREVIEW_CHARS]


LABEL_CHARS = 24  # widest label in a table preview (values: display.max_colwidth)
_EDGE = 10  # labels at each end of an axis that a preview can show


def _short_labels(value: Any) -> Any:
    """``value`` with the labels a preview shows (columns, index, their names, a Series'
    name) cut to ``LABEL_CHARS``. pandas cuts long values but never labels: a column named
    "mean_age", spaces, "41.2" and a thousand more spaces fills the whole preview with that
    line, so the owner reads one made-up number and none of the real rows. Returns ``value``
    itself (no copy) when no shown label is long; labels no preview shows stay as they are."""
    import pandas as pd

    if isinstance(value, pd.Index):
        return _short_index(value) if _long_labels(value) else value
    axes = [value.index] if value.ndim == 1 else [value.index, value.columns]
    name_long = value.ndim == 1 and _long(value.name)
    if not name_long and not any(_long_labels(axis) for axis in axes):
        return value
    shown = value.set_axis(_short_index(value.index), axis=0)
    if value.ndim == 2:
        shown = shown.set_axis(_short_index(value.columns), axis=1)
    elif name_long:
        shown = shown.rename(_short(value.name))
    return shown


def _long(label: Any) -> bool:
    return label is not None and len(str(label)) > LABEL_CHARS


def _short(label: Any) -> Any:
    return str(label)[: LABEL_CHARS - 1] + "…" if _long(label) else label


def _long_labels(index: Any) -> bool:
    """Whether a label a preview can show (the first and last ``_EDGE``, every level of
    them), or a name of the index, is long."""
    edges = index[:_EDGE].append(index[-_EDGE:]) if len(index) > 2 * _EDGE else index
    return any(map(_long, index.names)) or any(
        _long(part) for label in edges
        for part in (label if isinstance(label, tuple) else (label,)))


def _short_index(index: Any) -> Any:
    """``index`` with its shown labels and its names cut (the middle is copied as it is)."""
    import pandas as pd

    names = [_short(name) for name in index.names]
    if isinstance(index, pd.MultiIndex):  # a level holds each distinct label once
        levels = [level.map(_short) for level in index.levels]
        return index.set_levels(levels, verify_integrity=False).set_names(names)
    if len(index) > 2 * _EDGE:
        cut = index[:_EDGE].map(_short).append(index[_EDGE:-_EDGE]).append(
            index[-_EDGE:].map(_short))
    else:
        cut = index.map(_short)
    return cut.set_names(names)


def _tensor_text(value: Any) -> str:
    """A tensor as torch shows it (``tensor([...], dtype=torch.float64)``), its numbers laid
    out by numpy: torch's own formatter walks the elements in Python and took ~1 ms for a
    16-element tensor, the largest single cost of an op and its auto-approved ``get``."""
    import torch

    if value.layout != torch.strided or value.device.type != "cpu" or value.is_quantized:
        return repr(value)
    shown = value.detach()
    if shown.dtype in (torch.bfloat16, torch.float16):  # numpy has no bfloat16
        shown = shown.float()
    try:
        values = shown.resolve_conj().resolve_neg().numpy()
    except (TypeError, RuntimeError):  # a dtype numpy cannot hold
        return repr(value)
    suffix = "" if value.dtype in (torch.float32, torch.int64, torch.bool) else (
        f", dtype={value.dtype}")
    if value.requires_grad:
        suffix += ", requires_grad=True"
    return _array_text(values, "tensor", suffix)


_SHORT = 20  # arrays up to this many numbers are shown whole, on one line


def _array_text(values: np.ndarray, name: str, suffix: str) -> str:
    """``name(numbers suffix)``: a short one-dimensional array formatted number by number
    (fast), anything else by numpy with 3 items at each edge and 4 decimals."""
    if values.size <= _SHORT and values.ndim <= 1 and values.dtype.kind in "biuf":
        numbers = [_number(v) for v in values.reshape(-1).tolist()]
        body = ", ".join(numbers) if values.ndim == 0 else "[" + ", ".join(numbers) + "]"
    else:
        body = np.array2string(values, threshold=_SHORT, edgeitems=3, precision=4,
                               separator=", ", prefix=f"{name}(")
    return f"{name}({body}{suffix})"


def _number(value: bool | int | float) -> str:
    if not isinstance(value, float) or value != value or abs(value) == float("inf"):
        return str(value)  # integers, booleans, nan, inf
    if value != 0 and not 1e-4 <= abs(value) < 1e8:
        return f"{value:.4e}"
    return f"{value:.4f}".rstrip("0")  # 1. and 0.25, as numpy shows them


def _table_bytes(value: Any) -> int:
    """Bytes of a pandas object as pandas counts them (strings included), index included."""
    usage = value.memory_usage(deep=True)
    return int(usage.sum() if hasattr(usage, "sum") else usage)


def _is_tensor(value: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def _type_name(value: Any) -> str:
    kind = type(value)
    module = kind.__module__.split(".")[0]
    return kind.__name__ if module == "builtins" else f"{module}.{kind.__name__}"
