"""Under torchrun, that every rank trains the same run: each node reads its own command, config, text
and run directory, and ranks that differed hung, mixed their figures into one line, or trained on apart
without a word. Before training the ranks compare what they read and refuse in one line naming what
differs."""

from __future__ import annotations

import torch
import torch.distributed as torch_dist

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
    # a name of this form alone: a drnn before it, which exchanges no words, differs in the names
    values[WORDS_EXCHANGED] = ""
    differ = names_that_differ(values, dist, device)
    if not differ:
        return
    if differ == [OTHER_NAMES]:  # another drnn: it meets no further collective, so none is made
        said = f"rank {dist.rank}: {rank_words(config, dataset, differ)}"
    else:
        said = grouped_by_words(every_ranks_words(config, dataset, differ, dist, device))
    raise DrnnError(
        f"the processes of this torchrun job differ in {', '.join(differ)} ({said}): run the same command, "
        'config and text on every node (README "Several processes, GPUs or nodes")'
    )


# Where the ranks differ, each rank's own words for its values reach every rank (red42: on one node the
# line named rank 0's train.lr alone, the other rank's line unsaid): this many bytes of UTF-8 a rank
RANK_WORDS_BYTES = 240
WORDS_EXCHANGED = "the ranks' words"
# ranks with other values than the rest, named in the line before it is cut short
SHOWN_GROUPS = 4


def rank_words(config: Config, dataset: Dataset, names: list[str]) -> str:
    """This rank's values of ``names``, as the line says them."""
    settings = config.settings()
    here = {name: f"{name} {settings[name]!r}" if name in settings else name for name in names} | {
        "the text": f"the text {dataset.path} (SHA-1 {(dataset.text_sha1 or dataset.sha1)[:12]}…)",
        "the vocabulary": f"a vocabulary of {len(dataset.vocab):,} tokens",
        OTHER_NAMES: f"drnn {__version__}, {len(settings):,} settings",
    }
    return ", ".join(here[name] for name in names)


def every_ranks_words(
    config: Config, dataset: Dataset, names: list[str], dist: DistContext, device: torch.device
) -> list[str]:
    """Every rank's :func:`rank_words`, in rank order: one sum of a table of a row a rank, each rank
    writing its own (a collective of one size on every rank)."""
    table = torch.zeros(dist.world_size, RANK_WORDS_BYTES, dtype=torch.int32, device=device)
    mine = rank_words(config, dataset, names).encode()[:RANK_WORDS_BYTES]
    table[dist.rank, : len(mine)] = torch.tensor(list(mine), dtype=torch.int32)
    torch_dist.all_reduce(table)
    return [bytes(byte for byte in row if byte).decode(errors="replace") for row in table.cpu().tolist()]


def grouped_by_words(words: list[str]) -> str:
    """``rank 0: train.lr 0.005; ranks 1–3: train.lr 0.006``: the ranks of each value together."""
    groups: dict[str, list[int]] = {}
    for rank, said in enumerate(words):
        groups.setdefault(said, []).append(rank)
    shown = [f"{_ranks(ranks)}: {said}" for said, ranks in list(groups.items())[:SHOWN_GROUPS]]
    more = len(groups) - SHOWN_GROUPS
    return "; ".join(shown) + (f"; and {more:,} other values" if more > 0 else "")


def _ranks(ranks: list[int]) -> str:
    """``rank 4``, ``ranks 0–3, 5``: runs of consecutive ranks as ranges."""
    runs: list[list[int]] = []
    for rank in ranks:
        if runs and rank == runs[-1][-1] + 1:
            runs[-1].append(rank)
        else:
            runs.append([rank])
    spans = [f"{run[0]}" if len(run) == 1 else f"{run[0]}–{run[-1]}" for run in runs]
    return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(spans)}"


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
