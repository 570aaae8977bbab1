"""docs/errors.md (README "What happens when"), row by row, through the real CLI: one line on stderr, a non-zero exit, no traceback,
nothing half-written; interrupted training loses nothing; checkpoints cannot run code."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import pickle
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from conftest import (
    assert_one_line_error,
    assert_run_locked_by_this_process,
    config_file,
    pythonpath_with_repo,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drnn_cli.checkpoint import (
    in_stored_order,
    load_checkpoint,
    read_checkpoint_info,
    safetensors_header,
    save_checkpoint,
    write_safetensors,
)
from drnn_cli.config import build_config, load_config
from drnn_cli.errors import ConfigError, DrnnError, TrainingInterrupted
from drnn_cli.rundir import RunLock

TINY = {
    "data": {"max_tokens": 2000, "batch_size": 8, "num_steps": 10},
    "model": {"cell": "gru", "hidden_size": 16, "num_layers": 1},
    "train": {"epochs": 2, "optimizer": "adam", "lr": 0.01, "sample_every": 0, "device": "cpu"},
}


# ---------------------------------------------------------------------------------------------
# Bad configs


@pytest.mark.parametrize(
    ("content", "needles"),
    [
        ("data: [1, 2\n", ("not valid YAML", "line")),
        ("data:\n  bach_size: 3\n", ("unknown key 'data.bach_size'", "batch_size")),
        ("model:\n  hidden_size: lots\n", ("model.hidden_size", "integer")),
        ("train:\n  lr: -1\n", ("train.lr", "greater than 0")),
        ("model:\n  bidirectional: true\n", ("model.bidirectional", "predict")),
    ],
)
def test_bad_config_gets_the_key_and_what_is_allowed_and_writes_nothing(
    workdir: Path, cli, content: str, needles: tuple[str, ...]
):
    code, _, err = cli("train", "--config", str(config_file(workdir, content)))
    assert_one_line_error(code, err, *needles)
    assert code == 2
    assert not (workdir / "runs").exists()


def test_bad_set_is_refused_like_the_file(workdir: Path, cli):
    config = config_file(workdir, TINY)
    code, _, err = cli("train", "--config", str(config), "--set", "model.num_layers=0")
    assert_one_line_error(code, err, "model.num_layers", "greater than or equal to 1")


def test_unknown_option_is_one_line(cli):
    code, _, err = cli("train", "--confg", "x.yaml")
    assert_one_line_error(code, err, "--confg", "drnn train --help")
    # refused by the parser before the command's context exists: the help named is still the command's
    code, _, err = cli("predict", "time", "--run")
    assert err == "drnn: error: Option '--run' requires an argument. (see drnn predict --help)\n"
    code, _, err = cli("--bogus")
    assert_one_line_error(code, err, "--bogus", "(see drnn --help)")
    code, _, err = cli("data", "--set", "train.epochs", "5")  # a space for the '='
    assert err == (
        "drnn: error: Got unexpected extra argument(s) (5): --set takes KEY=VALUE as one argument, e.g. --set "
        "train.epochs=5 (see drnn data --help)\n"
    )
    for argv, meant in (
        (("--set", "data.max_tokens", "-1"), "data.max_tokens=-1"),  # "No such option: -1"
        (("--set=train.epochs", "5"), "train.epochs=5"),
        (("-s", "train.lr=1", "-s", "train.epochs", "5"), "train.epochs=5"),  # the one split in two
    ):
        assert f": --set takes KEY=VALUE as one argument, e.g. --set {meant} (see" in cli("data", *argv)[2]
    # which values --config takes, where "missing option" would leave one guessing
    code, _, err = cli("train")
    assert code == 2 and err == (
        "drnn: error: Missing option '--config' / '-c': a preset (drnn presets lists them: quick, lstm2, ...) or "
        "a YAML file (see drnn train --help)\n"
    )


def test_corpus_shorter_than_one_minibatch_names_the_sizes(workdir: Path, cli):
    config = config_file(workdir, {**TINY, "data": {"max_tokens": 50, "batch_size": 8, "num_steps": 10}})
    code, _, err = cli("train", "--config", str(config))
    assert_one_line_error(code, err, "50 tokens", "needs 81", "lower data.batch_size or data.num_steps")
    assert not (workdir / "runs").exists()  # a first run that failed before writing leaves no runs/ behind
    (workdir / "runs" / "other").mkdir(parents=True)
    code, _, err = cli("train", "--config", str(config))
    assert_one_line_error(code, err, "50 tokens", "needs 81", "lower data.batch_size or data.num_steps")
    assert sorted(path.name for path in (workdir / "runs").iterdir()) == ["other"]  # what was there stays


def test_an_overwrite_run_plot_is_titled_with_the_run_name_not_its_staging_folder(
    workdir: Path, cli, monkeypatch: pytest.MonkeyPatch
):
    """--overwrite trains in runs/.tiny.overwrite, then swaps it in: its perplexity.png was titled
    ".tiny.overwrite" (learner39)."""
    from drnn_cli.run_files import run_name, staging_dir

    titles: list[str | None] = []

    def plotted(records: object, title: str | None = None, *args: object) -> bytes:
        titles.append(title)
        return b"a plot"

    monkeypatch.setattr("drnn_cli.report.render_perplexity_plot", plotted)
    config = config_file(workdir, {**TINY, "train": {**TINY["train"], "epochs": 1}})
    assert cli("train", "--config", str(config))[0] == 0
    assert cli("train", "--config", str(config), "--overwrite")[0] == 0
    assert titles and set(titles) == {"tiny"}
    assert (
        run_name(staging_dir(Path("runs/lstm2"))) == "lstm2"
        and run_name(Path("runs/.overwrite")) == ".overwrite"
    )
    assert run_name(Path("runs/.x.overwrite.y")) == ".x.overwrite.y"


def test_a_failed_overwrite_keeps_the_previous_run(workdir: Path, cli):
    config = config_file(workdir, {**TINY, "train": {**TINY["train"], "epochs": 1}})
    assert cli("train", "--config", str(config))[0] == 0
    code, _, err = cli("train", "--config", str(config), "--overwrite", "--set", "data.batch_size=1000")
    assert_one_line_error(code, err, "needs 10,001")
    assert load_checkpoint(workdir / "runs" / "tiny" / "last.safetensors").epoch == 1


def test_overwrite_refuses_a_run_directory_holding_files_drnn_did_not_write(workdir: Path, cli):
    """The replacement deletes the old directory whole: a user's notes, a backup checkpoint, an
    analysis folder or the very text the new run trains on would go with it."""
    config = config_file(workdir, {**TINY, "train": {**TINY["train"], "epochs": 1}})
    assert cli("train", "--config", str(config))[0] == 0
    run = workdir / "runs" / "tiny"
    (run / "notes.txt").write_text("lr 0.5 was better\n")
    (run / "analysis").mkdir()
    (run / "epoch1-backup.safetensors").write_bytes((run / "last.safetensors").read_bytes())
    before = sorted(path.name for path in run.iterdir())
    code, _, err = cli("train", "--config", str(config), "--overwrite", "--set", "train.seed=7")
    assert_one_line_error(
        code,
        err,
        "--overwrite would delete files drnn did not write in runs/tiny (analysis, epoch1-backup.safetensors, "
        "notes.txt); move them out of it, or train into another directory with --run DIR",
    )
    assert sorted(path.name for path in run.iterdir()) == before
    assert load_checkpoint(run / "last.safetensors").config.train.seed == 0  # the old run, untouched
    for name in ("notes.txt", "analysis", "epoch1-backup.safetensors"):
        shutil.move(run / name, workdir / name)
    code, _, err = cli("train", "--config", str(config), "--overwrite", "--set", "train.seed=7")
    assert code == 0, err  # only drnn's own files (and a TensorBoard folder, a plot) are replaced
    assert load_checkpoint(run / "last.safetensors").config.train.seed == 7


def test_overwrite_through_a_symlinked_run_replaces_the_run_it_points_at(workdir: Path, cli):
    """``runs/big -> ../disk/big``: the new run is built and swapped in on the link's disk; the link,
    and ``runs/latest``, then lead to the new run; nothing is left over."""
    config = config_file(workdir, {**TINY, "train": {**TINY["train"], "epochs": 1}})
    (workdir / "disk" / "big").mkdir(parents=True)
    (workdir / "runs").mkdir()
    (workdir / "runs" / "big").symlink_to(Path("..") / "disk" / "big")
    assert cli("train", "--config", str(config), "--run", "runs/big")[0] == 0
    code, _, err = cli(
        "train", "--config", str(config), "--run", "runs/big", "--overwrite", "--set", "train.seed=7"
    )
    assert code == 0, err
    assert (workdir / "runs" / "big").is_symlink()
    assert load_checkpoint(workdir / "disk" / "big" / "last.safetensors").config.train.seed == 7
    assert Path((workdir / "runs" / "latest").read_text().strip()) == (workdir / "disk" / "big").resolve()
    assert sorted(p.name for p in (workdir / "runs").iterdir()) == ["big", "latest"]
    assert sorted(p.name for p in (workdir / "disk").iterdir()) == ["big"]


def test_a_replacement_stopped_after_its_first_checkpoint_says_it_replaced_the_old_run(workdir: Path):
    """``--overwrite`` swaps the new run in once it has a checkpoint, also when it then stops (a signal,
    a NaN): the message says so, as the old run is gone."""
    from drnn_cli.report import SilentReporter
    from drnn_cli.train_session import TrainRequest, train_run

    class StopAfterFirstEpoch(SilentReporter):
        def epoch_end(self, record: object) -> None:
            os.kill(os.getpid(), signal.SIGINT)  # noted by the trainer, which stops at the next step

    config = config_file(workdir, {**TINY, "train": {**TINY["train"], "epochs": 1}})
    train_run(TrainRequest(config))
    request = TrainRequest(
        config, ("train.epochs=3", "train.seed=7", "train.checkpoint_every=1"), overwrite=True
    )
    with pytest.raises(DrnnError) as stopped:
        train_run(request, reporter=StopAfterFirstEpoch())
    assert str(stopped.value) == (
        "training stopped by SIGINT after epoch 1, optimizer step 24; its checkpoint is in runs/tiny/last.safetensors; "
        "continue with the same command with --resume in place of --overwrite; "
        "the new run has replaced the previous one in runs/tiny"
    )  # "the same command plus --resume" would be refused: --resume --overwrite
    assert isinstance(stopped.value, TrainingInterrupted)  # for --json: the run's place, not its staging's
    assert (stopped.value.stopped.run_dir, stopped.value.stopped.checkpoint) == (
        Path("runs/tiny"),
        Path("runs/tiny/last.safetensors"),
    )
    assert load_checkpoint(workdir / "runs" / "tiny" / "last.safetensors").config.train.seed == 7
    # --overwrite where there was no run to replace: the same advice
    fresh = TrainRequest(config, ("train.epochs=3",), run_dir=Path("runs/new"), overwrite=True)
    with pytest.raises(
        DrnnError, match="continue with the same command with --resume in place of --overwrite$"
    ):
        train_run(fresh, reporter=StopAfterFirstEpoch())


def test_init_from_the_run_that_overwrite_replaces_is_refused(workdir: Path, cli):
    config = config_file(workdir, {**TINY, "train": {**TINY["train"], "epochs": 1}})
    assert cli("train", "--config", str(config))[0] == 0
    code, _, err = cli("train", "--config", str(config), "--overwrite", "--init-from", "runs/tiny")
    assert_one_line_error(code, err, "--init-from runs/tiny is a checkpoint of the run --overwrite replaces",
                          "--run NEW_DIR")  # fmt: skip
    assert load_checkpoint(workdir / "runs" / "tiny" / "last.safetensors").epoch == 1
    assert not (workdir / "runs" / "tiny" / "init_from.txt").exists()


@pytest.mark.parametrize("overwrite", [(), ("--overwrite",)])
def test_init_from_the_run_this_training_creates_is_named_as_such(workdir: Path, cli, overwrite: tuple):
    """It said the directory "holds no checkpoint": the training had just created it for its lock."""
    config = config_file(workdir, {**TINY, "train": {**TINY["train"], "epochs": 1}})
    code, _, err = cli(
        "train", "--config", str(config), "--run", "runs/new", "--init-from", "runs/new", *overwrite
    )
    assert_one_line_error(
        code, err, "--init-from runs/new is the run directory this training creates (--run runs/new)",
        "name another run or checkpoint",
    )  # fmt: skip
    assert not (workdir / "runs").exists()  # a run that failed before writing leaves nothing


@pytest.mark.parametrize(
    ("run", "needles"),
    [
        ("dangling", ("dangling is a symlink to", "missing", "which does not exist")),
        ("runs/a\nb", ("holds a control character", "--run runs/NAME")),
    ],
)
def test_a_dangling_symlink_or_a_control_character_in_run_is_refused(workdir: Path, cli, run: str, needles):
    (workdir / "dangling").symlink_to(workdir / "missing")
    config = config_file(workdir, {**TINY, "train": {**TINY["train"], "epochs": 1}})
    code, _, err = cli("train", "--config", str(config), "--run", run)
    assert_one_line_error(code, err, *needles)
    assert not (workdir / "runs" / "latest").exists()


def test_runs_latest_is_no_run_name_and_a_checkpoint_file_is_no_run(workdir: Path, cli):
    config = config_file(workdir, {**TINY, "train": {**TINY["train"], "epochs": 1}})
    code, _, err = cli("train", "--config", str(config), "--run", "runs/latest")
    assert_one_line_error(code, err, "--run runs/latest is the file where drnn records the latest run")
    assert not (workdir / "runs" / "latest").exists()
    assert cli("train", "--config", str(config))[0] == 0
    code, _, err = cli("predict", "time", "--run", "runs/tiny/last.safetensors")
    assert_one_line_error(
        code, err, "runs/tiny/last.safetensors is a file; a checkpoint goes to --checkpoint"
    )
    for command in (("predict", "time"), ("eval",), ("inspect", "time")):  # and the other way round
        code, _, err = cli(*command, "--checkpoint", "runs/tiny")
        assert_one_line_error(
            code,
            err,
            "--checkpoint takes a checkpoint file, and runs/tiny is a directory; a run directory goes to --run",
        )
    code, _, err = cli("predict", "time", "--run", "runs/latest")
    assert_one_line_error(code, err, "--run runs/latest is the latest-run marker, not a run; drop --run")
    code, _, err = cli("eval", "--checkpoint", "runs/latest")  # not "a corrupt header"
    assert_one_line_error(
        code, err, "--checkpoint runs/latest is the latest-run marker, not a checkpoint; drop"
    )
    code, _, err = cli("train", "--config", str(config), "--run", "runs/./latest")  # the marker exists now
    assert_one_line_error(code, err, "--run runs/latest is the file where drnn records the latest run")
    named_latest = workdir / "latest.yaml"  # no --run: the run directory is named after the config
    named_latest.write_bytes(config.read_bytes())
    code, _, err = cli("train", "--config", str(named_latest))
    assert_one_line_error(
        code,
        err,
        "the run directory runs/latest (named after the config latest.yaml) is the file where drnn records "
        "the latest run; pick another name with --run DIR",
    )


def test_the_rare_tokens_note_names_min_freqs_price_where_the_min_freq_note_would_follow():
    """learner42: for a word text the note proposed data.min_freq 3, and the run with it was told to lower
    data.min_freq (12% of the text <unk>). Where the share it cuts is one the min_freq note flags (5%), the
    proposal says its price; below that (the CJK tail's 4%, next test) it does not."""
    from drnn_cli.run_notes import UNKNOWN_SHARE_NOTED, rare_tokens_note
    from drnn_cli.vocab import Vocab

    counts = {f"w{i}": 100 for i in range(100)} | {f"r{i}": 1 for i in range(1000)}  # 1,000 of 11,000: 9.1%
    assert UNKNOWN_SHARE_NOTED <= 1000 / 11000
    note = rare_tokens_note(Vocab.from_counts(counts), 0, "word")
    assert note == (
        "1,000 of the vocabulary's 1,101 words occur fewer than 3 times in the text: each is an output the model "
        "sees too seldom to learn; data.min_freq 3 maps them to <unk> (9.09% of the text), leaving a vocabulary of "
        "101, and an output layer 10.9 times smaller to compute at every step; the price: the model then "
        "predicts <unk> for that share, and its perplexities count those easier guesses, comparable only with "
        "runs of the same vocabulary"
    )


def test_a_min_freq_that_turns_much_of_the_text_into_unk_is_noted(workdir: Path, cli):
    """'aaaabbc ' × 100: with min_freq 150, c (100) and the space (100) become <unk>, 2 tokens of 8."""
    text = workdir / "small.txt"
    text.write_text("aaaabbc " * 100)
    tree = {**TINY, "data": {"path": str(text), "preprocess": "none", "batch_size": 2, "num_steps": 5}}
    config = str(config_file(workdir, tree))
    code, out, err = cli("train", "--config", config, "--set", "train.epochs=1", "--set", "data.min_freq=150")
    assert code == 0, err
    assert (
        "note: data.min_freq 150 maps 25% of the training tokens to <unk>: the model learns to predict "
        "<unk>, and its perplexities count those easier guesses, so compare them only with runs of the same "
        "vocabulary; a lower data.min_freq keeps more of the text's tokens"
    ) in out.splitlines()
    code, out, err = cli("train", "--config", config, "--set", "data.min_freq=100", "--overwrite")
    assert code == 0 and "<unk>" not in out, err  # a min_freq that keeps every token: nothing to note


def test_a_literal_unk_the_text_writes_itself_is_not_taken_for_what_min_freq_cut(workdir: Path, cli):
    """A text that writes <unk> itself (as Penn Treebank does) with min_freq 1, which cuts nothing:
    the note said min_freq mapped 20% of it to <unk> and advised lowering it."""
    text = workdir / "ptb.txt"
    text.write_text("the <unk> sat on a mat\n" * 100)
    tree = {**TINY, "data": {"path": str(text), "preprocess": "none", "token": "word", "batch_size": 2,
                             "num_steps": 5, "min_freq": 1}}  # fmt: skip
    code, out, err = cli("train", "--config", str(config_file(workdir, tree)), "--set", "train.epochs=1")
    assert code == 0 and "data.min_freq" not in out, err
    rare = workdir / "ptb2.txt"  # min_freq 2 cuts 'once' (1 of 601 tokens), not the 100 literal <unk>s
    rare.write_text("the <unk> sat on a mat\n" * 100 + "once\n")
    tree["data"] = {**tree["data"], "path": str(rare), "min_freq": 2}
    code, out, err = cli(
        "train", "--config", str(config_file(workdir, tree)), "--set", "train.epochs=1", "--overwrite"
    )
    assert code == 0 and "data.min_freq" not in out, err


def test_the_min_freq_note_counts_the_words_cut_where_they_lie_not_the_text_s_own_unk(workdir: Path, cli):
    """min_freq 20 cuts 'zebra yak gnu' (36 words). Where the validation split holds them, the training
    split lacks nothing, though it holds 58 <unk>s of the text's own: bounded by the words cut in the whole
    text, its share was said to be min(58, 36) of 465 (7.7%). Where the training split holds them, 7.74% is."""
    ptb, cut = "the cat <unk> sat on the mat .\n" * 60, "zebra yak gnu\n" * 12  # 480 + 36 words
    for name, text, share in (("cut_last", ptb + cut, None), ("cut_first", cut + ptb, "7.74%")):
        path = workdir / f"{name}.txt"
        path.write_text(text)
        code, out, err = cli(
            "data", "--set", f"data.path={path}", "--set", "data.preprocess=none", "--set", "data.token=word",
            "--set", "data.min_freq=20", "--set", "data.val_fraction=0.1", "--json",
        )  # fmt: skip
        said = json.loads(out.splitlines()[-1])
        assert code == 0 and said["unknown_tokens"] == 36, err
        assert [note.split(" of the training")[0] for note in said["notes"] if "data.min_freq" in note] == (
            [f"data.min_freq 20 maps {share}"] if share else []
        )


def test_a_one_hot_input_over_a_large_vocabulary_is_noted(workdir: Path, cli):
    """A word text of 2,000 distinct words read one-hot: the first GRU layer holds 3 × hidden ×
    2,001 input weights, and a minibatch 2 × 5 × 2,001 floats; the note names the embedding."""
    text = workdir / "words.txt"
    text.write_text(" ".join(f"w{i}" for i in range(2000)) + "\n")
    tree = {
        **TINY,
        "data": {"path": str(text), "preprocess": "none", "token": "word", "batch_size": 2, "num_steps": 5},
    }
    config = str(config_file(workdir, tree))
    code, out, err = cli("train", "--config", config, "--set", "train.epochs=1")
    assert code == 0, err
    hidden = TINY["model"]["hidden_size"]
    notes = [line for line in out.splitlines() if "one-hot" in line]
    assert notes == [
        f"note: model.embedding_dim 0 feeds the first layer a one-hot vector of 2,001 tokens: {3 * hidden * 2001:,} "
        "input weights and 0.1 MiB of one-hot input a minibatch; a learned embedding (e.g. model.embedding_dim "
        f"{hidden}) is the usual input for a vocabulary this large"
    ]
    code, out, err = cli("train", "--config", config, "--set", "train.epochs=1", "--set", "model.embedding_dim=8",
                         "--overwrite")  # fmt: skip
    assert code == 0 and "one-hot" not in out, err


def test_a_vocabulary_of_thousands_of_rare_tokens_names_the_min_freq_that_cuts_them(workdir: Path, cli):
    """A char text whose tail is 1,500 CJK characters, once each (prac34's 4,629-character vocabulary):
    1,500 of the 1,529 entries are outputs seen once; min_freq 3 maps them (1,500 of 37,500 characters,
    4%) to <unk> and leaves <unk> and the 28 Latin characters, as drnn data then reports."""
    english = "the quick brown fox jumps over the lazy dog. " * 400
    text = workdir / "tail.txt"
    text.write_text(english + "".join(chr(0x4E00 + i) for i in range(1500)) + english)
    read = ("data", "--set", f"data.path={text}", "--set", "data.preprocess=none", "--json")
    code, out, err = cli(*read)
    said = json.loads(out.splitlines()[-1])
    assert code == 0 and said["vocab_size"] == 1529, err
    assert [note for note in said["notes"] if "data.min_freq" in note] == [
        "1,500 of the vocabulary's 1,529 chars occur fewer than 3 times in the text: each is an output the model "
        "sees too seldom to learn; data.min_freq 3 maps them to <unk> (4% of the text), leaving a vocabulary of 29, "
        "and an output layer 52.7 times smaller to compute at every step"
    ]
    code, out, err = cli(*read, "--set", "data.min_freq=3")
    said = json.loads(out.splitlines()[-1])
    assert code == 0 and said["vocab_size"] == 29 and not said["notes"], err


def test_a_min_freq_that_leaves_only_unk_is_refused(workdir: Path, cli):
    code, _, err = cli("data", "--set", "data.min_freq=100000")
    assert_one_line_error(
        code, err, "data.min_freq 100000 leaves no char of", "occurs 29,927 times", "lower data.min_freq"
    )


def test_a_validation_split_of_a_few_predictions_is_noted_as_noise(workdir: Path, cli):
    """Two validation tokens, one prediction: its perplexity picked the best checkpoint and drove
    patience without a word."""
    text = workdir / "small.txt"
    text.write_text("hello world, this is a small text. " * 20)  # 700 characters
    config = config_file(workdir, {**TINY, "data": {"path": str(text), "batch_size": 2, "num_steps": 5}})
    few = ("--set", "train.epochs=1", "--set", "train.sample_prefixes=[hello]", "--run")
    code, out, err = cli("train", "--config", str(config), *few, "runs/a", "--set", "data.val_fraction=0.004")
    assert code == 0, err
    assert [line for line in out.splitlines() if line.startswith("note: ")] == [
        "note: data.val_fraction 0.004 leaves 1 validation prediction(s): perplexities over so few are noise, "
        "yet they pick the best checkpoint and drive patience (raise data.val_fraction)"
    ]
    code, out, err = cli("train", "--config", str(config), *few, "runs/b", "--set", "data.val_fraction=0.2")
    assert code == 0 and "note: " not in out + err  # over a hundred predictions: no note


def test_settings_this_text_cannot_honour_are_noted_on_one_line_each(workdir: Path, cli):
    """Own text without the default prefixes' letters, and a validation share that rounds to nothing."""
    text = workdir / "small.txt"
    text.write_text("hello world, this is a small text. " * 20)
    config = config_file(workdir, {**TINY, "data": {"path": str(text), "batch_size": 2, "num_steps": 5}})
    code, out, err = cli("train", "--config", str(config), "--set", "train.epochs=1",
                         "--set", "data.val_fraction=0.001", "--set", "data.test_fraction=0.002")  # fmt: skip
    assert code == 0, err
    notes = [line for line in out.splitlines() if line.startswith("note: ")]
    assert notes[:2] == [  # 700 tokens: 0.7 of one validation token, 1.4 of one test token
        "note: data.val_fraction 0.001 leaves 0 validation token(s), too few to evaluate: this run has no "
        "validation (raise data.val_fraction)",
        "note: data.test_fraction 0.002 leaves 1 test token(s), too few to evaluate: drnn eval --split test "
        "will have nothing to read (raise data.test_fraction)",
    ]
    assert notes[2:] == [
        f"note: train.sample_prefixes: {prefix!r} cannot be written in the vocabulary's chars (the text's, or "
        "under --init-from the checkpoint's), so it gets no samples; set train.sample_prefixes to text it can spell"
        for prefix in ("time traveller", "traveller")
    ]
    code, out, err = cli(
        "eval", "--json"
    )  # no validation to read: the default split is train, as the note says
    assert code == 0, err
    assert json.loads(out)["split"] == "train"


def test_resume_and_overwrite_together_are_refused_and_the_run_is_kept(workdir: Path, cli):
    config = config_file(workdir, {**TINY, "train": {**TINY["train"], "epochs": 1}})
    assert cli("train", "--config", str(config))[0] == 0
    code, _, err = cli("train", "--config", str(config), "--resume", "--overwrite", "--set", "train.epochs=2")
    assert_one_line_error(code, err, "--resume and --overwrite cannot be combined", "pick one")
    assert code == 2  # options that exclude each other: a usage error
    assert load_checkpoint(workdir / "runs" / "tiny" / "last.safetensors").epoch == 1


# ---------------------------------------------------------------------------------------------
# Downloads


@pytest.fixture
def wrong_payload_server() -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"not the time machine\n" * 100
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_checksum_mismatch_names_url_and_hashes_and_leaves_nothing(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    cli,
    wrong_payload_server: str,
):
    cache = tmp_path / "cache"
    monkeypatch.setenv("DRNN_DATA_DIR", str(cache))
    monkeypatch.setenv("DRNN_DATA_URL", wrong_payload_server)
    code, _, err = cli("data")
    assert_one_line_error(
        code, err, f"{wrong_payload_server}/timemachine.txt", "090b5e7e70c295757f55df93cb0a180b9691891a"
    )
    assert list(cache.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Predict and eval inputs


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        # out-of-range -n, --temperature, --top-k: test_predict_eval.py checks their whole line
        (["predict", ""], ("prefix is empty",)),
        (
            ["eval", "--split", "dev"],
            ("Invalid value for '--split': 'dev' is not one of 'train', 'val', 'test'.",),
        ),
    ],
)
def test_bad_predict_and_eval_options_name_the_option_and_range(
    tiny_run: Path, cli, args: list[str], needles: tuple[str, ...]
):
    code, _, err = cli(*args, "--run", str(tiny_run))
    assert_one_line_error(code, err, *needles)


def test_digits_in_a_prefix_vanish_under_d2l_preprocessing_with_a_note(tiny_run: Path, cli):
    from drnn_cli.commands import load_model, predict
    from drnn_cli.decode import DecodeOptions

    code, out, err = cli("predict", "time 2 travel", "-n", "8", "--run", str(tiny_run))
    expected = predict(load_model(tiny_run, None, "cpu"), "time travel", DecodeOptions(num_tokens=8))
    assert (code, err) == (
        0,
        f"checkpoint {tiny_run / 'best.safetensors'}\n"
        "note: data.preprocess d2l reads the prefix 'time 2 travel' as 'time travel'\n",
    )
    assert (
        out == expected + "\n"
        and expected.startswith("time travel")
        and len(expected) == len("time travel") + 8
    )


def test_prefix_character_outside_the_vocabulary_is_named(
    tmp_path: Path, cli, corpus_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.chdir(tmp_path)
    text = tmp_path / "abc.txt"
    text.write_text("abc cab bca " * 300)
    tree = {
        **TINY,
        "data": {**TINY["data"], "path": str(text), "preprocess": "none"},
        "train": {**TINY["train"], "epochs": 1},
    }
    assert cli("train", "--config", str(config_file(tmp_path, tree)))[0] == 0
    code, _, err = cli("predict", "cabz")
    assert_one_line_error(code, err, "'z'", "not in the model's vocabulary")


def test_missing_run_and_checkpoint_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli("predict", "time")
    assert_one_line_error(code, err)
    assert err == (  # runs/ is looked up from here; the preset's name works from any directory
        f"drnn: error: no run to use: runs/latest does not exist in {tmp_path}; run from the directory you "
        "trained in, train one first (drnn train --config quick) or pass --run DIR / --checkpoint FILE\n"
    )
    code, _, err = cli("eval", "--run", str(tmp_path / "nope"))
    assert_one_line_error(code, err, str(tmp_path / "nope"), "does not exist")
    code, _, err = cli("eval", "--checkpoint", str(tmp_path / "nope.safetensors"))
    assert_one_line_error(code, err, "nope.safetensors does not exist")
    (tmp_path / "empty").mkdir()
    code, _, err = cli("eval", "--run", str(tmp_path / "empty"))
    assert_one_line_error(code, err, "holds no checkpoint")


@pytest.mark.parametrize(
    "payload", [b"", bytes(range(255, 175, -1)), b'\x10\x00\x00\x00\x00\x00\x00\x00{"a": 1}       ']
)
def test_corrupt_checkpoint_is_named(tmp_path: Path, cli, payload: bytes):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(payload)
    code, _, err = cli("eval", "--checkpoint", str(bad))
    assert_one_line_error(code, err, str(bad), "corrupt")


@pytest.mark.parametrize("text", ["the time machine, by h. g. wells\n" * 3, "时间机器\n" * 9, "hi\n"])
def test_a_text_given_as_a_checkpoint_is_named_as_one(tmp_path: Path, cli, text: str):
    """Its first 8 bytes read as a header length of 7,980,170,311,414.5 MiB, and the message said so; a
    note shorter than those 8 bytes was "corrupt"."""
    given = tmp_path / "notes.txt"
    given.write_text(text)
    code, _, err = cli("predict", "time", "--checkpoint", str(given))
    assert (code, err) == (
        1,
        f"drnn: error: {given} is a text file, not a drnn checkpoint (.safetensors): --checkpoint and "
        "--init-from take a run directory or a checkpoint in one; a text to train on goes to data.path, one "
        "to evaluate to drnn eval --data\n",
    )


def test_truncated_real_checkpoint_is_named(tiny_run: Path, tmp_path: Path, cli):
    """Cut short, with both sizes (a copy that did not finish), not "corrupt or not a drnn checkpoint";
    cut inside its header, it is that."""
    data = (tiny_run / "best.safetensors").read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    code, _, err = cli("predict", "time", "--checkpoint", str(bad))
    assert_one_line_error(
        code,
        err,
        f"checkpoint {bad} is cut short: it holds {len(data) // 2:,} of the {len(data):,} bytes its header",
    )
    bad.write_bytes(data[:100])
    code, _, err = cli("predict", "time", "--checkpoint", str(bad))
    assert_one_line_error(code, err, f"checkpoint {bad} is corrupt or not a drnn checkpoint; retrain or pick")


def test_a_resume_from_a_cut_short_last_checkpoint_points_to_the_best_one(workdir: Path, cli):
    """ "retrain or pick another file" is no way on for --resume, which reads RUN/last.safetensors."""
    config = config_file(workdir, {**TINY, "data": {**TINY["data"], "val_fraction": 0.2}})
    code, _, err = cli("train", "--config", str(config))
    assert code == 0, err
    last, best = (
        workdir / "runs" / "tiny" / "last.safetensors",
        workdir / "runs" / "tiny" / "best.safetensors",
    )
    last.write_bytes(last.read_bytes()[:-100])
    code, _, err = cli("train", "--config", str(config), "--resume")
    assert_one_line_error(
        code,
        err,
        "is cut short",
        f"resume from its best checkpoint instead (cp {Path('runs/tiny/best.safetensors')} ",
    )
    assert "pick another file" not in err
    best.unlink()
    code, _, err = cli("train", "--config", str(config), "--resume")
    assert_one_line_error(code, err, "is cut short", "; start over with --overwrite")


def test_a_header_above_the_cap_is_refused_before_safetensors_parses_it(
    tiny_run: Path, monkeypatch: pytest.MonkeyPatch
):
    from drnn_cli import checkpoint

    data = (tiny_run / "best.safetensors").read_bytes()
    header_bytes = int.from_bytes(data[:8], "little")
    assert (
        load_checkpoint(tiny_run / "best.safetensors").epoch
        == read_checkpoint_info(tiny_run / "best.safetensors").epoch
    )
    monkeypatch.setattr(checkpoint, "MAX_HEADER_BYTES", header_bytes - 1)
    with pytest.raises(DrnnError, match="corrupt or not a drnn checkpoint"):
        read_checkpoint_info(tiny_run / "best.safetensors")


def test_a_vocabulary_too_large_for_a_checkpoint_header_is_refused_before_training(
    workdir: Path, cli, monkeypatch: pytest.MonkeyPatch
):
    """A word text of millions of distinct words trained, then wrote checkpoints over the header cap
    that eval, predict and --resume refused as corrupt. Here the cap is lowered to what 5,000 words
    overflow: refused in one line before anything is written, naming data.min_freq."""
    from drnn_cli import checkpoint

    text = workdir / "words.txt"
    text.write_text(" ".join(f"word{i:05d}" for i in range(5000)) + "\n")
    monkeypatch.setattr(checkpoint, "MAX_HEADER_BYTES", 60_000)
    monkeypatch.setattr(checkpoint, "HEADER_ROOM_KEPT", 0)
    tree = {**TINY, "data": {"path": str(text), "preprocess": "none", "token": "word", "batch_size": 2,
                             "num_steps": 5, "max_tokens": -1}, "model": {**TINY["model"], "embedding_dim": 8}}  # fmt: skip
    code, _, err = cli("train", "--config", str(config_file(workdir, tree)), "--run", "runs/w")
    assert_one_line_error(
        code, err, "the vocabulary of 5,001 tokens would make a checkpoint header of 0.1 MiB, more than the "
        "0.1 MiB drnn reads back; raise data.min_freq to keep fewer tokens"
    )  # fmt: skip
    assert not (workdir / "runs" / "w" / "last.safetensors").exists()


def test_a_checkpoint_keeps_its_tokens_not_the_counts_of_the_words_min_freq_cut(workdir: Path, cli):
    """Every checkpoint held the count of every distinct word of the text, the ones min_freq cut too: a
    5-word vocabulary over a text of 900,000 rare words wrote a 73 MB header. Its tokens are what a model
    needs; a header over the cap is never written."""
    from drnn_cli import checkpoint
    from drnn_cli.checkpoint import Checkpoint

    text = workdir / "rare.txt"
    text.write_text(" ".join(f"rare{i}" for i in range(3000)) + " the cat sat" * 40 + "\n")
    tree = {**TINY, "data": {"path": str(text), "preprocess": "none", "token": "word", "batch_size": 2,
                             "num_steps": 5, "min_freq": 2}}  # fmt: skip
    code, _, err = cli(
        "train", "--config", str(config_file(workdir, tree)), "--run", "runs/rare", "--set", "train.epochs=1"
    )
    assert code == 0, err
    payload = (workdir / "runs" / "rare" / "last.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", payload[:8])
    header = json.loads(json.loads(payload[8 : 8 + length])["__metadata__"]["drnn"])
    assert header["vocab"] == {
        "idx_to_token": ["<unk>", "the", "cat", "sat"],
        "min_freq": 2,
        "reserved_tokens": [],
    }
    assert length < 20_000
    saved = load_checkpoint(workdir / "runs" / "rare" / "last.safetensors")
    smaller = Checkpoint(saved.config, saved.vocab, saved.model_state, 1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(checkpoint, "MAX_HEADER_BYTES", 1000)
        with pytest.raises(
            DrnnError, match=r"^the checkpoint's header would be 0\.\d MiB, more than the 0\.0 MiB"
        ):
            save_checkpoint(workdir / "small.safetensors", smaller)
    assert not (workdir / "small.safetensors").exists()


def _written(tensors: dict, metadata: dict[str, str]) -> bytes:
    stream = io.BytesIO()
    write_safetensors(stream, safetensors_header(tensors, metadata), tensors)
    return stream.getvalue()


def test_a_checkpoint_is_written_as_safetensors_writes_it(tmp_path):
    """drnn writes the format itself, a tensor at a time, so that no copy of a checkpoint is ever whole
    in memory (a 286 MiB one added 862 MiB to the peak while safetensors built it, 33 MiB now): in its
    order (wider elements first, then by name) the bytes are those safetensors.torch.save makes, for
    every dtype a checkpoint may hold; an empty, a 0-dim, a strided and a shared tensor (tied weights,
    which safetensors' save refuses) read back from the file through safetensors bit for bit."""
    from safetensors import safe_open
    from safetensors.torch import save

    dtypes = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32]
    dtypes += [torch.int16, torch.int8, torch.uint8, torch.bool]
    every_dtype = {f"t{i}": (torch.randn(3, 5) * 9).to(dtype) for i, dtype in enumerate(dtypes)}
    every_dtype |= {"a.empty": torch.zeros(0, 2), "b.scalar": torch.tensor(2.5)}
    metadata = {"drnn": json.dumps({"token": "é\u2028<"}, ensure_ascii=False)}
    assert _written(in_stored_order(every_dtype), metadata) == save(every_dtype, metadata=metadata)
    shared = torch.randn(7, 3)
    mixed = {
        **every_dtype,
        "w": shared,
        "tied": shared,
        "strided": torch.randn(4, 6)[:, ::2],
        "row": torch.randn(5, 4)[2],  # a view into a larger storage
        "grad": torch.randn(3, requires_grad=True),
        "negated": torch.randn(3)._neg_view(),  # a lazily negated view: its memory holds the opposite
    }
    path = tmp_path / "t.safetensors"
    path.write_bytes(_written(in_stored_order(mixed), metadata))
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == metadata and set(handle.keys()) == set(mixed)
        for name, tensor in mixed.items():
            read = handle.get_tensor(name)
            assert read.dtype == tensor.dtype and torch.equal(read, tensor.detach().resolve_neg()), name


def test_a_checkpoint_write_that_fails_midway_leaves_the_old_file(workdir, tiny_run, monkeypatch):
    """Written piece by piece, but still atomically: a disk that fills after the header leaves the
    previous checkpoint as it was and no temporary file behind."""
    from drnn_cli import checkpoint

    folder = workdir / "copy"
    folder.mkdir()
    last = folder / "last.safetensors"
    shutil.copy(tiny_run / "last.safetensors", last)
    before = last.read_bytes()
    saved = load_checkpoint(last)

    def fails_after_the_header(stream, head, tensors):
        stream.write(head)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "write_safetensors", fails_after_the_header)
    with pytest.raises(
        DrnnError,
        match=r"^cannot write .*last\.safetensors: No space left on device; free space on that filesystem, "
        r"or write elsewhere \(drnn's files are written whole or not at all: the one there before is intact\)$",
    ):
        save_checkpoint(last, saved)
    assert last.read_bytes() == before
    assert [path.name for path in folder.iterdir()] == ["last.safetensors"]


def test_a_checkpoint_whose_path_is_not_utf8_is_named_as_such(tiny_run: Path, workdir: Path):
    """safetensors opens paths as UTF-8 strings: a good checkpoint under a Latin-1 name was refused as
    "corrupt or not a drnn checkpoint"; now the message says what is wrong with it, and how to go on."""
    odd = Path(os.fsdecode(os.fsencode(workdir) + b"/caf\xe9.safetensors"))
    shutil.copy(tiny_run / "best.safetensors", odd)
    with pytest.raises(DrnnError) as refused:
        load_checkpoint(odd)
    assert str(refused.value).endswith(
        "safetensors opens only files whose path is UTF-8; rename it, or point to it through a symlink "
        "with a UTF-8 path"
    )
    (workdir / "cafe.safetensors").symlink_to(odd)
    assert (
        load_checkpoint(workdir / "cafe.safetensors").epoch
        == load_checkpoint(tiny_run / "best.safetensors").epoch
    )


def test_the_header_reads_without_the_tensors(tiny_run: Path, tmp_path: Path):
    """read_checkpoint_info never touches tensor data: a file whose weights are NaN still reports its header."""
    data = bytearray((tiny_run / "best.safetensors").read_bytes())
    header_end = 8 + int.from_bytes(data[:8], "little")
    data[header_end:] = b"\xff" * (len(data) - header_end)  # every float32 becomes a NaN
    nan = tmp_path / "nan.safetensors"
    nan.write_bytes(bytes(data))
    original = load_checkpoint(tiny_run / "best.safetensors")
    info = read_checkpoint_info(nan)
    assert (info.epoch, info.best_val_ppl, info.corpus_sha1, info.text_sha1) == (
        original.epoch,
        original.best_val_ppl,
        original.corpus_sha1,
        original.text_sha1,
    )
    model_shapes = {
        name[len("model.") :]: shape for name, shape in info.shapes.items() if name.startswith("model.")
    }
    assert model_shapes == {name: tuple(value.shape) for name, value in original.model_state.items()}
    with pytest.raises(DrnnError, match="NaN or infinite"):
        load_checkpoint(nan)


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("kind", ["pickle", "torch.save"])
def test_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path: Path, cli, kind: str):
    import torch

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.safetensors"
    if kind == "pickle":
        evil.write_bytes(pickle.dumps(_Exploit(marker)))
    else:
        torch.save({"model": _Exploit(marker)}, evil)
    code, _, err = cli("predict", "time", "--checkpoint", str(evil))
    assert_one_line_error(code, err, "pickle", "execute code")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# Locks


def test_second_training_into_a_busy_run_directory_refuses(workdir: Path, cli):
    run = workdir / "runs" / "tiny"
    with RunLock(run):  # held, as by a training in progress
        code, _, err = cli("train", "--config", str(config_file(workdir, TINY)))
    assert_one_line_error(
        code,
        err,
        f"in use by another training (process {os.getpid()} on host {socket.gethostname()})",
        "--run DIR",
    )


def test_lock_left_by_a_crashed_run_is_taken_over(tmp_path: Path):
    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(finished.stdout)
    (tmp_path / "train.lock").write_text(f"{socket.gethostname()} {dead_pid}\n")
    with RunLock(tmp_path):
        assert_run_locked_by_this_process(tmp_path)
    with RunLock(tmp_path):  # released: free for the next training
        assert_run_locked_by_this_process(tmp_path)


# ---------------------------------------------------------------------------------------------
# A plain install


def test_drnn_trains_checkpoints_and_predicts_without_numpy(workdir: Path):
    """PyTorch does not require NumPy, nor does drnn, so ``pip install drnn`` may have none: the
    checkpoint writer read tensors' bytes through NumPy, and every training died at its first
    checkpoint ("internal error: Numpy is not available"), torch's import warning on stderr before."""
    config = config_file(workdir, TINY)
    script = (
        "import sys\n"
        "sys.modules['numpy'] = None  # any import of it fails, as where it is not installed\n"
        "from drnn_cli.launch import program\n"
        "sys.argv = ['drnn', *sys.argv[1:]]\n"
        "program()\n"
    )

    def drnn(*args: str) -> subprocess.CompletedProcess[str]:
        environment = {**os.environ, "PYTHONPATH": pythonpath_with_repo()}
        return subprocess.run(
            [sys.executable, "-c", script, *args],
            capture_output=True,
            text=True,
            env=environment,
            timeout=300,
        )

    trained = drnn("train", "--config", str(config))
    assert trained.returncode == 0, trained.stderr
    # matplotlib needs NumPy, and its note says it cannot import (README "Why these dependencies");
    # nothing else may name NumPy: not torch's warning, not an error
    said = (trained.stdout + trained.stderr).splitlines()
    plotter = [line for line in said if line.startswith("note: matplotlib does not import here")]
    assert len(plotter) == (1 if importlib.util.find_spec("matplotlib") else 0)
    assert "numpy" not in "\n".join(line for line in said if line not in plotter).lower()
    last = workdir / "runs" / "tiny" / "last.safetensors"
    from safetensors.torch import load_file

    written = load_file(last)  # safetensors' own reader agrees with what drnn wrote
    loaded = load_checkpoint(last)
    assert loaded.model_state and all(
        torch.equal(written[f"model.{name}"], tensor) for name, tensor in loaded.model_state.items()
    )
    predicted = drnn("predict", "the", "-n", "5")
    assert predicted.returncode == 0, predicted.stderr
    assert len(predicted.stdout.rstrip("\n")) == len("the") + 5 and "numpy" not in predicted.stderr.lower()


# ---------------------------------------------------------------------------------------------
# Divergence


def poison_weights_after(monkeypatch: pytest.MonkeyPatch, steps: int) -> None:
    """Make the weights NaN after the given number of optimizer steps, as a diverging update does.

    (The schema bounds train.lr at 1000, which this tiny model survives; a NaN must still be caught.)
    """
    import torch

    from drnn_cli.step import StaticStep

    original = StaticStep.__call__
    taken = {"steps": 0}

    def step(self, window):
        loss = original(self, window)
        taken["steps"] += 1
        if taken["steps"] == steps:
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("nan"))
        return loss

    monkeypatch.setattr(StaticStep, "__call__", step)


def test_nan_loss_stops_with_epoch_and_step(workdir: Path, cli, monkeypatch: pytest.MonkeyPatch):
    poison_weights_after(monkeypatch, 3)
    code, _, err = cli("train", "--config", str(config_file(workdir, TINY)))
    assert_one_line_error(
        code, err, "NaN or infinite at step 4 of epoch 1", "no checkpoint was written", "train.lr"
    )
    assert not (workdir / "runs" / "tiny" / "last.safetensors").exists()


def test_a_stop_request_that_meets_a_nan_on_another_process_keeps_the_last_good_checkpoint(
    workdir: Path, cli, monkeypatch: pytest.MonkeyPatch
):
    """Under torchrun the processes share one update: a NaN on any of them poisons every one's
    weights, so a signal in that step must end the run as a divergence, not save a checkpoint."""

    from drnn_cli import train
    from drnn_cli.train import Trainer

    config = str(config_file(workdir, TINY))
    assert cli("train", "--config", config, "--set", "train.epochs=1")[0] == 0

    def another_process_saw_a_nan(totals: torch.Tensor, _context: object) -> torch.Tensor:
        totals[2] += 1  # the count of processes whose loss was not finite
        return totals

    monkeypatch.setattr(train, "all_reduce_sum", another_process_saw_a_nan)
    monkeypatch.setattr(Trainer, "_stop_requested", lambda self, step=None: step == 3)
    code, _, err = cli("train", "--config", config, "--resume")
    assert_one_line_error(
        code, err, "NaN or infinite by step 3 of epoch 2 on another process", "last good checkpoint"
    )
    kept = load_checkpoint(workdir / "runs" / "tiny" / "last.safetensors")
    assert (kept.epoch, kept.step_in_epoch) == (1, 0)


# ---------------------------------------------------------------------------------------------
# Signals, with a real process


def _spawn_training(workdir: Path, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    tree = {**TINY, "train": {**TINY["train"], "epochs": 500, "checkpoint_every": 1000}}
    config = config_file(workdir, tree)
    return subprocess.Popen(
        [sys.executable, "-m", "drnn_cli", "train", "--config", str(config), *extra],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_epochs(metrics: Path, count: int, process: subprocess.Popen[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= count:
            return
        if process.poll() is not None:
            raise AssertionError(f"training exited early: {process.communicate()}")
        time.sleep(0.05)
    process.kill()
    raise AssertionError("training made no progress")


@pytest.mark.parametrize(
    ("signum", "exit_code", "options"), [(signal.SIGINT, 130, ()), (signal.SIGTERM, 143, ("--json",))]
)
def test_signal_writes_a_resumable_checkpoint_and_exits_with_the_signal_code(
    workdir: Path, cli, signum: int, exit_code: int, options: tuple[str, ...]
):
    """One line says where it stopped; with --json, stdout holds where too, for the script that ran it."""
    process = _spawn_training(workdir, *options)
    metrics = workdir / "runs" / "tiny" / "metrics.jsonl"
    _wait_for_epochs(metrics, 2, process)
    process.send_signal(signum)
    out, err = process.communicate(timeout=60)
    assert process.returncode == exit_code, err
    # asked for, and resumable: one line, and not an error's (--json: after the log, on stderr too)
    lines = err.splitlines()
    said = [line for line in lines if line.startswith("drnn: ")]
    assert said == [lines[-1]] and (len(lines) == 1 or options), err  # --json: the log precedes it
    name = signal.Signals(signum).name
    assert lines[-1].startswith(f"drnn: training stopped by {name} after "), err
    assert lines[-1].endswith(
        "; its checkpoint is in runs/tiny/last.safetensors; continue with the same command plus --resume"
    )
    stopped = load_checkpoint(workdir / "runs" / "tiny" / "last.safetensors")
    assert stopped.epoch >= 2
    if options:
        where = json.loads(out)
        progress = stopped.trainer().epoch_progress
        spent = where["seconds"]  # where the session's time went, to the stop
        assert set(spent) == {"session", "training", "validating", "checkpoints"}
        assert spent["session"] >= spent["training"] + spent["validating"] + spent["checkpoints"] > 0
        # epochs: bounded below
        assert {key: value for key, value in where.items() if key not in ("epochs", "seconds")} == {
            "run_dir": str(workdir / "runs" / "tiny"),
            "stop_reason": name,
            "start_epoch": 0,
            "steps": stopped.trainer_state["global_step"],
            "start_step": 0,
            "checkpoint": str(workdir / "runs" / "tiny" / "last.safetensors"),
            "validation_pending": progress is not None and progress.boundary_pending,
        }
        assert math.floor(where["epochs"]) == stopped.epoch
        assert (where["epochs"] > stopped.epoch) == (stopped.step_in_epoch > 0)
    with RunLock(workdir / "runs" / "tiny"):  # the stopped process no longer holds it
        assert_run_locked_by_this_process(workdir / "runs" / "tiny")
    finish = stopped.epoch + 1
    # resumed in this process: the signal needed a real one, the resume does not
    code, out, err = cli(
        "train", "--config", "tiny.yaml", "--resume", "--json", "--set", f"train.epochs={finish}"
    )
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    # the session began where the signal stopped the run: inside an epoch, or (rarely) at its end
    assert stopped.epoch <= summary["start_epoch"] < stopped.epoch + 1 and summary["epochs"] == finish
    assert (summary["start_epoch"] > stopped.epoch) == (stopped.step_in_epoch > 0)
    assert summary["start_step"] == stopped.trainer_state["global_step"]
    epochs = [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()]
    assert epochs == list(range(1, finish + 1))


# ---------------------------------------------------------------------------------------------
# No input makes a traceback


yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
sections = st.dictionaries(
    st.sampled_from(["data", "model", "train", "extra"]),
    st.dictionaries(
        st.sampled_from(["batch_size", "cell", "lr", "epochs", "dropout", "max_tokens", "path", "bogus"]),
        yaml_values,
        max_size=4,
    )
    | yaml_values,
    max_size=3,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=sections)
def test_any_config_tree_validates_or_gives_a_config_error(tree: dict):
    try:
        build_config(tree)
    except ConfigError as error:
        assert str(error).startswith("config error: ")  # then the dotted key, from describe_error


@settings(max_examples=200, deadline=None)
@given(override=st.text(max_size=40))
def test_any_set_text_validates_or_gives_a_config_error(override: str):
    try:
        build_config({}, [override])
    except ConfigError as error:
        assert str(error).startswith(("--set ", "config error: ")), str(error)  # the override or the key


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=60))
def test_any_yaml_file_loads_or_gives_a_config_error(tmp_path: Path, text: str):
    path = tmp_path / "fuzz.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_config(path)
    except ConfigError as error:
        assert str(error).startswith((f"config file {path} ", "config error: ")), str(error)


def test_drnn_error_messages_collapse_to_one_line():
    assert str(DrnnError("first line\n  second line")) == "first line second line"


def test_an_error_is_one_line_and_keeps_the_spaces_it_quotes() -> None:
    """Line breaks (a library's message, a multi-line f-string) become one space; runs of spaces stay,
    as they may be part of a quoted prefix or path; a tab or an escape is shown escaped, so a path
    holding one is not mistaken for another and nothing reaches the terminal as a control sequence;
    nor a right-to-left override, which shows "exe.txt" as "txt.exe"."""
    from drnn_cli.errors import DrnnError

    assert str(DrnnError("cannot read 'my  notes.txt':\n  permission denied (errno 13)")) == (
        "cannot read 'my  notes.txt': permission denied (errno 13)"
    )
    assert str(DrnnError("\n  prefix '   ' has no letters\r\n")) == "prefix '   ' has no letters"
    assert str(DrnnError("run directory r/no\tsuch\x1b[2J does not exist")) == (
        "run directory r/no\\tsuch\\x1b[2J does not exist"
    )
    assert str(DrnnError("cannot read a\u202etxt.exe")) == "cannot read a\\u202etxt.exe"


@pytest.mark.parametrize(("rank", "shown"), [("0", True), ("1", False)])
def test_a_stopped_training_is_said_once_under_torchrun(
    workdir: Path, cli, monkeypatch: pytest.MonkeyPatch, rank: str, shown: bool
):
    """Every process stops at the same step with the same line (and --json object): rank 0 says it,
    every rank exits 143."""
    from drnn_cli import train_session
    from drnn_cli.errors import StoppedRun

    def stopped(*args: object, **kwargs: object) -> None:
        raise TrainingInterrupted(
            "training stopped by SIGTERM after epoch 1, optimizer step 24; ...",
            143,
            StoppedRun(Path("runs/t"), "SIGTERM", 1, 0, 24, 0, Path("runs/t/last.safetensors"), False),
        )

    monkeypatch.setattr(train_session, "train_run", stopped)
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")  # a RANK alone is a stray variable, not a worker's
    code, out, err = cli("train", "--config", str(config_file(workdir, TINY)), "--json")
    expected = "drnn: training stopped by SIGTERM after epoch 1, optimizer step 24; ...\n" if shown else ""
    assert (code, err) == (143, expected)
    assert (json.loads(out)["steps"] if shown else out) == (24 if shown else "")
