"""What training reports, and the run-directory files it keeps: metrics.jsonl, the plot, the config.

The loop (train.py) produces ``EpochRecord``s and ``StepStatus``es; a ``Reporter`` shows them (the
CLI renders them with rich, tests collect them) and the functions here keep them on disk.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple, Protocol

from drnn_cli import strict_json
from drnn_cli.budget import StopReason, epoch_count, format_duration, steps_span
from drnn_cli.config import Config, dump_config
from drnn_cli.errors import DrnnError, first_line
from drnn_cli.files import atomic_write_bytes, atomic_write_stream, atomic_write_text, read_tail
from drnn_cli.plot import plotter_missing, plotter_problem, render_perplexity_plot
from drnn_cli.run_files import RunFiles, run_name
from drnn_cli.session_time import SessionSeconds
from drnn_cli.vocab import Vocab


def missing_plotter_note(importing: bool = True) -> str | None:
    """The note a run gives where matplotlib cannot draw its perplexity plot; None where it can. Without
    ``importing``, only whether it is installed, found without importing it (``plotter_missing``)."""
    problem = plotter_problem() if importing else plotter_missing()
    return None if problem is None else f"matplotlib {problem[0]}: no plot ({problem[1]})"


def training_position(epochs_done: int, steps_into_epoch: int, global_step: int | None = None) -> str:
    """Where a run stands, worded alike in every message that says it: "after step 3 of epoch 2" (the
    epoch in progress, counted from 1), "after epoch 2" (two whole epochs), then the optimizer steps
    since the run began, which count across epochs and resumes (``drnn eval``'s ``step``)."""
    if steps_into_epoch:
        where = f"after step {steps_into_epoch:,} of epoch {epochs_done + 1:,}"
    elif epochs_done:
        where = f"after epoch {epochs_done:,}"
    else:
        return "before its first step"
    return where + (f", optimizer step {global_step:,}" if global_step is not None else "")


@dataclass(frozen=True, slots=True)
class EpochRecord:
    """One line of ``metrics.jsonl``: an epoch's end, or an evaluation inside an epoch.

    ``epoch`` counts epochs done: an integer at an epoch's end, fractional (3.25) inside one.
    ``train_ppl`` covers the ``train_ppl_steps`` optimizer steps since the epoch's previous line (or
    its start), ``tokens_per_s`` the epoch so far (README "Long runs"). ``step`` counts optimizer steps
    and ``tokens_seen`` training tokens since the run began (0 in lines written before they existed).
    A fine-tuning run's first line, epoch 0, is its starting weights' validation: nothing trained
    yet, so ``train_ppl`` is None (see :meth:`is_start`).
    """

    epoch: float
    train_ppl: float | None
    val_ppl: float | None
    lr: float
    tokens_per_s: float
    elapsed: float
    step: int = 0
    tokens_seen: int = 0
    train_ppl_steps: int = 0
    # the predictions val_ppl read: the split's, or train.eval_tokens of them (0: no validation, or a
    # line written before lines said it)
    val_tokens: int = 0

    @property
    def is_start(self) -> bool:
        """The starting weights' line of a fine-tuning run (epoch 0: every trained line comes later)."""
        return self.epoch == 0 and self.train_ppl is None

    def to_json(self) -> str:
        """The line; a perplexity past float range (a loss over ~709 nats) is null, as in ``--json``."""
        # its fields read directly: asdict deep-copies each value, which a resume's rewrite of a
        # million-line file paid for 2 million times (red41: 62 s and 1.15 GB)
        return strict_json.dumps({name: getattr(self, name) for name in _RECORD_FIELDS})

    @classmethod
    def from_json(cls, line: str) -> EpochRecord:
        """A line as ``to_json`` writes it; any other (``null``, a list, a field of another type) raises
        a ValueError or TypeError, which ``read_metrics`` skips like a torn line."""
        fields = json.loads(line)
        if not isinstance(fields, dict):
            raise ValueError(f"a metrics line is a JSON object, not {type(fields).__name__}")
        if fields.get("train_ppl", 0.0) is None and fields.get("epoch") != 0:
            fields["train_ppl"] = math.inf  # written as null: it had overflowed
        record = cls(**fields)
        for name in _RECORD_FIELDS:
            value = getattr(record, name)
            unmeasured = name == "val_ppl" or (name == "train_ppl" and record.epoch == 0)
            if not (value is None and unmeasured) and not strict_json.is_number(value):
                raise ValueError(f"metrics field {name} is {value!r:.40}, not a number")
        return record


_RECORD_FIELDS = tuple(item.name for item in fields(EpochRecord))  # a metrics line's keys, in order


def as_trained(config: Config) -> str | None:
    """How a training perplexity differs from a validation's of the same weights, where it does: read
    as the run trains, with its dropout on and from the raw weights where an average validates (a
    trial's logged 9.15 against validation's 8.30, where ``drnn eval --split train`` gave 7.64)."""
    model = config.model
    drops = (
        (model.dropout if model.num_layers > 1 else 0.0),
        model.input_dropout,
        model.output_dropout,
        model.embedding_dropout,
        model.weight_drop,
    )
    ways = ["dropout on"] if any(drops) else []
    if config.train.average != "none":
        ways.append("raw weights")
    return ", ".join(ways) or None


@dataclass(frozen=True)
class TrainWindow:
    """A line's training perplexity and the optimizer steps it averages over."""

    ppl: float
    steps: int


@dataclass
class TrainResult:
    run_dir: Path
    epochs: float  # epochs done when it stopped: fractional when a budget or a signal ended it inside one
    start_epoch: float  # epochs done when this session began: fractional for a resume inside an epoch
    train_ppl: float
    val_ppl: float | None
    best_val_ppl: float | None
    tokens_per_s: float | None  # None: nothing trained in this session
    device: str
    world_size: int
    parameters: int
    samples: dict[str, str] = field(default_factory=dict)
    stopped_early: bool = False
    stop_reason: StopReason = "epochs"
    train_ppl_steps: int = 0  # the steps train_ppl averages over (its metrics line's)
    steps: int = 0  # optimizer steps since the run began, when it stopped
    start_step: int = 0  # … when this session began
    start_val_ppl: float | None = None  # fine-tuning: the starting weights' validation perplexity
    train_ppl_as: str | None = None  # as_trained: how train_ppl was read, where not as validation reads
    val_tokens: int | None = None  # the predictions each validation read (train.eval_tokens caps them)
    val_split_tokens: int | None = None  # … of the validation split's (None: no validation split)
    threads: int | None = None  # each process's CPU threads (None on a GPU)
    # said after the final samples: whitespace alone (run_notes.blank_samples_note), the weights predict
    # reads not these (last_weights_note)
    samples_notes: tuple[str, ...] = ()
    best_at: str | None = None  # where the best validation was (validated_at), where not the last one
    best_epoch: float | None = None  # the epochs done then (the best's metrics line)
    seconds: SessionSeconds | None = None  # None: nothing trained in this session
    kept: tuple[Path, ...] = ()  # train.keep_every's checkpoints, relative to run_dir, in order

    def summary(self) -> dict[str, Any]:
        """The ``drnn train --json`` object (README "Commands": `drnn train`)."""
        return {
            "run_dir": str(self.run_dir.absolute()),  # absolute, as every path --json prints
            "epochs": self.epochs,
            "start_epoch": self.start_epoch,
            "train_ppl": self.train_ppl,
            "train_ppl_steps": self.train_ppl_steps,
            "val_ppl": self.val_ppl,
            "best_val_ppl": self.best_val_ppl,
            "best_epoch": self.best_epoch,
            "start_val_ppl": self.start_val_ppl,
            "val_tokens": self.val_tokens,
            "val_split_tokens": self.val_split_tokens,
            "tokens_per_s": self.tokens_per_s,
            "device": self.device,
            "world_size": self.world_size,
            "threads": self.threads,
            "parameters": self.parameters,
            "stopped_early": self.stopped_early,
            "stop_reason": self.stop_reason,
            "steps": self.steps,
            "start_step": self.start_step,
            "seconds": None if self.seconds is None else self.seconds.summary(),
            "kept": [str((self.run_dir / name).absolute()) for name in self.kept],
            "samples": self.samples,
        }


@dataclass(frozen=True)
class StepStatus:
    """Where a run stands inside an epoch, for a progress bar (sent a few times a second)."""

    epoch: int  # 0-based epoch in progress
    step_in_epoch: int  # steps done in it
    steps_in_epoch: int
    global_step: int
    seconds_left: float | None  # to the run's end: steps, validations and writes left, or max_time
    tokens_per_s: float | None = None  # over the epoch so far, by the host's clock (no device wait)
    train_ppl: float | None = None  # since the epoch's last log line, where reading it costs no wait


@dataclass(frozen=True)
class RunStart:
    """What a session's first line says, and how often its log writes a line."""

    total_epochs: int  # the epochs the run will reach (fewer than train.epochs under max_steps)
    start_epoch: int
    parameters: int
    device: str
    origin: str  # "from scratch", "from the weights of RUN", "from epoch 3, step 11"
    log_every: int | str  # train.log_every: N epochs (0: about 25 lines a run), or "N steps"
    max_steps: int = 0  # train.max_steps where it ends the run before train.epochs, else 0
    steps_per_epoch: float = 0.0  # the mean: a step budget's epochs, and the decimals of a line's
    latest_val_ppl: float | None = None  # a resumed run's last validation, shown until its next one
    max_time: float = 0.0  # train.max_time, seconds (0: none)
    budget_epochs: float = 0.0  # where max_steps ends, through the real epoch lengths (0: the mean's)

    def span(self) -> str:
        """How long the run is: "3 epochs", or "25 steps (1.32 epochs)" where a step budget ends it
        ("1 step (0.0036% of an epoch)" on a big text), and "or 10:00 of wall clock (train.max_time)"."""
        if self.max_steps:
            span = steps_span(self.max_steps, self.steps_per_epoch, self.budget_epochs)  # as the lines count
        else:
            span = f"{self.total_epochs} epoch{'' if self.total_epochs == 1 else 's'}"
        if self.max_time:
            # under a minute in seconds as given: format_duration's clock said "0:00" of a 0.3 s budget
            clock = f"{self.max_time:g} s" if self.max_time < 60 else format_duration(self.max_time)
            span += f" or {clock} of wall clock (train.max_time), whichever comes first"
        return span

    def epochs_of(self) -> str:
        """What a log line counts its epochs out of (``epoch 1.46/8.49``): ``train.epochs``, or the span
        of a step budget that ends the run inside an epoch, to the decimals its lines count epochs in
        (through the real epoch lengths where the trainer counted them, else the mean's estimate)."""
        if self.max_steps:
            span = self.budget_epochs or self.max_steps / self.steps_per_epoch
            return epoch_count(span, self.steps_per_epoch)
        return f"{self.total_epochs:,}"


class Reporter(Protocol):
    """How the loop talks to its user; the CLI renders these with rich, tests collect them."""

    def start(self, run: RunStart) -> None: ...
    # every metrics.jsonl line as it is written (a fine-tuning run's starting validation: is_start)
    def epoch_end(self, record: EpochRecord) -> None: ...
    def samples(self, epoch: float, samples: dict[str, str]) -> None: ...
    def note(self, message: str) -> None: ...
    def step(self, status: StepStatus) -> None: ...
    # tokens predicted so far, of a validation, and the run's time left then
    def validating(self, done: int, total: int, seconds_left: float | None) -> None: ...
    def finish(self) -> None: ...


class SilentReporter:
    def start(self, run: RunStart) -> None:
        pass

    def epoch_end(self, record: EpochRecord) -> None:
        pass

    def samples(self, epoch: float, samples: dict[str, str]) -> None:
        pass

    def note(self, message: str) -> None:
        pass

    def step(self, status: StepStatus) -> None:
        pass

    def validating(self, done: int, total: int, seconds_left: float | None) -> None:
        pass

    def finish(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# The run directory's files


def read_metrics(path: Path, global_step: int, start_epoch: int) -> list[EpochRecord]:
    """The metrics lines a run resumed at ``global_step`` (epoch ``start_epoch``) keeps.

    Lines past the checkpoint are dropped; old lines (step 0) are placed by epoch. Unreadable lines
    (a torn last line) are skipped.
    """
    records = []
    if path.is_file():
        with path.open(encoding="utf-8", errors="replace") as stream:  # a line at a time: 100s of MB
            for line in stream:
                with contextlib.suppress(ValueError, TypeError):
                    record = EpochRecord.from_json(line)
                    if record.step <= global_step if record.step else record.epoch <= start_epoch:
                        records.append(record)
    return records


# last_figures: a metrics.jsonl's last lines, read further back only where they hold no line up to the
# checkpoint (a session killed long after it), up to the last: a long run's history costs nothing
METRICS_TAIL_READS = (65_536, 1 << 20, 8 << 20)


class TailFigures(NamedTuple):
    """What ``drnn runs`` reads of a run's ``metrics.jsonl`` (:func:`last_figures`)."""

    train_ppl: float | None  # the last line's training perplexity (None: none finite)
    val_tokens: int | None  # the predictions its last validation read (None: no line says)


def last_figures(path: Path, global_step: int, epoch: int) -> TailFigures:
    """Of the ``metrics.jsonl`` lines up to a checkpoint at ``global_step`` (epoch ``epoch``; lines past
    it are a session's that ended before its next checkpoint), the last one's training perplexity: what
    d2l reports of a run, and ``drnn runs`` of one without a validation split (None where no line read
    says a finite one: a torn tail, a fine-tuning run's starting line alone, a run that overflowed); and
    the predictions the last validation read (``train.eval_tokens`` caps them: own40, a sample's figure
    listed as the split's). Nothing where the file is no regular file (a FIFO is not waited on)."""
    train_ppl: float | None = None
    val_tokens: int | None = None
    trained = False  # the last line with a training figure is found (its figure finite or not)
    for max_bytes in METRICS_TAIL_READS:
        try:
            data, whole = read_tail(path, max_bytes)
        except OSError:
            return TailFigures(None, None)
        lines = data.decode("utf-8", errors="replace").splitlines()
        for line in reversed(lines if whole else lines[1:]):  # a cut first line is a line's end
            with contextlib.suppress(ValueError, TypeError):
                record = EpochRecord.from_json(line)
                if not (record.step <= global_step if record.step else record.epoch <= epoch):
                    continue
                if not trained and record.train_ppl is not None:
                    trained = True
                    train_ppl = record.train_ppl if math.isfinite(record.train_ppl) else None
                if val_tokens is None and record.val_tokens:
                    val_tokens = record.val_tokens
                if trained and val_tokens is not None:
                    return TailFigures(train_ppl, val_tokens)
        # the training figure found, no validation's count is searched for further back (a run without a
        # validation split, or lines older than the count, would be read up to the last tail)
        if trained or len(data) < max_bytes:  # or the whole file was read
            break
    return TailFigures(train_ppl, val_tokens)


def write_metrics(path: Path, records: Sequence[EpochRecord]) -> None:
    """Rewrite ``metrics.jsonl`` atomically (a resume drops the lines past its checkpoint), a line at a
    time: a long run's history is never one string in memory."""

    def lines(stream: BinaryIO) -> None:
        for record in records:
            stream.write((record.to_json() + "\n").encode("utf-8"))

    atomic_write_stream(path, lines)


def append_metrics(path: Path, record: EpochRecord) -> None:
    """One line appended, not the file rewritten atomically: a line a crash tears is skipped on
    ``--resume`` (``read_metrics``), and a long run's rewrite per line would cost its whole history."""
    with path.open("a", encoding="utf-8") as stream:
        stream.write(record.to_json() + "\n")


def write_run_files(
    files: RunFiles,
    config: Config | None,
    vocab: Vocab,
    records: Sequence[EpochRecord],
    init_from: str | None,
    resumed: bool = False,
) -> None:
    """What a run directory holds before its first step: config, vocabulary, metrics so far, origin
    (``resumed``: the run's own files, written when it began, are there; ``config`` None: keep its own)."""
    files.run_dir.mkdir(parents=True, exist_ok=True)
    if config is not None:
        atomic_write_text(files.config, dump_config(config))
    kept = _with_counts_kept(files.vocab, vocab) if resumed else vocab
    atomic_write_text(files.vocab, kept.to_json() + "\n")
    write_metrics(files.metrics, records)
    if init_from:
        atomic_write_text(files.init_from, init_from + "\n")


def _with_counts_kept(path: Path, vocab: Vocab) -> Vocab:
    """A checkpoint holds the vocabulary's tokens alone (its header stays small), so a resumed run's
    lacks the text's token counts: the run's ``vocab.json``, written when the run began, keeps them
    (``data.min_freq``'s cut is read there) where it describes the same vocabulary."""
    if vocab.token_freqs or not path.is_file():
        return vocab
    try:
        written = Vocab.from_json(path.read_text(encoding="utf-8"))
    except Exception:  # unreadable, tampered (an infinite count, JSON nested too deep): replaced
        return vocab
    same = (written.idx_to_token, written.min_freq, written.reserved_tokens) == (
        vocab.idx_to_token,
        vocab.min_freq,
        vocab.reserved_tokens,
    )
    return replace(vocab, token_freqs=written.token_freqs) if same else vocab


class PlotRefresh:
    """Redraws ``perplexity.png`` at most every ``every`` seconds (or when forced); says once when
    matplotlib is missing or the file cannot be written, and stops trying. matplotlib is imported for
    the first plot, not as the run starts (0.5 s before its first line)."""

    def __init__(
        self,
        path: Path,
        reporter: Reporter,
        val_split_tokens: int = 0,
        train_as: str | None = None,
        every: float = 5.0,
    ) -> None:
        self.path = path
        self.reporter = reporter
        self.val_split_tokens = val_split_tokens  # a validation of fewer is labelled a partial one
        self.train_as = train_as  # as_trained: in the train line's legend
        self.every = every
        self._last = 0.0
        self._ok = True
        self._imported = False  # matplotlib imported, and found to import (plotter_problem)

    def missing_plotter(self) -> str | None:
        """The note that matplotlib is not installed, for the notes a run starts with (said at the first
        plot, it came minutes in, or at the end of a run with no line before); None where it is installed.
        One that is installed but fails to import is said when the first plot imports it."""
        note = missing_plotter_note(importing=False)
        if note is not None:
            self._ok = False
        return note

    def update(self, records: Sequence[EpochRecord], force: bool = False) -> None:
        now = time.monotonic()
        if not records or not self._ok or (not force and now - self._last < self.every):
            return  # no line yet: no plot (empty axes around 0 read as a perplexity below zero)
        self._last = now
        if not self._imported:  # the first plot: a failing import said once, NumPy's banner kept off stderr
            note = missing_plotter_note()
            if note is not None:
                self._ok = False
                self.reporter.note(note)
                return
            self._imported = True
        try:
            # titled with the run directory's name
            png = render_perplexity_plot(
                records, run_name(self.path.parent), self.val_split_tokens, self.train_as
            )
        except (
            Exception
        ) as error:  # the plot is a view of metrics.jsonl: whatever breaks it, training goes on
            self._ok = False
            self.reporter.note(
                f"drawing perplexity.png failed ({type(error).__name__}: {first_line(error)}); training goes "
                "on, and the plot is not updated again in this session (metrics.jsonl has every line)"
            )
            return
        if png is None:
            self._ok = False  # say it once, not at every refresh
            self.reporter.note(missing_plotter_note() or "matplotlib cannot draw here: no plot")
            return
        try:
            atomic_write_bytes(self.path, png)
        except DrnnError as error:  # the plot is a view of metrics.jsonl: no reason to stop training
            self._ok = False
            self.reporter.note(f"{error}; training goes on without the plot")
