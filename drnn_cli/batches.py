"""Splits and minibatch iterators with d2l's exact partition rules.

Every random choice comes from a ``torch.Generator`` seeded per epoch, so an epoch is reproducible
and a run resumed in the middle of one sees the same minibatches.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal

import torch

from drnn_cli.config import DataConfig, TrainConfig
from drnn_cli.errors import DrnnError

# One token read, one predicted: the fewest a perplexity is computed from. A split shorter than this
# is no split (a validation share that rounds to nothing).
MIN_EVAL_TOKENS = 2


@dataclass(frozen=True)
class Splits:
    """Contiguous segments of the encoded corpus: train, then validation, then test."""

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor

    def get(self, name: str) -> torch.Tensor:
        return {"train": self.train, "val": self.val, "test": self.test}[name]

    @property
    def validates(self) -> bool:
        """Whether there is a validation split to score: ``MIN_EVAL_TOKENS`` tokens or more (a
        ``data.val_fraction`` too small for the text leaves none, and training says so)."""
        return len(self.val) >= MIN_EVAL_TOKENS

    def span(self, name: str) -> tuple[int, int]:
        """Where a split lies in the tokens used: its start and stop (counts kept by position read it)."""
        start = {"train": 0, "val": len(self.train), "test": len(self.train) + len(self.val)}[name]
        return start, start + len(self.get(name))


def split_tokens(tokens: torch.Tensor, val_fraction: float, test_fraction: float) -> Splits:
    """Tail segments: ``[ train | val | test ]``, sizes rounded down for the held-out parts.

    A size is the fraction as written times the length, in decimal: in binary floating point
    100 × 0.29 is 28.999999999999996, which rounded down held out 28 tokens, not 29."""
    n_train, n_val, _ = split_sizes(len(tokens), val_fraction, test_fraction)
    return Splits(
        train=tokens[:n_train], val=tokens[n_train : n_train + n_val], test=tokens[n_train + n_val :]
    )


def split_sizes(total: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """The train, validation and test sizes :func:`split_tokens` cuts ``total`` tokens into."""
    n_test = held_out(total, test_fraction)
    n_val = held_out(total, val_fraction)
    return total - n_val - n_test, n_val, n_test


def training_split_end(data: DataConfig, total_tokens: int) -> tuple[int, int]:
    """Where a run with these settings ended its training split in a text of ``total_tokens`` tokens,
    and how many tokens it used (its first ``data.max_tokens``, cut by its own fractions)."""
    used = total_tokens if data.max_tokens < 0 else min(data.max_tokens, total_tokens)
    return split_sizes(used, data.val_fraction, data.test_fraction)[0], used


def held_out(total: int, fraction: float) -> int:
    """``fraction`` (as its shortest decimal, the way it was written) of ``total``, rounded down; the
    repr of a plain ``float``, as a subclass's (NumPy's ``np.float64(0.29)``) is no decimal."""
    return int(Decimal(repr(float(fraction))) * total)


@dataclass(frozen=True)
class Shard:
    """This process's share of every global minibatch: rows ``[rank*B/W, (rank+1)*B/W)``."""

    rank: int = 0
    world_size: int = 1

    def rows(self, batch_size: int) -> slice:
        """Rows ``[⌊rank·B/W⌋, ⌊(rank+1)·B/W⌋)``: B/W each where W divides B (training's batches must
        divide); an evaluation's rows need not, and the shares then differ by one (or are empty where
        B < W), the last always holding row B-1."""
        return slice(
            self.rank * batch_size // self.world_size, (self.rank + 1) * batch_size // self.world_size
        )


def check_trainable(
    n_tokens: int,
    batch_size: int,
    num_steps: int,
    world_size: int = 1,
    capped: bool = False,
    resuming: bool = False,
) -> None:
    """Refuse a split too short for a single minibatch, naming the sizes and what to change
    (``capped``: ``data.max_tokens`` kept less than the whole text, so raising it is one way; a
    ``resuming`` run keeps its batch size, so only the number of processes can change)."""
    needed = batch_size * num_steps + 1
    if n_tokens < needed:
        raise DrnnError(
            f"the training split has {n_tokens:,} token{'' if n_tokens == 1 else 's'} but one minibatch of "
            f"data.batch_size {batch_size:,} × data.num_steps {num_steps:,} needs {needed:,}; lower data.batch_size or data.num_steps, "
            + ("raise data.max_tokens, " if capped else "")
            + "or use a longer text"
        )
    if batch_size % world_size:
        if resuming:
            small = [n for n in range(1, math.isqrt(batch_size) + 1) if batch_size % n == 0]
            divisors = sorted({*small, *(batch_size // n for n in small)})
            counts = [f"{n:,}" for n in divisors[:9]] + ([f"… {batch_size:,}"] if len(divisors) > 9 else [])
            shown = ", ".join(counts[:-1]) + f" or {counts[-1]}" if len(counts) > 1 else counts[0]
            raise DrnnError(
                f"data.batch_size {batch_size} does not divide among {world_size} processes, and a resumed run "
                f"keeps its batch size: resume it on {shown} process{'' if shown == '1' else 'es'}"
            )
        raise DrnnError(
            f"data.batch_size {batch_size} does not divide among {world_size} processes; "
            f"make it a multiple of the world size"
        )


def epoch_seed(seed: int, epoch: int) -> int:
    """One seed per run and epoch: an epoch's randomness is independent of everything before it."""
    return seed * 1_000_003 + epoch


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The batching randomness of one epoch."""
    return torch.Generator().manual_seed(epoch_seed(seed, epoch))


@dataclass
class EpochBatches:
    """The minibatches of one training epoch: minibatch i is a window of shape ``(B/W, T+1)``, whose
    first T columns are the inputs X and last T columns the targets Y (X shifted by one).

    Inputs and targets are one window because they overlap in all but one column: the training step
    copies a minibatch into its buffers as one tensor, and the targets' transposed order the loss reads
    is a view of that buffer, not a copy per step (docs/gpu.md, ``train.cuda_graph``).
    ``carries_state`` says whether row b of minibatch i+1 continues row b of minibatch i
    (sequential partition: the hidden state is carried over, detached).
    """

    tokens: torch.Tensor  # sequential: (B/W, L+1) rows, each row's last token the next row's first
    #                       (a view of the corpus); random: the corpus from the offset on
    num_batches: int
    num_steps: int
    carries_state: bool
    offset: int  # the tokens the epoch's random draw skipped at the split's start
    starts: torch.Tensor | None = None  # random: (num_batches, B/W) subsequence starts, from the offset

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.from_step(0)

    def windows_from(self, first: int) -> Iterator[torch.Tensor]:
        """Windows ``first``, ``first + 1``, …, in the corpus' own dtype: a run resumed inside the
        epoch builds none it skips."""
        steps = self.num_steps
        if self.starts is None:  # sequential: column slices of the overlapping rows, views
            for i in range(first, self.num_batches):
                yield self.tokens[:, i * steps : (i + 1) * steps + 1]
            return
        window = torch.arange(steps + 1, device=self.tokens.device)  # random: gathered at the starts
        for i in range(first, self.num_batches):
            yield self.tokens[self.starts[i].unsqueeze(1) + window]

    def row_starts(self, batch: int) -> list[int]:
        """Where each row of minibatch ``batch`` begins in the split: its first input's position (the
        whole batch's rows: a torchrun rank's share of a sequential batch would be numbered from 0)."""
        if self.starts is None:  # sequential: B equal rows of L tokens from the offset on
            row_length = self.tokens.shape[1] - 1
            first_column = batch * self.num_steps
            return [self.offset + row * row_length + first_column for row in range(self.tokens.shape[0])]
        return [self.offset + int(start) for start in self.starts[batch]]

    def from_step(self, first: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(X, Y)`` pairs of int64 ``(B/W, T)`` tensors from minibatch ``first`` on."""
        for window in self.windows_from(first):
            yield window[:, :-1].long(), window[:, 1:].long()


def sequential_batches(
    tokens: torch.Tensor, batch_size: int, num_steps: int, generator: torch.Generator, shard: Shard = Shard()
) -> EpochBatches:
    """d2l's ``seq_data_iter_sequential``.

    offset = randint(0, T)             corpus:  . . o [x x x x x x x x x x x x] x
    n = ((len - offset - 1) // B) * B                    └──── n tokens ────┘
    Xs = corpus[offset : offset+n].reshape(B, -1); Ys = the same shifted by one.
    minibatch i = columns [i*T, (i+1)*T) of every row:

        row 0:  | mb 0 | mb 1 | mb 2 | …      row b of mb i+1 continues row b of mb i
        row 1:  | mb 0 | mb 1 | mb 2 | …

    Xs and Ys are views of the corpus, never copies. The offset is capped so that a split barely
    longer than one minibatch still yields one.
    """
    offset = _draw_offset("sequential", len(tokens), batch_size, num_steps, generator)
    n = ((len(tokens) - offset - 1) // batch_size) * batch_size
    row_len = n // batch_size
    # Row b holds tokens [offset + b·L, offset + (b+1)·L]: L inputs and, one further, L targets.
    # Consecutive rows share a token, so this is a strided view of the corpus, not a copy.
    stride = tokens.stride(0)
    rows = tokens[offset : offset + n + 1].as_strided((batch_size, row_len + 1), (row_len * stride, stride))
    return EpochBatches(
        tokens=rows[shard.rows(batch_size)],
        num_batches=_num_batches("sequential", len(tokens), offset, batch_size, num_steps),
        num_steps=num_steps,
        carries_state=True,
        offset=offset,
    )


def random_batches(
    tokens: torch.Tensor, batch_size: int, num_steps: int, generator: torch.Generator, shard: Shard = Shard()
) -> EpochBatches:
    """d2l's ``seq_data_iter_random``: drop randint(0, T-1) tokens, cut the rest into length-T
    subsequences starting at multiples of T, shuffle, and take B at a time. Subsequences never
    overlap, and the state is re-initialised for every minibatch.
    """
    offset = _draw_offset("random", len(tokens), batch_size, num_steps, generator)
    num_subseqs = (len(tokens) - offset - 1) // num_steps
    order = torch.randperm(num_subseqs, generator=generator) * num_steps
    num_batches = _num_batches("random", len(tokens), offset, batch_size, num_steps)
    starts = order[: num_batches * batch_size].reshape(num_batches, batch_size)[:, shard.rows(batch_size)]
    return EpochBatches(
        tokens=tokens[offset:],
        num_batches=num_batches,
        num_steps=num_steps,
        carries_state=False,
        offset=offset,
        starts=starts.to(tokens.device),
    )


def _draw_offset(
    sampling: str, num_tokens: int, batch_size: int, num_steps: int, generator: torch.Generator
) -> int:
    """An epoch's offset, its generator's first draw: the batches and :func:`epoch_steps` draw it alike."""
    largest = _largest_offset(sampling, num_tokens, batch_size, num_steps)
    return int(torch.randint(0, largest + 1, (1,), generator=generator))


def _largest_offset(sampling: str, num_tokens: int, batch_size: int, num_steps: int) -> int:
    """The largest of an epoch's random offsets (d2l draws from [0, T] sequentially, [0, T-1] at random),
    capped so that a split barely longer than one minibatch still yields one."""
    largest = num_steps if sampling == "sequential" else num_steps - 1
    return min(largest, num_tokens - 1 - batch_size * num_steps)


def _num_batches(sampling: str, num_tokens: int, offset: int, batch_size: int, num_steps: int) -> int:
    """Minibatches of an epoch whose offset drops ``offset`` tokens: sequentially, whole ``T`` columns of
    ``B`` equal rows; at random, whole groups of ``B`` subsequences of ``T``."""
    if sampling == "sequential":
        return (num_tokens - offset - 1) // batch_size // num_steps
    return (num_tokens - offset - 1) // num_steps // batch_size


def offset_range(num_tokens: int, data: DataConfig) -> tuple[int, int, int]:
    """The offsets an epoch may draw, and the minibatches it then makes: ``(largest offset, fewest,
    most)`` (d2l draws a new offset each epoch, so an epoch's minibatch count can move by one)."""
    largest = _largest_offset(data.sampling, num_tokens, data.batch_size, data.num_steps)
    fewest = _num_batches(data.sampling, num_tokens, largest, data.batch_size, data.num_steps)
    most = _num_batches(data.sampling, num_tokens, 0, data.batch_size, data.num_steps)
    return largest, fewest, most


def mean_steps_per_epoch(num_tokens: int, data: DataConfig) -> float:
    """The minibatches an epoch has on average over its equally likely offsets: a tiny text's epochs
    of 1 or 2 steps make epoch 0's count a poor guide to how many epochs a step budget spans."""
    sampling, batch_size, num_steps = data.sampling, data.batch_size, data.num_steps
    offsets = range(_largest_offset(sampling, num_tokens, batch_size, num_steps) + 1)
    counts = [_num_batches(sampling, num_tokens, offset, batch_size, num_steps) for offset in offsets]
    return sum(counts) / len(counts)


@dataclass(frozen=True)
class PlannedLength:
    """How long a run's settings make it, before it starts (``train.max_time`` cannot be foreseen): what
    its first line, progress bar and notes say, and ``drnn data`` previews."""

    # mean_steps_per_epoch: what steps are converted to epochs with wherever a run says how long it is
    # (epoch 0's count is 3 where a tiny text's epochs have 2 or 3 steps); the learning-rate schedule
    # keeps epoch 0's (Trainer.steps_per_epoch), so runs train as they did
    steps_per_epoch: float
    step_budget: int  # train.max_steps where it ends the run before train.epochs does, else 0
    epochs: int  # the epochs the run reaches: train.epochs, or fewer where max_steps ends it first
    steps: int  # the optimizer steps it reaches

    @classmethod
    def of(cls, train: TrainConfig, data: DataConfig, num_tokens: int) -> PlannedLength:
        """The plan for a training split of ``num_tokens``."""
        per_epoch = mean_steps_per_epoch(num_tokens, data)
        budget = train.max_steps if train.max_steps and train.max_steps < train.epochs * per_epoch else 0
        if not budget:
            return cls(per_epoch, 0, train.epochs, round(train.epochs * per_epoch))
        return cls(per_epoch, budget, min(train.epochs, math.ceil(budget / per_epoch)), budget)


def training_batches(
    tokens: torch.Tensor,
    sampling: str,
    batch_size: int,
    num_steps: int,
    generator: torch.Generator,
    shard: Shard = Shard(),
) -> EpochBatches:
    build = sequential_batches if sampling == "sequential" else random_batches
    return build(tokens, batch_size, num_steps, generator, shard)


def epoch_batches(
    tokens: torch.Tensor, data: DataConfig, seed: int, epoch: int, shard: Shard = Shard()
) -> EpochBatches:
    """The minibatches a run with ``data`` and ``train.seed`` trains on in ``epoch`` (this rank's rows)."""
    return training_batches(
        tokens, data.sampling, data.batch_size, data.num_steps, epoch_generator(seed, epoch), shard
    )


def epoch_steps(num_tokens: int, data: DataConfig, seed: int, epoch: int) -> int:
    """How many minibatches :func:`epoch_batches` makes of ``epoch``, from its offset alone (its
    generator's first draw), without the shuffle that random sampling's batches cost (review rev32)."""
    generator = epoch_generator(seed, epoch)
    offset = _draw_offset(data.sampling, num_tokens, data.batch_size, data.num_steps, generator)
    return _num_batches(data.sampling, num_tokens, offset, data.batch_size, data.num_steps)


# epochs_at_step counts a step budget's span through the real epoch lengths up to this many epochs (each
# one draw of its offset: epoch_steps), beyond which the mean's estimate stands
EPOCH_WALK = 2_000


def epochs_at_step(
    step: int, *, epoch: int, steps_before: int, num_tokens: int, data: DataConfig, seed: int, epochs: int
) -> float:
    """Epochs done at optimizer step ``step``, counted from ``epoch`` (begun after ``steps_before``
    steps) through the real epoch lengths (sequential sampling's offsets change them by a step): a step
    budget's last log line read ``epoch 1.207/1.205`` against the mean's span (ddp32). At most ``epochs``
    (``train.epochs``), which ends the run where its real epochs are shorter than the mean's (``epoch
    3/3.05``: review rev32). 0.0 past :data:`EPOCH_WALK` epochs (the mean then)."""
    before = steps_before
    for _ in range(EPOCH_WALK):
        if epoch >= epochs:  # the real epochs end before the step: they end the run
            return float(epoch)
        steps = epoch_steps(num_tokens, data, seed, epoch)
        if step <= before + steps:
            return epoch + 1 if step == before + steps else round(epoch + (step - before) / steps, 6)
        before, epoch = before + steps, epoch + 1
    return 0.0


@dataclass(frozen=True)
class EvalBatch:
    """A minibatch for evaluation; ``keep_row`` narrows the carried state to one row first.

    ``job_targets``: the targets this minibatch predicts on all ranks together (all B rows' columns;
    the tail's own), so that every rank counts the job's progress alike. ``in_tail``: one of the last
    row's continuation, which only the rank holding that row evaluates."""

    x: torch.Tensor
    y: torch.Tensor
    keep_row: int | None = None
    job_targets: int = 0
    in_tail: bool = False


def eval_batches(
    tokens: torch.Tensor, batch_size: int, num_steps: int, shard: Shard = Shard()
) -> Iterator[EvalBatch]:
    """Visit every target of ``tokens`` exactly once, state carried across minibatches.

    The m = len-1 targets are laid out as B rows of L = m // B (sequential layout, no offset); the
    r = m - B*L leftover targets continue the last row, so they are evaluated as a batch of one
    that starts from row B-1's final state:

        row 0    | 0 … L-1 |
        …
        row B-1  | (B-1)L … BL-1 | BL … m-1 |   ← the tail, batch of one

    Under torchrun each rank takes a contiguous block of the rows (``shard``) and every rank steps
    through the same columns, so all of them meet each column's minibatch together (a rank with no
    row gets empty ones: the stop votes count minibatches); the tail goes to the rank holding row B-1.
    The rows and their states are one process's, so the shares' sums add up to its figure.
    """
    targets = len(tokens) - 1
    if targets < 1:
        return
    rows = max(1, min(batch_size, targets))
    row_len = targets // rows
    mine = shard.rows(rows)
    inputs = tokens[: rows * row_len].view(rows, row_len)[mine]  # views of the corpus, never copies
    targets_grid = tokens[1 : rows * row_len + 1].view(rows, row_len)[mine]
    for begin in range(0, row_len, num_steps):
        end = min(begin + num_steps, row_len)
        yield EvalBatch(
            inputs[:, begin:end].long(), targets_grid[:, begin:end].long(), job_targets=rows * (end - begin)
        )
    if mine.stop != rows:  # the tail continues row B-1, another rank's
        return
    tail = tokens[rows * row_len :].long().unsqueeze(0)
    first = True
    for begin in range(0, tail.shape[1] - 1, num_steps):
        end = min(begin + num_steps, tail.shape[1] - 1)
        yield EvalBatch(
            tail[:, begin:end],
            tail[:, begin + 1 : end + 1],
            keep_row=rows - 1 - mine.start if first else None,  # the kept row's index in this rank's block
            job_targets=end - begin,
            in_tail=True,
        )
        first = False
