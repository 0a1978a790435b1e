"""The one table of dtypes a researcher may name, used by both ends.

The researcher's side turns whatever dtype spelling a user writes (``float``, ``np.float64``,
``np.dtype("int32")``, ``torch.long``, ``r.np.uint16``, ``r.torch.half``) into a wire name
with :func:`wire_name`; the owner's side turns a wire name back into a numpy or torch dtype
with :func:`resolve`. Both go through :func:`canonical`, so the two ends cannot drift apart.
"""

from __future__ import annotations

import sys
from typing import Any, Literal

import numpy as np

__all__ = ["ALIASES", "CANONICAL", "Flavor", "canonical", "resolve", "wire_name"]

Flavor = Literal["numpy", "torch"]

CANONICAL: tuple[str, ...] = (
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "bfloat16", "float32", "float64", "complex64", "complex128",
)
"""Every dtype a researcher may name; anything else is refused by the owner."""

# Spellings numpy and torch both give the same meaning. ("byte" is left out on purpose:
# numpy's byte is int8, torch's is uint8.)
ALIASES: dict[str, str] = {
    "float": "float64", "double": "float64", "half": "float16", "single": "float32",
    "int": "int64", "long": "int64", "short": "int16", "bool_": "bool",
    "complex": "complex128", "cfloat": "complex64", "cdouble": "complex128",
    "float_": "float64", "int_": "int64",
}


def canonical(name: str) -> tuple[Flavor | None, str] | None:
    """``(flavor, canonical name)`` for a spelling, or None if it is not a known dtype.

    A ``torch.`` prefix means a torch dtype, ``numpy.``/``np.`` a numpy one, none: either.
    """
    flavor: Flavor | None = None
    for prefix, kind in (("torch.", "torch"), ("numpy.", "numpy"), ("np.", "numpy")):
        if name.startswith(prefix):
            flavor, name = kind, name[len(prefix):]  # type: ignore[assignment]
            break
    name = ALIASES.get(name, name)
    return (flavor, name) if name in CANONICAL else None


def wire_name(value: Any) -> str | None:
    """The wire name of a dtype-like value the researcher passes, or None if it is none."""
    if isinstance(value, type) and value in (bool, int, float, complex):
        return ALIASES.get(value.__name__, value.__name__)
    if isinstance(value, np.dtype) or (isinstance(value, type) and issubclass(value, np.generic)):
        try:
            name = np.dtype(value).name
        except TypeError:
            return None
        return name if name in CANONICAL else None
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.dtype):
        name = str(value).removeprefix("torch.")
        return f"torch.{name}" if name in CANONICAL else None
    return None


def resolve(name: str, flavor: Flavor) -> Any:
    """The numpy or torch dtype for a wire name; raises KeyError for unknown names.

    A name's own prefix wins over ``flavor`` (``torch.float32`` is torch's everywhere)."""
    found = canonical(name)
    if found is None:
        raise KeyError(name)
    kind, base = found
    kind = kind or flavor
    if kind == "torch":
        import torch

        dtype = getattr(torch, base, None)
        if not isinstance(dtype, torch.dtype):
            raise KeyError(name)
        return dtype
    if base == "bfloat16":
        raise KeyError(name)  # numpy has no bfloat16
    return np.dtype(base)
