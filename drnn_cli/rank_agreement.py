"""Under torchrun, that every rank trains the same run: each node reads its own command, config, text
and run directory, and ranks that differed hung, mixed their figures into one line, or trained on apart
without a word. Before training the ranks compare what they read and refuse in one line naming what
differs."""

from __future__ import annotations

import torch

from drnn_cli import __version__
from drnn_cli.checkpoint import Checkpoint
from drnn_cli.config import Config
from drnn_cli.data import Dataset
from drnn_cli.errors import DrnnError
from drnn_cli.runtime import OTHER_NAMES, DistContext, names_that_differ, rank_extremes, votable_digest


def check_every_rank_runs_alike(
    config: Config, dataset: Dataset, dist: DistContext, device: torch.device
) -> None:
    """Under torchrun each node reads its own command, config and text: nodes given other settings or
    another copy of the text hung (``max_steps``: one rank waited on a step the other never took), or
    trained on silently with the ranks' rates mixed (``lr``), or failed in DDP's constructor (another
    vocabulary; ddp32). Before the model is built, the ranks compare every setting but where the text
    lies (``data.path``, ``data.corpus``: its contents are compared) and the device, and the text and
    vocabulary, and refuse in one line naming what differs, with this rank's values."""
    if not dist.enabled:
        return
    values = {
        key: repr(value)
        for key, value in config.settings().items()
        if key not in {"data.path", "data.corpus", "train.device"}
    }
    values["the text"] = dataset.text_sha1 or dataset.sha1
    values["the vocabulary"] = "\n".join(dataset.vocab.idx_to_token)
    differ = names_that_differ(values, dist, device)
    if not differ:
        return
    settings = config.settings()
    here = {name: f"{name} {settings[name]!r}" if name in settings else name for name in differ} | {
        "the text": f"the text {dataset.path} (SHA-1 {values['the text'][:12]}…)",
        "the vocabulary": f"a vocabulary of {len(dataset.vocab):,} tokens",
        OTHER_NAMES: f"drnn {__version__}, {len(settings):,} settings",
    }
    raise DrnnError(
        f"the processes of this torchrun job differ in {', '.join(differ)} (rank {dist.rank}: "
        f"{', '.join(here[name] for name in differ)}): run the same command, config and text on every "
        'node (README "Several processes, GPUs or nodes")'
    )


def header_digest(checkpoint: Checkpoint) -> float:
    """48 bits of a digest of the checkpoint's header (its trainer state and tensor layout): exact as the
    float64 a vote carries."""
    header, _ = checkpoint.stored()
    return votable_digest(header)


def check_every_rank_starts_alike(
    global_step: int, digest: float, dist: DistContext, device: torch.device
) -> None:
    """Under torchrun each rank reads the run directory from its own disk: nodes whose copies differed
    trained different epochs, mixed their losses into one line, and hung; copies at the same step
    that differed otherwise (weights, Adam's moments) trained on apart without a word. The ranks
    compare the step (``global_step``, where the checkpoint resumes) and ``digest``
    (:func:`header_digest`; 0.0 for a run that starts)."""
    if not dist.enabled:
        return
    steps, contents = rank_extremes([float(global_step), digest], dist, device)
    for (lowest, highest), which in (
        (steps, f"optimizer step {steps[0]:,.0f} on one, {steps[1]:,.0f} on another"),
        (contents, f"each at optimizer step {global_step:,}, with other contents"),
    ):
        if lowest == highest:
            continue
        raise DrnnError(
            f"the processes of this torchrun job start from different checkpoints ({which}): every node "
            "must read the same run directory and text (shared storage, "
            'README "Several processes, GPUs or nodes")'
        )
