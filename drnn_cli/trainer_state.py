"""What resuming a run needs besides the weights: ``TrainerState``, typed, and its checkpoint tree.

``Checkpoint.trainer_state`` (checkpoint.py) stores a nested dict of tensors and JSON values; these
classes convert to and from it with the keys checkpoints have always used, so files written before
this module existed still load (their missing keys take the defaults below). A tree that is not of
that form (a tampered or corrupt checkpoint) raises :class:`UnusableTrainerState` as it is read.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from drnn_cli.batches import Shard
from drnn_cli.errors import first_line
from drnn_cli.models import State, join_state_rows, select_state_rows
from drnn_cli.strict_json import is_number

_REQUIRED = object()  # _field's default: the key must be there


class UnusableTrainerState(ValueError):
    """A checkpoint's trainer state that training cannot continue from; the message names the part."""


def _kind(value: Any) -> str:
    """What ``value`` is, for a message: "null", "a str", "a torch.uint8 tensor of shape (3,)"."""
    if value is None:
        return "null"
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def _field(
    tree: dict[str, Any], key: str, kinds: type | tuple[type, ...], where: str, default: Any = _REQUIRED
) -> Any:
    """``tree[key]``, refused unless one of ``kinds`` (a bool is no number); ``default`` when absent."""
    if key not in tree:
        if default is _REQUIRED:
            raise UnusableTrainerState(f"{where}{key} is missing")
        return default
    value = tree[key]
    allowed = kinds if isinstance(kinds, tuple) else (kinds,)
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        raise UnusableTrainerState(f"{where}{key} is {_kind(value)}")
    return value


def _count(tree: dict[str, Any], key: str, where: str, default: Any = _REQUIRED) -> Any:
    """A counter: a non-negative int (``default`` when absent)."""
    value = _field(tree, key, int, where, default)
    if isinstance(value, int) and value < 0:
        raise UnusableTrainerState(f"{where}{key} is negative ({value})")
    return value


MAX_TRAINING_SECONDS = 100 * 365 * 24 * 3600.0  # a training time beyond this is a tampered header


def _seconds(tree: dict[str, Any], key: str, where: str, default: Any = _REQUIRED) -> float:
    """A duration: a finite, non-negative number (JSON headers may hold NaN or Infinity) below a
    century, so that sums of them stay finite and print as hours."""
    seconds = _amount(tree, key, where, default, "a duration")
    if seconds > MAX_TRAINING_SECONDS:
        raise UnusableTrainerState(f"{where}{key} is {seconds:g} seconds, more than any training has run")
    return seconds


def _amount(tree: dict[str, Any], key: str, where: str, default: Any, kind: str) -> float:
    """A finite, non-negative number, ``kind`` naming what it should be in the refusal."""
    value = _field(tree, key, (int, float), where, default)
    if not math.isfinite(value) or value < 0:
        raise UnusableTrainerState(f"{where}{key} is {value}, not {kind}")
    return float(value)


def _tensor(tree: dict[str, Any], key: str, where: str, integral: bool, default: Any = _REQUIRED) -> Any:
    """A tensor of integer (``integral``) or floating-point values (``default`` when absent)."""
    value = _field(tree, key, torch.Tensor, where, default)
    if isinstance(value, torch.Tensor) and value.is_floating_point() == integral:
        raise UnusableTrainerState(f"{where}{key} is {_kind(value)}")
    return value


def _tensor_map(tree: dict[str, Any], key: str, where: str) -> dict[str, torch.Tensor] | None:
    """Named tensors (weights), or None when absent."""
    value = _field(tree, key, dict, where, None)
    if value is not None:
        for name, tensor in value.items():
            if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
                raise UnusableTrainerState(f"{where}{key}.{name} is {_kind(tensor)}")
    return value


def _carried_state(tree: dict[str, Any], where: str) -> State | None:
    """The carried hidden state: None, a tensor, or (for an LSTM) a pair of tensors."""
    value = _field(tree, "state", (torch.Tensor, tuple, list, type(None)), where)
    if isinstance(value, tuple | list):
        if len(value) != 2 or not all(isinstance(part, torch.Tensor) for part in value):
            raise UnusableTrainerState(f"{where}state is {_kind(value)} of {len(value)} parts, not 2 tensors")
        return tuple(value)  # type: ignore[return-value]
    return value


@contextlib.contextmanager
def loading(part: str) -> Iterator[None]:
    """PyTorch's refusal to load ``part`` of a trainer state (a wrong size, shape or type) as an
    :class:`UnusableTrainerState` naming that part; running out of memory is no such refusal."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise
    except (ValueError, LookupError, TypeError, RuntimeError) as exc:
        raise UnusableTrainerState(f"{part}: {first_line(exc)}") from None


def check_shapes(part: str, held: Any, expected: State | dict[str, torch.Tensor]) -> None:
    """Refuse ``held`` (weights, a carried state) unless its tensors have the shapes of ``expected``'s,
    under the same names or in the same parts: PyTorch would fail on them later, or load them wrongly."""
    if isinstance(expected, dict):
        names = sorted(set(expected) | set(held))
        pairs = [(f"{part}.{name}", held.get(name), expected.get(name)) for name in names]
    elif isinstance(expected, tuple):
        if not isinstance(held, tuple) or len(held) != len(expected):
            raise UnusableTrainerState(f"{part} is {_kind(held)}, not {len(expected)} tensors")
        pairs = [(f"{part}.{index}", h, e) for index, (h, e) in enumerate(zip(held, expected, strict=True))]
    else:
        pairs = [(part, held, expected)]
    for name, tensor, want in pairs:
        have = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else None
        wanted = tuple(want.shape) if isinstance(want, torch.Tensor) else None
        if have != wanted:
            raise UnusableTrainerState(f"{name} has shape {have}, this model's {wanted}")


@dataclass
class EpochProgress:
    """Where the loop is inside an epoch: what a mid-epoch checkpoint must carry.

    The loss tally lives in the training step while the epoch runs (``StaticStep.count``); the
    trainer copies it here at every boundary, before anything reads it."""

    loss_sum: torch.Tensor  # Σ loss·n over this epoch's finished steps (float64, on the device)
    first_bad_step: torch.Tensor  # -1, or the first step whose loss was not finite (int64, on the device)
    step: int = 0  # steps done in the epoch; stored as Checkpoint.step_in_epoch
    count: int = 0  # targets behind loss_sum
    state: State | None = None  # the hidden state carried into the next step (sequential sampling)
    elapsed: float = 0.0  # training seconds spent in the epoch so far
    # loss_sum and count (all ranks') at the epoch's last log line: the next line's training
    # perplexity covers the steps after it (0 and 0: the epoch's start, as checkpoints without them)
    logged_loss_sum: float = 0.0
    logged_count: int = 0
    # a signal cut short this step's boundary (its validation) before its line: a resume runs it first
    boundary_pending: bool = False

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
            self.logged_loss_sum,
            self.logged_count,
            self.boundary_pending,
        )

    def to_tree(self) -> dict[str, Any]:
        return {
            "loss_sum": self.loss_sum,
            "count": self.count,
            "first_bad_step": self.first_bad_step,
            "state": self.state,
            "elapsed": self.elapsed,
            "logged_loss_sum": self.logged_loss_sum,
            "logged_count": self.logged_count,
            "boundary_pending": self.boundary_pending,
        }

    @classmethod
    def from_tree(cls, tree: Any, step: int, where: str = "trainer.epoch_progress.") -> EpochProgress:
        if not isinstance(tree, dict):
            raise UnusableTrainerState(f"{where.rstrip('.')} is {_kind(tree)}")
        loss_sum = _tensor(tree, "loss_sum", where, integral=False)
        first_bad_step = _tensor(tree, "first_bad_step", where, integral=True)
        for key, value in (("loss_sum", loss_sum), ("first_bad_step", first_bad_step)):
            if value.dim() != 0:
                raise UnusableTrainerState(f"{where}{key} is {_kind(value)}, not a scalar")
        if not -1 <= int(first_bad_step) < max(step, 0):  # -1: every loss so far was finite
            raise UnusableTrainerState(
                f"{where}first_bad_step is {int(first_bad_step)}, not -1 or one of the epoch's {step} steps"
            )
        return cls(
            loss_sum=loss_sum,
            first_bad_step=first_bad_step,
            step=step,
            count=_count(tree, "count", where),
            state=_carried_state(tree, where),
            elapsed=_seconds(tree, "elapsed", where),
            logged_loss_sum=_amount(tree, "logged_loss_sum", where, 0.0, "a sum of losses"),
            logged_count=_count(tree, "logged_count", where, 0),  # all ranks' (count is this rank's)
            boundary_pending=_field(tree, "boundary_pending", bool, where, False),
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
    def from_tree(cls, tree: Any, step: int, where: str) -> RankState:
        if not isinstance(tree, dict):
            raise UnusableTrainerState(f"{where.rstrip('.')} is {_kind(tree)}")
        return cls(
            _tensor(tree, "rng_cpu", where, integral=True),
            _tensor(tree, "rng_cuda", where, integral=True, default=None),
            EpochProgress.from_tree(
                _field(tree, "epoch_progress", dict, where), step, f"{where}epoch_progress."
            ),
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
    def from_tree(cls, tree: Any, step_in_epoch: int = 0) -> TrainerState:
        """Read ``Checkpoint.trainer_state``; ``step_in_epoch`` > 0 marks a mid-epoch checkpoint.

        Each field is checked for its kind here, so a tampered or corrupt tree is refused at once
        (:class:`UnusableTrainerState`), not inside PyTorch once training runs. What only the model
        and PyTorch can judge (shapes, the size of a random state) is checked where it is loaded
        (``trainer_checkpoint.restore_training``, with :func:`loading` and :func:`check_shapes`).
        """
        where = "trainer."
        if not isinstance(tree, dict):
            raise UnusableTrainerState(f"the trainer state is {_kind(tree)}")
        optimizer = _field(tree, "optimizer", dict, where)
        _field(optimizer, "param_groups", list, f"{where}optimizer.")
        _field(optimizer, "state", dict, f"{where}optimizer.")
        scaler = _field(tree, "scaler", (dict, type(None)), where, None) or {}
        for key, value in scaler.items():
            if not is_number(value):
                raise UnusableTrainerState(f"{where}scaler.{key} is {_kind(value)}")
        partial = _field(tree, "epoch_progress", dict, where, None) if step_in_epoch else None
        ranks = _field(tree, "ranks", list, where, None) if partial is not None else None
        if ranks == []:  # written by one process there is no list; by several, one entry each
            raise UnusableTrainerState(f"{where}ranks is empty")
        return cls(
            optimizer=optimizer,
            scaler=scaler,
            rng_cpu=_tensor(tree, "rng_cpu", where, integral=True),
            rng_cuda=_tensor(tree, "rng_cuda", where, integral=True, default=None),
            bad_evals=_count(tree, "bad_evals", where, 0),
            elapsed=_seconds(tree, "elapsed", where, 0.0),
            global_step=_count(tree, "global_step", where, None),
            tokens_seen=_count(tree, "tokens_seen", where, None),
            epoch_progress=(
                EpochProgress.from_tree(partial, step_in_epoch, f"{where}epoch_progress.")
                if partial is not None
                else None
            ),
            raw_model=_tensor_map(tree, "raw_model", where),
            average_count=_count(tree, "average_count", where, 0),
            ranks=(
                [
                    RankState.from_tree(rank, step_in_epoch, f"{where}ranks.{i}.")
                    for i, rank in enumerate(ranks)
                ]
                if ranks is not None
                else None
            ),
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
            logged_loss_sum=first.logged_loss_sum,  # every rank's own copy of the all-ranks totals
            logged_count=first.logged_count,
            boundary_pending=first.boundary_pending,
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
                progress.logged_loss_sum,
                progress.logged_count,
                progress.boundary_pending,
            ),
        )
        for rank in range(world_size)
    ]


def _state_to(state: State | None, device: torch.device) -> State | None:
    if state is None:
        return None
    if isinstance(state, tuple | list):
        h, c = state  # an LSTM's (h, c)
        return h.to(device), c.to(device)
    return state.to(device)


@dataclass(frozen=True)
class SavedCounters:
    """A checkpoint's training counters, read from its header alone (``CheckpointInfo``'s packed trainer
    state, whose tensors stay unread): what ``drnn runs`` says of a run without loading it."""

    global_step: int | None  # None: written before step counts existed
    bad_evals: int
    elapsed: float  # training seconds since the run began, the epoch in progress included
    boundary_pending: bool  # a signal cut short the last boundary: a resume runs it first

    @classmethod
    def from_tree(cls, tree: Any, step_in_epoch: int) -> SavedCounters:
        """The counters of a packed trainer state (:class:`UnusableTrainerState` where one is not)."""
        where = "trainer."
        if not isinstance(tree, dict):
            raise UnusableTrainerState(f"the trainer state is {_kind(tree)}")
        partial = _field(tree, "epoch_progress", dict, where, None) if step_in_epoch else None
        inside = where + "epoch_progress."
        return cls(
            global_step=_count(tree, "global_step", where, None),
            bad_evals=_count(tree, "bad_evals", where, 0),
            elapsed=_seconds(tree, "elapsed", where, 0.0)
            + (_seconds(partial, "elapsed", inside, 0.0) if partial is not None else 0.0),
            boundary_pending=bool(
                partial is not None and _field(partial, "boundary_pending", bool, inside, False)
            ),
        )
