"""The static-buffer step, run eagerly, is bit for bit the plain training loop.

The reference below is the step as drnn wrote it before the static buffers (and as d2l's
``train_epoch_ch8`` does it): a fresh zero state for every random minibatch or at an epoch's start,
the previous minibatch's state detached for a sequential one, forward, mean cross-entropy over the
time-major targets, backward, clip, optimizer step. Both sides start from the same weights and see
the same minibatches; losses and parameters must be *equal*, not close.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from drnn_cli.batches import epoch_batches
from drnn_cli.config import Config, TrainConfig, build_config, load_config
from drnn_cli.data import load_dataset
from drnn_cli.errors import DrnnError
from drnn_cli.models import RNNLanguageModel, build_model, detach_state
from drnn_cli.optimizers import (
    build_optimizer,
    lr_changes_every_step,
    make_capturable,
    reads_lr_on_device,
    restore_optimizer_state,
)
from drnn_cli.start_point import StartPoint
from drnn_cli.step import StaticStep, StepTally, clip_gradients, use_cuda_graph
from drnn_cli.train import Trainer

REPO = Path(__file__).resolve().parents[1]
STEPS = 12


def tiny_config(corpus_path: Path, *overrides: str) -> Config:
    tree = {
        "data": {"path": str(corpus_path), "max_tokens": 1500, "batch_size": 4, "num_steps": 8},
        "model": {"cell": "lstm", "hidden_size": 16, "num_layers": 2},
        "train": {"optimizer": "sgd", "lr": 1.0, "clip": 1.0, "seed": 5, "device": "cpu"},
    }
    return build_config(tree, list(overrides))


def reference_losses(
    model: RNNLanguageModel, optimizer: torch.optim.Optimizer, config: Config, batches: list
) -> list[torch.Tensor]:
    """The plain loop: a new state object every minibatch, carried by detaching the last one."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    carries = config.data.sampling == "sequential" and not config.train.reset_state
    losses, state = [], None
    for x, y in batches:
        state = model.begin_state(x.shape[0], "cpu") if state is None or not carries else detach_state(state)
        logits, state = model(x, state)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.t().reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.train.clip > 0:
            clip_gradients(parameters, config.train.clip)
        optimizer.step()
        losses.append(loss.detach())
    return losses


def two_epochs_of_windows(config: Config, tokens: torch.Tensor) -> list[list[torch.Tensor]]:
    """The first STEPS/2 minibatch windows ``(B, T+1)`` of epochs 0 and 1, as the trainer steps them."""
    return [
        list(epoch_batches(tokens, config.data, config.train.seed, e).windows_from(0))[: STEPS // 2]
        for e in range(2)
    ]


def pairs(windows: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (X, Y) pairs a plain loop reads from the same windows."""
    return [(window[:, :-1].long(), window[:, 1:].long()) for window in windows]


CASES = [
    ("sgd", "sequential", 1.0, ()),
    ("sgd", "sequential", 0.0, ()),
    ("sgd", "random", 1.0, ()),
    ("adamw", "sequential", 1.0, ()),
    ("adamw", "random", 0.0, ()),
    # Dropout draws from the same generator in the same order on both sides.
    ("adamw", "sequential", 1.0, ("model.impl=scratch", "model.cell=gru", "model.dropout=0.3")),
    ("sgd", "random", 1.0, ("model.cell=rnn", "model.output_dropout=0.2", "model.embedding_dim=8")),
]


@pytest.mark.parametrize(("optimizer", "sampling", "clip", "extra"), CASES)
def test_eager_static_step_is_bit_identical_to_the_plain_step(
    corpus_path: Path, optimizer: str, sampling: str, clip: float, extra: tuple[str, ...]
) -> None:
    overrides = (f"train.optimizer={optimizer}", f"data.sampling={sampling}", f"train.clip={clip}", *extra)
    config = tiny_config(corpus_path, *overrides, *(["train.lr=0.01"] if optimizer == "adamw" else []))
    dataset = load_dataset(config.data)
    epochs = two_epochs_of_windows(config, dataset.splits.train)
    vocab_size = len(dataset.vocab)

    plain = build_model(vocab_size, config.model, seed=config.train.seed)
    plain_optimizer = build_optimizer(plain, config.train)
    static = build_model(vocab_size, config.model, seed=config.train.seed)
    static_optimizer = build_optimizer(static, config.train)
    step = StaticStep(
        static,
        static,
        static_optimizer,
        torch.amp.GradScaler("cpu", enabled=False),
        config.train.clip,
        config.train.precision,
        torch.device("cpu"),
        batch_rows=config.data.batch_size,
        num_steps=config.data.num_steps,
        carries_state=sampling == "sequential",
    )
    plain.train()
    static.train()

    expected, got = [], []
    for windows in epochs:  # each epoch starts from a zero state on both sides
        torch.manual_seed(11)
        losses = reference_losses(plain, plain_optimizer, config, pairs(windows))
        expected += losses
        torch.manual_seed(11)
        step.begin_epoch(None)
        got += [step(window).clone() for window in windows]
        # The step's tally is the sum the trainer formed after each step before it moved into the step.
        loss_sum = torch.zeros((), dtype=torch.float64)
        for loss in losses:
            loss_sum += loss.double() * windows[0][:, 1:].numel()
        assert torch.equal(step.tally().loss_sum, loss_sum)
        assert int(step.tally().first_bad_step) == -1

    assert len(got) == STEPS
    assert torch.equal(torch.stack(got), torch.stack(expected))
    for (name, a), b in zip(plain.named_parameters(), static.parameters(), strict=True):
        assert torch.equal(a, b), name
    # The weights moved: identical because the arithmetic is, not because nothing happened.
    initial = build_model(vocab_size, config.model, seed=config.train.seed)
    assert not torch.equal(next(initial.parameters()), next(static.parameters()))


def tiny_step(corpus_path: Path, carries_state: bool = True) -> StaticStep:
    config = tiny_config(corpus_path)
    model = build_model(30, config.model, seed=0)
    return StaticStep(
        model, model, build_optimizer(model, config.train), torch.amp.GradScaler("cpu", enabled=False), 1.0,
        "fp32", torch.device("cpu"), batch_rows=4, num_steps=8, carries_state=carries_state,
    )  # fmt: skip


def test_the_tally_sums_loss_times_targets_and_finds_the_first_non_finite_step(corpus_path: Path) -> None:
    """A non-finite loss leaves the sum non-finite for good, so the steps counted while it was finite
    locate the first bad one; later finite losses do not hide it. 4 × 8 targets a step."""
    step = tiny_step(corpus_path)
    step.begin_epoch(None)
    seen = []
    for loss in (1.5, 2.25, float("inf"), 3.0, float("nan"), 0.5):
        step.count(torch.tensor(loss))
        tally = step.tally()
        seen.append((float(tally.loss_sum), int(tally.first_bad_step)))
    inf = float("inf")
    assert seen[:3] == [(48.0, -1), (120.0, -1), (inf, 2)]
    assert [bad for _, bad in seen[3:]] == [2, 2, 2]
    assert all(total != total for total, _ in seen[4:])  # ∞ + NaN: NaN, still not finite
    assert step.tally().loss_sum.dtype == torch.float64

    # A new epoch starts from nothing.
    step.begin_epoch(None)
    step.count(torch.tensor(float("nan")))
    assert int(step.tally().first_bad_step) == 0


def test_a_resumed_tally_continues_the_saved_one(corpus_path: Path) -> None:
    """Resumed after 3 steps: the saved sum goes on, and a bad step is numbered in the whole epoch."""
    step = tiny_step(corpus_path)
    saved = StepTally(torch.tensor(7.5, dtype=torch.float64), torch.tensor(-1))
    step.begin_epoch(None, saved, steps_done=3)
    step.count(torch.tensor(0.25))
    assert float(step.tally().loss_sum) == 7.5 + 0.25 * 32
    step.count(torch.tensor(float("nan")))
    assert int(step.tally().first_bad_step) == 4  # steps 0-2 before the stop, 3 after it, 4 bad
    assert float(saved.loss_sum) == 7.5  # the tally read at a boundary is a copy
    # The live buffers are not what tally() hands out: a later step does not change a read one.
    read = step.tally()
    step.count(torch.tensor(1.0))
    assert read.loss_sum.data_ptr() != step.loss_sum.data_ptr()

    # A saved tally that names a bad step (drnn writes none: it stops first) keeps naming it.
    step.begin_epoch(None, StepTally(torch.tensor(7.5, dtype=torch.float64), torch.tensor(1)), steps_done=3)
    step.count(torch.tensor(0.25))
    assert int(step.tally().first_bad_step) == 1


class KernelCounter(TorchDispatchMode):
    """Counts the operators that compute (views excluded: no kernel runs for them) outside the step's
    body; on a GPU each is a kernel launched between two replays of the captured step."""

    def __init__(self) -> None:
        super().__init__()
        self.outside = 0
        self.in_body = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if not self.in_body and not func.is_view:
            self.outside += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    ("sampling", "per_step", "slow"),
    [("sequential", 1, False), ("random", 3, False), ("sequential", 1, True)],
    ids=["sequential", "random", "sequential-slow-machine"],
)
def test_the_trainer_launches_one_copy_per_minibatch_outside_the_step(
    corpus_path: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    sampling: str,
    per_step: int,
    slow: bool,
) -> None:
    """Between two steps the trainer copies the minibatch's token window into the step's buffer and
    nothing else: the loss tally, the NaN watch and the targets' time-major order live inside the
    step (inside its CUDA graph when there is one). Random sampling gathers its window first (an add
    of the start offsets, an index). Counted as the difference between two epoch lengths, so what an
    epoch does once (its start and its totals) cancels. The progress bar's figures are not counted:
    they come every 0.5 s by the clock, not every step, and read the tally on a CPU only (on a GPU
    they read nothing), so a slow machine would count their reads as kernels of the longer epoch."""
    counter = KernelCounter()

    def uncounted(method: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            counter.in_body = True
            try:
                return method(*args, **kwargs)
            finally:
                counter.in_body = False

        return run

    body = real_body = StaticStep.body
    if slow:  # each step takes 0.2 s of the trainer's clock: the bar's figures every few steps
        clock = [0.0]

        def slow_body(self: StaticStep) -> torch.Tensor:
            clock[0] += 0.2
            return real_body(self)

        monkeypatch.setattr(
            "drnn_cli.train.time", SimpleNamespace(monotonic=lambda: clock[0], perf_counter=lambda: clock[0])
        )
        body = slow_body
    monkeypatch.setattr(StaticStep, "body", uncounted(body))
    monkeypatch.setattr(Trainer, "_step_status", uncounted(Trainer._step_status))
    counts = {}
    for max_tokens in (700, 1400):
        config = tiny_config(corpus_path, f"data.max_tokens={max_tokens}", f"data.sampling={sampling}")
        trainer = Trainer(
            StartPoint(config), load_dataset(config.data), tmp_path / str(max_tokens), torch.device("cpu")
        )
        counter.outside = 0
        with counter:
            trainer.train_epoch(0)
        counts[trainer.steps_per_epoch] = counter.outside
    (short, few), (long, many) = sorted(counts.items())
    assert long > short
    assert (many - few) / (long - short) == per_step


@pytest.mark.parametrize("reset_state", [False, True])
def test_trainer_epochs_equal_the_plain_loop(corpus_path: Path, tmp_path: Path, reset_state: bool) -> None:
    """Trainer.train_epoch goes through the static step: its perplexity is the plain loop's, exactly.
    With train.reset_state every minibatch starts from zeros, as d2l's loop with use_random_iter=True
    on its sequential iterator (§8.5's second run) does."""
    config = tiny_config(
        corpus_path, "train.optimizer=adamw", "train.lr=0.01", f"train.reset_state={reset_state}"
    )
    dataset = load_dataset(config.data)
    trainer = Trainer(StartPoint(config), dataset, tmp_path / "run", torch.device("cpu"))
    ppl = [trainer.train_epoch(epoch)[0].ppl for epoch in range(2)]

    plain = build_model(len(dataset.vocab), config.model, seed=config.train.seed)
    optimizer = build_optimizer(plain, config.train)
    plain.train()
    data = config.data
    for epoch in range(2):
        batches = epoch_batches(dataset.splits.train, data, config.train.seed, epoch)
        losses = reference_losses(plain, optimizer, config, list(batches))
        mean = sum(loss.double() * data.batch_size * data.num_steps for loss in losses) / (
            len(losses) * data.batch_size * data.num_steps
        )
        assert ppl[epoch] == float(torch.exp(mean))
    for a, b in zip(plain.parameters(), trainer.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_reset_state_under_random_sampling_does_nothing_and_training_says_so() -> None:
    """Random sampling starts every minibatch from zeros already: train.reset_state there changes
    nothing, which a run would otherwise not show (it is for sequential sampling, d2l §8.5)."""
    from drnn_cli.run_notes import idle_setting_notes

    random = build_config({"data": {"sampling": "random"}}, ["train.reset_state=true"])
    assert idle_setting_notes(random, planned_epochs=3, planned_steps=30) == [
        "train.reset_state starts every minibatch from a zero state, which data.sampling random does "
        "already: it changes nothing (it is for data.sampling sequential)"
    ]
    sequential = build_config({"data": {"sampling": "sequential"}}, ["train.reset_state=true"])
    assert idle_setting_notes(sequential, planned_epochs=3, planned_steps=30) == []


def test_a_resumed_epoch_starts_from_the_carried_state(corpus_path: Path) -> None:
    config = tiny_config(corpus_path)
    model = build_model(30, config.model, seed=0)
    step = StaticStep(
        model,
        model,
        build_optimizer(model, config.train),
        torch.amp.GradScaler("cpu", enabled=False),
        1.0,
        "fp32",
        torch.device("cpu"),
        batch_rows=4,
        num_steps=8,
        carries_state=True,
    )
    h, c = torch.full((2, 4, 16), 0.5), torch.full((2, 4, 16), -0.25)
    step.begin_epoch((h, c))
    carried = step.carried_state()
    assert torch.equal(carried[0], h) and torch.equal(carried[1], c)
    assert carried[0].data_ptr() != step.state[0].data_ptr()  # a copy, not the live buffer
    step.begin_epoch(None)
    assert not step.state[0].any() and not step.state[1].any()


def test_total_norm_is_the_foreach_norm_it_replaced() -> None:
    """torch.nn.utils.get_total_norm gives bit for bit the ‖·‖ that torch._foreach_norm gave."""
    generator = torch.Generator().manual_seed(0)
    grads = [torch.randn(shape, generator=generator) * 3 for shape in [(40, 28), (40,), (7, 3, 5), (1,)]]
    before = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())
    assert torch.equal(torch.nn.utils.get_total_norm(grads).float(), before)


def test_cuda_graph_choice() -> None:
    # YAML 1.1 reads a bare `cuda_graph: on` as true: it still means "on".
    assert build_config({"train": {"cuda_graph": True}}).train.cuda_graph == "on"
    assert build_config({"train": {"cuda_graph": False}}).train.cuda_graph == "off"
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    # auto: on for one CUDA device (whatever the precision: fp16's fused updates skip overflowing
    # steps inside the graph), quietly off wherever `on` would be refused (a CPU, torchrun)
    graph_note = "train.cuda_graph auto: each training step replays as one CUDA graph (off: eager)"
    assert use_cuda_graph("auto", cuda, False) == (True, graph_note)
    assert use_cuda_graph("auto", cpu, False) == (False, None)
    assert use_cuda_graph("auto", cuda, True) == (False, None)  # torchrun
    assert use_cuda_graph("auto", cpu, False, lr_every_step=True) == (False, None)
    assert use_cuda_graph("off", cuda, False) == (False, None)
    assert use_cuda_graph("off", cuda, False, lr_every_step=True) == (False, None)
    assert use_cuda_graph("on", cuda, False) == (True, None)
    # A rate that moves at every step (SGD's, baked into its graph) would mean a capture at every step:
    # eager, said in one line, under auto too (on one GPU a step several times slower than the graph's
    # went without a word), with the optimizer whose graph takes such a rate
    eager = (
        "the learning rate changes at every step (train.max_steps with a schedule or warm-up) and a captured "
        "step bakes it in; training runs without the graph (train.optimizer adamw reads its rate on the "
        "device and trains as one graph)"
    )
    assert use_cuda_graph("on", cuda, False, lr_every_step=True) == (False, f"train.cuda_graph on: {eager}")
    assert use_cuda_graph("auto", cuda, False, lr_every_step=True) == (
        False,
        f"train.cuda_graph auto: {eager}",
    )
    for device, distributed, message in [
        (
            cpu,
            False,
            "train.cuda_graph on needs a CUDA device, and this run is on cpu; set train.cuda_graph to auto or off",
        ),
        (
            cuda,
            True,
            "train.cuda_graph on is not supported under torchrun: DistributedDataParallel's gradient all-reduce "
            "is not captured; set train.cuda_graph to off",
        ),
    ]:
        with pytest.raises(DrnnError) as error:
            use_cuda_graph("on", device, distributed)
        assert str(error.value) == message


def test_which_presets_change_the_learning_rate_at_every_step() -> None:
    """Only a step budget anneals per step: lstm_full_cpu (max_steps + cosine). The d2l presets
    (constant rate) and lstm_full (cosine per epoch) change it at most once an epoch."""
    presets = {
        name: load_config(REPO / "configs" / f"{name}.yaml").train
        for name in ("lstm2", "lstm_full", "lstm_full_cpu")
    }
    assert {name: lr_changes_every_step(train) for name, train in presets.items()} == {
        "lstm2": False,
        "lstm_full": False,
        "lstm_full_cpu": True,
    }
    constant = presets["lstm_full_cpu"].model_copy(update={"schedule": "constant"})
    assert not lr_changes_every_step(constant)


def test_adam_reads_the_learning_rate_on_the_device_and_sgd_does_not() -> None:
    """So a per-step schedule keeps the graph with Adam/AdamW (lstm_full_cpu's AdamW) and runs
    eagerly with SGD (README "Using a GPU")."""
    model = torch.nn.Linear(2, 2)
    chosen = {
        name: reads_lr_on_device(type(build_optimizer(model, TrainConfig(optimizer=name))))
        for name in ("sgd", "adam", "adamw")
    }
    assert chosen == {"sgd": False, "adam": True, "adamw": True}


def test_cuda_graph_on_without_cuda_is_a_one_line_error(workdir: Path, cli, corpus_path: Path) -> None:
    code, out, err = cli(
        "train",
        "--config",
        str(REPO / "configs" / "quick.yaml"),
        "--device",
        "cpu",
        "--set",
        "train.cuda_graph=on",
    )
    assert code != 0 and out == ""
    assert err.strip().splitlines() == [
        "drnn: error: train.cuda_graph on needs a CUDA device, and this run is on cpu; "
        "set train.cuda_graph to auto or off"
    ]
    assert not (workdir / "runs" / "quick").exists() and not (workdir / "runs" / "latest").exists()


def test_a_failed_capture_names_the_first_error_and_restores_the_rates(
    corpus_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inside a capture an illegal operation fails, then ending the capture fails again ("a previous
    error during capture"): the one line names the first failure, which stays chained for
    DRNN_DEBUG. The optimizer's groups get their numeric rates back (checkpoints keep those)."""
    import contextlib

    config = tiny_config(corpus_path, "train.optimizer=adamw", "train.lr=0.01")
    dataset = load_dataset(config.data)
    model = build_model(len(dataset.vocab), config.model, seed=0)
    optimizer = build_optimizer(model, config.train)
    step = StaticStep(
        model, model, optimizer, torch.amp.GradScaler("cpu", enabled=False), 1.0, "fp32",
        torch.device("cpu"), batch_rows=config.data.batch_size, num_steps=config.data.num_steps,
        carries_state=True, graph=True,
    )  # fmt: skip
    seen_rates = []

    def failing_body() -> torch.Tensor:
        seen_rates.extend(group["lr"] for group in optimizer.param_groups)
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore")

    @contextlib.contextmanager
    def capture(graph: object):  # ends the capture the way torch.cuda.graph does: it fails too
        try:
            yield
        finally:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", object)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "graph", capture)
    monkeypatch.setattr(step, "body", failing_body)
    with pytest.raises(DrnnError) as failure:
        step._capture((0.01, 0.01))
    assert str(failure.value) == (
        "capturing the training step as a CUDA graph (train.cuda_graph auto or on) failed (CUDA error: "
        "operation not permitted when stream is capturing); set train.cuda_graph to off and report this "
        "(DRNN_DEBUG=1 shows the traceback)"
    )
    assert "not permitted" in str(failure.value.__cause__)
    # While recording, AdamW read its rates from device tensors; afterwards the groups hold numbers.
    assert [type(rate) for rate in seen_rates] == [torch.Tensor, torch.Tensor]
    assert [group["lr"] for group in optimizer.param_groups] == [0.01, 0.01]
    assert step.captures == 0


# ----- fp16 under a graph: fused updates, nothing read on the host ----------------------------------


class HostRead(AssertionError):
    """A device value read into Python: a sync that a CUDA graph cannot record."""


class NoHostReads(TorchFunctionMode):
    """Fails on every way of reading a tensor's value into Python (``.item()``, ``bool()``, ...).

    On a CPU nothing syncs, but the same Python runs on a GPU, where each of these waits for the
    device, and inside ``torch.cuda.graph`` fails the capture.
    """

    READS = frozenset(
        {
            torch.Tensor.item,
            torch.Tensor.tolist,
            torch.Tensor.numpy,
            torch.Tensor.__bool__,
            torch.Tensor.__float__,
            torch.Tensor.__int__,
        }
    )

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: tuple[type, ...],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        if func in self.READS:
            raise HostRead(func.__name__)
        return func(*args, **(kwargs or {}))


def fp16_step(config: Config, vocab_size: int, fused: bool) -> StaticStep:
    """The step as the trainer builds it for fp16: eager (plain updates) or for a graph (fused)."""
    model = build_model(vocab_size, config.model, seed=config.train.seed)
    optimizer = build_optimizer(model, config.train, fused=fused)
    if fused:
        make_capturable(optimizer)
    # A first scale far too large, and quick growth: the first steps overflow and are skipped, and
    # the scale grows again within a dozen steps.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24, growth_interval=3)
    model.train()
    return StaticStep(
        model, model, optimizer, scaler, config.train.clip, "fp16", torch.device("cpu"),
        batch_rows=config.data.batch_size, num_steps=config.data.num_steps, carries_state=True,
    )  # fmt: skip


FP16_CASES = {
    "sgd-momentum": ("train.momentum=0.9",),
    "adamw": ("train.optimizer=adamw", "train.lr=0.01"),
    "sgd-unclipped": ("train.clip=0",),  # no unscale_ before the update: the fused kernel unscales
}


@pytest.mark.parametrize("case", FP16_CASES)
def test_fp16_fused_updates_skip_what_grad_scaler_skips_without_reading_the_host(
    corpus_path: Path, case: str
) -> None:
    """fp16 under a graph (docs/gpu.md, ``train.cuda_graph``): the fused step reads nothing on the host, skips the
    same overflowing steps as today's eager fp16 step (GradScaler's host check), leaves weights and
    momentum untouched when it skips, ends at the same scale, and trains to the same weights up to
    the fused kernels' rounding. The scratch cells: CPU autocast has no fp16 LSTM kernel."""
    config = tiny_config(corpus_path, "model.impl=scratch", *FP16_CASES[case])
    dataset = load_dataset(config.data)
    windows = [window for epoch in two_epochs_of_windows(config, dataset.splits.train) for window in epoch]
    plain, fused = (fp16_step(config, len(dataset.vocab), fused=f) for f in (False, True))

    scales: dict[str, list[float]] = {"plain": [], "fused": []}
    losses: dict[str, list[torch.Tensor]] = {"plain": [], "fused": []}
    for window in windows:
        before, scale_before = [p.detach().clone() for p in fused.parameters], fused.scaler.get_scale()
        with NoHostReads():
            losses["fused"].append(fused(window).clone())
        losses["plain"].append(plain(window).clone())
        for name, step in (("plain", plain), ("fused", fused)):
            scales[name].append(step.scaler.get_scale())
        skipped = scales["fused"][-1] < scale_before  # GradScaler halves the scale when it skips
        moved = [not torch.equal(a, b) for a, b in zip(before, fused.parameters, strict=True)]
        assert not any(moved) if skipped else all(moved)

    assert scales["fused"] == scales["plain"]
    halvings = sum(b < a for a, b in itertools.pairwise([2.0**24, *scales["fused"]]))
    doublings = sum(b > a for a, b in itertools.pairwise([2.0**24, *scales["fused"]]))
    assert halvings >= 3 and doublings >= 1, scales["fused"]
    # Measured: losses equal, weights within 3e-8 after 12 steps (a fused multiply-add's rounding).
    torch.testing.assert_close(torch.stack(losses["fused"]), torch.stack(losses["plain"]), rtol=1e-5, atol=0)
    for a, b in zip(plain.parameters, fused.parameters, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_todays_eager_fp16_step_reads_the_overflow_flag_on_the_host(corpus_path: Path) -> None:
    """Why fp16 under a graph needs fused updates: GradScaler.step asks ``found_inf.item()``."""
    config = tiny_config(corpus_path, "model.impl=scratch")
    dataset = load_dataset(config.data)
    step = fp16_step(config, len(dataset.vocab), fused=False)
    window = two_epochs_of_windows(config, dataset.splits.train)[0][0]
    with NoHostReads(), pytest.raises(HostRead, match="item"):
        step(window)


@pytest.mark.parametrize(
    ("precision", "overrides"),
    [
        ("fp32", ()),
        ("fp32", ("train.momentum=0.9", "train.weight_decay=0.01", "data.sampling=random")),
        (
            "bf16",
            ("model.cell=gru", "model.dropout=0.2", "model.output_dropout=0.1", "train.ar=1", "train.tar=1"),
        ),
        ("bf16", ("model.impl=scratch", "model.weight_drop=0.3", "model.embedding_dim=8")),
    ],
)
def test_the_step_reads_nothing_on_the_host(
    corpus_path: Path, precision: str, overrides: tuple[str, ...]
) -> None:
    """What a graph replays must not read a device value on the host; on the CPU, where the step's
    Python is the same, every such read raises. (Adam/AdamW read their step counter unless made
    capturable, which PyTorch allows on GPUs only: the CUDA tests cover those.)"""
    config = tiny_config(corpus_path, f"train.precision={precision}", *overrides)
    dataset = load_dataset(config.data)
    model = build_model(len(dataset.vocab), config.model, seed=config.train.seed)
    model.train()
    step = StaticStep(
        model, model, build_optimizer(model, config.train), torch.amp.GradScaler("cpu", enabled=False),
        config.train.clip, precision, torch.device("cpu"), batch_rows=config.data.batch_size,
        num_steps=config.data.num_steps, carries_state=config.data.sampling == "sequential",
        ar=config.train.ar, tar=config.train.tar,
    )  # fmt: skip
    windows = two_epochs_of_windows(config, dataset.splits.train)[0][:3]
    before = [p.detach().clone() for p in step.parameters]
    with NoHostReads():
        for window in windows:
            step(window)
    assert all(not torch.equal(a, b) for a, b in zip(before, step.parameters, strict=True))


def test_a_restored_state_keeps_the_fused_update_and_gets_zero_momentum() -> None:
    """load_state_dict restores the saved group flags: a state saved by an eager fp16 run (plain
    SGD) restored for a graph run must stay fused, and momentum it never had starts at zero."""
    model = torch.nn.Linear(3, 2)
    config = TrainConfig(optimizer="sgd", lr=0.1, momentum=0.9)
    saved = build_optimizer(model, config).state_dict()  # never stepped: no momentum buffers
    fused = build_optimizer(model, config, fused=True)
    fused.load_state_dict(saved)
    assert fused.param_groups[0]["fused"] is None  # what load_state_dict alone leaves
    restore_optimizer_state(fused, saved)
    make_capturable(fused)
    assert fused.param_groups[0]["fused"] is True
    buffers = [fused.state[p]["momentum_buffer"] for p in model.parameters()]
    assert all(torch.equal(b, torch.zeros_like(p)) for b, p in zip(buffers, model.parameters(), strict=True))
    # The plain optimizer is left as PyTorch built it: no flag forced, no state added.
    plain = build_optimizer(model, config)
    make_capturable(plain)
    assert plain.param_groups[0]["fused"] is None and len(plain.state) == 0


def test_a_graph_runs_adamw_state_resumes_on_a_cpu() -> None:
    """A CUDA-graph run saves AdamW's groups with capturable (and, under fp16, fused) set; resumed on
    a CPU, PyTorch would refuse the update ("capturable=True ... supported devices"). Restored, the
    optimizer runs as built and continues exactly where the saved one would have."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    config = TrainConfig(optimizer="adamw", lr=0.01, weight_decay=0.1)
    original = build_optimizer(model, config)
    for _ in range(2):
        model.weight.grad, model.bias.grad = torch.randn(2, 3), torch.randn(2)
        original.step()
    saved = copy.deepcopy(original.state_dict())  # a checkpoint holds copies of the moments
    for group in saved["param_groups"]:  # as a graph run on a GPU saves them
        group |= {"capturable": True, "fused": True, "foreach": None}
    resumed_model = torch.nn.Linear(3, 2)
    resumed_model.load_state_dict(model.state_dict())
    resumed = build_optimizer(resumed_model, config)
    restore_optimizer_state(resumed, saved)
    assert [(g["capturable"], g["fused"]) for g in resumed.param_groups] == [(False, None)] * 2
    grads = torch.randn(2, 3), torch.randn(2)
    for m, optimizer in ((model, original), (resumed_model, resumed)):
        m.weight.grad, m.bias.grad = (g.clone() for g in grads)
        optimizer.step()
    assert torch.equal(resumed_model.weight, model.weight) and torch.equal(resumed_model.bias, model.bias)
    assert float(resumed.state[resumed_model.weight]["step"]) == 3.0


@pytest.mark.parametrize(
    "tampered",
    [{"maximize": True}, {"amsgrad": True}, {"betas": [2.0, 2.0]}, {"eps": -1.0}, {"weight_decay": 5.0}],
)
def test_a_restored_optimizer_takes_its_hyper_parameters_from_the_run_not_the_file(
    tampered: dict[str, Any],
) -> None:
    """A file's group settings beside the state's buffers are the run's config or PyTorch's defaults, never
    its own: a tampered maximize climbed the loss (perplexity 64.8 where 17.9), amsgrad without its
    buffers and betas of 2 stopped the first update with internal errors (red41). Restored, the update
    is the untampered state's, to the bit."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    config = TrainConfig(optimizer="adam", lr=0.01)
    original = build_optimizer(model, config)
    for _ in range(2):
        model.weight.grad, model.bias.grad = torch.randn(2, 3), torch.randn(2)
        original.step()
    saved = copy.deepcopy(original.state_dict())
    for group in saved["param_groups"]:
        group |= tampered
    resumed_model = torch.nn.Linear(3, 2)
    resumed_model.load_state_dict(model.state_dict())
    resumed = build_optimizer(resumed_model, config)
    restore_optimizer_state(resumed, saved)
    assert {key: resumed.param_groups[0][key] for key in tampered} == {
        key: original.param_groups[0][key] for key in tampered
    }
    grads = torch.randn(2, 3), torch.randn(2)
    for m, optimizer in ((model, original), (resumed_model, resumed)):
        m.weight.grad, m.bias.grad = (g.clone() for g in grads)
        optimizer.step()
    assert torch.equal(resumed_model.weight, model.weight) and torch.equal(resumed_model.bias, model.bias)


ADAMW = TrainConfig(optimizer="adamw", lr=0.01, weight_decay=0.1)


def _edited_state(
    edit: Callable[[dict[str, Any]], None], config: TrainConfig = ADAMW
) -> tuple[torch.optim.Optimizer, dict[str, Any]]:
    """A fresh optimizer over Linear(3, 2) and a stepped one's saved state, edited as a tampered file might be."""
    model = torch.nn.Linear(3, 2)
    stepped = build_optimizer(model, config)
    model.weight.grad, model.bias.grad = torch.randn(2, 3), torch.randn(2)
    stepped.step()
    saved = copy.deepcopy(stepped.state_dict())
    edit(saved)
    return build_optimizer(torch.nn.Linear(3, 2), config), saved


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s["state"][0].update(exp_avg=torch.zeros(3)), "state.0.exp_avg has shape (3,), its parameter (2, 3)"),
        (lambda s: s["state"][1].update(exp_avg_sq=5), "state.1.exp_avg_sq is no floating-point tensor"),
        (lambda s: s["state"][0].update(exp_avg_sq=-torch.ones(2, 3)), "state.0.exp_avg_sq holds negative values"),
        (lambda s: s["state"][0].pop("exp_avg"), "state.0.exp_avg is missing"),
        (lambda s: s["state"][0].update(step="7"), "state.0.step is a str"),
        (lambda s: s["state"][0].update(step=torch.tensor(-1.0)), "state.0.step is no step count"),
        (lambda s: s["state"].update({1: [1, 2]}), "state.1 is a list"),
        (lambda s: s["param_groups"][0].update(betas="ab"), "param_groups.0.betas is 'ab'"),
        (lambda s: s["param_groups"][1].update(eps=float("nan")), "param_groups.1.eps is nan"),
        (lambda s: s["param_groups"][1].pop("lr"), "param_groups.1.lr is missing"),
        (lambda s: s["param_groups"][0].update(params=[1]), "param_groups list a parameter twice"),
        (lambda s: s["param_groups"][0].update(params=["0"]), "param_groups.0 is no group of parameter ids"),
        (lambda s: s["param_groups"][0].update(params=[0, 2]), "loaded state dict contains a parameter group that doesn't match the size of optimizer's group"),
    ],
    ids=[
        "buffer-shape", "buffer-number", "negative-squares", "missing-buffer", "step-str", "negative-step",
        "state-not-dict", "betas-str", "eps-nan", "missing-lr", "duplicate-id", "id-str", "group-size",
    ],
)  # fmt: skip
def test_a_saved_optimizer_state_that_does_not_fit_is_refused_before_any_update(
    edit: Callable[[dict[str, Any]], None], message: str
) -> None:
    """PyTorch checks only the numbers of groups and parameters: any of these used to load and fail at
    the first update (a size mismatch, a TypeError) or train on nonsense (a NaN from negative squares)."""
    optimizer, saved = _edited_state(edit)
    with pytest.raises(ValueError) as refused:
        restore_optimizer_state(optimizer, saved)
    assert str(refused.value) == message


def test_an_sgd_state_with_a_wrong_momentum_buffer_is_refused() -> None:
    sgd = TrainConfig(optimizer="sgd", lr=0.1, momentum=0.9)
    restore_optimizer_state(*_edited_state(lambda saved: None, sgd))  # as saved: fine
    optimizer, saved = _edited_state(
        lambda saved: saved["state"][0].update(momentum_buffer=torch.zeros(3)), sgd
    )
    with pytest.raises(
        ValueError, match=r"^state\.0\.momentum_buffer has shape \(3,\), its parameter \(2, 3\)$"
    ):
        restore_optimizer_state(optimizer, saved)
