"""``drnn runs``: the runs below a folder, each described from its checkpoint's header.

Only headers are read (no tensor), so a folder of large runs lists at once; a file that is not a
checkpoint, or a hostile one, is a row that says why (the refusal :func:`read_checkpoint_info` makes
for every command), never a failure of the listing. What a row says of a run's end is what ``drnn
train --resume`` would find: ``finished`` where it has nothing left to train (its epochs, its
``train.max_steps`` or its patience spent: :func:`run_notes.nothing_left`, as the trainer asks), else
``resumable``.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from drnn_cli.budget import StopReason, format_duration
from drnn_cli.checkpoint import CheckpointInfo, read_checkpoint_info
from drnn_cli.config import Config
from drnn_cli.errors import DrnnError, first_line
from drnn_cli.report import last_figures
from drnn_cli.run_files import BEST, LAST, LATEST_MARKER, LOCK_NAME, RUN_MARKER, RunFiles, staging_dir
from drnn_cli.run_notes import nothing_left
from drnn_cli.rundir import (
    DEFAULT_RUNS_ROOT,
    holds_run,
    latest_run,
    training_holder,
    waiting_replacement_note,
)
from drnn_cli.stop_record import StoppedBy, StopRecord, read_stop_record
from drnn_cli.trainer_state import SavedCounters, UnusableTrainerState

# How deep below the folder runs are looked for: runs/NAME, runs/GROUP/NAME, runs/A/B/NAME (--run paths)
RUNS_DEPTH = 3
# Settings every row shows anyway (model, text, planned length): no "differs" entry repeats them
SHOWN_SETTINGS = frozenset(
    {
        "data.corpus",
        "data.path",
        "data.token",
        "model.cell",
        "model.num_layers",
        "model.hidden_size",
        "model.embedding_dim",
        "model.impl",
        "train.epochs",
        "train.max_steps",
    }
)

# Settings of how a run reports and keeps itself, not of what it learns: runs that differ in them alone
# (another sample prefix) are no sweep, and they would take a place of the few the table shows
REPORTING_SETTINGS = frozenset(
    {
        "train.sample_every",
        "train.sample_prefixes",
        "train.sample_chars",
        "train.log_every",
        "train.checkpoint_every",
        "train.keep_every",
        "train.tensorboard",
    }
)


@dataclass(frozen=True)
class RunSummary:
    """One run directory as its newest checkpoint's header describes it."""

    run_dir: Path
    latest: bool  # the run predict and eval use without --run (runs/latest)
    checkpoint: Path | None  # the file read: last.safetensors, else best.safetensors
    updated: float | None  # that file's modification time (seconds since the epoch)
    info: CheckpointInfo | None  # None where the file cannot be read: ``problem`` says why
    counters: SavedCounters | None  # None in a header whose trainer state is unusable
    training: str | None  # "process 123": a training on this host holds the run now
    problem: str | None = None
    best_val_ppl: float | None = None  # best.safetensors' own figure, else the newest header's
    waiting: str | None = None  # the note on a newer run a killed --overwrite left beside this one
    stop: StopRecord | None = None  # why its last session ended, where the record speaks of this checkpoint
    replacing: bool = False  # an --overwrite session's staging run is beside it (with a checkpoint or not)
    train_ppl: float | None = None  # its metrics.jsonl's last training perplexity up to the checkpoint
    val_tokens: int | None = None  # the predictions its last validation read (metrics.jsonl)

    @property
    def finished_by(self) -> StopReason | None:
        """Why ``drnn train --resume`` would find nothing left to train, else None."""
        if self.info is None:
            return None
        counters = self.counters or SavedCounters(None, 0, 0.0, False)  # unknown counters spent nothing
        return nothing_left(
            self.info.config.train,
            self.info.epoch,
            counters.global_step,
            counters.bad_evals,
            counters.boundary_pending,
        )

    @property
    def state(self) -> str:
        if self.training is not None:
            return "training"
        # the newest news: a session past the checkpoint (--set train.epochs higher, say), or before the
        # first, that wrote none, its loss NaN or infinite
        if self.stopped_by == "diverged":
            return "diverged"
        if self.checkpoint is None and self.stop is not None:  # Ctrl-C, say, before its first checkpoint
            return "stopped"
        if self.info is None:
            return "unreadable"
        if self.checkpoint is not None and self.checkpoint.name == BEST:
            # killed outright (kill -9, a node lost) after a validation but before its first last: --resume
            # has nothing to continue, its best a fine-tuning start (red42: listed as resumable)
            return "stopped"
        if self.finished_by is not None:
            return "early-stopped" if self.finished_by == "patience" else "finished"
        return "resumable"

    def shown_state(self, holder: bool = True) -> str:
        """The state as the table says it: with why a resumable run stopped (``resumable (SIGINT)``) and,
        where there is room (``holder``), which process holds a training (``training (process 123)``)."""
        if self.training is not None and holder:
            return f"training ({self.training})"
        if self.state in ("resumable", "stopped") and self.stopped_by is not None:
            return f"{self.state} ({self.stopped_by})"
        return self.state

    @property
    def stopped_by(self) -> StoppedBy | None:
        """Why the session that wrote the newest checkpoint ended (a budget, a signal), or the session
        after it diverged; None where no record speaks of it (a run from before records, one killed
        outright)."""
        return None if self.stop is None else self.stop.stopped_by

    def model(self) -> str:
        """``lstm 2×256``, with an embedding's width and an implementation other than cuDNN's."""
        if self.info is None:
            return ""
        model = self.info.config.model
        shown = f"{model.cell} {model.num_layers}×{model.hidden_size}"
        if model.embedding_dim:
            shown += f" emb {model.embedding_dim}"
        return shown + ("" if model.impl == "torch" else f" {model.impl}")

    def text(self) -> str:
        """The text it trained on: a file's name, or the named corpus; words marked as such."""
        if self.info is None:
            return ""
        data = self.info.config.data
        name = Path(data.path).name if data.path else data.corpus
        return name + (" (words)" if data.token == "word" else "")

    def sampled_validation(self) -> int | None:
        """``train.eval_tokens`` where the run's validations read that sample of the split rather than
        all of it (own40: the sample's figure was listed as the one drnn eval --split val prints); None
        where they read the whole split, as far as its metrics tell (a split smaller than the sample)."""
        if self.info is None or not self.info.config.train.eval_tokens:
            return None
        sample = self.info.config.train.eval_tokens
        return sample if self.val_tokens is None or self.val_tokens >= sample else None

    @functools.cached_property
    def scored_on(self) -> tuple[Any, ...] | None:
        """What its perplexities were measured on: the text (as drnn reads it, else its file's SHA-1,
        else its name), the settings that cut and spell its splits, the share of validation it reads
        (``train.eval_tokens``) and the vocabulary that scores them (``<unk>``: a fine-tuned run keeps
        its base's whatever its ``data.min_freq``). Runs that differ in it score other tokens, and their
        figures do not rank against each other (prac39: --sort best mixed two texts; review rev40);
        None where the run cannot be read. Kept once made: the table compares it for every pair of rows in
        each layout it tries, and a word run's vocabulary holds 100,000 tokens."""
        if self.info is None:
            return None
        data = self.info.config.data
        text = self.info.text_sha1 or self.info.corpus_sha1 or data.path or data.corpus
        return (
            text,
            data.token,
            data.preprocess,
            data.max_tokens,
            data.val_fraction,
            data.test_fraction,
            self.info.config.train.eval_tokens,
            tuple(self.info.vocab.idx_to_token),
        )

    def scored_on_id(self) -> str | None:
        """:attr:`scored_on` in 12 hex digits, for ``--json``: runs with the same id rank together."""
        key = self.scored_on
        if key is None:
            return None
        return hashlib.sha1(json.dumps(key, ensure_ascii=True).encode("ascii")).hexdigest()[:12]

    def tuned_from(self) -> str:
        """``from runs/base``: the run a fine-tuned run started from (its checkpoint's folder, relative to
        the working directory where it lies below it), or nothing for a run that started from scratch."""
        if self.info is None or self.info.init_from is None:
            return ""
        base = Path(self.info.init_from).parent
        with contextlib.suppress(ValueError):
            base = base.relative_to(Path.cwd())
        return f"from {base}"

    def trained(self) -> str:
        """``500/500 epochs``, ``79/500 epochs +3 steps`` inside the 80th, ``4,000/90,000 steps`` where
        ``train.max_steps`` may end the run first (and has not been beaten to it by the epochs)."""
        if self.info is None:  # a training that has written no checkpoint yet, or an unreadable one
            if self.checkpoint is None and self.training is not None:
                return "no checkpoint yet"
            return (
                "no checkpoint" if self.checkpoint is None and self.state in ("diverged", "stopped") else ""
            )
        train = self.info.config.train
        step = None if self.counters is None else self.counters.global_step
        if train.max_steps and step is not None and self.finished_by != "epochs":
            return f"{step:,}/{train.max_steps:,} steps"
        inside = f" +{self.info.step_in_epoch:,} steps" if self.info.step_in_epoch else ""
        return f"{self.info.epoch:,}/{train.epochs:,} epochs{inside}"

    def training_time(self) -> str:
        return "" if self.counters is None else format_duration(self.counters.elapsed)

    def updated_at(self, short: bool = False) -> str:
        """Local time, to the minute; ``short``: the time alone today, else the date alone (``11-27``,
        with its year where that is another)."""
        if self.updated is None:
            return ""
        when = datetime.datetime.fromtimestamp(self.updated)
        if not short:
            return when.strftime("%Y-%m-%d %H:%M")
        today = datetime.date.today()
        if when.date() == today:
            return when.strftime("%H:%M")
        return when.strftime("%m-%d" if when.year == today.year else "%Y-%m-%d")

    def notes(self) -> list[str]:
        """What the table says under itself of this run: why a file of it cannot be read, and a newer
        run beside it (a --overwrite's, which the training holding the run puts in place when it ends)."""
        said = [] if self.problem is None else [self.problem]
        if self.training is not None and (self.waiting is not None or self.replacing):
            said.append(
                f"a --overwrite training ({self.training}) is replacing this run; the row is the run it replaces"
            )
        elif self.waiting is not None:
            said.append(self.waiting)
        return said

    def differs(self, keys: list[str]) -> dict[str, Any]:
        """This run's values of ``keys`` (:func:`differing_settings`); none where it cannot be read."""
        if self.info is None:
            return {}
        values = settings(self.info.config)
        return {key: values[key] for key in keys}

    def summary(self, differing: list[str] | None = None) -> dict[str, Any]:
        """The ``--json`` object of one run; ``differing``: the settings the listed runs differ in."""
        info, counters = self.info, self.counters
        config = None if info is None else info.config
        return {
            "run_dir": str(self.run_dir.absolute()),  # absolute, as every path --json prints
            "latest": self.latest,
            "state": self.state,
            "finished_by": self.finished_by,
            "stopped_by": self.stopped_by,
            "training_process": self.training,
            "checkpoint": None if self.checkpoint is None else str(self.checkpoint.absolute()),
            "updated": (
                None
                if self.updated is None
                else datetime.datetime.fromtimestamp(self.updated).astimezone().isoformat(timespec="seconds")
            ),
            "problem": self.problem,
            "newer_run_waiting": self.waiting,
            "cell": None if config is None else config.model.cell,
            "num_layers": None if config is None else config.model.num_layers,
            "hidden_size": None if config is None else config.model.hidden_size,
            "impl": None if config is None else config.model.impl,
            "text": None if info is None else self.text(),
            "init_from": None if info is None else info.init_from,
            "epoch": None if info is None else info.epoch,
            "step_in_epoch": None if info is None else info.step_in_epoch,
            "global_step": None if counters is None else counters.global_step,
            "epochs": None if config is None else config.train.epochs,
            "max_steps": None if config is None else config.train.max_steps,
            "best_val_ppl": self.best_val_ppl,
            # the predictions a validation reads: fewer than the split's under train.eval_tokens
            "val_tokens": self.val_tokens,
            "train_ppl": self.train_ppl,
            "scored_on": self.scored_on_id(),
            "training_seconds": None if counters is None else counters.elapsed,
            "differs": self.differs(differing or []),
        }


def settings(config: Config) -> dict[str, Any]:
    """Every setting of a config by its dotted key (``train.lr``), in the schema's order, as JSON values."""
    return {
        f"{section}.{key}": value
        for section in ("data", "model", "train")
        for key, value in getattr(config, section).model_dump(mode="json").items()
    }


def differing_settings(runs: list[RunSummary]) -> list[str]:
    """The settings whose values differ between the listed runs that can be read (what a sweep varied),
    in the schema's order, leaving out those every row shows (:data:`SHOWN_SETTINGS`) and those of how a
    run reports itself (:data:`REPORTING_SETTINGS`)."""
    flat = [settings(run.info.config) for run in runs if run.info is not None]
    if len(flat) < 2:
        return []
    return [
        key
        for key in flat[0]
        if key not in SHOWN_SETTINGS | REPORTING_SETTINGS
        and any(other.get(key) != flat[0][key] for other in flat[1:])
    ]


def as_set(key: str, value: Any) -> str:
    """``train.lr=0.5``: a setting written as ``--set`` takes it."""
    if isinstance(value, bool) or value is None:
        shown = json.dumps(value)
    elif isinstance(value, float):
        shown = f"{value:g}"
    elif isinstance(value, str):
        shown = value
    else:
        shown = json.dumps(value, ensure_ascii=False)
    return f"{key}={shown}"


def find_runs(folder: Path, depth: int = RUNS_DEPTH) -> list[Path]:
    """The run directories at most ``depth`` levels below ``folder`` (``folder`` itself where it is
    one), each once, by the name its real folders give it: they are searched first, the symbolic links
    among them only after, so that a link (``runs/old -> ..``, runs kept on another disk and linked in)
    adds only the runs it alone leads to. A folder reached again is searched again only where more
    levels below it are left to search than before. A run's own folders (``kept/``, ``tensorboard/``)
    are not searched, nor hidden ones (an ``--overwrite`` session's staging run, ``.quick.overwrite``,
    is said by the commands that read the run beside it). A run directory is one that holds a
    checkpoint, one whose lock a live training holds (before its first checkpoint, before drnn's mark
    even, as it reads its text), or one of drnn's whose record says why it stopped before any checkpoint
    (its loss diverged, or a signal: own40, a run Ctrl-C stopped early was listed nowhere)."""
    found: dict[Path, Path] = {}  # each run's real path: the name it is listed by
    for follow_links in (False, True):
        _search(folder, depth, follow_links, {}, found)
    return list(found.values())


def _search(
    folder: Path, depth: int, follow_links: bool, searched: dict[Path, int], found: dict[Path, Path]
) -> None:
    """``find_runs``' walk; ``searched``: the real folders searched in this pass, with the levels below
    each that were."""
    try:
        real = folder.resolve()
    except (OSError, RuntimeError):  # a link loop that resolve() cannot follow
        return
    if searched.get(real, -1) >= depth:
        return
    searched[real] = depth
    try:
        if holds_run(folder) or training_holder(folder) is not None or _stopped_before_a_checkpoint(folder):
            found.setdefault(real, folder)
            return
    except OSError:  # a folder this user may not search (no x permission): no run to show
        return
    if depth <= 0:
        return
    with contextlib.suppress(OSError):  # an unreadable folder holds no run this listing can show
        for child in sorted(folder.iterdir()):
            with contextlib.suppress(OSError):
                if child.name.startswith(".") or not child.is_dir():
                    continue
                if follow_links or not child.is_symlink():
                    _search(child, depth - 1, follow_links, searched, found)


def _stopped_before_a_checkpoint(folder: Path) -> bool:
    """A run of drnn's whose first session ended before any checkpoint, its loss NaN (a sweep's learning
    rate far too high) or by a signal: it has no checkpoint to list, and left out it would hide the
    sweep's failure, or the run a user stopped."""
    return (folder / RUN_MARKER).is_file() and read_stop_record(folder) is not None


def describe_run(run_dir: Path, latest: Path | None) -> RunSummary:
    """What ``run_dir``'s newest checkpoint says of it (``last.safetensors``, else the ``best`` of a run
    stopped before its first ``last``); ``latest``: the latest run, resolved. A checkpoint that cannot
    be read is said, as the command that reads it would say it: ``last`` makes the row unreadable (a
    resume reads it), ``best`` leaves no best figure (eval and predict read it)."""
    checkpoint = next((run_dir / name for name in (LAST, BEST) if os.path.lexists(run_dir / name)), None)
    is_latest = False
    with contextlib.suppress(OSError, RuntimeError):  # RuntimeError: a link loop resolve() gives up on
        is_latest = latest is not None and run_dir.resolve() == latest
    training = training_holder(run_dir)
    if checkpoint is None:  # a training before its first checkpoint, one that diverged before it, or gone
        stop = read_stop_record(run_dir)
        known = training is not None or stop is not None
        began: float | None = None
        with contextlib.suppress(OSError):  # when its training began, or stopped
            began = max(path.stat().st_mtime for path in (run_dir / LOCK_NAME, run_dir) if path.exists())
        return RunSummary(
            run_dir,
            is_latest,
            None,
            began,
            None,
            None,
            training,
            None if known else "no checkpoint",
            stop=stop,
        )
    updated: float | None = None
    with contextlib.suppress(OSError):
        updated = checkpoint.stat().st_mtime
    try:
        info = read_checkpoint_info(checkpoint)
    except DrnnError as error:  # drnn's refusal, one line: as predict or eval of it would say it
        return RunSummary(run_dir, is_latest, checkpoint, updated, None, None, training, str(error))
    except OSError as error:  # the file went between the listing and the read
        return RunSummary(run_dir, is_latest, checkpoint, updated, None, None, training, first_line(error))
    try:
        counters: SavedCounters | None = info.counters()
    except UnusableTrainerState:  # its weights still predict and evaluate; only its counters are unknown
        counters = None
    waiting, replacing = None, False
    with contextlib.suppress(OSError, RuntimeError):
        waiting = waiting_replacement_note(run_dir, "drnn runs describes")
        replacing = staging_dir(run_dir.resolve() if run_dir.is_symlink() else run_dir).is_dir()
    best, problem = _best(run_dir, checkpoint, info)
    train_ppl = val_tokens = None
    if counters is not None and counters.global_step is not None:
        train_ppl, val_tokens = last_figures(RunFiles(run_dir).metrics, counters.global_step, info.epoch)
    stop = read_stop_record(run_dir)
    if stop is not None and not stop.applies_to(None if counters is None else counters.global_step):
        stop = None
    return RunSummary(
        run_dir,
        is_latest,
        checkpoint,
        updated,
        info,
        counters,
        training,
        problem,
        best,
        waiting,
        stop,
        replacing,
        train_ppl,
        val_tokens,
    )


def _best(run_dir: Path, newest_path: Path, newest: CheckpointInfo) -> tuple[float | None, str | None]:
    """The best validation perplexity on disk, with what keeps it from being shown. ``best.safetensors``
    names its own, which a validation after the newest ``last`` was written (a time budget's final one)
    has made better than ``last``'s; one that cannot be read has none eval could reproduce; a figure no
    perplexity can be (below 1, NaN: a tampered header) is none, said of the file that names it (red41:
    ``best.safetensors`` was blamed for ``last``'s figure, in a run that had no best)."""
    best_path, figure = newest_path, newest.best_val_ppl
    if os.path.lexists(run_dir / BEST):
        best_path = run_dir / BEST
        try:
            figure = read_checkpoint_info(best_path).best_val_ppl
        except DrnnError as error:
            return None, str(error)
        except OSError as error:
            return None, first_line(error)
    if figure is not None and not (math.isfinite(figure) and figure >= 1):
        return None, f"{best_path} names a best validation perplexity of {figure}, which no validation gives"
    return figure, None


RunOrder = Literal["updated", "best", "name"]


def _order_key(order: RunOrder) -> Callable[[RunSummary], tuple[Any, ...]]:
    """``updated``: the most recently written first; ``best``: the lowest best validation perplexity
    first, runs without one after them (by their last training perplexity, then newest first), which
    :func:`list_runs` then gathers by text; ``name``: by path."""
    if order == "name":
        return lambda run: (str(run.run_dir),)
    if order == "best":  # runs without a figure (none, or a tampered one: _best) after those with one

        def best_first(run: RunSummary) -> tuple[Any, ...]:
            best, trained = run.best_val_ppl, run.train_ppl
            return (best is None, best or 0.0, trained is None, trained or 0.0, -(run.updated or 0.0))

        return best_first
    return lambda run: (-(run.updated or 0.0),)


def list_runs(
    folder: Path, order: RunOrder = "updated", runs_root: Path = DEFAULT_RUNS_ROOT
) -> list[RunSummary]:
    """The runs below ``folder`` in ``order``. The latest run is the one ``folder``'s own latest-run
    marker names where it holds one (``drnn runs /elsewhere/runs``, listed from another directory), else
    ``runs_root``'s (``runs/`` where the command runs, which predict and eval read)."""
    if not folder.exists():
        raise DrnnError(
            f"{folder} does not exist in {Path.cwd()}; run drnn runs where you trained, or name the folder "
            "of runs: drnn runs DIR"
        )
    if not folder.is_dir():
        raise DrnnError(
            f"{folder} is not a folder; drnn runs takes a folder of runs (or one run's directory)"
        )
    latest = _latest_in(_starred_by(folder, runs_root))
    runs = sorted((describe_run(run_dir, latest) for run_dir in find_runs(folder)), key=_order_key(order))
    if order == "best":
        return _each_text_apart(runs)
    return runs


def star_elsewhere(folder: Path, runs_root: Path = DEFAULT_RUNS_ROOT) -> Path | None:
    """The latest-run marker that starred a run of ``folder`` where it is not the run predict and eval
    read here without --run (``drnn runs ../runs`` from a folder without runs of its own: audit43);
    None where it is that run."""
    marker_folder = _starred_by(folder, runs_root)
    if marker_folder is runs_root:
        return None
    starred = _latest_in(marker_folder)
    return None if starred is None or starred == _latest_in(runs_root) else marker_folder / LATEST_MARKER


def _starred_by(folder: Path, runs_root: Path) -> Path:
    """The folder whose latest-run marker names ``folder``'s latest run: its own where it holds one,
    else ``runs_root`` (``runs/`` where the command runs, which predict and eval read)."""
    with contextlib.suppress(OSError):
        if (folder / LATEST_MARKER).is_file():
            return folder
    return runs_root


def _latest_in(marker_folder: Path) -> Path | None:
    """The run ``marker_folder``'s latest-run marker names, resolved; None where there is none."""
    with contextlib.suppress(DrnnError, OSError, RuntimeError):
        return latest_run(marker_folder).resolve()
    return None


def _each_text_apart(ranked: list[RunSummary]) -> list[RunSummary]:
    """``ranked`` with the runs scored on one text and split together, each text's in their order, the
    text of the best figure first, the runs that cannot be read last: a perplexity ranks only against
    others over the same tokens."""
    texts: dict[tuple[Any, ...] | None, list[RunSummary]] = {}
    for run in ranked:
        texts.setdefault(run.scored_on, []).append(run)
    unread = texts.pop(None, [])
    return [run for runs in texts.values() for run in runs] + unread
