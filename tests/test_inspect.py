"""``drnn inspect``: step-by-step states equal the model's forward, surprisal equals ``drnn eval``, units
are ranked by a stated rule, and the page, picture and JSON show what the model computed."""

from __future__ import annotations

import html
import io
import json
import math
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import TINY_TREE, assert_one_line_error
from torch.testing import assert_close

from drnn_cli import introspect
from drnn_cli.commands import load_model
from drnn_cli.config import DataConfig, ModelConfig
from drnn_cli.corpus import preprocess_prefix
from drnn_cli.errors import DrnnError
from drnn_cli.evaluate import evaluate
from drnn_cli.introspect import (
    MAX_CHARS,
    WEAK_CORRELATION,
    Inspection,
    InspectRequest,
    UnitScore,
    follows_label,
    inspect_text,
    score_units,
    text_features,
    top_units,
    trace_layers,
)
from drnn_cli.models import build_model
from drnn_cli.train_session import TrainRequest, train_run
from drnn_cli.vocab import Vocab

CELLS = [("lstm", "tanh"), ("gru", "tanh"), ("rnn", "tanh"), ("rnn", "relu")]
TOL = {"atol": 1e-10, "rtol": 1e-10}  # float64 models


def small_model(cell: str, nonlinearity: str, impl: str, embedding_dim: int = 0):
    """``impl`` "scratch-d2l": the scratch cells in d2l's form (model.cell_form d2l)."""
    config = ModelConfig(
        cell=cell,
        nonlinearity=nonlinearity,
        impl=impl.removesuffix("-d2l"),
        cell_form="d2l" if impl.endswith("-d2l") else "torch",
        hidden_size=6,
        num_layers=3,
        embedding_dim=embedding_dim,
    )
    return build_model(11, config, seed=0).double().eval()


# ---------------------------------------------------------------------------------------------
# Step-by-step states


@pytest.mark.parametrize("impl", ["torch", "scratch", "scratch-d2l"])
@pytest.mark.parametrize(("cell", "nonlinearity"), CELLS, ids=["lstm", "gru", "rnn-tanh", "rnn-relu"])
def test_step_by_step_states_of_every_layer_equal_the_models_forward_on_each_prefix(cell, nonlinearity, impl):
    model = small_model(cell, nonlinearity, impl, embedding_dim=4 if cell == "gru" else 0)
    ids = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8])
    traces = trace_layers(model, ids)
    logits, _ = model(ids.view(1, -1), model.begin_state(1, "cpu"))
    assert_close(model.decoder(traces[-1].hidden), logits[:, 0], **TOL)
    for t in range(1, len(ids) + 1):  # the final state after each prefix is the state at step t-1
        _, state = model(ids[:t].view(1, -1), model.begin_state(1, "cpu"))
        h_n, c_n = state if isinstance(state, tuple) else (state, None)
        for layer, trace in enumerate(traces):
            assert_close(trace.hidden[t - 1], h_n[layer, 0], **TOL)
            if c_n is not None:
                assert trace.cell is not None
                assert_close(trace.cell[t - 1], c_n[layer, 0], **TOL)
    expected = {"lstm": ["input", "forget", "output"], "gru": ["reset", "update"], "rnn": []}[cell]
    assert list(traces[0].gates) == expected
    assert all(gate.shape == (len(ids), 6) for gate in traces[1].gates.values())


@pytest.mark.parametrize("impl", ["torch", "scratch"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_gates_are_pytorchs_documented_gates_at_every_step(cell, impl):
    """σ(W_ih x + b_ih + W_hh h + b_hh), chunked in PyTorch's documented order (i, f, g, o / r, z, n)."""
    model = small_model(cell, "tanh", impl)
    ids = torch.tensor([0, 7, 7, 2, 10, 4, 1])
    traces = trace_layers(model, ids)
    rnn = model.rnn
    inputs = F.one_hot(ids, 11).double()
    previous = torch.cat([torch.zeros(1, 6), traces[0].hidden[:-1]])
    pre = inputs @ rnn.weight_ih_l0.t() + rnn.bias_ih_l0 + previous @ rnn.weight_hh_l0.t() + rnn.bias_hh_l0
    if cell == "lstm":
        i, f, _, o = pre.sigmoid().chunk(4, dim=1)
        assert_close(traces[0].gates["input"], i, **TOL)
        assert_close(traces[0].gates["forget"], f, **TOL)
        assert_close(traces[0].gates["output"], o, **TOL)
    else:
        r, z, _ = pre.sigmoid().chunk(3, dim=1)
        assert_close(traces[0].gates["reset"], r, **TOL)
        assert_close(traces[0].gates["update"], z, **TOL)


def test_gate_saturation_counts_steps_below_0_1_and_above_0_9_per_unit():
    model = small_model("lstm", "tanh", "torch")
    with torch.no_grad():  # biases of ±30 pin the gates of layer 1: input shut, forget open
        model.rnn.bias_ih_l0[:6] = -30.0
        model.rnn.bias_ih_l0[6:12] = 30.0
    vocab = Vocab(["<unk>", " ", *"abcdefghi"])
    result = inspect_text(model, vocab, DataConfig(), InspectRequest(text="abc def gh"), torch.device("cpu"))
    first = result.saturation[0]
    assert first["input"].left.tolist() == [1.0] * 6 and first["input"].right.tolist() == [0.0] * 6
    assert first["forget"].left.tolist() == [0.0] * 6 and first["forget"].right.tolist() == [1.0] * 6
    gate = trace_layers(model, torch.tensor([vocab[c] for c in "abc def gh"]))[1].gates["output"]
    assert result.saturation[1]["output"].right.tolist() == (gate > 0.9).double().mean(0).tolist()


@pytest.mark.parametrize(
    ("cell", "impl"), [("lstm", "torch"), ("gru", "torch"), ("gru", "scratch-d2l"), ("rnn", "torch")]
)
def test_a_chunk_at_a_time_carries_each_layers_state_and_inspect_keeps_the_same_numbers(cell, impl):
    """The trace is stepped a chunk of characters at a time (all layers' states and gates at once held
    0.8 GB for 19,000 characters of a 3×256 LSTM): the chunks join into the trace of the whole text,
    and an inspection longer than one chunk shows the same signal and gate saturation as that trace."""
    from drnn_cli.introspect import TRACE_CHUNK, trace_chunks

    model = small_model(cell, "tanh", impl)
    with torch.no_grad():  # weights 8× as large: gates saturated on some characters, not on all
        for parameter in model.rnn.parameters():
            parameter.mul_(8)
    ids = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8])
    whole = trace_layers(model, ids)
    chunks = list(trace_chunks(model, ids, 5))
    assert [len(traces[0].hidden) for traces in chunks] == [5, 5, 2]
    for layer, trace in enumerate(whole):
        assert_close(torch.cat([traces[layer].hidden for traces in chunks]), trace.hidden, **TOL)
        if trace.cell is not None:
            assert_close(torch.cat([traces[layer].cell for traces in chunks]), trace.cell, **TOL)
        for name, gate in trace.gates.items():
            assert_close(torch.cat([traces[layer].gates[name] for traces in chunks]), gate, **TOL)

    vocab = Vocab(["<unk>", " ", *"abcdefghi"])
    text = "bad cafe fig hide a big dice " * 20
    assert len(text) > TRACE_CHUNK
    signal = "cell" if cell == "lstm" else "hidden"
    request = InspectRequest(text=text, layer=2, units=(0, 5), signal=signal)
    result = inspect_text(model, vocab, DataConfig(preprocess="none"), request, torch.device("cpu"))
    traces = trace_layers(model, torch.tensor([vocab[c] for c in text]))
    chosen = traces[1].cell if signal == "cell" else traces[1].hidden
    assert_close(result.activations, chosen[:, [0, 5]].t(), **TOL)
    shares = {share for gates in result.saturation for sat in gates.values() for share in sat.left.tolist()}
    assert len(shares) > 5 or cell == "rnn"
    for gates, trace in zip(result.saturation, traces, strict=True):
        assert list(gates) == list(trace.gates)
        for name, gate in trace.gates.items():
            assert gates[name].left.tolist() == (gate < 0.1).double().mean(0).tolist()
            assert gates[name].right.tolist() == (gate > 0.9).double().mean(0).tolist()


# ---------------------------------------------------------------------------------------------
# Unit ranking


def test_text_features_by_hand():
    features = text_features(list('ab "c" (d)\ne'))
    assert features["position in word"].tolist() == [1, 2, 0, 0, 1, 0, 0, 0, 1, 0, 0, 1]
    assert features["at a space"].tolist() == [0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0]
    assert features["position in line"].tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0, 1]
    assert features["inside quotes"].tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    assert features["inside brackets"].tolist() == [0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0]
    assert "position in line" not in text_features(list("one line"))


def test_curly_quotes_open_and_close_and_an_apostrophe_is_no_quote():
    """Only ``"`` counted, so a text quoting with “ ” gave the feature nothing (inspect33); ``'`` also
    writes apostrophes (don't), so it stays out, and docs/inspect.md says so."""
    features = text_features(list("a “b” 'c' d"))
    assert features["inside quotes"].tolist() == [0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0]


def test_a_property_no_unit_follows_closely_gets_no_turn_and_weak_rows_say_so():
    """--top gave each property a turn however weak its best unit: units at r = +0.02 were listed as
    following position in line beside units at 0.5 (inspect33). Under |r| 0.2 a unit follows nothing
    for the ranking, which then takes the units of largest variance, and the table says "(weak)"."""
    chars = list("ab cd efg hi jklm no pq rst uv wx")
    features = text_features(chars)
    noise = torch.randn(len(chars), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    activations = torch.stack(
        [
            features["position in word"],  # r = 1
            0.05 * features["at a space"] + 0.1 * noise,  # small and weakly at a space
            3.0 * noise,  # large, and follows nothing closely either
        ],
        dim=1,
    )
    scores = score_units(activations, features)
    assert scores[0].correlation == pytest.approx(1.0) and follows_label(scores[0]) == "position in word"
    assert all(abs(scores[u].correlation) < WEAK_CORRELATION for u in (1, 2))
    assert follows_label(scores[1]) == f"{scores[1].feature} (weak)"
    # the second pick is the larger variance, not the weak unit's property taking a turn
    assert [s.unit for s in top_units(scores, activations, 2)] == [0, 2]
    assert follows_label(UnitScore(7, None, 0.0)) == "-"


def test_units_shown_for_their_variance_are_said_to_be():
    """The table showed "-" and r +0.000 for units picked by variance where no property varied, without a
    word of why (inspect33). Over 60 dots nothing varies: every unit shown was picked so."""
    model = small_model("lstm", "tanh", "torch")
    vocab = Vocab(["<unk>", " ", ".", *"abc"])
    request = InspectRequest(text="." * 60, top=2)
    result = inspect_text(model, vocab, DataConfig(preprocess="none"), request, torch.device("cpu"))
    shown = [score.unit for score in result.units]
    assert all(score.feature is None for score in result.units) and len(shown) == 2
    assert result.notes == [
        f"units {shown[0]}, {shown[1]} follow no property at |r| ≥ 0.2: they are shown for the largest "
        "variance of the rest"
    ]
    named = inspect_text(
        model,
        vocab,
        DataConfig(preprocess="none"),
        InspectRequest(text="." * 60, units=(1,)),
        torch.device("cpu"),
    )
    assert named.notes == []  # units named with --units are the user's choice


def test_units_are_scored_by_their_best_pearson_r_and_picked_one_feature_at_a_time():
    chars = list("ab cd efg h")
    features = text_features(chars)
    position, space = features["position in word"], features["at a space"]
    ramp = torch.linspace(0, 1, len(chars), dtype=torch.float64)
    activations = torch.stack(
        [
            position,  # r = 1 with position in word
            -space + 0.2 * ramp,  # -1 < r < 0 with at a space
            torch.full((len(chars),), 0.3, dtype=torch.float64),  # constant: follows nothing
            0.5 * position + ramp,  # 0 < r < 1 with position in word
            2 * space + 2 * ramp,  # follows at a space less closely than unit 1
        ],
        dim=1,
    )
    scores = score_units(activations, features)
    assert (scores[0].feature, scores[0].correlation) == ("position in word", pytest.approx(1.0, rel=1e-12))
    assert [scores[u].feature for u in (1, 3, 4)] == ["at a space", "position in word", "at a space"]
    assert -1 < scores[1].correlation < -abs(scores[4].correlation) < 0
    assert scores[2].feature is None and scores[2].correlation == 0.0
    centred = activations[:, 3] - activations[:, 3].mean()
    f = position - position.mean()
    assert scores[3].feature == "position in word"
    assert scores[3].correlation == pytest.approx(float(centred @ f / (centred.norm() * f.norm())), rel=1e-12)
    # one unit per feature in turn: position in word (unit 0, r = 1), at a space (unit 1), then unit 3
    assert [s.unit for s in top_units(scores, activations, 3)] == [0, 1, 3]


def test_without_a_varying_feature_the_units_with_the_largest_variance_are_picked():
    activations = torch.tensor([[0.0, 1.0, 5.0], [0.0, -1.0, 0.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    scores = score_units(activations, text_features(list("---")))
    assert all(s.feature is None for s in scores)
    assert [s.unit for s in top_units(scores, activations, 2)] == [2, 1]


def test_asking_for_more_units_than_follow_a_feature_adds_those_that_follow_none():
    """--top 16 on a 16-unit layer showed 15 when one unit was constant (red-team finding)."""
    activations = torch.tensor(
        [[0.0, 1.0, 0.5, 3.0], [1.0, 2.0, 0.5, 3.0], [0.0, 1.0, 0.5, 3.0], [1.0, 5.0, 0.5, 3.0]],
        dtype=torch.float64,
    )
    scores = score_units(activations, text_features(list("a a ")))
    assert [s.feature for s in scores] == ["position in word", "position in word", None, None]
    assert [s.unit for s in top_units(scores, activations, 4)] == [0, 1, 2, 3]
    assert [s.unit for s in top_units(scores, activations, 3)] == [0, 1, 2]


# ---------------------------------------------------------------------------------------------
# Surprisal and guesses


def test_surprisal_is_the_per_character_loss_and_sums_to_drnn_evals_one_row_nll():
    model = small_model("gru", "tanh", "scratch")
    vocab = Vocab(["<unk>", " ", *"abcdefghi"])
    text = "bad cafe fig hide a big dice"
    data = DataConfig(num_steps=4)
    result = inspect_text(model, vocab, data, InspectRequest(text=text), torch.device("cpu"))
    ids = torch.tensor([vocab[c] for c in text])
    logits, _ = model(ids.view(1, -1), model.begin_state(1, "cpu"))
    expected = F.cross_entropy(logits[:-1, 0], ids[1:], reduction="none")
    assert result.surprisal[0] is None
    assert_close(torch.tensor(result.surprisal[1:], dtype=torch.float64), expected, **TOL)
    one_row = evaluate(model, ids, batch_size=1, num_steps=4, device=torch.device("cpu"))
    assert one_row.tokens == result.tokens == len(text) - 1
    assert result.nll == pytest.approx(one_row.nll, rel=1e-12)
    top = logits[3, 0].softmax(-1).topk(5)
    assert [char for char, _ in result.top_next[3]] == vocab.to_tokens(top.indices)
    assert [p for _, p in result.top_next[3]] == pytest.approx(top.values.tolist(), rel=1e-12)


def test_characters_outside_the_vocabulary_are_read_and_scored_as_unk():
    model = small_model("lstm", "tanh", "torch")
    vocab = Vocab(["<unk>", " ", *"abcdefghi"])
    data = DataConfig(preprocess="none")
    result = inspect_text(model, vocab, data, InspectRequest(text="abzc"), torch.device("cpu"))
    assert result.unknown == [False, False, True, False]
    logits, _ = model(torch.tensor([[2, 3, 0, 4]]), model.begin_state(1, "cpu"))
    assert result.surprisal[2] == pytest.approx(-float(logits[1, 0].detach().log_softmax(-1)[0]), rel=1e-12)


def test_an_argument_with_bytes_that_are_not_utf8_is_refused_in_one_line():
    """A shell passes an undecodable byte as a lone surrogate (0xff as \\udcff); encoding the text
    for the vocabulary failed on it with an internal UnicodeEncodeError (red-team finding)."""
    model = small_model("lstm", "tanh", "torch")
    vocab = Vocab(["<unk>", " ", *"abcdefghi"])
    request = InspectRequest(text="ab\udcffcd")
    with pytest.raises(DrnnError, match=r"holds a byte 0xff, which is not UTF-8 text"):
        inspect_text(model, vocab, DataConfig(preprocess="none"), request, torch.device("cpu"))
    # d2l preprocessing reads it as a non-letter, a space, as drnn predict does
    result = inspect_text(model, vocab, DataConfig(), request, torch.device("cpu"))
    assert result.text == "ab cd"
    # drnn predict reads its prefix through the same preprocessing, and says the same
    with pytest.raises(DrnnError, match=r"^the text holds a byte 0xff, which is not UTF-8 text"):
        preprocess_prefix("time \udcff", "lower")


# ---------------------------------------------------------------------------------------------
# The command: eval equality, page, picture, JSON, errors


@pytest.fixture(scope="module")
def one_row_run(tmp_path_factory: pytest.TempPathFactory, corpus_path: Path) -> Path:
    """A tiny scratch GRU trained with batch_size 1: ``drnn eval`` then reads a file as one row."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("one_row_run")
    tree = {
        "data": {**TINY_TREE["data"], "path": str(corpus_path), "max_tokens": 1500, "batch_size": 1},
        "model": {"cell": "gru", "impl": "scratch", "hidden_size": 16, "num_layers": 2},
        "train": {**TINY_TREE["train"], "epochs": 1},
    }
    config = root / "one_row.yaml"
    config.write_text(yaml.safe_dump(tree))
    train_run(TrainRequest(config_path=config, run_dir=root / "run"))
    return root / "run"


def test_surprisal_sum_equals_drnn_eval_with_one_row_on_any_run(cli, tiny_run: Path, tmp_path: Path):
    """``drnn eval --rows 1`` reads a file as one stream, as inspect does, whatever the run's batch size."""
    text = tmp_path / "excerpt.txt"
    text.write_text(
        "The Time Traveller (for so it will be convenient\nto speak of him) was expounding.\n" * 3
    )
    code, out, err = cli("eval", "--run", str(tiny_run), "--data", str(text), "--rows", "1", "--json")
    assert code == 0, err
    evaluated = json.loads(out)
    code, out, err = cli("inspect", "--file", str(text), "--run", str(tiny_run), "--json")
    assert code == 0, err
    inspected = json.loads(out)
    eval_nll = evaluated["bits_per_token"] * evaluated["tokens"] * math.log(2)
    assert inspected["tokens"] == evaluated["tokens"]
    assert inspected["nll"] == pytest.approx(eval_nll, rel=1e-6)
    code, out, _ = cli("eval", "--run", str(tiny_run), "--data", str(text), "--json")  # 8 rows, 8 zero states
    assert json.loads(out)["perplexity"] != pytest.approx(evaluated["perplexity"], rel=1e-6)


def test_the_summary_line_says_how_many_characters_were_scored_as_unk(cli, tmp_path: Path, corpus_path: Path):
    """With data.min_freq 500 the book's rarest letters (q, x, j, z) are left out of the vocabulary."""
    tree = {
        "data": {**TINY_TREE["data"], "path": str(corpus_path), "min_freq": 500},
        "model": {"cell": "gru", "hidden_size": 8, "num_layers": 1},
        "train": {**TINY_TREE["train"], "epochs": 1},
    }
    config = tmp_path / "rare.yaml"
    config.write_text(yaml.safe_dump(tree))
    train_run(TrainRequest(config_path=config, run_dir=tmp_path / "run"))
    vocab = set(json.loads((tmp_path / "run" / "vocab.json").read_text())["idx_to_token"])
    assert not {"q", "z"} & vocab
    code, out, err = cli("inspect", "a quick quiz", "--run", str(tmp_path / "run"))
    assert code == 0, err
    assert out.startswith("11 predicted characters (3 not in the vocabulary, scored as <unk>): ")
    code, out, err = cli("inspect", "the time", "--run", str(tmp_path / "run"))
    assert out.startswith("7 predicted characters: perplexity ")
    # The first character is read, never predicted: its q is not among the scored ones
    code, out, err = cli("inspect", "quiz", "--run", str(tmp_path / "run"), "--json")
    assert json.loads(out)["unknown"] == 1
    code, out, err = cli("inspect", "th", "--run", str(tmp_path / "run"))
    assert out.startswith("1 predicted character: perplexity ")
    text = tmp_path / "quiz.txt"
    text.write_text("quiz the quiz")
    code, out, err = cli("eval", "--run", str(tmp_path / "run"), "--data", str(text), "--json")
    assert code == 0, err
    assert err.startswith(f"{text} (3 tokens not in the vocabulary, scored as <unk>): perplexity ")
    assert (json.loads(out)["unknown"], json.loads(out)["source"]) == (3, str(text))  # source: the path alone


def test_surprisal_sum_equals_drnn_eval_on_the_same_file(cli, one_row_run: Path, tmp_path: Path):
    text = tmp_path / "excerpt.txt"
    text.write_text("The Time Traveller (for so it will be convenient\nto speak of him) was expounding.\n")
    code, out, err = cli("eval", "--run", str(one_row_run), "--data", str(text), "--json")
    assert code == 0, err
    evaluated = json.loads(out)
    code, out, err = cli("inspect", "--file", str(text), "--run", str(one_row_run), "--json")
    assert code == 0, err
    inspected = json.loads(out)
    assert (
        inspected["text"] == "the time traveller for so it will be convenientto speak of him was expounding"
    )
    assert inspected["tokens"] == evaluated["tokens"] == len(inspected["text"]) - 1
    eval_nll = evaluated["bits_per_token"] * evaluated["tokens"] * math.log(2)
    assert inspected["nll"] == pytest.approx(eval_nll, rel=1e-6)
    assert math.fsum(inspected["surprisal"][1:]) == pytest.approx(eval_nll, rel=1e-6)
    assert inspected["perplexity"] == pytest.approx(evaluated["perplexity"], rel=1e-6)


class SpanCounter(HTMLParser):
    """Collects the coloured character spans of each ``div.text``, and anything fetched from outside."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict] = []
        self.external: list[str] = []
        self._span: dict | None = None
        self._in_row = False

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        for key in ("src", "href"):
            if key in attributes:
                self.external.append(attributes[key])
        if tag == "link":
            self.external.append(str(attributes))
        if tag == "div" and attributes.get("class") == "text":
            self.rows.append({"unit": attributes.get("data-unit"), "spans": []})
            self._in_row = True
        if tag == "span" and self._in_row:
            self._span = attributes
            self.rows[-1]["spans"].append([attributes, ""])

    def handle_data(self, data):
        if self._span is not None:
            self.rows[-1]["spans"][-1][1] += data

    def handle_endtag(self, tag):
        if tag == "span":
            self._span = None
        if tag == "div":
            self._in_row = False


def test_page_has_one_coloured_span_per_character_and_unit_and_the_picture_exists(
    cli, tiny_run: Path, tmp_path: Path
):
    page, picture = tmp_path / "inspect.html", tmp_path / "inspect.png"
    text = "the time traveller for so it will be convenient to speak of him"
    code, out, err = cli(
        "inspect",
        text,
        "--run",
        str(tiny_run),
        "--units",
        "3,17,0,17",  # a unit named twice is shown once
        "--html",
        str(page),
        "--png",
        str(picture),
        "--json",
    )
    assert code == 0, err
    summary = json.loads(out)
    parser = SpanCounter()
    parser.feed(page.read_text(encoding="utf-8"))
    assert parser.external == []
    assert [row["unit"] for row in parser.rows] == [None, "3", "17", "0"]  # surprisal, then each unit
    for row in parser.rows:
        assert "".join(char for _, char in row["spans"]) == text
        # a span's place is its character's index: it holds its colour and nothing else
        assert all(list(attributes) == ["style"] for attributes, _ in row["spans"])
        assert all(re.fullmatch("background:#[0-9a-f]{6}", a["style"]) for a, _ in row["spans"])
    # the colours follow the values: the most surprising character is the reddest (least green)
    worst = max(range(1, len(text)), key=lambda i: summary["surprisal"][i])
    greens = [int(a["style"][14:16], 16) for a, _ in parser.rows[0]["spans"][1:]]
    assert greens[worst - 1] == min(greens)
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [unit["unit"] for unit in summary["units"]] == [3, 17, 0]
    assert summary["layer"] == 2 and summary["cell"] == "lstm" and summary["signal"] == "hidden"
    assert len(summary["surprisal"]) == len(summary["top_next"]) == len(text)
    assert all(len(unit["activations"]) == len(text) for unit in summary["units"])
    guesses = summary["top_next"][0]
    assert len(guesses) == 5 and [p for _, p in guesses] == sorted((p for _, p in guesses), reverse=True)
    assert [g["layer"] for g in summary["gate_saturation"]] == [1, 2]
    assert list(summary["gate_saturation"][0]["gates"]) == ["input", "forget", "output"]
    assert summary["perplexity"] == pytest.approx(math.exp(summary["nll"] / summary["tokens"]), rel=1e-12)


def test_the_page_is_inert_and_valid_whatever_the_text_holds():
    """Markup in the text stays text, and a character that is invisible or acts on the text around it
    (a bidi override reverses every later character on the line, a C0 control or a line separator is
    a parse error or a break) is drawn as its code point: the page held them raw (red-team finding)."""
    import unicodedata

    from drnn_cli.inspect_html import render_html

    text = 'a <!--<script>alert("x")</script> & </span> \u202eabc\u202c \x01\x7f\x85 z\u200dw \u2028\ufdd0\tq'
    vocab = Vocab(["<unk>", *sorted(set(text))])
    model = build_model(len(vocab), ModelConfig(hidden_size=6, num_layers=2), seed=0).double().eval()
    result = inspect_text(
        model, vocab, DataConfig(preprocess="none"), InspectRequest(text=text, top=2), torch.device("cpu")
    )
    page = render_html(result, "<b>run</b>")
    parser = SpanCounter()
    parser.feed(page)
    assert parser.external == [] and "<b>run</b>" not in page
    assert len(parser.rows) == 3
    expected = [f"⟨U+{ord(c):04X}⟩" if c in "\u202e\u202c\x01\x7f\x85\u200d\u2028\ufdd0" else c for c in text]
    for row in parser.rows:
        assert [char for _, char in row["spans"]] == expected
    assert page.count("<script>") == 1 and page.count("</script>") == 1
    controls = [c for c in page if c not in "\t\n" and unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")]
    assert controls == [] and "\ufdd0" not in page


def test_top_units_and_the_cell_signal_of_a_trained_lstm(tiny_run: Path):
    loaded = load_model(tiny_run, None, "cpu")
    request = InspectRequest(text="the time machine is a story", layer=1, top=4, signal="cell")
    result = inspect_text(
        loaded.model, loaded.checkpoint.vocab, loaded.checkpoint.config.data, request, loaded.device
    )
    assert len(result.units) == 4 and result.layer == 1
    assert {unit.feature for unit in result.units} == {"position in word", "at a space"}
    traces = trace_layers(loaded.model, torch.tensor([loaded.checkpoint.vocab[c] for c in request.text]))
    assert traces[0].cell is not None
    assert_close(result.activations, traces[0].cell[:, [u.unit for u in result.units]].t())


def test_png_labels_missing_from_its_font_are_returned_for_one_note_not_warned_twice_each(tmp_path: Path):
    """matplotlib warned twice per character its font lacks (CJK, a C0 control, a tab), each warning
    with its source line on stderr (red-team finding); invisible characters are labelled by code point."""
    import warnings

    from drnn_cli.inspect_plot import write_inspection_plot

    text = "ab 漢字 x\x01y\tz 漢"
    vocab = Vocab(["<unk>", *sorted(set(text))])
    model = build_model(len(vocab), ModelConfig(hidden_size=6, num_layers=2), seed=0).double().eval()
    request = InspectRequest(text=text, top=2)
    result = inspect_text(model, vocab, DataConfig(preprocess="none"), request, torch.device("cpu"))
    picture = tmp_path / "x.png"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        missing = write_inspection_plot(result, picture)
    assert [str(w.message) for w in caught] == []
    assert missing in (["漢", "字"], [])  # [] where a CJK font is installed; the control and tab are labels
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_png_shows_surprisal_in_bits_above_the_units_and_marks_the_characters_read_as_unk():
    """The PNG had neither the page's surprisal row nor its marks on characters not in the vocabulary.
    Of 120 characters the picture shows the first 100; "z" and "(" are not in the vocabulary."""
    from matplotlib.colors import to_hex

    from drnn_cli.inspect_html import surprisal_colour
    from drnn_cli.inspect_plot import HEATMAP_CHARS, SURPRISAL_LABEL, UNKNOWN_COLOUR, inspection_figure

    text = ("the (time) of zeal " * 7)[:120]
    vocab = Vocab(["<unk>", *sorted(set(text) - {"z", "("})])
    model = build_model(len(vocab), ModelConfig(hidden_size=6, num_layers=2), seed=0).double().eval()
    request = InspectRequest(text=text, top=2)
    result = inspect_text(model, vocab, DataConfig(preprocess="none"), request, torch.device("cpu"))
    figure = inspection_figure(result)
    (strip,) = [
        axes for axes in figure.axes if [t.get_text() for t in axes.get_yticklabels()] == [SURPRISAL_LABEL]
    ]
    (heat,) = [axes for axes in figure.axes if axes.get_yticklabels()[0].get_text().startswith("unit ")]
    assert strip.get_position().y0 > heat.get_position().y1  # above the units, over the same characters
    assert strip.get_xlim() == heat.get_xlim() == (-0.5, HEATMAP_CHARS - 0.5)
    bits = strip.images[0].get_array()
    assert bits.shape == (1, HEATMAP_CHARS) and list(bits.mask[0]) == [True] + [False] * (HEATMAP_CHARS - 1)
    assert bits[0, 1:].tolist() == pytest.approx([s / math.log(2) for s in result.surprisal[1:HEATMAP_CHARS]])
    # the page's scale: white at 0 bits, its orange from 6 bits on, its grey where there is no prediction
    colours = strip.images[0]
    assert to_hex(colours.cmap(colours.norm(0.0))) == surprisal_colour(0.0) == "#ffffff"
    assert to_hex(colours.cmap(colours.norm(9.0))) == surprisal_colour(6 * math.log(2))
    assert to_hex(colours.cmap.get_bad()) == surprisal_colour(None)
    labels = heat.get_xticklabels()
    assert "".join(label.get_text() for label in labels) == text[:HEATMAP_CHARS].replace(" ", "␣")
    marked = [t for t, label in enumerate(labels) if label.get_color() == UNKNOWN_COLOUR]
    assert marked == [t for t, char in enumerate(text[:HEATMAP_CHARS]) if char in "z("]
    assert marked[:4] == [4, 14, 23, 33] and len(marked) == 11  # and 109, 118 past the picture
    assert all(labels[t].get_fontweight() == "bold" for t in marked)
    assert heat.get_xlabel() == "purple, bold: not in the vocabulary, read and scored as <unk>"
    # 0.13 inch a character, its label at 9 points, as before the strip
    assert figure.get_size_inches()[0] == pytest.approx(0.13 * HEATMAP_CHARS)
    assert {label.get_fontsize() for label in labels} == {9}


def test_png_of_a_text_all_in_the_vocabulary_marks_nothing():
    from drnn_cli.inspect_plot import inspection_figure

    text = "the time traveller"
    vocab = Vocab(["<unk>", *sorted(set(text))])
    model = build_model(len(vocab), ModelConfig(hidden_size=6, num_layers=2), seed=0).double().eval()
    request = InspectRequest(text=text, top=2)
    result = inspect_text(model, vocab, DataConfig(preprocess="none"), request, torch.device("cpu"))
    figure = inspection_figure(result)
    (heat,) = [axes for axes in figure.axes if axes.get_yticklabels()[0].get_text().startswith("unit ")]
    assert len({label.get_color() for label in heat.get_xticklabels()}) == 1 and heat.get_xlabel() == ""


def test_the_untrained_baseline_is_the_layers_best_in_the_network_as_its_seed_initialises_it():
    """An LSTM's cell state sums its input and counts letters since a space before any training (|r|
    0.6-0.7: inspect40), so a unit's r says what was learned only beside the same network untrained. A
    model that is its seed's initial weights has its own best unit of each property as its baseline,
    exactly; a trained one is compared with those weights; the process's random state is untouched;
    every unit carries its r with every property that varies (a unit's best of "position in word" and
    "at a space" may lead the other by a hair)."""
    text = (
        'the time traveller (for so it will be convenient to speak of him)\nwas expounding "a recondite matter"\n'
        * 3
    )
    vocab = Vocab(["<unk>", *sorted(set(text))])
    config = ModelConfig(cell="lstm", hidden_size=16, num_layers=2)
    untrained = build_model(len(vocab), config, seed=7).eval()
    request = InspectRequest(text=text, top=16, signal="cell")
    before = torch.get_rng_state()
    own = inspect_text(untrained, vocab, DataConfig(preprocess="none"), request, torch.device("cpu"), seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    assert (
        set(own.untrained)
        == set(text_features(list(text)))
        == {
            "position in word",
            "at a space",
            "position in line",
            "inside quotes",
            "inside brackets",
        }
    )
    for name, baseline in own.untrained.items():
        assert max(abs(unit.correlations[name]) for unit in own.units) == abs(baseline), name
    for unit in own.units:
        assert unit.correlations[unit.feature] == unit.correlation
        assert all(abs(r) <= abs(unit.correlation) for r in unit.correlations.values())
    other = build_model(len(vocab), config, seed=8).eval()
    seen = inspect_text(other, vocab, DataConfig(preprocess="none"), request, torch.device("cpu"), seed=7)
    assert seen.untrained == own.untrained and seen.units != own.units
    summary = seen.summary()
    assert summary["untrained"] == {name: round(r, 4) for name, r in own.untrained.items()}
    assert summary["units"][0]["correlations"] == {
        name: round(r, 4) for name, r in seen.units[0].correlations.items()
    }


def _table_rows(table: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in row.split("│")[1:-1]] for row in table.splitlines() if row.startswith("│")
    ]


def test_the_table_sets_each_units_r_beside_the_untrained_layers_best(cli, tiny_run: Path):
    text = "the time traveller for so it will be convenient to speak of him"
    code, table, err = cli("inspect", text, "--run", str(tiny_run))
    assert code == 0, err
    header = next(line for line in table.splitlines() if "unit" in line and "follows" in line)
    # a column between r and untrained marks the units no closer than the untrained layer's best
    assert [cell.strip() for cell in header.split("┃")[1:-1]] == ["unit", "follows", "r", "", "untrained"]
    assert (
        "untrained: the largest |r| any unit of the layer has with the property in a network of this shape "
        "before any training (as train.seed 3 initialises it): an |r| well above it was learned"
    ) in " ".join(table.split())
    code, out, err = cli("inspect", text, "--run", str(tiny_run), "--json")
    untrained = json.loads(out.splitlines()[-1])["untrained"]
    rows = _table_rows(table)
    assert len(rows) == 5 and set(untrained) == {"position in word", "at a space"}
    for row in rows:
        assert row[4] == f"{abs(untrained[row[1].removesuffix(' (weak)')]):.3f}", row


def test_units_no_closer_than_the_untrained_layers_best_are_marked_and_said_to_be(cli, tiny_run: Path):
    """learner41: a memorising model's table listed units at or below the untrained figure beside them,
    with nothing flagging it. A unit whose |r| is not above it, as the table prints both, is marked
    "≤ untrained" between them (--json: above_untrained false); a line after the table says what the
    mark means, and where no listed unit is above its figure, that they show what the architecture
    gives for nothing."""
    excerpt = (
        "the time traveller for so it will be convenient to speak of him was expounding a recondite matter "
        "to us his grey eyes shone and twinkled and his usually pale face was flushed and animated"
    )
    code, out, err = cli("inspect", excerpt, "--run", str(tiny_run), "--top", "8", "--json")
    assert code == 0, err
    result = json.loads(out.splitlines()[-1])
    units = result["units"]
    for unit in units:
        before = result["untrained"][unit["feature"]]
        assert unit["above_untrained"] == (round(abs(unit["correlation"]), 3) > round(abs(before), 3)), unit
    below = [str(unit["unit"]) for unit in units if not unit["above_untrained"]]
    above = [str(unit["unit"]) for unit in units if unit["above_untrained"]]
    assert below and above  # the tiny run has both
    legend = (
        "≤ untrained: the unit's |r| is not above its untrained figure (as printed): a unit of the network as "
        "initialised follows the property at least as closely"
    )
    none_above = (
        "no unit listed follows its property more closely than the untrained layer's best unit does: what "
        "they show is what the architecture gives for nothing (a model that memorised its text often shows none)"
    )
    code, table, err = cli("inspect", excerpt, "--run", str(tiny_run), "--top", "8")
    assert code == 0, err
    marks = {row[0]: row[3] for row in _table_rows(table)}
    assert marks == {**dict.fromkeys(below, "≤ untrained"), **dict.fromkeys(above, "")}
    lines = table.splitlines()
    assert legend in lines and none_above not in lines
    # the units no closer than untrained alone: the line says so of them all
    code, table, err = cli("inspect", excerpt, "--run", str(tiny_run), "--units", ",".join(below))
    assert code == 0, err
    assert [row[3] for row in _table_rows(table)] == ["≤ untrained"] * len(below)
    assert none_above in table.splitlines() and legend not in table.splitlines()
    # those above it alone: no mark, no column for one, no line
    code, table, err = cli("inspect", excerpt, "--run", str(tiny_run), "--units", ",".join(above))
    assert code == 0, err
    assert all(len(row) == 4 for row in _table_rows(table))
    assert "≤ untrained" not in table and none_above not in table


def test_a_network_read_as_its_own_untrained_self_is_no_closer_than_untrained_on_the_page_and_json():
    """A network that is its seed's initial weights has, for each property, its own best unit as the
    untrained figure, exactly: not above it, so every unit ranked is marked, in the JSON, the page's
    headings and the line the page gives as the table does. The mark compares |r| as printed, to three
    decimals: 0.5112 against 0.5108 is 0.511 against 0.511, not above."""
    from drnn_cli.inspect_html import render_html
    from drnn_cli.introspect import NONE_ABOVE_UNTRAINED, beats_untrained

    text = "the time traveller for so it will be convenient to speak of him was expounding a recondite matter"
    vocab = Vocab(["<unk>", *sorted(set(text))])
    model = build_model(len(vocab), ModelConfig(cell="lstm", hidden_size=16, num_layers=1), seed=5).eval()
    request = InspectRequest(text=text, top=2, signal="cell")
    result = inspect_text(model, vocab, DataConfig(preprocess="none"), request, torch.device("cpu"), seed=5)
    assert {unit.feature for unit in result.units} == {"position in word", "at a space"}
    assert [unit["above_untrained"] for unit in result.summary()["units"]] == [False, False]
    assert result.untrained_verdict == NONE_ABOVE_UNTRAINED
    page = render_html(result, "t")
    headings = re.findall(r"<h2>Unit \d+ \(([^<]*)\)</h2>", page)
    assert headings == [
        f"r = {unit.correlation:+.2f} with {unit.feature}; untrained, the layer's best: "
        f"{abs(result.untrained[unit.feature or '']):.2f}; ≤ untrained"
        for unit in result.units
    ]
    assert f'<p class="meta">{html.escape(NONE_ABOVE_UNTRAINED)}</p>' in page
    # the PNG says it under its title, as the table and the page do
    from drnn_cli.inspect_plot import inspection_figure

    figure = inspection_figure(result)
    (strip,) = [axes for axes in figure.axes if axes.get_title().startswith("layer 1 cell state")]
    title = strip.get_title().split("\n")
    assert " ".join(title).endswith(" " + NONE_ABOVE_UNTRAINED)
    assert max(map(len, title)) == len(title[1])  # wrapped to the widest line above it
    # seeded otherwise, the same shape's best units are other ones: the verdict follows the numbers
    other = inspect_text(model, vocab, DataConfig(preprocess="none"), request, torch.device("cpu"), seed=6)
    for unit, shown in zip(other.units, other.summary()["units"], strict=True):
        assert shown["above_untrained"] == beats_untrained(
            unit.correlation, other.untrained[unit.feature or ""]
        )
    assert (
        beats_untrained(0.5112, 0.5108),
        beats_untrained(-0.5125, 0.5114),
        beats_untrained(0.3, -0.7491),
    ) == (
        False,
        True,
        False,
    )


def test_the_png_scales_each_unit_over_the_whole_text_as_the_page_and_stands_code_points_upright():
    """The PNG scaled a unit over its first 100 characters, the page over the whole text: a cell state's
    colours were 1.5 times the page's, and no value could be read off it (inspect40). It scales over the
    whole text and names each row's scale; a character drawn as its code point (⟨U+200D⟩) is labelled
    upright, not across the characters beside it."""
    from drnn_cli.inspect_plot import inspection_figure

    text = "zero\u200dwidth " * 6 + "the time traveller " * 20
    vocab = Vocab(["<unk>", *sorted(set(text))])
    model = build_model(len(vocab), ModelConfig(cell="lstm", hidden_size=8, num_layers=1), seed=0).eval()
    request = InspectRequest(text=text, units=(0, 1, 2), signal="cell")
    result = inspect_text(model, vocab, DataConfig(preprocess="none"), request, torch.device("cpu"))
    figure = inspection_figure(result)
    (heat,) = [axes for axes in figure.axes if axes.get_yticklabels()[0].get_text().startswith("unit ")]
    whole = result.activations.abs().amax(dim=1)
    assert (result.activations[:, :100].abs().amax(1) < whole).any()  # a largest past the picture's 100
    shown = heat.get_images()[0].get_array()
    assert torch.allclose(
        torch.as_tensor(abs(shown).max(axis=1)), result.activations[:, :100].abs().amax(1) / whole
    )
    assert [label.get_text().rsplit(", ±", 1)[1] for label in heat.get_yticklabels()] == [
        f"{float(value):.3g}" for value in whole
    ]
    rotations = {label.get_text(): label.get_rotation() for label in heat.get_xticklabels()}
    assert rotations["⟨U+200D⟩"] == 90 and rotations["z"] == 0


def test_the_runs_own_text_as_a_file_is_said_to_be_training_text_as_eval_data_says(
    cli, tiny_run: Path, corpus_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """learner41: the run's own corpus, inspected with --file, read 20,000 characters, 9,000 of them its
    training split, with nothing said, where drnn eval --data of the same file says so. inspect finds it
    as eval does (the text as read, wherever the file is) and says which of the characters it read are
    training text; another text, or a passage cut from this one, is not the run's file and gets no note.
    inspect reads 5,000 characters here, not its 20,000 (each read is traced twice, character by
    character): still more than the run's 2,400 of training text, whose end the note names."""
    monkeypatch.setattr(introspect, "MAX_CHARS", 5_000)
    trained_note = (
        "note: {} is the text this model was trained on: the first 2,400 of the 5,000 characters read are "
        "the run's training split, so this perplexity is partly a training figure, not a held-out one; past "
        "its first 2,400 characters (after preprocessing) the file is text the run never trained on: cut a "
        "passage of it into a file of its own to see the model on text it has not seen "
        '(README "Your own text, and held-out numbers that mean something")'
    )
    code, _, err = cli("eval", "--data", str(corpus_path), "--run", str(tiny_run))
    assert code == 0 and "the first 2,400 of its 170,580 tokens (1.41%) are the run's training split" in err
    copy = tmp_path / "book.txt"
    copy.write_bytes(corpus_path.read_bytes().replace(b"\n", b"\r\n"))  # the same text, other line breaks
    for file in (corpus_path, copy):
        code, _, err = cli("inspect", "--file", str(file), "--run", str(tiny_run), "--units", "1")
        assert code == 0, err
        assert trained_note.format(file) in err.splitlines(), err
    passage = tmp_path / "passage.txt"
    passage.write_bytes(corpus_path.read_bytes()[:5000])
    code, _, err = cli("inspect", "--file", str(passage), "--run", str(tiny_run), "--units", "1")
    assert code == 0 and "is the text this model was trained on" not in err, err


def test_the_trained_text_note_says_which_characters_read_the_run_trained_on():
    from drnn_cli.run_notes import trained_text_read_note

    cite = ' (README "Your own text, and held-out numbers that mean something")'
    # the whole book at a 10% validation split: all 20,000 read are training text
    assert trained_text_read_note("book.txt", 20_000, 153_522, 170_580, fine_tuned=False) == (
        "book.txt is the text this model was trained on: all 20,000 characters read are the run's training "
        "split, so this perplexity is a training figure, not a held-out one; past its first 153,522 characters "
        "(after preprocessing) the file is text the run never trained on: cut a passage of it into a file of "
        "its own to see the model on text it has not seen" + cite
    )
    # a run that holds nothing out and trained on all of it, fine-tuned from a base
    assert trained_text_read_note("a.txt", 300, 300, 300, fine_tuned=True) == (
        "a.txt is the text this model was trained on: all 300 characters read are the run's training split, "
        "so this perplexity is a training figure, not a held-out one; the run holds none of it out: inspect "
        "another text to see the model on one it has not seen; its base run's text is not compared" + cite
    )
    assert trained_text_read_note("a.txt", 300, 0, 300, fine_tuned=False) is None


def test_png_rows_name_each_units_feature_as_the_page_does():
    """The heatmap's rows said "unit 105" where the HTML page says which feature it follows and how well."""
    from drnn_cli.inspect_plot import _unit_label

    assert (
        _unit_label(UnitScore(105, "position in word", -0.5312), {})
        == "unit 105: position in word (r = -0.53)"
    )
    assert _unit_label(UnitScore(3, "at a space", 0.3), {}) == "unit 3: at a space (r = +0.30)"
    assert _unit_label(UnitScore(7, None, 0.0), {}) == "unit 7"
    # with the layer's best |r| for the property before training, as the table's "untrained" column
    untrained = {"at a space": -0.7491, "position in word": 0.6}
    assert (
        _unit_label(UnitScore(3, "at a space", 0.8), untrained)
        == "unit 3: at a space (r = +0.80; untrained 0.75)"
    )
    # no closer than the untrained layer's best, as printed to three decimals: marked as the table marks it
    # (learner41)
    assert (
        _unit_label(UnitScore(3, "at a space", 0.3), untrained)
        == "unit 3: at a space (r = +0.30 ≤ untrained 0.75)"
    )
    assert (
        _unit_label(UnitScore(9, "position in word", -0.6004), untrained)
        == "unit 9: position in word (r = -0.60 ≤ untrained 0.60)"
    )


def test_png_without_matplotlib_is_refused_in_one_line_before_the_text_is_read(
    cli, tiny_run: Path, tmp_path: Path, monkeypatch
):
    """The refusal comes before the text is read (a --file that does not exist is not reached): a
    20,000-character trace is not spent on a picture that cannot be drawn."""
    for module in ("matplotlib", "matplotlib.figure"):  # importing either now raises ImportError
        monkeypatch.setitem(sys.modules, module, None)
    picture, page = tmp_path / "x.png", tmp_path / "x.html"
    args = ("--run", str(tiny_run), "--png", str(picture), "--html", str(page))
    code, _, err = cli("inspect", "--file", str(tmp_path / "missing.txt"), *args)
    assert code == 1
    assert err.startswith("drnn: error: --png needs matplotlib") and err.count("\n") == 1
    assert not picture.exists() and not page.exists()


def test_more_units_than_inspect_shows_are_refused_before_the_text_is_read(
    cli, tiny_run: Path, tmp_path: Path
):
    """65 units named for a 32-unit layer: the limit is what the user meets first, not the range of
    the units nor the missing --file, after the model is read and before the text is; nothing written."""
    picture, page = tmp_path / "x.png", tmp_path / "x.html"
    many = ",".join(str(unit) for unit in range(65))
    code, _, err = cli(
        "inspect", "--file", str(tmp_path / "missing.txt"), "--run", str(tiny_run), "--units", many,
        "--png", str(picture), "--html", str(page),
    )  # fmt: skip
    assert (code, err) == (
        2,
        "drnn: error: drnn inspect shows at most 64 units at once and this asks for 65; choose fewer with "
        "--top or --units (run it again for the others)\n",
    )
    assert not picture.exists() and not page.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--layer", "3"], "--layer 3 does not exist: the model has layers 1 to 2"),
        (["--units", "3,32"], "--units 32 is out of range: the layer has units 0 to 31"),
        (["--units", "a"], "--units takes comma-separated unit numbers"),
        (["--units", ""], "--units takes comma-separated unit numbers"),
        (["--units", "1_0"], "--units takes comma-separated unit numbers"),  # int() reads 10
        (["--units", "\u0663"], "--units takes comma-separated unit numbers"),  # int() reads Arabic-Indic 3
        (["--units", "7" * 5000], "--units takes comma-separated unit numbers"),  # int() refuses 4,300 digits
        (["--png", "heatmap.svg"], "--png writes a PNG image, not SVG; name it so, e.g. heatmap.png"),
        (["--top", "0"], "--top must be >= 1"),
        (
            ["--units", "3", "--top", "2"],
            "--units names the units to show and --top picks them; give one of them",
        ),
        (["--file", "x.txt"], "give the text to inspect either as an argument or with --file FILE"),
    ],
)
def test_wrong_options_are_one_line_errors(cli, tiny_run: Path, args: list[str], message: str):
    """Exit 2, as for the option errors the command-line parser finds (``--signal gates``)."""
    code, out, err = cli("inspect", "the time", "--run", str(tiny_run), *args)
    assert code == 2 and out == ""
    assert err.startswith("drnn: error: " + message) and err.count("\n") == 1


@pytest.mark.parametrize(
    ("text", "status", "message"),
    [
        ("", 2, "the text has 0 characters; give at least 2"),
        ("t", 2, "the text has 1 character; give at least 2"),
        ("1895!", 2, "the text has 0 characters after data.preprocess=d2l (it keeps only the letters a-z and "
         "spaces); give at least 2"),
    ],
)  # fmt: skip
def test_a_text_too_short_to_inspect_says_whether_it_was_given_so(
    cli, tiny_run: Path, text: str, status: int, message: str
):
    """An argument that cannot be inspected is a usage error, however it came to be (preprocessing's doing
    exited 1, an empty one 2: inspect33); the message says whether preprocessing emptied it."""
    code, out, err = cli("inspect", text, "--run", str(tiny_run))
    assert (code, out, err) == (status, "", f"drnn: error: {message}\n")


def test_an_unknown_signal_is_a_usage_error_listing_the_choices(cli, tiny_run: Path):
    code, out, err = cli("inspect", "the time", "--run", str(tiny_run), "--signal", "gates")
    assert (code, out) == (2, "")
    assert_one_line_error(code, err, "Invalid value for '--signal': 'gates' is not one of 'hidden', 'cell'.")


def test_a_file_longer_than_the_cap_is_inspected_in_its_first_characters_with_a_note(
    cli, tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """It was refused, and a learner cut an excerpt by hand (``head -c`` may split a UTF-8 character).
    A cap of 2,000 stands in for the real one (20,000 characters take seconds to inspect)."""
    import drnn_cli.introspect

    monkeypatch.setattr(drnn_cli.introspect, "MAX_CHARS", 2_000)
    long = tmp_path / "long.txt"
    long.write_text("the time machine " * 120)  # 2,040 characters, 2,039 once d2l's strips the last space
    code, out, err = cli("inspect", "--file", str(long), "--run", str(tiny_run), "--json")
    assert code == 0, err
    assert json.loads(out.splitlines()[-1])["text"] == ("the time machine " * 120)[:2_000]
    assert (
        "note: drnn inspect reads at most 2,000 characters: these are the first of the file's 2,039 (after "
        "preprocessing); to read another passage, cut it into a file of its own, e.g. sed -n '700,760p' FILE > "
        "passage.txt"
    ) in err
    # without --json too: notes on stderr, as predict and eval say theirs (they came last on stdout)
    code, out, err = cli("inspect", "--file", str(long), "--run", str(tiny_run))
    assert code == 0 and "reads at most 2,000" in err and "note:" not in out


def test_an_argument_longer_than_the_cap_is_refused_in_one_line(cli, tiny_run: Path):
    code, _, err = cli("inspect", "a" * (MAX_CHARS + 1), "--run", str(tiny_run), "--json")
    assert code == 2
    assert err == (
        f"drnn: error: the text has {MAX_CHARS + 1:,} characters after preprocessing, more than drnn "
        f"inspect's {MAX_CHARS:,}; inspect a shorter excerpt, or pass it with --file, which reads its first "
        f"{MAX_CHARS:,}\n"
    )


def test_a_huge_file_is_refused_in_one_line(cli, tiny_run: Path, tmp_path: Path):
    huge = tmp_path / "huge.txt"
    with huge.open("wb") as handle:  # sparse: 17 MiB on paper, nothing on disk
        handle.truncate(17 << 20)
    code, _, err = cli("inspect", "--file", str(huge), "--run", str(tiny_run))
    assert err == (
        f"drnn: error: --file {huge} holds more than 16,777,216 bytes, the most this command reads; give it "
        # 200,000 bytes: more than the 20,000 characters inspect reads (16 MiB took 9.5 s to read: inspect40)
        f"an excerpt, e.g. head -c 200000 {huge} | iconv -c -f utf-8 -t utf-8 > excerpt.txt (iconv drops a "
        "character head cut in half)\n"
    )  # refused for its size before its NUL bytes are looked at
    assert code == 1


@pytest.mark.parametrize("size", [1000, 1001])
def test_a_file_is_read_up_to_the_limit_and_refused_a_byte_past_it(
    cli, tiny_run: Path, tmp_path: Path, monkeypatch, size: int
):
    monkeypatch.setattr("drnn_cli.introspect.MAX_FILE_BYTES", 1000)
    monkeypatch.setattr("drnn_cli.introspect.EXCERPT_BYTES", 1000)
    text = tmp_path / "text.txt"
    text.write_text("a" * size)
    code, out, err = cli("inspect", "--file", str(text), "--run", str(tiny_run), "--json")
    if size == 1000:
        assert code == 0, err
        assert json.loads(out)["text"] == "a" * 1000
    else:
        assert code == 1 and err == (
            f"drnn: error: --file {text} holds more than 1,000 bytes, the most this command reads; give it "
            f"an excerpt, e.g. head -c 1000 {text} | iconv -c -f utf-8 -t utf-8 > excerpt.txt (iconv drops a "
            "character head cut in half)\n"
        )


def test_the_excerpt_a_refusal_suggests_is_read_even_from_one_long_line_cut_mid_character(
    cli, tiny_run: Path, tmp_path: Path, monkeypatch
):
    """``head -n 200`` kept a file of one line whole, over the limit again; ``head -c`` alone cut "é" in
    half at byte 1,000, which drnn refuses as UTF-8 cut short: the suggested command gives a file
    inspect reads. "café " is 6 bytes: 166 of them are 996, then "caf" and the first byte of "é"."""
    monkeypatch.setattr("drnn_cli.introspect.MAX_FILE_BYTES", 1000)
    monkeypatch.setattr("drnn_cli.introspect.EXCERPT_BYTES", 1000)
    text = tmp_path / "one line.txt"
    text.write_text("café " * 400, encoding="utf-8")
    code, _, err = cli("inspect", "--file", str(text), "--run", str(tiny_run))
    assert code == 1
    command = err.split("e.g. ", 1)[1].split(" (iconv drops", 1)[0]
    subprocess.run(command, shell=True, cwd=tmp_path, check=False, stderr=subprocess.DEVNULL)  # iconv: rc 1
    assert (tmp_path / "excerpt.txt").read_bytes() == "café ".encode() * 166 + b"caf"
    code, out, err = cli("inspect", "--file", str(tmp_path / "excerpt.txt"), "--run", str(tiny_run), "--json")
    assert code == 0, err
    assert json.loads(out)["text"] == "caf " * 166 + "caf"  # d2l's preprocessing: "é" is not a letter


def test_a_file_that_grew_after_its_size_was_taken_is_refused_by_what_is_read(
    cli, tiny_run: Path, tmp_path: Path, monkeypatch
):
    """A file still being written (a log) passed a check of its size on disk and was then read whole,
    however long it had grown: the limit holds on the bytes read."""
    monkeypatch.setattr("drnn_cli.introspect.MAX_FILE_BYTES", 1000)
    monkeypatch.setattr("drnn_cli.introspect.EXCERPT_BYTES", 1000)
    growing = tmp_path / "growing.txt"
    growing.write_text("the time traveller\n")
    before = growing.stat()
    with growing.open("a") as handle:
        handle.write("the time traveller\n" * 100)  # 1,919 bytes
    real_stat = Path.stat
    monkeypatch.setattr(  # the size as it was when looked at, before the writer went on
        Path, "stat", lambda self, **kwargs: before if self == growing else real_stat(self, **kwargs)
    )
    code, _, err = cli("inspect", "--file", str(growing), "--run", str(tiny_run))
    assert code == 1 and err == (
        f"drnn: error: --file {growing} holds more than 1,000 bytes, the most this command reads; give it "
        f"an excerpt, e.g. head -c 1000 {growing} | iconv -c -f utf-8 -t utf-8 > excerpt.txt (iconv drops a "
        "character head cut in half)\n"
    )


def test_standard_input_is_inspected_as_the_same_text_in_a_file_is(cli, tiny_run: Path, tmp_path: Path):
    """``--file -`` was refused as a file that does not exist (and /dev/stdin as a FIFO): piped text is
    read as a file is (its byte order mark, CR LF line breaks and preprocessing), only its source says
    ``stdin``. Piped into the real program, as a user does."""
    import os

    from conftest import pythonpath_with_repo

    raw = "\ufeffThe Time Traveller (for so it will be\r\nconvenient to speak of him)\r\n".encode()
    text = tmp_path / "text.txt"
    text.write_bytes(raw)
    piped = subprocess.run(
        [sys.executable, "-m", "drnn_cli", "inspect", "--file", "-", "--run", str(tiny_run), "--json"],
        input=raw,
        capture_output=True,
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": pythonpath_with_repo()},
        timeout=120,
    )
    assert piped.returncode == 0, piped.stderr.decode()
    code, out, err = cli("inspect", "--file", str(text), "--run", str(tiny_run), "--json")
    assert code == 0, err
    from_stdin, from_file = (
        json.loads(piped.stdout.decode().splitlines()[-1]),
        json.loads(out.splitlines()[-1]),
    )
    assert (from_stdin.pop("source"), from_file.pop("source")) == ("stdin", str(text))
    assert from_stdin == from_file
    assert (
        from_stdin["text"] == "the time traveller for so it will beconvenient to speak of him"
    )  # d2l: lines glued


@pytest.mark.parametrize("size", [1000, 1001])
def test_standard_input_is_read_up_to_the_file_limit_and_refused_a_byte_past_it(
    cli, tiny_run: Path, monkeypatch, size: int
):
    import io

    monkeypatch.setattr("drnn_cli.introspect.MAX_FILE_BYTES", 1000)
    monkeypatch.setattr("drnn_cli.introspect.EXCERPT_BYTES", 1000)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"a" * size)))
    code, out, err = cli("inspect", "--file", "-", "--run", str(tiny_run), "--json")
    if size == 1000:
        assert code == 0, err
        assert json.loads(out)["text"] == "a" * 1000 and json.loads(out)["source"] == "stdin"
    else:
        assert (code, out) == (1, "")
        assert err == (
            "drnn: error: --file - (standard input) holds more than 1,000 bytes, the most drnn inspect reads; "
            "pipe in an excerpt, e.g. … | head -c 1000 | iconv -c -f utf-8 -t utf-8 | drnn inspect --file - "
            "(iconv drops a character head cut in half)\n"
        )


def test_standard_input_at_a_terminal_is_refused_rather_than_waited_on(cli, tiny_run: Path, monkeypatch):
    import os

    leader, follower = os.openpty()
    with open(follower, encoding="utf-8") as terminal:
        monkeypatch.setattr(sys, "stdin", terminal)
        code, out, err = cli("inspect", "--file", "-", "--run", str(tiny_run))
    os.close(leader)
    assert (code, out) == (2, "")
    assert err == (
        "drnn: error: --file - reads the text from standard input, which is a terminal; pipe it in, e.g. "
        "cat notes.txt | drnn inspect --file -\n"
    )


def test_a_fifo_given_to_file_is_refused_pointing_at_standard_input(cli, tiny_run: Path, tmp_path: Path):
    """``--file /dev/stdin`` (a pipe) and ``--file <(…)`` name FIFOs; ``--file -`` reads the pipe."""
    import os

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    code, out, err = cli("inspect", "--file", str(fifo), "--run", str(tiny_run))
    assert (code, out) == (1, "")
    assert err == (
        f"drnn: error: --file {fifo} is a FIFO, not a regular file; give --file a UTF-8 text file, or "
        "--file - to read standard input\n"
    )


def test_more_units_than_inspect_shows_are_refused_in_every_mode(cli, tiny_run: Path, tmp_path: Path):
    """--top 2000 drew a PNG 70,000 pixels tall, and --top 256 over 20,000 characters a 372 MB page
    (each unit repeats every character): 64 units at most, whatever the output. The tiny run's 32
    units pass at --top 100 (all of them); 65 of a layer of 80 are refused, by --top as by --units."""
    from drnn_cli.introspect import MAX_UNITS

    picture = tmp_path / "x.png"
    code, out, err = cli(
        "inspect", "abc", "--run", str(tiny_run), "--top", "100", "--png", str(picture), "--json"
    )
    assert code == 0 and picture.read_bytes()[:4] == b"\x89PNG", err
    assert len(json.loads(out.splitlines()[-1])["units"]) == 32
    assert "note: --top 100: layer 2 has 32 units, all shown here, ranked" in err.splitlines()  # not silently
    vocab = Vocab(["<unk>", "a", "b", "c"])
    model = build_model(len(vocab), ModelConfig(hidden_size=80, num_layers=1), seed=0).eval()
    data, cpu = DataConfig(preprocess="none"), torch.device("cpu")
    for request in (
        InspectRequest(text="abcab", top=MAX_UNITS + 1),
        InspectRequest(text="abcab", units=tuple(range(MAX_UNITS + 1))),
    ):
        with pytest.raises(
            DrnnError, match="^drnn inspect shows at most 64 units at once and this asks for 65;"
        ):
            inspect_text(model, vocab, data, request, cpu)
    assert len(inspect_text(model, vocab, data, InspectRequest(text="abcab", top=64), cpu).units) == 64


def test_an_output_named_like_a_file_of_a_run_directory_inside_one_is_refused(
    cli, tiny_run: Path, tmp_path: Path
):
    """The run read holds best.safetensors; --html on its last.safetensors (a tab completion away)
    replaced the state --resume continues with a page, and on metrics.jsonl the run's history, without
    a word. Refused, through a symlink too; a name of one's own in the run directory is fine."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = {
        name: (run / name).read_bytes() for name in ("last.safetensors", "metrics.jsonl", "config.yaml")
    }
    (tmp_path / "page.html").symlink_to(run / "last.safetensors")
    for flag, given, named in (
        ("--html", run / "last.safetensors", run / "last.safetensors"),
        ("--png", run / "metrics.jsonl", run / "metrics.jsonl"),
        ("--html", run / "config.yaml", run / "config.yaml"),
        ("--html", tmp_path / "page.html", run / "last.safetensors"),
    ):
        code, out, err = cli("inspect", "the time", "--run", str(run), flag, str(given))
        assert (code, out, err) == (
            1,
            "",
            f"drnn: error: {flag} {named} is a file of the run directory {run} (drnn's checkpoints, config "
            f"and history live there); give {flag} a name of its own, e.g. {run / ('inspect.' + flag[2:])}\n",
        )
    assert before == {name: (run / name).read_bytes() for name in before}
    code, _, err = cli("inspect", "the time", "--run", str(run), "--html", str(run / "inspect.html"))
    assert code == 0 and (run / "inspect.html").read_text().startswith("<!DOCTYPE html>"), err


def test_a_page_named_as_an_image_is_refused_as_a_picture_named_as_another_image_is(
    cli, tiny_run: Path, tmp_path: Path
):
    code, _, err = cli("inspect", "abc", "--run", str(tiny_run), "--html", str(tmp_path / "p.png"))
    assert (code, err) == (
        2,
        f"drnn: error: --html writes a web page, not a PNG image; name it so, e.g. {tmp_path / 'p.html'} "
        "(--png draws the picture)\n",
    )
    assert not (tmp_path / "p.png").exists()


def test_a_word_run_is_refused_naming_the_checkpoint_and_how_to_name_a_character_run(
    cli, workdir: Path, corpus_path: Path
):
    """The refusal named no run: the help's example met runs/latest pointing at a word run (inspect33)."""
    tree = {
        **TINY_TREE,
        "data": {**TINY_TREE["data"], "token": "word"},
        "train": {**TINY_TREE["train"], "epochs": 1},
    }
    config = workdir / "words.yaml"
    config.write_text(yaml.safe_dump(tree))
    code, _, err = cli("train", "--config", str(config), "--run", "runs/words")
    assert code == 0, err
    code, out, err = cli("inspect", "the time traveller")  # the latest run: the word one
    best = (workdir / "runs" / "words" / "best.safetensors").resolve()
    assert_one_line_error(
        code,
        err,
        f"{best} is a word model (data.token=word) and drnn inspect reads character models; name a character run with --run DIR or --checkpoint FILE",
    )
    assert (code, out) == (1, "")


def test_a_ranking_over_a_few_characters_says_its_correlations_are_noise(cli, tiny_run: Path):
    """Over 2 or 3 characters every unit that varies correlates ±1 with position in word: the table
    ranked them as clean counters. A note says so below 50 predictions, of named units' correlations
    too, and the page and the picture carry it (inspect40: r = ±1.00 on a saved PNG, the note on the
    terminal alone)."""
    noise = (
        "correlations over 8 characters say little (over a few, any unit that varies follows some "
        "property closely): read a paragraph or more, e.g. with --file"
    )
    for named in ([], ["--units", "1"]):
        code, out, err = cli("inspect", "the time", "--run", str(tiny_run), *named)
        assert code == 0 and "note:" not in out, err
        assert [line for line in err.splitlines() if line.startswith("note:")] == [f"note: {noise}"]
    assert "note:" not in cli("inspect", "the time traveller " * 3, "--run", str(tiny_run))[2]
    from drnn_cli.checkpoint import load_checkpoint
    from drnn_cli.inspect_html import render_html
    from drnn_cli.inspect_plot import inspection_figure

    checkpoint = load_checkpoint(tiny_run / "best.safetensors")
    model = build_model(len(checkpoint.vocab), checkpoint.config.model)
    model.load_state_dict(checkpoint.model_state)
    result = inspect_text(
        model, checkpoint.vocab, checkpoint.config.data, InspectRequest("the time"), torch.device("cpu")
    )
    assert f'<p class="meta">note: {noise}</p>' in render_html(result, "t")
    figure = inspection_figure(result)
    assert any(
        "correlations over 8 characters say little: read a paragraph or more" in axes.get_title()
        for axes in figure.axes
    )


@pytest.mark.parametrize(
    "text, dropped, glued",
    [
        ("the time traveller  was\tone of those men\n", False, False),  # case and spaces are no change
        ("The Time Traveller was one of those men", False, False),
        ("the time traveller\nwas one of those men", False, True),  # d2l glues: "travellerwas"
        ("the time traveller\n\n   \n", False, False),  # one line with letters: nothing glued
        ("the time traveller, was", True, False),
        ("the café", True, False),  # not an ASCII letter: dropped, in whatever Unicode form
        ("the cafe\u0301", True, False),
        ("the \u212aelvin", True, False),  # the Kelvin sign lower-cases to an ASCII k, yet d2l drops it
        ("the traveller \u00a0 was\u3000here", False, False),  # white space in other scripts evens out too
        ("the time traveller " * 1200 + "\nhe said, quietly.\n", False, False),  # changed past what is shown
    ],
)
def test_a_files_reading_says_what_d2l_changed_in_what_drnn_inspect_shows(
    tmp_path: Path, text: str, dropped: bool, glued: bool
):
    from drnn_cli.config import DataConfig
    from drnn_cli.corpus import letters_reading
    from drnn_cli.introspect import MAX_CHARS, InspectRequest, read_chars

    path = tmp_path / "text.txt"
    path.write_text(text, encoding="utf-8")
    read = read_chars(InspectRequest(file=path), DataConfig(preprocess="d2l"))
    assert (read.changed, read.glued) == (dropped or glued, glued)
    if len(text) > MAX_CHARS:  # the whole file has changes: those past the shown part are not the page's
        assert read.full_length > MAX_CHARS and letters_reading(text, "d2l").changed
    letters = read_chars(InspectRequest(file=path), DataConfig(preprocess="letters"))
    assert (letters.changed, letters.glued) == (dropped, False)  # letters joins lines with a space
    assert not read_chars(InspectRequest(file=path), DataConfig(preprocess="none")).changed


def test_a_files_reading_is_linear_in_a_run_of_combining_marks(tmp_path: Path, monkeypatch):
    """The first comparison normalised the whole --file (NFC), whose canonical reordering of a run of
    combining marks is quadratic: 160 KB took 13 s, a 16 MiB file would take days (review rev37). A
    file's reading normalises nothing (every non-ASCII character is a change under d2l)."""
    import drnn_cli.corpus
    from drnn_cli.config import DataConfig
    from drnn_cli.introspect import InspectRequest, read_chars

    def refused(form: str, text: str) -> str:
        raise AssertionError(f"a --file normalised ({len(text):,} characters)")

    monkeypatch.setattr(drnn_cli.corpus, "normalize", refused)
    marks = 40_000  # 160 KB: 13 s, normalised
    path = tmp_path / "marks.txt"
    path.write_text("a" + "\u0301" * marks + "\u0316" * marks + " time machine\n", encoding="utf-8")
    read = read_chars(InspectRequest(file=path), DataConfig(preprocess="d2l"))
    assert (read.chars[:3], read.changed) == (list("a t"), True)


def test_a_text_preprocessing_changed_is_said_to_be_and_the_page_is_pointed_to(
    cli, tiny_run: Path, tmp_path: Path, corpus_path: Path, monkeypatch
):
    """drnn inspect "The Café, 1895!" measured 'the caf' without a word, where predict notes a prefix it
    changed; and the terminal's table never said where the per-character view is (learner trial)."""
    from drnn_cli.introspect import InspectRequest

    code, out, err = cli("inspect", "The Café, 1895!", "--run", str(tiny_run), "--units", "1")
    assert code == 0, err
    assert out.splitlines()[-1] == (
        "each character's activations, gates, surprisal and next-character guesses: --html FILE"
    )
    assert err.splitlines()[0] == "note: data.preprocess d2l reads the text 'The Café, 1895!' as 'the caf'"
    code, out, err = cli("inspect", "The Time", "--run", str(tiny_run), "--units", "1", "--json")
    assert code == 0 and "--html FILE" not in out + err and "reads the text" not in out + err  # case only

    # a file's text, as the run's d2l preprocessing reads it: its page showed "himwas" and no commas, and
    # nothing said why (learner34)
    # "reads FILE as the model trained on its text" read as "the model trained on FILE" (learner41)
    def file_note(name: object, glued: bool) -> str:
        return (
            f"note: {name} is preprocessed as the run's training text was (data.preprocess d2l): only the "
            f"letters a-z, lower-cased, and spaces{', its lines glued without a space' if glued else ''}; "
            "what it shows is that text\n"
        )

    excerpt = tmp_path / "excerpt.txt"
    excerpt.write_text("The Time Traveller (for so it will be convenient to speak of him)\nwas expounding.\n")
    code, out, err = cli("inspect", "--file", str(excerpt), "--run", str(tiny_run), "--units", "1")
    assert (code, err) == (0, file_note(excerpt, glued=True)), err
    # a file the preprocessing leaves as it is (letters and spaces on one line; case and runs of spaces
    # aside) is read as written: nothing to say; standard input is read by the same rule
    plain = tmp_path / "plain.txt"
    plain.write_text(
        "The  Time Traveller was expounding a recondite matter to us\n"
    )  # 50 or more: no noise note
    code, out, err = cli("inspect", "--file", str(plain), "--run", str(tiny_run), "--units", "1")
    assert (code, err) == (0, ""), err
    monkeypatch.setattr(
        sys,
        "stdin",
        io.TextIOWrapper(io.BytesIO(b"of him\nwas expounding a recondite matter to us and his pale")),
    )
    code, out, err = cli("inspect", "--file", "-", "--run", str(tiny_run), "--units", "1")
    assert (code, err) == (0, file_note("standard input", glued=True)), err
    # a file of one line: what d2l drops is said, not lines glued that it does not have
    one_line = tmp_path / "one-line.txt"
    one_line.write_text("The Time Traveller (for so it will be convenient to speak of him) was expounding.")
    code, out, err = cli("inspect", "--file", str(one_line), "--run", str(tiny_run), "--units", "1")
    assert (code, err) == (0, file_note(one_line, glued=False)), err
    # an RNN has no gates for the page to show (learner34)
    tree = {
        **TINY_TREE,
        "model": {**TINY_TREE["model"], "cell": "rnn"},
        "train": {**TINY_TREE["train"], "epochs": 1},
    }
    config = tmp_path / "rnn.yaml"
    config.write_text(yaml.safe_dump({**tree, "data": {**tree["data"], "path": str(corpus_path)}}))
    train_run(TrainRequest(config, run_dir=tmp_path / "rnn", runs_root=tmp_path / "runs"))
    code, out, err = cli("inspect", "the time", "--run", str(tmp_path / "rnn"), "--units", "1")
    assert code == 0 and out.splitlines()[-1] == (
        "each character's activations, surprisal and next-character guesses: --html FILE"
    ), out
    with pytest.raises(DrnnError, match=r"this asks for 80 \(--top 200: all 80 units of the layer\);"):
        InspectRequest(text="abc", top=200).units_shown(80)


def test_paths_in_inspect_and_eval_lines_reach_the_terminal_escaped(cli, tiny_run: Path, tmp_path: Path):
    """Errors escaped a path's escape sequences; "wrote PATH" and "(checkpoint PATH" printed them raw,
    so a name holding ESC [ 2 J cleared the screen."""
    page = tmp_path / "o\x1b[2J.html"
    code, out, err = cli("inspect", "the time", "--run", str(tiny_run), "--html", str(page))
    assert code == 0 and page.exists(), err
    assert "\x1b" not in out and f"wrote {tmp_path}/o\\x1b[2J.html" in out
    text = tmp_path / "t\x1b]0;x\x07.txt"
    text.write_text("ab")
    code, out, err = cli("eval", "--run", str(tiny_run), "--data", str(text))
    assert code == 0 and "\x1b" not in out and "\x07" not in out, err
    assert "over 1 predicted token (checkpoint" in out  # one prediction: "token", not "tokens"


def test_cell_signal_needs_an_lstm():
    model = small_model("gru", "tanh", "torch")
    with pytest.raises(
        DrnnError, match="--signal cell needs an LSTM; this model's cell is gru; use --signal hidden"
    ):
        inspect_text(
            model,
            Vocab(["<unk>", "a"]),
            DataConfig(),
            InspectRequest("aa", signal="cell"),
            torch.device("cpu"),
        )


def test_an_output_on_an_input_or_on_the_other_output_is_refused_and_nothing_is_written(
    cli, tiny_run: Path, tmp_path: Path
):
    """--html or --png on the checkpoint being read (through a symlink or a hard link too) or on the
    --file text would replace it by the page; --html and --png on one file would keep only the last
    written. Each is refused naming both sides, and the inputs stay as they were."""
    import os
    import shutil

    checkpoint = tmp_path / "model.safetensors"
    shutil.copyfile(tiny_run / "best.safetensors", checkpoint)
    text = tmp_path / "excerpt.txt"
    text.write_text("The Time Traveller smiled.\n")
    (tmp_path / "link.html").symlink_to(checkpoint)
    os.link(text, tmp_path / "hard.png")
    before = checkpoint.read_bytes()
    for args, flag, target, what in (
        (["--html", str(checkpoint)], "--html", checkpoint, "the checkpoint this command reads"),
        (["--png", str(tmp_path / "link.html")], "--png", checkpoint, "the checkpoint this command reads"),
        (["--file", str(text), "--html", str(text)], "--html", text, "the text --file reads"),
        (
            ["--file", str(text), "--png", str(tmp_path / "hard.png")],
            "--png",
            tmp_path / "hard.png",
            "the text --file reads",
        ),
        (
            ["--html", str(tmp_path / "x.out"), "--png", str(tmp_path / "x.out")],
            "--png",
            tmp_path / "x.out",
            "the file --html writes",
        ),
    ):
        source = [] if "--file" in args else ["abc"]
        code, _, err = cli("inspect", *source, "--checkpoint", str(checkpoint), *args)
        assert (
            code == 2
            and err.strip() == f"drnn: error: {flag} {target} is {what}; give {flag} a file of its own"
        )
    assert checkpoint.read_bytes() == before and text.read_text() == "The Time Traveller smiled.\n"
    assert not (tmp_path / "x.out").exists()


def test_an_output_that_is_not_a_regular_file_is_refused_and_a_symlink_is_written_through(
    cli, tiny_run: Path, tmp_path: Path
):
    """An atomic write renames over its target: a FIFO or a device there would become a plain file."""
    import os

    fifo, folder = tmp_path / "pipe", tmp_path / "folder"
    os.mkfifo(fifo)
    folder.mkdir()
    for flag, target, needle in (
        ("--png", fifo, "is a FIFO, which drnn would replace by a file"),
        ("--html", folder, f"is a directory; name a file in it, e.g. {folder / 'inspect.html'}"),
        ("--html", tmp_path / "typo" / "x.html", f"the folder {tmp_path / 'typo'} does not exist"),
    ):
        code, _, err = cli("inspect", "abc", "--run", str(tiny_run), flag, str(target))
        assert_one_line_error(code, err, f"{flag} {target}", needle)
    assert not os.path.isfile(fifo) and not (tmp_path / "typo").exists()
    page = tmp_path / "real.html"
    page.write_text("old")
    (tmp_path / "link.html").symlink_to(page)
    code, _, err = cli("inspect", "abc", "--run", str(tiny_run), "--html", str(tmp_path / "link.html"))
    assert code == 0, err
    assert (tmp_path / "link.html").is_symlink() and page.read_text().startswith("<!DOCTYPE html>")


def _one_unit_read_by_a_small_model(vocab: Vocab, text: str, unit: int) -> Inspection:
    """``text`` (kept as it is) read by a one-layer model of 6 units, showing ``unit``."""
    model = build_model(len(vocab), ModelConfig(hidden_size=6, num_layers=1), seed=0).double().eval()
    request = InspectRequest(text=text, units=(unit,))
    return inspect_text(model, vocab, DataConfig(preprocess="none"), request, torch.device("cpu"))


def test_the_page_script_holds_no_markup_and_labels_whitespace_among_the_guesses():
    """The page's data sits in one <script>: its JSON escapes <, >, & and the line separators (a
    vocabulary's '<!--<script>' stopped the script, so no tooltip worked) and reads back the same. A
    line break or tab among the next guesses showed as an empty row: labelled as on the page and axis."""
    from drnn_cli.inspect_html import _script_json, render_html

    hostile = ["<!--<script>", "</script>", "a & b > c", "\u2028\u2029"]
    assert not set("<>&\u2028\u2029") & set(_script_json(hostile))
    assert json.loads(_script_json(hostile)) == hostile
    vocab = Vocab(["<unk>", "a", " ", "\n", "\t"])
    text = "a a\na\tz"  # z is not in the vocabulary: one predicted character scored as <unk>
    result = _one_unit_read_by_a_small_model(vocab, text, 0)
    page = render_html(result, "run")
    declared = dict(re.findall(r"^const (\w+) = (.*);$", page, re.M))
    assert json.loads(declared["CHARS"]) == ["a", "␣", "a", "↵", "a", "⇥", "z"]
    labels = json.loads(declared["GUESSES"])
    assert labels == ["<unk>", "a", "␣", "↵", "⇥"]
    guesses = {labels[index] for row in json.loads(declared["TOP"]) for index in row[::2]}
    assert guesses == set(labels)  # all five tokens, every row
    assert "; 1 of them not in the vocabulary, scored as &lt;unk&gt; (underlined)." in page


def test_no_string_of_the_page_script_spans_a_line():
    """A line break written into the script's source (Python's '\n' where '\\n' was meant) ended a JS
    string mid-line: the page's script did not parse, and no tooltip or #i=N pin worked (review
    rev40b). Each line's single quotes, escapes aside, pair up."""
    from drnn_cli.inspect_html import _SCRIPT

    for line in _SCRIPT.splitlines():
        assert re.sub(r"\\.", "", line).count("'") % 2 == 0, line


# a stand-in for the browser: the page's script, run by node, pinned at #i=2, prints its tooltip
_FAKE_DOM = """
const rows = [], theTip = {style: {}, textContent: '', offsetWidth: 10, offsetHeight: 10};
function Row(n, unit) { this.dataset = unit === undefined ? {} : {unit: String(unit)}; this.children = [];
  for (let i = 0; i < n; i++) this.children.push({parentElement: this, classList: {add() {}, contains: (name) => name === 'unk' && i === 4},
    getBoundingClientRect() { return {left: 0, top: 0, bottom: 10}; }}); }
globalThis.window = {innerWidth: 1000, innerHeight: 1000};
globalThis.location = {hash: '#i=2'};
globalThis.document = {getElementById: () => theTip, addEventListener() {}, querySelectorAll: () => rows};
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node to run the page's script")
def test_the_tooltip_says_the_character_what_was_expected_there_and_the_next_guesses(tmp_path: Path):
    """Pinned on a character, the tooltip gives its surprisal, the model's three likeliest guesses for it
    (read before it: inspect40 had to hover the character before a surprising one to see them), the
    unit's value, and its five likeliest guesses for the next character, each on its line."""
    from drnn_cli.inspect_html import render_html

    vocab = Vocab(["<unk>", "a", "b", " "])
    result = _one_unit_read_by_a_small_model(vocab, "ab az", 0)  # z: not in the vocabulary, underlined
    page = render_html(result, "run")
    assert page.count('<span class="unk"') == 2  # the last character, in both rows: the stand-in's 'unk'
    script = page.split("<script>\n", 1)[1].split("</script>", 1)[0]
    program = tmp_path / "page.js"
    program.write_text(
        _FAKE_DOM + "rows.push(new Row(5), new Row(5, 0));\n" + script + "\nconsole.log(tip.textContent);\n"
    )
    shown = subprocess.run(["node", str(program)], capture_output=True, text=True, check=True).stdout
    lines = shown.splitlines()
    expected = result.top_next[1][:3]  # read after character 1, "b": the guesses for character 2, " "
    bits = result.surprisal[2] / math.log(2)
    assert lines[0] == "char 2: ␣"
    assert lines[1] == f"surprisal: {bits:.2f} bits (p = {math.exp(-result.surprisal[2]):.3f})"
    assert lines[2] == "expected here: " + " ".join(f"{'␣' if c == ' ' else c} {p:.3f}" for c, p in expected)
    assert lines[3] == "guesses for the next character:"
    assert len(lines) == 4 + len(result.top_next[2])
    # pinned on a character not in the vocabulary (the page underlines it), its p is <unk>'s, and says so
    program.write_text(program.read_text().replace("#i=2", "#i=4"))
    shown = subprocess.run(["node", str(program)], capture_output=True, text=True, check=True).stdout
    bits = result.surprisal[4] / math.log(2)
    assert shown.splitlines()[1] == (
        f"surprisal: {bits:.2f} bits (p = {math.exp(-result.surprisal[4]):.3f} of <unk>: not in the vocabulary)"
    )


def test_the_page_holds_each_characters_tooltip_data_once_and_each_row_only_colours():
    """A row of the text is a span per character holding its colour and nothing else (its place is its
    index); the tooltip's data is in the script once: the labels, the surprisal to 5 decimals, the
    guesses as indices into the vocabulary with their probabilities and each unit's values in
    thousandths, what the tooltip shows to 3 decimals. Every row repeated each character's index and
    class, and the script its guesses' labels and full-precision surprisal: 7.5 MB for 19,000
    characters and 3 units (a user's trial)."""
    import dataclasses

    from drnn_cli.inspect_html import render_html

    vocab = Vocab(["<unk>", "a", "b", " "])
    text = "ab z"  # z is not in the vocabulary
    result = _one_unit_read_by_a_small_model(vocab, text, 5)
    result = dataclasses.replace(
        result,
        units=[UnitScore(5, "at a space", 0.5)],
        activations=torch.tensor([[0.25, -1.0, 0.0, 0.5]]),
        surprisal=[None, math.log(2), math.log(10), 0.1],
    )
    page = render_html(result, "run")
    rows = re.findall(r'<div class="text".*?</div>', page)
    assert rows == [
        '<div class="text"><span style="background:#e0e0e0">a</span><span style="background:#fbe3d7">b</span>'
        '<span style="background:#f1a179"> </span><span class="unk" style="background:#fefbf9">z</span></div>',
        '<div class="text" data-unit="5"><span style="background:#f5c9c9">a</span>'
        '<span style="background:#1f77b4">b</span><span style="background:#ffffff"> </span>'
        '<span class="unk" style="background:#ea9394">z</span></div>',
    ]
    declared = dict(re.findall(r"^const (\w+) = (.*);$", page, re.M))
    assert declared["CHARS"] == '["a","b","␣","z"]'
    assert declared["SURPRISAL"] == "[null,0.69315,2.30259,0.1]"
    assert json.loads(declared["GUESSES"]) == ["<unk>", "a", "b", "␣"]
    assert json.loads(declared["TOP"]) == [
        [index for char, p in result.top_next[t] for index in (vocab[char], round(p * 1000))]
        for t in range(4)
    ]
    assert len(json.loads(declared["TOP"])[0]) == 8  # four guesses: the whole vocabulary
    assert re.findall(r"^ACTS\[.*$", page, re.M) == ["ACTS[5] = [250,-1000,0,500];"]


def test_each_unit_adds_at_most_47_bytes_a_character_to_the_page():
    """What the page holds per character is bounded: a unit adds its row, 41 bytes a character
    (``<span style="background:#rrggbb">c</span>``), and its values (6 bytes at most each); the rest,
    the surprisal row and the tooltip's data, at most 99 bytes a character. Each unit's row held every
    character's index and class, 74 bytes a character with its values, and the tooltip's data 130."""
    from drnn_cli.inspect_html import render_html

    text = "the time traveller for so it will be convenient to speak of him " * 16
    vocab = Vocab(["<unk>", *sorted(set(text))])
    model = build_model(len(vocab), ModelConfig(hidden_size=8, num_layers=1), seed=0).eval()
    sizes = []
    for units in ((0,), (0, 1, 2)):
        request = InspectRequest(text=text, units=units)
        result = inspect_text(model, vocab, DataConfig(preprocess="none"), request, torch.device("cpu"))
        sizes.append(len(render_html(result, "run").encode()))
    assert len(text) == 1024
    assert (sizes[1] - sizes[0]) / 2 <= 47 * len(text)
    assert sizes[0] <= 8_000 + (99 + 47) * len(text)  # 8,000: the style, script and headings
