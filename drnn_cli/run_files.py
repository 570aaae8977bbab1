"""The names of the files in a run directory and beside it, defined once (layout: rundir.py).

It imports nothing from drnn, so every module that reads or writes a run directory can use it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

LAST = "last.safetensors"  # a run's newest consistent state, the one --resume continues
BEST = "best.safetensors"  # a run's best by validation perplexity (only with a validation split)
RUN_MARKER = ".drnn-run"  # marks a directory as drnn's, so later runs may write into it
LOCK_NAME = "train.lock"  # the OS file lock of the training process that owns the directory
LATEST_MARKER = "latest"  # in the runs root: the path of the most recently started run
# train.keep_every's checkpoints: zero-padded so that a listing sorts them (wider only past these counts)
KEPT_EPOCH_DIGITS = 4
KEPT_STEP_DIGITS = 8


STAGING_PREFIX, STAGING_SUFFIX = ".", ".overwrite"  # --overwrite's new run, beside the one it replaces
NAME_MAX = 255  # the bytes one name in a path may hold (ext4, xfs, btrfs, tmpfs, overlayfs)
SHORTENED_MARK, SHORTENED_DIGITS = "~", 12  # a name cut to fit: "~" and that many hex digits of its hash


def sibling_name(name: str, prefix: str, suffix: str) -> str:
    """``prefix + name + suffix``, the hidden name of a folder beside the run ``name``; where that passes
    ``NAME_MAX`` bytes (a legal run name of 246 bytes or more: red41 quoted ``.NAME.overwrite`` in a
    "File name too long"), ``name`` cut short, then ``~`` and a hash of it whole: two names cut alike
    stay two folders, and the prefix and the suffix, which drnn's cleanup goes by, stay."""
    whole = f"{prefix}{name}{suffix}"
    if len(os.fsencode(whole)) <= NAME_MAX:
        return whole
    digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:SHORTENED_DIGITS]
    tail = f"{SHORTENED_MARK}{digest}{suffix}"
    cut = name
    while len(os.fsencode(f"{prefix}{cut}{tail}")) > NAME_MAX:
        cut = cut[:-1]  # by characters: a name is never cut inside one
    return f"{prefix}{cut}{tail}"


def staging_dir(run_dir: Path) -> Path:
    """Where ``--overwrite`` builds the new run: beside the old one, on the same filesystem."""
    return run_dir.parent / sibling_name(run_dir.name, STAGING_PREFIX, STAGING_SUFFIX)


def run_name(run_dir: Path) -> str:
    """The name a run goes by (its plot's title): its folder's, or where ``--overwrite`` builds it in
    :func:`staging_dir`, the run it replaces (its plot was titled ".lstm2.overwrite": learner39); a name
    :func:`sibling_name` cut to fit, cut, with "…" for the rest."""
    name = run_dir.name
    staged = name.startswith(STAGING_PREFIX) and name.endswith(STAGING_SUFFIX)
    if not staged or len(name) <= len(STAGING_PREFIX + STAGING_SUFFIX):
        return name
    inner = name[len(STAGING_PREFIX) : -len(STAGING_SUFFIX)]
    cut, mark, digest = inner.rpartition(SHORTENED_MARK)
    shortened = (
        bool(mark)
        and len(digest) == SHORTENED_DIGITS
        and all(char in "0123456789abcdef" for char in digest)
        and len(os.fsencode(name)) > NAME_MAX - 4  # cut by characters: 3 bytes short at most
    )
    return f"{cut}…" if shortened else inner


def kept_name(unit: str, count: int) -> str:
    """A kept checkpoint's file name: ``epoch-0005.safetensors`` after 5 epochs, ``step-00001200.safetensors``
    after optimizer step 1,200 (a step cadence's points fall inside epochs, where an epoch count would be a
    rounded fraction)."""
    if unit == "epochs":
        return f"epoch-{count:0{KEPT_EPOCH_DIGITS}d}.safetensors"
    return f"step-{count:0{KEPT_STEP_DIGITS}d}.safetensors"


def is_kept_name(name: str) -> bool:
    """Whether ``name`` is one :func:`kept_name` gives (its count wider only past the padding's)."""
    for prefix, digits in (("epoch-", KEPT_EPOCH_DIGITS), ("step-", KEPT_STEP_DIGITS)):
        count = name.removeprefix(prefix).removesuffix(".safetensors")
        if name.startswith(prefix) and name.endswith(".safetensors"):
            return len(count) >= digits and count.isascii() and count.isdigit()
    return False


TENSORBOARD_PREFIX = "events.out.tfevents."  # the event files TensorBoard's writer names (tensorboard_log.py)


def is_tensorboard_name(name: str) -> bool:
    """Whether ``name`` is an event file of the writer drnn's ``train.tensorboard`` opens."""
    return name.startswith(TENSORBOARD_PREFIX)


@dataclass(frozen=True)
class RunFiles:
    """Paths inside one run directory (``runs/<name>/``)."""

    run_dir: Path

    @property
    def config(self) -> Path:
        """The resolved config of the run."""
        return self.run_dir / "config.yaml"

    @property
    def vocab(self) -> Path:
        return self.run_dir / "vocab.json"

    @property
    def metrics(self) -> Path:
        """One JSON line per epoch end, and per evaluation or log line inside an epoch."""
        return self.run_dir / "metrics.jsonl"

    @property
    def plot(self) -> Path:
        return self.run_dir / "perplexity.png"

    @property
    def init_from(self) -> Path:
        """The checkpoint a fine-tuned run started from (absent otherwise)."""
        return self.run_dir / "init_from.txt"

    @property
    def stop_record(self) -> Path:
        """Why the run's last training session ended, and at which step (stop_record.py)."""
        return self.run_dir / "stopped.json"

    @property
    def tensorboard(self) -> Path:
        """TensorBoard event files (``train.tensorboard: true``)."""
        return self.run_dir / "tensorboard"

    @property
    def kept(self) -> Path:
        """The checkpoints ``train.keep_every`` keeps, one file per point (:func:`kept_name`)."""
        return self.run_dir / "kept"

    def kept_files(self) -> list[Path]:
        """The kept checkpoints, epochs first, each kind in the order it was kept."""
        try:
            names = [path.name for path in self.kept.iterdir() if path.suffix == ".safetensors"]
        except OSError:
            return []
        found = [name for name in names if name.startswith(("epoch-", "step-"))]
        order = sorted(found, key=lambda name: (name[0] != "e", len(name), name))
        return [self.kept / name for name in order]

    def written(self) -> tuple[Path, ...]:
        """Every path above: what a run of drnn may have written into its directory."""
        return (
            self.config,
            self.vocab,
            self.metrics,
            self.plot,
            self.init_from,
            self.stop_record,
            self.tensorboard,
            self.kept,
        )


# What drnn writes into a run directory, by name: anything else there is the user's.
RUN_ENTRY_NAMES = frozenset(
    {LAST, BEST, RUN_MARKER, LOCK_NAME, *(path.name for path in RunFiles(Path()).written())}
)
