"""The typed configuration: schema, YAML loading, ``--set`` overrides and validation.

Everything downstream receives a validated :class:`Config`, never a dict. Errors name the dotted key
and what is allowed, so ``--set model.num_layers=0`` and a typo in a YAML file get the same answer.
"""

from __future__ import annotations

import copy
import difflib
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from drnn_cli.budget import parse_cadence, parse_duration
from drnn_cli.errors import ConfigError, DrnnError
from drnn_cli.files import read_utf8_text, require_regular_file
from drnn_cli.shown_text import short_repr

# Upper bounds: far above any sensible run, low enough that nothing downstream overflows (a seed feeds
# torch.manual_seed after `seed * 1_000_003 + epoch` and, under torchrun, `* 1_009 + rank`).
MAX_SEED = 2**32 - 1
MAX_WIDTH = 16_384  # hidden_size / embedding_dim: an LSTM of 16384 units is 2 GiB per layer
MAX_COUNT = 10**9  # epochs, steps, batch sizes and other counts


class _Section(BaseModel):
    # allow_inf_nan: "train.lr: .inf" is refused by the schema, not discovered as a NaN loss.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """YAML's true/false are not numbers: ``epochs: true`` must not mean 1."""
        field = cls.model_fields.get(info.field_name or "")
        if isinstance(value, bool) and field is not None and field.annotation in (int, float):
            raise ValueError("must be a number, not true/false")
        return value


class DataConfig(_Section):
    """Where the text comes from, how it becomes tokens, and how tokens become minibatches."""

    corpus: str = Field("timemachine", description="registered corpus name (ignored when data.path is set)")
    path: str | None = Field(
        None, description="a local UTF-8 text file to use instead of a registered corpus"
    )
    preprocess: Literal["d2l", "letters", "lower", "none"] = Field(
        "d2l",
        description="d2l: letters only, lower-cased, lines glued; letters: same, lines joined by spaces; "
        "lower: every character, lower-cased; none: the text as it is",
    )
    token: Literal["char", "word"] = Field(
        "char",
        description="character or whitespace-separated word tokens (with data.preprocess lower or none, punctuation "
        "stays on its word, `dog.` and `dog` being two; d2l and letters remove it first)",
    )
    max_tokens: int = Field(
        -1, ge=-1, le=MAX_COUNT * 100, description="keep only the first N tokens (-1 = all; 0 is refused)"
    )
    min_freq: int = Field(0, ge=0, le=MAX_COUNT, description="tokens rarer than this map to <unk>")
    val_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="tail share held out for validation")
    test_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="tail share held out for testing")
    batch_size: int = Field(
        32, ge=1, le=1 << 20, description="sequences per minibatch (global, across processes)"
    )
    num_steps: int = Field(
        35, ge=1, le=1 << 20, description="timesteps per minibatch (truncated BPTT length)"
    )
    sampling: Literal["sequential", "random"] = Field(
        "sequential", description="sequential carries the state across minibatches; random resets it"
    )

    @field_validator("path")
    @classmethod
    def _names_a_file(cls, value: str | None) -> str | None:
        """An empty path (``--set data.path=$TEXT`` with TEXT unset) would train on data.corpus."""
        if value is not None and not value.strip():
            raise ValueError("is empty: name a text file, or leave data.path out to use data.corpus")
        return value

    @field_validator("max_tokens")
    @classmethod
    def _not_zero(cls, value: int) -> int:
        if value == 0:
            raise ValueError("must be -1 (all tokens) or a positive count")
        return value

    @model_validator(mode="after")
    def _fractions_leave_training_data(self) -> DataConfig:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                f"data.val_fraction + data.test_fraction must be below 1 "
                f"(got {self.val_fraction} + {self.test_fraction}); lower one of them"
            )
        return self

    @property
    def file(self) -> Path | None:
        """``data.path`` as a path on this machine (``~`` expanded); None for a registered corpus."""
        return Path(self.path).expanduser() if self.path else None


class ModelConfig(_Section):
    """The language model: input encoding, stacked recurrent layers, output layer."""

    cell: Literal["rnn", "gru", "lstm"] = Field("lstm", description="recurrent cell")
    hidden_size: int = Field(256, ge=1, le=MAX_WIDTH, description="hidden units per layer")
    num_layers: int = Field(2, ge=1, le=64, description="stacked recurrent layers")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout between recurrent layers")
    input_dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="dropout on the recurrent stack's input (one-hot or embedding)"
    )
    output_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the last layer's output")
    dropout_kind: Literal["standard", "locked"] = Field(
        "standard",
        description="standard: a new mask per timestep; locked: one mask per sequence (AWD-LSTM's variational dropout)",
    )
    embedding_dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="drop whole tokens from the embedding, one mask per minibatch"
    )
    weight_drop: float = Field(
        0.0, ge=0.0, lt=1.0, description="DropConnect on the recurrent weights, one mask per minibatch"
    )
    bidirectional: bool = Field(False, description="refused: a bidirectional RNN sees the token it predicts")
    impl: Literal["torch", "scratch", "fused"] = Field(
        "torch",
        description="torch: nn.RNN/GRU/LSTM; scratch: own cells; fused: Triton kernels on CUDA (fastest fp32 LSTM at small batches; GRU and RNN not yet timed)",
    )
    layer_calls: Literal["stack", "each"] = Field(
        "stack",
        description="impl torch in training: all layers in one cuDNN/oneDNN call, or one call each "
        "(fp16 on a GPU: lets cuDNN pick its persistent kernels, slower than the stack on an H200; experimental)",
    )
    embedding_dim: int = Field(
        0, ge=0, le=MAX_WIDTH, description="0 = one-hot input as in d2l; else a learned embedding"
    )
    nonlinearity: Literal["tanh", "relu"] = Field("tanh", description="activation of the plain rnn cell")
    init: Literal["torch", "d2l"] = Field(
        "torch",
        description="torch: PyTorch defaults (recurrent weights uniform(±1/√H)); d2l: normal(0, 0.01), zero biases",
    )
    tie_weights: bool = Field(
        False, description="share embedding and output weights (needs embedding_dim = hidden_size)"
    )
    cell_form: Literal["torch", "d2l"] = Field(
        "torch",
        description="torch: PyTorch's cells (two biases per gate; the GRU's reset gate after its recurrent "
        "product); d2l: d2l's from-scratch cells (one bias per gate: bias_hh held at zero, untrained; the "
        "GRU's reset gate before the product); d2l needs impl scratch",
    )

    @field_validator("bidirectional")
    @classmethod
    def _no_bidirectional(cls, value: bool) -> bool:
        if value:
            raise ValueError(
                "a bidirectional RNN cannot be a language model: its backward half reads the very token "
                "it must predict, so it 'trains' to perplexity ~1 and generates garbage; set it to false"
            )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        if self.tie_weights and self.embedding_dim != self.hidden_size:
            raise ValueError(
                f"model.tie_weights needs model.embedding_dim equal to model.hidden_size "
                f"(got {self.embedding_dim} and {self.hidden_size})"
            )
        if self.embedding_dropout > 0 and not self.embedding_dim:
            raise ValueError("model.embedding_dropout needs a learned embedding: set model.embedding_dim > 0")
        if self.nonlinearity == "relu" and self.cell != "rnn":
            raise ValueError("model.nonlinearity applies only to model.cell: rnn")
        if self.layer_calls == "each" and self.impl != "torch":
            raise ValueError(
                f"model.layer_calls each applies to model.impl torch (impl {self.impl} steps its layers "
                "one by one already); set it to stack"
            )
        if self.cell_form == "d2l" and self.impl != "scratch":
            raise ValueError(
                f"model.cell_form d2l is d2l's from-scratch cells, which model.impl scratch steps; impl "
                f"{self.impl} runs PyTorch's form: set model.impl scratch, or model.cell_form torch"
            )
        if self.impl == "fused" and self.hidden_size % 16:
            raise ValueError(
                f"model.impl fused needs model.hidden_size divisible by 16 (the kernels' tile), "
                f"not {self.hidden_size}"
            )
        return self


class TrainConfig(_Section):
    """The optimisation loop, its schedule, and what it reports and keeps."""

    epochs: int = Field(500, ge=1, le=MAX_COUNT, description="passes over the training split")
    optimizer: Literal["sgd", "adam", "adamw"] = Field("sgd", description="optimizer")
    lr: float = Field(2.0, gt=0.0, le=1e3, description="learning rate")
    momentum: float = Field(0.0, ge=0.0, lt=1.0, description="SGD momentum")
    weight_decay: float = Field(
        0.0, ge=0.0, le=1e3, description="L2 (sgd/adam) or decoupled (adamw) weight decay"
    )
    decay_biases: bool = Field(
        False,
        description="adamw: decay biases and other 1-D parameters too (default: matrices only, as nanoGPT)",
    )
    clip: float = Field(1.0, ge=0.0, le=1e9, description="clip the global gradient norm to this (0 = off)")
    reset_state: bool = Field(
        False,
        description="start every minibatch from a zero state, not the previous one's (sequential sampling; "
        "random always does): d2l's use_random_iter=True on its sequential iterator, §8.5's second run",
    )
    schedule: Literal["constant", "step", "cosine"] = Field("constant", description="learning-rate schedule")
    warmup_epochs: int = Field(0, ge=0, le=MAX_COUNT, description="linear warm-up epochs before the schedule")
    step_size: int = Field(100, ge=1, le=MAX_COUNT, description="step schedule: epochs between decays")
    gamma: float = Field(0.5, gt=0.0, le=1.0, description="step schedule: decay factor")
    min_lr: float = Field(0.0, ge=0.0, le=1e3, description="cosine schedule: final learning rate")
    ar: float = Field(
        0.0,
        ge=0.0,
        le=1e3,
        description="activation regularisation: ar · mean(h²) of the last layer's (dropped) output",
    )
    tar: float = Field(
        0.0,
        ge=0.0,
        le=1e3,
        description="temporal activation regularisation: tar · mean((h_t − h_t−1)²), last layer",
    )
    average: Literal["none", "ema", "swa"] = Field(
        "none",
        description="evaluate, keep and predict with averaged weights: ema (moving average) or swa (mean)",
    )
    average_decay: float = Field(0.999, gt=0.0, lt=1.0, description="ema: the average's decay per step")
    average_start: int | str = Field(
        0, description="N epochs or 'N steps' of plain training before the average starts (0 = at once)"
    )
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seed for initialisation, batching and dropout")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto picks CUDA when present")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="autocast precision (fp16 on a GPU only; bf16 on a CPU where oneDNN runs it)"
    )
    cuda_graph: Literal["auto", "on", "off"] = Field(
        "auto",
        description="replay each training step as one CUDA graph; auto = on for one CUDA device where it can",
    )
    compile: Literal["on", "off"] = Field(
        "off",
        description="train model.impl scratch's cells through torch.compile (experimental)",
    )
    sample_every: int | str = Field(
        10, description="greedy samples every N epochs or 'N steps' (0 = only at the end)"
    )
    sample_prefixes: list[str] = Field(
        default_factory=lambda: ["time traveller", "traveller"], description="prefixes sampled while training"
    )
    sample_chars: int = Field(50, ge=0, le=10_000, description="tokens generated per sample")
    eval_every: int | str = Field(1, description="validation perplexity every N ≥ 1 epochs or 'N steps'")
    patience: int = Field(
        0, ge=0, le=MAX_COUNT, description="stop after N evaluations without improvement (0 = off)"
    )
    checkpoint_every: int | str = Field(
        10, description="write the 'last' checkpoint every N ≥ 1 epochs or 'N steps'"
    )
    keep_every: int | str = Field(
        0,
        description="also keep the checkpoint every N epochs or 'N steps' as its own file in RUN/kept/ "
        "(epoch-0005.safetensors, step-00001200.safetensors), resumable and read by --checkpoint (0 = off)",
    )
    log_every: int | str = Field(
        0,
        description="plain-text progress line every N epochs or 'N steps' (0 = auto: every epochs // 25 "
        "epochs (at least 1), about 25 lines a run; inside long epochs give 'N steps')",
    )
    max_steps: int = Field(
        0, ge=0, le=MAX_COUNT, description="stop after N optimizer steps in all (0 = no limit)"
    )
    max_time: float = Field(
        0.0,
        description="stop after this much wall-clock time from the session's first step, validations and "
        "checkpoint writes included: seconds, or 90s, 10m, 2h, 1h30m (0 = no limit)",
        json_schema_extra={"kind": "duration"},  # a float once parsed; written as text or a number
    )
    eval_tokens: int = Field(
        0,
        ge=0,
        le=10**12,
        description="validate on the first N tokens of the val split while training (0 = all)",
    )
    tensorboard: bool = Field(False, description="write TensorBoard logs to RUN/tensorboard/")

    @field_validator("eval_every", "checkpoint_every", mode="before")
    @classmethod
    def _cadence(cls, value: object) -> int | str:
        return parse_cadence(value, allow_zero=False)

    @field_validator("sample_every", "log_every", "keep_every", mode="before")
    @classmethod
    def _cadence_or_zero(cls, value: object) -> int | str:
        return parse_cadence(value, allow_zero=True)

    @field_validator("average_start", mode="before")
    @classmethod
    def _start(cls, value: object) -> int | str:
        """A point in the run: N epochs or 'N steps', where 0 of either is the start."""
        parsed = parse_cadence(value, allow_zero=True, allow_zero_steps=True)
        return 0 if parsed == "0 steps" else parsed

    @field_validator("max_time", mode="before")
    @classmethod
    def _duration(cls, value: object) -> float:
        return parse_duration(value)

    @field_validator("cuda_graph", "compile", mode="before")
    @classmethod
    def _yaml_on_off(cls, value: Any) -> Any:
        """YAML reads a bare on/off as true/false: take them as the words they were."""
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value

    @field_validator("sample_prefixes", mode="before")
    @classmethod
    def _one_prefix_as_a_list(cls, value: Any) -> Any:
        """``--set train.sample_prefixes=def`` (or ``sample_prefixes: def``): the one prefix it names."""
        return [value] if isinstance(value, str) else value

    @field_validator("sample_prefixes")
    @classmethod
    def _non_empty_prefixes(cls, value: list[str]) -> list[str]:
        if any(not prefix for prefix in value):
            raise ValueError("sample prefixes must be non-empty strings")
        if len(value) > 100 or any(len(prefix) > 1000 for prefix in value):
            raise ValueError("at most 100 sample prefixes of at most 1000 characters each")
        # each once: --json's samples are keyed by prefix (and a greedy sample repeats itself); dropped,
        # not refused, since checkpoints of earlier versions may hold a list with a prefix twice
        return list(dict.fromkeys(value))

    @model_validator(mode="after")
    def _schedule_decays(self) -> TrainConfig:
        if self.schedule == "cosine" and self.min_lr > self.lr:
            raise ValueError(
                f"train.min_lr ({self.min_lr}) must not exceed train.lr ({self.lr}): the cosine schedule "
                f"decays from lr to min_lr"
            )
        return self

    def validated_predictions(self, split_tokens: int) -> int:
        """The predictions a validation of a ``split_tokens``-token split reads: every token after its
        first, or the first ``eval_tokens`` of them."""
        predictions = max(0, split_tokens - 1)
        return min(self.eval_tokens, predictions) if self.eval_tokens else predictions


class Config(_Section):
    """A whole run: data, model, train. This resolved object is what the library receives."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="after")
    def _sections_agree(self) -> Config:
        contradiction = compile_contradiction(self.model, self.train)
        if contradiction is not None:
            raise ValueError(contradiction)
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def settings(self) -> dict[str, Any]:
        """Every key as ``--set`` names it (``train.lr``), with its value, in the schema's order."""
        return {
            f"{section}.{key}": value
            for section, keys in self.to_dict().items()
            for key, value in keys.items()
        }


def compile_contradiction(model: ModelConfig, train: TrainConfig) -> str | None:
    """Why ``train.compile on`` cannot apply to ``model``, with the fix; None where it can (or is off)."""
    if train.compile != "on" or model.impl == "scratch":
        return None
    # impl scratch steps its layers one by one: model.layer_calls each (impl torch only) must go too
    scratch = "model.impl scratch" + (" with model.layer_calls stack" if model.layer_calls == "each" else "")
    return (
        f"train.compile on compiles model.impl scratch's cells, and this model is impl {model.impl}; "
        f"set {scratch}, or train.compile off"
    )


def describe_error(error: ValidationError) -> str:
    """The first validation problem as ``config error: <dotted.key>: <what is allowed>``."""
    first = error.errors()[0]
    location = [str(part) for part in first["loc"]]
    key = ".".join(location)
    if first["type"] == "extra_forbidden":
        section = _section_for(location[:-1])
        names = list(section.model_fields) if section is not None else []
        where = ".".join(location[:-1]) or "the top level"
        close = _closest_key(location)
        guess = f"did you mean '{close}'? " if close else ""
        return f"config error: unknown key '{key}'; {guess}{where} allows: {', '.join(names)}"
    message = first["msg"].removeprefix("Value error, ")
    given = first.get("input")
    if given is None and "input" in first and key:  # ``max_tokens: null`` (or empty) in a file
        return f"config error: {key}: no value (null); give one, or leave {key} out for drnn's default"
    shown = "" if isinstance(given, dict) else f" (got {short_repr(given)})"
    if first["type"] == "string_type" and isinstance(given, bool | int | float):
        message += "; put it in quotes (YAML reads yes, no, on, off and bare numbers as other types)"
    # a whole config's contradiction (its message names the keys) has no one key to name
    return f"config error: {key}: {message}{shown}" if key else f"config error: {message}"


# Other trainers' names for what a config sets, which their users type: d2l's (train_ch8's arguments,
# the models' constructors), Karpathy's char-rnn's (-rnn_size, -seq_length, -learning_rate, -grad_clip,
# -max_epochs) and AWD-LSTM's (--nhid, --emsize, --bptt, --nlayers)
KEY_ALIASES = {
    "num_epochs": "train.epochs",
    "num_hiddens": "model.hidden_size",
    "theta": "train.clip",
    "use_random_iter": "train.reset_state",
    "embed_size": "model.embedding_dim",
    "rnn_size": "model.hidden_size",
    "seq_length": "data.num_steps",
    "learning_rate": "train.lr",
    "grad_clip": "train.clip",
    "max_epochs": "train.epochs",
    "nhid": "model.hidden_size",
    "emsize": "model.embedding_dim",
    "bptt": "data.num_steps",
    "nlayers": "model.num_layers",
}


def _closest_key(location: list[str]) -> str | None:
    """The key an unknown ``data.x`` / ``model.x`` / ``train.x`` most likely meant: the same name in
    another section (``train.num_steps`` is ``data.num_steps``, not ``train.max_steps``), else the one
    key of its section that contains it (``model.hidden``: ``model.hidden_size``), else a near spelling.
    A top-level ``epochs`` is the section's key it names (``train.epochs``); d2l's ``num_epochs`` and
    the other :data:`KEY_ALIASES` too."""
    if location and location[-1] in KEY_ALIASES:
        return KEY_ALIASES[location[-1]]
    sections = {part: _section_for([part]) for part in Config.model_fields}
    if len(location) == 1:
        owners = [
            f"{part}.{location[0]}"
            for part, model in sections.items()
            if model and location[0] in model.model_fields
        ]
        return owners[0] if len(owners) == 1 else None
    if len(location) != 2:
        return None
    section, name = location
    for other, model in sections.items():
        if other != section and model is not None and name in model.model_fields:
            return f"{other}.{name}"
    own = sections.get(section)
    names = list(own.model_fields) if own is not None else []
    containing = [field for field in names if name in field]
    if len(containing) == 1:
        return f"{section}.{containing[0]}"
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.8)
    return f"{section}.{close[0]}" if close else None


def _section_for(location: list[str]) -> type[BaseModel] | None:
    model: type[BaseModel] = Config
    for part in location:
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


NULL_WORDS = frozenset({"null", "~", "Null", "NULL"})  # a key back to its default
LITERAL_KEYS = [["data", "path"]]  # values --set takes as they are (unless quoted), not as YAML


def parse_override(text: str) -> tuple[list[str], Any]:
    """``model.num_layers=3`` → (["model", "num_layers"], 3); the value is parsed as a YAML scalar."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(
            f"--set expects KEY=VALUE with a dotted key, e.g. --set model.num_layers=3 (got {text!r})"
        )
    parts = key.split(".")
    if any(not part for part in parts):
        raise ConfigError(f"--set key {key!r} has an empty part; use dotted keys like train.lr=0.5")
    if not raw.strip() and len(parts) > 1:  # ``--set data.path=$TEXT`` with TEXT unset
        raise ConfigError(f"--set {key}= has no value; give one, or {key}=null for its default")
    if parts in LITERAL_KEYS and raw.strip() not in NULL_WORDS and not raw.lstrip().startswith(("'", '"')):
        # A file name as the shell passed it: YAML would cut ``a #1.txt`` at its comment, refuse
        # ``[draft].txt`` and a name that is not UTF-8, and read ``~`` as null.
        return parts, raw.strip()  # ``data.path = a.txt`` as for every key (a quoted name keeps its spaces)
    try:
        value = _parse_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"--set {key}: {short_repr(raw)} is not a valid YAML value ({_yaml_problem(exc)})"
        ) from None
    if raw.strip() and value is None and raw.strip() not in NULL_WORDS:
        value = raw
    return parts, value


def apply_override(tree: dict[str, Any], parts: list[str], value: Any) -> None:
    node = tree
    for depth, part in enumerate(parts[:-1]):
        dotted = ".".join(parts[: depth + 1])
        child = node.get(part)
        if child is None and depth == 0:
            child = node[part] = {}  # a section left empty (``train:``, or ``--set train=``)
        elif child is None:  # a key at its default (data.path: null), or none: sections hold no sections
            raise ConfigError(
                f"--set {'.'.join(parts)}: {dotted} is not a section; keys are SECTION.NAME, e.g. data.path"
            )
        if not isinstance(child, dict):
            raise ConfigError(f"--set {'.'.join(parts)}: {dotted} is a value, not a section")
        node = child
    section = _section_for(parts[:-1])
    if value is None and section is not None and parts[-1] in section.model_fields:
        # ``KEY=null``: the key as if the config never set it, at its default (a name that is no key
        # is left to validation, whose refusal names the key it is closest to)
        node.pop(parts[-1], None)
    elif isinstance(value, dict) and _section_for(parts) is not None:
        # ``--set 'data={path: x}'`` sets those keys and keeps the section's others; ``{lr: null}``
        # puts lr back to its default, as ``train.lr=null`` does
        if not isinstance(node.get(parts[-1]), dict):
            node[parts[-1]] = {}
        for key, item in value.items():
            apply_override(tree, [*parts, str(key)], item)
    else:
        node[parts[-1]] = value


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or "malformed YAML"
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else str(problem)


MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_NODES = 100_000  # YAML nodes after expanding aliases: a config has a few dozen


_MERGE_TAG = "tag:yaml.org,2002:merge"


def _parse_yaml(text: str) -> Any:
    """YAML through :class:`_ConfigLoader`; whatever it refuses is a ``yaml.YAMLError``."""
    try:
        return yaml.load(text, Loader=_ConfigLoader)
    except RecursionError:  # PyYAML's parser recurses once per level: ``[[[[…]]]]`` a thousand deep
        raise yaml.constructor.ConstructorError(problem="it nests lists or mappings too deeply") from None


class _ConfigLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and alias expansion past :data:`MAX_CONFIG_NODES`.

    Aliases share nodes, so ten nested ``[*a, *a, …]`` lines describe 10**10 strings in a few
    hundred bytes; validation and error messages would expand them. The document's expanded size is
    counted (each distinct node once, memoised) before anything is constructed. Merge keys (``<<:
    *defaults``) work as in PyYAML's SafeLoader: a key written out overrides a merged one. A number
    written with leading zeros (``010``) is decimal, as in YAML 1.2, not YAML 1.1's octal, and
    ``1:30`` is text, not YAML 1.1's base 60.
    """

    def construct_document(self, node: yaml.Node) -> Any:
        size = _expanded_size(node)
        if size is None:
            raise yaml.constructor.ConstructorError(
                problem="an alias refers to a value that holds it (&a [*a]): the value would never end"
            )
        if size > MAX_CONFIG_NODES:
            raise yaml.constructor.ConstructorError(
                problem=f"it expands to more than {MAX_CONFIG_NODES:,} values through anchors and aliases"
            )
        return super().construct_document(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue  # ``<<``: its keys are merged in (and may be overridden) by flatten_mapping
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                raise yaml.constructor.ConstructorError(
                    problem=_not_a_name(key, key_node, node), problem_mark=key_node.start_mark
                )
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    problem=f"duplicate key {key!r} (drop one of them)", problem_mark=key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int | str:
        digits = str(self.construct_scalar(node)).replace("_", "")
        if len(digits) > (sys.get_int_max_str_digits() or len(digits)):  # Python would raise a ValueError
            raise yaml.constructor.ConstructorError(
                problem=f"a number of {len(digits):,} digits is longer than any setting takes",
                problem_mark=node.start_mark,
            )
        if re.fullmatch(r"[-+]?0[0-9]+", digits):
            return int(digits, 10)  # YAML 1.1 would read 010 as octal 8
        if ":" in digits:
            return str(self.construct_scalar(node))  # text: see construct_yaml_float
        return super().construct_yaml_int(node)

    def construct_yaml_float(self, node: yaml.ScalarNode) -> float | str:
        """YAML 1.1 reads ``1:30`` as base 60 (90) and ``10:00`` as 600; YAML 1.2 as the text it is.
        Text it stays, so a time meant as 1 h 30 min is refused by name, not trained for 90 s."""
        written = str(self.construct_scalar(node))
        return written if ":" in written else super().construct_yaml_float(node)


_ConfigLoader.add_constructor("tag:yaml.org,2002:int", _ConfigLoader.construct_yaml_int)
_ConfigLoader.add_constructor("tag:yaml.org,2002:float", _ConfigLoader.construct_yaml_float)


def _not_a_name(key: object, key_node: yaml.Node, mapping: yaml.MappingNode) -> str:
    """Why a mapping key is refused: every key of a config is a name, and YAML reads some plain words
    and numbers as other things (``yes: 1``; ``{max_tokens: 3,000}`` holds a second key ``000``)."""
    if not isinstance(key_node, yaml.ScalarNode):
        return f"a key must be a plain name, not a {type(key).__name__}"
    if isinstance(key, bool):
        shown = str(key).lower()
    elif isinstance(key, int | float):
        shown = "a number"
    elif key is None:
        shown = "null"
    else:
        shown = f"a {type(key).__name__}"
    index = next(i for i, (k, _) in enumerate(mapping.value) if k is key_node)
    before = mapping.value[index - 1][1] if index else None  # the value a comma would have cut: 3,000
    fix = (
        f"inside {{…}} a comma starts a new key (write {before.value},{key_node.value} as "
        f"{before.value}{key_node.value})"
        if mapping.flow_style
        and type(key) is int
        and before is not None
        and before.tag == "tag:yaml.org,2002:int"
        else "quote it if it is meant as a name"
    )
    return f"key {key_node.value!r} is read as {shown}, not a name; {fix}"


def _expanded_size(root: yaml.Node) -> int | None:
    """How many nodes ``root`` has once every alias is expanded (post-order, memoised by identity);
    None when an alias points back into the value that holds it, which would expand without end."""
    sizes: dict[int, int] = {}
    entered: set[int] = set()  # nodes whose children are being counted: this node's ancestors
    pending: list[tuple[yaml.Node, bool]] = [(root, False)]
    while pending:
        node, children_done = pending.pop()
        if id(node) in sizes:
            continue
        if not children_done:
            if id(node) in entered:  # reached again below itself: a cycle
                return None
            entered.add(id(node))
        children = _children(node)
        if children_done or not children:
            sizes[id(node)] = 1 + sum(sizes.get(id(child), 0) for child in children)
            if sizes[id(node)] > MAX_CONFIG_NODES:
                return sizes[id(node)]
            continue
        pending.append((node, True))
        pending.extend((child, False) for child in children if id(child) not in sizes)
    return sizes[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def read_yaml(path: Path) -> dict[str, Any]:
    """The mapping in a YAML config file, or a one-line ConfigError."""
    try:
        size = require_regular_file(path, "config file", "pass an existing YAML file to --config")
    except DrnnError as exc:
        raise ConfigError(str(exc)) from None
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"config file {path} is {size:,} bytes; a drnn config is a few hundred (at most {MAX_CONFIG_BYTES:,})"
        )
    try:
        text = read_utf8_text(path, "config file")
    except DrnnError as exc:
        raise ConfigError(str(exc)) from None
    try:
        tree = _parse_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(exc)}") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path} must be a mapping with sections data, model, train")
    return tree


def build_config(tree: dict[str, Any], overrides: Sequence[str] = ()) -> Config:
    """Apply ``--set`` overrides to a raw tree, then validate it into a Config."""
    tree = copy.deepcopy(tree)
    for text in overrides:
        parts, value = parse_override(text)
        apply_override(tree, parts, value)
    for section in Config.model_fields:
        if section in tree and tree[section] is None:
            tree[section] = {}  # ``train:`` with every key commented out: an empty section
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(describe_error(exc)) from None


def load_config(path: Path | None, overrides: Sequence[str] = ()) -> Config:
    """The resolved config: defaults, then the YAML file (if any), then each ``--set`` in order."""
    tree = read_yaml(path) if path is not None else {}
    return build_config(tree, overrides)


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True)  # a path as it is named
