"""The DP-SGD engine (duet/dp_train.py) on its own: accuracy on real data next to the
non-private model, the epsilon the accountant reports against the target, what comes back
(parameters only), and everything a researcher might try to steer the guarantee with."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import duet
from duet import protocol as p
from duet.dp_train import (
    OWNER_CONTROLLED,
    TrainingRefused,
    TrainRequest,
    TrainSettings,
    prepare,
    train,
)
from tests.helpers import rawwire
from tests.helpers.sessions import eventually, session_pair


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0,
                                                        stratify=y)
    return x_train, x_test, y_train, y_test


def mlp() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(),
                               torch.nn.Linear(32, 10))


def accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((model(torch.tensor(x)).argmax(1).numpy() == y).mean())


def non_private(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int,
                batch_size: int, lr: float) -> None:
    """The same model, optimizer, loss and epochs, without clipping, noise or Poisson
    sampling: the baseline the DP accuracy is reported next to."""
    data = torch.utils.data.TensorDataset(torch.tensor(x), torch.tensor(y))
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    loss = torch.nn.CrossEntropyLoss()
    for _ in range(epochs):
        for batch, target in loader:
            optimizer.zero_grad()
            loss(model(batch), target).backward()
            optimizer.step()


REQUEST = TrainRequest(loss="cross_entropy", epochs=8, batch_size=128, lr=1.0, epsilon=2.0)


def test_dp_model_is_accurate_on_digits_next_to_the_non_private_one(
    digits: tuple[np.ndarray, ...], capsys: pytest.CaptureFixture[str],
) -> None:
    x_train, x_test, y_train, y_test = digits
    model = mlp()
    result = train(model, x_train, y_train, REQUEST)
    trained = mlp()
    trained.load_state_dict(result.parameters)
    dp_accuracy = accuracy(trained, x_test, y_test)

    baseline = mlp()
    non_private(baseline, x_train, y_train, epochs=8, batch_size=128, lr=1.0)
    plain_accuracy = accuracy(baseline, x_test, y_test)
    with capsys.disabled():
        print(f"\nload_digits test accuracy: DP (epsilon={result.epsilon:.3f}) "
              f"{dp_accuracy:.3f}, non-private {plain_accuracy:.3f}")
    assert dp_accuracy >= 0.7  # ten classes: chance is 0.1; typically ~0.87
    assert plain_accuracy >= 0.9
    assert len(result.losses) == 8 and result.losses[-1] < result.losses[0]
    assert result.steps == result.plan.steps == 8 * 11  # ceil(1347 / 128) batches per epoch


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_the_epsilon_spent_matches_the_target(
    digits: tuple[np.ndarray, ...], accountant: Any,
) -> None:
    x_train, _, y_train, _ = digits
    request = TrainRequest(loss="cross_entropy", epochs=2, batch_size=256, lr=0.5,
                           epsilon=1.5)
    prepared = prepare(mlp(), x_train, y_train, request, TrainSettings(accountant=accountant))
    plan = prepared.plan
    assert plan.sample_rate == 1 / 6 and plan.steps == 12  # ceil(1347 / 256) = 6
    assert plan.delta == 1e-5 and plan.max_grad_norm == 1.0 and plan.noise_multiplier > 0.5
    result = prepared.run()
    # get_noise_multiplier searches until the target is met from below within 0.01
    assert 1.5 - 0.02 <= result.epsilon <= 1.5 + 1e-6, result.epsilon
    assert result.delta == plan.delta
    with pytest.raises(TrainingRefused, match="already been used"):
        prepared.run()  # a second run would spend the budget twice


def test_more_epochs_or_a_smaller_epsilon_cost_more_noise(
    digits: tuple[np.ndarray, ...],
) -> None:
    x_train, _, y_train, _ = digits
    base = dict(loss="cross_entropy", batch_size=128, lr=0.5)
    one = prepare(mlp(), x_train, y_train, TrainRequest(epochs=1, epsilon=2.0, **base)).plan
    five = prepare(mlp(), x_train, y_train, TrainRequest(epochs=5, epsilon=2.0, **base)).plan
    tight = prepare(mlp(), x_train, y_train, TrainRequest(epochs=1, epsilon=0.5, **base)).plan
    assert one.noise_multiplier < five.noise_multiplier
    assert one.noise_multiplier < tight.noise_multiplier
    assert "noise_multiplier=" in one.describe() and "epsilon=2" in one.describe()


class RowRecorder(torch.nn.Module):
    """An owner's custom layer whose buffer keeps a copy of the last input row: the reason
    a trained model's buffers and state_dict never leave."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(64, 10)
        self.register_buffer("last_row", torch.zeros(64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(x):
            self.last_row.copy_(x[0].detach())
        return self.fc(x)


def test_a_buffer_that_copies_input_rows_does_not_come_back(
    digits: tuple[np.ndarray, ...],
) -> None:
    x_train, _, y_train, _ = digits
    request = TrainRequest(loss="cross_entropy", epochs=1, batch_size=256, lr=0.5,
                           epsilon=1.0)
    with pytest.raises(TrainingRefused, match="RowRecorder.*not a torch.nn layer"):
        prepare(RowRecorder(), x_train, y_train, request)  # not unless the owner vouches

    model = RowRecorder()
    result = train(model, x_train, y_train, request,
                   TrainSettings(allow_custom_modules=True))
    assert set(result.parameters) == {"fc.weight", "fc.bias"}
    assert all(not isinstance(v, torch.nn.Parameter) and not v.requires_grad
               for v in result.parameters.values())
    row_bytes = {x.tobytes() for x in x_train}
    sent = b"".join(v.numpy().tobytes() for v in result.parameters.values())
    assert not any(row in sent for row in row_bytes)
    assert torch.equal(model.last_row, torch.zeros(64))  # the original was never run


def test_the_researchers_model_is_never_trained_in_place(
    digits: tuple[np.ndarray, ...],
) -> None:
    x_train, _, y_train, _ = digits
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prepared = prepare(model, x_train, y_train, TrainRequest(
        loss="cross_entropy", epochs=1, batch_size=256, lr=0.5, epsilon=1.0))
    with torch.no_grad():  # a change after the request: what trains was frozen before
        model[0].weight.fill_(7.0)
    result = prepared.run()
    assert torch.equal(model[0].weight, torch.full((32, 64), 7.0))
    assert not torch.equal(result.parameters["0.weight"], torch.full((32, 64), 7.0))
    assert torch.equal(model[2].weight, before["2.weight"])
    assert not torch.equal(result.parameters["2.weight"], before["2.weight"])


def test_batchnorm_is_replaced_by_groupnorm_and_said_so(
    digits: tuple[np.ndarray, ...],
) -> None:
    x_train, _, y_train, _ = digits
    # (GroupNorm normalizes each row over groups of channels: 64 channels make 32 groups
    # of two; with 32 channels each group would hold one value and nothing could train)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.BatchNorm1d(64),
                                torch.nn.ReLU(), torch.nn.Linear(64, 10))
    prepared = prepare(model, x_train, y_train, TrainRequest(
        loss="cross_entropy", epochs=1, batch_size=256, lr=0.5, epsilon=1.0))
    assert prepared.plan.fixes == ("1: BatchNorm1d -> GroupNorm",)
    assert isinstance(model[1], torch.nn.BatchNorm1d)  # the original is untouched
    result = prepared.run()
    assert set(result.parameters) == {"0.weight", "0.bias", "1.weight", "1.bias",
                                      "3.weight", "3.bias"}  # no running_mean / var


@pytest.mark.parametrize("layers, reason", [
    ([torch.nn.Linear(64, 10), torch.nn.Softmax(dim=0)], "mixes rows"),
    ([torch.nn.Flatten(0), torch.nn.Unflatten(0, (-1, 10))], "mixes rows|cannot run"),
    ([torch.nn.Conv1d(1, 10, 64)], "cannot run|mixes rows"),  # rows fed as channels
    ([torch.nn.Bilinear(64, 64, 10)], "cannot run"),
])
def test_models_that_mix_rows_or_cannot_run_per_row_are_refused(
    digits: tuple[np.ndarray, ...], layers: list[torch.nn.Module], reason: str,
) -> None:
    x_train, _, y_train, _ = digits
    with pytest.raises(TrainingRefused, match=reason):
        prepare(torch.nn.Sequential(*layers), x_train, y_train, TrainRequest(
            loss="cross_entropy", epochs=1, batch_size=256, lr=0.5, epsilon=1.0))


class _RenormsInForward(torch.nn.Module):
    """A layer that rewrites its own weight in forward, depending on the rows it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.linear.weight[:, 0] = x[:, 0].mean()
        return self.linear(x)


def test_layers_that_change_their_parameters_in_forward_are_refused(
    digits: tuple[np.ndarray, ...],
) -> None:
    """Found by the red team: an Embedding with max_norm renormalizes exactly the rows of the
    codes present in the data, in place, outside DP-SGD's clipping and noise; the returned
    weights then show which codes occur (one person's rare code included)."""
    x_train, _, y_train, _ = digits
    request = TrainRequest(loss="cross_entropy", epochs=1, batch_size=256, lr=0.5, epsilon=1.0)
    codes = np.clip(x_train[:, :1], 0, 15).astype(np.int64)
    embedding = torch.nn.Sequential(torch.nn.Embedding(16, 4, max_norm=1.0),
                                    torch.nn.Flatten(), torch.nn.Linear(4, 10))
    with pytest.raises(TrainingRefused, match="max_norm"):
        prepare(embedding, codes, y_train, request)
    with pytest.raises(TrainingRefused, match="changes its own parameters"):
        prepare(_RenormsInForward(), x_train, y_train, request,
                TrainSettings(allow_custom_modules=True))


def test_opacus_refusals_are_reported_with_the_reason(digits: tuple[np.ndarray, ...]) -> None:
    x_train, _, y_train, _ = digits
    frozen = torch.nn.Linear(64, 10).requires_grad_(False)
    with pytest.raises(TrainingRefused, match="no trainable parameters"):
        prepare(frozen, x_train, y_train, TrainRequest(
            loss="cross_entropy", epochs=1, batch_size=256, lr=0.5, epsilon=1.0))
    with pytest.raises(TrainingRefused, match="torch.nn.Module"):
        prepare(object(), x_train, y_train, TrainRequest(
            loss="cross_entropy", epochs=1, batch_size=256, lr=0.5, epsilon=1.0))


@pytest.mark.parametrize("name", sorted(OWNER_CONTROLLED))
def test_the_researcher_cannot_set_what_the_guarantee_depends_on(name: str) -> None:
    fields = dict(loss="cross_entropy", epochs=1, batch_size=64, lr=0.1, epsilon=1.0)
    fields[name] = 100.0
    with pytest.raises(TrainingRefused, match="set by the data owner"):
        TrainRequest.from_researcher(fields)


@pytest.mark.parametrize("change, reason", [
    ({"epochs": 31}, "more than the owner allows"),  # the default bound is 30
    ({"epsilon": 50.0}, "more than the owner allows"),
    ({"delta": 0.01}, "more than the owner allows"),
    ({"lr": 1e6}, "more than the owner allows"),
    ({"batch_size": 10_000}, "larger than the number of rows"),
    ({"epsilon": 1e-9}, "too small"),
])
def test_owner_bounds_are_enforced(digits: tuple[np.ndarray, ...], change: dict[str, Any],
                                   reason: str) -> None:
    x_train, _, y_train, _ = digits
    fields: dict[str, Any] = dict(loss="cross_entropy", epochs=1, batch_size=256, lr=0.5,
                                  epsilon=1.0)
    fields.update(change)
    with pytest.raises(TrainingRefused, match=reason):
        prepare(mlp(), x_train, y_train, TrainRequest.from_researcher(fields))


@pytest.mark.parametrize("fields, reason", [
    ({"epochs": True}, "positive integer"),
    ({"epochs": 2.0}, "positive integer"),
    ({"batch_size": 0}, "positive integer"),
    ({"lr": float("nan")}, "positive number"),
    ({"epsilon": float("inf")}, "positive number"),
    ({"epsilon": "2"}, "positive number"),
    ({"loss": "hinge"}, "loss must be one of"),
    ({"optimizer": "lbfgs"}, "optimizer must be one of"),
    ({"delta": 1.0}, "delta must be"),
    ({"momentum": 0.9}, "unknown training argument"),
])
def test_malformed_requests_are_refused_by_name(fields: dict[str, Any], reason: str) -> None:
    base: dict[str, Any] = dict(loss="cross_entropy", epochs=1, batch_size=64, lr=0.1,
                                epsilon=1.0)
    base.update(fields)
    with pytest.raises(TrainingRefused, match=reason):
        TrainRequest.from_researcher(base)
    with pytest.raises(TrainingRefused, match="missing training argument"):
        TrainRequest.from_researcher({"loss": "mse"})


def test_mismatched_rows_and_shapes_are_refused(digits: tuple[np.ndarray, ...]) -> None:
    x_train, _, y_train, _ = digits
    request = TrainRequest(loss="cross_entropy", epochs=1, batch_size=64, lr=0.1, epsilon=1.0)
    with pytest.raises(TrainingRefused, match="same, non-zero number of rows"):
        prepare(mlp(), x_train, y_train[:-1], request)
    with pytest.raises(TrainingRefused, match="at least one feature"):
        prepare(mlp(), x_train[:, 0], y_train, request)
    with pytest.raises(TrainingRefused, match="tensor or an array"):
        prepare(mlp(), x_train.tolist(), y_train, request)


def test_the_global_seed_does_not_fix_the_noise(digits: tuple[np.ndarray, ...]) -> None:
    """A researcher can call torch.manual_seed in the worker; if the sampler or the noise
    used torch's global generator, the noise would be known and could be subtracted."""
    x_train, _, y_train, _ = digits
    request = TrainRequest(loss="cross_entropy", epochs=1, batch_size=256, lr=0.5,
                           epsilon=1.0)
    runs = []
    for _ in range(2):
        model = mlp()
        torch.manual_seed(1234)
        runs.append(train(model, x_train, y_train, request).parameters["2.bias"])
    assert not torch.equal(runs[0], runs[1])


def test_one_poisoned_row_cannot_turn_the_model_into_nan(
    digits: tuple[np.ndarray, ...],
) -> None:
    """Clipping cannot bound a NaN: without care one row holding inf (or a NaN label) would
    make every released parameter NaN, a certain signal from a single row."""
    x_train, _, y_train, _ = digits
    x = x_train.copy()
    x[5, 3] = np.inf
    labels = y_train.astype(np.float64)
    labels[7] = np.nan  # becomes a clamped class index
    result = train(mlp(), x, labels, TrainRequest(
        loss="cross_entropy", epochs=2, batch_size=256, lr=0.5, epsilon=1.0))
    assert all(bool(torch.isfinite(v).all()) for v in result.parameters.values())

    y = np.zeros((len(x_train), 1), dtype=np.float32)
    y[9, 0] = np.inf
    regression = torch.nn.Sequential(torch.nn.Linear(64, 1))
    result = train(regression, x_train, y, TrainRequest(
        loss="mse", epochs=1, batch_size=256, lr=0.1, epsilon=1.0))
    assert all(bool(torch.isfinite(v).all()) for v in result.parameters.values())


def test_out_of_range_class_labels_cannot_make_training_fail(
    digits: tuple[np.ndarray, ...],
) -> None:
    """Whether a run failed is data: a label >= the number of classes in one row must not
    decide it. Labels are clamped into the model's classes."""
    x_train, _, y_train, _ = digits
    labels = y_train.copy()
    labels[0] = 10_000
    labels[1] = -100  # CrossEntropyLoss' ignore_index, so also not a special value
    result = train(mlp(), x_train, labels, TrainRequest(
        loss="nll", epochs=1, batch_size=256, lr=0.1, epsilon=1.0))
    assert set(result.parameters) == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_out_of_range_embedding_indices_cannot_make_training_fail(
    digits: tuple[np.ndarray, ...],
) -> None:
    """Found by the red team: one code >= the table's size (or below 0) made the run fail
    with IndexError, and a failed run charges nothing: a free bit about that row. Indices
    are clamped into the table, as labels are into the classes."""
    x_train, _, y_train, _ = digits
    codes = np.clip(x_train[:, :1], 0, 15).astype(np.int64)
    codes[0, 0], codes[1, 0] = 60, -3
    model = torch.nn.Sequential(torch.nn.Embedding(16, 4), torch.nn.Flatten(),
                                torch.nn.Linear(4, 10))
    result = train(model, codes, y_train, TrainRequest(
        loss="cross_entropy", epochs=1, batch_size=256, lr=0.5, epsilon=1.0))
    assert set(result.parameters) == {"0.weight", "2.weight", "2.bias"}


@pytest.mark.parametrize("rows, batch_size, epochs", [(750, 10, 3), (3, 1, 6), (1000, 7, 2)])
def test_the_noise_is_calibrated_for_the_steps_the_run_takes(rows: int, batch_size: int,
                                                              epochs: int) -> None:
    """Found by the red team: calibrated by epochs, Opacus counts int(epochs / q) steps,
    one fewer than ceil(rows / batch_size) * epochs for 750 rows in batches of 10 over 3
    epochs (224 for 225): the run then spent more than its plan, which the kernel takes for
    a lying worker."""
    x = torch.randn(rows, 4)
    y = (x[:, 0] > 0).long()
    request = TrainRequest(loss="cross_entropy", epochs=epochs, batch_size=batch_size,
                           lr=0.1, epsilon=3.0)
    settings = TrainSettings(delta=min(1e-5, 0.5 / rows))
    plan = prepare(torch.nn.Linear(4, 2), x, y, request, settings).plan
    assert plan.steps == -(-rows // batch_size) * epochs
    result = train(torch.nn.Linear(4, 2), x, y, request, settings)
    assert result.steps == plan.steps and result.epsilon <= 3.0


def test_labels_that_would_broadcast_across_rows_are_refused(
    digits: tuple[np.ndarray, ...],
) -> None:
    """mse of outputs (B, 2) against labels (B,) broadcasts, so each row's loss would read
    other rows' labels; (B, 1) against (B,) is reshaped instead."""
    x_train, _, y_train, _ = digits
    request = TrainRequest(loss="mse", epochs=1, batch_size=256, lr=0.1, epsilon=1.0)
    with pytest.raises(TrainingRefused, match="shaped like the model's output"):
        prepare(torch.nn.Linear(64, 2), x_train, y_train.astype(np.float32), request)
    prepared = prepare(torch.nn.Linear(64, 1), x_train, y_train.astype(np.float32), request)
    assert prepared.plan.loss == "mse"
    with pytest.raises(TrainingRefused, match=r"shape \(rows, classes\)"):
        prepare(torch.nn.Linear(64, 10), x_train, np.eye(10)[y_train], TrainRequest(
            loss="cross_entropy", epochs=1, batch_size=256, lr=0.1, epsilon=1.0))


def test_empty_poisson_batches_still_count_as_steps() -> None:
    x = torch.randn(3, 4)
    y = torch.tensor([0, 1, 0])
    result = train(torch.nn.Linear(4, 2), x, y, TrainRequest(
        loss="cross_entropy", epochs=6, batch_size=1, lr=0.1, epsilon=5.0),
        TrainSettings(delta=1e-3))
    assert result.steps == 18 and 4.9 <= result.epsilon <= 5.0


# -- in a session: r.dp.train, the owner's approval of its cost, the ledger -----------------
# Real sessions in memory with the real worker process (tests/helpers/sessions.py).

def shared_digits() -> Any:
    """load_digits as the owner shares it: a table of 64 pixel columns (0..1) and the label."""
    frame = load_digits(as_frame=True).frame
    pixels = [c for c in frame.columns if c != "target"]
    frame[pixels] = frame[pixels] / 16.0
    return frame


PIXELS = [f"pixel_{i}_{j}" for i in range(8) for j in range(8)]


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Any, Any]]:
    from duet.dp import DP

    frame = shared_digits()
    with session_pair(tmp_path / "audit.sqlite3") as (owner, researcher):
        owner.share(frame, "digits", dp=DP(epsilon=3.0, delta=1e-4))
        owner.share(frame, "plain")  # the same rows, shared without dp=
        owner.share(torch.tensor(frame[PIXELS].to_numpy(), dtype=torch.float32), "pixels")
        eventually(lambda: {"digits", "plain", "pixels"} <= set(researcher.store), 10)
        yield owner, researcher


def remote_mlp(r: Any) -> Any:
    nn = r.torch.nn
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


TRAIN = dict(loss="cross_entropy", epochs=5, batch_size=128, lr=1.0, epsilon=2.0)


def train_digits(r: Any) -> Any:
    """The researcher's DP training job over the shared digits, with ``TRAIN``."""
    digits = r.store["digits"]
    return r.dp.train(remote_mlp(r), data=digits[PIXELS], labels=digits["target"], **TRAIN)


def test_a_researcher_trains_privately_and_gets_parameters_only(pair: tuple[Any, Any]) -> None:
    owner, r = pair
    owner.requests.add_rule("approve", dp_within_budget=True)
    job = train_digits(r)
    result = job.get("a private digit classifier", timeout=120)

    assert set(result["parameters"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert result["epsilon"] == 2.0 and result["delta"] == 1e-5  # what was asked for
    net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    net.load_state_dict(result["parameters"])
    frame = shared_digits()
    assert accuracy(net, frame[PIXELS].to_numpy(np.float32), frame["target"].to_numpy()) >= 0.7

    start, released = owner.requests[0], owner.requests[1]
    assert start.decided_by.startswith("rule:") and start.dp is not None
    assert "noise multiplier" in start.dp.scale and "Poisson sampling at rate" in (
        start.dp.mechanism) and (start.dp.epsilon, start.dp.delta) == (2.0, 1e-5)
    assert released.decided_by == "rule:1" and released.dp is not None
    spent = released.dp.epsilon  # the accountant's, within 0.01 below the target
    assert 1.98 <= spent <= 2.0
    budget = owner.budget("digits")
    assert budget.epsilon_spent == pytest.approx(spent) and budget.delta_spent == 1e-5
    charges = owner.audit.events(event="dp_charge")
    assert [c.detail["status"] for c in charges] == ["reserved", "spent"]
    assert charges[-1].detail["epsilon"] == pytest.approx(spent)


def test_the_owner_sees_the_cost_before_anything_trains(pair: tuple[Any, Any]) -> None:
    owner, r = pair
    job = train_digits(r)
    handle = job.pointer.request("start, please")
    start = owner.requests.wait(60)
    assert start is not None and start.dp is not None and start.dp.kind == "dp"
    assert owner.budget("digits").epsilon_left == pytest.approx(1.0)  # reserved: counts
    assert len(owner.requests) == 1  # no parameters exist yet
    start.deny("not today")
    with pytest.raises(duet.RequestDenied):
        handle.result(30)
    assert owner.budget("digits").epsilon_left == pytest.approx(3.0)  # given back
    with pytest.raises(duet.RequestError, match="its start was not approved"):
        job.pointer.get("the result anyway", timeout=30)
    assert [q.status for q in owner.requests] == ["denied"]


def test_a_start_approved_by_hand_releases_the_parameters(pair: tuple[Any, Any]) -> None:
    owner, r = pair
    job = train_digits(r)
    handle = job.pointer.request("start")
    start = owner.requests.wait(60)
    assert start is not None
    start.approve()
    assert handle.result(30)["epochs"] == 5
    job.started = {}
    assert set(job.result("parameters", timeout=120)["parameters"]) == {
        "0.weight", "0.bias", "2.weight", "2.bias"}
    assert owner.requests[1].decided_by == "dp.train start"
    with pytest.raises(duet.RequestError, match="it has already run"):
        job.pointer.get("again", timeout=30)


def test_budget_exhaustion_refuses_a_second_run_before_it_starts(
    pair: tuple[Any, Any],
) -> None:
    owner, r = pair
    owner.requests.add_rule("approve", dp_within_budget=True)
    digits = r.store["digits"]
    r.dp.train(remote_mlp(r), data=digits[PIXELS], labels=digits["target"], **TRAIN).get(
        "first", timeout=120)
    second = r.dp.train(remote_mlp(r), data=digits[PIXELS], labels=digits["target"], **TRAIN)
    with pytest.raises(duet.PrivacyBudgetExceeded, match="digits"):
        second.get("second", timeout=60)
    assert len(owner.requests) == 2  # the first run's start and result only
    assert owner.budget("digits").epsilon_spent <= 2.0


def test_batchnorm_comes_back_as_groupnorm_parameters_without_buffers(
    pair: tuple[Any, Any],
) -> None:
    owner, r = pair
    owner.requests.add_rule("approve", dp_within_budget=True)
    nn = r.torch.nn
    model = nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10))
    digits = r.store["digits"]
    result = r.dp.train(model, data=digits[PIXELS], labels=digits["target"], **{
        **TRAIN, "epochs": 1, "epsilon": 1.0}).get("bn", timeout=120)
    assert set(result["parameters"]) == {"0.weight", "0.bias", "1.weight", "1.bias",
                                         "3.weight", "3.bias"}
    assert "BatchNorm1d -> GroupNorm" in owner.requests[0].dp.mechanism


def test_the_researchers_api_refuses_owner_settings_and_remote_modules(
    pair: tuple[Any, Any],
) -> None:
    _, r = pair
    digits = r.store["digits"]
    with pytest.raises(duet.PolicyViolation, match="max_grad_norm, noise_multiplier"):
        r.dp.train(remote_mlp(r), data=digits[PIXELS], labels=digits["target"],
                   max_grad_norm=100.0, noise_multiplier=0.0, **TRAIN)

    class Net(duet.RemoteModule):
        def __init__(self) -> None:
            super().__init__()
            self.fc = r.torch.nn.Linear(64, 10)

        def forward(self, x: Any) -> Any:
            return self.fc(x)

    with pytest.raises(TypeError, match="RemoteModule's forward is Python in your kernel"):
        r.dp.train(Net(), data=digits[PIXELS], labels=digits["target"], **TRAIN)


def raw_train(r: Any, model: Any, data: Any, labels: Any, **kwargs: Any) -> Any:
    """A dp.train operation as a hostile researcher writes it, and a pointer to its result."""
    object_id = rawwire.new_id(r)
    rawwire.send_raw(r, rawwire.op(object_id, "dp.train", args=[model], kwargs={
        "data": data, "labels": labels, **kwargs}))
    return duet.Pointer(r, p.PointerRef(object_id), "dp.train(raw)")


@pytest.mark.parametrize("extra, reason", [
    ({"max_grad_norm": 100.0}, "set by the data owner"),
    ({"noise_multiplier": 0.0}, "set by the data owner"),
    ({"sample_rate": 1.0}, "set by the data owner"),
    ({"poisson_sampling": False}, "set by the data owner"),
    ({"seed": 1}, "set by the data owner"),
    ({"epochs": 31}, "more than the owner allows"),
    ({"delta": 0.5}, "more than the owner allows"),
    ({"epsilon": float("nan")}, "positive number"),
])
def test_raw_wire_attempts_to_steer_the_guarantee_are_refused_at_once(
    pair: tuple[Any, Any], extra: dict[str, Any], reason: str,
) -> None:
    owner, r = pair
    model = remote_mlp(r)
    x, y = r.store["digits"][PIXELS], r.store["digits"]["target"]
    pointer = raw_train(r, model._check(), x._check(), y._check(), **{**TRAIN, **extra})
    with pytest.raises(duet.PolicyViolation, match=reason):
        eventually(lambda: pointer.id in r._refused, 10)
        pointer.get("raw", timeout=30)
    assert owner.budget("digits").epsilon_spent == 0 and len(owner.requests) == 0


def test_inputs_that_would_break_the_guarantee_are_refused(pair: tuple[Any, Any]) -> None:
    owner, r = pair
    owner.requests.add_rule("approve", dp_within_budget=True)
    digits, plain = r.store["digits"], r.store["plain"]
    over_four = digits[digits["target"] > 4]
    cases = {
        "not derived from a DP-shared": (plain[PIXELS], plain["target"]),
        "same rows of one": (digits[PIXELS], over_four["target"]),
        "row-stable": (digits[PIXELS], r.torch.zeros(1797)),
        "not a filtered subset": (over_four[PIXELS], over_four["target"]),
    }
    for reason, (x, y) in cases.items():
        with pytest.raises(duet.PolicyViolation, match=reason):
            r.dp.train(remote_mlp(r), data=x, labels=y, **TRAIN).get("x", timeout=30)
    repeated = digits.sample(n=1797, replace=True)  # rows repeated: not row-stable
    with pytest.raises(duet.PolicyViolation, match="row-stable"):
        r.dp.train(remote_mlp(r), data=repeated[PIXELS], labels=repeated["target"],
                   **TRAIN).get("x", timeout=30)
    assert owner.budget("digits").epsilon_spent == 0


def test_a_model_already_fitted_on_the_data_is_refused(pair: tuple[Any, Any]) -> None:
    """Its weights would carry the non-private fit out with the DP ones."""
    owner, r = pair
    owner.requests.add_rule("approve", dp_within_budget=True)
    digits = r.store["digits"]
    model = remote_mlp(r)
    optimizer = r.torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model(r.store["pixels"]).sum()  # any fit on shared data
    loss.backward()
    optimizer.step()
    job = r.dp.train(model, data=digits[PIXELS], labels=digits["target"], **TRAIN)
    with pytest.raises(duet.RemoteError):  # the failure is the owner's to release
        handle = job.pointer.request("start")
        failed = owner.requests.wait(60)
        assert failed is not None and "already depends on shared data" in failed.preview
        failed.approve()
        handle.result(30)
    assert owner.budget("digits").epsilon_spent == 0  # a refusal costs nothing


def test_the_result_cannot_be_asked_for_before_the_start_is_approved(
    pair: tuple[Any, Any],
) -> None:
    owner, r = pair
    job = train_digits(r)
    job.pointer.request("start")
    with pytest.raises(duet.RequestError, match="still waiting for the owner"):
        job.pointer.get("result now", timeout=30)
    start = owner.requests.wait(60)
    assert start is not None and len(owner.requests) == 1


def test_an_alias_of_the_job_is_not_the_job(pair: tuple[Any, Any]) -> None:
    """Another reference to the same job object (``numpy.asarray([job])[0]``) must not start
    it, train it or release anything: the kernel gates the job's own pointer only."""
    owner, r = pair
    owner.requests.add_rule("approve", dp_within_budget=True)
    owner.requests.add_rule("approve")  # an owner who approves everything else too
    job = train_digits(r)
    alias = r.np.asarray([job.pointer])[0]
    alias.request("the job by another name")
    failed = owner.requests.wait(60)
    assert failed is not None and "through its own pointer only" in failed.preview
    assert failed.dp is not None and failed.dp.kind == "exact"  # no rule releases it
    failed.deny("no")
    assert owner.budget("digits").epsilon_spent == 0
    result = job.get("the job itself", timeout=120)  # untouched by the attempt
    assert set(result["parameters"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}
