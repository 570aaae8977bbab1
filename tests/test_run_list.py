"""`drnn runs`: every run below a folder, described from its checkpoint's header, newest first."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    TINY_TREE,
    assert_one_line_error,
    config_file,
    drnn_in_process,
    enter_workdir,
    plot_figure_only,
    poison_after_epoch,
    rewrite_checkpoint,
)

from drnn_cli import rundir


def _listed(cli, *args: str) -> list[dict]:
    """``drnn runs --json``'s runs, their paths (absolute, as every --json path: checked) made relative
    to the working directory again to read as the command line spelled them."""
    code, out, err = cli("runs", *args, "--json")
    assert code == 0, err
    runs = json.loads(out.splitlines()[-1])["runs"]
    for run in runs:
        for key in ("run_dir", "checkpoint"):
            if run[key] is not None:
                assert Path(run[key]).is_absolute(), run[key]
                run[key] = os.path.relpath(run[key])
    return runs


def _rows(lines: list[str]) -> list[list[str]]:
    """The table's rows, each cell's lines joined, spaces left out: a cell wraps at its spaces, or folds
    a word (a long name too), as the columns allow. A row begins at its "updated" time, on its first
    line alone."""
    rows: list[list[list[str]]] = []
    for line in lines:
        if not line.startswith("│"):
            continue
        cells = [cell.strip() for cell in line.split("│")[1:-1]]
        if cells[-1] or not rows:
            rows.append([[] for _ in cells])
        for parts, cell in zip(rows[-1], cells, strict=True):
            if cell:
                parts.append(cell)
    return [["".join(parts).replace(" ", "") for parts in row] for row in rows]


@pytest.fixture(scope="module")
def _three_runs_trained(tmp_path_factory: pytest.TempPathFactory, corpus_path: Path) -> Path:
    """three_runs' folder, trained once for the module as a test in its workdir would train it (the
    in-process tests' stand-ins for fsync and the plot's PNG included); read-only: tests get copies."""
    root = tmp_path_factory.mktemp("three_runs")
    with pytest.MonkeyPatch.context() as patch:
        enter_workdir(root, patch, corpus_path)
        patch.setattr(os, "fsync", os.fstat)
        patch.setattr("drnn_cli.report.render_perplexity_plot", plot_figure_only)
        torch.set_num_threads(1)
        config = str(config_file(root, TINY_TREE))
        for extra in (
            (),
            ("--run", "runs/sweep/cut", "--set", "train.max_time=0.000001"),
            ("--run", "runs/sweep/steps6", "--set", "train.max_steps=6"),
        ):
            assert drnn_in_process("train", "--config", config, *extra) == 0
            time.sleep(0.02)  # distinct modification times, whatever the filesystem's clock resolution
    return root


@pytest.fixture
def three_runs(workdir: Path, _three_runs_trained: Path) -> Path:
    """runs/tiny (4 of 4 epochs), runs/sweep/cut (one step of a run a time budget cut: resumable),
    runs/sweep/steps6 (6 of its 6 steps), trained in that order; the last is the latest run. A copy
    of the module's one training (modification times kept), in this test's workdir."""
    shutil.copytree(_three_runs_trained / "runs", workdir / "runs", symlinks=True)
    # the marker names the latest run by its absolute path (rundir.mark_latest): this copy's own
    latest = workdir / "runs" / "latest"
    latest.write_text(str((workdir / "runs" / "sweep" / "steps6").resolve()) + "\n")
    shutil.copystat(_three_runs_trained / "runs" / "latest", latest)
    config_file(workdir, TINY_TREE)
    return workdir


def test_runs_lists_each_run_newest_first_with_its_progress_and_state(three_runs: Path, cli):
    runs = _listed(cli)
    assert [(run["run_dir"], run["state"], run["finished_by"], run["latest"]) for run in runs] == [
        ("runs/sweep/steps6", "finished", "max_steps", True),
        ("runs/sweep/cut", "resumable", None, False),
        ("runs/tiny", "finished", "epochs", False),
    ]
    steps6, cut, tiny = runs
    # why each one's last session ended (stopped.json): what makes "resumable" a budget's, not a crash's
    assert [run["stopped_by"] for run in runs] == ["max_steps", "max_time", "epochs"]
    # TINY_TREE's 3,000 tokens: 2,400 to train, 29 minibatches of 8 × 10 an epoch
    assert (steps6["global_step"], steps6["epoch"], steps6["step_in_epoch"]) == (6, 0, 6)
    assert (cut["global_step"], cut["epoch"], cut["step_in_epoch"]) == (1, 0, 1)
    assert (tiny["global_step"], tiny["epoch"], tiny["epochs"]) == (4 * 29, 4, 4)
    assert (tiny["cell"], tiny["num_layers"], tiny["hidden_size"], tiny["impl"]) == ("lstm", 2, 32, "torch")
    assert tiny["text"] == "timemachine" and tiny["problem"] is None and tiny["training_process"] is None
    assert tiny["checkpoint"] == "runs/tiny/last.safetensors"
    # the header's best is what drnn eval --split val of the run's best checkpoint reads
    code, out, _ = cli("eval", "--run", "runs/tiny", "--split", "val", "--json")
    assert code == 0 and json.loads(out.splitlines()[-1])["perplexity"] == pytest.approx(tiny["best_val_ppl"])
    # each run validated as it ended (the budgets' final validations too): best.safetensors' figure
    from drnn_cli.checkpoint import read_checkpoint_info

    for run in runs:
        best = read_checkpoint_info(Path(run["run_dir"]) / "best.safetensors").best_val_ppl
        assert run["best_val_ppl"] == best and best is not None
    assert all(run["training_seconds"] > 0 for run in runs)


def test_the_table_fits_80_columns_and_says_what_json_says(three_runs: Path, cli, monkeypatch):
    """At 80 columns a run is its name over the setting the runs differ in (the budget of runs/sweep/cut:
    a sweep's lr or seed), its model over its text, its progress over its state; the names stay whole."""
    monkeypatch.setenv("COLUMNS", "80")
    code, out, err = cli("runs")
    assert code == 0, err
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 80, out
    assert lines[0].strip() == "runs in runs, the newest first"
    assert lines[-1].strip() == "★ latest: the run predict and eval use without --run"
    listed = _listed(cli)
    best = [f"{run['best_val_ppl']:.4f}" for run in listed]
    written = [run["updated"][11:16] for run in listed]  # today's: the time alone
    assert _rows(lines) == [
        ["runs/sweep/steps6★latesttrain.max_time=0", "lstm2×32timemachine", "6/6stepsfinished", best[0], written[0]],
        ["runs/sweep/cuttrain.max_time=1e-06", "lstm2×32timemachine", "0/4epochs+1stepsresumable(max_time)", best[1], written[1]],
        ["runs/tinytrain.max_time=0", "lstm2×32timemachine", "4/4epochsfinished", best[2], written[2]],
    ]  # fmt: skip
    names = [line.split("│")[1].strip() for line in lines if line.startswith("│ runs/")]
    assert names == ["runs/sweep/steps6", "runs/sweep/cut", "runs/tiny"]  # whole: the other cells wrap
    settings = [line.split("│")[1].strip() for line in lines if line.startswith("│ train.")]
    assert settings == [
        "train.max_time=0",
        "train.max_time=1e-06",
        "train.max_time=0",
    ]  # whole, as --set takes
    assert [run["differs"] for run in listed] == [
        {"train.max_time": 0.0},
        {"train.max_time": 1e-06},
        {"train.max_time": 0.0},
    ]


def test_at_80_columns_a_long_name_and_a_long_setting_both_stay_whole(workdir: Path, cli, monkeypatch):
    """Names of 24 characters and a setting of 25: under the model's text, beside the whole name, the
    setting folded mid-token ("model.output_dropout=0." over "05"), and rich's even narrowing folded the
    text's name; written under the run's name, every cell line is whole and the table 80 wide."""
    config = str(config_file(workdir, {**TINY_TREE, "train": {**TINY_TREE["train"], "epochs": 1}}))
    for name, dropout in (("a", 0.05), ("b", 0.25)):
        run = f"runs/sweep-with-a-name/{name}"
        code, _, err = cli("train", "--config", config, "--run", run, f"--set=model.output_dropout={dropout}")
        assert code == 0, err
    monkeypatch.setenv("COLUMNS", "80")
    code, out, err = cli("runs", "runs/sweep-with-a-name", "--sort", "name")
    assert code == 0, err
    lines = out.splitlines()
    assert max(len(line) for line in lines) == 80, out
    first_cells = [line.split("│")[1].strip() for line in lines if line.startswith("│")]
    assert [cell for cell in first_cells if cell.startswith(("runs/", "model."))] == [
        "runs/sweep-with-a-name/a",
        "model.output_dropout=0.05",
        "runs/sweep-with-a-name/b",
        "model.output_dropout=0.25",
    ]
    texts = [line.split("│")[2].strip() for line in lines if line.startswith("│")]
    assert texts.count("timemachine") == 2  # the text's name, whole on its line


def test_a_long_text_name_wraps_and_leaves_every_other_cell_whole(
    workdir: Path, cli, corpus_path: Path, monkeypatch
):
    """A 53-character file name: the first layout kept it whole, which rich's measure (capped at the
    terminal's width, a whole column's widest word) passed, and the names were cropped to "runs/long",
    the state column to nothing (review rev39). Its name now folds; at 80 columns every other cell is
    whole, and at 60 names fold too but nothing is cropped."""
    text = workdir / "project_gutenberg_time_machine_wells_1895_cleaned.txt"
    text.write_bytes(corpus_path.read_bytes())
    config = str(config_file(workdir, {**TINY_TREE, "train": {**TINY_TREE["train"], "epochs": 1}}))
    for name, lr in (("lr01-seed4-wd", 0.01), ("lr02-seed4-wd", 0.02)):
        sets = (f"--set=data.path={text}", f"--set=train.lr={lr}")
        assert cli("train", "--config", config, "--run", f"runs/long/{name}", *sets)[0] == 0
    for columns in (80, 60):
        monkeypatch.setenv("COLUMNS", str(columns))
        code, out, err = cli("runs", "runs/long", "--sort", "name")
        assert code == 0, err
        lines = out.splitlines()
        assert max(len(line) for line in lines) <= columns and "…" not in out, out
        rows = _rows(lines)
        assert [row[0] for row in rows] == [
            "runs/long/lr01-seed4-wdtrain.lr=0.01",
            "runs/long/lr02-seed4-wd★latesttrain.lr=0.02",
        ]
        assert [row[1] for row in rows] == ["lstm2×32" + text.name.replace(" ", "")] * 2
        assert [row[2] for row in rows] == ["1/1epochsfinished"] * 2
    monkeypatch.setenv("COLUMNS", "80")
    code, out, err = cli("runs", "runs/long", "--sort", "name")
    first_cells = [line.split("│")[1].strip() for line in out.splitlines() if line.startswith("│")]
    assert [cell for cell in first_cells if cell.startswith(("runs/", "train."))] == [
        "runs/long/lr01-seed4-wd",
        "train.lr=0.01",
        "runs/long/lr02-seed4-wd",
        "train.lr=0.02",
    ]  # whole at 80 columns, where rich's narrowing folded them with the text (review rev39b #2)


def test_runs_without_a_validation_split_show_their_last_training_perplexity(workdir: Path, cli):
    """d2l's recipes hold out nothing: a folder of them listed "—" for every run (learner39). Each shows
    the training perplexity of its metrics' last line up to its checkpoint, --json says it of every run,
    and --sort best orders them by it after the runs with a validation figure."""
    tree = {**TINY_TREE, "data": {**TINY_TREE["data"], "val_fraction": 0}}
    config = str(config_file(workdir, {**tree, "train": {**tree["train"], "epochs": 2}}))
    for name, lr in (("fast", 0.01), ("slow", 0.0001)):
        assert cli("train", "--config", config, "--run", f"runs/d2l/{name}", f"--set=train.lr={lr}")[0] == 0
    held_out = str(config_file(workdir, {**TINY_TREE, "train": {**TINY_TREE["train"], "epochs": 1}}))
    assert cli("train", "--config", held_out, "--run", "runs/d2l/val")[0] == 0
    # a line past the checkpoint (a session that ended before its next one) is not the run's
    metrics = workdir / "runs" / "d2l" / "fast" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    last = [json.loads(line) for line in lines][-1]
    metrics.write_text(
        "\n".join([*lines, json.dumps({**last, "step": last["step"] + 1, "train_ppl": 2.0})]) + "\n"
    )
    listed = {Path(run["run_dir"]).name: run for run in _listed(cli, "runs/d2l", "--sort", "best")}
    assert list(listed) == ["val", "fast", "slow"]
    for name in ("fast", "slow"):
        lines = (workdir / "runs" / "d2l" / name / "metrics.jsonl").read_text().splitlines()
        assert listed[name]["train_ppl"] == json.loads(lines[1])["train_ppl"] > 2.0  # epoch 2's line
        assert listed[name]["best_val_ppl"] is None
    assert listed["val"]["train_ppl"] > listed["fast"]["train_ppl"]  # one epoch, not two
    code, out, err = cli("runs", "runs/d2l", "--sort", "best")
    assert code == 0, err
    assert [row[3] for row in _rows(out.splitlines())] == [
        f"{listed['val']['best_val_ppl']:.4f}",
        f"—train{listed['fast']['train_ppl']:.3f}",
        f"—train{listed['slow']['train_ppl']:.3f}",
    ]


def test_the_last_training_perplexity_is_read_from_the_tail_whatever_stands_at_metrics_jsonl(tmp_path: Path):
    """Only a metrics.jsonl's tail is read: a line starting exactly where the tail starts counts (it was
    dropped as a line's end), lines past the checkpoint beyond the first tail send the read further back,
    and a FIFO, a directory or a device is no figure, at once (a FIFO hung drnn runs: review rev39b)."""
    from drnn_cli.report import METRICS_TAIL_READS, EpochRecord, TailFigures, last_figures

    def line(step: int, ppl: float) -> str:
        return EpochRecord(1.0, ppl, None, 0.1, 1e4, 1.0, step, step * 80).to_json() + "\n"

    metrics = tmp_path / "metrics.jsonl"
    kept = line(10, 3.0)
    pad = (
        "x" * (METRICS_TAIL_READS[0] - len(kept) - 1) + "\n"
    )  # a torn line, then the kept one fills the tail
    metrics.write_text(line(5, 9.0) + pad + kept)
    assert metrics.stat().st_size == METRICS_TAIL_READS[0] + len(line(5, 9.0))
    assert last_figures(metrics, global_step=10, epoch=1) == TailFigures(3.0, None)
    past = "".join(line(11 + i, 2.0) for i in range(METRICS_TAIL_READS[0] // len(line(11, 2.0)) + 10))
    metrics.write_text(line(9, 4.0) + past)  # a killed session's lines past the checkpoint, over 64 KiB
    assert last_figures(metrics, global_step=10, epoch=1) == TailFigures(4.0, None)
    os.mkfifo(tmp_path / "fifo")
    started = time.monotonic()
    for other in (tmp_path / "fifo", tmp_path, Path("/dev/zero"), tmp_path / "missing"):
        assert last_figures(other, global_step=10, epoch=1) == TailFigures(None, None)
    assert time.monotonic() - started < 1


def test_a_best_validated_on_a_sample_is_marked_as_the_samples(workdir: Path, cli):
    """Under train.eval_tokens a run's best is the figure over the validation split's first N tokens,
    not the one drnn eval --split val prints (own40: 7.1946 listed where eval gives 7.2375): the table
    says "first N" under it and --json gives the predictions a validation read; a sample larger than
    the split reads all of it, and nothing is marked."""
    config = str(config_file(workdir, {**TINY_TREE, "train": {**TINY_TREE["train"], "epochs": 1}}))
    for name, sample in (("whole", 0), ("sampled", 100), ("larger", 100_000)):
        assert (
            cli("train", "--config", config, "--run", f"runs/{name}", f"--set=train.eval_tokens={sample}")[0]
            == 0
        )
    listed = {Path(run["run_dir"]).name: run for run in _listed(cli, "--sort", "name")}
    whole_split = listed["whole"]["val_tokens"]
    assert whole_split == 599  # 600 validation tokens of 3,000: 599 predictions
    assert (listed["sampled"]["val_tokens"], listed["larger"]["val_tokens"]) == (100, whole_split)
    code, out, err = cli("runs", "--sort", "name")
    assert code == 0, err
    # each row by its name (the latest mark and its settings under it)
    rows = {re.split(r"★|train\.", row[0])[0]: row for row in _rows(out.splitlines())}
    assert rows["runs/sampled"][3] == f"{listed['sampled']['best_val_ppl']:.4f}first100", out
    assert rows["runs/whole"][3] == f"{listed['whole']['best_val_ppl']:.4f}", out
    assert rows["runs/larger"][3] == f"{listed['larger']['best_val_ppl']:.4f}", out


def test_a_sweep_names_what_it_varied_and_runs_that_differ_in_much_are_counted(workdir: Path, cli):
    """Two runs that differ in lr and seed show both as --set takes them; a third with a GRU, another
    optimizer and more differs in too much for the table, which counts the settings instead."""
    config = str(config_file(workdir, {**TINY_TREE, "train": {**TINY_TREE["train"], "epochs": 1}}))
    for name, sets in (  # b's sample prefix is no setting of what it learns: not among the differences
        ("a", ("train.lr=0.02", "train.seed=4")),
        ("b", ('train.sample_prefixes=["the"]',)),
    ):
        code, _, err = cli(
            "train", "--config", config, "--run", f"runs/sweep/{name}", *(f"--set={s}" for s in sets)
        )
        assert code == 0, err
    assert {run["run_dir"]: run["differs"] for run in _listed(cli, "runs/sweep")} == {
        "runs/sweep/a": {"train.lr": 0.02, "train.seed": 4},
        "runs/sweep/b": {"train.lr": 0.01, "train.seed": 3},
    }
    code, out, err = cli("runs", "runs/sweep")
    assert code == 0 and "train.lr=0.02" in out and "train.seed=4" in out and "train.lr=0.01" in out, err
    other = ("train.optimizer=sgd", "train.lr=1", "train.clip=0.5", "data.num_steps=5", "data.batch_size=4")
    code, _, err = cli("train", "--config", config, "--run", "runs/sweep/c", *(f"--set={s}" for s in other))
    assert code == 0, err
    code, out, err = cli("runs", "runs/sweep")
    assert code == 0 and "train.lr=" not in out, err
    assert " ".join(out.split()).endswith("the runs differ in 6 other settings (drnn runs --json: differs)")
    differs = {run["run_dir"]: run["differs"] for run in _listed(cli, "runs/sweep")}
    assert list(differs["runs/sweep/c"]) == [
        "data.batch_size", "data.num_steps", "train.optimizer", "train.lr", "train.clip", "train.seed"
    ]  # fmt: skip


def test_a_folder_of_runs_listed_from_elsewhere_marks_its_own_latest_run(three_runs: Path, cli, monkeypatch):
    elsewhere = three_runs / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    listed = _listed(cli, str(three_runs / "runs"))
    assert [(Path(run["run_dir"]).name, run["latest"]) for run in listed] == [
        ("steps6", True),
        ("cut", False),
        ("tiny", False),
    ]
    # the caption says whose star it is: predict and eval here read ./runs/latest, which is not there
    monkeypatch.setenv("COLUMNS", "200")  # the caption on one line
    code, out, err = cli("runs", "../runs")
    assert code == 0, err
    assert out.splitlines()[-1].strip() == (
        "★ latest: the run ../runs/latest names; predict and eval without --run read runs/latest where "
        "they start"
    )
    # a runs/ of this folder's own naming the same run: the star is the one they use here
    (elsewhere / "runs").mkdir()
    (elsewhere / "runs" / "latest").write_text(str((three_runs / "runs/sweep/steps6").resolve()) + "\n")
    code, out, err = cli("runs", "../runs")
    assert code == 0, err
    assert out.splitlines()[-1].strip() == "★ latest: the run predict and eval use without --run"


def test_runs_of_one_run_directory_lists_it_and_a_run_in_a_deeper_folder_is_found(three_runs: Path, cli):
    assert [run["run_dir"] for run in _listed(cli, "runs/tiny")] == ["runs/tiny"]
    assert [run["run_dir"] for run in _listed(cli, "runs/sweep")] == ["runs/sweep/steps6", "runs/sweep/cut"]
    # a run's own folders and a hidden staging run (--overwrite's) are no runs of the listing
    staging = three_runs / "runs" / ".tiny.overwrite"
    staging.mkdir()
    (staging / "last.safetensors").write_bytes((three_runs / "runs/tiny/last.safetensors").read_bytes())
    assert [run["run_dir"] for run in _listed(cli)] == ["runs/sweep/steps6", "runs/sweep/cut", "runs/tiny"]
    # ... and said beside the run it would replace, as predict and eval say it
    code, _, err = cli("runs", "--json")
    assert code == 0 and (
        "note: runs/tiny: runs/.tiny.overwrite holds a newer run than this one, from a --overwrite session that "
        "was killed or is still training: drnn runs describes the older run"
    ) in " ".join(err.split()), err
    assert {run["run_dir"]: run["newer_run_waiting"] for run in _listed(cli)}["runs/tiny"].startswith(
        "runs/.tiny.overwrite holds a newer run"
    )
    # a link back up (a loop) and a second name of a run: each run once, by its own name
    (three_runs / "runs" / "sweep" / "up").symlink_to("..")
    (three_runs / "runs" / "also-tiny").symlink_to("tiny")
    assert [run["run_dir"] for run in _listed(cli)] == [
        "runs/sweep/steps6",
        "runs/sweep/cut",
        "runs/tiny",
    ]


def test_a_corrupt_checkpoint_is_a_row_that_says_why_not_a_failure(three_runs: Path, cli):
    (three_runs / "runs" / "tiny" / "last.safetensors").write_bytes(
        b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage"
    )
    code, out, err = cli("runs", "--json")
    assert code == 0, err
    runs = {os.path.relpath(run["run_dir"]): run for run in json.loads(out.splitlines()[-1])["runs"]}
    broken = runs["runs/tiny"]
    assert broken["state"] == "unreadable" and broken["cell"] is None and broken["epoch"] is None
    assert "runs/tiny/last.safetensors" in broken["problem"]
    assert f"note: runs/tiny: {broken['problem']}" in err  # --json moves the table and notes to stderr
    assert runs["runs/sweep/cut"]["state"] == "resumable"


def test_a_missing_folder_or_a_file_is_one_line(workdir: Path, cli):
    code, _, err = cli("runs")
    assert_one_line_error(code, err, "runs does not exist in", "drnn runs DIR")
    (workdir / "notes.txt").write_text("x")
    code, _, err = cli("runs", "notes.txt")
    assert_one_line_error(code, err, "notes.txt is not a folder")
    (workdir / "empty").mkdir()
    code, out, err = cli("runs", "empty")
    assert code == 0 and out.startswith("no runs in empty"), err


def test_an_early_stop_and_a_pending_boundary_read_as_train_resume_would(three_runs: Path):
    """finished_by follows Trainer._already_done: patience spent is an early stop; a boundary a signal
    cut short is left to do however far the run went."""
    from drnn_cli.run_list import describe_run

    tiny = describe_run(three_runs / "runs" / "tiny", None)
    assert tiny.counters is not None and tiny.info is not None
    running = dataclasses.replace(tiny, info=dataclasses.replace(tiny.info, epoch=2))
    assert (running.finished_by, running.state) == (None, "resumable")
    config = tiny.info.config
    patient = config.model_copy(update={"train": config.train.model_copy(update={"patience": 3})})
    patience = dataclasses.replace(tiny.info, epoch=2, config=patient)
    spent = dataclasses.replace(tiny, info=patience, counters=dataclasses.replace(tiny.counters, bad_evals=3))
    assert (spent.finished_by, spent.state) == ("patience", "early-stopped")
    pending = dataclasses.replace(tiny, counters=dataclasses.replace(tiny.counters, boundary_pending=True))
    assert (pending.finished_by, pending.state) == (None, "resumable")


def test_a_run_killed_before_its_first_last_checkpoint_is_stopped_not_resumable(three_runs: Path, cli):
    """red42: a run killed outright (kill -9) after a validation wrote best.safetensors, before its first
    last.safetensors, was listed resumable; --resume refuses it ("nothing to resume"). It is stopped, its
    row best's figures, as --resume and --init-from see it."""
    run = three_runs / "runs" / "tiny"
    (run / "last.safetensors").unlink()
    code, out, err = cli("runs", str(run), "--json")
    assert code == 0, err
    (listed,) = json.loads(out.splitlines()[-1])["runs"]
    assert (listed["state"], Path(listed["checkpoint"]).name) == ("stopped", "best.safetensors")
    code, _, err = cli("train", "--config", str(run / "config.yaml"), "--run", str(run), "--resume")
    assert code == 1 and "nothing to resume" in err


@pytest.mark.skipif(sys.platform == "win32", reason="flock")
def test_a_run_a_live_training_holds_is_training_and_a_stale_lock_file_is_not(
    three_runs: Path, cli, monkeypatch
):
    """The lock file names its last holder; only a live process that still holds the flock is training."""
    lock = three_runs / "runs" / "tiny" / "train.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time; f = open(sys.argv[1], 'rb'); fcntl.flock(f, fcntl.LOCK_EX); "
            "print('held', flush=True); time.sleep(60)",
            str(lock),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        lock.write_text(f"{socket.gethostname()} {holder.pid}\n")
        probed = rundir._flock_probed
        if Path("/proc/locks").is_file():  # Linux: the holder is read there, no lock taken to ask
            monkeypatch.setattr(rundir, "_flock_probed", _never)
        tiny = {run["run_dir"]: run for run in _listed(cli)}["runs/tiny"]
        assert (tiny["state"], tiny["training_process"]) == ("training", f"process {holder.pid}")
        monkeypatch.setattr(rundir, "_flock_probed", probed)
        # /proc/locks lists only the locks of processes this pid namespace sees: its silence is not a "no"
        monkeypatch.setattr(rundir, "_flock_listed", lambda path, pid: False)
        assert {run["run_dir"]: run for run in _listed(cli)}["runs/tiny"]["state"] == "training"
        # an --overwrite training's staging run beside it, before its first checkpoint
        (three_runs / "runs" / ".tiny.overwrite").mkdir()
        code, out, err = cli("runs", "runs/tiny")
        assert code == 0 and "a --overwrite training (process" in " ".join(out.split()), err
        # a training that has written no checkpoint yet (nor drnn's mark: it is reading its text) is listed
        starting = three_runs / "runs" / "starting"
        starting.mkdir()
        os.replace(lock, starting / "train.lock")  # the holder's lock, by the file it holds
        listed = {run["run_dir"]: run for run in _listed(cli)}
        assert (listed["runs/starting"]["state"], listed["runs/starting"]["problem"]) == ("training", None)
        assert (
            listed["runs/starting"]["updated"] is not None
        )  # when it began: "the newest first" puts it first
        code, out, err = cli("runs", "runs/starting")
        assert code == 0 and _rows(out.splitlines())[0][1:3] == ["", "nocheckpointyettraining"], err
        os.replace(starting / "train.lock", lock)
    finally:
        holder.kill()
        holder.wait()
    assert {run["run_dir"]: run for run in _listed(cli)}["runs/tiny"]["state"] == "finished"  # it is gone
    assert "runs/starting" not in {run["run_dir"] for run in _listed(cli)}  # no checkpoint, no training
    # a live process named by a lock nobody holds (this test's parent: a reused process id) is no training
    lock.write_text(f"{socket.gethostname()} {os.getppid()}\n")
    assert {run["run_dir"]: run for run in _listed(cli)}["runs/tiny"]["state"] == "finished"


def test_the_best_is_best_safetensors_own_figure_where_a_validation_followed_the_last_write(
    workdir: Path, cli
):
    """A time budget's final validation comes after the run's last `last` write: `last`'s header has
    no best yet (a resume reads best.safetensors for it), so the listing reads best's own header."""
    from drnn_cli.checkpoint import read_checkpoint_info

    config = str(config_file(workdir, TINY_TREE))
    code, _, err = cli("train", "--config", config, "--set", "train.max_time=0.000001")
    assert code == 0, err
    run = workdir / "runs" / "tiny"
    best = read_checkpoint_info(run / "best.safetensors").best_val_ppl
    assert read_checkpoint_info(run / "last.safetensors").best_val_ppl is None and best is not None
    assert _listed(cli)[0]["best_val_ppl"] == best


def test_sort_best_puts_the_lowest_best_validation_first_and_runs_without_one_last(three_runs: Path, cli):
    runs = {run["run_dir"]: run for run in _listed(cli)}
    config = str(config_file(three_runs, {**TINY_TREE, "data": {**TINY_TREE["data"], "val_fraction": 0}}))
    code, _, err = cli("train", "--config", config, "--run", "runs/noval", "--set", "train.epochs=1")
    assert code == 0, err
    ranked = sorted(
        (run["best_val_ppl"], name) for name, run in runs.items() if run["best_val_ppl"] is not None
    )
    best_first = [run["run_dir"] for run in _listed(cli, "--sort", "best")]
    assert best_first == [name for _, name in ranked] + ["runs/noval"]
    assert [run["run_dir"] for run in _listed(cli, "--sort", "name")] == sorted(best_first)
    code, out, err = cli("runs", "--sort", "best")
    assert code == 0 and out.splitlines()[0].strip() == "runs in runs, the best first", err


def test_sort_best_ranks_each_texts_runs_apart(workdir: Path, cli):
    """Perplexities over other tokens do not rank against each other (prac39: --sort best listed runs
    on two texts in one order). Each text's runs stay together, best first, the text of the lowest
    figure first, a rule between texts and a caption saying why: the same text read into other splits,
    or validated on its first 50 tokens alone, is another text here; another data.min_freq that leaves
    the vocabulary as it was is not (review rev40). A run that cannot be read comes last, of no text."""
    other = workdir / "other.txt"
    other.write_text("abcab cabba " * 400)
    config = str(config_file(workdir, {**TINY_TREE, "train": {**TINY_TREE["train"], "epochs": 1}}))
    for name, extra in (
        ("tm-slow", ["--set=train.lr=0.0001"]),
        ("easy", [f"--set=data.path={other}"]),
        ("tm-fast", []),
        ("tm-half", ["--set=data.val_fraction=0.5"]),
        ("tm-rare", ["--set=data.min_freq=2"]),  # every letter occurs twice: the same 28 tokens
        ("tm-50", ["--set=train.eval_tokens=50"]),
    ):
        assert cli("train", "--config", config, "--run", f"runs/{name}", *extra)[0] == 0
    broken = workdir / "runs" / "broken"
    broken.mkdir()
    (broken / "last.safetensors").write_bytes(b"not a checkpoint")
    listed = _listed(cli, "--sort", "best")
    best = {Path(run["run_dir"]).name: run["best_val_ppl"] for run in listed}
    assert best["tm-rare"] == best["tm-fast"] and best["tm-slow"] > best["tm-fast"], best
    texts = [["easy"], ["tm-fast", "tm-rare", "tm-slow"], ["tm-half"], ["tm-50"]]
    texts = [sorted(runs, key=lambda name: best[name]) for runs in texts]
    texts.sort(key=lambda runs: best[runs[0]])
    assert texts[0] == ["easy"]  # a repeated pattern: the lowest
    names = [Path(run["run_dir"]).name for run in listed]
    assert names[-1] == "broken", names
    # runs of equal figures (tm-fast, tm-rare) in either order
    assert [sorted(names[i : i + len(runs)]) for i, runs in _starts(texts)] == [sorted(r) for r in texts]
    ids = {Path(run["run_dir"]).name: run["scored_on"] for run in listed}
    assert ids["tm-fast"] == ids["tm-rare"] == ids["tm-slow"] and ids["broken"] is None
    assert len({ids[name] for name in ("easy", "tm-fast", "tm-half", "tm-50")}) == 4
    code, out, err = cli("runs", "--sort", "best")
    assert code == 0, err
    lines = out.splitlines()
    rules = [index for index, line in enumerate(lines) if line.startswith("├")]
    # after each text but the last (none before the unreadable run)
    assert len(rules) == 3, out
    for index, runs in zip(rules, texts[1:], strict=True):
        assert lines[index + 1].split("│")[1].split()[0] in {f"runs/{name}" for name in runs}, out
    assert "ranked apart: 4 texts or splits, whose perplexities do not compare" in " ".join(out.split())
    code, out, err = cli("runs")  # the newest first: no rule, no caption
    assert code == 0 and not any(line.startswith("├") for line in out.splitlines()), out
    assert "ranked apart" not in out


def _starts(groups: list[list[str]]) -> list[tuple[int, list[str]]]:
    """Each group with the index of its first name in the groups laid end to end."""
    starts, at = [], 0
    for group in groups:
        starts.append((at, group))
        at += len(group)
    return starts


def test_a_best_no_validation_gives_is_no_figure_and_ranks_last(three_runs: Path, cli):
    """A tampered header's NaN would make the order depend on where it stood (NaN compares false), and
    a best below 1 would rank first; neither is a perplexity: no figure, with a note naming the file."""
    from drnn_cli.checkpoint import read_checkpoint_info

    runs = three_runs / "runs"
    for name, figure in (("nan", math.nan), ("negative", -5.0), ("inf", math.inf)):
        time.sleep(0.02)  # distinct modification times
        shutil.copytree(runs / "tiny", runs / name)
        for file in ("best.safetensors", "last.safetensors"):
            rewrite_checkpoint(
                runs / "tiny" / file,
                runs / name / file,
                edit_header=lambda h, f=figure: h.update(best_val_ppl=f),
            )
    tiny = read_checkpoint_info(runs / "tiny" / "best.safetensors").best_val_ppl
    ranked = [(run["run_dir"], run["best_val_ppl"]) for run in _listed(cli, "--sort", "best")]
    assert ("runs/tiny", tiny) in ranked[:3] and ranked[3:] == [
        ("runs/inf", None),  # without a figure: the newest first
        ("runs/negative", None),
        ("runs/nan", None),
    ]
    code, out, err = cli("runs")
    assert code == 0 and (
        "note: runs/negative: runs/negative/best.safetensors names a best validation perplexity of -5.0, "
        "which no validation gives"
    ) in " ".join(out.split()), err
    # without a best.safetensors the figure is last's, and the note names that file (red41)
    (runs / "negative" / "best.safetensors").unlink()
    code, out, err = cli("runs")
    assert code == 0 and (
        "note: runs/negative: runs/negative/last.safetensors names a best validation perplexity of -5.0, "
        "which no validation gives"
    ) in " ".join(out.split()), err


def test_a_folder_this_user_may_not_search_is_left_out_not_a_failure(three_runs: Path, cli, monkeypatch):
    """chmod 000 makes stat inside a folder raise PermissionError (root, which runs CI, is never refused:
    the refusal is simulated where the listing asks)."""
    from drnn_cli import run_list

    (three_runs / "runs" / "locked").mkdir()
    searched = run_list.holds_run

    def refusing(folder: Path) -> bool:
        if folder.name == "locked":
            raise PermissionError(13, "Permission denied", str(folder))
        return searched(folder)

    monkeypatch.setattr(run_list, "holds_run", refusing)
    assert [run["run_dir"] for run in _listed(cli)] == ["runs/sweep/steps6", "runs/sweep/cut", "runs/tiny"]
    assert [run["run_dir"] for run in _listed(cli, "runs/locked")] == []


# What a red team of `drnn runs` found (each test fails without its fix)


def _run_in_thread(call, seconds: float = 60.0):
    """``call()``'s result, or a failure where it has not returned within ``seconds`` (a hang)."""
    import threading

    result: list = []
    worker = threading.Thread(target=lambda: result.append(call()), daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), "hung"
    return result[0]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes")
def test_a_pipe_where_a_lock_or_a_checkpoint_belongs_is_said_never_waited_on(three_runs: Path, cli):
    """Opening a FIFO to read waits for a writer: a listing that opened one hung, and a pipe as
    last.safetensors read as a run with no checkpoint ("does not exist" to --resume)."""
    runs = three_runs / "runs"
    os.unlink(runs / "tiny" / "train.lock")
    os.mkfifo(runs / "tiny" / "train.lock")
    os.unlink(runs / "sweep" / "cut" / "last.safetensors")
    os.mkfifo(runs / "sweep" / "cut" / "last.safetensors")
    listed = {run["run_dir"]: run for run in _run_in_thread(lambda: _listed(cli))}
    assert listed["runs/tiny"]["state"] == "finished"
    cut = listed["runs/sweep/cut"]
    assert cut["state"] == "unreadable" and cut["best_val_ppl"] is None
    assert cut["problem"].endswith(
        "cut/last.safetensors is a FIFO, not a regular file; train first or pass --run DIR / --checkpoint FILE"
    )
    config = str(config_file(three_runs, TINY_TREE))
    code, _, err = cli("train", "--config", config, "--run", "runs/sweep/cut", "--resume")
    assert_one_line_error(
        code,
        err,
        "checkpoint runs/sweep/cut/last.safetensors is a FIFO, not a regular file; resume from its best "
        "checkpoint instead (cp runs/sweep/cut/best.safetensors runs/sweep/cut/last.safetensors), or start "
        "over with --overwrite",
    )


def test_a_lock_file_naming_no_pid_drnn_wrote_is_no_training(three_runs: Path, cli):
    """ "²" is a digit to str.isdigit() and no number to int(): it failed the whole listing."""
    lock = three_runs / "runs" / "tiny" / "train.lock"
    for pid in ("²", "١٢", "-4", "99999999999999999999999"):
        lock.write_text(f"{socket.gethostname()} {pid}\n", encoding="utf-8")
        tiny = {run["run_dir"]: run for run in _listed(cli)}["runs/tiny"]
        assert (tiny["state"], tiny["training_process"]) == ("finished", None), pid


def test_names_are_shown_on_one_line_escaped_whatever_bytes_they_hold(three_runs: Path, cli):
    """A name that is not UTF-8 crashed a strict UTF-8 terminal (a lone surrogate); a newline in one
    made a second line that read as the row's "★ latest"; an escape in FOLDER reached the terminal."""
    runs = three_runs / "runs"
    for name in (b"bad\xff", b"a\n\xe2\x98\x85 latest"):
        os.makedirs(os.fsencode(runs) + b"/" + name)
        shutil.copy(
            runs / "tiny" / "last.safetensors", os.fsencode(runs) + b"/" + name + b"/last.safetensors"
        )
    code, out, err = cli("runs")
    assert code == 0, err
    out.encode("utf-8")  # strict: no lone surrogate
    assert "│ runs/bad\\xff" in out and "│ runs/a\\n★ latest" in out  # the byte a name holds
    assert sum(line.startswith("│ ★ latest") for line in out.splitlines()) == 1  # the latest run's own
    escape = three_runs / "E\x1b[2J"
    escape.mkdir()
    code, out, err = cli("runs", str(escape.name))
    assert code == 0 and out.startswith("no runs in E\\x1b[2J ("), err


def test_a_header_with_training_times_no_training_took_lists_without_a_time(
    three_runs: Path, cli, monkeypatch
):
    """1e308 + 1e308 seconds is infinity, which the wide table's time column could not print."""
    runs = three_runs / "runs"

    def elapsed(header: dict) -> None:
        header["trainer_state"]["__dict__"] = [
            [key, 1e308 if key == "elapsed" else value] for key, value in header["trainer_state"]["__dict__"]
        ]

    rewrite_checkpoint(
        runs / "tiny" / "last.safetensors", runs / "tiny" / "last.safetensors", edit_header=elapsed
    )
    monkeypatch.setenv("COLUMNS", "200")
    code, out, err = cli("runs", "--json")
    assert code == 0, err
    tiny = {run["run_dir"]: run for run in json.loads(out.splitlines()[-1])["runs"]}
    assert [(r["state"], r["training_seconds"]) for r in tiny.values() if r["run_dir"].endswith("tiny")] == [
        ("finished", None)
    ]


def test_a_link_deep_in_one_folder_does_not_hide_the_runs_of_another(three_runs: Path, cli):
    """F/alpha/b/c -> F/beta was reached at its last level first and marked searched: F/beta/r1, a
    real folder, went unlisted."""
    root = three_runs / "F"
    (root / "alpha" / "b").mkdir(parents=True)
    (root / "beta" / "r1").mkdir(parents=True)
    shutil.copy(three_runs / "runs" / "tiny" / "last.safetensors", root / "beta" / "r1")
    (root / "alpha" / "b" / "c").symlink_to("../../beta")
    assert [run["run_dir"] for run in _listed(cli, "F")] == ["F/beta/r1"]


def test_at_80_columns_a_long_name_folds_and_leaves_the_other_columns_their_room(
    three_runs: Path, cli, monkeypatch
):
    monkeypatch.setenv("COLUMNS", "80")
    deep = three_runs / "home" / "me" / "projects" / "char-rnn-experiments"
    deep.mkdir(parents=True)
    shutil.copytree(three_runs / "runs", deep / "runs", symlinks=True)
    code, out, err = cli("runs", str(deep / "runs"))
    assert code == 0 and max(len(line) for line in out.splitlines()) <= 80, err
    rows = _rows(out.splitlines())
    assert [row[0] for row in rows] == [  # each name folded, over its setting
        str(deep / "runs" / name) + f"train.max_time={time}"
        for name, time in (("sweep/steps6", "0"), ("sweep/cut", "1e-06"), ("tiny", "0"))
    ]
    assert [row[2] for row in rows] == [
        "6/6stepsfinished",
        "0/4epochs+1stepsresumable(max_time)",
        "4/4epochsfinished",
    ]
    assert [row[1] for row in rows] == ["lstm2×32timemachine"] * 3


def test_a_corrupt_best_leaves_no_figure_eval_could_not_reproduce(three_runs: Path, cli):
    """drnn eval --run reads best.safetensors: a figure from last's header would be one it cannot give."""
    best = three_runs / "runs" / "tiny" / "best.safetensors"
    data = best.read_bytes()
    kept = 8 + int.from_bytes(data[:8], "little") + 100  # the length, the header, 100 bytes of tensors
    best.write_bytes(data[:kept])
    tiny = {run["run_dir"]: run for run in _listed(cli)}["runs/tiny"]
    assert (tiny["state"], tiny["best_val_ppl"]) == ("finished", None)
    assert tiny["problem"] == (
        f"checkpoint runs/tiny/best.safetensors is cut short: it holds {kept:,} of the {len(data):,} bytes its header "
        "announces; retrain or pick another file"
    )
    code, out, err = cli("runs")
    assert code == 0 and _rows(out.splitlines())[2][3] == "", err  # blank: no figure, and not "—" (no split)


def _never(*args: object) -> bool:
    raise AssertionError("a listing took the run's lock to ask whether a training holds it")


@pytest.mark.skipif(sys.platform == "win32", reason="flock")
def test_a_training_waits_out_a_listing_that_asks_with_the_lock_itself(three_runs: Path):
    """Without /proc/locks a listing asks by taking a shared flock and dropping it: a training starting in
    that instant waits for it (it was refused as if the run were busy: 115 of 11,593 starts in a loop)."""
    import fcntl
    import threading

    from drnn_cli.rundir import RunLock

    run = three_runs / "runs" / "tiny"
    with (run / "train.lock").open("rb") as probe:
        fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
        threading.Timer(0.1, fcntl.flock, (probe, fcntl.LOCK_UN)).start()
        with RunLock(run) as lock:
            assert lock.held


def test_progress_is_counted_in_what_ended_the_run_and_a_replaced_run_says_so(three_runs: Path):
    """train.max_steps beyond the run's epochs: it finished its epochs, which "8/100 steps" hid; a
    newer run a live --overwrite training stages beside it is put in place by that training."""
    from drnn_cli.run_list import describe_run

    tiny = describe_run(three_runs / "runs" / "tiny", None)
    assert tiny.info is not None and tiny.trained() == "4/4 epochs"
    config = tiny.info.config

    def with_max_steps(steps: int, epoch: int):
        train = config.train.model_copy(update={"max_steps": steps})
        info = dataclasses.replace(tiny.info, epoch=epoch, config=config.model_copy(update={"train": train}))
        return dataclasses.replace(tiny, info=info)

    assert (with_max_steps(1000, 4).trained(), with_max_steps(1000, 4).finished_by) == (
        "4/4 epochs",
        "epochs",
    )
    assert (with_max_steps(1000, 2).trained(), with_max_steps(1000, 2).state) == (
        "116/1,000 steps",
        "resumable",
    )
    assert (with_max_steps(116, 3).trained(), with_max_steps(116, 3).finished_by) == (
        "116/116 steps",
        "max_steps",
    )
    waiting = dataclasses.replace(tiny, waiting="runs/.tiny.overwrite holds a newer run")
    assert waiting.notes() == ["runs/.tiny.overwrite holds a newer run"]
    assert dataclasses.replace(waiting, training="process 12").notes() == [
        "a --overwrite training (process 12) is replacing this run; the row is the run it replaces"
    ]


def test_a_fine_tuned_run_names_its_start(three_runs: Path, cli):
    """--json's init_from, as the header records it; the table's "from runs/base" under the text (the
    base's folder, relative to the working directory where it lies below it)."""
    runs = three_runs / "runs"
    last = runs / "tiny" / "last.safetensors"
    base = runs / "sweep" / "steps6" / "best.safetensors"
    rewrite_checkpoint(last, last, edit_header=lambda header: header.update(init_from=str(base)))
    listed = {run["run_dir"]: run["init_from"] for run in _listed(cli)}
    assert listed == {"runs/tiny": str(base), "runs/sweep/cut": None, "runs/sweep/steps6": None}
    code, out, err = cli("runs", "runs/tiny")
    assert code == 0 and _rows(out.splitlines())[0][1] == "lstm2×32timemachinefromruns/sweep/steps6", err
    rewrite_checkpoint(
        last, last, edit_header=lambda header: header.update(init_from="/data/base/best.safetensors")
    )
    code, out, err = cli("runs", "runs/tiny")
    assert code == 0 and _rows(out.splitlines())[0][1] == "lstm2×32timemachinefrom/data/base", err


def test_why_a_run_stopped_is_said_a_divergence_and_a_signal_apart_from_a_budget(
    three_runs: Path, cli, monkeypatch
):
    """A checkpoint says how far a run trained, not why it stopped: a loss gone NaN left a run that read
    "resumable" like a time budget's. The record names the step its session ended at: a later session
    killed outright (no record) has trained past it, and it no longer speaks of the run."""
    from drnn_cli.stop_record import StopRecord, read_stop_record

    config = str(config_file(three_runs, TINY_TREE))
    poison_after_epoch(monkeypatch, 5)  # the fifth epoch (the first this session trains) ends NaN
    code, _, err = cli(
        "train", "--config", config, "--run", "runs/tiny", "--resume", "--set", "train.epochs=6"
    )
    assert code != 0 and "NaN" in err, err
    record = read_stop_record(three_runs / "runs" / "tiny")
    assert record is not None and (record.stopped_by, record.global_step) == ("diverged", 6 * 29)
    tiny = {run["run_dir"]: run for run in _listed(cli)}["runs/tiny"]
    # the checkpoint is the one the session started from (4 of its 4 planned epochs), its news the divergence
    assert (tiny["state"], tiny["stopped_by"], tiny["global_step"]) == ("diverged", "diverged", 4 * 29)
    code, out, err = cli("runs", "runs/tiny")
    assert code == 0 and _rows(out.splitlines())[0][2] == "4/4epochsdiverged", err
    # a record older than the checkpoint (its session killed by SIGKILL after a later checkpoint)
    stop = three_runs / "runs" / "tiny" / "stopped.json"
    stop.write_text('{"stopped_by": "SIGINT", "global_step": 100}\n')
    tiny = {run["run_dir"]: run for run in _listed(cli)}["runs/tiny"]
    assert (tiny["state"], tiny["stopped_by"]) == ("finished", None)
    cut = three_runs / "runs" / "sweep" / "cut"  # stopped by its time budget at its first step
    (cut / "stopped.json").write_text('{"stopped_by": "SIGINT", "global_step": 1}\n')
    code, out, err = cli("runs", "runs/sweep/cut")
    assert code == 0 and _rows(out.splitlines())[0][2] == "0/4epochs+1stepsresumable(SIGINT)", err
    for tampered in (
        "[1]",
        '{"stopped_by": "rm -rf", "global_step": 116}',
        '{"stopped_by": "SIGINT", "global_step": true}',
    ):
        stop.write_text(tampered)
        assert read_stop_record(three_runs / "runs" / "tiny") is None, tampered
    # a resumed session removes its predecessor's record as it starts: killed outright, it leaves none
    from drnn_cli.train import Trainer

    fit = Trainer.fit

    def fit_after_looking(self):
        assert not stop.exists(), "the record of the session before was there as this one trained"
        return fit(self)

    monkeypatch.setattr(Trainer, "fit", fit_after_looking)
    code, _, err = cli("train", "--config", config, "--run", "runs/tiny", "--resume")
    assert code == 0 and read_stop_record(three_runs / "runs" / "tiny") == StopRecord("epochs", 4 * 29), err
    stop.unlink()
    os.mkfifo(stop)  # a pipe where the record belongs: never opened to wait
    assert _run_in_thread(lambda: read_stop_record(three_runs / "runs" / "tiny")) is None


def test_a_run_that_diverged_before_its_first_checkpoint_is_listed_as_such(
    three_runs: Path, cli, monkeypatch
):
    """A sweep's learning rate far too high diverges in its first epoch, before any checkpoint: left out,
    the listing hid the sweep's failure."""
    config = str(config_file(three_runs, TINY_TREE))
    poison_after_epoch(monkeypatch, 1)
    code, _, err = cli("train", "--config", config, "--run", "runs/sweep/lr1000")
    assert code != 0 and "NaN" in err, err
    assert not (three_runs / "runs" / "sweep" / "lr1000" / "last.safetensors").exists()
    listed = {run["run_dir"]: run for run in _listed(cli, "runs/sweep", "--sort", "best")}
    failed = listed["runs/sweep/lr1000"]
    assert (failed["state"], failed["stopped_by"], failed["checkpoint"], failed["problem"]) == (
        "diverged",
        "diverged",
        None,
        None,
    )
    code, out, err = cli("runs", "runs/sweep/lr1000")
    assert code == 0 and _rows(out.splitlines())[0][2] == "nocheckpointdiverged", err


def test_a_second_ctrl_c_leaves_its_record_and_an_overwrite_says_which_run_stays(
    three_runs: Path, cli, monkeypatch
):
    """Pressed twice, a training ends at once (Signalled): stopped.json was left unwritten ("resumable" with
    no reason), and an --overwrite's bare "interrupted" line did not say the old run was kept."""
    import signal

    from drnn_cli.signals import Signalled
    from drnn_cli.stop_record import StopRecord, read_stop_record
    from drnn_cli.train import Trainer
    from drnn_cli.train_session import TrainRequest, train_run

    def pressed_twice(self):
        raise Signalled(signal.SIGINT)

    monkeypatch.setattr(Trainer, "fit", pressed_twice)
    config = config_file(three_runs, TINY_TREE)
    cut = Path("runs/sweep/cut")
    with pytest.raises(Signalled):
        train_run(TrainRequest(config, ("train.max_time=0",), run_dir=cut, resume=True))
    assert read_stop_record(cut) == StopRecord("SIGINT", 1)  # at the step it had reached
    before = (three_runs / "runs" / "tiny" / "last.safetensors").read_bytes()
    with pytest.raises(Signalled) as stopped:
        train_run(TrainRequest(config, run_dir=Path("runs/tiny"), overwrite=True))
    assert stopped.value.after == "no checkpoint was written, and runs/tiny keeps the run it held"
    assert (three_runs / "runs" / "tiny" / "last.safetensors").read_bytes() == before
    assert not (three_runs / "runs" / ".tiny.overwrite").exists()


def test_a_run_stopped_before_its_first_checkpoint_is_listed_as_stopped(workdir: Path, cli, monkeypatch):
    """Ctrl-C before a run's first checkpoint left a run folder (its config and stop record) that drnn
    runs listed nowhere: "no runs in runs/E" (own40). It is listed, with no checkpoint, stopped and why."""
    import signal

    from drnn_cli.signals import Signalled
    from drnn_cli.train import Trainer

    def pressed_twice(self):
        raise Signalled(signal.SIGINT)

    monkeypatch.setattr(Trainer, "fit", pressed_twice)
    config = str(config_file(workdir, TINY_TREE))
    code, _, err = cli("train", "--config", config, "--run", "runs/early")
    assert code == 130, err
    assert not (workdir / "runs" / "early" / "last.safetensors").exists()
    [run] = _listed(cli)
    assert (run["run_dir"], run["state"], run["stopped_by"], run["checkpoint"]) == (
        "runs/early",
        "stopped",
        "SIGINT",
        None,
    )
    code, out, err = cli("runs", "runs/early")
    assert code == 0 and _rows(out.splitlines())[0][2] == "nocheckpointstopped(SIGINT)", out


def test_a_run_with_a_validation_split_not_yet_read_says_so_not_that_it_has_none(three_runs: Path, cli):
    """ "—" is the mark of a run without a validation split; one that has a split but stopped before its
    first validation showed it too (drnn eval --split val of it gives a figure)."""
    runs = three_runs / "runs"
    shutil.copytree(runs / "tiny", runs / "young")
    (runs / "young" / "best.safetensors").unlink()
    last = runs / "young" / "last.safetensors"
    rewrite_checkpoint(last, last, edit_header=lambda header: header.update(best_val_ppl=None))
    code, out, err = cli("runs", "runs/young")
    assert code == 0 and _rows(out.splitlines())[0][3] == "notyet", err
    config = str(config_file(three_runs, {**TINY_TREE, "data": {**TINY_TREE["data"], "val_fraction": 0}}))
    code, _, err = cli("train", "--config", config, "--run", "runs/noval", "--set", "train.epochs=1")
    assert code == 0, err
    code, out, err = cli("runs", "runs/noval")
    assert code == 0 and _rows(out.splitlines())[0][3].startswith("—train"), err
