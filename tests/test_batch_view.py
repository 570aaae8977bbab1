"""``drnn data --batches N [--epoch E]``: the minibatches an epoch trains on, as d2l 0.17.6 §8.3 prints
them for its toy sequence ``my_seq = list(range(35))`` at batch size 2 and 5 steps (learner42: the
library cut them as the book does, but no command showed them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

# 35 distinct characters, each once: the vocabulary numbers them in order of first sight after <unk>, so
# the token at position p of the text has id p + 1, and the book's my_seq values are the positions
TOY = "abcdefghijklmnopqrstuvwxyz012345678"
TOY_SETTINGS = ("--set", "data.preprocess=none", "--set", "data.batch_size=2", "--set", "data.num_steps=5")


def _view(cli, text: Path, *options: str) -> dict:
    code, out, err = cli("data", "--set", f"data.path={text}", *TOY_SETTINGS, *options, "--json")
    assert code == 0, err
    return json.loads(out.splitlines()[-1])["batches"]


@pytest.fixture
def toy(workdir: Path) -> Path:
    path = workdir / "toy.txt"
    path.write_text(TOY)
    return path


def test_sequential_minibatches_are_d2ls_seq_data_iter_sequential_at_the_epochs_offset(cli, toy: Path):
    """d2l: offset = randint(0, 5); n = ((35 − offset − 1) // 2) · 2; Xs = corpus[offset : offset + n]
    as 2 rows; minibatch i is columns 5i … 5i + 4 of both rows, Ys the same one further on."""
    offsets = set()
    for epoch in range(1, 7):
        view = _view(cli, toy, "--batches", "3", "--epoch", str(epoch))
        offset = view["offset"]
        offsets.add(offset)
        row_length = (35 - offset - 1) // 2
        assert (view["sampling"], view["carries_state"], view["batch_size"]) == ("sequential", True, 2)
        assert (view["epoch"], view["largest_offset"]) == (epoch, 5)
        assert view["minibatches"] == row_length // 5 == len(view["shown"])
        assert (view["fewest_minibatches"], view["most_minibatches"]) == (2, 3)  # offsets 5 and 0
        for i, rows in enumerate(view["shown"]):
            for b, row in enumerate(rows):
                start = offset + b * row_length + 5 * i
                assert row == {
                    "start": start,
                    "x": [p + 1 for p in range(start, start + 5)],
                    "y": [p + 1 for p in range(start + 1, start + 6)],
                    "x_text": TOY[start : start + 5],
                    "y_text": TOY[start + 1 : start + 6],
                }
    assert len(offsets) > 1  # each epoch draws its own


def test_random_minibatches_are_disjoint_subsequences_at_the_offset_plus_multiples_of_the_steps(
    cli, toy: Path
):
    """d2l's seq_data_iter_random: drop randint(0, 4) tokens, cut the rest into subsequences of 5 at
    multiples of 5, shuffle, take 2 a minibatch; no subsequence twice, the state reset at each."""
    for epoch in (1, 2, 3):
        view = _view(cli, toy, "--set", "data.sampling=random", "--batches", "9", "--epoch", str(epoch))
        offset = view["offset"]
        assert (view["carries_state"], view["largest_offset"]) == (False, 4)
        starts = [row["start"] for rows in view["shown"] for row in rows]
        assert len(view["shown"]) == view["minibatches"] == (35 - offset - 1) // 5 // 2  # 9 asked, 3 made
        assert len(set(starts)) == len(starts) == 2 * view["minibatches"]
        assert all((start - offset) % 5 == 0 and start + 5 <= 34 for start in starts)
        assert all(row["y"] == [i + 1 for i in row["x"]] for rows in view["shown"] for row in rows)


def test_the_human_output_says_how_the_epoch_was_cut_and_lists_each_rows_tokens_and_text(cli, toy: Path):
    offset = _view(cli, toy, "--batches", "1")["offset"]
    row_length = (35 - offset - 1) // 2
    code, out, err = cli("data", "--set", f"data.path={toy}", *TOY_SETTINGS, "--batches", "1")
    assert code == 0, err
    lines = out.splitlines()
    first = lines.index(next(line for line in lines if line.startswith("epoch 1, sequential partition")))
    skipped = {0: "no token", 1: "the first 1 token"}.get(offset, f"the first {offset} tokens")
    assert lines[first] == (
        f"epoch 1, sequential partition: it skips {skipped} of the training split (its offset, "
        "drawn again each epoch from 0–5) and splits the rest into 2 rows of equal length; each minibatch "
        "takes the next 5 tokens of every row, so row b of one continues row b of the one before: the hidden "
        "state carries over (detached: truncated backpropagation through time); minibatches: "
        f"{row_length // 5} (an epoch makes 2–3, as its offset falls)"
    )
    second = offset + row_length
    assert lines[first + 1 : first + 4] == [
        f"minibatch 1 of {row_length // 5}: each row's tokens (counted from 0 in the training split), its "
        "inputs X and its targets Y (X shifted by one)",
        f"  row  1  tokens {f'{offset}–{offset + 4}':<5}  X {TOY[offset : offset + 5]!r}  "
        f"Y {TOY[offset + 1 : offset + 6]!r}",
        f"  row  2  tokens {f'{second}–{second + 4}':<5}  X {TOY[second : second + 5]!r}  "
        f"Y {TOY[second + 1 : second + 6]!r}",
    ]


def test_the_seed_configs_32_rows_are_listed_eight_at_a_time_and_the_table_names_the_epoch(cli, workdir):
    code, out, err = cli("data", "--config", "lstm2.yaml", "--batches", "1", "--epoch", "3")
    assert code == 0, err
    lines = out.splitlines()
    rows = [line for line in lines if line.startswith("  row ")]
    assert len(rows) == 8 and rows[-1].startswith("  row  8  tokens ")
    assert "  … 24 more rows (--json lists every row, with token ids)" in lines
    assert any(line.startswith("│ minibatches in epoch 3 ") for line in lines)
    code, out, err = cli("data", "--config", "lstm2.yaml", "--batches", "1", "--json")
    shown = json.loads(out.splitlines()[-1])["batches"]["shown"]
    assert [len(rows) for rows in shown] == [32] and all(len(row["x"]) == 35 for row in shown[0])


def test_batches_of_a_text_shorter_than_one_minibatch_say_there_is_none(cli, workdir: Path):
    """review rev42: asked for, they were left out without a word, and the JSON had no key to read."""
    short = workdir / "short.txt"
    short.write_text("ab")
    code, out, err = cli(
        "data", "--set", f"data.path={short}", "--set", "data.preprocess=none", "--batches", "2"
    )
    assert (
        code == 0 and "no minibatch to show: the training split is shorter than one (the note below)" in out
    )
    code, out, err = cli(
        "data", "--set", f"data.path={short}", "--set", "data.preprocess=none", "--batches", "2", "--json"
    )
    said = json.loads(out.splitlines()[-1])
    assert said["batches"] is None and said["train_would_refuse"], err


def test_an_epoch_past_the_runs_length_is_shown_with_a_note(cli, toy: Path):
    code, out, err = cli(
        "data",
        "--set",
        f"data.path={toy}",
        *TOY_SETTINGS,
        "--set",
        "train.epochs=3",
        "--batches",
        "1",
        "--epoch",
        "7",
    )
    assert code == 0, err
    assert (
        "note: epoch 7 is past the 3 epochs a run of these settings trains: its minibatches are those a longer "
        "run would read"
    ) in out.splitlines()


def test_without_batches_the_json_has_no_batches_key_and_a_negative_count_is_refused(cli, toy: Path):
    code, out, err = cli("data", "--set", f"data.path={toy}", *TOY_SETTINGS, "--json")
    assert code == 0 and "batches" not in json.loads(out.splitlines()[-1]), err
    code, _, err = cli("data", "--set", f"data.path={toy}", "--batches", "-1")
    assert code == 2 and "--batches" in err
    code, _, err = cli("data", "--set", f"data.path={toy}", "--epoch", "0")
    assert code == 2 and "--epoch" in err


def test_text_shows_the_first_tokens_as_d2ls_preprocessing_glues_its_lines(cli, workdir: Path, corpus_path):
    """d2l's read_time_machine keeps each line's letters, lower-cased (re.sub('[^A-Za-z]+', ' ', line)
    .strip().lower()), and its character corpus joins the lines with nothing between them: the title's
    "wells" meets the lone "i" and the first sentence, as "him" meets "was" (learner42: only the library
    showed it). Words are read line by line, so the same text splits there; min_freq's cuts show as <unk>."""
    import re

    lines = [re.sub("[^A-Za-z]+", " ", line).strip().lower() for line in corpus_path.read_text().splitlines()]
    glued = "".join(lines)
    code, out, err = cli("data", "--text", "130", "--json")
    assert code == 0, err
    said = json.loads(out.splitlines()[-1])
    assert said["text"] == glued[:130]
    # the ids d2l's vocab[tokens] gives: the vocabulary's order, most frequent first (space 1, e 2, t 3)
    assert said["text_ids"][:4] == [3, 9, 2, 1] and [
        said["idx_to_token"][i] for i in said["text_ids"]
    ] == list(glued[:130])
    assert glued[:130].startswith("the time machine by h g wellsithe time traveller")
    assert "the first 130 tokens, as training reads them: " + repr(glued[:130]) in err.splitlines()
    code, out, err = cli(
        "data", "--set", "data.token=word", "--set", "data.min_freq=3", "--text", "12", "--json"
    )
    assert code == 0, err
    assert (
        json.loads(out.splitlines()[-1])["text"]
        == "the time machine by <unk> <unk> wells i the time traveller for"
    )


def test_batches_past_a_million_tokens_are_refused_before_any_is_gathered(cli, workdir: Path):
    """--batches 20 of 1,024 rows × 100 steps would put 2,048,000 tokens (twice, and as text) into the
    JSON: refused in one line with the count that fits."""
    text = workdir / "big.txt"
    text.write_text("the time machine " * 130_000)  # 2,210,000 characters
    big = ("--set", f"data.path={text}", "--set", "data.batch_size=1024", "--set", "data.num_steps=100")
    code, out, err = cli("data", *big, "--batches", "20", "--json")
    assert code == 2 and not out
    assert err.strip() == (
        "drnn: error: --batches 20 would gather 2,048,000 tokens (1,024 rows of 100 a minibatch), past the "
        "1,000,000 at most; ask for at most --batches 9"
    )
    code, _, err = cli("data", *big, "--batches", "9", "--json")
    assert code == 0, err
    # the human output gathers the 8 rows it lists (review rev42: it was refused for the JSON's size)
    code, out, err = cli("data", *big, "--batches", "20")
    assert code == 0 and "minibatch 20 of " in out and "  … 1,016 more rows (--json lists every row" in out, (
        err
    )
