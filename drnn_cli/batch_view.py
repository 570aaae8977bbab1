"""The minibatches one training epoch reads, for ``drnn data --batches``: each row's place in the
training split, its inputs X and targets Y (X shifted by one), and the offset the epoch drew, as d2l
0.17.6 §8.3 prints them for its toy sequence (``seq_data_iter_random``, ``seq_data_iter_sequential``).

They are the trainer's own minibatches (:func:`~drnn_cli.batches.epoch_batches`, the same seed and
epoch), not a re-implementation beside them.
"""

from __future__ import annotations

from dataclasses import dataclass

from drnn_cli.batches import EpochBatches, offset_range
from drnn_cli.config import DataConfig
from drnn_cli.decode import ids_to_text
from drnn_cli.errors import UsageError
from drnn_cli.render import plural
from drnn_cli.vocab import Vocab

# The rows the human output lists of each minibatch (--json lists them all): the seed config's 32 rows
# of 35 characters would be a screen a minibatch
SHOWN_ROWS = 8
# The most tokens --batches gathers in all (--json: each twice, as X and Y, and as text; else the first
# SHOWN_ROWS rows of each minibatch): a batch of 4,096 rows of 1,000 steps is 4 M tokens, which no one
# reads and the JSON would hold in memory many times over
MAX_VIEWED_TOKENS = 1_000_000


@dataclass(frozen=True)
class BatchRow:
    """One row of a minibatch: ``start`` the position of its first input in the training split."""

    start: int
    inputs: tuple[int, ...]  # token ids X
    targets: tuple[int, ...]  # token ids Y: the inputs shifted by one, so Y[t] = X[t + 1]

    def summary(self, vocab: Vocab, token: str) -> dict:
        return {
            "start": self.start,
            "x": list(self.inputs),
            "y": list(self.targets),
            "x_text": ids_to_text(self.inputs, vocab, token),
            "y_text": ids_to_text(self.targets, vocab, token),
        }


@dataclass(frozen=True)
class EpochView:
    """The first minibatches of one epoch (``epoch`` counted from 1, as the training log counts)."""

    epoch: int
    sampling: str
    offset: int  # the tokens this epoch skips at the split's start, drawn from 0 to largest_offset
    largest_offset: int
    carries_state: bool  # sequential: row b of minibatch i+1 continues row b of minibatch i
    batch_size: int
    minibatches: int  # this epoch's
    fewest: int  # the fewest and most minibatches an epoch makes, as its offset falls
    most: int
    shown: tuple[tuple[BatchRow, ...], ...]

    def summary(self, vocab: Vocab, token: str) -> dict:
        return {
            "epoch": self.epoch,
            "sampling": self.sampling,
            "offset": self.offset,
            "largest_offset": self.largest_offset,
            "carries_state": self.carries_state,
            "batch_size": self.batch_size,
            "minibatches": self.minibatches,
            "fewest_minibatches": self.fewest,
            "most_minibatches": self.most,
            "shown": [[row.summary(vocab, token) for row in batch] for batch in self.shown],
        }


def view_epoch(
    batches: EpochBatches, split_length: int, data: DataConfig, epoch: int, count: int, every_row: bool = True
) -> EpochView:
    """The first ``count`` of ``batches``, the minibatches a run with ``data`` trains on in ``epoch``
    (from 1) of a training split of ``split_length`` tokens (:func:`~drnn_cli.batches.epoch_batches`):
    every row of each, or (``every_row`` False, what the human output lists) its first :data:`SHOWN_ROWS`."""
    rows = data.batch_size if every_row else min(SHOWN_ROWS, data.batch_size)
    tokens = min(count, len(batches)) * rows * data.num_steps
    if tokens > MAX_VIEWED_TOKENS:
        fits = MAX_VIEWED_TOKENS // (rows * data.num_steps)
        raise UsageError(
            f"--batches {count:,} would gather {tokens:,} tokens ({rows:,} rows of {data.num_steps:,} a "
            f"minibatch{'' if every_row else ' shown'}), past the {MAX_VIEWED_TOKENS:,} at most; "
            + (f"ask for at most --batches {fits:,}" if fits else "leave out --json, which lists every row")
        )
    largest, fewest, most = offset_range(split_length, data)
    shown = []
    for index, window in zip(range(count), batches.windows_from(0), strict=False):
        starts = batches.row_starts(index)[:rows]
        shown.append(
            tuple(
                BatchRow(start, tuple(row[:-1]), tuple(row[1:]))
                for start, row in zip(starts, window[:rows].tolist(), strict=True)
            )
        )
    return EpochView(
        epoch=epoch,
        sampling=data.sampling,
        offset=batches.offset,
        largest_offset=largest,
        carries_state=batches.carries_state,
        batch_size=data.batch_size,
        minibatches=len(batches),
        fewest=fewest,
        most=most,
        shown=tuple(shown),
    )


def view_lines(view: EpochView, vocab: Vocab, token: str) -> list[str]:
    """The view in words: how the epoch cut its minibatches, then each shown one's rows as positions in
    the training split and text, the inputs X then the targets Y."""
    steps = len(view.shown[0][0].inputs) if view.shown else 0
    count = (
        f"{view.minibatches:,}"
        if view.fewest == view.most
        else f"{view.minibatches:,} (an epoch makes {view.fewest:,}–{view.most:,}, as its offset falls)"
    )
    skipped = "no token" if not view.offset else f"the first {plural(view.offset, 'token')}"
    skip = (
        f"it skips {skipped} of the training split (its offset, drawn again each epoch from "
        f"0–{view.largest_offset:,})"
    )
    if view.carries_state:
        how = (
            f"epoch {view.epoch}, sequential partition: {skip} and splits the rest into {view.batch_size:,} "
            f"rows of equal length; each minibatch takes the next {steps:,} tokens of every row, so row b of "
            "one continues row b of the one before: the hidden state carries over (detached: truncated "
            "backpropagation through time)"
        )
    else:
        how = (
            f"epoch {view.epoch}, random sampling: {skip}, cuts the rest into subsequences of {steps:,} "
            f"tokens and takes {view.batch_size:,} of them at random a minibatch; the hidden state starts "
            "from zeros at each minibatch"
        )
    lines = [f"{how}; minibatches: {count}"]
    last = max((row.start + steps - 1 for rows in view.shown for row in rows[:SHOWN_ROWS]), default=0)
    width = len(f"{last:,}") * 2 + 1  # the widest span shown, "1,880–1,914", aligns the texts
    for index, rows in enumerate(view.shown, start=1):
        lines.append(
            f"minibatch {index} of {view.minibatches:,}: each row's tokens (counted from 0 in the training "
            "split), its inputs X and its targets Y (X shifted by one)"
        )
        for number, row in enumerate(rows[:SHOWN_ROWS], start=1):
            span = f"{row.start:,}–{row.start + steps - 1:,}"
            lines.append(
                f"  row {number:>2}  tokens {span:<{width}}  X {ids_to_text(row.inputs, vocab, token)!r}  "
                f"Y {ids_to_text(row.targets, vocab, token)!r}"
            )
        if view.batch_size > SHOWN_ROWS:
            lines.append(
                f"  … {view.batch_size - SHOWN_ROWS:,} more rows (--json lists every row, with token ids)"
            )
    return lines
