"""Corpus text: reading a file as UTF-8, and preprocessing it as d2l 0.17.6 does for ``d2l`` mode.

The first stage of the data flow after :mod:`drnn_cli.download` (which finds or fetches a registered
corpus): it turns ``data.path`` into the text a tokenizer reads.
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple
from unicodedata import normalize

from drnn_cli.config import DataConfig
from drnn_cli.errors import DrnnError, UsageError
from drnn_cli.files import (
    NOT_UTF8_HEAD,
    decode_utf8_text,
    not_utf8,
    read_utf8_text,
    refuse_nul_bytes,
    require_regular_file,
)
from drnn_cli.vocab import tokens_of


def read_text(
    path: Path, what: str = "corpus file", max_bytes: int | None = None, excerpt_bytes: int | None = None
) -> str:
    """The file as text, with one-line errors for the usual problems, naming the file as ``what``
    (the option that gave it: "--data file", "--file"); ``max_bytes``, ``excerpt_bytes``: as
    ``read_utf8_text``."""
    require_regular_file(path, what, "name a UTF-8 text file")  # not /dev/zero, a FIFO, a folder
    return _as_text(read_utf8_text(path, what, max_bytes, excerpt_bytes), path, what)


def text_of_bytes(raw: bytes, name: Path, what: str) -> str:
    """Bytes already in memory (standard input) as :func:`read_text` reads a file's: the same UTF-8
    decoding and errors, byte order mark and line breaks, with ``what`` ``name`` in its messages."""
    return _as_text(decode_utf8_text(raw, what, name), name, what)


def _as_text(decoded: str, path: Path, what: str) -> str:
    """A decoded file's text as drnn reads it; refused when it holds none."""
    # A byte order mark is an editor's marker, not text.
    text = normalize_line_breaks(decoded.removeprefix(BYTE_ORDER_MARK))
    if not text.strip():
        raise _empty(path, what)
    return text


BYTE_ORDER_MARK = "\ufeff"


def normalize_line_breaks(text: str) -> str:
    """CR LF and a lone CR as LF, what ``open()`` in text mode does: a text's line breaks are one
    token however its editor wrote them (the byte-level reader does the same)."""
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


def normalize_line_break_bytes(data: bytes) -> bytes:
    """``normalize_line_breaks`` for UTF-8 bytes (a CR or LF byte is never part of another character)."""
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n") if b"\r" in data else data


class CorpusSha1s(NamedTuple):
    """A corpus file's two SHA-1s: of its bytes, and of the text drnn reads from them."""

    file: str  # the bytes: what the token cache is keyed by and a download is checked against
    text: str  # ``read_text``'s text as UTF-8 (no byte order mark, LF line breaks): alike for every form of one text


_HASH_BLOCK = 1 << 20  # bytes read at a time to hash a file: a 1 GiB corpus is never in memory to be hashed


def hash_corpus(path: Path) -> CorpusSha1s:
    """Both SHA-1s of the file at ``path``, in one read of it. While the text read is the file's own
    bytes (no byte order mark, no CR: most texts, throughout), one digest serves both, and the text's
    branches off at the first block that differs: an LF text costs one hash, not two."""
    file = hashlib.sha1()
    text = None  # the text's own digest, from the first block it differs from the file in
    with path.open("rb") as handle:
        for block, piece in _text_pieces(iter(lambda: handle.read(_HASH_BLOCK), b"")):
            if text is None and piece != block:
                text = file.copy()
            file.update(block)
            if text is not None:
                text.update(piece)
    return CorpusSha1s(file.hexdigest(), (file if text is None else text).hexdigest())


def _text_pieces(blocks: Iterator[bytes]) -> Iterator[tuple[bytes, bytes]]:
    """Each of a file's ``blocks`` with the text ``read_text`` reads from it, as UTF-8 bytes: a byte
    order mark at the start dropped, CR LF and a lone CR as LF. A CR at a block's end may begin a CR LF
    the next block ends, so it waits for that block (a lone CR ending the file: an empty block, LF)."""
    mark = BYTE_ORDER_MARK.encode("utf-8")
    carried, first = b"", True
    for block in blocks:
        data = carried + block
        if first:
            data, first = data.removeprefix(mark), False  # (a block shorter than the mark: a tiny file)
        data, carried = (data[:-1], b"\r") if data.endswith(b"\r") else (data, b"")
        yield block, normalize_line_break_bytes(data)
    if carried:  # the file ends with a lone CR: a line break
        yield b"", b"\n"


def same_text_sha1s(path: Path) -> frozenset[str]:
    """The SHA-1s of four files drnn reads as the same text as ``path``: its text with LF or with CR LF
    line breaks, each with and without a UTF-8 byte order mark (``read_text`` drops the mark and reads
    every line break as LF). A run's text that went through Windows or git's autocrlf is still its
    text. A file in none of these forms (its line breaks mixed, or lone CRs) is matched by its copies,
    not they by it: its own SHA-1 is not among theirs. Only for a checkpoint written before drnn
    recorded ``CorpusSha1s.text``, which matches every form both ways."""
    mark = BYTE_ORDER_MARK.encode("utf-8")
    lf, crlf, marked_lf, marked_crlf = (hashlib.sha1() for _ in range(4))
    marked_lf.update(mark)
    marked_crlf.update(mark)
    with path.open("rb") as handle:
        for _, text in _text_pieces(iter(lambda: handle.read(_HASH_BLOCK), b"")):
            with_crlf = text.replace(b"\n", b"\r\n")
            for digest, piece in ((lf, text), (crlf, with_crlf), (marked_lf, text), (marked_crlf, with_crlf)):
                digest.update(piece)
    return frozenset(digest.hexdigest() for digest in (lf, crlf, marked_lf, marked_crlf))


def _empty(path: Path, what: str = "corpus file") -> DrnnError:
    return DrnnError(
        f"{what} {path} holds no text (it is empty or only white space); use a file with text in it"
    )


_CHECK_BYTES = 1 << 20  # 1 MiB decoded at a time to check a non-ASCII file is UTF-8


def read_utf8(path: Path, what: str = "corpus file") -> bytearray:
    """The file's bytes, checked like ``read_text`` (same errors, naming the file as ``what``) but never
    decoded whole.

    A 1 GiB text is one 1 GiB buffer here, where ``read_text`` holds the bytes and the decoded
    ``str`` at once; ``char_stream_bytes`` then works on it in place.
    """
    require_regular_file(path, what, "name a UTF-8 text file")
    try:
        with path.open("rb") as handle:
            data = bytearray(os.fstat(handle.fileno()).st_size)
            filled = 0
            with memoryview(data) as view:
                while filled < len(data) and (got := handle.readinto(view[filled:])):
                    filled += got
            del data[filled:]  # the file shrank since fstat
            data += handle.read()  # or grew
    except OSError as exc:
        raise DrnnError(f"cannot read {what} {path}: {exc.strerror}") from None
    _check_utf8_text(path, data, what)  # first: an offset in its message counts the file's bytes
    if data.startswith(BYTE_ORDER_MARK.encode("utf-8")):
        del data[:3]  # as read_text drops it
    return data


def _check_utf8_text(path: Path, data: bytearray, what: str) -> None:
    """Raise ``read_text``'s errors: not UTF-8 (at the same offset), NUL bytes, or nothing but white space."""
    ascii_only = data.isascii()  # then it is UTF-8, and the first non-blank chunk ends the scan
    decoder = codecs.getincrementaldecoder("utf-8")()
    has_text, first_piece = False, True
    with memoryview(data) as view:
        for start in range(0, len(data), _CHECK_BYTES):
            pending = len(decoder.getstate()[0])  # bytes of a character split by the last chunk
            try:
                piece = decoder.decode(
                    view[start : start + _CHECK_BYTES], final=start + _CHECK_BYTES >= len(data)
                )
            except UnicodeDecodeError as exc:  # exc.start counts from the pending bytes
                raise not_utf8(what, path, data, exc, start - pending + exc.start) from None
            if first_piece and piece:  # a byte order mark is dropped when read: a file of only one is empty
                piece, first_piece = piece.removeprefix(BYTE_ORDER_MARK), False
            has_text = has_text or bool(piece.strip())
            if has_text and ascii_only:
                break
    refuse_nul_bytes(what, path, bytes(data[:NOT_UTF8_HEAD]))  # after not_utf8, which names a binary
    if not has_text:
        raise _empty(path, what)


_NON_LETTERS = re.compile(r"[^A-Za-z]+")
LETTERS_ONLY = ("d2l", "letters")  # the preprocessings that drop characters


def dropping(mode: str) -> str:
    """What a message says a preprocessing leaves of a text, where it dropped what was asked for."""
    return " (it keeps only the letters a-z and spaces)" if mode in LETTERS_ONLY else ""


def preprocess(text: str, mode: str) -> list[str]:
    """The text as a list of pieces whose concatenation is the character stream.

    ``d2l`` reproduces d2l 0.17.6 exactly: every line becomes ``re.sub('[^A-Za-z]+', ' ', line)
    .strip().lower()`` and the lines are concatenated with no separator ("him" + "was" → "himwas").
    Pieces are kept per line because word tokens split each line separately.
    """
    if mode == "d2l":
        return [_NON_LETTERS.sub(" ", line).strip().lower() for line in text.split("\n")]
    if mode == "letters":
        return [_NON_LETTERS.sub(" ", text).strip().lower()]
    if mode == "lower":
        return [text.lower()]
    if mode == "none":
        return [text]
    raise DrnnError(f"unknown preprocessing {mode!r}; data.preprocess allows d2l, letters, lower, none")


_CHUNK_CHARS = 1 << 21  # 2 Mi characters per step of preprocess_chars and char_stream_bytes
_NON_LETTER = re.compile("[^A-Za-z]")
_NON_LETTER_BYTE = re.compile(b"[^A-Za-z]")


def preprocess_chars(text: str, mode: str) -> str:
    """``"".join(preprocess(text, mode))`` for character tokens, without a Python object per line.

    ``d2l`` and ``letters`` go a few MiB at a time, each piece ending at a non-letter (a line break,
    or within a long line a space or punctuation: no word is cut), through ``_append_letters`` as UTF-8
    bytes (every byte of a non-ASCII character is ≥ 0x80: a non-letter, like the character itself).
    The output is ASCII and never longer than the text, so it is written into one buffer of
    ``len(text)`` bytes.
    """
    if mode not in LETTERS_ONLY:
        return "".join(preprocess(text, mode))
    out = bytearray(len(text))
    written, open_line, start = 0, False, 0
    while start < len(text):
        end = _after_non_letter(_NON_LETTER, text, start + _CHUNK_CHARS)
        written, open_line = _append_letters(
            out, written, text[start:end].encode("utf-8"), mode, b"\n", open_line
        )
        start = end
    return str(memoryview(out)[:written], "ascii")


def _after_non_letter(
    pattern: re.Pattern[str] | re.Pattern[bytes], text: str | bytearray, position: int
) -> int:
    """The index just past the first character (``pattern``: one that is not an ASCII letter) at or
    after ``position``; else the end. A chunk ending there ends between two words: a text of one long
    line (no line break to end a chunk at) was one chunk, whose words ``bytes.split`` made an object
    each, 18 bytes of memory a byte of text (2 GB for 100 MB)."""
    if position >= len(text):
        return len(text)
    found = pattern.search(text, position)  # type: ignore[arg-type]  # str with str, bytes with bytes
    return len(text) if found is None else found.end()


def read_token_stream(
    path: Path, config: DataConfig, what: str = "corpus file", max_bytes: int | None = None
) -> str | list[str]:
    """The tokens of another text as ``config`` reads its corpus; errors name the file as ``what``, and a
    file over ``max_bytes`` is refused after reading no more than that and one byte."""
    return token_stream(read_text(path, what, max_bytes), config)


def token_stream(text: str, config: DataConfig) -> str | list[str]:
    """The tokens of a text :func:`read_text` read, as ``config`` reads its corpus."""
    if config.token == "char":
        return preprocess_chars(text, config.preprocess)
    return tokens_of(preprocess(text, config.preprocess), config.token)


def char_stream_bytes(path: Path, mode: str, what: str = "corpus file") -> bytearray | None:
    """``preprocess_chars(read_text(path), mode)`` as UTF-8 bytes, built in place in the file's buffer.

    Exact at the byte level for every mode but ``lower`` on a non-ASCII text (Unicode lower-casing can
    change a character's length), where it returns None. ``d2l`` and ``letters`` keep only ASCII letters
    and every byte of a non-ASCII character is ≥ 0x80, a non-letter like the character itself; a line
    break is a LF or a CR (``read_text`` turns CR LF and a lone CR into LF). ``none`` and ``lower``
    only get ``read_text``'s CR normalisation (and ASCII lower-casing). Each piece is at most as long
    as the bytes it came from and starts no later, so it is written back over bytes already read.
    """
    if mode not in {"d2l", "letters", "lower", "none"}:
        preprocess("", mode)  # raises the unknown-mode error
    data = read_utf8(path, what)
    if mode == "lower" and not data.isascii():
        return None
    if mode == "none" and b"\r" not in data:
        return data
    written, open_line, start = 0, False, 0
    while start < len(data):
        if mode in LETTERS_ONLY:  # a CR LF cut in two reads as a line break and an empty line: the same
            end = _after_non_letter(_NON_LETTER_BYTE, data, start + _CHUNK_CHARS)
        else:
            end = _after_line_break(data, start + _CHUNK_CHARS)
        with memoryview(data) as view:  # released at once: ``data`` is resized at the end
            chunk = bytes(view[start:end])
        if mode in LETTERS_ONLY:
            written, open_line = _append_letters(data, written, chunk, mode, b"\n\r", open_line)
        else:
            chunk = normalize_line_break_bytes(chunk)
            if mode == "lower":
                chunk = chunk.lower()  # ASCII only here: bytes.lower is str.lower
            data[written : written + len(chunk)] = chunk  # same length: no resize
            written += len(chunk)
        start = end
    del data[written:]
    return data


def _after_line_break(data: bytearray, position: int) -> int:
    """The index just past the first line break (LF, CR or CR LF) at or after ``position``; else the end."""
    if position >= len(data):
        return len(data)
    lf = data.find(b"\n", position)
    cr = data.find(b"\r", position, lf if lf >= 0 else len(data))  # only up to the LF: linear in all
    if cr >= 0:
        return cr + 2 if cr + 1 < len(data) and data[cr + 1] == 10 else cr + 1  # never split CR LF
    return lf + 1 if lf >= 0 else len(data)


def _append_letters(
    out: bytearray, written: int, chunk: bytes, mode: str, line_breaks: bytes, open_line: bool
) -> tuple[int, bool]:
    """Write d2l's or letters' reading of ``chunk`` (UTF-8 bytes ending at a non-letter) at
    ``out[written:]``; returns the new length and whether the chunk ends in a line that has words so
    far (``open_line``, passed back in with the next chunk).

    After the translation a line is letters and spaces, so ``b" ".join(line.split())`` is
    ``re.sub('[^A-Za-z]+', ' ', line).strip().lower()``, with C-level bytes methods only. ``d2l``
    glues lines, but a line cut between two chunks keeps one space between its words on either side;
    ``letters`` reads the whole text as one line. The output is never longer than the
    bytes it came from and starts no later, so ``out`` may be the buffer ``chunk`` was read from.
    """
    mapped = chunk.translate(_letters_table(line_breaks))
    lines = [mapped] if mode == "letters" else mapped.split(b"\n")  # letters: a line break is a space
    pieces = [b" ".join(line.split()) for line in lines]
    piece = b"".join(pieces)
    if open_line and pieces[0]:  # the words before and after the cut are on one line
        out[written] = 32
        written += 1
    out[written : written + len(piece)] = piece  # never past the bytes read: no resize
    return written + len(piece), bool(pieces[-1]) or (open_line and len(pieces) == 1)


@functools.cache
def _letters_table(line_breaks: bytes) -> bytes:
    """A ``bytes.translate`` table: letters → lower case, line breaks → LF, every other byte → space."""
    table = bytearray(b" " * 256)
    for upper in range(ord("A"), ord("Z") + 1):
        table[upper] = table[upper | 32] = upper | 32
    for code in line_breaks:
        table[code] = 10
    return bytes(table)


def prefix_pieces(prefix: str, mode: str) -> list[str]:
    """A user's prompt preprocessed as the training text is, piece by piece (a d2l line each), its
    line breaks read as the corpus reader reads them (a pasted Windows line break is the text's
    ``\\n``, never a ``\\r``): characters glue the pieces, words never join across them."""
    pieces = preprocess(normalize_line_breaks(prefix), mode)
    _refuse_undecodable("".join(pieces), mode)
    return pieces


def preprocess_prefix(prefix: str, mode: str) -> str:
    """A user's prompt as one run of characters, like the training text's."""
    return "".join(prefix_pieces(prefix, mode))


def preprocessing_changed(given: str, read: str) -> bool:
    """Whether preprocessing did more to a text (a prompt or a TEXT argument: a command line's worth)
    than lower-case it and even out its spaces (dropped or replaced characters, or lines glued: worth a
    note, as the model reads another text than the one given). Case is left out of the comparison on
    both sides: ``data.preprocess none`` keeps it; so is the Unicode form (an accent composed or a
    combining mark: the same text)."""
    return " ".join(normalize("NFC", given).lower().split()) != " ".join(
        normalize("NFC", read).lower().split()
    )


class LettersReading(NamedTuple):
    """What ``d2l`` or ``letters`` preprocessing does to a text besides lower-casing it and evening out
    its spaces, which a reader of the text it makes should be told."""

    dropped: bool  # a character neither an ASCII letter nor white space: dropped, or replaced by a space
    glued: bool  # d2l: a line break between letters removed ("him" + "was" -> "himwas")

    @property
    def changed(self) -> bool:
        return self.dropped or self.glued


_DROPPED_BY_LETTERS = re.compile(r"[^A-Za-z\s]")
_LETTER_RUN = re.compile("[A-Za-z]+")


def letters_reading(text: str, mode: str, letters: int | None = None) -> LettersReading:
    """:class:`LettersReading` of ``text`` under ``mode`` (``d2l`` or ``letters``), in the part of it that
    gives its first ``letters`` letters (None: all of it). One pass of C-level searches, without the
    Unicode normalisation :func:`preprocessing_changed` does (a --file can hold 16 MiB, and a run of
    combining marks sorts in quadratic time): here every non-ASCII character is a change, since both
    modes keep ASCII letters alone."""
    end = len(text) if letters is None else _after_letters(text, letters)
    dropped = _DROPPED_BY_LETTERS.search(text, 0, end) is not None
    glued = False
    first = _LETTER_RUN.search(text, 0, end) if mode == "d2l" else None
    if first is not None:
        line_break = text.find("\n", first.end(), end)
        glued = line_break != -1 and _LETTER_RUN.search(text, line_break, end) is not None
    return LettersReading(dropped, glued)


def _after_letters(text: str, count: int) -> int:
    """The index just past ``text``'s ``count``-th ASCII letter (its end where it has fewer)."""
    seen = 0
    for run in _LETTER_RUN.finditer(text):
        if seen + len(run.group()) >= count:
            return run.start() + count - seen
        seen += len(run.group())
    return len(text)


def _refuse_undecodable(text: str, mode: str) -> None:
    """A command-line argument's bytes that are not UTF-8 reach Python as lone surrogates (``\\udcff``
    for 0xff); those preprocessing keeps are no character any vocabulary holds, nor can a page show them."""
    bad = next((c for c in text if "\ud800" <= c <= "\udfff"), None)
    if bad is not None:
        code = ord(bad)
        byte = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"code point U+{code:04X}"
        raise UsageError(  # an argument that cannot be one, as an empty prefix
            f"the text holds a {byte}, which is not UTF-8 text (data.preprocess={mode} keeps it); "
            "give the text as UTF-8"
        )
