"""A trainer's live objects to and from a checkpoint: the :class:`Checkpoint` a run writes of its model,
optimizer, scaler, random streams and counters, and what ``--resume`` puts back of it.

The tree's form (its keys, their checks) is trainer_state.py's; which file is written when is the
loop's (train.py), and how, checkpoint_writer.py's. What can only be judged against the live model and PyTorch (shapes, the size of
a random state, the optimizer's groups) is judged here, as it is loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from drnn_cli.averaging import WeightAverage
from drnn_cli.checkpoint import MAX_UNTRAINED_IDS, BaseChain, Checkpoint
from drnn_cli.config import Config
from drnn_cli.data import Dataset
from drnn_cli.models import RNNLanguageModel
from drnn_cli.optimizers import build_optimizer, restore_optimizer_state
from drnn_cli.runtime import DistContext
from drnn_cli.start_point import StartPoint
from drnn_cli.trainer_state import (
    EpochProgress,
    RankState,
    TrainerState,
    UnusableTrainerState,
    check_shapes,
    loading,
)


@dataclass(frozen=True)
class TrainingCounters:
    """How far a run has come, as the trainer keeps it and its checkpoints carry it besides the weights
    (read back from a header alone, without the trainer, they are ``trainer_state.SavedCounters``, whose
    ``elapsed`` adds the epoch in progress)."""

    global_step: int  # optimizer steps since the run began (across resumes)
    tokens_seen: int
    elapsed: float  # training seconds since the run began (the epoch in progress apart)
    bad_evals: int  # evaluations without improvement, for train.patience
    best_val_ppl: float | None  # the best validation patience counts against


@dataclass(frozen=True)
class Lineage:
    """What a run's checkpoints record of where its weights come from: the checkpoint it was fine-tuned
    from (its path, and where that one's training stood then) with that checkpoint's own bases, and the
    token ids that no training split along the way held, whose input weights no gradient moved."""

    init_from: str | None = None
    init_from_at: str | None = None
    bases: BaseChain | None = None
    untrained_ids: tuple[int, ...] | None = None  # None: not known (a base that did not record them)


def lineage_of(start: StartPoint, dataset: Dataset) -> Lineage:
    """A session's lineage: a resumed run's as its checkpoint recorded it (its untrained ids counted now
    where it predates them and trained from scratch, on the same split), a fine-tuned run's from its
    base (an id is untrained where neither the base's training nor this run's split held it)."""

    def own() -> tuple[int, ...]:  # a count over the training split: 0.13 s for 100 M tokens
        return tuple(torch.nonzero(dataset.unseen_ids()).flatten().tolist())

    def recorded(ids: tuple[int, ...] | None) -> tuple[int, ...] | None:  # what fits a header
        return ids if ids is None or len(ids) <= MAX_UNTRAINED_IDS else None

    resume, base = start.resume, start.init_from
    if resume is not None:
        untrained = resume.untrained_ids
        if untrained is None and resume.init_from is None:
            untrained = own()
        return Lineage(resume.init_from, resume.init_from_at, resume.bases, recorded(untrained))
    if base is None:
        return Lineage(untrained_ids=recorded(own()))
    inherited = None if base.untrained_ids is None else tuple(sorted(set(own()) & set(base.untrained_ids)))
    return Lineage(start.init_label, start.init_from_at, start.bases, recorded(inherited))


@dataclass(frozen=True)
class TrainingParts:
    """What trains: the model, its weight average (None: off), the optimizer and the fp16 scaler."""

    model: RNNLanguageModel
    average: WeightAverage | None
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler

    @property
    def evaluated_model(self) -> RNNLanguageModel:
        """The weights that validation, samples and checkpoints use: the average when enabled."""
        return self.average.module if self.average is not None else self.model  # type: ignore[return-value]


def checkpoint_of(
    config: Config,
    dataset: Dataset,
    *,
    lineage: Lineage,
    parts: TrainingParts,
    counters: TrainingCounters,
    device: torch.device,
    epoch: int,
    progress: EpochProgress | None,
    ranks: list[RankState] | None,
) -> Checkpoint:
    """The checkpoint of a run after ``epoch`` epochs and, inside the next, ``progress`` (None: at an
    epoch boundary); ``ranks``: every torchrun rank's own part of that epoch, gathered."""
    average = parts.average
    state = TrainerState(
        optimizer=parts.optimizer.state_dict(),
        scaler=parts.scaler.state_dict(),
        rng_cpu=torch.get_rng_state(),
        rng_cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        bad_evals=counters.bad_evals,
        elapsed=counters.elapsed,
        global_step=counters.global_step,
        tokens_seen=counters.tokens_seen,
        epoch_progress=progress,
        raw_model=parts.model.state_dict() if average is not None else None,
        average_count=average.count if average is not None else 0,
        ranks=ranks,
    )
    return Checkpoint(
        config=config,
        vocab=dataset.vocab,
        model_state=parts.evaluated_model.state_dict(),
        epoch=epoch,
        step_in_epoch=progress.step if progress is not None else 0,
        best_val_ppl=counters.best_val_ppl,
        trainer_state=state.to_tree(),
        init_from=lineage.init_from,
        init_from_at=lineage.init_from_at,
        bases=lineage.bases,
        untrained_ids=lineage.untrained_ids,
        corpus_sha1=dataset.sha1,
        text_sha1=dataset.text_sha1,
    )


@dataclass(frozen=True)
class Restored:
    """Where a resumed run continues: its optimizer (rebuilt where the checkpoint's groups differ), the
    epoch it is in, its counters, and its progress inside that epoch (None: at the epoch's start)."""

    optimizer: torch.optim.Optimizer
    start_epoch: int
    counters: TrainingCounters
    progress: EpochProgress | None


def restore_training(
    checkpoint: Checkpoint,
    parts: TrainingParts,
    config: Config,
    *,
    fused_updates: bool,
    device: torch.device,
    dist: DistContext,
    epoch_length: Callable[[int], int],
) -> Restored:
    """Put a checkpoint's weights, optimizer and scaler state and random streams back into ``parts`` and
    the process, and read where the run continues. ``epoch_length``: the steps of an epoch on this rank.
    A state that cannot be continued from raises :class:`UnusableTrainerState`."""
    state = checkpoint.trainer()
    model, average, optimizer = parts.model, parts.average, parts.optimizer
    if state.raw_model is not None:  # an averaged run: the checkpoint's weights are the average
        check_shapes("trainer.raw_model", state.raw_model, model.state_dict())
        model.load_state_dict(state.raw_model)  # training goes on from the raw ones, averaged or not
        if average is not None and checkpoint.config.train.average == average.kind:
            average.load_state_dict(checkpoint.model_state, state.average_count)
        elif average is not None:  # an EMA is no mean of N steps (nor the reverse): start afresh
            average.load_state_dict(state.raw_model, 0)
    else:
        model.load_state_dict(checkpoint.model_state)
        if average is not None:  # averaging switched on for a resumed run: start from here
            average.load_state_dict(checkpoint.model_state, 0)
    saved_groups = len(state.optimizer["param_groups"])
    if saved_groups != len(optimizer.param_groups):
        # AdamW with one group is a checkpoint from before biases went undecayed (or one written
        # with train.decay_biases): the resumed run continues the grouping it was trained with.
        optimizer = build_optimizer(model, config.train, decay_biases=saved_groups == 1, fused=fused_updates)
    with loading("trainer.optimizer"):
        restore_optimizer_state(optimizer, state.optimizer)
    if state.scaler:
        with loading("trainer.scaler"):
            parts.scaler.load_state_dict(state.scaler)
    own = state.for_rank(dist.rank, dist.world_size)
    rng_cpu, rng_cuda = (own.rng_cpu, own.rng_cuda) if own is not None else (state.rng_cpu, state.rng_cuda)
    with loading("trainer.rng_cpu"):  # PyTorch checks the size of a random state
        torch.set_rng_state(rng_cpu.cpu())
    if rng_cuda is not None and device.type == "cuda":
        with loading("trainer.rng_cuda"):
            torch.cuda.set_rng_state(rng_cuda.cpu(), device)
    if state.global_step is not None:
        global_step = state.global_step
    else:  # a checkpoint written before step counts existed: estimated from epoch 0's length
        global_step = checkpoint.epoch * epoch_length(0) + checkpoint.step_in_epoch
    data = config.data
    tokens_seen = (
        state.tokens_seen if state.tokens_seen is not None else global_step * data.batch_size * data.num_steps
    )
    with loading("trainer.epoch_progress"):  # joining the ranks' carried states checks their shapes
        progress = state.progress_for(dist.rank, dist.world_size, data.batch_size)
    if progress is not None:
        steps = epoch_length(checkpoint.epoch)
        # At step == steps the loop would skip to the epoch's end with whatever loss sums the file holds
        # (a signal at an epoch's last step now waits for the epoch's end and a boundary checkpoint),
        # unless that end is what the checkpoint marks as left to do: its validation was cut short.
        last = steps if progress.boundary_pending else steps - 1
        if not 0 < progress.step <= last:
            raise UnusableTrainerState(f"step_in_epoch is {progress.step}, and an epoch has {steps} steps")
        if progress.state is not None:
            rows = data.batch_size // dist.world_size
            check_shapes("trainer.epoch_progress.state", progress.state, model.begin_state(rows, "meta"))
        progress = progress.to(device)
    counters = TrainingCounters(
        global_step=global_step,
        tokens_seen=tokens_seen,
        elapsed=state.elapsed,
        bad_evals=state.bad_evals,
        best_val_ppl=checkpoint.best_val_ppl,
    )
    return Restored(optimizer, checkpoint.epoch, counters, progress)
