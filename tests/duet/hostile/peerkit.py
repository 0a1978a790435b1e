"""Code the owner and researcher *scripts* import (they run as separate processes).

The scripts reach this module through ``script()``, which puts the repository root on
``sys.path`` first: ``make test`` runs pytest without ``PYTHONPATH``, and a script runs from
the test's temporary directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import duet

ROOT = str(Path(__file__).resolve().parents[3])
TMP = os.environ.get("DUET_TEST_TMP", ".")


def script(body: str) -> str:
    """A peer script whose imports resolve to this checkout whatever the environment."""
    import textwrap

    return f"import sys\nsys.path.insert(0, {ROOT!r})\n" + textwrap.dedent(body)


def flag(name: str) -> None:
    """Create a step file in the shared temporary directory (peer-to-peer signal)."""
    Path(TMP, name).touch()


def flagged(name: str) -> bool:
    return Path(TMP, name).exists()


def launch(**options: Any) -> duet.OwnerSession:
    return duet.launch(server=os.environ["DUET_TEST_SERVER"], ice_servers=[],
                       audit_path=os.path.join(TMP, "audit.db"), show=False, **options)


def join() -> duet.ResearcherSession:
    return duet.join(os.environ["DUET_CODE"], server=os.environ["DUET_TEST_SERVER"],
                     ice_servers=[])


def describe(request: duet.Request) -> dict[str, Any]:
    return {
        "id": request.id,
        "status": request.status,
        "decided_by": request.decided_by,
        "preview": request.preview[:2000],
        "preview_len": len(request.preview),
        "sources": sorted(request.sources),
        "lineage": request.lineage[:2000],
        "failed": getattr(request, "failed", ""),
        "sha256": getattr(request, "sha256", ""),
        "repr": repr(request),
    }


def serve(s: duet.OwnerSession, stop: str = "stop", timeout: float = 600) -> dict[str, Any]:
    """The owner at the keyboard: decides each request by its reason until ``TMP/stop``.

    ``hold:NAME`` waits until the researcher creates ``TMP/NAME``; a reason ending in
    ``!deny`` is denied, ``!keep`` stays pending; anything else is approved (rules the
    script added decide first). Returns every request's description by reason, as first
    seen (the preview is frozen then) with the final status."""
    seen: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while not flagged(stop) and time.monotonic() < deadline:
        for request in list(s.requests):
            if request.id in seen and seen[request.id]["done"]:
                continue
            info = seen.setdefault(request.id, {"done": False, "reason": request.reason,
                                                "first": describe(request)})
            if request.status != "pending":
                info["done"] = True
                continue
            reason = request.reason
            if reason.startswith("hold:") and not flagged(reason[5:].split("!")[0]):
                continue
            if reason.endswith("!keep"):
                continue
            try:
                if reason.endswith("!deny"):
                    request.deny("the owner says no")
                else:
                    request.approve()
            except duet.DuetError:
                pass
            info["done"] = True
        time.sleep(0.02)
    out: dict[str, Any] = {}
    by_id = {r.id: r for r in s.requests}
    for request_id, info in seen.items():
        entry = dict(info["first"])
        entry["status"] = by_id[request_id].status
        out[info["reason"]] = entry
    return out


def outcome(fn: Callable[[], Any]) -> list[Any]:
    """[exception type name, message] or ["value", the value as a list/number]."""
    try:
        value = fn()
    except duet.DuetError as exc:
        return [type(exc).__name__, str(exc)]
    except Exception as exc:  # a local error: the researcher's side refused to build it
        return ["local:" + type(exc).__name__, str(exc)]
    if hasattr(value, "tolist"):
        value = value.tolist()
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        value = repr(value)
    return ["value", value]


def sha(obj: Any) -> str:
    """A hash of the bytes of an array, tensor, module or container, in this process."""
    h = hashlib.sha256()

    def walk(value: Any) -> None:
        import torch

        if isinstance(value, torch.nn.Module):
            for name, tensor in value.state_dict().items():
                h.update(name.encode())
                walk(tensor)
        elif isinstance(value, torch.Tensor):
            walk(value.detach().cpu().contiguous().numpy())
        elif isinstance(value, np.ndarray):
            h.update(str(value.dtype).encode() + str(value.shape).encode())
            h.update(np.ascontiguousarray(value).tobytes())
        elif isinstance(value, dict):
            for k in sorted(value):
                h.update(str(k).encode())
                walk(value[k])
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)
        else:
            h.update(repr(value).encode())

    walk(obj)
    return h.hexdigest()
