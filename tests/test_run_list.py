"""`drnn runs`: every run below a folder, described from its checkpoint's header, newest first."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY_TREE, assert_one_line_error, config_file


def _listed(cli, *args: str) -> list[dict]:
    code, out, err = cli("runs", *args, "--json")
    assert code == 0, err
    return json.loads(out.splitlines()[-1])["runs"]


def _rows(lines: list[str]) -> list[list[str]]:
    """The table's rows, each cell's lines joined, spaces left out: a cell wraps at its spaces, or folds
    a word, as the columns allow."""
    rows: list[list[list[str]]] = []
    for line in lines:
        if not line.startswith("│"):
            continue
        cells = [cell.strip() for cell in line.split("│")[1:-1]]
        if cells[0] and not cells[0].startswith("★"):
            rows.append([[] for _ in cells])
        for parts, cell in zip(rows[-1], cells, strict=True):
            if cell:
                parts.append(cell)
    return [["".join(parts).replace(" ", "") for parts in row] for row in rows]


@pytest.fixture
def three_runs(workdir: Path, cli) -> Path:
    """runs/tiny (4 of 4 epochs), runs/sweep/cut (one step of a run a time budget cut: resumable),
    runs/sweep/steps6 (6 of its 6 steps), trained in that order; the last is the latest run."""
    config = str(config_file(workdir, TINY_TREE))
    for extra in (
        (),
        ("--run", "runs/sweep/cut", "--set", "train.max_time=0.000001"),
        ("--run", "runs/sweep/steps6", "--set", "train.max_steps=6"),
    ):
        code, _, err = cli("train", "--config", config, *extra)
        assert code == 0, err
        time.sleep(0.02)  # distinct modification times, whatever the filesystem's clock resolution
    return workdir


def test_runs_lists_each_run_newest_first_with_its_progress_and_state(three_runs: Path, cli):
    runs = _listed(cli)
    assert [(run["run_dir"], run["state"], run["finished_by"], run["latest"]) for run in runs] == [
        ("runs/sweep/steps6", "finished", "max_steps", True),
        ("runs/sweep/cut", "resumable", None, False),
        ("runs/tiny", "finished", "epochs", False),
    ]
    steps6, cut, tiny = runs
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
    """At 80 columns a run is its model over its text over the setting the runs differ in (the budget of
    runs/sweep/cut: a sweep's lr or seed), its progress over its state; the names stay whole."""
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
        ["runs/sweep/steps6★latest", "lstm2×32timemachinetrain.max_time=0", "6/6stepsfinished", best[0], written[0]],
        ["runs/sweep/cut", "lstm2×32timemachinetrain.max_time=1e-06", "0/4epochs+1stepsresumable", best[1], written[1]],
        ["runs/tiny", "lstm2×32timemachinetrain.max_time=0", "4/4epochsfinished", best[2], written[2]],
    ]  # fmt: skip
    names = [line.split("│")[1].strip() for line in lines if line.startswith("│ runs/")]
    assert names == ["runs/sweep/steps6", "runs/sweep/cut", "runs/tiny"]  # whole: the other cells wrap
    assert [run["differs"] for run in listed] == [
        {"train.max_time": 0.0},
        {"train.max_time": 1e-06},
        {"train.max_time": 0.0},
    ]


def test_a_sweep_names_what_it_varied_and_runs_that_differ_in_much_are_counted(workdir: Path, cli):
    """Two runs that differ in lr and seed show both as --set takes them; a third with a GRU, another
    optimizer and more differs in too much for the table, which counts the settings instead."""
    config = str(config_file(workdir, {**TINY_TREE, "train": {**TINY_TREE["train"], "epochs": 1}}))
    for name, sets in (
        ("a", ("train.lr=0.02", "train.seed=4")),
        ("b", ()),
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
    runs = {run["run_dir"]: run for run in json.loads(out.splitlines()[-1])["runs"]}
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
    assert_one_line_error(code, err, "notes.txt is a file")
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


@pytest.mark.skipif(sys.platform == "win32", reason="flock")
def test_a_run_a_live_training_holds_is_training_and_a_stale_lock_file_is_not(three_runs: Path, cli):
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
        tiny = {run["run_dir"]: run for run in _listed(cli)}["runs/tiny"]
        assert (tiny["state"], tiny["training_process"]) == ("training", f"process {holder.pid}")
    finally:
        holder.kill()
        holder.wait()
    assert {run["run_dir"]: run for run in _listed(cli)}["runs/tiny"]["state"] == "finished"  # it is gone
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


def test_sort_best_ranks_a_non_finite_best_as_none():
    """A tampered header's NaN would make the order depend on where it stood (NaN compares false)."""
    from drnn_cli.run_list import RunSummary, _order_key

    def run(name: str, best: float | None, updated: float) -> RunSummary:
        return RunSummary(Path(name), False, None, updated, None, None, None, best_val_ppl=best)

    runs = [run("nan", math.nan, 4.0), run("b", 3.0, 3.0), run("none", None, 5.0), run("a", 2.0, 1.0)]
    runs += [run("inf", math.inf, 2.0)]
    assert [str(r.run_dir) for r in sorted(runs, key=_order_key("best"))] == ["a", "b", "none", "nan", "inf"]


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
