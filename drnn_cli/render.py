"""How drnn's results look: its consoles, one-line prints, progress bars and the training reporter.

The CLI's commands hand their reports here to be shown; nothing here decides what a command does.
rich renders the text, and torch is never imported (the CLI imports this before it handles Ctrl-C).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
)
from rich.text import Text

from drnn_cli import strict_json
from drnn_cli.budget import Cadence, epoch_count, format_duration
from drnn_cli.shown_text import terminal_safe

if TYPE_CHECKING:  # report imports torch, which the CLI loads only inside main()
    from drnn_cli.report import EpochRecord, RunStart, StepStatus


def consoles(json_mode: bool) -> tuple[Console, Console]:
    """(human output, errors): with --json the human output moves to stderr so stdout is pure JSON."""
    # markup=False, emoji=False: what drnn prints holds the user's words (a corpus's tokens, run and file
    # names, prefixes), and a "[/INST]" or ":smile:" there is text, not a style tag or an emoji code
    return Console(stderr=json_mode, highlight=False, emoji=False, markup=False), Console(
        stderr=True, highlight=False, emoji=False, markup=False
    )


def format_perplexity(value: float, decimals: int) -> str:
    """A perplexity with ``decimals`` places; from a million on in scientific notation, where a
    diverging run's 10²⁰⁰ would print as a line of digits."""
    return f"{value:.{decimals}f}" if abs(value) < 1e6 else f"{value:.4g}"


def print_generated(console: Console, line: str) -> None:
    """A line holding generated text: on a terminal with its controls escaped (:func:`terminal_safe`),
    one line however long; piped or redirected, exactly as generated (rich would drop control
    characters, expand tabs and wrap at 80 columns)."""
    if console.is_terminal:
        console.print(terminal_safe(line), markup=False, soft_wrap=True)
    else:
        console.file.write(line + "\n")


def print_line(console: Console, line: str) -> None:
    """A line quoting paths or names the user gave: one line, its controls escaped as an error's are."""
    console.print(terminal_safe(line, keep=""), markup=False, soft_wrap=True)


def print_note(console: Console, message: str) -> None:
    """A ``note:`` line, one line however long (rich wraps at 80 columns off a terminal): grep finds it.
    Its controls are escaped, as an error's are: a note quotes tokens and paths drnn did not choose."""
    print_line(console, f"note: {message}")


def emit_json(payload: dict[str, Any]) -> None:
    """``--json``'s one line on stdout, flushed at once: a script reads it as the command ends."""
    sys.stdout.write(strict_json.dumps(payload, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def plural(n: int, noun: str) -> str:
    """``1 token``, ``2 tokens``, ``1,024 tokens``."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


@contextlib.contextmanager
def download_progress(console: Console) -> Iterator[Any]:
    """A rich download bar, shown only when a download actually happens and the console is a terminal."""
    bar: list[tuple[Progress, TaskID]] = []  # the bar once the first bytes arrive

    def hook(received: int, total: int | None) -> None:
        if not console.is_terminal:
            return
        if not bar:
            progress = Progress(
                TextColumn("downloading"),
                BarColumn(),
                DownloadColumn(),
                TimeLeftColumn(),
                console=console,
            )
            progress.start()
            bar.append((progress, progress.add_task("download", total=total)))
        progress, task = bar[0]
        progress.update(task, completed=received, total=total)

    try:
        yield hook
    finally:
        for progress, _ in bar:
            progress.stop()


@contextlib.contextmanager
def evaluation_progress(console: Console, after: float = 1.0) -> Iterator[Any]:
    """A bar for an evaluation that lasts (a split of millions of tokens is minutes on a CPU): shown on a
    terminal once ``after`` seconds have passed, and gone when the evaluation ends."""
    started = time.monotonic()
    bar: list[tuple[Progress, TaskID]] = []

    def hook(done: int, total: int) -> None:
        if not console.is_terminal or (not bar and time.monotonic() - started < after):
            return
        if not bar:
            progress = Progress(
                TextColumn("evaluating"),
                BarColumn(),
                TextColumn("{task.completed:,}/{task.total:,} tokens"),
                TimeLeftColumn(),
                console=console,
                transient=True,
            )
            progress.start()
            bar.append((progress, progress.add_task("evaluate", total=total)))
        progress, task = bar[0]
        progress.update(task, completed=done)

    try:
        yield hook
    finally:
        for progress, _ in bar:
            progress.stop()


def log_figures(train_ppl: float | None, val_ppl: float | None, tokens_per_s: float) -> str:
    """A log line's figures, and the bar's: ``ppl 9.50  val 8.50  1,000 tok/s`` (what is known of them)."""
    parts = [] if train_ppl is None else [f"ppl {format_perplexity(train_ppl, 2)}"]
    if val_ppl is not None:
        parts.append(f"val {format_perplexity(val_ppl, 2)}")
    return "  ".join([*parts, f"{tokens_per_s:,.0f} tok/s"])


def time_left(run_end: float | None, epochs: float | None) -> str:
    """The bar's one time-left figure: the trainer's, to the run's end (``run_end``: the steps,
    validations and checkpoint writes left at this session's paces, or ``max_time``, whichever ends it
    first), once it has one; before that, rich's, the last epoch at the bar's pace (``epochs``)."""
    seconds = run_end if run_end is not None else epochs
    return "" if seconds is None else f"{format_duration(seconds)} left"


class TimeLeftColumn(ProgressColumn):
    """:func:`time_left` for every bar, so that each says its time as ``m:ss left`` (rich's own column
    says ``0:01:05``): the training bar's ``run_end`` field, where the trainer sets it, counts to the run's
    end; rich's estimate alone counts to the last epoch at the bar's recent pace, which a budget cuts short
    and a minute-long validation holds still (an evaluation's and a download's bars have only rich's)."""

    def render(self, task: Task) -> Text:
        return Text(time_left(task.fields.get("run_end"), task.time_remaining), style="progress.remaining")


class RichReporter:
    """Training progress: a live bar on a terminal, plain lines every ``log_every`` epochs otherwise.

    With ``log_every: N steps`` the trainer sends a line every N steps (and at evaluations), all shown;
    the bar then also counts the steps of the epoch in progress and the time left to the run's end, and the
    tokens of a validation that lasts more than ``validation_shown_after`` seconds.
    """

    validation_shown_after = 1.0

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress: Progress | None = None
        self.task: TaskID | None = None
        self.total = 0
        self.total_shown = "0"
        self.steps_per_epoch = 0.0  # the decimals of a line's epochs (RunStart's)
        self.every = 0
        self._held: tuple[EpochRecord, str] | None = None  # a record off the log cadence, not yet printed
        self._last_ppl: float | None = None  # the bar's training perplexity where no newer one is read
        self._last_val: float | None = None  # the latest validation, which the bar keeps showing
        self._validation_began = 0.0

    def start(self, run: RunStart) -> None:
        total_epochs, start_epoch = run.total_epochs, run.start_epoch
        self.total = total_epochs
        self.steps_per_epoch = run.steps_per_epoch
        self.total_shown = run.epochs_of()  # "epoch 1.46/8.49": a step budget's span, as the first line's
        self._last_val = run.latest_val_ppl
        cadence = Cadence.of(run.log_every)
        self.every = 0 if cadence.in_steps else cadence.every or max(1, total_epochs // 25)
        self.console.print(
            f"training {run.parameters:,} parameters on {run.device}, {run.span()}, {run.origin}",
            soft_wrap=True,
        )
        if self.console.is_terminal:
            self.progress = Progress(
                TextColumn("epoch {task.fields[epoch]}/{task.total}"),
                BarColumn(),
                TextColumn("{task.fields[steps]}{task.fields[status]}"),
                TimeLeftColumn(),
                console=self.console,
                # redrawn by the main thread as the trainer reports (twice a second), never by rich's own
                # thread: a stop cuts a write the main thread is blocked in, and a blocked refresh thread
                # would hold the run at its end, joined for ever (review rev41b: a terminal nobody reads)
                auto_refresh=False,
            )
            self.progress.start()
            # The bar names the epoch in progress (1-based), as the first line does: "from epoch 2, step 3"
            self.task = self.progress.add_task(
                "train", total=total_epochs, completed=start_epoch, status="", steps="", run_end=None,
                epoch=min(int(start_epoch) + 1, total_epochs),
            )  # fmt: skip

    def epoch_end(self, record: EpochRecord) -> None:
        if record.is_start:  # a fine-tuning run's starting validation: its note says the figure, the bar
            self._last_val = record.val_ppl  # shows it until the first cadence validation replaces it
            return
        status = log_figures(record.train_ppl, record.val_ppl, record.tokens_per_s)
        self._last_ppl = record.train_ppl
        if record.val_ppl is not None:
            self._last_val = record.val_ppl
        inside_epoch = record.epoch != int(record.epoch)  # an evaluation or a budget's end inside an epoch
        if self.progress is not None and self.task is not None:
            # the epoch's steps are done: its count would stand still at the last half-second's. The
            # label stays the epoch in progress (1-based): a record inside epoch 3 (2.5) is "epoch 3"
            self.progress.update(
                self.task,
                completed=record.epoch,
                epoch=math.ceil(record.epoch),
                status=log_figures(record.train_ppl, self._last_val, record.tokens_per_s),
                steps="",
            )
            self.progress.refresh()
        elif not self.every or inside_epoch or record.epoch % self.every == 0 or record.epoch == self.total:
            self._held = None
            self._print_record(record, status)
        else:  # printed if the run ends here (early stop, a budget, a signal): the log shows where it did
            self._held = (record, status)

    def _print_record(self, record: EpochRecord, status: str) -> None:
        where = f"step {record.step:,}  " if record.step else ""
        epoch = epoch_count(record.epoch, self.steps_per_epoch)
        # soft_wrap: one line per record in a log file too (rich wraps at 80 columns off a terminal)
        self.console.print(
            f"epoch {epoch}/{self.total_shown}  {where}{status}  lr {record.lr:.3g}  {record.elapsed:.1f}s",
            soft_wrap=True,
        )

    def _print_held(self) -> None:
        if self._held is not None:
            self._print_record(*self._held)
            self._held = None

    def step(self, status: StepStatus) -> None:
        """The bar inside a long epoch: its steps, and the time left to the run's end."""
        if self.progress is None or self.task is None:
            return
        # An epoch's first step comes at once (for the budget): its count would stand all through a
        # short epoch, so counts start with the next report, half a second in.
        counting = status.step_in_epoch > 1
        steps = f"step {status.step_in_epoch:,}/{status.steps_in_epoch:,}  " if counting else ""
        live: dict[str, Any] = {}
        if counting and status.tokens_per_s is not None:  # between log lines: the figures so far
            train_ppl = status.train_ppl if status.train_ppl is not None else self._last_ppl
            live["status"] = log_figures(train_ppl, self._last_val, status.tokens_per_s)
        self.progress.update(
            self.task,
            completed=status.epoch + status.step_in_epoch / max(1, status.steps_in_epoch),
            epoch=status.epoch + 1,
            steps=steps,
            run_end=status.seconds_left,
            **live,
        )
        self.progress.refresh()

    def validating(self, done: int, total: int, seconds_left: float | None) -> None:
        """The bar through a validation that lasts (a large split is minutes on a CPU, and a fine-tuning
        run validates its starting weights before any step): where it would stand still, its tokens, and
        the time left, which counts down through it."""
        if self.progress is None or self.task is None:
            return
        now = time.monotonic()
        if done == 0:
            self._validation_began = now
        if now - self._validation_began >= self.validation_shown_after:
            self.progress.update(
                self.task, steps=f"validating {done:,}/{total:,} tokens  ", run_end=seconds_left
            )
            self.progress.refresh()

    def samples(self, epoch: float, samples: dict[str, str]) -> None:
        self._held = None  # samples come on their own cadence, after an epoch the log may skip
        # labelled as the log lines count epochs: "[2]" after epoch 2, "[2.14]" at a step inside epoch 3
        label = epoch_count(epoch, self.steps_per_epoch)
        for text in samples.values():
            print_generated(self.console, f"  [{label}] {text}")

    def note(self, message: str) -> None:
        self._print_held()
        print_note(self.console, message)

    def finish(self) -> None:
        self._print_held()
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
