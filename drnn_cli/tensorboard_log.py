"""TensorBoard logs of a run (``train.tensorboard: true``): scalars and samples under RUN/tensorboard/.

``tensorboard`` is an optional extra (``pip install 'tensorboard>=2.14'``); without it the option is
refused before training starts. Gradient norms are summed on the device at every step and read
only when a metrics line is logged, so logging adds no host sync to the loop. A non-finite norm (an
fp16 step whose gradients overflowed, which the loss scaler skips) is left out of the mean.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from drnn_cli.errors import DrnnError
from drnn_cli.run_files import RunFiles


class TensorBoardLog:
    """One SummaryWriter, opened at the first event; the x axis of every scalar is the optimizer step."""

    def __init__(
        self, writer_class: Any, log_dir: Path, device: torch.device, resume_step: int | None
    ) -> None:
        self._writer_class = writer_class
        self._writer: Any = None
        self.log_dir = log_dir
        self.resume_step = resume_step  # None: a fresh run, whose old event files are dropped
        self.grad_norm_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.grad_norm_count = torch.zeros((), dtype=torch.float64, device=device)  # finite norms summed

    @property
    def writer(self) -> Any:
        if self._writer is None:
            if self.resume_step is None and self.log_dir.is_dir():
                for stale in self.log_dir.glob("events.out.tfevents.*"):
                    stale.unlink()
            # purge_step hides events a resumed run is about to write again (steps past its checkpoint).
            self._writer = self._writer_class(log_dir=str(self.log_dir), purge_step=self.resume_step)
        return self._writer

    def add_grad_norm(self, norm: torch.Tensor) -> None:
        finite = torch.isfinite(norm)
        self.grad_norm_sum += torch.where(finite, norm.double(), 0.0)
        self.grad_norm_count += finite

    def add_record(self, record: Any) -> None:
        """A metrics.jsonl line (report.EpochRecord) and the mean gradient norm since the last one."""
        scalars = {
            "perplexity/train": record.train_ppl,
            "perplexity/validation": record.val_ppl,
            "learning_rate": record.lr,
            "tokens_per_s": record.tokens_per_s,
        }
        if getattr(
            record, "is_start", False
        ):  # a fine-tuning run's starting weights: validated, nothing trained
            scalars = {"perplexity/validation": record.val_ppl}
        count = float(self.grad_norm_count)
        if count:
            scalars["gradient_norm"] = float(self.grad_norm_sum) / count
        self.grad_norm_sum.zero_()
        self.grad_norm_count.zero_()
        for tag, value in scalars.items():
            if value is not None and math.isfinite(value):
                self.writer.add_scalar(tag, value, record.step)
        self.writer.flush()

    def add_samples(self, samples: dict[str, str], step: int) -> None:
        for prefix, text in samples.items():
            self.writer.add_text(f"samples/{prefix}", text, step)
        self.writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def summary_writer_class() -> Any:
    """PyTorch's SummaryWriter; a one-line DrnnError without the package (every torchrun rank asks,
    so none goes on to meet the others in a collective that one of them has left)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise DrnnError(
            "train.tensorboard needs the tensorboard package: pip install 'tensorboard>=2.14' (drnn's "
            "tensorboard extra), "
            "or set train.tensorboard: false"
        ) from None
    return SummaryWriter


def open_tensorboard(run_dir: Path, device: torch.device, resumed_at: int | None) -> TensorBoardLog:
    """A log for ``run_dir/tensorboard`` (nothing written yet). ``resumed_at``: the step of the
    checkpoint a resumed run continues from; its events stay, the later ones are written again."""
    resume_step = None if resumed_at is None else resumed_at + 1
    return TensorBoardLog(summary_writer_class(), RunFiles(run_dir).tensorboard, device, resume_step)
