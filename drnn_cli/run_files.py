"""The names of the files in a run directory and beside it, defined once (layout: rundir.py).

It imports nothing from drnn, so every module that reads or writes a run directory can use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

LAST = "last.safetensors"  # a run's newest consistent state, the one --resume continues
BEST = "best.safetensors"  # a run's best by validation perplexity (only with a validation split)
RUN_MARKER = ".drnn-run"  # marks a directory as drnn's, so later runs may write into it
LOCK_NAME = "train.lock"  # the OS file lock of the training process that owns the directory
LATEST_MARKER = "latest"  # in the runs root: the path of the most recently started run


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
    def tensorboard(self) -> Path:
        """TensorBoard event files (``train.tensorboard: true``)."""
        return self.run_dir / "tensorboard"

    def written(self) -> tuple[Path, ...]:
        """Every path above: what a run of drnn may have written into its directory."""
        return (self.config, self.vocab, self.metrics, self.plot, self.init_from, self.tensorboard)


# What drnn writes into a run directory, by name: anything else there is the user's.
RUN_ENTRY_NAMES = frozenset(
    {LAST, BEST, RUN_MARKER, LOCK_NAME, *(path.name for path in RunFiles(Path()).written())}
)
