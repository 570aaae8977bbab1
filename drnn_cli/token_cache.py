"""The token cache: a big corpus is read, preprocessed, counted and encoded once, then memory-mapped.

An entry is keyed by the text's SHA-1, ``data.preprocess``, ``data.token`` and the vocabulary (the one
built with ``data.min_freq``, or a fixed one from a checkpoint), so changing any of them builds a new
entry. It lives in ``$DRNN_CACHE_DIR``, else ``$DRNN_DATA_DIR/token-cache/`` when that is set, else in
``.drnn-cache/`` beside the text, as two files: ``NAME.tokens`` (the raw index array, then, for a word text
that writes ``<unk>`` itself, the int64 positions of the words its vocabulary lacks) and ``NAME.json`` (dtype,
length, vocabulary, how many positions follow, the largest id, and the tokens file's identity: inode, size,
modification and change times), each written
to a temporary file and renamed, the JSON last, so a reader never sees half an entry. A tokens file that is
not the one its JSON describes (rewritten, or swapped in from another entry) is rebuilt from the text; the
ids are checked against the vocabulary when written, so a reload maps the file without reading it.
Texts under ``MIN_CACHED_BYTES`` are not cached: they encode faster than a cache would help.
Deleting the directory is always safe.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from drnn_cli.config import DataConfig
from drnn_cli.corpus import CorpusSha1s, hash_corpus
from drnn_cli.download import DATA_DIR_ENV
from drnn_cli.errors import DrnnError
from drnn_cli.files import (
    TEMPORARY_SUFFIX,
    atomic_write_text,
    file_identity,
    partial_path,
    read_own_file,
    remove_abandoned_temporaries,
    remove_dead_partials,
)
from drnn_cli.strict_json import escape_surrogates
from drnn_cli.vocab import Vocab, lacking_total

# 2: a UTF-8 byte order mark at the start is no longer a token; 3: the positions of the words a vocabulary
# lacks follow the tokens of a text that writes <unk> itself (a format-2 entry has none: rebuilt, then deleted)
FORMAT = 3
MIN_CACHED_BYTES = 1 << 20
RACY_SECONDS = 2.0  # a file modified this close to its hashing may change again within one mtime tick
_DTYPES = {"uint8": torch.uint8, "int16": torch.int16, "int32": torch.int32}
_WRITE_CHUNK = 1 << 22  # bytes per write: the array is never copied whole (4 MiB at a time)
# What a cache file drnn wrote can hold (anything larger in its place is not drnn's): a hash stamp is a
# few numbers; an entry's JSON a vocabulary and unknown counts, at most this or 16 bytes a byte of its
# text (_entry_max_bytes).
STAMP_MAX_BYTES = 1 << 16
ENTRY_MAX_BYTES = 1 << 28
ENTRY_NAME = re.compile(r".*-[0-9a-f]{20}\.json", re.DOTALL)  # _paths' names
SHA1_HEX = re.compile(r"[0-9a-f]{40}")  # a SHA-1 as hexdigest() writes it: a stamp's other values are no hash
ABANDONED_AFTER_S = 3600.0  # an entry's JSON or a hash stamp's temporary this old was a killed writer's


@dataclass(frozen=True)
class EncodedCorpus:
    """All tokens of a text (before ``max_tokens``) with the vocabulary that encoded them."""

    vocab: Vocab
    tokens: torch.Tensor
    unknown: Counter[str]
    # Where a word text writes <unk> itself, id 0 is also that word: the sorted positions of the tokens the
    # vocabulary lacks (int64). None where id 0 is exactly those.
    lacking_at: torch.Tensor | None = None


CACHE_DIR_ENV = "DRNN_CACHE_DIR"  # the token cache's own folder, apart from a (shared) corpus folder


def cache_dir(text: Path) -> Path:
    """``$DRNN_CACHE_DIR``; else ``$DRNN_DATA_DIR/token-cache``; else ``.drnn-cache`` beside the text."""
    own = os.environ.get(CACHE_DIR_ENV)
    if own:
        return Path(own)
    root = os.environ.get(DATA_DIR_ENV)
    return Path(root) / "token-cache" if root else text.resolve().parent / ".drnn-cache"


def wants_cache(text: Path) -> bool:
    try:
        return text.stat().st_size >= MIN_CACHED_BYTES
    except OSError:
        return False


def corpus_sha1s(text: Path) -> CorpusSha1s:
    """The file's SHA-1s, remembered by (size, mtime) for cached texts so a reuse does not rehash 1 GB.

    A remembered hash is trusted only if the file was last modified well before it was hashed, so
    a rewrite within one mtime tick of the hashing cannot hide behind an unchanged timestamp. A stamp
    an earlier drnn wrote holds no ``text_sha1``: the file is hashed again.
    """
    if not wants_cache(text):
        return hash_corpus(text)
    identity = file_identity(text)
    stamp = cache_dir(text) / f"{_name_part(text)}-{_digest(str(text.resolve()))[:16]}.sha1"
    known = _read_json(stamp, STAMP_MAX_BYTES)
    with contextlib.suppress(KeyError, TypeError):
        remembered = CorpusSha1s(known["sha1"], known["text_sha1"])
        if (
            all(known[name] == value for name, value in identity.items())
            and known["hashed_at_ns"] - identity["mtime_ns"] > RACY_SECONDS * 1e9
            and all(isinstance(sha1, str) and SHA1_HEX.fullmatch(sha1) for sha1 in remembered)
        ):
            return remembered
    hashed_at = time.time_ns()
    sha1s = hash_corpus(text)
    _try_write(
        stamp, json.dumps(identity | {"hashed_at_ns": hashed_at, "sha1": sha1s.file, "text_sha1": sha1s.text})
    )
    return sha1s


def _entry_max_bytes(text: Path) -> int:
    """The most an entry's JSON for ``text`` can hold: its vocabulary and unknown counts list each
    token type of the text at most twice, in a few bytes more than the type takes in the text."""
    try:
        return max(ENTRY_MAX_BYTES, 16 * text.stat().st_size)
    except OSError:
        return ENTRY_MAX_BYTES


def _read_json(path: Path, max_bytes: int) -> Any:
    """A cache file's JSON, or None when it is missing or is not one drnn wrote (not a regular file,
    too large, not JSON, nested past Python's recursion limit): the caller builds its file again."""
    try:
        return json.loads(read_own_file(path, max_bytes).decode("utf-8"))
    except (OSError, ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None


def _digest(text: str) -> str:
    # surrogateescape: a path that is not UTF-8 hashes as its bytes (any other text as before)
    return hashlib.sha1(text.encode("utf-8", "surrogateescape")).hexdigest()


def _key(sha1: str, config: DataConfig, vocab: Vocab | None) -> dict[str, object]:
    return {
        "format": FORMAT,
        "sha1": sha1,
        "preprocess": config.preprocess,
        "token": config.token,
        "vocab": _digest(vocab.to_json()) if vocab is not None else f"built, min_freq {config.min_freq}",
    }


def _paths(text: Path, key: dict[str, object]) -> tuple[Path, Path]:
    name = f"{_name_part(text)}-{_digest(json.dumps(key, sort_keys=True))[:20]}"
    directory = cache_dir(text)
    return directory / f"{name}.tokens", directory / f"{name}.json"


def load_cached(text: Path, sha1: str, config: DataConfig, vocab: Vocab | None) -> EncodedCorpus | None:
    """The cached encoding of ``text`` for these keys, memory-mapped; None when there is none.

    A fixed vocabulary (``--resume``, ``drnn eval``) that is the one the text itself builds with this
    ``min_freq`` reuses that entry: the encoding is the same, and the tokens ``min_freq`` cut (whose
    counts the built vocabulary keeps) are the unknown ones.
    """
    if not wants_cache(text):
        return None
    remove_dead_partials(cache_dir(text), ".*.tokens.*.part")  # a killed writer's, as big as its text
    for written in ("json", "sha1"):  # atomic_write_text's temporaries: an entry's JSON, corpus_sha1s's stamp
        remove_abandoned_temporaries(cache_dir(text), f".*.{written}.*{TEMPORARY_SUFFIX}", ABANDONED_AFTER_S)
    found = _load_entry(text, _key(sha1, config, vocab))
    if found is not None and vocab is not None and found.vocab.idx_to_token != vocab.idx_to_token:
        found = None  # an entry keyed by this vocabulary that holds another was tampered with: rebuilt
    if found is None and vocab is not None:
        built = _load_entry(text, _key(sha1, config, None))
        if built is not None and built.vocab.idx_to_token == vocab.idx_to_token:
            return as_fixed(built, vocab)
    return found


def as_fixed(built: EncodedCorpus, vocab: Vocab) -> EncodedCorpus:
    """The text's own encoding read with ``vocab``, a fixed vocabulary that is the built one (a
    checkpoint's, stored without counts): the tokens ``min_freq`` cut are the unknown ones."""
    return EncodedCorpus(vocab, built.tokens, built.vocab.cut_counts(), built.lacking_at)


def _load_entry(text: Path, key: dict[str, object]) -> EncodedCorpus | None:
    tokens_path, meta_path = _paths(text, key)
    try:
        meta = _read_json(meta_path, _entry_max_bytes(text))
        dtype = _DTYPES[meta["dtype"]]
        length = int(meta["length"])
        lacking = meta["lacking"]
        if lacking is not None and (type(lacking) is not int or lacking < 0):
            return None
        size = length * dtype.itemsize + 8 * (lacking or 0)
        if meta["key"] != key or tokens_path.stat().st_size != size:
            return None
        identity = file_identity(tokens_path)
        if meta["tokens_file"] != identity:
            return None  # rewritten since the entry was stored, or another entry's file moved here
        vocab = Vocab.from_dict(meta["vocab"])  # refuses a vocabulary with a token listed twice
        unknown = meta["unknown"]
        largest = meta["largest_id"]
        if type(largest) is not int or largest >= len(vocab) or not _is_count_map(unknown):
            return None  # an id past the vocabulary would fail mid-training, or at ``drnn eval``
        if time.time_ns() - identity["mtime_ns"] < RACY_SECONDS * 1e9 and not _ids_below(
            tokens_path, dtype, length, len(vocab)
        ):
            return None  # rewritten within one timestamp tick of its storing, where its identity is the same
        lacking_at = None
        if lacking is not None:
            lacking_at = _read_positions(tokens_path, length * dtype.itemsize, lacking)
            if not _positions_fit(lacking_at, length, lacking_total(vocab, Counter(unknown))):
                return None  # a count that is not the text's lacking tokens would be said as if it were
        # shared=False maps the file copy-on-write: nothing is read until training reads it.
        tokens = torch.from_file(str(tokens_path), shared=False, size=length, dtype=dtype)
        return EncodedCorpus(vocab, tokens, Counter(unknown), lacking_at)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError):
        return None


def _read_positions(path: Path, offset: int, count: int) -> torch.Tensor:
    """The ``count`` int64 positions that follow the tokens in an entry's file (read, not mapped: a
    count is a search through them all)."""
    buffer = bytearray(8 * count)
    with path.open("rb", buffering=0) as handle, memoryview(buffer) as view:
        handle.seek(offset)
        got = 0
        while got < len(buffer) and (read := handle.readinto(view[got:])):
            got += read
    if got < len(buffer):
        raise OSError(f"{path} is shorter than its entry says")
    return torch.frombuffer(buffer, dtype=torch.int64) if count else torch.empty(0, dtype=torch.int64)


def _positions_fit(positions: torch.Tensor, length: int, lacking: int) -> bool:
    """Whether stored positions can be the lacking tokens' of a text of ``length`` tokens that lacks
    ``lacking``: as many, increasing, each inside the text (a search through others counts nonsense)."""
    if len(positions) != lacking:
        return False
    if not lacking:
        return True
    return (
        bool(positions[0] >= 0)
        and bool(positions[-1] < length)
        and bool(torch.all(positions[1:] > positions[:-1]))
    )


def _ids_below(path: Path, dtype: torch.dtype, length: int, vocab_size: int) -> bool:
    """Whether every one of the ``length`` ids the file starts with indexes the vocabulary, read a few MiB
    at a time (not mapped: the pages read would stay in this process's resident memory)."""
    buffer, left = bytearray(_WRITE_CHUNK), length * dtype.itemsize
    with path.open("rb", buffering=0) as handle, memoryview(buffer) as view:
        while left and (got := handle.readinto(view[: min(left, len(buffer))])):
            left -= got
            ids = torch.frombuffer(buffer, dtype=dtype, count=got // dtype.itemsize)
            low, high = torch.aminmax(ids)
            if int(low) < 0 or int(high) >= vocab_size:
                return False
    return True


def _largest_id(tokens: torch.Tensor) -> int | None:
    """The largest id, -1 when there is none; None when one is negative (no encoding writes that)."""
    if len(tokens) == 0:
        return -1
    low, high = torch.aminmax(tokens)
    return int(high) if int(low) >= 0 else None


def _is_count_map(unknown: object) -> bool:
    """Whether ``unknown`` maps tokens to counts (``--init-from`` sums them to judge the unknown share)."""
    return isinstance(unknown, dict) and all(type(count) is int and count >= 0 for count in unknown.values())


def store(
    text: Path, sha1: str, config: DataConfig, fixed_vocab: Vocab | None, corpus: EncodedCorpus
) -> str | None:
    """Keep ``corpus`` for the next run. A cache that cannot be written is skipped, never fatal: the
    returned note says so (each run would otherwise read and encode a big text again without a word)."""
    if not wants_cache(text):
        return None
    key = _key(sha1, config, fixed_vocab)
    tokens_path, meta_path = _paths(text, key)
    dtype = next(name for name, value in _DTYPES.items() if value == corpus.tokens.dtype)
    largest = _largest_id(corpus.tokens)
    if largest is None or largest >= len(corpus.vocab):
        return None  # ids the vocabulary cannot index (a bug): not kept, and the command goes on
    resolved = str(text.resolve())
    meta = {
        "key": key,
        "text": resolved,
        "host": socket.gethostname(),  # a shared cache folder: another machine's file at the same path
        "dtype": dtype,
        "length": len(corpus.tokens),
        "vocab": corpus.vocab.to_dict(),
        "unknown": dict(corpus.unknown),
        "lacking": None if corpus.lacking_at is None else len(corpus.lacking_at),
        "largest_id": largest,
    }
    try:
        tokens_path.parent.mkdir(parents=True, exist_ok=True)
        _write_tensors(
            tokens_path, corpus.tokens, *([] if corpus.lacking_at is None else [corpus.lacking_at])
        )
        meta["tokens_file"] = file_identity(tokens_path)
        # last: it marks the entry whole (a text's name that is not UTF-8 escaped, and read back as it was)
        atomic_write_text(meta_path, escape_surrogates(json.dumps(meta, ensure_ascii=False)))
    except (OSError, DrnnError) as error:
        with contextlib.suppress(OSError):
            tokens_path.unlink(missing_ok=True)  # as large as the text, and no entry without its JSON
        in_the_way = next((p for p in (tokens_path, meta_path) if p.is_dir() and not p.is_symlink()), None)
        if in_the_way is not None:  # the folder is writable: what blocks the entry is this folder
            return (
                f"the token cache cannot keep this text: {in_the_way} is a folder, where its entry goes; "
                "remove it, or this text is read and encoded again on every run"
            )
        return (
            f"the token cache in {tokens_path.parent} cannot be written ({_reason(error, tokens_path.parent)}): "
            f"this text is read and encoded again on every run (set {CACHE_DIR_ENV} to a writable folder)"
        )
    _remove_older_versions(meta_path.parent, resolved, sha1)
    return None


def _reason(error: OSError | DrnnError, directory: Path) -> str:
    """Why the cache could not be written: a file where its folder should be, named as that (mkdir
    says "File exists" or "Not a directory"), else the OS's words (atomic_write_text's DrnnError
    carries them in the OSError it was raised from)."""
    in_the_way = next(  # os.path's: Path.exists raises PermissionError, which this is not to end on
        (p for p in (directory, *directory.parents) if os.path.exists(p) and not os.path.isdir(p)), None
    )
    if in_the_way is not None:
        return f"{in_the_way} is a file, not a folder"
    cause = error if isinstance(error, OSError) else error.__context__
    return cause.strerror if isinstance(cause, OSError) and cause.strerror else str(error)


def _remove_older_versions(directory: Path, text: str, sha1: str) -> None:
    """Delete the entries of this file's earlier contents, and those an earlier drnn wrote in an earlier
    format: each edit of a big text (or update of drnn) would otherwise leave an entry as large as the
    text for good. (A process still training from one keeps its
    mapping: the file goes once it is closed.) Only this machine's: machines sharing a cache folder
    (``DRNN_DATA_DIR`` on a network drive) may each have a different file at the same path."""
    host, limit = socket.gethostname(), _entry_max_bytes(Path(text))
    for meta_path in directory.glob("*.json"):
        if not ENTRY_NAME.fullmatch(meta_path.name):
            continue  # not an entry's name: not drnn's to read or delete
        try:
            meta = _read_json(meta_path, limit)
            # another machine's text at that path is not this one's past (entries before hosts: this one's)
            older = (
                meta["text"] == text
                and meta.get("host", host) == host
                and (meta["key"]["sha1"] != sha1 or meta["key"]["format"] < FORMAT)
            )
        except (KeyError, TypeError):
            continue  # not an entry this version reads: left alone
        if older:
            with contextlib.suppress(OSError):
                meta_path.unlink()  # first: without its JSON the tokens file is no entry
                meta_path.with_suffix(".tokens").unlink()


def _write_tensors(path: Path, *tensors: torch.Tensor) -> None:
    """The raw arrays, one after the other, through a temporary file and a rename, a few MiB at a time."""
    partial = partial_path(path)
    try:
        with partial.open("wb") as handle:
            for tensor in tensors:
                data = tensor.contiguous().view(torch.uint8)
                for start in range(0, len(data), _WRITE_CHUNK):
                    piece = data[start : start + _WRITE_CHUNK]
                    buffer = bytearray(len(piece))
                    torch.frombuffer(buffer, dtype=torch.uint8).copy_(piece)
                    handle.write(buffer)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _try_write(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
    except (OSError, DrnnError):  # atomic_write_text reports an OSError as a DrnnError
        pass


def _name_part(text: Path) -> str:
    """The text's name as cache file names begin (cut: a long name plus a digest passes 255 bytes)."""
    # bytes: the limit is 255 bytes; a name that is not UTF-8 keeps the part of it that is
    return text.stem.encode("utf-8", "surrogateescape")[:64].decode("utf-8", "ignore")
