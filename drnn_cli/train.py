"""The training loop: d2l's ``train_ch8`` made resumable, interruptible, distributed and sync-light.

Per minibatch (GUIDE §3): mean cross-entropy over the B·T targets, backward, clip the global
gradient norm to ``train.clip``, optimizer step; the hidden state is carried (detached) across
minibatches with sequential sampling and re-initialised with random sampling. Losses accumulate on
the device and are read once per epoch, so the hot loop never waits for the host.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from drnn_cli.batches import Shard, check_trainable, epoch_generator, training_batches
from drnn_cli.checkpoint import (
    BEST,
    LAST,
    Checkpoint,
    NonFiniteCheckpoint,
    atomic_write_text,
    save_checkpoint,
)
from drnn_cli.config import Config, TrainConfig, dump_config
from drnn_cli.data import Dataset
from drnn_cli.decode import DecodeOptions, continue_prefix
from drnn_cli.errors import DrnnError, TrainingDiverged, TrainingInterrupted
from drnn_cli.evaluate import evaluate, perplexity
from drnn_cli.models import RNNLanguageModel, State, build_model, count_parameters, detach_state
from drnn_cli.plot import write_perplexity_plot
from drnn_cli.runtime import DistContext, all_reduce_sum, autocast, device_name

# SIGPIPE: stdout was closed (drnn train | head); drnn_cli.signals raises it on the first failed write.
SIGNAL_EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGPIPE: 141}
METRICS = "metrics.jsonl"
STOP_VOTE_EVERY = 8  # under torchrun, steps between the ranks' votes on a pending SIGINT/SIGTERM
PLOT = "perplexity.png"


# ---------------------------------------------------------------------------------------------
# Pieces of one step


def clip_gradients(parameters: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """d2l's ``grad_clipping``: if ‖g‖ > θ over all parameters together, scale every g by θ/‖g‖.

    Written without a host sync (no ``if`` on a device value): the factor min(1, θ/‖g‖) is exactly
    1 when the norm is within bounds, so the arithmetic matches d2l's branch.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())
    factor = (max_norm / norm).clamp(max=1.0)
    torch._foreach_mul_(grads, factor.to(grads[0].dtype))
    return norm


def lr_factor(epoch: int, config: TrainConfig) -> float:
    """Learning-rate multiplier for (0-based) ``epoch``: linear warm-up, then the schedule."""
    if epoch < config.warmup_epochs:
        return (epoch + 1) / (config.warmup_epochs + 1)
    progress = epoch - config.warmup_epochs
    if config.schedule == "step":
        return config.gamma ** (progress // config.step_size)
    if config.schedule == "cosine":
        span = max(1, config.epochs - config.warmup_epochs)
        floor = config.min_lr / config.lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, span) / span))
    return 1.0


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


# ---------------------------------------------------------------------------------------------
# What training reports


@dataclass(frozen=True)
class EpochRecord:
    """One line of ``metrics.jsonl``."""

    epoch: int
    train_ppl: float
    val_ppl: float | None
    lr: float
    tokens_per_s: float
    elapsed: float

    def to_json(self) -> str:
        return json.dumps(asdict(self))


@dataclass
class TrainResult:
    run_dir: Path
    epochs: int
    start_epoch: int
    train_ppl: float
    val_ppl: float | None
    best_val_ppl: float | None
    tokens_per_s: float
    device: str
    world_size: int
    parameters: int
    samples: dict[str, str] = field(default_factory=dict)
    stopped_early: bool = False

    def summary(self) -> dict[str, Any]:
        """The ``drnn train --json`` object (GUIDE §1)."""
        return {
            "run_dir": str(self.run_dir),
            "epochs": self.epochs,
            "start_epoch": self.start_epoch,
            "train_ppl": self.train_ppl,
            "val_ppl": self.val_ppl,
            "best_val_ppl": self.best_val_ppl,
            "tokens_per_s": self.tokens_per_s,
            "device": self.device,
            "world_size": self.world_size,
            "parameters": self.parameters,
            "stopped_early": self.stopped_early,
            "samples": self.samples,
        }


class Reporter(Protocol):
    """How the loop talks to its user; the CLI renders these with rich, tests collect them."""

    def start(self, total_epochs: int, start_epoch: int, parameters: int, device: str) -> None: ...
    def epoch_end(self, record: EpochRecord, best_val_ppl: float | None) -> None: ...
    def samples(self, epoch: int, samples: dict[str, str]) -> None: ...
    def note(self, message: str) -> None: ...
    def finish(self) -> None: ...


class SilentReporter:
    def start(self, total_epochs: int, start_epoch: int, parameters: int, device: str) -> None:
        pass

    def epoch_end(self, record: EpochRecord, best_val_ppl: float | None) -> None:
        pass

    def samples(self, epoch: int, samples: dict[str, str]) -> None:
        pass

    def note(self, message: str) -> None:
        pass

    def finish(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# The trainer


@dataclass
class _EpochProgress:
    """Where the loop is inside an epoch: what a mid-epoch checkpoint must carry."""

    step: int = 0
    loss_sum: torch.Tensor | None = None  # Σ loss·n over this epoch's finished steps (float64, device)
    count: int = 0
    first_bad_step: torch.Tensor | None = None  # -1, or the first step whose loss was not finite
    state: State | None = None
    elapsed: float = 0.0


class Trainer:
    """Trains one run directory from a resolved config and an encoded dataset."""

    def __init__(
        self,
        config: Config,
        dataset: Dataset,
        run_dir: Path,
        device: torch.device,
        reporter: Reporter | None = None,
        dist: DistContext | None = None,
        resume: Checkpoint | None = None,
        init_from: Checkpoint | None = None,
        init_from_label: str | None = None,
    ) -> None:
        self.config = config
        self.dataset = dataset
        self.run_dir = run_dir
        self.device = device
        self.reporter = reporter or SilentReporter()
        self.dist = dist or DistContext()
        self.shard = Shard(self.dist.rank, self.dist.world_size)
        data = config.data
        check_trainable(len(dataset.splits.train), data.batch_size, data.num_steps, self.dist.world_size)
        if config.train.precision == "fp16" and device.type == "cpu":
            raise DrnnError("train.precision fp16 needs a GPU; on a CPU use bf16 or fp32")

        self.model: RNNLanguageModel = build_model(len(dataset.vocab), config.model, seed=config.train.seed)
        self.model.to(device)
        _check_precision_works(self.model, device, config.train.precision)
        self.init_from_label = init_from_label or (resume.init_from if resume else None)
        if init_from is not None:
            self.model.load_state_dict(init_from.model_state)
        self.network: nn.Module = self.model
        if self.dist.enabled:
            self.network = DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None
            )
        self.parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.model, config.train)
        self.scaler = torch.amp.GradScaler(device.type, enabled=config.train.precision == "fp16")
        self.train_tokens = dataset.splits.train.to(device)
        self.val_tokens = dataset.splits.val.to(device)

        self.start_epoch = 0
        self.best_val_ppl: float | None = None
        self.bad_evals = 0
        self.elapsed = 0.0
        self.progress = _EpochProgress()
        if resume is not None:
            self._restore(resume)
        self._stop_signal: int | None = None
        self._last_plot = 0.0
        self._plot_ok = True
        self.records: list[EpochRecord] = self._read_metrics() if resume is not None else []

    # ----- checkpoint state ------------------------------------------------------------------

    def _checkpoint(self, epoch: int, progress: _EpochProgress | None = None) -> Checkpoint:
        progress = progress or _EpochProgress()
        state: dict[str, Any] = {
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "bad_evals": self.bad_evals,
            "elapsed": self.elapsed,
        }
        if self.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        if progress.step:
            state["epoch_progress"] = {
                "loss_sum": progress.loss_sum,
                "count": progress.count,
                "first_bad_step": progress.first_bad_step,
                "state": progress.state,
                "elapsed": progress.elapsed,
            }
        return Checkpoint(
            config=self.config,
            vocab=self.dataset.vocab,
            model_state=self.model.state_dict(),
            epoch=epoch,
            step_in_epoch=progress.step,
            best_val_ppl=self.best_val_ppl,
            trainer_state=state,
            init_from=self.init_from_label,
            corpus_sha1=self.dataset.sha1,
        )

    def _restore(self, checkpoint: Checkpoint) -> None:
        self.model.load_state_dict(checkpoint.model_state)
        state = checkpoint.trainer_state
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"].cpu())
        if "rng_cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng_cuda"].cpu(), self.device)
        self.start_epoch = checkpoint.epoch
        self.best_val_ppl = checkpoint.best_val_ppl
        self.bad_evals = int(state.get("bad_evals", 0))
        self.elapsed = float(state.get("elapsed", 0.0))
        partial = state.get("epoch_progress")
        if partial is not None and checkpoint.step_in_epoch:
            carried = partial["state"]
            self.progress = _EpochProgress(
                step=checkpoint.step_in_epoch,
                loss_sum=partial["loss_sum"].to(self.device),
                count=int(partial["count"]),
                first_bad_step=partial["first_bad_step"].to(self.device),
                state=_to_device(carried, self.device),
                elapsed=float(partial["elapsed"]),
            )

    def _save(self, name: str, epoch: int, progress: _EpochProgress | None = None) -> None:
        if self.dist.is_main:
            try:
                save_checkpoint(self.run_dir / name, self._checkpoint(epoch, progress))
            except NonFiniteCheckpoint:
                raise TrainingDiverged(
                    f"the weights became NaN or infinite by epoch {epoch}; training stopped and {self._kept()}. "
                    f"Lower train.lr, or keep train.clip > 0"
                ) from None

    def _kept(self) -> str:
        """What the divergence message may truthfully promise: checkpoints are never non-finite."""
        kept = [self.run_dir / name for name in (LAST, BEST) if (self.run_dir / name).is_file()]
        if kept:
            return f"the last good checkpoint {' and '.join(map(str, kept))} was kept"
        return "no checkpoint was written"

    # ----- run directory ---------------------------------------------------------------------

    def _read_metrics(self) -> list[EpochRecord]:
        path = self.run_dir / METRICS
        records = []
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(ValueError, TypeError):
                    record = EpochRecord(**json.loads(line))
                    if record.epoch <= self.start_epoch:
                        records.append(record)
        return records

    def _write_run_files(self) -> None:
        if not self.dist.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run_dir / "config.yaml", dump_config(self.config))
        atomic_write_text(self.run_dir / "vocab.json", self.dataset.vocab.to_json() + "\n")
        metrics = "".join(record.to_json() + "\n" for record in self.records)
        atomic_write_text(self.run_dir / METRICS, metrics)  # drops epochs past a resumed checkpoint
        if self.init_from_label:
            atomic_write_text(self.run_dir / "init_from.txt", self.init_from_label + "\n")

    def _append_metrics(self, record: EpochRecord) -> None:
        self.records.append(record)
        if self.dist.is_main:
            with (self.run_dir / METRICS).open("a", encoding="utf-8") as stream:
                stream.write(record.to_json() + "\n")

    def _update_plot(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self.dist.is_main or (not force and now - self._last_plot < 5.0):
            return
        self._last_plot = now
        if not self._plot_ok:
            return
        if not write_perplexity_plot(self.records, self.run_dir / PLOT):
            self._plot_ok = False  # say it once, not at every refresh
            self.reporter.note("matplotlib is not installed: no plot (pip install 'drnn[plot]')")

    # ----- signals ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        def request_stop(signum: int, _frame: object) -> None:
            self._stop_signal = signum

        previous = {}
        with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
            for signum in SIGNAL_EXIT_CODES:
                previous[signum] = signal.signal(signum, request_stop)
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _stop_requested(self, step: int | None = None) -> bool:
        flag = self._stop_signal is not None
        if not self.dist.enabled:
            return flag
        if step is not None and step % STOP_VOTE_EVERY:
            return False  # ranks vote every few steps: a vote is a collective plus a host read
        # Every rank must stop at the same step, or the next all-reduce would hang.
        votes = torch.tensor([float(self._stop_signal or 0)], device=self.device)
        torch.distributed.all_reduce(votes, op=torch.distributed.ReduceOp.MAX)
        vote = int(votes.item())  # the step's one host read
        if vote and self._stop_signal is None:
            self._stop_signal = vote
        return bool(vote)

    # ----- the loop --------------------------------------------------------------------------

    def _step(self, x: torch.Tensor, y: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        with autocast(self.device, self.config.train.precision):
            logits, state = self.network(x, state)
        # Logits are (T, B, V), so targets are read column-wise: d2l's y = Y.T.reshape(-1).
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.t().reshape(-1))
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.config.train.clip > 0:
            self.scaler.unscale_(self.optimizer)
            clip_gradients(self.parameters, self.config.train.clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach(), state

    def train_epoch(self, epoch: int) -> tuple[float, float]:
        """Train one epoch; returns (train perplexity, tokens per second)."""
        data = self.config.data
        factor = lr_factor(epoch, self.config.train)
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.train.lr * factor
        batches = training_batches(
            self.train_tokens,
            data.sampling,
            data.batch_size,
            data.num_steps,
            epoch_generator(self.config.train.seed, epoch),
            self.shard,
        )
        progress, self.progress = self.progress, _EpochProgress()
        if progress.loss_sum is None:
            progress.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
            progress.first_bad_step = torch.full((), -1, dtype=torch.int64, device=self.device)
        assert progress.first_bad_step is not None
        state = progress.state
        if self.dist.enabled and progress.step == 0:
            # One dropout stream per rank and epoch: ranks must not apply the same masks to their rows.
            torch.manual_seed((self.config.train.seed * 1_000_003 + epoch) * 1_009 + self.dist.rank)
        started = time.perf_counter() - progress.elapsed
        self.model.train()
        for step, (x, y) in enumerate(batches):
            if step < progress.step:
                continue  # resuming mid-epoch: these minibatches were trained before the stop
            if state is None or not batches.carries_state:
                state = self.model.begin_state(x.shape[0], self.device)
            else:
                state = detach_state(state)
            loss, state = self._step(x, y, state)
            progress.loss_sum += loss.double() * y.numel()
            progress.first_bad_step = torch.where(
                (progress.first_bad_step < 0) & ~torch.isfinite(loss), step, progress.first_bad_step
            )
            progress.count += y.numel()
            progress.step = step + 1
            if self._stop_requested(progress.step):
                self._check_finite(epoch, progress)
                progress.state = detach_state(state) if batches.carries_state else None
                progress.elapsed = time.perf_counter() - started
                self._interrupt(epoch, progress)
        # One all-reduce and one host read per epoch: loss, token count, and how many ranks saw a
        # non-finite loss (so a NaN on one rank stops every rank, not just that one).
        assert progress.first_bad_step is not None
        totals = torch.stack(
            [
                progress.loss_sum,
                torch.tensor(float(progress.count), device=self.device).double(),
                (progress.first_bad_step >= 0).double(),
            ]
        )
        all_reduce_sum(totals, self.dist)
        loss_sum, count, diverged_ranks = totals.tolist()
        if diverged_ranks:
            self._check_finite(epoch, progress)
            raise TrainingDiverged(
                f"the loss became NaN or infinite at epoch {epoch + 1} on another process; training stopped "
                f"and {self._kept()}. Lower train.lr, or keep train.clip > 0"
            )
        seconds = time.perf_counter() - started
        self.elapsed += seconds  # seconds includes the part trained before a mid-epoch stop
        return perplexity(loss_sum, count), count / max(seconds, 1e-9)

    def _check_finite(self, epoch: int, progress: _EpochProgress) -> None:
        assert progress.first_bad_step is not None
        bad = int(progress.first_bad_step)
        if bad >= 0:
            raise TrainingDiverged(
                f"the loss became NaN or infinite at epoch {epoch + 1}, step {bad + 1}; training stopped and "
                f"{self._kept()}. Lower train.lr, or keep train.clip > 0"
            )

    def _interrupt(self, epoch: int, progress: _EpochProgress) -> None:
        signum = self._stop_signal or signal.SIGINT
        self._save(LAST, epoch, progress)
        name = signal.Signals(signum).name
        raise TrainingInterrupted(
            f"training stopped by {name} at epoch {epoch + 1}, step {progress.step}; a checkpoint of that step "
            f"is in {self.run_dir / LAST}; continue with the same command plus --resume",
            exit_code=SIGNAL_EXIT_CODES.get(signum, 130),
        )

    def _samples(self) -> dict[str, str]:
        data = self.config.data
        options = DecodeOptions(num_tokens=self.config.train.sample_chars)
        samples = {}
        for prefix in self.config.train.sample_prefixes:
            try:
                samples[prefix] = continue_prefix(
                    self.model, self.dataset.vocab, prefix, data.preprocess, data.token, options, self.device
                )
            except DrnnError:
                continue  # a prefix this corpus cannot spell is skipped, not fatal
        return samples

    def _validate(self) -> float | None:
        if len(self.val_tokens) < 2:
            return None
        data = self.config.data
        result = evaluate(
            self.model,
            self.val_tokens,
            data.batch_size,
            data.num_steps,
            self.device,
            self.config.train.precision,
        )
        return result.perplexity

    def fit(self) -> TrainResult:
        """Train from ``start_epoch`` to ``train.epochs``; checkpoints, metrics and plot kept current."""
        train = self.config.train
        self._write_run_files()
        parameters = count_parameters(self.model)
        self.reporter.start(train.epochs, self.start_epoch, parameters, device_name(self.device))
        train_ppl = self.records[-1].train_ppl if self.records else float("nan")
        val_ppl = self.records[-1].val_ppl if self.records else None
        tokens_per_s = 0.0
        stopped_early = False
        with self._signals():
            for epoch in range(self.start_epoch, train.epochs):
                train_ppl, tokens_per_s = self.train_epoch(epoch)
                done = epoch + 1
                val_ppl = self._validate() if done % train.eval_every == 0 or done == train.epochs else None
                improved = val_ppl is not None and (self.best_val_ppl is None or val_ppl < self.best_val_ppl)
                if improved:
                    self.best_val_ppl, self.bad_evals = val_ppl, 0
                    self._save(BEST, done)
                elif val_ppl is not None:
                    self.bad_evals += 1
                record = EpochRecord(
                    done, train_ppl, val_ppl, self.optimizer.param_groups[0]["lr"], tokens_per_s, self.elapsed
                )
                self._append_metrics(record)
                stopped_early = bool(train.patience and self.bad_evals >= train.patience)
                last_epoch = done == train.epochs or stopped_early
                if done % train.checkpoint_every == 0 or last_epoch:
                    self._save(LAST, done)
                self.reporter.epoch_end(record, self.best_val_ppl)
                if (
                    self.dist.is_main
                    and train.sample_every
                    and done % train.sample_every == 0
                    and not last_epoch
                ):
                    self.reporter.samples(done, self._samples())
                self._update_plot(force=last_epoch)
                # Under torchrun the ranks vote, so a signal landing between two ranks' checks stops them all.
                if self._stop_requested() if self.dist.enabled else self._stop_signal is not None:
                    self._interrupt(done, _EpochProgress())
                if stopped_early:
                    self.reporter.note(
                        f"early stop: validation perplexity has not improved for {train.patience} evaluations"
                    )
                    break
        samples = self._samples() if self.dist.is_main else {}
        self.reporter.finish()
        return TrainResult(
            run_dir=self.run_dir,
            epochs=self.records[-1].epoch if self.records else self.start_epoch,
            start_epoch=self.start_epoch,
            train_ppl=train_ppl,
            val_ppl=val_ppl,
            best_val_ppl=self.best_val_ppl,
            tokens_per_s=tokens_per_s,
            device=device_name(self.device),
            world_size=self.dist.world_size,
            parameters=parameters,
            samples=samples,
            stopped_early=stopped_early,
        )


def _check_precision_works(model: RNNLanguageModel, device: torch.device, precision: str) -> None:
    """Half precision is not everywhere: e.g. oneDNN has no bf16 LSTM on CPUs without AVX-512 BF16."""
    if precision == "fp32":
        return
    probe = torch.zeros((1, 1), dtype=torch.long, device=device)
    try:
        with torch.no_grad(), autocast(device, precision):
            model(probe, model.begin_state(1, device))
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0][:120]
        raise DrnnError(
            f"train.precision {precision} does not run on {device} with model.cell {model.config.cell} / "
            f"model.impl {model.config.impl} ({first}); use train.precision fp32"
            + (" or model.impl scratch" if model.config.impl == "torch" else "")
        ) from None


def _to_device(state: Any, device: torch.device) -> Any:
    if state is None:
        return None
    if isinstance(state, tuple | list):
        return tuple(s.to(device) for s in state)
    return state.to(device)
