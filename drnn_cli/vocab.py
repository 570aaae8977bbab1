"""Tokens and the vocabulary: counting, ordering, and encoding a corpus into a compact tensor.

d2l's ``Vocab`` orders tokens by descending frequency with ties in first-seen order and puts
``<unk>`` at index 0; this one does the same, but counts and encodes characters in chunks with
tensor operations so a 100 MB file never becomes a Python list of ints.
"""

from __future__ import annotations

import codecs
import json
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

UNK = "<unk>"
_CHUNK_CHARS = 1 << 22  # 4 Mi characters: 16 MiB of UTF-32 per chunk
_DECODE_BYTES = 1 << 22  # 4 MiB of UTF-8 per decoded piece (fewer, bigger torch calls are faster)
_COUNT_CHUNK_BYTES = 1 << 26  # views, not copies: few bincount calls (each has a fixed threading cost)


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


def index_dtype(vocab_size: int) -> torch.dtype:
    """The narrowest integer dtype that holds every index: 1 byte per token for character corpora."""
    if vocab_size <= 256:
        return torch.uint8
    if vocab_size <= 2**15:
        return torch.int16
    return torch.int32


def _code_chunks(text: str) -> Iterable[torch.Tensor]:
    """Unicode code points of ``text`` a few MiB at a time: uint8 for ASCII text, else int32."""
    ascii_only = text.isascii()
    for start in range(0, len(text), _CHUNK_CHARS):
        piece = text[start : start + _CHUNK_CHARS]
        if ascii_only:
            yield torch.frombuffer(bytearray(piece.encode("ascii")), dtype=torch.uint8)
        else:
            yield torch.frombuffer(bytearray(piece.encode("utf-32-le")), dtype=torch.int32)


def count_chars(text: str) -> dict[str, int]:
    """Character frequencies in first-seen order (what ``collections.Counter(text)`` gives, fast).

    Counts are one ``bincount`` per chunk; a character's first position is ``text.find`` from the
    chunk where it first occurs, so it costs one C-level scan per distinct character.
    """
    totals: dict[int, int] = {}
    first_seen: dict[int, int] = {}
    offset = 0
    for codes in _code_chunks(text):
        counts = torch.bincount(codes)
        present = torch.nonzero(counts).flatten()
        for code, count in zip(present.tolist(), counts[present].tolist(), strict=True):
            if code not in totals:
                totals[code] = 0
                first_seen[code] = text.find(chr(code), offset)
            totals[code] += count
        offset += len(codes)
    ordered = sorted(totals, key=first_seen.__getitem__)
    return {chr(code): totals[code] for code in ordered}


def encode_chars(text: str, vocab: Vocab) -> torch.Tensor:
    """``text`` as vocabulary indices in the narrowest dtype; characters not in ``vocab`` become 0."""
    known = [(ord(token), index) for index, token in enumerate(vocab.idx_to_token) if len(token) == 1]
    largest = max([code for code, _ in known], default=0)
    lookup = torch.zeros(largest + 2, dtype=torch.int64)  # the last slot catches codes above `largest`
    for code, index in known:
        lookup[code] = index
    out = torch.empty(len(text), dtype=index_dtype(len(vocab)))
    if out.dtype == torch.uint8 and text.isascii():  # bytes.translate: a C table lookup, no int64
        table = bytes(int(lookup[min(code, largest + 1)]) for code in range(256))
        for start in range(0, len(text), _CHUNK_CHARS):
            piece = text[start : start + _CHUNK_CHARS].encode("ascii").translate(table)
            out[start : start + len(piece)] = torch.frombuffer(bytearray(piece), dtype=torch.uint8)
        return out
    offset = 0
    for codes in _code_chunks(text):
        clamped = codes.long().clamp_(max=largest + 1)  # long first: uint8 chunks cannot hold 256+
        out[offset : offset + len(codes)] = lookup[clamped].to(out.dtype)
        offset += len(codes)
    return out


def count_ascii(data: bytearray) -> dict[str, int]:
    """``count_chars`` of an ASCII text held as bytes: one ``bincount`` per chunk, no decoding."""
    totals = torch.zeros(256, dtype=torch.int64)
    for start in range(0, len(data), _COUNT_CHUNK_BYTES):
        count = min(_COUNT_CHUNK_BYTES, len(data) - start)
        totals += torch.bincount(
            torch.frombuffer(data, dtype=torch.uint8, count=count, offset=start), minlength=256
        )
    present = torch.nonzero(totals).flatten().tolist()
    first_seen = {code: data.find(bytes([code])) for code in present}  # one memchr per distinct byte
    return {chr(code): int(totals[code]) for code in sorted(present, key=first_seen.__getitem__)}


def encode_ascii_(data: bytearray, vocab: Vocab) -> torch.Tensor:
    """``encode_chars`` of an ASCII text held as bytes, written over those bytes when indices fit a byte.

    The returned uint8 tensor shares ``data``'s memory (so a 1 GiB text needs no second GiB); wider
    dtypes (a fixed vocabulary of more than 256 tokens) get a new tensor.
    """
    known = [(ord(token), index) for index, token in enumerate(vocab.idx_to_token) if len(token) == 1]
    lookup = [0] * 256  # ASCII bytes only: a code above 127 never occurs
    for code, index in known:
        if code < 256:
            lookup[code] = index
    dtype = index_dtype(len(vocab))
    if not data:
        return torch.empty(0, dtype=dtype)
    if dtype == torch.uint8:
        table = bytes(lookup)
        for start in range(0, len(data), _CHUNK_CHARS):
            data[start : start + _CHUNK_CHARS] = data[start : start + _CHUNK_CHARS].translate(table)
        return torch.frombuffer(data, dtype=torch.uint8)
    indices = torch.tensor(lookup, dtype=dtype)
    out = torch.empty(len(data), dtype=dtype)
    for start in range(0, len(data), _CHUNK_CHARS):
        count = min(_CHUNK_CHARS, len(data) - start)
        codes = torch.frombuffer(data, dtype=torch.uint8, count=count, offset=start)
        out[start : start + count] = indices[codes.long()]
    return out


def _decoded_pieces(data: bytearray) -> Iterator[str]:
    """UTF-8 ``data`` as text a few MiB at a time (a character cut by a chunk end waits in the decoder)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    with memoryview(data) as view:
        for start in range(0, len(data), _DECODE_BYTES):
            yield decoder.decode(
                view[start : start + _DECODE_BYTES], final=start + _DECODE_BYTES >= len(data)
            )


def count_utf8(data: bytearray) -> dict[str, int]:
    """``count_chars`` of a UTF-8 text held as bytes, never decoded whole."""
    totals: dict[str, int] = {}
    for piece in _decoded_pieces(data):
        for char, count in count_chars(piece).items():  # a chunk's new characters follow older ones
            totals[char] = totals.get(char, 0) + count
    return totals


def encode_utf8_(data: bytearray, vocab: Vocab, length: int) -> torch.Tensor:
    """``encode_chars`` of a UTF-8 text of ``length`` characters held as bytes.

    With a byte per index the result is written over ``data`` (``length`` ≤ its bytes, and the
    characters written never pass the bytes decoded) and shares its memory.
    """
    dtype = index_dtype(len(vocab))
    out = None if dtype == torch.uint8 else torch.empty(length, dtype=dtype)
    written = 0
    for piece in _decoded_pieces(data):
        codes = encode_chars(piece, vocab)
        if out is not None:
            out[written : written + len(codes)] = codes
        elif len(codes):
            torch.frombuffer(data, dtype=torch.uint8, count=len(codes), offset=written).copy_(codes)
        written += len(codes)
    if out is not None:
        return out
    del data[written:]
    return torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


def count_index(tokens: torch.Tensor, index: int) -> int:
    """How many of ``tokens`` are ``index``, a few Mi tokens at a time: ``(tokens == index).sum()``
    makes a bool copy and an int64 one of the whole tensor (9 bytes a token: 1.6 GB for 200 MB)."""
    return sum(
        int(torch.count_nonzero(tokens[start : start + _CHUNK_CHARS] == index))
        for start in range(0, len(tokens), _CHUNK_CHARS)
    )


def split_words(pieces: Sequence[str]) -> list[str]:
    """Word tokens: each piece (a d2l line) split on whitespace, so lines never glue words together."""
    return [word for piece in pieces for word in piece.split()]


def count_words(words: Sequence[str]) -> dict[str, int]:
    return dict(Counter(words))


def encode_words(words: Sequence[str], vocab: Vocab) -> torch.Tensor:
    lookup = vocab.token_to_idx
    return torch.tensor([lookup.get(word, 0) for word in words], dtype=index_dtype(len(vocab)))


def tokens_of(pieces: Sequence[str], token: str) -> str | list[str]:
    """The token stream: one string for characters (pieces glued), a list for words."""
    return "".join(pieces) if token == "char" else split_words(pieces)


def count_tokens(stream: str | list[str]) -> dict[str, int]:
    return count_chars(stream) if isinstance(stream, str) else count_words(stream)


def encode_tokens(stream: str | list[str], vocab: Vocab) -> torch.Tensor:
    return encode_chars(stream, vocab) if isinstance(stream, str) else encode_words(stream, vocab)


def missing_from(counts: dict[str, int], vocab: Vocab) -> Counter[str]:
    """The counted tokens the vocabulary lacks, with their counts, in ``counts``' order."""
    return Counter({token: count for token, count in counts.items() if token not in vocab})


def lacking_total(vocab: Vocab, unknown: Counter[str]) -> int:
    """How many tokens of a whole text ``vocab`` lacks: a fixed vocabulary's ``unknown`` counts, else
    (a vocabulary the text built) those ``min_freq`` cut."""
    return sum(unknown.values()) or sum(vocab.cut_counts().values())
