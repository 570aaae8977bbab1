"""Zipf's law on a text's tokens, for ``drnn data --zipf``: d2l 0.17.6 §8.3 plots how often each
distinct unigram, bigram and trigram of The Time Machine occurs against its rank, on log-log axes, and
asks (its exercise 1) for the exponent α of ``n_i ∝ 1 / i^α``.

α is the slope of a least-squares line through (log rank, log count), as the book's
``log n_i = -α log i + c`` suggests, over the ranks where that line is drawn from the data and not from
the two ends the book sets aside: from rank :data:`FIT_FIRST_RANK` ("the first few words as
exceptions") to the last n-gram seen :data:`FIT_MIN_COUNT` times or more (below it the counts are a few
long plateaus of ties: thousands of words seen once share one count). Each rank i weighs its width on
the log axis, log((i + 1/2) / (i - 1/2)), about 1/i, so each decade of ranks weighs alike: unweighted,
the 900 ranks from 100 to 999 would outweigh the 90 from 10 to 99 tenfold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from drnn_cli.ngrams import counts_by_rank, largest_order
from drnn_cli.vocab import Vocab

ZIPF_ORDERS = (1, 2, 3)  # d2l's figure: unigrams, bigrams, trigrams
FIT_FIRST_RANK = 10
FIT_MIN_COUNT = 5
FIT_SPAN = 10  # the last rank fitted is at least this many times the first: a decade, or no fit
ORDER_NAMES = {1: "unigrams", 2: "bigrams", 3: "trigrams"}


@dataclass(frozen=True)
class ZipfLine:
    """One order's curve (count against rank) and its fitted exponent."""

    n: int
    counted: int  # the n-grams counted, one a position
    distinct: int
    # the curve's corners: the first and last rank of each run of equal counts, so the picture is the
    # exact staircase with two points a distinct count (a few hundred for a book) rather than one a rank
    corners: tuple[tuple[int, int], ...]
    often: int  # the n-grams seen FIT_MIN_COUNT times or more: the last rank fitted
    exponent: float | None = None  # α; None where the ranks to fit span less than FIT_SPAN
    intercept: float = 0.0  # c: the fitted log count at rank 1 (natural log)

    @property
    def name(self) -> str:
        return ORDER_NAMES.get(self.n, f"{self.n}-grams")

    @property
    def fitted(self) -> tuple[int, int] | None:
        """The first and last rank fitted; None where there was no fit."""
        return None if self.exponent is None else (FIT_FIRST_RANK, self.often)

    def fitted_count(self, rank: float) -> float:
        """The fitted line's count at ``rank``."""
        return math.exp(self.intercept - (self.exponent or 0.0) * math.log(rank))

    def summary(self) -> dict:
        return {
            "n": self.n,
            "counted": self.counted,
            "distinct": self.distinct,
            "exponent": self.exponent,
            "fitted_ranks": list(self.fitted) if self.fitted is not None else None,
        }

    def said(self) -> str:
        """``bigrams α 0.66 (ranks 10–726)``, as the line of drnn data says it."""
        if self.fitted is None:
            return (
                f"{self.name} not fitted ({self.often:,} seen {FIT_MIN_COUNT} times or more; a fit needs "
                f"{FIT_FIRST_RANK * FIT_SPAN:,})"
            )
        first, last = self.fitted
        return f"{self.name} α {self.exponent:.2f} (ranks {first:,}–{last:,})"


def zipf_line(tokens: torch.Tensor, vocab: Vocab, n: int) -> ZipfLine:
    """Order ``n``'s curve and its fit, counted as ``drnn data --ngrams n`` counts (line ends
    included)."""
    counts = counts_by_rank(tokens, vocab, n)
    distinct = len(counts)
    corners = _corners(counts)
    last = int((counts >= FIT_MIN_COUNT).sum())  # counts descend: the ranks seen often enough come first
    if last < FIT_FIRST_RANK * FIT_SPAN:
        return ZipfLine(n, int(counts.sum()), distinct, corners, last)
    ranks = torch.arange(FIT_FIRST_RANK, last + 1, dtype=torch.float64)
    # each rank weighs its width on a log axis, from i - 1/2 to i + 1/2: every decade weighs alike
    weights = torch.log((ranks + 0.5) / (ranks - 0.5))
    x = ranks.log()
    y = counts[FIT_FIRST_RANK - 1 : last].double().log()  # rank 1 is index 0
    x_mean, y_mean = (weights * x).sum() / weights.sum(), (weights * y).sum() / weights.sum()
    slope = (weights * (x - x_mean) * (y - y_mean)).sum() / (weights * (x - x_mean) ** 2).sum()
    intercept = y_mean - slope * x_mean
    exponent = round(-float(slope), 12) + 0.0  # a flat curve's -1e-32 is 0, not "-0.00"
    return ZipfLine(n, int(counts.sum()), distinct, corners, last, exponent, float(intercept))


def zipf_lines(tokens: torch.Tensor, vocab: Vocab) -> tuple[ZipfLine, ...]:
    """d2l's three orders, those a vocabulary this large lets drnn count (a vocabulary past 1.66 M
    entries, the cube root of 2^62, keys no trigram)."""
    return tuple(zipf_line(tokens, vocab, n) for n in ZIPF_ORDERS if n <= largest_order(len(vocab)))


def _corners(counts: torch.Tensor) -> tuple[tuple[int, int], ...]:
    """The first and last rank (from 1) of each run of equal counts in ``counts`` (descending), with
    the count: a staircase drawn through them is the whole curve."""
    if not len(counts):
        return ()
    values, run_lengths = torch.unique_consecutive(counts, return_counts=True)
    lasts = run_lengths.cumsum(0)
    firsts = lasts - run_lengths + 1
    corners: list[tuple[int, int]] = []
    for first, last, count in zip(firsts.tolist(), lasts.tolist(), values.tolist(), strict=True):
        corners.append((first, count))
        if last != first:
            corners.append((last, count))
    return tuple(corners)
