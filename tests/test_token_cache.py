"""The token cache: a big text is encoded once, memory-mapped after, rebuilt when a key changes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from drnn_cli import data as data_module
from drnn_cli import token_cache
from drnn_cli.config import DataConfig
from drnn_cli.corpus import CorpusSha1s
from drnn_cli.data import Dataset, load_dataset
from drnn_cli.errors import DrnnError
from drnn_cli.token_cache import MIN_CACHED_BYTES, STAMP_MAX_BYTES
from drnn_cli.vocab import Vocab


@pytest.fixture
def big_text(workdir: Path, corpus_path: Path) -> Path:
    text = workdir / "big.txt"
    text.write_bytes(corpus_path.read_bytes() * 6)  # 1.07 MB: over the 1 MiB threshold
    assert text.stat().st_size >= MIN_CACHED_BYTES
    return text


def words_seen_fewer_than(min_freq: int, text: Path) -> Counter:
    """The whitespace-separated words of an unpreprocessed text that ``data.min_freq`` leaves out of a word
    vocabulary, with their counts: counted here apart from drnn's own encoding."""
    counts = Counter(text.read_text(encoding="utf-8").split())
    return Counter({word: count for word, count in counts.items() if count < min_freq})


def entries(workdir: Path) -> list[Path]:
    return sorted((workdir / "data" / "token-cache").glob("*.json"))


def no_encoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*_args: object) -> None:
        raise AssertionError("the text was encoded again instead of read from the cache")

    monkeypatch.setattr(data_module, "_encode", fail)


def test_second_load_is_memory_mapped_from_the_cache(workdir: Path, big_text: Path, monkeypatch):
    config = DataConfig(path=str(big_text), preprocess="none", val_fraction=0.1)
    first = load_dataset(config)
    assert [p.name.split("-")[0] for p in entries(workdir)] == ["big"]
    no_encoding(monkeypatch)
    again = load_dataset(config)
    assert torch.equal(first.tokens, again.tokens) and again.tokens.dtype == torch.uint8
    assert again.vocab.idx_to_token == first.vocab.idx_to_token
    assert again.vocab.token_freqs == first.vocab.token_freqs
    assert (again.sha1, again.total_tokens) == (first.sha1, len(big_text.read_text()))
    assert torch.equal(again.splits.val, first.splits.val)
    tokens_file = entries(workdir)[0].with_suffix(".tokens")
    assert tokens_file.stat().st_size == first.total_tokens  # one byte per character token
    mapping = _mapping_of(tokens_file)
    assert mapping is None or mapping[0], "the second load read the tokens instead of mapping them"


def test_drnn_cache_dir_keeps_the_token_cache_out_of_the_corpus_folder(
    workdir: Path, big_text: Path, monkeypatch: pytest.MonkeyPatch
):
    """DRNN_DATA_DIR may be a shared, read-only corpus mirror: one's own texts' caches go elsewhere."""
    own = workdir / "my-cache"
    monkeypatch.setenv("DRNN_CACHE_DIR", str(own))
    config = DataConfig(path=str(big_text), preprocess="none")
    first = load_dataset(config)
    assert [p.name.split("-")[0] for p in own.glob("*.json")] == ["big"] and entries(workdir) == []
    no_encoding(monkeypatch)  # the second load reads the entry there
    assert torch.equal(load_dataset(config).tokens, first.tokens)


def test_a_changed_preprocessing_token_vocabulary_or_text_builds_a_new_entry(
    workdir: Path, big_text: Path, monkeypatch
):
    base = DataConfig(path=str(big_text), preprocess="none")
    load_dataset(base)
    load_dataset(DataConfig(path=str(big_text), preprocess="d2l"))
    load_dataset(DataConfig(path=str(big_text), preprocess="none", token="word"))
    load_dataset(DataConfig(path=str(big_text), preprocess="none", min_freq=5))
    assert len(entries(workdir)) == 4
    big_text.write_bytes(big_text.read_bytes() + b"one more line\n")
    grown = load_dataset(base)
    # the edited text's entry replaces the four of its earlier contents, which no run can use again
    assert len(entries(workdir)) == 1 and grown.tokens[-14:].tolist() == [
        grown.vocab[c] for c in "one more line\n"
    ]
    assert len(list((workdir / "data" / "token-cache").glob("*.tokens"))) == 1
    no_encoding(monkeypatch)
    assert torch.equal(load_dataset(base).tokens, grown.tokens)  # the grown text's own entry


def test_a_fixed_vocabulary_keeps_its_unknown_counts_in_the_cache(workdir: Path, big_text: Path, monkeypatch):
    vocab = Vocab(["<unk>", *"abcdefghijklmnopqrstuvwxyz "])
    config = DataConfig(path=str(big_text), preprocess="none")
    first = load_dataset(config, vocab=vocab)
    assert first.unknown["T"] > 0 and first.unknown_count > 0
    no_encoding(monkeypatch)
    again = load_dataset(config, vocab=vocab)
    assert again.unknown == first.unknown and isinstance(again.unknown, Counter)
    assert torch.equal(again.tokens, first.tokens)


def test_a_torn_entry_is_rebuilt(workdir: Path, big_text: Path):
    config = DataConfig(path=str(big_text), preprocess="none")
    first = load_dataset(config)
    tokens_file = entries(workdir)[0].with_suffix(".tokens")
    tokens_file.write_bytes(tokens_file.read_bytes()[:1000])
    again = load_dataset(config)
    assert torch.equal(again.tokens, first.tokens)
    assert tokens_file.stat().st_size == first.total_tokens


def test_an_entry_whose_vocabulary_lists_a_token_twice_is_rebuilt(workdir: Path, big_text: Path):
    """Used as is, the tampered entry's vocabulary could never spell "n": a run trained on it would
    lack a character of its text."""
    config = DataConfig(path=str(big_text), preprocess="none")
    first = load_dataset(config)
    meta_file = entries(workdir)[0]
    meta = json.loads(meta_file.read_text())
    assert meta["vocab"]["idx_to_token"][4:6] == ["a", "n"]
    meta["vocab"]["idx_to_token"][5] = "a"
    meta_file.write_text(json.dumps(meta))
    again = load_dataset(config)
    assert again.vocab.idx_to_token == first.vocab.idx_to_token and again.vocab["n"] == 5
    assert torch.equal(again.tokens, first.tokens)
    assert json.loads(meta_file.read_text())["vocab"]["idx_to_token"][5] == "n"  # the entry was rewritten


@pytest.mark.parametrize("fixed", [False, True], ids=["built", "fixed-vocabulary"])
def test_an_entry_holding_ids_past_its_vocabulary_is_rebuilt(workdir: Path, big_text: Path, fixed: bool):
    """Ids 250-252 in a vocabulary of a few dozen tokens used to train silently and fail in ``drnn
    eval`` ("Class values must be smaller than num_classes")."""
    vocab = Vocab(["<unk>", *"abcdefghijklmnopqrstuvwxyz "]) if fixed else None
    config = DataConfig(path=str(big_text), preprocess="none")
    first = load_dataset(config, vocab=vocab)
    tokens_file = entries(workdir)[0].with_suffix(".tokens")
    data = bytearray(tokens_file.read_bytes())
    data[100:103] = bytes([250, 251, 252])
    tokens_file.write_bytes(bytes(data))
    again = load_dataset(config, vocab=vocab)
    assert torch.equal(again.tokens, first.tokens) and int(again.tokens.max()) < len(again.vocab)
    assert tokens_file.read_bytes()[100:103] == bytes(first.tokens[100:103].tolist())


def test_an_entry_whose_unknown_counts_are_no_counts_is_rebuilt(workdir: Path, big_text: Path):
    """``--init-from`` sums them to judge the share of unknown tokens: a string there was a TypeError."""
    vocab = Vocab(["<unk>", *"abcdefghijklmnopqrstuvwxyz "])
    config = DataConfig(path=str(big_text), preprocess="none")
    first = load_dataset(config, vocab=vocab)
    meta_file = entries(workdir)[0]
    meta = json.loads(meta_file.read_text())
    meta["unknown"]["T"] = "many"
    meta_file.write_text(json.dumps(meta))
    again = load_dataset(config, vocab=vocab)
    assert again.unknown == first.unknown and again.unknown_count == first.unknown_count > 0


def test_an_entry_keyed_by_a_fixed_vocabulary_that_holds_another_is_rebuilt(workdir: Path, big_text: Path):
    """The key names the fixed vocabulary; an entry whose own vocabulary differs was edited, and its ids
    would mean other tokens than the checkpoint's."""
    vocab = Vocab(["<unk>", *"abcdefghijklmnopqrstuvwxyz "])
    config = DataConfig(path=str(big_text), preprocess="none")
    first = load_dataset(config, vocab=vocab)
    meta_file = entries(workdir)[0]
    meta = json.loads(meta_file.read_text())
    meta["vocab"]["idx_to_token"][1:3] = ["b", "a"]
    meta_file.write_text(json.dumps(meta))
    again = load_dataset(config, vocab=vocab)
    assert again.vocab.idx_to_token == vocab.idx_to_token and torch.equal(again.tokens, first.tokens)


def test_a_text_rewritten_within_one_mtime_tick_is_hashed_again(workdir: Path, big_text: Path):
    config = DataConfig(path=str(big_text), preprocess="none")
    first = load_dataset(config)
    stamp = os.stat(big_text)
    content = bytearray(big_text.read_bytes())
    content[:4] = b"XYZW"  # same size
    big_text.write_bytes(bytes(content))
    os.utime(big_text, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))  # and the same timestamp
    again = load_dataset(config)
    assert again.sha1 != first.sha1
    assert again.vocab.to_tokens(again.tokens[:4]) == list("XYZW")


def test_an_old_stable_text_reuses_its_remembered_hash(workdir: Path, big_text: Path, monkeypatch):
    old = 1_600_000_000_000_000_000
    os.utime(big_text, ns=(old, old))  # modified long before it is hashed: the stamp can be trusted
    config = DataConfig(path=str(big_text), preprocess="none")
    first = load_dataset(config)
    stamps = list((workdir / "data" / "token-cache").glob("*.sha1"))
    assert len(stamps) == 1 and json.loads(stamps[0].read_text())["sha1"] == first.sha1
    monkeypatch.setattr("drnn_cli.token_cache.hash_corpus", lambda _path: pytest.fail("hashed again"))
    assert load_dataset(config).sha1 == first.sha1


def test_a_hash_stamp_an_earlier_drnn_wrote_without_the_texts_sha1_is_hashed_again(
    workdir: Path, big_text: Path
):
    """The stamp remembers the SHA-1 of the text as read beside the file's, one read for both; a stamp
    that holds the file's alone (or a text SHA-1 that is no SHA-1) gives no text SHA-1 for a checkpoint to
    record: the file is hashed again."""
    lf = big_text.read_bytes()
    crlf = lf.replace(b"\n", b"\r\n")
    big_text.write_bytes(crlf)
    old = 1_600_000_000_000_000_000
    os.utime(big_text, ns=(old, old))
    config = DataConfig(path=str(big_text), preprocess="none")
    sha1s = (hashlib.sha1(crlf).hexdigest(), hashlib.sha1(lf).hexdigest())
    first = load_dataset(config)
    (stamp,) = (workdir / "data" / "token-cache").glob("*.sha1")
    remembered = json.loads(stamp.read_text())
    assert (first.sha1, first.text_sha1) == (remembered["sha1"], remembered["text_sha1"]) == sha1s
    for spoiled in ({"text_sha1": None}, {"text_sha1": ""}, {"sha1": sha1s[0].upper()}):
        stamp.write_text(json.dumps({name: value for name, value in (remembered | spoiled).items() if value}))
        again = load_dataset(config)
        assert (again.sha1, again.text_sha1) == sha1s, spoiled
        assert json.loads(stamp.read_text())["text_sha1"] == sha1s[1]


def test_an_old_text_edited_with_its_timestamp_put_back_is_hashed_again(workdir: Path, big_text: Path):
    """``sed -i …; touch -r saved big.txt``: size and mtime as remembered, but the inode (sed writes a
    new file) and the change time differ, and the stamp is not trusted."""
    old = 1_600_000_000_000_000_000
    os.utime(big_text, ns=(old, old))
    config = DataConfig(path=str(big_text), preprocess="none")
    first = load_dataset(config)
    content = bytearray(big_text.read_bytes())
    content[:4] = b"XYZW"
    replacement = big_text.with_name("edited.tmp")
    replacement.write_bytes(bytes(content))
    os.replace(replacement, big_text)
    os.utime(big_text, ns=(old, old))
    again = load_dataset(config)
    assert again.sha1 != first.sha1 and again.vocab.to_tokens(again.tokens[:4]) == list("XYZW")


def test_a_cache_that_cannot_be_written_is_skipped(workdir: Path, big_text: Path):
    """A text whose name is near the 255-byte limit (cache names add a digest) and a cache folder that
    is a file: the data loads all the same, as if there were no cache."""
    wide = big_text.rename(workdir / ("é" * 120 + ".txt"))  # 240 bytes: cut to 64 bytes, not 64 characters
    load_dataset(DataConfig(path=str(wide), preprocess="none"))
    assert len(entries(workdir)) == 1
    (workdir / "data" / "token-cache").rename(workdir / "data" / "wide-cache")
    long_text = wide.rename(workdir / ("a" * 230 + ".txt"))
    first = load_dataset(DataConfig(path=str(long_text), preprocess="none"))
    assert len(entries(workdir)) == 1  # the name was cut, not refused
    (workdir / "data" / "token-cache").rename(workdir / "data" / "elsewhere")
    (workdir / "data" / "token-cache").write_text("not a folder")
    again = load_dataset(DataConfig(path=str(long_text), preprocess="lower"))  # a new entry it cannot store
    assert again.total_tokens == first.total_tokens and again.sha1 == first.sha1
    assert first.notes == ()  # stored
    # ... and says so once, or a 100 MB text would be read and encoded again every run without a word
    cache = workdir / "data" / "token-cache"
    assert again.notes == (
        f"the token cache in {cache} cannot be written ({cache} is a file, not a folder): this text is read "
        "and encoded again on every run (set DRNN_CACHE_DIR to a writable folder)",
    )  # not mkdir's "File exists", which names no file


def test_an_entry_whose_json_cannot_be_written_leaves_no_tokens_file(workdir: Path, big_text: Path):
    """The tokens file is written first, as large as the text: without its JSON it is no entry, and
    was left for good (a disk that fills up between the two leaves it full)."""
    config = DataConfig(path=str(big_text), preprocess="none")
    load_dataset(config)
    (meta,) = entries(workdir)
    meta.unlink()
    meta.with_suffix(".tokens").unlink()
    meta.mkdir()  # the JSON's rename fails as on a full disk, after the tokens file is written
    again = load_dataset(config)
    cache = workdir / "data" / "token-cache"
    assert again.notes == (
        f"the token cache cannot keep this text: {meta} is a folder, where its entry goes; remove it, or "
        "this text is read and encoded again on every run",
    )
    assert sorted(path.suffix for path in cache.iterdir()) == [".json", ".sha1"]  # the folder, the hash


def test_drnn_train_and_data_say_when_the_token_cache_cannot_be_written(workdir: Path, big_text: Path, cli):
    (workdir / "data").mkdir(exist_ok=True)
    (workdir / "data" / "token-cache").write_text("not a folder")
    said = "the token cache in"
    code, out, err = cli("data", "--config", "quick", "--set", f"data.path={big_text}")
    assert code == 0 and said in out + err
    overrides = ["--set", f"data.path={big_text}", "--set", "train.epochs=1", "--set", "data.max_tokens=3000"]
    code, out, err = cli("train", "--config", "quick", "--run", str(workdir / "run"), *overrides)
    assert code == 0, err
    assert said in " ".join((out + err).split()) and "set DRNN_CACHE_DIR to a writable folder" in " ".join(
        (out + err).split()
    )


def test_drnn_eval_of_a_split_says_when_the_token_cache_cannot_be_written(workdir: Path, big_text: Path, cli):
    """``drnn eval`` reads a split through the token cache as training does (with the checkpoint's
    vocabulary), so a cache it cannot write costs it the same full encoding every time: it says so.
    ``--data FILE`` is encoded apart from the cache, and says nothing."""
    overrides = ["--set", f"data.path={big_text}", "--set", "train.epochs=1", "--set", "data.max_tokens=3000"]
    code, _out, err = cli("train", "--config", "quick", "--run", str(workdir / "run"), *overrides)
    assert code == 0, err
    cache = workdir / "data" / "token-cache"
    cache.rename(workdir / "data" / "elsewhere")
    cache.write_text("not a folder")
    note = (
        f"note: the token cache in {cache} cannot be written ({cache} is a file, not a folder): this text is "
        "read and encoded again on every run (set DRNN_CACHE_DIR to a writable folder)"
    )
    trained_on = (
        "note: this is the split the run trained on: "  # and why eval's figure differs from training's
    )

    def notes(err: str) -> list[str]:
        return [line[: len(trained_on)] if line.startswith(trained_on) else line for line in err.splitlines()]

    code, out, err = cli("eval", "--run", str(workdir / "run"), "--split", "train", "--json")
    assert code == 0, err
    assert json.loads(out)["split"] == "train"  # stdout stays one JSON object: the note is on stderr
    assert [line for line in notes(err) if line.startswith("note: ")] == [note, trained_on]
    code, out, err = cli("eval", "--run", str(workdir / "run"), "--split", "train")
    assert code == 0 and [line for line in notes(err) if line.startswith("note: ")] == [note, trained_on]
    assert f"{big_text} [train]: perplexity " in out and len(out.splitlines()) == 1  # the result alone
    excerpt = workdir / "excerpt.txt"
    excerpt.write_text("the time traveller was expounding a recondite matter to us\n")
    code, out, err = cli("eval", "--run", str(workdir / "run"), "--data", str(excerpt), "--rows", "1")
    assert code == 0 and "token cache" not in out + err


def test_small_texts_are_not_cached(workdir: Path):
    load_dataset(DataConfig(preprocess="none"))  # the 179 kB Time Machine
    assert entries(workdir) == []


def test_resume_and_eval_reuse_the_entry_of_the_vocabulary_the_text_builds(
    workdir: Path, big_text: Path, monkeypatch
):
    config = DataConfig(path=str(big_text), preprocess="none")
    built = load_dataset(config)
    no_encoding(monkeypatch)
    fixed = Vocab.from_json(built.vocab.to_json())  # as a checkpoint stores it
    again = load_dataset(config, vocab=fixed)
    assert torch.equal(again.tokens, built.tokens) and again.unknown == Counter()
    assert len(entries(workdir)) == 1


def test_a_tokens_file_swapped_in_from_another_text_is_rebuilt(workdir: Path, big_text: Path):
    """Two texts of one size and alphabet (the second is the first backwards): their entries' token files
    have the same length and ids in range, so a swapped file used to be read as the other text's."""
    reversed_text = workdir / "reversed.txt"
    reversed_text.write_bytes(big_text.read_bytes()[::-1])
    first = load_dataset(DataConfig(path=str(big_text), preprocess="none"))
    load_dataset(DataConfig(path=str(reversed_text), preprocess="none"))
    ours, theirs = (
        next((workdir / "data" / "token-cache").glob(f"{n}-*.tokens")) for n in ("big", "reversed")
    )
    assert ours.stat().st_size == theirs.stat().st_size
    os.replace(theirs, ours)
    again = load_dataset(DataConfig(path=str(big_text), preprocess="none"))
    assert again.vocab.to_tokens(again.tokens[:20]) == list(big_text.read_text()[:20])
    assert torch.equal(again.tokens, first.tokens)


def _mapping_of(path: Path) -> tuple[bool, int] | None:
    """Whether this process maps ``path``, and the resident KiB of its mappings (Linux: /proc/self/smaps;
    None without it). A file read whole is not mapped at all: 0 KiB resident would say nothing."""
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return None
    total, inside, found = 0, False, False
    for line in lines:
        fields = line.split()
        if (
            "-" in fields[0] and len(fields) >= 5
        ):  # a mapping's header line: range, perms, offset, dev, inode, path
            inside = len(fields) >= 6 and fields[5] == str(path)
            found |= inside
        elif inside and fields[0] == "Rss:":
            total += int(fields[1])
    return found, total


def test_a_reload_maps_the_tokens_without_reading_them(workdir: Path, big_text: Path):
    """README: a reload from the cache costs no more than the torch import, the corpus paged in as
    training reads it. A check that scanned every id paged the whole file in (a 200 MB text's reload
    peaked at 427 MiB against 235)."""
    config = DataConfig(path=str(big_text), preprocess="none")
    load_dataset(config)
    again = load_dataset(config)
    tokens_file = entries(workdir)[0].with_suffix(".tokens").resolve()
    mapping = _mapping_of(tokens_file)
    if mapping is None:
        pytest.skip("no /proc/self/smaps on this system")
    mapped, resident = mapping
    assert mapped, "the tokens were read into memory, not mapped"
    assert resident < 256, f"{resident} KiB of the {tokens_file.stat().st_size // 1024} KiB entry paged in"
    assert len(again.tokens) == again.total_tokens  # keeps the mapping alive until the check above


def test_a_killed_writers_partial_tokens_file_is_removed(workdir: Path, big_text: Path):
    """A process killed while writing an entry left its ``.NAME.tokens.PID.part`` (as big as the
    text) for good; a live writer's is kept."""
    cache = workdir / "data" / "token-cache"
    cache.mkdir(parents=True)
    dead = cache / ".big-0123456789abcdef0123.tokens.999999999.part"  # no such process
    live = cache / f".big-0123456789abcdef0123.tokens.{os.getpid()}.part"
    dead.write_bytes(b"\0" * 4096)
    live.write_bytes(b"\0" * 4096)
    # not a process number, though str.isdigit says so (int() then raised: an internal error each run)
    stray = cache / ".big-0123456789abcdef0123.tokens.\u00b2.part"
    stray.write_bytes(b"\0")
    # an entry's JSON is written through a .NAME.json.XXXX.tmp in milliseconds: one an hour old is a
    # killed writer's, one from now may be a live one's
    abandoned, fresh = cache / ".big-0123.json.a1b2c3.tmp", cache / ".big-4567.json.d4e5f6.tmp"
    abandoned.write_text("{")
    fresh.write_text("{")
    os.utime(abandoned, (time.time() - 3700, time.time() - 3700))
    load_dataset(DataConfig(path=str(big_text), preprocess="none"))
    assert not dead.exists() and live.exists() and stray.exists()
    assert not abandoned.exists() and fresh.exists()


def test_a_killed_writers_hash_stamp_temporary_is_removed(workdir: Path, big_text: Path):
    """The text's remembered SHA-1 (``NAME.sha1``) is written through a ``.NAME.sha1.XXXX.tmp`` like an
    entry's JSON: one an hour old is a killed writer's and goes, one from now may be a live one's."""
    cache = workdir / "data" / "token-cache"
    cache.mkdir(parents=True)
    abandoned = cache / ".big-0123456789abcdef.sha1.a1b2c3.tmp"
    fresh = cache / ".big-fedcba9876543210.sha1.d4e5f6.tmp"
    for temporary in (abandoned, fresh):
        temporary.write_text("{")
    os.utime(abandoned, (time.time() - 3700, time.time() - 3700))
    load_dataset(DataConfig(path=str(big_text), preprocess="none"))
    assert not abandoned.exists() and fresh.exists()
    assert len(list(cache.glob("big-*.sha1"))) == 1  # the run's own stamp, written and renamed


def test_a_min_freq_runs_own_vocabulary_reuses_the_built_entry_with_the_cut_tokens_as_unknown(
    workdir: Path, big_text: Path, monkeypatch
):
    """A word run with min_freq 7 resumed (or evaluated) with its checkpoint's vocabulary: the text was
    encoded again and cached a second, byte-identical time. The built entry serves, and the tokens
    min_freq cut are the unknown ones, counted as a fresh encoding counts them."""
    config = DataConfig(
        path=str(big_text), preprocess="none", token="word", min_freq=7
    )  # the text is the book 6 times
    built = load_dataset(config)
    fixed = Vocab.from_dict(built.vocab.tokens_dict())  # as a checkpoint stores it: no counts
    cut = words_seen_fewer_than(7, big_text)
    no_encoding(monkeypatch)
    again = load_dataset(config, vocab=fixed)
    assert torch.equal(again.tokens, built.tokens) and len(entries(workdir)) == 1
    assert again.unknown == cut and sum(again.unknown.values()) > 0


@pytest.fixture
def ptb_text(workdir: Path, big_text: Path) -> Path:
    """A big word text that writes <unk> itself, as Penn Treebank's does: the book's 'time' (294 times)."""
    text = workdir / "ptb.txt"
    text.write_text(" ".join("<unk>" if word == "time" else word for word in big_text.read_text().split()))
    return text


def lacking_by_split(dataset: Dataset) -> list[int]:
    return [dataset.lacking_in(*dataset.splits.span(name)) for name in ("train", "val", "test")]


def test_the_words_a_vocabulary_lacks_are_told_from_a_text_s_own_unk_after_a_reload(
    workdir: Path, ptb_text: Path, monkeypatch
):
    """min_freq 7 cuts words of a text that writes <unk> itself: id 0 is both. The entry keeps where the
    words cut lie, so a reload (in its first seconds too, when the ids are read again), a capped one, and
    a checkpoint's vocabulary count them in each split as the encoding did, and as counted here apart."""
    words = ptb_text.read_text().split()
    cut = words_seen_fewer_than(7, ptb_text)
    at = [index for index, word in enumerate(words) if word in cut]
    config = DataConfig(
        path=str(ptb_text), preprocess="none", token="word", min_freq=7, val_fraction=0.1, test_fraction=0.1
    )
    first = load_dataset(config)
    spans = [first.splits.span(name) for name in ("train", "val", "test")]
    expected = [sum(start <= index < stop for index in at) for start, stop in spans]
    assert lacking_by_split(first) == expected and sum(expected) == sum(cut.values()) > 0
    assert words.count("<unk>") == 294 and first.lacking_in() == sum(expected)
    no_encoding(monkeypatch)
    monkeypatch.setattr(token_cache, "RACY_SECONDS", 1e6)  # as if stored within one mtime tick
    again = load_dataset(config)
    assert lacking_by_split(again) == expected and torch.equal(again.tokens, first.tokens)
    capped = load_dataset(config.model_copy(update={"max_tokens": spans[1][0]}))  # the training split
    assert capped.lacking_in() == expected[0]
    fixed = Vocab.from_dict(first.vocab.tokens_dict())  # as a checkpoint stores it: no counts
    assert lacking_by_split(load_dataset(config, vocab=fixed)) == expected and len(entries(workdir)) == 1


def test_an_entry_of_an_earlier_format_is_not_read_and_its_text_s_new_entry_deletes_it(
    workdir: Path, ptb_text: Path, monkeypatch
):
    """A format-2 entry keeps no positions of the words its vocabulary lacks: read, a text's own <unk>
    would count as lacking again. It is rebuilt, and the new entry deletes it (as large as the text)."""
    config = DataConfig(path=str(ptb_text), preprocess="none", token="word", min_freq=7, max_tokens=5000)
    current_format = token_cache.FORMAT
    monkeypatch.setattr(token_cache, "FORMAT", 2)
    load_dataset(config)
    (old,) = entries(workdir)
    monkeypatch.setattr(token_cache, "FORMAT", current_format)
    current = load_dataset(config)
    (new,) = entries(workdir)
    assert new != old and not old.with_suffix(".tokens").exists()
    cut = words_seen_fewer_than(7, ptb_text)
    assert current.lacking_in() == sum(word in cut for word in ptb_text.read_text().split()[:5000]) > 0
    assert current.lacking_in() < int((current.tokens == 0).sum())  # the text's own <unk>s are no lack


def test_a_fixed_vocabulary_that_is_the_texts_own_is_kept_as_the_texts_own_entry(
    workdir: Path, big_text: Path, monkeypatch
):
    """``drnn eval`` (or a resume) after the cache was cleared encodes the text with its checkpoint's
    vocabulary. Kept under that vocabulary's key, the next plain run encoded the text again and kept a
    second entry as large as the text (2 × 63 MB for a 31 MB text, found by a trial). It is kept as
    the text's own entry, which every later run, plain or fixed, maps."""
    config = DataConfig(path=str(big_text), preprocess="none", token="word", min_freq=7)
    reference = load_dataset(config)
    fixed = Vocab.from_dict(reference.vocab.tokens_dict())  # as a checkpoint stores it: no counts
    cut = words_seen_fewer_than(7, big_text)
    shutil.rmtree(workdir / "data" / "token-cache")
    evaluated = load_dataset(config, vocab=fixed)
    assert evaluated.vocab.idx_to_token == fixed.idx_to_token and evaluated.unknown == cut
    assert torch.equal(evaluated.tokens, reference.tokens) and len(entries(workdir)) == 1
    no_encoding(monkeypatch)
    plain = load_dataset(config)
    assert plain.vocab.token_freqs == reference.vocab.token_freqs and plain.unknown == Counter()
    assert torch.equal(plain.tokens, reference.tokens)
    assert load_dataset(config, vocab=fixed).unknown == cut and len(entries(workdir)) == 1


@pytest.mark.parametrize("how", ["replaced", "rewritten in place"])
def test_a_text_that_changes_between_its_hashing_and_its_encoding_is_refused_and_not_cached(
    workdir: Path, big_text: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """A re-export, rsync or ``git checkout`` landing as a run starts: the text is hashed, then read
    again to be encoded. Tokens of the new text must not be kept (or trained on) under the old text's
    SHA-1, where every later run would map them (found by a red team: 3 of 12 runs did)."""
    other = big_text.read_bytes().replace(b"e", b"x")  # the same size
    hash_of = data_module.corpus_sha1s

    def hash_then_change(path: Path) -> CorpusSha1s:
        sha1s = hash_of(path)
        if how == "replaced":  # mv, rsync: a new inode
            staged = path.with_name("staged.tmp")
            staged.write_bytes(other)
            os.replace(staged, path)
        else:  # cp over it: the same inode, a new modification time
            time.sleep(0.01)
            path.write_bytes(other)
        return sha1s

    monkeypatch.setattr(data_module, "corpus_sha1s", hash_then_change)
    config = DataConfig(path=str(big_text), preprocess="none")
    with pytest.raises(DrnnError, match=r"big.txt changed while drnn read it; run again once it is written"):
        load_dataset(config)
    assert entries(workdir) == []
    monkeypatch.setattr(data_module, "corpus_sha1s", hash_of)
    again = load_dataset(config)  # the text as it is now, hashed and encoded together
    assert "x" in again.vocab.token_to_idx and "e" not in again.vocab.token_to_idx
    assert len(entries(workdir)) == 1


def _stamp_and_entry(workdir: Path, big_text: Path) -> tuple[DataConfig, Path, Path]:
    config = DataConfig(path=str(big_text), preprocess="none")
    load_dataset(config)
    cache = workdir / "data" / "token-cache"
    (stamp,), (entry,) = cache.glob("*.sha1"), cache.glob("*.json")
    return config, stamp, entry


PLANTED = ["a FIFO", "a link to /dev/zero", "JSON nested 100,000 deep"]


@pytest.mark.parametrize(
    ("which", "planted"), [("stamp", p) for p in [*PLANTED, "too large"]] + [("entry", p) for p in PLANTED]
)
def test_a_cache_file_that_drnn_did_not_write_is_ignored_and_written_again(
    workdir: Path, big_text: Path, which: str, planted: str
) -> None:
    """A hash stamp or an entry's JSON replaced by something else (a shared data folder, a stray file):
    a FIFO used to hang drnn for good, a link to /dev/zero to exhaust its memory, deep JSON to end in
    an internal RecursionError. Each is now no stamp or no entry: the text is hashed or encoded again."""
    config, stamp, entry = _stamp_and_entry(workdir, big_text)
    target = stamp if which == "stamp" else entry
    target.unlink()
    if planted == "a FIFO":
        os.mkfifo(target)
    elif planted == "a link to /dev/zero":
        target.symlink_to("/dev/zero")
    elif planted == "JSON nested 100,000 deep":
        target.write_text("[" * 100_000 + "]" * 100_000)
    else:  # a stamp that would be trusted (this file's identity, long since hashed) but for its size
        info = big_text.stat()
        identity = {"size": info.st_size, "mtime_ns": info.st_mtime_ns, "ctime_ns": info.st_ctime_ns}
        identity |= {"inode": info.st_ino, "hashed_at_ns": info.st_mtime_ns + 10**10}
        identity |= {"sha1": "0" * 40, "text_sha1": "0" * 40}
        target.write_text(" " * STAMP_MAX_BYTES + json.dumps(identity))
    dataset = load_dataset(config)
    assert dataset.sha1 == hashlib.sha1(big_text.read_bytes()).hexdigest() and len(dataset.vocab) > 20
    assert target.is_file() and not target.is_symlink()  # written again in its place
    json.loads(target.read_text())


@pytest.mark.parametrize("planted", PLANTED)
def test_a_stray_json_in_the_cache_folder_is_not_read_when_older_entries_are_swept(
    workdir: Path, big_text: Path, planted: str
) -> None:
    """After storing an entry drnn deletes the entries of the text's earlier versions, reading each
    entry's JSON: a stray file there (not an entry's name, or not a regular file) is left alone."""
    config, _, _ = _stamp_and_entry(workdir, big_text)
    cache = workdir / "data" / "token-cache"
    stray = cache / ("notes.json" if planted != "a FIFO" else f"big-{'0' * 20}.json")
    if planted == "a FIFO":
        os.mkfifo(stray)
    elif planted == "a link to /dev/zero":
        stray.symlink_to("/dev/zero")
    else:
        stray.write_text("[" * 100_000 + "]" * 100_000)
    big_text.write_bytes(big_text.read_bytes().replace(b"e", b"x"))  # an edit: a new entry is stored
    assert "x" in load_dataset(config).vocab.token_to_idx
    assert os.path.lexists(stray) and len(entries(workdir)) == 2  # the new entry, and the stray file


@pytest.mark.parametrize("suffix", [".tokens", ".json"])
def test_a_folder_where_an_entry_goes_is_named_in_the_note(workdir: Path, big_text: Path, suffix: str):
    """The note blamed the cache folder ("set DRNN_CACHE_DIR to a writable folder") though it was
    writable; what blocked the entry was a folder in its place, which it now names (found by a red team)."""
    config = DataConfig(path=str(big_text), preprocess="none")
    load_dataset(config)
    (entry,) = entries(workdir)
    place = entry.with_suffix(suffix)
    place.unlink()
    place.with_suffix(".json" if suffix == ".tokens" else ".tokens").unlink()
    place.mkdir()
    (place / "x").write_text("kept")  # not drnn's to delete
    (note,) = load_dataset(config).notes
    assert note == (
        f"the token cache cannot keep this text: {place} is a folder, where its entry goes; remove it, or "
        "this text is read and encoded again on every run"
    )
    assert (place / "x").read_text() == "kept"


def test_machines_sharing_a_cache_folder_keep_each_others_entries(workdir: Path, big_text: Path, monkeypatch):
    """Two machines with DRNN_DATA_DIR on one network drive and each its own file at the same path:
    each run took the other machine's entry for an earlier version of its text and deleted it, so
    both encoded their text again on every run. Only this machine's earlier versions go now."""
    config = DataConfig(path=str(big_text), preprocess="none")
    monkeypatch.setattr("socket.gethostname", lambda: "node-a")
    load_dataset(config)
    original = big_text.read_bytes()
    big_text.write_bytes(original.replace(b"e", b"@"))
    monkeypatch.setattr("socket.gethostname", lambda: "node-b")
    load_dataset(config)  # node-b's file at the same path
    assert sorted(json.loads(p.read_text())["host"] for p in entries(workdir)) == ["node-a", "node-b"]
    big_text.write_bytes(original.replace(b"e", b"%"))  # node-b's text edited: its own old entry goes
    load_dataset(config)
    hosts = sorted(
        (json.loads(p.read_text())["host"], "%" in json.loads(p.read_text())["vocab"]["idx_to_token"])
        for p in entries(workdir)
    )
    assert hosts == [("node-a", False), ("node-b", True)]


def test_the_same_bytes_put_back_while_a_text_is_read_pass(
    workdir: Path, big_text: Path, monkeypatch: pytest.MonkeyPatch
):
    """Another process's download of the corpus renamed over it, a ``touch``, a ``chmod``: the file's
    identity moves but its bytes do not, and nothing is refused (found by a review: 4 of 36 parallel
    first runs were)."""
    same = big_text.read_bytes()
    hash_of = data_module.corpus_sha1s

    def hash_then_put_back(path: Path) -> CorpusSha1s:
        sha1s = hash_of(path)
        staged = path.with_name("staged.tmp")
        staged.write_bytes(same)
        os.replace(staged, path)  # a new inode, the same text
        return sha1s

    monkeypatch.setattr(data_module, "corpus_sha1s", hash_then_put_back)
    dataset = load_dataset(DataConfig(path=str(big_text), preprocess="none"))
    assert dataset.sha1 == hashlib.sha1(same).hexdigest() and len(entries(workdir)) == 1


def test_a_text_whose_name_is_not_utf8_is_cached_and_read_back(workdir: Path, big_text: Path, monkeypatch):
    """The cache names its files after the text and records its path: a name that is not UTF-8 (byte
    0xff) ended in an internal UnicodeEncodeError for every text of 1 MiB or more (found by a review)."""
    named = big_text.with_name(os.fsdecode(b"big\xff.txt"))
    big_text.rename(named)
    config = DataConfig(path=str(named), preprocess="none")
    first = load_dataset(config)
    (entry,) = entries(workdir)
    assert json.loads(entry.read_text(encoding="utf-8"))["text"] == str(named.resolve())
    no_encoding(monkeypatch)
    assert torch.equal(load_dataset(config).tokens, first.tokens)


def test_a_regular_json_that_is_not_named_as_an_entry_is_never_swept(workdir: Path, big_text: Path):
    """Only files named as entries are read when a text's earlier versions are deleted: a copy of an
    entry under another name (a backup, a user's file) is left alone even when it describes this text."""
    config, _, entry = _stamp_and_entry(workdir, big_text)
    backup = entry.with_name("backup-of-entry.json")
    backup.write_text(entry.read_text())
    big_text.write_bytes(big_text.read_bytes().replace(b"e", b"@"))
    load_dataset(config)
    assert backup.exists() and not entry.exists()  # the old entry went; its copy under another name stayed
