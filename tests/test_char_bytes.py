"""The in-place byte path of character corpora (``char_stream_bytes``, ``count_ascii``, ``encode_ascii_``)
gives exactly what the ``str`` path gives: the same characters, vocabulary order and encoded tensor."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

import drnn_cli.corpus as corpus
import drnn_cli.data as data
import drnn_cli.token_tensors as tensors_module
from drnn_cli.config import DataConfig
from drnn_cli.corpus import char_stream_bytes, preprocess_chars, read_text, read_utf8
from drnn_cli.errors import DrnnError
from drnn_cli.token_tensors import count_chars, encode_chars
from drnn_cli.vocab import Vocab

MODES = ["d2l", "letters", "lower", "none"]
PIECES = [
    "The", "Time", "traveller", "WAS", "x", "café", "naïve", "中文", "😀", "Straße", "İstanbul",
    " ", "  ", "\t", "!!!", "--", "...", ",", "'", "9", "2024", "\n", "\n\n", "\r\n", "\r", "\r\r\n",
    "\n \n", " \r ", "\x1c", "-\n-",
]  # fmt: skip


def varied_text(size: int, seed: int, ascii_only: bool = False) -> str:
    """Words, non-ASCII characters, CR / LF / lone CR, punctuation runs and empty lines, mixed."""
    rng = random.Random(seed)
    pieces = [piece for piece in PIECES if piece.isascii() or not ascii_only]
    out: list[str] = []
    length = 0
    while length < size:
        piece = rng.choice(pieces)
        out.append(piece)
        length += len(piece)
    return "".join(out)


def old_encoding(path: Path, mode: str, vocab: Vocab | None = None):
    """What _encode did before the byte path: read_text → preprocess_chars → count_chars → encode_chars."""
    stream = preprocess_chars(read_text(path), mode)
    built = vocab or Vocab.from_counts(count_chars(stream))
    return stream, built, encode_chars(stream, built)


@pytest.mark.parametrize("ascii_only", [False, True])
def test_the_byte_path_equals_the_str_path_on_a_few_mb_of_varied_text(
    tmp_path: Path, ascii_only: bool
) -> None:
    path = tmp_path / "varied.txt"
    path.write_bytes(varied_text(3_000_000, seed=1 + ascii_only, ascii_only=ascii_only).encode("utf-8"))
    for mode in MODES:
        stream, vocab, encoded = old_encoding(path, mode)
        chars = char_stream_bytes(path, mode)
        if chars is None:  # lower-casing a non-ASCII text is left to str
            assert mode == "lower" and not ascii_only
        else:
            assert chars.decode("utf-8") == stream
        new = data._encode(path, DataConfig(path=str(path), preprocess=mode, token="char"), None)
        assert new.vocab.idx_to_token == vocab.idx_to_token
        assert new.vocab.token_freqs == vocab.token_freqs
        assert new.tokens.dtype == encoded.dtype
        assert new.tokens.tolist() == encoded.tolist()


def test_the_byte_path_equals_the_str_path_across_many_chunk_boundaries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(corpus, "_CHUNK_CHARS", 5)
    monkeypatch.setattr(corpus, "_CHECK_BYTES", 3)
    for seed in range(20):
        path = tmp_path / f"small{seed}.txt"
        path.write_bytes(varied_text(300, seed=seed).encode("utf-8"))
        for mode in ("d2l", "letters", "none"):
            chars = char_stream_bytes(path, mode)
            assert chars is not None and chars.decode("utf-8") == preprocess_chars(read_text(path), mode)


def test_encoding_bytes_in_place_equals_the_str_path_across_many_chunk_boundaries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tensors_module, "_DECODE_BYTES", 7)  # splits multi-byte characters between chunks
    monkeypatch.setattr(tensors_module, "_COUNT_CHUNK_BYTES", 5)
    wide = Vocab.from_counts({chr(code): 1 for code in range(40, 400)})  # int16 indices: not in place
    for seed in range(10):
        path = tmp_path / f"small{seed}.txt"
        path.write_bytes(varied_text(400, seed=seed).encode("utf-8"))
        for mode, fixed in [("none", None), ("d2l", None), ("none", wide)]:
            new = data._encode(path, DataConfig(path=str(path), preprocess=mode, token="char"), fixed)
            _, vocab, encoded = old_encoding(path, mode, fixed)
            assert new.vocab.idx_to_token == vocab.idx_to_token
            assert (new.tokens.dtype, new.tokens.tolist()) == (encoded.dtype, encoded.tolist())


def test_a_fixed_vocabulary_reports_the_same_unknown_characters(tmp_path: Path) -> None:
    path = tmp_path / "varied.txt"
    path.write_bytes(varied_text(20_000, seed=7).encode("utf-8"))
    vocab = Vocab.from_counts(count_chars("the cat sat"))
    config = DataConfig(path=str(path), preprocess="d2l", token="char")
    new = data._encode(path, config, vocab)
    stream, _, encoded = old_encoding(path, "d2l", vocab)
    assert new.tokens.tolist() == encoded.tolist()
    unknown = {char: stream.count(char) for char in dict.fromkeys(stream) if char not in vocab}
    assert list(new.unknown.items()) == list(unknown.items()) and "w" in unknown


def test_read_utf8_names_the_same_offset_as_read_text_across_check_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "bad.txt"
    path.write_bytes(
        "été 中文 ".encode() * 3 + b"\xe4\xb8" + b" end"
    )  # 3 × 13 bytes, then a character cut short
    with pytest.raises(DrnnError) as old:
        read_text(path)
    for size in (1, 2, 3, 5, 1 << 20):
        monkeypatch.setattr(corpus, "_CHECK_BYTES", size)
        with pytest.raises(DrnnError) as new:
            read_utf8(path)
        assert str(new.value) == str(old.value) and "offset 39" in str(old.value)


@pytest.mark.parametrize(
    "content",
    [b"", b"   \n\t\r\n  \n", "\u3000\n".encode(), b"\x1c\x1f", b"\xef\xbb\xbf", b"\xef\xbb\xbf \n"],
)
@pytest.mark.parametrize("check_bytes", [1, 1 << 20])
def test_read_utf8_refuses_a_blank_file_like_read_text(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: bytes, check_bytes: int
) -> None:
    """Nothing but white space, or a byte order mark (dropped when read), is no text, however the
    bytes are chunked."""
    path = tmp_path / "blank.txt"
    path.write_bytes(content)
    monkeypatch.setattr(corpus, "_CHECK_BYTES", check_bytes)
    message = (
        f"corpus file {path} holds no text (it is empty or only white space); use a file with text in it"
    )
    with pytest.raises(DrnnError) as new:
        read_utf8(path)
    assert str(new.value) == message
    with pytest.raises(DrnnError) as old:
        read_text(path)
    assert str(old.value) == message


def test_a_fixed_vocabulary_of_more_than_256_tokens_encodes_to_int16_like_the_str_path(
    tmp_path: Path,
) -> None:
    path = tmp_path / "varied.txt"
    path.write_bytes(varied_text(20_000, seed=3).encode("utf-8"))
    vocab = Vocab.from_counts({chr(code): 1 for code in range(40, 400)})  # 361 tokens: indices need int16
    new = data._encode(path, DataConfig(path=str(path), preprocess="letters", token="char"), vocab)
    _, _, encoded = old_encoding(path, "letters", vocab)
    assert new.tokens.dtype == encoded.dtype == torch.int16
    assert new.tokens.tolist() == encoded.tolist()
    assert list(new.unknown.items()) == [(" ", new.unknown[" "])] and new.unknown[" "] > 0


@pytest.mark.parametrize("mode", MODES)
def test_eval_data_encodes_through_the_byte_path_like_the_str_path(tmp_path: Path, monkeypatch, mode: str):
    """``drnn eval --data`` read its text as a ``str`` (4 bytes a character once one is outside the
    BMP: a 100 MB text peaked at 1.36 GB, the corpus path at 0.57 GB); now as a corpus is read, with
    the same ids, unknown characters (not in the checkpoint's vocabulary) as ``<unk>`` included."""
    path = tmp_path / "other.txt"
    path.write_bytes(varied_text(200_000, seed=7).encode("utf-8"))
    vocab = Vocab(["<unk>", *"etaoinsh \n"])  # a checkpoint's, lacking most of the text
    config = DataConfig(path=str(path), preprocess=mode)
    _, _, expected = old_encoding(path, mode, vocab)
    if mode != "lower":  # lower-casing a non-ASCII text is left to str
        for module in (data, corpus):  # data.encode_text's word path, corpus.read_token_stream's char path
            monkeypatch.setattr(module, "read_text", lambda *_: pytest.fail("the text was decoded whole"))
    encoded = data.encode_text(path, config, vocab, "--data file")
    assert encoded.dtype == expected.dtype and torch.equal(encoded, expected)


def test_eval_data_errors_name_the_data_file(tmp_path: Path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9\n".encode("latin-1"))
    blank = tmp_path / "blank.txt"
    blank.write_bytes(b" \n\t\n")
    config = DataConfig(path=str(latin1), preprocess="none")
    with pytest.raises(
        DrnnError, match=r"^--data file .*latin1.txt is not UTF-8 \(undecodable byte at offset 3\)"
    ):
        data.encode_text(latin1, config, Vocab(["<unk>", "a"]), "--data file")
    with pytest.raises(DrnnError, match=r"^--data file .*blank.txt holds no text"):
        data.encode_text(blank, config, Vocab(["<unk>", "a"]), "--data file")
