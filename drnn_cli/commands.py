"""What each command does, as library calls: the CLI parses and renders, these do the work."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from drnn_cli.batches import MIN_EVAL_TOKENS, Splits, check_trainable, epoch_batches
from drnn_cli.checkpoint import Checkpoint, load_checkpoint
from drnn_cli.config import Config, DataConfig, load_config
from drnn_cli.corpus import ProgressHook
from drnn_cli.data import CorpusMismatch, Dataset, encode_text, load_dataset, local_vocab_size
from drnn_cli.decode import DecodeOptions, continue_prefix, prefix_tokens
from drnn_cli.errors import DrnnError
from drnn_cli.evaluate import Perplexity, evaluate
from drnn_cli.files import remove_stale_temporaries, require_regular_file
from drnn_cli.models import RNNLanguageModel, build_model, count_parameters
from drnn_cli.presets import Preset, list_presets
from drnn_cli.report import Reporter, TrainResult
from drnn_cli.run_files import BEST, LAST, LOCK_NAME, RunFiles
from drnn_cli.rundir import (
    DEFAULT_RUNS_ROOT,
    RunLock,
    check_replaceable,
    check_run_dir,
    default_run_dir,
    discard,
    holds_run,
    is_latest_marker,
    mark_latest,
    mark_run_dir,
    recorded_latest,
    resolve_checkpoint,
    restore_latest,
    staging_dir,
    swap_in,
)
from drnn_cli.runtime import DistContext, init_distributed, resolve_device, shutdown_distributed
from drnn_cli.start_point import StartPoint, init_point, resume_point
from drnn_cli.train import RESUME_ADVICE, Trainer
from drnn_cli.trainer_state import TrainerState, UnusableTrainerState
from drnn_cli.vocab import UNK, Vocab, count_index

OVERWRITE_RESUME_ADVICE = "the same command with --resume in place of --overwrite"


# ---------------------------------------------------------------------------------------------
# drnn data


@dataclass(frozen=True)
class DataReport:
    dataset: Dataset
    train_batches: int
    untrainable: str | None = None  # why `drnn train` would refuse this data, in its words

    def summary(self) -> dict:
        return self.dataset.summary()


def describe_data(config: Config, progress: ProgressHook | None = None) -> DataReport:
    dataset = load_dataset(config.data, progress=progress)
    data = config.data
    try:
        check_trainable(len(dataset.splits.train), data.batch_size, data.num_steps)
    except DrnnError as refused:
        return DataReport(dataset, 0, str(refused))  # described all the same; `drnn train` refuses it
    return DataReport(dataset, len(epoch_batches(dataset.splits.train, data, config.train.seed, 0)))


# ---------------------------------------------------------------------------------------------
# drnn presets


@dataclass(frozen=True)
class PresetReport:
    """A preset with its model size: the vocabulary (and so the parameter count) is known only when
    the preset's corpus is already on disk, because describing presets never downloads."""

    preset: Preset
    config: Config
    vocab_size: int | None
    parameters: int | None

    def summary(self) -> dict:
        model = self.config.model
        return {
            "name": self.preset.name,
            "description": self.preset.description,
            "cell": model.cell,
            "num_layers": model.num_layers,
            "hidden_size": model.hidden_size,
            "embedding_dim": model.embedding_dim,
            "vocab_size": self.vocab_size,
            "parameters": self.parameters,
            "measured": self.preset.measured,
            "path": str(self.preset.path),
        }


def describe_presets(root: Path | None = None) -> list[PresetReport]:
    reports = []
    vocab_sizes: dict[tuple, int | None] = {}  # the presets mostly share one corpus: read it once
    for preset in list_presets(root):
        config = load_config(preset.path)
        data = config.data
        key = (data.path, data.corpus, data.preprocess, data.token, data.min_freq)
        if key not in vocab_sizes:
            vocab_sizes[key] = local_vocab_size(data)
        vocab_size = vocab_sizes[key]
        parameters = None
        if vocab_size is not None:
            parameters = count_parameters(build_model(vocab_size, config.model))
        reports.append(PresetReport(preset, config, vocab_size, parameters))
    return reports


# ---------------------------------------------------------------------------------------------
# drnn train


# With --init-from: the largest share of the new text's tokens that may fall outside the vocabulary.
DEFAULT_MAX_UNKNOWN = 0.01


@dataclass(frozen=True)
class TrainRequest:
    config_path: Path
    overrides: tuple[str, ...] = ()
    run_dir: Path | None = None
    device: str | None = None
    resume: bool = False
    init_from: Path | None = None
    max_unknown_fraction: float | None = None  # with init_from; None: DEFAULT_MAX_UNKNOWN
    overwrite: bool = False
    runs_root: Path = DEFAULT_RUNS_ROOT  # holds runs/<config stem> and the latest-run marker


def train_run(
    request: TrainRequest,
    reporter: Reporter | None = None,
    progress: ProgressHook | None = None,
) -> TrainResult:
    """Everything ``drnn train`` does: config, run directory, lock, data, model, loop."""
    if request.resume and request.init_from is not None:
        raise DrnnError(
            "--resume and --init-from cannot be combined: --resume continues this run (weights, optimizer, "
            "epoch), --init-from starts a new run from another run's weights"
        )
    if request.max_unknown_fraction is not None and request.init_from is None:
        raise DrnnError(
            "--max-unknown applies with --init-from (a fixed vocabulary the new text is measured against)"
        )
    if request.resume and request.overwrite:
        raise DrnnError(
            "--resume and --overwrite cannot be combined: --resume continues the run in the run directory, "
            "--overwrite replaces it with a new one; pick one"
        )
    overrides = request.overrides
    if request.device is not None:
        overrides = (*overrides, f"train.device={request.device}")  # validated like the config key
    config = load_config(request.config_path, overrides)
    if config.data.file is not None:  # the run keeps an absolute path: eval and --resume work from anywhere
        config.data.path = str(config.data.file.absolute())
    run_dir = (
        request.run_dir
        if request.run_dir is not None
        else default_run_dir(request.config_path, request.runs_root)
    )
    dist = init_distributed(config.train.device)
    finished = False
    try:
        device = resolve_device(
            config.train.device, dist.local_rank, "--device" if request.device is not None else "train.device"
        )
        if dist.is_main:
            if is_latest_marker(run_dir, request.runs_root):
                given = (
                    f"--run {run_dir}"
                    if request.run_dir is not None
                    else f"the run directory {run_dir} (named after the config {request.config_path.name})"
                )
                raise DrnnError(
                    f"{given} is the file where drnn records the latest run; pick another name with --run DIR"
                )
            check_run_dir(run_dir)
        # the outermost folder this run creates (runs/ itself, on a first run): removed again, if empty,
        # by a run that fails before writing anything
        created = next((p for p in (*reversed(run_dir.parents), run_dir) if not p.exists()), None)
        lock = RunLock(run_dir) if dist.is_main else None
        if lock is not None:
            lock.acquire()
        try:
            job = _TrainJob(request, config, device, dist, reporter, progress)
            result = _train_in_place_or_staged(job, run_dir)
            finished = True
            return result
        finally:
            if lock is not None:
                # removed while the lock is held: released first, another training could take the
                # lock and then lose its lock file (and the folder) to this removal
                try:
                    if (
                        created is not None
                        and run_dir.is_dir()
                        and not (set(os.listdir(run_dir)) - {LOCK_NAME})
                    ):
                        _remove_created(run_dir, created)  # a run that failed before writing leaves nothing
                finally:
                    lock.release()
    finally:
        shutdown_distributed(dist, finished)


def _remove_created(run_dir: Path, created: Path) -> None:
    """Remove ``run_dir`` (its lock at most) and its parents up to ``created`` while they are empty."""
    shutil.rmtree(run_dir, ignore_errors=True)
    for folder in run_dir.parents:
        if not folder.is_relative_to(created):
            break
        try:
            folder.rmdir()  # only if empty: another run may have appeared there meanwhile
        except OSError:
            break


@dataclass(frozen=True)
class _TrainJob:
    """What one ``drnn train`` brings to the run directory: the request, its config and where it runs."""

    request: TrainRequest
    config: Config
    device: torch.device
    dist: DistContext
    reporter: Reporter | None
    progress: ProgressHook | None


def _train_in_place_or_staged(job: _TrainJob, run_dir: Path) -> TrainResult:
    """Train into ``run_dir``, or, for ``--overwrite`` of an existing run, beside it and swap on success."""
    request, dist = job.request, job.dist
    if dist.is_main:
        remove_stale_temporaries(run_dir)  # left by a killed writer; we hold the lock, so none is live
    if not request.resume and holds_run(run_dir) and not request.overwrite:
        raise DrnnError(
            f"run directory {run_dir} already holds a run; continue it with --resume, pick another with --run DIR, "
            f"or replace it with --overwrite"
        )
    if request.resume or not holds_run(run_dir):
        return _train_locked(job, run_dir, run_dir)
    # A --run that is a symlink: the run it points at is replaced (on its own disk), the link kept.
    target = run_dir.resolve() if run_dir.is_symlink() else run_dir
    check_replaceable(target)
    # Every torchrun rank trains "into" the staging directory (rank 0 alone writes); rank 0 alone
    # moves directories, so that no rank removes what another is about to swap in.
    staging = staging_dir(target)
    if dist.is_main:
        discard(staging)  # a leftover of an earlier replacement that was killed
    try:
        result = _train_locked(job, staging, run_dir)
    except BaseException as error:  # a stop, a failure, a signal outside the loop, an out-of-memory...
        if not holds_run(staging):
            raise  # nothing new to keep: the old run stays as it was (the finally below removes staging)
        if dist.is_main:  # ...after the new run's first checkpoint: that run is the one to resume
            swap_in(staging, target)
        if not isinstance(error, DrnnError):
            raise
        message = str(error).replace(str(staging), str(run_dir))
        replaced = f" (the new run has replaced the previous one in {run_dir})"
        raise type(error)(message + replaced, error.exit_code) from None
    finally:
        if dist.is_main and staging.exists() and holds_run(target) and not holds_run(staging):
            discard(staging)
    if dist.is_main:
        swap_in(staging, target)
    return replace(result, run_dir=run_dir)


def _train_locked(job: _TrainJob, run_dir: Path, final_dir: Path) -> TrainResult:
    """Load the data and model for ``run_dir`` (the run's own directory or its staging copy) and train."""
    request, config, device, dist, reporter = job.request, job.config, job.device, job.dist, job.reporter
    if request.resume:
        start = resume_point(run_dir, config, device)
    elif request.init_from is not None:
        start = init_point(request.init_from, config, device, final_dir, request.overwrite, request.runs_root)
    else:
        start = StartPoint()
    dataset = _load_same_corpus(
        config.data,
        start.vocab,
        start.expected_sha1,
        "resume",
        "point data.path at that text, or start a new run with --run DIR",
        job.progress,
    )
    if start.changes is not None and reporter is not None:
        reporter.note(start.changes)
    if start.init_from is not None:
        limit = request.max_unknown_fraction
        _check_unknown_share(dataset, DEFAULT_MAX_UNKNOWN if limit is None else limit, reporter)
    trainer = Trainer(  # validates everything that can still fail; writes nothing
        config,
        dataset,
        run_dir,
        device,
        reporter,
        dist,
        resume=start.resume,
        init_from=start.init_from,
        init_from_label=start.init_label,
        best_kept=start.best_kept,
        # an --overwrite session trains in a staging directory that its first checkpoint swaps in
        resume_advice=RESUME_ADVICE if run_dir == final_dir else OVERWRITE_RESUME_ADVICE,
    )
    previous_latest: Path | None = None
    if dist.is_main:
        if not request.resume:
            files = RunFiles(run_dir)
            for stale in (run_dir / LAST, run_dir / BEST, files.metrics, files.plot, files.init_from):
                stale.unlink(missing_ok=True)
        mark_run_dir(run_dir)
        previous_latest = recorded_latest(request.runs_root)
        unmarked = mark_latest(final_dir, request.runs_root)
        if unmarked is not None and reporter is not None:
            reporter.note(f"the latest run is not recorded ({unmarked}); pass --run to predict/eval")
    try:
        return trainer.fit()
    except BaseException:
        if dist.is_main and not holds_run(run_dir) and not holds_run(final_dir):
            restore_latest(final_dir, previous_latest, request.runs_root)  # it ended without a checkpoint
        raise


def _load_same_corpus(
    data: DataConfig,
    vocab: Vocab | None,
    expected_sha1: str | None,
    action: str,
    fix: str,
    progress: ProgressHook | None = None,
) -> Dataset:
    """The dataset, refused (before it is encoded) unless it is the text the checkpoint was trained
    on: splits are positions in a file, and in another file they mean other text."""
    try:
        return load_dataset(data, vocab=vocab, progress=progress, expected_sha1=expected_sha1)
    except CorpusMismatch as mismatch:
        raise DrnnError(f"cannot {action}: {mismatch}; {fix}") from None


def _check_unknown_share(dataset: Dataset, limit: float, reporter: Reporter | None) -> None:
    """Fine-tuning keeps the checkpoint's vocabulary: report (or refuse) text it cannot spell.

    The share is of the tokens the run uses, all its splits (after ``data.max_tokens``), which are what a model
    fine-tuned on many ``<unk>`` would learn from; which tokens they are is known for the whole text.
    """
    if not dataset.unknown_tokens:
        return
    used = len(dataset.tokens)
    count = count_index(dataset.tokens, dataset.vocab[UNK])
    share = count / max(1, used)
    worst = ", ".join(f"{token!r} ×{n:,}" for token, n in dataset.unknown.most_common(5))
    where = " in the whole text" if used < dataset.total_tokens else ""
    if share > limit:
        raise DrnnError(
            f"{count:,} of the {used:,} tokens the run uses ({_percent(share)}) are not in the checkpoint's "
            f"vocabulary ({worst}{where}), above the allowed {_percent(limit)}; raise --max-unknown, or "
            "preprocess the text like the original run"
        )
    if reporter is not None and count:
        reporter.note(
            f"{count:,} of the {used:,} tokens the run uses ({_percent(share)}) are not in the vocabulary and "
            f"map to <unk> ({worst}{where})"
        )


def _percent(share: float) -> str:
    """Three significant digits: a share just above a limit never prints as the limit itself."""
    return f"{share * 100:.3g}%"


# ---------------------------------------------------------------------------------------------
# drnn predict / eval


@dataclass
class LoadedModel:
    checkpoint: Checkpoint
    model: RNNLanguageModel
    device: torch.device
    path: Path


def load_model(
    run: Path | None, checkpoint: Path | None, device_choice: str, runs_root: Path = DEFAULT_RUNS_ROOT
) -> LoadedModel:
    path = resolve_checkpoint(run, checkpoint, runs_root)
    device = resolve_device(device_choice)
    # Read on the CPU: only the model goes to the device, not the trainer state beside it (the
    # optimizer's moments, an averaged run's raw weights); the weights are kept once, in the model.
    loaded = load_checkpoint(path)
    model = build_model(len(loaded.vocab), loaded.config.model)
    try:
        model.load_state_dict(loaded.model_state)
    except RuntimeError:
        raise DrnnError(f"checkpoint {path} does not match its own model config; it is corrupt") from None
    model.to(device).eval()
    return LoadedModel(replace(loaded, model_state={}), model, device, path)


def check_prefixes(loaded: LoadedModel, prefixes: list[str]) -> None:
    """Refuse the first prefix the model cannot read before any is continued: a bad last prefix must
    not cost the continuations before it, nor leave them on stdout with a failing exit status."""
    data = loaded.checkpoint.config.data
    for prefix in prefixes:
        prefix_tokens(prefix, loaded.checkpoint.vocab, data.preprocess, data.token)


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
    prefix: str
    text: str  # the prefix as the model saw it (preprocessed), then the generated tokens


@dataclass(frozen=True)
class PredictReport:
    continuations: tuple[Continuation, ...]

    def summary(self) -> dict:
        """``--json``: the first prefix and its text; with several prefixes, all of them under ``results``."""
        first = self.continuations[0]
        payload: dict = {"prefix": first.prefix, "text": first.text}
        if len(self.continuations) > 1:
            payload["results"] = [{"prefix": c.prefix, "text": c.text} for c in self.continuations]
        return payload


@dataclass(frozen=True)
class EvalReport:
    split: str
    epoch: int  # whole epochs the checkpoint had trained
    result: Perplexity
    source: str
    step: int | None = None  # optimizer steps it had taken (None: a checkpoint older than step counts)
    unknown: int = 0  # predicted tokens not in the vocabulary, scored as <unk>
    notes: tuple[str, ...] = ()  # what reading the run's corpus could not do (Dataset.notes)

    def summary(self) -> dict:
        return {
            "split": self.split,
            "epoch": self.epoch,
            "step": self.step,
            "perplexity": self.result.perplexity,
            "bits_per_token": self.result.bits_per_token,
            "tokens": self.result.tokens,
            "unknown": self.unknown,
            "source": self.source,
        }


def default_split(splits: Splits) -> str:
    """The split ``drnn eval`` reads when none is named: validation if the run has one (2 tokens or
    more: a `data.val_fraction` too small for the text leaves none, as training said), else train."""
    return "val" if len(splits.val) >= MIN_EVAL_TOKENS else "train"


def evaluate_split(
    loaded: LoadedModel,
    split: str | None = None,
    data_file: Path | None = None,
    rows: int | None = None,
    corpus_file: Path | None = None,
) -> EvalReport:
    """Perplexity of the checkpoint on a split of its own corpus (None: :func:`default_split`), or on
    all of ``data_file``. ``corpus_file``: where the run's corpus is now, when it moved (its SHA-1 must
    match the checkpoint's).

    The tokens are read as ``rows`` parallel streams (default: the run's ``data.batch_size``), each
    starting from a zero state; ``rows=1`` reads them as one continuous stream, as ``drnn inspect`` does.
    """
    config = loaded.checkpoint.config
    notes: tuple[str, ...] = ()  # a --data file is encoded apart from the token cache
    if data_file is not None:
        tokens, source = _file_tokens(data_file, loaded.checkpoint)
        split_name = "file"
    else:
        tokens, source, split_name, notes = _split_tokens(loaded, split, corpus_file)
    result = evaluate(
        loaded.model, tokens, rows or config.data.batch_size, config.data.num_steps, loaded.device, "fp32"
    )
    checkpoint = loaded.checkpoint
    try:
        step = TrainerState.from_tree(checkpoint.trainer_state, checkpoint.step_in_epoch).global_step
    except UnusableTrainerState:  # a checkpoint without a (usable) trainer state: its epoch is all there is
        step = None
    unknown = count_index(tokens[1:], checkpoint.vocab[UNK])  # the first token is read, not predicted
    return EvalReport(split_name, checkpoint.epoch, result, source, step, unknown, notes)


def _file_tokens(data_file: Path, checkpoint: Checkpoint) -> tuple[torch.Tensor, str]:
    """All of a text file, preprocessed like the run's corpus and encoded with its vocabulary."""
    if not require_regular_file(data_file, "--data file", "give --data a UTF-8 text file"):
        raise DrnnError(f"--data file {data_file} is empty; nothing to evaluate")
    tokens = encode_text(data_file, checkpoint.config.data, checkpoint.vocab, "--data file")
    if len(tokens) < MIN_EVAL_TOKENS:
        raise DrnnError(f"{data_file} has fewer than 2 tokens after preprocessing; nothing to evaluate")
    return tokens, str(data_file)


def _split_tokens(
    loaded: LoadedModel, split: str | None, corpus_file: Path | None
) -> tuple[torch.Tensor, str, str, tuple[str, ...]]:
    """A split of the run's own corpus (None: :func:`default_split`), its source, its name and the
    dataset's notes (a token cache it could not write, which costs every eval the whole encoding): where
    ``corpus_file`` says, else where the checkpoint (or, when that place is gone, the run's
    ``config.yaml``) says; refused unless it is the same text."""
    checkpoint = loaded.checkpoint
    named = split or "default"  # for the messages below, before the corpus says which split that is
    data = checkpoint.config.data
    if corpus_file is not None:
        require_regular_file(corpus_file, "--corpus file", "give --corpus the run's corpus, moved")
        data = data.model_copy(update={"path": str(corpus_file)})
    elif data.file is not None and not data.file.exists():
        moved = _corpus_path_of_run(loaded.path.parent)
        if moved is None or not Path(moved).expanduser().exists():
            raise DrnnError(
                f"cannot evaluate the {named} split: the run's corpus {data.path} is not there (moved, or "
                "on another machine); say where it is with --corpus FILE, or score any text with --data FILE"
            )
        data = data.model_copy(update={"path": moved})
    dataset = _load_same_corpus(
        data,
        checkpoint.vocab,
        checkpoint.corpus_sha1,
        f"evaluate the {named} split",
        "give --corpus the run's own text, or score this file whole with --data FILE"
        if corpus_file is not None
        else "restore the file, or score other text with --data FILE",
    )
    split = split or default_split(dataset.splits)
    tokens = _split_or_error(dataset.splits, split, checkpoint.config)
    return tokens, f"{dataset.path} [{split}]", split, dataset.notes


def _corpus_path_of_run(run_dir: Path) -> str | None:
    """``data.path`` as the run's ``config.yaml`` has it: the newest, when a resume pointed it at a
    moved corpus (--set data.path=NEW) after the best checkpoint was written. None without one."""
    try:
        return load_config(RunFiles(run_dir).config).data.path
    except DrnnError:
        return None


def _split_or_error(splits: Splits, split: str, config: Config) -> torch.Tensor:
    tokens = splits.get(split)
    if len(tokens) < MIN_EVAL_TOKENS:
        key = {"val": "data.val_fraction", "test": "data.test_fraction"}.get(split, "data.max_tokens")
        held = (
            f"the run has no {split} split"
            if not len(tokens)  # a share that rounds to a single token is there, but cannot be scored
            else f"the run's {split} split is {len(tokens)} token, too few to evaluate (one is read, the "
            f"next predicted: {MIN_EVAL_TOKENS} at least)"
        )
        raise DrnnError(
            f"{held}; it was trained with {key} = {getattr(config.data, key.split('.')[1])}; evaluate "
            "another split or pass --data FILE"
        )
    return tokens
