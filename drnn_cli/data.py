"""The data stage as one call: config → corpus file → tokens → vocabulary → encoded splits."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from drnn_cli.batches import Splits, split_tokens
from drnn_cli.config import DataConfig
from drnn_cli.corpus import (
    char_stream_bytes,
    preprocess,
    read_text,
    read_token_stream,
    same_text_sha1s,
)
from drnn_cli.download import CorpusFile, ProgressHook, fetch_corpus, file_sha1
from drnn_cli.errors import DrnnError
from drnn_cli.files import FileIdentity, file_identity, require_regular_file
from drnn_cli.text_vocab import build_vocab, no_tokens
from drnn_cli.token_cache import EncodedCorpus, as_fixed, corpus_sha1s, load_cached, store
from drnn_cli.token_tensors import (
    count_ascii,
    count_ids,
    count_index,
    count_tokens,
    count_utf8,
    encode_ascii_,
    encode_tokens,
    encode_utf8_,
    index_dtype,
)
from drnn_cli.vocab import UNK, Vocab, lacking_total, missing_from, split_words


@dataclass(frozen=True)
class UnseenInTraining:
    """The predictions of a held-out split whose token the training split never holds: the vocabulary is
    the whole text's (README "Your own text, and held-out numbers that mean something"), so they are
    scored as known tokens the model never trained on."""

    count: int
    predictions: int  # the split's targets: every token after its first
    commonest: tuple[str, ...]  # the commonest few such tokens, commonest first
    kinds: int  # how many distinct tokens they are


def unseen_among(targets: torch.Tensor, unseen: torch.Tensor, vocab: Vocab, few: int = 3) -> UnseenInTraining:
    """How many of ``targets`` are ids the boolean mask ``unseen`` marks (a training split's unheld ids,
    ``Dataset.unseen_ids``, or those a checkpoint records: ``untrained_mask``), and the ``few``
    commonest of them."""
    counts = count_ids(targets, len(vocab))
    counts[~unseen] = 0
    present = torch.nonzero(counts).flatten()
    order = present[counts[present].argsort(descending=True, stable=True)][:few].tolist()
    return UnseenInTraining(
        count=int(counts.sum()),
        predictions=len(targets),
        commonest=tuple(vocab.idx_to_token[i] for i in order),
        kinds=len(present),
    )


def untrained_mask(untrained_ids: tuple[int, ...], vocab_size: int) -> torch.Tensor:
    """``Checkpoint.untrained_ids`` as a boolean mask over the vocabulary (``<unk>`` never in it)."""
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    mask[list(untrained_ids)] = True
    return mask


@dataclass(frozen=True)
class Dataset:
    """An encoded corpus with its vocabulary and splits; ``tokens`` is after ``max_tokens``."""

    vocab: Vocab
    tokens: torch.Tensor
    splits: Splits
    path: Path
    sha1: str
    total_tokens: int  # before max_tokens
    unknown: Counter[str] = field(default_factory=Counter)  # tokens a fixed vocabulary lacked → <unk>
    notes: tuple[str, ...] = ()  # said once: a download it made, a token cache it cannot write
    lacking_at: torch.Tensor | None = None  # EncodedCorpus.lacking_at: positions in the whole text
    text_sha1: str | None = None  # CorpusSha1s.text: the text as read, whichever line breaks its file writes

    def file_bytes(self) -> int | None:
        """The text file's size now, or None where it cannot be read."""
        try:
            return self.path.stat().st_size
        except OSError:
            return None

    @property
    def capped(self) -> bool:
        """Whether ``data.max_tokens`` kept only part of the text (then raising it is a way to more)."""
        return len(self.tokens) < self.total_tokens

    @property
    def unknown_count(self) -> int:
        """How many tokens of the text the vocabulary lacked (read as <unk>)."""
        return sum(self.unknown.values())

    def lacking_in(self, start: int = 0, stop: int | None = None) -> int:
        """How many of the tokens used from ``start`` to ``stop`` (all by default; a split's
        :meth:`Splits.span`) the vocabulary lacks: a fixed vocabulary's (fine-tuning) or those
        ``data.min_freq`` cut. Exact, where id 0 is also a literal ``<unk>`` a word text writes itself
        (Penn Treebank's convention), which no vocabulary lacks: the encoding kept where the lacking lie."""
        stop = len(self.tokens) if stop is None else min(stop, len(self.tokens))
        if start >= stop or not lacking_total(self.vocab, self.unknown):  # nothing to count, or to look for
            return 0
        if self.lacking_at is None:  # id 0 is what the vocabulary lacks, and nothing else
            return count_index(self.tokens[start:stop], self.vocab[UNK])
        below = torch.searchsorted(self.lacking_at, torch.tensor([start, stop]))
        return int(below[1] - below[0])

    @cached_property
    def _training_counts(self) -> torch.Tensor:
        """How often each id occurs in the training split (counted once: both held-out splits read it)."""
        return count_ids(self.splits.train, len(self.vocab))

    def unseen_ids(self) -> torch.Tensor:
        """A boolean mask over the vocabulary: the ids the training split never holds, ``<unk>`` left out
        (as :meth:`unseen_in_training` counts them), for ``evaluate`` to sum apart."""
        unseen = self._training_counts == 0
        unseen[self.vocab[UNK]] = False
        return unseen

    def unseen_in_training(self, split: str, few: int = 3) -> UnseenInTraining:
        """How many of ``split``'s predictions (its tokens after the first) are ids the training split
        never holds, and the ``few`` commonest of them. ``<unk>`` is left out: what the vocabulary lacks
        is counted as unknown (:meth:`lacking_in`), and a text's own ``<unk>`` is no new token."""
        start, stop = self.splits.span(split)
        return unseen_among(self.tokens[start + 1 : stop], self.unseen_ids(), self.vocab, few)

    def summary(self) -> dict:
        """The ``drnn data --json`` object (README "Commands": `drnn data`)."""
        return {
            "corpus_tokens": len(self.tokens),
            "total_tokens": self.total_tokens,
            "vocab_size": len(self.vocab),
            "idx_to_token": self.vocab.idx_to_token,
            "train_tokens": len(self.splits.train),
            "val_tokens": len(self.splits.val),
            "test_tokens": len(self.splits.test),
            # where each split starts: a token index in the corpus after data.max_tokens
            **{f"{name}_start": self.splits.span(name)[0] for name in ("train", "val", "test")},
            "val_unseen_in_training": self.unseen_in_training("val").count,
            "test_unseen_in_training": self.unseen_in_training("test").count,
            "path": str(self.path.absolute()),  # absolute, as every path --json prints
            "sha1": self.sha1,
        }


def resolve_corpus_file(config: DataConfig, progress: ProgressHook | None = None) -> CorpusFile:
    """The local file behind ``data.path`` or ``data.corpus`` (downloaded and verified if needed) with
    its SHA-1s, and what identified the file when it was hashed (see :func:`check_unchanged`)."""
    if config.file is not None:
        path = config.file
        require_regular_file(path, "corpus file", "fix data.path: it must name a UTF-8 text file")
        identity = file_identity(path)  # before hashing: a change during the hash changes it
        return CorpusFile(path, corpus_sha1s(path), identity)
    return fetch_corpus(config.corpus, progress=progress)  # hashed as it was checked


def check_unchanged(path: Path, sha1: str, hashed: FileIdentity) -> None:
    """Refuse a text that changed between its hashing and its reading (a re-export, an rsync or a
    ``git checkout`` landing as a run starts): its tokens would be recorded, and cached, under the
    SHA-1 of another text. A file whose identity moved is hashed again, so that the same bytes put
    back in its place (another process's download of the corpus, a ``touch``, a ``chmod``) pass."""
    if file_identity(path) != hashed and file_sha1(path) != sha1:
        raise DrnnError(
            f"corpus file {path} changed while drnn read it; run again once it is written in full"
        )


class CorpusMismatch(DrnnError):
    """The corpus file is not the text a checkpoint was trained on (its SHA-1 differs)."""

    def __init__(self, path: Path, expected: str, actual: str) -> None:
        super().__init__(
            f"{path} is not the text the checkpoint was trained on (SHA-1 {expected}, this file {actual})"
        )


def load_dataset(
    config: DataConfig,
    vocab: Vocab | None = None,
    progress: ProgressHook | None = None,
    *,
    expected_sha1: str | None = None,
    expected_text_sha1: str | None = None,
) -> Dataset:
    """Read, preprocess, tokenize and encode the corpus of ``config``.

    Like d2l, the vocabulary is built from the whole text and ``max_tokens`` then keeps the first
    tokens. Pass ``vocab`` to encode with a fixed vocabulary (evaluation, fine-tuning) instead.
    A big text's encoding is kept in the token cache and memory-mapped the next time.
    ``expected_sha1`` and ``expected_text_sha1``: the file a checkpoint was trained on and its text as
    read (resuming, evaluating a split); another text raises :class:`CorpusMismatch` before anything is
    read further or cached. Other bytes are the same text where their text's SHA-1 is the checkpoint's,
    whatever line breaks either file writes; a checkpoint that records none (written before drnn did)
    takes four forms of this file's text (:func:`same_text_sha1s`).
    """
    located = resolve_corpus_file(config, progress)
    path, sha1s, sha1, hashed = located.path, located.sha1s, located.sha1, located.identity
    notes: tuple[str, ...] = (located.download_note,) if located.download_note else ()
    if expected_sha1 and sha1 != expected_sha1:  # other bytes: the same text written otherwise, or refused
        if expected_text_sha1:
            same_text = sha1s.text == expected_text_sha1
        else:
            same_text = expected_sha1 in same_text_sha1s(path)
        if not same_text:
            raise CorpusMismatch(path, expected_sha1, sha1)
        notes = (
            *notes,
            f"{path} differs from the text the checkpoint was trained on only in how its line breaks are "
            "written or in a byte order mark, which drnn reads alike",
        )
    corpus = load_cached(path, sha1, config, vocab)
    if corpus is None:
        corpus = _encode(path, config, vocab)
        check_unchanged(path, sha1, hashed)  # the bytes encoded are the bytes hashed, or nothing is kept
        # A fixed vocabulary that is the text's own comes back as the built one: it is kept under the
        # text's own key, which a plain build (and every later fixed one) finds, not as a second copy.
        text_built = corpus.vocab is not vocab
        not_kept = store(path, sha1, config, None if text_built else vocab, corpus)
        notes = (*notes, not_kept) if not_kept else notes
        if vocab is not None and text_built:
            corpus = as_fixed(corpus, vocab)
    encoded = corpus.tokens
    total = len(encoded)
    if config.max_tokens > 0:
        encoded = encoded[: config.max_tokens].clone()
    splits = split_tokens(encoded, config.val_fraction, config.test_fraction)
    return Dataset(
        corpus.vocab, encoded, splits, path, sha1, total, corpus.unknown, notes, corpus.lacking_at, sha1s.text
    )


def load_same_corpus(
    data: DataConfig,
    vocab: Vocab | None,
    action: str,
    fix: str,
    progress: ProgressHook | None = None,
    *,
    expected_sha1: str | None,
    expected_text_sha1: str | None,
) -> Dataset:
    """The dataset, refused (before it is encoded) unless it is the text the checkpoint was trained
    on: splits are positions in a file, and in another file they mean other text."""
    try:
        return load_dataset(
            data, vocab, progress, expected_sha1=expected_sha1, expected_text_sha1=expected_text_sha1
        )
    except CorpusMismatch as mismatch:
        raise DrnnError(f"cannot {action}: {mismatch}; {fix}") from None


def encode_text(path: Path, config: DataConfig, vocab: Vocab, what: str) -> torch.Tensor:
    """Another text (``drnn eval --data``) read as ``config`` reads its corpus and encoded with ``vocab``;
    errors name the file as ``what``. Characters go through the file's own buffer, as a corpus does: a
    ``str`` of a non-ASCII text holds 4 bytes a character (a 100 MB text peaked at 1.36 GB this way)."""
    if config.token == "word":
        return _encoded_words(read_text(path, what), config.preprocess, vocab)[0]
    chars = char_stream_bytes(path, config.preprocess, what)
    if chars is None:
        return encode_tokens(read_token_stream(path, config, what), vocab)
    if not chars:
        return torch.empty(0, dtype=index_dtype(len(vocab)))
    return _encode_bytes(path, config, vocab, chars).tokens


def _encode(path: Path, config: DataConfig, vocab: Vocab | None) -> EncodedCorpus:
    if config.token == "word":
        return _encode_words(path, config, vocab)
    chars = char_stream_bytes(path, config.preprocess)
    if chars is not None:
        return _encode_bytes(path, config, vocab, chars)
    stream = read_token_stream(path, config)
    if len(stream) == 0:
        raise no_tokens(path, config)
    vocab, unknown = _vocabulary(count_tokens(stream), path, config, vocab)
    return EncodedCorpus(vocab, encode_tokens(stream, vocab), unknown)


_WORD_CHUNK_CHARS = 1 << 21  # 2 Mi characters per step of the word path
_WORD_BREAK = re.compile("[ \n]")


def _word_chunks(text: str, mode: str) -> Iterator[list[str]]:
    """The words of ``text``, preprocessed, a few MiB at a time, each chunk ending at a space or a line
    break. No preprocessing lets a word span one (d2l's strips a line's ends, which a word split drops
    anyway), so each chunk splits as the whole text would; a list of every word of the text at once
    held a str object per word, about 18 bytes of memory a byte of text, as did one long line when
    chunks ended at line breaks only."""
    start = 0
    while start < len(text):
        found = _WORD_BREAK.search(text, start + _WORD_CHUNK_CHARS)
        end = len(text) if found is None else found.end()
        yield split_words(preprocess(text[start:end], mode))
        start = end


def _encoded_words(
    text: str, mode: str, vocab: Vocab, mark_lacking: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The words of ``text`` as ids, and with ``mark_lacking`` the positions of those ``vocab`` lacks
    (``EncodedCorpus.lacking_at``): looked up as -1, where the text's own ``<unk>`` is 0."""
    lookup, dtype = vocab.token_to_idx, index_dtype(len(vocab))
    pieces, lacking, offset = [], [], 0
    for words in _word_chunks(text, mode):
        if not mark_lacking:
            pieces.append(torch.tensor([lookup.get(word, 0) for word in words], dtype=dtype))
            continue
        ids = torch.tensor([lookup.get(word, -1) for word in words], dtype=torch.int32)
        absent = ids < 0
        lacking.append(torch.nonzero(absent).flatten() + offset)
        pieces.append(ids.masked_fill_(absent, 0).to(dtype))
        offset += len(ids)
    tokens = torch.cat(pieces) if pieces else torch.empty(0, dtype=dtype)
    if not mark_lacking:
        return tokens, None
    return tokens, torch.cat(lacking) if lacking else torch.empty(0, dtype=torch.int64)


def _encode_words(path: Path, config: DataConfig, vocab: Vocab | None) -> EncodedCorpus:
    """``_encode`` of a word text: counted, then encoded, a chunk of lines at a time."""
    text = read_text(path)
    counts: Counter[str] = Counter()
    for words in _word_chunks(text, config.preprocess):
        counts.update(words)  # new words enter in first-seen order, which ties in the vocabulary keep
    if not counts:
        raise no_tokens(path, config)
    vocab, unknown = _vocabulary(dict(counts), path, config, vocab)
    # a text that writes <unk> itself: id 0 alone cannot tell the words the vocabulary lacks from it
    tokens, lacking_at = _encoded_words(text, config.preprocess, vocab, mark_lacking=UNK in counts)
    return EncodedCorpus(vocab, tokens, unknown, lacking_at)


def _encode_bytes(path: Path, config: DataConfig, vocab: Vocab | None, chars: bytearray) -> EncodedCorpus:
    """``_encode`` of a character stream held as UTF-8 bytes: encoded in place, no ``str`` of the text."""
    if not chars:
        raise no_tokens(path, config)
    ascii_only = chars.isascii()
    counts = count_ascii(chars) if ascii_only else count_utf8(chars)
    vocab, unknown = _vocabulary(counts, path, config, vocab)
    if ascii_only:
        return EncodedCorpus(vocab, encode_ascii_(chars, vocab), unknown)
    return EncodedCorpus(vocab, encode_utf8_(chars, vocab, sum(counts.values())), unknown)


def _vocabulary(
    counts: dict[str, int], path: Path, config: DataConfig, fixed: Vocab | None
) -> tuple[Vocab, Counter[str]]:
    """The vocabulary a text is encoded with, and the tokens it lacks with their counts: the text's
    own, built with ``min_freq`` (lacking none), or a fixed one (fine-tuning, ``drnn eval``). A fixed
    vocabulary that is the one the text builds is returned as the built one, with its counts: the
    caller keeps the encoding as the text's own (``counts`` iterate in first-seen order, which breaks
    ties in the built vocabulary, so the comparison needs them)."""
    if fixed is not None:
        built = Vocab.from_counts(counts, min_freq=config.min_freq)
        if built.idx_to_token != fixed.idx_to_token:
            return fixed, missing_from(counts, fixed)
        return built, Counter()
    return build_vocab(counts, path, config), Counter()
