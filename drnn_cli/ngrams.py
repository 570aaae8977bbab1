"""The most frequent n-grams of a text's tokens, for ``drnn data --ngrams N``: d2l 0.17.6 §8.3 counts
word bigrams and trigrams of The Time Machine (``collections.Counter`` over ``zip`` of the corpus, line
ends included) to show Zipf's law beyond single words.

Counted on the token ids a few million windows at a time: each n-gram is one integer key (its ids as
the digits of a number in base ``len(vocab)``), so a 100 MB text needs no Python tuple per window.
Ties are ranked by first occurrence, as ``Counter.most_common`` ranks them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from drnn_cli.decode import join_tokens
from drnn_cli.errors import UsageError
from drnn_cli.vocab import Vocab

MAX_N = 5
# windows keyed per pass: an int64 key and an int64 position each, 64 MiB a pass
_CHUNK_WINDOWS = 1 << 22
_LARGEST_KEY = 1 << 62  # keys below it, and their sums, stay inside int64
_DENSE_KEYS = 1 << 22  # n-grams possible up to which counts_by_rank keeps a bin for each (32 MiB)


@dataclass(frozen=True)
class NgramCounts:
    n: int
    windows: int  # the n-grams counted: one per position, len(tokens) - n + 1
    distinct: int
    most_frequent: tuple[tuple[tuple[str, ...], int], ...]

    def summary(self) -> dict:
        return {
            "n": self.n,
            "counted": self.windows,
            "distinct": self.distinct,
            "most_frequent": [[list(gram), count] for gram, count in self.most_frequent],
        }

    def line(self, token: str) -> str:
        """``most frequent bigrams (…): 'of the' 309, …`` as drnn data prints it."""
        name = {1: "tokens", 2: "bigrams", 3: "trigrams"}.get(self.n, f"{self.n}-grams")
        shown = ", ".join(
            f"{join_tokens(list(gram), token)!r} {count:,}" for gram, count in self.most_frequent
        )
        shown = shown or f"none (the tokens used are fewer than {self.n})"
        return f"most frequent {name} (of {self.windows:,} in the tokens used, {self.distinct:,} distinct): {shown}"


def count_ngrams(tokens: torch.Tensor, vocab: Vocab, n: int, top: int) -> NgramCounts:
    """The ``top`` most frequent ``n``-grams of ``tokens`` (ids of ``vocab``), ties in order of first
    occurrence."""
    size = len(vocab)
    check_order(n, size)
    windows = max(0, len(tokens) - n + 1)
    unique, count, first = _keyed_counts(tokens, size, n)
    if not len(unique):
        return NgramCounts(n, 0, 0, ())
    by_first = torch.argsort(first)
    ranked = by_first[torch.argsort(count[by_first], descending=True, stable=True)][:top]
    most = []
    for index in ranked.tolist():
        number, ids = int(unique[index]), []
        for _ in range(n):  # the key's digits, the last id first
            number, last = divmod(number, size)
            ids.append(last)
        most.append((tuple(vocab.idx_to_token[i] for i in reversed(ids)), int(count[index])))
    return NgramCounts(n, windows, len(unique), tuple(most))


def counts_by_rank(tokens: torch.Tensor, vocab: Vocab, n: int) -> torch.Tensor:
    """How often each distinct ``n``-gram of ``tokens`` occurs, most frequent first (int64): the curve
    of Zipf's law (d2l §8.3's figure)."""
    size = len(vocab)
    check_order(n, size)
    if size**n > _DENSE_KEYS:
        _, count, _ = _keyed_counts(tokens, size, n)
    else:  # a bin for each possible n-gram: 3-10 times faster than sorting the keys (20 M tokens)
        count = torch.zeros(size**n, dtype=torch.int64)
        for _, key in _window_keys(tokens, size, n):
            count += torch.bincount(key, minlength=size**n)
        count = count[count > 0]
    return count.sort(descending=True).values


def check_order(n: int, size: int) -> None:
    """Refuse an order drnn cannot count: below 1, past :data:`MAX_N`, or one whose n-grams of a
    vocabulary of ``size`` would not fit the int64 key."""
    if not 1 <= n <= MAX_N:
        raise UsageError(f"--ngrams takes 1 to {MAX_N}, not {n}")
    if size**n >= _LARGEST_KEY:
        raise UsageError(
            f"--ngrams {n} of a vocabulary of {size:,} tokens has more possible n-grams than drnn counts "
            f"(2^62); ask for --ngrams {largest_order(size)} or fewer"
        )


def _keyed_counts(tokens: torch.Tensor, size: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every distinct ``n``-gram of ``tokens`` as its key, with its count and the position where it
    first occurs (three int64 tensors, keys ascending)."""
    keys, counts, firsts = [], [], []
    for start, key in _window_keys(tokens, size, n):
        unique, inverse, count = torch.unique(key, return_inverse=True, return_counts=True)
        positions = torch.arange(start, start + len(key), dtype=torch.int64)
        keys.append(unique)
        counts.append(count)
        firsts.append(_smallest_by(inverse, positions, len(unique)))
    if not keys:
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, empty, empty
    # the chunks merged: a key's count summed, its first position the smallest
    unique, inverse = torch.unique(torch.cat(keys), return_inverse=True)
    count = torch.zeros(len(unique), dtype=torch.int64).scatter_add_(0, inverse, torch.cat(counts))
    return unique, count, _smallest_by(inverse, torch.cat(firsts), len(unique))


def _window_keys(tokens: torch.Tensor, size: int, n: int) -> Iterator[tuple[int, torch.Tensor]]:
    """The key of each ``n``-token window of ``tokens``, a chunk of windows at a time, with the position
    of the chunk's first window."""
    windows = max(0, len(tokens) - n + 1)
    for start in range(0, windows, _CHUNK_WINDOWS):
        stop = min(windows, start + _CHUNK_WINDOWS)
        key = torch.zeros(stop - start, dtype=torch.int64)
        for offset in range(n):  # the n ids of each window as the digits of one number
            key = key * size + tokens[start + offset : stop + offset].long()
        yield start, key


def _smallest_by(groups: torch.Tensor, values: torch.Tensor, size: int) -> torch.Tensor:
    """The smallest of ``values`` in each of ``size`` groups (``groups[i]`` is value i's)."""
    largest = torch.iinfo(torch.int64).max
    return torch.full((size,), largest, dtype=torch.int64).scatter_reduce_(0, groups, values, "amin")


def largest_order(size: int) -> int:
    """The largest n whose n-grams of a vocabulary of ``size`` drnn counts (at least 1)."""
    n = 1
    while size ** (n + 1) < _LARGEST_KEY and n < MAX_N:
        n += 1
    return n
