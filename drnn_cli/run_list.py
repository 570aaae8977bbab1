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
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from drnn_cli.budget import StopReason, format_duration
from drnn_cli.checkpoint import CheckpointInfo, read_checkpoint_info
from drnn_cli.config import Config
from drnn_cli.errors import DrnnError, first_line
from drnn_cli.run_files import BEST, LAST, LATEST_MARKER
from drnn_cli.run_notes import nothing_left
from drnn_cli.rundir import (
    DEFAULT_RUNS_ROOT,
    holds_run,
    latest_run,
    training_holder,
    waiting_replacement_note,
)
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
        if self.info is None:
            return "unreadable"
        return {None: "resumable", "patience": "early-stopped"}.get(self.finished_by, "finished")

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

    def trained(self) -> str:
        """``500/500 epochs``, ``79/500 epochs +3 steps`` inside the 80th, ``4,000/90,000 steps`` where
        ``train.max_steps`` may end the run first."""
        if self.info is None:
            return ""
        train = self.info.config.train
        step = None if self.counters is None else self.counters.global_step
        if train.max_steps and step is not None:
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
            "run_dir": str(self.run_dir),
            "latest": self.latest,
            "state": self.state,
            "finished_by": self.finished_by,
            "training_process": self.training,
            "checkpoint": None if self.checkpoint is None else str(self.checkpoint),
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
            "epoch": None if info is None else info.epoch,
            "step_in_epoch": None if info is None else info.step_in_epoch,
            "global_step": None if counters is None else counters.global_step,
            "epochs": None if config is None else config.train.epochs,
            "max_steps": None if config is None else config.train.max_steps,
            "best_val_ppl": self.best_val_ppl,
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
    in the schema's order, leaving out those every row shows (:data:`SHOWN_SETTINGS`)."""
    flat = [settings(run.info.config) for run in runs if run.info is not None]
    if len(flat) < 2:
        return []
    return [
        key
        for key in flat[0]
        if key not in SHOWN_SETTINGS and any(other.get(key) != flat[0][key] for other in flat[1:])
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


def find_runs(folder: Path, depth: int = RUNS_DEPTH, seen: set[Path] | None = None) -> list[Path]:
    """The run directories at most ``depth`` levels below ``folder`` (``folder`` itself where it is
    one), each once: a folder reached again through a symbolic link (``runs/old -> ..``, or runs kept
    on another disk and linked in twice) is not searched again (``seen``: the real paths searched), and
    a folder's own subfolders are searched before its links. A run's own folders (``kept/``,
    ``tensorboard/``) are not searched, nor hidden ones (an ``--overwrite`` session's staging run,
    ``.quick.overwrite``, is said by the commands that read the run beside it)."""
    seen = set() if seen is None else seen
    try:
        real = folder.resolve()
    except (OSError, RuntimeError):  # a link loop that resolve() cannot follow
        return []
    if real in seen:
        return []
    seen.add(real)
    try:
        if holds_run(folder):
            return [folder]
    except OSError:  # a folder this user may not search (no x permission): no run to show
        return []
    found: list[Path] = []
    if depth <= 0:
        return found
    with contextlib.suppress(OSError):  # an unreadable folder holds no run this listing can show
        # real folders before links, so that a run with a second name is listed by its own
        for child in sorted(folder.iterdir(), key=lambda path: (path.is_symlink(), path.name)):
            with contextlib.suppress(OSError):
                if child.name.startswith(".") or not child.is_dir():
                    continue
                found.extend(find_runs(child, depth - 1, seen))
    return found


def describe_run(run_dir: Path, latest: Path | None) -> RunSummary:
    """What ``run_dir``'s newest checkpoint says of it; ``latest``: the latest run, resolved."""
    checkpoint = None
    with contextlib.suppress(OSError):
        checkpoint = next((run_dir / name for name in (LAST, BEST) if (run_dir / name).is_file()), None)
    is_latest = False
    with contextlib.suppress(OSError, RuntimeError):  # RuntimeError: a link loop resolve() gives up on
        is_latest = latest is not None and run_dir.resolve() == latest
    training = training_holder(run_dir)
    if checkpoint is None:  # a run removed while listing
        return RunSummary(run_dir, is_latest, None, None, None, None, training, "no checkpoint")
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
    waiting = None
    with contextlib.suppress(OSError, RuntimeError):
        waiting = waiting_replacement_note(run_dir, "drnn runs describes")
    return RunSummary(
        run_dir, is_latest, checkpoint, updated, info, counters, training, None, _best(run_dir, info), waiting
    )


def _best(run_dir: Path, newest: CheckpointInfo) -> float | None:
    """The best validation perplexity on disk: ``best.safetensors`` names its own, which a validation
    after the newest ``last`` was written (a time budget's final one) has made better than ``last``'s."""
    best = run_dir / BEST
    if best.is_file():
        with contextlib.suppress(DrnnError, OSError):  # unreadable: the newest header's figure stands
            return read_checkpoint_info(best).best_val_ppl
    return newest.best_val_ppl


RunOrder = Literal["updated", "best", "name"]


def _order_key(order: RunOrder) -> Callable[[RunSummary], tuple[Any, ...]]:
    """``updated``: the most recently written first; ``best``: the lowest best validation perplexity
    first, runs without one after them (newest first); ``name``: by path."""
    if order == "name":
        return lambda run: (str(run.run_dir),)
    if order == "best":  # a header's NaN or infinity (a tampered one) ranks as no figure

        def best_first(run: RunSummary) -> tuple[Any, ...]:
            best = run.best_val_ppl
            known = best is not None and math.isfinite(best)
            return (not known, best if known else 0.0, -(run.updated or 0.0))

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
        raise DrnnError(f"{folder} is a file; drnn runs takes a folder of runs (or one run's directory)")
    latest: Path | None = None
    with contextlib.suppress(DrnnError, OSError, RuntimeError):
        own = (folder / LATEST_MARKER).is_file()
        latest = latest_run(folder if own else runs_root).resolve()
    runs = [describe_run(run_dir, latest) for run_dir in find_runs(folder)]
    return sorted(runs, key=_order_key(order))
