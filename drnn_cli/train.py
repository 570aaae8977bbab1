"""The training loop: d2l's ``train_ch8`` made resumable, interruptible, distributed and sync-light.

Per minibatch (README "Reproducing d2l"): mean cross-entropy over the B·T targets, backward, clip the global
gradient norm to ``train.clip``, optimizer step; the hidden state is carried (detached) across
minibatches with sequential sampling and re-initialised with random sampling. Losses accumulate on
the device and are read only at an epoch's end or a step-cadence boundary (evaluation, checkpoint,
log line), so the hot loop never waits for the host.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from drnn_cli import fused_recurrence
from drnn_cli.averaging import WeightAverage
from drnn_cli.batches import (
    EpochBatches,
    PlannedLength,
    Shard,
    check_trainable,
    epoch_batches,
    epoch_seed,
    epochs_at_step,
)
from drnn_cli.budget import Budget, Cadence, Cadences, StopReason
from drnn_cli.checkpoint import Checkpoint
from drnn_cli.checkpoint_writer import CheckpointWriter
from drnn_cli.config import Config, TrainConfig, load_config
from drnn_cli.data import Dataset
from drnn_cli.errors import DrnnError, StoppedRun
from drnn_cli.evaluate import EvaluationAbandoned, perplexity
from drnn_cli.model_probes import check_precision_works, compile_cells
from drnn_cli.models import FusedRecurrent, RNNLanguageModel, build_model, count_parameters
from drnn_cli.optimizers import (
    build_optimizer,
    fused_updates,
    lr_changes_every_step,
    lr_factor,
    make_capturable,
    optimizer_class,
    reads_lr_on_device,
)
from drnn_cli.rank_agreement import check_every_rank_runs_alike, check_every_rank_starts_alike, header_digest
from drnn_cli.report import (
    EpochRecord,
    PlotRefresh,
    Reporter,
    RunStart,
    SilentReporter,
    StepStatus,
    TrainResult,
    TrainWindow,
    append_metrics,
    as_trained,
    read_metrics,
    training_position,
    write_run_files,
)
from drnn_cli.run_files import BEST, LAST, RunFiles
from drnn_cli.run_notes import (
    UNANNEALED_SHARE,
    blank_samples_note,
    data_notes,
    last_weights_note,
    nothing_left,
    nothing_to_train,
    overflowed_note,
    own_text_notes,
    planned_length_notes,
    run_scored_unknown_note,
    unannealed_end_note,
    unannealed_note,
    validated_at,
    worse_than_uniform_note,
)
from drnn_cli.runtime import (
    DistContext,
    all_reduce_sum,
    device_description,
    device_name,
    vote_max,
    wait_for_every_rank,
)
from drnn_cli.session_time import (
    EpochClock,
    RunPlan,
    SessionSeconds,
    SessionTime,
    SlowdownWatch,
    Validating,
    WorkLeft,
    reach_by_time,
    seconds_left,
    shown_pace,
)
from drnn_cli.signals import Signalled, StopRequests
from drnn_cli.start_point import StartPoint
from drnn_cli.step import StaticStep, StepTally, use_cuda_graph
from drnn_cli.stop_left import (
    diverged,
    how_to_continue,
    interrupted,
    kept_checkpoints,
    left_by_signal,
    stopped_at_once,
)
from drnn_cli.stop_votes import StopVotes
from drnn_cli.tensorboard_log import TensorBoardLog, open_tensorboard
from drnn_cli.trainer_checkpoint import (
    TrainingCounters,
    TrainingParts,
    lineage_of,
    restore_training,
)
from drnn_cli.trainer_state import EpochProgress, UnusableTrainerState
from drnn_cli.validator import Validator


def check_can_train(
    config: Config, dataset: Dataset, world_size: int, device: torch.device, resuming: bool
) -> None:
    """Refuses, in one line, a text too short for the batch shape and a precision the device lacks."""
    data = config.data
    check_trainable(
        len(dataset.splits.train),
        data.batch_size,
        data.num_steps,
        world_size,
        dataset.capped,
        resuming=resuming,
    )
    if config.train.precision == "fp16" and device.type == "cpu":
        raise DrnnError("train.precision fp16 needs a GPU; on a CPU use bf16 or fp32")


def trained_model(
    config: Config, vocab_size: int, device: torch.device, init_from: Checkpoint | None
) -> RNNLanguageModel:
    """The model to train, on ``device``, with a fine-tuning run's starting weights; its precision and
    a fused launch plan checked now rather than in the first step, after the run's files are written."""
    model = build_model(vocab_size, config.model, seed=config.train.seed)
    model.to(device)
    check_precision_works(model, device, config.train.precision)
    shape = config.model
    if shape.impl == "fused" and fused_recurrence.can_run(device):
        # DRNN_FUSED_LAUNCH's errors; validation's whole data.batch_size makes the most programs of any
        # launch in the run
        fused_recurrence.plan_for(
            device, config.data.batch_size, shape.hidden_size, shape.num_layers, shape.cell
        )
    if init_from is not None:
        model.load_state_dict(init_from.model_state)
    return model


# ---------------------------------------------------------------------------------------------
# The trainer


def improves_on(val_ppl: float, best: float | None) -> bool:
    """A validation perplexity better than the best so far. A NaN (half-precision logits that
    overflowed while validating) is no improvement and never the best: kept, it would beat nothing
    that follows, since every comparison with NaN is false."""
    return not math.isnan(val_ppl) and (best is None or val_ppl < best)


class Trainer:
    """Trains one run directory from a resolved config and an encoded dataset."""

    def __init__(
        self,
        start: StartPoint,
        dataset: Dataset,
        run_dir: Path,
        device: torch.device,
        reporter: Reporter | None = None,
        dist: DistContext | None = None,
        resume_advice: str | None = None,
        on_first_checkpoint: Callable[[], None] | None = None,
    ) -> None:
        """``start``: the config, and the checkpoint a session resumes or the weights it is fine-tuned
        from. Everything that can refuse the start does so here, before a file is written."""
        config = self.config = start.config
        resume = start.resume
        # how the user continues an interrupted session (an --overwrite's session says how it was started)
        self.resume_advice = resume_advice or how_to_continue(resume=resume is not None, overwrite=False)
        self.dataset = dataset
        self.run_dir = run_dir
        self.device = device
        self.reporter = reporter or SilentReporter()
        self.dist = dist or DistContext()
        self.shard = Shard(self.dist.rank, self.dist.world_size)
        check_every_rank_runs_alike(config, dataset, self.dist, device)
        check_can_train(config, dataset, self.dist.world_size, device, resuming=resume is not None)
        self.model = trained_model(config, len(dataset.vocab), device, start.init_from)
        # the checkpoint it was fine-tuned from, its bases, the tokens no training split held
        self.lineage = lineage_of(start, dataset)
        train, data = config.train, config.data
        self.average = (
            WeightAverage(self.model, train.average, train.average_decay) if train.average != "none" else None
        )
        self.network: nn.Module = self.model
        if self.dist.enabled:
            self.network = DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None
            )
        graph_choice = use_cuda_graph(
            train.cuda_graph,
            device,
            self.dist.enabled,
            lr_changes_every_step(train) and not reads_lr_on_device(optimizer_class(train.optimizer)),
        )
        self._notes = [graph_choice.note] if graph_choice.note else []
        self._blank_samples_noted = False
        cuda_graph = graph_choice.enabled
        self._fused_updates = fused_updates(train.precision, cuda_graph)
        self.optimizer = build_optimizer(self.model, train, fused=self._fused_updates)
        if train.compile == "on":  # after the average's copy: that one evaluates, with the plain cells
            self._notes.append(
                compile_cells(
                    self.model, device, train.precision, data.batch_size // self.dist.world_size, cuda_graph
                )
            )
        self.scaler = torch.amp.GradScaler(device.type, enabled=train.precision == "fp16")
        self.train_tokens = dataset.splits.train.to(device)
        self.val_tokens = dataset.splits.val.to(device)
        self.length = PlannedLength.of(train, data, len(self.train_tokens))
        self._start_counters(train)
        self._start_from(start)
        if cuda_graph:
            make_capturable(self.optimizer)  # after _restore, which puts back the flags it was built with
        self.static_step = StaticStep(
            self.network,
            self.model,
            self.optimizer,
            self.scaler,
            train.clip,
            train.precision,
            device,
            batch_rows=data.batch_size // self.dist.world_size,
            num_steps=data.num_steps,
            carries_state=data.sampling == "sequential" and not train.reset_state,
            graph=cuda_graph,
            ar=train.ar,
            tar=train.tar,
            measure_norm=train.tensorboard,
        )
        self.tensorboard: TensorBoardLog | None = None
        if train.tensorboard and self.dist.is_main:
            self.tensorboard = open_tensorboard(
                run_dir, device, self.global_step if resume is not None else None
            )
        self._first_step = self.global_step
        self.slowdown: SlowdownWatch | None = None  # from the session's start (fit)
        # SIGINT, SIGTERM, or SIGPIPE (stdout closed: drnn_cli.signals raises it on the first failed write)
        self.stops = StopRequests()
        self.stop_votes = StopVotes(self.dist, device, self.stops, self.reporter)
        self.validator = Validator(
            model=self.evaluated_model,
            tokens=self.val_tokens,
            validates=dataset.splits.validates,
            config=config,
            vocab=dataset.vocab,
            device=device,
            dist=self.dist,
            reporter=self.reporter,
            stop_votes=self.stop_votes,
        )
        self.files = RunFiles(run_dir)
        self.checkpoints = CheckpointWriter(
            config=config,
            dataset=dataset,
            lineage=self.lineage,
            files=self.files,
            device=device,
            dist=self.dist,
            keep=self.cadence.keep,
            resume_advice=self.resume_advice,
            on_first_checkpoint=on_first_checkpoint,
        )
        self.plot = PlotRefresh(
            self.files.plot, self.reporter, max(0, len(self.val_tokens) - 1), as_trained(config)
        )
        self.records: list[EpochRecord] = (
            # a boundary a signal cut short is run again, its line with it (one a crash left is dropped)
            read_metrics(
                self.files.metrics, self.global_step - self.progress.boundary_pending, self.start_epoch
            )
            if resume is not None
            else []
        )
        self.resumed = resume is not None  # its vocab.json, from when the run began, keeps the text's counts

    def _start_counters(self, train: TrainConfig) -> None:
        """A new run's counters, budget and cadences (a resume's checkpoint then puts back its own)."""
        self.start_epoch = 0
        self._best_restarted = False  # a resume that changed train.eval_tokens: the best starts over
        self.best_val_ppl: float | None = None
        self.bad_evals = 0
        self.elapsed = 0.0
        self.progress = EpochProgress.start(self.device)
        self.global_step = 0  # optimizer steps since the run began (across resumes)
        self.tokens_seen = 0
        self.budget = Budget(train.max_steps, train.max_time)
        self.session_time = SessionTime()  # where this session's wall clock goes, for the time left
        self._session_start_elapsed = 0.0  # the run's training seconds when this session began (fit)
        self.cadence = Cadences(
            Cadence.of(train.eval_every),
            Cadence.of(train.checkpoint_every),
            Cadence.of(train.sample_every),
            Cadence.of(train.log_every),
            Cadence.of(train.keep_every),
        )
        self.average_start = Cadence.of(train.average_start)
        self._steps_per_epoch = 0
        self.stopped_mid_epoch: StopReason | None = None
        self.trained_epoch: EpochProgress | None = None  # the last epoch trained, as at its last step
        # the training seconds of the epoch under way, until they are the run's elapsed (a stop's count them)
        self._epoch_clock: EpochClock | None = None
        self.began_at = 0.0  # epochs done when this session began (fit sets it)
        self._unannealed_judged = False  # _note_unannealed: judged once a session, when its pace shows

    def _start_from(self, start: StartPoint) -> None:
        """A resume's counters and weights from its checkpoint, checked alike on every rank, and the best
        perplexity on disk that a worse model must not replace."""
        resume = start.resume
        # read before restoring, which takes this rank's part of a mid-epoch checkpoint
        digest = header_digest(resume) if resume is not None and self.dist.enabled else 0.0
        if resume is not None:
            self._restore(resume)
            self._best_restarted = start.best_restarts  # the start's validation too read other tokens
            if start.best_restarts:  # its validations read other tokens: their best and count mean nothing
                self.best_val_ppl, self.bad_evals = None, 0
        self._check_every_rank_starts_alike(digest)
        # The perplexity of the best checkpoint on disk. After a hard kill it can beat the resumed
        # checkpoint's own best (`best` written after `last`): it keeps a worse model from replacing
        # that file, while patience counts against the resumed run's own best, whose evaluations the
        # run now replays (else it would count those replayed improvements as failures).
        self.best_kept = self.best_val_ppl
        if start.best_kept is not None and (self.best_kept is None or start.best_kept < self.best_kept):
            self.best_kept = start.best_kept

    # ----- checkpoint state ------------------------------------------------------------------

    def _parts(self) -> TrainingParts:
        return TrainingParts(self.model, self.average, self.optimizer, self.scaler)

    def _counters(self) -> TrainingCounters:
        return TrainingCounters(
            self.global_step, self.tokens_seen, self.elapsed, self.bad_evals, self.best_val_ppl
        )

    @property
    def evaluated_model(self) -> RNNLanguageModel:
        """The weights that validation, samples and checkpoints use: the average when enabled."""
        return self._parts().evaluated_model

    def _check_every_rank_starts_alike(self, digest: float) -> None:
        """Under torchrun, that every rank resumes the same checkpoint (:func:`check_every_rank_starts_alike`)."""
        check_every_rank_starts_alike(self.global_step, digest, self.dist, self.device)

    def _restore(self, checkpoint: Checkpoint) -> None:
        """Continue from the run's last checkpoint. A trainer state that cannot be continued from (tampered
        or corrupt) is refused here, in the constructor: in one line, before the run directory is written."""
        try:
            restored = restore_training(
                checkpoint,
                self._parts(),
                self.config,
                fused_updates=self._fused_updates,
                device=self.device,
                dist=self.dist,
                epoch_length=lambda epoch: len(self._batches(epoch)),
            )
        except UnusableTrainerState as unusable:
            raise DrnnError(
                f"checkpoint {self.run_dir / LAST} holds no usable training state ({unusable}); start a new "
                f"run from its weights with --init-from {self.run_dir} --run NEW_DIR"
            ) from None
        self.optimizer, self.start_epoch = restored.optimizer, restored.start_epoch
        self.global_step, self.tokens_seen = restored.counters.global_step, restored.counters.tokens_seen
        self.elapsed, self.bad_evals = restored.counters.elapsed, restored.counters.bad_evals
        self.best_val_ppl = restored.counters.best_val_ppl
        if restored.progress is not None:
            self.progress = restored.progress

    def _save(self, name: str, epoch: int, progress: EpochProgress | None = None, keep: bool = False) -> None:
        """The checkpoint ``name`` of the run as it stands (:meth:`CheckpointWriter.write`); ``progress``:
        where the epoch after ``epoch`` stands, None at a boundary; ``keep``: a ``train.keep_every`` point."""
        self.checkpoints.write(
            name,
            epoch,
            progress,
            parts=self._parts(),
            counters=self._counters(),
            best_kept=self.best_kept,
            session_time=self.session_time,
            keep=keep,
        )

    # ----- run directory ---------------------------------------------------------------------

    def _config_to_record(self, nothing_to_train: bool) -> Config | None:
        """What ``config.yaml`` records (None: as it is). A resume with nothing to train keeps the run's
        own: its ``--set`` values trained no step (a later ``--config RUN/config.yaml`` would take them
        for the run's); but where its text moved it records the new place, which ``drnn eval`` reads."""
        if not nothing_to_train or not self.files.config.is_file():
            return self.config
        try:
            recorded = load_config(self.files.config)
        except DrnnError:
            return self.config
        place = {"path": self.config.data.path, "corpus": self.config.data.corpus}
        if (recorded.data.path, recorded.data.corpus) == (place["path"], place["corpus"]):
            return None
        return recorded.model_copy(update={"data": recorded.data.model_copy(update=place)})

    def _write_run_files(self, config: Config | None) -> None:
        if self.dist.is_main:  # the metrics rewrite drops epochs past a resumed checkpoint
            write_run_files(
                self.files,
                config,
                self.dataset.vocab,
                self.records,
                self.lineage.init_from,
                self.resumed,
            )

    def _append_metrics(self, record: EpochRecord) -> None:
        self.records.append(record)
        if self.dist.is_main:
            append_metrics(self.files.metrics, record)
        if self.tensorboard is not None:
            self.tensorboard.add_record(record)

    def _report_line(self, record: EpochRecord) -> None:
        """A metrics line on the terminal, and after it, once, a CPU's thread team stalled by other work."""
        self.reporter.epoch_end(record)
        slowdown = self.slowdown
        if slowdown is not None and (note := slowdown.observe(record.tokens_seen, record.elapsed)):
            self.reporter.note(note)

    def _update_plot(self, force: bool = False) -> None:
        if self.dist.is_main:
            self.plot.update(self.records, force)

    # ----- signals ---------------------------------------------------------------------------

    def _stop_requested(self, step: int | None = None) -> bool:
        """Whether a signal asks to stop (under torchrun, the ranks' vote). ``step``: asked after a step
        inside an epoch, which counts down to the next vote; None (an epoch's end) votes now."""
        return self.stop_votes.stop_requested(self.global_step if step is not None else None)

    # ----- the loop --------------------------------------------------------------------------

    def _batches(self, epoch: int) -> EpochBatches:
        return epoch_batches(self.train_tokens, self.config.data, self.config.train.seed, epoch, self.shard)

    @property
    def steps_per_epoch(self) -> int:
        """Minibatches in epoch 0, which stands for every epoch (sequential offsets change the count by
        at most one): a step budget's schedule converts steps to epochs with it."""
        if not self._steps_per_epoch:
            self._steps_per_epoch = len(self._batches(0))
        return self._steps_per_epoch

    def _set_lr(self, epoch: int, steps_done: int | None = None) -> None:
        """Per epoch, as d2l; under ``max_steps`` at the fractional epoch of the next step (the one after
        ``steps_done`` optimizer steps; by default the run's so far)."""
        rate = self._rate_at(epoch, self.global_step if steps_done is None else steps_done)
        for group in self.optimizer.param_groups:
            group["lr"] = rate

    def _rate_at(self, epoch: int, steps_done: int) -> float:
        """The learning rate of the step after ``steps_done`` optimizer steps, in ``epoch``."""
        train = self.config.train
        if train.max_steps:
            position = steps_done / self.steps_per_epoch
            horizon = min(train.epochs, train.max_steps / self.steps_per_epoch)
            return train.lr * lr_factor(position, train, horizon)
        return train.lr * lr_factor(epoch, train)

    def _note_unannealed(self) -> None:
        """Said once, when the session's pace first shows it: ``train.max_time`` ending a cosine schedule
        far from its end, so the rate stays near its peak throughout (the README's 2-hour recipe on a 30 MB
        text trained at 0.003 to its last step: prac34), with the step budget that fits instead."""
        train = self.config.train
        if self._unannealed_judged or train.schedule != "cosine" or not train.max_time:
            return
        by_time = self.budget.seconds_left()
        step_seconds = shown_pace(self.session_time, self.global_step - self._first_step, train.max_time)
        if step_seconds is None or by_time is None:
            return  # no pace to go by yet
        self._unannealed_judged = True
        reach = reach_by_time(
            self._run_plan(),
            self.session_time,
            global_step=self.global_step,
            by_time=by_time,
            step_seconds=step_seconds,
        )
        if reach is not None and reach < UNANNEALED_SHARE * self.length.steps:
            epoch = int(reach / self.length.steps_per_epoch)
            rate = self._rate_at(epoch, reach)
            resumed_at = self.global_step if self._first_step else None  # a fine-tuning run starts at 0
            self.reporter.note(unannealed_note(train, reach, self.length, rate, resumed_at))

    def train_epoch(self, epoch: int) -> tuple[TrainWindow, float]:
        """Train one epoch; returns its last line's training window (perplexity and steps) and the
        epoch's tokens per second.

        A budget or patience may end the epoch early at a step-cadence boundary, after a final
        validation and checkpoint: ``stopped_mid_epoch`` then names why, and the figures returned
        cover the epoch so far.
        """
        train = self.config.train
        self.stopped_mid_epoch = None
        lr_per_step = lr_changes_every_step(train)
        self._set_lr(epoch)
        batches = self._batches(epoch)
        progress, self.progress = self.progress, EpochProgress.start(self.device)
        self._epoch_clock = EpochClock.stopped(progress.elapsed)  # until its steps start, below
        carries_state = self.static_step.carries_state
        self.static_step.begin_epoch(
            progress.state if carries_state else None,
            # an epoch's first step starts from a zero tally (two kernels, not a restore's eight)
            StepTally(progress.loss_sum, progress.first_bad_step) if progress.step else None,
            progress.step,
        )
        if self.dist.enabled and progress.step == 0:
            # One dropout stream per rank and epoch: ranks must not apply the same masks to their rows.
            torch.manual_seed(epoch_seed(self.config.train.seed, epoch) * 1_009 + self.dist.rank)
        shown = 0.0  # the bar's step count and budget, shown at an epoch's first step and every 0.5 s
        self.model.train()
        # resuming mid-epoch: the minibatches before progress.step were trained before the stop
        targets = self.static_step.targets.numel()
        if progress.boundary_pending:  # a signal cut this step's boundary short: it comes first
            self._replay_cut_boundary(epoch, progress, len(batches))
        # evaluating is not training time: the clock runs from here, and pauses at each boundary
        clock = self._epoch_clock = EpochClock(started=self._training_clock() - progress.elapsed)
        remaining = batches.windows_from(progress.step) if self.stopped_mid_epoch is None else iter(())
        for step, window in enumerate(remaining, start=progress.step):
            if lr_per_step:
                self._set_lr(epoch)
            self.static_step(window)  # the state carry and the loss tally happen inside the step
            if self.average is not None:
                # global_step counts the steps before this one: "N steps" of plain training come first
                self.average.update(self.model, active=self.average_start.passed(epoch, self.global_step))
            progress.count += targets
            progress.step = step + 1
            self.global_step += 1
            if self.global_step == self._first_step + 1:  # start-up is in it: the pace counts from here
                self.session_time.pace_from_here(1)
            self.tokens_seen += targets * self.dist.world_size
            if self.tensorboard is not None and self.static_step.grad_norm is not None:
                self.tensorboard.add_grad_norm(self.static_step.grad_norm)  # summed on the device, no sync
            stop = self._budget_reached()
            if progress.step < len(batches) and (stop or self.cadence.due_at_step(self.global_step)):
                # A boundary inside the epoch; the epoch's last step is handled by fit at its end.
                self._keep_place(progress, clock.pause(self._training_clock()))
                stop = self._inside_epoch(epoch, progress, len(batches), stop)
                clock.resume(self._training_clock())
                if stop is not None:
                    self.stopped_mid_epoch = stop
                    if self.stops.pending:  # after the stop's validation: its checkpoint is written
                        self.reporter.note(f"{self.stops.name} arrived as the run ended: the run is complete")
                    break
            # A signal stops after the step's boundary, if it has one (its line, validation, best
            # checkpoint), which a resumed run would not repeat; the epoch's last step leaves it to the
            # epoch's end, whose checkpoint is a boundary's.
            if progress.step < len(batches) and self._stop_requested(progress.step):
                # A NaN on any process ends the run: nothing non-finite is saved.
                self._totals(epoch, progress)
                self._keep_place(progress, clock.pause(self._training_clock()))
                self._interrupt(epoch, progress)
            now = time.monotonic()
            if now - shown >= 0.5:
                shown = now
                self.reporter.step(self._step_status(epoch, progress, len(batches), clock))
                self._note_unannealed()
        # A mid-epoch stop was timed and logged at its boundary: the run's summary repeats that
        # metrics line's tokens/s rather than a second reading of the clock taken after validating.
        seconds = progress.elapsed if self.stopped_mid_epoch else clock.seconds(self._training_clock())
        loss_sum, count = self._totals(epoch, progress)
        self.elapsed += seconds  # seconds includes the part trained before a mid-epoch stop
        self._epoch_clock = None
        if self.stopped_mid_epoch is None:  # a signal during the epoch end's validation checkpoints this
            self._keep_place(progress, seconds)
            self.trained_epoch = progress
        return self._since_logged(progress, loss_sum, count), count / max(seconds, 1e-9)

    def _keep_place(self, progress: EpochProgress, elapsed: float) -> None:
        """Where the epoch stands, for a checkpoint inside it: the state its rows carry on with
        (sequential sampling) and its training time so far."""
        carried = self.static_step.carries_state
        progress.state = self.static_step.carried_state() if carried else None
        progress.elapsed = elapsed

    def _training_starts(self) -> None:
        """This session's training starts now, after a validation that is not its own (a fine-tuning
        run's of its starting weights, a replayed cut-short boundary's): ``max_time`` counts from here,
        and under torchrun the pace of the steps between votes on a signal too (rev31: the replayed
        validation's minutes read as one step's, and the next vote came at once)."""
        self.budget.start()
        self.stop_votes.restart_pace(self.global_step)

    def _replay_cut_boundary(self, epoch: int, progress: EpochProgress, steps_in_epoch: int) -> None:
        """The step boundary a signal cut short before this resume, run before the epoch's next step:
        it validates as it was to (a time budget's final validation too: the resumed clock starts anew),
        and where ``train.epochs`` is now below this epoch the run ends at it. At the epoch's last step
        the boundary is the epoch's end, which fit runs (its ``boundary_pending`` left set for fit to read
        in ``trained_epoch``)."""
        if lr_changes_every_step(self.config.train):  # its line and checkpoint hold its step's rate
            self._set_lr(epoch, self.global_step - 1)
        if progress.step == steps_in_epoch:
            return
        progress.boundary_pending = False
        over: StopReason | None = "epochs" if epoch >= self.config.train.epochs else None
        self.stopped_mid_epoch = self._inside_epoch(
            epoch, progress, steps_in_epoch, self._budget_reached() or over, validates=True
        )
        if self.stopped_mid_epoch is None:  # no longer pending: a crash now must not run it again
            self._save(LAST, epoch, progress)
        # the boundary ended the session before this one (a max_time stop's final validation, say):
        # this session's time budget starts after it (its seconds are this session's all the same)
        self._training_starts()

    def _step_status(
        self, epoch: int, progress: EpochProgress, steps_in_epoch: int, clock: EpochClock
    ) -> StepStatus:
        """The bar's figures between log lines, read without waiting for the device: tokens/s by the
        host's clock (a GPU's queue runs a little behind it), and on a CPU, where the tally is
        already there, the training perplexity since the last line (NaN once a loss was; not under
        torchrun, whose tally is the ranks' summed at boundaries)."""
        seconds = clock.seconds(time.perf_counter())
        tokens_per_s = progress.count * self.dist.world_size / seconds if seconds > 0 else None
        train_ppl = None
        readable = self.device.type == "cpu" and not self.dist.enabled
        if readable and progress.count > progress.logged_count:
            train_ppl = self._since_logged(progress, float(self.static_step.loss_sum), progress.count).ppl
        return StepStatus(
            epoch=epoch,
            step_in_epoch=progress.step,
            steps_in_epoch=steps_in_epoch,
            global_step=self.global_step,
            seconds_left=self._seconds_left(),
            tokens_per_s=tokens_per_s,
            train_ppl=train_ppl,
        )

    def _since_logged(self, progress: EpochProgress, loss_sum: float, count: float) -> TrainWindow:
        """The training perplexity of a log line: over the steps since the epoch's previous one, or its
        start (the epoch's, as d2l reports, where nothing is logged inside epochs). An average since the
        epoch's start would carry the first steps of a long epoch into every line (README "Long runs").
        ``count`` is all ranks' targets, as ``logged_count``; every step trains as many."""
        logged_sum, logged_count = progress.logged_loss_sum, progress.logged_count
        if count <= logged_count:  # only a tampered checkpoint: the epoch's, rather than 0/0
            logged_sum, logged_count = 0.0, 0
        targets_per_step = self.static_step.targets.numel() * self.dist.world_size
        return TrainWindow(
            perplexity(loss_sum - logged_sum, count - logged_count),
            round((count - logged_count) / targets_per_step),
        )

    def _training_clock(self) -> float:
        """``time.perf_counter()`` once the device has run what was queued.

        CUDA work is asynchronous (a CUDA graph's replay returns at once): read without waiting, the
        clock times the launches, not the training, and tokens/s comes out several times too high.
        Read at epoch and boundary edges only, where the loss totals are read anyway.
        """
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _totals(self, epoch: int, progress: EpochProgress) -> tuple[float, float]:
        """(Σ loss·n, n) over the epoch so far on all ranks: the one host read of a boundary.

        It also counts the ranks that saw a non-finite loss, so a NaN on one rank stops every rank.
        ``progress`` takes the step's tally here: every read of it (checkpoints included) follows.
        """
        progress.loss_sum, progress.first_bad_step = self.static_step.tally()
        totals = torch.stack(
            [
                progress.loss_sum,
                torch.tensor(float(progress.count), device=self.device).double(),
                (progress.first_bad_step >= 0).double(),
            ]
        )
        all_reduce_sum(totals, self.dist)
        loss_sum, count, diverged_ranks = totals.tolist()
        self._check_kernels(f"in epoch {epoch + 1}")
        if diverged_ranks:
            self._check_finite(epoch, progress)
            raise diverged(
                self.run_dir,
                f"the loss became NaN or infinite by step {progress.step:,} of epoch {epoch + 1:,} on another process",
            )
        return loss_sum, count

    def _budget_reached(self, vote_now: bool = False) -> StopReason | None:
        return self.stop_votes.budget_reached(self.budget, self.global_step, self._first_step, vote_now)

    def _seconds_left(self, validation: Validating | None = None) -> float | None:
        """Time to the run's end from this session's paces (:func:`seconds_left`); ``validation``: one
        in progress."""
        return seconds_left(
            self._run_plan(),
            self.session_time,
            self.budget,
            global_step=self.global_step,
            first_step=self._first_step,
            validation=validation,
        )

    def _work_left(self) -> WorkLeft:
        """The steps, validations and checkpoint writes between the step just taken and the run's end."""
        return self._run_plan().work_left(self.global_step)

    def _run_plan(self) -> RunPlan:
        """What the time left counts to, from the planned length and the cadences."""
        return RunPlan(
            steps=self.length.steps,
            steps_per_epoch=self.length.steps_per_epoch,
            eval=self.cadence.eval,
            checkpoint=self.cadence.checkpoint,
            keep=self.cadence.keep,
            validates=self.dataset.splits.validates,
            tokens_per_validation=self.validator.predictions,
            # the job's, as the validation's: the ranks share the split's rows as they share a step's
            tokens_per_step=self.static_step.targets.numel() * self.dist.world_size,
        )

    def _judge(
        self,
        val_ppl: float | None,
        epoch: int,
        progress: EpochProgress | None = None,
        on_cadence: bool = True,
    ) -> None:
        """Keep the best checkpoint; count evaluations without improvement for patience.

        An evaluation off ``train.eval_every``'s cadence (the one a budget or the last epoch adds)
        can replace ``best`` but leaves patience alone: a run stopped there and resumed must count
        exactly the evaluations an uninterrupted run counts.
        """
        if val_ppl is None:
            return
        if on_cadence:
            if improves_on(val_ppl, self.best_val_ppl):
                self.best_val_ppl, self.bad_evals = val_ppl, 0
            else:
                self.bad_evals += 1
        if improves_on(val_ppl, self.best_kept):
            self.best_kept = val_ppl
            self._save(BEST, epoch, progress)

    @property
    def _patience_spent(self) -> bool:
        patience = self.config.train.patience
        return bool(patience) and self.bad_evals >= patience

    def _record(
        self, epoch: float, train: TrainWindow, val_ppl: float | None, tokens_per_s: float, elapsed: float
    ) -> EpochRecord:
        """A line of ``metrics.jsonl`` at the current step (``epoch`` fractional inside an epoch)."""
        lr = self.optimizer.param_groups[0]["lr"]
        return EpochRecord(
            epoch=epoch,
            train_ppl=train.ppl,
            val_ppl=val_ppl,
            lr=lr,
            tokens_per_s=tokens_per_s,
            elapsed=elapsed,
            step=self.global_step,
            tokens_seen=self.tokens_seen,
            train_ppl_steps=train.steps,
            val_tokens=0 if val_ppl is None else self.validator.predictions,
        )

    def _inside_epoch(
        self,
        epoch: int,
        progress: EpochProgress,
        steps_in_epoch: int,
        stop: StopReason | None,
        validates: bool = False,
    ) -> StopReason | None:
        """A step-cadence boundary (or a budget's end) inside ``epoch``: evaluate, log, checkpoint.

        Checkpoints here carry ``progress`` (the step in the epoch, the carried state, the loss sums),
        as a signal's do, so a run resumed from one continues exactly. ``validates``: the boundary
        validates whatever the cadence and budget say now (one whose validation a signal cut short).
        """
        loss_sum, count = self._totals(epoch, progress)
        global_step = self.global_step
        val_ppl = None
        on_cadence = self.cadence.eval.due_at_step(global_step)
        if stop is not None or on_cadence or validates:
            try:
                val_ppl = self._validate_to_judge(abandonable=True)
            except EvaluationAbandoned:  # a signal: checkpoint now, not after the rest of a large split
                progress.boundary_pending = True
                self._interrupt(epoch, progress)
            self._judge(val_ppl, epoch, progress, on_cadence)
            if stop is None and self._patience_spent:
                stop = "patience"
            if stop is None and not validates:  # max_time ran out while validating: this boundary ends
                stop = self._budget_reached(vote_now=True)  # the run, not a step and a validation later
        record = self._record(
            round(epoch + progress.step / steps_in_epoch, 6),
            self._since_logged(progress, loss_sum, count),
            val_ppl,
            count / max(progress.elapsed, 1e-9),
            self.elapsed + progress.elapsed,
        )
        if val_ppl is not None or stop is not None or self.cadence.log.due_at_step(global_step):
            self._append_metrics(record)
            self._report_line(record)
            # the next line's window starts here; set before the checkpoint below keeps it
            progress.logged_loss_sum = loss_sum
            progress.logged_count = int(count)
        keep = self.cadence.keep.due_at_step(global_step)
        if stop is not None or self.cadence.checkpoint.due_at_step(global_step) or keep:
            self._save(LAST, epoch, progress, keep=keep)
        if stop is None and self.dist.is_main and self.cadence.sample.due_at_step(global_step):
            self._report_samples(record.epoch)
        self._update_plot(force=stop is not None)
        return stop

    def _report_samples(self, epochs_done: float) -> None:
        """Greedy samples, labelled with the epochs done (fractional inside an epoch, as its log line)."""
        samples = self._samples()
        self.reporter.samples(epochs_done, samples)
        self._note_blank_samples(samples)
        if self.tensorboard is not None:
            self.tensorboard.add_samples(samples, self.global_step)

    def _note_blank_samples(self, samples: dict[str, str]) -> None:
        """Once a run, at the first samples shown while training (train.sample_every): samples of
        whitespace alone are what an undertrained model writes."""
        note = (
            None
            if self._blank_samples_noted
            else blank_samples_note(samples, self.config.train, self.config.data.token)
        )
        if note is not None:
            self.reporter.note(note)
            self._blank_samples_noted = True

    def _check_kernels(self, when: str) -> None:
        """impl fused: a grid barrier that gave up leaves a flag on the device (read once an epoch and
        after each validation). The averaged copy that validates has flags of its own."""
        for model in (self.model, self.evaluated_model):
            if isinstance(model.rnn, FusedRecurrent) and int(model.rnn.barrier_error):
                raise DrnnError(  # no divergence: the loss was fine, the kernel was not (stopped.json)
                    f"model.impl fused: a persistent kernel's barrier timed out {when} (its programs were "
                    f"not all resident on the GPU at once); training stopped and {kept_checkpoints(self.run_dir)}. "
                    "Use model.impl torch"
                )

    def _check_finite(self, epoch: int, progress: EpochProgress) -> None:
        bad = int(progress.first_bad_step)
        if bad >= 0:
            raise diverged(
                self.run_dir, f"the loss became NaN or infinite at step {bad + 1:,} of epoch {epoch + 1:,}"
            )

    def _epochs_done(self, epoch: int, step: int) -> float:
        """Epochs done after ``step`` steps of ``epoch``: whole at an epoch's start or end (as in
        metrics.jsonl), else fractional."""
        if not step:
            return epoch
        steps = len(self._batches(epoch))
        return epoch + 1 if step == steps else round(epoch + step / steps, 6)

    def _interrupt_epoch_end(self, epoch: int) -> NoReturn:
        """A signal cut the validation at ``epoch``'s end short: the epoch is checkpointed as at its last
        step with its boundary pending, and ``--resume`` runs the epoch's end first (as a boundary
        inside an epoch). Its time is the checkpoint's progress, not yet the run's elapsed."""
        progress = self.trained_epoch
        assert progress is not None  # train_epoch sets it before fit validates an epoch's end
        progress.boundary_pending = True
        # One statement, so that a second press (a handler runs only at a call or a backward jump, never
        # between the two stores) finds the epoch's seconds in the run's elapsed or in its clock, never in
        # neither: its --json counted the session's training without the epoch
        self.elapsed, self._epoch_clock = (
            self.elapsed - progress.elapsed,
            EpochClock.stopped(progress.elapsed),
        )
        self._interrupt(epoch, progress)

    def _interrupt(
        self, epoch: int, progress: EpochProgress | None, starting_validation_cut: bool = False
    ) -> NoReturn:
        """Checkpoint where a signal stopped the run and raise :class:`TrainingInterrupted`.
        ``starting_validation_cut``: the signal cut a fine-tuning run's validation of its starting weights
        short (which ``--resume`` runs first, as a step boundary's)."""
        # its seconds, should a second signal end the run at once
        self._epoch_clock = EpochClock.stopped(progress.elapsed if progress else 0.0)
        self._save(LAST, epoch, progress)
        # Written (rank 0), or being written: a signal now changes nothing, the wait below included (a
        # handler runs at the first instruction after the barrier returns).
        self.stops.settle()
        # Under torchrun the others wait until rank 0 has written it: a rank that left at once exited
        # 143, torchrun sent SIGTERM to the rest, and rank 0 ended in the middle of the write.
        wait_for_every_rank(self.dist)
        step = progress.step if progress else 0
        pending = bool(progress and progress.boundary_pending) or starting_validation_cut
        stopped = StoppedRun(
            run_dir=self.run_dir,
            signal=self.stops.name,
            epochs=self._epochs_done(epoch, step),
            start_epoch=self.began_at,
            steps=self.global_step,
            start_step=self._first_step,
            checkpoint=self.run_dir / LAST,
            validation_pending=pending,
            seconds=self._session_seconds(progress.elapsed if progress else 0.0),
        )
        raise interrupted(
            stopped, epoch, step, self.stops.exit_code, self.resume_advice, starting_validation_cut
        )

    def _samples(self) -> dict[str, str]:
        return self.validator.samples()

    def _predictions_read(self, val_ppl: float | None) -> int:
        """The predictions the reported ``val_ppl`` read: its metrics line's, where it is the last line's
        (a resume that changed ``train.eval_tokens`` and trained nothing reports a figure read under the
        old setting: rev33); else this session's, which read it."""
        last = self.records[-1] if self.records else None
        if last is not None and last.val_ppl is not None and last.val_ppl is val_ppl and last.val_tokens:
            return last.val_tokens
        return self.validator.predictions

    def _validate(self, abandonable: bool = False) -> float | None:
        """Validation perplexity (:meth:`Validator.perplexity`, on the session's clock); the fused
        kernels' flags read after it."""
        val_ppl = self.validator.perplexity(self.session_time, self._seconds_left, abandonable)
        if val_ppl is not None:  # None: no validation split, nothing ran
            self._check_kernels("while validating")
        return val_ppl

    def _validate_starting_weights(self) -> None:
        """A fine-tuning run validates the weights it starts from before its first step: the figure its
        epochs must beat (metrics.jsonl's epoch 0), and its first best checkpoint. A run that only makes
        them worse on the new text (a learning rate too high) then keeps them as its best, and patience
        counts from them, rather than keeping its least bad epoch as if it had helped."""
        try:
            val_ppl = self._validate_to_judge(abandonable=True)
        except EvaluationAbandoned:  # nothing trained: --resume validates them again
            self._interrupt(0, None, starting_validation_cut=True)
        if val_ppl is None:  # no validation split
            return
        self.reporter.note(
            f"the starting weights' validation perplexity on this text: {val_ppl:.4g} "
            f"(metrics.jsonl's epoch 0; {BEST} holds them until a validation beats it)"
        )
        # The run's first evaluation, and its best so far: held before LAST is written, which carries it,
        # then BEST (a kill between the two leaves a resumable run; --resume reads a newer BEST too).
        self.best_val_ppl, self.bad_evals, self.best_kept = val_ppl, 0, val_ppl
        self._set_lr(0)  # the line's rate: the first step's (under warm-up, not train.lr)
        lr = self.optimizer.param_groups[0]["lr"]
        start = EpochRecord(
            epoch=0,
            train_ppl=None,
            val_ppl=val_ppl,
            lr=lr,
            tokens_per_s=0.0,
            elapsed=0.0,
            val_tokens=self.validator.predictions,
        )
        self._append_metrics(start)
        self.reporter.epoch_end(start)  # the bar's "val" from here, not from the first cadence validation
        self._save(LAST, 0)  # resumable from here: a kill now costs neither the validation nor the run
        self._save(BEST, 0)
        if self._stop_requested():  # a signal after the validation's last look: stop here, not a step on
            self._interrupt(0, None)

    def _start_record(self) -> EpochRecord | None:
        """The starting weights' line of a fine-tuning run, where it validated them (and a resume since
        has not changed ``train.eval_tokens``: its figure read other tokens than the run's now)."""
        if self._best_restarted or not self.records or not self.records[0].is_start:
            return None
        return self.records[0]

    def _validate_to_judge(self, abandonable: bool = False) -> float | None:
        """Validation perplexity that every torchrun rank holds alike. Each computes it from the same
        summed losses (``evaluate`` adds up the ranks' shares), and each decides from its number whether
        to keep a best checkpoint, a collective: ranks that disagreed by a last bit would wait on each
        other, so the vote makes sure of it at the cost of one scalar all-reduce."""
        val_ppl = self._validate(abandonable)
        return None if val_ppl is None else vote_max(val_ppl, self.dist, self.device)

    def _position(self) -> float:
        """Epochs done before this session, fractional when it resumes inside an epoch (as the
        ``epoch`` of a metrics line written there)."""
        return self._epochs_done(self.start_epoch, self.progress.step)

    def _origin(self) -> str:
        """Where this session starts, for the first line: a fresh run, fine-tuning, or a resume."""
        if self.global_step == 0:
            start = (
                f"from the weights of {self.lineage.init_from}" if self.lineage.init_from else "from scratch"
            )
            # a stop during a fine-tuning run's starting validation left a checkpoint before the first step
            return start + (" (resumed before its first step)" if self.resumed else "")
        step = self.progress.step
        if self.progress.boundary_pending:  # a signal cut its validation short: that comes first
            return f"from the validation {training_position(self.start_epoch, step)} that its stop cut short"
        # the step it runs next: the stop before it said "after step N of epoch E"
        return (f"from step {step + 1:,} of " if step else "from ") + f"epoch {self.start_epoch + 1:,}"

    def _already_done(self) -> StopReason | None:
        """Why a resumed run has nothing left to train: its epochs, its budget or its patience spent
        (epochs first: a step budget that ends with the last epoch did not cut the run short)."""
        # A step budget may be spent before this command trains; a time budget starts with each command,
        # so a tiny one (0.000001 s) still trains a step rather than ending a new run with no checkpoint.
        return nothing_left(
            self.config.train,
            self.start_epoch,
            self.global_step,
            self.bad_evals,
            self.progress.boundary_pending,
        )

    def fit(self) -> TrainResult:
        """Train from ``start_epoch`` until ``train.epochs``, a budget or patience ends the run;
        checkpoints, metrics and plot kept current. The TensorBoard log is closed however it ends
        (its writer holds a thread and an open file)."""
        try:
            return self._fit()
        except Signalled as again:  # a second Ctrl-C: no checkpoint of this point, but maybe an earlier one
            pressed_twice = self.stops.pending and not again.quiet
            if pressed_twice and self.dist.is_main:
                again.stopped = stopped_at_once(
                    self.run_dir,
                    again.name,
                    began_at=self.began_at,
                    first_step=self._first_step,
                    seconds=self._session_seconds(self._epoch_seconds()),
                    epochs_done=self._epochs_done,
                )
                # a double Ctrl-C's bare "interrupted" line did not say it could be resumed (learner34);
                # an --overwrite's session says it its own way
                again.after = left_by_signal(self.run_dir, self.resume_advice)
            raise
        finally:
            if self.tensorboard is not None:
                self.tensorboard.close()

    def _fit(self) -> TrainResult:
        train = self.config.train
        already = self._already_done()
        self._write_run_files(self._config_to_record(already is not None))
        began_at = self.began_at = self._position()
        if already is None:
            self.reporter.start(self._run_start())
            for note in self._setup_notes():
                self.reporter.note(note)
        else:
            self.reporter.note(nothing_to_train(already, train, began_at, self.global_step, self.bad_evals))
        tokens_per_s: float | None = None  # none measured until an epoch is trained
        stop_reason: StopReason = "epochs"
        if already is not None:
            stop_reason = already
        # A boundary whose validation a signal cut short is done first, whatever train.epochs says now.
        cut_short = already is None and self.progress.boundary_pending
        until = max(train.epochs, self.start_epoch + 1) if cut_short else train.epochs
        val_ppl = self.records[-1].val_ppl if self.records else None
        if already is not None and val_ppl is None:
            val_ppl = self._validate()  # outside the handler: a signal ends a command with nothing to train
        # the session's clock counts a fine-tuning run's validation of its starting weights, as it counts a
        # resume's replayed one, though neither counts against max_time
        self.session_time = SessionTime()
        self._session_start_elapsed = self.elapsed + self.progress.elapsed  # a resume's, mid-epoch too
        if self.device.type == "cpu" and not self.dist.enabled:  # under torchrun each process would say it
            self.slowdown = SlowdownWatch(
                torch.get_num_threads(), self.resume_advice, self.tokens_seen, self._session_start_elapsed
            )
        with self.stops.noted():  # a signal from here on stops at a checkpoint
            if already is None and self.global_step == 0 and self.lineage.init_from:
                if not self.records:
                    self._validate_starting_weights()
                    val_ppl = self.records[-1].val_ppl if self.records else None
                elif self._start_record() is not None and not (self.run_dir / BEST).is_file():
                    self._save(BEST, 0)  # killed between its LAST and BEST: the weights are still the start's
            # the budgets count training from here: not a fine-tuning run's validation of its start
            self._training_starts()
            for epoch in range(self.start_epoch, until if already is None else 0):
                window, tokens_per_s = self.train_epoch(epoch)
                if self.stopped_mid_epoch is not None:  # the line written at the stop is the last
                    stop_reason, val_ppl = self.stopped_mid_epoch, self.records[-1].val_ppl
                    break
                # the epoch's end is the boundary a signal cut short (one inside the epoch was replayed
                # before its next step: ddp32 found that end validated again and max_time restarted)
                assert self.trained_epoch is not None  # train_epoch sets it where no stop ended the epoch
                resumed_cut_short = self.trained_epoch.boundary_pending
                val_ppl, ended_by = self._end_epoch(epoch, window, tokens_per_s, resumed_cut_short)
                if ended_by is not None:
                    stop_reason = ended_by
                    break
        if already is None:
            for note in self._closing_notes(stop_reason):
                self.reporter.note(note)
        samples = self._samples() if self.dist.is_main else {}
        if self.tensorboard is not None and already is None:  # a resume that trained nothing logs nothing
            self.tensorboard.add_samples(samples, self.global_step)
        self.reporter.finish()
        return self._result(stop_reason, val_ppl, tokens_per_s, samples)

    def _run_start(self) -> RunStart:
        """The session's first line: what it trains, on what, for how long, from where."""
        step_budget = self.length.step_budget
        budget_epochs = (
            epochs_at_step(
                step_budget,
                epoch=self.start_epoch,
                steps_before=self.global_step - self.progress.step,
                num_tokens=len(self.train_tokens),
                data=self.config.data,
                seed=self.config.train.seed,
                epochs=self.config.train.epochs,
            )
            if step_budget
            else 0.0
        )
        return RunStart(
            # the bar's epochs: where the budget ends through the real epoch lengths, where counted
            total_epochs=math.ceil(budget_epochs) if budget_epochs else self.length.epochs,
            start_epoch=self.start_epoch,
            parameters=count_parameters(self.model),
            device=device_description(self.device),
            origin=self._origin(),
            log_every=self.config.train.log_every,
            max_steps=step_budget,
            steps_per_epoch=self.length.steps_per_epoch,
            budget_epochs=budget_epochs,
            latest_val_ppl=next((r.val_ppl for r in reversed(self.records) if r.val_ppl is not None), None),
            max_time=self.config.train.max_time,
        )

    def _setup_notes(self) -> tuple[str, ...]:
        """What the settings, the text and the device mean for this session, said before it trains."""
        starting = self.global_step == 0  # a resume cannot change what is said only where a run starts
        return (
            *self._notes,
            *self.dataset.notes,
            *data_notes(
                self.config,
                self.dataset,
                self.device,
                fine_tuning=self.lineage.init_from is not None,
            ),
            *(
                own_text_notes(self.config.data, self.dataset, fine_tuning=self.lineage.init_from is not None)
                if starting
                else ()
            ),
            *planned_length_notes(
                self.config,
                self.length,
                self.dataset.splits.validates,
                count_parameters(self.model),
                fine_tuning=self.lineage.init_from is not None,
                starting=starting,
            ),
            *([missing] if self.dist.is_main and (missing := self.plot.missing_plotter()) else []),
        )

    def _end_epoch(
        self, epoch: int, window: TrainWindow, tokens_per_s: float, resumed_cut_short: bool
    ) -> tuple[float | None, StopReason | None]:
        """An epoch's end: validate, judge, log, checkpoint, sample; its validation perplexity, and why
        the run ends here (None: it goes on). ``resumed_cut_short``: the epoch's end is the boundary a
        signal cut short before the resume, validated whatever the cadence says."""
        train = self.config.train
        done = epoch + 1
        budget_stop = self._budget_reached(vote_now=True)
        final = done >= train.epochs or budget_stop is not None
        on_cadence = self.cadence.eval.due_at_epoch_end(done, self.global_step)
        val_ppl = None
        validates = on_cadence or final or resumed_cut_short  # a cut one: as it was to
        try:
            if validates:
                val_ppl = self._validate_to_judge(abandonable=True)
        except EvaluationAbandoned:  # a signal: checkpoint now, not after the rest of a large split
            self._interrupt_epoch_end(epoch)
        # max_time ran out while validating: this epoch's end ends the run, not a step and a validation
        # later (one cut short by a signal belonged to the session before: its budget starts after it)
        if validates and not final and not resumed_cut_short:
            budget_stop = self._budget_reached(vote_now=True)
            final = budget_stop is not None
        self._judge(val_ppl, done, on_cadence=on_cadence)
        record = self._record(done, window, val_ppl, tokens_per_s, self.elapsed)
        self._append_metrics(record)
        stopped_early = self._patience_spent
        last_epoch = final or stopped_early
        keep = self.cadence.keep.due_at_epoch_end(done, self.global_step)
        if (
            self.cadence.checkpoint.due_at_epoch_end(done, self.global_step)
            or last_epoch
            or resumed_cut_short  # LAST holds its end as not done: a crash must not run it twice
            or keep
        ):
            self._save(LAST, done, keep=keep)
        self._report_line(record)
        if (
            self.dist.is_main
            and self.cadence.sample.due_at_epoch_end(done, self.global_step)
            and not last_epoch
        ):
            self._report_samples(done)
        self._update_plot(force=last_epoch)
        if resumed_cut_short:  # the boundary ended the session before this one: its max_time starts now
            self._training_starts()
        # Under torchrun the ranks vote, so a signal landing between two ranks' checks stops them all.
        if self._stop_requested():
            if not last_epoch:
                self._interrupt(done, None)
            # its last epoch (of train.epochs, a budget or patience) is checkpointed: it ends as one
            self.reporter.note(f"{self.stops.name} arrived after the last epoch: the run is complete")
        if stopped_early:
            return val_ppl, "patience"
        if budget_stop is not None:
            # a budget that ends with the last epoch did not cut it short
            return val_ppl, budget_stop if done < train.epochs else "epochs"
        return val_ppl, "epochs" if final else None

    def _closing_notes(self, stop_reason: StopReason) -> list[str]:
        """What qualifies the session's figures, said beside them at its end."""
        notes = []
        patience = self.config.train.patience
        if stop_reason == "patience":
            notes.append(
                "early stop: validation perplexity has not improved for "
                f"{patience} evaluation{'' if patience == 1 else 's'}"
            )
        if (scored := run_scored_unknown_note(self.dataset, self.config.train.eval_tokens)) is not None:
            notes.append(scored)  # beside the perplexities it qualifies: the start's note scrolled by
        if stop_reason == "max_time":  # the note said as the pace showed counts from where the session stood
            epoch = int(self.global_step / self.length.steps_per_epoch)
            rate = self._rate_at(epoch, self.global_step)
            session_steps = self.global_step - self._first_step
            end = unannealed_end_note(self.config.train, self.global_step, session_steps, self.length, rate)
            if end is not None:
                notes.append(end)
        session_ppls = [
            r.train_ppl for r in self.records if r.step > self._first_step and r.train_ppl is not None
        ]
        if (overflowed := overflowed_note(session_ppls, self.config.train)) is not None:
            notes.append(overflowed)
        elif (
            worse := worse_than_uniform_note(session_ppls, len(self.dataset.vocab), self.config.train)
        ) is not None:
            notes.append(worse)
        start = self._start_record()
        if start is not None and self.best_kept == start.val_ppl:
            notes.append(  # no path: under --overwrite the run trains in a staging folder swapped in at its end
                f"no validation beat the starting weights' perplexity {start.val_ppl:.4g}: the run's {BEST} "
                "holds them, and predict and eval read it"
            )
        return notes

    def _epoch_seconds(self) -> float:
        """The training seconds of the epoch under way, not yet the run's ``elapsed``: up to now where a
        second signal cut it between boundaries, to its stop where a first signal's checkpoint holds it."""
        return 0.0 if self._epoch_clock is None else self._epoch_clock.seconds(time.perf_counter())

    def _session_seconds(self, epoch_seconds: float = 0.0) -> SessionSeconds:
        """Where this session's wall clock went; ``epoch_seconds``: those of an epoch a stop cut, not yet
        the run's ``elapsed``."""
        trained = self.elapsed + epoch_seconds
        return SessionSeconds(
            session=self.session_time.elapsed(),
            training=trained - self._session_start_elapsed,
            validating=self.session_time.validating,
            checkpoints=self.session_time.writing,
        )

    def _result(
        self,
        stop_reason: StopReason,
        val_ppl: float | None,
        tokens_per_s: float | None,
        samples: dict[str, str],
    ) -> TrainResult:
        # the last line that trained (a fine-tuning run's first validates the starting weights alone)
        trained = next((r for r in reversed(self.records) if r.train_ppl is not None), None)
        start = self._start_record()
        validates = self.dataset.splits.validates
        # the line whose validation best.safetensors holds: the first to reach it (a tie never replaces it)
        best = next((r for r in self.records if r.val_ppl is not None and r.val_ppl == self.best_kept), None)
        last = self.records[-1] if self.records else None
        trained_now = tokens_per_s is not None  # a resume of a finished run says that, and only that
        # the final samples, printed after the summary: blank (unless said of the samples while
        # training), or not the weights predict reads
        samples_notes = (
            [
                note
                for note in (
                    None
                    if self._blank_samples_noted
                    else blank_samples_note(samples, self.config.train, self.config.data.token),
                    None
                    if best is None or last is None or not samples
                    else last_weights_note(last, best, self.config.train.patience),
                )
                if note is not None
            ]
            if trained_now
            else []
        )
        return TrainResult(
            run_dir=self.run_dir,
            # the last metrics line, or where a resume that trained nothing began (inside an epoch,
            # after the last line, when an interrupt stopped the run there)
            epochs=max(self.records[-1].epoch, self.began_at) if self.records else self.began_at,
            start_epoch=self.began_at,
            start_step=self._first_step,
            # the last line's: the steps since the one before it in its epoch (README "Long runs")
            train_ppl=trained.train_ppl if trained and trained.train_ppl is not None else math.nan,
            train_ppl_steps=trained.train_ppl_steps if trained else 0,
            val_ppl=val_ppl,
            best_val_ppl=self.best_kept,
            start_val_ppl=start.val_ppl if start is not None else None,
            train_ppl_as=as_trained(self.config),
            val_tokens=self._predictions_read(val_ppl) if validates else None,
            val_split_tokens=len(self.val_tokens) - 1 if validates else None,
            tokens_per_s=tokens_per_s,
            device=device_name(self.device),
            world_size=self.dist.world_size,
            threads=torch.get_num_threads() if self.device.type == "cpu" else None,
            samples_notes=tuple(samples_notes),
            best_at=None if best is None or best is last else validated_at(best),
            best_epoch=None if best is None else best.epoch,
            parameters=count_parameters(self.model),
            samples=samples,
            stopped_early=stop_reason == "patience",
            stop_reason=stop_reason,
            steps=self.global_step,
            seconds=None if tokens_per_s is None else self._session_seconds(),
            kept=tuple(path.relative_to(self.run_dir) for path in self.files.kept_files()),
        )
