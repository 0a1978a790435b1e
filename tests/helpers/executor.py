"""An executor driven with real ``Op`` messages, as a researcher's pointers would send them."""

from __future__ import annotations

import itertools
from typing import Any

from duet.executor import Entry, Executor
from duet.protocol import Op, OpFailed, PointerRef, StoreRef


class Driver:
    """Builds ops the way a researcher's pointers would, with fresh result ids."""

    def __init__(self, executor: Executor) -> None:
        self.executor = executor
        self.ids = itertools.count(1)
        self.last_failure: OpFailed | None = None

    def op(self, kind: str, name: str, target: Any = None, *args: Any, **kwargs: Any) -> PointerRef:
        result = next(self.ids)
        op = Op(result=result, kind=kind, name=name, target=target, args=list(args),
                kwargs=kwargs)
        self.last_failure = self.executor.execute(op)
        return PointerRef(result)

    def fn(self, name: str, *args: Any, **kwargs: Any) -> PointerRef:
        return self.op("function", name, None, *args, **kwargs)

    def method(self, target: Any, name: str, *args: Any, **kwargs: Any) -> PointerRef:
        return self.op("method", name, target, *args, **kwargs)

    def attr(self, target: Any, name: str) -> PointerRef:
        return self.op("getattr", name, target)

    def call(self, target: Any, *args: Any, **kwargs: Any) -> PointerRef:
        return self.op("call", "forward", target, *args, **kwargs)

    def entry(self, ref: PointerRef | StoreRef) -> Entry:
        entry = self.executor.lookup(ref)
        assert entry.failure is None, (entry.failure, entry.error)
        return entry

    def value(self, ref: PointerRef | StoreRef) -> Any:
        return self.entry(ref).value

    def lineage(self, ref: PointerRef) -> str:
        return self.entry(ref).lineage
