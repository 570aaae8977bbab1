"""The training loop: d2l's step, schedules, the run directory, resume, divergence, early stopping."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml

from drnn_cli.checkpoint import load_checkpoint
from drnn_cli.config import Config, ModelConfig, TrainConfig
from drnn_cli.errors import DrnnError, TrainingDiverged
from drnn_cli.models import build_model
from drnn_cli.optimizers import build_optimizer, lr_factor
from drnn_cli.report import EpochRecord, SilentReporter
from drnn_cli.run_notes import idle_setting_notes
from drnn_cli.start_point import StartPoint
from drnn_cli.step import clip_gradients
from drnn_cli.train import Trainer
from drnn_cli.train_session import TrainRequest, train_run

TINY = {
    "data": {"max_tokens": 2000, "batch_size": 8, "num_steps": 10},
    "model": {"cell": "lstm", "hidden_size": 24, "num_layers": 2},
    "train": {"epochs": 3, "optimizer": "adam", "lr": 0.01, "sample_every": 0, "device": "cpu"},
}


def write_config(directory: Path, tree: dict, name: str = "tiny.yaml") -> Path:
    path = directory / name
    path.write_text(yaml.safe_dump(tree))
    return path


def train(config: Path, *overrides: str, **request) -> object:
    return train_run(TrainRequest(config_path=config, overrides=overrides, **request))


# ---------------------------------------------------------------------------------------------
# One step


def test_clipping_scales_the_global_norm_down_to_theta():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    a.grad, b.grad = torch.tensor([3.0]), torch.tensor([4.0])  # global norm 5
    norm = clip_gradients([a, b], 1.0)
    assert float(norm) == pytest.approx(5.0)
    assert a.grad.tolist() == pytest.approx([0.6]) and b.grad.tolist() == pytest.approx([0.8])


def test_clipping_leaves_small_gradients_bit_for_bit():
    a = torch.nn.Parameter(torch.zeros(3))
    a.grad = torch.tensor([0.1, -0.2, 0.3])
    before = a.grad.clone()
    clip_gradients([a], 1.0)
    assert torch.equal(a.grad, before)


def test_adamw_decays_matrices_and_leaves_biases_undecayed():
    model = build_model(28, ModelConfig(cell="lstm", hidden_size=8, num_layers=2, embedding_dim=4), seed=0)
    names = {id(p): name for name, p in model.named_parameters()}
    optimizer = build_optimizer(model, TrainConfig(optimizer="adamw", lr=0.1, weight_decay=0.5))
    decayed, undecayed = optimizer.param_groups
    assert (decayed["weight_decay"], undecayed["weight_decay"]) == (0.5, 0.0)
    assert sorted(names[id(p)] for p in undecayed["params"]) == [
        "decoder.bias",
        "rnn.bias_hh_l0",
        "rnn.bias_hh_l1",
        "rnn.bias_ih_l0",
        "rnn.bias_ih_l1",
    ]
    # The 4 rnn matrices, the embedding and the decoder.
    assert all(p.dim() == 2 for p in decayed["params"]) and len(decayed["params"]) == 6
    # With zero gradients Adam's own update is 0, so one step is the decay alone: w ← w·(1 − lr·wd).
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, p in model.named_parameters():
        factor = 1.0 if p.dim() == 1 else 1 - 0.1 * 0.5
        torch.testing.assert_close(p.detach(), before[name] * factor, rtol=0, atol=1e-7, msg=name)

    one_group = build_optimizer(model, TrainConfig(optimizer="adamw", weight_decay=0.5, decay_biases=True))
    assert len(one_group.param_groups) == 1 and one_group.param_groups[0]["weight_decay"] == 0.5
    # SGD and Adam keep one group: decay_biases concerns AdamW only.
    assert len(build_optimizer(model, TrainConfig(optimizer="sgd", weight_decay=0.5)).param_groups) == 1


def test_momentum_is_sgds_and_an_adam_run_that_sets_it_is_told_so():
    model = build_model(28, ModelConfig(cell="lstm", hidden_size=8, num_layers=1), seed=0)
    for kind in ("adam", "adamw"):
        config = Config(train=TrainConfig(optimizer=kind, momentum=0.9))
        group = build_optimizer(model, config.train).param_groups[0]
        assert "momentum" not in group  # Adam's moments take its betas: the 0.9 goes nowhere
        assert idle_setting_notes(config, planned_epochs=3, planned_steps=30) == [
            f"train.momentum 0.9 is SGD's, and train.optimizer {kind} does not use it (its moment estimates "
            "take PyTorch's default betas); set train.momentum 0, or train.optimizer sgd"
        ]
    sgd = Config(train=TrainConfig(optimizer="sgd", momentum=0.9))
    assert build_optimizer(model, sgd.train).param_groups[0]["momentum"] == 0.9
    assert idle_setting_notes(sgd, planned_epochs=3, planned_steps=30) == []


def test_a_schedules_settings_under_another_schedule_are_said_to_do_nothing():
    """train.min_lr 0.1 under the constant schedule was taken without a word (own40), where other idle
    settings get a note; a schedule's own settings, and defaults, say nothing."""

    def said(**train: object) -> list[str]:
        return idle_setting_notes(Config(train=TrainConfig(**train)), planned_epochs=3, planned_steps=30)

    assert said(min_lr=0.0001) == [
        "train.min_lr 0.0001 is the cosine schedule's, and train.schedule constant does not use it (set "
        "train.schedule cosine, or leave it out)"
    ]
    assert said(schedule="cosine", step_size=10, gamma=0.1, lr=0.1) == [
        "train.step_size 10 and train.gamma 0.1 are the step schedule's, and train.schedule cosine does not use "
        "them (set train.schedule step, or leave them out)"
    ]
    assert said(schedule="step", min_lr=0.001, step_size=10) == [
        "train.min_lr 0.001 is the cosine schedule's, and train.schedule step does not use it (set train.schedule "
        "cosine, or leave it out)"
    ]
    assert said(min_lr=0.001, gamma=0.1) == [
        "train.min_lr 0.001 and train.gamma 0.1 are the cosine and step schedules', and train.schedule constant "
        "does not use them (leave out those of the schedule not taken)"
    ]
    assert said(schedule="cosine", min_lr=0.001) == said(schedule="step", gamma=0.1) == said() == []


def test_a_run_written_with_one_adamw_group_resumes_with_one(workdir: Path):
    """Checkpoints from before biases went undecayed hold one AdamW group and no decay_biases
    setting (it reads as the default, False): the resumed run keeps the grouping it was trained with."""
    from drnn_cli.checkpoint import save_checkpoint

    config = write_config(workdir, TINY)
    adamw = ("train.optimizer=adamw", "train.weight_decay=0.01")
    train(config, *adamw, "train.decay_biases=true", "train.epochs=1")  # one group
    last = workdir / "runs/tiny/last.safetensors"
    old = load_checkpoint(last)
    old.config = old.config.model_copy(
        update={"train": old.config.train.model_copy(update={"decay_biases": False})}
    )
    save_checkpoint(last, old)
    resumed = train(config, *adamw, "train.epochs=2", resume=True)
    assert resumed.epochs == 2
    state = load_checkpoint(workdir / "runs/tiny/last.safetensors").trainer_state
    assert len(state["optimizer"]["param_groups"]) == 1


def test_learning_rate_schedules():
    constant = TrainConfig(epochs=10, lr=2.0)
    assert [lr_factor(e, constant) for e in range(3)] == [1.0, 1.0, 1.0]
    warm = TrainConfig(epochs=10, lr=1.0, warmup_epochs=3)
    assert [lr_factor(e, warm) for e in range(4)] == [0.25, 0.5, 0.75, 1.0]
    step = TrainConfig(epochs=10, lr=1.0, schedule="step", step_size=2, gamma=0.5)
    assert [lr_factor(e, step) for e in range(5)] == [1.0, 1.0, 0.5, 0.5, 0.25]
    cosine = TrainConfig(epochs=5, lr=1.0, schedule="cosine", min_lr=0.1)
    factors = [lr_factor(e, cosine) for e in range(6)]
    assert factors[0] == pytest.approx(1.0)
    assert factors[2] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 2 / 5)))
    assert factors[5] == pytest.approx(0.1)


# ---------------------------------------------------------------------------------------------
# The run directory


def test_a_run_s_own_config_names_its_run_and_keeps_its_text_s_name_as_written(
    workdir: Path, cli, monkeypatch: pytest.MonkeyPatch
):
    """A run's config.yaml trained into runs/config (a second run's, refused there); d2l's closing line
    wrapped at COLUMNS=40, where scripts grep it; and config.yaml wrote "été" as "\\xE9t\\xE9"."""
    text = workdir / "été.txt"
    text.write_text("the time machine by h g wells " * 60)
    config = write_config(
        workdir, {**TINY, "data": {**TINY["data"], "path": str(text), "preprocess": "none"}}
    )
    assert train(config, "train.epochs=1").run_dir == Path("runs/tiny")
    own = workdir / "runs" / "tiny" / "config.yaml"
    assert str(text) in own.read_text(encoding="utf-8")
    code, out, err = cli("train", "--config", str(own), "--json")
    assert (code, out) == (1, "") and "run directory runs/tiny already holds a run" in err
    monkeypatch.setenv("COLUMNS", "40")
    code, out, err = cli("train", "--config", str(own), "--run", "runs/again")
    assert code == 0, err
    assert any(line.startswith("perplexity ") and line.endswith(" on cpu") for line in out.splitlines())


@pytest.mark.draws_plot
def test_run_directory_holds_config_vocab_checkpoints_metrics_plot_and_latest_marker(workdir: Path):
    tree = {**TINY, "data": {**TINY["data"], "val_fraction": 0.2}}
    config = write_config(workdir, tree)
    result = train(config)
    run = workdir / "runs" / "tiny"
    assert result.run_dir == Path("runs/tiny")
    names = {p.name for p in run.iterdir()}
    assert {
        "config.yaml",
        "vocab.json",
        "last.safetensors",
        "best.safetensors",
        "metrics.jsonl",
        "perplexity.png",
    } <= names
    assert names <= {  # nothing else: train.lock is the (released) OS lock, .drnn-run marks the directory
        "config.yaml", "vocab.json", "last.safetensors", "best.safetensors", "metrics.jsonl",
        "perplexity.png", "train.lock", ".drnn-run", "stopped.json",
    }  # fmt: skip
    assert json.loads((run / "stopped.json").read_text()) == {"stopped_by": "epochs", "global_step": 3 * 19}
    assert (run / "perplexity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2, 3]
    assert set(lines[0]) == {
        "epoch", "train_ppl", "val_ppl", "lr", "tokens_per_s", "elapsed", "step", "tokens_seen",
        "train_ppl_steps", "val_tokens",
    }  # fmt: skip
    assert [line["val_tokens"] for line in lines] == [399] * 3  # 20% of 2,000 tokens, all but the first
    # 1600 training tokens in 8 rows of ≤ 199 → 19 minibatches of 8 × 10 tokens per epoch
    assert [(line["step"], line["tokens_seen"]) for line in lines] == [(19, 1520), (38, 3040), (57, 4560)]
    assert lines[-1]["train_ppl"] == pytest.approx(result.train_ppl)
    assert [line["train_ppl_steps"] for line in lines] == [19, 19, 19]  # d2l's per-epoch figure
    assert result.best_val_ppl == min(line["val_ppl"] for line in lines)
    assert (workdir / "runs" / "latest").read_text().strip() == str(run.resolve())
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["val_fraction"] == 0.2
    best = load_checkpoint(run / "best.safetensors")
    assert best.best_val_ppl == result.best_val_ppl
    assert load_checkpoint(run / "last.safetensors").epoch == 3


def test_train_summary_has_the_contract_fields(workdir: Path):
    result = train(
        write_config(workdir, TINY), "train.epochs=1", "train.sample_prefixes=[the]", "train.sample_chars=5"
    )
    summary = result.summary()
    assert {
        "run_dir", "epochs", "start_epoch", "train_ppl", "val_ppl", "best_val_ppl",
        "tokens_per_s", "device", "world_size", "samples",
    } <= set(summary)  # fmt: skip
    assert summary["epochs"] == 1 and summary["start_epoch"] == 0 and summary["world_size"] == 1
    assert summary["device"] == "cpu" and summary["val_ppl"] is None
    assert summary["threads"] == torch.get_num_threads()
    assert len(summary["samples"]["the"]) == len("the") + 5
    assert 1.0 < summary["train_ppl"] < 28.0 and summary["tokens_per_s"] > 0


def test_existing_run_is_not_overwritten_without_asking(workdir: Path):
    config = write_config(workdir, TINY)
    train(config, "train.epochs=1")
    with pytest.raises(DrnnError, match="already holds a run; continue it with --resume"):
        train(config, "train.epochs=1")
    train(config, "train.epochs=1", overwrite=True)


# ---------------------------------------------------------------------------------------------
# Resume


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "last.safetensors").model_state


@pytest.mark.parametrize("sampling", ["sequential", "random"])
def test_resumed_run_ends_bit_identical_to_an_uninterrupted_one(workdir: Path, sampling: str):
    tree = {
        **TINY,
        "model": {**TINY["model"], "dropout": 0.3},
        "data": {**TINY["data"], "sampling": sampling},
    }
    config = write_config(workdir, tree)
    train(config, run_dir=Path("runs/straight"))
    train(config, "train.epochs=1", run_dir=Path("runs/split"))
    resumed = train(config, run_dir=Path("runs/split"), resume=True)
    assert resumed.start_epoch == 1 and resumed.epochs == 3
    straight, split = _weights(workdir / "runs/straight"), _weights(workdir / "runs/split")
    assert all(torch.equal(straight[name], split[name]) for name in straight)
    metrics = (workdir / "runs/split/metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in metrics] == [1, 2, 3]


@pytest.mark.parametrize(
    ("epochs_done", "steps_into_epoch", "global_step", "said"),
    [
        (1, 6, 30, "after step 6 of epoch 2, optimizer step 30"),  # the epoch in progress counts from 1
        (2, 0, 48, "after epoch 2, optimizer step 48"),  # two whole epochs
        (1_000, 1_234, 12_345_678, "after step 1,234 of epoch 1,001, optimizer step 12,345,678"),
        (4, 0, None, "after epoch 4"),  # a checkpoint without a step count (its trainer state unusable)
        (0, 0, 0, "before its first step"),
    ],
)
def test_where_a_run_stands_is_worded_one_way(epochs_done, steps_into_epoch, global_step, said):
    from drnn_cli.report import training_position

    assert training_position(epochs_done, steps_into_epoch, global_step) == said


def test_run_stopped_mid_epoch_resumes_bit_identical(workdir: Path, monkeypatch: pytest.MonkeyPatch):
    """A stop after a step inside epoch 2 writes that step; resuming finishes as if never stopped."""
    config = write_config(workdir, {**TINY, "model": {**TINY["model"], "dropout": 0.2}})
    train(config, run_dir=Path("runs/straight"))

    original = Trainer._stop_requested

    def stop_at_step_30(self: Trainer, *args: object) -> bool:
        if self.global_step == 30:  # epoch 1 has 24 minibatches: this is step 6 of epoch 2
            self.stops.signum = 2
        return original(self, *args)

    monkeypatch.setattr(Trainer, "_stop_requested", stop_at_step_30)
    with pytest.raises(
        DrnnError, match="stopped by SIGINT after step 6 of epoch 2, optimizer step 30;"
    ) as stopped:
        train(config, run_dir=Path("runs/split"))
    assert stopped.value.exit_code == 130
    partial = load_checkpoint(workdir / "runs/split/last.safetensors")
    assert (partial.epoch, partial.step_in_epoch) == (1, 6)
    monkeypatch.setattr(Trainer, "_stop_requested", original)
    notes: list[str] = []
    reporter = SilentReporter()
    reporter.note = notes.append  # type: ignore[method-assign]
    request = TrainRequest(config, ("train.epochs=1",), run_dir=Path("runs/split"), resume=True)
    over = train_run(request, reporter=reporter)
    # 1.25 epochs done (6 of epoch 2's 24 steps), not the last metrics line's 1
    assert (over.start_epoch, over.epochs, over.stop_reason) == (1.25, 1.25, "epochs")
    assert notes[0].startswith("nothing to train: its epochs are done (1.25 trained, train.epochs 1)")
    resumed = train(config, run_dir=Path("runs/split"), resume=True)
    straight, split = _weights(workdir / "runs/straight"), _weights(workdir / "runs/split")
    assert all(torch.equal(straight[name], split[name]) for name in straight)
    # --json says where the session began as metrics.jsonl counts epochs: 6 steps into epoch 2
    steps = [
        json.loads(line)["step"]
        for line in (workdir / "runs/straight/metrics.jsonl").read_text().splitlines()
    ]
    assert (resumed.start_epoch, resumed.start_step) == (round(1 + 6 / (steps[1] - steps[0]), 6), 30)


def test_resume_refuses_a_changed_model_or_corpus(workdir: Path):
    config = write_config(workdir, TINY)
    train(config, "train.epochs=1")
    with pytest.raises(DrnnError, match=r"model.hidden_size \(24 in the checkpoint, 32 now\)"):
        train(config, "model.hidden_size=32", resume=True)
    with pytest.raises(DrnnError, match="data.max_tokens"):
        train(config, "data.max_tokens=3000", resume=True)
    with pytest.raises(DrnnError, match=r"train.optimizer \('adam' in the checkpoint, 'sgd' now\)"):
        train(config, "train.optimizer=sgd", resume=True)
    with pytest.raises(DrnnError, match="data.batch_size"):
        train(config, "data.batch_size=4", resume=True)


def test_resume_says_which_training_settings_it_changes_and_refuses_those_it_cannot_apply(workdir: Path):
    """The rate, clipping, regularisers, averaging and precision may change on a resume (lowering the
    rate of a run that plateaued is common), but not silently; settings a resumed run cannot take up
    (its parameter groups, its initialisation) are refused by name."""
    config = write_config(workdir, TINY)
    train(config, "train.epochs=1")
    notes: list[str] = []
    reporter = SilentReporter()
    reporter.note = notes.append  # type: ignore[method-assign]
    overrides = (
        "train.epochs=2",
        "train.lr=0.002",
        "train.clip=0.5",
        "model.dropout=0.25",
        "train.eval_tokens=50",
    )
    train_run(TrainRequest(config, overrides, resume=True), reporter=reporter)
    assert notes[0] == (
        "--resume with settings changed since the checkpoint: model.dropout 0.0 → 0.25, train.lr 0.01 → 0.002, "
        "train.clip 1.0 → 0.5, train.eval_tokens 0 → 50 (the run trains on with them, and its config.yaml records them once it trains a step); "
        "validation now reads other tokens, so the best checkpoint and patience start over at the run's next validation"
    )
    assert notes[1].startswith("--resume with train.epochs 1 → 2: the run trains to its new length, ")
    notes.clear()
    train_run(TrainRequest(config, ("train.epochs=3", *overrides[1:]), resume=True), reporter=reporter)
    assert not [
        note for note in notes if "changed since the checkpoint" in note
    ]  # the checkpoint has them now
    adamw = ("train.optimizer=adamw", "train.weight_decay=0.1")
    train(config, *adamw, "train.epochs=1", run_dir=workdir / "adamw")
    with pytest.raises(DrnnError, match=r"train.decay_biases \(False in the checkpoint, True now\)"):
        train(config, *adamw, "train.decay_biases=true", run_dir=workdir / "adamw", resume=True)
    # Adam keeps one group whatever decay_biases says: nothing for a resume to refuse
    assert train(config, "train.epochs=3", "train.decay_biases=true", resume=True).epochs == 3
    with pytest.raises(DrnnError, match=r"model.init \('torch' in the checkpoint, 'd2l' now\)"):
        train(config, "model.init=d2l", resume=True)


def test_resume_refuses_a_corpus_file_that_changed(workdir: Path, corpus_path: Path):
    text = workdir / "text.txt"
    text.write_bytes(corpus_path.read_bytes()[:30_000])
    config = write_config(workdir, {**TINY, "data": {**TINY["data"], "path": str(text)}})
    train(config, "train.epochs=1")
    text.write_bytes(corpus_path.read_bytes()[1:30_001])
    with pytest.raises(DrnnError, match="is not the text the checkpoint was trained on"):
        train(config, resume=True)


def test_resume_follows_the_same_corpus_to_another_path(workdir: Path, corpus_path: Path):
    """The text is checked by its SHA-1, not its path: a run moved to another machine (or a corpus
    moved on this one) resumes with data.path pointing at the new place, and ends where a straight run
    ends. Another text at the new path is refused."""
    first, moved = workdir / "a" / "text.txt", workdir / "b" / "text.txt"
    for path in (first, moved):
        path.parent.mkdir()
    first.write_bytes(corpus_path.read_bytes()[:30_000])
    tree = {**TINY, "data": {**TINY["data"], "path": str(first)}}
    config = write_config(workdir, tree)
    straight = train(config, run_dir=workdir / "runs/straight")
    train(config, "train.epochs=1", run_dir=workdir / "runs/split")
    first.rename(moved)
    resumed = train(config, f"data.path={moved}", run_dir=workdir / "runs/split", resume=True)
    assert resumed.train_ppl == straight.train_ppl
    moved.write_bytes(corpus_path.read_bytes()[1:30_001])
    with pytest.raises(DrnnError, match="point data.path at that text, or start a new run"):
        train(config, f"data.path={moved}", "train.epochs=3", run_dir=workdir / "runs/split", resume=True)


def resumed_notes(config: Path, *overrides: str) -> list[str]:
    """The notes a resume of the config's run says."""
    notes: list[str] = []
    reporter = SilentReporter()
    reporter.note = notes.append  # type: ignore[method-assign]
    train_run(TrainRequest(config, overrides, resume=True), reporter=reporter)
    return notes


def same_text_note(path: Path) -> str:
    return (
        f"{path} differs from the text the checkpoint was trained on only in how its line breaks are written "
        "or in a byte order mark, which drnn reads alike"
    )


def test_resume_takes_the_runs_text_whatever_line_breaks_either_file_writes(workdir: Path, corpus_path: Path):
    """A checkpoint records the SHA-1 of its text as drnn reads it beside its file's: a run trained on a
    file whose line breaks are mixed (an editor wrote CR LF into an LF file) resumes from the text's LF
    form, and back, with a note; the same bytes say nothing, and another text is refused. A checkpoint
    without the text's SHA-1 (as an earlier drnn wrote it) takes the four forms of the given file's text
    as before, which the mixed file's SHA-1 is not among."""
    import hashlib

    from drnn_cli.checkpoint import load_checkpoint, save_checkpoint

    lf_text = corpus_path.read_bytes()[:30_000]
    mixed_text = lf_text.replace(b"\n", b"\r\n", 100)  # the first 100 line breaks CR LF, the others LF
    mixed, lf = workdir / "mixed.txt", workdir / "lf.txt"
    mixed.write_bytes(mixed_text)
    lf.write_bytes(lf_text)
    config = write_config(workdir, {**TINY, "data": {**TINY["data"], "path": str(mixed)}})
    train(config, "train.epochs=1")
    last = workdir / "runs" / "tiny" / "last.safetensors"
    checkpoint = load_checkpoint(last)
    assert (checkpoint.corpus_sha1, checkpoint.text_sha1) == (
        hashlib.sha1(mixed_text).hexdigest(),
        hashlib.sha1(lf_text).hexdigest(),
    )
    refused = f"{re.escape(str(lf))} is not the text the checkpoint was trained on"
    save_checkpoint(last, dataclasses.replace(checkpoint, text_sha1=None))
    with pytest.raises(DrnnError, match=refused):
        train(config, f"data.path={lf}", "train.epochs=2", resume=True)
    save_checkpoint(last, checkpoint)
    assert same_text_note(lf) in resumed_notes(config, f"data.path={lf}", "train.epochs=2")
    assert load_checkpoint(last).corpus_sha1 == hashlib.sha1(lf_text).hexdigest()  # the file it read
    assert same_text_note(mixed) in resumed_notes(config, f"data.path={mixed}", "train.epochs=3")
    assert not [note for note in resumed_notes(config, "train.epochs=4") if "line breaks" in note]
    lf.write_bytes(lf_text.replace(b"Time", b"Tide", 1))
    with pytest.raises(DrnnError, match=refused):
        train(config, f"data.path={lf}", "train.epochs=5", resume=True)


def test_a_checkpoint_without_its_texts_sha1_resumes_only_from_the_same_path(
    workdir: Path, corpus_path: Path
):
    """Checkpoints from before corpus SHA-1s were kept: the path is all there is to go by."""
    from drnn_cli.checkpoint import save_checkpoint

    text, copy = workdir / "text.txt", workdir / "copy.txt"
    text.write_bytes(corpus_path.read_bytes()[:30_000])
    copy.write_bytes(text.read_bytes())
    config = write_config(workdir, {**TINY, "data": {**TINY["data"], "path": str(text)}})
    train(config, "train.epochs=1")
    last = workdir / "runs" / "tiny" / "last.safetensors"
    old = load_checkpoint(last)
    old.corpus_sha1 = None
    save_checkpoint(last, old)
    with pytest.raises(DrnnError, match=r"the config changed data.path \("):
        train(config, f"data.path={copy}", "train.epochs=2", resume=True)
    assert train(config, "train.epochs=2", resume=True).start_epoch == 1


def test_after_a_hard_kill_patience_counts_against_the_resumed_checkpoints_own_best(workdir: Path):
    """Killed after `best` (epoch 6) but before `last` (epoch 3) was written again: the resumed run
    replays epochs 4-6 and must count their improvements as improvements, not as evaluations that
    failed to beat the newer `best` (which stopped such runs early on patience). It ends as a run
    never killed ends, and `best` is never replaced by a worse model."""
    import shutil

    settings = ("data.val_fraction=0.2", "train.patience=2", "train.lr=0.003", "train.checkpoint_every=1")
    config = write_config(workdir, TINY)
    straight = train(config, *settings, "train.epochs=10", run_dir=workdir / "runs/straight")
    split = workdir / "runs/split"
    train(config, *settings, "train.epochs=3", run_dir=split)
    shutil.copyfile(split / "last.safetensors", workdir / "last-3.safetensors")
    train(config, *settings, "train.epochs=6", run_dir=split, resume=True)
    best_6 = load_checkpoint(split / "best.safetensors")
    shutil.copyfile(workdir / "last-3.safetensors", split / "last.safetensors")  # as a kill -9 leaves it
    resumed = train(config, *settings, "train.epochs=10", run_dir=split, resume=True)
    assert best_6.epoch == 6  # validation improved up to epoch 6: the replayed epochs improve too
    assert (resumed.epochs, resumed.stop_reason) == (straight.epochs, straight.stop_reason)
    assert resumed.best_val_ppl == straight.best_val_ppl and resumed.train_ppl == straight.train_ppl
    assert load_checkpoint(split / "best.safetensors").best_val_ppl <= best_6.best_val_ppl


def test_resume_without_a_checkpoint_says_so(workdir: Path):
    with pytest.raises(DrnnError, match="nothing to resume"):
        train(write_config(workdir, TINY), resume=True)


def test_a_run_killed_before_its_first_last_checkpoint_points_at_its_best(workdir: Path):
    """Only `best` is there (kill -9 before `last` was written): the way on is --overwrite, or a new run
    from those weights, not the circle of "drop --resume" / "continue it with --resume"."""
    config = write_config(workdir, TINY)
    train(config, "data.val_fraction=0.2", "train.epochs=1")
    run = Path("runs") / "tiny"  # the default run directory, as the user's --run would name it
    (workdir / run / "last.safetensors").unlink()
    with pytest.raises(DrnnError) as error:
        train(config, "data.val_fraction=0.2", resume=True)
    assert str(error.value) == (
        f"nothing to resume: {run / 'last.safetensors'} does not exist (the run stopped before its first one); "
        f"start over with --overwrite, or from its best weights with --init-from {run} --run NEW_DIR"
    )


# ---------------------------------------------------------------------------------------------
# Stopping


class PoisonAfterFirstEpoch(SilentReporter):
    """Makes every later loss NaN, as a diverging run would."""

    def __init__(self) -> None:
        self.trainer: Trainer | None = None

    def epoch_end(self, record: EpochRecord) -> None:
        if record.epoch == 1 and self.trainer is not None:
            with torch.no_grad():
                self.trainer.model.decoder.bias.fill_(float("nan"))


def test_nan_loss_stops_training_naming_epoch_and_step_and_keeps_the_last_good_checkpoint(workdir: Path):
    from drnn_cli.config import load_config
    from drnn_cli.data import load_dataset

    config = load_config(write_config(workdir, TINY), ["train.checkpoint_every=1"])
    dataset = load_dataset(config.data)
    reporter = PoisonAfterFirstEpoch()
    trainer = Trainer(StartPoint(config), dataset, workdir / "run", torch.device("cpu"), reporter)
    reporter.trainer = trainer
    with pytest.raises(TrainingDiverged, match="NaN or infinite at step 1 of epoch 2"):
        trainer.fit()
    kept = load_checkpoint(workdir / "run" / "last.safetensors")
    assert kept.epoch == 1
    assert all(torch.isfinite(t).all() for t in kept.model_state.values())


def test_patience_stops_when_validation_stops_improving(workdir: Path):
    tree = {**TINY, "data": {**TINY["data"], "val_fraction": 0.3}}
    result = train(write_config(workdir, tree), "train.epochs=40", "train.lr=0.05", "train.patience=2")
    assert result.stopped_early and result.epochs < 40
    lines = [json.loads(line) for line in (workdir / "runs/tiny/metrics.jsonl").read_text().splitlines()]
    best_epoch = min(lines, key=lambda line: line["val_ppl"])["epoch"]
    assert lines[-1]["epoch"] == best_epoch + 2
    assert load_checkpoint(workdir / "runs/tiny/best.safetensors").epoch == best_epoch


@pytest.mark.slow
def test_cpu_adam_lstm_2x128_memorises_10000_characters(workdir: Path):
    """Issue: a 2×128 LSTM with Adam at lr 0.005 for 80 epochs on 10,000 tokens reaches ppl <= 1.3."""
    repo = Path(__file__).resolve().parents[1]
    result = train(repo / "configs" / "quick.yaml", "train.sample_every=0", "train.device=cpu")
    assert result.train_ppl <= 1.3
    assert result.samples["time traveller"].startswith("time traveller ")


def test_half_precision_the_device_cannot_run_is_one_clear_error_or_works(workdir: Path):
    config = write_config(workdir, TINY)
    with pytest.raises(DrnnError, match="fp16 needs a GPU"):
        train(config, "train.precision=fp16")
    # oneDNN runs a bf16 LSTM only on some CPUs: asked of PyTorch directly, which outcome is this one's
    lstm = torch.nn.LSTM(4, 4, num_layers=2)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lstm(torch.randn(3, 2, 4))[0].float().sum().backward()
        runs_here = True
    except RuntimeError:
        runs_here = False
    if runs_here:
        assert math.isfinite(train(config, "train.precision=bf16", "train.epochs=1").train_ppl)
    else:
        with pytest.raises(DrnnError, match=r"train.precision bf16 does not run on cpu.*fp32"):
            train(config, "train.precision=bf16", "train.epochs=1")


def test_the_half_precision_probe_leaves_trainings_random_stream_alone():
    """It runs the model once in training mode: its dropout must not draw what training would draw."""
    from drnn_cli.config import ModelConfig
    from drnn_cli.model_probes import check_precision_works
    from drnn_cli.models import build_model

    model = build_model(28, ModelConfig(cell="gru", hidden_size=8, num_layers=2, dropout=0.5, impl="scratch"))
    before = torch.get_rng_state()
    check_precision_works(model.train(), torch.device("cpu"), "bf16")
    assert torch.equal(torch.get_rng_state(), before)


def test_patience_without_a_validation_split_says_it_cannot_stop_the_run(workdir: Path):
    class Notes(SilentReporter):
        def __init__(self) -> None:
            self.notes: list[str] = []

        def note(self, message: str) -> None:
            self.notes.append(message)

    notes = Notes()
    request = TrainRequest(
        config_path=write_config(workdir, TINY), overrides=("train.patience=1", "train.epochs=2")
    )
    result = train_run(request, reporter=notes)
    assert result.epochs == 2 and result.stop_reason == "epochs"
    assert notes.notes == [
        "train.patience 1 counts evaluations of the validation split, and this run has none: it trains all "
        "its epochs (set data.val_fraction > 0 to stop early)"
    ]


def test_samples_of_whitespace_alone_are_said_to_be_once_a_run(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, cli
):
    """An undertrained model's samples were "time traveller" and 50 spaces, read as nothing written (a
    learner took sampling for broken); predict said so, training did not: now once a run, with the first
    samples shown while training, or after the final ones (printed after the summary)."""
    from drnn_cli.config import TrainConfig
    from drnn_cli.run_notes import blank_samples_note

    five, why = (
        TrainConfig(sample_chars=5),
        (
            "and nothing else: greedy decoding took whitespace for the likeliest next character every time, as an "
            "undertrained model does (train it longer)"
        ),
    )
    said = blank_samples_note({"time": "time     ", "the": "the e    "}, five, "char")
    assert said == f"the sample of 'time' continues with 5 spaces {why}"
    said = blank_samples_note({"a": "a \n   ", "b": "b     "}, five, "char")
    assert said == f"the samples of 'a', 'b' continue with whitespace alone {why}"  # 5 spaces, or not
    assert blank_samples_note({"the": "the e    "}, five, "char") is None
    assert blank_samples_note({"time": "time ", "go": "go "}, TrainConfig(sample_chars=0), "char") is None

    class Notes(SilentReporter):
        def __init__(self) -> None:
            self.notes: list[str] = []

        def note(self, message: str) -> None:
            self.notes.append(message)

    monkeypatch.setattr(Trainer, "_samples", lambda self: {"time": "time" + " " * 5})
    notes = Notes()
    config = write_config(workdir, TINY)  # 3 epochs sampled every epoch: noted once, not again at the end
    result = train_run(
        TrainRequest(config, overrides=("train.sample_every=1", "train.sample_chars=5")), reporter=notes
    )
    assert [note for note in notes.notes if "continues with" in note] == [
        f"the sample of 'time' continues with 5 spaces {why}"
    ]
    assert result.samples_notes == ()
    # samples at the end only (train.sample_every 0): the note comes after them, below the summary
    code, out, err = cli(
        "train", "--config", str(config), "--run", "runs/end", "--set", "train.sample_chars=5"
    )
    assert code == 0, err
    assert out.splitlines()[-2:] == ["time     ", f"note: the sample of 'time' continues with 5 spaces {why}"]


def test_closing_samples_of_weights_predict_does_not_read_say_whose_they_are(
    workdir: Path, cli, monkeypatch: pytest.MonkeyPatch
):
    """Validations of 8, 5, 6 and 7.5 over four epochs: best.safetensors holds epoch 2's weights, which
    predict and eval read, while the closing summary and samples are epoch 4's (learner41: a closing
    sample and predict's a second later read nothing alike). The summary names the best's epoch, --json
    its epochs, and a note under the samples says whose they are, and that validation rose 50% since,
    where no train.patience ends a run for it."""
    scripted = iter([8.0, 5.0, 6.0, 7.5])
    monkeypatch.setattr(Trainer, "_validate", lambda self, abandonable=False: next(scripted))
    tree = {**TINY, "data": {**TINY["data"], "val_fraction": 0.3}}
    config = str(write_config(workdir, tree))
    code, out, err = cli("train", "--config", config, "--set", "train.epochs=4", "--json")
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert (result["best_val_ppl"], result["best_epoch"], result["val_ppl"]) == (5.0, 2, 7.5)
    scripted = iter([8.0, 5.0, 6.0, 7.5])
    code, out, err = cli("train", "--config", config, "--set", "train.epochs=4", "--run", "runs/shown")
    assert code == 0, err
    assert re.search(r"│ validation perplexity \(last / best\) +│ 7\.500 / 5\.000 \(epoch 2\) +│", out), out
    assert out.splitlines()[-1] == (
        "note: the samples above are the last weights' (epoch 4, validation perplexity 7.5000); drnn predict "
        "and drnn eval read best.safetensors, the weights of epoch 2 (5.0000): validation has risen 50% since, "
        "as it does once a model memorises its training text; train.patience N ends a run after N validations "
        "without a better one"
    )
    # under patience (here not yet spent) the rise is not advised on; best as last: nothing said
    scripted = iter([8.0, 5.0, 6.0, 7.5])
    code, out, _ = cli("train", "--config", config, "--set", "train.epochs=4", "--set", "train.patience=3",
                       "--run", "runs/patient")  # fmt: skip
    assert out.splitlines()[-1] == (
        "note: the samples above are the last weights' (epoch 4, validation perplexity 7.5000); drnn predict "
        "and drnn eval read best.safetensors, the weights of epoch 2 (5.0000)"
    )
    scripted = iter([8.0, 5.0, 4.0, 3.0])
    code, out, _ = cli("train", "--config", config, "--set", "train.epochs=4", "--run", "runs/improving")
    assert code == 0 and "last weights'" not in out and "(epoch 4)" not in out, out


def test_a_nan_validation_is_never_the_best_and_no_improvement(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
):
    """fp16 logits can overflow while validating: that NaN must not become the best (every later
    comparison with it is false, so nothing would replace it and patience would run out)."""
    scripted = iter([math.nan, 50.0, 20.0, 10.0])
    monkeypatch.setattr(Trainer, "_validate", lambda self, abandonable=False: next(scripted))
    tree = {**TINY, "data": {**TINY["data"], "val_fraction": 0.3}}
    result = train(write_config(workdir, tree), "train.epochs=4", "train.patience=2")
    assert (result.epochs, result.stopped_early, result.best_val_ppl) == (4, False, 10.0)
    assert load_checkpoint(workdir / "runs/tiny/best.safetensors").epoch == 4


def test_a_resume_that_changes_eval_tokens_starts_the_best_and_patience_over(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
):
    """The best so far was measured on other validation tokens (here 20 easy ones, perplexity 2; then
    all of them, 5): compared with the new numbers it kept a stale best.safetensors, reported a best
    perplexity `drnn eval` contradicted, and spent patience."""

    class Notes(SilentReporter):
        def __init__(self) -> None:
            self.notes: list[str] = []

        def note(self, message: str) -> None:
            self.notes.append(message)

    scripted = iter([3.0, 2.0, 5.0, 6.0])
    monkeypatch.setattr(Trainer, "_validate", lambda self, abandonable=False: next(scripted))
    tree = {**TINY, "data": {**TINY["data"], "val_fraction": 0.3}}
    config = write_config(workdir, tree)
    assert train(config, "train.epochs=2", "train.eval_tokens=20").best_val_ppl == 2.0
    notes = Notes()
    overrides = ("train.epochs=4", "train.eval_tokens=0", "train.patience=2")
    resumed = train_run(TrainRequest(config_path=config, overrides=overrides, resume=True), reporter=notes)
    assert (resumed.best_val_ppl, resumed.epochs, resumed.stopped_early) == (5.0, 4, False)
    assert load_checkpoint(workdir / "runs/tiny/best.safetensors").epoch == 3
    assert any("the best checkpoint and patience start over" in note for note in notes.notes)
    # a resume that changes it and trains nothing reports the last figure with what that figure read, not
    # what the new setting would read (rev33): all 599 predictions (30% of 2,000 tokens, but the first), not 50
    idle = train_run(TrainRequest(config, ("train.epochs=2", "train.eval_tokens=50"), resume=True))
    assert (idle.val_ppl, idle.val_tokens, idle.val_split_tokens) == (6.0, 599, 599)
