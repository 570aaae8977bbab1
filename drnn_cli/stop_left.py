"""What a training that stopped short leaves in its run directory, in words and as ``--json``'s object:
its checkpoints on disk, read from the directory itself (a stop can land between a checkpoint's rename
and the return of its write: only the files know what ``--resume`` continues from)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from drnn_cli.checkpoint import read_checkpoint_info
from drnn_cli.errors import DrnnError, StoppedRun, TrainingDiverged, TrainingInterrupted
from drnn_cli.report import training_position
from drnn_cli.run_files import BEST, LAST
from drnn_cli.session_time import SessionSeconds
from drnn_cli.trainer_state import UnusableTrainerState

# How the user continues a session a signal stopped, by what the session's command already names
# (--resume --overwrite is refused, whether the session replaces a run or had none to replace)
RESUME_ADVICE = "the same command plus --resume"
RESUME_AGAIN_ADVICE = "the same command again"  # a --resume session's command has it
OVERWRITE_RESUME_ADVICE = "the same command with --resume in place of --overwrite"


def how_to_continue(resume: bool, overwrite: bool) -> str:
    """The words that tell how to continue: the command with --resume, in place of --overwrite where it
    had that (an --overwrite session trained beside the run it replaces), as it was where it had it."""
    if overwrite:
        return OVERWRITE_RESUME_ADVICE
    return RESUME_AGAIN_ADVICE if resume else RESUME_ADVICE


def left_by_signal(run_dir: Path, resume_advice: str) -> str:
    """What a signal that ends a training at once leaves in ``run_dir``, for its interrupted line: the
    last checkpoint written and how to continue it, or that none was written."""
    last = run_dir / LAST
    if not last.is_file():
        return "no checkpoint was written"
    return continues_from(last, resume_advice)


def continues_from(last: Path, resume_advice: str) -> str:
    """The words that name the checkpoint ``--resume`` would continue from, and the command that does."""
    return f"the last checkpoint written, {last}, continues with {resume_advice}"


def kept_checkpoints(run_dir: Path) -> str:
    """What a run stopped by a fault (a divergence, a kernel's) may truthfully promise: checkpoints are
    never non-finite, so those on disk are good."""
    kept = [run_dir / name for name in (LAST, BEST) if (run_dir / name).is_file()]
    if kept:
        return f"the last good checkpoint {' and '.join(map(str, kept))} was kept"
    return "no checkpoint was written"


def diverged(run_dir: Path, what: str) -> TrainingDiverged:
    """The error that ends a run whose loss or weights became NaN or infinite: ``what`` happened, and
    which checkpoints it kept."""
    return TrainingDiverged(
        f"{what}; training stopped and {kept_checkpoints(run_dir)}. Lower train.lr, or keep train.clip > 0"
    )


def stopped_at_once(
    run_dir: Path,
    signal_name: str,
    *,
    began_at: float,
    first_step: int,
    seconds: SessionSeconds,
    epochs_done: Callable[[int, int], float],
) -> StoppedRun:
    """Where a signal that ends training at once (a second Ctrl-C) leaves the run, for ``--json``: at
    its last checkpoint on disk, read back from the file (the steps trained since are lost), or, where
    none is there, at the session's start (``began_at`` epochs, ``first_step`` steps). ``epochs_done``:
    the epochs done after a step of an epoch, fractional inside it."""
    last = run_dir / LAST
    try:
        info = read_checkpoint_info(last) if last.is_file() else None
        counters = info.counters() if info is not None else None
    except (DrnnError, UnusableTrainerState):
        info = counters = None  # a file drnn did not write there: no checkpoint to speak of
    steps = counters.global_step if counters is not None else None
    return StoppedRun(
        run_dir=run_dir,
        signal=signal_name,
        epochs=began_at if info is None else epochs_done(info.epoch, info.step_in_epoch),
        start_epoch=began_at,
        steps=first_step if info is None or steps is None else steps,
        start_step=first_step,
        checkpoint=None if info is None else last,
        validation_pending=counters is not None and counters.boundary_pending,
        seconds=seconds,
    )


def interrupted(
    stopped: StoppedRun,
    epoch: int,
    step: int,
    exit_code: int,
    resume_advice: str,
    starting_validation_cut: bool,
) -> TrainingInterrupted:
    """The error that ends a training a signal ``stopped`` after ``step`` steps of ``epoch``, its
    checkpoint written: where, how to continue, and ``--json``'s object. ``starting_validation_cut``: the
    validation it cut short was a fine-tuning run's of its starting weights."""
    what = "the starting weights' validation" if starting_validation_cut else "its validation"
    cut = f" ({what} cut short: --resume runs it first)" if stopped.validation_pending else ""
    return TrainingInterrupted(
        f"training stopped by {stopped.signal} "
        f"{training_position(epoch, step, stopped.steps)}{cut}; "
        f"its checkpoint is in {stopped.run_dir / LAST}; continue with {resume_advice}",
        exit_code,
        stopped,
    )
