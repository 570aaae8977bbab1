"""``drnn data --zipf OUT.png``: d2l 0.17.6 §8.3's figure (unigram, bigram and trigram counts against
rank, log-log) and its exercise 1, the exponent α of ``n_i ∝ 1/i^α`` for each, fitted by least squares
on (log rank, log count) from rank 10 to the last n-gram seen 5 times, at ranks even in log rank."""

from __future__ import annotations

import collections
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from drnn_cli.vocab import Vocab
from drnn_cli.zipf import ZipfLine, _corners, zipf_line

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _tokens_with_counts(counts: list[int]) -> tuple[torch.Tensor, Vocab]:
    """A text in which token i + 1 occurs counts[i] times (index 0 is <unk>, never used)."""
    vocab = Vocab(["<unk>", *(f"w{i}" for i in range(len(counts)))])
    tokens = torch.repeat_interleave(torch.arange(1, len(counts) + 1), torch.tensor(counts))
    return tokens, vocab


def test_an_exact_power_law_is_fitted_to_its_exponent():
    """Counts round(10^5 / i^0.8) for 2,000 ranks (the smallest 229: every rank seen 5 times or more):
    α = 0.8 over ranks 10 to 2,000, and the line passes through rank 1 at 10^5."""
    counts = [round(1e5 / rank**0.8) for rank in range(1, 2_001)]
    tokens, vocab = _tokens_with_counts(counts)
    line = zipf_line(tokens, vocab, 1)
    assert (line.distinct, line.counted, line.often, line.fitted) == (2_000, sum(counts), 2_000, (10, 2_000))
    assert line.exponent == pytest.approx(0.8, abs=1e-4)
    assert line.fitted_count(1) == pytest.approx(1e5, rel=1e-3)
    assert line.said() == "unigrams α 0.80 (ranks 10–2,000)"


def test_the_fit_ends_at_the_last_ngram_seen_five_times_and_ignores_the_plateaus_below():
    """1/i counts to rank 200 (5 at rank 200), then 1,000 tokens seen once: the fit stops at rank 200
    and still reads α = 1, where a fit through the plateau would flatten it."""
    counts = [round(1_000 / rank) for rank in range(1, 201)] + [1] * 1_000
    tokens, vocab = _tokens_with_counts(counts)
    line = zipf_line(tokens, vocab, 1)
    assert line.often == 200 and line.fitted == (10, 200)
    assert line.exponent == pytest.approx(1.0, abs=0.01)


def test_each_decade_of_ranks_weighs_alike_in_the_fit():
    """Counts 10^5/i to rank 99, then 10^7/i^2 to rank 1,000 (the two meet at rank 100): slope 1 over
    the first decade fitted, 2 over the second. Each decade weighing alike, α is their mean, 1.5 (on a
    continuous axis exactly; 1.49 in whole ranks); weighing each rank alike, the 900 ranks of the second
    decade would pull it to 1.9."""
    counts = [round(1e5 / rank) if rank < 100 else round(1e7 / rank**2) for rank in range(1, 1_001)]
    tokens, vocab = _tokens_with_counts(counts)
    line = zipf_line(tokens, vocab, 1)
    assert line.fitted == (10, 1_000)
    assert line.exponent == pytest.approx(1.5, abs=0.01)


def test_a_flat_curve_has_exponent_zero_not_minus_zero():
    tokens, vocab = _tokens_with_counts([5] * 200)
    line = zipf_line(tokens, vocab, 1)
    assert line.exponent == 0.0 and line.said() == "unigrams α 0.00 (ranks 10–200)"


def test_fewer_than_a_hundred_ngrams_seen_five_times_are_not_fitted():
    """Ranks 10 to 99 are less than a decade: no exponent, and the line says why."""
    tokens, vocab = _tokens_with_counts([5] * 99 + [4] * 50)
    line = zipf_line(tokens, vocab, 1)
    assert (line.exponent, line.fitted, line.often) == (None, None, 99)
    assert line.said() == "unigrams not fitted (99 seen 5 times or more; a fit needs 100)"
    assert line.summary() == {"n": 1, "counted": 695, "distinct": 149, "exponent": None, "fitted_ranks": None}


def test_the_curve_is_drawn_through_the_ends_of_each_run_of_equal_counts():
    """Counts by rank 5, 3, 3, 3, 1: the staircase's corners, two for a run, one for a single rank."""
    assert _corners(torch.tensor([5, 3, 3, 3, 1])) == ((1, 5), (2, 3), (4, 3), (5, 1))
    assert _corners(torch.tensor([], dtype=torch.int64)) == ()


def test_bigrams_are_counted_over_consecutive_tokens():
    """'abab a': a-b twice, b-a twice... each distinct bigram counted once per position (5 windows)."""
    vocab = Vocab(["<unk>", "a", "b"])
    line = zipf_line(torch.tensor([1, 2, 1, 2, 1, 1]), vocab, 2)
    # (a, b) at 0 and 2, (b, a) at 1 and 3, (a, a) at 4
    assert (line.counted, line.distinct, line.corners) == (5, 3, ((1, 2), (2, 2), (3, 1)))


def test_d2ls_time_machine_words_follow_zipf_with_smaller_exponents_for_longer_ngrams(
    cli, workdir: Path, corpus_path: Path
):
    """The book's figure, fitted: unigrams α 0.99, bigrams 0.65, trigrams 0.38 ("sequences of words
    also appear to be following Zipf's law, albeit with a smaller exponent"), each order's distinct
    n-grams as many as d2l's Counter finds."""
    lines = [
        "".join(c if c.isalpha() else " " for c in line).strip().lower()
        for line in corpus_path.read_text().splitlines()
    ]
    words = [word for line in lines for word in line.split()]
    code, out, err = cli("data", "--set", "data.token=word", "--zipf", "zipf.png", "--json")
    assert code == 0, err
    fits = json.loads(out.splitlines()[-1])["zipf"]
    for fit, n in zip(fits, (1, 2, 3), strict=True):
        reference = collections.Counter(zip(*(words[i:] for i in range(n)), strict=False))
        assert (fit["n"], fit["counted"], fit["distinct"]) == (n, len(words) - n + 1, len(reference))
        # the last rank fitted: the n-grams d2l's Counter finds 5 times or more
        assert fit["fitted_ranks"] == [10, sum(count >= 5 for count in reference.values())]
    assert [round(fit["exponent"], 2) for fit in fits] == [0.99, 0.65, 0.38]
    assert [fit["fitted_ranks"] for fit in fits] == [[10, 824], [10, 726], [10, 150]]
    assert (workdir / "zipf.png").read_bytes().startswith(PNG_MAGIC)
    code, out, err = cli("data", "--set", "data.token=word", "--zipf", "again.png")
    assert code == 0, err
    assert (
        "Zipf's law, count ∝ 1/rank^α: unigrams α 0.99 (ranks 10–824); bigrams α 0.65 (ranks 10–726); "
        "trigrams α 0.38 (ranks 10–150); wrote again.png"
    ) in out.splitlines()


def test_tokens_pooled_into_unk_are_said_to_be_counted_as_one(cli, workdir: Path):
    """data.min_freq 3 reads 12% of the words as <unk>, one token whose n-grams move the exponents
    (bigrams 0.65 → 0.78): the line says so, and how to count the text's own words."""
    code, out, err = cli("data", "--set", "data.token=word", "--set", "data.min_freq=3", "--zipf", "z.png")
    assert code == 0, err
    (line,) = [line for line in out.splitlines() if line.startswith("Zipf's law")]
    assert line.endswith(
        "trigrams α 0.61 (ranks 10–372) (the 12% of tokens read as <unk> counted as one token; data.min_freq "
        "0 counts them); wrote z.png"
    ), line


def test_characters_are_too_few_for_a_unigram_fit(cli, workdir: Path):
    """The Time Machine's 27 characters (d2l's preprocessing): their curve is drawn, not fitted."""
    code, out, err = cli("data", "--zipf", "chars.png", "--json")
    assert code == 0, err
    unigrams = json.loads(out.splitlines()[-1])["zipf"][0]
    assert unigrams == {"n": 1, "counted": 170_580, "distinct": 27, "exponent": None, "fitted_ranks": None}


def test_the_figure_has_one_curve_an_order_and_a_dashed_line_a_fit():
    pytest.importorskip("matplotlib")
    from drnn_cli.zipf_plot import zipf_figure

    fitted = ZipfLine(2, 10, 4, ((1, 5), (4, 1)), 120, 0.5, math.log(5.0))
    unfitted = ZipfLine(1, 11, 3, ((1, 9), (3, 1)), 1)
    axes = zipf_figure((unfitted, fitted), "t").axes[0]
    drawn = [(line.get_label(), line.get_linestyle()) for line in axes.get_lines()]
    assert drawn == [
        ("unigrams, 3 distinct: not fitted", "-"),
        ("bigrams, 4 distinct: α = 0.50 (dashed)", "-"),
        ("_child2", "--"),  # the fit: rank 10 to 120, 5/√i
    ]
    dashed = axes.get_lines()[2]
    assert list(dashed.get_xdata()) == [10, 120]
    assert list(dashed.get_ydata()) == pytest.approx([5 / math.sqrt(10), 5 / math.sqrt(120)])
    assert (axes.get_xscale(), axes.get_yscale()) == ("log", "log")


@pytest.mark.parametrize(
    ("name", "code", "message"),
    [
        ("zipf.svg", 2, "--zipf writes a PNG image, not SVG; name it so, e.g. zipf.png"),
        (
            "missing/zipf.png",
            1,
            "--zipf missing/zipf.png: the folder missing does not exist; create it first",
        ),
        (
            "",
            2,
            "--zipf is empty; give it a file to write, e.g. --zipf zipf.png (an empty one would read as the "
            "current directory)",
        ),
    ],
)
def test_a_zipf_file_that_cannot_be_written_is_refused_before_the_text_is_read(
    cli, workdir: Path, name: str, code: int, message: str
):
    """The data.path that does not exist is not reached: the output is checked first."""
    assert cli("data", "--set", "data.path=nowhere.txt", "--zipf", name) == (
        code,
        "",
        f"drnn: error: {message}\n",
    )


def test_zipf_never_replaces_what_the_command_reads_and_proposes_a_name_of_its_own(cli, workdir: Path):
    """``--zipf`` given the previous argument by a slip replaced the corpus (or the config) with a PNG
    (rev43); a folder, or a run's own file, is answered with a zipf.png to write instead."""
    text = workdir / "mine.txt"
    text.write_text((workdir / "data" / "timemachine.txt").read_text()[:20_000])
    config = workdir / "cfg.yaml"
    config.write_text("data:\n  path: mine.txt\n")
    before = text.read_bytes(), config.read_bytes()
    refused = {
        ("--set", "data.path=mine.txt", "--zipf", "mine.txt"): (
            2,
            "--zipf mine.txt is the text drnn data reads; give --zipf a file of its own",
        ),
        ("--config", "cfg.yaml", "--zipf", "cfg.yaml"): (
            2,
            "--zipf cfg.yaml is the config file --config reads; give --zipf a file of its own",
        ),
        ("--zipf", "data"): (1, "--zipf data is a directory; name a file in it, e.g. data/zipf.png"),
    }
    for args, (code, message) in refused.items():
        assert cli("data", *args) == (code, "", f"drnn: error: {message}\n"), args
    assert (text.read_bytes(), config.read_bytes()) == before
    code, _, err = cli("train", "--config", "cfg.yaml", "--set", "train.epochs=1", "--run", "runs/r")
    assert code == 0, err
    # a checkpoint --init-from reads (a copy outside its run), the cached corpus, and a link to it
    checkpoint = workdir / "base.safetensors"
    checkpoint.write_bytes((workdir / "runs" / "r" / "last.safetensors").read_bytes())
    (workdir / "link.png").symlink_to(workdir / "data" / "timemachine.txt")
    corpus = (workdir / "data" / "timemachine.txt").read_bytes()
    for args, message in (
        (
            ("--init-from", "base.safetensors", "--zipf", "base.safetensors"),
            "is the checkpoint --init-from reads",
        ),
        (("--zipf", "data/timemachine.txt"), "is the text drnn data reads"),
        (("--zipf", "link.png"), "is the text drnn data reads"),
    ):
        code, out, err = cli("data", *args)
        assert (code, out) == (2, "") and message in err and err.count("\n") == 1, (args, err)
    assert (workdir / "data" / "timemachine.txt").read_bytes() == corpus
    assert checkpoint.read_bytes() == (workdir / "runs" / "r" / "last.safetensors").read_bytes()
    marker = (workdir / "runs" / "latest").read_bytes()  # predict and eval read it: never a PNG (rev43b)
    assert cli("data", "--zipf", "runs/latest") == (
        2,
        "",
        "drnn: error: --zipf runs/latest is the marker of the latest run, which predict and eval read; give "
        "--zipf a file of its own, e.g. zipf.png\n",
    )
    assert (workdir / "runs" / "latest").read_bytes() == marker
    code, out, err = cli("data", "--zipf", "runs/r/perplexity.png")
    assert (code, out) == (1, "") and err.endswith("give --zipf a name of its own, e.g. runs/r/zipf.png\n"), (
        err
    )


def test_zipf_without_matplotlib_is_refused_in_one_line_before_the_text_is_read(
    cli, workdir: Path, monkeypatch: pytest.MonkeyPatch
):
    for module in ("matplotlib", "matplotlib.figure"):  # importing either now raises ImportError
        monkeypatch.setitem(sys.modules, module, None)
    code, _, err = cli("data", "--set", "data.path=nowhere.txt", "--zipf", "zipf.png")
    assert code == 1 and err.startswith("drnn: error: --zipf needs matplotlib") and err.count("\n") == 1
    assert not (workdir / "zipf.png").exists()


def test_a_vocabulary_too_large_for_trigram_keys_draws_unigrams_and_bigrams_and_says_so(
    cli, workdir: Path, monkeypatch: pytest.MonkeyPatch
):
    """n-grams are keyed as one int64 (ngrams.py): with keys capped at 2^25, the 4,580 words key
    bigrams (21 M) but not trigrams (96 G), as 1.7 M words would not key trigrams in 2^62."""
    import drnn_cli.ngrams

    monkeypatch.setattr(drnn_cli.ngrams, "_LARGEST_KEY", 1 << 25)
    code, out, err = cli("data", "--set", "data.token=word", "--zipf", "zipf.png")
    assert code == 0, err
    assert (
        "Zipf's law, count ∝ 1/rank^α: unigrams α 0.99 (ranks 10–824); bigrams α 0.65 (ranks 10–726) (no "
        "longer n-grams: a vocabulary of 4,580 has too many to count); wrote zipf.png"
    ) in out.splitlines()


@pytest.mark.parametrize("n", [1, 2, 3])
def test_counts_kept_in_a_bin_for_each_possible_ngram_equal_counts_of_the_sorted_keys(
    corpus_path: Path, monkeypatch: pytest.MonkeyPatch, n: int
):
    """A small vocabulary's n-grams are counted in one bin each (28^3 = 21,952 for characters), a large
    one's by sorting their keys: the two give the same counts."""
    import drnn_cli.ngrams
    from drnn_cli.ngrams import counts_by_rank

    text = corpus_path.read_text()[:50_000]
    vocab = Vocab(["<unk>", *sorted(set(text))])
    tokens = torch.tensor([vocab[char] for char in text])
    dense = counts_by_rank(tokens, vocab, n)
    monkeypatch.setattr(drnn_cli.ngrams, "_DENSE_KEYS", 0)
    assert torch.equal(dense, counts_by_rank(tokens, vocab, n))
    assert int(dense.sum()) == len(text) - n + 1 and dense.tolist() == sorted(dense.tolist(), reverse=True)
