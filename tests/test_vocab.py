"""The vocabulary: d2l's ordering, lookups, JSON round trip, and the chunked tensor count/encode."""

from __future__ import annotations

import collections
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import pythonpath_with_repo
from hypothesis import given, settings
from hypothesis import strategies as st

from drnn_cli import token_tensors as tensors_module
from drnn_cli.token_tensors import (
    count_chars,
    count_tokens,
    encode_chars,
    encode_tokens,
    encode_words,
    index_dtype,
)
from drnn_cli.vocab import UNK, Vocab, VocabError, count_words, missing_from, split_words, tokens_of

# -------------------------------------------------------------------------------------------------
# Ordering


def test_vocab_orders_by_descending_frequency_with_ties_in_first_seen_order() -> None:
    # abracadabra: a×5, then b×2 and r×2 (b seen first), then c×1 and d×1 (c seen first)
    vocab = Vocab.from_counts(dict(collections.Counter("abracadabra")))
    assert vocab.idx_to_token == [UNK, "a", "b", "r", "c", "d"]
    assert vocab.token_freqs == [("a", 5), ("b", 2), ("r", 2), ("c", 1), ("d", 1)]
    assert [vocab[token] for token in "abrcd"] == [1, 2, 3, 4, 5]


def test_ties_follow_the_order_of_the_counts_not_the_alphabet() -> None:
    vocab = Vocab.from_counts({"z": 1, "m": 3, "a": 1, "q": 3})
    assert vocab.idx_to_token == [UNK, "m", "q", "z", "a"]


def test_unk_is_index_zero() -> None:
    vocab = Vocab.from_counts({"x": 1})
    assert vocab.idx_to_token[0] == UNK == "<unk>"
    assert vocab[UNK] == 0
    assert len(vocab) == 2


def test_reserved_tokens_come_right_after_unk() -> None:
    vocab = Vocab.from_counts(dict(collections.Counter("abracadabra")), reserved_tokens=["<pad>", "<bos>"])
    assert vocab.idx_to_token == [UNK, "<pad>", "<bos>", "a", "b", "r", "c", "d"]
    assert vocab.reserved_tokens == ["<pad>", "<bos>"]


def test_a_reserved_token_that_also_occurs_is_listed_once() -> None:
    vocab = Vocab.from_counts(dict(collections.Counter("abracadabra")), reserved_tokens=["r"])
    assert vocab.idx_to_token == [UNK, "r", "a", "b", "c", "d"]


def test_min_freq_drops_rare_tokens_which_then_map_to_unk() -> None:
    vocab = Vocab.from_counts(dict(collections.Counter("abracadabra")), min_freq=2)
    assert vocab.idx_to_token == [UNK, "a", "b", "r"]
    assert vocab["c"] == vocab["d"] == 0
    assert "c" not in vocab
    assert vocab.token_freqs[-1] == ("d", 1)  # the frequencies still list every token, like d2l's


def test_unknown_token_maps_to_zero() -> None:
    vocab = Vocab.from_counts({"a": 2, "b": 1})
    assert vocab["never seen"] == 0
    assert vocab["A"] == 0
    assert "a" in vocab
    assert "A" not in vocab


def test_to_tokens_maps_indices_back() -> None:
    vocab = Vocab.from_counts(dict(collections.Counter("abracadabra")))
    assert vocab.to_tokens([1, 2, 0, 5]) == ["a", "b", UNK, "d"]
    assert vocab.to_tokens(torch.tensor([3, 1], dtype=torch.uint8)) == ["r", "a"]
    assert vocab.to_tokens([]) == []


def test_json_round_trip_restores_the_vocabulary_identically() -> None:
    counts = {"é": 4, "日": 4, " ": 9, "<x>": 1, "a": 2}
    vocab = Vocab.from_counts(counts, min_freq=2, reserved_tokens=["<pad>"])
    restored = Vocab.from_json(vocab.to_json())
    assert restored == vocab
    assert restored.idx_to_token == [UNK, "<pad>", " ", "é", "日", "a"]
    assert restored.token_freqs == [(" ", 9), ("é", 4), ("日", 4), ("a", 2), ("<x>", 1)]
    assert restored.min_freq == 2
    assert restored.reserved_tokens == ["<pad>"]
    assert restored.token_to_idx == vocab.token_to_idx
    assert "日" in vocab.to_json()  # stored readable, not \u-escaped


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        ([UNK, " ", "e", "a", "a"], "the token 'a' is listed twice"),
        (["e", UNK, "a"], "index 0 is not <unk>"),
        ([], "index 0 is not <unk>"),
        ("<unk>ab", "its tokens are not a list of strings"),
        ([UNK, 5], "its tokens are not a list of strings"),
    ],
    ids=["duplicate", "unk-not-first", "empty", "a-string", "a-number"],
)
def test_a_stored_vocabulary_that_breaks_an_invariant_is_refused(tokens: object, message: str) -> None:
    """A tampered file: with a token listed twice, one index of the two could never be produced."""
    with pytest.raises(VocabError) as refused:
        Vocab.from_dict({"idx_to_token": tokens})
    assert str(refused.value) == message


# -------------------------------------------------------------------------------------------------
# Counting characters

# Any Unicode text (surrogates excluded: no decoded file holds them). Same alphabet as st.text(), but
# st.text()'s utf-8 codec filter costs ~5 s of set-up on a fresh Hypothesis database.
CHARACTERS = st.characters(exclude_categories=["Cs"])
UNICODE_TEXT = st.text(CHARACTERS)


@settings(max_examples=200, deadline=None)
@given(UNICODE_TEXT)
def test_count_chars_equals_counter_including_order(text: str) -> None:
    assert list(count_chars(text).items()) == list(collections.Counter(text).items())


@settings(max_examples=100, deadline=None)
@given(st.text(CHARACTERS, max_size=60))
def test_count_chars_equals_counter_across_chunk_boundaries(text: str) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tensors_module, "_CHUNK_CHARS", 7)
        assert list(count_chars(text).items()) == list(collections.Counter(text).items())


def test_count_chars_on_a_text_longer_than_many_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tensors_module, "_CHUNK_CHARS", 7)
    rng = random.Random(0)
    # rare characters first appear late, some in the middle of a chunk, some at a chunk's start
    text = "".join(rng.choice("aaaabbbcc d") for _ in range(3000))
    text = text[:700] + "é" + text[700:1400] + "日" + text[1400:] + "\U0001f600"
    assert len(text) > 7 * 400
    assert list(count_chars(text).items()) == list(collections.Counter(text).items())


def test_count_chars_of_the_empty_text_is_empty() -> None:
    assert count_chars("") == {}


# -------------------------------------------------------------------------------------------------
# Encoding characters


@settings(max_examples=100, deadline=None)
@given(UNICODE_TEXT, UNICODE_TEXT)
def test_encode_chars_equals_looking_up_every_character(vocab_text: str, other: str) -> None:
    vocab = Vocab.from_counts(dict(collections.Counter(vocab_text)))
    text = other + vocab_text[::-1] + other  # known and (mostly) unknown characters mixed
    encoded = encode_chars(text, vocab)
    assert encoded.dtype == index_dtype(len(vocab))
    assert encoded.tolist() == [vocab[c] for c in text]


@settings(max_examples=100, deadline=None)
@given(
    st.text(CHARACTERS, max_size=40),
    st.text(CHARACTERS, max_size=60),
)
def test_encode_chars_equals_looking_up_every_character_across_chunk_boundaries(
    vocab_text: str, other: str
) -> None:
    vocab = Vocab.from_counts(dict(collections.Counter(vocab_text)))
    text = other + vocab_text[::-1] + other
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tensors_module, "_CHUNK_CHARS", 7)
        assert encode_chars(text, vocab).tolist() == [vocab[c] for c in text]


def test_characters_not_in_the_vocabulary_become_zero() -> None:
    vocab = Vocab.from_counts({"b": 3, "c": 2, "a": 1}, reserved_tokens=["<pad>"])
    # 'z' is above every known code, '\x00' and ' ' below, 'é' far above; '<pad>' is no character
    assert encode_chars("abz\x00c é<", vocab).tolist() == [4, 2, 0, 0, 3, 0, 0, 0]


def test_encode_chars_with_no_single_character_tokens_is_all_unk() -> None:
    vocab = Vocab.from_counts({"the": 3, "cat": 1})
    assert encode_chars("the cat", vocab).tolist() == [0] * 7


def test_encode_chars_of_the_empty_text_is_empty() -> None:
    vocab = Vocab.from_counts({"a": 1})
    encoded = encode_chars("", vocab)
    assert encoded.shape == (0,)


@pytest.mark.parametrize(
    ("size", "dtype"),
    [
        (1, torch.uint8),
        (28, torch.uint8),
        (256, torch.uint8),
        (257, torch.int16),
        (32_768, torch.int16),
        (32_769, torch.int32),
        (1_000_000, torch.int32),
    ],
)
def test_index_dtype_is_the_narrowest_that_holds_every_index(size: int, dtype: torch.dtype) -> None:
    assert index_dtype(size) == dtype
    assert torch.iinfo(dtype).max >= size - 1


def _big_char_vocab(n_chars: int) -> Vocab:
    # supplementary-plane characters: no surrogates, all distinct; frequencies keep them in this order
    return Vocab.from_counts({chr(0x10000 + i): n_chars - i for i in range(n_chars)})


def test_encode_chars_uses_int16_above_256_tokens() -> None:
    vocab = _big_char_vocab(299)
    assert len(vocab) == 300
    text = "".join(vocab.idx_to_token[i] for i in (1, 255, 256, 299)) + "a"
    encoded = encode_chars(text, vocab)
    assert encoded.dtype == torch.int16
    assert encoded.tolist() == [1, 255, 256, 299, 0]


def test_encode_chars_uses_int32_above_32768_tokens() -> None:
    vocab = _big_char_vocab(40_000)
    text = "".join(vocab.idx_to_token[i] for i in (1, 32_767, 32_768, 40_000)) + "a"
    encoded = encode_chars(text, vocab)
    assert encoded.dtype == torch.int32
    assert encoded.tolist() == [1, 32_767, 32_768, 40_000, 0]


# -------------------------------------------------------------------------------------------------
# Words


def test_split_words_never_glues_words_across_lines() -> None:
    pieces = ["the time", "machine by h g wells", "", "", "i"]
    assert split_words(pieces) == ["the", "time", "machine", "by", "h", "g", "wells", "i"]
    assert tokens_of(pieces, "char") == "the timemachine by h g wellsi"  # characters do glue
    assert tokens_of(pieces, "word") == split_words(pieces)


def test_split_words_splits_on_any_whitespace() -> None:
    assert split_words(["  a\tb  c\n", "d"]) == ["a", "b", "c", "d"]
    assert split_words([]) == []


def test_encode_words_looks_up_every_word_and_unknown_words_become_zero() -> None:
    words = ["the", "cat", "sat", "on", "the", "mat", "the", "cat"]
    vocab = Vocab.from_counts(count_words(words), min_freq=2)
    assert vocab.idx_to_token == [UNK, "the", "cat"]
    encoded = encode_words(["the", "dog", "cat", "the"], vocab)
    assert encoded.dtype == torch.uint8
    assert encoded.tolist() == [1, 0, 2, 1]
    assert encode_tokens(["cat", "mat"], vocab).tolist() == [2, 0]


def test_count_words_is_in_first_seen_order() -> None:
    assert list(count_words(["b", "a", "b", "c"]).items()) == [("b", 2), ("a", 1), ("c", 1)]
    assert count_tokens(["b", "a", "b"]) == {"b": 2, "a": 1}
    assert list(count_tokens("hello").items()) == [("h", 1), ("e", 1), ("l", 2), ("o", 1)]


def test_missing_from_counts_exactly_what_the_vocabulary_lacks() -> None:
    vocab = Vocab.from_counts(count_chars("hello"))
    missing = missing_from(count_tokens("hello world"), vocab)
    assert missing == collections.Counter({" ": 1, "w": 1, "r": 1, "d": 1})
    assert list(missing) == [" ", "w", "r", "d"]  # first-seen order
    assert missing_from(count_tokens("hello"), vocab) == collections.Counter()

    words = Vocab.from_counts(count_words(["the", "cat", "the", "dog"]), min_freq=2)
    stream = ["the", "cat", "sat", "the", "sat", "mat"]
    assert missing_from(count_tokens(stream), words) == collections.Counter({"cat": 1, "sat": 2, "mat": 1})


def test_counting_unknown_tokens_holds_no_copy_of_the_corpus(tmp_path):
    """``(tokens == unk).sum()`` held a bool and an int64 copy of every token: a min_freq run on a 200 MB
    text peaked at 2.09 GB (0.46 GB without min_freq); ``eval --data`` and ``--init-from`` count the same
    way. Run in a fresh process, whose peak RSS is this count's alone once the tokens exist."""
    grown_kib = _peak_growth_kib(
        "tokens = torch.zeros(1 << 26, dtype=torch.uint8); tokens[::2] = 1\n"
        "config = Config.model_validate({'data': {'min_freq': 2}})\n"
        "vocab = Vocab(['<unk>', 'a'], [('a', 1 << 25), ('b', 1 << 25)], min_freq=2)  # b cut, as built\n"
        "dataset = Dataset(vocab, tokens, split_tokens(tokens, 0, 0), Path('t.txt'), '', len(tokens))\n"
        "before = peak()\n"
        "notes = data_notes(config, dataset, torch.device('cpu'))\n"
        "assert any('50% of the training tokens' in note for note in notes), notes\n"
        "print(peak() - before)\n"
    )
    assert grown_kib < 32 * 1024, f"counting 64 Mi tokens grew the peak by {grown_kib // 1024} MiB"


def test_counting_held_out_tokens_the_training_split_lacks_holds_no_copy_of_the_corpus():
    """The training split's counts, which the held-out splits are checked against, come from bincount a
    chunk at a time: one ``bincount`` of a 64 Mi-token text widens it to int64 whole (512 MiB)."""
    grown_kib = _peak_growth_kib(
        "tokens = torch.ones(1 << 26, dtype=torch.uint8); tokens[-999::3] = 2  # 333 test predictions\n"
        "config = Config.model_validate({'data': {'val_fraction': 0.1, 'test_fraction': 0.1}})\n"
        "vocab = Vocab(['<unk>', 'a', 'b'])\n"
        "dataset = Dataset(vocab, tokens, split_tokens(tokens, 0.1, 0.1), Path('t.txt'), '', len(tokens))\n"
        "before = peak()\n"
        "notes = data_notes(config, dataset, torch.device('cpu'))\n"
        "assert notes[0].startswith('333 of the 6,710,885 test predictions (under 0.01%)'), notes\n"
        "print(peak() - before)\n"
    )
    assert grown_kib < 32 * 1024, f"counting 64 Mi tokens grew the peak by {grown_kib // 1024} MiB"


def _peak_growth_kib(body: str) -> int:
    """What ``body`` prints last (a growth of the peak RSS in KiB), run in a fresh process, whose peak is
    then its own work's once its tokens exist; skipped where there is no /proc."""
    if not Path("/proc/self/status").exists():
        pytest.skip("no /proc/self/status here")
    script = (
        "from pathlib import Path\n"
        "import torch\n"
        "from drnn_cli.batches import split_tokens\n"
        "from drnn_cli.config import Config\n"
        "from drnn_cli.data import Dataset\n"
        "from drnn_cli.run_notes import data_notes\n"
        "from drnn_cli.vocab import Vocab\n"
        "def peak():\n"
        "    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:'))\n"
        + body
    )
    env = {**os.environ, "PYTHONPATH": pythonpath_with_repo(), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=False
    )
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])
