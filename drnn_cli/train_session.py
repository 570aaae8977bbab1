"""Where ``drnn train`` runs: the run directory (its lock, ``--overwrite``'s staging copy swapped in
once it holds a checkpoint, the latest-run marker), the session's start point, the data and the trainer."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import cast, get_args

import torch

from drnn_cli.budget import Cadence
from drnn_cli.checkpoint import check_header_room, read_checkpoint_info
from drnn_cli.config import Config
from drnn_cli.data import load_same_corpus
from drnn_cli.download import ProgressHook
from drnn_cli.errors import (
    DrnnError,
    PeerGone,
    TrainingDiverged,
    TrainingInterrupted,
    UsageError,
    peer_gone_message,
)
from drnn_cli.files import remove_stale_temporaries
from drnn_cli.report import Reporter, TrainResult
from drnn_cli.run_files import BEST, LAST, RunFiles, is_kept_name, staging_dir
from drnn_cli.rundir import (
    DEFAULT_RUNS_ROOT,
    check_replaceable,
    check_run_dir,
    claimed_run_dir,
    default_run_dir,
    discard,
    holds_run,
    is_latest_marker,
    mark_latest,
    mark_run_dir,
    swap_in,
)
from drnn_cli.runtime import DistContext, init_distributed, resolve_device, shutdown_distributed
from drnn_cli.signals import Signalled, in_process_group
from drnn_cli.start_point import (
    StartPoint,
    check_max_unknown,
    fine_tuning_notes,
    given_keys,
    init_point,
    load_start_config,
    longer_run_note,
    resume_point,
    unknown_share_note,
)
from drnn_cli.stop_left import continues_from, how_to_continue, left_by_signal
from drnn_cli.stop_record import StoppedBy, write_stop_record
from drnn_cli.tensorboard_log import summary_writer_class
from drnn_cli.train import Trainer


@dataclass(frozen=True)
class TrainRequest:
    config_path: Path
    overrides: tuple[str, ...] = ()
    run_dir: Path | None = None
    device: str | None = None
    resume: bool = False
    init_from: Path | None = None
    max_unknown_fraction: float | None = None  # with init_from; None: DEFAULT_MAX_UNKNOWN
    overwrite: bool = False
    runs_root: Path = DEFAULT_RUNS_ROOT  # holds runs/<config stem> and the latest-run marker
    config_note: str | None = None  # what --config read, where it may not be what was meant


def train_run(
    request: TrainRequest,
    reporter: Reporter | None = None,
    progress: ProgressHook | None = None,
) -> TrainResult:
    """Everything ``drnn train`` does: config, run directory, lock, data, model, loop."""
    check_max_unknown(request.max_unknown_fraction, request.init_from)
    if request.resume and request.overwrite:
        raise UsageError(
            "--resume and --overwrite cannot be combined: --resume continues the run in the run directory, "
            "--overwrite replaces it with a new one; pick one"
        )
    overrides = request.overrides
    if request.device is not None:
        overrides = (*overrides, f"train.device={request.device}")  # validated like the config key
    config = load_start_config(request.config_path, overrides, request.init_from, request.runs_root)
    if config.train.tensorboard:  # refused on every rank, before the text is read (its token cache written)
        summary_writer_class()
    if config.data.file is not None:  # the run keeps an absolute path: eval and --resume work from anywhere
        config.data.path = _absolute_text_path(config.data.file)
    run_dir = (
        _past_missing_folders(request.run_dir)
        if request.run_dir is not None
        else default_run_dir(request.config_path, request.runs_root)
    )
    dist = init_distributed(config.train.device)
    finished = False
    try:
        device = resolve_device(
            config.train.device, dist.local_rank, "--device" if request.device is not None else "train.device"
        )
        if dist.is_main:
            if is_latest_marker(run_dir, request.runs_root):
                given = (
                    f"--run {run_dir}"
                    if request.run_dir is not None
                    else f"the run directory {run_dir} (named after the config {request.config_path.name})"
                )
                raise DrnnError(
                    f"{given} is the file where drnn records the latest run; pick another name with --run DIR"
                )
            check_run_dir(run_dir)
        with claimed_run_dir(run_dir) if dist.is_main else contextlib.nullcontext():
            job = _TrainJob(request, config, device, dist, reporter, progress)
            result = _train_in_place_or_staged(job, run_dir)
            finished = True
            return result
    finally:
        shutdown_distributed(dist, finished)


@dataclass(frozen=True)
class _TrainJob:
    """What one ``drnn train`` brings to the run directory: the request, its config and where it runs."""

    request: TrainRequest
    config: Config
    device: torch.device
    dist: DistContext
    reporter: Reporter | None
    progress: ProgressHook | None


def _train_in_place_or_staged(job: _TrainJob, run_dir: Path) -> TrainResult:
    """Train into ``run_dir``, or, for ``--overwrite`` of an existing run, beside it and swap on success.

    A closed stdout outside the training loop's handlers (start-up: ``drnn train ... | head -n 0``) ends
    the session at once, as on other commands, though not in silence: its interrupted line says what
    the run directory holds (it exited 141 without a word, as if training had gone on unseen)."""
    try:
        return _place_and_train(job, run_dir)
    except Signalled as ended:
        if ended.quiet and ended.after is None and job.dist.is_main:
            ended.after = _left_at_start(job.request, run_dir)
        raise


def _left_at_start(request: TrainRequest, run_dir: Path) -> str:
    """What a training ended before its loop leaves: the run it found, as it found it (a killed
    --overwrite's newer run included, which --resume continues); an --overwrite, the run it would replace."""
    staging = staging_dir(run_dir.resolve() if run_dir.is_symlink() else run_dir)
    if request.overwrite and holds_run(run_dir) and not holds_run(staging):
        return f"no checkpoint was written, and {run_dir} keeps the run it held"
    advice = how_to_continue(request.resume, request.overwrite)
    return left_by_signal(staging if holds_run(staging) else run_dir, advice)


def _place_and_train(job: _TrainJob, run_dir: Path) -> TrainResult:
    """:func:`_train_in_place_or_staged`'s choice of where, and its training there."""
    request, dist = job.request, job.dist
    # A --run that is a symlink: the run it points at is replaced (on its own disk), the link kept.
    target = run_dir.resolve() if run_dir.is_symlink() else run_dir
    staging = staging_dir(target)
    # A --overwrite session killed outright (SIGKILL, the OOM killer, power loss) after its first
    # checkpoint left the new run here, unswapped: it is the run to resume (or to replace).
    left_behind = holds_run(staging)
    if dist.is_main:
        for directory in (run_dir, RunFiles(run_dir).kept):  # left by a killed writer; we hold the
            remove_stale_temporaries(directory)  # lock, so none is live
        if left_behind:
            remove_stale_temporaries(staging)
            remove_stale_temporaries(RunFiles(staging).kept)
        elif staging.exists() and not request.overwrite:
            discard(staging)  # killed before its first checkpoint: nothing in it to keep
    if left_behind and not request.overwrite:
        if not request.resume:
            raise DrnnError(
                f"{staging} holds a newer run than {run_dir}: a --overwrite session that was killed after its "
                f"checkpoint at {_checkpoint_point(staging)} left it; continue it with --resume and that session's "
                "settings (it then replaces the previous run), replace both with --overwrite, or delete "
                f"{staging} to keep the previous run"
            )
        check_replaceable(target)  # the swap at its end deletes the old folder whole, as --overwrite's
        if job.reporter is not None:
            job.reporter.note(
                f"resuming the newer run a killed --overwrite session left in {staging} (its checkpoint at "
                f"{_checkpoint_point(staging)}); it replaces the previous run in {run_dir} as this session ends"
            )
        return _train_staged(job, run_dir, target, staging)
    if not request.resume and holds_run(run_dir) and not request.overwrite:
        if request.init_from is not None:  # a fine-tuning run is a new one: --resume does not apply
            source = request.init_from.resolve()
            own = source == run_dir.resolve() or run_dir.resolve() in source.parents
            raise DrnnError(
                f"run directory {run_dir} already holds a run"
                + (
                    " (the one --init-from names); train the fine-tuned run elsewhere with --run DIR"
                    if own
                    else "; train the fine-tuned run elsewhere with --run DIR, or replace that run with --overwrite"
                )
            )
        raise DrnnError(
            f"run directory {run_dir} already holds a run; continue it with --resume, pick another with --run DIR, "
            f"or replace it with --overwrite"
        )
    if request.resume or not holds_run(run_dir):
        if dist.is_main and staging.exists():
            discard(staging)  # --overwrite of a run that is gone: the killed replacement goes with it
        return _train_locked(job, run_dir, run_dir)
    check_replaceable(target)
    if dist.is_main:
        point = _checkpoint_point(staging) if left_behind else ""
        discard(staging)  # a leftover of an earlier replacement that was killed: gone before it is said
        if left_behind and job.reporter is not None:
            job.reporter.note(
                f"discarded the newer run a killed --overwrite session left in {staging} (its checkpoint at "
                f"{point}): this --overwrite replaces it too"
            )
    return _train_staged(job, run_dir, target, staging)


def _checkpoint_point(run_dir: Path) -> str:
    """Where the newest checkpoint of ``run_dir`` stands (``step 120 of epoch 3``), from its header alone."""
    path = run_dir / LAST if (run_dir / LAST).is_file() else run_dir / BEST
    try:
        info = read_checkpoint_info(path)
    except DrnnError:
        return path.name  # unreadable: the resume that reads it says why
    if info.step_in_epoch:
        return f"step {info.step_in_epoch:,} of epoch {info.epoch + 1:,}"
    if info.epoch == 0:  # a fine-tuning run's best.safetensors of its starting weights, before any step
        return "the start, before any step"
    return f"the end of epoch {info.epoch:,}"


def _train_staged(job: _TrainJob, run_dir: Path, target: Path, staging: Path) -> TrainResult:
    """Train into ``staging`` beside the run in ``target`` and swap it in at the end, or at a stop
    once it holds a checkpoint. Every torchrun rank trains "into" the staging directory (rank 0 alone
    writes); rank 0 alone moves directories, so that no rank removes what another is about to swap in."""
    request, dist = job.request, job.dist
    try:
        result = _train_locked(job, staging, run_dir)
    except BaseException as error:  # a stop, a failure, a signal outside the loop, an out-of-memory...
        if isinstance(error, Signalled) and dist.is_main and not request.resume:  # a second Ctrl-C, or one
            # during start-up: the interrupted line says which run the directory now holds
            error.after = (
                f"the new run has replaced the previous one in {run_dir}"
                if holds_run(staging)
                else f"no checkpoint was written, and {run_dir} keeps the run it held"
            )
            if error.stopped is not None:  # --json: where the run stands in its own place, not staging's
                written = error.stopped.checkpoint if holds_run(staging) else None
                if written is not None:  # pressed twice in training: how to continue, as a first stop says
                    advice = how_to_continue(request.resume, request.overwrite)
                    error.after += f"; {continues_from(run_dir / written.name, advice)}"
                error.stopped = replace(
                    error.stopped, run_dir=run_dir, checkpoint=written and run_dir / written.name
                )
        if not holds_run(staging):
            if isinstance(error, PeerGone) and not request.resume:
                error.after = f"no checkpoint was written, and {run_dir} keeps the run it held"
            raise  # nothing new to keep: the old run stays as it was (the finally below removes staging)
        if request.resume and not isinstance(error, TrainingInterrupted):
            # the resume of a killed --overwrite's run refused (a changed config, a moved text) or failed:
            # both runs stay where they were, for the command put right (or the failure fixed) to continue
            raise
        if isinstance(error, TrainingInterrupted) and error.stopped.steps == 0 and not request.resume:
            # stopped before its first step (a fine-tuning run's validation of its starting weights):
            # a run that trained nothing does not replace one that did
            if dist.is_main:
                discard(staging)
            raise TrainingInterrupted(
                f"training stopped by {error.stopped.signal} before its first step: nothing was trained, and "
                f"{run_dir} keeps the run it held; run the same command again to replace it",
                error.exit_code,
                replace(error.stopped, run_dir=run_dir, checkpoint=None, validation_pending=False),
            ) from None
        if dist.is_main:  # ...after the new run's first checkpoint: that run is the one to resume
            swap_in(staging, target)
        if isinstance(error, PeerGone):  # where the run stands, in its own place (review rev42)
            error.after = f"the new run has replaced the previous one in {run_dir}; " + error.after.replace(
                str(staging), str(run_dir)
            )
        if not isinstance(error, DrnnError):
            raise
        message = str(error).replace(str(staging), str(run_dir))
        replaced = f"; the new run has replaced the previous one in {run_dir}"
        if isinstance(error, TrainingInterrupted):  # where it stopped names the run's place, not staging's
            written = error.stopped.checkpoint
            stopped = replace(error.stopped, run_dir=run_dir, checkpoint=written and run_dir / written.name)
            raise TrainingInterrupted(message + replaced, error.exit_code, stopped) from None
        raise type(error)(message + replaced, error.exit_code) from None
    finally:
        if dist.is_main and staging.exists() and holds_run(target) and not holds_run(staging):
            discard(staging)
    if dist.is_main:
        swap_in(staging, target)
    return replace(result, run_dir=run_dir)


def _train_locked(job: _TrainJob, run_dir: Path, final_dir: Path) -> TrainResult:
    """Load the data and model for ``run_dir`` (the run's own directory or its staging copy) and train."""
    request, device, dist, reporter = job.request, job.device, job.dist, job.reporter
    given = given_keys(request.overrides)
    if request.resume:
        start = resume_point(run_dir, job.config, device, given, request.init_from)
    elif request.init_from is not None:
        start = init_point(
            request.init_from, job.config, device, final_dir, request.overwrite, request.runs_root, given
        )
    else:
        start = StartPoint(job.config)
    config = start.config
    _check_kept_folder(run_dir, config)
    dataset = load_same_corpus(
        config.data,
        start.vocab,
        "resume",
        "point data.path at that text, or start a new run with --run DIR",
        job.progress,
        expected_sha1=start.expected_sha1,
        expected_text_sha1=start.expected_text_sha1,
    )
    starting_notes = [request.config_note, start.changes]
    if start.resume is not None and config.train.schedule != "cosine":  # cosine's note says more
        starting_notes.append(longer_run_note(start.resume.config, config, len(dataset.splits.train)))
    if start.init_from is not None:  # the unknown share refuses too many (--max-unknown) here
        starting_notes += [
            unknown_share_note(dataset, request.max_unknown_fraction),
            *fine_tuning_notes(start, dataset),
        ]
    check_header_room(dataset.vocab)

    def mark_as_latest() -> None:
        """``runs/latest`` names the run once it has a checkpoint for ``predict`` and ``eval`` to read
        (marked as it started, a run killed before its first, kill -9 or the OOM killer, stayed named),
        and again as its session ends: a learner's 30-second run started while a 13-minute one trained
        stayed "latest" after the long one finished, and predict read it (learner32)."""
        unmarked = mark_latest(final_dir, request.runs_root)
        if unmarked is not None and reporter is not None:
            reporter.note(f"the latest run is not recorded ({unmarked}); pass --run to predict/eval")

    new_run = dist.is_main and not request.resume
    trainer = Trainer(  # validates everything that can still fail; writes nothing
        start,
        dataset,
        run_dir,
        device,
        reporter,
        dist,
        resume_advice=how_to_continue(request.resume, request.overwrite),
        on_first_checkpoint=mark_as_latest if new_run else None,
    )
    # said once nothing can refuse the start any more: a refusal is its one line (a resume from an
    # unusable trainer state printed its longer-run note above it)
    for note in filter(None, starting_notes):
        if reporter is not None:
            reporter.note(note)
    if dist.is_main:
        if not request.resume:
            files = RunFiles(run_dir)
            stale_files = (
                run_dir / LAST,
                run_dir / BEST,
                files.metrics,
                files.plot,
                files.init_from,
                files.stop_record,
            )
            for stale in stale_files:
                stale.unlink(missing_ok=True)
            _discard_kept_points(files.kept)  # an earlier run's kept points would read as this one's
        mark_run_dir(run_dir)
        if request.resume:  # it has its checkpoint
            mark_as_latest()
            # the record is of the session before: one killed outright (SIGKILL) must leave none behind
            RunFiles(run_dir).stop_record.unlink(missing_ok=True)
    try:
        result = trainer.fit()
    except TrainingInterrupted as stop:  # stopped by a signal or a closed stdout, after its checkpoint
        if dist.is_main:
            try:
                write_stop_record(run_dir, stop.stopped.signal, stop.stopped.steps)  # type: ignore[arg-type]
                mark_as_latest()
            except Signalled as again:  # pressed again a moment too late: the stop and its checkpoint stand
                again.stopped = again.stopped or stop.stopped
                again.after = again.after or left_by_signal(run_dir, trainer.resume_advice)
                raise
        raise
    except TrainingDiverged:  # its last finite checkpoint stays: the record says why no later one came
        if dist.is_main:
            write_stop_record(run_dir, "diverged", trainer.global_step)
        raise
    except Signalled as again:  # pressed twice: the stop's checkpoint (if it came) is the run's last word
        if dist.is_main and again.name in get_args(StoppedBy):
            write_stop_record(run_dir, cast(StoppedBy, again.name), trainer.global_step)
        raise
    except Exception as error:  # a peer gone mid-collective: where the run stands, for the line said
        if dist.is_main and peer_gone_message(error, in_process_group()) is not None:
            raise PeerGone(error, left_by_signal(run_dir, trainer.resume_advice)) from error
        raise
    if dist.is_main:
        write_stop_record(run_dir, result.stop_reason, result.steps)
        mark_as_latest()
    return result


def _discard_kept_points(kept: Path) -> None:
    """Remove the kept checkpoints of an earlier run from ``kept`` (and the folder, where nothing else is
    left): drnn's names alone, so a user's own files there stay (red41: kept/ went whole)."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(kept):
            if is_kept_name(entry.name) and not entry.is_dir(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
        kept.rmdir()  # only if empty


def _past_missing_folders(run_dir: Path) -> Path:
    """``run_dir`` with each ``NAME/..`` whose NAME does not exist taken out: ``runs/nonexist/../trav``
    is ``runs/trav``, and no empty ``runs/nonexist`` is made on the way to it (red41; the system reaches
    no path through a folder that is not there, so the lock's ``mkdir`` made it). A ``..`` after a folder
    or link that exists is the system's to follow (``link/..`` is the link target's parent)."""
    parts: list[str] = []
    for part in run_dir.parts:
        if part == ".." and parts and parts[-1] != ".." and not os.path.lexists(Path(*parts)):
            parts.pop()
        else:
            parts.append(part)
    return Path(*parts) if parts else Path(".")


def _check_kept_folder(run_dir: Path, config: Config) -> None:
    """Refuse, before anything is trained or removed, a ``kept`` that ``train.keep_every`` cannot keep
    checkpoints in (red41: a file there failed the first kept point after an epoch of training, with
    "File exists", and the previous session's stopped.json already gone). Every torchrun rank asks:
    none goes on to meet the others in a collective that one of them has left."""
    kept = RunFiles(run_dir).kept
    if Cadence.of(config.train.keep_every).every > 0 and os.path.lexists(kept) and not kept.is_dir():
        raise DrnnError(
            f"{kept} is a file, not a folder; train.keep_every keeps checkpoints in it: move it away"
        )


def _absolute_text_path(file: Path) -> str:
    """``file`` absolute, its ``..`` taken out where that names the same file ("other/../cfg/t.txt" as
    "cfg/t.txt"), kept where a symbolic link before it makes it another (review rev40b: link/../t.txt)."""
    kept = file.absolute()
    plain = os.path.abspath(file)
    with contextlib.suppress(OSError):
        if os.path.samefile(plain, kept):
            return plain
    return str(kept)
