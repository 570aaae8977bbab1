"""One training step on preallocated ("static") buffers: run eagerly, or captured once as a CUDA graph.

The step (README "Reproducing d2l"): mean cross-entropy over the B·T targets, backward, clip the global
gradient norm to ``train.clip``, optimizer step, then the state carry: with sequential sampling the
final state is copied (detached) into the input-state buffer the next minibatch starts from; with
random sampling that buffer is zeroed before every minibatch. Every tensor the step reads lives at a
fixed address, and nothing in it reads a device value on the host, so the same Python code can be
replayed as one CUDA graph (``train.cuda_graph``): launching hundreds of small kernels per minibatch
is what bounds a small recurrent model on a GPU, and a graph launches them all at once.

Run eagerly, it does exactly the arithmetic of a plain loop that passes a freshly detached state to
every minibatch (tests/test_step.py proves the losses and parameters bit-identical on the CPU).

The step also keeps the epoch's tally on the device (Σ loss·n, and how many steps ran before the first
non-finite loss), so a minibatch costs the host one copy and one launch, not a dozen small kernels
between replays.

Under a graph the host never runs the step's Python again, so whatever the step bakes in must not
change between replays: the inputs' addresses (minibatches are copied into the static buffers), the
optimizer's step counters (Adam/AdamW keep them on the device with ``capturable=True``), the learning
rates. Adam/AdamW read the rate from a device tensor that is refilled before each replay, so a
schedule never needs a new capture; SGD takes it as a host number, so its graph is captured again
when the rate changes. Dropout masks still differ from replay to replay: PyTorch advances the CUDA
generator's offset at every replay. fp16's loss scaler decides on the host whether to skip an update
that overflowed, unless the optimizer is fused: then its update kernels read the overflow flag on the
device and skip themselves (``fused_updates``), which is how fp16 is captured.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import nn

from drnn_cli.errors import DrnnError, first_line
from drnn_cli.models import RNNLanguageModel, State, activation_penalty, lm_loss
from drnn_cli.optimizers import reads_lr_on_device
from drnn_cli.runtime import autocast

GRAPH_WARMUP_STEPS = 3  # eager steps on a side stream before capture: optimizer state, cuDNN workspaces


def clip_gradients(parameters: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """d2l's ``grad_clipping``: if ‖g‖ > θ over all parameters together, scale every g by θ/‖g‖.

    Written without a host sync (no ``if`` on a device value): the factor min(1, θ/‖g‖) is exactly
    1 when the norm is within bounds, so the arithmetic matches d2l's branch. (PyTorch's
    ``clip_grads_with_norm_`` divides by ‖g‖ + 1e-6 instead, which is not d2l's factor.)
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = gradient_norm(parameters)
    factor = (max_norm / norm).clamp(max=1.0)
    torch._foreach_mul_(grads, factor.to(grads[0].dtype))
    return norm


def gradient_norm(parameters: list[nn.Parameter]) -> torch.Tensor:
    """‖g‖ over all parameters together, as ``clip_gradients`` measures it, leaving the gradients alone."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads).float()


class GraphChoice(NamedTuple):
    """Whether the step is captured, and, when ``on`` was asked for but is not used, the line saying why."""

    enabled: bool
    note: str | None = None


AUTO_GRAPH_NOTE = "train.cuda_graph auto: each training step replays as one CUDA graph (off: eager)"
LR_EVERY_STEP_EAGER = (
    "the learning rate changes at every step (train.max_steps with a schedule or warm-up) and a captured "
    "step bakes it in; training runs without the graph"
)
# Adam and AdamW read their rate from the device (capturable), so their graph takes a rate that moves
SGD_GRAPH_ADVICE = " (train.optimizer adamw reads its rate on the device and trains as one graph)"


def use_cuda_graph(
    choice: str,
    device: torch.device,
    distributed: bool,
    lr_every_step: bool = False,
) -> GraphChoice:
    """Whether ``train.cuda_graph`` captures the step; ``on`` where it cannot is a one-line error.

    ``auto`` captures on a CUDA device wherever ``on`` would (and says so in one note), and otherwise
    trains eagerly: without a word on a CPU and under torchrun, with a note on one CUDA device where it
    would capture at every step (a step several times slower than the graph's deserves a word).
    Verified on an H200 (README "Using a GPU"): the same perplexities as eager, 3.6-4.9× the eager
    step at batch 32 in fp32, 7.4-10.3× in bf16 and fp16 (fp16 with fused updates that skip
    overflowing steps on the device; its CUDA tests in tests/test_cuda.py passed there for every
    ``model.impl``: the graph trains as eager).
    ``lr_every_step``: the learning rate changes at every step (``train.max_steps`` with a schedule or
    warm-up) and the optimizer bakes it into the graph (SGD: see ``reads_lr_on_device``), so the step
    would be captured again at every step, slower than no graph: then it runs eagerly, with a note.
    """
    if choice == "off":
        return GraphChoice(False)
    if choice == "auto":
        if device.type != "cuda" or distributed:
            return GraphChoice(False)
        if lr_every_step:
            return GraphChoice(False, f"train.cuda_graph auto: {LR_EVERY_STEP_EAGER}{SGD_GRAPH_ADVICE}")
        return GraphChoice(True, AUTO_GRAPH_NOTE)
    if device.type != "cuda":
        raise DrnnError(
            f"train.cuda_graph on needs a CUDA device, and this run is on {device.type}; "
            "set train.cuda_graph to auto or off"
        )
    if distributed:
        raise DrnnError(
            "train.cuda_graph on is not supported under torchrun: DistributedDataParallel's gradient "
            "all-reduce is not captured; set train.cuda_graph to off"
        )
    if lr_every_step:
        return GraphChoice(False, f"train.cuda_graph on: {LR_EVERY_STEP_EAGER}{SGD_GRAPH_ADVICE}")
    return GraphChoice(True)


class StepTally(NamedTuple):
    """An epoch's losses so far, as the step keeps them on the device (copies, not the live buffers)."""

    loss_sum: torch.Tensor  # Σ loss·n over the epoch's steps, float64
    first_bad_step: torch.Tensor  # -1, or the first step whose loss was not finite, int64


class StaticStep:
    """The training step over buffers that keep their addresses: tokens, carried state, tally.

    ``step(window)`` copies a minibatch's ``(B, T+1)`` token window (``EpochBatches.windows_from``)
    into the buffers, runs the step (eagerly, or by replaying the captured graph) and returns the
    step's mean loss, a device tensor (under a graph, the same tensor every time: read it before the
    next step).
    """

    def __init__(
        self,
        network: nn.Module,
        model: RNNLanguageModel,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        clip: float,
        precision: str,
        device: torch.device,
        batch_rows: int,
        num_steps: int,
        carries_state: bool,
        graph: bool = False,
        ar: float = 0.0,
        tar: float = 0.0,
        measure_norm: bool = False,
    ) -> None:
        self.network = network  # the model, or its DistributedDataParallel wrapper
        self.model = model
        self.optimizer = optimizer
        self.scaler = scaler
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.clip = clip
        self.precision = precision
        self.device = device
        self.carries_state = carries_state
        self.graph = graph
        self.ar, self.tar = ar, tar  # AWD-LSTM's activation penalties (train.ar / train.tar)
        # The last step's gradient norm (before clipping): clipping computes it; without clipping only
        # when ``measure_norm`` asks (TensorBoard's gradient_norm), as it costs a reduction per step.
        self.measure_norm = measure_norm
        self.grad_norm: torch.Tensor | None = None
        # One time-major buffer holds a minibatch: rows 0..T-1 are the inputs, rows 1..T the targets.
        # The model and the loss read both as (B, T) views whose transposes are contiguous, so
        # neither copies them into time-major order per step.
        self.window = torch.zeros((num_steps + 1, batch_rows), dtype=torch.long, device=device)
        self.inputs = self.window[:-1].t()
        self.targets = self.window[1:].t()
        # The epoch's tally. ``finite_steps`` counts the steps after which ``loss_sum`` was still
        # finite: a non-finite loss leaves the sum non-finite for good (NaN and ∞ absorb every later
        # finite term), so the first bad step is ``finite_steps`` once the sum is not finite.
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.finite_steps = torch.zeros((), dtype=torch.int64, device=device)
        initial = model.begin_state(batch_rows, device)
        self.state: tuple[torch.Tensor, ...] = initial if isinstance(initial, tuple) else (initial,)
        self._captured: torch.cuda.CUDAGraph | None = None
        self._captured_lrs: tuple[float, ...] = ()
        self._captured_loss: torch.Tensor | None = None
        self._eager_steps = 0
        self.captures = 0  # how often the step was recorded (tests/test_cuda.py counts them)
        # Adam/AdamW under a graph: the rates the replays read, refilled from the groups' floats
        # (which the schedule sets and checkpoints keep) whenever those change.
        self._device_lrs: list[torch.Tensor] | None = None
        if graph and reads_lr_on_device(type(optimizer)):
            self._device_lrs = [
                torch.tensor(float(group["lr"]), device=device) for group in optimizer.param_groups
            ]
        self._device_lr_values: tuple[float, ...] = ()

    # ----- the carried state -----------------------------------------------------------------

    def begin_epoch(self, carried: State | None, tally: StepTally | None = None, steps_done: int = 0) -> None:
        """Zeros at an epoch's start; the saved state and tally when a run resumes inside an epoch
        after ``steps_done`` steps."""
        if tally is None:
            self.loss_sum.zero_()
            self.finite_steps.zero_()
        else:
            bad = tally.first_bad_step.to(self.device)
            # A tally that saw a bad step keeps a non-finite sum, which is what marks one (drnn saves
            # no such checkpoint; a file that claims one still reports it).
            self.loss_sum.copy_(torch.where(bad >= 0, math.nan, tally.loss_sum.to(self.device)))
            self.finite_steps.copy_(torch.where(bad >= 0, bad, steps_done))
        if carried is None:
            for buffer in self.state:
                buffer.zero_()
            return
        values = carried if isinstance(carried, tuple) else (carried,)
        for buffer, value in zip(self.state, values, strict=True):
            buffer.copy_(value)

    def count(self, loss: torch.Tensor) -> None:
        """Add a step's mean loss to the tally: three small kernels, inside the graph when there is one."""
        # An fp32 loss times n < 2**29 is exact in float64 (24 + 29 bits of mantissa), so adding it with
        # ``alpha`` is Σ loss.double()·n however the kernel rounds (a fused multiply-add or not).
        self.loss_sum.add_(loss, alpha=self.targets.numel())
        # A cross-entropy is ≥ 0 or NaN, so "finite" is "< ∞": one comparison, where isfinite is
        # four kernels ((x == x) · (|x| ≠ ∞)).
        self.finite_steps.add_(self.loss_sum < math.inf)

    def tally(self) -> StepTally:
        """The epoch's tally so far (read at boundaries: copies, no host sync)."""
        first_bad = torch.where(self.loss_sum.isfinite(), -1, self.finite_steps)
        return StepTally(self.loss_sum.clone(), first_bad)

    def carried_state(self) -> State:
        """A copy of the state the next minibatch would start from (what a checkpoint keeps)."""
        copies = tuple(buffer.clone() for buffer in self.state)
        return copies if len(copies) == 2 else copies[0]

    def _model_state(self) -> State:
        return self.state if len(self.state) == 2 else self.state[0]

    # ----- the step --------------------------------------------------------------------------

    def __call__(self, window: torch.Tensor) -> torch.Tensor:
        self.window.copy_(window.t())  # one kernel: to time-major order and int64 at once
        if not self.graph:
            return self.body()
        return self._graph_step()

    def body(self) -> torch.Tensor:
        """Forward, loss, backward, clip, update, carry, tally: no host reads, no branch on device values."""
        if not self.carries_state:
            for buffer in self.state:
                buffer.zero_()
        # The autocast cache holds casts of the weights made outside a graph; a graph must recast.
        penalty = None
        with autocast(self.device, self.precision, cache_enabled=not self.graph):
            if self.ar or self.tar:
                logits, new_state, raw, dropped = self.network(
                    self.inputs, self._model_state(), with_hidden=True
                )
                penalty = activation_penalty(raw, dropped, self.ar, self.tar)
            else:
                logits, new_state = self.network(self.inputs, self._model_state())
        loss = lm_loss(logits, self.targets)  # mean over the B·T targets, in fp32
        self.count(loss.detach())
        objective = loss if penalty is None else loss + penalty  # perplexity reports the loss alone
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(objective).backward()
        if self.clip > 0:
            self.scaler.unscale_(self.optimizer)
            self.grad_norm = clip_gradients(self.parameters, self.clip)
        elif self.measure_norm:  # unscaled first, as clipping does: the update is the same either way
            self.scaler.unscale_(self.optimizer)
            self.grad_norm = gradient_norm(self.parameters)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.carries_state:
            new_values = new_state if isinstance(new_state, tuple) else (new_state,)
            with torch.no_grad():
                for buffer, value in zip(self.state, new_values, strict=True):
                    buffer.copy_(value)
        return loss.detach()

    # ----- the CUDA graph --------------------------------------------------------------------

    def _graph_step(self) -> torch.Tensor:
        lrs = tuple(float(group["lr"]) for group in self.optimizer.param_groups)
        if self._device_lrs is not None:
            if lrs != self._device_lr_values:  # a kernel launch on this stream, no host sync
                for buffer, lr in zip(self._device_lrs, lrs, strict=True):
                    buffer.fill_(lr)
                self._device_lr_values = lrs
            stale = self._captured is None
        else:
            stale = self._captured is None or lrs != self._captured_lrs
        if stale:
            if self._eager_steps < GRAPH_WARMUP_STEPS:
                self._eager_steps += 1
                return self._on_side_stream()
            self._capture(lrs)
        assert self._captured is not None and self._captured_loss is not None
        self._captured.replay()
        return self._captured_loss

    @contextlib.contextmanager
    def _rates_from_device(self) -> Iterator[None]:
        """While recording, the groups hold the device tensors; afterwards their floats again."""
        if self._device_lrs is None:
            yield
            return
        groups = self.optimizer.param_groups
        saved = [group["lr"] for group in groups]
        try:
            for group, buffer in zip(groups, self._device_lrs, strict=True):
                group["lr"] = buffer
            yield
        finally:
            for group, lr in zip(groups, saved, strict=True):
                group["lr"] = lr

    def _on_side_stream(self) -> torch.Tensor:
        """A real training step, run eagerly on a side stream as PyTorch asks before a capture."""
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side), warnings.catch_warnings():
            # Adam's capturable=True warns when a step runs uncaptured: these few are meant to.
            warnings.filterwarnings("ignore", message=".*capturable=True.*")
            loss = self.body()
        current.wait_stream(side)
        loss.record_stream(current)  # read on the main stream: not to be reused before that
        return loss

    def _capture(self, lrs: tuple[float, ...]) -> None:
        """Record the step for the minibatch now in the buffers; the replay that follows runs it.

        A changed learning rate is baked into SGD's update kernels, so its old graph is dropped and
        the step recorded again (once per schedule change: at most once an epoch). Adam/AdamW record
        once: their update reads the rate from ``_device_lrs``.
        """
        self._captured = self._captured_loss = None
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        inside: Exception | None = None  # what failed inside the capture, if anything did
        try:
            # torch.cuda.graph records on a stream of the current device: make that this run's.
            with torch.cuda.device(self.device), self._rates_from_device(), torch.cuda.graph(graph):
                try:
                    loss = self.body()
                except Exception as error:
                    inside = error
                    raise
        except Exception as error:  # one line; `auto` captures too, so the message names both
            # When an operation inside the capture fails, leaving the graph context ends the capture,
            # which fails again ("operation failed due to a previous error during capture"): the
            # first failure is the one worth naming.
            cause = inside or error
            raise DrnnError(
                f"capturing the training step as a CUDA graph (train.cuda_graph auto or on) failed "
                f"({first_line(cause)}); set train.cuda_graph to off and report this (DRNN_DEBUG=1 shows "
                "the traceback)"
            ) from cause
        self._captured, self._captured_lrs, self._captured_loss = graph, lrs, loss
        self.captures += 1
