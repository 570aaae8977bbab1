"""Tokens and the vocabulary: d2l's ``Vocab``, which orders tokens by descending frequency with ties
in first-seen order and puts ``<unk>`` at index 0, and the token streams it is built from.

No torch here: ``drnn presets`` builds a corpus's vocabulary to size its presets' models without it.
Counting a big text fast and encoding it into a tensor: :mod:`drnn_cli.token_tensors`.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

UNK = "<unk>"


@dataclass
class Vocab:
    """Token ↔ index maps; ``<unk>`` is index 0 and unknown tokens map to it."""

    idx_to_token: list[str]
    token_freqs: list[tuple[str, int]] = field(default_factory=list)
    min_freq: int = 0
    reserved_tokens: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.token_to_idx = {token: index for index, token in enumerate(self.idx_to_token)}

    @classmethod
    def from_counts(
        cls, counts: dict[str, int], min_freq: int = 0, reserved_tokens: Sequence[str] = ()
    ) -> Vocab:
        """``counts`` must iterate in first-seen order; the stable sort keeps that order for ties."""
        token_freqs = sorted(counts.items(), key=lambda item: item[1], reverse=True)
        idx_to_token = [UNK, *reserved_tokens]
        seen = set(idx_to_token)
        for token, freq in token_freqs:
            if freq < min_freq:
                break
            if token not in seen:
                idx_to_token.append(token)
                seen.add(token)
        return cls(idx_to_token, token_freqs, min_freq, list(reserved_tokens))

    def __len__(self) -> int:
        return len(self.idx_to_token)

    def __getitem__(self, token: str) -> int:
        return self.token_to_idx.get(token, 0)

    def __contains__(self, token: object) -> bool:
        return token in self.token_to_idx

    def to_tokens(self, indices: Iterable[int]) -> list[str]:
        return [self.idx_to_token[int(index)] for index in indices]

    def cut_counts(self) -> Counter[str]:
        """The text's tokens ``min_freq`` left out, with their counts over the whole text (none for a
        vocabulary stored without counts, as a checkpoint's is)."""
        return Counter({token: count for token, count in self.token_freqs if token not in self})

    def tokens_dict(self) -> dict:
        """What a model needs of its vocabulary: the tokens in index order (checkpoints). The counts of
        every token of the text, the cut ones included, stay with the text's token cache."""
        return {
            "idx_to_token": self.idx_to_token,
            "min_freq": self.min_freq,
            "reserved_tokens": self.reserved_tokens,
        }

    def to_dict(self) -> dict:
        return {
            "idx_to_token": self.idx_to_token,
            "token_freqs": [[token, freq] for token, freq in self.token_freqs],
            "min_freq": self.min_freq,
            "reserved_tokens": self.reserved_tokens,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Vocab:
        """A stored vocabulary (checkpoint, token cache), checked: a tampered one must not load.

        A token listed twice would map to one index only, so the text could never produce the other
        and perplexities would be computed over a different vocabulary than the model's.
        """
        check_tokens(data["idx_to_token"])
        return cls(
            idx_to_token=list(data["idx_to_token"]),
            token_freqs=[(str(token), int(freq)) for token, freq in data.get("token_freqs", [])],
            min_freq=int(data.get("min_freq", 0)),
            reserved_tokens=list(data.get("reserved_tokens", [])),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> Vocab:
        return cls.from_dict(json.loads(text))


class VocabError(ValueError):
    """A stored vocabulary that breaks an invariant of ``Vocab``; the message says which."""


def check_tokens(tokens: object) -> None:
    """Raise :class:`VocabError` unless ``tokens`` is a list of distinct strings with ``<unk>`` first."""
    if not isinstance(tokens, list) or not all(isinstance(token, str) for token in tokens):
        raise VocabError("its tokens are not a list of strings")
    if not tokens or tokens[0] != UNK:
        raise VocabError(f"index 0 is not {UNK}")
    if len(set(tokens)) != len(tokens):
        twice = next(token for token, count in Counter(tokens).items() if count > 1)
        raise VocabError(f"the token {twice[:20]!r} is listed twice")


def check_char_tokens(tokens: Sequence[str]) -> None:
    """Raise :class:`VocabError` unless every token but ``<unk>`` is one character, as a character
    corpus makes them: what reads a character vocabulary may rely on it."""
    longer = next((token for token in tokens[1:] if len(token) != 1), None)
    if longer is not None:
        raise VocabError(f"the character vocabulary holds {longer[:20]!r}, not one character")


def split_words(pieces: Sequence[str]) -> list[str]:
    """Word tokens: each piece (a d2l line) split on whitespace, so lines never glue words together."""
    return [word for piece in pieces for word in piece.split()]


def count_words(words: Sequence[str]) -> dict[str, int]:
    return dict(Counter(words))


def tokens_of(pieces: Sequence[str], token: str) -> str | list[str]:
    """The token stream: one string for characters (pieces glued), a list for words."""
    return "".join(pieces) if token == "char" else split_words(pieces)


def missing_from(counts: dict[str, int], vocab: Vocab) -> Counter[str]:
    """The counted tokens the vocabulary lacks, with their counts, in ``counts``' order."""
    return Counter({token: count for token, count in counts.items() if token not in vocab})


def lacking_total(vocab: Vocab, unknown: Counter[str]) -> int:
    """How many tokens of a whole text ``vocab`` lacks: a fixed vocabulary's ``unknown`` counts, else
    (a vocabulary the text built) those ``min_freq`` cut."""
    return sum(unknown.values()) or sum(vocab.cut_counts().values())
