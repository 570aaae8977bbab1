"""The notes drnn adds beside its figures: settings that cannot do what they say with this text (said
by ``drnn data`` and before training), why a resumed run has nothing left to train, and what a
perplexity is worth (scored ``<unk>``, too few predictions: said after training and by ``drnn eval``).
Text only, from the config and a few counts; the callers decide when to say it.
"""

from __future__ import annotations

import math

import torch

from drnn_cli import fused_recurrence
from drnn_cli.batches import MIN_EVAL_TOKENS, PlannedLength, split_sizes, training_split_end
from drnn_cli.budget import Cadence, StopReason, format_duration, steps_span
from drnn_cli.config import Config, DataConfig, TrainConfig
from drnn_cli.corpus import LETTERS_ONLY
from drnn_cli.data import Dataset, UnseenInTraining
from drnn_cli.decode import blank_continuation, prefix_tokens
from drnn_cli.errors import DrnnError
from drnn_cli.model_size import GATES
from drnn_cli.render import format_perplexity
from drnn_cli.report import EpochRecord
from drnn_cli.run_files import BEST
from drnn_cli.session_time import cadence_points, next_cadence_point
from drnn_cli.shown_text import percent
from drnn_cli.vocab import UNK, Vocab

SPLIT_WORDS = {"train": "training", "val": "validation", "test": "test"}
UNKNOWN_SHARE_NOTED = 0.05  # a min_freq that makes this share of the training text <unk> is worth a note
# Fewer validation predictions than this: each one moves the perplexity by a few percent or more
FEW_VALIDATION_PREDICTIONS = 100
# A one-hot input wider than this (a word vocabulary) costs more than an embedding would buy
ONE_HOT_VOCAB_NOTED = 1024
# A vocabulary this large, most of whose tokens the text holds fewer than RARE_COUNT times, is worth a
# note naming data.min_freq: each such token is an output row the model sees too seldom to learn
RARE_COUNT = 3
# The share of a cosine schedule's steps that train.max_time must leave unreached for a note (a cut near
# the end leaves the rate near min_lr)
UNANNEALED_SHARE = 0.8
# More kept checkpoints than this in a planned run are worth a note: their count and their disk
KEPT_FILES_NOTED = 100


def scored_unknown_note(
    unknown: int, predicted: int, of: str, subject: str, written_unk: bool = False
) -> str | None:
    """A perplexity a good share of whose predictions were ``<unk>`` (text a fine-tuned or ``min_freq``
    vocabulary cannot spell, another text given to ``drnn eval``): it measures how well the model
    predicts that one class, which says little of the text either way. ``written_unk``: ``unknown``
    may count the text's own ``<unk>`` words too (Penn Treebank writes them), which no vocabulary lacks."""
    if not unknown or unknown < UNKNOWN_SHARE_NOTED * predicted:
        return None
    what = (
        "scored as <unk> (not in the vocabulary, or written <unk> in the text)"
        if written_unk
        else "not in the vocabulary and are scored as <unk>"
    )
    return (
        f"{unknown / predicted:.1%} of the {of} are {what}, one class "
        f"for all of them: {subject} not comparable with perplexities over a text the model can spell (far "
        "lower where it learned to predict <unk>, far higher where it never saw one)"
    )


def run_scored_unknown_note(dataset: Dataset, eval_tokens: int) -> str | None:
    """What a training run's perplexities are worth where the vocabulary lacks tokens of the text
    (fine-tuning, ``data.min_freq``): over the validation split (its first ``train.eval_tokens``, where
    set), else the training split. A text's own ``<unk>`` words (Penn Treebank writes them) are no lack
    (:meth:`Dataset.lacking_in`)."""
    validated = dataset.splits.validates
    start, stop = dataset.splits.span("val" if validated else "train")
    if validated and eval_tokens:  # validations read the split's first tokens only
        stop = min(stop, start + 1 + eval_tokens)
    return scored_unknown_note(
        dataset.lacking_in(start + 1, stop),  # the tokens predicted: all but the first
        max(0, stop - start - 1),
        "validation tokens" if validated else "training tokens",
        "this run's perplexities are",
    )


def few_predictions_note(predicted: int, fix: str) -> str | None:
    """A perplexity over so few predictions that each moves it by a few percent or more."""
    if predicted >= FEW_VALIDATION_PREDICTIONS:
        return None
    return f"a perplexity over {predicted:,} prediction{'' if predicted == 1 else 's'} is noise ({fix})"


def short_rows_note(predicted: int, rows: int, num_steps: int, read: str, fix: str) -> str | None:
    """A short text read as ``rows`` rows, each from a zero state, leaves each row fewer tokens than the
    model's training windows: most predictions then come with little context, and the perplexity reads
    far worse than the model's (6.9 against 1.08 on a 380-character excerpt; a trial's 62-token
    validation split, 19.53 against 13.51 as one stream); an undertrained model's can read better (100
    against 121: a trial's), so the note names no direction. ``read``: what is read, how ("the text is
    read"); ``fix``: what reads it otherwise."""
    rows = min(rows, predicted)  # evaluate's own cut: never an empty row
    if rows <= 1 or predicted // rows >= num_steps:
        return None
    length = predicted // rows
    return (
        f"{read} as {rows:,} rows of about {length:,} token{'' if length == 1 else 's'}, each from a zero "
        f"state (the training windows are {num_steps} tokens): short rows change the perplexity, usually for "
        f"the worse; {fix}"
    )


def trained_text_note(file: str, scored: int, data: DataConfig, fine_tuned: bool) -> str:
    """``drnn eval --data FILE`` where FILE is the very text the run was trained on (its SHA-1 as read):
    its first tokens are the run's training split (the first of ``data.max_tokens``, less the held-out
    fractions), so the perplexity over them is a training figure, not a held-out one, and was reported
    with nothing said. ``scored``: the file's tokens; the same text read the same way gives the same
    tokens, at the positions the run's splits were cut from. ``fine_tuned``: the base run's text is
    another question, which the checkpoint cannot answer."""
    trained, _ = training_split_end(data, scored)
    held = [name for name, fraction in (("val", data.val_fraction), ("test", data.test_fraction)) if fraction]
    if held:
        remedy = f"drnn eval --split {' or --split '.join(held)} reads held-out tokens alone"
    elif trained < scored:
        remedy = (
            f"the tokens past the run's data.max_tokens ({data.max_tokens:,}) are text it never trained on: "
            "a file of them alone gives a held-out figure"
        )
    else:
        remedy = (
            "the run holds nothing out: train with data.val_fraction (or data.test_fraction) for a figure "
            "on text the model never trained on, or evaluate another text"
        )
    whole = "all" if trained == scored else f"the first {trained:,}"
    share = f"{whole} of its {scored:,} tokens ({percent(trained / scored)})"
    return _trained_text_sentence(file, share, trained == scored, remedy, fine_tuned)


def trained_text_read_note(file: str, read: int, trained: int, full: int, fine_tuned: bool) -> str | None:
    """``drnn inspect --file`` of the very text the run trained on, as :func:`trained_text_note` finds
    it for eval: which of the ``read`` characters inspected are the run's training split, its first
    ``trained`` of the text's ``full`` (after preprocessing). eval's note counts the whole file, where
    inspect reads its first characters alone (learner41: the first 20,000 characters of the corpus,
    9,000 of them training text, were inspected with nothing said)."""
    shown = min(trained, read)
    if shown <= 0:
        return None
    whole = shown == read
    remedy = (
        f"past its first {trained:,} characters (after preprocessing) the file is text the run never trained "
        "on: cut a passage of it into a file of its own to see the model on text it has not seen"
        if trained < full
        else "the run holds none of it out: inspect another text to see the model on one it has not seen"
    )
    share = (
        f"all {read:,} characters read" if whole else f"the first {shown:,} of the {read:,} characters read"
    )
    return _trained_text_sentence(file, share, whole, remedy, fine_tuned)


def _trained_text_sentence(file: str, share: str, whole: bool, remedy: str, fine_tuned: bool) -> str:
    """eval's and inspect's note of a file that is the run's own text: ``share``, what of it was read
    that is the training split (``whole``: all of it). ``fine_tuned``: the base run's text is another
    question, which the checkpoint cannot answer."""
    return (
        f"{file} is the text this model was trained on: {share} are the run's training split, so this "
        f"perplexity is {'a' if whole else 'partly a'} training figure, not a held-out one; {remedy}"
        + ("; its base run's text is not compared" if fine_tuned else "")
        + ' (README "Your own text, and held-out numbers that mean something")'
    )


def unseen_in_training_note(
    unseen: UnseenInTraining,
    split: str,
    fine_tuned: bool = False,
    seen_perplexity: float | None = None,
    recorded: bool = False,
) -> str | None:
    """Held-out predictions of tokens this run's training split never holds, said whenever there is one:
    the vocabulary is the whole text's (d2l's, AWD-LSTM's way), so they are scored as known tokens the
    model never trained on, each costing about 9 nats more than the rest (a trial's test tail of emoji,
    6.24% of its predictions: perplexity 26.49, 14.89 over the rest), so a share of 0.01% moves a
    perplexity by about 0.1%, its fourth figure. ``fine_tuned``: the model may have learned them from
    the text its base run trained on, which this run's split does not show. ``seen_perplexity``: the
    split's perplexity over the other predictions, where it was measured (``drnn eval``). ``recorded``:
    counted from the checkpoint's record of the tokens no training split of it held (its bases' too), so
    exact for a fine-tuned model, and for any text (``split`` "file": ``drnn eval --data``)."""
    if not unseen.count:
        return None
    share = unseen.count / unseen.predictions
    shown_share = f"{share:.2%}" if share >= 0.0001 else "under 0.01%"
    shown = ", ".join(repr(token) for token in unseen.commonest)
    more = (
        f" and {unseen.kinds - len(unseen.commonest):,} more" if unseen.kinds > len(unseen.commonest) else ""
    )
    trained = (
        "the model knows them only if its base run's text held them"
        if fine_tuned and not recorded
        else "training never shows them to the model"
    )
    held = "no training split of this model held" if recorded else "this run's training split never holds"
    what, whose = (
        ("predictions", "the file's")
        if split == "file"
        else (f"{SPLIT_WORDS[split]} predictions", "the split's")
    )
    return (
        f"{unseen.count:,} of the {unseen.predictions:,} {what} "
        f"({shown_share}) {'is a token' if unseen.count == 1 else 'are tokens'} "
        f"{held} ({shown}{more}): the vocabulary holds such tokens, so they are "
        f"scored as known, yet {trained}, and {whose} perplexity counts them"
        + (
            ""
            if seen_perplexity is None
            else f" ({format_perplexity(seen_perplexity, 4)} over the other predictions)"
        )
        + ' (README "Your own text, and held-out numbers that mean something")'
    )


# untrained_tokens_note: the tokens it names, the rest counted
UNTRAINED_SHOWN = 5


def untrained_tokens_note(
    subject: str,
    tokens: list[str],
    vocab: Vocab,
    untrained_ids: tuple[int, ...] | None,
    *,
    fine_tuned: bool,
    token: str,
) -> str | None:
    """``subject`` (predict's prefix, the text inspect reads) holding tokens that no training split of the
    model held (``Checkpoint.untrained_ids``): the vocabulary is the whole text's, held-out splits
    included, so the model reads them, yet no gradient ever moved their input weights (as initialised, or
    decayed towards zero under AdamW) and what follows them rests on nothing it learned. None where there
    is none, or the checkpoint does not know (one written before drnn recorded them, or too many)."""
    untrained = set(untrained_ids or ())
    never = [t for t in dict.fromkeys(tokens) if vocab[t] in untrained]  # in the order the prefix has them
    if not never:
        return None
    shown = ", ".join(repr(t) for t in never[:UNTRAINED_SHOWN])
    more = f" and {len(never) - UNTRAINED_SHOWN:,} more" if len(never) > UNTRAINED_SHOWN else ""
    trained = (
        "neither the model's training split nor its base runs' ever held"
        if fine_tuned
        else "the model's training split never held"
    )
    kind = "word" if token == "word" else "character"
    what, it = (f"a {kind}", "it") if len(never) == 1 else (f"{kind}s", "them")
    return (
        f"{subject} holds {what} {trained} ({shown}{more}): the vocabulary, read "
        f"from the whole text with its held-out splits, has {it}, yet the model never trained on {it}, so "
        f"what follows {it} rests on untrained weights "
        '(README "Your own text, and held-out numbers that mean something")'
    )


def data_notes(
    config: Config, dataset: Dataset, device: torch.device | None, fine_tuning: bool = False
) -> list[str]:
    """Settings this text or device defeats: a validation or test split too small to evaluate (or so
    small its perplexities are noise), a min_freq that turns much of the text into <unk>, a capped
    evaluation, held-out tokens the training split never holds, patience or eval_tokens without
    validation, sample prefixes the vocabulary cannot spell, a one-hot input as wide as a word
    vocabulary, Triton kernels without CUDA (``device``: where the run trains; None, ``drnn data``'s,
    where it is not decided; ``fine_tuning``: the vocabulary is a checkpoint's, which ``data.min_freq``
    did not make, and ``--init-from`` says so)."""
    train, data = config.train, config.data
    splits, vocab = dataset.splits, dataset.vocab
    validation_tokens, test_tokens = len(splits.val), len(splits.test)
    notes = []
    if data.val_fraction > 0 and not splits.validates:
        notes.append(
            f"data.val_fraction {data.val_fraction:g} leaves {validation_tokens} validation token(s), too "
            "few to evaluate: this run has no validation (raise data.val_fraction)"
        )
    elif data.val_fraction > 0 and validation_tokens - 1 < FEW_VALIDATION_PREDICTIONS:
        notes.append(
            f"data.val_fraction {data.val_fraction:g} leaves {validation_tokens - 1} validation prediction(s): "
            "perplexities over so few are noise, yet they pick the best checkpoint and drive patience "
            "(raise data.val_fraction)"
        )
    # min_freq 1 cuts nothing: an <unk> is the text's own; under --init-from min_freq applies to nothing
    if data.min_freq > 1 and len(splits.train) and not fine_tuning:
        unknown = dataset.lacking_in(*splits.span("train")) / len(splits.train)
        if unknown >= UNKNOWN_SHARE_NOTED:
            notes.append(
                f"data.min_freq {data.min_freq} maps {percent(unknown)} of the training tokens to <unk>: the "
                "model learns to predict <unk>, and its perplexities count those easier guesses, so compare "
                "them only with runs of the same vocabulary; a lower data.min_freq keeps more of the text's tokens"
            )
    if data.test_fraction > 0 and test_tokens < MIN_EVAL_TOKENS:
        notes.append(
            f"data.test_fraction {data.test_fraction:g} leaves {test_tokens} test token(s), too few to "
            "evaluate: drnn eval --split test will have nothing to read (raise data.test_fraction)"
        )
    if train.eval_tokens and validation_tokens > train.eval_tokens + 1:
        if train.eval_tokens < FEW_VALIDATION_PREDICTIONS:  # as a split that small is said to be (verify33)
            notes.append(
                f"train.eval_tokens {train.eval_tokens:,} validates on {train.eval_tokens:,} prediction(s): "
                "perplexities over so few are noise, yet they pick the best checkpoint and drive patience "
                "(raise train.eval_tokens)"
            )
        notes.append(
            f"train.eval_tokens {train.eval_tokens:,}: the validation perplexities of this run (and its choice "
            f"of best) predict the first {train.eval_tokens:,} of the {validation_tokens - 1:,} validation tokens "
            f"after the split's first (of {validation_tokens:,}); drnn eval --split val predicts them all"
        )
    if splits.validates:  # validation reads as drnn eval does by default: data.batch_size rows
        predictions, read = validation_tokens - 1, train.validated_predictions(validation_tokens)
        short = short_rows_note(
            read,
            data.batch_size,
            data.num_steps,
            f"each validation reads its {read:,} predictions",
            "yet they pick the best checkpoint (raise data.val_fraction"
            + (" or train.eval_tokens" if read < predictions else "")
            + "; drnn eval --split val --rows 1 reads the split as one stream)",
        )
        notes.extend([short] if short else [])
    for split in ("val", "test"):
        if len(splits.get(split)) >= MIN_EVAL_TOKENS:
            unseen = unseen_in_training_note(dataset.unseen_in_training(split), split, fine_tuning)
            notes.extend([unseen] if unseen else [])
    if train.eval_tokens and not splits.validates:
        notes.append(
            f"train.eval_tokens {train.eval_tokens:,} caps what each validation predicts, and this run has "
            "none: it caps nothing (set data.val_fraction > 0 to validate)"
        )
    if train.patience and not splits.validates:
        notes.append(
            f"train.patience {train.patience} counts evaluations of the validation split, and this run "
            "has none: it trains all its epochs (set data.val_fraction > 0 to stop early)"
        )
    for prefix in train.sample_prefixes:
        try:
            prefix_tokens(prefix, vocab, data.preprocess, data.token)
        except DrnnError:
            notes.append(
                f"train.sample_prefixes: {prefix!r} cannot be written in the vocabulary's {data.token}s (the "
                "text's, or under --init-from the checkpoint's), so it gets no samples; set "
                "train.sample_prefixes to text it can spell"
            )
    rare = rare_tokens_note(vocab, data.min_freq, data.token) if not fine_tuning else None
    if rare:
        notes.append(rare)
    model = config.model
    if not model.embedding_dim and len(vocab) > ONE_HOT_VOCAB_NOTED:
        gates = GATES[model.cell]
        one_hot_bytes = data.batch_size * data.num_steps * len(vocab) * 4
        notes.append(
            f"model.embedding_dim 0 feeds the first layer a one-hot vector of {len(vocab):,} tokens: "
            f"{gates * model.hidden_size * len(vocab):,} input weights and {one_hot_bytes / 2**20:,.1f} MiB "
            "of one-hot input a minibatch; a learned embedding (e.g. model.embedding_dim "
            f"{min(model.hidden_size, 512)}) is the usual input for a vocabulary this large"
        )
    if device is not None and config.model.impl == "fused" and not fused_recurrence.can_run(device):
        if device.type == "cuda":  # a CUDA build without Triton (CUDA wheels on Linux ship it)
            notes.append(
                "model.impl fused runs Triton kernels, and Triton is not installed (pip install triton); "
                "it steps the scratch cells (the same model)"
            )
        else:
            notes.append(
                f"model.impl fused runs Triton kernels on CUDA; on {device.type} it steps the scratch "
                "cells (the same model)"
            )
    return notes


def rare_tokens_note(vocab: Vocab, min_freq: int, token: str) -> str | None:
    """A vocabulary of thousands most of whose tokens occur once or twice (an emoji or CJK tail in a
    char text, a word text's long tail): what ``data.min_freq`` RARE_COUNT would keep and cut."""
    if min_freq >= RARE_COUNT or len(vocab) <= ONE_HOT_VOCAB_NOTED:
        return None
    counted = [(name, count) for name, count in vocab.token_freqs if name in vocab]
    rare = [count for _, count in counted if count < RARE_COUNT]
    if len(rare) * 2 < len(vocab):
        return None
    share = sum(rare) / max(1, sum(count for _, count in counted))
    kept = len(vocab) - len(rare)
    # the output layer's product, every step's for every token, is hidden × vocabulary (prac38: a run on
    # 3,217 characters trained about a quarter slower than one on 366)
    # a share the min_freq note would then flag is said with its price, not as a free gain (learner42:
    # this note proposed min_freq 3 for a word text, and the run with it was told to lower it)
    price = (
        "; the price: the model then predicts <unk> for that share, and its perplexities count those "
        "easier guesses, comparable only with runs of the same vocabulary"
        if share >= UNKNOWN_SHARE_NOTED
        else ""
    )
    return (
        f"{len(rare):,} of the vocabulary's {len(vocab):,} {token}s occur fewer than {RARE_COUNT} times in the "
        f"text: each is an output the model sees too seldom to learn; data.min_freq {RARE_COUNT} maps them "
        f"to <unk> ({percent(share)} of the text), leaving a vocabulary of {kept:,}, and an output layer "
        f"{_times(len(vocab) / max(1, kept))} times smaller to compute at every step{price}"
    )


# The share of a vocabulary the part of a text data.max_tokens keeps must never use to be worth a note
UNUSED_VOCABULARY_NOTED = 0.25


def _vocabulary_beyond(dataset: Dataset, data: DataConfig) -> str:
    """Where the vocabulary (read from the whole text, as d2l's) holds tokens the first ``max_tokens``
    never use: their count and what a file of those tokens alone would give (own40: 1,406 outputs for
    the 189 characters of a 20 MB text's first 4,000,000)."""
    unused = torch.bincount(dataset.tokens, minlength=len(dataset.vocab)) == 0
    unused[dataset.vocab[UNK]] = False  # a vocabulary's own, whether the text has any or not
    missing, size = int(unused.sum()), len(dataset.vocab)
    if missing < UNUSED_VOCABULARY_NOTED * size:  # a few rare characters past the cap cost nothing
        return ""
    return (
        f"; the vocabulary is read from all of it: {missing:,} of its {size:,} {data.token}s never occur in "
        f"the part used, yet the output layer computes all {size:,} at every step (a file of that part alone "
        f"gives a vocabulary of about {size - missing:,})"
    )


# d2l's preprocessing keeping less than this share of a file's bytes as characters is worth a note
KEPT_SHARE_NOTED = 0.8
# Bytes a word token: English runs about 6; a text without spaces between words (Chinese, Japanese)
# splits into lines, tens of characters of 3 bytes each
LONG_WORD_BYTES = 40


def own_text_notes(data: DataConfig, dataset: Dataset, fine_tuning: bool = False) -> list[str]:
    """What settings made for the Time Machine do to a text of one's own (``data.path``), unseen
    otherwise: a ``max_tokens`` keeping its first tokens only (a preset's, often), which the held-out
    splits share, and whose vocabulary is still the whole text's; and d2l's preprocessing, which keeps
    a-z and single spaces, dropping much of a text with digits, punctuation, case or other alphabets
    (``fine_tuning``: the preprocessing and vocabulary are the checkpoint's, which ``--init-from`` keeps)."""
    if data.path is None:
        return []
    total_tokens, file_bytes = dataset.total_tokens, dataset.file_bytes()
    notes = []
    if 0 < data.max_tokens < total_tokens:
        sizes = split_sizes(data.max_tokens, data.val_fraction, data.test_fraction)
        named = [f"{size:,} {name}" for size, name in zip(sizes, SPLIT_WORDS.values(), strict=True) if size]
        shared = (
            f"and its splits share them: {', '.join(named[:-1])} and {named[-1]}"
            if len(named) > 1
            else "all of them to train"
        )
        notes.append(
            f"data.max_tokens {data.max_tokens:,} uses the first {data.max_tokens:,} of this text's "
            f"{total_tokens:,} {data.token}s, {shared}; data.max_tokens -1 takes all"
            + ("" if fine_tuning else _vocabulary_beyond(dataset, data))
        )
    if data.token == "char" and data.preprocess in LETTERS_ONLY and file_bytes:
        kept = total_tokens / file_bytes
        if kept < KEPT_SHARE_NOTED:
            notes.append(
                f"data.preprocess {data.preprocess} keeps the letters a-z and single spaces, lower-cased: "
                f"{total_tokens:,} characters of this {file_bytes:,}-byte file ({kept:.0%} of its bytes); digits, "
                "punctuation, accented and other letters, case and line breaks are gone ("
                + (
                    "the checkpoint's preprocessing, which --init-from keeps: a new run without it and with "
                    "data.preprocess none keeps the text as it is)"
                    if fine_tuning
                    else "data.preprocess none keeps the text as it is)"
                )
            )
    if data.token == "word" and file_bytes and total_tokens and file_bytes / total_tokens > LONG_WORD_BYTES:
        notes.append(
            f"data.token word splits on white space, and this text has little: {total_tokens:,} words in "
            f"{file_bytes:,} bytes, {file_bytes / total_tokens:,.0f} bytes a word (a text that does not space its "
            "words, as Chinese or Japanese, is read a line or a sentence a word); data.token char suits it"
        )
    return notes


def planned_length_notes(
    config: Config,
    length: PlannedLength,
    validates: bool,
    parameters: int,
    fine_tuning: bool = False,
    starting: bool = True,
) -> list[str]:
    """What a run's planned length means for its settings (``drnn train`` says it before training,
    ``drnn data`` before a run): cadences in epochs that its step budget ends first (where a run starts:
    a resume keeps what was said), settings that do nothing over that length, and the disk that
    ``train.keep_every`` fills over it (a model of ``parameters``)."""
    late = (
        late_cadence_notes(config.train, length.step_budget, length.steps_per_epoch, validates, fine_tuning)
        if starting and length.step_budget
        else []
    )
    kept = kept_files_note(config.train, length, parameters, checkpoint_bytes_per_parameter(config.train))
    return [*late, *idle_setting_notes(config, length.epochs, length.steps), *([kept] if kept else [])]


def late_cadence_notes(
    train: TrainConfig, planned_steps: int, steps_per_epoch: float, validates: bool, fine_tuning: bool = False
) -> list[str]:
    """A run that ``train.max_steps`` ends inside its epochs, whose validation, checkpoint or log comes
    first after that end: none of them happens until the end, and a crash or ``kill -9`` before it
    loses the whole run (``lstm_full_cpu``'s 7,450 steps are a quarter of an epoch of a 30 MB text).
    ``fine_tuning``: the starting weights are validated and checkpointed first, so it loses the training."""
    late: list[tuple[str, str]] = []
    # validations on a step cadence log a line each, and write best (which predict and eval read)
    step_validations = validates and Cadence.of(train.eval_every).in_steps
    for key, what in (
        ("eval_every", "validated"),
        ("checkpoint_every", "resumably checkpointed" if step_validations else "checkpointed"),
        ("log_every", "logged"),
    ):
        if (key == "eval_every" and not validates) or (key == "log_every" and step_validations):
            continue
        cadence = Cadence.of(getattr(train, key))
        if cadence.in_steps:  # counted in steps already: the user's own choice
            continue
        # a train.keep_every point writes last too (its kept file, linked): a checkpoint comes by then
        kept_at = next_cadence_point(Cadence.of(train.keep_every), 0, steps_per_epoch)
        if key == "checkpoint_every" and kept_at is not None and kept_at <= planned_steps:
            continue
        # log_every 0 writes at least a line an epoch: at the first epoch's end at the earliest
        first = cadence.every * steps_per_epoch or steps_per_epoch
        if first > planned_steps:
            late.append((key, what))
    if not late:
        return []
    keys = ", ".join(f"train.{key} ({_every(getattr(train, key))})" for key, _ in late)
    whats = " or ".join(
        ", ".join(what for _, what in late).rsplit(", ", 1)
    )  # "validated, checkpointed or logged"
    lost = ""
    if step_validations and "checkpointed" in whats:
        lost = (
            "; a crash or kill -9 before then keeps only its best validation's weights (best.safetensors, "
            "which predict and eval read), with nothing to resume"
        )
    elif "checkpointed" in whats:
        lost = f"; a crash or kill -9 before then loses all {'its training' if fine_tuning else 'of it'}"
    after = " after the starting weights' validation" if fine_tuning and validates else ""
    every = max(1, planned_steps // 10)
    steps = f"{every} step{'' if every == 1 else 's'}"
    return [
        f"this run ends after {steps_span(planned_steps, steps_per_epoch)}, before "
        f"{keys} first {'comes' if len(late) == 1 else 'come'} due: nothing{after} is {whats} until its end{lost}; "
        f"count {'it' if len(late) == 1 else 'them'} in steps, e.g. "
        + " ".join(f'--set "train.{key}={steps}"' for key, _ in late)
    ]


def unannealed_note(
    train: TrainConfig, reach: int, length: PlannedLength, rate_at_reach: float, resumed_at: int | None = None
) -> str:
    """``train.max_time`` ends a cosine schedule of ``length.steps`` near step ``reach`` (at the session's
    paces), its rate then ``rate_at_reach``: it does not change the schedule, so a run cut by time has not
    annealed; a ``train.max_steps`` that the time reaches anneals within it (README "Long runs").

    ``resumed_at``: the step a resumed session stands at now. Its advice counts from there (90% of the
    run's reach was behind the step the session itself would end at: --resume with it trained nothing),
    and is to stop and resume now, the steps left being those of this session's time."""
    spans = f"train.max_steps {train.max_steps:,}" if length.step_budget else f"train.epochs {train.epochs:,}"
    said = (
        f"at this pace train.max_time ({format_duration(train.max_time)}) ends the run near step {reach:,} of "
        f"the {length.steps:,} its cosine schedule spans ({spans}), the rate still {rate_at_reach:.3g} of its "
        f"{train.lr:g} (train.min_lr {train.min_lr:g}): max_time does not change the schedule; "
    )
    # 90% of the steps the time allows: room for a pace that slows (an early pace is an estimate)
    if resumed_at is None:
        fits = _two_figures(reach * 0.9)
        return (
            said
            + f'for the rate to anneal within the time, --set train.max_steps={fits} (README "Long runs")'
        )
    fits = resumed_at + _two_figures((reach - resumed_at) * 0.9)
    return said + (
        f"for the rate to anneal within this session's time, stop it (the run is at step {resumed_at:,}) and "
        f'--resume --set train.max_steps={fits} (README "Long runs")'
    )


def unannealed_end_note(
    train: TrainConfig, step: int, session_steps: int, length: PlannedLength, rate: float
) -> str | None:
    """A session ``train.max_time`` ended at ``step``, ``session_steps`` in, short of where a cosine schedule
    of ``length.steps`` anneals, its rate still ``rate``: the step budget with which a next session of the
    same time anneals (the note said as the pace showed counts from where the session stood then, and is
    behind the run once the session has run on: review recheck38). None where the schedule has annealed."""
    if train.schedule != "cosine" or step >= UNANNEALED_SHARE * length.steps or not session_steps:
        return None
    fits = step + _two_figures(session_steps * 0.9)  # room for a pace that slows
    return (
        f"train.max_time ended this session at step {step:,} of the {length.steps:,} its cosine schedule spans, "
        f"the rate still {rate:.3g} of its {train.lr:g}: for the next session of the same time to anneal, "
        f'--resume --set train.max_steps={fits} (README "Long runs")'
    )


def _times(ratio: float) -> str:
    """A ratio as a reader takes it in: three figures (52.7), or a whole number past 100 (1,250, not
    ``1.25e+03``)."""
    return f"{ratio:,.0f}" if ratio >= 100 else f"{ratio:.3g}"


def _two_figures(value: float) -> int:
    """``value`` rounded down to two significant figures (51,300 → 51,000; at least 1)."""
    if value < 100:
        return max(1, int(value))
    scale = 10 ** (int(math.log10(value)) - 1)
    return int(value // scale * scale)


def checkpoint_bytes_per_parameter(train: TrainConfig) -> int:
    """What a full checkpoint stores per parameter: the weights, the optimizer's moments (Adam's two,
    SGD's momentum) and, under train.average, the raw weights, each in float32 (train.precision is
    autocast: the parameters stay float32)."""
    moments = 2 if train.optimizer in {"adam", "adamw"} else int(train.momentum > 0)
    return (1 + moments + (train.average != "none")) * torch.finfo(torch.float32).bits // 8


def kept_files_note(
    train: TrainConfig, length: PlannedLength, parameters: int, bytes_per_parameter: int
) -> str | None:
    """``train.keep_every`` keeps a full checkpoint at each point: over ``KEPT_FILES_NOTED`` of them in the
    planned run (``5 steps`` over a long run) fill a disk unseen, so the count and its size are said
    (``drnn train`` before its first step, ``drnn data`` before a run).
    ``bytes_per_parameter``: :func:`checkpoint_bytes_per_parameter`."""
    cadence = Cadence.of(train.keep_every)
    count = cadence_points(cadence, 0, length.steps, length.steps_per_epoch)
    if count <= KEPT_FILES_NOTED:
        return None
    each = parameters * bytes_per_parameter
    return (
        f"train.keep_every ({_every(train.keep_every)}) keeps {count:,} checkpoints in this run's kept/ folder, "
        f"{_size(each)} each ({parameters:,} parameters × {bytes_per_parameter} bytes): {_size(count * each)} "
        "in all; a larger train.keep_every keeps fewer"
    )


def _size(size: float) -> str:
    """Bytes as a note says them: ``812.3 KiB``, ``1.2 GiB``."""
    if size < 1024:
        return f"{size:,.0f} B"
    for unit in ("KiB", "MiB"):
        size /= 1024
        if size < 1024:
            return f"{size:,.1f} {unit}"
    return f"{size / 1024:,.1f} GiB"


def _every(value: int | str) -> str:
    """A cadence as its config spells it, with the unit a plain integer leaves out (epochs)."""
    if value == 0:
        return "0: auto"
    return value if isinstance(value, str) else f"{value} epoch{'' if value == 1 else 's'}"


def idle_setting_notes(config: Config, planned_epochs: int, planned_steps: int) -> list[str]:
    """Settings that would do nothing in this run, or not what they are for, which it would otherwise show
    no sign of: an ``average_start`` at or past its last epoch or step (validation, ``best`` and prediction
    get the raw weights), an EMA over fewer steps than its decay spans (``lstm_full_cpu``'s on a 2 KB text:
    validation 10.77 against 4.49 without it), a ``model.dropout`` with no second layer to drop between, SGD's momentum under Adam,
    ``train.reset_state`` under random sampling (which starts every minibatch from zeros already)."""
    train, model = config.train, config.model
    notes = []
    start = Cadence.of(train.average_start)  # active from the step with `every` epochs or steps before it
    planned, unit = (planned_epochs, "") if start.unit == "epochs" else (planned_steps, " steps")
    if train.average != "none" and start.every >= planned:
        notes.append(
            f"train.average {train.average} starts after train.average_start {start.every:,} {start.unit}, "
            f"and this run trains {planned:,}: its weights are never averaged (set "
            f"train.average_start below {planned}{unit})"
        )
    horizon = 1 / (1 - train.average_decay)  # the steps an EMA's weights mostly come from
    if train.average == "ema" and start.every < planned:
        start_steps = (
            start.every if start.unit == "steps" else start.every * planned_steps / max(1, planned_epochs)
        )
        averaged = round(planned_steps - start_steps)
        if averaged < horizon:
            notes.append(
                f"train.average ema (train.average_decay {train.average_decay:g}) averages about the last "
                f"{horizon:,.0f} steps, and this run averages {averaged:,}: its average is close to the mean of "
                "all of them, its first, barely trained steps' included, and what validates, is kept as best "
                "and predicts can read worse than the last weights (set train.average none for a run this "
                "short, or train it longer)"
            )
    if model.dropout > 0 and model.num_layers == 1:
        notes.append(
            f"model.dropout {model.dropout:g} drops between stacked layers, and this model has one: it drops "
            "nothing (use model.output_dropout or model.input_dropout, or set model.num_layers ≥ 2)"
        )
    if train.momentum > 0 and train.optimizer != "sgd":
        notes.append(
            f"train.momentum {train.momentum:g} is SGD's, and train.optimizer {train.optimizer} does not use it "
            "(its moment estimates take PyTorch's default betas); set train.momentum 0, or train.optimizer sgd"
        )
    if train.reset_state and config.data.sampling == "random":
        notes.append(
            "train.reset_state starts every minibatch from a zero state, which data.sampling random does "
            "already: it changes nothing (it is for data.sampling sequential)"
        )
    # a schedule's settings under another schedule (own40: train.min_lr 0.1 taken without a word)
    owners = {"min_lr": "cosine", "step_size": "step", "gamma": "step"}
    unused = {
        key: schedule
        for key, schedule in owners.items()
        if train.schedule != schedule and getattr(train, key) != TrainConfig.model_fields[key].default
    }
    if unused:
        listed = " and ".join(f"train.{key} {getattr(train, key):g}" for key in unused)
        schedules = sorted(set(unused.values()))
        one = len(unused) == 1
        # one schedule's: take it; two schedules' (min_lr and gamma): one of them is idle whichever is taken
        if len(schedules) == 1:
            owner = f"the {schedules[0]} schedule's"
            fix = f"set train.schedule {schedules[0]}, or leave {'it' if one else 'them'} out"
        else:
            owner = f"the {' and '.join(schedules)} schedules'"
            fix = "leave out those of the schedule not taken"
        notes.append(
            f"{listed} {'is' if one else 'are'} {owner}, and train.schedule {train.schedule} does not use "
            f"{'it' if one else 'them'} ({fix})"
        )
    return notes


def nothing_left(
    train: TrainConfig, epochs_done: int, global_step: int | None, bad_evals: int, boundary_pending: bool
) -> StopReason | None:
    """Why a run checkpointed at this point has nothing left to train, else None: its epochs, its step
    budget or its patience spent (epochs first: a step budget that ends with the last epoch did not cut
    the run short). A boundary a signal cut short (its validation) is still to do; a time budget starts
    with each command, so a tiny one still trains a step. ``drnn train --resume`` and ``drnn runs`` ask."""
    if boundary_pending:
        return None
    if epochs_done >= train.epochs:
        return "epochs"
    if train.max_steps and global_step is not None and global_step >= train.max_steps:
        return "max_steps"
    if train.patience and bad_evals >= train.patience:
        return "patience"
    return None


def nothing_to_train(
    reason: StopReason, train: TrainConfig, epochs_done: float, global_step: int, bad_evals: int
) -> str:
    """The note for a resume that finds the run over, naming the setting that lets it go on.
    ``epochs_done`` is fractional for a run stopped inside an epoch."""
    why, fix = {
        "epochs": (
            f"its epochs are done ({epochs_done:g} trained, train.epochs {train.epochs})",
            "train.epochs=N",
        ),
        "patience": (
            f"it stopped early: validation perplexity did not improve for {bad_evals} evaluations "
            f"(train.patience {train.patience})",
            "train.patience=N (0: off)",
        ),
        "max_steps": (
            f"it has taken {global_step:,} steps (train.max_steps {train.max_steps:,})",
            "train.max_steps=N",
        ),
        "max_time": (f"train.max_time {train.max_time:g} s is spent", "train.max_time=SECONDS"),
    }[reason]
    return f"nothing to train: {why}; to train on, --resume --set {fix} with a larger value"


def overflowed_note(train_ppls: list[float], train: TrainConfig) -> str | None:
    """A session whose every training perplexity overflowed (a mean loss past ~700 nats: written as null,
    and training goes on, the loss being finite) ended as a finished run reads: said, with the settings
    that bring it back (prac38: lr 1000, no clipping, "finished" and ``ppl inf`` throughout)."""
    if not train_ppls or any(math.isfinite(ppl) for ppl in train_ppls):
        return None
    clip = "" if train.clip else ", or clip the gradient norm (train.clip 1)"
    return (
        "every training perplexity of this session overflowed (a mean loss past 700 nats, written as null): "
        f"the model learned nothing at this rate; lower train.lr (now {train.lr:g}){clip}"
    )


# worse_than_uniform_note: a last training perplexity past this many times the vocabulary's size (what a
# uniform guess scores) is a model gone wrong, not one early in training, whose figure is near the size
WORSE_THAN_UNIFORM = 2  # the note says "twice"


def worse_than_uniform_note(train_ppls: list[float], vocab_size: int, train: TrainConfig) -> str | None:
    """A session whose last training perplexity is far above a uniform guess's, the vocabulary's size,
    or overflowed after finite ones (every one overflowed: :func:`overflowed_note`): gradients that
    exploded (learner42: train.clip 0 at 100 steps ended at perplexity 1.5e+48, with nothing said), said
    with the settings that prevent it."""
    if not train_ppls or math.isnan(last := train_ppls[-1]) or last <= WORSE_THAN_UNIFORM * vocab_size:
        return None
    fix = (
        "clip the gradient norm (train.clip 1, d2l 0.17.6 §8.5) or lower train.lr"
        if not train.clip
        else "lower train.lr"
    )
    figure = (
        f", {format_perplexity(last, 1)}, is more than twice"
        if math.isfinite(last)
        else " overflowed (a mean loss past 700 nats), far past"
    )
    return (
        f"the last training perplexity{figure} the vocabulary's size, {vocab_size:,}, which a uniform guess "
        f"scores: the model predicts worse than one that knows nothing, as after exploding gradients; {fix} "
        f"(now {train.lr:g})"
    )


# last_weights_note: a last validation this many times its best's is said to have risen
RISEN_PAST_BEST = 1.1


def validated_at(record: EpochRecord) -> str:
    """Where a metrics line's validation was: ``epoch 21`` at an epoch's end, ``step 4,000`` inside one."""
    return f"epoch {int(record.epoch):,}" if record.epoch == int(record.epoch) else f"step {record.step:,}"


def last_weights_note(last: EpochRecord, best: EpochRecord, patience: int) -> str | None:
    """The run's closing samples and summary are its last weights', while predict and eval read its best
    checkpoint, an earlier validation's: said where they differ (learner41: an RNN's closing sample and
    its predict a second later read nothing alike, the best 129 epochs older), with the rise since the
    best where validation has climbed past it and nothing stops a run for it."""
    if last is best or last.val_ppl is None or best.val_ppl is None or best.is_start:
        return None  # a fine-tuning run's start kept as its best: its closing note says so
    note = (
        f"the samples above are the last weights' ({validated_at(last)}, validation perplexity "
        f"{format_perplexity(last.val_ppl, 4)}); drnn predict and drnn eval read {BEST}, the weights of "
        f"{validated_at(best)} ({format_perplexity(best.val_ppl, 4)})"
    )
    if last.val_ppl >= RISEN_PAST_BEST * best.val_ppl and not patience:
        note += (
            f": validation has risen {percent(last.val_ppl / best.val_ppl - 1)} since, as it does once a "
            "model memorises its training text; train.patience N ends a run after N validations without a "
            "better one"
        )
    return note


def blank_samples_note(samples: dict[str, str], train: TrainConfig, token: str) -> str | None:
    """Samples whose continuation is whitespace alone read as if training wrote nothing (an undertrained
    character model's 50 spaces after "time traveller"): said, with what it means, as predict says it."""
    generated = train.sample_chars
    if token != "char" or generated == 0:  # a word model's continuation is words, never whitespace alone
        return None
    read = {prefix: blank_continuation(text[-generated:]) for prefix, text in samples.items()}
    blank = {prefix: what for prefix, what in read.items() if what is not None}
    if not blank:
        return None
    what = next(iter(blank.values())) if len(set(blank.values())) == 1 else "whitespace alone"
    return (
        f"the {'samples' if len(blank) > 1 else 'sample'} of {', '.join(map(repr, blank))} "
        f"{'continue' if len(blank) > 1 else 'continues'} with {what} and nothing else: greedy decoding "
        "took whitespace for the likeliest next character every time, as an undertrained model does "
        "(train it longer)"
    )
