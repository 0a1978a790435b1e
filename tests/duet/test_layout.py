"""The package's shape: no import cycles (not even for type checking), and the researcher's
side does not load the owner's machinery (executor, approvals, audit, policy, worker)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "duet"


def imports_of(module: str) -> set[str]:
    """duet modules that ``duet/<module>.py`` imports, wherever in the file (TYPE_CHECKING
    blocks and function bodies included)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("duet."):
            found.add(node.module.split(".")[1])  # type: ignore[union-attr]
    return {m for m in found if (PACKAGE / f"{m}.py").exists()}


def graph() -> dict[str, set[str]]:
    modules = [p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"]
    return {m: imports_of(m) for m in modules}


def closure(start: str, edges: dict[str, set[str]]) -> set[str]:
    seen, stack = set(), [start]
    while stack:
        for nxt in edges[stack.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def test_no_import_cycles() -> None:
    edges = graph()
    cycles = [m for m in edges if m in closure(m, edges)]
    assert cycles == [], cycles


def test_the_researcher_does_not_load_the_owners_machinery() -> None:
    reached = closure("researcher", graph())
    assert not reached & {"executor", "approvals", "audit", "policy", "worker", "supervisor",
                          "owner", "memory", "snapshot"}, reached


def test_the_owners_kernel_side_does_not_run_operations() -> None:
    reached = closure("owner", graph())
    assert "executor" not in reached and "worker" not in reached, reached
