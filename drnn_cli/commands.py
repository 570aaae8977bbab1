"""What ``data``, ``predict``, ``eval`` and ``inspect`` do, as library calls (``train``:
train_session.py; ``presets``: presets.py): the CLI parses and renders, these do the work."""

from __future__ import annotations

import math
import secrets
import shlex
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from drnn_cli.batch_view import EpochView, view_epoch
from drnn_cli.batches import (
    MIN_EVAL_TOKENS,
    PlannedLength,
    Splits,
    check_trainable,
    epoch_batches,
    training_split_end,
)
from drnn_cli.checkpoint import BaseChain, BaseRecord, Checkpoint, load_checkpoint, read_checkpoint_info
from drnn_cli.config import Config, DataConfig, load_config
from drnn_cli.corpus import LETTERS_ONLY, dropping, hash_corpus, preprocessing_changed
from drnn_cli.data import (
    Dataset,
    UnseenInTraining,
    encode_text,
    load_dataset,
    load_same_corpus,
    unseen_among,
    untrained_mask,
)
from drnn_cli.decode import (
    MAX_DECODE_SEED,
    DecodeOptions,
    InvalidDecodeOption,
    blank_continuation,
    continue_prefix,
    ids_to_text,
    join_tokens,
    prefix_tokens,
)
from drnn_cli.download import ProgressHook
from drnn_cli.errors import DrnnError, UsageError
from drnn_cli.evaluate import Perplexity, evaluate
from drnn_cli.files import atomic_write_stream, output_file, refuse_overwriting, require_regular_file
from drnn_cli.inspect_html import page_pieces
from drnn_cli.inspect_plot import check_plot_request, write_inspection_plot
from drnn_cli.introspect import STDIN, Inspection, InspectRequest, inspect_text
from drnn_cli.model_size import parameter_count
from drnn_cli.models import RNNLanguageModel, build_model
from drnn_cli.ngrams import NgramCounts, count_ngrams
from drnn_cli.plot import require_plotter
from drnn_cli.render import plural
from drnn_cli.run_files import RunFiles
from drnn_cli.run_notes import (
    data_notes,
    few_predictions_note,
    own_text_notes,
    planned_length_notes,
    scored_unknown_note,
    short_rows_note,
    trained_text_note,
    trained_text_read_note,
    unseen_in_training_note,
    untrained_tokens_note,
)
from drnn_cli.rundir import (
    DEFAULT_RUNS_ROOT,
    is_latest_marker,
    latest_run,
    refuse_run_file,
    resolve_checkpoint,
    run_checkpoint,
    waiting_replacement_note,
)
from drnn_cli.runtime import resolve_device
from drnn_cli.shown_text import short_repr
from drnn_cli.start_point import (
    base_chain,
    base_trained_note,
    check_max_unknown,
    fine_tuning_notes,
    fine_tuning_point,
    replaced_base_note,
    trained_on_split_note,
    unknown_share_note,
)
from drnn_cli.token_tensors import count_ids
from drnn_cli.trainer_state import UnusableTrainerState
from drnn_cli.vocab import UNK
from drnn_cli.zipf import ZipfLine, zipf_lines
from drnn_cli.zipf_plot import write_zipf_plot

# ---------------------------------------------------------------------------------------------
# drnn data


@dataclass(frozen=True)
class DataReport:
    dataset: Dataset
    config: Config  # as the run would train: under --init-from, with the checkpoint's architecture and tokens
    train_batches: int
    untrainable: str | None = None  # why `drnn train` would refuse this data, in its words
    notes: tuple[str, ...] = ()  # what `drnn train` would note about this text and these settings
    init_from: str | None = None  # the checkpoint a fine-tuning run would start from
    # the tokens the run would use that its vocabulary lacks: a fixed one's (fine-tuning), or min_freq's cut
    unknown: int = 0
    batches: EpochView | None = None  # --batches: the first minibatches of the epoch asked for
    batches_asked: bool = False  # --batches given: None above is a text too short for one minibatch
    text_ids: tuple[int, ...] | None = None  # --text: the text's first tokens as training reads them
    ngrams: NgramCounts | None = None  # --ngrams: the most frequent n-grams of the tokens used
    zipf: tuple[ZipfLine, ...] | None = None  # --zipf: each order's counts by rank, and its fit

    def _batches_summary(self) -> dict | None:
        return (
            None if self.batches is None else self.batches.summary(self.dataset.vocab, self.config.data.token)
        )

    @property
    def text_head(self) -> str | None:
        """--text's tokens as text (words joined by spaces)."""
        if self.text_ids is None:
            return None
        return ids_to_text(self.text_ids, self.dataset.vocab, self.config.data.token)

    def most_frequent(self, n: int) -> tuple[list[tuple[str, int]], str]:
        """The ``n`` most frequent tokens of the vocabulary and what they were counted over: the whole
        text, as the vocabulary was built (d2l's way); a checkpoint's vocabulary keeps no counts, so
        under ``--init-from`` the tokens the run uses, counted now."""
        vocab = self.dataset.vocab
        if vocab.token_freqs:
            # the vocabulary's own tokens: not those min_freq made <unk>
            kept = [(token, freq) for token, freq in vocab.token_freqs if token in vocab]
            return kept[:n], "all tokens"
        counts = count_ids(self.dataset.tokens, len(vocab))
        counts[vocab[UNK]] = 0  # what it lacks has its own row
        top = counts.argsort(descending=True, stable=True)[:n].tolist()
        return [(vocab.idx_to_token[i], int(counts[i])) for i in top if counts[i]], "tokens used"

    def summary(self) -> dict:
        return {
            **self.dataset.summary(),
            "minibatches_per_epoch": self.train_batches,
            "train_would_refuse": self.untrainable,
            "notes": [*self.dataset.notes, *self.notes],
            "init_from": self.init_from,
            "unknown_tokens": self.unknown,
            **({"batches": self._batches_summary()} if self.batches_asked else {}),
            **(
                {"text": self.text_head, "text_ids": list(self.text_ids)}
                if self.text_head is not None and self.text_ids is not None
                else {}
            ),
            **({"ngrams": self.ngrams.summary()} if self.ngrams is not None else {}),
            **({"zipf": [line.summary() for line in self.zipf]} if self.zipf is not None else {}),
        }


MOST_FREQUENT_SHOWN = 10  # tokens and n-grams drnn data lists, as d2l §8.3 prints [:10]


@dataclass(frozen=True)
class DataRequest:
    """``drnn data``: the text a config reads, or with ``init_from`` as fine-tuning from it would read
    it (the checkpoint's vocabulary and preprocessing, README "Fine-tuning")."""

    config: Config
    init_from: Path | None = None
    max_unknown_fraction: float | None = None  # with init_from; None: DEFAULT_MAX_UNKNOWN
    given: frozenset[str] = frozenset()  # the keys --set gives (a contradiction of the checkpoint is refused)
    config_note: str | None = None  # what --config read, where it may not be what was meant
    runs_root: Path = DEFAULT_RUNS_ROOT
    show_batches: int = 0  # --batches: how many of the epoch's first minibatches to show
    every_row: bool = False  # --batches under --json: every row of each, not the first the output lists
    epoch: int = 1  # --epoch: the epoch counted (from 1, as training counts), and shown
    show_text: int = 0  # --text: how many of the text's first tokens to show
    ngrams: int = 0  # --ngrams: count the n-grams of this order (0: none)
    zipf_png: Path | None = None  # --zipf: where to draw Zipf's law (checked with zipf_output)


def describe_data(request: DataRequest, progress: ProgressHook | None = None) -> DataReport:
    """What ``drnn train`` would read, and what it would say or refuse, without training."""
    check_max_unknown(request.max_unknown_fraction, request.init_from)
    config, start = request.config, None
    if request.init_from is not None:
        start = fine_tuning_point(
            request.init_from, config, torch.device("cpu"), request.runs_root, request.given
        )
        config = start.config
    dataset = load_dataset(config.data, vocab=start.vocab if start else None, progress=progress)
    data = config.data
    notes = [
        *([request.config_note] if request.config_note else []),
        *([start.changes] if start is not None and start.changes else []),
        *data_notes(config, dataset, None, fine_tuning=start is not None),
        *own_text_notes(data, dataset, fine_tuning=start is not None),
    ]
    refusals = []
    if start is not None:
        try:
            lacking = unknown_share_note(dataset, request.max_unknown_fraction)
        except DrnnError as refused:  # described all the same; `drnn train` refuses it
            refusals.append(str(refused))
        else:
            notes.extend([lacking] if lacking else [])
        notes.extend(fine_tuning_notes(start, dataset))
    batches, shown = 0, None
    try:
        check_trainable(len(dataset.splits.train), data.batch_size, data.num_steps, capped=dataset.capped)
        minibatches = epoch_batches(dataset.splits.train, data, config.train.seed, request.epoch - 1)
        batches = len(minibatches)
    except DrnnError as refused:
        refusals.append(str(refused))
    else:  # how long the run would be, and what that means for its settings (a run that trains)
        length = PlannedLength.of(config.train, data, len(dataset.splits.train))
        if request.show_batches:
            shown = view_epoch(  # the same minibatches, not drawn again
                minibatches,
                len(dataset.splits.train),
                data,
                request.epoch,
                request.show_batches,
                request.every_row,
            )
            if request.epoch > length.epochs:  # a run of these settings ends before it
                notes.append(
                    f"epoch {request.epoch:,} is past the {plural(length.epochs, 'epoch')} a run of these "
                    "settings trains: its minibatches are those a longer run would read"
                )
        notes.extend(
            planned_length_notes(
                config,
                length,
                dataset.splits.validates,
                parameter_count(len(dataset.vocab), config.model),
                fine_tuning=start is not None,
            )
        )
    unknown = dataset.lacking_in()
    return DataReport(
        dataset,
        config,
        batches,
        refusals[0] if refusals else None,  # the first that training would meet
        tuple(notes),
        start.init_label if start is not None else None,
        unknown,
        shown,
        bool(request.show_batches),
        tuple(dataset.tokens[: request.show_text].tolist()) if request.show_text else None,
        count_ngrams(dataset.tokens, dataset.vocab, request.ngrams, MOST_FREQUENT_SHOWN)
        if request.ngrams
        else None,
        _drawn_zipf(dataset, data, request.zipf_png, unknown) if request.zipf_png is not None else None,
    )


def zipf_output(path: Path, config_file: Path | None, init_from: Path | None) -> Path:
    """Where ``--zipf`` draws, refused before anything is read where it cannot be drawn or written, or
    would replace what the command reads: its config file, the checkpoint ``--init-from`` names (the
    text is checked once found: :func:`_drawn_zipf`)."""
    target = png_output(path, "--zipf", "zipf.png")
    require_plotter("--zipf")
    refuse_overwriting(
        {"--zipf": target},
        {"the config file --config reads": config_file, "the checkpoint --init-from reads": init_from},
    )
    return target


def _drawn_zipf(dataset: Dataset, data: DataConfig, path: Path, unknown: int) -> tuple[ZipfLine, ...]:
    """Zipf's law of the tokens used, fitted and drawn into ``path`` (d2l §8.3's figure); ``unknown``:
    the tokens read as ``<unk>`` (data.min_freq's, or a fixed vocabulary's), counted as one."""
    refuse_overwriting({"--zipf": path}, {"the text drnn data reads": dataset.path})
    lines = zipf_lines(dataset.tokens, dataset.vocab)
    pooled = ", <unk> as one token" if unknown else ""
    title = f"Zipf's law: {dataset.path.name}, {data.token} tokens ({data.preprocess}){pooled}"
    write_zipf_plot(lines, title, path)
    return lines


# ---------------------------------------------------------------------------------------------
# drnn predict / eval


@dataclass
class LoadedModel:
    checkpoint: Checkpoint
    model: RNNLanguageModel
    device: torch.device
    path: Path
    notes: tuple[str, ...] = ()  # about the run it comes from (a killed --overwrite's newer run beside it)


def load_model(
    run: Path | None, checkpoint: Path | None, device_choice: str, runs_root: Path = DEFAULT_RUNS_ROOT
) -> LoadedModel:
    path = resolve_checkpoint(run, checkpoint, runs_root)
    device = resolve_device(device_choice)
    # Read on the CPU: only the model goes to the device, not the trainer state beside it (the
    # optimizer's moments, an averaged run's raw weights); the weights are kept once, in the model.
    loaded = load_checkpoint(path, weights_only=True)  # the optimizer's state is not read
    model = build_model(len(loaded.vocab), loaded.config.model)
    try:
        model.load_state_dict(loaded.model_state)
    except RuntimeError:
        raise DrnnError(f"checkpoint {path} does not match its own model config; it is corrupt") from None
    model.to(device).eval()
    waiting = waiting_replacement_note(path.parent)
    return LoadedModel(replace(loaded, model_state={}), model, device, path, (waiting,) if waiting else ())


def read_prefixes(loaded: LoadedModel, prefixes: list[str]) -> list[list[str]]:
    """Each prefix as the model reads it, as tokens (preprocessed like its corpus: d2l's keeps the
    letters a-z). The first prefix the model cannot read is refused before any is continued: a bad last
    prefix must not cost the continuations before it, nor leave them on stdout with a failing exit
    status."""
    data = loaded.checkpoint.config.data
    return [
        prefix_tokens(prefix, loaded.checkpoint.vocab, data.preprocess, data.token) for prefix in prefixes
    ]


def predict(
    loaded: LoadedModel, prefix: str, options: DecodeOptions, on_token: Callable[[str], None] | None = None
) -> str:
    data = loaded.checkpoint.config.data
    return continue_prefix(
        loaded.model,
        loaded.checkpoint.vocab,
        prefix,
        data.preprocess,
        data.token,
        options,
        loaded.device,
        on_token,
    )


@dataclass(frozen=True)
class Continuation:
    prefix: str  # as given
    read: str  # as the model read it (preprocessed)
    text: str  # ``read``, then the generated tokens

    @property
    def generated(self) -> str:
        """What the model wrote: the text after the prefix as read (a word model's starts with a space)."""
        return self.text[len(self.read) :]

    def summary(self) -> dict[str, str]:
        return {"prefix": self.prefix, "text": self.text, "continuation": self.generated}


@dataclass(frozen=True)
class PredictReport:
    continuations: tuple[Continuation, ...]
    checkpoint: str  # the file that answered
    seed: int | None = None  # sampling's (the i-th prefix draws with seed + i); None: greedy
    notes: tuple[str, ...] = ()  # what the continuations follow (PredictPlan.notes); not in --json

    @property
    def blank_notes(self) -> tuple[str, ...]:
        """A continuation of whitespace alone reads as if predict wrote nothing (50 spaces after
        "time traveller" from a model 20 epochs in): said, with what it means."""
        notes = []
        why = (
            "greedy decoding took it for the likeliest next token every time, as an undertrained model does "
            "(train it longer, or --sample)"
            if self.seed is None
            else "the model puts nearly all its probability there, as an undertrained model does (train it "
            "longer)"
        )
        for continuation in self.continuations:
            blank = blank_continuation(continuation.generated)
            if blank is not None:
                notes.append(
                    # a 100 KB prefix is named by its first characters, not echoed whole
                    f"the continuation of {short_repr(continuation.prefix)} is {blank} and nothing else: {why}"
                )
        return tuple(notes)

    def summary(self) -> dict:
        """``--json``: the first prefix and its text; with several prefixes, all of them under ``results``;
        when sampling, the seed that draws the same text again."""
        payload: dict = {**self.continuations[0].summary(), "checkpoint": self.checkpoint}
        if self.seed is not None:
            payload["seed"] = self.seed
        if len(self.continuations) > 1:
            payload["results"] = [c.summary() for c in self.continuations]
        return payload


# The predict flag of each DecodeOptions field, for messages that name what the user typed.
PREDICT_FLAGS = {
    "num_tokens": "-n/--num-chars",
    "temperature": "--temperature",
    "top_k": "--top-k",
    "top_p": "--top-p",
    "seed": "--seed",
}


def decode_options(
    num_tokens: int,
    sample: bool,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
) -> tuple[DecodeOptions, bool]:
    """predict's options as :class:`DecodeOptions`, and whether the seed was drawn here (sampling
    without ``--seed``: said in a note, so that a sample worth keeping can be drawn again).

    Checked before the model loads, so a typo costs nothing; a refusal is a :class:`UsageError` that
    names the flag the user typed, not the field.
    """
    shaping = {"--temperature": temperature, "--top-k": top_k, "--top-p": top_p, "--seed": seed}
    given = [flag for flag, value in shaping.items() if value is not None]
    if given and not sample:
        raise UsageError(
            f"{', '.join(given)} shape{'s' if len(given) == 1 else ''} sampling; add --sample (without it predict "
            "takes the most likely token, as d2l's predict_ch8)"
        )
    drawn = sample and seed is None
    try:
        options = DecodeOptions(
            num_tokens,
            sample,
            1.0 if temperature is None else temperature,
            top_k,
            top_p,
            secrets.randbelow(MAX_DECODE_SEED + 1) if drawn else seed,
        )
    except InvalidDecodeOption as invalid:
        raise UsageError(_predict_option_message(invalid)) from None
    return options, drawn


def _predict_option_message(invalid: InvalidDecodeOption) -> str:
    """An InvalidDecodeOption in the words of the command line: the flag, its range, the value given."""
    message = f"{PREDICT_FLAGS[invalid.field_name]} {invalid.requirement} (got {invalid.value})"
    if invalid.field_name == "temperature":
        message += "; for the most likely token drop --sample"
    return message


@dataclass(frozen=True)
class PredictPlan:
    """What predict settles before its first token: the notes come before the continuations (a
    reader sees what they follow first), and a prefix the model cannot read is refused before any
    is continued."""

    loaded: LoadedModel
    prefixes: tuple[str, ...]  # as given
    reads: tuple[str, ...]  # as the model reads them (:func:`read_prefixes`)
    options: DecodeOptions
    checkpoint: str  # the file that answers, absolute
    notes: tuple[str, ...]  # prefixes preprocessing changed, and a seed drawn for sampling


def plan_predict(
    loaded: LoadedModel, prefixes: list[str], options: DecodeOptions, seed_drawn: bool = False
) -> PredictPlan:
    """Read every prefix (refusing the first the model cannot read) and note what the user should know
    before the continuations: d2l's preprocessing drops what is not a letter silently, and a drawn
    seed is the only way to draw the same sample again."""
    checkpoint = loaded.checkpoint
    data = checkpoint.config.data
    tokens = read_prefixes(loaded, prefixes)
    reads = [join_tokens(read, data.token) for read in tokens]
    preprocess = data.preprocess
    notes = [
        *loaded.notes,
        *filter(
            None,
            (  # a prefix given twice: once
                untrained_tokens_note(
                    f"the prefix {short_repr(prefix)}",
                    read,
                    checkpoint.vocab,
                    checkpoint.untrained_ids,
                    fine_tuned=checkpoint.init_from is not None,
                    token=data.token,
                )
                for prefix, read in dict(zip(prefixes, tokens, strict=True)).items()
            ),
        ),
        *(
            f"data.preprocess {preprocess} reads the prefix {prefix!r} as {read!r}"
            for prefix, read in dict(zip(prefixes, reads, strict=True)).items()  # a prefix given twice: once
            if preprocessing_changed(prefix, read)
        ),
    ]
    if len(prefixes) > 1 and not any(any(c.isspace() for c in prefix) for prefix in prefixes):
        # `drnn predict time traveller`: the shell split one prefix into words (the quotes forgotten)
        notes.append(
            f"{len(prefixes)} prefixes, each continued on its own: "
            + ", ".join(repr(prefix) for prefix in prefixes)
            + f"; to continue them as one prefix, quote them as one argument: {shlex.quote(' '.join(prefixes))}"
        )
    if seed_drawn:
        notes.append(f"--sample drew --seed {options.seed}: give it to draw the same sample again")
    return PredictPlan(
        loaded, tuple(prefixes), tuple(reads), options, str(loaded.path.absolute()), tuple(notes)
    )


def predict_all(
    plan: PredictPlan,
    on_token: Callable[[str], None] | None = None,
    on_continuation: Callable[[int, Continuation], None] | None = None,
) -> PredictReport:
    """Continue each prefix in turn, the i-th with its own sampling stream (seed + i).
    ``on_token``: each piece as it is generated (a terminal streams them); ``on_continuation(index,
    continuation)``: each finished one, so it shows before the next is generated."""
    continuations: list[Continuation] = []
    for index, (prefix, read) in enumerate(zip(plan.prefixes, plan.reads, strict=True)):
        text = predict(plan.loaded, prefix, plan.options.for_prefix(index), on_token)
        continuation = Continuation(prefix, read, text)
        continuations.append(continuation)
        if on_continuation is not None:
            on_continuation(index, continuation)
    return PredictReport(tuple(continuations), plan.checkpoint, plan.options.seed, plan.notes)


@dataclass(frozen=True)
class EvalReport:
    split: str
    epoch: int  # whole epochs the checkpoint had trained
    result: Perplexity
    source: str
    step: int | None = None  # optimizer steps it had taken (None: a checkpoint older than step counts)
    notes: tuple[str, ...] = ()  # what reading the run's corpus could not do (Dataset.notes)
    step_in_epoch: int = 0  # steps into the epoch after ``epoch`` (a checkpoint written inside an epoch)
    checkpoint: str = ""  # the file read (a run's best, or its last without a validation split)
    rows: int = 1  # the parallel rows the text was read in, each from a zero state
    # predictions of tokens the run's training split never holds (None: a --data file, not counted)
    unseen_in_training: int | None = None

    @property
    def unknown(self) -> int:
        """Predicted tokens scored as ``<unk>``: not in the vocabulary, or a word text's own ``<unk>``."""
        return self.result.unknown

    def summary(self) -> dict:
        return {
            "split": self.split,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,  # 1,177 with epoch 0: "after step 1,177 of epoch 1"
            "step": self.step,
            "perplexity": self.result.perplexity,
            "bits_per_token": self.result.bits_per_token,
            "tokens": self.result.tokens,
            "unknown": self.unknown,
            # over the tokens other than <unk> (the perplexity where none is scored)
            "known_perplexity": self.result.known_perplexity,
            "unseen_in_training": self.unseen_in_training,
            # over the predictions but those (the perplexity where there are none; null for a --data file)
            "seen_perplexity": None if self.unseen_in_training is None else self.result.seen_perplexity,
            "source": self.source,
            "checkpoint": self.checkpoint,
            # two checkpoints' perplexities compare at the same rows only (a run's default is its batch size)
            "rows": self.rows,
        }


def default_split(splits: Splits) -> str:
    """The split ``drnn eval`` reads when none is named: validation if the run has one (2 tokens or
    more: a `data.val_fraction` too small for the text leaves none, as training said), else train."""
    return "val" if splits.validates else "train"


def check_eval_source(
    split: str | None, data_file: Path | None, corpus_file: Path | None, splits_of: Path | None = None
) -> None:
    """Refuse ``--data`` beside ``--split``, ``--corpus`` or ``--splits-of``: one scores another text whole,
    the others pick a split of a run's corpus. Cheap, so the CLI calls it before the model loads too (a
    usage error then outranks a missing run, and costs nothing)."""
    if splits_of is not None and split is None:  # its default (val, else train) would be the other run's
        raise UsageError("--splits-of reads a split of another run's text: name it with --split val or test")
    if data_file is None:
        return
    given = next(
        (name for name, value in (("--split", split), ("--corpus", corpus_file), ("--splits-of", splits_of))
         if value is not None),
        None,
    )  # fmt: skip
    if given is not None:
        raise UsageError(
            f"--data evaluates all of another text, and {given} picks a split of a run's corpus; give one of them"
        )


@dataclass(frozen=True)
class SplitSource:
    """Whose splits ``drnn eval`` reads: the evaluated checkpoint's own run, or (``--splits-of``) another
    run's whose vocabulary is the same (a fine-tuned run's, to score its base on its test split)."""

    config: Config  # its data section cuts the text; its batch size is the default rows
    corpus_sha1: str | None
    text_sha1: str | None
    path: Path  # the checkpoint read: its run's config.yaml says where a moved corpus went
    other_run: bool = False  # --splits-of: named in the report
    init_from: str | None = None  # the other run's base, and where that base stood as it started from it
    init_from_at: str | None = None


def not_its_base_note(scored: Path, now: str, cut: SplitSource) -> str | None:
    """``--splits-of RUN`` of the checkpoint RUN was fine-tuned from (``scored``, which stands at ``now``),
    since resumed or replaced at its path: the figure is not the starting model's (prac39: a base resumed
    after its fine-tuning scored beside it as though it were the model the fine-tuning began from)."""
    if cut.init_from is None or cut.init_from_at is None or cut.init_from != str(scored.resolve()):
        return None
    if now == cut.init_from_at:
        return None
    return (
        f"{cut.path} was fine-tuned from {scored} when it stood at {cut.init_from_at}; it stands at {now} now: "
        "this figure is not the model that run started from"
    )


def split_source(
    loaded: LoadedModel, splits_of: Path | None, runs_root: Path = DEFAULT_RUNS_ROOT
) -> SplitSource:
    """The evaluated checkpoint's own splits, or those of the run or checkpoint ``splits_of`` names, read
    from its header; refused unless it encodes the text as the evaluated model does (the same vocabulary,
    which a fine-tuned run keeps from its base)."""
    if splits_of is None:
        own = loaded.checkpoint
        return SplitSource(own.config, own.corpus_sha1, own.text_sha1, loaded.path)
    if is_latest_marker(splits_of, runs_root):
        splits_of = latest_run(runs_root, instead="give --splits-of a run directory or checkpoint file")
    if not splits_of.exists():
        raise DrnnError(
            f"--splits-of {splits_of}: no such run directory or checkpoint file; name a run (runs/NAME) or "
            "its .safetensors checkpoint"
        )
    path = run_checkpoint(splits_of) if splits_of.is_dir() else splits_of
    info = read_checkpoint_info(path)
    mine = loaded.checkpoint
    same = (info.vocab.idx_to_token, info.config.data.token) == (
        mine.vocab.idx_to_token,
        mine.config.data.token,
    )
    if not same:
        raise DrnnError(
            f"--splits-of {splits_of}: its vocabulary is not this checkpoint's ({len(info.vocab):,} "
            f"{info.config.data.token} tokens against {len(mine.vocab):,}), so its splits cannot be scored "
            "token for token; score a text whole with --data FILE (a run fine-tuned from this checkpoint "
            "keeps its vocabulary)"
        )
    return SplitSource(
        info.config, info.corpus_sha1, info.text_sha1, path, True, info.init_from, info.init_from_at
    )


def evaluate_split(
    loaded: LoadedModel,
    split: str | None = None,
    data_file: Path | None = None,
    rows: int | None = None,
    corpus_file: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    splits_of: Path | None = None,
) -> EvalReport:
    """Perplexity of the checkpoint on a split of its own corpus (None: :func:`default_split`), or on
    all of ``data_file``. ``corpus_file``: where the run's corpus is now, when it moved (its SHA-1 must
    match the checkpoint's).

    The tokens are read as ``rows`` parallel streams (default: the run's ``data.batch_size``), each
    starting from a zero state; ``rows=1`` reads them as one continuous stream, as ``drnn inspect`` does.
    ``progress(done, total)``: the targets predicted so far, before each minibatch (a progress bar).
    ``splits_of``: read the split as that run (or checkpoint) cuts its text (:func:`split_source`), its
    batch size the default rows, so that a base and its fine-tuned run compare on the same predictions.
    """
    check_eval_source(split, data_file, corpus_file, splits_of)
    config = loaded.checkpoint.config
    read_as = rows or config.data.batch_size  # a split's: as the run that cuts it reads it (below)
    notes: tuple[str, ...] = ()  # a --data file is encoded apart from the token cache
    # the predictions of tokens the model never trained on: from the tokens its checkpoint records no
    # training split of it held (its bases' too), for any text; else, where it records none, from this
    # run's training split, for its own held-out splits alone
    unseen: UnseenInTraining | None = None
    unseen_mask: torch.Tensor | None = None
    recorded = loaded.checkpoint.untrained_ids
    record = None if recorded is None else untrained_mask(recorded, len(loaded.checkpoint.vocab))
    from_record = False
    if data_file is not None:
        tokens, source = _file_tokens(data_file, loaded.checkpoint)
        split_name = "file"
        if _is_trained_text(data_file, loaded.checkpoint):
            fine_tuned = loaded.checkpoint.init_from is not None
            notes = (trained_text_note(str(data_file), len(tokens), config.data, fine_tuned),)
        from_record = record is not None
    else:
        cut = split_source(loaded, splits_of)
        read_as = rows or cut.config.data.batch_size
        tokens, source, split_name, dataset = _split_tokens(cut, loaded.checkpoint, split, corpus_file)
        notes = dataset.notes
        own = loaded.checkpoint
        held_out = split_name in ("val", "test")
        chain = base_chain(own) if held_out else BaseChain()  # its bases' files read once, if at all
        # a base of the checkpoint scored, resumed or replaced since: its split cannot be judged (either way)
        replaced = replaced_base_note(chain, "this model")
        if cut.other_run:  # what the other run's training split holds says nothing of this checkpoint's
            scored = BaseRecord.of(str(loaded.path.resolve()), own, own.read_at)
            optimistic = trained_on_split_note(scored, chain, cut.config, dataset, split_name)
            notes = (*notes, *filter(None, (not_its_base_note(loaded.path, own.read_at, cut),)))
            from_record = record is not None
        else:
            # a fine-tuned model's record sees its bases' training too; a run's own split is its own
            from_record = record is not None and own.init_from is not None
            if not from_record:
                unseen, unseen_mask = dataset.unseen_in_training(split_name), dataset.unseen_ids()
            optimistic = base_trained_note(chain, own.config, dataset, split_name)
        notes = (*notes, *filter(None, (optimistic, replaced)))
    if from_record and record is not None:
        unseen, unseen_mask = unseen_among(tokens[1:], record, loaded.checkpoint.vocab), record
    unseen_ids = unseen_mask if unseen is not None and unseen.count else None  # summed apart where any
    result = evaluate(
        loaded.model,
        tokens,
        read_as,
        config.data.num_steps,
        loaded.device,
        "fp32",
        progress,
        unknown_id=loaded.checkpoint.vocab[UNK],
        unseen_ids=unseen_ids,
    )
    if math.isnan(result.perplexity):  # an overflowed run's loss reads inf, and is said as such
        raise DrnnError(
            f"{loaded.path}'s outputs are NaN on this text (its weights overflow float32): its perplexity "
            "cannot be measured; retrain or pick another checkpoint"
        )
    checkpoint = loaded.checkpoint
    try:
        step = checkpoint.trainer().global_step
    except UnusableTrainerState:  # a checkpoint without a (usable) trainer state: its epoch is all there is
        step = None
    fix = (
        "evaluate a longer text with --data" if data_file else "a larger split, or a longer text with --data"
    )
    unknown = scored_unknown_note(
        result.unknown,
        result.tokens,
        "predicted tokens",
        "this perplexity is",
        written_unk=config.data.token == "word",
    )
    # a fine-tuned model may have learned what this run's training split lacks from its base run's text
    unseen_note = (
        None
        if unseen is None
        else unseen_in_training_note(
            unseen,
            split_name,
            checkpoint.init_from is not None,
            seen_perplexity=result.seen_perplexity,
            recorded=from_record,
        )
    )
    notes = (
        *loaded.notes,
        *notes,
        *filter(
            None,
            [
                short_rows_note(
                    result.tokens,
                    read_as,
                    config.data.num_steps,
                    "the text is read",
                    "--rows 1 reads it as one stream",
                )
            ],
        ),
        *(_training_split_note(config, result.tokens, read_as, step) if split_name == "train" else ()),
        *filter(None, (few_predictions_note(result.tokens, fix), unknown, unseen_note)),
        # against a uniform guess only where the vocabulary spells the text (else the note above says
        # the perplexity compares with nothing)
        *(
            _worse_than_uniform_note(result.perplexity, len(checkpoint.vocab))
            if split_name != "train" and unknown is None
            else ()
        ),
    )
    return EvalReport(
        split=split_name,
        epoch=checkpoint.epoch,
        result=result,
        source=source,
        step=step,
        notes=notes,
        step_in_epoch=checkpoint.step_in_epoch,
        checkpoint=str(loaded.path.absolute()),  # as predict names it
        rows=max(1, min(read_as, result.tokens)),  # as eval_batches cuts them
        unseen_in_training=None if unseen is None else unseen.count,
    )


def _training_split_note(
    config: Config, predicted: int, rows: int, trained_steps: int | None
) -> tuple[str, ...]:
    """Why eval of the split a run trained on differs from training's perplexity, in either direction
    (1.308 → 1.639 for d2l's §8.6 RNN, 1.400 → 1.225 for §8.5 with state reset each minibatch: a
    learner took the first for a failed reproduction; learner32): training's figure is its minibatches'
    as the weights changed, its rows' state never older than a span eval reads past: an epoch's
    minibatches, or the steps the run took where it stopped inside its first (``trained_steps``)."""
    data = config.data
    rows = max(1, min(rows, predicted))
    length = predicted // rows
    if data.sampling == "random" or config.train.reset_state:
        span = f"each minibatch from a zero state, {data.num_steps} tokens"
    else:
        steps = max(1, predicted // (data.batch_size * data.num_steps))  # an epoch's minibatches, about
        steps = min(steps, trained_steps or steps)  # a run max_steps stopped inside its first epoch
        span = f"each row's state at most {steps * data.num_steps:,} tokens old"
    return (
        f"this is the split the run trained on: training's perplexity was its minibatches' while the weights "
        f"changed ({span}); eval reads it with the final weights as {rows:,} row{'s' if rows > 1 else ''} of "
        f"about {length:,} token{'s' if length > 1 else ''}, each once through: the two differ, either way "
        '(README "Reproducing d2l")',
    )


def _worse_than_uniform_note(ppl: float, vocabulary: int) -> tuple[str, ...]:
    """A perplexity above the vocabulary's size predicts worse than a uniform guess: what a d2l recipe's
    memorising model (1.02 on its 10,000 characters) scores on a later passage of the same book (101
    against 28; learner32), the lesson of a held-out split."""
    if not ppl > vocabulary:  # NaN too
        return ()
    return (
        f"perplexity {ppl:,.4g} is above {vocabulary:,}, a uniform guess over the vocabulary: the model "
        "predicts this text worse than knowing nothing of it; it memorised the text it trained on, or this "
        "text is unlike that one",
    )


def _file_tokens(data_file: Path, checkpoint: Checkpoint) -> tuple[torch.Tensor, str]:
    """All of a text file, preprocessed like the run's corpus and encoded with its vocabulary."""
    if not require_regular_file(data_file, "--data file", "give --data a UTF-8 text file"):
        raise DrnnError(f"--data file {data_file} is empty; nothing to evaluate")
    tokens = encode_text(data_file, checkpoint.config.data, checkpoint.vocab, "--data file")
    if len(tokens) < MIN_EVAL_TOKENS:
        preprocess = checkpoint.config.data.preprocess
        raise DrnnError(
            f"{data_file} has fewer than 2 tokens after the run's data.preprocess={preprocess}"
            f"{dropping(preprocess)}; nothing to evaluate"
        )
    return tokens, str(data_file)


def _is_trained_text(data_file: Path, checkpoint: Checkpoint) -> bool:
    """Whether ``data_file`` is the text the checkpoint was trained on: as read (whatever its line breaks),
    or, for a checkpoint that records only its file's bytes, byte for byte."""
    sha1s = hash_corpus(data_file)
    if checkpoint.text_sha1 is not None:
        return sha1s.text == checkpoint.text_sha1
    return sha1s.file == checkpoint.corpus_sha1


def _split_tokens(
    cut: SplitSource, checkpoint: Checkpoint, split: str | None, corpus_file: Path | None
) -> tuple[torch.Tensor, str, str, Dataset]:
    """A split of ``cut``'s corpus (None: :func:`default_split`) in ``checkpoint``'s vocabulary, its
    source, its name and the dataset (its notes: a token cache it could not write, which costs every eval
    the whole encoding): where ``corpus_file`` says, else where ``cut``'s checkpoint (or, when that place
    is gone, its run's ``config.yaml``) says; refused unless it is the same text."""
    # for the messages below, before the corpus says which split that is
    named = f"{split or 'default'} split" + (f" of {cut.path}" if cut.other_run else "")
    data = cut.config.data
    if corpus_file is not None:
        require_regular_file(corpus_file, "--corpus file", "give --corpus the run's corpus, moved")
        data = data.model_copy(update={"path": str(corpus_file)})
    elif data.file is not None and not data.file.exists():
        moved = _corpus_file_of_run(cut.path.parent)
        if moved is None or not moved.exists():
            raise DrnnError(
                f"cannot evaluate the {named}: the run's corpus {data.path} is not there (moved, or "
                "on another machine); say where it is with --corpus FILE, or score any text with --data FILE"
            )
        data = data.model_copy(update={"path": str(moved)})
    dataset = load_same_corpus(
        data,
        checkpoint.vocab,
        f"evaluate the {named}",
        "give --corpus the run's own text, or score this file whole with --data FILE"
        if corpus_file is not None
        else "restore the file, or score other text with --data FILE",
        expected_sha1=cut.corpus_sha1,
        expected_text_sha1=cut.text_sha1,
    )
    split = split or default_split(dataset.splits)
    tokens = _split_or_error(
        dataset.splits, split, cut.config, f"the run of {cut.path}" if cut.other_run else "the run"
    )
    return (
        tokens,
        f"{dataset.path} [{split}{f' as {cut.path} cuts it' if cut.other_run else ''}]",
        split,
        dataset,
    )


def _corpus_file_of_run(run_dir: Path) -> Path | None:
    """The corpus file the run's ``config.yaml`` names: the newest, when a resume pointed it at a
    moved corpus (--set data.path=NEW) after the best checkpoint was written. None without one."""
    try:
        return load_config(RunFiles(run_dir).config).data.file
    except DrnnError:
        return None


def _split_or_error(splits: Splits, split: str, config: Config, run: str = "the run") -> torch.Tensor:
    tokens = splits.get(split)
    if len(tokens) < MIN_EVAL_TOKENS:
        key = {"val": "data.val_fraction", "test": "data.test_fraction"}.get(split, "data.max_tokens")
        held = (
            f"{run} has no {split} split"
            if not len(tokens)  # a share that rounds to a single token is there, but cannot be scored
            else f"{run}'s {split} split is {len(tokens)} token, too few to evaluate (one is read, the "
            f"next predicted: {MIN_EVAL_TOKENS} at least)"
        )
        raise DrnnError(
            f"{held}; it was trained with {key} = {getattr(config.data, key.split('.')[1])}; evaluate "
            "another split or pass --data FILE"
        )
    return tokens


# ---------------------------------------------------------------------------------------------
# drnn inspect

# the names of image files --png would fill with PNG bytes all the same (a name without one is fine)
OTHER_IMAGE_SUFFIXES = frozenset(
    (".svg", ".svgz", ".pdf", ".eps", ".ps", ".jpg", ".jpeg", ".gif", ".tif", ".tiff", ".webp", ".bmp")
)
IMAGE_SUFFIXES = OTHER_IMAGE_SUFFIXES | {".png"}  # what --html would fill with a page all the same


@dataclass(frozen=True)
class InspectOutputs:
    """The files ``--html`` and ``--png`` name, as given (for messages) and as written (a symlink's
    target): checked before the model loads, so a typo costs nothing."""

    html: Path | None = None
    png: Path | None = None
    html_target: Path | None = None
    png_target: Path | None = None

    @classmethod
    def checked(cls, html: Path | None, png: Path | None) -> InspectOutputs:
        if png is not None:
            _refuse_other_image(png, "--png")
        if html is not None and html.suffix.lower() in IMAGE_SUFFIXES:  # the mirror-image slip
            raise UsageError(
                f"--html writes a web page, not a {html.suffix[1:].upper()} image; name it so, e.g. "
                f"{html.with_suffix('.html')} (--png draws the picture)"
            )
        html_target = _checked_output(html, "--html", "inspect.html") if html is not None else None
        png_target = _checked_output(png, "--png", "inspect.png") if png is not None else None
        return cls(html, png, html_target, png_target)


def png_output(path: Path, flag: str, example: str) -> Path:
    """Where the option ``flag`` writes its PNG (``path``, or a symlink's target), checked before any
    work: not another image format's name, nor a run's own file (files.output_file says the rest);
    ``example``: the name a refusal proposes."""
    _refuse_other_image(path, flag)
    return _checked_output(path, flag, example)


def _refuse_other_image(path: Path, flag: str) -> None:
    if path.suffix.lower() in OTHER_IMAGE_SUFFIXES:  # it would hold PNG bytes
        raise UsageError(
            f"{flag} writes a PNG image, not {path.suffix[1:].upper()}; name it so, e.g. {path.with_suffix('.png')}"
        )


def _checked_output(path: Path, flag: str, example: str) -> Path:
    """``path``'s target (through a symlink), refused where it is no file to replace or a run's own, or
    the latest-run marker predict and eval read (rev43b: a PNG there left them no run)."""
    if is_latest_marker(path) or is_latest_marker(path.resolve()):
        raise UsageError(
            f"{flag} {path} is the marker of the latest run, which predict and eval read; give {flag} a file "
            f"of its own, e.g. {example}"
        )
    target = output_file(path, flag, example)
    refuse_run_file(path, flag, example)
    refuse_run_file(target, flag, example)  # where a symlink of that name points
    return target


@dataclass(frozen=True)
class InspectReport:
    inspection: Inspection
    written: tuple[Path, ...]  # as the user named them, in the order written
    missing_glyphs: tuple[str, ...]  # characters the PNG's font draws as boxes
    # a note: the TEXT argument as preprocessing read it, where it changed; a --file read as letters
    read_as: str | None = None
    run_notes: tuple[str, ...] = ()  # LoadedModel's, and the text's tokens no training split held
    trained_text: str | None = None  # a --file of the run's own text: which characters read it trained on

    @property
    def notes(self) -> list[str]:
        return [
            *self.run_notes,
            *([self.read_as] if self.read_as is not None else []),
            *([self.trained_text] if self.trained_text is not None else []),
            *self.inspection.notes,
        ]


def inspect(loaded: LoadedModel, request: InspectRequest, outputs: InspectOutputs) -> InspectReport:
    """Read the text with the model, then write the page before the picture: everything the picture
    can refuse is refused before the text is read, and a failing picture never costs the page."""
    token = loaded.checkpoint.config.data.token
    if token != "char":  # its properties are letters and positions in words
        raise DrnnError(
            f"{loaded.path} is a {token} model (data.token={token}) and drnn inspect reads character models; "
            "name a character run with --run DIR or --checkpoint FILE"
        )
    refuse_overwriting(
        {"--html": outputs.html_target, "--png": outputs.png_target},
        {
            "the checkpoint this command reads": loaded.path,
            "the text --file reads": None if request.file == STDIN else request.file,
        },
    )
    request.units_shown(loaded.checkpoint.config.model.hidden_size)  # refuses too many before reading
    if outputs.png is not None:
        check_plot_request()
    config = loaded.checkpoint.config
    inspection = inspect_text(
        loaded.model, loaded.checkpoint.vocab, config.data, request, loaded.device, config.train.seed
    )
    written: list[Path] = []
    if outputs.html is not None and outputs.html_target is not None:
        page = page_pieces(inspection, str(loaded.path))  # a row at a time, never the whole page at once
        atomic_write_stream(
            outputs.html_target, lambda stream: stream.writelines(piece.encode() for piece in page)
        )
        written.append(outputs.html)
    missing: list[str] = []
    if outputs.png is not None and outputs.png_target is not None:
        missing = write_inspection_plot(inspection, outputs.png_target)
        written.append(outputs.png)
    read_as = None  # the text as preprocessing read it, where that changed it (as predict says of a prefix)
    preprocessing = loaded.checkpoint.config.data.preprocess
    if inspection.preprocessing_changed and request.text is not None:
        given, read = short_repr(request.text), short_repr(inspection.text)
        read_as = f"data.preprocess {preprocessing} reads the text {given} as {read}"
    elif inspection.preprocessing_changed and preprocessing in LETTERS_ONLY:
        # a file's, where its page showed "himwas" and no commas without a word (learner34)
        glued = ", its lines glued without a space" if inspection.lines_glued else ""
        # "as the model trained on its text" read as "the model trained on this text" (learner41)
        read_as = (
            f"{'standard input' if request.file == STDIN else request.file} is preprocessed as the run's "
            f"training text was (data.preprocess {preprocessing}): only the letters a-z, lower-cased, and "
            f"spaces{glued}; what it shows is that text"
        )
    trained_text = None  # the run's own corpus file, found as drnn eval --data finds it
    if (
        request.file is not None
        and request.file != STDIN
        and _is_trained_text(request.file, loaded.checkpoint)
    ):
        # the split end is the one eval's note computes
        trained, _ = training_split_end(config.data, inspection.full_length)
        fine_tuned = loaded.checkpoint.init_from is not None
        trained_text = trained_text_read_note(
            str(request.file), len(inspection.chars), trained, inspection.full_length, fine_tuned
        )
    untrained = untrained_tokens_note(
        "the text",
        [char for char in inspection.text if char in loaded.checkpoint.vocab],
        loaded.checkpoint.vocab,
        loaded.checkpoint.untrained_ids,
        fine_tuned=loaded.checkpoint.init_from is not None,
        token=token,
    )
    return InspectReport(
        inspection,
        tuple(written),
        tuple(missing),
        read_as=read_as,
        run_notes=(*loaded.notes, *filter(None, (untrained,))),
        trained_text=trained_text,
    )
