"""What resuming a run needs besides the weights: ``TrainerState``, typed, and its checkpoint tree.

``Checkpoint.trainer_state`` (checkpoint.py) stores a nested dict of tensors and JSON values; these
classes convert to and from it with the keys checkpoints have always used, so files written before
this module existed still load (their missing keys take the defaults below).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from drnn_cli.batches import Shard
from drnn_cli.models import State, join_state_rows, select_state_rows


@dataclass
class EpochProgress:
    """Where the loop is inside an epoch: what a mid-epoch checkpoint must carry."""

    loss_sum: torch.Tensor  # Σ loss·n over this epoch's finished steps (float64, on the device)
    first_bad_step: torch.Tensor  # -1, or the first step whose loss was not finite (int64, on the device)
    step: int = 0  # steps done in the epoch; stored as Checkpoint.step_in_epoch
    count: int = 0  # targets behind loss_sum
    state: State | None = None  # the hidden state carried into the next step (sequential sampling)
    elapsed: float = 0.0  # training seconds spent in the epoch so far

    @classmethod
    def start(cls, device: torch.device) -> EpochProgress:
        """An epoch with no step done yet."""
        return cls(
            loss_sum=torch.zeros((), dtype=torch.float64, device=device),
            first_bad_step=torch.full((), -1, dtype=torch.int64, device=device),
        )

    def to(self, device: torch.device) -> EpochProgress:
        return EpochProgress(
            self.loss_sum.to(device),
            self.first_bad_step.to(device),
            self.step,
            self.count,
            _state_to(self.state, device),
            self.elapsed,
        )

    def to_tree(self) -> dict[str, Any]:
        return {
            "loss_sum": self.loss_sum,
            "count": self.count,
            "first_bad_step": self.first_bad_step,
            "state": self.state,
            "elapsed": self.elapsed,
        }

    @classmethod
    def from_tree(cls, tree: dict[str, Any], step: int) -> EpochProgress:
        return cls(
            loss_sum=tree["loss_sum"],
            first_bad_step=tree["first_bad_step"],
            step=step,
            count=int(tree["count"]),
            state=tree["state"],
            elapsed=float(tree["elapsed"]),
        )


@dataclass
class RankState:
    """One torchrun process's own part of a mid-epoch checkpoint: each rank draws its own dropout
    masks and carries the hidden state of its own rows, so each must resume with its own."""

    rng_cpu: torch.Tensor
    rng_cuda: torch.Tensor | None
    progress: EpochProgress

    def to_tree(self) -> dict[str, Any]:
        tree = {"rng_cpu": self.rng_cpu, "epoch_progress": self.progress.to_tree()}
        if self.rng_cuda is not None:
            tree["rng_cuda"] = self.rng_cuda
        return tree

    @classmethod
    def from_tree(cls, tree: dict[str, Any], step: int) -> RankState:
        return cls(
            tree["rng_cpu"], tree.get("rng_cuda"), EpochProgress.from_tree(tree["epoch_progress"], step)
        )


@dataclass
class TrainerState:
    """The trainer's side of a checkpoint: optimizer, scaler, random streams, counters, the epoch so far."""

    optimizer: dict[str, Any]
    scaler: dict[str, Any]
    rng_cpu: torch.Tensor  # the writing process's (rank 0's) CPU generator
    rng_cuda: torch.Tensor | None = None  # its GPU generator, when it trained on one
    bad_evals: int = 0  # evaluations without improvement, for train.patience
    elapsed: float = 0.0  # training seconds since the run began
    global_step: int | None = None  # None: written before step counts existed
    tokens_seen: int | None = None  # None: likewise
    epoch_progress: EpochProgress | None = None  # only in a checkpoint written inside an epoch (rank 0's)
    raw_model: dict[str, torch.Tensor] | None = None  # weight averaging: the weights that keep training
    average_count: int = 0  # weight averaging: the updates in the average
    ranks: list[RankState] | None = None  # under torchrun, inside an epoch: every rank's own part, by rank

    def to_tree(self) -> dict[str, Any]:
        tree: dict[str, Any] = {
            "optimizer": self.optimizer,
            "scaler": self.scaler,
            "rng_cpu": self.rng_cpu,
            "bad_evals": self.bad_evals,
            "elapsed": self.elapsed,
        }
        if self.global_step is not None:
            tree["global_step"] = self.global_step
        if self.tokens_seen is not None:
            tree["tokens_seen"] = self.tokens_seen
        if self.rng_cuda is not None:
            tree["rng_cuda"] = self.rng_cuda
        if self.epoch_progress is not None and self.epoch_progress.step:
            tree["epoch_progress"] = self.epoch_progress.to_tree()
            if self.ranks is not None:
                tree["ranks"] = [rank.to_tree() for rank in self.ranks]
        if self.raw_model is not None:
            # model_state holds the weights to predict with; the raw ones continue training.
            tree["raw_model"] = self.raw_model
            tree["average_count"] = self.average_count
        return tree

    @classmethod
    def from_tree(cls, tree: dict[str, Any], step_in_epoch: int = 0) -> TrainerState:
        """Read ``Checkpoint.trainer_state``; ``step_in_epoch`` > 0 marks a mid-epoch checkpoint."""
        partial = tree.get("epoch_progress") if step_in_epoch else None
        ranks = tree.get("ranks") if partial is not None else None
        return cls(
            optimizer=tree["optimizer"],
            scaler=tree.get("scaler") or {},
            rng_cpu=tree["rng_cpu"],
            rng_cuda=tree.get("rng_cuda"),
            bad_evals=int(tree.get("bad_evals", 0)),
            elapsed=float(tree.get("elapsed", 0.0)),
            global_step=int(tree["global_step"]) if "global_step" in tree else None,
            tokens_seen=int(tree["tokens_seen"]) if "tokens_seen" in tree else None,
            epoch_progress=EpochProgress.from_tree(partial, step_in_epoch) if partial is not None else None,
            raw_model=tree.get("raw_model"),
            average_count=int(tree.get("average_count", 0)),
            ranks=[RankState.from_tree(rank, step_in_epoch) for rank in ranks] if ranks is not None else None,
        )

    def for_rank(self, rank: int, world_size: int) -> RankState | None:
        """``rank``'s own part, when the checkpoint holds every rank's for this world size; None means
        the writer's (rank 0's) fields stand for every rank (one process, an epoch boundary, an older file)."""
        if self.ranks is not None and len(self.ranks) == world_size:
            return self.ranks[rank]
        return None

    def progress_for(self, rank: int, world_size: int, batch_size: int) -> EpochProgress | None:
        """``rank``'s progress through the epoch a mid-epoch checkpoint stopped in; None at a boundary.

        Written by as many processes as resume it, each takes its own part. Written by another
        number (one process resumed under torchrun, or the reverse), the parts are put back together
        and shared out again: the carried state of the whole batch, rows in rank order, gives each
        process its rows (batches.Shard), and the epoch's loss sums and counts go to rank 0 alone, so
        the epoch's totals, summed over the processes, stay what they were.
        """
        if self.epoch_progress is None:
            return None
        own = self.for_rank(rank, world_size)
        if own is not None:
            return own.progress
        parts = [part.progress for part in self.ranks] if self.ranks is not None else [self.epoch_progress]
        first = parts[0]
        loss_sum = sum((part.loss_sum for part in parts), torch.zeros_like(first.loss_sum))
        bad_steps = [int(part.first_bad_step) for part in parts if int(part.first_bad_step) >= 0]
        first_bad_step = min(bad_steps) if bad_steps else -1
        if rank > 0:  # the totals live on rank 0
            loss_sum, first_bad_step = torch.zeros_like(loss_sum), -1
        return EpochProgress(
            loss_sum=loss_sum,
            first_bad_step=torch.full_like(first.first_bad_step, first_bad_step),
            step=first.step,
            count=sum(part.count for part in parts) if rank == 0 else 0,
            state=None
            if first.state is None
            else select_state_rows(
                join_state_rows([part.state for part in parts]),  # type: ignore[misc]
                Shard(rank, world_size).rows(batch_size),
            ),
            elapsed=first.elapsed,
        )


def gather_ranks(progress: EpochProgress, device: torch.device, world_size: int) -> list[RankState]:
    """Every torchrun rank's ``RankState``, by rank, on every rank: a collective, so all must call it."""

    def gather(tensor: torch.Tensor) -> list[torch.Tensor]:
        local = tensor.to(device)  # NCCL gathers device tensors, gloo CPU ones
        parts = [torch.empty_like(local) for _ in range(world_size)]
        torch.distributed.all_gather(parts, local)
        return parts

    cpu = gather(torch.get_rng_state())
    cuda = gather(torch.cuda.get_rng_state(device)) if device.type == "cuda" else None
    loss_sums, bad_steps = gather(progress.loss_sum), gather(progress.first_bad_step)
    counts = gather(torch.tensor(progress.count, dtype=torch.int64))
    carried = progress.state
    states: list[State | None] = [None] * world_size
    if isinstance(carried, tuple | list):  # every rank carries the same number of rows
        states = [tuple(parts) for parts in zip(*(gather(s) for s in carried), strict=True)]
    elif carried is not None:
        states = list(gather(carried))
    return [
        RankState(
            cpu[rank].cpu(),
            cuda[rank].cpu() if cuda is not None else None,
            EpochProgress(
                loss_sums[rank],
                bad_steps[rank],
                progress.step,
                int(counts[rank]),
                states[rank],
                progress.elapsed,
            ),
        )
        for rank in range(world_size)
    ]


def _state_to(state: State | None, device: torch.device) -> State | None:
    if state is None:
        return None
    if isinstance(state, tuple | list):
        return tuple(s.to(device) for s in state)
    return state.to(device)
