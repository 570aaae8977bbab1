"""Long runs: step and time budgets, step cadences, capped validation, stop reasons."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from conftest import pythonpath_with_repo

from drnn_cli.budget import Budget, Cadence, parse_cadence, parse_duration
from drnn_cli.checkpoint import load_checkpoint
from drnn_cli.commands import DataRequest, describe_data
from drnn_cli.config import TrainConfig, build_config, load_config
from drnn_cli.errors import ConfigError, DrnnError, TrainingDiverged, TrainingInterrupted
from drnn_cli.evaluate import EvaluationAbandoned
from drnn_cli.optimizers import lr_factor
from drnn_cli.report import EpochRecord, RunStart, SilentReporter
from drnn_cli.start_point import StartPoint
from drnn_cli.step import StaticStep
from drnn_cli.stop_record import StopRecord, read_stop_record
from drnn_cli.train import Trainer
from drnn_cli.train_session import TrainRequest, train_run

# 1600 training tokens (val_fraction 0.2 of 2000) in 8 rows → 19 minibatches of 8 × 10 per epoch
STEPS_PER_EPOCH = 19
TINY = {
    "data": {"max_tokens": 2000, "batch_size": 8, "num_steps": 10, "val_fraction": 0.2},
    "model": {"cell": "lstm", "hidden_size": 24, "num_layers": 2, "dropout": 0.2},
    "train": {"epochs": 3, "optimizer": "adam", "lr": 0.01, "sample_every": 0, "device": "cpu"},
}


def write_config(directory: Path, tree: dict = TINY) -> Path:
    path = directory / "tiny.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def train(config: Path, *overrides: str, **request) -> object:
    return train_run(TrainRequest(config_path=config, overrides=overrides, **request))


def signal_at(monkeypatch: pytest.MonkeyPatch, global_step: int, signum: int) -> Callable[[], None]:
    """The trainer finds signal ``signum`` arrived when it asks after optimizer step ``global_step``, as a
    Ctrl-C (2) or SIGTERM (15) there would; returns what undoes it."""
    original = Trainer._stop_requested

    def stop_there(self: Trainer, *args: object) -> bool:
        if self.global_step == global_step:
            self.stops.signum = signum
        return original(self, *args)

    monkeypatch.setattr(Trainer, "_stop_requested", stop_there)
    return lambda: monkeypatch.setattr(Trainer, "_stop_requested", original)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def untimed_metrics(run: Path) -> list[dict]:
    """The metrics lines without their clock readings, which no two runs share."""
    return [{**line, "elapsed": 0, "tokens_per_s": 0} for line in metrics(run)]


def signal_while_validating(
    monkeypatch: pytest.MonkeyPatch, global_step: int
) -> tuple[list[int], Callable[[], None]]:
    """SIGTERM arrives as the validation after optimizer step ``global_step`` starts; returns the steps
    whose validation was abandoned (cut short at its first minibatch), and what undoes it."""
    abandoned: list[int] = []
    original = Trainer._validate

    def signalled_while_validating(self: Trainer, abandonable: bool = False) -> float | None:
        if self.global_step == global_step:
            self.stops.signum = 15
        try:
            return original(self, abandonable)
        except EvaluationAbandoned:
            abandoned.append(self.global_step)
            raise

    monkeypatch.setattr(Trainer, "_validate", signalled_while_validating)
    return abandoned, lambda: monkeypatch.setattr(Trainer, "_validate", original)


def resume_killed_at_its_first_step(
    monkeypatch: pytest.MonkeyPatch, config: Path, *overrides: str, run_dir: Path
) -> None:
    """``--resume``, killed (as by a SIGKILL) at the first optimizer step it takes."""

    def crash(self: StaticStep, window: torch.Tensor) -> None:
        raise RuntimeError("killed")

    with monkeypatch.context() as patched:
        patched.setattr(StaticStep, "__call__", crash)
        with pytest.raises(RuntimeError, match="killed"):
            train(config, *overrides, run_dir=run_dir, resume=True)


# ---------------------------------------------------------------------------------------------
# Parsing


def test_durations_take_seconds_minutes_and_hours():
    assert [parse_duration(v) for v in ("90s", "10m", "2h", "1.5m", 45, "30", 0)] == [
        90.0, 600.0, 7200.0, 90.0, 45.0, 30.0, 0.0
    ]  # fmt: skip
    # a compound duration, as a clock reads: each unit once, largest first
    assert [parse_duration(v) for v in ("1h30m", "1h 30m", "2m30s", "1 hour 5 minutes", "1h0.5m", "1h10s", "1H30M")] == [
        5400.0, 5400.0, 150.0, 3900.0, 3630.0, 3610.0, 5400.0
    ]  # fmt: skip
    bad_ones = (
        "ten minutes",
        "-5s",
        "5d",
        True,
        "nan",
        "30m1h",
        "1h1h",
        "1h30",
        "1h-30m",
        "h30m",
        "\u0663h",
        "\uff11h",
    )
    for bad in bad_ones:  # the last two: Arabic-Indic and full-width digits
        with pytest.raises(ValueError, match="duration"):
            parse_duration(bad)


def test_a_duration_past_float_range_is_refused_as_a_config_error_not_a_crash():
    # YAML integers have no size limit; float() of one past ~1.8e308 raises OverflowError. Too long, not
    # "of 0 or more seconds", which it is (red41)
    for huge in (10**400, "1" + "0" * 400 + "s"):
        with pytest.raises(ValueError, match="^is too long a duration; give a finite one such as 90s"):
            parse_duration(huge)
    with pytest.raises(ValueError, match="duration of 0 or more seconds"):
        parse_duration(-(10**400))
    with pytest.raises(ConfigError, match=r"^config error: train\.max_time: is too long a duration"):
        load_config(None, ["train.max_time=1" + "0" * 400])


def test_cadences_are_epochs_by_default_or_steps():
    assert parse_cadence(3, allow_zero=False) == 3
    assert parse_cadence("2 epochs", allow_zero=False) == 2
    assert parse_cadence("500 steps", allow_zero=False) == "500 steps"
    assert parse_cadence("1 step", allow_zero=True) == "1 steps"
    assert parse_cadence("100 Steps", allow_zero=False) == "100 steps"  # any case, as durations
    assert parse_cadence("2 EPOCHS", allow_zero=False) == 2
    assert parse_cadence(0, allow_zero=True) == 0
    # train.average_start: a point in the run, where 0 steps is its start as 0 epochs is
    assert [build_config({"train": {"average_start": v}}).train.average_start for v in ("0 steps", 0, "7 Steps")] == [
        0, 0, "7 steps"
    ]  # fmt: skip
    assert Cadence.of("500 steps") == Cadence(500, "steps") and Cadence.of(2) == Cadence(2, "epochs")
    assert [Cadence.of("5 steps").due_at_step(s) for s in (4, 5, 10)] == [False, True, True]
    assert not Cadence.of(1).due_at_step(5)  # an epoch cadence never fires inside an epoch
    epochs_or_steps = r"must be an integer number of epochs \(≥ 1\) or 'N steps', e\.g\. 500 steps"
    for bad, said in (
        (0, epochs_or_steps),
        ("0 steps", r"a step cadence needs at least 1 step, e\.g\. 500 steps"),
        ("5 minutes", epochs_or_steps),
        ("steps", epochs_or_steps),
        (-1, epochs_or_steps),
    ):
        with pytest.raises(ValueError, match=said):
            parse_cadence(bad, allow_zero=False)


def test_config_parses_budgets_and_cadences_and_names_bad_keys():
    config = load_config(
        None,
        ["train.max_time=10m", "train.eval_every=500 steps", "train.max_steps=20000", "train.log_every=2"],
    )
    assert config.train.max_time == 600.0 and config.train.max_steps == 20000
    assert config.train.eval_every == "500 steps" and config.train.log_every == 2
    assert load_config(None, ["train.checkpoint_every=3 epochs"]).train.checkpoint_every == 3
    assert load_config(None, ["train.max_time=1h30m"]).train.max_time == 5400.0
    with pytest.raises(
        ConfigError, match=r"train.eval_every: must be an integer number of epochs .* 'N steps'"
    ):
        load_config(None, ["train.eval_every=often"])
    with pytest.raises(
        ConfigError, match=r"train.max_time: must be a duration such as 90s, 10m, 2h or 1h30m"
    ):
        load_config(None, ["train.max_time=soon"])
    with pytest.raises(ConfigError, match="train.max_steps"):
        load_config(None, ["train.max_steps=-1"])


def test_cosine_under_a_step_budget_spans_the_steps_the_run_takes():
    cosine = TrainConfig(epochs=100, lr=1.0, schedule="cosine", min_lr=0.1)
    assert lr_factor(0.0, cosine, horizon=0.5) == pytest.approx(1.0)
    assert lr_factor(0.25, cosine, horizon=0.5) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(0.5, cosine, horizon=0.5) == pytest.approx(0.1)


# ---------------------------------------------------------------------------------------------
# Step budget


def test_max_steps_stops_after_exactly_n_steps_inside_an_epoch(workdir: Path):
    result = train(write_config(workdir), "train.max_steps=25", "train.epochs=50")
    run = workdir / "runs" / "tiny"
    assert (result.stop_reason, result.steps, result.epochs) == (
        "max_steps",
        25,
        round(25 / STEPS_PER_EPOCH, 6),
    )
    summary = result.summary()
    assert summary["stop_reason"] == "max_steps" and summary["steps"] == 25
    last = load_checkpoint(run / "last.safetensors")
    assert (last.epoch, last.step_in_epoch, last.trainer_state["global_step"]) == (
        1,
        25 - STEPS_PER_EPOCH,
        25,
    )
    lines = metrics(run)
    assert [(line["epoch"], line["step"]) for line in lines] == [(1, 19), (round(1 + 6 / 19, 6), 25)]
    from drnn_cli.commands import evaluate_split, load_model

    evaluated = evaluate_split(load_model(None, run / "last.safetensors", "cpu")).summary()
    assert (evaluated["epoch"], evaluated["step"]) == (1, 25)  # whole epochs, and the steps inside the next
    assert lines[-1]["val_ppl"] == result.val_ppl and lines[-1]["tokens_seen"] == 25 * 80
    assert result.best_val_ppl == min(line["val_ppl"] for line in lines)


def test_a_run_stopped_inside_an_epoch_reports_the_figures_of_its_last_metrics_line(workdir: Path):
    # the summary (--json, the table, d2l's line) and metrics.jsonl describe the same stop
    result = train(write_config(workdir), "train.max_steps=25", "train.epochs=50", "train.log_every=4 steps")
    last = metrics(workdir / "runs" / "tiny")[-1]
    assert last["step"] == 25 and last["epoch"] == result.epochs
    assert (result.train_ppl, result.val_ppl, result.tokens_per_s) == (
        last["train_ppl"],
        last["val_ppl"],
        last["tokens_per_s"],
    )
    # its training perplexity covers the steps since the line at step 24: one
    assert result.summary()["train_ppl_steps"] == last["train_ppl_steps"] == 1


def test_a_step_budget_that_ends_with_the_last_epoch_reports_the_epochs_as_the_end(workdir: Path):
    """A preset may cap a larger text at exactly its epochs' steps: on its own text it runs to the end."""
    result = train(write_config(workdir), f"train.max_steps={3 * STEPS_PER_EPOCH}")
    assert (result.stop_reason, result.steps, result.epochs) == ("epochs", 57, 3)
    shorter = train(write_config(workdir), f"train.max_steps={2 * STEPS_PER_EPOCH}", run_dir=workdir / "two")
    assert (shorter.stop_reason, shorter.steps, shorter.epochs) == ("max_steps", 38, 2)
    again = train(write_config(workdir), f"train.max_steps={3 * STEPS_PER_EPOCH}", resume=True)
    assert (again.stop_reason, again.steps, again.tokens_per_s) == (
        "epochs",
        57,
        None,
    )  # resumed: the same end


def test_progress_counts_the_epochs_a_step_budget_allows(workdir: Path, cli):
    """25 steps of 19 per epoch reach into epoch 2 of 50: the first line says 25 steps (1.32 epochs), the
    log lines count epochs of those 1.32 (they said "/2", read as 2 epochs to come), not 50. It names the
    CPU's threads too (OMP_NUM_THREADS=1 made a learner's lstm2 5× faster on a busy machine)."""
    import torch

    code, out, _ = cli("train", "--config", str(write_config(workdir)), "--set", "train.max_steps=25",
                       "--set", "train.epochs=50", "--set", "train.log_every=1")  # fmt: skip
    assert code == 0
    threads = torch.get_num_threads()
    named = f"{threads} thread{'' if threads == 1 else 's'}"
    on_cpu = f"on cpu ({named}), 25 steps (1.32 epochs), from scratch"
    assert on_cpu in out and "epoch 1/1.32 " in out and "epoch 1.32/1.32 " in out and "/50" not in out
    assert f" cpu, {named}, 1 process " in out  # the summary's device: not "cpu × 1"


def test_a_resume_with_nothing_to_train_records_where_its_text_moved(workdir: Path, corpus_path: Path):
    """It keeps the run's config.yaml but for the text's new place, which drnn eval --run reads."""
    text = workdir / "before.txt"
    text.write_bytes(corpus_path.read_bytes())
    config = write_config(workdir)
    train(config, "train.max_steps=5", f"data.path={text}")
    moved = text.rename(workdir / "after.txt")
    train(config, "train.max_steps=5", f"data.path={moved}", "train.lr=0.001", resume=True)
    recorded = yaml.safe_load((workdir / "runs" / "tiny" / "config.yaml").read_text())
    assert recorded["data"]["path"] == str(moved) and recorded["train"]["lr"] == TINY["train"]["lr"]


def test_a_resume_with_nothing_to_train_keeps_the_runs_config(workdir: Path):
    """Its --set values trained no step: config.yaml recorded lr 0.001 all the same, which the README's
    "simplest way" to resume (--config RUN/config.yaml) then took for the run's (practitioner trial)."""
    config = write_config(workdir)
    train(config, "train.max_steps=5")
    written = (workdir / "runs" / "tiny" / "config.yaml").read_text()
    again = train(config, "train.max_steps=5", "train.lr=0.001", resume=True)
    assert again.tokens_per_s is None and again.stop_reason == "max_steps"  # nothing trained
    assert (workdir / "runs" / "tiny" / "config.yaml").read_text() == written
    train(config, "train.max_steps=7", "train.lr=0.001", resume=True)  # two more steps at the new rate
    assert "lr: 0.001" in (workdir / "runs" / "tiny" / "config.yaml").read_text()


def test_cadences_in_epochs_that_come_after_a_step_budgets_end_are_noted_before_training(workdir: Path):
    """lstm_full_cpu on a 31 MB text: 7,450 steps, a quarter of an epoch, and validation, checkpoint and
    log lines each an epoch or more apart: nothing until the end, and a kill -9 lost the whole run."""
    notes: list[str] = []
    reporter = SilentReporter()
    reporter.note = notes.append  # type: ignore[method-assign]
    config = write_config(workdir)
    budget = ("train.max_steps=15", "train.epochs=50")
    late = (
        "this run ends after 15 steps (0.789 epochs), before train.eval_every (1 epoch), train.checkpoint_every "
        "(10 epochs), train.log_every (0: auto) first come due: nothing is validated, checkpointed or logged "
        "until its end; a crash or kill -9 before then loses all of it; count them in steps, e.g. --set "
        '"train.eval_every=1 step" --set "train.checkpoint_every=1 step" --set "train.log_every=1 step"'
    )
    # drnn data previews it (a user saw it first when the run had started)
    preview = describe_data(DataRequest(load_config(config, budget))).notes
    assert [note for note in preview if note.startswith("this run ends")] == [late]
    train_run(TrainRequest(config, budget), reporter=reporter)
    assert [note for note in notes if note.startswith("this run ends")] == [late]
    notes.clear()  # in steps, or due within the budget: nothing to say
    # counted in steps (even past the end: the user's own choice), or due within the budget: nothing to say
    cadences = ("train.eval_every=5 steps", "train.checkpoint_every=500 steps", "train.log_every=5 steps")
    train_run(
        TrainRequest(config, ("train.max_steps=15", *cadences), run_dir=Path("runs/b")), reporter=reporter
    )
    train_run(TrainRequest(config, ("train.max_steps=200",), run_dir=Path("runs/c")), reporter=reporter)
    assert not [note for note in notes if note.startswith("this run ends")]
    # validations every 5 steps log their lines and write best: the note said "nothing is checkpointed
    # or logged until its end" beside them (trial31)
    steps_validated = load_config(config, (*budget, "train.eval_every=5 steps"))
    assert [
        note for note in describe_data(DataRequest(steps_validated)).notes if note.startswith("this run")
    ] == [
        "this run ends after 15 steps (0.789 epochs), before train.checkpoint_every (10 epochs) first comes due: "
        "nothing is resumably checkpointed until its end; a crash or kill -9 before then keeps only its best "
        "validation's weights (best.safetensors, which predict and eval read), with nothing to resume; count it "
        'in steps, e.g. --set "train.checkpoint_every=1 step"'
    ]
    # a train.keep_every point writes last too: the run is checkpointed by then, whatever
    # train.checkpoint_every says (the note said a kill -9 lost all of it, above the kept files' note: prac34)
    kept = load_config(config, (*budget, "train.keep_every=4 steps"))
    assert [note for note in describe_data(DataRequest(kept)).notes if note.startswith("this run")] == [
        "this run ends after 15 steps (0.789 epochs), before train.eval_every (1 epoch), train.log_every (0: auto) "
        "first come due: nothing is validated or logged until its end; count them in steps, e.g. --set "
        '"train.eval_every=1 step" --set "train.log_every=1 step"'
    ]
    kept_late = load_config(config, (*budget, "train.keep_every=1"))  # its first point is past the end
    assert "checkpointed" in next(
        note for note in describe_data(DataRequest(kept_late)).notes if note.startswith("this run")
    )


def test_the_plot_counts_epochs_on_its_top_axis_and_names_its_run():
    """d2l plots perplexity against epochs; drnn's x axis is tokens seen (steps and resumes stay
    comparable), which a learner had to convert by hand: the top axis counts epochs (lstm2: 8,960
    tokens an epoch, 8 minibatches of 32 × 35), and the title names the run."""
    pytest.importorskip("matplotlib.figure")
    from drnn_cli.plot import perplexity_figure, tokens_per_epoch

    records = [
        EpochRecord(epoch, 20.0 / epoch, None, 2.0, 1e4, epoch, 8 * epoch, 8_960 * epoch)
        for epoch in (1, 2, 3)
    ]
    assert tokens_per_epoch(records) == 8_960.0
    assert (
        tokens_per_epoch([EpochRecord(1, 20.0, None, 2.0, 1e4, 1.0, 8, 0)]) is None
    )  # metrics before the count
    figure = perplexity_figure(records, "lstm2")
    (axes,) = figure.axes
    (epochs,) = axes.child_axes
    figure.draw_without_rendering()  # the top axis takes its limits from the bottom one as it is drawn
    assert (axes.get_title(), axes.get_xlabel(), epochs.get_xlabel()) == ("lstm2", "tokens seen", "epoch")
    assert epochs.get_xlim() == pytest.approx(tuple(x / 8_960 for x in axes.get_xlim()))


def test_matplotlib_s_font_fallbacks_do_not_reach_stderr(monkeypatch: pytest.MonkeyPatch, caplog):
    """A machine's first plot logged 21 "findfont: Font family [...] not found" lines amid training's
    output: matplotlib's fallback font draws the plot, and its logger is quieted while it does."""
    figure_module = pytest.importorskip("matplotlib.figure")
    import logging

    from drnn_cli.plot import render_perplexity_plot

    savefig = figure_module.Figure.savefig

    def falling_back(self: object, *args: object, **kwargs: object) -> None:
        logging.getLogger("matplotlib.font_manager").warning("findfont: Font family ['cmr10'] not found.")
        savefig(self, *args, **kwargs)

    monkeypatch.setattr(figure_module.Figure, "savefig", falling_back)
    level = logging.getLogger("matplotlib.font_manager").level
    record = EpochRecord(1, 5.0, 6.0, 0.1, 100.0, 1.0, 10, 1000, 10)
    assert render_perplexity_plot([record]).startswith(b"\x89PNG")
    assert "findfont" not in caplog.text  # not logged at all: Python prints an unhandled warning on stderr
    assert logging.getLogger("matplotlib.font_manager").level == level  # matplotlib's own, put back


def test_a_diverged_perplexity_is_left_out_of_the_plot_whose_log_axis_it_would_break():
    """A fine-tuning run at too high a rate logged 1.5e289 beside 30: matplotlib's log axis over those 288
    decades raised OverflowError, and the run died. Past 1e100 a perplexity is left out, as inf is."""
    pytest.importorskip("matplotlib.figure")
    from drnn_cli.plot import perplexity_figure, render_perplexity_plot

    records = [
        EpochRecord(1, 30.0, 40.0, 0.1, 100.0, 1.0, 10, 1000, 10),
        EpochRecord(2, 1.5e289, math.inf, 0.1, 100.0, 2.0, 20, 2000, 10),
        EpochRecord(3, 1e100, 50.0, 0.1, 100.0, 3.0, 30, 3000, 10),
    ]
    (axes,) = perplexity_figure(records).axes
    train, validation = axes.get_lines()
    assert list(train.get_ydata()) == [30.0, 1e100] and list(validation.get_ydata()) == [40.0, 50.0]
    assert render_perplexity_plot(records).startswith(b"\x89PNG")


def test_a_session_whose_every_perplexity_overflowed_says_so_at_its_end(workdir: Path):
    """A loss past ~700 nats is finite, so training goes on, its perplexity written as null: a run at lr
    1000 without clipping printed ``ppl inf`` at every epoch and ended as a finished run, without a word
    on why (prac38). The session's end says so, with the settings that bring it back."""
    notes: list[str] = []
    reporter = SilentReporter()
    reporter.note = notes.append  # type: ignore[method-assign]
    sgd = ("train.optimizer=sgd", "train.epochs=2", "train.clip=0")
    train_run(
        TrainRequest(write_config(workdir), (*sgd, "train.lr=1000"), run_dir=Path("runs/far")), reporter
    )
    assert all(line["train_ppl"] is None for line in metrics(workdir / "runs" / "far"))
    assert notes[-1] == (
        "every training perplexity of this session overflowed (a mean loss past 700 nats, written as null): the "
        "model learned nothing at this rate; lower train.lr (now 1000), or clip the gradient norm (train.clip 1)"
    )
    notes.clear()
    train_run(TrainRequest(write_config(workdir), (*sgd, "train.lr=1"), run_dir=Path("runs/near")), reporter)
    assert not [note for note in notes if "overflowed" in note]


def test_a_last_training_perplexity_far_above_a_uniform_guess_is_said_with_the_fix():
    """learner42: train.clip 0 at 100 steps ended at perplexity 1.5e+48, 10⁴⁶ times the vocabulary's 28,
    with nothing said. Past twice the vocabulary's size (a uniform guess scores it) the end says so; an
    early model near the size is not a wrong one."""
    from drnn_cli.config import TrainConfig
    from drnn_cli.run_notes import worse_than_uniform_note

    unclipped, clipped = TrainConfig(clip=0, lr=1.0), TrainConfig(clip=1, lr=2.0)
    assert worse_than_uniform_note([20.5, 1.8e4, math.inf, 1.5e48], 28, unclipped) == (
        "the last training perplexity, 1.5e+48, is more than twice the vocabulary's size, 28, which a uniform "
        "guess scores: the model predicts worse than one that knows nothing, as after exploding gradients; "
        "clip the gradient norm (train.clip 1, d2l 0.17.6 §8.5) or lower train.lr (now 1)"
    )
    assert worse_than_uniform_note([57.0], 28, clipped) == (
        "the last training perplexity, 57.0, is more than twice the vocabulary's size, 28, which a uniform "
        "guess scores: the model predicts worse than one that knows nothing, as after exploding gradients; "
        "lower train.lr (now 2)"
    )
    assert worse_than_uniform_note([1e9, 56.0], 28, unclipped) is None  # the last one counts: it came back
    # finite windows, then one that overflowed (review rev42: the note read the last finite one, or none)
    assert worse_than_uniform_note([20.0, 30.0, math.inf], 28, unclipped) == (
        "the last training perplexity overflowed (a mean loss past 700 nats), far past the vocabulary's size, "
        "28, which a uniform guess scores: the model predicts worse than one that knows nothing, as after "
        "exploding gradients; clip the gradient norm (train.clip 1, d2l 0.17.6 §8.5) or lower train.lr (now 1)"
    )
    assert worse_than_uniform_note([29.7], 28, unclipped) is None  # an untrained model's, near the size
    assert worse_than_uniform_note([], 28, unclipped) is None


def test_a_plot_with_no_finite_perplexity_says_so_without_a_warning():
    """A run whose loss overflowed from its first step (perplexity written as null) drew an empty plot,
    and matplotlib's "No artists with labels found to put in legend" UserWarning, with its site-packages
    path, came out among drnn's lines (prac38)."""
    pytest.importorskip("matplotlib.figure")
    import warnings

    from drnn_cli.plot import perplexity_figure

    records = [
        EpochRecord(epoch, None, None, 1000.0, 100.0, epoch, 8 * epoch, 800 * epoch, 8) for epoch in (1, 2)
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (axes,) = perplexity_figure(records).axes
    assert axes.get_lines() == [] and axes.get_legend() is None
    assert [text.get_text() for text in axes.texts] == ["no finite perplexity yet"]


@pytest.mark.draws_plot
def test_a_plot_matplotlib_fails_to_draw_is_said_once_and_training_goes_on(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
):
    """The plot is a view of metrics.jsonl: matplotlib failing inside its drawing code is one note, not
    an internal error that ends the run."""

    def failing(
        records: object, title: object = None, val_split_tokens: int = 0, train_as: object = None
    ) -> bytes:
        raise OverflowError("cannot convert float infinity to integer")

    monkeypatch.setattr("drnn_cli.report.render_perplexity_plot", failing)
    events: list[str] = []
    reporter = SilentReporter()
    reporter.note = lambda message: events.append(f"note: {message}")  # type: ignore[method-assign]
    result = train_run(TrainRequest(write_config(workdir), ("train.epochs=2",)), reporter=reporter)
    failed = (
        "note: drawing perplexity.png failed (OverflowError: cannot convert float infinity to integer); "
        "training goes on, and the plot is not updated again in this session (metrics.jsonl has every line)"
    )
    assert events.count(failed) == 1 and result.epochs == 2
    assert not (workdir / "runs" / "tiny" / "perplexity.png").exists()


@pytest.mark.draws_plot
def test_a_missing_plotter_is_said_once_before_training(workdir: Path, monkeypatch: pytest.MonkeyPatch):
    """Said at the first plot, the note came minutes into a run (or at its end, with no line before)."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # any import of it fails, as where not installed
    events: list[str] = []
    reporter = SilentReporter()
    reporter.note = lambda message: events.append(f"note: {message}")  # type: ignore[method-assign]
    reporter.epoch_end = lambda record: events.append(f"line {record.step}")  # type: ignore[method-assign]
    train_run(TrainRequest(write_config(workdir), ("train.epochs=2",)), reporter=reporter)
    missing = "note: matplotlib is not installed: no plot (pip install 'matplotlib>=3.9', drnn's plot extra)"
    assert events.count(missing) == 1 and events.index(missing) < events.index("line 19")
    assert not (workdir / "runs" / "tiny" / "perplexity.png").exists()


def test_a_run_imports_matplotlib_for_its_first_plot_not_before_its_first_line(workdir: Path):
    """Importing matplotlib to see that it works held every run's first line back by 0.5 s; the run
    starts on finding it installed, imports it for the plot after its first epoch, and writes the plot."""
    pytest.importorskip("matplotlib")
    environment = {**os.environ, "PYTHONPATH": pythonpath_with_repo(), "OMP_NUM_THREADS": "1"}
    args = ["train", "--config", str(write_config(workdir)), "--set", "train.epochs=2", "--json"]
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "drnn_cli", *args],
        capture_output=True, text=True, env=environment, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stderr.splitlines()  # with --json, the run's lines share stderr with -X importtime's
    imported = next(i for i, line in enumerate(lines) if re.search(r"\|\s+matplotlib$", line))
    first_line = next(
        i for i, line in enumerate(lines) if line.startswith(f"epoch 1/2  step {STEPS_PER_EPOCH} ")
    )
    assert first_line < imported
    assert (workdir / "runs" / "tiny" / "perplexity.png").read_bytes().startswith(b"\x89PNG")


def write_broken_matplotlib(site: Path) -> None:
    """A matplotlib that is installed but fails to import, as 3.7 did under NumPy 2: NumPy's banner on
    stderr, then an ImportError."""
    broken = site / "matplotlib"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text(
        "import sys\n"
        "print('A module that was compiled using NumPy 1.x cannot be run in NumPy 2.4.6', file=sys.stderr)\n"
        "raise ImportError('numpy.core.multiarray failed to import')\n"
    )


@pytest.mark.draws_plot
def test_a_matplotlib_that_fails_to_import_is_said_once_at_the_first_plot_and_training_goes_on(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    """Installed is all a run's start looks for (importing it cost 0.5 s of every start): the import's
    failure is the first plot's, said once in the same words, without NumPy's banner."""
    write_broken_matplotlib(workdir / "site")
    for name in [name for name in sys.modules if name.partition(".")[0] == "matplotlib"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(workdir / "site"))
    events: list[str] = []
    reporter = SilentReporter()
    reporter.note = lambda message: events.append(f"note: {message}")  # type: ignore[method-assign]
    reporter.epoch_end = lambda record: events.append(f"line {record.step}")  # type: ignore[method-assign]
    result = train_run(TrainRequest(write_config(workdir), ("train.epochs=2",)), reporter=reporter)
    broken = (
        "note: matplotlib does not import here (ImportError: numpy.core.multiarray failed to import): no plot "
        "(pip install --upgrade 'matplotlib>=3.9')"
    )
    assert events.count(broken) == 1
    assert events.index("line 19") < events.index(broken) < events.index("line 38")  # the first plot's
    assert result.epochs == 2 and not (workdir / "runs" / "tiny" / "perplexity.png").exists()
    assert "NumPy" not in capsys.readouterr().err


def test_a_matplotlib_that_is_installed_but_fails_to_import_is_named_so_without_its_banner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    """matplotlib 3.7 under NumPy 2 printed NumPy's 40-line banner and traceback, then drnn said
    "matplotlib is not installed", which it was: the fix is an upgrade, not an install."""
    from drnn_cli.inspect_plot import check_plot_request
    from drnn_cli.report import missing_plotter_note

    write_broken_matplotlib(tmp_path / "site")
    for name in [name for name in sys.modules if name.partition(".")[0] == "matplotlib"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert missing_plotter_note() == (
        "matplotlib does not import here (ImportError: numpy.core.multiarray failed to import): no plot "
        "(pip install --upgrade 'matplotlib>=3.9')"
    )
    with pytest.raises(DrnnError, match=r"^--png needs matplotlib, which does not import here \(ImportError"):
        check_plot_request()
    assert capsys.readouterr().err == ""  # NumPy's banner stays off drnn's stderr


def test_the_first_line_counts_one_step_and_a_sliver_of_an_epoch_in_words():
    """A 1-step budget on a 31 MB text read "1 steps (3.61e-05 epochs)"."""
    one = RunStart(1, 0, 1_000, "cpu", "from scratch", 0, max_steps=1, steps_per_epoch=27_700)
    assert one.span() == "1 step (0.0036% of an epoch)"
    # and a budget of more than 1,000 epochs, which read "(1.21e+03 epochs)", its log lines "/1.2e+03"
    long = RunStart(1_300, 0, 1_000, "cpu", "from scratch", 0, max_steps=4_001, steps_per_epoch=3.318)
    assert (long.span(), long.epochs_of()) == ("4,001 steps (1,206 epochs)", "1,205.85")
    short = RunStart(3, 0, 1_000, "cpu", "from scratch", 0, max_steps=20, steps_per_epoch=8)
    assert (short.span(), short.epochs_of()) == ("20 steps (2.5 epochs)", "2.50")  # as "epoch 2.50/2.50"
    assert RunStart(500, 0, 1_000, "cpu", "from scratch", 0).epochs_of() == "500"
    assert RunStart(2, 0, 1_000, "cpu", "from scratch", 0, max_steps=19, steps_per_epoch=19).span() == (
        "19 steps (1 epoch)"
    )


def test_the_note_on_a_step_budget_counts_its_steps_as_the_first_line_does():
    """The first line read "1 step (0.125 epochs)" and the note under it "1 steps (0.12 epochs)"."""
    from drnn_cli.config import TrainConfig
    from drnn_cli.run_notes import late_cadence_notes

    first = RunStart(1, 0, 1_000, "cpu", "from scratch", 0, max_steps=1, steps_per_epoch=8).span()
    (note,) = late_cadence_notes(TrainConfig(max_steps=1), 1, 8.0, validates=True)
    assert first == "1 step (0.125 epochs)" and note.startswith(f"this run ends after {first}, before ")


def test_a_step_budget_on_a_tiny_text_counts_its_epochs_by_their_mean_length(workdir: Path):
    """35 tokens in one row of 10: an epoch has 3 steps at offsets 0-4 and 2 at 5-10, 27/11 on average.
    Epoch 0's count (3 here, 2 or 1 elsewhere) made "20 steps (20 epochs)" of a run that took 15; the mean
    said 20 / (27/11) = 8.15 epochs, and the epochs this seed draws end at step 20 with the 8th: the first
    line counts through them (ddp32, rev32), as the log lines do."""
    starts: list[RunStart] = []
    reporter = SilentReporter()
    reporter.start = starts.append  # type: ignore[method-assign]
    tree = {**TINY, "data": {"max_tokens": 35, "batch_size": 1, "num_steps": 10, "val_fraction": 0}}
    overrides = ("train.epochs=100", "train.max_steps=20")
    result = train_run(TrainRequest(write_config(workdir, tree), overrides), reporter=reporter)
    assert starts[0].span() == "20 steps (8 epochs)" and result.epochs == 8 and result.steps == 20
    assert starts[0].total_epochs == 8  # the progress bar's, not ceil(8.15)
    assert dataclasses.replace(starts[0], budget_epochs=0.0).span() == "20 steps (8.15 epochs)"  # the mean's
    # 8 epochs are 19.6 steps on average: a budget of 22 does not end the run first (epoch 0 has 3 steps
    # at seed 3, which called it "22 steps (8.96 epochs)" beside a note's "22 steps (7.3 epochs)")
    overrides = ("train.epochs=8", "train.max_steps=22", "train.checkpoint_every=10")
    train_run(TrainRequest(write_config(workdir, tree), overrides, overwrite=True), reporter=reporter)
    assert starts[1].span() == "8 epochs" and starts[1].total_epochs == 8


def test_under_torchrun_a_validation_is_abandoned_by_a_vote_every_8_minibatches(
    monkeypatch: pytest.MonkeyPatch,
):
    """torchrun kills its workers 30 s after passing a signal on: a validation read to its end lost the
    stop's checkpoint (practitioner trial). Each rank steps through the same columns of its block of the
    split's rows, so the ranks meet at the same minibatches: they vote at every 8th, and all abandon it
    when any saw a signal."""
    import drnn_cli.stop_votes
    from drnn_cli.runtime import DistContext
    from drnn_cli.signals import StopRequests
    from drnn_cli.stop_votes import StopVotes

    votes: list[float] = []

    def vote(value: float, _dist: object, _device: object) -> float:
        votes.append(value)
        return 15.0 if len(votes) == 2 else value  # the second vote: another rank's SIGTERM

    monkeypatch.setattr(drnn_cli.stop_votes, "vote_max", vote)
    trainer = Trainer.__new__(Trainer)  # what the hook reads, without building a run
    trainer.dist, trainer.stops = DistContext(rank=0, world_size=2), StopRequests()
    trainer.device, trainer.reporter = torch.device("cpu"), SilentReporter()
    trainer.stop_votes = StopVotes(trainer.dist, trainer.device, trainer.stops, trainer.reporter)
    abandon = trainer.stop_votes.abandon_on_signal()
    for done in range(8):  # minibatch 0 votes; 1-7 do not
        abandon(done * 80, 1_000)
    assert votes == [0.0] and not trainer.stops.pending
    with pytest.raises(EvaluationAbandoned):
        abandon(8 * 80, 1_000)
    assert votes == [0.0, 0.0] and trainer.stops.name == "SIGTERM"


def test_a_stop_waits_for_every_rank_after_its_checkpoint_and_no_signal_then_cuts_it_short(
    monkeypatch: pytest.MonkeyPatch,
):
    """Under torchrun the ranks leave only once rank 0 has written the stop's checkpoint (they left at
    once, torchrun sent rank 0 a SIGTERM of its own, and its write was cut short: a practitioner trial),
    and a signal arriving meanwhile (a second Ctrl-C, torchrun's SIGTERM) no longer ends it without its
    stop line."""
    import drnn_cli.train
    from drnn_cli.runtime import DistContext
    from drnn_cli.session_time import SessionTime
    from drnn_cli.signals import StopRequests

    order: list[str] = []
    trainer = Trainer.__new__(Trainer)  # what the stop reads, without building a run
    trainer.dist, trainer.stops, trainer.run_dir = (
        DistContext(rank=0, world_size=2),
        StopRequests(),
        Path("runs/x"),
    )
    trainer.global_step, trainer.began_at, trainer._first_step, trainer.resume_advice = 19, 0.0, 0, "--resume"
    trainer.elapsed, trainer._session_start_elapsed, trainer.session_time = 0.0, 0.0, SessionTime()
    monkeypatch.setattr(trainer, "_save", lambda *args: order.append("checkpoint written"))
    monkeypatch.setattr(trainer, "_epochs_done", lambda epoch, step: 1.0)

    def barrier(_dist: DistContext) -> None:
        order.append("every rank waits")
        signal.raise_signal(signal.SIGINT)  # a second Ctrl-C while the others arrive

    monkeypatch.setattr(drnn_cli.train, "wait_for_every_rank", barrier)
    with trainer.stops.noted(), pytest.raises(TrainingInterrupted) as stopped:
        signal.raise_signal(signal.SIGINT)
        trainer._interrupt(1, None)
    assert order == ["checkpoint written", "every rank waits"]
    assert stopped.value.exit_code == 130 and str(stopped.value).startswith(
        "training stopped by SIGINT after epoch 1"
    )


def test_under_torchrun_the_time_budget_is_voted_on_after_every_step_once_it_nearly_runs_out(
    monkeypatch: pytest.MonkeyPatch,
):
    """The ranks vote on train.max_time every 8 steps (their clocks differ): at 3-4 s a step a 12 s budget
    stopped after 38 s (practitioner trial). A rank that expects the budget to run out before the next
    vote says so, and from then on every step is voted on."""
    import drnn_cli.stop_votes
    from drnn_cli.runtime import DistContext
    from drnn_cli.signals import StopRequests
    from drnn_cli.stop_votes import StopVotes

    votes: list[tuple[int, float]] = []
    trainer = Trainer.__new__(Trainer)  # what the vote reads, without building a run
    trainer.dist, trainer.device = DistContext(rank=0, world_size=2), torch.device("cpu")
    trainer.budget, trainer._first_step = Budget(max_time=10.0), 0
    trainer.stop_votes = StopVotes(trainer.dist, trainer.device, StopRequests(), SilentReporter())
    monkeypatch.setattr(trainer.budget, "elapsed", lambda: float(trainer.global_step))  # 1 s a step
    monkeypatch.setattr(
        drnn_cli.stop_votes,
        "vote_max",
        lambda value, _dist, _device: votes.append((trainer.global_step, value)) or value,
    )
    reasons = []
    for trainer.global_step in range(1, 11):
        reasons.append(trainer._budget_reached())
    # step 8: 2 s left, under 8 steps at 1 s; steps 9 and 10 voted on, 10 spends it
    assert votes == [(8, 1.0), (9, 1.0), (10, 2.0)]
    assert reasons == [None] * 9 + ["max_time"]


def test_under_torchrun_ranks_resuming_different_checkpoints_at_the_same_step_are_refused(
    tiny_run: Path, monkeypatch: pytest.MonkeyPatch
):
    """Each node reads the run from its own disk: copies at the same step with other weights and Adam
    moments trained on apart, exit 0 (practitioner trial). The ranks compare a digest of the header."""
    import dataclasses

    import drnn_cli.rank_agreement
    from drnn_cli.rank_agreement import header_digest
    from drnn_cli.runtime import DistContext

    checkpoint = load_checkpoint(tiny_run / "last.safetensors")
    digest = header_digest(checkpoint)
    assert (
        header_digest(load_checkpoint(tiny_run / "last.safetensors")) == digest == int(digest)
    )  # read again
    # another run's copy at the same step: its trainer state differs (its clock, at least)
    elapsed = checkpoint.trainer_state["elapsed"] + 1.0
    other = dataclasses.replace(checkpoint, trainer_state={**checkpoint.trainer_state, "elapsed": elapsed})
    assert header_digest(other) != digest
    trainer = Trainer.__new__(Trainer)  # what the check reads, without building a run
    trainer.dist, trainer.device, trainer.global_step = (
        DistContext(rank=0, world_size=2),
        torch.device("cpu"),
        24,
    )
    other_rank = {24.0: 24.0, digest: digest + 1}  # its value, compared with ours

    def extremes(values: list[float], _dist: object, _device: object) -> list[tuple[float, float]]:
        return [(min(value, other_rank[value]), max(value, other_rank[value])) for value in values]

    monkeypatch.setattr(drnn_cli.rank_agreement, "rank_extremes", extremes)
    with pytest.raises(DrnnError) as refused:
        trainer._check_every_rank_starts_alike(digest)
    assert str(refused.value).startswith(
        "the processes of this torchrun job start from different checkpoints (each at optimizer step 24, with "
        "other contents): every node must read the same run directory and text"
    )
    other_rank[digest] = digest  # the same file on both
    trainer._check_every_rank_starts_alike(digest)
    other_rank[24.0] = 30.0  # another step (its digest differs too: the step is named first)
    with pytest.raises(
        DrnnError, match=r"start from different checkpoints \(optimizer step 24 on one, 30 on another\)"
    ):
        trainer._check_every_rank_starts_alike(digest)


def test_under_torchrun_slow_steps_are_voted_on_for_signals_within_5_seconds(monkeypatch: pytest.MonkeyPatch):
    """torchrun kills its workers 30 s after passing a signal on: 8 steps of 4 s before the vote, then the
    checkpoint, came after it. The slowest rank's pace decides the next vote: every 5 s of steps."""
    import drnn_cli.stop_votes
    from drnn_cli.runtime import DistContext
    from drnn_cli.signals import StopRequests
    from drnn_cli.stop_votes import StopVotes

    votes: list[tuple[int, float]] = []
    trainer = Trainer.__new__(Trainer)  # what the vote reads, without building a run
    trainer.dist, trainer.device, trainer.stops = (
        DistContext(rank=0, world_size=2),
        torch.device("cpu"),
        StopRequests(),
    )
    clock = [0.0]
    monkeypatch.setattr(drnn_cli.stop_votes.time, "monotonic", lambda: clock[0])
    trainer.stop_votes = StopVotes(trainer.dist, trainer.device, trainer.stops, SilentReporter())
    monkeypatch.setattr(
        drnn_cli.stop_votes,
        "vote_max",
        lambda value, _dist, _device: votes.append((trainer.global_step, value)) or value,
    )
    for trainer.global_step in range(1, 9):
        clock[0] += 0.5
        assert not trainer._stop_requested(trainer.global_step)
    assert votes == [(8, 0.0), (8, 0.5)]  # the signal, then the pace since the last vote: 0.5 s a step
    for trainer.global_step in range(9, 21):
        clock[0] += 2.0  # slower now: the next vote after 2 steps (5 s), then every 2
        trainer._stop_requested(trainer.global_step)
    assert [step for step, value in votes[::2]] == [8, 16, 18, 20]
    assert [value for step, value in votes[1::2]] == [0.5, 2.0, 2.0, 2.0]  # the pace since the last vote


def test_cosine_schedule_anneals_over_max_steps(workdir: Path):
    train(write_config(workdir), "train.max_steps=30", "train.schedule=cosine", "train.min_lr=0.001")
    last = metrics(workdir / "runs" / "tiny")[-1]
    horizon = 30 / STEPS_PER_EPOCH  # the 30th step is taken at epoch 29/19 of a 30/19-epoch run
    expected = 0.001 + (0.01 - 0.001) * 0.5 * (1 + math.cos(math.pi * (29 / STEPS_PER_EPOCH) / horizon))
    assert last["lr"] == pytest.approx(expected, rel=1e-12)
    assert last["lr"] < 0.0011


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "last.safetensors").model_state


def test_step_budget_interrupted_and_resumed_ends_bit_identical(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
):
    config = write_config(workdir)
    overrides = ("train.max_steps=30", "train.schedule=cosine", "train.eval_every=7 steps")
    straight = train(config, *overrides, run_dir=Path("runs/straight"))
    assert straight.stop_reason == "max_steps" and straight.steps == 30

    undo = signal_at(monkeypatch, 23, 15)
    with pytest.raises(DrnnError, match="stopped by SIGTERM after step 4 of epoch 2, optimizer step 23;"):
        train(config, *overrides, run_dir=Path("runs/split"))
    undo()
    resumed = train(config, *overrides, run_dir=Path("runs/split"), resume=True)
    assert resumed.steps == 30 and resumed.stop_reason == "max_steps"
    a, b = _weights(workdir / "runs/straight"), _weights(workdir / "runs/split")
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert metrics(workdir / "runs/split") == [
        {**line, "elapsed": line2["elapsed"], "tokens_per_s": line2["tokens_per_s"]}
        for line, line2 in zip(
            metrics(workdir / "runs/straight"), metrics(workdir / "runs/split"), strict=True
        )
    ]
    assert resumed.best_val_ppl == straight.best_val_ppl


@pytest.mark.parametrize("at", [5, 7, 12], ids=["at-a-log-line", "at-an-evaluation", "between-lines"])
def test_a_signal_at_any_step_resumes_to_the_metrics_of_a_run_never_stopped(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, at: int
):
    """A signal at a step with a boundary (a log line, an evaluation) stops after it: stopped before, the
    resumed run skipped that step's evaluation line (and its best checkpoint and patience count) and the
    next line's training perplexity covered too many steps."""
    config = write_config(workdir)
    overrides = ("train.epochs=2", "train.eval_every=7 steps", "train.log_every=5 steps")
    train(config, *overrides, run_dir=Path("runs/straight"))
    undo = signal_at(monkeypatch, at, 15)
    with pytest.raises(DrnnError, match=f"stopped by SIGTERM after step {at} of epoch 1"):
        train(config, *overrides, run_dir=Path("runs/split"))
    undo()
    train(config, *overrides, run_dir=Path("runs/split"), resume=True)
    assert untimed_metrics(workdir / "runs/split") == untimed_metrics(workdir / "runs/straight")


def test_a_resumed_session_stopped_by_a_signal_is_told_to_run_its_own_command_again(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
):
    """The stop line tells how to continue: a first session's command needs --resume added; a --resume
    session's has it, and was told "the same command plus --resume" all the same."""
    config = write_config(workdir)
    undo = signal_at(monkeypatch, 3, 2)
    with pytest.raises(TrainingInterrupted) as first:
        train(config, run_dir=Path("runs/tiny"))
    undo()
    signal_at(monkeypatch, 9, 2)
    with pytest.raises(TrainingInterrupted) as resumed:
        train(config, run_dir=Path("runs/tiny"), resume=True)
    assert str(first.value) == (
        "training stopped by SIGINT after step 3 of epoch 1, optimizer step 3; its checkpoint is in "
        "runs/tiny/last.safetensors; continue with the same command plus --resume"
    )
    assert str(resumed.value).endswith(
        "optimizer step 9; its checkpoint is in runs/tiny/last.safetensors; continue with the same command again"
    )


@pytest.mark.parametrize(
    ("settings", "crash"),
    [((), True), ((), False), (("train.max_steps=10", "train.schedule=cosine"), False)],
    ids=["on-cadence", "on-cadence-resumed-once", "at-the-budget-s-end-with-a-rate-that-moves-every-step"],
)
def test_a_signal_while_a_step_boundary_validates_cuts_it_short_and_resume_runs_it_first(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, settings: tuple[str, ...], crash: bool
):
    """SIGTERM during the validation of a 3-million-token split waited 103 s for it: past a scheduler's
    grace, whose SIGKILL then lost everything since the last checkpoint. The validation is abandoned at
    its next minibatch; the checkpoint of the step marks the boundary as not done, and --resume does it
    (validation, line with its step's rate, best checkpoint) before the next step, even where the budget
    is spent (a review found it "nothing to train", the final validation lost), and checkpoints at once:
    a crash after it must not run it again (two lines for step 10). The metrics of a run never stopped:
    resumed once, the epoch's end after the replayed boundary is not taken for it (ddp32: it validated
    off its cadence, and its max_time started again there)."""
    config = write_config(workdir)
    overrides = ("train.epochs=2", "train.eval_every=5 steps", "train.log_every=3 steps", *settings)
    train(config, *overrides, run_dir=Path("runs/straight"))
    abandoned, undo = signal_while_validating(monkeypatch, 10)
    message = (
        "stopped by SIGTERM after step 10 of epoch 1, optimizer step 10 (its validation cut short: --resume"
    )
    with pytest.raises(DrnnError, match=re.escape(message)):
        train(config, *overrides, run_dir=Path("runs/split"))
    undo()
    assert abandoned == [10]
    last = workdir / "runs/split/last.safetensors"
    stopped = load_checkpoint(last)
    assert stopped.step_in_epoch == 10 and stopped.trainer().epoch_progress.boundary_pending
    assert [line["step"] for line in metrics(workdir / "runs/split")] == [3, 5, 6, 9]  # not step 10's
    if crash:  # a crash (a SIGKILL) at the first step after the deferred boundary
        resume_killed_at_its_first_step(monkeypatch, config, *overrides, run_dir=Path("runs/split"))
        assert not load_checkpoint(last).trainer().epoch_progress.boundary_pending  # done, and kept so
    train(config, *overrides, run_dir=Path("runs/split"), resume=True)
    # step 10's line once, its window and rate the straight run's
    assert untimed_metrics(workdir / "runs/split") == untimed_metrics(workdir / "runs/straight")
    best = [
        load_checkpoint(workdir / "runs" / run / "best.safetensors").model_state
        for run in ("straight", "split")
    ]
    assert all(torch.equal(best[0][name], best[1][name]) for name in best[0])


@pytest.mark.parametrize(
    "settings",
    [(), ("train.max_steps=38", "train.schedule=cosine")],
    ids=["on-cadence", "at-the-budget-s-end-with-a-rate-that-moves-every-step"],
)
def test_a_signal_while_an_epoch_s_end_validates_cuts_it_short_and_resume_runs_it_first(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, settings: tuple[str, ...]
):
    """As inside an epoch: the validation at an epoch's end (the whole split, with the default
    cadence) is abandoned at its next minibatch, the epoch is checkpointed at its last step with its
    end not done, and --resume runs that end first (validation, line, best and last checkpoints), even
    where the budget is spent; a crash after it does not run it again. The metrics of a run never stopped."""
    config = write_config(workdir)
    end = 2 * STEPS_PER_EPOCH
    train(config, *settings, run_dir=Path("runs/straight"))
    abandoned, undo = signal_while_validating(monkeypatch, end)
    message = f"stopped by SIGTERM after step 19 of epoch 2, optimizer step {end} (its validation cut short"
    with pytest.raises(DrnnError, match=re.escape(message)):
        train(config, *settings, run_dir=Path("runs/split"))
    undo()
    assert abandoned == [end]
    last = workdir / "runs/split/last.safetensors"
    stopped = load_checkpoint(last)
    assert (stopped.epoch, stopped.step_in_epoch) == (1, STEPS_PER_EPOCH)
    assert stopped.trainer().epoch_progress.boundary_pending
    assert [line["epoch"] for line in metrics(workdir / "runs/split")] == [1]  # not epoch 2's
    if not settings:  # a crash (a SIGKILL) at the first step after the deferred epoch end
        resume_killed_at_its_first_step(monkeypatch, config, run_dir=Path("runs/split"))
        done = load_checkpoint(last)
        assert (done.epoch, done.step_in_epoch) == (2, 0)  # the epoch's end, done and kept so
    resumed = train(config, *settings, run_dir=Path("runs/split"), resume=True)
    assert resumed.steps == (end if settings else 3 * STEPS_PER_EPOCH)
    # epoch 2's line once, with its rate
    assert untimed_metrics(workdir / "runs/split") == untimed_metrics(workdir / "runs/straight")
    for name in ("best", "last"):
        a, b = (
            load_checkpoint(workdir / "runs" / run / f"{name}.safetensors").model_state
            for run in ("straight", "split")
        )
        assert all(torch.equal(a[key], b[key]) for key in a)


def test_a_cut_validation_runs_on_resume_whatever_train_epochs_says_now(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
):
    """Resumed with fewer epochs than the one whose end was cut short, the run did nothing, said it was
    complete and left its checkpoint pending (found by a review). Its end runs, and the run ends there."""
    config = write_config(workdir)
    straight = train(config, run_dir=Path("runs/straight"))
    end = 3 * STEPS_PER_EPOCH
    abandoned, undo = signal_while_validating(monkeypatch, end)
    with pytest.raises(TrainingInterrupted) as stopped:
        train(config, run_dir=Path("runs/split"))
    undo()
    assert abandoned == [end] and stopped.value.stopped.epochs == 3  # whole at an epoch's end, as metrics say
    assert type(stopped.value.stopped.epochs) is int
    # the run says why its session ended, and where (drnn runs: "resumable (SIGTERM)")
    assert read_stop_record(workdir / "runs/split") == StopRecord("SIGTERM", end)
    resumed = train(config, "train.epochs=2", run_dir=Path("runs/split"), resume=True)
    assert (resumed.stop_reason, resumed.epochs, resumed.steps) == ("epochs", 3, end)
    assert read_stop_record(workdir / "runs/split") == StopRecord("epochs", end)
    assert untimed_metrics(workdir / "runs/split") == untimed_metrics(workdir / "runs/straight")
    assert resumed.best_val_ppl == straight.best_val_ppl
    done = load_checkpoint(workdir / "runs/split/last.safetensors")
    assert (done.epoch, done.step_in_epoch) == (3, 0)  # no longer pending


def test_a_time_budget_s_final_validation_cut_short_still_validates_on_resume(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
):
    """The resumed command's time budget starts anew, and epoch 1's end is off train.eval_every's
    cadence: the validation the stop cut short was skipped, its line written without one (a review)."""
    config = write_config(workdir)
    reached = Budget.reached
    monkeypatch.setattr(Budget, "reached", lambda self, step: "max_time" if step == STEPS_PER_EPOCH else None)
    straight = train(config, "train.eval_every=2", run_dir=Path("runs/straight"))
    assert straight.stop_reason == "max_time"
    abandoned, undo = signal_while_validating(monkeypatch, STEPS_PER_EPOCH)
    with pytest.raises(TrainingInterrupted):
        train(config, "train.eval_every=2", run_dir=Path("runs/split"))
    undo()
    monkeypatch.setattr(Budget, "reached", reached)
    assert abandoned == [STEPS_PER_EPOCH]
    train(config, "train.eval_every=2", run_dir=Path("runs/split"), resume=True)
    first = metrics(workdir / "runs/split")[0]
    assert first["epoch"] == 1 and first["val_ppl"] == metrics(workdir / "runs/straight")[0]["val_ppl"]


def test_a_signal_after_a_budgets_final_validation_lets_the_run_end_and_says_so(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
):
    """Its checkpoint is written: the run is complete (exit 0), but the signal was not even mentioned."""
    original = Trainer._update_plot

    def signalled_after_validating(self: Trainer, force: bool = False) -> None:
        if self.global_step == 10:
            self.stops.signum = 2
        original(self, force)

    monkeypatch.setattr(Trainer, "_update_plot", signalled_after_validating)
    notes: list[str] = []
    reporter = SilentReporter()
    reporter.note = notes.append  # type: ignore[method-assign]
    result = train_run(TrainRequest(write_config(workdir), ("train.max_steps=10",)), reporter=reporter)
    assert (result.stop_reason, result.steps) == ("max_steps", 10)
    assert "SIGINT arrived as the run ended: the run is complete" in notes


def test_a_signal_at_an_epoch_s_last_step_stops_at_that_epoch_s_end(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
):
    """The epoch is trained: its end is handled (metrics line, checkpoint) and the checkpoint is the
    boundary's. A mid-epoch checkpoint of step 19 of 19 was written before, which --resume refuses."""
    config = write_config(workdir)
    straight = train(config, "train.epochs=3", run_dir=Path("runs/straight"))
    undo = signal_at(monkeypatch, 2 * STEPS_PER_EPOCH, 15)
    with pytest.raises(DrnnError, match="stopped by SIGTERM after epoch 2, optimizer step 38;"):
        train(config, "train.epochs=3", run_dir=Path("runs/split"))
    undo()
    stopped = load_checkpoint(workdir / "runs/split/last.safetensors")
    assert (stopped.epoch, stopped.step_in_epoch) == (2, 0)
    assert [line["epoch"] for line in metrics(workdir / "runs/split")] == [1, 2]
    resumed = train(config, "train.epochs=3", run_dir=Path("runs/split"), resume=True)
    assert (resumed.start_epoch, resumed.epochs, resumed.steps) == (2, 3, straight.steps)
    a, b = _weights(workdir / "runs/straight"), _weights(workdir / "runs/split")
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_resuming_a_spent_step_budget_trains_nothing(workdir: Path, cli):
    config = write_config(workdir)
    train(config, "train.max_steps=10")
    before = _weights(workdir / "runs/tiny")
    again = train(config, "train.max_steps=10", resume=True)
    assert (again.stop_reason, again.steps, again.tokens_per_s) == ("max_steps", 10, None)
    after = _weights(workdir / "runs/tiny")
    assert all(torch.equal(before[name], after[name]) for name in before)
    # A larger budget goes on inside epoch 1, from its 11th step (of 19), and says so.
    code, out, _ = cli("train", "--config", str(config), "--set", "train.max_steps=12", "--resume")
    assert code == 0 and ", 12 steps (0.632 epochs), from step 11 of epoch 1\n" in out, out


def test_resuming_a_finished_run_trains_nothing_until_train_epochs_is_raised(workdir: Path, cli):
    config = write_config(workdir)
    assert cli("train", "--config", str(config), "--set", "train.epochs=1")[0] == 0
    code, out, _ = cli("train", "--config", str(config), "--set", "train.epochs=1", "--resume")
    assert code == 0
    assert [line for line in out.splitlines() if line.startswith("note: ")] == [
        "note: nothing to train: its epochs are done (1 trained, train.epochs 1); to train on, --resume --set "
        "train.epochs=N with a larger value"
    ]
    assert "nothing trained on cpu" in out
    assert [line["epoch"] for line in metrics(workdir / "runs" / "tiny")] == [1]
    code, out, _ = cli("train", "--config", str(config), "--set", "train.epochs=2", "--resume")
    assert code == 0 and ", 2 epochs, from epoch 2\n" in out and "nothing to train" not in out, out
    assert [line["epoch"] for line in metrics(workdir / "runs" / "tiny")] == [1, 2]


# ---------------------------------------------------------------------------------------------
# Step cadence


def test_step_cadence_evaluates_and_checkpoints_inside_an_epoch(workdir: Path):
    result = train(
        write_config(workdir), "train.epochs=1", "train.eval_every=5 steps", "train.checkpoint_every=5 steps"
    )
    lines = metrics(workdir / "runs" / "tiny")
    assert [line["step"] for line in lines] == [5, 10, 15, 19]
    assert [line["epoch"] for line in lines] == [round(s / 19, 6) for s in (5, 10, 15)] + [1]
    assert all(line["val_ppl"] is not None for line in lines)  # the last epoch always validates
    assert result.best_val_ppl == min(line["val_ppl"] for line in lines)
    best = load_checkpoint(workdir / "runs" / "tiny" / "best.safetensors")
    assert best.best_val_ppl == result.best_val_ppl


def test_each_lines_training_perplexity_covers_the_steps_since_the_previous_line_of_its_epoch(
    workdir: Path, step_losses: list[float]
):
    """Not the mean since the epoch's start: on a text of one long epoch that would carry the first,
    untrained steps into every line and draw training above validation. Every line (a log_every one,
    an evaluation, the epoch's end) is in metrics.jsonl and starts a window, which train_ppl_steps
    measures; an epoch's first line starts from the epoch's start."""
    losses = step_losses
    train(write_config(workdir), "train.epochs=2", "train.eval_every=7 steps", "train.log_every=5 steps")
    lines = metrics(workdir / "runs" / "tiny")
    # 19 steps an epoch: logs every 5 steps, validations every 7, epoch ends at 19 and 38; each window
    # runs from the previous line of its epoch (or the epoch's start) to its own step
    ends = [5, 7, 10, 14, 15, 19, 20, 21, 25, 28, 30, 35, 38]
    starts = [0, 5, 7, 10, 14, 15, 19, 20, 21, 25, 28, 30, 35]
    assert [line["step"] for line in lines] == ends
    assert [line["val_ppl"] is not None for line in lines] == [step % 7 == 0 or step == 38 for step in ends]
    assert [line["train_ppl_steps"] for line in lines] == [5, 2, 3, 4, 1, 4, 1, 1, 4, 3, 2, 5, 3]
    for line, first, last in zip(lines, starts, ends, strict=True):
        expected = math.exp(sum(losses[first:last]) / (last - first))  # every step has B·T targets
        assert line["train_ppl"] == pytest.approx(expected, rel=1e-9), line
    # an epoch without lines inside it reports the epoch's perplexity, as d2l does
    losses.clear()
    train(write_config(workdir), "train.epochs=2", run_dir=Path("runs/plain"))
    plain = metrics(workdir / "runs" / "plain")
    assert [line["train_ppl"] for line in plain] == pytest.approx(
        [math.exp(sum(losses[:19]) / 19), math.exp(sum(losses[19:]) / 19)], rel=1e-9
    )
    assert [line["train_ppl_steps"] for line in plain] == [19, 19]


def test_log_lines_inside_an_epoch_show_the_epoch_to_two_decimals_on_one_line(workdir: Path, cli):
    """A log file gets one line per evaluation (never wrapped at 80 columns), epoch 5/19 as 0.26."""
    code, out, _ = cli("train", "--config", str(write_config(workdir)), "--set", "train.epochs=1",
                       "--set", "train.eval_every=5 steps", "--set", "train.log_every=5 steps")  # fmt: skip
    assert code == 0
    lines = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in lines] == ["0.26/1", "0.53/1", "0.79/1", "1/1"]
    assert all(line.rstrip().endswith("s") and "  lr " in line for line in lines), out
    # the summary's training perplexity is the last line's: steps 16-19, after the line at 15
    assert "(last 4 steps)" in out.split("train perplexity")[1].splitlines()[0]


def test_samples_on_a_step_cadence_are_labelled_with_the_epochs_done_as_the_log_lines_are(workdir: Path, cli):
    """Samples every 10 steps of a 19-step epoch come at epochs 0.53, 1.05, 1.58: each label names
    its own point (they were labelled with whole epochs: "[1]" twice, at steps 20 and 30)."""
    code, out, _ = cli("train", "--config", str(write_config(workdir)), "--set", "train.epochs=2",
                       "--set", "train.sample_every=10 steps", "--set", "train.sample_prefixes=[the]")  # fmt: skip
    assert code == 0
    labels = [line.split()[0] for line in out.splitlines() if line.startswith("  [")]
    assert labels == ["[0.53]", "[1.05]", "[1.58]"]


def test_patience_counts_step_evaluations(workdir: Path, cli):
    config = write_config(workdir)
    settings = ("train.epochs=40", "train.lr=0.05", "train.eval_every=3 steps")
    result = train(config, *settings, "train.patience=2")
    run = workdir / "runs" / "tiny"
    lines = [line for line in metrics(run) if line["val_ppl"] is not None]
    assert result.stop_reason == "patience" and result.stopped_early
    best = min(range(len(lines)), key=lambda i: lines[i]["val_ppl"])
    assert len(lines) == best + 3  # the best evaluation, then two without improvement

    # Resumed as it is, the run is over: nothing trained, and the note names the setting to raise.
    before = (run / "metrics.jsonl").read_text()
    sets = [arg for setting in (*settings, "train.patience=2") for arg in ("--set", setting)]
    code, out, err = cli("train", "--config", str(config), *sets, "--resume", "--json")
    assert code == 0
    summary = json.loads(out)
    notes = [line for line in err.splitlines() if line.startswith("note: ")]  # --json: the rest is on stderr
    assert notes == [
        "note: nothing to train: it stopped early: validation perplexity did not improve for 2 evaluations "
        "(train.patience 2); to train on, --resume --set train.patience=N (0: off) with a larger value"
    ]
    assert "nothing trained on cpu" in err and "early stop:" not in err and "training " not in err
    assert (summary["stop_reason"], summary["tokens_per_s"], summary["steps"]) == (
        "patience",
        None,
        result.steps,
    )
    assert (run / "metrics.jsonl").read_text() == before
    # A larger patience lets it go on from where it stopped (two failures counted, a third allowed).
    again = train(config, *settings, "train.patience=3", resume=True)
    assert again.steps > result.steps and (again.start_epoch, again.start_step) == (
        result.epochs,
        result.steps,
    )


def test_a_budgets_extra_evaluation_does_not_count_toward_patience(workdir: Path):
    """A step budget ends with an evaluation off ``eval_every``'s cadence; it may keep a better
    ``best`` but must not count for patience, or a run stopped there and resumed stops elsewhere
    than the uninterrupted run (before the fix: at step 20 instead of 115 when split at step 12)."""
    config = write_config(workdir)
    settings = ("train.epochs=40", "train.lr=0.05", "train.eval_every=5 steps", "train.patience=2")
    straight = train(config, *settings, run_dir=workdir / "straight")
    assert (straight.stop_reason, straight.steps) == ("patience", 115)
    for split in (12, 112):
        run = workdir / f"split-{split}"
        train(config, *settings, f"train.max_steps={split}", run_dir=run)
        resumed = train(config, *settings, run_dir=run, resume=True)
        assert (resumed.stop_reason, resumed.steps) == ("patience", 115), split
        assert (
            resumed.best_val_ppl <= straight.best_val_ppl
        )  # the extra evaluation may have found a better best

        def evaluations(directory: Path) -> list[tuple[int, float]]:
            return [(line["step"], line["val_ppl"]) for line in metrics(directory) if line["step"] % 5 == 0]

        assert evaluations(run) == evaluations(workdir / "straight"), split


def test_eval_tokens_caps_validation_while_training(workdir: Path):
    from drnn_cli.commands import evaluate_split, load_model
    from drnn_cli.data import load_dataset
    from drnn_cli.evaluate import evaluate

    notes: list[str] = []

    class Notes(SilentReporter):
        def note(self, message: str) -> None:
            notes.append(message)

    result = train_run(
        TrainRequest(write_config(workdir), ("train.epochs=1", "train.eval_tokens=100")), reporter=Notes()
    )
    assert notes == [
        "train.eval_tokens 100: the validation perplexities of this run (and its choice of best) predict the "
        "first 100 of the 399 validation tokens after the split's first (of 400); drnn eval --split val "
        "predicts them all"
    ]
    run = workdir / "runs" / "tiny"
    loaded = load_model(run, None, "cpu")
    val = load_dataset(loaded.checkpoint.config.data, vocab=loaded.checkpoint.vocab).splits.val
    capped = evaluate(loaded.model, val[:101], 8, 10, loaded.device)
    assert capped.tokens == 100
    assert metrics(run)[-1]["val_ppl"] == pytest.approx(capped.perplexity, rel=1e-12)
    assert evaluate_split(loaded, "val").result.tokens == len(val) - 1 == 399  # drnn eval reads all
    # what the figures read, beside them: a best_val_ppl copied from --json or metrics.jsonl came
    # without it (heldout33: 6.06 over the first 5,000 tokens, 7.29 over the split)
    summary = result.summary()
    assert (summary["val_tokens"], summary["val_split_tokens"]) == (100, 399)
    assert [line["val_tokens"] for line in metrics(run)] == [100]


def test_the_plot_draws_validations_over_other_numbers_of_tokens_as_lines_of_their_own():
    """A resume that changed train.eval_tokens joined 6.06 over the split's first 5,000 tokens to 7.02
    over all of it in one line, a rise that was a change of measurement (heldout33): each count is a
    line, the partial one says so, and one count keeps one colour and one legend entry across gaps.
    Lines that do not say (written before lines did: 0) are the split's."""
    pytest.importorskip("matplotlib.figure")
    from drnn_cli.plot import perplexity_figure

    def line(epoch: int, val_ppl: float, val_tokens: int) -> EpochRecord:
        return EpochRecord(epoch, 9.0, val_ppl, 0.01, 1e4, epoch, epoch, 1_000 * epoch, 1, val_tokens)

    records = [line(1, 8.0, 0), line(2, 7.0, 31_806), line(3, 6.06, 5_000), line(4, 7.02, 31_806)]
    (axes,) = perplexity_figure(records, "full", val_split_tokens=31_806).axes
    drawn = [(v.get_label(), v.get_color(), list(v.get_xdata()), list(v.get_ydata())) for v in axes.lines[1:]]
    full, partial, full_again = drawn
    assert (full[0], full_again[0], full_again[1]) == ("validation", "_nolegend_", full[1])
    assert (full[2:], full_again[2:]) == (([1_000, 2_000], [8.0, 7.0]), ([4_000], [7.02]))
    assert partial[0] == "validation (first 5,000 of 31,806 tokens)" and partial[1] != full[1]
    assert [text.get_text() for text in axes.get_legend().get_texts()] == [
        "train",
        "validation",
        "validation (first 5,000 of 31,806 tokens)",
    ]
    # training's line says how it was read where validation reads otherwise, as the summary does (verify33)
    (axes,) = perplexity_figure(records, "full", 31_806, train_as="dropout on").axes
    assert axes.get_legend().get_texts()[0].get_text() == "train (dropout on)"


class PoisonAtStep5(SilentReporter):
    """Makes every loss after step 5 NaN, as a run diverging inside an epoch would."""

    def __init__(self) -> None:
        self.trainer: Trainer | None = None

    def epoch_end(self, record: EpochRecord) -> None:
        if record.step == 5 and self.trainer is not None:
            with torch.no_grad():
                self.trainer.model.decoder.bias.fill_(float("nan"))


def test_nan_is_noticed_at_the_next_step_boundary(workdir: Path):
    from drnn_cli.data import load_dataset

    config = load_config(write_config(workdir), ["train.log_every=5 steps"])
    reporter = PoisonAtStep5()
    trainer = Trainer(
        StartPoint(config), load_dataset(config.data), workdir / "run", torch.device("cpu"), reporter
    )
    reporter.trainer = trainer
    with pytest.raises(TrainingDiverged, match="NaN or infinite at step 6 of epoch 1"):
        trainer.fit()
    assert trainer.global_step == 10  # read at the next log boundary, not at the epoch's end (19)


def test_a_resumed_run_starts_its_bar_with_the_runs_latest_validation(workdir: Path):
    """The bar showed no validation until the resumed run's first one (an hour, on a long epoch)."""
    starts: list[RunStart] = []
    reporter = SilentReporter()
    reporter.start = starts.append  # type: ignore[method-assign]
    config = write_config(workdir)
    settings = ("train.eval_every=7 steps", "train.log_every=5 steps")
    train_run(TrainRequest(config, ("train.max_steps=12", *settings)), reporter=reporter)
    train_run(TrainRequest(config, ("train.max_steps=20", *settings), resume=True), reporter=reporter)
    lines = metrics(workdir / "runs" / "tiny")
    validated = {line["step"]: line["val_ppl"] for line in lines if line["val_ppl"] is not None}
    assert list(validated)[:2] == [7, 12]  # the cadence's, then the budget's final validation
    assert [start.latest_val_ppl for start in starts] == [None, validated[12]]


# ---------------------------------------------------------------------------------------------
# Time budget, end to end


def test_a_resume_that_changes_a_runs_length_says_so_and_under_cosine_that_the_rate_moves(workdir: Path):
    """Budgets and epochs change freely on a resume, but a cosine schedule spans the run's length: a
    run annealed over 20 steps and resumed for 40 had its rate raised again without a word (found by a
    red team). A constant rate is untouched by the length, but the length itself is said: a learner who
    resumed `--set train.epochs=50` without the --set trained 450 more epochs of lstm2 unsaid (learner34)."""
    notes: list[str] = []
    reporter = SilentReporter()
    reporter.note = notes.append  # type: ignore[method-assign]
    config = write_config(workdir)
    run = workdir / "runs" / "cosine"
    train(config, "train.schedule=cosine", "train.max_steps=20", run_dir=run)
    train_run(
        TrainRequest(config, ("train.schedule=cosine", "train.max_steps=40"), run_dir=run, resume=True),
        reporter=reporter,
    )
    assert [note for note in notes if "--resume with" in note] == [
        "--resume with train.max_steps 20 → 40 under train.schedule cosine: the schedule spans the run's length "
        "(train.epochs, or train.max_steps where it ends the run first), and where that length changes the rate "
        "at each remaining step changes with it (a longer run raises it again from where it had annealed: a "
        "warm restart)"
    ]
    notes.clear()
    constant = workdir / "runs" / "constant"
    train(config, "train.max_steps=20", run_dir=constant)
    train_run(TrainRequest(config, ("train.max_steps=40",), run_dir=constant, resume=True), reporter=reporter)
    assert [note for note in notes if "--resume with" in note] == [
        "--resume with train.max_steps 20 → 40: the run trains to its new length, 40 steps where it planned 20 "
        "(to keep its length: --resume --set train.max_steps=20)"
    ]
    # more epochs under a max_steps that still ends the run first: no longer, nothing said (rev34)
    notes.clear()
    train_run(
        TrainRequest(config, ("train.max_steps=40", "train.epochs=30"), run_dir=constant, resume=True),
        reporter=reporter,
    )
    assert not [note for note in notes if "--resume with" in note]


def test_a_new_run_with_a_time_budget_spent_at_once_still_trains_a_step(workdir: Path):
    """A time budget starts with each command: a tiny one (1 µs) was found spent before the first
    step, and a new run ended "nothing to train" with no checkpoint while runs/latest named it (found
    by a red team). It trains a step, checkpoints and stops by its budget."""
    result = train(write_config(workdir), "train.max_time=0.000001", run_dir=workdir / "runs" / "at_once")
    assert result.stop_reason == "max_time"
    last = load_checkpoint(workdir / "runs" / "at_once" / "last.safetensors")
    steps = last.trainer().global_step
    assert steps is not None and steps >= 1
    assert metrics(workdir / "runs" / "at_once")[-1]["step"] == steps


def test_time_budget_stops_by_itself_and_eval_matches_best(workdir: Path, corpus_path: Path, cli):
    text = workdir / "big.txt"
    text.write_bytes(corpus_path.read_bytes() * 6)  # ~1 MB
    tree = {
        "data": {
            "path": str(text),
            "preprocess": "none",
            "batch_size": 16,
            "num_steps": 20,
            "val_fraction": 0.01,
        },
        "model": {"cell": "gru", "hidden_size": 16, "num_layers": 1},
        "train": {
            "optimizer": "adam",
            "lr": 0.01,
            "sample_every": 0,
            "device": "cpu",
            "eval_every": "50 steps",
        },
    }
    (workdir / "big.yaml").write_text(yaml.safe_dump(tree))
    code, out, err = cli("train", "--config", "big.yaml", "--set", "train.max_time=3s", "--json")
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["stop_reason"] == "max_time" and 0 < summary["epochs"] < 1 and summary["steps"] > 0
    run = workdir / "runs" / "big"
    lines = metrics(run)
    assert lines[-1]["step"] == summary["steps"] and lines[-1]["elapsed"] < 3.0 + 1.0
    assert summary["best_val_ppl"] == min(line["val_ppl"] for line in lines)
    # the device it trained on: eval's own default would take a GPU where there is one (other kernels)
    code, out, err = cli("eval", "--run", str(run), "--split", "val", "--device", "cpu", "--json")
    assert code == 0, err
    assert json.loads(out)["perplexity"] == pytest.approx(summary["best_val_ppl"], rel=1e-9)


@pytest.mark.draws_plot
def test_metrics_written_before_step_counts_are_kept_on_resume(workdir: Path):
    config = write_config(workdir)
    train(config, "train.epochs=1")
    path = workdir / "runs" / "tiny" / "metrics.jsonl"
    old = [
        {k: v for k, v in line.items() if k not in {"step", "tokens_seen"}} for line in metrics(path.parent)
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in old))  # as an earlier drnn wrote it
    train(config, "train.epochs=2", resume=True)
    lines = metrics(path.parent)
    assert [(line["epoch"], line["step"]) for line in lines] == [(1, 0), (2, 2 * STEPS_PER_EPOCH)]
    assert lines[0]["val_ppl"] == old[0]["val_ppl"]
    assert (path.parent / "perplexity.png").read_bytes()[:4] == b"\x89PNG"


def test_a_resumed_run_keeps_the_text_s_token_counts_in_its_vocab_json(workdir: Path):
    """A checkpoint holds the tokens alone: the resume rewrote vocab.json without the counts (a word
    vocabulary's 15,831 of them, and data.min_freq's cut with them)."""
    config = write_config(workdir)
    train(config, "train.epochs=1")
    vocab_file = workdir / "runs" / "tiny" / "vocab.json"
    written = json.loads(vocab_file.read_text())
    assert written["token_freqs"][0] == [" ", 29927]  # the whole text's commonest (d2l counts it all)
    train(config, "train.epochs=2", resume=True)
    assert json.loads(vocab_file.read_text()) == written


@pytest.mark.draws_plot
def test_a_run_stopped_before_its_first_line_draws_no_plot(workdir: Path, monkeypatch: pytest.MonkeyPatch):
    """Empty axes around 0 read as a perplexity below zero: no line yet, no plot."""
    signal_at(monkeypatch, 3, 2)
    with pytest.raises(DrnnError, match="stopped by SIGINT after step 3 of epoch 1"):
        train(write_config(workdir), "train.log_every=5 steps")  # its first line would come at step 5
    run = workdir / "runs" / "tiny"
    assert (run / "last.safetensors").is_file() and (run / "metrics.jsonl").read_text() == ""
    assert not (run / "perplexity.png").exists()


def test_only_a_resume_takes_the_counts_of_the_vocab_json_it_finds_and_only_for_the_same_vocabulary(
    tmp_path: Path,
):
    """A new run (a fine-tuned one, in a directory a failed run left) writes its own vocabulary, not one
    found there; a resume takes just the counts, where tokens, min_freq and reserved tokens agree; and a
    vocab.json drnn cannot read (an infinite count, JSON nested too deep) is replaced, not a crash."""
    from drnn_cli.config import build_config
    from drnn_cli.report import write_run_files
    from drnn_cli.run_files import RunFiles
    from drnn_cli.vocab import Vocab

    tokens = ["<unk>", " ", "e", "t"]
    found = Vocab(tokens, [(" ", 7), ("e", 7), ("t", 7), ("z", 3)], min_freq=5)
    files = RunFiles(tmp_path / "run")
    files.run_dir.mkdir()

    def written_after(text: str, vocab: Vocab, resumed: bool) -> dict:
        files.vocab.write_text(text)
        write_run_files(files, build_config({}), vocab, [], None, resumed)
        return json.loads(files.vocab.read_text())

    assert written_after(found.to_json(), Vocab(tokens, min_freq=5), resumed=False)["token_freqs"] == []
    kept = written_after(found.to_json(), Vocab(tokens, min_freq=5), resumed=True)
    assert (kept["token_freqs"], kept["min_freq"]) == ([[" ", 7], ["e", 7], ["t", 7], ["z", 3]], 5)
    assert written_after(found.to_json(), Vocab(tokens, min_freq=0), resumed=True)["token_freqs"] == []
    for tampered in (
        '{"idx_to_token": ["<unk>", " ", "e", "t"], "token_freqs": [[" ", Infinity]]}',
        "[" * 100_000,
    ):
        assert written_after(tampered, Vocab(tokens), resumed=True) == json.loads(Vocab(tokens).to_json())


# ---------------------------------------------------------------------------------------------
# Where a session's time goes, and the time left


def test_cadence_points_count_the_points_after_a_step_up_to_the_end():
    from drnn_cli.session_time import cadence_points

    every_5_steps, every_2_epochs = Cadence(5, "steps"), Cadence(2, "epochs")
    assert cadence_points(every_5_steps, 10, 57, 19.0) == 9  # 15, 20, ..., 55
    assert cadence_points(every_5_steps, 9, 10, 19.0) == 1  # step 10 itself
    assert cadence_points(every_5_steps, 57, 57, 19.0) == 0  # nothing after the end
    assert cadence_points(every_2_epochs, 10, 95, 19.0) == 2  # the ends of epochs 2 and 4 (steps 38, 76)
    assert cadence_points(every_2_epochs, 38, 95, 19.0) == 1  # epoch 2's end is behind
    assert cadence_points(Cadence(0, "steps"), 0, 95, 19.0) == 0  # never


def test_checkpoint_and_keep_cadences_count_a_step_due_for_both_once():
    """train.keep_every's points write ``last`` too (linked to the kept file), and the time left counted
    train.checkpoint_every's alone: a run keeping every 5 steps, checkpointing every 10 epochs, was
    estimated without any of its writes (keep33)."""
    from drnn_cli.session_time import cadence_union_points

    every_4_steps, every_6_steps = Cadence(4, "steps"), Cadence(6, "steps")
    # after step 10 up to 57: 12, 16, ..., 56 (12 points) and 12, 18, ..., 54 (8), 12, 24, 36, 48 both
    assert cadence_union_points(every_4_steps, every_6_steps, 10, 57, 19.0) == 12 + 8 - 4
    never = Cadence(0, "epochs")
    assert cadence_union_points(never, every_6_steps, 10, 57, 19.0) == 8
    every_epoch, every_2_epochs = Cadence(1, "epochs"), Cadence(2, "epochs")
    assert cadence_union_points(every_epoch, every_2_epochs, 10, 95, 19.0) == 5  # epochs 1 to 5 end
    # an epoch end and a step point are counted apart: epochs 1 and 2 end at steps 19 and 38, among 12
    # step points (4, …, 48) after step 0 up to 50
    assert cadence_union_points(every_epoch, every_4_steps, 0, 50, 19.0) == 2 + 12
    # ...and once where an epoch end is a step point: every 19 steps is every epoch here (rev34 counted
    # 30 where 20 were distinct)
    assert cadence_union_points(every_epoch, Cadence(19, "steps"), 0, 50, 19.0) == 2
    assert cadence_union_points(Cadence(2, "steps"), every_2_epochs, 0, 95, 19.0) == 47 + 2 - 2  # 38, 76


def _trainer_at_step_10(workdir: Path, *overrides: str) -> Trainer:
    """TINY (19 steps an epoch, 3 epochs: 57 steps) after 10 steps of this session, validating its first
    100 predictions every 5 steps: 9 validations on the cadence after step 10 and the final one at step 57,
    and the final `last` (checkpoint_every is 10 epochs)."""
    from drnn_cli.data import load_dataset

    overrides = ("train.eval_every=5 steps", "train.eval_tokens=100", *overrides)
    config = load_config(write_config(workdir), list(overrides))
    trainer = Trainer(StartPoint(config), load_dataset(config.data), workdir / "run", torch.device("cpu"))
    trainer.global_step = 10
    return trainer


def _cosine_session_20_s_into_a_minute(
    workdir: Path, first_step: int, steps: int
) -> tuple[Trainer, list[str]]:
    """A TINY trainer under cosine over 50 epochs and train.max_time 60, its session begun at
    ``first_step`` and ``steps`` steps in after 20 s, judged once: its notes."""
    from drnn_cli.session_time import SessionTime

    trainer = _trainer_at_step_10(workdir, "train.schedule=cosine", "train.epochs=50", "train.max_time=60")
    notes: list[str] = []
    trainer.reporter.note = notes.append  # type: ignore[method-assign]
    trainer.global_step, trainer._first_step = first_step + steps, first_step
    trainer.session_time = SessionTime(time.monotonic() - 20.0)
    trainer.budget.started = time.monotonic() - 20.0
    trainer._note_unannealed()
    return trainer, notes


def test_a_time_budget_that_cuts_a_cosine_schedule_far_from_its_end_is_said_once_with_the_steps_that_fit(
    workdir: Path,
):
    """max_time does not change the schedule: the README's own 2-hour recipe on a 30 MB text (cosine over
    50 epochs, 100 hours) trained at lr 0.003 to its last step, and nothing said so (prac34). Once the
    session's pace shows it, a note gives where the time ends the run and a max_steps that fits."""
    from drnn_cli.run_notes import unannealed_note
    from drnn_cli.session_time import SessionTime

    # 30 steps in 20 s (2/3 s a step) with 40 s of the budget left, to 50 × 19 = 950 steps: the 920 left
    # take 613.3 s, and their 184 validations (every 5 steps) of 100 tokens at a third of a step's 1/80 s
    # a token 51.1 s (no write measured yet: free), so 40 s reach 40 × 920 / 664.4 = 55 more, to step 85
    trainer, notes = _cosine_session_20_s_into_a_minute(workdir, first_step=0, steps=30)
    trainer._note_unannealed()  # judged once
    # step 85 is in epoch 4 (19 steps an epoch): cosine over 50 epochs from 0.01 to min_lr 0 there
    rate = 0.01 * 0.5 * (1 + math.cos(math.pi * 4 / 50))
    assert notes == [unannealed_note(trainer.config.train, 85, trainer.length, rate)]
    assert notes[0] == (
        "at this pace train.max_time (1:00) ends the run near step 85 of the 950 its cosine schedule spans "
        f"(train.epochs 50), the rate still {rate:.3g} of its 0.01 (train.min_lr 0): max_time does not change "
        'the schedule; for the rate to anneal within the time, --set train.max_steps=76 (README "Long runs")'
    )  # 90% of the steps that fit
    # a budget that reaches 80% of the schedule (5 epochs: 85 of 95), a constant rate, or too few steps
    # to pace: nothing
    for overrides, steps in (
        (("train.schedule=cosine", "train.epochs=5", "train.max_time=60"), 30),
        (("train.epochs=50", "train.max_time=60"), 30),
        (("train.schedule=cosine", "train.epochs=50", "train.max_time=60"), 19),
    ):
        quiet = _trainer_at_step_10(workdir, *overrides)
        quiet.reporter.note = notes.append  # type: ignore[method-assign]
        quiet.global_step, quiet._first_step = steps, 0
        quiet.session_time = SessionTime(time.monotonic() - 20.0)
        quiet.budget.started = time.monotonic() - 20.0
        quiet._note_unannealed()
    assert len(notes) == 1
    from drnn_cli.batches import PlannedLength

    long_run = PlannedLength(steps_per_epoch=14_900.0, step_budget=0, epochs=50, steps=745_000)
    assert unannealed_note(trainer.config.train, 51_300, long_run, 0.003).endswith(
        '--set train.max_steps=46000 (README "Long runs")'
    )  # 90% of the steps that fit, to two figures


def test_a_resumed_sessions_time_budget_note_counts_the_steps_that_fit_from_where_it_stands(workdir: Path):
    """A resumed session at step 580 that its time ends near step 767 was told --set train.max_steps=690
    (90% of 767): behind step 765, where the session itself ended, so --resume with it trained nothing
    (practitioner trial prac38). The advice counts from the step the session stands at."""
    from drnn_cli.run_notes import unannealed_note

    # as the fresh session above, 20 steps later in the run: it began at step 20 (a resume), stands at
    # step 50 after 30 steps in 20 s, and the 40 s left reach 55 more, to step 105
    trainer, notes = _cosine_session_20_s_into_a_minute(workdir, first_step=20, steps=30)
    rate = 0.01 * 0.5 * (1 + math.cos(math.pi * 5 / 50))  # step 105 is in epoch 5
    assert notes == [unannealed_note(trainer.config.train, 105, trainer.length, rate, resumed_at=50)]
    assert notes[0].endswith(
        "for the rate to anneal within this session's time, stop it (the run is at step 50) and --resume --set "
        'train.max_steps=99 (README "Long runs")'
    )  # 50 + 90% of the 55 steps the time allows, past the 50 it stands at (90% of 105, 94, was fine here)
    assert unannealed_note(trainer.config.train, 52_100, trainer.length, 0.003, resumed_at=52_010).endswith(
        '--resume --set train.max_steps=52091 (README "Long runs")'
    )  # two figures of the 90 steps left, not of the run's 52,100 (52,000: behind the run)


def test_a_session_max_time_ended_short_of_annealing_says_the_step_budget_for_the_next(workdir: Path):
    """The note said as a session's pace shows counts from the step it stands at then: read after the
    session ran on to its end, its max_steps was behind the run, and --resume with it trained nothing
    (review recheck38). At the end of a session max_time stopped, a note gives the next one's."""
    trainer = _trainer_at_step_10(workdir, "train.schedule=cosine", "train.epochs=50", "train.max_time=60")
    trainer.global_step, trainer._first_step = 120, 20  # 100 steps this session, of the 950 the cosine spans
    rate = 0.01 * 0.5 * (1 + math.cos(math.pi * 6 / 50))  # step 120 is in epoch 6 (19 steps an epoch)
    assert trainer._closing_notes("max_time")[0] == (
        f"train.max_time ended this session at step 120 of the 950 its cosine schedule spans, the rate still "
        f"{rate:.3g} of its 0.01: for the next session of the same time to anneal, --resume --set "
        'train.max_steps=210 (README "Long runs")'
    )  # 120 + 90% of the 100 steps the time took
    assert not [note for note in trainer._closing_notes("epochs") if "max_time" in note]
    trainer.global_step = 800  # past 80% of the schedule: near annealed
    assert not [note for note in trainer._closing_notes("max_time") if "max_time" in note]


def test_the_time_left_adds_the_steps_validations_and_writes_left_at_the_sessions_paces(workdir: Path):
    """The bar's time left was the step pace, or the wall clock divided by the steps done, and rich's
    epoch pace: on a 20 MB text it said 0:03 through a validation of 70 s, then 0:09 with a whole
    validation to come (practitioner trial, 2026-11-28)."""
    from drnn_cli.session_time import PaceOrigin, SessionTime, WorkLeft

    trainer = _trainer_at_step_10(workdir)
    assert trainer._work_left() == WorkLeft(
        steps=47, validations=10, checkpoint_writes=11, tokens_per_validation=100, tokens_per_step=80
    )  # writes: the final last, and a best after each validation at most
    # kept every 4 steps: 12 points after step 10 (12, …, 56) and the final last at 57
    kept = _trainer_at_step_10(workdir, "train.keep_every=4 steps")
    assert kept._work_left().checkpoint_writes == 10 + 12 + 1
    # 20 s since the first step: 6 s validating 600 tokens (0.01 s a token), 2 s writing 4 checkpoints
    # (0.5 s each): a step is (20 - 6 - 2) / 10 = 1.2 s
    trainer.session_time = SessionTime(time.monotonic() - 20.0, 6.0, 2, 600, 2.0, 4)
    assert trainer._seconds_left() == pytest.approx(47 * 1.2 + 10 * 100 * 0.01 + 11 * 0.5, rel=0.03)  # 71.9
    # inside a validation, 40 of its 100 tokens done in 2 s: its 60 left at 0.05 s; those 2 s are not
    # step time (the figure rose through a validation: trial31), so a step is (20 - 2 - 6 - 2) / 10 = 1 s
    began = time.perf_counter() - 2.0
    assert trainer._seconds_left((40, 100, began)) == pytest.approx(60 * 0.05 + 47 + 10 + 5.5, rel=0.03)
    # before any validation: a token costs a forward pass, a third of a step's 1.8 s / 80 tokens
    trainer.session_time = SessionTime(time.monotonic() - 20.0, writing=2.0, writes=4)
    assert trainer._seconds_left() == pytest.approx(47 * 1.8 + 10 * 100 * (1.8 / 80 / 3) + 11 * 0.5, rel=0.03)
    # paced from the end of the session's first step, which carried its start-up (ddp32: 3-6 times too
    # long early on): 8 s in, no validation or write yet; since then 12 s, less 6 validating and 2
    # writing, over 9 steps: 4 / 9 s a step
    trainer.session_time = SessionTime(
        time.monotonic() - 20.0, 6.0, 2, 600, 2.0, 4, pace_origin=PaceOrigin(8.0, 0.0, 0.0, 1)
    )
    assert trainer._seconds_left() == pytest.approx(47 * 4 / 9 + 10 + 5.5, rel=0.03)
    trainer.global_step = 1  # the first step alone: no pace yet
    assert trainer._seconds_left() is None
    # before the first step: no pace; inside a validation then (a fine-tuning run's first), no figure
    trainer.global_step = 0
    assert (trainer._seconds_left(), trainer._seconds_left((40, 100, began))) == (None, None)


def test_the_time_left_counts_at_the_last_five_minutes_pace_not_the_sessions_mean():
    """A machine that got busier: 600 steps at 1 s, then 200 at 3 s (another job took a core). The
    session's mean, 1.5 s a step, priced the steps left at half their time (own40); the last five
    minutes' pace is 3 s, less a validation inside the window."""
    from drnn_cli.session_time import PaceOrigin, SessionTime

    clock = SessionTime(pace_origin=PaceOrigin(0.0, 0.0, 0.0, 0))
    for second in range(0, 1_201, 10):  # the trainer reads the pace at its log lines and bar updates
        steps = second if second <= 600 else 600 + (second - 600) // 3
        if second == 1_050:
            clock.validating += 30.0  # a validation inside the window: not step time
        pace = clock.step_seconds(float(second), steps)
    # at 1,200 s and 800 steps: from the mark at 900 s (700 steps), 300 s less 30 validating, 100 steps
    assert pace == pytest.approx(2.7)
    young = SessionTime(pace_origin=PaceOrigin(0.0, 0.0, 0.0, 0))
    for second in range(0, 241, 10):  # younger than the window: the session's pace from its origin
        pace = young.step_seconds(float(second), second // 2)
    assert pace == pytest.approx(2.0)


def test_max_time_ends_the_time_left_with_the_stops_validation_and_writes(workdir: Path):
    """Before its first validation a max_time run's bar said hours (lstm_full_cpu's 10 minutes: 28:51;
    a 40 s run: 3:57:55), pricing the stop's validation at a step a token; and in the stop's own
    validation it counted that validation twice (trial31)."""
    from drnn_cli.session_time import SessionTime

    # the figures are read off the clock: 3% leaves a loaded machine's pauses room, and every alternative
    # below (the stop's validation counted twice, or none) is further off than that
    trainer = _trainer_at_step_10(workdir, "train.max_time=30s")
    trainer.budget.started = time.monotonic() - 20.0
    trainer.session_time = SessionTime(time.monotonic() - 20.0, 6.0, 2, 600, 2.0, 4)
    # 10 s to the budget, then one validation of 100 tokens (1 s) and last and best (0.5 s each)
    assert trainer._seconds_left() == pytest.approx(10.0 + 1.0 + 1.0, rel=0.03)
    # no validation yet: its 100 tokens at a third of a step's (20 - 2) / 10 s / 80 tokens
    trainer.session_time = SessionTime(time.monotonic() - 20.0, writing=2.0, writes=4)
    assert trainer._seconds_left() == pytest.approx(10.0 + 100 * (1.8 / 80 / 3) + 1.0, rel=0.03)
    # inside a validation that outlasts the budget (9 s left of it, 1 s to the budget): it is the stop's
    trainer.budget.started = trainer.session_time.started = time.monotonic() - 29.0
    began = time.perf_counter() - 1.0
    assert trainer._seconds_left((10, 100, began)) == pytest.approx(90 * 0.1 + 2 * 0.5, rel=0.03)
    # the budget runs out in the next validation on the cadence (step 15: 5 steps of 1.2 s, then 100
    # tokens at 0.05 s): that one ends the run, with no second validation after it (trial31b: 0:15 for 9.7)
    trainer.budget.started = time.monotonic() - 20.0
    trainer.session_time = SessionTime(time.monotonic() - 20.0, 6.0, 2, 120, 2.0, 4)
    assert trainer._seconds_left() == pytest.approx(5 * 1.2 + 100 * 0.05 + 2 * 0.5, rel=0.03)
    # a validation before the first step (a fine-tuning run's of its start): max_time starts after it,
    # and its stop validates again at its pace (40 of 100 tokens in 2 s)
    trainer.global_step = 0
    began = time.perf_counter() - 2.0
    assert trainer._seconds_left((40, 100, began)) == pytest.approx((60 + 100) * 0.05 + 30.0, rel=0.03)
    # one after the session's first step, which gives no pace alone (its start-up): max_time's clock has
    # run 20 s of its 30 already, so 10 s are left of it, not 30 (review rev32)
    trainer.global_step = 1
    trainer.session_time.pace_from_here(1)
    assert trainer._seconds_left((40, 100, began)) == pytest.approx((60 + 100) * 0.05 + 10.0, rel=0.03)


def test_next_cadence_point_is_the_first_step_a_cadence_comes_due_after_a_step():
    from drnn_cli.session_time import next_cadence_point

    assert next_cadence_point(Cadence(5, "steps"), 10, 19.0) == 15
    assert next_cadence_point(Cadence(5, "steps"), 12, 19.0) == 15
    assert next_cadence_point(Cadence(2, "epochs"), 10, 19.0) == 38  # the end of epoch 2
    assert next_cadence_point(Cadence(2, "epochs"), 38, 19.0) == 76
    assert next_cadence_point(Cadence(0, "steps"), 10, 19.0) is None


def test_a_session_says_where_its_time_went_checkpoint_writes_and_validations_apart(
    workdir: Path, cli, monkeypatch: pytest.MonkeyPatch
):
    """tokens/s and the log's seconds count the steps alone, as d2l's; max_time counts the wall clock.
    A run that wrote a checkpoint every step reported 18,004 tokens/s and 3.7 s under "stopped by
    max_time" (8 s), twice its real pace, and nothing said where the rest went (practitioner trial)."""
    import drnn_cli.checkpoint_writer

    writes = []
    save = drnn_cli.checkpoint_writer.save_checkpoint

    def slow_save(*args: object) -> None:
        time.sleep(0.1)
        writes.append(True)
        save(*args)

    monkeypatch.setattr(drnn_cli.checkpoint_writer, "save_checkpoint", slow_save)
    code, out, err = cli(
        "train", "--config", str(write_config(workdir)), "--set", "train.checkpoint_every=1", "--json"
    )
    assert code == 0, err
    seconds = json.loads(out.strip().splitlines()[-1])["seconds"]
    assert len(writes) >= 4  # last after each of the 3 epochs, and best after the first validation
    assert seconds["checkpoints"] >= 0.1 * len(writes) and seconds["validating"] > 0
    assert seconds["training"] == metrics(workdir / "runs" / "tiny")[-1]["elapsed"]  # the log's seconds
    assert seconds["session"] >= seconds["training"] + seconds["validating"] + seconds["checkpoints"]
    # the summary table (on stderr under --json)
    assert re.search(r"│ time \(this session\) +│ \d+\.\d s +│", err), err
    other = seconds["session"] - seconds["training"] - seconds["validating"] - seconds["checkpoints"]
    parts = [seconds["training"], seconds["validating"], seconds["checkpoints"], other]
    shown = " / ".join(f"{part:,.1f} s" for part in parts)  # rest: samples, the plot
    assert f"│ training / validating / checkpoints / rest │ {shown}" in err, err


def test_a_second_ctrl_c_between_boundaries_counts_the_session_training_up_to_it(
    workdir: Path, cli, monkeypatch: pytest.MonkeyPatch
):
    """Pressed twice inside an epoch with no boundary since its start, a training ends at once; its
    --json said 0.0 s of training (the epoch's seconds as its last boundary kept them), however many
    steps had run. The epoch's clock is read as the second press arrives: ten steps of 50 ms."""
    call = StaticStep.__call__
    steps = []

    def slow_step(self: StaticStep, window: torch.Tensor) -> torch.Tensor:
        time.sleep(0.05)
        steps.append(True)
        if len(steps) == 10:  # Ctrl-C, then Ctrl-C again before the step's end is checked
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
        return call(self, window)

    monkeypatch.setattr(StaticStep, "__call__", slow_step)
    code, out, err = cli("train", "--config", str(write_config(workdir)), "--json")
    assert code == 130, err
    stopped = json.loads(out.strip().splitlines()[-1])
    assert stopped["checkpoint"] is None and stopped["steps"] == 0  # nothing kept: the run starts over
    assert 0.5 <= stopped["seconds"]["training"] <= stopped["seconds"]["session"]


def test_a_second_ctrl_c_as_a_cut_epoch_end_checkpoints_counts_the_epoch_it_trained(
    workdir: Path, cli, monkeypatch: pytest.MonkeyPatch
):
    """Ctrl-C cuts the first epoch's validation short; the second press lands as its checkpoint starts.
    The epoch's seconds had left the run's elapsed for its clock after the first, so the --json read 0.0
    s of training where nineteen steps of 20 ms had run."""
    from drnn_cli.signals import Signalled

    call = StaticStep.__call__

    def slow_step(self: StaticStep, window: torch.Tensor) -> torch.Tensor:
        time.sleep(0.02)
        return call(self, window)

    def abandoned_by_ctrl_c(self: Trainer, abandonable: bool = False) -> float | None:
        self.stops.signum = signal.SIGINT
        raise EvaluationAbandoned

    def pressed_again(self: Trainer, *args: object, **kwargs: object) -> None:
        raise Signalled(signal.SIGINT)  # as the handler does at the call's first instruction

    monkeypatch.setattr(StaticStep, "__call__", slow_step)
    monkeypatch.setattr(Trainer, "_validate", abandoned_by_ctrl_c)
    monkeypatch.setattr(Trainer, "_interrupt", pressed_again)
    code, out, err = cli("train", "--config", str(write_config(workdir)), "--json")
    assert code == 130, err
    stopped = json.loads(out.strip().splitlines()[-1])
    assert stopped["checkpoint"] is None and stopped["steps"] == 0  # nothing kept: the run starts over
    assert STEPS_PER_EPOCH * 0.02 <= stopped["seconds"]["training"] <= stopped["seconds"]["session"]


def test_a_slowdown_to_a_fraction_of_the_session_pace_is_said_once_with_one_thread_as_the_cure():
    """Three windows in a row (the tokens and seconds between two metrics lines) below a quarter of the
    session's fastest: said at the third, once; a window back at pace starts the count again, and one
    thread (no team to stall) is never told. A resumed session's first window starts at its own start."""
    from drnn_cli.session_time import SlowdownWatch

    def windows(watch: SlowdownWatch, seconds: list[float], tokens: int = 36_000) -> list[str | None]:
        said = []
        for window in seconds:  # the run's counts at each line: the session's start plus its windows
            said.append(watch.observe(watch.tokens_seen + tokens, watch.elapsed + window))
        return said

    # a resumed run: 1,000,000 tokens in 500 s before this session
    watch = SlowdownWatch(2, "the same command plus --resume", tokens_seen=1_000_000, elapsed=500.0)
    # 20,000 and 40,000 tokens/s; then 9,000 (below 40,000 / 4), 5,000, 12,000 (not: the count restarts),
    # 8,000, 5,000
    assert windows(watch, [1.8, 0.9, 4.0, 7.2, 3.0, 4.5, 7.2]) == [None] * 7
    assert windows(watch, [9.0]) == [  # 4,000 tokens/s
        "training runs 10 times slower than earlier in this session (4,000 tokens/s, down from 40,000): "
        "other work on this machine's cores is probably stalling drnn's 2 threads, which wait for each "
        "other at every step. On a busy machine one thread is often faster: stop it (Ctrl-C) and continue "
        "it with OMP_NUM_THREADS=1 set, by the same command plus --resume"
    ]
    assert windows(watch, [36.0]) == [None]  # once
    alone = SlowdownWatch(1, "", tokens_seen=0, elapsed=0.0)
    assert windows(alone, [0.9, 36.0, 36.0, 36.0, 36.0]) == [None] * 5


def test_a_cpu_run_whose_steps_slow_down_says_so_as_it_trains(
    workdir: Path, cli, monkeypatch: pytest.MonkeyPatch
):
    """Steps 30 ms slower from the third epoch on, as a stalled 2-thread team's are: the run says so."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # the watch's; the tests train on one
    call, steps = StaticStep.__call__, []

    def stalled_step(self: StaticStep, window: torch.Tensor) -> torch.Tensor:
        steps.append(True)
        if len(steps) > 45:
            time.sleep(0.03)
        return call(self, window)

    monkeypatch.setattr(StaticStep, "__call__", stalled_step)
    tree = {**TINY, "train": {**TINY["train"], "epochs": 7}}
    code, out, err = cli("train", "--config", str(write_config(workdir, tree)))
    assert code == 0, err
    said = " ".join(out.split())  # the note, folded at the terminal's width
    assert said.count("times slower than earlier in this session") == 1, out
    note = said.split("note: training runs ")[1].split(" epoch ")[0]  # said after an epoch's line
    assert note.endswith("continue it with OMP_NUM_THREADS=1 set, by the same command plus --resume"), out


def test_a_step_budgets_last_line_reaches_the_span_its_first_line_counts_out_of(workdir: Path):
    """1,610 tokens in rows of 8 × 10 make epochs of 19 or 20 steps as sequential sampling's offset falls
    (19, 20, 20, 20 with seed 0; 19.91 on average): 66 steps end 7 steps into the fourth epoch, 3.35, where
    the mean's span said 66 / 19.91 = 3.32 and the last line read past it (``epoch 1.207/1.205`` on a
    practitioner's text: ddp32)."""
    from drnn_cli.budget import epoch_count
    from drnn_cli.report import SilentReporter

    class FirstLine(SilentReporter):
        run: RunStart | None = None

        def start(self, run: RunStart) -> None:
            self.run = run

    config = write_config(workdir)
    settings = ("data.max_tokens=1610", "data.val_fraction=0", "train.epochs=10", "train.max_steps=66")
    reporter = FirstLine()
    train_run(TrainRequest(config, settings, run_dir=Path("runs/span")), reporter=reporter)
    assert reporter.run is not None and reporter.run.epochs_of() == "3.35"
    assert reporter.run.span() == "66 steps (3.35 epochs)"  # the first line counts as the lines do (rev32)
    last = metrics(workdir / "runs/span")[-1]
    assert (last["step"], epoch_count(last["epoch"], reporter.run.steps_per_epoch)) == (66, "3.35")
    assert dataclasses.replace(reporter.run, budget_epochs=0.0).epochs_of() == "3.32"  # the mean's alone
    # with seed 14 the epochs have 20, 19 and 19 steps: 59 steps are under 3 epochs' mean (59.73), yet
    # the third epoch ends the run at step 58, which its lines count out of 3, not 3.05 (review rev32)
    settings = (*settings[:2], "train.epochs=3", "train.max_steps=59", "train.seed=14")
    train_run(TrainRequest(config, settings, run_dir=Path("runs/shorter")), reporter=reporter)
    assert reporter.run.max_steps == 59 and reporter.run.epochs_of() == "3"
    assert [(line["step"], line["epoch"]) for line in metrics(workdir / "runs/shorter")][-1] == (58, 3)


def test_a_max_time_runs_first_line_names_its_time_budget():
    start = RunStart(80, 0, 1_000, "cpu", "from scratch", 0, max_time=600.0)
    assert start.span() == "80 epochs or 10:00 of wall clock (train.max_time), whichever comes first"
    assert RunStart(80, 0, 1_000, "cpu", "from scratch", 0).span() == "80 epochs"
    short = RunStart(80, 0, 1_000, "cpu", "from scratch", 0, max_time=0.3).span()
    assert short == "80 epochs or 0.3 s of wall clock (train.max_time), whichever comes first"  # not "0:00"


def test_a_resumed_budget_stops_validation_is_the_old_sessions_and_the_new_budget_starts_after_it(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
):
    """A max_time run whose final validation a SIGINT cut short: resumed, that validation (56 s on a 2 M
    token split) spent the new 8 s budget alone, and the session trained one step and validated again
    (practitioner trial, 2026-11-28). The new budget now starts after the old session's validation."""
    config = write_config(workdir)
    reached = Budget.reached
    monkeypatch.setattr(
        Budget, "reached", lambda self, step: "max_time" if step == 5 else reached(self, step)
    )
    abandoned, undo_signal = signal_while_validating(monkeypatch, 5)
    with pytest.raises(TrainingInterrupted) as stopped:
        train(config, "train.max_time=1h")
    assert abandoned == [5]
    spent = stopped.value.stopped.seconds  # --json's, at a stop too
    assert spent is not None and spent.session >= spent.training > 0
    undo_signal()
    monkeypatch.setattr(Budget, "reached", reached)
    validate = Trainer._validate

    def slow_validation(self: Trainer, abandonable: bool = False) -> float | None:
        if self.global_step == 5:  # the validation the stop cut short, run again first
            time.sleep(1.0)
        return validate(self, abandonable)

    monkeypatch.setattr(Trainer, "_validate", slow_validation)
    resumed = train(config, "train.max_time=0.5s", resume=True)
    assert resumed.start_step == 5
    assert resumed.steps - resumed.start_step > 1  # one step: the validation had spent the budget
    assert resumed.seconds.session >= 1.0  # the replayed validation is this session's time all the same


def test_max_time_spent_while_validating_ends_the_run_at_that_validation(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
):
    """A budget that ran out in a validation trained one more step and validated again: a 40 s run took
    56.9 s, past docs/long-runs.md's bound of one step and one evaluation (trial31)."""
    validated: list[int] = []
    validate = Trainer._validate

    def counted(self: Trainer, abandonable: bool = False) -> float | None:
        validated.append(self.global_step)
        return validate(self, abandonable)

    reached = Budget.reached
    monkeypatch.setattr(Trainer, "_validate", counted)
    # the clock runs out during the validation after step 10
    monkeypatch.setattr(
        Budget, "reached", lambda self, step: "max_time" if 10 in validated else reached(self, step)
    )
    result = train(write_config(workdir), "train.max_time=1h", "train.eval_every=5 steps")
    assert (result.stop_reason, result.steps, validated) == ("max_time", 10, [5, 10])
    # and at an epoch's end (19 steps), validating every epoch
    validated.clear()
    monkeypatch.setattr(
        Budget, "reached", lambda self, step: "max_time" if 19 in validated else reached(self, step)
    )
    result = train(write_config(workdir), "train.max_time=1h", run_dir=workdir / "by-epoch")
    assert (result.stop_reason, result.steps, validated) == ("max_time", 19, [19])


def test_log_lines_count_epochs_to_the_decimals_that_tell_one_step_from_the_next():
    """60 steps of a 17,616-step epoch logged `epoch 0.00/0.00` on every line, and lines 20 steps apart in
    a 2,000-step epoch both said `0.05` (practitioner trials, 2026-11-28)."""
    from drnn_cli.budget import epoch_count

    assert [epoch_count(value, 19) for value in (3, 2.14, 0.42)] == ["3", "2.14", "0.42"]  # as before
    assert [epoch_count(value, 2_000) for value in (0.05, 0.06, 1206.5)] == ["0.0500", "0.0600", "1,206.5000"]
    assert epoch_count(0.000568, 17_616) == "0.00057"  # 5 decimals: a step is 0.0000568
    assert epoch_count(0.4, 0) == "0.40"  # no step count given: two decimals
    start = RunStart(1, 0, 1_000, "cpu", "from scratch", "10 steps", max_steps=60, steps_per_epoch=17_616)
    assert start.epochs_of() == "0.00341"


def test_a_fine_tuning_runs_validation_of_its_starting_weights_is_its_sessions_time(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
):
    """It was in no row of `seconds`: 8.4 s of a 39 s fine-tuning run went unaccounted (trial31b). It is
    the session's time, though not max_time's, whose budget starts with the first step."""
    config = write_config(workdir)
    train(config, "train.epochs=1")
    validate = Trainer._validate

    def slow_start(self: Trainer, abandonable: bool = False) -> float | None:
        if self.global_step == 0:
            time.sleep(1.5)  # outside the validation's own timing: it shows in the rest
        return validate(self, abandonable)

    monkeypatch.setattr(Trainer, "_validate", slow_start)
    tuned = train(config, "train.epochs=1", run_dir=workdir / "tuned", init_from=workdir / "runs" / "tiny")
    spent = tuned.seconds
    assert spent.session - spent.training - spent.validating - spent.checkpoints >= 1.5
