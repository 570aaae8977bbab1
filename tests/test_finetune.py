"""Fine-tuning with --init-from: weights from one run, a fixed vocabulary, a new text."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch
import yaml
from conftest import assert_one_line_error, rewrite_checkpoint

from drnn_cli.budget import Budget
from drnn_cli.checkpoint import load_checkpoint
from drnn_cli.commands import evaluate_split, load_model
from drnn_cli.config import build_config
from drnn_cli.data import load_dataset
from drnn_cli.errors import DrnnError, TrainingInterrupted
from drnn_cli.plot import render_perplexity_plot
from drnn_cli.report import EpochRecord, RunStart, SilentReporter
from drnn_cli.start_point import fine_tuning_point, shared_text_note
from drnn_cli.train import Trainer
from drnn_cli.train_session import TrainRequest, train_run
from drnn_cli.vocab import Vocab

BASE = {
    "data": {"preprocess": "none", "batch_size": 8, "num_steps": 10},
    "model": {"cell": "gru", "hidden_size": 32, "num_layers": 1},
    "train": {"epochs": 4, "optimizer": "adam", "lr": 0.01, "sample_every": 0, "device": "cpu"},
}


def config_for(directory: Path, text: Path, name: str, **sections: dict) -> Path:
    tree = {key: {**value, **sections.get(key, {})} for key, value in BASE.items()}
    tree["data"]["path"] = str(text)
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


class Notes(SilentReporter):
    def __init__(self) -> None:
        self.notes: list[str] = []
        self.origins: list[str] = []  # each session's first line's "from ..."

    def start(self, run: RunStart) -> None:
        self.origins.append(run.origin)

    def note(self, message: str) -> None:
        self.notes.append(message)


@pytest.fixture
def texts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    monkeypatch.chdir(tmp_path)
    first = tmp_path / "first.txt"
    first.write_text("the quick brown fox jumps over the lazy dog. " * 60)
    second = tmp_path / "second.txt"
    second.write_text("a lazy dog sleeps by the brown box. " * 60)
    return first, second


def test_fine_tuning_lowers_perplexity_on_the_new_text(tmp_path: Path, texts: tuple[Path, Path]):
    first, second = texts
    train_run(TrainRequest(config_for(tmp_path, first, "base")))
    before = evaluate_split(load_model(Path("runs/base"), None, "cpu"), data_file=second)
    train_run(
        TrainRequest(config_for(tmp_path, second, "tuned", train={"epochs": 3}), init_from=Path("runs/base"))
    )
    after = evaluate_split(load_model(Path("runs/tuned"), None, "cpu"), data_file=second)
    assert after.result.perplexity < before.result.perplexity
    # ...because it started from the base's weights: the same run from a fresh model, same seed, is worse
    # from its first epoch on (a fresh model also improves in 3 epochs; only the start tells them apart)
    train_run(TrainRequest(config_for(tmp_path, second, "fresh", train={"epochs": 3})))
    first_epoch = {
        run: json.loads(Path(f"runs/{run}/metrics.jsonl").read_text().splitlines()[0])["train_ppl"]
        for run in ("tuned", "fresh")
    }
    assert first_epoch["tuned"] < 0.8 * first_epoch["fresh"], first_epoch
    tuned = load_checkpoint(Path("runs/tuned/last.safetensors"))
    assert tuned.init_from == str(Path("runs/base/last.safetensors").resolve())
    assert (Path("runs/tuned/init_from.txt").read_text().strip()) == tuned.init_from
    assert tuned.vocab.idx_to_token == load_checkpoint(Path("runs/base/last.safetensors")).vocab.idx_to_token


def test_a_base_model_is_scored_on_its_fine_tuned_runs_test_split_as_that_run_cuts_it(
    tmp_path: Path, texts: tuple[Path, Path], cli
):
    """Did fine-tuning help on the held-out text? The base's figure on the fine-tuned run's test split
    took a hand-cut copy of the split (its start from drnn data --json) scored with --data at the same
    rows (practitioner trial prac38): --splits-of reads the split as that run cuts it, at its rows."""
    first, second = texts
    held_out = {"data": {"test_fraction": 0.2}}
    train_run(TrainRequest(config_for(tmp_path, first, "base", train={"epochs": 1}, **held_out)))
    tuned = config_for(tmp_path, second, "tuned", train={"epochs": 1}, **held_out)
    train_run(TrainRequest(tuned, init_from=Path("runs/base")))

    def scored(*args: str) -> dict:
        code, out, err = cli("eval", *args, "--json")
        assert code == 0, err
        return json.loads(out.splitlines()[-1])

    own = scored("--run", "runs/tuned", "--split", "test")
    assert (
        scored("--run", "runs/tuned", "--splits-of", "runs/tuned", "--split", "test")["perplexity"]
        == (own["perplexity"])
    )
    base = scored("--run", "runs/base", "--splits-of", "runs/tuned", "--split", "test")
    assert base["source"] == f"{second} [test as {Path('runs/tuned/last.safetensors')} cuts it]"
    # 20% of the 2,160 characters, less the first (context only), in the tuned run's 8 rows
    assert (base["tokens"], base["rows"]) == (own["tokens"], own["rows"]) == (431, 8)
    by_hand = tmp_path / "test_split.txt"
    by_hand.write_text(second.read_text()[-(own["tokens"] + 1) :])  # a split of n predictions holds n + 1
    assert (
        scored("--run", "runs/base", "--data", str(by_hand), "--rows", "8")["perplexity"]
        == base["perplexity"]
    )
    assert base["perplexity"] > own["perplexity"]  # the fine-tuning helped
    # the other run's training split says nothing of the base's: counted from the base checkpoint's own
    # record of what no training split of it held (none of these characters)
    assert (base["unseen_in_training"], base["seen_perplexity"]) == (0, base["perplexity"])
    assert (own["unseen_in_training"], own["seen_perplexity"]) == (0, own["perplexity"])
    # the split is the other run's, so it is named: its default (val, else train) would be that run's
    code, _, err = cli("eval", "--run", "runs/base", "--splits-of", "runs/tuned")
    assert (code, err.strip()) == (
        2,
        "drnn: error: --splits-of reads a split of another run's text: name it with --split val or test",
    )
    # a split of the text the base trained on, cut another way: what the base trained on is said
    halves = config_for(tmp_path, first, "halves", train={"epochs": 1}, data={"val_fraction": 0.5})
    train_run(TrainRequest(halves))
    code, _, err = cli("eval", "--run", "runs/base", "--splits-of", "runs/halves", "--split", "val")
    base_checkpoint = Path("runs/base/last.safetensors").resolve()
    assert code == 0 and err.strip() == (  # the base trained on 80% of 2,700: 2,160; the halves' val 1,350
        f"note: 810 of the 1,350 validation tokens (60%) are in the training split of {base_checkpoint} (the "
        "checkpoint scored) on this same text: this perplexity is optimistic"
    ), err
    # another vocabulary cannot be scored token for token: refused, naming --data
    other = tmp_path / "other.txt"
    other.write_text("0123456789 " * 200)
    train_run(TrainRequest(config_for(tmp_path, other, "digits", train={"epochs": 1}, **held_out)))
    code, _, err = cli("eval", "--run", "runs/base", "--splits-of", "runs/digits", "--split", "test")
    assert_one_line_error(
        code, err, "--splits-of runs/digits: its vocabulary is not this checkpoint's", "--data"
    )


def test_unknown_characters_are_counted_exactly(tmp_path: Path):
    vocab = Vocab.from_counts({"a": 3, "b": 2, " ": 1})
    text = tmp_path / "new.txt"
    text.write_text("abz z!\nab")  # z ×2, ! ×1, newline ×1 are unknown: 4 of 9
    dataset = load_dataset(
        build_config({"data": {"path": str(text), "preprocess": "none"}}).data, vocab=vocab
    )
    assert dataset.unknown_count == 4 and dict(dataset.unknown) == {"z": 2, "!": 1, "\n": 1}
    assert dataset.total_tokens == 9
    assert dataset.tokens.tolist() == [1, 2, 0, 3, 0, 0, 0, 1, 2]


def test_too_much_unknown_text_is_refused_and_a_little_is_reported(tmp_path: Path, texts: tuple[Path, Path]):
    first, _ = texts
    train_run(TrainRequest(config_for(tmp_path, first, "base", train={"epochs": 1})))
    shouty = tmp_path / "shouty.txt"
    shouty.write_text("THE LAZY DOG! " * 200 + "the lazy dog " * 200)
    request = TrainRequest(
        config_for(tmp_path, shouty, "ft", train={"epochs": 1}), init_from=Path("runs/base")
    )
    with pytest.raises(
        DrnnError,
        match=r"2,200 of the 5,400 tokens the run uses \(40.7%\) are not in the checkpoint's vocabulary",
    ):
        train_run(request)
    notes = Notes()
    train_run(
        TrainRequest(
            request.config_path,
            init_from=Path("runs/base"),
            max_unknown_fraction=0.6,
            run_dir=Path("runs/ft2"),
        ),
        reporter=notes,
    )
    assert any(
        "2,200 of the 5,400 tokens the run uses" in note and "map to <unk>" in note for note in notes.notes
    )
    # said again after training, beside the perplexities it qualifies (trained to 1.07 on a text 98% <unk>)
    assert notes.notes[-1] == (
        "40.7% of the training tokens are not in the vocabulary and are scored as <unk>, one class for all of "
        "them: this run's perplexities are not comparable with perplexities over a text the model can spell "
        "(far lower where it learned to predict <unk>, far higher where it never saw one)"
    )


def test_the_note_after_training_counts_the_tokens_a_vocabulary_lacks_not_a_text_s_own_unk(
    tmp_path: Path, cli
):
    """A word text that writes <unk> itself (as Penn Treebank's does) lacks nothing: no note, though 12%
    of its tokens are <unk>. Its min_freq run lacks the words cut, counted exactly (the ids alone cannot
    tell them from the text's own <unk>): 7.0% here, where counting ids says 18.6%. Where the words cut
    lie in the training split and the validation split holds <unk>s of the text's own, the validation
    tokens lack none (bounded by the words cut in the whole text, the <unk>s were said to be 12.0%)."""
    ptb, cut = "the cat <unk> sat on the mat .\n" * 60, "zebra yak gnu\n" * 12  # 480 + 36 words
    words = {"preprocess": "none", "token": "word", "batch_size": 4, "num_steps": 5}
    for name, text, data, said in (
        ("own", ptb + cut, words, None),
        (
            "cut",
            ptb + cut,
            {**words, "min_freq": 20},
            "7.0% of the training tokens are not in the vocabulary and are scored as <unk>",
        ),
        ("cut_first", cut + ptb, {**words, "min_freq": 20, "val_fraction": 0.1}, None),
        (
            "cut_last",  # the validation split's last 36 of 51 tokens are the words cut
            ptb + cut,
            {**words, "min_freq": 20, "val_fraction": 0.1},
            "72.0% of the validation tokens are not in the vocabulary and are scored as <unk>",
        ),
    ):
        path = tmp_path / f"{name}.txt"
        path.write_text(text)
        notes = Notes()
        config = config_for(tmp_path, path, name, data=data, train={"epochs": 1})
        train_run(TrainRequest(config, run_dir=tmp_path / name), reporter=notes)
        scored = [note for note in notes.notes if "scored as <unk>" in note]
        assert [note.split(", one class")[0] for note in scored] == ([said] if said else [])
    # validations that read the split's first 10 tokens read none of the words cut: nothing to say
    notes = Notes()
    request = TrainRequest(config, ("train.eval_tokens=10",), run_dir=tmp_path / "cut_last_read_first")
    train_run(request, reporter=notes)
    assert [note for note in notes.notes if "scored as <unk>" in note] == []
    # drnn eval scores ids: of a word model it does not call the text's own <unk> missing
    code, out, err = cli("eval", "--run", str(tmp_path / "own"))
    assert code == 0, err
    assert "(60 tokens scored as <unk>)" in out and "not in the vocabulary" not in out.replace(
        "(not in the vocabulary, or written <unk> in the text)", ""
    )


def test_a_text_the_vocabulary_cannot_spell_at_all_is_refused_whatever_max_unknown_says(
    tmp_path: Path, texts: tuple[Path, Path]
):
    """Every token <unk>: it trained to perplexity 1.00 (predicting <unk> after <unk>) under
    --max-unknown 1, a number that says nothing about the text."""
    first, _ = texts
    train_run(TrainRequest(config_for(tmp_path, first, "base", train={"epochs": 1})))
    foreign = tmp_path / "foreign.txt"
    foreign.write_text("ЖЩЮ" * 600)
    request = TrainRequest(
        config_for(tmp_path, foreign, "ft", train={"epochs": 1}),
        init_from=Path("runs/base"),
        max_unknown_fraction=1.0,
    )
    with pytest.raises(
        DrnnError, match=r"none of the 1,800 tokens the run uses is in the checkpoint's vocabulary"
    ):
        train_run(request)
    assert not Path("runs/ft").exists()


def test_the_unknown_share_is_of_the_tokens_training_reads(tmp_path: Path, texts: tuple[Path, Path]):
    """data.max_tokens keeps the first tokens: what lies past them cannot spoil the run, and a
    trained-on head full of <unk> is refused however clean the rest of the file is."""
    first, _ = texts
    train_run(TrainRequest(config_for(tmp_path, first, "base", train={"epochs": 1})))
    clean_head = tmp_path / "clean_head.txt"
    clean_head.write_text("the lazy dog " * 200 + "THE LAZY DOG! " * 200)  # 2,600 clean, then 2,200 of 2,800
    notes = Notes()
    head = {"max_tokens": 2600}
    config = config_for(tmp_path, clean_head, "clean", data=head, train={"epochs": 1})
    train_run(TrainRequest(config, init_from=Path("runs/base")), reporter=notes)
    assert not any("<unk>" in note for note in notes.notes)
    shouty_head = tmp_path / "shouty_head.txt"
    shouty_head.write_text("THE LAZY DOG! " * 20 + "the lazy dog " * 2000)  # 220 of 26,280: 0.84% overall
    config = config_for(tmp_path, shouty_head, "shouty", data={"max_tokens": 280}, train={"epochs": 1})
    with pytest.raises(
        DrnnError, match=r"220 of the 280 tokens the run uses \(78.6%\) .*in the whole text\)"
    ):
        train_run(TrainRequest(config, init_from=Path("runs/base")))


def test_a_fine_tuned_run_takes_the_architecture_and_tokens_of_its_checkpoint(
    tmp_path: Path, texts: tuple[Path, Path]
):
    first, second = texts
    train_run(TrainRequest(config_for(tmp_path, first, "base", train={"epochs": 1})))
    other = config_for(
        tmp_path,
        second,
        "other",
        model={"cell": "lstm", "hidden_size": 64},
        data={"preprocess": "lower"},
        train={"epochs": 1},  # what the run takes is settled before its first step
    )
    notes = Notes()
    train_run(TrainRequest(other, init_from=Path("runs/base")), reporter=notes)
    assert notes.notes[0] == (
        "--init-from sets model.cell 'lstm' → 'gru', model.hidden_size 64 → 32, data.preprocess 'lower' → "
        "'none', as in the checkpoint (its weights and vocabulary fix them; the run's config.yaml records them)"
    )
    recorded = yaml.safe_load(Path("runs/other/config.yaml").read_text())
    assert (recorded["model"]["cell"], recorded["model"]["hidden_size"], recorded["data"]["preprocess"]) == (
        "gru",
        32,
        "none",
    )
    weights = load_checkpoint(Path("runs/other/last.safetensors"), torch.device("cpu")).model_state
    assert weights["rnn.weight_hh_l0"].shape == (3 * 32, 32)  # a GRU's three gates of 32 units


def test_a_set_that_contradicts_the_checkpoint_is_refused_naming_it(tmp_path: Path, texts: tuple[Path, Path]):
    first, second = texts
    train_run(TrainRequest(config_for(tmp_path, first, "base", train={"epochs": 1})))
    tuned = config_for(tmp_path, second, "wide", model={"cell": "lstm"})  # the file's cell gives way
    with pytest.raises(
        DrnnError,
        match=r"model.hidden_size \(32 in the checkpoint, 64 now\), data.preprocess \('none' in the checkpoint, "
        r"'lower' now\); the checkpoint's weights and vocabulary fix these: drop those --set options$",
    ):
        train_run(
            TrainRequest(
                tuned,
                overrides=("model.hidden_size=64", "data.preprocess=lower"),
                init_from=Path("runs/base"),
            )
        )
    assert not Path("runs/wide").exists()


def test_a_set_to_null_is_no_set_the_checkpoint_takes_the_key_as_from_a_file_that_never_set_it(
    tmp_path: Path, texts: tuple[Path, Path]
):
    """``KEY=null`` is the key as if never set (README "Configuration"): under --init-from, the
    checkpoint's value, as the file's would give way; it was refused ("32 in the checkpoint, 256
    now": drnn's default) as a --set that contradicts the checkpoint (rev43)."""
    first, second = texts
    train_run(TrainRequest(config_for(tmp_path, first, "base", train={"epochs": 1})))
    tuned = config_for(tmp_path, second, "tuned", model={"hidden_size": 64}, train={"epochs": 1})
    for overrides in (
        ("model.hidden_size=128", "model.hidden_size=null"),
        ("model={hidden_size: ~, dropout: 0.1}",),
    ):
        notes = Notes()
        train_run(
            TrainRequest(tuned, overrides=overrides, init_from=Path("runs/base"), overwrite=True),
            reporter=notes,
        )
        assert notes.notes[0].startswith("--init-from sets model.hidden_size 256 → 32"), notes.notes[0]
        recorded = yaml.safe_load(Path("runs/tuned/config.yaml").read_text())["model"]
        assert recorded["hidden_size"] == 32


def test_a_checkpoint_architecture_that_the_rest_of_the_config_cannot_take_is_refused(
    tmp_path: Path, texts: tuple[Path, Path]
):
    first, second = texts
    train_run(TrainRequest(config_for(tmp_path, first, "base", train={"epochs": 1})))  # one-hot inputs
    embedded = config_for(tmp_path, second, "emb", model={"embedding_dim": 16, "embedding_dropout": 0.1})
    with pytest.raises(
        DrnnError,
        match=r"^cannot initialise from runs/base/last.safetensors: the checkpoint's settings \(model.embedding_dim 0\) "
        r"do not fit the rest of this config \(model: .*embedding_dropout needs a learned embedding.*\); the "
        r"checkpoint fixes model.embedding_dim: change the rest to fit$",
    ):
        train_run(TrainRequest(embedded, init_from=Path("runs/base")))


def test_a_whole_section_set_names_only_the_keys_it_holds(tmp_path: Path, texts: tuple[Path, Path]):
    """``--set model={dropout: 0.3}`` gives model.dropout alone: the file's architecture still gives way
    (it was taken as giving every model key, and refused as a contradiction)."""
    first, second = texts
    train_run(TrainRequest(config_for(tmp_path, first, "base", train={"epochs": 1})))
    other = config_for(
        tmp_path, second, "other", model={"cell": "lstm", "hidden_size": 64}, train={"epochs": 1}
    )
    train_run(TrainRequest(other, ("model={dropout: 0.3}",), init_from=Path("runs/base")))
    recorded = yaml.safe_load(Path("runs/other/config.yaml").read_text())["model"]
    assert (recorded["cell"], recorded["hidden_size"], recorded["dropout"]) == ("gru", 32, 0.3)


def test_a_contradicting_set_is_refused_by_name_even_where_taking_the_rest_would_break_a_rule(
    tmp_path: Path, texts: tuple[Path, Path]
):
    """Tied weights need embedding_dim = hidden_size: a --set embedding_dim against a tied checkpoint is
    named as the contradiction, not reported as the adopted settings not fitting."""
    first, second = texts
    tied = {"embedding_dim": 32, "tie_weights": True}
    train_run(TrainRequest(config_for(tmp_path, first, "base", model=tied, train={"epochs": 1})))
    other = config_for(tmp_path, second, "other", model={"cell": "lstm", "hidden_size": 64})
    with pytest.raises(
        DrnnError, match=r": model.embedding_dim \(32 in the checkpoint, 16 now\); the checkpoint's"
    ):
        train_run(TrainRequest(other, ("model.embedding_dim=16",), init_from=Path("runs/base")))


def test_a_set_the_checkpoint_fixes_is_refused_before_the_files_values_break_a_rule_with_it(
    tmp_path: Path, texts: tuple[Path, Path], cli
):
    """``--set model.tie_weights=true`` on an untied base: the file's one-hot input (embedding_dim 0)
    broke the tying rule first, and its advice (set embedding_dim to hidden_size) led to a second
    refusal, the checkpoint's width being fixed too. The key the checkpoint fixes is named at once."""
    first, second = texts
    train_run(TrainRequest(config_for(tmp_path, first, "base", train={"epochs": 1})))
    other = config_for(tmp_path, second, "other")
    refusal = (
        "cannot initialise from runs/base/last.safetensors: model.tie_weights (False in the checkpoint, "
        "True now); the checkpoint's weights and vocabulary fix these: drop those --set options"
    )
    with pytest.raises(DrnnError, match="^" + re.escape(refusal) + "$"):
        train_run(TrainRequest(other, ("model.tie_weights=true",), init_from=Path("runs/base")))
    assert not Path("runs/other").exists()
    args = ("--config", str(other), "--set", "model.tie_weights=true", "--init-from", "runs/base")
    code, _, err = cli("data", *args)  # the preview refuses it alike
    assert (code, " ".join(err.split())) == (2, f"drnn: error: {refusal}")
    # a value the config reads as the checkpoint's ('32' is 32) is no contradiction: the real error shows
    with pytest.raises(DrnnError, match=r"^config error: train.lr"):
        overrides = ("model.hidden_size='32'", "train.lr=-1")
        train_run(TrainRequest(other, overrides, init_from=Path("runs/base")))
    with pytest.raises(
        DrnnError, match=r"^config error: model: model.tie_weights needs model.embedding_dim equal"
    ):
        train_run(TrainRequest(other, ("model.tie_weights=true",)))  # no checkpoint: the rule itself


def test_an_interrupted_fine_tuning_run_resumes_with_the_same_command_plus_resume(
    tmp_path: Path, texts: tuple[Path, Path]
):
    first, second = texts
    train_run(TrainRequest(config_for(tmp_path, first, "base", train={"epochs": 1})))
    # the config file's architecture differs from the checkpoint's, which the run took
    tuned = config_for(tmp_path, second, "tuned", model={"hidden_size": 64}, train={"epochs": 1})
    train_run(TrainRequest(tuned, init_from=Path("runs/base")))
    notes = Notes()
    longer = ("train.epochs=2",)
    resumed = train_run(TrainRequest(tuned, longer, init_from=Path("runs/base"), resume=True), reporter=notes)
    source = (tmp_path / "runs" / "base" / "last.safetensors").resolve()
    assert (resumed.start_epoch, resumed.epochs) == (1, 2)
    assert notes.notes[0] == (
        "--resume continues runs/tuned from its last checkpoint; --init-from applies where a run starts "
        f"(this one started from {source})"
    )
    assert notes.notes[1].endswith("(to keep its length: --resume --set train.epochs=1)")
    # without --init-from too: a fine-tuned run's architecture is its checkpoint's
    again = train_run(TrainRequest(tuned, ("train.epochs=3",), resume=True))
    assert (again.start_epoch, again.epochs) == (2, 3)
    assert Path("runs/tuned/init_from.txt").read_text() == f"{source}\n"


def test_resume_with_init_from_of_a_run_that_started_from_scratch_is_refused(
    tmp_path: Path, texts: tuple[Path, Path]
):
    """Its user may have meant to fine-tune: --resume would quietly continue the scratch run."""
    first, _ = texts
    config = config_for(tmp_path, first, "base", train={"epochs": 1})
    train_run(TrainRequest(config))
    train_run(TrainRequest(config, run_dir=Path("runs/other")))
    with pytest.raises(
        DrnnError,
        match=r"^--resume continues runs/base, which started from scratch: --init-from runs/other does not apply "
        r"to it; drop --init-from to resume it, or fine-tune into a new run with --run NEW_DIR$",
    ):
        train_run(TrainRequest(config, ("train.epochs=2",), init_from=Path("runs/other"), resume=True))


def test_resume_of_a_run_trained_from_scratch_still_refuses_a_changed_architecture(
    tmp_path: Path, texts: tuple[Path, Path]
):
    first, _ = texts
    config = config_for(tmp_path, first, "base", train={"epochs": 1})
    train_run(TrainRequest(config))
    with pytest.raises(DrnnError, match=r"model.hidden_size \(32 in the checkpoint, 64 now\)"):
        train_run(TrainRequest(config, ("model.hidden_size=64", "train.epochs=2"), resume=True))


def test_a_fine_tuned_run_says_whose_weights_it_starts_from(tmp_path: Path, texts: tuple[Path, Path], cli):
    first, second = texts
    train_run(TrainRequest(config_for(tmp_path, first, "base", train={"epochs": 1})))
    tuned = config_for(tmp_path, second, "tuned", data={"val_fraction": 0.2}, train={"epochs": 1})
    code, out, _ = cli("train", "--config", str(tuned), "--init-from", "runs/base")
    source = (tmp_path / "runs" / "base" / "last.safetensors").resolve()
    assert code == 0 and f", 1 epoch, from the weights of {source}\n" in out, out
    assert "from scratch" not in out
    # the summary and --json give the starting weights' validation beside the run's
    start = json.loads(Path("runs/tuned/metrics.jsonl").read_text().splitlines()[0])["val_ppl"]
    assert f"validation perplexity (start / last / best) │ {start:.3f} / " in out, out
    code, out, _ = cli("train", "--config", str(tuned), "--init-from", "runs/base", "--overwrite", "--json")
    assert code == 0 and json.loads(out.splitlines()[-1])["start_val_ppl"] == start


def test_init_from_a_checkpoint_file_works_too(tmp_path: Path, texts: tuple[Path, Path]):
    first, second = texts
    train_run(TrainRequest(config_for(tmp_path, first, "base", train={"epochs": 1})))
    result = train_run(
        TrainRequest(
            config_for(tmp_path, second, "file", train={"epochs": 1}),
            init_from=Path("runs/base/last.safetensors"),
        )
    )
    assert result.epochs == 1 and result.start_epoch == 0


def test_init_from_the_latest_run_marker_starts_from_the_run_it_names(
    tmp_path: Path, texts: tuple[Path, Path]
):
    first, second = texts
    train_run(TrainRequest(config_for(tmp_path, first, "base", train={"epochs": 1})))
    tuned = train_run(
        TrainRequest(
            config_for(tmp_path, second, "tuned", train={"epochs": 1}), init_from=Path("runs/latest")
        )
    )
    started_from = load_checkpoint(tuned.run_dir / "last.safetensors").init_from
    assert started_from == str((tmp_path / "runs" / "base" / "last.safetensors").resolve())


def test_init_from_a_path_that_does_not_exist_says_what_init_from_takes(
    tmp_path: Path, texts: tuple[Path, Path], cli
):
    first, _ = texts
    code, out, err = cli(
        "train", "--config", str(config_for(tmp_path, first, "x")), "--init-from", "runs/nope"
    )
    assert out == ""
    assert_one_line_error(
        code, err, "--init-from runs/nope: no such run directory or checkpoint file; name a run (runs/NAME)"
    )
    assert "--checkpoint" not in err


def test_min_freq_under_init_from_is_noted_as_not_applying(tmp_path: Path, texts: tuple[Path, Path]):
    """The vocabulary is the checkpoint's: a min_freq that would have built another one is said to
    do nothing (the run's config.yaml still records it)."""
    first, second = texts
    train_run(TrainRequest(config_for(tmp_path, first, "base", train={"epochs": 1})))
    base_vocab = len(load_checkpoint(Path("runs/base/last.safetensors")).vocab)
    notes = Notes()
    tuned = config_for(tmp_path, second, "ft", data={"min_freq": 5}, train={"epochs": 1})
    train_run(TrainRequest(tuned, init_from=Path("runs/base")), reporter=notes)
    assert (
        f"data.min_freq 5 does not apply with --init-from: the run keeps the checkpoint's vocabulary of "
        f"{base_vocab:,} tokens" in notes.notes
    )
    # the default, under a base that chose min_freq 2: nobody set it, and nothing is said
    words = {"token": "word", "min_freq": 2}
    train_run(TrainRequest(config_for(tmp_path, first, "words", data=words, train={"epochs": 1})))
    notes = Notes()
    plain = config_for(tmp_path, first, "ft-words", data={"token": "word"}, train={"epochs": 1})
    train_run(TrainRequest(plain, init_from=Path("runs/words"), max_unknown_fraction=1.0), reporter=notes)
    assert not [note for note in notes.notes if "min_freq" in note and "does not apply" in note], notes.notes


def test_init_from_a_min_freq_run_says_its_vocabulary_was_cut_by_design(
    tmp_path: Path, texts: tuple[Path, Path]
):
    """A word run with min_freq 2 fine-tuned on its own text: the rare words are <unk> by design, and
    the advice to preprocess the text like the original run could not help (it was, as --init-from reads
    every text)."""
    first, _ = texts
    own = tmp_path / "own.txt"
    own.write_text(first.read_text() + " ".join(f"rare{i}" for i in range(100)) + "\n")
    words = {"token": "word", "min_freq": 2}
    base = config_for(tmp_path, own, "base", data=words, train={"epochs": 1})
    train_run(TrainRequest(base))
    with pytest.raises(DrnnError) as refused:
        train_run(TrainRequest(config_for(tmp_path, own, "ft", data=words, train={"epochs": 1}),
                               init_from=Path("runs/base")))  # fmt: skip
    assert str(refused.value).endswith(
        "raise --max-unknown, or train a new model without --init-from (its vocabulary kept only tokens "
        "seen 2+ times: data.min_freq 2 made the rarer <unk> by design, on its own text too)"
    )
    assert "100 of the 640 tokens the run uses (15.6%)" in str(refused.value)


def test_shares_print_past_a_limit_they_exceed_and_short_of_all():
    """ "260 of the 7,600 tokens (3.42%) ... above the allowed 3.42%", and 3,900 of 3,901 as "(100%)"
    (a practitioner's trial): more digits where three would say so."""
    from drnn_cli.shown_text import percent

    assert (percent(260 / 7600, unlike=0.0342), percent(0.0342, unlike=260 / 7600)) == ("3.421%", "3.42%")
    assert (percent(3900 / 3901), percent(1.0), percent(0.05, unlike=0.01)) == ("99.97%", "100%", "5%")


def test_a_fine_tuning_run_into_the_run_it_starts_from_is_told_to_go_elsewhere(
    tmp_path: Path, texts: tuple[Path, Path]
):
    """Base and fine-tuned run from one preset share runs/<preset>: the refusal offered --resume and
    --overwrite, both refused for a fine-tuning run from that same run (a practitioner's trial)."""
    first, second = texts
    train_run(TrainRequest(config_for(tmp_path, first, "base", train={"epochs": 1})))
    with pytest.raises(DrnnError) as refused:
        train_run(
            TrainRequest(
                config_for(tmp_path, second, "base", train={"epochs": 1}), init_from=Path("runs/base")
            )
        )
    assert str(refused.value) == (
        "run directory runs/base already holds a run (the one --init-from names); train the fine-tuned run "
        "elsewhere with --run DIR"
    )


def test_a_literal_unk_the_text_writes_itself_is_not_counted_as_unknown_under_init_from(
    tmp_path: Path, texts: tuple[Path, Path]
):
    """Penn Treebank writes <unk> for its rare words, and the vocabulary holds it: one new word in such a
    text was refused as 61 of 540 tokens 'not in the checkpoint's vocabulary' (60 were literal <unk>s)."""
    first, _ = texts
    ptb = tmp_path / "ptb.txt"
    ptb.write_text(first.read_text().replace("fox", "<unk>"))
    words = {"token": "word"}
    train_run(TrainRequest(config_for(tmp_path, ptb, "base", data=words, train={"epochs": 1})))
    newer = tmp_path / "newer.txt"
    newer.write_text(ptb.read_text().replace("lazy", "sleepy", 1))
    with pytest.raises(DrnnError) as refused:
        train_run(TrainRequest(config_for(tmp_path, newer, "ft", data=words, train={"epochs": 1}),
                               init_from=Path("runs/base"), max_unknown_fraction=0.001))  # fmt: skip
    assert str(refused.value).startswith(
        "1 of the 540 tokens the run uses (0.185%) are not in the checkpoint's vocabulary ('sleepy' ×1)"
    )


def test_a_text_s_own_unk_is_no_lack_where_data_max_tokens_cuts_off_the_lacking_words(
    tmp_path: Path, texts: tuple[Path, Path], cli
):
    """ft26 #3: the lacking tokens were bounded by the ids 0 of the tokens used and the lacking words of the
    whole text. With the text's own <unk> kept and the lacking words cut off by data.max_tokens, the bound
    was the written <unk>s: 30 of 270 tokens, and the run was refused. They are counted where they lie."""
    first, _ = texts
    words = {"token": "word", "val_fraction": 0.1}
    train_run(TrainRequest(config_for(tmp_path, first, "base", data=words, train={"epochs": 1})))
    newer = tmp_path / "newer.txt"  # 270 words, 30 of them <unk>; then 120 words, 'slow' and 'red' lacking
    newer.write_text("the <unk> brown fox jumps over the lazy dog. " * 30 + "the slow red dog. " * 30)

    def preview(max_tokens: int) -> dict:
        data = {**words, "max_tokens": max_tokens}
        config = config_for(tmp_path, newer, f"ft{max_tokens}", data=data, train={"epochs": 1})
        code, out, err = cli("data", "--config", str(config), "--init-from", "runs/base", "--json")
        assert code == 0, err
        return json.loads(out.splitlines()[-1])

    clean = preview(270)
    assert (clean["unknown_tokens"], clean["train_would_refuse"]) == (0, None)
    assert not any("<unk>" in note for note in clean["notes"])
    notes = Notes()
    train_run(TrainRequest(tmp_path / "ft270.yaml", init_from=Path("runs/base")), reporter=notes)
    assert not any("<unk>" in note for note in notes.notes)
    # 30 words more: 8 'slow' and 7 'red' (not the 30 written <unk>s as well)
    assert preview(300)["unknown_tokens"] == 15
    with pytest.raises(DrnnError) as refused:
        train_run(TrainRequest(tmp_path / "ft300.yaml", init_from=Path("runs/base")))
    assert str(refused.value).startswith(
        "15 of the 300 tokens the run uses (5%) are not in the checkpoint's vocabulary ('slow' ×30"
    )


def test_a_fine_tuning_run_validates_its_starting_weights_and_keeps_them_where_training_only_hurts(
    tmp_path: Path, texts: tuple[Path, Path]
):
    """A learning rate far too high makes every epoch worse than the base on the new text. The run's
    first metrics line (epoch 0) is the base's validation; it is the first best, so best.safetensors
    keeps the base's weights (drnn eval of it gives that line's figure to the digit), patience counts
    from it, and the run says so. Before, the least bad epoch became "best" with nothing said."""
    first, second = texts
    train_run(TrainRequest(config_for(tmp_path, first, "base", train={"epochs": 2})))
    hurtful = {"lr": 5.0, "epochs": 4, "patience": 1}
    config = config_for(tmp_path, second, "hot", data={"val_fraction": 0.2}, train=hurtful)
    notes = Notes()
    result = train_run(TrainRequest(config, init_from=Path("runs/base")), reporter=notes)
    lines = [json.loads(line) for line in Path("runs/hot/metrics.jsonl").read_text().splitlines()]
    start = lines[0]
    assert {key: start[key] for key in ("epoch", "train_ppl", "step", "tokens_seen", "train_ppl_steps")} == {
        "epoch": 0,
        "train_ppl": None,
        "step": 0,
        "tokens_seen": 0,
        "train_ppl_steps": 0,
    }
    assert [line["epoch"] for line in lines] == [0, 1]  # patience 1: epoch 1 did not beat the start
    assert lines[1]["val_ppl"] > start["val_ppl"]
    assert (result.stop_reason, result.start_val_ppl, result.best_val_ppl) == (
        "patience",
        start["val_ppl"],
        start["val_ppl"],
    )
    assert result.train_ppl == lines[1]["train_ppl"]  # the last line that trained, not the start's
    best, base = (
        load_checkpoint(Path("runs/hot/best.safetensors")),
        load_checkpoint(Path("runs/base/last.safetensors")),
    )
    assert best.model_state.keys() == base.model_state.keys()
    assert all(torch.equal(best.model_state[name], base.model_state[name]) for name in base.model_state)
    assert (
        evaluate_split(load_model(Path("runs/hot"), None, "cpu"), "val").result.perplexity == start["val_ppl"]
    )
    said = f"the starting weights' validation perplexity on this text: {start['val_ppl']:.4g} "
    assert (
        said + "(metrics.jsonl's epoch 0; best.safetensors holds them until a validation beats it)"
        in notes.notes
    )
    assert notes.notes[-1] == (
        f"no validation beat the starting weights' perplexity {start['val_ppl']:.4g}: the run's best.safetensors "
        "holds them, and predict and eval read it"
    )


def test_a_fine_tuning_run_that_improves_keeps_its_best_epoch_beside_the_start(
    tmp_path: Path, texts: tuple[Path, Path]
):
    first, second = texts
    train_run(TrainRequest(config_for(tmp_path, first, "base", train={"epochs": 2})))
    config = config_for(tmp_path, second, "tuned", data={"val_fraction": 0.2}, train={"epochs": 3})
    notes = Notes()
    result = train_run(TrainRequest(config, init_from=Path("runs/base")), reporter=notes)
    lines = [json.loads(line) for line in Path("runs/tuned/metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [0, 1, 2, 3]
    assert (
        result.start_val_ppl
        == lines[0]["val_ppl"]
        > result.best_val_ppl
        == min(line["val_ppl"] for line in lines)
    )
    assert not any(note.startswith("no validation beat") for note in notes.notes)
    # a run from scratch has no starting weights to measure: its lines start with epoch 1
    train_run(
        TrainRequest(config_for(tmp_path, second, "fresh", data={"val_fraction": 0.2}, train={"epochs": 1}))
    )
    assert json.loads(Path("runs/fresh/metrics.jsonl").read_text().splitlines()[0])["epoch"] == 1


def test_a_signal_while_the_starting_weights_validate_stops_at_step_0_and_resume_validates_again(
    tmp_path: Path, texts: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
):
    """A real SIGTERM as the validation starts: it ran before the trainer's handler was installed, so the
    process died with no checkpoint, no stop line, and a --resume that found nothing (trial ft26)."""
    first, second = texts
    train_run(TrainRequest(config_for(tmp_path, first, "base", train={"epochs": 1})))
    config = config_for(tmp_path, second, "tuned", data={"val_fraction": 0.2}, train={"epochs": 1})
    validate = Trainer._validate

    def signalled(self: Trainer, abandonable: bool = False) -> float | None:
        # with no handler of drnn's installed, the signal would end the test run itself
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None), "no handler while validating"
        os.kill(os.getpid(), signal.SIGTERM)
        return validate(self, abandonable)

    monkeypatch.setattr(Trainer, "_validate", signalled)
    with pytest.raises(TrainingInterrupted) as stop:
        train_run(TrainRequest(config, init_from=Path("runs/base")))
    assert str(stop.value).startswith(
        "training stopped by SIGTERM before its first step (the starting weights' validation cut short: "
        "--resume runs it first); its checkpoint is in runs/tuned/last.safetensors"
    )
    assert (stop.value.stopped.steps, stop.value.stopped.validation_pending) == (0, True)  # --json's
    assert load_checkpoint(Path("runs/tuned/last.safetensors")).trainer().global_step == 0
    assert not Path("runs/tuned/metrics.jsonl").read_text()
    monkeypatch.setattr(Trainer, "_validate", validate)
    notes = Notes()
    resumed = train_run(TrainRequest(config, resume=True), reporter=notes)
    source = Path("runs/base/last.safetensors").resolve()
    assert notes.origins == [
        f"from the weights of {source} (resumed before its first step)"
    ]  # not a fresh start's
    lines = [json.loads(line) for line in Path("runs/tuned/metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [0, 1]
    assert resumed.start_val_ppl == lines[0]["val_ppl"]
    uninterrupted = train_run(TrainRequest(config, init_from=Path("runs/base"), run_dir=Path("runs/again")))
    assert (resumed.start_val_ppl, resumed.val_ppl) == (uninterrupted.start_val_ppl, uninterrupted.val_ppl)


def test_a_run_killed_after_its_starting_validation_resumes_without_repeating_it(
    tmp_path: Path, texts: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
):
    """The validation wrote best.safetensors and no last: killed then (kill -9), the run could not be
    resumed, nor started again without --overwrite. Its budgets start after it: a max_time of seconds
    spent on a long validation left the run one step (trial ft26)."""
    first, second = texts
    train_run(TrainRequest(config_for(tmp_path, first, "base", train={"epochs": 1})))
    config = config_for(tmp_path, second, "tuned", data={"val_fraction": 0.2}, train={"epochs": 1})
    order: list[str] = []
    validate, start_budget, train_epoch = Trainer._validate, Budget.start, Trainer.train_epoch

    def killed(self: Trainer, epoch: int) -> None:
        raise RuntimeError("killed")

    monkeypatch.setattr(
        Trainer,
        "_validate",
        lambda self, abandonable=False: order.append("validate") or validate(self, abandonable),
    )
    monkeypatch.setattr(Budget, "start", lambda self: order.append("budget") or start_budget(self))
    monkeypatch.setattr(Trainer, "train_epoch", killed)
    with pytest.raises(RuntimeError, match="killed"):
        train_run(TrainRequest(config, init_from=Path("runs/base")))
    assert order == ["validate", "budget"]
    assert load_checkpoint(Path("runs/tuned/last.safetensors")).trainer().global_step == 0
    # killed between its LAST and BEST: the resume writes the BEST its closing note speaks of
    Path("runs/tuned/best.safetensors").unlink()
    with pytest.raises(RuntimeError, match="killed"):
        train_run(TrainRequest(config, resume=True))
    best, base = (
        load_checkpoint(Path("runs/tuned/best.safetensors")),
        load_checkpoint(Path("runs/base/last.safetensors")),
    )
    assert all(torch.equal(best.model_state[name], base.model_state[name]) for name in base.model_state)
    for owner, name, original in ((Trainer, "_validate", validate), (Budget, "start", start_budget)):
        monkeypatch.setattr(owner, name, original)
    monkeypatch.setattr(Trainer, "train_epoch", train_epoch)
    resumed = train_run(TrainRequest(config, resume=True))
    lines = [json.loads(line) for line in Path("runs/tuned/metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [0, 1] and resumed.start_val_ppl == lines[0]["val_ppl"]


def test_a_start_line_reads_back_as_unmeasured_training_and_a_later_null_as_overflow():
    start = EpochRecord(0, None, 7.5, 0.01, 0.0, 0.0)
    assert EpochRecord.from_json(start.to_json()) == start and start.is_start
    overflowed = EpochRecord.from_json(EpochRecord(1, math.inf, 9.0, 0.01, 1.0, 1.0, 5, 50, 5).to_json())
    assert overflowed.train_ppl == math.inf and not overflowed.is_start
    pytest.importorskip("matplotlib")
    assert render_perplexity_plot([start, overflowed]).startswith(b"\x89PNG")


def test_drnn_data_previews_the_text_as_fine_tuning_would_read_it(
    tmp_path: Path, texts: tuple[Path, Path], cli
):
    """With --init-from, drnn data reads the text with the checkpoint's vocabulary and preprocessing, counts
    what it lacks, and says what drnn train would note or refuse, in train's own words (it described the
    text with a vocabulary and preprocessing of its own, not those the fine-tuning run would use)."""
    first, _ = texts
    train_run(TrainRequest(config_for(tmp_path, first, "base", train={"epochs": 1})))
    shouty = tmp_path / "shouty.txt"
    shouty.write_text("THE LAZY DOG! " * 200 + "the lazy dog " * 200)
    config = str(config_for(tmp_path, shouty, "ft", data={"preprocess": "lower"}, train={"epochs": 1}))
    code, out, err = cli("data", "--config", config, "--init-from", "runs/base", "--json")
    assert code == 0, err
    preview = json.loads(out.splitlines()[-1])
    base = load_checkpoint(Path("runs/base/last.safetensors"))
    assert preview["idx_to_token"] == base.vocab.idx_to_token
    assert (preview["init_from"], preview["unknown_tokens"]) == (
        str(Path("runs/base/last.safetensors").resolve()),
        2200,
    )
    assert preview["notes"][0].startswith(
        "--init-from sets data.preprocess 'lower' → 'none', as in the checkpoint"
    )
    with pytest.raises(DrnnError) as refused:
        train_run(TrainRequest(Path(config), init_from=Path("runs/base"), run_dir=Path("runs/ft")))
    assert preview["train_would_refuse"] == str(refused.value)
    # with a --max-unknown it allows, the note training starts with
    notes = Notes()
    allowed = ("--max-unknown", "0.6")
    code, out, err = cli("data", "--config", config, "--init-from", "runs/base", *allowed, "--json")
    assert code == 0 and json.loads(out.splitlines()[-1])["train_would_refuse"] is None, err
    train_run(
        TrainRequest(Path(config), init_from=Path("runs/base"), max_unknown_fraction=0.6), reporter=notes
    )
    lacking = next(note for note in notes.notes if "map to <unk>" in note)
    assert lacking in json.loads(out.splitlines()[-1])["notes"]
    # a min_freq is noted as not applying, and not also as mapping the lacking tokens to <unk> (it said both)
    code, out, err = cli(
        "data", "--config", config, "--init-from", "runs/base", *allowed, "--set", "data.min_freq=3", "--json"
    )
    said = json.loads(out.splitlines()[-1])["notes"]
    assert code == 0 and any("data.min_freq 3 does not apply with --init-from" in note for note in said), err
    assert not any("maps" in note and "data.min_freq" in note for note in said), said
    assert "most frequent (tokens used)" in err  # a checkpoint's vocabulary keeps no counts: counted now
    code, _, err = cli("data", "--config", config, "--max-unknown", "0.5")
    assert code == 2 and "--max-unknown applies with --init-from" in err
    code, _, err = cli(
        "data", "--config", config, "--init-from", "runs/base", "--set", "model.hidden_size=64"
    )
    assert_one_line_error(code, err, "model.hidden_size", "cannot initialise from")


def test_a_stop_before_the_first_step_of_an_overwrite_keeps_the_run_it_was_to_replace(
    tmp_path: Path, texts: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
):
    """--overwrite swaps its new run in once that run has a checkpoint: a signal during the starting
    validation wrote one at step 0, and the previous run (its best checkpoint, its history) gave way to
    a run that had trained nothing (review rev26)."""
    first, second = texts
    train_run(TrainRequest(config_for(tmp_path, first, "base", train={"epochs": 1})))
    config = config_for(tmp_path, second, "tuned", data={"val_fraction": 0.2}, train={"epochs": 1})
    train_run(TrainRequest(config, init_from=Path("runs/base")))
    before = {path.name: path.read_bytes() for path in Path("runs/tuned").iterdir() if path.is_file()}
    validate = Trainer._validate

    def signalled(self: Trainer, abandonable: bool = False) -> float | None:
        self.stops.signum = signal.SIGINT
        return validate(self, abandonable)

    monkeypatch.setattr(Trainer, "_validate", signalled)
    with pytest.raises(TrainingInterrupted) as stop:
        train_run(TrainRequest(config, init_from=Path("runs/base"), overwrite=True))
    assert str(stop.value) == (
        "training stopped by SIGINT before its first step: nothing was trained, and runs/tuned keeps the run "
        "it held; run the same command again to replace it"
    )
    after = {path.name: path.read_bytes() for path in Path("runs/tuned").iterdir() if path.is_file()}
    assert after.keys() >= {"best.safetensors", "last.safetensors", "metrics.jsonl"} and after == before
    assert stop.value.stopped.summary()["checkpoint"] is None  # --json: this stop wrote none
    assert [
        path.name for path in Path("runs").iterdir() if path.name.startswith(".")
    ] == []  # no staging left


def test_a_resume_with_nothing_to_train_validates_where_a_signal_still_ends_the_command(
    tmp_path: Path, texts: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
):
    """A resume with nothing left to train validates its last checkpoint where no validation was logged:
    under the trainer's handler a Ctrl-C there was noted and ignored, and the command exited 0 (rev26)."""
    first, _ = texts
    config = config_for(tmp_path, first, "run", data={"val_fraction": 0.2}, train={"epochs": 1})
    train_run(TrainRequest(config))
    metrics = Path("runs/run/metrics.jsonl")
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    lines[-1]["val_ppl"] = None  # as a stop off the evaluation cadence leaves it
    metrics.write_text("".join(json.dumps(line) + "\n" for line in lines))
    handlers = []
    validate = Trainer._validate

    def recording(self: Trainer, abandonable: bool = False) -> float | None:
        handlers.append(signal.getsignal(signal.SIGINT))
        return validate(self, abandonable)

    monkeypatch.setattr(Trainer, "_validate", recording)
    result = train_run(TrainRequest(config, resume=True))
    assert result.stop_reason == "epochs" and result.val_ppl is not None
    assert handlers == [signal.default_int_handler]  # Python's own: a Ctrl-C raises, the command ends


def test_a_step_budget_note_of_a_fine_tuning_run_counts_its_starting_validation():
    """ "nothing is validated, checkpointed or logged until its end" came just before the starting weights
    were validated and checkpointed (trial ft26): what a kill loses there is the training alone."""
    from drnn_cli.run_notes import late_cadence_notes

    train = build_config({"train": {"max_steps": 15, "epochs": 10}}).train
    (fresh,) = late_cadence_notes(train, 15, 19.0, validates=True)
    (tuned,) = late_cadence_notes(train, 15, 19.0, validates=True, fine_tuning=True)
    assert (
        "due: nothing is validated, checkpointed or logged until its end; a crash or kill -9 before then loses all of it;"
        in fresh
    )
    assert (
        "due: nothing after the starting weights' validation is validated, checkpointed or logged until its end; "
        "a crash or kill -9 before then loses all its training;" in tuned
    )


def test_a_resume_that_changes_what_validation_reads_no_longer_sets_the_start_beside_its_figures(
    tmp_path: Path, texts: tuple[Path, Path]
):
    """A resume with another train.eval_tokens starts its best over (its validations read other tokens):
    the starting weights' figure, read over the old tokens, was still shown as the run's start (rev26)."""
    first, second = texts
    train_run(TrainRequest(config_for(tmp_path, first, "base", train={"epochs": 1})))
    config = config_for(tmp_path, second, "tuned", data={"val_fraction": 0.2}, train={"epochs": 1})
    tuned = train_run(TrainRequest(config, init_from=Path("runs/base")))
    assert tuned.start_val_ppl is not None
    longer = train_run(TrainRequest(config, ("train.epochs=2",), resume=True))
    assert longer.start_val_ppl == tuned.start_val_ppl  # the same tokens: the same start
    fewer = train_run(TrainRequest(config, ("train.epochs=3", "train.eval_tokens=100"), resume=True))
    assert fewer.start_val_ppl is None and fewer.best_val_ppl is not None


@pytest.fixture
def own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A 1,000-character text (preprocess none: 1,000 tokens) and runs/base trained on it with
    data.val_fraction 0.1 and data.test_fraction 0.1: training tokens 0-800, validation 800-900, test
    900-1,000."""
    monkeypatch.chdir(tmp_path)
    text = tmp_path / "own.txt"
    text.write_text(("the quick brown fox jumps over the lazy dog. " * 23)[:1000])
    held_out = {"val_fraction": 0.1, "test_fraction": 0.1}
    train_run(TrainRequest(config_for(tmp_path, text, "base", data=held_out, train={"epochs": 1})))
    return text


def shared_note(text: Path, base: str = "runs/base", **data: object) -> str | None:
    """The note fine-tuning ``base`` on ``text`` with these data settings starts with, if any."""
    tree = {key: dict(value) for key, value in BASE.items()}
    tree["data"].update(path=str(text), **data)
    start = fine_tuning_point(Path(base), build_config(tree), torch.device("cpu"), Path("runs"))
    return shared_text_note(start, load_dataset(start.config.data, vocab=start.vocab))


def test_fine_tuning_that_validates_on_the_base_s_training_text_says_how_much_and_what_it_means(
    tmp_path: Path, own: Path, cli
):
    """The trial: the base's own text, validation 0.3 and no test: this run validates on tokens 700-1,000,
    of which 700-800 are the base's training text, 100 of 300. Said before training and by drnn data."""
    sha1 = hashlib.sha1(own.read_bytes()).hexdigest()
    expected = (
        f"the fine-tuning text (SHA-1 {sha1}) is the text runs/base/best.safetensors was trained on, and 100 of "
        "this run's 300 validation tokens (33.3%) are in the base run's training split: the starting "
        "validation and the choice of best read text the base model trained on, so they are optimistic; "
        'hold out only text the base run did not train on (from token 800 on) (README "Fine-tuning")'
    )
    tuned = config_for(tmp_path, own, "tuned", data={"val_fraction": 0.3}, train={"epochs": 1})
    notes = Notes()
    train_run(TrainRequest(tuned, init_from=Path("runs/base")), reporter=notes)
    assert expected in notes.notes, notes.notes
    code, out, err = cli("data", "--config", str(tuned), "--init-from", "runs/base", "--json")
    assert code == 0 and expected in json.loads(out.splitlines()[-1])["notes"], err


def test_eval_of_a_fine_tuned_run_says_its_split_holds_text_a_base_trained_on(tmp_path: Path, own: Path, cli):
    """The starting note scrolled away, and drnn eval --split val of the fine-tuned run said nothing of its
    100 validation tokens the base trained on (ft33). A second fine-tuning (validation 0.25: tokens
    750-1,000) shares none with its direct base (training 0-700) but 50 with the base's base (0-800):
    said as it starts and by drnn eval."""
    base = (tmp_path / "runs" / "base" / "best.safetensors").resolve()
    tuned = config_for(tmp_path, own, "tuned", data={"val_fraction": 0.3}, train={"epochs": 1})
    train_run(TrainRequest(tuned, init_from=Path("runs/base")))
    code, _, err = cli("eval", "--run", "runs/tuned", "--split", "val")
    assert (
        code == 0
        and (
            f"note: 100 of the 300 validation tokens (33.3%) are in the training split of {base}, which this "
            'model was fine-tuned from on this same text: this perplexity is optimistic (README "Fine-tuning")'
        )
        in err.splitlines()
    ), err
    again = config_for(tmp_path, own, "again", data={"val_fraction": 0.25}, train={"epochs": 1})
    notes = Notes()
    train_run(TrainRequest(again, init_from=Path("runs/tuned")), reporter=notes)
    sha1 = hashlib.sha1(own.read_bytes()).hexdigest()
    # said as it started too: its direct base shares none of its held-out tokens, the base's base 50
    assert (
        f"50 of this run's 250 validation tokens (20%) are in the training split of {base}, which "
        f"runs/tuned/best.safetensors was fine-tuned from, on this same text (SHA-1 {sha1}): the starting "
        "validation and the choice of best read text an earlier model of this one trained on, so they are "
        'optimistic (README "Fine-tuning")'
    ) in notes.notes, notes.notes
    code, _, err = cli("eval", "--run", "runs/again", "--split", "val")
    assert (
        code == 0
        and (
            f"note: 50 of the 250 validation tokens (20%) are in the training split of {base}, which this "
            "model was fine-tuned from in turn on this same text: this perplexity is optimistic "
            '(README "Fine-tuning")'
        )
        in err.splitlines()
    ), err
    # the base's own run holds none of its held-out text in training: nothing to say
    code, _, err = cli("eval", "--run", "runs/base", "--split", "val")
    assert code == 0 and "fine-tuned from" not in err


def test_the_start_names_each_split_s_tokens_an_earlier_base_trained_on_beyond_the_direct_one(
    tmp_path: Path, own: Path
):
    """runs/base trains on tokens 0-800, runs/tuned (from it, validation 0.3) on 0-700; a run from
    runs/tuned holding out validation 0.1 and test 0.3 (600-700, 700-1,000) shares its validation with
    runs/tuned, and 100 of its test tokens (700-800) with runs/base alone. The start said the first and
    advised holding out from token 700 on, which leaves those 100 in runs/base's training split (review
    rev40c): it says both, and advises from token 800 on, as drnn eval judges the splits."""
    base = (tmp_path / "runs" / "base" / "best.safetensors").resolve()
    tuned = config_for(tmp_path, own, "tuned", data={"val_fraction": 0.3}, train={"epochs": 1})
    train_run(TrainRequest(tuned, init_from=Path("runs/base")))
    again = config_for(
        tmp_path, own, "again", data={"val_fraction": 0.1, "test_fraction": 0.3}, train={"epochs": 1}
    )
    notes = Notes()
    train_run(TrainRequest(again, init_from=Path("runs/tuned")), reporter=notes)
    sha1 = hashlib.sha1(own.read_bytes()).hexdigest()
    direct = next(note for note in notes.notes if note.startswith("the fine-tuning text"))
    assert direct.endswith(
        "100 of this run's 100 validation tokens (100%) are in the base run's training split: the starting "
        "validation and the choice of best read text the base model trained on, so they are optimistic; hold "
        "out only text the base run or the bases it was fine-tuned from did not train on (from token 800 on) "
        '(README "Fine-tuning")'
    ), direct
    assert (
        f"100 of this run's 300 test tokens (33.3%) are in the training split of {base}, which "
        f"runs/tuned/best.safetensors was fine-tuned from, on this same text (SHA-1 {sha1}): the test figure "
        "(drnn eval --split test) reads text an earlier model of this one trained on, so it is optimistic "
        '(README "Fine-tuning")'
    ) in notes.notes, notes.notes


def test_a_fine_tuned_run_records_its_bases_and_judges_its_splits_by_them_whatever_became_of_the_files(
    tmp_path: Path, own: Path, cli
):
    """A fine-tuned run named its base by path alone: replaced there by a run holding out half the text,
    the base's new training split (tokens 0-500) no longer overlapped the fine-tuned run's validation
    (700-1,000), and its optimistic figure went unflagged; a base resumed since was scored with
    --splits-of as though it were the model the fine-tuning started from (prac39). The run records where
    its base stood and how it cut the text: its validation's 100 tokens in the base's training split
    (700-800) stay counted after the base is resumed, replaced or deleted (review rev39c #3: the overlap
    was "cannot be told" once the file changed)."""
    from drnn_cli.checkpoint import read_checkpoint_info, trained_point

    base = (tmp_path / "runs" / "base" / "best.safetensors").resolve()
    tuned = config_for(tmp_path, own, "tuned", data={"val_fraction": 0.3}, train={"epochs": 1})
    train_run(TrainRequest(tuned, init_from=Path("runs/base")))
    info = read_checkpoint_info(Path("runs/tuned/best.safetensors"))
    recorded = info.init_from_at
    assert recorded == trained_point(read_checkpoint_info(base))
    assert re.fullmatch(r"step 9 after \d+\.\d{3} s, header [0-9a-f]{12}", recorded or "")  # 720 / 80
    assert info.bases is not None and info.bases.cut is None
    [record] = info.bases.records  # the base was trained from scratch: one record
    assert (record.label, record.at, record.data.val_fraction, record.data.test_fraction) == (
        str(base),
        recorded,
        0.1,
        0.1,
    )

    def optimistic(since: str = "") -> str:
        named = f"{base} (as it stood at {recorded}; {since})" if since else str(base)
        return (
            f"note: 100 of the 300 validation tokens (33.3%) are in the training split of {named}, which this "
            'model was fine-tuned from on this same text: this perplexity is optimistic (README "Fine-tuning")'
        )

    code, _, err = cli("eval", "--run", "runs/tuned", "--split", "val")
    assert code == 0 and optimistic() in " ".join(err.split()) and "no longer" not in err, err
    # the base resumed for two more epochs: eval --splits-of it beside the fine-tuned run says so
    longer = config_for(
        tmp_path, own, "base", data={"val_fraction": 0.1, "test_fraction": 0.1}, train={"epochs": 3}
    )
    assert cli("train", "--config", str(longer), "--resume")[0] == 0
    now = trained_point(read_checkpoint_info(base))
    code, _, err = cli("eval", "--run", "runs/base", "--splits-of", "runs/tuned", "--split", "val")
    said = " ".join(err.split())
    assert (
        code == 0
        and (
            f"runs/tuned/best.safetensors was fine-tuned from runs/base/best.safetensors when it stood at {recorded}; "
            f"it stands at "
            f"{now} now: this figure is not the model that run started from"
        )
        in said
    ), err
    # its path named with the checkpoint it was, which the file no longer is (review rev40 #5)
    replaced = optimistic("another checkpoint there now")
    code, _, err = cli("eval", "--run", "runs/tuned", "--split", "val")
    assert code == 0 and replaced in " ".join(err.split()) and "no longer" not in err, err
    # replaced by a run that holds out half, then deleted: the recorded split still counts
    half = config_for(tmp_path, own, "base", data={"val_fraction": 0.5}, train={"epochs": 1})
    assert cli("train", "--config", str(half), "--overwrite")[0] == 0
    code, _, err = cli("eval", "--run", "runs/tuned", "--split", "val")
    assert code == 0 and replaced in " ".join(err.split()) and "no longer" not in err, err
    code, _, err = cli("eval", "--run", "runs/tuned", "--splits-of", "runs/tuned", "--split", "val")
    assert code == 0 and (
        f"100 of the 300 validation tokens (33.3%) are in the training split of {base} (as it stood at "
        f"{recorded}; another checkpoint there now) (a run the checkpoint scored was fine-tuned from) on this "
        "same text: this perplexity is optimistic"
    ) in " ".join(err.split()), err
    shutil.rmtree(base.parent)
    code, _, err = cli("eval", "--run", "runs/tuned", "--split", "val")
    assert code == 0 and optimistic("moved or deleted since") in " ".join(err.split()), err


def test_a_checkpoint_that_predates_the_record_reads_its_bases_and_says_when_one_was_replaced(
    tmp_path: Path, own: Path, cli
):
    """A fine-tuned checkpoint written before drnn recorded its bases (no ``bases`` in its header) has
    its bases read from their files, as far as each is still the checkpoint recorded (init_from_at): a
    base replaced since is said to be, and its split is not compared, plainly or through --splits-of."""
    from drnn_cli.checkpoint import read_checkpoint_info, trained_point

    base = (tmp_path / "runs" / "base" / "best.safetensors").resolve()
    tuned = config_for(tmp_path, own, "tuned", data={"val_fraction": 0.3}, train={"epochs": 1})
    train_run(TrainRequest(tuned, init_from=Path("runs/base")))
    for file in Path("runs/tuned").glob("*.safetensors"):
        rewrite_checkpoint(file, file, edit_header=lambda header: header.pop("bases"))
    info = read_checkpoint_info(Path("runs/tuned/best.safetensors"))
    assert info.bases is None and info.init_from_at == trained_point(read_checkpoint_info(base))
    code, _, err = cli("eval", "--run", "runs/tuned", "--split", "val")
    assert code == 0 and "100 of the 300 validation tokens" in err and "no longer" not in err, err
    half = config_for(tmp_path, own, "base", data={"val_fraction": 0.5}, train={"epochs": 1})
    assert cli("train", "--config", str(half), "--overwrite")[0] == 0
    replaced = trained_point(read_checkpoint_info(base))
    code, _, err = cli("eval", "--run", "runs/tuned", "--split", "val")
    said = " ".join(err.split())
    assert code == 0 and "optimistic" not in said, err
    assert (
        f"{base} is no longer the checkpoint this model was fine-tuned from (then at {info.init_from_at}; now at "
        f'{replaced}): whether its training text is held out here cannot be told (README "Fine-tuning")'
    ) in said, err
    # scored on its own splits through --splits-of, as the base replaced: said too (review rev39c #1)
    code, _, err = cli("eval", "--run", "runs/tuned", "--splits-of", "runs/tuned", "--split", "val")
    assert code == 0 and f"{base} is no longer the checkpoint this model" in " ".join(err.split()), err
    # a run fine-tuned from it records where its reading stopped, and says so as it starts and in eval
    # (review rev40 #1: the record dropped it, and eval of the new run said nothing)
    again = config_for(tmp_path, own, "again", data={"val_fraction": 0.25}, train={"epochs": 1})
    code, out, err = cli("train", "--config", str(again), "--init-from", "runs/tuned")
    tuned = Path("runs/tuned/best.safetensors").resolve()
    cut = (
        f"{base} is no longer the checkpoint {tuned} was fine-tuned from (then at {info.init_from_at}; now at "
        f'{replaced}): whether its training text is held out here cannot be told (README "Fine-tuning")'
    )
    assert code == 0 and cut in " ".join((out + err).split()), out + err
    code, _, err = cli("eval", "--run", "runs/again", "--split", "val")
    assert code == 0 and cut in " ".join(err.split()), err


def test_a_test_split_on_the_base_s_training_text_is_counted_beside_the_validation_split(own: Path):
    """Validation 0.1, test 0.3: validation is tokens 600-700 (all 100 the base trained on) and test
    700-1,000 (700-800 the base trained on: 100 of 300)."""
    note = shared_note(own, val_fraction=0.1, test_fraction=0.3)
    assert note is not None and note.endswith(
        ", and 100 of this run's 100 validation tokens (100%) and 100 of its 300 test tokens (33.3%) are in "
        "the base run's training split: the starting validation, the choice of best and the test figure "
        "(drnn eval --split test) read text the base model trained on, so they are optimistic; hold out only "
        'text the base run did not train on (from token 800 on) (README "Fine-tuning")'
    ), note


def test_training_on_text_the_base_held_out_is_said_to_make_its_held_out_figures_meaningless(own: Path):
    """Validation 0.05, test 0.05: held out 900-1,000 lies in the base's held-out text, but training
    reads 0-900, and 800-900 is the base's validation split: 100 of its 900 tokens."""
    note = shared_note(own, val_fraction=0.05, test_fraction=0.05)
    assert note is not None and note.endswith(
        ", and 100 of this run's 900 training tokens (11.1%) are in the base run's held-out splits: the "
        "fine-tuned model trains on text the base run held out, so the base run's validation and test "
        "figures mean nothing for it; to train on none of the text it held out (tokens 800 to 1,000), keep its "
        "data.max_tokens (-1), data.val_fraction (0.1) and data.test_fraction (0.1), which cut the same splits "
        '(README "Fine-tuning")'
    ), note


def test_held_out_splits_inside_the_base_s_held_out_text_or_another_text_get_no_note(
    tmp_path: Path, own: Path
):
    """Validation 0.2 (800-1,000, the base's validation and test) or the base's own splits share nothing;
    another text of the same length shares no text at all, whatever the splits."""
    assert shared_note(own, val_fraction=0.2) is None
    assert shared_note(own, val_fraction=0.1, test_fraction=0.1) is None
    other = tmp_path / "other.txt"
    other.write_text(("a lazy dog sleeps by the brown fox den. " * 25)[:1000])
    assert shared_note(other, val_fraction=0.3) is None


def test_the_base_s_splits_are_cut_from_its_max_tokens_and_a_base_without_held_out_text_says_so(
    tmp_path: Path, own: Path
):
    """A base that read the first 500 tokens (training 0-400, held out 400-500) under a run validating on
    700-1,000, which it never read: the run trains on 400-500. A base trained on all 1,000 tokens leaves
    no text of this file to hold out."""
    capped = {"max_tokens": 500, "val_fraction": 0.1, "test_fraction": 0.1}
    train_run(TrainRequest(config_for(tmp_path, own, "capped", data=capped, train={"epochs": 1})))
    note = shared_note(own, "runs/capped", val_fraction=0.3)
    assert note is not None and note.endswith(
        ", and 100 of this run's 700 training tokens (14.3%) are in the base run's held-out splits: the "
        "fine-tuned model trains on text the base run held out, so the base run's validation and test "
        "figures mean nothing for it; to train on none of the text it held out (tokens 400 to 500), keep its "
        "data.max_tokens (500), data.val_fraction (0.1) and data.test_fraction (0.1), which cut the same splits "
        '(README "Fine-tuning")'
    ), note
    train_run(TrainRequest(config_for(tmp_path, own, "all", train={"epochs": 1})))
    note = shared_note(own, "runs/all", val_fraction=0.3)
    assert note is not None and note.endswith(
        ", and 300 of this run's 300 validation tokens (100%) are in the base run's training split: the "
        "starting validation and the choice of best read text the base model trained on, so they are "
        "optimistic; the base run trained on all of it: measure the fine-tuned model on another text "
        '(drnn eval --data FILE) (README "Fine-tuning")'
    ), note


def test_word_runs_compare_splits_in_words_and_the_same_text_with_other_line_breaks_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """1,000 words of uneven length: the overlap is 100 words, where characters would count otherwise. A
    copy with CRLF line breaks is the same text as drnn reads it (its text SHA-1), so it is noted too."""
    monkeypatch.chdir(tmp_path)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog"]
    text = tmp_path / "words.txt"
    text.write_text(
        "\n".join(" ".join(words[(i + j) % 9] for j in range(10)) for i in range(0, 1000, 10)) + "\n"
    )
    data = {"token": "word", "val_fraction": 0.1, "test_fraction": 0.1}
    train_run(TrainRequest(config_for(tmp_path, text, "words", data=data, train={"epochs": 1})))
    validating = ", and 100 of this run's 300 validation tokens (33.3%) are in the base run's training split"
    note = shared_note(text, "runs/words", token="word", val_fraction=0.3)
    assert note is not None and validating in note, note
    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes(text.read_bytes().replace(b"\n", b"\r\n"))
    note = shared_note(crlf, "runs/words", token="word", val_fraction=0.3)
    sha1 = hashlib.sha1(crlf.read_bytes()).hexdigest()
    assert note is not None and note.startswith(f"the fine-tuning text (SHA-1 {sha1}) is the text"), note
    assert validating in note
