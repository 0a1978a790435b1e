"""The allowlist: what resolves, what never does, and the researcher-side pre-check."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from duet.errors import PolicyViolation
from duet.policy import Allowlist, check_described


@pytest.fixture(scope="module")
def allowlist() -> Allowlist:
    return Allowlist.default()


def test_core_functions_resolve_to_the_real_objects(allowlist: Allowlist) -> None:
    assert allowlist.resolve_function("numpy.mean") is np.mean
    assert allowlist.resolve_function("numpy.linalg.svd") is np.linalg.svd
    assert allowlist.resolve_function("torch.nn.Linear") is torch.nn.Linear
    assert allowlist.resolve_function("torch.optim.SGD") is torch.optim.SGD
    assert allowlist.resolve_function("torch.nn.functional.cross_entropy") is (
        torch.nn.functional.cross_entropy
    )
    for name in ("operator.add", "operator.getitem", "torch.set_grad_enabled", "copy.deepcopy"):
        assert name in allowlist


@pytest.mark.parametrize(
    "name",
    [
        "numpy.load", "numpy.save", "numpy.lib", "numpy.lib.format.open_memmap", "numpy.fromfile",
        "numpy.memmap", "torch.load", "torch.save", "torch.hub.load", "builtins.eval",
        "builtins.open", "os.system", "subprocess.run", "getattr", "eval", "numpy.mean.__call__",
        "numpy._core.multiarray", "operator.attrgetter", "numpy.frombuffer",
    ],
)
def test_forbidden_functions_never_resolve(allowlist: Allowlist, name: str) -> None:
    with pytest.raises(PolicyViolation):
        allowlist.resolve_function(name)


@pytest.mark.parametrize(
    "name",
    [
        "", "numpy..mean", ".mean", "numpy.mean.", " numpy.mean", "numpy.mean\n",
        "numpy.\uff4dean",  # fullwidth m: a lookalike that Python identifiers would normalize
        "numpy.mean\u200b",  # zero-width space
        "numpy.__dict__", "numpy._private", "numpy.mean-1",
    ],
)
def test_malformed_names_are_refused_before_lookup(allowlist: Allowlist, name: str) -> None:
    with pytest.raises(PolicyViolation):
        allowlist.resolve_function(name)


@pytest.mark.parametrize(
    "name",
    [
        "numpy.load", "numpy.lib.format.open_memmap", "torch.save", "torch.jit.script",
        "builtins.exec", "os.system", "__import__", "builtins.__import__", "numpy.__dict__",
        "Tensor.register_hook", "Tensor.storage", "Module.apply", "Module.register_forward_hook",
        "ndarray.tofile", "ndarray.setflags", "getattr", "numpy.frombuffer",
        "numpy.fft",  # a module, not a function
        "torch.nn.init.zeros_",  # in place: could write into shared parameters
        "numpy.no_such_function",
    ],
)
def test_allow_refuses_what_can_never_be_allowed(name: str) -> None:
    allowlist = Allowlist.default()
    with pytest.raises(ValueError):
        allowlist.allow(name)
    assert name not in allowlist


def test_allow_and_deny_edit_one_session_only(allowlist: Allowlist) -> None:
    session = allowlist.copy()
    session.allow("numpy.fft.fft", "Tensor.cumprod")
    session.allow("ndarray.partition", mutating=True)
    session.deny("numpy.linalg", "Tensor.backward")

    assert session.resolve_function("numpy.fft.fft") is np.fft.fft
    assert session.resolve_method(torch.ones(3), "cumprod", shared=False)(0).tolist() == [1, 1, 1]
    assert session.is_mutating(np.ones(3), "partition")
    with pytest.raises(PolicyViolation):
        session.resolve_function("numpy.linalg.inv")
    with pytest.raises(PolicyViolation):
        session.resolve_method(torch.ones(1, requires_grad=True), "backward", shared=False)
    # the default is untouched
    assert "numpy.fft.fft" not in allowlist
    assert "numpy.linalg.inv" in allowlist
    assert "Tensor.backward" in allowlist


def test_allow_distinguishes_methods_and_attributes() -> None:
    allowlist = Allowlist.default()
    allowlist.allow("Tensor.is_cuda", "Tensor.cummax")
    described = allowlist.describe()
    assert "Tensor.is_cuda" in described.attributes
    assert "Tensor.cummax" not in described.attributes
    assert allowlist.resolve_attribute(torch.ones(1), "is_cuda") is False


def test_methods_and_attributes_are_per_family(allowlist: Allowlist) -> None:
    array = np.arange(6.0).reshape(2, 3)
    assert allowlist.family(array) == "ndarray"
    assert allowlist.family(np.float64(1.0)) == "ndarray"
    assert allowlist.family(torch.nn.Parameter(torch.ones(1))) == "Tensor"
    assert allowlist.family(torch.nn.Linear(2, 2)) == "Module"
    assert allowlist.family(torch.Size([2])) == "tuple"
    assert allowlist.family(object()) is None

    assert allowlist.resolve_method(array, "sum", shared=True)() == 15.0
    assert allowlist.resolve_attribute(array, "shape") == (2, 3)
    with pytest.raises(PolicyViolation, match="ndarray.backward"):
        allowlist.resolve_method(array, "backward", shared=False)  # a Tensor method only
    with pytest.raises(PolicyViolation):
        allowlist.resolve_attribute(array, "sum")  # a method, not an attribute
    with pytest.raises(PolicyViolation):
        allowlist.resolve_method(array, "T", shared=False)  # an attribute, not a method
    with pytest.raises(PolicyViolation):
        allowlist.resolve_method(array, "sum.__call__", shared=False)


def test_mutating_method_refused_on_shared_object(allowlist: Allowlist) -> None:
    array = np.array([3.0, 1.0, 2.0])
    with pytest.raises(PolicyViolation, match=r"shared object 'ages'.*ages\.copy\(\)"):
        allowlist.resolve_method(array, "sort", shared="ages")
    with pytest.raises(PolicyViolation, match=r"w\.clone\(\)"):
        allowlist.resolve_method(torch.ones(2), "zero_", shared="w")
    assert array.tolist() == [3.0, 1.0, 2.0]
    allowlist.resolve_method(array, "sort", shared=False)()
    assert array.tolist() == [1.0, 2.0, 3.0]


def test_lookups_never_getattr_a_peer_string_on_an_unknown_object(allowlist: Allowlist) -> None:
    requested: list[str] = []

    class Spy:
        def __getattribute__(self, name: str) -> Any:
            requested.append(name)
            return object.__getattribute__(self, name)

    spy = Spy()
    with pytest.raises(PolicyViolation, match="no allowlisted"):
        allowlist.resolve_attribute(spy, "secret")
    with pytest.raises(PolicyViolation):
        allowlist.resolve_method(spy, "secret", shared=False)
    assert "secret" not in requested


def test_only_modules_can_be_called(allowlist: Allowlist) -> None:
    allowlist.check_call(torch.nn.Linear(2, 2), shared="model")
    with pytest.raises(PolicyViolation, match="only torch.nn modules"):
        allowlist.check_call(np.mean, shared=False)
    with pytest.raises(PolicyViolation, match="running statistics"):
        allowlist.check_call(torch.nn.BatchNorm1d(3), shared="bn")
    allowlist.check_call(torch.nn.BatchNorm1d(3).eval(), shared="bn")


def test_out_and_inplace_arguments_are_refused(allowlist: Allowlist) -> None:
    relu = allowlist.resolve_function("torch.nn.functional.relu")
    x = torch.ones(2)
    with pytest.raises(PolicyViolation):
        allowlist.check_arguments(np.add, (x, 1), {"out": np.zeros(2)})
    with pytest.raises(PolicyViolation):
        allowlist.check_arguments(np.add, (np.ones(2), 1, np.zeros(2)), {})  # positional out
    with pytest.raises(PolicyViolation):
        allowlist.check_arguments(relu, (x,), {"inplace": True})
    with pytest.raises(PolicyViolation):
        allowlist.check_arguments(relu, (x, True), {}, qualname="torch.nn.functional.relu")
    dropout = allowlist.resolve_function("torch.nn.Dropout")
    with pytest.raises(PolicyViolation):
        allowlist.check_arguments(dropout, (0.5, True), {}, qualname="torch.nn.Dropout")
    allowlist.check_arguments(relu, (x, False), {}, qualname="torch.nn.functional.relu")
    allowlist.check_arguments(np.add, (np.ones(2), 1), {})


def test_from_numpy_copies_read_only_arrays(allowlist: Allowlist) -> None:
    data = np.arange(3.0)
    view = data.view()
    view.flags.writeable = False
    tensor = allowlist.resolve_function("torch.from_numpy")(view)
    tensor.zero_()
    assert data.tolist() == [0.0, 1.0, 2.0]
    writable = np.arange(3.0)
    allowlist.resolve_function("torch.as_tensor")(writable).zero_()
    assert writable.tolist() == [0.0, 0.0, 0.0]  # the researcher's own arrays are shared as usual


def test_dtypes_come_from_a_fixed_table(allowlist: Allowlist) -> None:
    assert allowlist.resolve_dtype("float32") == np.dtype("float32")
    assert allowlist.resolve_dtype("float32", torch=True) is torch.float32
    assert allowlist.resolve_dtype("torch.bfloat16") is torch.bfloat16
    assert allowlist.resolve_dtype("bool") == np.dtype(bool)
    for name in ("object", "O", "V8", "bfloat16", "float32 "):
        with pytest.raises(PolicyViolation):
            allowlist.resolve_dtype(name)


def test_describe_lists_everything_the_researcher_may_use(allowlist: Allowlist) -> None:
    described = allowlist.describe()
    assert described.functions == sorted(described.functions)
    assert "numpy.mean" in described.functions
    assert not any("load" == f.rsplit(".", 1)[1] for f in described.functions)
    assert {"sum", "astype", "T", "shape"} <= set(described.members["ndarray"])
    assert {"backward", "grad", "item"} <= set(described.members["Tensor"])
    assert {"parameters", "weight", "eval"} <= set(described.members["Module"])
    assert {"step", "zero_grad"} <= set(described.members["Optimizer"])
    assert "Tensor.grad" in described.attributes
    assert "Tensor.backward" in described.mutating
    assert "ndarray.sort" in described.mutating
    assert "ndarray.sum" not in described.mutating
    every = [*described.functions, *described.attributes,
             *(n for names in described.members.values() for n in names)]
    assert not any(part.startswith("_") for n in every for part in n.split("."))


def test_check_described_refuses_early_with_suggestions(allowlist: Allowlist) -> None:
    described = allowlist.describe()
    check_described(described, "function", "numpy.mean")
    check_described(described, "method", "sum")
    check_described(described, "method", "Tensor.backward")
    check_described(described, "attribute", "grad")
    check_described(described, "attribute", "ndarray.shape")

    with pytest.raises(PolicyViolation, match="did you mean numpy.mean"):
        check_described(described, "function", "numpy.maen")
    with pytest.raises(PolicyViolation):
        check_described(described, "function", "numpy.load")
    with pytest.raises(PolicyViolation, match="allowlisted method"):
        check_described(described, "method", "tofile")
    with pytest.raises(PolicyViolation):
        check_described(described, "method", "grad")  # an attribute, not a method
    with pytest.raises(PolicyViolation):
        check_described(described, "attribute", "ndarray.grad")
    with pytest.raises(PolicyViolation, match="dunder"):
        check_described(described, "attribute", "__class__")
    with pytest.raises(ValueError):
        check_described(described, "import", "os")


def test_allow_is_all_or_nothing() -> None:
    allowlist = Allowlist.default()
    with pytest.raises(ValueError):
        allowlist.allow("numpy.fft.rfft", "numpy.ndarray.tofile")
    assert "numpy.fft.rfft" not in allowlist  # the good name did not slip in before the bad


@pytest.mark.parametrize("name", [
    "numpy.ndarray.tofile", "numpy.ndarray.dump", "numpy.ndarray.setflags", "ndarray.setflags",
    "torch.Tensor.untyped_storage", "Tensor.data_ptr", "torch.UntypedStorage.from_file",
    "torch.nn.Module.apply", "Module.register_forward_hook", "torch.nn.Linear.apply",
    "torch.Tensor.share_memory_", "numpy.lib.format.open_memmap",
])
def test_the_denylist_wins_over_every_spelling(name: str) -> None:
    allowlist = Allowlist.default()
    with pytest.raises(ValueError):
        allowlist.allow(name)
    assert name not in allowlist
