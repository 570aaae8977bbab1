"""Decoding (greedy and sampled) and evaluation (perplexity, bits per token) of trained models."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_TREE, assert_one_line_error, config_file

from drnn_cli.batches import Shard, eval_batches, split_tokens
from drnn_cli.checkpoint import load_checkpoint, save_checkpoint
from drnn_cli.commands import (
    Continuation,
    PredictReport,
    default_split,
    evaluate_split,
    load_model,
    predict,
)
from drnn_cli.config import Config, ModelConfig
from drnn_cli.corpus import preprocessing_changed
from drnn_cli.data import load_dataset
from drnn_cli.decode import DecodeOptions, InvalidDecodeOption, continue_prefix, prefix_tokens
from drnn_cli.errors import DrnnError, UsageError
from drnn_cli.evaluate import evaluate
from drnn_cli.models import RNNLanguageModel, lm_loss
from drnn_cli.vocab import Vocab


def decode(run: Path, prefix: str, **options) -> str:
    return predict(load_model(run, None, "cpu"), prefix, DecodeOptions(**options))


# ---------------------------------------------------------------------------------------------
# Decoding


def test_greedy_is_deterministic_and_starts_with_the_prefix(tiny_run: Path):
    first = decode(tiny_run, "time traveller", num_tokens=40)
    assert first == decode(tiny_run, "time traveller", num_tokens=40)
    assert first.startswith("time traveller") and len(first) == len("time traveller") + 40


def test_seeded_sampling_is_reproducible_and_seeds_differ(tiny_run: Path):
    a = decode(tiny_run, "the", num_tokens=60, sample=True, seed=1)
    assert a == decode(tiny_run, "the", num_tokens=60, sample=True, seed=1)
    assert a != decode(tiny_run, "the", num_tokens=60, sample=True, seed=2)


@pytest.mark.parametrize(
    "options",
    [
        {"sample": True, "top_k": 1, "seed": 5},
        {"sample": True, "temperature": 1e-6, "seed": 5},
        {"sample": True, "top_p": 1e-9, "seed": 5},
    ],
)
def test_top_k_1_tiny_temperature_and_tiny_top_p_equal_greedy(tiny_run: Path, options: dict):
    assert decode(tiny_run, "time traveller", num_tokens=30, **options) == decode(
        tiny_run, "time traveller", num_tokens=30
    )


def test_neither_greedy_decoding_nor_a_sample_writes_unk(tiny_run: Path):
    """A model that puts ``<unk>`` first (its bias pushed up here, as a word model's rare words do):
    greedy decoding wrote it and fed it back ("the<unk><unk><unk>"); both now write the likeliest of
    the other tokens, greedy the one it would write were ``<unk>`` not there."""
    loaded = load_model(tiny_run, None, "cpu")
    plain = predict(loaded, "the", DecodeOptions(num_tokens=3))
    with torch.no_grad():
        loaded.model.decoder.bias[0] += 8.0  # <unk> now ~e^8 times likelier than before
        logits, _ = loaded.model(torch.tensor([[1, 2]]), loaded.model.begin_state(1, torch.device("cpu")))
        assert int(logits[-1, 0].argmax()) == 0  # it is first
    assert predict(loaded, "the", DecodeOptions(num_tokens=3)) == plain
    assert "<unk>" not in plain
    for seed in range(5):
        text = predict(loaded, "the", DecodeOptions(num_tokens=40, sample=True, temperature=2.0, seed=seed))
        assert len(text) == 3 + 40 and "<unk>" not in text


@pytest.mark.parametrize(("token", "vocabulary", "prefix"), [
    ("char", ["<unk>", " ", *"abcde"], "ab c"),
    ("word", ["<unk>", "the", "time", "machine", "was"], "the time"),
])  # fmt: skip
def test_streamed_pieces_written_one_after_another_are_the_returned_text(
    token: str, vocabulary: list[str], prefix: str
) -> None:
    """What ``drnn predict`` writes to a terminal as it generates: word tokens come with their space."""
    model = RNNLanguageModel(len(vocabulary), ModelConfig(hidden_size=8, num_layers=1))
    pieces: list[str] = []
    options = DecodeOptions(num_tokens=6, sample=True, seed=3)
    text = continue_prefix(
        model, Vocab(vocabulary), prefix, "none", token, options, torch.device("cpu"), pieces.append
    )
    assert "".join(pieces) == text
    assert pieces[0] == prefix and len(pieces) == 1 + 6
    if token == "word":
        assert all(piece.startswith(" ") and piece[1:] in vocabulary for piece in pieces[1:])


def test_decoding_on_a_cpu_runs_one_thread_and_gives_the_others_back(tiny_run: Path, monkeypatch):
    """A one-row step is too small to share between threads; on a busy machine they only wait for
    each other (drnn predict -n 300 under a load of 3 on 2 cores: 20.5 s with 2 threads, 4.6 s with 1)."""
    loaded = load_model(tiny_run, None, "cpu")
    seen: list[int] = []
    forward = loaded.model.forward
    monkeypatch.setattr(
        loaded.model, "forward", lambda *args: seen.append(torch.get_num_threads()) or forward(*args)
    )
    torch.set_num_threads(2)
    try:
        text = predict(loaded, "the", DecodeOptions(num_tokens=5))
        assert len(text) == 8 and seen == [1] * 5 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)  # the suite's setting (conftest)


def test_a_sample_without_a_seed_says_the_seed_that_draws_it_again(tiny_run: Path, cli):
    """Without --seed a good sample could not be had twice: the seed drawn is said, and in --json."""
    code, out, err = cli("predict", "the", "--run", str(tiny_run), "-n", "30", "--sample", "--json")
    assert code == 0, err
    drawn = json.loads(out)
    (note,) = [line for line in err.splitlines() if line.startswith("note: --sample drew")]
    assert note == f"note: --sample drew --seed {drawn['seed']}: give it to draw the same sample again"
    args = ("predict", "the", "--run", str(tiny_run), "-n", "30", "--sample", "--json")
    code, out, err = cli(*args, "--seed", str(drawn["seed"]))
    assert code == 0 and json.loads(out) == drawn and "--sample drew" not in err
    code, out, _ = cli("predict", "the", "--run", str(tiny_run), "-n", "30", "--json")
    assert "seed" not in json.loads(out)  # greedy: nothing drawn


def test_prefix_is_preprocessed_like_the_corpus(tiny_run: Path):
    assert decode(tiny_run, "Time Traveller!", num_tokens=5).startswith("time traveller")


def test_prefix_errors_name_the_problem():
    vocab = Vocab(["<unk>", " ", "a", "b"])
    with pytest.raises(DrnnError, match="prefix is empty; give at least one character"):
        prefix_tokens("", vocab, "none", "char")
    with pytest.raises(DrnnError, match="prefix is empty; give at least one word"):  # a word model's
        prefix_tokens("", Vocab(["<unk>", "the"]), "none", "word")
    with pytest.raises(DrnnError, match="empty after data.preprocess=d2l"):
        prefix_tokens("123!", vocab, "d2l", "char")
    # the example is one the model can continue: d2l's where its vocabulary spells it, else its own
    # text's two most frequent tokens (a trial's Chinese model was told to try "time traveller")
    with pytest.raises(DrnnError, match="give at least one character, e.g. drnn predict 'time traveller'$"):
        prefix_tokens("", Vocab(["<unk>", *"time ravl"]), "none", "char")
    with pytest.raises(DrnnError, match="give at least one character, e.g. drnn predict '我能'$"):
        prefix_tokens("", Vocab(["<unk>", *"我能吞下玻璃而不伤身体。 "]), "none", "char")
    with pytest.raises(DrnnError, match="give at least one word, e.g. drnn predict 'the cat'$"):
        prefix_tokens("", Vocab(["<unk>", "\n", "the", "cat", "sat"]), "none", "word")
    with pytest.raises(DrnnError, match=r"not in the model's vocabulary: 'c', 'z'"):
        prefix_tokens("abzc", vocab, "none", "char")
    assert prefix_tokens("ab ba", vocab, "none", "char") == list("ab ba")
    invisible = "vocabulary: 'c', '\u0301' (U+0301), '\\u200b' (U+200B);"  # an accent, a zero-width space
    with pytest.raises(DrnnError, match=re.escape(invisible)):
        prefix_tokens("a\u0301b\u200bc", vocab, "none", "char")


def test_a_prefix_in_the_other_unicode_form_is_read_in_the_form_the_vocabulary_spells():
    """macOS writes "café" as 'e' and a combining accent (NFD); a model of composed text (NFC, as most
    text is) refused it, naming an accent nobody can see. It is the same text; read composed, and the
    other way round. A prefix that neither form spells is refused, naming what the user typed."""
    composed, decomposed = "caf\u00e9", "cafe\u0301"
    assert prefix_tokens(decomposed, Vocab(["<unk>", *"acf\u00e9"]), "none", "char") == list(composed)
    assert prefix_tokens(composed, Vocab(["<unk>", *"acfe\u0301"]), "none", "char") == list(decomposed)
    assert prefix_tokens(f"{decomposed} au lait", Vocab(["<unk>", "au", "lait", composed]), "none", "word") == [
        composed, "au", "lait"
    ]  # fmt: skip
    with pytest.raises(DrnnError, match=r"'z', '\u0301' \(U\+0301\); remove"):
        prefix_tokens(decomposed + "z", Vocab(["<unk>", *"acfe"]), "none", "char")
    assert not preprocessing_changed(decomposed, composed)  # no note: it reads as what was typed


def test_a_prefix_with_windows_line_breaks_continues_on_a_run_that_keeps_line_breaks():
    """The corpus reader turned the text's CR LF into LF, so "\\n" is in the vocabulary and "\\r" is
    not: a prompt pasted with CR LF is the same prefix (drnn predict refused it naming '\\r')."""
    vocab = Vocab(["<unk>", "a", "b", "\n"])
    assert prefix_tokens("ab\r\nba\r", vocab, "none", "char") == ["a", "b", "\n", "b", "a", "\n"]


def test_a_word_prefix_over_two_lines_splits_its_words_line_by_line_as_the_corpus_does():
    """d2l preprocessing glues a text's lines for characters ("him" + "was"), but word tokens split each
    line on its own, so "time" ending a line and "machine" starting the next are two words in the
    corpus: the prefix refused 'timemachine' as a word not in the vocabulary."""
    vocab = Vocab(["<unk>", "the", "time", "machine"])
    assert prefix_tokens("The time\nMachine", vocab, "d2l", "word") == ["the", "time", "machine"]
    assert prefix_tokens("the time\r\nmachine", vocab, "d2l", "word") == ["the", "time", "machine"]
    chars = Vocab(["<unk>", " ", *"acehimnt"])
    assert prefix_tokens("the time\nmachine", chars, "d2l", "char") == list("the timemachine")  # d2l's glue


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_tokens": -1}, "num_tokens must be in 0..100,000 (got -1)"),
        (
            {"sample": True, "temperature": 0.0},
            "temperature must be in [1e-06, 1000] when sampling (got 0.0)",
        ),
        ({"top_k": 0}, "top_k must be >= 1 (got 0)"),
        ({"top_p": 1.5}, "top_p must be in (0, 1] (got 1.5)"),
        ({"seed": -1}, f"seed must be in 0..{2**63 - 1} (got -1)"),
    ],
)
def test_decode_options_are_validated_in_the_library_s_own_words(options: dict, message: str):
    with pytest.raises(InvalidDecodeOption) as raised:
        DecodeOptions(**options)
    assert str(raised.value) == message  # field names, no command-line flags


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-n", "-1"], "-n/--num-chars must be in 0..100,000 (got -1)"),
        (
            ["--sample", "--temperature", "0"],
            "--temperature must be in [1e-06, 1000] when sampling (got 0.0); for the most likely token drop --sample",
        ),
        (["--sample", "--top-k", "0"], "--top-k must be >= 1 (got 0)"),
        (["--sample", "--top-p", "1.5"], "--top-p must be in (0, 1] (got 1.5)"),
        (["--sample", "--seed", "-1"], f"--seed must be in 0..{2**63 - 1} (got -1)"),
        (
            ["--top-k", "3", "--seed", "7"],
            "--top-k, --seed shape sampling; add --sample (without it predict takes the most likely token, "
            "as d2l's predict_ch8)",
        ),
        (
            ["--temperature", "0.5"],
            "--temperature shapes sampling; add --sample (without it predict takes the most likely token, "
            "as d2l's predict_ch8)",
        ),
    ],
)
def test_predict_names_the_flag_of_an_out_of_range_option(cli, args: list[str], message: str):
    code, out, err = cli("predict", "time", "--checkpoint", "never-read.safetensors", *args)
    assert (code, out, err) == (2, "", f"drnn: error: {message}\n")  # a usage error, as the parser's


# ---------------------------------------------------------------------------------------------
# Evaluation


def _model64(vocab_size: int = 5) -> RNNLanguageModel:
    torch.manual_seed(0)
    return RNNLanguageModel(vocab_size, ModelConfig(cell="gru", hidden_size=6, num_layers=2)).double()


@torch.no_grad()
def _nll_by_hand(model: RNNLanguageModel, segment: torch.Tensor, state=None) -> tuple[float, object]:
    """Σ −log p(next | everything before) over one row, fed as a single sequence."""
    state = model.begin_state(1, "cpu") if state is None else state
    logits, state = model(segment[:-1].unsqueeze(0), state)
    return float(F.cross_entropy(logits[:, 0], segment[1:], reduction="sum")), state


def test_eval_with_one_row_equals_the_loss_computed_by_hand():
    model = _model64()
    tokens = torch.randint(0, 5, (41,), generator=torch.Generator().manual_seed(1))
    by_hand, _ = _nll_by_hand(model, tokens)
    result = evaluate(model, tokens, batch_size=1, num_steps=7, device=torch.device("cpu"))
    assert result.tokens == 40
    assert result.nll == pytest.approx(by_hand, rel=1e-12)
    assert result.perplexity == pytest.approx(math.exp(by_hand / 40))
    assert result.bits_per_token == pytest.approx(by_hand / 40 / math.log(2))


def test_eval_sums_the_loss_of_unk_targets_apart_and_the_total_as_without():
    """The perplexity over the tokens other than <unk> (id 0 here) is the hand-computed loss of those
    targets alone; the whole's sum is the one evaluation gives without the split, to the last bit."""
    model = _model64()
    tokens = torch.randint(0, 5, (41,), generator=torch.Generator().manual_seed(1))
    logits, _ = model(tokens[:-1].unsqueeze(0), model.begin_state(1, "cpu"))
    losses = F.cross_entropy(logits[:, 0], tokens[1:], reduction="none").double().detach()
    is_unk = tokens[1:] == 0
    assert 0 < int(is_unk.sum()) < 40  # the draw has some of each
    cpu = torch.device("cpu")
    split = evaluate(model, tokens, batch_size=1, num_steps=7, device=cpu, unknown_id=0)
    assert split.nll == evaluate(model, tokens, batch_size=1, num_steps=7, device=cpu).nll
    assert split.unknown == int(is_unk.sum())
    assert split.unknown_nll == pytest.approx(float(losses[is_unk].sum()), rel=1e-12)
    known = float(losses[~is_unk].sum()) / int((~is_unk).sum())
    assert split.known_perplexity == pytest.approx(math.exp(known), rel=1e-12)
    assert split.known_perplexity != pytest.approx(split.perplexity, rel=1e-3)


def test_eval_with_rows_and_a_tail_equals_rows_by_hand():
    """45 tokens → 44 targets = 3 rows of 14 + a tail of 2 that continues the last row's state."""
    model = _model64()
    tokens = torch.randint(0, 5, (45,), generator=torch.Generator().manual_seed(2))
    total = 0.0
    for row in range(3):
        nll, state = _nll_by_hand(model, tokens[row * 14 : row * 14 + 15])
        total += nll
    tail, _ = _nll_by_hand(model, tokens[42:], state)
    total += tail
    result = evaluate(model, tokens, batch_size=3, num_steps=4, device=torch.device("cpu"))
    assert result.tokens == 44
    assert result.nll == pytest.approx(total, rel=1e-12)
    # <unk> (id 0) apart: the mask follows the loss's time-major rows, not the minibatch's row-major ones
    by_target = []
    for row in range(3):
        segment = tokens[row * 14 : row * 14 + 15]
        logits, state = model(segment[:-1].unsqueeze(0), model.begin_state(1, "cpu"))
        by_target += zip(
            segment[1:].tolist(),
            F.cross_entropy(logits[:, 0], segment[1:], reduction="none").tolist(),
            strict=True,
        )
    logits, _ = model(tokens[42:-1].unsqueeze(0), state)
    by_target += zip(
        tokens[43:].tolist(),
        F.cross_entropy(logits[:, 0], tokens[43:], reduction="none").tolist(),
        strict=True,
    )
    unk = [loss for target, loss in by_target if target == 0]
    split = evaluate(model, tokens, batch_size=3, num_steps=4, device=torch.device("cpu"), unknown_id=0)
    assert 0 < split.unknown == len(unk) < 44 and split.nll == result.nll
    assert split.unknown_nll == pytest.approx(sum(unk), rel=1e-9)
    known = (total - sum(unk)) / (44 - len(unk))
    assert split.known_perplexity == pytest.approx(math.exp(known), rel=1e-9)


@pytest.mark.parametrize("with_unk", [True, False], ids=["word-text-with-unk", "char-text-without"])
def test_eval_scores_unk_apart_in_one_log_softmax_with_the_figures_of_two(with_unk: bool):
    """ft26 #7: a text with <unk> had its loss computed twice a minibatch (the sum, then each target's),
    a log-softmax over the whole vocabulary each time: 1.4× the time at 10,000 words. One serves both
    now, and every figure is the two-pass one to the bit (lm_loss's sum, and its per-target losses of
    the <unk> targets, minibatch by minibatch); a text without <unk> is scored as it was."""
    torch.manual_seed(0)
    model = RNNLanguageModel(300, ModelConfig(cell="gru", hidden_size=16, num_layers=1, embedding_dim=8))
    tokens = torch.randint(1, 300, (183,), generator=torch.Generator().manual_seed(3))
    if with_unk:
        tokens[::7] = 0  # 26 <unk>s, a word text's own or ones its vocabulary lacks
    logits_seen: list[torch.Tensor] = []
    model.register_forward_hook(lambda _module, _inputs, output: logits_seen.append(output[0]))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        result = evaluate(model, tokens, batch_size=4, num_steps=9, device=torch.device("cpu"), unknown_id=0)
    log_softmaxes = sum(event.name == "aten::_log_softmax" for event in profile.events())
    batches = list(eval_batches(tokens, 4, 9))
    assert log_softmaxes == len(logits_seen) == len(batches) == 6  # 5 of 4 rows of 45, the tail's of 2
    nll, unknown_nll, unknown = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64), 0
    for logits, batch in zip(logits_seen, batches, strict=True):
        nll += lm_loss(logits, batch.y, reduction="sum").double()
        is_unknown = batch.y.t().reshape(-1) == 0
        unknown_nll += torch.where(is_unknown, lm_loss(logits, batch.y, reduction="none").double(), 0.0).sum()
        unknown += int(is_unknown.sum())
    assert (result.tokens, result.unknown) == (182, 26 if with_unk else 0) and unknown == result.unknown
    assert (result.nll, result.unknown_nll) == (float(nll), float(unknown_nll))
    assert result.nll == evaluate(model, tokens, batch_size=4, num_steps=9, device=torch.device("cpu")).nll


@pytest.mark.parametrize("world_size", [2, 3])
def test_under_torchrun_each_rank_evaluates_its_block_of_rows_and_the_sums_are_one_process_s(
    world_size: int, monkeypatch: pytest.MonkeyPatch
):
    """A validation under torchrun is shared among the ranks (each validated the whole split: W times the
    work, ddp32): rank r scores its block of the rows, and ``evaluate`` adds the ranks' sums up in one
    all-reduce (here each rank's own sums, recorded, as a collective would add them). Together they are
    one process's nll, targets and <unk> figures; each rank scores about 1/W of them; every rank reports
    the same progress at the same minibatches (the stop votes ride on them), the tail's uncalled."""
    import drnn_cli.evaluate
    from drnn_cli.runtime import DistContext

    torch.manual_seed(0)
    model = RNNLanguageModel(50, ModelConfig(cell="lstm", hidden_size=16, num_layers=2, embedding_dim=8))
    tokens = torch.randint(1, 50, (183,), generator=torch.Generator().manual_seed(3))
    tokens[::7] = 0  # <unk>s, scored apart as well
    cpu = torch.device("cpu")

    def progress(calls: list[tuple[int, int]]):
        return lambda done, total: calls.append((done, total))

    alone_calls: list[tuple[int, int]] = []
    unseen_ids = torch.zeros(50, dtype=torch.bool)
    unseen_ids[3] = True  # a token the training split would not hold (6 of the targets): summed apart too
    alone = evaluate(
        model, tokens, 4, 9, cpu, "fp32", progress(alone_calls), unknown_id=0, unseen_ids=unseen_ids
    )
    summed: list[list[float]] = []
    monkeypatch.setattr(
        drnn_cli.evaluate, "all_reduce_sum", lambda sums, _dist: summed.append(sums.tolist()) or sums
    )
    shares, calls = [], []
    for rank in range(world_size):
        calls.append([])
        dist = DistContext(rank=rank, world_size=world_size)
        shares.append(
            evaluate(
                model,
                tokens,
                4,
                9,
                cpu,
                "fp32",
                progress(calls[-1]),
                unknown_id=0,
                dist=dist,
                unseen_ids=unseen_ids,
            )
        )
    assert len(summed) == world_size  # one collective a rank
    nll, unknown_nll, unknown, unseen_nll, unseen, targets = (
        sum(column) for column in zip(*summed, strict=True)
    )
    assert (targets, unknown, unseen) == (alone.tokens, alone.unknown, alone.unseen) == (182, 26, 6)
    assert nll == pytest.approx(alone.nll, rel=1e-6) and unknown_nll == pytest.approx(
        alone.unknown_nll, rel=1e-6
    )
    assert unseen_nll == pytest.approx(alone.unseen_nll, rel=1e-6)
    # 4 rows of 45 targets and a tail of 2: the ranks' blocks of rows, the tail with the last
    blocks = [Shard(rank, world_size).rows(4) for rank in range(world_size)]
    assert [share.tokens for share in shares] == [45 * (b.stop - b.start) + 2 * (b.stop == 4) for b in blocks]
    assert all(calls_of_rank == alone_calls[:5] for calls_of_rank in calls)  # the tail's (180, 182) not
    assert alone_calls == [(0, 182), (36, 182), (72, 182), (108, 182), (144, 182), (180, 182)]


def test_eval_of_the_validation_split_matches_the_best_validation_perplexity_of_training(tiny_run: Path):
    loaded = load_model(tiny_run, None, "cpu")
    assert loaded.path.name == "best.safetensors"
    report = evaluate_split(loaded, "val")
    best = loaded.checkpoint.best_val_ppl
    # the same weights, split and batching on the same device: the same number, not one within 1 %
    assert report.result.perplexity == pytest.approx(best, rel=1e-9)
    assert report.result.tokens == 600 - 1  # 20% of 3,000 tokens, every target once


def test_checkpoint_tensors_land_on_the_requested_device(tiny_run: Path):
    """A checkpoint written from CUDA tensors is plain data: it loads wherever it is asked to."""
    checkpoint = load_checkpoint(tiny_run / "best.safetensors", device="meta")
    assert all(t.device.type == "meta" for t in checkpoint.model_state.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_checkpoint_written_from_cuda_decodes_on_cpu(tiny_run: Path, tmp_path: Path):
    from drnn_cli.checkpoint import save_checkpoint

    checkpoint = load_checkpoint(tiny_run / "best.safetensors", device="cuda")
    save_checkpoint(tmp_path / "gpu.safetensors", checkpoint)
    loaded = load_model(None, tmp_path / "gpu.safetensors", "cpu")
    assert next(loaded.model.parameters()).device.type == "cpu"


# ---------------------------------------------------------------------------------------------
# The commands


def test_predict_json_has_prefix_and_text(tiny_run: Path, cli):
    code, out, _ = cli("predict", "time traveller", "--run", str(tiny_run), "-n", "10", "--json")
    assert code == 0
    payload = json.loads(out.strip().splitlines()[-1])
    assert payload["prefix"] == "time traveller"
    assert payload["text"] == decode(tiny_run, "time traveller", num_tokens=10)


def test_predict_several_prefixes(tiny_run: Path, cli):
    code, out, _ = cli("predict", "the", "time", "--run", str(tiny_run), "-n", "3", "--json")
    payload = json.loads(out.strip().splitlines()[-1])
    assert code == 0
    the, time = decode(tiny_run, "the", num_tokens=3), decode(tiny_run, "time", num_tokens=3)
    assert payload["results"] == [
        {"prefix": "the", "text": the, "continuation": the[3:]},
        {"prefix": "time", "text": time, "continuation": time[4:]},
    ]
    assert (payload["prefix"], payload["text"]) == ("the", payload["results"][0]["text"])


def test_several_one_word_prefixes_are_named_with_how_to_quote_them_as_one(tiny_run: Path, cli):
    """`drnn predict time traveller` (the quotes forgotten) continues two prefixes: the note on stderr
    says so, since piped output does not show which continuation is whose."""
    code, out, err = cli("predict", "time", "traveller", "--run", str(tiny_run), "-n", "3")
    time, traveller = decode(tiny_run, "time", num_tokens=3), decode(tiny_run, "traveller", num_tokens=3)
    assert (code, out) == (0, f"{time}\n{traveller}\n")
    note = (
        "2 prefixes, each continued on its own: 'time', 'traveller'; "
        "to continue them as one prefix, quote them as one argument: 'time traveller'"
    )
    assert note in " ".join(err.split())
    code, _, err = cli("predict", "the", "time traveller", "--run", str(tiny_run), "-n", "3")
    assert code == 0 and "prefixes" not in err  # a prefix with a space: several were meant


@pytest.mark.parametrize(
    ("bad", "problem", "status"),
    [("", "prefix is empty", 2), ("1984", "prefix '1984' is empty after data.preprocess=d2l", 1)],
    ids=["empty", "no-letters"],
)
def test_a_bad_prefix_among_several_is_refused_before_any_is_continued(
    tiny_run: Path, cli, bad: str, problem: str, status: int
):
    """An empty prefix is a usage error (exit 2), as any argument that cannot be one; one that the run's
    preprocessing empties is the model's limit (exit 1)."""
    code, out, err = cli("predict", "the", "time", bad, "--run", str(tiny_run), "-n", "3")
    assert (code, out) == (status, "")  # neither "the" nor "time" was continued
    assert_one_line_error(code, err, problem)


def test_predict_report_lists_results_only_for_several_prefixes():
    """``continuation`` is what the model wrote: ``text`` after the prefix as the model read it (a
    script cutting ``text`` at ``len(prefix)`` cut "Time!" in the wrong place)."""
    one = PredictReport((Continuation("Time!", "time", "time machine"),), "runs/a/best.safetensors")
    assert one.summary() == {
        "prefix": "Time!",
        "text": "time machine",
        "continuation": " machine",
        "checkpoint": "runs/a/best.safetensors",
    }
    two = PredictReport((Continuation("a", "a", "ab"), Continuation("b", "b", "bc")), "c.safetensors")
    assert two.summary() == {
        "prefix": "a",
        "text": "ab",
        "continuation": "b",
        "checkpoint": "c.safetensors",
        "results": [
            {"prefix": "a", "text": "ab", "continuation": "b"},
            {"prefix": "b", "text": "bc", "continuation": "c"},
        ],
    }


def test_a_continuation_of_spaces_alone_is_said_to_be_one(tiny_run: Path, cli, monkeypatch):
    """A first run of 20 epochs continued "time traveller" with 50 spaces: the line read as if predict
    had written nothing. Said on stderr, with what it means; text with a word in it gets no note."""
    blank = PredictReport(
        (Continuation("time", "time", "time" + " " * 50), Continuation("a", "a", "a\t\n")), "x"
    )
    assert blank.blank_notes == (
        "the continuation of 'time' is 50 spaces and nothing else: greedy decoding took it for the likeliest "
        "next token every time, as an undertrained model does (train it longer, or --sample)",
        "the continuation of 'a' is 2 whitespace characters and nothing else: greedy decoding took it for the "
        "likeliest next token every time, as an undertrained model does (train it longer, or --sample)",
    )
    sampled = PredictReport((Continuation("time", "time", "time   "),), "x", seed=3)
    assert sampled.blank_notes == (  # drawn, not the likeliest: never "greedy", nor "--sample" again
        "the continuation of 'time' is 3 spaces and nothing else: the model puts nearly all its probability "
        "there, as an undertrained model does (train it longer)",
    )
    long_prefix = "ab" * 50_000  # a 100 KB prefix (a trial's) is named by its first 80 characters
    (note,) = PredictReport((Continuation(long_prefix, long_prefix, long_prefix + "  "),), "x").blank_notes
    shown = "'" + "ab" * 18 + "a" + "..." + "ab" * 19 + "'"  # reprlib's: its start and end, 80 characters
    assert note.startswith(f"the continuation of {shown} is 2 spaces and nothing else")
    assert PredictReport((Continuation("a", "a", "a  b "),), "x").blank_notes == ()
    assert PredictReport((Continuation("a", "a", "a"),), "x").blank_notes == ()  # -n 0 wrote nothing
    from drnn_cli import commands

    monkeypatch.setattr(commands, "continue_prefix", lambda model, vocab, prefix, *rest, **kw: prefix + "   ")
    code, out, err = cli("predict", "time", "--run", str(tiny_run), "-n", "3")
    assert (code, out) == (0, "time   \n")
    assert "note: the continuation of 'time' is 3 spaces and nothing else" in err


def test_a_prefix_counts_as_changed_only_where_characters_went_or_were_replaced():
    from drnn_cli.corpus import preprocessing_changed

    assert not preprocessing_changed(
        "The Time", "The Time"
    )  # data.preprocess none keeps case: nothing to say
    assert not preprocessing_changed("Time  Traveller", "time traveller")  # lower-cased, spaces evened out
    assert preprocessing_changed("café 1895", "caf") and preprocessing_changed("time!", "time")


def test_predict_notes_a_prefix_that_preprocessing_changed_beyond_case(tiny_run: Path, cli):
    """Under d2l's preprocessing (letters a-z) "café" was continued from "caf" without a word."""
    code, out, err = cli(
        "predict", "Time  Traveller", "café 1895", "--run", str(tiny_run), "-n", "4", "--json"
    )
    assert code == 0
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    # none for "Time  Traveller": lower-casing and evening out spaces change nothing a reader would miss
    assert notes == ["note: data.preprocess d2l reads the prefix 'café 1895' as 'caf'"]
    results = json.loads(out.splitlines()[-1])["results"]
    assert [r["text"][: -len(r["continuation"])] for r in results] == ["time traveller", "caf"]
    assert [len(r["continuation"]) for r in results] == [4, 4]


def test_predict_as_a_library_call_reports_its_notes_and_the_seed_it_drew(tiny_run: Path):
    """commands.predict_all is drnn predict without the console: the notes the CLI prints before the
    continuations ride on the report, and a seed drawn for sampling is named there."""
    from drnn_cli.commands import decode_options, plan_predict, predict_all

    options, drawn = decode_options(4, sample=True)
    assert drawn and options.seed is not None
    report = predict_all(
        plan_predict(load_model(tiny_run, None, "cpu"), ["café", "the time"], options, drawn)
    )
    assert report.notes == (
        "data.preprocess d2l reads the prefix 'café' as 'caf'",
        f"--sample drew --seed {options.seed}: give it to draw the same sample again",
    )
    assert [c.read for c in report.continuations] == ["caf", "the time"]
    assert Path(report.checkpoint).is_absolute() and report.seed == options.seed
    assert decode_options(4, sample=True, seed=3) == (DecodeOptions(4, True, seed=3), False)


def test_eval_as_a_library_call_refuses_data_with_split_or_corpus(tiny_run: Path):
    loaded = load_model(tiny_run, None, "cpu")
    for split, corpus in (("val", None), (None, Path("elsewhere.txt"))):
        with pytest.raises(UsageError, match="^--data evaluates all of another text") as refused:
            evaluate_split(loaded, split, data_file=Path("some.txt"), corpus_file=corpus)
        assert refused.value.exit_code == 2


def test_each_prefix_of_a_seeded_call_samples_its_own_stream(tiny_run: Path, cli):
    """One --seed for several prefixes: the first keeps the seed (a one-prefix call samples as before),
    the i-th samples with seed + i — so a prefix given twice draws two samples, reproducibly; with one
    stream for all, the copies were identical. The checkpoint that answered is named on stderr and in
    the JSON line."""
    options = DecodeOptions(num_tokens=60, sample=True, temperature=1.5, seed=7)
    assert [options.for_prefix(i).seed for i in range(3)] == [7, 8, 9]
    assert DecodeOptions(sample=True, seed=2**63 - 1).for_prefix(2).seed == 1  # wraps within the range
    assert DecodeOptions().for_prefix(5).seed is None  # unseeded: fresh randomness anyway
    command = (
        "predict",
        "the",
        "the",
        "--run",
        str(tiny_run),
        "-n",
        "60",
        "--sample",
        "--temperature",
        "1.5",
    )
    code, out, err = cli(*command, "--seed", "7", "--json")
    assert code == 0, err
    first, second = (result["text"] for result in json.loads(out)["results"])
    assert first != second
    assert first == decode(tiny_run, "the", num_tokens=60, sample=True, temperature=1.5, seed=7)
    assert second == decode(tiny_run, "the", num_tokens=60, sample=True, temperature=1.5, seed=8)
    assert json.loads(out)["checkpoint"] == str(tiny_run / "best.safetensors")
    assert f"checkpoint {tiny_run / 'best.safetensors'}" in err
    assert cli(*command, "--seed", "7", "--json")[1] == out  # reproducible


def test_eval_reads_the_validation_split_unless_the_run_has_none(tiny_run: Path):
    loaded = load_model(tiny_run, None, "cpu")
    report = evaluate_split(loaded)
    assert (report.split, report.result.tokens) == ("val", 600 - 1)
    tokens = torch.arange(100)
    assert default_split(split_tokens(tokens, val_fraction=0.0, test_fraction=0.0)) == "train"
    assert default_split(split_tokens(tokens, val_fraction=0.02, test_fraction=0.0)) == "val"  # 2 tokens
    assert (
        default_split(split_tokens(tokens, val_fraction=0.015, test_fraction=0.0)) == "train"
    )  # 1 token: none


def test_eval_json_fields(tiny_run: Path, cli):
    # on the CPU the run trained on: on a GPU, cuDNN sums in another order (1.8e-6 apart on an H200)
    code, out, _ = cli("eval", "--run", str(tiny_run), "--split", "val", "--json", "--device", "cpu")
    payload = json.loads(out.strip().splitlines()[-1])
    assert code == 0
    assert {"split", "epoch", "perplexity", "bits_per_token", "tokens"} <= set(payload)
    best = load_checkpoint(tiny_run / "best.safetensors")  # what drnn eval --run reads
    assert (payload["split"], payload["epoch"], payload["tokens"]) == ("val", best.epoch, 600 - 1)
    assert payload["checkpoint"] == str(tiny_run / "best.safetensors")  # which of the run's two answered
    assert payload["perplexity"] == pytest.approx(best.best_val_ppl, rel=1e-9)
    assert payload["bits_per_token"] == pytest.approx(math.log2(payload["perplexity"]))
    assert payload["unseen_in_training"] == 0  # d2l's letters: the training split holds every one


def _train_tail_run(workdir: Path, cli) -> str:
    """runs/tail: 320 training characters of a and b; its held-out tail (40 + 40) holds 'é' 5 times and
    '😀' twice, the test split's 39 predictions 'é' 5 times and '😀' once. Returns its config's path."""
    text = workdir / "tail.txt"
    text.write_text("ab" * 160 + "ab" * 20 + "😀" + "éa" * 5 + "ab" * 14 + "😀", encoding="utf-8")
    tree = {
        "data": {"path": str(text), "preprocess": "none", "batch_size": 4, "num_steps": 8,
                 "val_fraction": 0.1, "test_fraction": 0.1},
        "model": {"cell": "gru", "hidden_size": 8, "num_layers": 1},
        "train": {"epochs": 1, "sample_every": 0, "device": "cpu", "seed": 3},
    }  # fmt: skip
    config = str(config_file(workdir, tree))
    assert cli("train", "--config", config, "--run", "runs/tail")[0] == 0
    return config


def test_eval_of_a_held_out_split_says_which_predictions_training_never_saw(workdir: Path, cli):
    """The vocabulary is the whole text's, so characters only a test tail holds are scored as known, with
    "unknown": 0, though never trained on: a trial's emoji, 6.24% of its test predictions, read 26.49
    against 14.89 over the rest. Here 320 training characters of a and b; the test split's 39 predictions
    (its first token is read, not predicted) hold 'é' 5 times and '😀' once."""
    _train_tail_run(workdir, cli)
    # the perplexity over the other 33, summed apart in the same pass: checked against the <unk> path's
    # sums of each unseen character's losses, read one character at a time
    loaded = load_model(Path("runs/tail"), None, "cpu")
    vocab, test = loaded.checkpoint.vocab, evaluate_split(loaded, "test")
    split = load_dataset(loaded.checkpoint.config.data, vocab=vocab).splits.test
    apart = [evaluate(loaded.model, split, 4, 8, torch.device("cpu"), unknown_id=vocab[c]) for c in "é😀"]
    assert [part.unknown for part in apart] == [5, 1] and test.result.unseen == 6
    rest = (test.result.nll - sum(part.unknown_nll for part in apart)) / 33
    assert test.result.seen_perplexity == pytest.approx(math.exp(rest), rel=1e-12)
    said = (
        "note: 6 of the 39 test predictions (15.38%) are tokens this run's training split never holds ('é', '😀'): "
        "the vocabulary holds such tokens, so they are scored as known, yet training never shows them to the model, and "
        f"the split's perplexity counts them ({test.result.seen_perplexity:.4f} over the other predictions) "
        '(README "Your own text, and held-out numbers that mean something")'
    )
    code, out, err = cli("eval", "--run", "runs/tail", "--split", "test", "--json")
    payload = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and (payload["unseen_in_training"], payload["unknown"], payload["tokens"]) == (
        6,
        0,
        39,
    ), err
    assert payload["seen_perplexity"] == test.result.seen_perplexity < payload["perplexity"]
    assert said in err.splitlines()
    code, out, err = cli("eval", "--run", "runs/tail", "--split", "val", "--json")
    val = json.loads(out.strip().splitlines()[-1])
    assert val["unseen_in_training"] == 0 and val["seen_perplexity"] == val["perplexity"]
    assert "training split never holds" not in err
    other = workdir / "other.txt"
    other.write_text("😀ab" * 20, encoding="utf-8")
    # another text: counted from the checkpoint's record of what no training split of it held, '😀' at
    # 19 of the 59 predictions (the file's first token is read, not predicted)
    code, out, err = cli("eval", "--run", "runs/tail", "--data", str(other), "--json")
    assert json.loads(out.strip().splitlines()[-1])["unseen_in_training"] == 19
    assert (
        "19 of the 59 predictions (32.20%) are tokens no training split of this model held ('😀'): the "
        "vocabulary holds such tokens, so they are scored as known, yet training never shows them to the "
        "model, and the file's perplexity counts them"
    ) in " ".join(err.split()), err
    # a checkpoint that records nothing (written before drnn did): the file is not counted
    unrecorded = replace(loaded, checkpoint=replace(loaded.checkpoint, untrained_ids=None))
    assert evaluate_split(unrecorded, data_file=other).result.unseen == 0
    assert not [note for note in evaluate_split(unrecorded, data_file=other).notes if "never" in note]
    # a fine-tuned model's record sees its bases' training too, so its note says what it never trained on;
    # without a record, only that this run's split lacks them, which its base run's text may have held
    tuned = replace(loaded, checkpoint=replace(loaded.checkpoint, init_from="runs/base/last.safetensors"))
    exact = said.removeprefix("note: ").replace(
        "this run's training split never holds", "no training split of this model held"
    )
    assert exact in evaluate_split(tuned, "test").notes
    blind = replace(tuned, checkpoint=replace(tuned.checkpoint, untrained_ids=None))
    learned = "the model knows them only if its base run's text held them"
    tuned_said = said.removeprefix("note: ").replace("training never shows them to the model", learned)
    assert learned in tuned_said and tuned_said in evaluate_split(blind, "test").notes


def test_predict_says_which_prefix_characters_no_training_split_held(
    workdir: Path, cli, monkeypatch: pytest.MonkeyPatch
):
    """A checkpoint records the ids its training never held (the vocabulary is the whole text's): here the
    320 training characters are a and b, and 'é' and '😀' only the held-out tail's. A prefix holding
    them is continued from input weights as initialised, which predict says; a fine-tuned model's
    record keeps only what neither its base's training nor its own held."""
    config = _train_tail_run(workdir, cli)
    last = workdir / "runs" / "tail" / "last.safetensors"
    vocab = load_checkpoint(last).vocab
    assert load_checkpoint(last).untrained_ids == tuple(sorted((vocab["é"], vocab["😀"])))
    code, _, err = cli("predict", "abé😀é", "ba", "--run", "runs/tail", "-n", "3")
    assert code == 0, err
    notes = [line for line in err.splitlines() if "never trained" in line]
    assert notes == [
        "note: the prefix 'abé😀é' holds characters the model's training split never held ('é', '😀'): the "
        "vocabulary, read from the whole text with its held-out splits, has them, yet the model never trained "
        "on them, so what follows them rests on untrained weights "
        '(README "Your own text, and held-out numbers that mean something")'
    ]
    code, _, err = cli("inspect", "abé abab abab", "--run", "runs/tail")  # inspect reads a text alike
    assert (
        code == 0
        and (
            "note: the text holds a character the model's training split never held ('é'): the vocabulary, read "
            "from the whole text with its held-out splits, has it, yet the model never trained on it"
        )
        in err
    ), err
    # resumed, the run keeps its record
    assert (
        cli("train", "--config", config, "--run", "runs/tail", "--resume", "--set", "train.epochs=2")[0] == 0
    )
    assert load_checkpoint(last).untrained_ids == tuple(sorted((vocab["é"], vocab["😀"])))

    # fine-tuned on a text whose training split holds 'é': only '😀' is left untrained
    tuned_text = workdir / "tuned.txt"
    tuned_text.write_text("abé" * 100 + "😀", encoding="utf-8")
    tuning = ("--set", f"data.path={tuned_text}", "--set", "data.test_fraction=0")
    assert (
        cli("train", "--config", config, "--init-from", "runs/tail", "--run", "runs/tuned", *tuning)[0] == 0
    )
    tuned = workdir / "runs" / "tuned" / "last.safetensors"
    assert load_checkpoint(tuned).untrained_ids == (vocab["😀"],)
    code, _, err = cli("predict", "é😀", "--run", "runs/tuned", "-n", "3")
    assert (
        code == 0
        and (
            "note: the prefix 'é😀' holds a character neither the model's training split nor its base runs' ever "
            "held ('😀'): the vocabulary, read from the whole text with its held-out splits, has it, yet the model "
            "never trained on it, so what follows it rests on untrained weights"
        )
        in err
    ), err

    # and drnn eval counts, in its validation split, the '😀' none of its training splits held
    code, out, err = cli("eval", "--run", "runs/tuned", "--split", "val", "--json")
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["unseen_in_training"] == 1, err
    assert (
        "1 of the 29 validation predictions (3.45%) is a token no training split of this model held ('😀')"
        in (" ".join(err.split()))
    ), err
    # a base that recorded nothing (written before drnn did) leaves its fine-tuned model's unknown: no note
    for kept in (last, last.with_name("best.safetensors")):  # --init-from RUN reads its best
        save_checkpoint(kept, replace(load_checkpoint(kept), untrained_ids=None))
    assert (
        cli("train", "--config", config, "--init-from", "runs/tail", "--run", "runs/blind", *tuning)[0] == 0
    )
    assert load_checkpoint(workdir / "runs" / "blind" / "last.safetensors").untrained_ids is None
    code, _, err = cli("predict", "é😀", "--run", "runs/blind", "-n", "3")
    assert code == 0 and "never trained" not in err, err

    # a record that is not increasing ids of the vocabulary (<unk> aside) is a corrupt header
    # more ids than a header makes room for are recorded as not known (MAX_UNTRAINED_IDS: 200,000)
    monkeypatch.setattr("drnn_cli.trainer_checkpoint.MAX_UNTRAINED_IDS", 1)
    assert cli("train", "--config", config, "--run", "runs/crowded")[0] == 0
    assert load_checkpoint(workdir / "runs" / "crowded" / "last.safetensors").untrained_ids is None
    whole = load_checkpoint(last)
    for bad in ((vocab["😀"], vocab["é"]), (0,), (len(vocab),)):
        save_checkpoint(last, replace(whole, untrained_ids=bad))
        code, _, err = cli("predict", "ab", "--checkpoint", str(last))
        assert_one_line_error(
            code, err, f"checkpoint {last} is corrupt (a header field missing or of the wrong type)"
        )


def test_eval_says_where_its_checkpoint_stood_in_the_words_training_stopped_with(workdir: Path, cli):
    """A checkpoint written inside an epoch (a step budget) is "after step 4 of epoch 2", as the stop
    message of a run stopped there says; the optimizer step counts across epochs, as in --json."""
    config = config_file(workdir, {**TINY_TREE, "train": {**TINY_TREE["train"], "max_steps": 33}})
    assert cli("train", "--config", str(config))[0] == 0
    last = load_checkpoint(workdir / "runs/tiny/last.safetensors")
    assert (last.epoch, last.step_in_epoch) == (1, 4)  # 29 minibatches an epoch: 33 = 29 + 4
    code, out, _err = cli("eval", "--checkpoint", "runs/tiny/last.safetensors", "--split", "train")
    assert code == 0, _err
    assert out.rstrip().endswith(
        "(checkpoint runs/tiny/last.safetensors, after step 4 of epoch 2, optimizer step 33)"
    )
    code, out, _err = cli("eval", "--checkpoint", "runs/tiny/last.safetensors", "--split", "train", "--json")
    evaluated = json.loads(out.strip().splitlines()[-1])
    assert (evaluated["epoch"], evaluated["step_in_epoch"], evaluated["step"]) == (1, 4, 33)  # the same place


def test_eval_on_a_file(tiny_run: Path, tmp_path: Path, cli):
    text = tmp_path / "other.txt"
    text.write_text("The Time Traveller smiled.\nAre you sure we can move freely in Space?\n")
    code, out, _ = cli("eval", "--run", str(tiny_run), "--data", str(text), "--json")
    payload = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and payload["split"] == "file"
    assert payload["tokens"] == len("the time traveller smiledare you sure we can move freely in space") - 1


def test_eval_of_the_text_the_run_trained_on_says_its_figure_is_partly_a_training_one(
    tiny_run: Path, corpus_path: Path, tmp_path: Path, cli
):
    """``drnn eval --data`` on the run's own text scored its training split as if it were held out, and said
    nothing: the run's first 3,000 tokens (data.max_tokens) less its 20% validation split are 2,400 that it
    trained on, the first of the file's. The same text with other line breaks is the same text."""
    code, out, err = cli("eval", "--run", str(tiny_run), "--data", str(corpus_path), "--json")
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["tokens"] == 170_579  # d2l's 170,580 characters
    expected = (
        f"note: {corpus_path} is the text this model was trained on: the first 2,400 of its 170,580 tokens "
        "(1.41%) are the run's training split, so this perplexity is partly a training "
        "figure, not a held-out one; drnn eval --split val reads held-out tokens alone"
    )
    assert expected in err, err
    windows = tmp_path / "timemachine-crlf.txt"
    windows.write_bytes(corpus_path.read_bytes().replace(b"\n", b"\r\n"))
    code, _, err = cli("eval", "--run", str(tiny_run), "--data", str(windows))
    assert code == 0 and f"{windows} is the text this model was trained on: the first 2,400" in err, err
    from drnn_cli.config import DataConfig
    from drnn_cli.run_notes import trained_text_note

    # a run that held nothing out and trained on the whole text, and one that kept the first 1,000
    whole = trained_text_note("t.txt", 5_000, DataConfig(max_tokens=-1, val_fraction=0.0), fine_tuned=True)
    assert whole.startswith(
        "t.txt is the text this model was trained on: all of its 5,000 tokens (100%) are the run's training "
        "split, so this perplexity is a training figure, not a held-out one; the run holds nothing out: train "
        "with data.val_fraction (or data.test_fraction) for a figure on text the model never trained on, or "
        "evaluate another text; its base run's text is not compared"
    )
    cut = trained_text_note("t.txt", 5_000, DataConfig(max_tokens=1_000, val_fraction=0.0), fine_tuned=False)
    assert (
        "the first 1,000 of its 5,000 tokens (20%)" in cut and "past the run's data.max_tokens (1,000)" in cut
    )


def test_eval_of_a_short_text_in_short_rows_says_so(tiny_run: Path, tmp_path: Path, cli):
    """64 predicted characters in the run's 8 rows are 8 each, each from a zero state, where the model
    trained on windows of 10: a learner compared 6.9 with inspect's 1.08 on the same excerpt."""
    text = tmp_path / "other.txt"
    text.write_text("The Time Traveller smiled.\nAre you sure we can move freely in Space?\n")
    code, out, err = cli("eval", "--run", str(tiny_run), "--data", str(text))
    assert code == 0
    assert "note: the text is read as 8 rows of about 8 tokens, each from a zero state (the training windows " \
        "are 10 tokens): short rows change the perplexity, usually for the worse; --rows 1 reads it as one stream" in err  # fmt: skip
    assert len(out.splitlines()) == 1 and "note" not in out  # stdout keeps the result alone, as predict's
    noise = "note: a perplexity over 64 predictions is noise (evaluate a longer text with --data)"
    code, out, err = cli("eval", "--run", str(tiny_run), "--data", str(text), "--rows", "1")
    assert code == 0 and [line for line in err.splitlines() if line.startswith("note:")] == [noise]
    # rows asked for are said too when short: --rows 100000 read 9,999 rows of one token, a perplexity of
    # 17.4 against 1.16, without a word (learner32)
    code, out, err = cli("eval", "--run", str(tiny_run), "--data", str(text), "--rows", "100000")
    assert code == 0 and [line for line in err.splitlines() if line.startswith("note:")] == [
        "note: the text is read as 64 rows of about 1 token, each from a zero state (the training windows are "
        "10 tokens): short rows change the perplexity, usually for the worse; --rows 1 reads it as one stream",
        noise,
    ]
    code, out, _ = cli("eval", "--run", str(tiny_run), "--split", "val")  # 599 tokens: rows of 74
    assert code == 0 and "note:" not in out


def test_eval_of_the_split_a_run_trained_on_says_why_it_differs_from_training(tiny_run: Path):
    """d2l's §8.6 RNN trained to 1.308 and evaluated to 1.639, §8.5 with its state reset each minibatch
    1.400 and 1.225: a learner took the first for a failed reproduction (learner32). 2,399 predicted
    training tokens in 8 rows: 2,399 // (8 × 10) = 29 minibatches an epoch, so a row's state in training
    is at most 290 tokens old, and eval reads rows of 2,399 // 8 = 299."""
    loaded = load_model(tiny_run, None, "cpu")
    report = evaluate_split(loaded, "train")
    assert report.result.tokens == 2_399
    assert report.notes == (
        "this is the split the run trained on: training's perplexity was its minibatches' while the weights "
        "changed (each row's state at most 290 tokens old); eval reads it with the final weights as 8 rows of "
        'about 299 tokens, each once through: the two differ, either way (README "Reproducing d2l")',
    )
    random = replace(loaded, checkpoint=replace(loaded.checkpoint, config=loaded.checkpoint.config.model_copy(
        update={"data": loaded.checkpoint.config.data.model_copy(update={"sampling": "random"})}
    )))  # fmt: skip
    assert "(each minibatch from a zero state, 10 tokens)" in evaluate_split(random, "train").notes[0]
    assert evaluate_split(loaded, "val").notes == ()
    # a run that train.max_steps stopped after 12 steps, inside its first epoch: its rows' states are at
    # most 12 minibatches of 10 tokens old, not an epoch's 290 (learner34 read 9,536 after 30 steps)
    from drnn_cli.commands import _training_split_note

    stopped = _training_split_note(loaded.checkpoint.config, 2_399, 8, trained_steps=12)
    assert "(each row's state at most 120 tokens old)" in stopped[0]


def test_eval_of_a_text_it_predicts_worse_than_a_uniform_guess_says_so(tiny_run: Path, tmp_path: Path):
    """lstm2 (perplexity 1.02 on its 10,000 characters) scores 101 on a later passage of the same book,
    worse than a uniform guess over its 28 characters: what a learner should see (learner32)."""
    unlike = tmp_path / "unlike.txt"
    unlike.write_text("zq xj " * 40 + "\n")
    loaded = load_model(tiny_run, None, "cpu")
    report = evaluate_split(loaded, data_file=unlike)
    assert report.result.perplexity > 28 == len(loaded.checkpoint.vocab)
    unseen, uniform = report.notes  # 'q' is no character of the tiny run's training text: counted
    assert unseen.startswith(
        "40 of the 238 predictions (16.81%) are tokens no training split of this model held ('q'): "
    )
    assert uniform == (
        f"perplexity {report.result.perplexity:,.4g} is above 28, a uniform guess over the vocabulary: the "
        "model predicts this text worse than knowing nothing of it; it memorised the text it trained on, or "
        "this text is unlike that one"
    )


def test_eval_reports_its_progress_before_each_minibatch(tiny_run: Path):
    """A 3-million-token split read for 131 s without a sign (practitioner trial): the hook drives a bar."""
    loaded = load_model(tiny_run, None, "cpu")
    seen: list[tuple[int, int]] = []
    report = evaluate_split(loaded, "val", progress=lambda done, total: seen.append((done, total)))
    total = report.result.tokens
    rows, row_len = 8, total // 8  # TINY_TREE's batch of 8, windows of 10
    assert seen[0] == (0, total) and all(t == total for _, t in seen)
    assert [done for done, _ in seen][:3] == [0, rows * 10, rows * 20]
    assert len(seen) == -(-row_len // 10) + -(-(total - rows * row_len) // 10)  # the tail: a batch of one


def test_the_eval_bar_shows_on_a_terminal_only_once_an_evaluation_lasts():
    import io

    from rich.console import Console

    from drnn_cli.render import evaluation_progress

    screen = io.StringIO()
    terminal = Console(file=screen, force_terminal=True, width=100)
    with evaluation_progress(terminal, after=0.0) as hook:
        hook(0, 3_000_000)
        hook(1_000_000, 3_000_000)
        hook(2_000_000, 3_000_000)
    assert "evaluating" in screen.getvalue() and "2,000,000/3,000,000 tokens" in screen.getvalue()
    # Its time left reads as the training bar's does, "m:ss left", not rich's "0:00:01" (prac34): the
    # last third at the second's pace, which took well under a second, rich rounds up to one.
    assert "0:01 left" in screen.getvalue() and "0:00:01" not in screen.getvalue()
    for console, after in ((terminal, 60.0), (Console(file=io.StringIO(), force_terminal=False), 0.0)):
        screen.truncate(0)
        with evaluation_progress(console, after=after) as hook:
            hook(0, 3_000_000)
        assert "evaluating" not in screen.getvalue()


def test_eval_of_a_missing_split_says_which_key_made_it(tiny_run: Path, cli):
    code, _, err = cli("eval", "--run", str(tiny_run), "--split", "test")
    assert code == 1 and "no test split" in err and "data.test_fraction" in err


def test_eval_of_a_split_of_one_token_says_it_is_too_few_rather_than_none():
    """data.test_fraction 0.0004 of 3,000 tokens keeps one: the line said 'no test split (1 tokens)'."""
    from drnn_cli.commands import _split_or_error

    config = Config.model_validate({"data": {"val_fraction": 0.0, "test_fraction": 0.0004}})
    splits = split_tokens(torch.arange(3000), 0.0, 0.0004)
    with pytest.raises(DrnnError) as error:
        _split_or_error(splits, "test", config)
    assert str(error.value) == (
        "the run's test split is 1 token, too few to evaluate (one is read, the next predicted: 2 at least); "
        "it was trained with data.test_fraction = 0.0004; evaluate another split or pass --data FILE"
    )
    with pytest.raises(DrnnError) as error:
        _split_or_error(splits, "val", config)
    assert str(error.value) == (
        "the run has no val split; it was trained with data.val_fraction = 0.0; evaluate another split or "
        "pass --data FILE"
    )


def test_eval_finds_the_runs_corpus_at_another_path(
    tiny_run: Path, tmp_path: Path, corpus_path: Path, cli, monkeypatch: pytest.MonkeyPatch
):
    """A run copied to another machine (its data.path gone): --corpus FILE reads the splits from FILE
    when its SHA-1 shows it is the run's text; without it, the error says so. Another text is refused
    before it is encoded (a big file would take minutes, and fill the token cache)."""
    import shutil

    import yaml

    copied = tmp_path / "run"
    shutil.copytree(tiny_run, copied)
    checkpoint = load_checkpoint(copied / "best.safetensors")
    checkpoint.config.data.path = str(tmp_path / "gone" / "timemachine.txt")  # as on the machine it came from
    save_checkpoint(copied / "best.safetensors", checkpoint)
    tree = yaml.safe_load((copied / "config.yaml").read_text())
    tree["data"]["path"] = checkpoint.config.data.path
    (copied / "config.yaml").write_text(yaml.safe_dump(tree))
    code, _, err = cli("eval", "--run", str(copied), "--split", "val")
    assert code == 1 and err.strip().splitlines() == [
        f"drnn: error: cannot evaluate the val split: the run's corpus {tmp_path / 'gone' / 'timemachine.txt'} "
        "is not there (moved, or on another machine); say where it is with --corpus FILE, or score any text "
        "with --data FILE"
    ]
    here = tmp_path / "here.txt"
    shutil.copyfile(corpus_path, here)
    code, out, _ = cli("eval", "--run", str(copied), "--corpus", str(here), "--split", "val", "--json")
    moved = json.loads(out.strip().splitlines()[-1])
    code_original, out_original, _ = cli("eval", "--run", str(tiny_run), "--split", "val", "--json")
    original = json.loads(out_original.strip().splitlines()[-1])
    assert code == code_original == 0
    assert (moved["split"], moved["tokens"], moved["perplexity"]) == (
        "val",
        original["tokens"],
        original["perplexity"],
    )
    crlf = tmp_path / "crlf.txt"  # the text through Windows or git's autocrlf: other bytes, the same text
    crlf.write_bytes(b"\xef\xbb\xbf" + corpus_path.read_bytes().replace(b"\n", b"\r\n"))
    code, out, err = cli("eval", "--run", str(copied), "--corpus", str(crlf), "--split", "val", "--json")
    assert (code, json.loads(out.strip().splitlines()[-1])["perplexity"]) == (0, original["perplexity"])
    assert (
        f"{crlf} differs from the text the checkpoint was trained on only in how its line breaks are written "
        "or in a byte order mark, which drnn reads alike"
    ) in " ".join(err.split())
    other = tmp_path / "other.txt"
    other.write_text("not the time machine at all, not even close\n" * 50)

    def encoded(*args: object) -> None:
        raise AssertionError("the other text was encoded")

    monkeypatch.setattr("drnn_cli.data._encode", encoded)
    code, _, err = cli("eval", "--run", str(copied), "--corpus", str(other), "--split", "val")
    assert code == 1 and "is not the text the checkpoint was trained on" in err
    assert "give --corpus the run's own text, or score this file whole with --data FILE" in err


def test_eval_reads_a_runs_text_from_a_file_whose_line_breaks_differ_mixed_included(
    tiny_run: Path, tmp_path: Path, corpus_path: Path, cli
):
    """A checkpoint records the SHA-1 of its text as read: --corpus takes a file of that text whatever
    line breaks either side writes, mixed CR LF and LF included, with a note; the split it reads is the
    same. A checkpoint without it (an earlier drnn's) takes the four forms of the given file's text as
    before: a run trained on mixed line breaks refuses the text's LF form, with today's message."""
    import hashlib
    import shutil

    lf_text = corpus_path.read_bytes()
    mixed = tmp_path / "mixed.txt"  # an editor wrote CR LF into the first 100 line breaks of an LF file
    mixed.write_bytes(lf_text.replace(b"\n", b"\r\n", 100))
    lf = tmp_path / "lf.txt"
    shutil.copyfile(corpus_path, lf)

    def evaluated(run: Path, corpus: Path) -> tuple[int, float | None, str]:
        code, out, err = cli("eval", "--run", str(run), "--corpus", str(corpus), "--split", "val", "--json")
        return (
            code,
            json.loads(out.splitlines()[-1])["perplexity"] if code == 0 else None,
            " ".join(err.split()),
        )

    def noted(corpus: Path) -> str:
        return (
            f"{corpus} differs from the text the checkpoint was trained on only in how its line breaks are "
            "written or in a byte order mark, which drnn reads alike"
        )

    original = json.loads(cli("eval", "--run", str(tiny_run), "--split", "val", "--json")[1].splitlines()[-1])
    code, perplexity, err = evaluated(tiny_run, mixed)  # trained on the LF form
    assert (code, perplexity) == (0, original["perplexity"]) and noted(mixed) in err
    run = tmp_path / "run"  # as if trained on the mixed file: its file's SHA-1, the same text's
    shutil.copytree(tiny_run, run)
    checkpoint = load_checkpoint(run / "best.safetensors")
    assert checkpoint.text_sha1 == hashlib.sha1(lf_text).hexdigest()
    checkpoint.corpus_sha1 = hashlib.sha1(mixed.read_bytes()).hexdigest()
    save_checkpoint(run / "best.safetensors", checkpoint)
    code, perplexity, err = evaluated(run, lf)
    assert (code, perplexity) == (0, original["perplexity"]) and noted(lf) in err
    code, perplexity, err = evaluated(run, mixed)
    assert (code, perplexity) == (0, original["perplexity"]) and "line breaks" not in err
    checkpoint.text_sha1 = None
    save_checkpoint(run / "best.safetensors", checkpoint)
    code, _, err = evaluated(run, lf)
    assert code == 1 and err == (
        f"drnn: error: cannot evaluate the val split: {lf} is not the text the checkpoint was trained on "
        f"(SHA-1 {checkpoint.corpus_sha1}, this file {hashlib.sha1(lf_text).hexdigest()}); give --corpus the "
        "run's own text, or score this file whole with --data FILE"
    )


def test_a_relative_data_path_is_kept_absolute_so_eval_works_from_anywhere(
    workdir: Path, corpus_path: Path, cli, monkeypatch: pytest.MonkeyPatch
):
    import shutil

    import yaml

    shutil.copyfile(corpus_path, workdir / "my_text.txt")
    config = workdir / "tiny.yaml"
    config.write_text(yaml.safe_dump({"data": {"max_tokens": 2000, "batch_size": 4, "num_steps": 8}}))
    code, _, err = cli(
        "train", "--config", str(config), "--set", "data.path=my_text.txt", "--set", "train.epochs=1",
        "--set", "model.hidden_size=8", "--device", "cpu",
    )  # fmt: skip
    assert code == 0, err
    run = workdir / "runs" / "tiny"
    assert load_checkpoint(run / "last.safetensors").config.data.path == str(workdir / "my_text.txt")
    elsewhere = workdir / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, out, err = cli("eval", "--run", str(run), "--split", "train", "--json")
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["split"] == "train"


def test_a_config_naming_the_text_beside_it_says_where_relative_names_are_read_from(
    workdir: Path, corpus_path: Path, cli, monkeypatch: pytest.MonkeyPatch
):
    """A config file's relative data.path is read from the current directory: run from another one,
    "does not exist" named a path in it alone (own40); the refusal names the file beside the config and
    both fixes. From the config's folder through "..", the run records the path without them."""
    import shutil

    import yaml

    folder = workdir / "cfg"
    folder.mkdir()
    shutil.copyfile(corpus_path, folder / "my_text.txt")
    tree = {"data": {"path": "my_text.txt", "max_tokens": 2000, "batch_size": 4, "num_steps": 8}}
    (folder / "my.yaml").write_text(
        yaml.safe_dump({**tree, "model": {"hidden_size": 8}, "train": {"epochs": 1}})
    )
    for command in ("train", "data"):
        code, _, err = cli(command, "--config", "cfg/my.yaml")
        assert_one_line_error(
            code,
            err,
            "data.path my_text.txt is not in the current directory, where relative names are read from, but "
            "cfg/my_text.txt is beside the config file cfg/my.yaml: run drnn from cfg, or give data.path as "
            f"{folder / 'my_text.txt'}",
        )
    # a data.path given on the command line is the command line's, read where it runs: no word of the config
    code, _, err = cli("data", "--config", "cfg/my.yaml", "--set", "data.path=my_text.txt")
    assert code == 1 and "does not exist in" in err and "beside the config" not in err, err
    other = workdir / "other"
    other.mkdir()
    monkeypatch.chdir(other)
    code, _, err = cli("train", "--config", "../cfg/my.yaml", "--set", "data.path=../cfg/my_text.txt")
    assert code == 0, err
    assert load_checkpoint(other / "runs" / "my" / "last.safetensors").config.data.path == str(
        folder / "my_text.txt"
    )


def test_a_recorded_text_path_loses_its_dots_only_where_that_names_the_same_file(tmp_path: Path, monkeypatch):
    """ "other/../cfg/t.txt" is recorded as "cfg/t.txt"; behind a symbolic link ".." is the link target's
    parent, and taking it out by text named another file, or none (review rev40b)."""
    from drnn_cli.train_session import _absolute_text_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfg").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "cfg" / "t.txt").write_text("cfg's")
    assert _absolute_text_path(Path("other/../cfg/t.txt")) == str(tmp_path / "cfg" / "t.txt")
    (tmp_path / "far" / "deep").mkdir(parents=True)
    (tmp_path / "far" / "t.txt").write_text("far's")
    (tmp_path / "t.txt").write_text("the current directory's")
    (tmp_path / "link").symlink_to(tmp_path / "far" / "deep")
    recorded = _absolute_text_path(Path("link/../t.txt"))  # far/t.txt, where the link leads
    assert Path(recorded).read_text() == "far's" and recorded == str(tmp_path / "link" / ".." / "t.txt")


def test_after_a_resume_that_followed_the_corpus_eval_follows_it_too(workdir: Path, corpus_path: Path, cli):
    """The best checkpoint may predate the resume that gave data.path its new place; eval then takes
    the place from the run's config.yaml (and checks the text by its SHA-1 as always)."""
    import shutil

    import yaml

    first, moved = workdir / "a.txt", workdir / "b.txt"
    shutil.copyfile(corpus_path, first)
    config = workdir / "tiny.yaml"
    data = {"path": str(first), "max_tokens": 2000, "batch_size": 4, "num_steps": 8, "val_fraction": 0.2}
    config.write_text(yaml.safe_dump({"data": data, "model": {"hidden_size": 8}, "train": {"epochs": 1}}))
    base = ("train", "--config", str(config), "--device", "cpu", "--run", str(workdir / "runs" / "r"))
    assert cli(*base)[0] == 0
    first.rename(moved)
    code, _, err = cli(*base, "--resume")
    assert code == 1 and err.strip().splitlines() == [
        f"drnn: error: cannot resume {workdir / 'runs' / 'r'}: its corpus {first} is not there (moved, or on "
        "another machine); point at it with --set data.path=FILE (the text is checked by its SHA-1)"
    ]
    # A rate too small to improve on the best checkpoint: best.safetensors keeps the old path.
    resumed = cli(
        *base, "--resume", "--set", f"data.path={moved}", "--set", "train.epochs=2", "--set", "train.lr=1e-30"
    )
    assert resumed[0] == 0, resumed[2]
    best = load_checkpoint(workdir / "runs" / "r" / "best.safetensors")
    assert best.config.data.path == str(first) and best.epoch == 1
    code, out, err = cli("eval", "--run", str(workdir / "runs" / "r"), "--json")
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["source"] == f"{moved} [val]"


def test_eval_and_inspect_name_their_own_flag_for_an_empty_file(tiny_run: Path, tmp_path: Path, cli):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code, _, err = cli("eval", "--run", str(tiny_run), "--data", str(empty))
    assert code == 1 and err.strip() == f"drnn: error: --data file {empty} is empty; nothing to evaluate"
    code, _, err = cli("inspect", "--file", str(empty), "--run", str(tiny_run))
    assert code == 1 and err.strip() == f"drnn: error: --file {empty} is empty; give it the text to inspect"
    digits = tmp_path / "digits.txt"
    digits.write_text("1895 1901 1984\n")
    code, _, err = cli("eval", "--run", str(tiny_run), "--data", str(digits))
    assert (code, err) == (
        1,
        f"drnn: error: {digits} has fewer than 2 tokens after the run's data.preprocess=d2l (it keeps only the "
        "letters a-z and spaces); nothing to evaluate\n",
    )
    code, _, err = cli("eval", "--run", str(tiny_run), "--data", str(tmp_path))
    assert code == 1 and err.strip().startswith(f"drnn: error: --data file {tmp_path} is a directory")


def test_eval_of_a_text_mostly_unknown_to_the_model_says_its_perplexity_is_not_comparable(workdir: Path, cli):
    """<unk> is one class for every token the vocabulary lacks: a word model's eval of gibberish (every
    word unknown) scored 19, its own validation text 389, and a character model that never saw <unk>
    scored 69.6 on its own text in another Unicode form (1.02 in its own). From 5% of the predictions
    on, a note says so; below, none. Over fewer than 100 predictions, a perplexity is noise."""
    import yaml

    text = workdir / "abc.txt"
    text.write_text("abc cab bca " * 300)
    tree = {"data": {"path": str(text), "preprocess": "none", "batch_size": 4, "num_steps": 8},
            "model": {"cell": "gru", "hidden_size": 8, "num_layers": 1},
            "train": {"epochs": 1, "optimizer": "adam", "lr": 0.01, "sample_every": 0, "device": "cpu"}}  # fmt: skip
    config = workdir / "abc.yaml"
    config.write_text(yaml.safe_dump(tree))
    code, _, err = cli("train", "--config", str(config), "--run", "runs/abc")
    assert code == 0, err
    mostly = workdir / "mostly.txt"
    mostly.write_text("abc xyz " * 20)  # 160 characters, x y z unknown: 60 of 159 predictions
    code, out, err = cli("eval", "--run", "runs/abc", "--data", str(mostly))
    assert code == 0, err
    assert [line for line in err.splitlines() if line.startswith("note:")] == [
        "note: 37.7% of the predicted tokens are not in the vocabulary and are scored as <unk>, one class for "
        "all of them: this perplexity is not comparable with perplexities over a text the model can spell "
        "(far lower where it learned to predict <unk>, far higher where it never saw one)"
    ]
    little = workdir / "little.txt"
    little.write_text("abc cab bca " * 20 + "x")  # 1 of 240 predictions
    code, said, err = cli("eval", "--run", "runs/abc", "--data", str(little))
    assert code == 0 and "note:" not in said + err and "(1 token not in the vocabulary" in said, err
    # below the note's share, the figure over the tokens it can spell is beside the whole's
    code, out, _ = cli("eval", "--run", "runs/abc", "--data", str(little), "--json")
    payload = json.loads(out.splitlines()[-1])
    assert payload["unknown"] == 1 and payload["known_perplexity"] < payload["perplexity"]
    assert (
        f"over 240 predicted tokens; {payload['known_perplexity']:.4f} over the 239 other than <unk> ("
        in said
    )
    few = workdir / "few.txt"
    few.write_text("abc cab bca " * 8)  # 95 predictions, read as one stream
    code, out, err = cli("eval", "--run", "runs/abc", "--data", str(few), "--rows", "1")
    assert code == 0, err
    assert [line for line in err.splitlines() if line.startswith("note:")] == [
        "note: a perplexity over 95 predictions is noise (evaluate a longer text with --data)"
    ]


def test_predict_eval_and_inspect_read_the_model_not_the_optimizers_moments(tiny_run: Path):
    """A checkpoint holds the optimizer's state beside the weights (Adam's moments: twice the model):
    predicting with a 412 MB word model took 2 GB. The commands that only run the model read its tensors
    and the trainer's small ones (counters read as numbers); the large ones stand in as shapes."""
    from drnn_cli.checkpoint import STAND_IN_ELEMENTS

    path = tiny_run / "last.safetensors"
    full, light = load_checkpoint(path), load_checkpoint(path, weights_only=True)
    assert all(torch.equal(light.model_state[name], value) for name, value in full.model_state.items())
    flat_full, flat_light = _tensors(full.trainer_state), _tensors(light.trainer_state)
    large = [name for name, tensor in flat_full.items() if tensor.numel() > STAND_IN_ELEMENTS]
    assert large  # the CPU random state (5,056 bytes) at least
    for name, tensor in flat_full.items():
        stood_in = flat_light[name]
        assert (stood_in.shape, stood_in.dtype) == (tensor.shape, tensor.dtype)
        assert stood_in.is_meta == (name in large)
    assert light.trainer().global_step == full.trainer().global_step == 4 * 29
    assert load_model(tiny_run, None, "cpu").checkpoint.trainer().global_step == 4 * 29


def _tensors(tree: object, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a nested trainer state, by its path."""
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    items = (
        tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list | tuple) else []
    )
    return {path: t for key, value in items for path, t in _tensors(value, f"{prefix}/{key}").items()}


def _on_a_terminal(*commands: list[str], cwd: Path) -> list[str]:
    """What each ``drnn ARGS`` writes to stdout when stdout is a terminal (a pseudo-terminal of its own
    here); the commands run side by side."""
    import os
    import pty
    import subprocess
    import sys
    import threading

    def run(args: list[str], written: list[str]) -> None:
        leader, follower = pty.openpty()
        process = subprocess.Popen(
            [sys.executable, "-m", "drnn_cli", *args],
            stdout=follower, stderr=subprocess.DEVNULL, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        os.close(follower)
        output = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the child closed its end
                break
            if not chunk:
                break
            output += chunk
        os.close(leader)
        written.append(f"exit {process.wait(timeout=60)}")
        written.append(output.decode().replace("\r\n", "\n"))  # the terminal's line discipline writes CR LF

    outcomes: list[list[str]] = [[] for _ in commands]
    readers = [threading.Thread(target=run, args=pair) for pair in zip(commands, outcomes, strict=True)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join()
    assert [outcome[:1] for outcome in outcomes] == [["exit 0"]] * len(commands), outcomes
    return [outcome[1] for outcome in outcomes]


def test_on_a_terminal_a_continuation_over_several_lines_ends_with_a_blank_line(workdir: Path, cli):
    """Several prefixes of a text with line breaks: piped, the output is exactly what was generated; on
    a terminal a blank line follows each multi-line continuation but the last, or one would run into
    the next."""
    text = workdir / "lines.txt"
    text.write_text("ab\n" * 1000)
    tree = {**TINY_TREE, "data": {**TINY_TREE["data"], "path": str(text), "preprocess": "none"}}
    assert cli("train", "--config", str(config_file(workdir, tree)))[0] == 0
    args = ["predict", "a", "b", "-n", "5", "--run", "runs/tiny"]
    code, piped, _ = cli(*args)
    assert (code, piped) == (0, "ab\nab\n\nb\nab\na\n")  # each continuation and a line break
    several, one = _on_a_terminal(args, ["predict", "a", *args[3:]], cwd=workdir)
    assert several == "ab\nab\n\n\nb\nab\na\n"
    assert one == "ab\nab\n\n"  # one prefix: nothing to keep apart


def test_an_earlier_drnns_checkpoint_still_takes_its_texts_crlf_copy_with_a_byte_order_mark(
    tiny_run: Path, tmp_path: Path, corpus_path: Path, cli
):
    """A checkpoint without text_sha1 (an earlier drnn's) reads the split from a CR LF copy of
    its text with a byte order mark, as before, with the note (the fallback's accepting path)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    checkpoint = load_checkpoint(run / "best.safetensors")
    checkpoint.text_sha1 = None
    save_checkpoint(run / "best.safetensors", checkpoint)
    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes(b"\xef\xbb\xbf" + corpus_path.read_bytes().replace(b"\n", b"\r\n"))
    code, out, err = cli("eval", "--run", str(run), "--corpus", str(crlf), "--split", "val", "--json")
    original = json.loads(cli("eval", "--run", str(tiny_run), "--split", "val", "--json")[1].splitlines()[-1])
    assert code == 0, err
    assert json.loads(out.splitlines()[-1])["perplexity"] == original["perplexity"]
    assert "only in how its line breaks are written or in a byte order mark" in " ".join(err.split())
