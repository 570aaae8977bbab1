"""``drnn data --ngrams N``: the most frequent n-grams of the tokens used, counted as d2l 0.17.6 §8.3
counts them: ``collections.Counter`` of ``zip`` over the word corpus (line ends included), ties in the
order ``Counter.most_common`` gives them, the order of first occurrence (learner42)."""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path

import pytest
import torch

from drnn_cli.errors import UsageError
from drnn_cli.ngrams import count_ngrams
from drnn_cli.vocab import Vocab


def _d2l_words(corpus_path: Path) -> list[str]:
    """d2l's read_time_machine and tokenize(lines, 'word'), flattened as §8.3 flattens them."""
    lines = [re.sub("[^A-Za-z]+", " ", line).strip().lower() for line in corpus_path.read_text().splitlines()]
    return [word for line in lines for word in line.split()]


@pytest.mark.parametrize("n", [1, 2, 3])
def test_word_ngrams_are_d2ls_counters_most_common(cli, workdir: Path, corpus_path: Path, n: int):
    words = _d2l_words(corpus_path)
    reference = collections.Counter(zip(*(words[i:] for i in range(n)), strict=False))
    code, out, err = cli("data", "--set", "data.token=word", "--ngrams", str(n), "--json")
    assert code == 0, err
    counted = json.loads(out.splitlines()[-1])["ngrams"]
    assert counted["n"] == n and counted["counted"] == len(words) - n + 1
    assert counted["distinct"] == len(reference)  # d2l's len(Vocab(...)) adds its <unk>: 20,235 bigrams
    assert [(tuple(gram), count) for gram, count in counted["most_frequent"]] == reference.most_common(10)


def test_the_books_bigrams_and_trigrams_as_drnn_data_prints_them(cli, workdir: Path):
    """§8.3's printouts (the book's code on the same file): ('of', 'the') 309 first, then ('in', 'the')
    169; ('the', 'time', 'traveller') 59, ('the', 'time', 'machine') 30, ('the', 'medical', 'man') 24."""
    code, out, err = cli("data", "--set", "data.token=word", "--ngrams", "3")
    assert code == 0, err
    (line,) = [line for line in out.splitlines() if line.startswith("most frequent trigrams")]
    assert line.startswith(
        "most frequent trigrams (of 32,773 in the tokens used, 29,882 distinct): 'the time traveller' 59, "
        "'the time machine' 30, 'the medical man' 24, "
    )
    code, out, err = cli("data", "--ngrams", "2")
    (line,) = [line for line in out.splitlines() if line.startswith("most frequent bigrams")]
    assert line.startswith(
        "most frequent bigrams (of 170,579 in the tokens used, 533 distinct): 'e ' 6,037, "
    )


def test_ties_rank_by_first_occurrence_across_the_chunks_counted_apart(monkeypatch: pytest.MonkeyPatch):
    """Counted a few windows at a time (here 3), merged: counts summed, first positions kept."""
    import drnn_cli.ngrams

    monkeypatch.setattr(drnn_cli.ngrams, "_CHUNK_WINDOWS", 3)
    vocab = Vocab(["<unk>", "a", "b", "c"])
    tokens = torch.tensor([3, 3, 1, 2, 1, 2, 3, 3, 2, 1], dtype=torch.uint8)  # c c a b a b c c b a
    counted = count_ngrams(tokens, vocab, 2, 10)
    assert counted.windows == 9 and counted.distinct == 6
    # twice: c c (first at 0), a b (at 2), b a (at 3); once: c a (at 1), b c (at 5), c b (at 7)
    assert counted.most_frequent == (
        (("c", "c"), 2),
        (("a", "b"), 2),
        (("b", "a"), 2),
        (("c", "a"), 1),
        (("b", "c"), 1),
        (("c", "b"), 1),
    )
    assert count_ngrams(tokens[:1], vocab, 2, 10).most_frequent == ()


def test_an_order_whose_keys_would_overflow_is_refused_naming_the_largest_that_fits():
    vocab = Vocab(["<unk>", *(f"w{i}" for i in range(199_999))])
    with pytest.raises(UsageError) as refused:
        count_ngrams(torch.zeros(10, dtype=torch.int32), vocab, 4, 10)
    assert str(refused.value) == (
        "--ngrams 4 of a vocabulary of 200,000 tokens has more possible n-grams than drnn counts (2^62); "
        "ask for --ngrams 3 or fewer"
    )


def test_the_command_line_allows_the_orders_the_counter_takes():
    from drnn_cli.cli import MAX_NGRAM
    from drnn_cli.ngrams import MAX_N

    assert MAX_NGRAM == MAX_N
