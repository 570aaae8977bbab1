"""Where a training session starts: the run's own last checkpoint (``--resume``), another run's
weights (``--init-from``), or neither; what each may change in the config, and what it fixes for the
data stage (the vocabulary, the text's SHA-1, the best perplexity kept on disk). A fine-tuned model's
bases are followed here too: which of a held-out split's tokens they trained on is said as the
fine-tuning starts and again by drnn eval (the last three sections, which could be a module of their own)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from pydantic import BaseModel, TypeAdapter, ValidationError

from drnn_cli.batches import PlannedLength, training_split_end
from drnn_cli.checkpoint import (
    BASES_FOLLOWED,
    BaseChain,
    BaseRecord,
    ChainCut,
    Checkpoint,
    CheckpointInfo,
    CorruptCheckpoint,
    load_checkpoint,
    read_checkpoint_info,
    trained_point,
)
from drnn_cli.config import (
    Config,
    ConfigError,
    DataConfig,
    build_config,
    load_config,
    parse_override,
)
from drnn_cli.data import Dataset
from drnn_cli.errors import DrnnError, UsageError
from drnn_cli.files import require_regular_file
from drnn_cli.run_files import BEST, LAST
from drnn_cli.run_notes import SPLIT_WORDS
from drnn_cli.rundir import (
    DEFAULT_RUNS_ROOT,
    holds_run,
    is_latest_marker,
    latest_run,
    run_checkpoint,
    waiting_replacement_note,
)
from drnn_cli.shown_text import percent
from drnn_cli.vocab import Vocab

# --init-from's default --max-unknown: the share of the tokens a run uses that its vocabulary may lack
DEFAULT_MAX_UNKNOWN = 0.01

# Model keys that change the shapes or meaning of the weights; the rest (dropouts, init, impl) may
# differ between a checkpoint and a run fine-tuned from it (--init-from). A --resume also keeps
# model.impl (the same computation) and model.init (RESUME_NOTED_KEYS says why).
ARCHITECTURE_KEYS = (
    "cell",
    "hidden_size",
    "num_layers",
    "embedding_dim",
    "nonlinearity",
    "tie_weights",
    "cell_form",
)
TOKEN_KEYS = ("preprocess", "token")
# What the weights and vocabulary of a checkpoint fix, as (section, key): a run fine-tuned from one takes
# these from it.
WEIGHT_SHAPE_KEYS = (*(("model", key) for key in ARCHITECTURE_KEYS), *(("data", key) for key in TOKEN_KEYS))
# Data keys that decide which tokens form the splits: a resumed run must see the same ones. Which
# text is not among them: the corpus is checked by its SHA-1 once loaded, so a moved file resumes.
SPLIT_KEYS = (
    "preprocess",
    "token",
    "max_tokens",
    "min_freq",
    "val_fraction",
    "test_fraction",
)
# What a resumed run must keep so that it continues the same computation: the splits, the minibatch
# layout (a mid-epoch checkpoint carries the state of its rows), the optimizer (its state is restored
# as saved) and the seed (it drives the batching of the remaining epochs).
RESUME_DATA_KEYS = (*SPLIT_KEYS, "batch_size", "num_steps", "sampling")
RESUME_TRAIN_KEYS = ("optimizer", "momentum", "weight_decay", "seed")
# What a resume may change that changes the training from there on: said in a note, not refused. The
# other train keys are how long, how often and where (epochs, budgets, cadences, device), changed
# freely; model.init does nothing to a run that loads its weights, so a resume keeps it too.
RESUME_NOTED_KEYS = {
    "model": (
        "dropout",
        "input_dropout",
        "output_dropout",
        "dropout_kind",
        "embedding_dropout",
        "weight_drop",
    ),
    "train": (
        *("lr", "schedule", "warmup_epochs", "step_size", "gamma", "min_lr", "clip", "reset_state"),
        *("ar", "tar", "average", "average_decay", "average_start", "precision"),
        "eval_tokens",  # the best so far was measured on other tokens: it starts over (best_restarts)
    ),
}
# The held-out splits, as Splits names them (SPLIT_WORDS says them: "validation", "test")
HELD_OUT_SPLITS = ("val", "test")


# ---------------------------------------------------------------------------------------------
# What the command line may set: the config a session starts with


def load_start_config(
    path: Path | None,
    overrides: Sequence[str],
    init_from: Path | None,
    runs_root: Path = DEFAULT_RUNS_ROOT,
) -> Config:
    """The resolved config (``load_config``). Under ``--init-from``, a config that fails its own checks
    is first searched for ``--set`` keys the checkpoint fixes, refused by name: the config's own advice
    ("model.tie_weights needs model.embedding_dim equal to model.hidden_size") would lead to a key the
    checkpoint refuses next, its values being the file's, not the checkpoint's."""
    try:
        config = load_config(path, overrides)
    except ConfigError:
        if init_from is not None:
            _refuse_sets_the_checkpoint_fixes(overrides, init_from, runs_root)
        raise
    if path is not None and "data.path" not in given_keys(overrides):  # a --set's is the command line's
        _check_text_not_beside_config(config, path)
    return config


def _check_text_not_beside_config(config: Config, path: Path) -> None:
    """A relative ``data.path`` of a config file is read from the current directory; where no such file
    is there but one is beside the config file, which is where its writer meant (own40: "does not exist"
    alone, run from another directory), the refusal says so and how to name it."""
    text = config.data.file
    if text is None or text.is_absolute() or text.exists():
        return
    beside = path.parent / text
    if beside.is_file():
        raise DrnnError(
            f"data.path {text} is not in the current directory, where relative names are read from, but "
            f"{beside} is beside the config file {path}: run drnn from {path.parent}, or give data.path as "
            f"{os.path.abspath(beside)}"
        )


def _refuse_sets_the_checkpoint_fixes(overrides: Sequence[str], init_from: Path, runs_root: Path) -> None:
    """The refusal :func:`take_weight_shape` would make, for a config that fails before it gets there
    (:func:`load_start_config` says why); nothing where no checkpoint can be read to compare with."""
    try:
        source = resolve_init_source(init_from, runs_root)
        saved = read_checkpoint_info(source).config
    except DrnnError:
        return  # no checkpoint to compare with: the config's own error comes first
    given = given_values(overrides)
    differences = {}
    for section, key in WEIGHT_SHAPE_KEYS:
        dotted = f"{section}.{key}"
        if dotted not in given:
            continue
        typed = _as_the_field_reads(section, key, given[dotted])  # "'128'" is 128, as the config reads it
        if typed is not _UNREADABLE and typed != _setting(saved, dotted):
            differences[dotted] = (_setting(saved, dotted), given[dotted])
    if differences:
        raise _refuse_fixed(f"cannot initialise from {source}", _describe_fixed(differences))


_UNREADABLE = object()  # a --set value its field refuses: the config's own error names it


def _as_the_field_reads(section: str, key: str, value: object) -> object:
    """``value`` as the config's field validates it (its type and bounds), or ``_UNREADABLE``."""
    schema = Config.model_fields[section].annotation
    assert isinstance(schema, type) and issubclass(schema, BaseModel)
    try:
        return TypeAdapter(schema.model_fields[key].rebuild_annotation()).validate_python(value)
    except ValidationError:
        return _UNREADABLE


def given_values(overrides: Sequence[str]) -> dict[str, object]:
    """The value each dotted key is ``--set`` to last, as parsed: ``model={dropout: 0.3}`` sets
    ``model.dropout``; a section set to anything but a mapping is keyed by its name. A key (or
    section) set to null is not given: it is as if the command line never set it (README
    "Configuration"), so a checkpoint's value applies where the checkpoint fixes it."""
    values: dict[str, object] = {}
    for text in overrides:
        parts, value = parse_override(text)
        pairs = (
            [(f"{parts[0]}.{key}", item) for key, item in value.items()]
            if len(parts) == 1 and isinstance(value, dict)
            else [(".".join(parts), value)]
        )
        for dotted, item in pairs:
            if item is None:  # the key and, for a section, its keys are no longer given
                values = {key: kept for key, kept in values.items() if not _within(key, dotted)}
            else:
                values[dotted] = item
    return values


def _within(key: str, dotted: str) -> bool:
    """Whether ``key`` is ``dotted`` or one of its keys (``model.dropout`` within ``model``)."""
    return key == dotted or key.startswith(dotted + ".")


def given_keys(overrides: Sequence[str]) -> frozenset[str]:
    """The dotted keys the command line's ``--set`` options give, and the sections they set whole."""
    return frozenset(given_values(overrides))


def take_weight_shape(
    config: Config, saved: Config, given: frozenset[str], refusal: str
) -> tuple[Config, list[str]]:
    """``config`` with the architecture and tokens of ``saved``, a checkpoint's config, for each such key
    the command line did not ``--set``; and the keys it took. Only the config file's values give way: a
    ``--set`` of one that differs from the checkpoint's is refused by name, ``refusal`` saying what
    cannot be done ("cannot initialise from runs/base/best.safetensors")."""
    tree, saved_tree = config.to_dict(), saved.to_dict()
    taken, contradicted = [], []
    for section, key in WEIGHT_SHAPE_KEYS:
        if tree[section][key] == saved_tree[section][key]:
            continue
        dotted = f"{section}.{key}"
        if dotted in given or section in given:
            contradicted.append(dotted)
        else:
            tree[section][key] = saved_tree[section][key]
            taken.append(dotted)
    if contradicted:
        raise _refuse_fixed(refusal, _describe_differences(saved, config, contradicted))
    if not taken:
        return config, []
    try:
        return build_config(tree), taken
    except ConfigError as exc:  # e.g. the checkpoint's hidden size under this config's impl: fused
        problem = str(exc).removeprefix("config error: ")
        raise DrnnError(
            f"{refusal}: the checkpoint's settings ({_describe_settings(saved, taken)}) do not fit the rest "
            f"of this config ({problem}); the checkpoint fixes {', '.join(taken)}: change the rest to fit"
        ) from None


def differing_keys(old: Config, new: Config, section: str, keys: tuple[str, ...]) -> list[str]:
    """The dotted names (``train.lr``) of those of ``section``'s ``keys`` whose values differ."""
    before, after = getattr(old, section), getattr(new, section)
    return [f"{section}.{key}" for key in keys if getattr(before, key) != getattr(after, key)]


def _setting(config: Config, dotted: str) -> object:
    section, key = dotted.split(".")
    return getattr(getattr(config, section), key)


def _describe_differences(old: Config, new: Config, keys: list[str]) -> str:
    return _describe_fixed({key: (_setting(old, key), _setting(new, key)) for key in keys})


def _describe_fixed(differences: dict[str, tuple[object, object]]) -> str:
    """``model.hidden_size (128 in the checkpoint, 256 now)``, for each key: (the checkpoint's, now)."""
    return ", ".join(
        f"{key} ({saved!r} in the checkpoint, {now!r} now)" for key, (saved, now) in differences.items()
    )


def _refuse_fixed(refusal: str, described: str) -> ConfigError:
    return ConfigError(
        f"{refusal}: {described}; the checkpoint's weights and vocabulary fix these: drop those --set options"
    )


def _describe_changes(old: Config, new: Config, keys: list[str]) -> str:
    return ", ".join(f"{key} {_setting(old, key)!r} → {_setting(new, key)!r}" for key in keys)


def _describe_settings(config: Config, keys: list[str]) -> str:
    return ", ".join(f"{key} {_setting(config, key)!r}" for key in keys)


# ---------------------------------------------------------------------------------------------
# Where a session starts


@dataclass(frozen=True)
class StartPoint:
    """What a session starts from: the run's own last checkpoint (``--resume``), another run's
    weights (``--init-from``), or neither; and what that fixes for the config and the data stage."""

    config: Config  # the config as given, with what a fine-tuned run takes from its checkpoint
    resume: Checkpoint | None = None
    init_from: Checkpoint | None = None
    init_label: str | None = None  # the --init-from checkpoint's absolute path, recorded in the run
    bases: BaseChain | None = None  # that checkpoint and its own bases as they stand (chain_from)
    init_source: Path | None = None  # that checkpoint as the command named it, for notes
    best_kept: float | None = None  # the perplexity of `best` on disk, which a worse model never replaces
    # a resume whose validation reads other tokens (train.eval_tokens changed): the best so far and
    # patience's count were measured on the old ones, and start over
    best_restarts: bool = False
    changes: str | None = None  # a note on settings changed (RESUME_NOTED_KEYS), taken or ignored (min_freq)

    @property
    def init_from_at(self) -> str | None:
        """Where the ``--init-from`` checkpoint's training stood (trained_point), recorded in the run: as
        the read that loaded its weights found it (a second read could find a base written since: rev39c)."""
        return None if self.init_from is None else self.init_from.read_at

    @property
    def vocab(self) -> Vocab | None:
        """The checkpoint's vocabulary, resumed or fine-tuned from, which the text is encoded with."""
        checkpoint = self.resume if self.resume is not None else self.init_from
        return None if checkpoint is None else checkpoint.vocab

    @property
    def expected_sha1(self) -> str | None:
        """The SHA-1 of the file a resumed run was trained on."""
        return None if self.resume is None else self.resume.corpus_sha1

    @property
    def expected_text_sha1(self) -> str | None:
        """…and of its text as read (None: a checkpoint that predates it)."""
        return None if self.resume is None else self.resume.text_sha1


# ---------------------------------------------------------------------------------------------
# --resume: the run's own last checkpoint


def resume_point(
    run_dir: Path,
    config: Config,
    device: torch.device,
    given: frozenset[str] = frozenset(),
    init_from: Path | None = None,
) -> StartPoint:
    """``--resume``: the run's last checkpoint, refused if the config changed what it cannot change.

    A run fine-tuned with ``--init-from`` took its architecture and tokens from its source's
    checkpoint (``init_point``); resumed, it takes them again, from its own, unless ``--set``
    (``given``) names them. ``init_from``: the command also names ``--init-from`` ("the same command
    plus --resume", as an interrupted fine-tuning run advises), noted; refused for a run that started
    from scratch, which the user may have meant to fine-tune.
    """
    checkpoint = _last_checkpoint(run_dir, device)
    said = [] if init_from is None else [_init_from_on_resume(run_dir, checkpoint, init_from)]
    if checkpoint.init_from is not None:
        config, _ = take_weight_shape(config, checkpoint.config, given, f"cannot resume {run_dir}")
    _check_resumable(run_dir, checkpoint, config)
    # After a hard crash `best` can be newer than `last`: never let a worse model replace it.
    best = run_dir / BEST
    best_kept = None
    if best.is_file():
        try:
            best_kept = read_checkpoint_info(best).best_val_ppl  # the header is enough
        except CorruptCheckpoint as unreadable:  # last is whole: a cut-short best must not stop the resume
            said.append(
                f"{unreadable.problem}; the resumed run keeps its own best, and its next validation better "
                f"than that replaces {best} (until then predict and eval cannot read it)"
            )
    noted = [
        key
        for section, keys in RESUME_NOTED_KEYS.items()
        for key in differing_keys(checkpoint.config, config, section, keys)
    ]
    best_restarts = "train.eval_tokens" in noted
    said += _resume_change_notes(checkpoint.config, config, noted)
    return StartPoint(
        config,
        resume=checkpoint,
        best_kept=None if best_restarts else best_kept,
        changes="; ".join(said) or None,
        best_restarts=best_restarts,
    )


def _last_checkpoint(run_dir: Path, device: torch.device) -> Checkpoint:
    """The run's ``last`` checkpoint, loaded; each refusal names the way on that this run has (its
    ``best`` can seed a new run, or be copied over a corrupt ``last``)."""
    last, best = run_dir / LAST, run_dir / BEST
    if not os.path.lexists(last):  # a name that is no file (a folder, a pipe) is refused below, by name
        if best.is_file():  # killed before its first `last`: its best can seed a new run
            raise DrnnError(
                f"nothing to resume: {last} does not exist (the run stopped before its first one); start "
                f"over with --overwrite, or from its best weights with --init-from {run_dir} --run NEW_DIR"
            )
        raise DrnnError(f"nothing to resume: {last} does not exist; drop --resume to start a new run")
    # "pick another file" is no way on: --resume reads this one
    earlier = f"resume from its best checkpoint instead (cp {best} {last}), or " if best.is_file() else ""
    require_regular_file(last, "checkpoint", f"{earlier}start over with --overwrite")
    try:
        return load_checkpoint(last, device)
    except CorruptCheckpoint as corrupt:
        raise DrnnError(f"{corrupt.problem}; {earlier}start over with --overwrite") from None


def _init_from_on_resume(run_dir: Path, checkpoint: Checkpoint, init_from: Path) -> str:
    """The note on an ``--init-from`` given with ``--resume``, which applies only where a run starts;
    a UsageError for a run that started from scratch, which the user may have meant to fine-tune."""
    if checkpoint.init_from is None:
        raise UsageError(
            f"--resume continues {run_dir}, which started from scratch: --init-from {init_from} does not "
            "apply to it; drop --init-from to resume it, or fine-tune into a new run with --run NEW_DIR"
        )
    return (
        f"--resume continues {run_dir} from its last checkpoint; --init-from applies where a run starts "
        f"(this one started from {checkpoint.init_from})"
    )


def _check_resumable(run_dir: Path, checkpoint: Checkpoint, config: Config) -> None:
    """Refuses a resume whose config changed what continues the same computation (the architecture,
    the splits and minibatch layout, the optimizer and seed), or whose corpus is not where it names."""
    saved = checkpoint.config
    changed = differing_keys(saved, config, "model", (*ARCHITECTURE_KEYS, "impl", "init"))
    changed += differing_keys(saved, config, "data", RESUME_DATA_KEYS)
    if checkpoint.corpus_sha1 is None and not _same_corpus_named(saved, config):
        changed.append("data.path")  # a checkpoint too old to know its text's SHA-1: the name must do
    changed += differing_keys(saved, config, "train", RESUME_TRAIN_KEYS)
    if config.train.optimizer == "adamw":  # its parameter groups (biases decayed or not) resume as saved
        changed += differing_keys(saved, config, "train", ("decay_biases",))
    if changed:
        raise ConfigError(
            f"cannot resume {run_dir}: the config changed {_describe_differences(saved, config, changed)}; "
            f"restore {'it' if len(changed) == 1 else 'them'} or start a new run with --run DIR"
        )
    if config.data.file is not None and not config.data.file.exists():
        raise DrnnError(
            f"cannot resume {run_dir}: its corpus {config.data.path} is not there (moved, or on another "
            "machine); point at it with --set data.path=FILE (the text is checked by its SHA-1)"
        )


def _same_corpus_named(saved: Config, now: Config) -> bool:
    """Whether two configs name the same corpus: the same registry name, or the same file."""

    def where(config: Config) -> Path | None:
        return config.data.file.absolute() if config.data.file is not None else None

    return (saved.data.corpus, where(saved)) == (now.data.corpus, where(now))


def _resume_change_notes(saved: Config, config: Config, noted: list[str]) -> list[str]:
    """What a resume says of settings changed since its checkpoint that change the training from there
    on (``noted``: the RESUME_NOTED_KEYS that differ), and of a new length under a cosine schedule,
    which spans the run's length."""
    notes = []
    if noted:
        notes.append(
            f"--resume with settings changed since the checkpoint: {_describe_changes(saved, config, noted)} "
            "(the run trains on with them, and its config.yaml records them once it trains a step)"
            + (
                "; validation now reads other tokens, so the best checkpoint and patience start over at the "
                "run's next validation"
                if "train.eval_tokens" in noted
                else ""
            )
        )
    span = differing_keys(saved, config, "train", ("epochs", "max_steps"))
    if span and config.train.schedule == "cosine":
        notes.append(
            f"--resume with {_describe_changes(saved, config, span)} under train.schedule cosine: "
            "the schedule spans the run's length (train.epochs, or train.max_steps where it ends the run "
            "first), and where that length changes the rate at each remaining step changes with it (a longer "
            "run raises it again from where it had annealed: a warm restart)"
        )
    return notes


def longer_run_note(was: Config, now: Config, train_tokens: int) -> str | None:
    """A resume that plans more steps than the checkpoint's settings did (a resume without the first
    command's ``--set train.epochs=50`` trained 450 more epochs of lstm2 unsaid: learner34), with the
    ``--set`` that keeps the run's length. Planned in steps, as the run counts them: more epochs under a
    ``train.max_steps`` that still ends the run first are no longer run."""
    steps = [PlannedLength.of(config.train, config.data, train_tokens).steps for config in (was, now)]
    span = differing_keys(was, now, "train", ("epochs", "max_steps"))
    if steps[1] <= steps[0] or not span:
        return None
    keep = " ".join(f"--set {key}={_setting(was, key)}" for key in span)
    return (
        f"--resume with {_describe_changes(was, now, span)}: the run trains to its new length, "
        f"{steps[1]:,} steps where it planned {steps[0]:,} (to keep its length: --resume {keep})"
    )


# ---------------------------------------------------------------------------------------------
# --init-from: another run's weights


def resolve_init_source(source: Path, runs_root: Path = DEFAULT_RUNS_ROOT) -> Path:
    """``--init-from`` takes a run directory (its best/last checkpoint), a checkpoint file, or the
    latest-run marker (the run it names)."""
    if is_latest_marker(source, runs_root):
        source = latest_run(runs_root, instead="give --init-from a run directory or checkpoint file")
    if source.is_dir():
        return run_checkpoint(source)
    if not source.exists():
        raise DrnnError(
            f"--init-from {source}: no such run directory or checkpoint file; name a run (runs/NAME) or "
            "its .safetensors checkpoint"
        )
    return source


def init_point(
    init_from: Path,
    config: Config,
    device: torch.device,
    final_dir: Path,
    overwrite: bool,
    runs_root: Path,
    given: frozenset[str] = frozenset(),
) -> StartPoint:
    """``--init-from``: another run's weights, with the architecture and tokens they were trained with
    (README "Fine-tuning"): the config file's give way, with a note; a ``--set`` of one (``given``)
    that differs is refused by name. ``overwrite``: the new run replaces ``final_dir``, whose own
    checkpoints cannot seed it."""
    if init_from.resolve().is_relative_to(final_dir.resolve()) and not holds_run(final_dir):
        raise UsageError(
            f"--init-from {init_from} is the run directory this training creates (--run {final_dir}), which "
            "holds no weights yet; name another run or checkpoint"
        )
    source = resolve_init_source(init_from, runs_root)
    if overwrite and source.resolve().is_relative_to(final_dir.resolve()):
        raise UsageError(
            f"--init-from {init_from} is a checkpoint of the run --overwrite replaces: the new run "
            f"would record weights that no longer exist; train it beside the old one with --run NEW_DIR"
        )
    return _fine_tuning_from(source, config, device, given)


def fine_tuning_point(
    init_from: Path,
    config: Config,
    device: torch.device,
    runs_root: Path,
    given: frozenset[str] = frozenset(),
) -> StartPoint:
    """What ``--init-from`` would start a run from, for a preview of its data (``drnn data``): as
    :func:`init_point`, less its checks against the run directory, which a preview does not write."""
    return _fine_tuning_from(resolve_init_source(init_from, runs_root), config, device, given)


def _fine_tuning_from(
    source: Path, config: Config, device: torch.device, given: frozenset[str]
) -> StartPoint:
    checkpoint = load_checkpoint(source, device)
    adopted, taken = take_weight_shape(config, checkpoint.config, given, f"cannot initialise from {source}")
    notes = []
    if taken:
        notes.append(
            f"--init-from sets {_describe_changes(config, adopted, taken)}, as in the checkpoint (its weights "
            "and vocabulary fix them; the run's config.yaml records them)"
        )
    # a min_freq the config chose (a default 0 under a base of min_freq 3 was noted, never set by anyone)
    chosen = "data.min_freq" in given or config.data.min_freq != DataConfig.model_fields["min_freq"].default
    if chosen and config.data.min_freq != checkpoint.config.data.min_freq:
        notes.append(
            f"data.min_freq {config.data.min_freq} does not apply with --init-from: the run keeps the "
            f"checkpoint's vocabulary of {len(checkpoint.vocab):,} tokens"
        )
    waiting = waiting_replacement_note(source.parent, "--init-from takes")  # a killed --overwrite's newer run
    if waiting is not None:
        notes.append(waiting)
    label = str(source.resolve())
    return StartPoint(
        adopted,
        init_from=checkpoint,
        init_label=label,
        bases=chain_from(label, checkpoint),
        init_source=source,
        changes="; ".join(notes) or None,
    )


def check_max_unknown(max_unknown: float | None, init_from: Path | None) -> None:
    """``--max-unknown`` measures the text against a fixed vocabulary, which only ``--init-from`` has."""
    if max_unknown is not None and init_from is None:
        raise UsageError(
            "--max-unknown applies with --init-from (a fixed vocabulary the new text is measured against)"
        )


def unknown_share_note(dataset: Dataset, limit: float | None) -> str | None:
    """Fine-tuning keeps the checkpoint's vocabulary: the note on text it cannot spell (None: it can
    spell all of it), or a DrnnError where there is too much of it (``limit``: ``--max-unknown``; None:
    :data:`DEFAULT_MAX_UNKNOWN`).

    The share is of the tokens the run uses, all its splits (after ``data.max_tokens``), which are what a model
    fine-tuned on many ``<unk>`` would learn from; which tokens they are is known for the whole text.
    """
    if not dataset.unknown_count:
        return None
    limit = DEFAULT_MAX_UNKNOWN if limit is None else limit
    used = len(dataset.tokens)
    count = dataset.lacking_in()
    share = count / max(1, used)
    worst = ", ".join(f"{token!r} ×{n:,}" for token, n in dataset.unknown.most_common(5))
    where = " in the whole text" if used < dataset.total_tokens else ""
    # --init-from reads the text with the checkpoint's preprocessing already: what helps is the text itself
    # (its tokens replaced with ones the vocabulary holds) or a vocabulary of its own
    rewrite = "replace them in the text, or train a new model without --init-from (a vocabulary of its own)"
    if count == used:  # whatever --max-unknown says: a model of <unk> alone learns nothing, at perplexity 1
        raise DrnnError(
            f"none of the {used:,} tokens the run uses is in the checkpoint's vocabulary ({worst}{where}): "
            f"fine-tuning would learn to predict <unk> alone; {rewrite}"
        )
    if share > limit:
        raise DrnnError(
            f"{count:,} of the {used:,} tokens the run uses ({percent(share, unlike=limit)}) are not in the "
            f"checkpoint's vocabulary ({worst}{where}), above the allowed {percent(limit, unlike=share)}; raise "
            "--max-unknown, or "
            + (
                f"train a new model without --init-from (its vocabulary kept only tokens seen "
                f"{dataset.vocab.min_freq}+ times: data.min_freq {dataset.vocab.min_freq} made the rarer "
                "<unk> by design, on its own text too)"
                if dataset.vocab.min_freq > 1
                else rewrite
            )
        )
    if not count:
        return None
    return (
        f"{count:,} of the {used:,} tokens the run uses ({percent(share)}) are not in the vocabulary and "
        f"map to <unk> ({worst}{where})"
    )


# ---------------------------------------------------------------------------------------------
# A fine-tuned model's bases, as recorded or as read from their files


def base_chain(checkpoint: Checkpoint | CheckpointInfo) -> BaseChain:
    """``checkpoint``'s bases (:class:`BaseChain`): as its run recorded them when it started, else (a
    checkpoint written before drnn recorded them) as read from the bases' files while each is still the
    checkpoint the run after it started from, up to BASES_FOLLOWED of them."""
    if checkpoint.bases is not None:
        return checkpoint.bases
    records: list[BaseRecord] = []
    label: str | None = checkpoint.init_from
    expected_at = checkpoint.init_from_at
    whose: str | None = None  # the model fine-tuned from label: None, the chain's own
    while label is not None and len(records) < BASES_FOLLOWED:
        base = _base_header(label)
        if base is None:  # moved, gone or unreadable: the bases before it are all that is known
            break
        now = trained_point(base)
        if expected_at is not None and now != expected_at:
            return BaseChain(tuple(records), ChainCut(label, whose, expected_at, now))
        records.append(BaseRecord.of(label, base, now))
        if base.bases is not None:  # a base that recorded its own
            return _followed_by(tuple(records), base.bases)
        label, expected_at, whose = base.init_from, base.init_from_at, label
    return BaseChain(tuple(records))


def chain_from(label: str, checkpoint: Checkpoint) -> BaseChain:
    """What a run fine-tuned from ``checkpoint`` (at ``label``) records of its bases: that checkpoint,
    where its reading stood, then its own bases (:func:`base_chain`), where a cut among them now names
    the model it concerned (it said "the chain's own": ``checkpoint``)."""
    return _followed_by((BaseRecord.of(label, checkpoint, checkpoint.read_at),), base_chain(checkpoint))


def _followed_by(records: tuple[BaseRecord, ...], chain: BaseChain) -> BaseChain:
    """``records`` (nearest first), then ``chain``, the last record's own bases: up to BASES_FOLLOWED of
    them, where a cut in ``chain`` that concerned the chain's own model (``whose`` None) now names that
    last record's checkpoint, the model fine-tuned from the base cut."""
    cut = chain.cut
    if cut is not None and cut.whose is None:
        cut = replace(cut, whose=records[-1].label)
    return BaseChain((*records, *chain.records)[:BASES_FOLLOWED], cut)


def _base_header(label: str) -> CheckpointInfo | None:
    path = Path(label)
    try:
        return read_checkpoint_info(path) if path.is_file() else None
    except DrnnError:
        return None


def _as_it_stood(base: BaseRecord) -> str:
    """A base named by its path, and, where that file is another checkpoint now or none, which one it
    was (review rev40: the path of a base replaced since held a run that trained on none of the tokens)."""
    now = _base_header(base.label)
    if now is None:
        return f"{base.label} (as it stood at {base.at}; moved or deleted since)"
    if trained_point(now) != base.at:
        return f"{base.label} (as it stood at {base.at}; another checkpoint there now)"
    return base.label


def replaced_base_note(chain: BaseChain, whose: str) -> str | None:
    """Where reading a fine-tuned model's bases (``chain``) stopped at one resumed or replaced at its path
    since, in a checkpoint that did not record them: what it was and is, and that its training split no
    longer says whether this split is held out from it (prac39: a base replaced with another split left
    the optimistic figure unflagged). ``whose``: the model ``chain`` belongs to ("this model")."""
    cut = chain.cut
    if cut is None:
        return None
    return (
        f"{cut.label} is no longer the checkpoint {cut.whose or whose} was fine-tuned from (then at "
        f"{cut.then}; now at {cut.now}): whether its training text is held out here cannot be told "
        '(README "Fine-tuning")'
    )


# ---------------------------------------------------------------------------------------------
# Held-out tokens a base trained on: said as a fine-tuning starts


def fine_tuning_notes(start: StartPoint, dataset: Dataset) -> list[str]:
    """What a fine-tuning's start says of its bases and this text: shared tokens with the base
    (:func:`shared_text_note`) or the bases before it (:func:`earlier_bases_note`), and a base among
    those replaced since its own fine-tuning, whose text cannot be compared (:func:`replaced_base_note`)."""
    if start.init_from is None or start.bases is None:
        return []
    notes = (
        shared_text_note(start, dataset),
        earlier_bases_note(start, dataset),
        replaced_base_note(start.bases, str(start.init_source)),
    )
    return [note for note in notes if note]


def shared_text_note(start: StartPoint, dataset: Dataset) -> str | None:
    """Fine-tuning on the very text the checkpoint was trained on (its ``text_sha1``, else its
    ``corpus_sha1``): the note where the base run's training split and this run's held-out splits share
    tokens (the starting validation, the choice of best and the test figure are then optimistic), or
    this run's training split and the base run's held-out ones (the base run's held-out figures then
    mean nothing for the fine-tuned model); None where they share none, or the text is another (the
    bases before it: :func:`earlier_bases_note`).

    Both runs' splits are positions in the same tokens: ``--init-from`` takes ``data.preprocess`` and
    ``data.token`` from the checkpoint (:func:`take_weight_shape`), so the same text gives the same
    tokens, one per character or word whichever vocabulary encodes them; the base run's are the first
    ``data.max_tokens`` of them, cut by its own fractions (:func:`split_sizes`). A config whose token
    keys differ anyway (none reaches here) would cut other tokens: nothing is said. The two training
    splits both start at token 0, so only one of the two overlaps can occur. A different file that
    holds the base run's text cannot be told cheaply (README "Fine-tuning" warns of it)."""
    checkpoint, source = start.init_from, start.init_source
    if checkpoint is None or source is None or not _same_text(checkpoint, dataset):
        return None
    if differing_keys(checkpoint.config, start.config, "data", TOKEN_KEYS):
        return None
    saved = checkpoint.config.data
    trained, used = training_split_end(saved, dataset.total_tokens)
    splits = dataset.splits
    # this run's held-out splits' tokens in the base run's training split
    read = [share for split in HELD_OUT_SPLITS if (share := _held_out_share(trained, dataset, split)).shared]
    held_out = _overlap(splits.span("train"), (trained, used))  # the base's held-out text this run trains on
    same = f"the fine-tuning text (SHA-1 {dataset.sha1}) is the text {source} was trained on"
    if held_out:
        size = len(splits.train)
        return (
            f"{same}, and {held_out:,} of this run's {size:,} training tokens ({percent(held_out / size)}) "
            f"{'is' if held_out == 1 else 'are'} in the base run's held-out splits: the fine-tuned model trains on text the base run held out, so "
            "the base run's validation and test figures mean nothing for it; to train on none of the text it "
            f"held out (tokens {trained:,} to {used:,}), keep its data.max_tokens ({saved.max_tokens:,}), "
            f"data.val_fraction ({saved.val_fraction:g}) and data.test_fraction ({saved.test_fraction:g}), "
            # not their sum: two fractions are each rounded down, one once, and 1 token apart (prac34)
            'which cut the same splits (README "Fine-tuning")'
        )
    if not read:
        return None
    shares = " and ".join(
        share.counted(whose) for whose, share in zip(("this run's", "its"), read, strict=False)
    )
    # held-out text must be past every base's training split, not the direct base's alone (review rev40c:
    # "from token 7,000 on" left 2,500 held-out tokens in the training split of the base's own base)
    latest = max([trained, *_training_ends(start.bases, start.config, dataset)])
    whose = "the base run" if latest == trained else "the base run or the bases it was fine-tuned from"
    remedy = (
        f"hold out only text {whose} did not train on (from token {latest:,} on)"
        if latest < dataset.total_tokens
        else f"{whose} trained on all of it: measure the fine-tuned model on another text (drnn eval --data FILE)"
    )
    return (
        f"{same}, and {shares} {'is' if len(read) == 1 and read[0].shared == 1 else 'are'} in the base run's "
        f"training split: {_optimistic([share.split for share in read], 'the base model')}; {remedy} "
        '(README "Fine-tuning")'
    )


def earlier_bases_note(start: StartPoint, dataset: Dataset) -> str | None:
    """At a fine-tuning's start, for each held-out split: the base before the direct one that trained on
    more of its tokens than the direct base did (:func:`shared_text_note` says the direct base's), the
    one that trained on most named (drnn eval says the same of a split: :func:`base_trained_note`). A
    base fine-tuned on this text holding out more than the model it started from hides that model's
    training text from a comparison with the direct base alone (review rev40c: a validation split the
    direct base half trained on, wholly in its own base's training split, and a test split only that
    base trained on, were said as the half alone)."""
    source = start.init_source
    if start.bases is None or source is None:
        return None
    config = start.config
    # the base's own bases, as it recorded them or as they were read at the start
    direct, earlier = start.bases.records[:1], start.bases.records[1:]
    found = []
    for split in HELD_OUT_SPLITS:
        most = _most_shared(earlier, config, dataset, split)
        said = _most_shared(direct, config, dataset, split)
        if most is not None and (said is None or most.share.shared > said.share.shared):
            found.append(most)
    if not found:
        return None
    shares = " and ".join(
        f"{most.share.counted(whose)} {most.share.verb} in the training split of {_as_it_stood(most.base)}, "
        f"which {source} was fine-tuned from{most.in_turn}"
        for whose, most in zip(("this run's", "its"), found, strict=False)
    )
    optimistic = _optimistic([most.share.split for most in found], "an earlier model of this one")
    return f'{shares}, on this same text (SHA-1 {dataset.sha1}): {optimistic} (README "Fine-tuning")'


def _training_ends(bases: BaseChain | None, config: Config, dataset: Dataset) -> list[int]:
    """Where each recorded base on this same text, spelt as ``config`` spells it, ended its training split."""
    records = () if bases is None else bases.records
    return [
        training_split_end(base.data, dataset.total_tokens)[0]
        for base in records
        if _cut_this_text(base, config, dataset)
    ]


def _optimistic(splits: list[str], model: str) -> str:
    """What a fine-tuning's held-out ``splits`` ("val", "test") holding text ``model`` trained on makes
    optimistic: "the starting validation and the choice of best read text the base model trained on, so
    they are optimistic"."""
    figures = ["the starting validation", "the choice of best"] if "val" in splits else []
    figures += ["the test figure (drnn eval --split test)"] if "test" in splits else []
    listed = ", ".join(figures[:-1]) + f" and {figures[-1]}" if len(figures) > 1 else figures[0]
    one = len(figures) == 1
    return f"{listed} {'reads' if one else 'read'} text {model} trained on, so {'it is' if one else 'they are'} optimistic"


# ---------------------------------------------------------------------------------------------
# Held-out tokens a base trained on: said by drnn eval of a held-out split


def base_trained_note(chain: BaseChain, config: Config, dataset: Dataset, split: str) -> str | None:
    """``drnn eval --split val|test`` of a fine-tuned run whose base run (or the base's own base, as far
    as ``chain`` knows them) trained on the same text: the split's tokens a base trained on make the
    figure optimistic; the base that trained on most of them is named. Said as the run started too
    (:func:`shared_text_note`), then never again (ft33). None where no base trained on this text, or
    none on this split's tokens."""
    if split not in HELD_OUT_SPLITS:
        return None
    most = _most_shared(chain.records, config, dataset, split)
    if most is None:
        return None
    return (
        f"{most.share.counted('the')} {most.share.verb} in the training split of {_as_it_stood(most.base)}, "
        f"which this model was fine-tuned from{most.in_turn} on this same text: this perplexity is optimistic "
        '(README "Fine-tuning")'
    )


def trained_on_split_note(
    scored: BaseRecord, chain: BaseChain, config: Config, dataset: Dataset, split: str
) -> str | None:
    """``drnn eval --splits-of RUN --split val|test`` of a checkpoint (``scored``, its bases ``chain``)
    that, or whose base, trained on this same text, cut its own way: the split's tokens it trained on
    make its figure optimistic, which the other run's counts cannot say (review recheck38: a base trained
    on all of a fine-tuned run's validation split was scored on it without a word). None where none of
    them trained on them."""
    if split not in HELD_OUT_SPLITS:
        return None
    most = _most_shared((scored, *chain.records), config, dataset, split)
    if most is None:
        return None
    itself = most.followed == 1  # the checkpoint scored, not one of its bases
    whose = "the checkpoint scored" if itself else "a run the checkpoint scored was fine-tuned from"
    named = most.base.label if itself else _as_it_stood(most.base)
    return (
        f"{most.share.counted('the')} {most.share.verb} in the training split of {named} ({whose}) on this "
        "same text: this perplexity is optimistic"
    )


# ---------------------------------------------------------------------------------------------
# Which of this text's tokens a base trained on


@dataclass(frozen=True)
class _HeldOutShare:
    """How many of a held-out split's tokens (``split``: "val" or "test") a base's training split holds."""

    split: str
    shared: int
    size: int  # the split's tokens

    def counted(self, whose: str) -> str:
        """``1,200 of this run's 5,000 validation tokens (24%)``, ``whose`` saying whose split it is."""
        words = SPLIT_WORDS[self.split]
        return f"{self.shared:,} of {whose} {self.size:,} {words} tokens ({percent(self.shared / self.size)})"

    @property
    def verb(self) -> str:
        return "is" if self.shared == 1 else "are"


def _held_out_share(trained: int, dataset: Dataset, split: str) -> _HeldOutShare:
    """Of ``split``'s tokens, those in a training split that ends at token ``trained`` of this same text
    (every run's training split starts at token 0)."""
    span = dataset.splits.span(split)
    return _HeldOutShare(split, _overlap((0, trained), span), span[1] - span[0])


@dataclass(frozen=True)
class _MostShared:
    """The base, of those searched, whose training split holds most of a held-out split's tokens."""

    share: _HeldOutShare
    base: BaseRecord
    followed: int  # its place among the bases searched, from 1

    @property
    def in_turn(self) -> str:
        """``" in turn"`` where the base is not the first searched but a base's own base."""
        return " in turn" if self.followed > 1 else ""


def _most_shared(
    records: tuple[BaseRecord, ...], config: Config, dataset: Dataset, split: str
) -> _MostShared | None:
    """Of ``records``, the base whose training split holds most of ``split``'s tokens of this same text
    (read with ``config``'s token keys), the first of any tied; None where none holds any."""
    most: _MostShared | None = None
    for followed, base in enumerate(records, start=1):
        if _cut_this_text(base, config, dataset):
            share = _held_out_share(training_split_end(base.data, dataset.total_tokens)[0], dataset, split)
            if share.shared and (most is None or share.shared > most.share.shared):
                most = _MostShared(share, base, followed)
    return most


def _cut_this_text(base: BaseRecord, config: Config, dataset: Dataset) -> bool:
    """Whether ``base``'s splits are positions in ``dataset``'s tokens: it trained on this same text,
    cut into tokens as ``config`` cuts it (its token keys)."""
    spelt_alike = all(getattr(base.data, key) == getattr(config.data, key) for key in TOKEN_KEYS)
    return spelt_alike and _same_text(base, dataset)


def _same_text(checkpoint: Checkpoint | CheckpointInfo | BaseRecord, dataset: Dataset) -> bool:
    """Whether ``dataset`` is the text the checkpoint recorded: as read, or failing that as bytes."""
    if checkpoint.text_sha1 is not None and dataset.text_sha1 is not None:
        return checkpoint.text_sha1 == dataset.text_sha1
    return checkpoint.corpus_sha1 is not None and checkpoint.corpus_sha1 == dataset.sha1


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> int:
    """How many positions the spans ``[start, stop)`` share."""
    return max(0, min(a[1], b[1]) - max(a[0], b[0]))
