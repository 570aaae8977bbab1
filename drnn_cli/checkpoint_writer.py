"""Writing a run's checkpoint files: which one and when is the loop's (train.py); here, how. Rank 0
writes, every rank takes part (a mid-epoch checkpoint gathers each rank's own part of the epoch); a
``train.keep_every`` point is written once, under its kept name, with ``last`` linked to it; a write
that fails is said in one line, with how the run goes on from the file left there."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from drnn_cli.budget import Cadence
from drnn_cli.checkpoint import NonFiniteCheckpoint, save_checkpoint
from drnn_cli.config import Config
from drnn_cli.data import Dataset
from drnn_cli.errors import DrnnError
from drnn_cli.files import WriteRefused, atomic_link
from drnn_cli.report import training_position
from drnn_cli.run_files import BEST, RunFiles, kept_name
from drnn_cli.runtime import DistContext
from drnn_cli.session_time import SessionTime
from drnn_cli.stop_left import diverged, left_by_signal
from drnn_cli.trainer_checkpoint import Lineage, TrainingCounters, TrainingParts, checkpoint_of
from drnn_cli.trainer_state import EpochProgress, gather_ranks


class CheckpointWriter:
    """Writes one run directory's checkpoints (``last``, ``best`` and the kept points) of one session."""

    def __init__(
        self,
        config: Config,
        dataset: Dataset,
        lineage: Lineage,
        files: RunFiles,
        device: torch.device,
        dist: DistContext,
        keep: Cadence,
        resume_advice: str,
        on_first_checkpoint: Callable[[], None] | None,
    ) -> None:
        """``keep``: ``train.keep_every``, whose unit names the kept files; ``resume_advice``: how the
        user continues the run, said where a write fails; ``on_first_checkpoint``: called once the
        session's first checkpoint is on disk (the session marks the run as the latest)."""
        self.config = config
        self.dataset = dataset
        self.lineage = lineage
        self.files = files
        self.device = device
        self.dist = dist
        self.keep = keep
        self.resume_advice = resume_advice
        self.on_first_checkpoint = on_first_checkpoint

    def write(
        self,
        name: str,
        epoch: int,
        progress: EpochProgress | None,
        *,
        parts: TrainingParts,
        counters: TrainingCounters,
        best_kept: float | None,
        session_time: SessionTime,
        keep: bool = False,
    ) -> None:
        """Rank 0 writes. Under torchrun every rank calls this: a mid-epoch checkpoint gathers each
        rank's own random streams and epoch progress (its rows' carried state, its loss sums).
        ``best_kept``: the perplexity ``best``'s header names (patience's best may be older);
        ``session_time``: the session's clock, which counts the write.

        ``keep`` (a ``train.keep_every`` point; ``name`` is LAST): the checkpoint is written once, as its
        kept file, and ``last`` becomes a hard link to it. In that order a kill between the two leaves
        the older ``last``, whose resume replays to this point and replaces the kept file whole: never
        a kept point missing, torn, or under two names."""
        run_dir = self.files.run_dir
        if progress is not None and progress.step == 0:
            progress = None  # an epoch boundary
        ranks = (
            gather_ranks(progress, self.device, self.dist.world_size)
            if self.dist.enabled and progress is not None
            else None
        )
        if not self.dist.is_main:
            return
        try:
            checkpoint = checkpoint_of(
                self.config,
                self.dataset,
                lineage=self.lineage,
                parts=parts,
                counters=counters,
                device=self.device,
                epoch=epoch,
                progress=progress,
                ranks=ranks,
            )
            if name == BEST:  # its header names its own perplexity (patience's best may be older)
                checkpoint = replace(checkpoint, best_val_ppl=best_kept)
            with session_time.checkpoint_write():
                if keep:
                    kept = self.files.kept / self._kept_name(epoch, counters.global_step)
                    save_checkpoint(kept, checkpoint)
                    atomic_link(kept, run_dir / name)
                else:
                    save_checkpoint(run_dir / name, checkpoint)
            if self.on_first_checkpoint is not None:
                announce, self.on_first_checkpoint = self.on_first_checkpoint, None
                announce()
        except NonFiniteCheckpoint:
            where = training_position(epoch, progress.step if progress else 0, counters.global_step)
            raise diverged(run_dir, f"the weights became NaN or infinite {where}") from None
        except WriteRefused as refused:
            if refused.room_fix is None:
                raise
            # the file there before is intact (written whole or not at all): say how to go on from it,
            # in place (writing elsewhere would leave the run behind)
            continuing = left_by_signal(run_dir, self.resume_advice)
            raise DrnnError(
                f"{refused.refusal}; {refused.room_fix}; training stopped, and {continuing}"
            ) from None

    def _kept_name(self, epochs_done: int, global_step: int) -> str:
        """The kept file of this point: by epochs done for an epoch cadence, else by optimizer step."""
        unit = self.keep.unit
        return kept_name(unit, epochs_done if unit == "epochs" else global_step)
