"""Held-out numbers: perplexity and bits per token over every token of a split, exactly once."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from drnn_cli.batches import Shard, eval_batches
from drnn_cli.models import RNNLanguageModel, detach_state, lm_log_probs, lm_loss, select_state_row
from drnn_cli.runtime import DistContext, all_reduce_sum, autocast
from drnn_cli.token_tensors import count_index


def perplexity(nll_sum: float, count: float) -> float:
    """exp(mean loss), and +inf rather than an OverflowError for a model that is far off (a NaN loss
    stays NaN: it is no perplexity, however large)."""
    mean = nll_sum / count
    return math.exp(mean) if mean < 700 or math.isnan(mean) else math.inf


@dataclass(frozen=True)
class Perplexity:
    """Summed negative log-likelihood (nats) over ``tokens`` predicted tokens; of which ``unknown``
    tokens were ``<unk>``, with ``unknown_nll`` of the sum (counted where the caller asked)."""

    nll: float
    tokens: int
    unknown_nll: float = 0.0
    unknown: int = 0
    unseen_nll: float = 0.0  # of the predictions of tokens the model never trained on (``unseen``)
    unseen: int = 0

    @property
    def perplexity(self) -> float:
        return perplexity(self.nll, self.tokens) if self.tokens else math.nan

    @property
    def known_perplexity(self) -> float:
        """Over the tokens other than ``<unk>``: a model that never saw ``<unk>`` spends 13 bits on each
        (3% of a text's tokens made its perplexity four times its figure over the rest)."""
        known = self.tokens - self.unknown
        return perplexity(self.nll - self.unknown_nll, known) if known else math.nan

    @property
    def seen_perplexity(self) -> float:
        """Over every prediction but those of tokens the training split never holds, which the vocabulary
        (the whole text's) scores as known though the model never trained on them: a trial's emoji tail,
        6.24% of a test split, read 26.49 with them and 14.89 without."""
        seen = self.tokens - self.unseen
        return perplexity(self.nll - self.unseen_nll, seen) if seen else math.nan

    @property
    def bits_per_token(self) -> float:
        return self.nll / self.tokens / math.log(2) if self.tokens else float("nan")


class EvaluationAbandoned(Exception):
    """Raised by an ``evaluate`` hook to stop before the end (a signal while training validates: the
    checkpoint is written without waiting for the rest of the split)."""


@torch.no_grad()
def evaluate(
    model: RNNLanguageModel,
    tokens: torch.Tensor,
    batch_size: int,
    num_steps: int,
    device: torch.device,
    precision: str = "fp32",
    before_batch: Callable[[int, int], None] | None = None,
    unknown_id: int | None = None,
    dist: DistContext = DistContext(),
    unseen_ids: torch.Tensor | None = None,
) -> Perplexity:
    """Predict every token after the first from all tokens before it (state carried throughout).

    The state starts at zero at the beginning of ``tokens``; dropout is off while evaluating.
    ``before_batch(done, total)`` is called before each minibatch with the targets predicted so far and
    in all (a progress bar; :class:`EvaluationAbandoned` raised there ends the evaluation).
    ``unknown_id``: also sum the loss of the targets with that id (``<unk>``'s) apart; the total is
    summed as without it, to the last bit.
    ``unseen_ids``: a boolean mask over the vocabulary; the targets it marks (tokens the training split
    never holds) are summed apart too (``Perplexity.seen_perplexity``), the total as without it.
    ``dist``: under torchrun every rank evaluates its block of the rows (``eval_batches``) and the sums
    are added up over the ranks, so each returns the job's figure, one process's to rounding, in 1/W
    of the time. ``before_batch`` then counts the job's targets, and is not called for the last row's
    tail, which one rank evaluates alone (a vote there would meet no other rank's).
    """
    was_training = model.training
    model.eval()
    # Where the text holds no <unk> (asked once, not at each minibatch: a read waits for the device)
    # nothing is scored apart; where it does, every minibatch's targets are, on the device.
    if unknown_id is not None and not count_index(tokens[1:], unknown_id):  # a few Mi tokens at a time
        unknown_id = None
    try:
        nll = torch.zeros((), dtype=torch.float64, device=device)
        unknown_nll = torch.zeros((), dtype=torch.float64, device=device)
        unknown = torch.zeros((), dtype=torch.int64, device=device)
        unseen_nll = torch.zeros((), dtype=torch.float64, device=device)
        unseen = torch.zeros((), dtype=torch.int64, device=device)
        unseen_mask = None if unseen_ids is None else unseen_ids.to(device)
        count = 0  # this rank's targets
        job_count = 0  # the job's, as every rank counts them
        state = None
        shared = dist.world_size > 1
        for batch in eval_batches(
            tokens.to(device), batch_size, num_steps, Shard(dist.rank, dist.world_size)
        ):
            if before_batch is not None and not (batch.in_tail and shared):
                before_batch(job_count, len(tokens) - 1)
            job_count += batch.job_targets
            if not len(batch.x):  # a rank with no row of a split shorter than the ranks
                continue
            if state is None:
                state = model.begin_state(batch.x.shape[0], device)
            elif batch.keep_row is not None:
                state = select_state_row(state, batch.keep_row)
            with autocast(device, precision):
                logits, state = model(batch.x, state)
            state = detach_state(state)
            count += batch.y.numel()
            if unknown_id is None and unseen_mask is None:
                nll += lm_loss(logits, batch.y, reduction="sum").double()  # half → fp32; fp64 stays
                continue
            # Targets summed apart: one log-softmax over the vocabulary for every sum (lm_loss twice, the
            # sum and each target's, took 1.4× the time at 10,000 words), each as lm_loss gives it to the bit.
            log_probs, targets = lm_log_probs(logits, batch.y)
            nll += F.nll_loss(log_probs, targets, reduction="sum").double()
            losses = -log_probs.gather(1, targets.unsqueeze(1)).squeeze(1).double()  # lm_loss's "none"
            if unknown_id is not None:
                is_unknown = targets == unknown_id
                unknown_nll += torch.where(is_unknown, losses, 0.0).sum()
                unknown += is_unknown.sum()
            if unseen_mask is not None:
                is_unseen = unseen_mask[targets]
                unseen_nll += torch.where(is_unseen, losses, 0.0).sum()
                unseen += is_unseen.sum()
        sums = torch.stack(
            [nll, unknown_nll, unknown.double(), unseen_nll, unseen.double(), nll.new_tensor(count)]
        )
        if shared:  # the job's sums: each rank's block of the rows, added up
            all_reduce_sum(sums, dist)
        total, unknown_total, unknown_count, unseen_total, unseen_count, targets_count = sums.tolist()
        return Perplexity(
            total, int(targets_count), unknown_total, int(unknown_count), unseen_total, int(unseen_count)
        )
    finally:
        model.train(was_training)
