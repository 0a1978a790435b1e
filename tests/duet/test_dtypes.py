"""One dtype table for both ends: every spelling resolves the same on each side."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from duet import dtypes
from duet import protocol as p
from duet.pointers import _to_wire
from duet.policy import Allowlist

NUMPY_SPELLINGS: list[Any] = [float, int, bool, complex, np.float64, np.float32, np.int64,
                              np.uint16, np.dtype("int32"), np.dtype("uint8"), np.bool_]
TORCH_SPELLINGS: list[Any] = [torch.float32, torch.long, torch.half, torch.double,
                              torch.bfloat16, torch.uint8, torch.int16, torch.complex64]


@pytest.mark.parametrize("spelling", NUMPY_SPELLINGS)
def test_numpy_spellings_resolve_as_numpy_would(spelling: Any) -> None:
    wire = _to_wire(spelling, None)  # type: ignore[arg-type]
    assert isinstance(wire, p.DTypeRef)
    assert Allowlist.default().resolve_dtype(wire.name) == np.dtype(spelling)


@pytest.mark.parametrize("spelling", TORCH_SPELLINGS)
def test_torch_spellings_resolve_as_torch_would(spelling: Any) -> None:
    wire = _to_wire(spelling, None)  # type: ignore[arg-type]
    assert isinstance(wire, p.DTypeRef)
    assert Allowlist.default().resolve_dtype(wire.name) is spelling


@pytest.mark.parametrize("alias, numpy_dtype, torch_dtype", [
    ("float", "float64", torch.float64), ("double", "float64", torch.float64),
    ("half", "float16", torch.float16), ("long", "int64", torch.int64),
    ("int", "int64", torch.int64), ("uint16", "uint16", torch.uint16),
    ("bool", "bool", torch.bool), ("complex", "complex128", torch.complex128),
])
def test_names_in_remote_namespaces_resolve_identically(alias: str, numpy_dtype: str,
                                                        torch_dtype: torch.dtype) -> None:
    allowlist = Allowlist.default()
    assert dtypes.canonical(alias) is not None
    assert allowlist.resolve_dtype(alias) == np.dtype(numpy_dtype)
    assert allowlist.resolve_dtype(f"torch.{alias}") is torch_dtype
    assert allowlist.resolve_dtype(alias, torch=True) is torch_dtype


@pytest.mark.parametrize("name", ["object", "O", "V8", "str", "byte", "float32 ", ""])
def test_anything_else_is_refused_on_both_ends(name: str) -> None:
    assert dtypes.canonical(name) is None
    with pytest.raises(Exception, match="dtype"):
        Allowlist.default().resolve_dtype(name)
