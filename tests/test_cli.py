"""The command-line contract of README "Commands": commands, flags, --json last lines, the latest run."""

from __future__ import annotations

import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from conftest import TINY_TREE, config_file

from drnn_cli import __version__

if TYPE_CHECKING:
    from drnn_cli.render import RichReporter
    from drnn_cli.report import RunStart

REPO = Path(__file__).resolve().parents[1]


def drnn(workdir: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The real program, as a user runs it (python -m drnn_cli ≡ the drnn console script)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "drnn_cli", *args],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_help_lists_the_four_commands_and_version_prints_it(workdir: Path):
    helped = drnn(workdir, "--help")
    assert helped.returncode == 0
    for command in ("data", "train", "predict", "eval"):
        assert f"  {command} " in helped.stdout
    version = drnn(workdir, "--version")
    assert version.returncode == 0 and version.stdout.strip() == f"drnn {__version__}"


@pytest.mark.parametrize("command", ["data", "train", "predict", "eval"])
def test_every_command_has_help_with_an_example(cli, command: str):
    code, out, _ = cli(command, "--help")
    assert code == 0 and "Example: drnn " + command in out


def test_no_arguments_prints_help(cli):
    code, out, _ = cli()
    assert code == 0 and "Usage: drnn" in out


def test_seed_config_trains_one_epoch_then_predict_and_eval_use_the_latest_run(workdir: Path, cli):
    """In one process (the real program's entry point is tested above and by the installed wheel)."""
    code, out, err = cli(
        "train", "--config", str(REPO / "configs" / "lstm2.yaml"), "--set", "train.epochs=1", "--device", "cpu",
        "--json",
    )  # fmt: skip
    assert code == 0, err
    summary = last_json(out)
    assert (
        summary["run_dir"] == str(workdir / "runs" / "lstm2")
        and summary["epochs"] == 1
        and summary["world_size"] == 1
    )
    assert 10 < summary["train_ppl"] < 28  # one epoch of SGD: somewhere below uniform guessing (28)
    assert set(summary["samples"]) == {"time traveller", "traveller"}
    assert "826,396 parameters" in err and "perplexity" in err

    code, out, err = cli("predict", "time traveller", "-n", "12", "--json")
    assert code == 0, err
    assert last_json(out)["text"].startswith("time traveller")
    assert len(last_json(out)["text"]) == len("time traveller") + 12

    code, out, err = cli("eval", "--json")
    assert code == 0, err
    report = last_json(out)
    assert report["split"] == "train" and report["epoch"] == 1 and report["tokens"] == 9999
    assert report["checkpoint"] == str(workdir / "runs" / "lstm2" / "last.safetensors")


def test_plain_output_without_a_terminal_is_lines_not_a_progress_bar(workdir: Path, tmp_path: Path, cli):
    config = tmp_path / "c.yaml"
    config.write_text(
        "data: {max_tokens: 1500, batch_size: 4, num_steps: 10}\n"
        "model: {hidden_size: 16, num_layers: 1}\n"
        "train: {epochs: 4, optimizer: adam, lr: 0.01, sample_every: 2, sample_chars: 5, log_every: 2}\n"
    )
    code, out, err = cli("train", "--config", str(config), "--device", "cpu")  # stdout captured: no terminal
    assert code == 0, err
    lines = out.splitlines()
    assert [line.split()[1] for line in lines if line.startswith("epoch ")] == ["2/4", "4/4"]
    assert "  [2] time traveller" in out
    assert "\x1b[" not in out  # no escape codes when piped


def test_json_never_holds_nan_or_infinity():
    from drnn_cli import strict_json

    assert strict_json.dumps({"a": float("inf"), "b": [float("nan"), 1.5], "c": ("x", -float("inf"))}) == (
        '{"a": null, "b": [null, 1.5], "c": ["x", null]}'
    )


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8:strict"])
def test_the_json_line_is_valid_utf8_when_a_file_name_is_not(workdir: Path, corpus_path: Path, encoding: str):
    """A file name that is not UTF-8 (byte 0xff) reaches Python as a lone surrogate: written raw it was
    invalid UTF-8 on stdout (C.UTF-8), or ended the command in an internal error after its work under a
    strict encoder (found by a red team). Escaped, the line is JSON that names the file."""
    name = os.fsdecode(b"t\xff.txt")
    (workdir / name).write_bytes(corpus_path.read_bytes())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": encoding}
    done = subprocess.run(
        [sys.executable, "-m", "drnn_cli", "data", "--set", f"data.path={name}", "--json"],
        cwd=workdir,
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip().splitlines()[-1].decode("utf-8")  # strict: valid UTF-8
    assert json.loads(line)["path"].endswith("t\udcff.txt")


def test_a_run_on_a_text_whose_name_is_not_utf8_checkpoints_and_evaluates(
    workdir: Path, corpus_path: Path, cli
):
    """The checkpoint's header names the text: a lone surrogate there could not be encoded, and
    training ended in an internal error at its first checkpoint. Written escaped, it reads back as the
    same name, which ``drnn eval`` of the run's split then opens (stdout strict UTF-8, as under
    en_US.UTF-8, in a process of its own; Python's stderr escapes what it cannot encode by itself)."""
    name = os.fsdecode(b"t\xff.txt")
    (workdir / name).write_bytes(corpus_path.read_bytes())
    settings = ["--set", f"data.path={name}", "--set", "data.val_fraction=0", "--set", "train.epochs=1"]
    code, _, err = cli(
        "train", "--config", str(config_file(workdir, TINY_TREE)), *settings, "--run", "runs/u"
    )
    assert code == 0, err
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8:strict"}
    done = subprocess.run(
        [sys.executable, "-m", "drnn_cli", "eval", "--run", "runs/u", "--json"],
        cwd=workdir, env=env, capture_output=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    evaluated = json.loads(done.stdout.splitlines()[-1].decode("utf-8"))
    # the split of the text the header names: its 3,000 tokens (no validation split), 2,999 predicted
    assert (evaluated["source"], evaluated["split"], evaluated["tokens"]) == (
        f"{workdir / name} [train]",
        "train",
        2999,
    )


def test_the_json_line_stays_one_line_for_splitlines_whatever_the_corpus_holds(workdir: Path, cli):
    """A text with U+2028, U+2029 or NEL (U+0085) tokens: written raw, each split `--json`'s one line in
    three for ``str.splitlines`` and JavaScript; escaped, the line parses back to the same tokens."""
    text = workdir / "breaks.txt"
    text.write_text("a\u2028b\x85 c\u2029d " * 200, encoding="utf-8")
    settings = ["--set", f"data.path={text}", "--set", "data.preprocess=none", "--set", "data.batch_size=4"]
    code, out, err = cli("data", *settings, "--set", "data.num_steps=10", "--json")
    assert code == 0, err
    assert "\u2028" not in out and "\x85" not in out
    tokens = json.loads(out.splitlines()[-1])["idx_to_token"]
    assert {"\u2028", "\x85", "\u2029"} <= set(tokens)


def test_an_overflowed_perplexity_is_null_in_metrics_jsonl_and_reads_back_as_infinite(tmp_path: Path):
    """exp(loss) overflows past ~709 nats while the loss itself is finite (no divergence stop):
    the metrics line must still be JSON that strict readers take, and a resume must read it back."""
    from drnn_cli.report import EpochRecord, append_metrics, read_metrics

    path = tmp_path / "metrics.jsonl"
    append_metrics(path, EpochRecord(1, float("inf"), float("inf"), 0.1, 9.0, 1.0, 4, 40))
    line = path.read_text()
    assert json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in {line}"))["train_ppl"] is None
    (record,) = read_metrics(path, global_step=4, start_epoch=1)
    assert record.train_ppl == float("inf") and record.val_ppl is None and record.step == 4


def test_an_internal_error_is_one_line_and_debug_shows_its_traceback(cli, monkeypatch: pytest.MonkeyPatch):
    from drnn_cli import cli as cli_module

    def broken(root: Path | None = None) -> list:
        raise RuntimeError("a bug\nover two lines")

    monkeypatch.setattr(cli_module, "describe_presets", broken)
    line = "drnn: internal error: RuntimeError: a bug over two lines (rerun with drnn --debug ... for the traceback)\n"
    assert cli("presets") == (1, "", line)
    code, out, err = cli("--debug", "presets")
    assert (code, out) == (1, "")
    assert err.startswith("Traceback (most recent call last):") and err.endswith(line)
    assert "DRNN_DEBUG" not in os.environ  # --debug travels with the call, not through the environment
    monkeypatch.setenv("DRNN_DEBUG", "1")
    code, _, err = cli("presets")
    assert code == 1 and err.startswith("Traceback (most recent call last):") and err.endswith(line)


def test_debug_shows_the_traceback_of_a_failure_before_the_command_runs(cli, monkeypatch: pytest.MonkeyPatch):
    """A Typer too old for drnn's options failed while building the command, before the callback that
    reads --debug: the line said "rerun with drnn --debug", which then printed the same line again."""
    import typer.main

    def unsupported(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Type not yet supported: str | None")

    monkeypatch.setattr(typer.main, "get_command", unsupported)
    line = "drnn: internal error: RuntimeError: Type not yet supported: str | None (rerun with drnn --debug ... for the traceback)\n"
    assert cli("--version") == (1, "", line)
    code, _, err = cli("--debug", "--version")
    assert code == 1 and err.startswith("Traceback (most recent call last):") and err.endswith(line)
    # a --debug after the command is the command's own text (a prefix, a file name), not drnn's option
    assert cli("predict", "--", "--debug") == (1, "", line)


def test_an_os_error_without_a_path_says_whose_write_it_was(cli, monkeypatch: pytest.MonkeyPatch):
    """``drnn eval > /dev/full``: the failing write is stdout's, which has no file name to show; it said
    "No space left on device" alone, which sent the user looking for a full disk under the run (red41).
    Another refusal without a path is its reason alone."""
    import errno

    from drnn_cli import cli as cli_module

    def refused(code: int, reason: str):
        def describe(root: Path | None = None) -> list:
            raise OSError(code, reason)

        return describe

    monkeypatch.setattr(cli_module, "describe_presets", refused(errno.ENOSPC, "No space left on device"))
    assert cli("presets") == (
        1,
        "",
        "drnn: error: cannot write the command's output (standard output or error): No space left on device; "
        "send it where there is room\n",
    )
    monkeypatch.setattr(cli_module, "describe_presets", refused(errno.ECONNRESET, "Connection reset by peer"))
    assert cli("presets") == (1, "", "drnn: error: Connection reset by peer\n")


def test_piped_text_is_written_as_is_and_lines_are_not_wrapped(cli, tiny_run: Path, workdir: Path):
    """Without a terminal, rich would turn ':thumbs_up:' into an emoji, expand tabs and wrap long
    lines at 80 columns; a continuation redirected to a file must be the text itself."""
    text = workdir / "tabbed.txt"
    text.write_text("the\tquick brown fox jumps over the lazy dog\n" * 200)
    config = workdir / "raw.yaml"
    config.write_text(
        "data: {preprocess: none, batch_size: 4, num_steps: 8, path: " + str(text) + "}\n"
        "model: {cell: gru, hidden_size: 8, num_layers: 1}\ntrain: {epochs: 1, sample_every: 0, device: cpu}\n"
    )
    assert cli("train", "--config", str(config), "--run", str(workdir / "raw"))[0] == 0
    code, out, err = cli("predict", "the\tquick:thumbs_up:", "--run", str(workdir / "raw"), "-n", "0")
    assert (code, out) == (1, "") and "':'" in err  # ':' is not in this text's vocabulary
    code, out, _ = cli("predict", "the\tquick", "--run", str(workdir / "raw"), "-n", "0")
    assert (code, out) == (0, "the\tquick\n")
    code, _, err = cli("eval", "--run", str(tiny_run), "--data", ":thumbs_up:.txt")
    assert code == 1 and ":thumbs_up:.txt" in err
    long_run = workdir / ("a-run-directory-with-a-long-name-" * 3)
    long_run.symlink_to(tiny_run)
    code, out, _ = cli("eval", "--run", str(long_run))
    assert code == 0 and out.count("\n") == 1 and len(out) > 120 and f"checkpoint {long_run}" in out


def test_a_text_given_to_data_or_file_is_named_by_its_option_in_errors(cli, tiny_run: Path, tmp_path: Path):
    """Not "corpus file": the run's corpus is not what failed to read."""
    latin1, blank = tmp_path / "latin1.txt", tmp_path / "blank.txt"
    latin1.write_bytes("the time machine, caf\xe9 noir".encode("latin-1"))
    blank.write_text(" \n\n")
    code, out, err = cli("eval", "--run", str(tiny_run), "--data", str(latin1))
    assert (code, out, err) == (
        1,
        "",
        f"drnn: error: --data file {latin1} is not UTF-8 (undecodable byte at offset 21); convert it, e.g. "
        "iconv -f latin1 -t utf-8\n",
    )
    code, out, err = cli("inspect", "--file", str(blank), "--run", str(tiny_run))
    assert (code, out, err) == (
        1,
        "",
        f"drnn: error: --file {blank} holds no text (it is empty or only white space); use a file with text "
        "in it\n",
    )


def test_eval_refuses_data_with_split_or_corpus(cli, tiny_run: Path):
    for extra in (["--split", "val"], ["--corpus", "elsewhere.txt"]):
        code, out, err = cli("eval", "--run", str(tiny_run), "--data", "some.txt", *extra)
        assert (code, out) == (2, "")
        assert err.startswith(
            f"drnn: error: --data evaluates all of another text, and {extra[0]} picks a split"
        )


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize(
    ("args", "named", "fix"),
    [
        (
            ("--set", "train.device=cuda"),
            "train.device",
            "set train.device to cpu or auto, or pass --device cpu",
        ),
        (("--device", "cuda"), "--device", "use --device cpu or auto"),
    ],
)
def test_cuda_on_a_machine_without_it_names_where_it_was_asked_for(
    workdir: Path, cli, corpus_path: Path, args: tuple[str, ...], named: str, fix: str
) -> None:
    """A config (or --set) that says train.device: cuda is not a --device the user typed."""
    code, out, err = cli("train", "--config", str(REPO / "configs" / "quick.yaml"), *args)
    assert code != 0 and out == ""
    assert err.strip().splitlines() == [
        f"drnn: error: {named} cuda: CUDA is not available here (torch {torch.__version__}); {fix}"
    ]
    assert not (workdir / "runs").exists()


def terminal_bar(run: RunStart) -> tuple[RichReporter, io.StringIO]:
    """A progress bar on a 120-column terminal, started on ``run``, and the screen it draws on."""
    from rich.console import Console

    from drnn_cli.render import RichReporter

    screen = io.StringIO()
    reporter = RichReporter(Console(file=screen, force_terminal=True, width=120))
    reporter.start(run)
    return reporter, screen


def test_the_progress_bar_names_the_epoch_in_progress_as_the_first_line_does() -> None:
    """On a terminal: resumed 3 steps into epoch 2 of 4, the first line says "from step 3 of epoch 2" and
    the bar "epoch 2/4" (it counted epochs done, "epoch 1/4", before)."""

    from drnn_cli.report import EpochRecord, RunStart, StepStatus

    reporter, screen = terminal_bar(RunStart(4, 1, 1_000, "cpu", "from step 3 of epoch 2", 0))
    try:
        assert reporter.progress is not None
        (task,) = reporter.progress.tasks
        assert (task.fields["epoch"], task.completed) == (2, 1)
        reporter.step(StepStatus(1, 4, 8, 12, None))
        assert (task.fields["epoch"], task.completed, task.fields["steps"]) == (2, 1.5, "step 4/8  ")
        reporter.epoch_end(EpochRecord(2, 9.5, None, 0.1, 1_000.0, 3.0, 16, 512))
        assert task.fields["steps"] == ""  # the epoch's steps are done; "step 4/8" would stand still
        reporter.step(StepStatus(2, 1, 8, 17, 90.0))
        assert task.fields["epoch"] == 3
        assert (task.fields["steps"], task.fields["run_end"]) == ("", 90.0)  # no "step 1/8"
        reporter.step(StepStatus(2, 4, 8, 20, 80.0))
        reporter.epoch_end(EpochRecord(2.5, 9.0, 8.5, 0.1, 1_000.0, 4.0, 20, 640))  # a validation inside it
        assert (task.fields["epoch"], task.completed) == (3, 2.5)  # still epoch 3, not "epoch 2/4"
    finally:
        reporter.finish()
    assert "epoch 3/4" in screen.getvalue()


def test_between_log_lines_the_bar_shows_the_figures_so_far_and_keeps_the_last_validation():
    """A long epoch with no line inside it showed no perplexity and no speed until its end (3.5 minutes
    on a 2 MB text under lstm_full_cpu)."""

    from drnn_cli.report import EpochRecord, RunStart, StepStatus

    reporter, _ = terminal_bar(RunStart(4, 0, 1_000, "cpu", "from scratch", 0))
    try:
        assert reporter.progress is not None
        (task,) = reporter.progress.tasks
        reporter.step(StepStatus(0, 6, 149, 6, None, 8171.4, 22.391))
        assert task.fields["status"] == "ppl 22.39  8,171 tok/s"
        reporter.epoch_end(EpochRecord(0.5, 12.0, 11.5, 0.1, 8_000.0, 3.0, 75, 76_800))  # validated
        reporter.step(StepStatus(0, 80, 149, 80, None, 8_200.0, 11.0))
        assert task.fields["status"] == "ppl 11.00  val 11.50  8,200 tok/s"  # val stays
        reporter.step(StepStatus(0, 90, 149, 90, None, 8_300.0, None))  # a GPU: no perplexity read
        assert task.fields["status"] == "ppl 12.00  val 11.50  8,300 tok/s"  # the last line's
    finally:
        reporter.finish()
    # a resumed run's bar shows its last validation from the start, not only after its next one
    resumed, _ = terminal_bar(RunStart(4, 1, 1_000, "cpu", "from epoch 2", 0, latest_val_ppl=7.25))
    try:
        assert resumed.progress is not None
        (task,) = resumed.progress.tasks
        resumed.step(StepStatus(1, 6, 149, 155, None, 8_000.0, 9.0))
        assert task.fields["status"] == "ppl 9.00  val 7.25  8,000 tok/s"
    finally:
        resumed.finish()
    # a fine-tuning run's bar shows its starting weights' validation from its first steps (trial31b: no
    # "val" until its first cadence validation); the note said the figure, so no line of its own
    tuned, screen = terminal_bar(RunStart(4, 0, 1_000, "cpu", "from the weights of runs/old", 0))
    try:
        assert tuned.progress is not None
        (task,) = tuned.progress.tasks
        tuned.epoch_end(EpochRecord(0, None, 13.31, 0.1, 0.0, 0.0))
        assert (task.fields["epoch"], task.completed) == (1, 0)  # the bar still reads "epoch 1/4"
        tuned.step(StepStatus(0, 6, 149, 6, None, 6_482.0, 12.5))
        assert task.fields["status"] == "ppl 12.50  val 13.31  6,482 tok/s"
    finally:
        tuned.finish()
    assert "epoch 0/" not in screen.getvalue()


def test_the_bar_s_live_perplexity_is_the_steps_since_the_last_line(workdir: Path, step_losses: list[float]):
    """On a CPU the tally is read as it stands (no device to wait for): the first step's own loss."""
    import math

    from conftest import TINY_TREE, config_file

    from drnn_cli.report import SilentReporter, StepStatus
    from drnn_cli.train_session import TrainRequest, train_run

    class Steps(SilentReporter):
        def __init__(self) -> None:
            self.statuses: list[StepStatus] = []

        def step(self, status: StepStatus) -> None:
            self.statuses.append(status)

    steps = Steps()
    train_run(
        TrainRequest(config_file(workdir, {**TINY_TREE, "train": {**TINY_TREE["train"], "epochs": 1}})), steps
    )
    first = steps.statuses[0]  # reported at once, after the epoch's first step
    assert first.step_in_epoch == 1 and first.train_ppl == pytest.approx(math.exp(step_losses[0]), rel=1e-12)
    assert first.tokens_per_s is not None and first.tokens_per_s > 0


def test_the_bar_counts_a_validations_tokens_once_it_lasts(workdir: Path):
    """A validation of millions of tokens (minutes on a CPU; a fine-tuning run validates its starting
    weights before any step) left the bar standing still, as if the run had hung."""

    from conftest import TINY_TREE, config_file

    from drnn_cli.report import RunStart, SilentReporter
    from drnn_cli.train_session import TrainRequest, train_run

    class Validations(SilentReporter):
        def __init__(self) -> None:
            self.calls: list[tuple[int, int]] = []

        def validating(self, done: int, total: int, seconds_left: float | None) -> None:
            self.calls.append((done, total))

    seen = Validations()
    # 2 epochs, each validated on the split's first 250 predictions: 8 rows of 31 in minibatches of 10
    # steps (80 predictions), 10, 10 and 1 (8), then the 2 left over as a row of their own
    tree = {**TINY_TREE, "train": {**TINY_TREE["train"], "epochs": 2, "eval_tokens": 250}}
    train_run(TrainRequest(config_file(workdir, tree)), seen)
    assert seen.calls == [(0, 250), (80, 250), (160, 250), (240, 250), (248, 250)] * 2

    reporter, _ = terminal_bar(RunStart(4, 0, 1_000, "cpu", "from scratch", 0))
    try:
        assert reporter.progress is not None
        (task,) = reporter.progress.tasks
        reporter.validating(0, 5_000_000, None)
        reporter.validating(640, 5_000_000, 95.0)
        assert task.fields["steps"] == ""  # under a second in: a short validation is not shown
        reporter.validation_shown_after = 0.0
        reporter.validating(1_280, 5_000_000, 90.0)
        assert (task.fields["steps"], task.fields["run_end"]) == ("validating 1,280/5,000,000 tokens  ", 90.0)
    finally:
        reporter.finish()


def test_the_summary_says_a_validation_read_part_of_the_split_beside_its_figures(workdir: Path, cli):
    """A best validation perplexity read over train.eval_tokens of the split (6.06 over the first 5,000
    tokens, 7.29 over all of them: heldout33) was shown with nothing beside it but a note the log had
    scrolled away: the summary says what it read (599 predictions: 20% of 3,000 tokens, less the first)."""
    tree = {**TINY_TREE, "train": {**TINY_TREE["train"], "epochs": 1, "eval_tokens": 100}}
    code, out, err = cli("train", "--config", str(config_file(workdir, tree)))
    assert code == 0, err
    assert re.search(r"│ validated on the first +│ 100 of 599 tokens +│", out), out
    # a resume that changes it and trains nothing: its last figure is shown, as --json gives it, and no
    # best yet, which starts over (the table showed no validation row: verify33)
    code, out, err = cli(
        "train", "--config", str(config_file(workdir, tree)), "--resume", "--set", "train.eval_tokens=0"
    )
    assert code == 0 and re.search(r"│ validation perplexity \(last / best\) +│ [0-9.]+ / — +│", out), out
    whole = {**tree, "train": {**tree["train"], "eval_tokens": 0}}
    code, out, err = cli("train", "--config", str(config_file(workdir, whole)), "--overwrite")
    assert code == 0 and "validation perplexity (last / best)" in out and "validated on" not in out, out


def test_the_summary_keeps_each_row_on_one_line_of_80_columns(workdir: Path, cli):
    """The longest label ("train perplexity (dropout on, raw weights)") beside "the first 5,000 of 12,000
    tokens" pushed the table past 80 columns, and rich wrapped the time row's label onto two lines
    (verify33): a summary read at a glance keeps its rows whole."""
    tree = {
        **TINY_TREE,
        "data": {**TINY_TREE["data"], "max_tokens": 60_000},
        "model": {**TINY_TREE["model"], "output_dropout": 0.2},
        "train": {**TINY_TREE["train"], "max_steps": 1, "eval_tokens": 5_000, "average": "ema"},
    }
    code, out, err = cli("train", "--config", str(config_file(workdir, tree)))
    assert code == 0, err
    table = [line for line in out.splitlines() if line.startswith(("│", "┃", "┏", "└", "┗", "┌"))]
    assert table and max(len(line) for line in table) <= 80, out
    assert re.search(r"│ validated on the first +│ 5,000 of 11,999 tokens +│", out), out
    assert "│ training / validating / checkpoints / rest │" in out, out
    assert "│ tokens/s (this epoch so far) " in out  # stopped inside its first: no last epoch (prac34)
    # and where d2l's figure is, which the log never named (learner34)
    assert "plot: runs/tiny/perplexity.png (perplexity against tokens seen, redrawn while training)" in out


def test_the_summary_says_how_a_training_perplexity_was_read_where_validation_reads_otherwise(
    workdir: Path, cli
):
    """Training's figure is read as it trains, dropout on, from the raw weights where an average
    validates: shown beside validation's it read as "train 9.15 > val 8.30" where drnn eval --split
    train gave 7.64 (heldout33). The summary says so; d2l's recipes, which drop nothing, read as before."""
    from drnn_cli.config import Config
    from drnn_cli.report import as_trained

    def config(model: dict, train: dict | None = None) -> Config:
        return Config.model_validate({"model": model, "train": train or {}})

    assert as_trained(config({"num_layers": 2})) is None
    assert as_trained(config({"num_layers": 1, "dropout": 0.3})) is None  # nothing between layers to drop
    assert as_trained(config({"num_layers": 2, "dropout": 0.3})) == "dropout on"
    assert as_trained(config({"weight_drop": 0.5})) == "dropout on"
    assert as_trained(config({"output_dropout": 0.1}, {"average": "ema"})) == "dropout on, raw weights"
    assert as_trained(config({}, {"average": "ema"})) == "raw weights"
    tree = {
        **TINY_TREE,
        "model": {**TINY_TREE["model"], "output_dropout": 0.2},
        "train": {**TINY_TREE["train"], "epochs": 1},
    }
    code, out, _ = cli("train", "--config", str(config_file(workdir, tree)))
    assert code == 0 and re.search(
        r"│ train perplexity \(dropout on\) +│ [0-9.]+ \(last 29 steps\) +│", out
    ), out


def test_the_bar_shows_one_time_left_the_trainers_once_it_has_one():
    """A budget and the epochs at the current pace: the bar showed both, "0:17:29 budget left 0:19", on
    a run a 20-second max_time ended; then rich's epoch pace alone, which a minute-long validation held
    still at "0:03 left" (practitioner trial, 2026-11-28). The trainer's figure counts budgets,
    validations and checkpoint writes; rich's stands in before the first step."""
    from drnn_cli.render import time_left

    assert time_left(19.0, 1049.0) == "0:19 left"  # the trainer's: max_time ends it
    assert time_left(3600.0, 75.0) == "1:00:00 left"  # the trainer's, though the bar's pace says less
    assert time_left(None, 4000.0) == "1:06:40 left"  # no figure from the trainer yet: rich's
    assert time_left(None, None) == ""  # no pace yet


def _plain_reporter():
    """drnn train's reporter writing to a string, as when its output is piped (no progress bar)."""
    import io

    from rich.console import Console

    from drnn_cli.render import RichReporter

    stream = io.StringIO()
    return RichReporter(Console(file=stream, width=200, markup=False)), stream


def test_a_run_that_stops_between_log_lines_prints_where_it_stopped():
    """200 epochs log every 8th; an early stop at epoch 6 used to print no epoch line at all."""
    from drnn_cli.report import EpochRecord, RunStart

    reporter, stream = _plain_reporter()
    reporter.start(RunStart(200, 0, 1000, "cpu", "from scratch", 0))
    for epoch in range(1, 7):
        reporter.epoch_end(EpochRecord(epoch, 10.0 - epoch, 12.0, 0.5, 1000.0, float(epoch), epoch * 3))
    reporter.note("early stop: validation perplexity has not improved for 1 evaluation")
    reporter.finish()
    lines = stream.getvalue().splitlines()[1:]
    assert lines == [
        "epoch 6/200  step 18  ppl 4.00  val 12.00  1,000 tok/s  lr 0.5  6.0s",
        "note: early stop: validation perplexity has not improved for 1 evaluation",
    ]


def test_a_perplexity_past_a_million_prints_in_scientific_notation():
    from drnn_cli.report import EpochRecord, RunStart

    reporter, stream = _plain_reporter()
    reporter.start(RunStart(1, 0, 1000, "cpu", "from scratch", 1))
    reporter.epoch_end(EpochRecord(1, 3.906e190, math.inf, 1000.0, 50.0, 2.0, 9))
    assert "epoch 1/1  step 9  ppl 3.906e+190  val inf  50 tok/s" in stream.getvalue()


def test_generated_text_reaches_a_terminal_escaped_and_a_pipe_exactly() -> None:
    """A word model of a text holding terminal sequences (or a shared checkpoint's vocabulary) can
    generate ESC ] 0 ; … BEL, which retitles the window, or ESC [ 2 J, which clears it; a right-to-left
    override reorders the line. On a terminal they are shown escaped; piped, a sample is the text as
    generated, on one line however long (rich wrapped it at 80 columns)."""
    import io

    from rich.console import Console

    from drnn_cli.render import RichReporter
    from drnn_cli.shown_text import terminal_safe

    hostile = "hello \x1b]0;PWNED\x07\x1b[2J w\u202eorld\n\té 日本 \x85"
    assert terminal_safe(hostile) == "hello \\x1b]0;PWNED\\x07\\x1b[2J w\\u202eorld\n\té 日本 \\x85"
    screen, pipe = io.StringIO(), io.StringIO()
    long_sample = "the time traveller " * 10 + hostile
    plain = {"highlight": False, "markup": False, "emoji": False, "width": 80}  # as drnn's consoles
    for console in (Console(file=screen, force_terminal=True, **plain), Console(file=pipe, **plain)):
        RichReporter(console).samples(2, {"hello": long_sample})
    assert "\x1b]0;PWNED" not in screen.getvalue() and "\\x1b]0;PWNED\\x07" in screen.getvalue()
    assert pipe.getvalue() == f"  [2] {long_sample}\n"


def test_a_note_quoting_a_token_or_path_reaches_the_terminal_escaped() -> None:
    """Notes quote what drnn did not choose (a corpus's tokens, a file's name), and rich passes an
    escape sequence through to the terminal: a note is one line with its controls escaped."""
    import io

    from rich.console import Console

    from drnn_cli.render import RichReporter

    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, highlight=False, markup=False, emoji=False)
    RichReporter(console).note("data.path 'x\x1b]0;PWNED\x07\u202e.txt' is\tshort")
    assert screen.getvalue() == "note: data.path 'x\\x1b]0;PWNED\\x07\\u202e.txt' is\\tshort\n"


def test_own_text_under_a_time_machine_preset_hears_what_it_keeps_once(workdir: Path, cli, corpus_path: Path):
    """A text of one's own with digits and punctuation on every line, under the tiny preset's
    max_tokens and d2l's preprocessing: a new run says how much of it trains; its resume does not."""
    lines = corpus_path.read_text(encoding="utf-8").splitlines()[:400]
    own = workdir / "own.txt"
    own.write_text("".join(f"{n:05d}: {line};\n" for n, line in enumerate(lines)), encoding="utf-8")
    tree = {
        **TINY_TREE,
        "data": {**TINY_TREE["data"], "path": str(own)},
        "train": {**TINY_TREE["train"], "epochs": 1},
    }
    config = config_file(workdir, tree)
    code, out, err = cli("train", "--config", str(config), "--run", "runs/own")
    said = " ".join((out + err).split())  # the console wraps long lines
    assert code == 0, err
    assert "note: data.max_tokens 3,000 uses the first 3,000 of this text's" in said
    # the held-out split is cut from those 3,000 (data.val_fraction 0.2), not from the text's tail
    assert (
        "chars, and its splits share them: 2,400 training and 600 validation; data.max_tokens -1 takes all"
        in said
    )
    assert "note: data.preprocess d2l keeps the letters a-z and single spaces" in said
    code, out, err = cli(
        "train", "--config", str(config), "--run", "runs/own", "--resume", "--set", "train.epochs=2"
    )
    assert code == 0, err
    assert "data.max_tokens 3,000 uses" not in out + err and "keeps the letters a-z" not in out + err


def test_help_names_option_values_as_the_readme_does_and_lists_commands_whole(cli):
    """Typer names a value by its type where no metavar is given: "--config <str>", "--set <list[str]>";
    and it cut the command list's descriptions mid-phrase ("List the presets --config takes by name: what
    each is, its...")."""
    code, out, _ = cli("train", "--help")
    assert code == 0
    for shown in ("--config FILE_OR_PRESET", "--set KEY=VALUE", "--run DIR", "--init-from RUN_OR_CHECKPOINT"):
        assert shown in out, out
    for command in ("predict", "eval", "inspect", "data"):
        code, out, _ = cli(command, "--help")
        options = out.split("Options:", 1)[1]
        assert code == 0 and not re.search(r"--[\w-]+ <(str|int|float|path|list\[str\])", options), options
    code, out, _ = cli("--help")
    listed = out.split("Commands:", 1)[1].strip().splitlines()
    assert len(listed) == 7 and not any(line.endswith("...") for line in listed), listed


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (
            ("inspect", "the time", "--html", ""),
            "--html is empty; give it a file to write, e.g. --html inspect.html",
        ),
        (("eval", "--run="), "--run is empty; give it a run directory, e.g. --run runs/NAME"),
        (("eval", "--data", "", "--split", "val"), "--data is empty; give it a text file"),
        (
            ("predict", "time", "--checkpoint", ""),
            "--checkpoint is empty; give it a checkpoint file, e.g. --checkpoint runs/NAME/best.safetensors",
        ),
        (
            ("train", "--config", "lstm2.yaml", "--init-from", ""),
            "--init-from is empty; give it a run directory or checkpoint",
        ),
    ],
)
def test_an_empty_path_option_is_refused_by_name_not_read_as_the_current_directory(cli, args, said):
    """red41: --html '' was refused as "--html . is a directory": the parser reads an empty path as ".".
    The option is named as empty, with what it takes, before anything is read."""
    code, out, err = cli(*args)
    assert (code, out) == (2, "")
    assert err == f"drnn: error: {said} (an empty one would read as the current directory)\n"
