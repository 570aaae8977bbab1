"""The corpus stage: download with checksum and cache, reading, preprocessing, the dataset, `drnn data`.

Downloads go to a loopback HTTP server started by the test; nothing here touches the internet.
"""

from __future__ import annotations

import codecs
import collections
import hashlib
import io
import itertools
import json
import re
import shlex
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from drnn_cli.config import Config, DataConfig
from drnn_cli.corpus import (
    char_stream_bytes,
    hash_corpus,
    preprocess,
    preprocess_chars,
    preprocess_prefix,
    read_text,
    same_text_sha1s,
)
from drnn_cli.data import UnseenInTraining, load_dataset
from drnn_cli.download import REGISTRY, fetch_corpus
from drnn_cli.errors import ConfigError, DrnnError
from drnn_cli.run_notes import data_notes, own_text_notes, unseen_in_training_note
from drnn_cli.text_vocab import text_vocab

SHA1 = "090b5e7e70c295757f55df93cb0a180b9691891a"
SIZE = 178_979
D2L_VOCAB = [
    "<unk>", " ", "e", "t", "a", "i", "n", "o", "s", "h", "r", "d", "l", "m",
    "u", "c", "f", "w", "g", "y", "p", "b", "v", "k", "x", "z", "j", "q",
]  # fmt: skip


def d2l_lines(text: str) -> list[str]:
    """d2l 0.17.6's ``read_time_machine`` on ``text`` (``readlines`` of a text-mode file)."""
    return [re.sub("[^A-Za-z]+", " ", line).strip().lower() for line in io.StringIO(text).readlines()]


# -------------------------------------------------------------------------------------------------
# A loopback mirror


@dataclass
class Mirror:
    """What the loopback server serves, and the request paths it has seen."""

    base_url: str
    files: dict[str, bytes] = field(default_factory=dict)
    status: int = 200  # anything else: every request gets this error
    requests: list[str] = field(default_factory=list)


@pytest.fixture
def mirror(monkeypatch: pytest.MonkeyPatch, corpus_path: Path) -> Iterator[Mirror]:
    """A ThreadingHTTPServer on 127.0.0.1 serving the real timemachine.txt; DRNN_DATA_URL points at it."""
    state: Mirror

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.requests.append(self.path)
            body = state.files.get(self.path)
            if state.status != 200 or body is None:
                self.send_error(state.status if state.status != 200 else 404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    state = Mirror(base_url=f"http://127.0.0.1:{server.server_address[1]}/mirror")
    state.files["/mirror/timemachine.txt"] = corpus_path.read_bytes()
    monkeypatch.setenv("DRNN_DATA_URL", state.base_url)
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -------------------------------------------------------------------------------------------------
# fetch_corpus


def test_registry_knows_the_time_machine() -> None:
    spec = REGISTRY["timemachine"]
    assert (spec.filename, spec.sha1, spec.size) == ("timemachine.txt", SHA1, SIZE)


def test_fetch_downloads_verifies_and_caches(mirror: Mirror, tmp_path: Path, corpus_path: Path) -> None:
    cache = tmp_path / "cache"
    corpus = fetch_corpus("timemachine", cache_dir=cache, retries=1, backoff=0)
    assert corpus.path == cache / "timemachine.txt"
    assert corpus.sha1 == SHA1
    assert corpus.path.read_bytes() == corpus_path.read_bytes()
    assert hashlib.sha1(corpus.path.read_bytes()).hexdigest() == SHA1
    assert mirror.requests == ["/mirror/timemachine.txt"]
    assert sorted(p.name for p in cache.iterdir()) == ["timemachine.txt"]  # no partial left behind


def test_a_download_is_said_in_a_note_which_a_log_keeps(
    mirror: Mirror, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli
) -> None:
    """Piped or logged, the download bar never shows: nothing said a download had happened, from where.
    The note comes on a terminal too, where the bar is gone once the download ends."""
    monkeypatch.setenv("DRNN_DATA_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    code, out, err = cli("data")
    target = tmp_path / "cache" / "timemachine.txt"
    assert code == 0 and mirror.requests == ["/mirror/timemachine.txt"], err
    assert (
        f"note: downloaded {mirror.base_url.rstrip('/')}/timemachine.txt into {target} (SHA-1 {SHA1} checked)"
        in out
    )
    code, out, _ = cli("data")
    assert code == 0 and "downloaded" not in out and len(mirror.requests) == 1  # cached: nothing to say


def test_a_second_fetch_makes_no_request(mirror: Mirror, tmp_path: Path) -> None:
    fetch_corpus("timemachine", cache_dir=tmp_path, retries=1, backoff=0)
    assert len(mirror.requests) == 1
    again = fetch_corpus("timemachine", cache_dir=tmp_path, retries=1, backoff=0)
    assert again.sha1 == SHA1
    assert len(mirror.requests) == 1


def test_a_verified_cache_needs_no_network_at_all(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, corpus_path: Path
) -> None:
    (tmp_path / "timemachine.txt").write_bytes(corpus_path.read_bytes())
    monkeypatch.setenv("DRNN_DATA_URL", f"http://127.0.0.1:{free_port()}")
    assert fetch_corpus("timemachine", cache_dir=tmp_path, retries=1, backoff=0).sha1 == SHA1


def test_a_registered_corpus_is_read_once_for_its_check_and_both_sha1s(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, corpus_path: Path
) -> None:
    """The cache's check hashed the file's bytes, then loading hashed it again for its text's SHA-1
    (review, 2026-11-27): one read gives both, and a download adds one read for the text's alone."""
    from drnn_cli import download
    from drnn_cli.data import resolve_corpus_file

    (tmp_path / "timemachine.txt").write_bytes(corpus_path.read_bytes())
    monkeypatch.setenv("DRNN_DATA_DIR", str(tmp_path))
    read = []
    real_hash, real_identity = download.hash_corpus, download.file_identity
    monkeypatch.setattr(download, "hash_corpus", lambda path: (read.append("hashed"), real_hash(path))[1])
    monkeypatch.setattr(
        download, "file_identity", lambda path: (read.append("identity"), real_identity(path))[1]
    )
    monkeypatch.setattr(download, "file_sha1", lambda path: pytest.fail("hashed twice"))
    monkeypatch.setattr("drnn_cli.token_cache.hash_corpus", lambda path: pytest.fail("hashed twice"))
    located = resolve_corpus_file(DataConfig(corpus="timemachine"))
    # its identity before its hash: a file replaced during the hash is caught (data.check_unchanged)
    assert read == ["identity", "hashed"]
    assert located.identity == real_identity(tmp_path / "timemachine.txt")
    assert located.sha1s == (SHA1, SHA1)  # an LF text with no byte order mark: its text is its bytes


def test_another_file_in_the_corpus_cache_is_named_when_the_download_fails(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, corpus_path: Path
) -> None:
    """Offline, with a truncated copy at the corpus's place: the message says that file is the
    problem (it used to say only that the download failed, and to copy the file there)."""
    truncated = corpus_path.read_bytes()[:100_000]
    (tmp_path / "timemachine.txt").write_bytes(truncated)
    url = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("DRNN_DATA_URL", url)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    with pytest.raises(DrnnError) as caught:
        fetch_corpus("timemachine", cache_dir=tmp_path, retries=1, backoff=0, timeout=5)
    assert str(caught.value).startswith(
        f"{tmp_path / 'timemachine.txt'} is not the timemachine corpus (its SHA-1 is "
        f"{hashlib.sha1(truncated).hexdigest()}, expected {SHA1}), and cannot download {url}/timemachine.txt ("
    )
    assert (tmp_path / "timemachine.txt").read_bytes() == truncated  # left as it was


def test_a_corpus_cache_that_is_a_file_is_named_as_such(tmp_path: Path) -> None:
    cache = tmp_path / "data"
    cache.write_text("not a directory")
    with pytest.raises(DrnnError) as caught:
        fetch_corpus("timemachine", cache_dir=cache, retries=1, backoff=0)
    assert str(caught.value) == (
        f"the corpus cache {cache} is a file, not a directory; set DRNN_DATA_DIR to a directory drnn may write"
    )


def test_a_trailing_slash_on_the_mirror_url_is_harmless(
    mirror: Mirror, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DRNN_DATA_URL", mirror.base_url + "/")
    fetch_corpus("timemachine", cache_dir=tmp_path, retries=1, backoff=0)
    assert mirror.requests == ["/mirror/timemachine.txt"]


def test_the_progress_hook_sees_increasing_byte_counts(mirror: Mirror, tmp_path: Path) -> None:
    calls: list[tuple[int, int | None]] = []
    fetch_corpus("timemachine", cache_dir=tmp_path, progress=lambda n, total: calls.append((n, total)))
    received = [n for n, _ in calls]
    assert len(received) >= 2
    assert all(a < b for a, b in itertools.pairwise(received))
    assert received[-1] == SIZE
    assert {total for _, total in calls} == {SIZE}  # from Content-Length


def test_a_corrupted_download_is_refused_and_leaves_no_file(
    mirror: Mirror, tmp_path: Path, corpus_path: Path
) -> None:
    corrupted = bytearray(corpus_path.read_bytes())
    corrupted[1000] ^= 0x20  # one flipped bit
    mirror.files["/mirror/timemachine.txt"] = bytes(corrupted)
    actual = hashlib.sha1(corrupted).hexdigest()
    cache = tmp_path / "cache"
    with pytest.raises(DrnnError) as caught:
        fetch_corpus("timemachine", cache_dir=cache, retries=1, backoff=0)
    message = str(caught.value)
    assert f"{mirror.base_url}/timemachine.txt" in message
    assert SHA1 in message
    assert actual in message
    assert list(cache.iterdir()) == []  # neither the partial nor the target


def test_a_404_is_one_line_naming_the_url_and_is_not_retried(mirror: Mirror, tmp_path: Path) -> None:
    mirror.files.clear()
    with pytest.raises(DrnnError) as caught:
        fetch_corpus("timemachine", cache_dir=tmp_path, retries=3, backoff=0)
    message = str(caught.value)
    assert f"{mirror.base_url}/timemachine.txt" in message
    assert "404" in message
    assert len(mirror.requests) == 1
    assert list(tmp_path.iterdir()) == []


def test_server_errors_are_retried_then_reported(mirror: Mirror, tmp_path: Path) -> None:
    mirror.status = 503
    with pytest.raises(DrnnError, match="503"):
        fetch_corpus("timemachine", cache_dir=tmp_path, retries=3, backoff=0)
    assert len(mirror.requests) == 3
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("url", ["ftp://mirror.example/data", "file:///etc/passwd", "not a url"])
def test_a_mirror_that_is_no_http_url_is_said_as_the_settings_fault(
    url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """requests refused them as InvalidSchema or InvalidURL, which drnn reported as "check the network"
    (red41); nothing is fetched, nothing left behind."""
    monkeypatch.setenv("DRNN_DATA_URL", url)
    with pytest.raises(DrnnError) as caught:
        fetch_corpus("timemachine", cache_dir=tmp_path, retries=1, backoff=0, timeout=5)
    assert str(caught.value) == (
        f"DRNN_DATA_URL must be an http:// or https:// URL of a folder holding timemachine.txt (it is {url!r}); "
        f"fix it, or unset it to download from {REGISTRY['timemachine'].base_url}"
    )
    assert list(tmp_path.iterdir()) == []


def test_an_unreachable_mirror_is_a_drnn_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/nowhere"
    monkeypatch.setenv("DRNN_DATA_URL", url)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    with pytest.raises(DrnnError) as caught:
        fetch_corpus("timemachine", cache_dir=tmp_path, retries=1, backoff=0, timeout=5)
    message = str(caught.value)
    assert f"{url}/timemachine.txt" in message
    assert "DRNN_DATA_URL" in message
    # where to copy it, absolute: a learner in a new directory found only "data" (learner32)
    assert message.endswith(
        f"or copy the file into {tmp_path.absolute()} (the corpus cache: data/ where drnn runs, or "
        "$DRNN_DATA_DIR, which any directory can share)"
    )
    assert not (tmp_path / "timemachine.txt").exists()


def test_a_cached_file_with_the_wrong_content_is_replaced(
    mirror: Mirror, tmp_path: Path, corpus_path: Path
) -> None:
    (tmp_path / "timemachine.txt").write_bytes(b"not the time machine\n")
    corpus = fetch_corpus("timemachine", cache_dir=tmp_path, retries=1, backoff=0)
    assert corpus.path.read_bytes() == corpus_path.read_bytes()
    assert len(mirror.requests) == 1


def test_an_unknown_corpus_name_points_at_data_corpus(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"config error: data\.corpus: unknown corpus 'wells'; one of: timemachine"
    ):
        fetch_corpus("wells", cache_dir=tmp_path)  # a config error: exit 2, like every other


# -------------------------------------------------------------------------------------------------
# read_text


def _one_line_error(path: Path) -> str:
    with pytest.raises(DrnnError) as caught:
        read_text(path)
    message = str(caught.value)
    assert str(path) in message
    return message


def test_read_text_of_a_missing_file(tmp_path: Path) -> None:
    assert "does not exist" in _one_line_error(tmp_path / "absent.txt")


def test_read_text_of_a_directory(tmp_path: Path) -> None:
    assert "directory" in _one_line_error(tmp_path)


def test_read_text_of_non_utf8_bytes_names_the_offset(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"time traveller " + "café".encode("latin-1"))
    message = _one_line_error(path)
    assert "UTF-8" in message
    assert "offset 18" in message  # 15 bytes of "time traveller " + "caf", then 0xE9


def test_read_text_normalises_crlf(tmp_path: Path) -> None:
    path = tmp_path / "dos.txt"
    path.write_bytes(b"The Time\r\nMachine\r\n")
    assert read_text(path) == "The Time\nMachine\n"


@pytest.mark.parametrize("mode", ["none", "lower", "d2l"])
def test_a_byte_order_mark_is_not_part_of_the_text(tmp_path: Path, mode: str) -> None:
    """Notepad's UTF-8 files start with EF BB BF: both readers (in memory and byte-level) drop it,
    so it is no token of the vocabulary (and d2l's text does not start with a space)."""
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbfThe Time\r\nMachine \xef\xbb\xbf\n")  # a later U+FEFF is text
    assert read_text(path) == "The Time\nMachine \ufeff\n"
    # the byte path gives way only to str lower-casing of a non-ASCII text (the later U+FEFF is one)
    expected = None if mode == "lower" else "".join(preprocess(read_text(path), mode)).encode("utf-8")
    assert char_stream_bytes(path, mode) == expected
    dataset = load_dataset(DataConfig(path=str(path), preprocess=mode, val_fraction=0))
    assert "".join(dataset.vocab.to_tokens(dataset.tokens[:3].tolist())) == (
        "The" if mode == "none" else "the"
    )
    assert ("\ufeff" in dataset.vocab.idx_to_token) == (mode != "d2l")  # the one inside the text


def refusal_of_both_readers(path: Path) -> str:
    """The one-line error the two corpus readers (whole ``str``, and the byte path big texts take) give
    for ``path``: the same words from both."""
    from drnn_cli.corpus import read_utf8

    messages = set()
    for reader in (read_text, read_utf8):
        with pytest.raises(DrnnError) as error:
            reader(path)
        messages.add(str(error.value))
    assert len(messages) == 1, messages
    return messages.pop()


@pytest.mark.parametrize(
    ("payload", "family"),
    [
        ("The Time Machine\n".encode("utf-16"), "utf-16"),  # what Windows PowerShell's > writes
        (codecs.BOM_UTF16_BE + "The Time Machine\n".encode("utf-16-be"), "utf-16"),
        ("The Time Machine\n".encode("utf-32"), "utf-32"),
        (codecs.BOM_UTF32_BE + "The Time Machine\n".encode("utf-32-be"), "utf-32"),
    ],
    ids=["utf-16le", "utf-16be", "utf-32le", "utf-32be"],
)
def test_a_utf16_or_utf32_text_is_named_with_its_own_conversion(tmp_path: Path, payload: bytes, family: str):
    """Its byte order mark says what it is; the Latin-1 advice for other bytes would turn it into NULs."""
    path = tmp_path / "powershell.txt"
    path.write_bytes(payload)
    assert refusal_of_both_readers(path) == (
        f"corpus file {path} is {family.upper()} (it starts with that byte order mark), not UTF-8; "
        f"convert it, e.g. iconv -f {family} -t utf-8"
    )


def test_a_windows_1252_text_is_sent_to_iconv_as_one(tmp_path: Path):
    """Word's curly quotes and dashes are bytes 0x80-0x9F there; converted from Latin-1 (the advice
    for other 8-bit text) they became invisible control characters, and drnn trained on them."""
    path = tmp_path / "notes.txt"
    path.write_bytes("It\u2019s a \u201cquoted\u201d caf\u00e9 \u2014 dash. ".encode("cp1252") * 10)
    assert refusal_of_both_readers(path) == (
        f"corpus file {path} is not UTF-8 (undecodable byte at offset 2); convert it, e.g. iconv -f cp1252 "
        "-t utf-8 (bytes 0x80-0x9F: Windows-1252's quotes and dashes)"
    )


def test_a_utf8_text_cut_inside_a_character_is_said_to_be_cut_not_sent_to_latin1(tmp_path: Path):
    """``head -c 600`` of a Chinese text cuts a 3-byte character: re-encoded from Latin-1, as the
    advice said, every character of the text became mojibake."""
    path = tmp_path / "zh cut.txt"
    whole = "时间旅行者。".encode() * 40
    path.write_bytes(whole[:-1])
    assert refusal_of_both_readers(path) == (
        f"corpus file {path} is UTF-8 cut short: it ends inside a character (bytes from offset "
        f"{len(whole) - 3}), as a copy or head -c that stopped mid-character leaves it; drop them, e.g. "
        f"iconv -c -f utf-8 -t utf-8 {shlex.quote(str(path))} > fixed.txt"
    )


def test_a_utf8_text_with_a_stray_byte_is_said_to_be_utf8(tmp_path: Path):
    path = tmp_path / "menu.txt"
    start = "café crème ".encode() * 30
    path.write_bytes(start + b"\xff" + "brûlée ".encode() * 30)
    assert refusal_of_both_readers(path) == (
        f"corpus file {path} is UTF-8 but for an undecodable byte at offset {len(start)} (a stray byte, or "
        f"a text in another encoding pasted in); drop them, e.g. iconv -c -f utf-8 -t utf-8 {path} > fixed.txt"
    )


# Source code whose few non-ASCII lines are at its start, then 189 KB of ASCII: more than the 64 KiB
# either side of a bad byte that not_utf8 decodes to tell UTF-8 from Latin-1. The head is 53 bytes: 2
# a Greek or Cyrillic letter, 3 a CJK one, 4 the emoji.
UTF8_HEAD = "# Ελληνικά, кириллица, 中文, 🙂\n".encode()
ASCII_BODY = b"def f(x):\n    return x + 1\n" * 7_000  # 27 bytes a time: 189,000 bytes


@pytest.mark.parametrize("stray", [b"\xff", b"\x80", b"\xe2\x82"], ids=["0xff", "0x80", "cut-e2-82"])
def test_a_stray_byte_far_past_a_utf8_texts_non_ascii_lines_is_said_to_be_utf8(tmp_path: Path, stray: bytes):
    """Only ASCII within 64 KiB of the byte, it was sent to iconv -f latin1 (or cp1252 for 0x80), which
    turns every Greek, Cyrillic or CJK character of the first lines into two to four wrong ones: those
    lines decoded, so the file is UTF-8."""
    path = tmp_path / "sources.py"
    path.write_bytes(UTF8_HEAD + ASCII_BODY + stray + ASCII_BODY)
    assert refusal_of_both_readers(path) == (
        f"corpus file {path} is UTF-8 but for an undecodable byte at offset 189053 (a stray "
        f"byte, or a text in another encoding pasted in); drop them, e.g. iconv -c -f utf-8 -t utf-8 {path} > "
        "fixed.txt"
    )


def test_a_utf8_text_cut_after_a_lead_byte_far_past_its_non_ascii_lines_is_said_to_be_cut(tmp_path: Path):
    """One lone lead byte at the end is as likely Latin-1's last "é", but not after UTF-8 "中文"."""
    path = tmp_path / "sources.py"
    path.write_bytes(UTF8_HEAD + ASCII_BODY + b"\xe2")
    assert refusal_of_both_readers(path) == (
        f"corpus file {path} is UTF-8 cut short: it ends inside a character (bytes from offset "
        f"189053), as a copy or head -c that stopped mid-character leaves it; drop them, "
        f"e.g. iconv -c -f utf-8 -t utf-8 {path} > fixed.txt"
    )


def test_a_latin1_text_whose_first_accent_is_far_in_is_still_sent_to_latin1(tmp_path: Path):
    """Its ASCII start decodes as UTF-8 too, but holds no non-ASCII character: no evidence either way."""
    path = tmp_path / "notes.txt"
    path.write_bytes(ASCII_BODY + "café crème, señor, naïve; ".encode("latin-1") * 10)
    assert refusal_of_both_readers(path) == (
        f"corpus file {path} is not UTF-8 (undecodable byte at offset 189003); convert it, e.g. iconv -f "
        "latin1 -t utf-8"
    )


@pytest.mark.parametrize(
    ("payload", "advice"),
    [
        # Shift-JIS: lead bytes 0x81-0x9F looked like Windows-1252's, whose iconv made mojibake
        ("猫は猫である。".encode("shift_jis") * 20, "most of its bytes are ≥ 0x80, as a CJK encoding's are"),
        # Big5 and Shift_JIS second bytes are often ASCII: high bytes come apart, yet most bytes are high
        ("我們的時間機器，旅行者說。".encode("big5") * 20, "iconv -f SHIFT_JIS -t utf-8 (Japanese), -f GBK"),
        # Portuguese in Latin-1, dense in "ção": accented letters in pairs, yet a European text
        ("informação e tradições, canções e ações; ".encode("latin-1") * 20, "convert it, e.g. iconv -f latin1"),
        ("我们的时间机器。".encode("gbk") * 20, "iconv -f SHIFT_JIS -t utf-8 (Japanese), -f GBK"),
        # bytes Windows-1252 leaves undefined (0x81): its iconv refuses the file; Latin-1's converts it
        (b"caf\xe9 \x81 cr\xe8me " * 20, "convert it, e.g. iconv -f latin1 -t utf-8"),
        # an English UTF-8 text cut inside its last character ("…", 3 bytes): no other non-ASCII near
        (("the end" * 50 + "\u2026").encode()[:-1], "is UTF-8 cut short"),
        # a Latin-1 text whose one accented letter ends it: as likely UTF-8 cut after a lead byte
        (b"the time machine, caf\xe9", "iconv -f latin1 -t utf-8 (or, if it is UTF-8 cut inside its last "
         "character, drop that byte: head -c -1)"),
        # a UTF-8 text writing U+FFFD itself, with a stray Latin-1 byte: it is UTF-8
        ("r\u00e9sum\u00e9 \ufffd\ufffd\ufffd ".encode() * 20 + b"\xe9 " + b"fin", "is UTF-8 but for an"),
        # legacy texts whose first character is valid UTF-8 by chance (时 is CA B1 in GBK, É” is C9 94 in
        # cp1252): one decoded character is no evidence of UTF-8 (review rev31: both were sent to iconv -c)
        ("时间旅行者正在向我们解释一件深奥的事情。\n".encode("gbk") * 20, "-f GBK"),
        ("CAF\u00c9\u201d and more text here, na\u00efve fa\u00e7ade ".encode("cp1252") * 20, "iconv -f cp1252"),
    ],
    ids=[
        "shift-jis", "big5", "portuguese-latin1", "gbk", "latin1-0x81", "utf8-cut-after-ascii", "latin1-last-byte",
        "utf8-with-fffd", "gbk-lucky-start", "cp1252-lucky-start",
    ],
)  # fmt: skip
def test_the_advice_for_a_text_that_is_not_utf8_names_what_it_is(tmp_path: Path, payload: bytes, advice: str):
    path = tmp_path / "text.txt"
    path.write_bytes(payload)
    assert advice in refusal_of_both_readers(path)


def test_a_binary_file_is_named_as_one_not_sent_to_iconv(tmp_path: Path):
    """A PNG or a checkpoint given as the text: converting it from Latin-1 (the advice for text in
    another encoding) would train on noise. NUL bytes tell it, as they tell git and grep."""
    path = tmp_path / "perplexity.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    assert refusal_of_both_readers(path) == (
        f"corpus file {path} is not text: it holds NUL bytes and an undecodable byte at offset 0, as a "
        "binary file (an image, a checkpoint) does; name a text file (a UTF-16 text without a byte order "
        "mark converts with iconv -f utf-16le -t utf-8)"
    )


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be"])
def test_an_ascii_text_in_utf16_without_a_byte_order_mark_is_refused_for_its_nul_bytes(
    tmp_path: Path, encoding: str
):
    """Valid UTF-8 (each ASCII letter beside a NUL), it would train on NULs between the letters."""
    path = tmp_path / "no-bom.txt"
    path.write_bytes("The Time Machine\n".encode(encoding))
    assert refusal_of_both_readers(path) == (
        f"corpus file {path} holds NUL bytes (the first at offset {1 if encoding == 'utf-16-le' else 0}), "
        "which text does not: convert a UTF-16 text without a byte order mark with iconv -f "
        f"{encoding.replace('-16-', '-16')} -t utf-8, or name a text file"
    )


def test_both_readers_name_the_same_offset_in_a_file_that_starts_with_a_byte_order_mark(
    tmp_path: Path,
) -> None:
    from drnn_cli.corpus import read_utf8

    path = tmp_path / "bom-latin1.txt"
    path.write_bytes(b"\xef\xbb\xbfabcdefg\xffhij")
    for reader in (read_text, read_utf8):
        with pytest.raises(DrnnError, match="undecodable byte at offset 10"):
            reader(path)


def test_read_text_turns_a_lone_cr_into_a_line_break_like_text_mode_open(tmp_path: Path) -> None:
    path = tmp_path / "mac.txt"
    path.write_bytes(b"The Time\rMachine\r\nby H. G. Wells\r")
    with path.open(encoding="utf-8") as handle:  # what d2l reads
        expected = handle.read()
    assert expected == "The Time\nMachine\nby H. G. Wells\n"
    assert read_text(path) == expected
    assert "".join(preprocess(read_text(path), "d2l")) == "the timemachineby h g wells"


def test_read_text_returns_the_real_corpus_unchanged(corpus_path: Path) -> None:
    text = read_text(corpus_path)
    assert text.encode() == corpus_path.read_bytes()


# -------------------------------------------------------------------------------------------------
# preprocess

SAMPLE = "The Time\nMachine, by H. G. Wells [1898]\n\n\nI\n"


def test_d2l_mode_keeps_letters_lowercases_and_glues_lines() -> None:
    pieces = preprocess(SAMPLE, "d2l")
    assert "".join(pieces) == "the timemachine by h g wellsi"
    assert [p for p in pieces if p] == ["the time", "machine by h g wells", "i"]
    assert "".join(pieces) == "".join(d2l_lines(SAMPLE))


def test_d2l_mode_on_the_real_corpus_equals_d2l(corpus_path: Path) -> None:
    text = corpus_path.read_text(encoding="utf-8")
    pieces = preprocess(text, "d2l")
    assert "".join(pieces) == "".join(d2l_lines(text))
    assert [p for p in pieces if p] == [line for line in d2l_lines(text) if line]


def test_letters_mode_joins_lines_with_spaces() -> None:
    assert preprocess(SAMPLE, "letters") == ["the time machine by h g wells i"]


def test_lower_mode_only_lowercases() -> None:
    assert preprocess(SAMPLE, "lower") == ["the time\nmachine, by h. g. wells [1898]\n\n\ni\n"]


def test_none_mode_keeps_the_text_as_is() -> None:
    assert preprocess(SAMPLE, "none") == [SAMPLE]


def test_an_unknown_preprocessing_mode_names_the_allowed_ones() -> None:
    with pytest.raises(DrnnError, match=r"data\.preprocess allows d2l, letters, lower, none"):
        preprocess(SAMPLE, "upper")


def test_a_prefix_is_preprocessed_like_one_line() -> None:
    assert preprocess_prefix("Time Traveller!", "d2l") == "time traveller"
    assert preprocess_prefix("Time Traveller!", "lower") == "time traveller!"
    assert preprocess_prefix("Time Traveller!", "none") == "Time Traveller!"


@pytest.mark.parametrize("mode", ["none", "lower"])
def test_a_prefix_s_line_breaks_are_read_as_the_corpus_reads_them(tmp_path: Path, mode: str) -> None:
    """A prompt pasted from a Windows or old-Mac file holds CR LF or CR; the corpus reader made those
    LF, so the prefix must too (a CR is no token of the vocabulary: the prefix was refused)."""
    path = tmp_path / "dos.txt"
    path.write_bytes(b"The\r\nTime\rMachine")
    assert preprocess_prefix("The\r\nTime\rMachine", mode) == "".join(preprocess(read_text(path), mode))
    assert preprocess_prefix("The\r\nTime\rMachine", "none") == "The\nTime\nMachine"
    assert preprocess_prefix("a\r\n\r\rb", mode) == "a\n\n\nb"


# -------------------------------------------------------------------------------------------------
# load_dataset on the real corpus


@pytest.fixture(scope="module")
def time_machine(corpus_path: Path):
    return load_dataset(DataConfig(path=str(corpus_path)))


def test_time_machine_has_170580_char_tokens_and_d2l_vocabulary(time_machine, corpus_path: Path) -> None:
    assert len(time_machine.tokens) == time_machine.total_tokens == 170_580
    assert time_machine.vocab.idx_to_token == D2L_VOCAB
    assert time_machine.tokens.dtype == torch.uint8
    assert time_machine.unknown_count == 0
    assert time_machine.sha1 == SHA1
    assert time_machine.path == corpus_path


def test_time_machine_decodes_to_the_d2l_text(time_machine) -> None:
    decoded = "".join(time_machine.vocab.to_tokens(time_machine.tokens[:60]))
    assert decoded == "the time machine by h g wellsithe time traveller for so it w"


def test_max_tokens_keeps_the_first_tokens_and_the_whole_vocabulary(corpus_path: Path, time_machine) -> None:
    first = load_dataset(DataConfig(path=str(corpus_path), max_tokens=10_000))
    assert len(first.tokens) == 10_000
    assert first.total_tokens == 170_580
    assert torch.equal(first.tokens, time_machine.tokens[:10_000])
    assert len(first.vocab) == 28
    assert first.vocab.idx_to_token == D2L_VOCAB


def test_word_tokens_follow_d2l_tokenize(corpus_path: Path) -> None:
    dataset = load_dataset(DataConfig(path=str(corpus_path), token="word"))
    words = [word for line in d2l_lines(corpus_path.read_text(encoding="utf-8")) for word in line.split()]
    assert len(dataset.tokens) == len(words)
    assert dataset.vocab.idx_to_token[:10] == [
        "<unk>",
        "the",
        "i",
        "and",
        "of",
        "a",
        "to",
        "was",
        "in",
        "that",
    ]
    assert len(dataset.vocab) == len(set(words)) + 1
    assert dataset.vocab.to_tokens(dataset.tokens[:8]) == words[:8]


def test_held_out_splits_are_contiguous_tail_segments(corpus_path: Path, time_machine) -> None:
    dataset = load_dataset(DataConfig(path=str(corpus_path), val_fraction=0.1, test_fraction=0.1))
    n = len(dataset.tokens)
    splits = dataset.splits
    assert len(splits.val) == int(n * 0.1) == 17_058
    assert len(splits.test) == int(n * 0.1)
    assert len(splits.train) == n - 2 * int(n * 0.1)
    assert torch.equal(torch.cat([splits.train, splits.val, splits.test]), time_machine.tokens)


def test_preprocess_none_gives_the_files_distinct_characters_plus_unk(corpus_path: Path) -> None:
    text = corpus_path.read_text(encoding="utf-8")
    dataset = load_dataset(DataConfig(path=str(corpus_path), preprocess="none"))
    assert len(dataset.tokens) == len(text) == SIZE  # the file is ASCII
    by_frequency = sorted(collections.Counter(text).items(), key=lambda item: item[1], reverse=True)
    assert dataset.vocab.idx_to_token == ["<unk>", *(char for char, _ in by_frequency)]
    assert len(dataset.vocab) == len(set(text)) + 1


def test_a_text_with_no_tokens_after_preprocessing_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "digits.txt"
    path.write_text("1898 1895\n-- 42 --\n", encoding="utf-8")
    with pytest.raises(DrnnError, match=r"no char tokens after data\.preprocess=d2l"):
        load_dataset(DataConfig(path=str(path)))


# A text that takes every reader's other path: a byte order mark, CR LF and a lone CR, accents (the
# byte path decodes UTF-8; ``lower`` of a non-ASCII text reads it as a str), words rarer than min_freq.
OWN_TEXT = "\ufeffÉté à Paris, l'été.\r\nThe Time Machine, by H. G. Wells\rthe end: the END\n".encode()


@pytest.mark.parametrize(
    ("own", "preprocess", "token", "min_freq"),
    [
        (False, "d2l", "char", 0),  # the presets' text and settings
        (False, "none", "word", 2),
        (True, "none", "char", 0),
        (True, "lower", "char", 2),
        (True, "letters", "char", 0),
        (True, "d2l", "word", 0),
        (True, "lower", "word", 2),
    ],
)
def test_the_vocabulary_built_without_torch_is_the_one_the_text_is_encoded_with(
    tmp_path: Path, corpus_path: Path, own: bool, preprocess: str, token: str, min_freq: int
) -> None:
    """``drnn presets`` sizes a preset's model from text_vocab (Counter's counts, no torch); training
    encodes with the vocabulary of token_tensors' counts: the same tokens, order and frequencies."""
    path = tmp_path / "own.txt"
    path.write_bytes(OWN_TEXT if own else corpus_path.read_bytes())
    config = DataConfig(path=str(path), preprocess=preprocess, token=token, min_freq=min_freq)
    built, read = load_dataset(config).vocab, text_vocab(path, config)
    assert (read.idx_to_token, read.token_freqs, read.min_freq) == (
        built.idx_to_token,
        built.token_freqs,
        built.min_freq,
    )
    if not own and token == "char":
        assert read.idx_to_token == D2L_VOCAB


@pytest.mark.parametrize(
    ("text", "settings"), [("1898 1895\n", {}), ("a b a\n", {"token": "word", "min_freq": 3})]
)
def test_a_text_without_a_vocabulary_is_refused_alike_without_torch(
    tmp_path: Path, text: str, settings: dict
) -> None:
    """No tokens after d2l's preprocessing, or none as frequent as min_freq: the same refusal."""
    path = tmp_path / "own.txt"
    path.write_text(text, encoding="utf-8")
    config = DataConfig(path=str(path), **settings)
    with pytest.raises(DrnnError) as encoding:
        load_dataset(config)
    with pytest.raises(DrnnError) as counting:
        text_vocab(path, config)
    assert str(counting.value) == str(encoding.value)


def test_a_missing_data_path_names_data_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DrnnError, match=r"does not exist; fix data\.path"):
        load_dataset(DataConfig(path=str(tmp_path / "absent.txt")))
    # a relative name is looked up from the current directory (not from a config file's folder): said
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DrnnError) as refused:
        load_dataset(DataConfig(path="../absent.txt"))
    assert str(refused.value).startswith(
        f"corpus file ../absent.txt does not exist in {tmp_path} (the current directory, where relative names "
        "are read from); fix data.path"
    )


# -------------------------------------------------------------------------------------------------
# drnn data


def last_json_line(stdout: str) -> dict:
    lines = stdout.strip().splitlines()
    assert lines, "nothing on stdout"
    payload = json.loads(lines[-1])
    assert isinstance(payload, dict)
    return payload


DATA_KEYS = {
    "corpus_tokens",
    "vocab_size",
    "idx_to_token",
    "train_tokens",
    "val_tokens",
    "test_tokens",
    "path",
    "sha1",
}


def test_drnn_data_json_on_a_custom_file(workdir: Path, cli) -> None:
    text = "Hello, World!\nhello again, world.\n"
    path = workdir / "mine.txt"
    path.write_text(text, encoding="utf-8")
    code, out, err = cli("data", "--set", f"data.path={path}", "--set", "data.preprocess=none", "--json")
    assert code == 0, err
    summary = last_json_line(out)
    assert summary.keys() >= DATA_KEYS
    assert summary["vocab_size"] == len(set(text)) + 1
    assert summary["idx_to_token"][0] == "<unk>"
    assert sorted(summary["idx_to_token"][1:]) == sorted(set(text))
    assert summary["corpus_tokens"] == summary["train_tokens"] == len(text)
    assert summary["val_tokens"] == summary["test_tokens"] == 0
    assert summary["path"] == str(path)
    assert summary["sha1"] == hashlib.sha1(text.encode()).hexdigest()


def test_drnn_data_lists_as_most_frequent_only_tokens_in_the_vocabulary(workdir: Path, cli) -> None:
    path = workdir / "counted.txt"
    path.write_text("aaaabbc", encoding="utf-8")  # with min_freq 2, c (once) is <unk>
    code, out, err = cli("data", "--set", f"data.path={path}", "--set", "data.preprocess=none",
                         "--set", "data.min_freq=2")  # fmt: skip
    assert code == 0, err
    row = next(line for line in out.splitlines() if "most frequent" in line)
    assert "'a' 4, 'b' 2 " in row + " " and "'c'" not in row
    # the tokens the run uses that the vocabulary lacks: min_freq's too (it said 0 without --init-from)
    code, out, err = cli("data", "--set", f"data.path={path}", "--set", "data.preprocess=none",
                         "--set", "data.min_freq=2", "--json")  # fmt: skip
    assert code == 0 and last_json_line(out)["unknown_tokens"] == 1, err


def test_drnn_data_json_on_the_default_corpus(workdir: Path, cli) -> None:
    code, out, err = cli("data", "--json")
    assert code == 0, err
    summary = last_json_line(out)
    assert summary.keys() >= DATA_KEYS
    assert summary["corpus_tokens"] == 170_580
    assert summary["vocab_size"] == 28
    assert summary["idx_to_token"] == D2L_VOCAB
    assert summary["sha1"] == SHA1
    # absolute, as every path --json prints: a script may read it from another directory
    assert summary["path"] == str(Path.cwd() / "data" / "timemachine.txt")


def test_drnn_data_on_a_text_too_short_to_train_says_what_train_would_say(workdir: Path, cli) -> None:
    code, out, err = cli("data", "--set", "data.max_tokens=500")
    assert code == 0, err
    notes = [line for line in out.splitlines() if line.startswith("note: ")]
    assert notes == [
        "note: drnn train would refuse this: the training split has 500 tokens but one minibatch of "
        "data.batch_size 32 × data.num_steps 35 needs 1,121; lower data.batch_size or data.num_steps, raise "
        "data.max_tokens, or use a longer text"
    ]
    # a bare drnn data describes the settings' defaults, and says so (test_presets.py)
    assert [line for line in cli("data")[1].splitlines() if "note:" in line] == [
        "note: no --config: this describes the settings' defaults (all of the corpus, minibatches of 32 × 35), "
        "which the presets change; drnn data --config PRESET describes what a preset trains on"
    ]
    summary = last_json_line(cli("data", "--set", "data.max_tokens=500", "--json")[1])
    assert (summary["minibatches_per_epoch"], summary["train_would_refuse"]) == (
        0,
        notes[0].removeprefix("note: drnn train would refuse this: "),
    )
    summary = last_json_line(cli("data", "--json")[1])  # 170,580 tokens: (170,580 - 1 - offset) // 32 // 35
    assert (summary["minibatches_per_epoch"], summary["train_would_refuse"]) == (152, None)


def test_drnn_data_notes_what_drnn_train_would_note_about_the_text(workdir: Path, cli) -> None:
    """drnn data is where one tunes data.preprocess and data.min_freq: it said nothing of what training
    then noted (d2l's preprocessing dropping a third of a text)."""
    text = workdir / "numbers.txt"
    text.write_text("the 1895 edition, page 42: the time traveller. " * 100)  # 4,700 bytes
    code, out, err = cli("data", "--set", f"data.path={text}")
    assert code == 0, err
    expected = (
        "data.preprocess d2l keeps the letters a-z and single spaces, lower-cased: 3,599 characters of this "
        "4,700-byte file (77% of its bytes); digits, punctuation, accented and other letters, case and line breaks are gone "
        "(data.preprocess none keeps the text as it is)"
    )
    assert f"note: {expected}" in out.splitlines()
    assert last_json_line(cli("data", "--set", f"data.path={text}", "--json")[1])["notes"] == [expected]


# 80 training characters of a and b; validation predicts one 'c'; the test split (its first token read, not
# predicted) predicts 'é' 3 times and '😀' twice among its 9: emoji in a test tail, as a user's trial had
UNSEEN_TEXT = "ab" * 40 + "ababcbabab" + "😀😀éa😀ébaéb"
UNSEEN_SETTINGS = ("data.preprocess=none", "data.val_fraction=0.1", "data.test_fraction=0.1")
UNSEEN_TEST_NOTE = (
    "5 of the 9 test predictions (55.56%) are tokens this run's training split never holds ('é', '😀'): the "
    "vocabulary holds such tokens, so they are scored as known, yet training never shows them to the model, and the "
    'split\'s perplexity counts them (README "Your own text, and held-out numbers that mean something")'
)


def test_held_out_predictions_of_tokens_the_training_split_never_holds_are_counted(workdir: Path) -> None:
    """The vocabulary is the whole text's (d2l's way), so a held-out character the training split lacks
    is scored as known though never trained on; <unk> (min_freq's cut) is the unknown count's instead."""
    path = workdir / "tail.txt"
    path.write_text(UNSEEN_TEXT, encoding="utf-8")
    config = DataConfig(path=str(path), preprocess="none", val_fraction=0.1, test_fraction=0.1)
    dataset = load_dataset(config)
    assert dataset.unseen_in_training("test") == UnseenInTraining(5, 9, ("é", "😀"), 2)
    assert dataset.unseen_in_training("val") == UnseenInTraining(1, 9, ("c",), 1)
    assert dataset.unseen_in_training("test", few=1) == UnseenInTraining(5, 9, ("é",), 2)
    # 'c' occurs once in the whole text: min_freq 2 makes it <unk>, which this count leaves out
    cut = load_dataset(config.model_copy(update={"min_freq": 2}))
    assert (cut.unseen_in_training("val").count, cut.unseen_in_training("test").count) == (0, 5)
    notes = data_notes(Config.model_validate({"data": config.model_dump()}), dataset, None)
    assert UNSEEN_TEST_NOTE in notes
    assert (
        "1 of the 9 validation predictions (11.11%) is a token this run's training split never holds ('c'): the "
        "vocabulary holds such tokens, so they are scored as known, yet training never shows them to the model, and the "
        'split\'s perplexity counts them (README "Your own text, and held-out numbers that mean something")'
    ) in notes


def test_the_unseen_tokens_note_words_a_fine_tuned_run_and_a_tiny_share_truthfully() -> None:
    """A fine-tuned model may have learned a token from its base run's text, which this run's training
    split does not show; a share below 0.01% is said as such, not as 0.00%."""
    unseen = UnseenInTraining(12, 318_076, ("é", "😀", "ß"), 5)
    assert unseen_in_training_note(unseen, "test", fine_tuned=True) == (
        "12 of the 318,076 test predictions (under 0.01%) are tokens this run's training split never holds "
        "('é', '😀', 'ß' and 2 more): the vocabulary holds such tokens, so they are scored as known, yet the "
        "model knows them only if its base run's text held them, and the split's perplexity "
        'counts them (README "Your own text, and held-out numbers that mean something")'
    )
    assert unseen_in_training_note(UnseenInTraining(0, 9, (), 0), "val") is None


def test_drnn_data_says_which_held_out_predictions_training_never_saw_and_where_splits_start(
    workdir: Path, cli
) -> None:
    path = workdir / "tail.txt"
    path.write_text(UNSEEN_TEXT, encoding="utf-8")
    settings = [arg for setting in (f"data.path={path}", *UNSEEN_SETTINGS) for arg in ("--set", setting)]
    summary = last_json_line(cli("data", *settings, "--json")[1])
    assert (summary["val_unseen_in_training"], summary["test_unseen_in_training"]) == (1, 5)
    assert (summary["train_start"], summary["val_start"], summary["test_start"]) == (0, 80, 90)
    assert UNSEEN_TEST_NOTE in summary["notes"]
    code, out, err = cli("data", *settings)
    assert code == 0 and f"note: {UNSEEN_TEST_NOTE}" in out.splitlines(), err
    # a text whose held-out splits hold only characters the training split has: nothing to say
    path.write_text("ab" * 50, encoding="utf-8")
    summary = last_json_line(cli("data", *settings, "--json")[1])
    assert (summary["val_unseen_in_training"], summary["test_unseen_in_training"]) == (0, 0)
    assert not [note for note in summary["notes"] if "training split never holds" in note]


def test_eval_tokens_without_a_validation_split_is_said_to_cap_nothing(workdir: Path, cli) -> None:
    """As train.patience's note says it cannot stop a run without validation: eval_tokens caps nothing."""
    summary = last_json_line(cli("data", "--set", "train.eval_tokens=5000", "--json")[1])
    assert summary["val_tokens"] == 0 and summary["notes"] == [
        "train.eval_tokens 5,000 caps what each validation predicts, and this run has none: it caps nothing "
        "(set data.val_fraction > 0 to validate)"
    ]
    summary = last_json_line(cli("data", "--set", "train.eval_tokens=5000", "--set", "data.val_fraction=0.1",
                                 "--json")[1])  # fmt: skip
    assert summary["notes"] == [
        "train.eval_tokens 5,000: the validation perplexities of this run (and its choice of best) predict the "
        "first 5,000 of the 17,057 validation tokens after the split's first (of 17,058); drnn eval --split val "
        "predicts them all"
    ]


def test_a_validation_split_read_in_rows_shorter_than_the_training_windows_is_said_to_be(workdir: Path, cli):
    """A 62-prediction validation split read as 16 rows of 3-4 tokens, each from a zero state, scored
    19.53 where one stream scored 13.51, and picked the best checkpoint; drnn eval said so, training did
    not (heldout33). The Time Machine's 170,580 characters: 0.0005 of them validate, 85 tokens, 84
    predictions in the default 32 rows of 2, where the windows are 35."""
    summary = last_json_line(cli("data", "--set", "data.val_fraction=0.0005", "--json")[1])
    assert summary["val_tokens"] == 85
    assert (
        "each validation reads its 84 predictions as 32 rows of about 2 tokens, each from a zero state (the "
        "training windows are 35 tokens): short rows change the perplexity, usually for the worse; yet they "
        "pick the best checkpoint (raise data.val_fraction; drnn eval --split val --rows 1 reads the split as "
        "one stream)"
    ) in summary["notes"]
    # 20% validates: 34,115 predictions, 32 rows of 1,066, no note
    summary = last_json_line(cli("data", "--set", "data.val_fraction=0.2", "--json")[1])
    assert not [note for note in summary["notes"] if "rows of about" in note]
    # a cap under 100 predictions is noise, as a split that small is (verify33): 10 in 10 rows of one
    summary = last_json_line(
        cli("data", "--set", "data.val_fraction=0.2", "--set", "train.eval_tokens=10", "--json")[1]
    )
    assert (
        "train.eval_tokens 10 validates on 10 prediction(s): perplexities over so few are noise, yet they pick "
        "the best checkpoint and drive patience (raise train.eval_tokens)"
    ) in summary["notes"]
    # a cap of 500 predictions: rows of 15, the cap among the fixes
    summary = last_json_line(
        cli("data", "--set", "data.val_fraction=0.2", "--set", "train.eval_tokens=500", "--json")[1]
    )
    assert any(
        "reads its 500 predictions as 32 rows of about 15 tokens" in note and "or train.eval_tokens;" in note
        for note in summary["notes"]
    )


def test_drnn_data_with_a_missing_file_is_one_line_on_stderr(workdir: Path, cli) -> None:
    code, _out, err = cli("data", "--set", "data.path=absent.txt", "--json")
    assert code != 0
    assert "absent.txt" in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(st.sampled_from(list("ab Z\n!\té9-")), max_size=80),
    mode=st.sampled_from(["d2l", "letters", "lower", "none"]),
)
def test_fast_character_preprocessing_equals_the_per_line_rule(text: str, mode: str):
    """preprocess_chars (vectorised, chunked) ≡ joining d2l's per-line pieces."""
    assert preprocess_chars(text, mode) == "".join(preprocess(text, mode))


def test_fast_character_preprocessing_across_chunk_boundaries(
    monkeypatch: pytest.MonkeyPatch, corpus_path: Path
):
    import drnn_cli.corpus as corpus

    text = read_text(corpus_path)[:20_000]
    monkeypatch.setattr(corpus, "_CHUNK_CHARS", 7)
    for mode in ("d2l", "letters"):
        assert corpus.preprocess_chars(text, mode) == "".join(preprocess(text, mode))


# Texts whose chunks, at 1 to 8 characters, end everywhere: inside a word, in a run of spaces or
# punctuation, at a line's leading or trailing spaces, on either side of a line break. d2l strips each
# line and glues the lines; letters reads the whole text as one line.
ONE_LINE_CASES = [
    ("  ab,cd  ef. ", "ab cd ef", "ab cd ef"),
    ("abcdefghij klm", "abcdefghij klm", "abcdefghij klm"),  # a word longer than a chunk
    ("Café—crème brûlée!", "caf cr me br l e", "caf cr me br l e"),  # each non-ASCII letter a non-letter
    ("ab, \n, cd", "abcd", "ab cd"),
    ("ab  cd \n  ef gh  \n\n ij", "ab cdef ghij", "ab cd ef gh ij"),
    ("ab\n!!!\ncd", "abcd", "ab cd"),
    (" x y z ", "x y z", "x y z"),
]


@pytest.mark.parametrize("chunk", range(1, 9))
@pytest.mark.parametrize(("text", "d2l", "letters"), ONE_LINE_CASES)
def test_a_long_line_preprocessed_in_chunks_reads_as_it_does_line_by_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, chunk: int, text: str, d2l: str, letters: str
):
    """A text of one long line was one chunk (chunks ended at line breaks only), whose words were a
    bytes object each: 18 bytes of memory a byte of text, 2 GB for 100 MB. Cut within lines, between
    words, the characters are d2l's line-by-line rule's, from the str path and from the byte path
    (which also reads a CR LF, here cut in two at some chunk sizes, as one line break)."""
    import drnn_cli.corpus as corpus

    monkeypatch.setattr(corpus, "_CHUNK_CHARS", chunk)
    for mode, expected in (("d2l", d2l), ("letters", letters)):
        assert "".join(preprocess(text, mode)) == expected  # the reference rule, by hand
        assert corpus.preprocess_chars(text, mode) == expected
        path = tmp_path / "one line.txt"
        path.write_bytes(text.replace("\n", "\r\n").encode("utf-8"))
        assert char_stream_bytes(path, mode) == expected.encode("ascii")


def test_a_text_of_one_line_takes_the_memory_of_the_same_text_in_lines(tmp_path: Path, monkeypatch):
    """Chunks ended at line breaks only: a 100 MB text of one line peaked at 2.0 GB (361 MB with line
    breaks). 1 MB of it, 16 KiB a chunk, peaked at 20.9 MB on both character paths and 9.8 MB on
    the word path, ten to thirty times the 2-3 MB and 0.3 MB the same text in lines of 80 took."""
    import random
    import tracemalloc

    import drnn_cli.corpus as corpus
    import drnn_cli.data as data_module

    monkeypatch.setattr(corpus, "_CHUNK_CHARS", 1 << 14)
    monkeypatch.setattr(data_module, "_WORD_CHUNK_CHARS", 1 << 14)
    one_line = "".join(random.Random(1).choices("abcdefghij, ", k=1_000_000))
    in_lines = "".join(c if i % 80 else "\n" for i, c in enumerate(one_line, 1))
    readers = {
        "str": lambda text, path: corpus.preprocess_chars(text, "d2l"),
        "bytes": lambda text, path: char_stream_bytes(path, "d2l"),
        "words": lambda text, path: sum(len(words) for words in data_module._word_chunks(text, "d2l")),
    }
    for name, read in readers.items():
        peaks = []
        for text in (one_line, in_lines):
            path = tmp_path / "text.txt"
            path.write_text(text)
            tracemalloc.start()
            try:
                read(text, path)
                peaks.append(tracemalloc.get_traced_memory()[1])
            finally:
                tracemalloc.stop()
        assert peaks[0] < 1.25 * peaks[1], (name, peaks)


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 8])
def test_the_words_of_a_long_line_are_split_in_chunks_as_they_are_whole(
    monkeypatch: pytest.MonkeyPatch, chunk: int
):
    """Word chunks ended at line breaks only, so a text of one line was one list of all its words; cut
    after a space too, no word is split (lower-casing a final sigma included: ΣΟΦΟΣ ends in ς)."""
    import drnn_cli.data as data_module

    text = "The Time-Machine,  by H. G. Wells;\n  ΣΟΦΟΣ σοφός  "
    monkeypatch.setattr(data_module, "_WORD_CHUNK_CHARS", chunk)
    for mode, expected in [
        ("d2l", ["the", "time", "machine", "by", "h", "g", "wells"]),  # Greek letters are not a-z
        ("letters", ["the", "time", "machine", "by", "h", "g", "wells"]),
        ("lower", ["the", "time-machine,", "by", "h.", "g.", "wells;", "σοφο\u03c2", "σοφός"]),
        ("none", ["The", "Time-Machine,", "by", "H.", "G.", "Wells;", "ΣΟΦΟΣ", "σοφός"]),
    ]:
        assert [word for words in data_module._word_chunks(text, mode) for word in words] == expected


@pytest.mark.parametrize("mode", ["d2l", "letters", "lower", "none"])
def test_a_word_text_is_counted_and_encoded_a_chunk_of_lines_at_a_time_as_it_is_whole(
    monkeypatch: pytest.MonkeyPatch, corpus_path: Path, mode: str
):
    """Words were one list of str objects for the whole text, about 18 bytes a byte of text (a 100 MB
    text peaked at 1.8 GB); counted and encoded per chunk of whole lines (7 characters here, so nearly
    every line is a chunk boundary), the vocabulary, its first-seen order of ties, the ids and the
    unknown counts are those of the whole text."""
    import drnn_cli.data as data_module
    from drnn_cli.token_tensors import count_tokens, encode_tokens
    from drnn_cli.vocab import Vocab, tokens_of

    text = read_text(corpus_path)[:30_000] + "\nlast line without a break"
    path = corpus_path.parent / "unused"  # only named in errors
    config = DataConfig(preprocess=mode, token="word")
    whole = tokens_of(preprocess(text, mode), "word")
    monkeypatch.setattr(data_module, "_WORD_CHUNK_CHARS", 7)
    monkeypatch.setattr(data_module, "read_text", lambda *_args: text)
    built = data_module._encode_words(path, config, None)
    assert built.vocab.idx_to_token == Vocab.from_counts(count_tokens(whole)).idx_to_token
    assert torch.equal(built.tokens, encode_tokens(whole, built.vocab))
    fixed = Vocab(["<unk>", "the", "time", "machine"])
    again = data_module._encode_words(path, config, fixed)
    assert torch.equal(again.tokens, encode_tokens(whole, fixed))
    assert (
        again.unknown == collections.Counter(t for t in whole if t not in fixed)
        and sum(again.unknown.values()) > 0
    )


def _text(total_tokens: int, file_bytes: int | None, used: str = "ab", vocabulary: str = "ab") -> Any:
    """What own_text_notes reads of a dataset: its size, its file's, and the tokens used with their vocabulary."""
    from drnn_cli.vocab import Vocab

    vocab = Vocab(["<unk>", *vocabulary])
    return SimpleNamespace(
        total_tokens=total_tokens,
        file_bytes=lambda: file_bytes,
        tokens=torch.tensor([vocab[c] for c in used]),
        vocab=vocab,
    )


def test_a_text_of_ones_own_hears_what_a_presets_cap_and_d2ls_preprocessing_keep_of_it() -> None:
    """Settings made for the Time Machine, met by one's own text (data.path): a preset's max_tokens,
    and d2l's letters-only preprocessing of a Python source file (65% of its bytes kept as characters)."""
    notes = own_text_notes(DataConfig(path="mine.txt", max_tokens=10_000), _text(1_946_553, 3_011_731))
    assert notes == [
        "data.max_tokens 10,000 uses the first 10,000 of this text's 1,946,553 chars, all of them to train; "
        "data.max_tokens -1 takes all",
        "data.preprocess d2l keeps the letters a-z and single spaces, lower-cased: 1,946,553 characters of this "
        "3,011,731-byte file (65% of its bytes); digits, punctuation, accented and other letters, case and line "
        "breaks are gone (data.preprocess none keeps the text as it is)",
    ]
    # held-out fractions are cut from those first tokens, not from the text's tail (a trial read "trains on
    # the first 3,000" as the training split's size): 10% of 3,000 each, the rest trains
    capped = DataConfig(
        path="mine.txt", preprocess="none", max_tokens=3_000, val_fraction=0.1, test_fraction=0.1
    )
    assert own_text_notes(capped, _text(318_076, 318_076)) == [
        "data.max_tokens 3,000 uses the first 3,000 of this text's 318,076 chars, and its splits share them: "
        "2,400 training, 300 validation and 300 test; data.max_tokens -1 takes all"
    ]
    (validated,) = own_text_notes(capped.model_copy(update={"test_fraction": 0.0}), _text(318_076, 318_076))
    assert "and its splits share them: 2,700 training and 300 validation;" in validated
    # a text that does not space its words, in word tokens: each line was one "word", without a note
    (unspaced,) = own_text_notes(
        DataConfig(path="zh.txt", token="word", preprocess="none"), _text(200, 18_000)
    )
    assert unspaced == (
        "data.token word splits on white space, and this text has little: 200 words in 18,000 bytes, 90 bytes a "
        "word (a text that does not space its words, as Chinese or Japanese, is read a line or a sentence a word); "
        "data.token char suits it"
    )
    assert (
        own_text_notes(DataConfig(path="en.txt", token="word", preprocess="none"), _text(3_000, 18_000)) == []
    )
    # fine-tuning keeps the checkpoint's preprocessing: a --set of another is refused, so it is not advised
    (tuned,) = own_text_notes(
        DataConfig(path="mine.txt", max_tokens=-1), _text(1_946_553, 3_011_731), fine_tuning=True
    )
    assert tuned.endswith(
        "(the checkpoint's preprocessing, which --init-from keeps: a new run without it and with "
        "data.preprocess none keeps the text as it is)"
    )
    # the Time Machine itself through data.path keeps 95%: nothing to say; nor for the registered corpus,
    # for a text kept as it is, or for word tokens
    assert own_text_notes(DataConfig(path="timemachine.txt"), _text(170_580, 178_979)) == []
    assert own_text_notes(DataConfig(max_tokens=10_000), _text(170_580, 178_979)) == []
    assert own_text_notes(DataConfig(path="mine.txt", preprocess="none"), _text(1_000, 3_000)) == []
    assert own_text_notes(DataConfig(path="mine.txt", token="word"), _text(1_000, 3_000)) == []
    assert own_text_notes(DataConfig(path="mine.txt"), _text(1_000, None)) == []  # its size unknown


def test_a_cap_that_leaves_most_of_the_vocabulary_unused_says_so():
    """The vocabulary is read from the whole text, as d2l's: 1,406 outputs for the 189 characters of a
    20 MB text's first 4,000,000 made a bigger, slower model without a word (own40). A fine-tuned run
    keeps its base's vocabulary: nothing to say of it."""
    capped = DataConfig(path="big.txt", preprocess="none", max_tokens=3)
    (note,) = own_text_notes(capped, _text(20, 20, used="aab", vocabulary="abcdef"))
    assert note == (
        "data.max_tokens 3 uses the first 3 of this text's 20 chars, all of them to train; data.max_tokens -1 "
        "takes all; the vocabulary is read from all of it: 4 of its 7 chars never occur in the part used, yet "
        "the output layer computes all 7 at every step (a file of that part alone gives a vocabulary of about 3)"
    )
    assert own_text_notes(capped, _text(20, 20, used="aab", vocabulary="abcdef"), fine_tuning=True) == [
        "data.max_tokens 3 uses the first 3 of this text's 20 chars, all of them to train; data.max_tokens -1 takes all"
    ]
    (whole,) = own_text_notes(capped, _text(20, 20, used="aba", vocabulary="ab"))  # <unk> unused: no matter
    assert whole.endswith("data.max_tokens -1 takes all")
    # under a quarter unused (5 of the Time Machine's 71 characters past its first 10,000): nothing said
    (few,) = own_text_notes(capped, _text(20, 20, used="abc", vocabulary="abcd"))  # 1 of 5
    assert few.endswith("data.max_tokens -1 takes all")


def test_the_files_read_as_the_same_text_are_its_lf_and_crlf_forms_with_and_without_a_byte_order_mark(
    tmp_path: Path,
):
    """A CR LF lands on the 1 MiB block boundary the reader hashes at, and the text ends with a lone CR:
    each is one line break whichever form the file takes."""
    body = b"a" * ((1 << 20) - 1) + b"\r\nnext line\rlast\r"  # the CR of the first CR LF ends a block
    text = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n")  # what read_text makes of it
    mark = b"\xef\xbb\xbf"
    forms = {text, text.replace(b"\n", b"\r\n"), mark + text, mark + text.replace(b"\n", b"\r\n")}
    expected = frozenset(hashlib.sha1(form).hexdigest() for form in forms)
    for written in (body, mark + body, *forms):
        path = tmp_path / "text.txt"
        path.write_bytes(written)
        assert same_text_sha1s(path) == expected
    path.write_bytes(text + b"!")
    assert not same_text_sha1s(path) & expected


def test_a_files_text_sha1_is_that_of_the_text_read_text_reads_whatever_its_line_breaks(tmp_path: Path):
    """One read of a file gives its bytes' SHA-1 and its text's: every form of one text, its line
    breaks mixed or not, with a byte order mark or not, has the text SHA-1 of its LF form. A CR LF
    across the 1 MiB block boundary and a lone CR at the end are each one line break, as read."""
    mixed = b"a" * ((1 << 20) - 1) + b"\r\nnext line\rlast\nend\r"  # the CR of the first CR LF ends a block
    lf = b"a" * ((1 << 20) - 1) + b"\nnext line\nlast\nend\n"
    path = tmp_path / "text.txt"
    for written in (mixed, b"\xef\xbb\xbf" + mixed, lf, lf.replace(b"\n", b"\r\n"), b"\xef\xbb\xbf" + lf):
        path.write_bytes(written)
        assert read_text(path).encode() == lf
        assert hash_corpus(path) == (hashlib.sha1(written).hexdigest(), hashlib.sha1(lf).hexdigest())
    path.write_bytes(mixed.replace(b"last", b"least"))
    assert hash_corpus(path).text != hashlib.sha1(lf).hexdigest()
