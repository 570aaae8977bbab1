"""What a trained model does on a text: per-character states, gates, surprisal and next-character guesses.

The recurrent layers are stepped one character at a time with the cell equations of
:mod:`drnn_cli.models` and the model's own weights (``nn.LSTM`` & co. and the scratch stack share
parameter names and layouts), so every intermediate layer's hidden state, an LSTM's cell state and
the gates are visible. Surprisal comes from the model's own forward pass, exactly as ``drnn eval``
scores a text read as one row: the first character has no prediction, each later one costs
``-log p(char | all characters before it)`` nats, the state starting at zero.

Units are ranked after Karpathy, Johnson & Fei-Fei, "Visualizing and Understanding Recurrent
Networks" (2015): a unit is interesting when its activation follows a property of the text.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from drnn_cli.cells import gru_d2l_step, gru_step, lstm_step, rnn_step
from drnn_cli.config import DataConfig
from drnn_cli.corpus import (
    LETTERS_ONLY,
    dropping,
    letters_reading,
    preprocess_prefix,
    preprocessing_changed,
    read_text,
    text_of_bytes,
    token_stream,
)
from drnn_cli.errors import DrnnError, UsageError
from drnn_cli.evaluate import Perplexity
from drnn_cli.files import require_regular_file
from drnn_cli.models import RNNLanguageModel, build_model
from drnn_cli.token_tensors import encode_tokens
from drnn_cli.vocab import UNK, Vocab

MAX_CHARS = 20_000  # keeps the page, the JSON and the step-by-step trace bounded
MAX_FILE_BYTES = 16 << 20  # a --file is read up to this and a byte, refused past it (MAX_CHARS of it fit)
# The excerpt a refusal suggests: MAX_CHARS characters after any preprocessing, with room (the 16 MiB it
# suggested took 9.5 s to preprocess for 20,000 characters read: inspect40)
EXCERPT_BYTES = 200_000
STDIN = Path("-")  # --file -: the text from standard input
TOP_NEXT = 5
TRACE_CHUNK = 256  # characters stepped through every layer at a time; the caller keeps what it needs of them
UNIT_BLOCK = 64  # units scored at a time, so that their float64 copy stays small however wide the layer
DEFAULT_TOP = 5  # units --top ranks when neither --top nor --units is given
# Units shown at once: each repeats every character on the page (--top 256 over 20,000 characters made a
# 372 MB page), a row of the picture, and a list of activations in the JSON.
MAX_UNITS = 64
MIN_RANKING_CHARS = 50  # below this, any varying unit correlates strongly with some property
# |r| below this is no unit that "follows" a property: --top gives such a property no turn (a trial listed
# units at r = +0.02 as following position in line beside units at 0.5), and the table marks it weak
WEAK_CORRELATION = 0.2
# A listed unit whose |r| is not above the untrained layer's best for its property, as the table prints
# both (three decimals, so that the mark never contradicts the figures beside it): a learner's table of a
# model that memorised its text listed such units alone, with nothing flagging them (learner41)
NOT_ABOVE_UNTRAINED = "≤ untrained"
NOT_ABOVE_LEGEND = (
    f"{NOT_ABOVE_UNTRAINED}: the unit's |r| is not above its untrained figure (as printed): a unit of the "
    "network as initialised follows the property at least as closely"
)
NONE_ABOVE_UNTRAINED = (
    "no unit listed follows its property more closely than the untrained layer's best unit does: what they "
    "show is what the architecture gives for nothing (a model that memorised its text often shows none)"
)
SATURATED_LOW, SATURATED_HIGH = 0.1, 0.9  # the paper's thresholds for a saturated gate
GATE_NAMES = {"lstm": ("input", "forget", "output"), "gru": ("reset", "update"), "rnn": ()}
SIGNALS = ("hidden", "cell")


# ---------------------------------------------------------------------------------------------
# Step-by-step states


@dataclass(frozen=True)
class LayerTrace:
    """One layer over the text: each ``(T, H)``, row t the value after reading character t."""

    hidden: torch.Tensor
    cell: torch.Tensor | None  # LSTM only
    gates: dict[str, torch.Tensor]  # LSTM: input, forget, output; GRU: reset, update; RNN: none


@torch.no_grad()
def trace_chunks(
    model: RNNLanguageModel, ids: torch.Tensor, chunk: int = TRACE_CHUNK, layers: int | None = None
) -> Iterator[list[LayerTrace]]:
    """Run ``ids`` ``(T,)`` through every recurrent layer (or the first ``layers``) one step at a time,
    from a zero state, ``chunk`` characters at a time with each layer's state carried: one
    :class:`LayerTrace` per layer for each chunk. The caller keeps what it needs, so memory does not grow
    with the text times the layers' states and gates (those of a 3×256 LSTM over 19,000 characters held
    0.8 GB at once).

    Eval mode throughout (no dropout between layers), as in ``drnn eval`` and ``drnn predict``.
    """
    config = model.config
    traced = config.num_layers if layers is None else layers
    states: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * traced  # (h, c); None: zero
    for begin in range(0, len(ids), chunk):
        layer_input = model.encode(ids[begin : begin + chunk].view(1, -1))[:, 0]  # (chunk, I)
        traces = []
        for layer in range(traced):
            trace, states[layer] = _trace_layer(model, layer, layer_input, states[layer])
            traces.append(trace)
            layer_input = trace.hidden
        yield traces


def trace_layers(model: RNNLanguageModel, ids: torch.Tensor) -> list[LayerTrace]:
    """:func:`trace_chunks` over the whole of ``ids`` at once: every layer's states and gates, each ``(T, ·)``."""
    return next(trace_chunks(model, ids, len(ids)))


def _trace_layer(
    model: RNNLanguageModel,
    layer: int,
    layer_input: torch.Tensor,
    state: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[LayerTrace, tuple[torch.Tensor, torch.Tensor]]:
    """One layer over ``layer_input`` ``(T, I)`` from ``state`` ``(h, c)`` (None: zero; ``c`` is an
    LSTM's only): its trace and its last state."""
    config = model.config
    w_ih, w_hh, b_ih, b_hh = (getattr(model.rnn, f"{name}_l{layer}") for name in _PARAMETERS)
    w_hh_t = w_hh.t()
    projected = F.linear(layer_input, w_ih, b_ih)  # (T, G·H), all steps at once as the stack does
    d2l_gru = config.cell == "gru" and config.cell_form == "d2l"
    if config.cell != "gru" or d2l_gru:
        projected = projected + b_hh  # cuDNN's GRU adds b_hh inside the reset product instead
    h, c = state if state is not None else (projected.new_zeros(1, config.hidden_size),) * 2
    hs, cs, gates = [], [], []
    for x_gates in projected.unsqueeze(1):  # (1, G·H) per step
        if config.cell == "lstm":
            h, c, lstm_gates = lstm_step(x_gates, h, c, w_hh_t)
            cs.append(c)
            gates.append(lstm_gates)
        elif d2l_gru:
            h, rz, _, _ = gru_d2l_step(x_gates, h, w_hh_t)
            gates.append(rz)
        elif config.cell == "gru":
            h, rz, _, _ = gru_step(x_gates, h, w_hh_t, b_hh)
            gates.append(rz)
        else:
            h = rnn_step(x_gates, h, w_hh_t, config.nonlinearity)
        hs.append(h)
    trace = LayerTrace(torch.cat(hs), torch.cat(cs) if cs else None, _split_gates(config.cell, gates))
    return trace, (h, c)


_PARAMETERS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


def _split_gates(cell: str, steps: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    if not steps:
        return {}
    stacked = torch.cat(steps)
    size = stacked.shape[1] // (4 if cell == "lstm" else 2)
    # lstm [σ(i) | σ(f) | (tanh g) | σ(o)]; gru [σ(r) | σ(z)]
    blocks = (0, 1, 3) if cell == "lstm" else (0, 1)
    return {
        name: stacked[:, b * size : (b + 1) * size] for name, b in zip(GATE_NAMES[cell], blocks, strict=True)
    }


@torch.no_grad()
def forward_logits(model: RNNLanguageModel, ids: torch.Tensor, num_steps: int) -> torch.Tensor:
    """The model's own logits ``(T, V)`` for ``ids`` read as one row, ``num_steps`` at a time with the
    state carried, as ``drnn eval`` reads a row."""
    state = model.begin_state(1, ids.device)
    pieces = []
    for begin in range(0, len(ids), num_steps):
        logits, state = model(ids[begin : begin + num_steps].view(1, -1), state)
        pieces.append(logits[:, 0])
    return torch.cat(pieces)


# ---------------------------------------------------------------------------------------------
# Text features and unit ranking


def text_features(chars: list[str]) -> dict[str, torch.Tensor]:
    """Properties of the text at each character (after reading it), the candidates a unit may track.

    position in word: letters so far in the current word (0 on a non-letter); at a space: 1 on spaces;
    position in line: characters since the last line break (only for a text with line breaks; d2l
    preprocessing removes them); inside quotes: after an odd number of ``"``, or between ``“`` and
    ``”`` (not ``'``, which also writes apostrophes: the Time Machine's dialogue, quoted with it, gives
    this feature nothing); inside brackets: between an opening and its closing ``(``/``[``/``{``.
    """
    word, line, quotes, depth = 0, 0, False, 0
    rows: dict[str, list[float]] = {name: [] for name in FEATURES}
    for char in chars:
        word = word + 1 if char.isalpha() else 0
        line = 0 if char == "\n" else line + 1
        marks = char in '"“”'
        quotes = (not quotes) if char == '"' else (quotes or char == "“") and char != "”"
        depth = max(0, depth + (char in "([{") - (char in ")]}"))
        rows["position in word"].append(word)
        rows["at a space"].append(float(char == " "))
        rows["position in line"].append(line)
        rows["inside quotes"].append(float(quotes or marks))
        rows["inside brackets"].append(float(depth > 0 or char in ")]}"))
    if "\n" not in chars:
        del rows["position in line"]  # one line: it would only count characters since the start
    return {name: torch.tensor(values, dtype=torch.float64) for name, values in rows.items()}


FEATURES = ("position in word", "at a space", "position in line", "inside quotes", "inside brackets")


@dataclass(frozen=True)
class UnitScore:
    """A unit and the text feature its activation follows best (None when no feature varies)."""

    unit: int
    feature: str | None
    correlation: float  # Pearson r with that feature; 0 when none applies
    # r with every feature that varies over the text: "position in word" and "at a space" go together
    # (a space is position 0), so a unit's best of the two may be its other's by a hair (inspect40)
    correlations: dict[str, float] = field(default_factory=dict)


def score_units(activations: torch.Tensor, features: dict[str, torch.Tensor]) -> list[UnitScore]:
    """For each unit of ``activations`` ``(T, H)``: the feature with the largest |Pearson r|.

    :data:`UNIT_BLOCK` units at a time: a float64 copy of a whole layer of 256 units over 20,000
    characters is 41 MB.
    """
    return [
        score
        for first in range(0, activations.shape[1], UNIT_BLOCK)
        for score in _score_block(activations[:, first : first + UNIT_BLOCK], features, first)
    ]


def _score_block(activations: torch.Tensor, features: dict[str, torch.Tensor], first: int) -> list[UnitScore]:
    """:func:`score_units` for the units ``first`` onwards."""
    # exactly: a constant's centred norm may be 1e-17, not 0
    varies = activations.amax(0) > activations.amin(0)
    centred = activations.to(torch.float64, copy=True)  # the one float64 copy, centred in place
    centred -= centred.mean(0)
    unit_norm = centred.norm(dim=0)
    size = activations.shape[1]
    best = torch.zeros(size, dtype=torch.float64)
    best_name: list[str | None] = [None] * size
    every: dict[str, list[float]] = {}
    for name, feature in features.items():
        f = feature - feature.mean()
        if float(feature.max()) == float(feature.min()):
            continue  # constant over this text: nothing to correlate with
        r = (f @ centred) / (f.norm() * unit_norm).clamp_min(1e-300)
        r = torch.where(varies, r, torch.zeros_like(r))
        every[name] = r.tolist()
        for unit in torch.nonzero(r.abs() > best.abs()).flatten().tolist():
            best[unit] = r[unit]
            best_name[unit] = name
    return [
        UnitScore(first + u, best_name[u], float(best[u]), {name: rs[u] for name, rs in every.items()})
        for u in range(size)
    ]


def best_per_feature(scores: list[UnitScore]) -> dict[str, float]:
    """For each feature that varies, the r of largest magnitude any of the units has with it."""
    best: dict[str, float] = {}
    for score in scores:
        for name, r in score.correlations.items():
            if abs(r) > abs(best.get(name, 0.0)):
                best[name] = r
    return best


def top_units(scores: list[UnitScore], activations: torch.Tensor, k: int) -> list[UnitScore]:
    """The ``k`` units that follow a text feature best, each varying feature represented in turn.

    Units are grouped by their best feature and ranked by |r| within it; the pick takes the best
    remaining unit of each feature in turn (features ordered by their best |r|), so a feature many
    units follow (e.g. "at a space") does not crowd out the others. A unit whose best |r| is under
    :data:`WEAK_CORRELATION` follows nothing here. When no unit follows a feature, the units with the
    largest variance are taken; so are the ones the ``k`` needs beyond those that do.
    """
    follows = [score for score in scores if score.feature and abs(score.correlation) >= WEAK_CORRELATION]
    if not follows:
        variance = _unit_variance(activations)
        return sorted(scores, key=lambda s: -variance[s.unit])[:k]
    groups: dict[str, list[UnitScore]] = {}
    for score in sorted(follows, key=lambda s: -abs(s.correlation)):
        groups.setdefault(score.feature or "", []).append(score)
    queues = list(groups.values())  # insertion order = order of each feature's best |r|
    picked: list[UnitScore] = []
    while len(picked) < k and any(queues):
        for queue in queues:
            if queue and len(picked) < k:
                picked.append(queue.pop(0))
    if len(picked) < k:  # more asked for than units follow a feature: then the others, by variance
        variance = _unit_variance(activations)
        chosen = {score.unit for score in picked}
        rest = sorted((s for s in scores if s.unit not in chosen), key=lambda s: -variance[s.unit])
        picked.extend(rest[: k - len(picked)])
    return picked


def follows_label(score: UnitScore) -> str:
    """What a unit follows, as the table and the PNG say it: its best property, "(weak)" below
    :data:`WEAK_CORRELATION`; "-" where nothing varies with it."""
    if score.feature is None:
        return "-"
    return score.feature + (" (weak)" if abs(score.correlation) < WEAK_CORRELATION else "")


def beats_untrained(correlation: float, untrained: float) -> bool:
    """Whether an r's magnitude is above the untrained figure's, both to the three decimals the table
    prints (:data:`NOT_ABOVE_UNTRAINED` marks a unit where not)."""
    return float(f"{abs(correlation):.3f}") > float(f"{abs(untrained):.3f}")


def _unit_variance(activations: torch.Tensor) -> list[float]:
    """Each unit's variance over the text, in float64 a block of units at a time (as :func:`score_units`)."""
    blocks = activations.split(UNIT_BLOCK, dim=1)
    return torch.cat([block.double().var(0, correction=0) for block in blocks]).tolist()


# ---------------------------------------------------------------------------------------------
# The whole inspection


@dataclass(frozen=True)
class InspectRequest:
    text: str | None = None
    file: Path | None = None
    layer: int | None = None  # 1-based; None: the top layer
    units: tuple[int, ...] = ()  # explicit units; empty: the ``top`` best-scored ones
    top: int | None = None  # None: DEFAULT_TOP, unless units are named
    signal: str = "hidden"  # hidden, or cell (LSTM)

    def __post_init__(self) -> None:
        if (self.text is None) == (self.file is None):
            raise UsageError(
                "give the text to inspect either as an argument or with --file FILE, "
                'e.g. drnn inspect "the time traveller"'
            )
        if self.units and self.top is not None:
            raise UsageError("--units names the units to show and --top picks them; give one of them")
        if self.top is not None and self.top < 1:
            raise UsageError(f"--top must be >= 1 (got {self.top})")
        if self.signal not in SIGNALS:
            raise UsageError(f"--signal must be hidden or cell (got {self.signal!r})")

    def units_shown(self, layer_size: int) -> int:
        """How many units the inspection shows of a layer this wide; refused past :data:`MAX_UNITS`
        (checked before the text is read)."""
        shown = len(self.units) or min(self.top or DEFAULT_TOP, layer_size)
        if shown > MAX_UNITS:
            whole = (
                f" (--top {self.top:,}: all {layer_size:,} units of the layer)"
                if shown < (self.top or 0)
                else ""
            )
            raise UsageError(
                f"drnn inspect shows at most {MAX_UNITS} units at once and this asks for {shown:,}{whole}; "
                "choose fewer with --top or --units (run it again for the others)"
            )
        return shown


def parse_units(text: str | None) -> tuple[int, ...]:
    """``--units 3,17``: each unit once, in the order given. An empty ``--units ""`` is refused, not
    taken for the default ranking; ASCII digits only (``int()`` would read "1_0" as 10 and "٣" as 3)."""
    if text is None:
        return ()
    pieces = [piece.strip() for piece in text.split(",")]
    if not all(re.fullmatch(r"[0-9]{1,9}", piece) for piece in pieces):  # int() refuses 4,300 digits
        raise UsageError(f"--units takes comma-separated unit numbers, e.g. 3,17 (got {text!r})")
    return tuple(dict.fromkeys(int(piece) for piece in pieces))


@dataclass(frozen=True)
class GateSaturation:
    """Per unit, the fraction of characters where the gate is below 0.1 (left) or above 0.9 (right)."""

    left: torch.Tensor
    right: torch.Tensor

    def summary(self) -> dict:
        return {
            "left_mean": float(self.left.mean()),
            "right_mean": float(self.right.mean()),
            "left": _rounded(self.left),
            "right": _rounded(self.right),
        }


@dataclass(frozen=True)
class NextGuesses:
    """After each character t, the model's likeliest next characters: row t of ``indices`` ``(T, k)``
    (into ``names``, the vocabulary) and of ``probs``, likeliest first. Read as a list of
    ``[(char, p), …]`` per character; held as tensors (as Python pairs they took 16 MB for 19,000
    characters, more than the states of a layer of 128 units)."""

    names: list[str]
    indices: torch.Tensor
    probs: torch.Tensor

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, t: int) -> list[tuple[str, float]]:
        pairs = zip(self.indices[t].tolist(), self.probs[t].tolist(), strict=True)
        return [(self.names[i], p) for i, p in pairs]

    def __iter__(self) -> Iterator[list[tuple[str, float]]]:
        return (self[t] for t in range(len(self)))


@dataclass(frozen=True)
class Inspection:
    """Everything ``drnn inspect`` shows: rows are characters, in the order the model read them."""

    chars: list[str]
    unknown: list[bool]  # characters not in the vocabulary, read and scored as <unk>
    layer: int  # 1-based
    num_layers: int
    cell: str
    signal: str
    units: list[UnitScore]
    activations: torch.Tensor  # (K, T): the chosen units' signal
    surprisal: list[float | None]  # nats; None for the first character (no prediction)
    top_next: NextGuesses  # after character t: the 5 likeliest next characters
    saturation: list[dict[str, GateSaturation]]  # per layer, per gate
    source: str
    ranked: bool = True  # the units were picked by their correlations (--top), not named (--units)
    full_length: int = 0  # the characters the --file had, where drnn inspect read only its first MAX_CHARS
    top_asked: int = 0  # --top K, kept where the layer has fewer units than K
    preprocessing_changed: bool = False  # more than lower-cased with its spaces evened out
    lines_glued: bool = False  # a --file's lines glued by d2l's preprocessing ("himwas")
    # per feature, the r of largest |r| of the same layer's units in this network as initialised, before
    # any training, on the same text: what the architecture gives unlearned (inspect40: a cell state
    # sums its input, and counts letters since a space at |r| 0.6-0.7 before its first step)
    untrained: dict[str, float] = field(default_factory=dict)

    @property
    def notes(self) -> list[str]:
        """What the numbers cannot tell, in words."""
        notes = []
        if self.full_length > len(self.chars):
            notes.append(
                f"drnn inspect reads at most {MAX_CHARS:,} characters: these are the first of "
                f"{'standard input' if self.source == 'stdin' else 'the file'}'s "
                f"{self.full_length:,} (after preprocessing); to read another passage, cut it into a file of "
                "its own, e.g. sed -n '700,760p' FILE > passage.txt"
            )
        if self.top_asked > len(self.units):
            notes.append(
                f"--top {self.top_asked}: layer {self.layer} has {len(self.units)} units, all shown here, ranked"
            )
        by_variance = [
            score.unit
            for score in self.units
            if score.feature is None or abs(score.correlation) < WEAK_CORRELATION
        ]
        if self.ranked and by_variance:
            one = len(by_variance) == 1
            notes.append(
                f"unit{'' if one else 's'} {', '.join(map(str, by_variance))} follow{'s' if one else ''} no "
                f"property at |r| ≥ {WEAK_CORRELATION}: {'it is' if one else 'they are'} shown for the largest "
                "variance of the rest"
            )
        if self.tokens < MIN_RANKING_CHARS:  # named units' correlations too (inspect40)
            notes.append(
                f"correlations over {len(self.chars)} characters say little (over a few, any unit that varies "
                "follows some property closely): read a paragraph or more, e.g. with --file"
            )
        return notes

    def above_untrained(self, score: UnitScore) -> bool | None:
        """Whether the unit follows its property more closely than the same layer's best unit before any
        training: its |r| above :attr:`untrained`'s for that property, both to the three decimals the
        table prints; None where it follows no property (nothing to compare)."""
        before = self.untrained.get(score.feature or "")
        return None if before is None else beats_untrained(score.correlation, before)

    @property
    def untrained_verdict(self) -> str | None:
        """The line after the table: :data:`NONE_ABOVE_UNTRAINED` where no listed unit is above its
        untrained figure, :data:`NOT_ABOVE_LEGEND` where some are not; None where all are (or none compares)."""
        verdicts = [self.above_untrained(score) for score in self.units]
        if all(verdict is None for verdict in verdicts):
            return None
        if not any(verdicts):
            return NONE_ABOVE_UNTRAINED
        return NOT_ABOVE_LEGEND if False in verdicts else None

    @property
    def text(self) -> str:
        return "".join(self.chars)

    @property
    def scored_unknown(self) -> int:
        """Predicted characters (all but the first) not in the vocabulary: scored as <unk>."""
        return sum(self.unknown[1:])

    @property
    def nll(self) -> float:
        return math.fsum(s for s in self.surprisal if s is not None)

    @property
    def tokens(self) -> int:
        return len(self.surprisal) - 1

    @property
    def perplexity(self) -> float:
        return Perplexity(self.nll, self.tokens).perplexity

    @property
    def bits_per_char(self) -> float:
        return Perplexity(self.nll, self.tokens).bits_per_token

    def summary(self) -> dict:
        """The ``drnn inspect --json`` object (README "Seeing what the network learned": docs/inspect.md)."""
        return {
            "text": self.text,
            "source": self.source,
            "cell": self.cell,
            "layer": self.layer,
            "num_layers": self.num_layers,
            "signal": self.signal,
            "units": [
                {
                    "unit": score.unit,
                    "feature": score.feature,
                    "correlation": round(score.correlation, 4),
                    "correlations": {name: round(r, 4) for name, r in score.correlations.items()},
                    "above_untrained": self.above_untrained(score),
                    "activations": _rounded(row),
                }
                for score, row in zip(self.units, self.activations, strict=True)
            ],
            "untrained": {name: round(r, 4) for name, r in self.untrained.items()},
            "surprisal": self.surprisal,
            "nll": self.nll,
            "tokens": self.tokens,
            "perplexity": self.perplexity,
            "bits_per_token": self.bits_per_char,
            "unknown": self.scored_unknown,
            "top_next": [[[char, round(p, 5)] for char, p in guesses] for guesses in self.top_next],
            "gate_saturation": [
                {"layer": index + 1, "gates": {name: sat.summary() for name, sat in gates.items()}}
                for index, gates in enumerate(self.saturation)
            ],
        }


def _rounded(values: torch.Tensor, digits: int = 5) -> list[float]:
    return [round(v, digits) for v in values.tolist()]


class ReadChars(NamedTuple):
    chars: list[str]  # at most MAX_CHARS of them
    source: str  # "argument", "stdin" or the file's name
    full_length: int  # the characters the text had after preprocessing
    changed: bool  # preprocessing did more than lower-case it and even out its spaces (in what is shown)
    glued: bool  # d2l glued lines of it together ("him" + "was" -> "himwas")


def read_chars(request: InspectRequest, data: DataConfig) -> ReadChars:
    """The text as the model's characters: a TEXT argument like a ``drnn predict`` prefix (one line),
    a file (or standard input, ``--file -``) like ``drnn eval --data`` reads it (the corpus
    preprocessing); how many characters the text had, and whether preprocessing changed it. A file
    longer than :data:`MAX_CHARS` gives its first ones (an excerpt cut by hand with ``head -c`` may
    split a UTF-8 character); an argument that long is refused."""
    if request.file == STDIN:
        text = text_of_bytes(_read_stdin(MAX_FILE_BYTES), STDIN, "--file")
        chars = list(token_stream(text, data))
        source = "stdin"
    elif request.file is not None:
        # /dev/stdin and <(…) are FIFOs: refused as the corpus reader refuses them, pointing at --file -
        fix = "give --file a UTF-8 text file, or --file - to read standard input"
        if not require_regular_file(request.file, "--file", fix):
            raise DrnnError(f"--file {request.file} is empty; give it the text to inspect")
        # a longer file would be read whole, then refused past MAX_CHARS: not worth reading beyond this
        text = read_text(request.file, "--file", MAX_FILE_BYTES, EXCERPT_BYTES)
        chars = list(token_stream(text, data))
        source = str(request.file)
    else:
        text = request.text or ""
        chars = list(preprocess_prefix(text, data.preprocess))
        source = "argument"
    # a TEXT argument that cannot be inspected is the command line's problem (exit 2), however it came
    # to be; a file's is its contents' (exit 1)
    refused = DrnnError if request.file is not None else UsageError
    if len(chars) < 2:
        given = len(request.text or "") if request.file is None else None
        if given is not None and given < 2:  # nothing preprocessing did: the argument itself is short
            raise UsageError(f"the text has {given} character{'' if given == 1 else 's'}; give at least 2")
        raise refused(
            f"the text has {len(chars)} character{'' if len(chars) == 1 else 's'} after "
            f"data.preprocess={data.preprocess}{dropping(data.preprocess)}; give at least 2"
        )
    if len(chars) > MAX_CHARS and request.file is None:
        raise UsageError(
            f"the text has {len(chars):,} characters after preprocessing, more than drnn inspect's "
            f"{MAX_CHARS:,}; inspect a shorter excerpt, or pass it with --file, which reads its first {MAX_CHARS:,}"
        )
    shown = chars[:MAX_CHARS]
    if request.file is None:
        return ReadChars(shown, source, len(chars), preprocessing_changed(text, "".join(chars)), glued=False)
    if data.preprocess not in LETTERS_ONLY:  # none and lower drop nothing of a file: no note to give
        return ReadChars(shown, source, len(chars), changed=False, glued=False)
    # the part of the file whose letters are shown: a change past what drnn inspect reads is none of its page's
    shown_letters = None if len(chars) <= MAX_CHARS else sum(c != " " for c in shown)
    reading = letters_reading(text, data.preprocess, shown_letters)
    return ReadChars(shown, source, len(chars), reading.changed, reading.glued)


def _read_stdin(max_bytes: int) -> bytes:
    """Standard input, read whole up to ``max_bytes`` and a byte (refused past it, as a file is).

    The bytes then take the file reader's own steps (:func:`~drnn_cli.corpus.text_of_bytes`: UTF-8
    and its errors, byte order mark, line breaks, then the preprocessing) rather than going through a
    temporary file, whose name would stand in every error in place of ``--file -``, and which would
    put up to 16 MiB on disk to be cleaned up after an interrupt.
    """
    stream = sys.stdin
    if stream is None or stream.isatty():  # a closed stdin, or one a user would type into unprompted
        raise UsageError(
            "--file - reads the text from standard input, which is "
            f"{'closed' if stream is None else 'a terminal'}; pipe it in, e.g. cat notes.txt | drnn inspect --file -"
        )
    try:
        raw = stream.buffer.read(max_bytes + 1)
    except OSError as exc:
        raise DrnnError(f"cannot read --file - (standard input): {exc.strerror or exc}") from None
    if len(raw) > max_bytes:
        raise DrnnError(
            f"--file - (standard input) holds more than {max_bytes:,} bytes, the most drnn inspect reads; "
            f"pipe in an excerpt, e.g. … | head -c {EXCERPT_BYTES} | iconv -c -f utf-8 -t utf-8 | drnn inspect "
            "--file - (iconv drops a character head cut in half)"
        )
    return raw


def _choose_units(request: InspectRequest, scores: list[UnitScore], signal: torch.Tensor) -> list[UnitScore]:
    size = signal.shape[1]
    if request.units:
        wrong = [u for u in request.units if not 0 <= u < size]
        if wrong:
            raise UsageError(f"--units {wrong[0]} is out of range: the layer has units 0 to {size - 1}")
        request.units_shown(size)
        return [scores[u] for u in request.units]
    return top_units(scores, signal, request.units_shown(size))


def _signal_and_saturation(
    model: RNNLanguageModel, ids: torch.Tensor, layer: int, signal: str, gates: bool = True
) -> tuple[torch.Tensor, list[dict[str, GateSaturation]]]:
    """The chosen layer's ``signal`` ``(T, H)`` and every layer's gate saturation, taken chunk by chunk
    from :func:`trace_chunks`: of the gates, only each unit's count of saturated steps is kept. Without
    ``gates``, the layers above the chosen one are not stepped and no saturation is counted (none)."""
    kept = torch.empty(len(ids), model.config.hidden_size, dtype=next(model.rnn.parameters()).dtype)
    filled = 0
    counted = model.config.num_layers if gates else 0
    counts: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in range(counted)]
    for traces in trace_chunks(model, ids, layers=None if gates else layer):
        chosen = traces[layer - 1]
        rows = chosen.cell if signal == "cell" else chosen.hidden
        assert rows is not None  # --signal cell is refused but for an LSTM
        kept[filled : filled + len(rows)] = rows
        filled += len(rows)
        for layer_counts, trace in zip(counts, traces if gates else [], strict=True):
            for name, gate in trace.gates.items():
                below, above = layer_counts.get(name, (0, 0))
                layer_counts[name] = (
                    below + (gate < SATURATED_LOW).sum(0),
                    above + (gate > SATURATED_HIGH).sum(0),
                )
    steps = len(ids)
    saturation = [
        {
            name: GateSaturation(below.cpu().double() / steps, above.cpu().double() / steps)
            for name, (below, above) in layer_counts.items()
        }
        for layer_counts in counts
    ]
    return kept, saturation


def untrained_correlations(
    model: RNNLanguageModel,
    ids: torch.Tensor,
    layer: int,
    signal: str,
    features: dict[str, torch.Tensor],
    seed: int,
) -> dict[str, float]:
    """:attr:`Inspection.untrained`: ``model``'s shape initialised as a run seeded ``seed`` initialises it
    (for a run trained from scratch, the very weights it started from), read over the same characters;
    the process's random state is left as it was (the seed reaches every CUDA device's too: review rev40b)."""
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        fresh = build_model(model.vocab_size, model.config, seed)
    fresh.to(ids.device).eval()
    unlearned, _ = _signal_and_saturation(fresh, ids, layer, signal, gates=False)
    return best_per_feature(score_units(unlearned, features))


def inspect_text(
    model: RNNLanguageModel,
    vocab: Vocab,
    data: DataConfig,
    request: InspectRequest,
    device: torch.device,
    seed: int = 0,
) -> Inspection:
    """Read the text with the model and collect what ``drnn inspect`` shows; ``seed``: the run's
    ``train.seed``, which initialised the network it started from (:func:`untrained_correlations`)."""
    config = model.config
    layer = request.layer if request.layer is not None else config.num_layers
    if not 1 <= layer <= config.num_layers:
        raise UsageError(f"--layer {layer} does not exist: the model has layers 1 to {config.num_layers}")
    if request.signal == "cell" and config.cell != "lstm":
        raise UsageError(
            f"--signal cell needs an LSTM; this model's cell is {config.cell}; use --signal hidden"
        )
    chars, source, full_length, changed, glued = read_chars(request, data)
    ids = encode_tokens("".join(chars), vocab).long().to(device)
    unknown = [vocab[c] == vocab[UNK] for c in chars]

    was_training = model.training
    model.eval()
    try:
        signal, saturation = _signal_and_saturation(model, ids, layer, request.signal)
        logits = forward_logits(model, ids, data.num_steps).double()
    finally:
        model.train(was_training)

    log_probs = torch.log_softmax(logits, dim=-1)
    # character t is predicted from the logits after character t-1
    nll = -log_probs[:-1].gather(1, ids[1:, None]).squeeze(1)
    surprisal: list[float | None] = [None, *nll.cpu().tolist()]
    probs, indices = log_probs.exp().topk(min(TOP_NEXT, log_probs.shape[1]), dim=-1)
    top_next = NextGuesses(vocab.idx_to_token, indices.cpu(), probs.cpu())

    features = text_features(chars)
    scores = score_units(signal, features)
    units = _choose_units(request, scores, signal)
    untrained = untrained_correlations(model, ids, layer, request.signal, features, seed)
    activations = signal[:, [s.unit for s in units]].t().contiguous()
    return Inspection(
        chars,
        unknown,
        layer,
        config.num_layers,
        config.cell,
        request.signal,
        units,
        activations,
        surprisal,
        top_next,
        saturation,
        source,
        ranked=not request.units,
        full_length=full_length,
        top_asked=request.top or 0,
        preprocessing_changed=changed,
        lines_glued=glued,
        untrained=untrained,
    )
