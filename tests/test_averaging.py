"""Specification of weight averaging (train.average) and activation regularisation (train.ar/tar)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from drnn_cli.averaging import WeightAverage
from drnn_cli.checkpoint import load_checkpoint
from drnn_cli.models import activation_penalty
from drnn_cli.report import SilentReporter
from drnn_cli.train_session import TrainRequest, train_run

TINY = {
    "data": {"max_tokens": 2000, "batch_size": 8, "num_steps": 10, "val_fraction": 0.2},
    "model": {"cell": "lstm", "hidden_size": 24, "num_layers": 2, "dropout": 0.2},
    "train": {"epochs": 3, "optimizer": "adam", "lr": 0.01, "sample_every": 0, "device": "cpu"},
}
STEPS_PER_EPOCH = 19  # 1,600 training tokens in 8 rows of 199 → 19 minibatches of 8 × 10


def train(workdir: Path, tree: dict, *overrides: str, run: str, **request) -> object:
    config = workdir / "tiny.yaml"
    config.write_text(yaml.safe_dump(tree))
    return train_run(TrainRequest(config_path=config, overrides=overrides, run_dir=Path(run), **request))


# ---------------------------------------------------------------------------------------------
# The average itself


def _one_weight(value: float) -> nn.Linear:
    layer = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(value)
    return layer


def test_swa_is_the_plain_mean_of_the_weights_of_every_active_step():
    model = _one_weight(0.0)
    average = WeightAverage(model, "swa", decay=0.9)
    for value in (4.0, 8.0, 3.0):
        model.weight.data.fill_(value)
        average.update(model, active=True)
    assert average.module.weight.item() == pytest.approx(5.0)  # (4 + 8 + 3) / 3
    assert average.count == 3


def test_ema_starts_from_the_first_active_step_and_decays_by_hand():
    """The decay-weighted mean of the active steps' weights, bias-corrected: after 2, 6, 10 at decay
    0.5, (0.125·2 + 0.25·6 + 0.5·10) / (1 − 0.5³) = 54/7 (the uncorrected EMA: 7)."""
    model = _one_weight(0.0)
    average = WeightAverage(model, "ema", decay=0.5)
    for value, active in ((7.0, False), (2.0, True), (6.0, True), (10.0, True)):
        model.weight.data.fill_(value)
        average.update(model, active=active)
    # inactive: follows 7; first active: 2; then 2 + (0.5/0.75)·(6 − 2) = 14/3; then + (0.5/0.875)·(10 − 14/3)
    assert average.module.weight.item() == pytest.approx(54 / 7)
    assert average.count == 3


def test_an_early_ema_is_not_held_back_by_the_first_steps_weights():
    """300 steps at decay 0.998 (AWD-style settings: lstm_full_cpu), the first at 0 and the rest at 1:
    the bias-corrected average is 0.998, the weights it has seen; uncorrected it would be 1 − 0.998²⁹⁹ ≈
    0.45, half the untrained first step's. Long after, the two agree."""
    model = _one_weight(0.0)
    average = WeightAverage(model, "ema", decay=0.998)
    average.update(model, active=True)
    model.weight.data.fill_(1.0)
    for _ in range(299):
        average.update(model, active=True)
    first_share = 0.002 * 0.998**299 / (1 - 0.998**300)  # the first step's weight in the mean
    assert average.module.weight.item() == pytest.approx(1 - first_share) and 1 - first_share > 0.997
    for _ in range(6000):
        average.update(model, active=True)
    assert average.module.weight.item() == pytest.approx(1.0, abs=1e-4)  # 0.998⁶³⁰⁰ ≈ 3e-6, and fp32 lerps


def test_an_inactive_average_follows_the_weights():
    model = _one_weight(1.0)
    average = WeightAverage(model, "swa", decay=0.9)
    model.weight.data.fill_(9.0)
    average.update(model, active=False)
    assert average.module.weight.item() == 9.0 and average.count == 0


# ---------------------------------------------------------------------------------------------
# Averaging in a training run


@pytest.mark.parametrize("kind", ["ema", "swa"])
def test_the_best_checkpoint_holds_the_average_and_eval_confirms_its_perplexity(
    workdir: Path, cli, kind: str
):
    result = train(workdir, TINY, f"train.average={kind}", "train.average_decay=0.9", run="runs/avg")
    best = load_checkpoint(workdir / "runs/avg/best.safetensors")
    last = load_checkpoint(workdir / "runs/avg/last.safetensors")
    raw = last.trainer_state["raw_model"]
    assert any(not torch.equal(raw[name], last.model_state[name]) for name in raw)  # averaged ≠ raw
    assert last.trainer_state["average_count"] > 0
    # on the device it trained on: eval's default would take a GPU where there is one (other kernels)
    code, out, _ = cli("eval", "--run", "runs/avg", "--split", "val", "--device", "cpu", "--json")
    assert code == 0
    assert json.loads(out.splitlines()[-1])["perplexity"] == pytest.approx(result.best_val_ppl, rel=1e-9)
    assert best.best_val_ppl == pytest.approx(result.best_val_ppl)


def test_averaging_changes_what_validation_sees(workdir: Path):
    plain = train(workdir, TINY, run="runs/plain")
    averaged = train(workdir, TINY, "train.average=swa", run="runs/swa")
    assert plain.train_ppl == averaged.train_ppl  # the raw weights train exactly as before
    assert plain.best_val_ppl != averaged.best_val_ppl


def test_averaging_starts_after_average_start_epochs(workdir: Path):
    train(workdir, TINY, "train.average=swa", "train.average_start=2", "train.epochs=2", run="runs/late")
    last = load_checkpoint(workdir / "runs/late/last.safetensors")
    assert last.trainer_state["average_count"] == 0  # not yet active: the average is the raw weights
    raw = last.trainer_state["raw_model"]
    assert all(torch.equal(raw[name], last.model_state[name]) for name in raw)


def test_an_average_paused_by_a_later_start_begins_afresh():
    """A resume that moves average_start later pauses the average: it follows the weights, and when it
    starts again the weights it followed must not count as averaged steps (a review found 3 of 4)."""
    average = WeightAverage(_one_weight(0.0), "swa", 0.9)
    for value in (1.0, 3.0):  # two averaged steps: the mean 2
        average.update(_one_weight(value), active=True)
    for value in (10.0, 20.0):  # paused
        average.update(_one_weight(value), active=False)
    average.update(_one_weight(40.0), active=True)  # the first step of a fresh average
    assert average.count == 1 and float(next(average.module.parameters())) == 40.0


def test_average_start_in_steps_averages_every_step_after_the_first_n(workdir: Path):
    """A long run counts in steps (one epoch may be its whole length): "5 steps" trains five plain steps,
    then folds in every later step's weights."""
    train(
        workdir, TINY, "train.average=swa", "train.average_start=5 steps", "train.epochs=2", run="runs/steps"
    )
    state = load_checkpoint(workdir / "runs/steps/last.safetensors").trainer_state
    assert state["global_step"] > 5 and state["average_count"] == state["global_step"] - 5


class _Notes(SilentReporter):
    def __init__(self) -> None:
        self.notes: list[str] = []

    def note(self, message: str) -> None:
        self.notes.append(message)


def test_an_average_that_never_starts_is_noted_before_training(workdir: Path):
    # average_start counts whole epochs: a run that ends first validates and predicts with raw weights
    config = workdir / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    late, soon = _Notes(), _Notes()
    settings = ("train.average=swa", "train.epochs=2")
    train_run(TrainRequest(config, (*settings, "train.average_start=2"), run_dir=Path("runs/late")), late)
    train_run(TrainRequest(config, (*settings, "train.average_start=1"), run_dir=Path("runs/soon")), soon)
    assert late.notes == [
        "train.average swa starts after train.average_start 2 epochs, and this run trains 2: its weights "
        "are never averaged (set train.average_start below 2)"
    ]
    assert soon.notes == []
    in_steps = _Notes()
    steps = f"train.average_start={2 * STEPS_PER_EPOCH} steps"  # as many as the run trains
    train_run(TrainRequest(config, (*settings, steps), run_dir=Path("runs/steps")), in_steps)
    assert in_steps.notes == [
        f"train.average swa starts after train.average_start {2 * STEPS_PER_EPOCH} steps, and this run trains "
        f"{2 * STEPS_PER_EPOCH}: its weights are never averaged (set train.average_start below "
        f"{2 * STEPS_PER_EPOCH} steps)"
    ]
    assert load_checkpoint(workdir / "runs/soon/last.safetensors").trainer_state["average_count"] > 0


def test_an_ema_over_fewer_steps_than_its_decay_spans_is_noted():
    """lstm_full_cpu's EMA (decay 0.998: about the last 500 steps) on a 2 KB text trained 50 steps, and
    its kept validation read 10.77 against 4.49 without it, with no word why (practitioner trial)."""
    from drnn_cli.config import build_config
    from drnn_cli.run_notes import idle_setting_notes

    def notes(**train: object) -> list[str]:
        return idle_setting_notes(
            build_config({"train": {"average": "ema", "average_decay": 0.998, **train}}), 50, 50
        )

    assert notes() == [
        "train.average ema (train.average_decay 0.998) averages about the last 500 steps, and this run averages "
        "50: its average is close to the mean of all of them, its first, barely trained steps' included, and "
        "what validates, is kept as best and predicts can read worse than the last weights (set "
        "train.average none for a run this short, or train it longer)"
    ]
    assert "this run averages 30:" in notes(average_start=20)[0]  # 20 of the 50 epochs (one step each) first
    assert notes(average_decay=0.9) == []  # about the last 10 steps, of 50
    assert (
        idle_setting_notes(build_config({"train": {"average": "ema", "average_decay": 0.998}}), 10, 7450)
        == []
    )


def test_a_resumed_averaged_run_ends_bit_identical_to_an_uninterrupted_one(workdir: Path):
    settings = ("train.average=ema", "train.average_decay=0.9")
    train(workdir, TINY, *settings, run="runs/straight")
    train(workdir, TINY, *settings, "train.epochs=1", run="runs/split")
    train(workdir, TINY, *settings, run="runs/split", resume=True)
    straight = load_checkpoint(workdir / "runs/straight/last.safetensors")
    split = load_checkpoint(workdir / "runs/split/last.safetensors")
    for name, value in straight.model_state.items():
        assert torch.equal(value, split.model_state[name]), name
    for name, value in straight.trainer_state["raw_model"].items():
        assert torch.equal(value, split.trainer_state["raw_model"][name]), name
    assert straight.trainer_state["average_count"] == split.trainer_state["average_count"]


def test_an_averaged_run_resumed_without_averaging_trains_on_from_the_raw_weights(workdir: Path):
    """The checkpoint's weights are the average; the optimizer's moments belong to the raw weights
    (trainer_state.raw_model), which are what training goes on from: the same weights an averaged run
    trains, since the average never feeds back into training."""
    settings = ("train.average=ema", "train.average_decay=0.9")
    straight = train(workdir, TINY, *settings, run="runs/straight")
    train(workdir, TINY, *settings, "train.epochs=1", run="runs/split")
    resumed = train(workdir, TINY, run="runs/split", resume=True)  # averaging off from here
    assert resumed.train_ppl == straight.train_ppl
    raw = load_checkpoint(workdir / "runs/straight/last.safetensors").trainer_state["raw_model"]
    split = load_checkpoint(workdir / "runs/split/last.safetensors")
    assert split.trainer_state.get("raw_model") is None
    for name, value in raw.items():
        assert torch.equal(value, split.model_state[name]), name


def test_a_resume_that_changes_the_kind_of_average_starts_the_new_one_afresh(workdir: Path):
    """An EMA is not a mean of N steps: resumed as SWA, the average starts from the raw weights, exactly
    as in a run that switches averaging on at the resume."""
    train(workdir, TINY, "train.average=ema", "train.average_decay=0.9", "train.epochs=1", run="runs/ema")
    train(workdir, TINY, "train.epochs=1", run="runs/plain")
    for name in ("ema", "plain"):
        train(workdir, TINY, "train.average=swa", "train.epochs=2", run=f"runs/{name}", resume=True)
    switched, switched_on = (
        load_checkpoint(workdir / f"runs/{n}/last.safetensors") for n in ("ema", "plain")
    )
    assert switched.trainer_state["average_count"] == switched_on.trainer_state["average_count"] > 0
    for name, value in switched_on.model_state.items():
        assert torch.equal(switched.model_state[name], value), name


# ---------------------------------------------------------------------------------------------
# AR / TAR


def test_activation_penalty_by_hand():
    raw = torch.tensor([[[1.0, 2.0]], [[3.0, 5.0]]])  # (T=2, B=1, H=2)
    dropped = torch.tensor([[[2.0, 0.0]], [[0.0, 4.0]]])
    # AR: mean(dropped²) = (4 + 0 + 0 + 16) / 4 = 5; TAR: mean((raw_1 − raw_0)²) = (4 + 9) / 2 = 6.5
    assert activation_penalty(raw, dropped, ar=2.0, tar=0.0).item() == pytest.approx(10.0)
    assert activation_penalty(raw, dropped, ar=0.0, tar=1.0).item() == pytest.approx(6.5)
    assert activation_penalty(raw, dropped, ar=2.0, tar=1.0).item() == pytest.approx(16.5)


def test_ar_and_tar_change_training_but_not_the_reported_loss_of_the_first_step(workdir: Path):
    one_step = {
        **TINY,
        "data": {**TINY["data"], "max_tokens": 90, "val_fraction": 0.0},
        "train": {**TINY["train"], "epochs": 1},
    }
    plain = train(workdir, one_step, run="runs/plain")  # 90 tokens, batch 8 × 10: one minibatch
    regularised = train(workdir, one_step, "train.ar=2", "train.tar=1", run="runs/ar")
    assert plain.train_ppl == regularised.train_ppl  # perplexity is the language-model loss alone
    a = load_checkpoint(workdir / "runs/plain/last.safetensors").model_state
    b = load_checkpoint(workdir / "runs/ar/last.safetensors").model_state
    assert any(not torch.equal(a[name], b[name]) for name in a)  # …but the penalty moved the weights
