"""DP-SGD on the owner's side, with Opacus: the engine, independent of the session plumbing.

A trained model's weights can leak the rows it was trained on. DP-SGD bounds that leak: each
row's gradient is clipped to a norm ``C`` and Gaussian noise of scale ``sigma * C`` is added
to every batch's sum, with batches drawn by Poisson sampling, so that an accountant can
bound the privacy loss ``(epsilon, delta)`` of the whole run. The guarantee rests on things
the *owner* must control, never the researcher: the sampling, the clipping norm, the noise
multiplier, the number of steps, and the model treating each row separately. This module
builds all of them here, from a small researcher request (``TrainRequest``: loss name,
epochs, batch size, learning rate, target epsilon) and the owner's settings
(``TrainSettings``).

The two steps are separate so that an approval can sit between them:

- ``prepare(model, data, labels, request, settings)`` checks everything, copies the model,
  fixes what Opacus can fix (BatchNorm becomes GroupNorm), and computes the noise multiplier
  for the target ``(epsilon, delta)``; its ``.plan`` (a ``TrainPlan``) is the cost to show
  the owner before anything trains. A model or request that cannot be trained safely raises
  ``TrainingRefused`` with the reason.
- ``Prepared.run()`` trains the copy and returns a ``TrainResult``: the trained
  ``parameters()`` only (never buffers or a ``state_dict``: a buffer can hold a raw row),
  the per-epoch mean losses (not private: an ordinary value), and the epsilon Opacus'
  accountant reports as spent.

What is accepted as a model: a ``torch.nn.Module`` object that this process can run by
itself, i.e. one made of ``torch.nn`` layers (``r.torch.nn.Sequential(...)`` built by the
researcher from allowlisted layers). A ``duet.RemoteModule``'s ``forward`` is Python in the
researcher's kernel, so it cannot be trained here. Module classes from elsewhere (the
owner's own code) are accepted only when the owner says so (``allow_custom_modules``).
Whatever the classes, a model whose output for one row depends on the other rows of its
batch (``Softmax(dim=0)``, ``Flatten(0)``, a convolution fed rows as channels) would defeat
per-row clipping; ``prepare`` refuses it after probing it with random rows.

Randomness: the sampler and the noise each draw from a private ``torch.Generator`` seeded
from the OS (``secrets``), never torch's global generator, which the researcher can seed
with ``torch.manual_seed``. That generator is not cryptographically secure; Opacus'
``secure_mode`` would need ``torchcsprng``, which does not build for current torch, so we do
not claim it (docs/dp_training.md).
"""

from __future__ import annotations

import copy
import math
import secrets
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, cast

import numpy as np

from . import protocol as p
from .errors import PolicyViolation, RequestError

__all__ = [
    "LOSSES",
    "OPTIMIZERS",
    "OWNER_CONTROLLED",
    "TRAIN_OP",
    "Prepared",
    "TrainJob",
    "TrainJobs",
    "TrainSpec",
    "TrainPlan",
    "TrainRequest",
    "TrainResult",
    "TrainSettings",
    "TrainingRefused",
    "parse_train_op",
    "prepare",
    "train",
]

Loss = Literal["cross_entropy", "nll", "mse", "bce_with_logits"]
Optimizer = Literal["sgd", "adam"]
LOSSES: tuple[str, ...] = ("cross_entropy", "nll", "mse", "bce_with_logits")
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")

# What the guarantee depends on: named here so that a researcher who sends one of these is
# told it is the owner's, instead of getting a generic "unknown argument".
OWNER_CONTROLLED: frozenset[str] = frozenset({
    "max_grad_norm", "clipping", "clip", "noise_multiplier", "noise", "sigma",
    "sample_rate", "sampling", "poisson_sampling", "accountant", "secure_mode",
    "max_epochs", "steps", "noise_generator", "generator", "seed", "expected_batch_size",
    "loss_reduction", "grad_sample_mode", "settings",
})
_REQUEST_FIELDS = ("loss", "epochs", "batch_size", "lr", "epsilon", "delta", "optimizer")
_PROBE_ROWS = 3


class TrainingRefused(ValueError):
    """The request or the model cannot be trained with the guarantee; the message says why
    and names only things the researcher sent or the owner declared, never data values."""


@dataclass(frozen=True)
class TrainSettings:
    """The owner's side of private training: everything the guarantee depends on.

    ``max_grad_norm`` is the per-row clipping norm ``C``; ``max_epochs`` bounds the steps
    (and the compute); ``delta`` is the delta used when the researcher names none, and the
    largest one allowed (it must also stay below ``1 / rows``: a delta that large allows
    releasing a row outright); ``accountant`` is
    Opacus' accountant ("rdp" or "prv"); ``allow_custom_modules`` lets model classes that are
    not ``torch.nn``/Opacus layers train (the owner vouches for their ``forward``)."""

    max_grad_norm: float = 1.0
    max_epochs: int = 30
    max_epsilon: float = 10.0
    delta: float = 1e-5
    accountant: Literal["rdp", "prv"] = "rdp"
    momentum: float = 0.0
    max_lr: float = 10.0
    allow_custom_modules: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError("max_grad_norm must be a positive number")
        if not 1 <= self.max_epochs <= 10_000:
            raise ValueError("max_epochs must be between 1 and 10000")
        if not (math.isfinite(self.max_epsilon) and self.max_epsilon > 0):
            raise ValueError("max_epsilon must be a positive number")
        if not 0 < self.delta < 1:
            raise ValueError("delta must be in (0, 1)")
        if self.accountant not in ("rdp", "prv"):
            raise ValueError("accountant must be 'rdp' or 'prv'")


@dataclass(frozen=True)
class TrainRequest:
    """What a researcher may choose: none of it weakens the guarantee. ``batch_size`` is the
    *expected* batch size: the owner turns it into a Poisson sample rate."""

    loss: Loss
    epochs: int
    batch_size: int
    lr: float
    epsilon: float
    delta: float | None = None
    optimizer: Optimizer = "sgd"

    @classmethod
    def from_researcher(cls, fields: Mapping[str, Any]) -> TrainRequest:
        """Build a request from what the researcher sent, refusing anything else by name
        (clipping, sampling, noise and the like are the owner's)."""
        owners = sorted(set(fields) & OWNER_CONTROLLED)
        if owners:
            raise TrainingRefused(
                f"{', '.join(owners)} {'is' if len(owners) == 1 else 'are'} set by the data "
                "owner, not by the researcher: the privacy guarantee depends on it")
        unknown = sorted(set(fields) - set(_REQUEST_FIELDS))
        if unknown:
            raise TrainingRefused(f"unknown training argument(s): {', '.join(unknown)} "
                                  f"(accepted: {', '.join(_REQUEST_FIELDS)})")
        missing = [k for k in ("loss", "epochs", "batch_size", "lr", "epsilon")
                   if k not in fields]
        if missing:
            raise TrainingRefused(f"missing training argument(s): {', '.join(missing)}")
        request = cls(**dict(fields))
        request.validate()
        return request

    def validate(self) -> None:
        """Types and ranges that do not depend on the owner's settings."""
        if self.loss not in LOSSES:
            raise TrainingRefused(f"loss must be one of {', '.join(LOSSES)}")
        if self.optimizer not in OPTIMIZERS:
            raise TrainingRefused(f"optimizer must be one of {', '.join(OPTIMIZERS)}")
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise TrainingRefused(f"{name} must be a positive integer")
        for name in ("lr", "epsilon"):
            value = getattr(self, name)
            if type(value) not in (int, float) or not math.isfinite(value) or value <= 0:
                raise TrainingRefused(f"{name} must be a positive number")
        if self.delta is not None and (type(self.delta) not in (int, float)
                                       or not 0 < self.delta < 1):
            raise TrainingRefused("delta must be a number in (0, 1)")


@dataclass(frozen=True)
class TrainPlan:
    """The cost of a training run, computed before it starts: what the owner approves."""

    epsilon: float  # the target; the run spends at most this (Opacus' accountant)
    delta: float
    noise_multiplier: float
    sample_rate: float
    epochs: int
    steps: int
    rows: int
    batch_size: int  # expected
    max_grad_norm: float
    lr: float
    loss: str
    optimizer: str
    accountant: str
    parameters: int  # trainable parameter count
    fixes: tuple[str, ...] = ()  # what ModuleValidator.fix changed

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """One line for the owner's request table."""
        fixed = f"; fixed: {', '.join(self.fixes)}" if self.fixes else ""
        return (f"DP-SGD epsilon={self.epsilon:g} delta={self.delta:.2g} "
                f"noise_multiplier={self.noise_multiplier:.3f} "
                f"sample_rate={self.sample_rate:.4g} epochs={self.epochs} steps={self.steps} "
                f"clip={self.max_grad_norm:g} loss={self.loss} lr={self.lr:g}{fixed}")


@dataclass
class TrainResult:
    """What a run produces. Only ``parameters`` and ``epsilon``/``delta`` are covered by the
    guarantee; ``losses`` are exact per-epoch means over the training rows (release them only
    as an ordinary, checked request)."""

    parameters: dict[str, Any]  # name -> detached CPU tensor
    losses: list[float]
    epsilon: float  # spent, from Opacus' accountant
    delta: float
    plan: TrainPlan
    steps: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


Progress = Callable[[int, int, float], None]  # (epoch done, epochs, mean loss)


class Prepared:
    """A checked, costed training run on a private copy of the model; ``run()`` it once."""

    def __init__(self, model: Any, data: Any, labels: Any, plan: TrainPlan,
                 settings: TrainSettings) -> None:
        self.plan = plan
        self._model = model
        self._data = data
        self._labels = labels
        self._settings = settings
        self._done = False

    def run(self, progress: Progress | None = None) -> TrainResult:
        """Train the copy with DP-SGD; a second call is refused (it would spend twice)."""
        if self._done:
            raise TrainingRefused("this training run has already been used")
        self._done = True
        import torch
        from opacus import PrivacyEngine

        plan = self.plan
        model = self._model
        model.train()
        dataset = torch.utils.data.TensorDataset(self._data, self._labels)
        sampling = _private_generator()
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=plan.batch_size, generator=sampling)
        optimizer: torch.optim.Optimizer
        if plan.optimizer == "adam":
            optimizer = torch.optim.Adam(model.parameters(), lr=plan.lr)
        else:
            optimizer = torch.optim.SGD(model.parameters(), lr=plan.lr,
                                        momentum=self._settings.momentum)
        criterion = _criterion(plan.loss)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # secure-RNG advice: see the module docstring
            engine = PrivacyEngine(accountant=plan.accountant, secure_mode=False)
            private_model, private_optimizer, private_loader = engine.make_private(
                module=model, optimizer=optimizer, data_loader=loader,
                noise_multiplier=plan.noise_multiplier, max_grad_norm=plan.max_grad_norm,
                poisson_sampling=True, noise_generator=_private_generator())
        losses: list[float] = []
        steps = 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for epoch in range(plan.epochs):
                total, count = 0.0, 0
                for batch, target in private_loader:
                    private_optimizer.zero_grad()
                    # An empty Poisson batch still runs: the step adds noise (Opacus handles it)
                    loss = criterion(private_model(batch), target)
                    loss.backward()
                    _drop_non_finite_rows(private_optimizer.grad_samples)
                    private_optimizer.step()
                    steps += 1
                    if len(batch) and math.isfinite(float(loss.detach())):
                        total += float(loss.detach()) * len(batch)
                        count += len(batch)
                mean = total / count if count else float("nan")
                losses.append(mean)
                if progress is not None:
                    progress(epoch + 1, plan.epochs, mean)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # RDP's advice on orders: a looser, safe bound
            spent = float(engine.get_epsilon(plan.delta))
        parameters = {name: p.detach().clone().cpu() for name, p in model.named_parameters()}
        self._model = self._data = self._labels = None  # nothing of the run stays around
        return TrainResult(parameters=parameters, losses=losses, epsilon=spent,
                           delta=plan.delta, plan=plan, steps=steps)


def prepare(model: Any, data: Any, labels: Any, request: TrainRequest,
            settings: TrainSettings | None = None) -> Prepared:
    """Check, copy and cost a training run (see the module docstring); nothing trains yet.

    ``model`` is never changed: the run uses a deep copy (fixed by Opacus where needed).
    ``data`` and ``labels`` are tensors or arrays with one row per privacy unit; they are
    converted (a copy) to the dtypes the loss needs. The number of rows is treated as
    public, as Opacus does (it sets the sample rate): pass all rows of a shared dataset, not
    a filtered subset whose size depends on the data."""
    import torch

    settings = settings or TrainSettings()
    request.validate()
    if not isinstance(model, torch.nn.Module):
        raise TrainingRefused(
            f"the model must be a torch.nn.Module the owner's side can run by itself "
            f"(e.g. torch.nn.Sequential of layers), not a {type(model).__name__}")
    if request.epochs > settings.max_epochs:
        raise TrainingRefused(f"epochs={request.epochs} is more than the owner allows "
                              f"({settings.max_epochs})")
    if request.epsilon > settings.max_epsilon:
        raise TrainingRefused(f"epsilon={request.epsilon:g} is more than the owner allows "
                              f"per training run ({settings.max_epsilon:g})")
    if request.lr > settings.max_lr:
        raise TrainingRefused(f"lr={request.lr:g} is more than the owner allows "
                              f"({settings.max_lr:g})")
    x = _as_tensor(data, "data")
    y = _as_tensor(labels, "labels")
    if x.dim() < 2:
        raise TrainingRefused("data must have one row per record and at least one feature "
                              "column (2 or more dimensions)")
    rows = int(x.shape[0])
    if rows < 1 or int(y.shape[0]) != rows:
        raise TrainingRefused("data and labels must have the same, non-zero number of rows")
    if request.batch_size > rows:
        raise TrainingRefused("batch_size is larger than the number of rows")
    # indices for an Embedding stay integers; everything else trains as float32
    tables = [m.num_embeddings for m in model.modules()
              if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag))]
    if tables and not x.is_floating_point():
        # An index outside the table would fail the run (or its plan) for one record's
        # value: a bit about that record no noise covers. Clamped, like labels, it is one
        # more row the noise protects.
        x = x.to(torch.int64).clamp(0, min(tables) - 1)
    else:
        x = x.to(torch.float32)
    y = y.to(torch.int64) if request.loss in ("cross_entropy", "nll") else y.to(torch.float32)

    delta = settings.delta if request.delta is None else float(request.delta)
    if delta > settings.delta:
        raise TrainingRefused(f"delta={delta:.3g} is more than the owner allows "
                              f"({settings.delta:.3g})")
    if delta >= 1 / rows:
        raise TrainingRefused(f"delta={delta:.3g} is not below 1 / rows: with so few rows "
                              "the guarantee would allow releasing a row outright")

    _check_classes(model, settings)
    copied, fixes = _fixed_copy(model)
    output = _check_rows_independent(copied, x)
    y = _fit_labels(y, output, request.loss)
    trainable = sum(p.numel() for p in copied.parameters() if p.requires_grad)
    if trainable == 0:
        raise TrainingRefused("the model has no trainable parameters")

    batches = math.ceil(rows / request.batch_size)  # Opacus: sample_rate = 1 / len(loader)
    sample_rate = 1 / batches
    noise = _noise_multiplier(request.epsilon, delta, sample_rate, request.epochs,
                              batches * request.epochs, settings.accountant)
    plan = TrainPlan(
        epsilon=float(request.epsilon), delta=delta, noise_multiplier=noise,
        sample_rate=sample_rate, epochs=request.epochs, steps=batches * request.epochs,
        rows=rows, batch_size=request.batch_size, max_grad_norm=settings.max_grad_norm,
        lr=float(request.lr), loss=request.loss, optimizer=request.optimizer,
        accountant=settings.accountant, parameters=trainable, fixes=tuple(fixes))
    return Prepared(copied, x, y, plan, settings)


def train(model: Any, data: Any, labels: Any, request: TrainRequest,
          settings: TrainSettings | None = None,
          progress: Progress | None = None) -> TrainResult:
    """``prepare`` then ``run``, for callers with nobody to ask in between."""
    return prepare(model, data, labels, request, settings).run(progress)


# -- checks ---------------------------------------------------------------------------------
def _as_tensor(value: Any, what: str) -> Any:
    import torch

    if type(value).__module__.split(".")[0] == "pandas" and hasattr(value, "to_numpy"):
        value = value.to_numpy()  # a table's rows, or a column
        if value.dtype == object:
            raise TrainingRefused(f"{what} must hold numbers (a column holds text)")
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise TrainingRefused(f"{what} must hold numbers")
        return torch.tensor(value)  # a copy: the shared array is never touched
    if isinstance(value, torch.Tensor):
        if value.is_complex():
            raise TrainingRefused(f"{what} must hold real numbers")
        return value.detach().clone()
    raise TrainingRefused(f"{what} must be a tensor or an array, not a {type(value).__name__}")


def _check_classes(model: Any, settings: TrainSettings) -> None:
    """Only ``torch.nn`` (and Opacus) layer classes run unless the owner vouches for others:
    their ``forward`` is code the owner has not read."""
    if settings.allow_custom_modules:
        return
    for name, module in model.named_modules():
        origin = type(module).__module__
        if not (origin.startswith("torch.nn.") or origin.startswith("opacus.")):
            where = f" (at {name!r})" if name else ""
            raise TrainingRefused(
                f"{type(module).__name__}{where} is not a torch.nn layer; the owner has not "
                "allowed custom module classes for private training")


def _fixed_copy(model: Any) -> tuple[Any, list[str]]:
    """A deep copy that Opacus accepts: ``ModuleValidator.fix`` (BatchNorm to GroupNorm and
    the like), then ``validate``; what cannot be fixed is refused with Opacus' reasons."""
    import torch
    from opacus.validators import ModuleValidator

    before = {name: type(m).__name__ for name, m in model.named_modules()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            copied = ModuleValidator.fix(copy.deepcopy(model))
        except Exception as exc:  # noqa: BLE001 - any fixer failure is a refusal
            raise TrainingRefused(f"Opacus cannot make this model private: "
                                  f"{type(exc).__name__}") from None
        errors = ModuleValidator.validate(copied, strict=False)
    if errors:
        reasons = "; ".join(sorted({str(e).splitlines()[0][:160] for e in errors}))
        raise TrainingRefused(f"Opacus cannot train this model privately: {reasons}")
    for name, module in copied.named_modules():
        if getattr(module, "max_norm", None) is not None and isinstance(
                module, (torch.nn.Embedding, torch.nn.EmbeddingBag)):
            # forward renormalizes the rows it looks up, in place: which rows changed (the
            # codes present in the data) would leave outside DP-SGD's clipping and noise
            raise TrainingRefused(f"{name or 'model'}: an embedding with max_norm rewrites the "
                                  "rows it looks up in its forward pass, outside DP-SGD's "
                                  "clipping and noise; use one without max_norm")
    fixes = [f"{name or 'model'}: {before[name]} -> {type(m).__name__}"
             for name, m in copied.named_modules()
             if name in before and before[name] != type(m).__name__]
    for parameter in copied.parameters():
        parameter.grad = None
    return copied, fixes


def _check_rows_independent(model: Any, x: Any) -> tuple[int, ...]:
    """Per-row clipping bounds one row's influence only if the model's output for a row
    depends on that row alone. Probe it with random rows (no data): each row's output in a
    batch of three must equal its output alone. Returns the shape of one row's output."""
    import torch

    shape = (_PROBE_ROWS, *x.shape[1:])
    generator = torch.Generator().manual_seed(0)
    if x.is_floating_point():
        probe = torch.randn(shape, generator=generator)
    else:
        probe = torch.randint(0, 2, shape, generator=generator)
    was_training = model.training
    versions = [(t, t._version) for t in model.parameters()]  # buffers never leave
    model.eval()  # dropout off; the fixed copy has no batch statistics
    try:
        with torch.no_grad():
            together = model(probe)
            alone = [model(probe[i:i + 1]) for i in range(_PROBE_ROWS)]
    except Exception as exc:  # noqa: BLE001 - the model cannot run on rows of this shape
        raise TrainingRefused(
            f"the model cannot run on batches of rows shaped like the data "
            f"({type(exc).__name__}); the batch must be the first dimension") from None
    finally:
        model.train(was_training)
    if any(t._version != version for t, version in versions):
        # only the DP optimizer's noisy step may change parameters: a change made by the
        # forward pass itself depends on the rows seen and is neither clipped nor noised
        raise TrainingRefused("a layer changes its own parameters in its forward pass; "
                              "DP-SGD bounds only what the optimizer's step changes")
    if not isinstance(together, torch.Tensor) or together.dim() == 0 or (
            together.shape[0] != _PROBE_ROWS):
        raise TrainingRefused("the model must return one output row per input row")
    for i, single in enumerate(alone):
        if not isinstance(single, torch.Tensor) or single.shape != together[i:i + 1].shape or (
                not torch.allclose(single, together[i:i + 1], rtol=1e-4, atol=1e-5)):
            raise TrainingRefused(
                "the model mixes rows of a batch (an output row depends on other rows, e.g. "
                "Softmax(dim=0) or Flatten(0)): per-row clipping would not bound a row's "
                "influence")
    return tuple(together.shape[1:])


def _fit_labels(y: Any, output: tuple[int, ...], loss: str) -> Any:
    """Labels shaped to the model's output, by rules that read shapes only. A loss that
    broadcast labels against outputs (``mse`` of ``(B, 1)`` against ``(B,)`` is ``(B, B)``)
    would mix rows; a class index out of range would make training fail, a failure that one
    row could cause: class labels are clamped into range instead, as DP clamps to bounds."""
    if loss in ("cross_entropy", "nll"):
        if len(output) != 1 or y.dim() != 1:
            raise TrainingRefused(f"{loss} needs a model output of shape (rows, classes) and "
                                  "labels of shape (rows,)")
        return y.clamp(0, output[0] - 1)
    if y.dim() == 1 and output == (1,):
        y = y.unsqueeze(1)
    if tuple(y.shape[1:]) != output:
        raise TrainingRefused(f"{loss} needs labels shaped like the model's output per row "
                              f"{list(output)}, not {list(y.shape[1:])}")
    return y


def _noise_multiplier(epsilon: float, delta: float, sample_rate: float, epochs: int,
                      steps: int, accountant: str) -> float:
    """The noise for exactly the ``steps`` the run takes: calibrated by ``epochs``, Opacus
    counts ``int(epochs / sample_rate)`` steps, one fewer than ``batches * epochs`` for some
    batch counts, and the run would spend more than its plan."""
    from opacus.accountants.utils import get_noise_multiplier

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(get_noise_multiplier(
                target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                steps=steps, accountant=accountant))
    except ValueError:
        raise TrainingRefused(f"epsilon={epsilon:g} is too small to train for {epochs} "
                              "epoch(s) at this batch size") from None


def _criterion(loss: str) -> Any:
    import torch

    return cast(Any, {
        "cross_entropy": torch.nn.CrossEntropyLoss,
        "nll": torch.nn.NLLLoss,
        "mse": torch.nn.MSELoss,
        "bce_with_logits": torch.nn.BCEWithLogitsLoss,
    }[loss])()  # reduction "mean", as Opacus' optimizer is told


def _drop_non_finite_rows(grad_samples: list[Any]) -> None:
    """Zero the per-row gradients of rows whose gradient is not finite (an infinite value, a
    NaN label, an overflow). Clipping cannot bound a NaN: one such row would turn the sum, and
    with it every parameter, into NaN, a signal from a single row that no noise hides."""
    import torch

    if not grad_samples or len(grad_samples[0]) == 0:
        return
    finite = torch.ones(len(grad_samples[0]), dtype=torch.bool)
    for g in grad_samples:
        finite &= torch.isfinite(g.reshape(len(g), -1)).all(dim=1)
    if not bool(finite.all()):
        for g in grad_samples:
            g[~finite] = 0


def _private_generator() -> Any:
    """A generator no researcher operation can seed or read (see the module docstring)."""
    import torch

    return torch.Generator().manual_seed(secrets.randbits(63))


# -- in a session: r.dp.train ----------------------------------------------------------------
#
# ``r.dp.train(model, data=X, labels=y, ...)`` sends one operation, ``dp.train``, whose
# result is a training job. The job is asked for twice:
#
# 1. the *start* request: the kernel reserves the cost (epsilon, delta) in the ledger, or
#    refuses with PrivacyBudgetExceeded before anything runs; the worker answers with the
#    plan (noise multiplier, sample rate, steps, clipping norm), which the owner sees with
#    the cost and approves (by hand or by a ``dp_within_budget`` rule). The researcher gets
#    back only what they chose (epsilon, delta, epochs, batch size, loss, lr).
# 2. the *result* request, forwarded only after the start was approved: the worker trains
#    and returns the parameters; the kernel approves it on the strength of the start's
#    approval (audited as such) and records the accountant's epsilon.
#
# Each job trains at most once; a start that is denied or withdrawn ends the job.

TRAIN_OP = "dp.train"
_REFERENCES = ("data", "labels")


@dataclass(frozen=True)
class TrainSpec:
    """A ``dp.train`` operation as the owner's side understood it, from names and argument
    kinds only (kernel and worker parse it the same way)."""

    source: str  # the DP-shared name whose budget pays
    request: TrainRequest  # with delta filled in: exactly what is charged
    settings: TrainSettings
    model: p.PointerRef | p.StoreRef
    data: p.PointerRef | p.StoreRef
    labels: p.PointerRef | p.StoreRef

    @property
    def cost(self) -> tuple[float, float]:
        assert self.request.delta is not None
        return float(self.request.epsilon), float(self.request.delta)

    @property
    def lineage(self) -> str:
        r = self.request
        return (f"dp.train(…, loss={r.loss}, epochs={r.epochs}, batch_size={r.batch_size}, "
                f"lr={r.lr:g}, epsilon={r.epsilon:g})")

    def public(self) -> dict[str, Any]:
        """What the researcher chose and may see again: nothing computed from the data."""
        r = self.request
        return {"epsilon": float(r.epsilon), "delta": r.delta, "epochs": r.epochs,
                "batch_size": r.batch_size, "lr": float(r.lr), "loss": r.loss,
                "optimizer": r.optimizer}


def parse_train_op(op: p.Op, derivations: Any) -> TrainSpec:
    """Check a ``dp.train`` operation; ``PolicyViolation`` with the reason when it cannot
    run with the guarantee. ``derivations`` is ``duet.dp.Derivations`` (which objects
    derive row-stably from which DP-shared object, and the owner's DP declarations)."""
    if op.kind != "function" or op.target is not None or op.name != TRAIN_OP:
        raise PolicyViolation(f"{op.name} is not {TRAIN_OP}")
    if len(op.args) != 1 or not isinstance(op.args[0], (p.PointerRef, p.StoreRef)):
        raise PolicyViolation(f"{TRAIN_OP} takes one remote model, e.g. "
                              "r.torch.nn.Sequential(...)")
    refs = {}
    for key in _REFERENCES:
        ref = op.kwargs.get(key)
        if not isinstance(ref, (p.PointerRef, p.StoreRef)):
            raise PolicyViolation(f"{TRAIN_OP}: {key}= must be a remote object (derived from "
                                  "data the owner shared with dp=)")
        refs[key] = ref
    fields = {k: v for k, v in op.kwargs.items() if k not in _REFERENCES}
    try:
        request = TrainRequest.from_researcher(fields)
    except TrainingRefused as exc:
        raise PolicyViolation(f"{TRAIN_OP}: {exc}") from None
    tags = {key: derivations.tag(ref) for key, ref in refs.items()}
    for key, tag in tags.items():
        if tag is None or tag.kind == "mask":
            raise PolicyViolation(
                f"{TRAIN_OP}: {key}= is not derived from a DP-shared object through row-stable "
                "steps only (column selection, element-wise arithmetic with numbers); nor is "
                "data the owner shared without dp=")
    data, labels = tags["data"], tags["labels"]
    if data.source != labels.source or data.rows != labels.rows:
        raise PolicyViolation(f"{TRAIN_OP}: data= and labels= must be the same rows of one "
                              "DP-shared object")
    if data.rows != 0:
        raise PolicyViolation(f"{TRAIN_OP}: train on all rows of {data.source!r}, not a filtered "
                              "subset: DP-SGD treats the number of rows as public (it sets the "
                              "sampling rate), and a filtered count is not")
    spec = derivations.specs[data.source]
    if int(spec.get("contributions", 1)) != 1:
        raise PolicyViolation(f"{TRAIN_OP}: {data.source!r} has several rows per person "
                              f"(unit={spec.get('unit')!r}); DP-SGD here protects one row")
    settings = TrainSettings(**dict(spec.get("training") or {}))
    delta = settings.delta if request.delta is None else float(request.delta)
    if delta > settings.delta:
        raise PolicyViolation(f"{TRAIN_OP}: delta={delta:.3g} is more than the owner allows "
                              f"({settings.delta:.3g})")
    for name, value, bound in (("epochs", request.epochs, settings.max_epochs),
                               ("epsilon", request.epsilon, settings.max_epsilon),
                               ("lr", request.lr, settings.max_lr)):
        if value > bound:
            raise PolicyViolation(f"{TRAIN_OP}: {name}={value:g} is more than the owner allows "
                                  f"({bound:g})")
    request = TrainRequest(**{**asdict(request), "delta": delta})
    return TrainSpec(data.source, request, settings, op.args[0], refs["data"], refs["labels"])


class TrainJob:
    """Worker side: a checked, costed run on private copies, asked for twice (see above)."""

    def __init__(self, spec: TrainSpec, prepared: Prepared, object_id: int) -> None:
        self.spec = spec
        self.prepared: Prepared | None = prepared
        self.plan = prepared.plan
        self.phase: Literal["planned", "started", "done"] = "planned"
        # the object the kernel tracks: a copy of the reference made by another operation
        # (``numpy.asarray(job)[0]``, say) is not the job the owner approves
        self.object_id = object_id

    def held(self) -> list[Any]:
        """The tensors the job holds (the model and data copies), for the memory budget."""
        prepared = self.prepared
        if prepared is None:
            return []
        return [*prepared._model.parameters(), *prepared._model.buffers(), prepared._data,
                prepared._labels]

    def next_value(self) -> tuple[Any, dict[str, Any] | None]:
        """The value of the next request on this job and, for the start, the quote
        (``duet.dp.Quote`` fields) the kernel checks against its reservation."""
        if self.phase == "planned":
            self.phase = "started"
            plan = self.plan
            quote = {
                "statistic": "train", "source": self.spec.source, "epsilon": plan.epsilon,
                "delta": plan.delta,
                "mechanism": (f"DP-SGD (Opacus): Poisson sampling at rate {plan.sample_rate:.4g}, "
                              f"per-row clipping to {plan.max_grad_norm:g}, Gaussian noise, "
                              f"{plan.epochs} epochs = {plan.steps} steps, {plan.accountant} "
                              "accountant; only parameters return" + (
                                  f"; model fixed: {', '.join(plan.fixes)}" if plan.fixes
                                  else "")),
                "scale": f"noise multiplier {plan.noise_multiplier:.4g} "
                         f"(σ = {plan.noise_multiplier * plan.max_grad_norm:.4g} per step)",
                "accuracy": "n/a (a model, not a statistic)",
            }
            return {"training": "approved to start", **self.spec.public()}, quote
        if self.phase == "started" and self.prepared is not None:
            self.phase = "done"
            prepared, self.prepared = self.prepared, None
            result = prepared.run()
            quote = {
                "statistic": "train", "source": self.spec.source, "epsilon": result.epsilon,
                "delta": result.delta,
                "mechanism": f"DP-SGD parameters after {result.steps} steps; epsilon from "
                             f"Opacus' {self.plan.accountant} accountant",
                "scale": f"noise multiplier {self.plan.noise_multiplier:.4g}",
                "accuracy": "n/a (a model, not a statistic)",
            }
            return {"parameters": result.parameters, **self.spec.public()}, quote
        raise RequestError("this training job has already run; start a new one")


@dataclass
class _Job:
    spec: TrainSpec
    phase: Literal["planned", "starting", "paid", "running", "done", "dead"] = "planned"
    start: str = ""  # the start request's id
    result: str = ""  # the result request's id


class TrainJobs:
    """Kernel side: where each training job stands, so that the result is asked for only
    after the start was approved, and only once."""

    def __init__(self) -> None:
        self._jobs: dict[int, _Job] = {}
        self._by_request: dict[str, int] = {}

    def add(self, object_id: int, spec: TrainSpec) -> None:
        self._jobs[object_id] = _Job(spec)

    def spec(self, object_id: int) -> TrainSpec | None:
        job = self._jobs.get(object_id)
        return None if job is None else job.spec

    def request(self, object_id: int, request_id: str) -> Literal["start", "result"] | None:
        """A request on ``object_id``: "start", "result", None (not a job); raises
        ``RequestError`` when the job cannot be asked for now."""
        job = self._jobs.get(object_id)
        if job is None:
            return None
        if job.phase == "planned":
            job.phase, job.start = "starting", request_id
            self._by_request[request_id] = object_id
            return "start"
        if job.phase == "paid":
            job.phase, job.result = "running", request_id
            self._by_request[request_id] = object_id
            return "result"
        why = {"starting": "its start is still waiting for the owner",
               "running": "it is training", "done": "it has already run",
               "dead": "its start was not approved"}[job.phase]
        raise RequestError(f"this training job cannot be asked for now: {why}")

    def decided(self, request_id: str, approved: bool) -> None:
        job = self._job_of(request_id)
        if job is None:
            return
        if request_id == job.start:
            job.phase = "paid" if approved and job.phase == "starting" else "dead"
        elif request_id == job.result:
            job.phase = "done"

    def is_start(self, request_id: str) -> bool:
        job = self._job_of(request_id)
        return job is not None and request_id == job.start

    def start_of(self, request_id: str) -> tuple[str, TrainSpec] | None:
        """For a result request: its start request's id and the spec."""
        job = self._job_of(request_id)
        if job is None or request_id != job.result:
            return None
        return job.start, job.spec

    def forget(self, ids: Any) -> None:
        for object_id in ids:
            self._jobs.pop(object_id, None)

    def clear(self) -> None:
        self._jobs.clear()
        self._by_request.clear()

    def _job_of(self, request_id: str) -> _Job | None:
        object_id = self._by_request.get(request_id)
        return None if object_id is None else self._jobs.get(object_id)
