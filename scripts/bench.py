#!/usr/bin/env python
"""Benchmarks: drnn's training loop against the textbook loop, and the data pipeline at 100 MB scale.

Training (default mode). For each configuration, in one process, on one device, drnn's ``Trainer``
and a plain reference loop written below (d2l 0.17.6 ``train_epoch_ch8``: one-hot → nn.LSTM/GRU/RNN
→ linear, cross-entropy, d2l's ``grad_clipping``, SGD, ``loss.item()`` every step) are warmed up,
then timed in alternating rounds over the same minibatches (``drnn_cli.batches.epoch_batches``
with drnn's per-epoch generators) and from the same initial weights. The median tokens/s of each
side and their ratio drnn/reference are reported::

    python scripts/bench.py --device cpu --configs lstm-seed --rounds 2 --epochs-per-round 2
    python scripts/bench.py --device cuda --json            # every configuration on a GPU
    python scripts/bench.py --device cuda --dry-run         # the plan, without running (no GPU needed)

On a GPU drnn runs in two modes, each its own Trainer from the same weights: ``eager`` (the step
launched kernel by kernel) and ``graph`` (``train.cuda_graph: on``, the step replayed as one CUDA
graph); ``--modes`` picks. Each mode's tokens/s and ratio to the reference are reported under
``modes``; the top-level ``drnn_*`` figures and ``ratio`` are the first mode's. A half-precision
configuration's reference runs under autocast as drnn's side does; its modes also carry
``ratio_to_fp32_reference``, against the textbook loop in fp32 as d2l runs it, timed for the same shape
in the same run (``with_fp32_references``).

Data scale (``--data-scale [MB]``, default 100). A synthetic file of that many MiB is built by
repeating the Time Machine in a temporary directory; a fresh subprocess per preprocessing mode then
times ``drnn_cli.data.load_dataset`` (read, preprocess, count, encode, split) and reads its own peak
RSS. The target is ≤ 15 s and ≤ 1 GiB peak RSS for 100 MB on a 2-core machine (≤ 60 s and ≤ 3 GiB
above 100 MB, for 1 GB). A second fresh
process then loads the same file again, from the token cache the first one wrote (texts of 1 MiB and
more), and that time is reported as ``cached_seconds`` (target ≤ 2 s)::

    python scripts/bench.py --data-scale 100 --json

Profile (``--profile``). Instead of timing rounds, each chosen configuration's sides run
``--epochs-per-round`` epochs (default 2) after the warm-up under ``torch.profiler``, and the report
says, per training step: the wall time, what the device was busy for (the union of its kernels' and
copies' intervals) and how many kernels it ran, the host's top-level operators, the operators that
compute (not views or allocations: on a GPU about one kernel each, so on a CPU the stand-in for a
step's launches), and the kernels (on a CPU, the operators) that took the most time. A step replayed as a CUDA graph that keeps the device
busy for most of its wall time is bound by the kernels themselves; one with gaps, by launches::

    python scripts/bench.py --device cuda --profile --configs lstm-seed,lstm-seed-bf16 --json

With ``--json`` stdout is JSON lines: the report so far after each round (a run cut short by a time
limit still leaves its measurements), the whole report as the last line, each printed once; the
human-readable table goes to stderr. On a small shared CPU pass ``--threads 1``: a two-thread OpenMP team whose second core is busy
can make a seed-size step 20-30× slower, on both sides, which swamps the comparison.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, no_type_check

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import DeviceType
from torch.autograd.profiler_util import FunctionEvent
from torch.profiler import ProfilerActivity, profile

from drnn_cli.batches import EpochBatches, epoch_batches
from drnn_cli.config import Config, DataConfig, build_config
from drnn_cli.data import Dataset, load_dataset
from drnn_cli.errors import DrnnError, first_line
from drnn_cli.runtime import device_name, resolve_device
from drnn_cli.start_point import StartPoint
from drnn_cli.train import Trainer

REPO = Path(__file__).resolve().parents[1]
SHARED_CORPUS = REPO.parent / "shared" / "data" / "timemachine.txt"
DATA_SECONDS_TARGET = 15.0  # 100 MB
DATA_RSS_TARGET_MIB = 1024.0
GB_SECONDS_TARGET = 60.0  # above 100 MB, up to 1 GB
GB_RSS_TARGET_MIB = 3072.0
CACHE_SECONDS_TARGET = 2.0
MIB = 1 << 20

# The seed recipe (configs/lstm2.yaml, d2l §9.3), written out so the benchmark does not move when
# the presets are edited. Sampling, checkpoints and validation are not part of what is timed.
SEED_TREE: dict[str, Any] = {
    "data": {
        "corpus": "timemachine",
        "preprocess": "d2l",
        "token": "char",
        "max_tokens": 10000,
        "batch_size": 32,
        "num_steps": 35,
        "sampling": "sequential",
    },
    "model": {"cell": "lstm", "hidden_size": 256, "num_layers": 2, "impl": "torch"},
    "train": {"epochs": 500, "optimizer": "sgd", "lr": 2.0, "clip": 1.0, "seed": 0, "sample_every": 0},
}


@dataclass(frozen=True)
class BenchConfig:
    """A named benchmark configuration: ``--set`` overrides on top of the seed recipe."""

    name: str
    description: str
    overrides: tuple[str, ...] = ()
    big: bool = False  # a GPU-sized configuration: on a CPU only with --big
    default: bool = True  # run without --configs (compiling ones are asked for by name: minutes at first)


FULL = "data.max_tokens=-1"
BENCHMARKS: dict[str, BenchConfig] = {
    b.name: b
    for b in (
        BenchConfig("lstm-seed", "2×256 LSTM, B32 T35, first 10k chars, SGD lr 2 (d2l §9.3)"),
        BenchConfig("gru-seed", "2×256 GRU, seed setting", ("model.cell=gru",)),
        BenchConfig("rnn-seed", "2×256 tanh RNN, seed setting, lr 1", ("model.cell=rnn", "train.lr=1.0")),
        BenchConfig("lstm-seed-bf16", "lstm-seed under bf16 autocast", ("train.precision=bf16",)),
        BenchConfig(
            "lstm-seed-fp16",
            "lstm-seed under fp16 autocast with loss scaling (under a graph: fused SGD)",
            ("train.precision=fp16",),
        ),
        BenchConfig(
            "lstm-seed-fp16-each",
            "lstm-seed-fp16 with model.layer_calls: each (cuDNN may persist layer 2: input 256, fp16)",
            ("train.precision=fp16", "model.layer_calls=each"),
        ),
        BenchConfig(
            "gru-seed-bf16", "gru-seed under bf16 autocast", ("model.cell=gru", "train.precision=bf16")
        ),
        BenchConfig(
            "rnn-seed-bf16",
            "rnn-seed under bf16 autocast",
            ("model.cell=rnn", "train.lr=1.0", "train.precision=bf16"),
        ),
        BenchConfig("scratch-lstm-seed", "lstm-seed with impl: scratch", ("model.impl=scratch",)),
        BenchConfig(
            "scratch-gru-seed", "gru-seed with impl: scratch", ("model.cell=gru", "model.impl=scratch")
        ),
        BenchConfig(
            "scratch-rnn-seed",
            "rnn-seed with impl: scratch",
            ("model.cell=rnn", "train.lr=1.0", "model.impl=scratch"),
        ),
        BenchConfig(
            "compiled-lstm-seed",
            "lstm-seed with impl: scratch, cells through torch.compile (train.compile on)",
            ("model.impl=scratch", "train.compile=on"),
            default=False,
        ),
        BenchConfig("fused-lstm-seed", "lstm-seed with impl: fused (Triton kernels)", ("model.impl=fused",)),
        BenchConfig(
            "fused-lstm-seed-bf16",
            "lstm-seed with impl: fused under bf16 autocast",
            ("model.impl=fused", "train.precision=bf16"),
        ),
        BenchConfig("fused-gru-seed", "gru-seed with impl: fused", ("model.cell=gru", "model.impl=fused")),
        BenchConfig(
            "fused-rnn-seed",
            "rnn-seed with impl: fused",
            ("model.cell=rnn", "train.lr=1.0", "model.impl=fused"),
        ),
        BenchConfig(
            "lstm-b256", "2×256 LSTM, full corpus, B256 T35, fp32", (FULL, "data.batch_size=256"), True
        ),
        BenchConfig(
            "lstm-b256-bf16",
            "2×256 LSTM, full corpus, B256 T35, bf16 autocast",
            (FULL, "data.batch_size=256", "train.precision=bf16"),
            True,
        ),
        BenchConfig(
            "fused-lstm-b256",
            "lstm-b256 with impl: fused",
            (FULL, "data.batch_size=256", "model.impl=fused"),
            True,
        ),
        BenchConfig(
            "fused-lstm-b256-bf16",
            "lstm-b256-bf16 with impl: fused",
            (FULL, "data.batch_size=256", "train.precision=bf16", "model.impl=fused"),
            True,
        ),
        BenchConfig(
            "lstm-b1024-bf16",
            "2×256 LSTM, full corpus, B1024 T64, bf16 autocast",
            (FULL, "data.batch_size=1024", "data.num_steps=64", "train.precision=bf16"),
            True,
        ),
        BenchConfig(
            "fused-lstm-b1024-bf16",
            "lstm-b1024-bf16 with impl: fused",
            (FULL, "data.batch_size=1024", "data.num_steps=64", "train.precision=bf16", "model.impl=fused"),
            True,
        ),
    )
}


# ---------------------------------------------------------------------------------------------
# The reference: d2l 0.17.6's RNNModel, grad_clipping and train_epoch_ch8, as the textbook has them


class ReferenceModel(nn.Module):
    """d2l's ``RNNModel``: one-hot inputs, a torch recurrent layer, a linear layer on ``(T·B, H)``.

    Built in the same order as drnn's ``RNNLanguageModel`` (recurrent layer, then the linear one), so
    after the same ``torch.manual_seed`` both start from identical weights.
    """

    def __init__(self, cell: str, vocab_size: int, hidden_size: int, num_layers: int) -> None:
        super().__init__()
        layer = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[cell]
        self.cell = cell
        self.vocab_size = vocab_size
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.rnn = layer(vocab_size, hidden_size, num_layers)
        self.linear = nn.Linear(hidden_size, vocab_size)

    def forward(self, inputs: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        x = F.one_hot(inputs.T.long(), self.vocab_size).to(torch.float32)
        y, state = self.rnn(x, state)
        return self.linear(y.reshape((-1, y.shape[-1]))), state

    def begin_state(self, batch_size: int, device: torch.device) -> Any:
        h = torch.zeros((self.num_layers, batch_size, self.hidden_size), device=device)
        return (h, torch.zeros_like(h)) if self.cell == "lstm" else h


@no_type_check  # d2l's code as written
def grad_clipping(net: nn.Module, theta: float) -> None:
    """d2l's ``grad_clipping``: the global norm, and a host-side ``if`` on it."""
    params = [p for p in net.parameters() if p.requires_grad]
    norm = torch.sqrt(sum(torch.sum(p.grad**2) for p in params))
    if norm > theta:
        for param in params:
            param.grad[:] *= theta / norm


def reference_epoch(
    net: ReferenceModel,
    batches: EpochBatches,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    clip: float,
    precision: str,
    scaler: torch.amp.GradScaler,
) -> tuple[float, int]:
    """d2l's ``train_epoch_ch8`` over ``batches`` (on the CPU, moved per step); returns (ppl, tokens).

    The state is carried and detached between sequential minibatches (out of place: ``detach_`` on
    the views nn.LSTM returns is refused by recent PyTorch), and the loss is read with ``.item()``
    every step, as d2l's ``Accumulator`` does. bf16/fp16 configurations run the forward pass and the
    loss under ``torch.autocast``, which d2l does not have, so both sides do the same arithmetic;
    fp16 scales the loss as PyTorch's AMP recipe does (``scaler``: a no-op unless fp16).
    """
    loss_fn = nn.CrossEntropyLoss()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    state = None
    loss_sum, count = 0.0, 0
    for x, y_rows in batches:
        if state is None or not batches.carries_state:
            state = net.begin_state(x.shape[0], device)
        else:
            state = tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()
        y = y_rows.T.reshape(-1)
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            y_hat, state = net(x, state)
            loss = loss_fn(y_hat, y.long()).mean()
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        if clip > 0:
            scaler.unscale_(optimizer)
            grad_clipping(net, clip)
        scaler.step(optimizer)
        scaler.update()
        loss_sum += loss.item() * y.numel()
        count += y.numel()
    return math.exp(loss_sum / count), count


def check_reference_supports(config: Config) -> None:
    """The textbook loop knows one-hot inputs, torch cells, plain SGD, no dropout; refuse the rest."""
    model, train = config.model, config.train
    problems = [
        text
        for bad, text in (
            (model.embedding_dim != 0, "model.embedding_dim must be 0 (one-hot)"),
            (model.dropout + model.output_dropout + model.weight_drop > 0, "dropouts must be 0"),
            (model.nonlinearity != "tanh", "model.nonlinearity must be tanh"),
            (model.init != "torch", "model.init must be torch"),
            (train.optimizer != "sgd" or train.momentum or train.weight_decay, "plain SGD only"),
            (train.schedule != "constant" or train.warmup_epochs, "a constant learning rate only"),
        )
        if bad
    ]
    if problems:
        raise DrnnError("the reference loop cannot run this configuration: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------
# Timing


@dataclass
class Side:
    """One contender: how to run an epoch, and what it measured."""

    name: str
    run_epoch: Callable[[int], tuple[float, int]]  # epoch index → (train ppl, tokens)
    rates: list[float] = field(default_factory=list)
    last_ppl: float = float("nan")
    warmup_epoch_s: float = float("nan")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_epochs(side: Side, epochs: Iterable[int], device: torch.device) -> tuple[float, int]:
    """Wall seconds and tokens for ``epochs`` of ``side``, the device drained before and after."""
    synchronize(device)
    started = time.perf_counter()
    tokens = 0
    for epoch in epochs:
        side.last_ppl, n = side.run_epoch(epoch)
        tokens += n
    synchronize(device)
    return time.perf_counter() - started, tokens


MODES = {"eager": "off", "graph": "on"}  # drnn mode → train.cuda_graph


def drnn_side(config: Config, dataset: Dataset, device: torch.device, run_dir: Path, mode: str) -> Side:
    """drnn's ``Trainer`` with the step run eagerly or replayed as a CUDA graph."""
    config = config.model_copy(deep=True)
    config.train.cuda_graph = MODES[mode]  # type: ignore[assignment]
    trainer = Trainer(StartPoint(config), dataset, run_dir / mode, device)
    data = config.data

    def drnn_epoch(epoch: int) -> tuple[float, int]:
        # Trainer.train_epoch is the loop of Trainer.fit without validation, checkpoints or samples.
        ppl = trainer.train_epoch(epoch)[0].ppl
        n = (
            len(epoch_batches(dataset.splits.train, config.data, config.train.seed, epoch))
            * data.batch_size
            * data.num_steps
        )
        return ppl, n

    return Side(f"drnn-{mode}", drnn_epoch)


def make_sides(
    config: Config, dataset: Dataset, device: torch.device, run_dir: Path, modes: list[str]
) -> tuple[list[Side], Side]:
    """drnn's ``Trainer`` (one per mode) and the reference loop, from the same seed, same minibatches."""
    drnn_sides = [drnn_side(config, dataset, device, run_dir, mode) for mode in modes]

    torch.manual_seed(config.train.seed)
    net = ReferenceModel(
        config.model.cell, len(dataset.vocab), config.model.hidden_size, config.model.num_layers
    )
    net.to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=config.train.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=config.train.precision == "fp16")
    train_cpu = dataset.splits.train

    def reference(epoch: int) -> tuple[float, int]:
        batches = epoch_batches(train_cpu, config.data, config.train.seed, epoch)
        return reference_epoch(
            net, batches, optimizer, device, config.train.clip, config.train.precision, scaler
        )

    return drnn_sides, Side("reference", reference)


def config_summary(config: Config, dataset: Dataset) -> dict[str, Any]:
    return {
        "cell": config.model.cell,
        "impl": config.model.impl,
        "hidden_size": config.model.hidden_size,
        "num_layers": config.model.num_layers,
        "batch_size": config.data.batch_size,
        "num_steps": config.data.num_steps,
        "max_tokens": config.data.max_tokens,
        "train_tokens": len(dataset.splits.train),
        "precision": config.train.precision,
        "optimizer": config.train.optimizer,
        "lr": config.train.lr,
        "clip": config.train.clip,
        "seed": config.train.seed,
    }


@contextlib.contextmanager
def bench_sides(
    config: Config, dataset: Dataset, device: torch.device, args: argparse.Namespace
) -> Iterator[tuple[list[str], list[Side], Side]]:
    """(drnn modes, drnn's sides, the reference) for one configuration, their run files in a temporary
    directory for as long as they are used: what timing and profiling both start from."""
    check_reference_supports(config)
    modes = drnn_modes(args, device)
    with tempfile.TemporaryDirectory(prefix="drnn-bench-") as run_dir:
        drnn_sides, reference = make_sides(config, dataset, device, Path(run_dir), modes)
        yield modes, drnn_sides, reference


def bench_config(
    bench: BenchConfig,
    config: Config,
    dataset: Dataset,
    device: torch.device,
    args: argparse.Namespace,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Warm both sides up, then time them in alternating rounds; the per-config JSON entry."""
    with bench_sides(config, dataset, device, args) as (modes, drnn_sides, reference):
        sides = [*drnn_sides, reference]
        for side in sides:  # every side warms up on the same epochs; the last one calibrates
            for warmup_epoch in range(args.warmup_epochs):
                side.warmup_epoch_s, _ = time_epochs(side, [warmup_epoch], device)
        epoch = args.warmup_epochs
        per_round = args.epochs_per_round
        if per_round is None:  # long enough that the fastest side runs ~round_seconds per round
            fastest = max(min(side.warmup_epoch_s for side in sides), 1e-6)
            per_round = max(1, min(10_000, math.ceil(args.round_seconds / fastest)))
        warmups = ", ".join(f"{side.name} {side.warmup_epoch_s:.3f} s" for side in sides)
        log(f"{bench.name}: warm-up epoch {warmups}; {args.rounds} rounds × {per_round} epochs")
        for round_index in range(args.rounds):
            epochs = range(epoch, epoch + per_round)
            shift = round_index % len(sides)  # rotate who goes first: drift hits every side alike
            for side in sides[shift:] + sides[:shift]:
                seconds, tokens = time_epochs(side, epochs, device)
                side.rates.append(tokens / seconds)
            epoch += per_round
            rates = ", ".join(f"{side.name} {side.rates[-1]:,.0f}" for side in sides)
            log(f"{bench.name}: round {round_index + 1}: {rates} tokens/s")
    reference_rate = statistics.median(reference.rates)
    mode_figures = {
        mode: {
            "tokens_per_s": statistics.median(side.rates),
            "ratio": statistics.median(side.rates) / reference_rate,
            "rounds": side.rates,
            "train_ppl": side.last_ppl,
        }
        for mode, side in zip(modes, drnn_sides, strict=True)
    }
    drnn = drnn_sides[0]
    drnn_rate = statistics.median(drnn.rates)
    return {
        "name": bench.name,
        "description": bench.description,
        "device": device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "config": config_summary(config, dataset),
        "rounds": args.rounds,
        "epochs_per_round": per_round,
        "drnn_tokens_per_s": drnn_rate,
        "reference_tokens_per_s": reference_rate,
        "ratio": drnn_rate / reference_rate,
        "drnn_rounds": drnn.rates,
        "reference_rounds": reference.rates,
        "drnn_train_ppl": drnn.last_ppl,
        "reference_train_ppl": reference.last_ppl,
        "modes": mode_figures,
    }


def drnn_modes(args: argparse.Namespace, device: torch.device) -> list[str]:
    """``--modes``, or eager and graph on a GPU, eager alone on a CPU (a CUDA graph needs CUDA)."""
    modes = args.modes or (["eager", "graph"] if device.type == "cuda" else ["eager"])
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown:
        raise DrnnError(f"unknown --modes {', '.join(unknown)}; choose from: {', '.join(MODES)}")
    if device.type != "cuda" and "graph" in modes:
        raise DrnnError("--modes graph needs a CUDA device (train.cuda_graph captures CUDA work only)")
    return modes


def skip_reason(
    bench: BenchConfig, config: Config, device: torch.device, args: argparse.Namespace
) -> str | None:
    """Why ``bench`` does not run on ``device``, or None. Half precision is a GPU benchmark: CPU bf16
    autocast is emulated on most CPUs, and nn.LSTM under it fails in oneDNN on AVX2-only ones."""
    if device.type != "cpu":
        return None
    if config.model.impl == "fused":
        return "impl: fused runs Triton kernels on CUDA (on a CPU it steps the scratch cells)"
    if config.train.compile == "on":
        return "train.compile is a GPU benchmark (on 2 CPU cores the compiled cell ran 7% slower)"
    if config.train.precision != "fp32":
        return f"{config.train.precision} autocast is a GPU benchmark"
    if bench.big and not args.big:
        return "a GPU-sized configuration; pass --big to run it on a CPU"
    return None


def default_configs(device: torch.device) -> list[str]:
    return [
        name
        for name, bench in BENCHMARKS.items()
        if bench.default and (device.type != "cpu" or not bench.big)
    ]


def corpus_overrides(args: argparse.Namespace) -> list[str]:
    """Point data.path at the shared Time Machine when present (no download, no cache directory)."""
    path = args.corpus or (SHARED_CORPUS if SHARED_CORPUS.is_file() else None)
    return [f"data.path={json.dumps(str(path))}"] if path else []


def chosen_configs(args: argparse.Namespace, device: torch.device) -> list[str]:
    names = args.configs or default_configs(device)
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        raise DrnnError(f"unknown --configs {', '.join(unknown)}; choose from: {', '.join(BENCHMARKS)}")
    return names


def training_plan(args: argparse.Namespace) -> list[str]:
    """What a run would do on ``--device`` (taken as named, not probed: the plan needs no GPU)."""
    wanted = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(wanted)
    modes = drnn_modes(args, device)
    lines = [f"training benchmark on {wanted}: drnn modes {', '.join(modes)} against the reference loop"]
    for name in chosen_configs(args, device):
        bench = BENCHMARKS[name]
        config = build_config(SEED_TREE, [*bench.overrides, *args.set])
        check_reference_supports(config)
        reason = skip_reason(bench, config, device, args)
        what = f"skipped ({reason})" if reason else f"reference, {', '.join(f'drnn-{m}' for m in modes)}"
        lines.append(f"  {name:<18} {bench.description}: {what}")
    return lines


PROFILE_TOP = 8  # kernels (or operators) listed per side
# Operators that only describe or allocate memory: on a GPU they launch no kernel.
SHAPE_ONLY = frozenset(
    "aten::" + name
    for name in [
        "as_strided",
        "alias",
        "view",
        "reshape",
        "_reshape_alias",
        "_unsafe_view",
        "expand",
        "slice",
        "select",
        "narrow",
        "t",
        "transpose",
        "permute",
        "unsqueeze",
        "squeeze",
        "flatten",
        "split",
        "chunk",
        "unbind",
        "detach",
        "resolve_conj",
        "resolve_neg",
        "empty",
        "empty_strided",
        "empty_like",
        "lift_fresh",
    ]
)


def computes(event: FunctionEvent) -> bool:
    """An operator that does arithmetic or moves data itself (not through operators it calls): on a
    GPU, about one kernel each, so on a CPU their count stands in for a step's kernel launches."""
    return (
        event.device_type == DeviceType.CPU
        and event.name.startswith("aten::")
        and event.name not in SHAPE_ONLY
        and not any(child.name.startswith("aten::") for child in event.cpu_children)
    )


def busy_microseconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals: device time with overlaps counted once."""
    busy, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            busy += end - max(start, reach)
            reach = end
    return busy


def step_profile(events: list[FunctionEvent], seconds: float, steps: int) -> dict[str, Any]:
    """Per-step figures of a profiled stretch of training (see the module docstring)."""
    device_events = [e for e in events if e.device_type != DeviceType.CPU]
    host_ops = [e for e in events if e.device_type == DeviceType.CPU and e.cpu_parent is None]
    if device_events:  # a GPU: what its kernels and copies took
        timed = [(e.name, e.time_range.end - e.time_range.start) for e in device_events]
    else:  # a CPU: where the operators spent their own time
        timed = [(e.name, e.self_cpu_time_total) for e in events if e.device_type == DeviceType.CPU]
    totals: dict[str, list[float]] = {}
    for name, microseconds in timed:
        entry = totals.setdefault(name, [0, 0.0])
        entry[0] += 1
        entry[1] += microseconds
    ranked = [
        {"name": name[:160], "per_step": count / steps, "us_per_step": microseconds / steps}
        for name, (count, microseconds) in sorted(totals.items(), key=lambda item: -item[1][1])
    ]
    busy = busy_microseconds([(e.time_range.start, e.time_range.end) for e in device_events])
    wall_us = seconds * 1e6 / steps
    return {
        "steps": steps,
        "wall_us_per_step": wall_us,
        "host_ops_per_step": len(host_ops) / steps,
        "computing_ops_per_step": sum(map(computes, events)) / steps,
        "device_events_per_step": len(device_events) / steps,
        "device_busy_us_per_step": busy / steps if device_events else None,
        "device_busy_fraction": busy / steps / wall_us if device_events else None,
        "top": ranked[:PROFILE_TOP],
        # Every kernel (or operator), so that a later reading can sum what a step spends outside the
        # few that dominate it (a lent GPU is not there to profile again).
        "all": ranked,
    }


def profile_config(
    bench: BenchConfig,
    config: Config,
    dataset: Dataset,
    device: torch.device,
    args: argparse.Namespace,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Warm every side up, then profile ``--epochs-per-round`` epochs of each."""
    epochs = args.epochs_per_round or 2
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    rows = config.data.batch_size * config.data.num_steps  # tokens per step
    sides_report: dict[str, Any] = {}
    with bench_sides(config, dataset, device, args) as (_, drnn_sides, reference):
        for side in [*drnn_sides, reference]:
            time_epochs(side, range(args.warmup_epochs), device)
            with profile(activities=activities) as profiler:
                seconds, tokens = time_epochs(
                    side, range(args.warmup_epochs, args.warmup_epochs + epochs), device
                )
            figures = step_profile(list(profiler.events()), seconds, max(1, tokens // rows))
            figures["tokens_per_s"] = tokens / seconds  # under the profiler: slower than the benchmark
            sides_report[side.name] = figures
            busy = figures["device_busy_fraction"]
            log(
                f"{bench.name}: {side.name}: {figures['wall_us_per_step']:,.0f} µs per step, "
                f"{figures['host_ops_per_step']:.0f} host ops, "
                f"{figures['computing_ops_per_step']:.0f} computing"
                + (
                    f", device busy {busy:.0%} ({figures['device_events_per_step']:.0f} kernels)"
                    if busy
                    else ""
                )
            )
    return {
        "name": bench.name,
        "description": bench.description,
        "device": device_name(device),
        "config": config_summary(config, dataset),
        "epochs": epochs,
        "sides": sides_report,
    }


# What the textbook loop does not depend on: it always runs nn.LSTM/GRU/RNN, so configurations that differ
# only in these time the same loop (the half-precision ones under autocast, which d2l does not have).
NOT_THE_REFERENCES = ("impl", "precision")


def reference_shape(entry: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """What decides a configuration's textbook loop: its summary without ``NOT_THE_REFERENCES``."""
    return tuple(
        sorted((key, value) for key, value in entry["config"].items() if key not in NOT_THE_REFERENCES)
    )


def with_fp32_references(configs: dict[str, Any]) -> dict[str, Any]:
    """The configurations, each half-precision one also against the textbook loop as d2l runs it: fp32.

    A half-precision configuration's own reference runs its forward pass under autocast, as drnn's side
    does, so both do the same arithmetic; but on a GPU that loop launches more kernels (the casts) and
    runs slower than d2l's fp32 loop (135,710 against 176,181 tokens/s on one H200), which flatters the
    ratio. ``fp32_reference`` is the median of every round of the textbook loop timed in fp32 for the
    same shape in this run (the fp32 configurations named in ``from``), and each mode's
    ``ratio_to_fp32_reference`` its tokens/s over that: the ratio to d2l's loop as it is. Absent where
    no fp32 configuration of the same shape was timed beside it.
    """
    fp32_rounds: dict[tuple[tuple[str, Any], ...], tuple[list[str], list[float]]] = {}
    for name, entry in configs.items():
        if "modes" in entry and entry["config"]["precision"] == "fp32":
            names, rounds = fp32_rounds.setdefault(reference_shape(entry), ([], []))
            names.append(name)
            rounds.extend(entry["reference_rounds"])
    widened: dict[str, Any] = {}
    for name, entry in configs.items():
        found = None
        if "modes" in entry and entry["config"]["precision"] != "fp32":
            found = fp32_rounds.get(reference_shape(entry))
        if found is None:
            widened[name] = entry
            continue
        names, rounds = found
        rate = statistics.median(rounds)
        modes = {
            mode: {**figures, "ratio_to_fp32_reference": figures["tokens_per_s"] / rate}
            for mode, figures in entry["modes"].items()
        }
        reference = {"tokens_per_s": rate, "rounds": len(rounds), "from": names}
        widened[name] = {**entry, "fp32_reference": reference, "modes": modes}
    return widened


def training_report(device: torch.device, results: dict[str, Any], kind: str = "training") -> dict[str, Any]:
    return {
        "benchmark": kind,
        "device": device_name(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "configs": with_fp32_references(results) if kind == "training" else results,
    }


def run_training_benchmarks(
    args: argparse.Namespace,
    log: Callable[[str], None],
    partial: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Every chosen configuration; ``partial`` gets the report so far after each one (a run cut off
    by a time limit still leaves what it measured)."""
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = chosen_configs(args, device)
    kind = "profile" if args.profile else "training"
    datasets: dict[str, Dataset] = {}
    results: dict[str, Any] = {}
    for name in names:
        bench = BENCHMARKS[name]
        config = build_config(SEED_TREE, [*corpus_overrides(args), *bench.overrides, *args.set])
        reason = skip_reason(bench, config, device, args)
        if reason:
            log(f"{name}: skipped ({reason})")
            results[name] = {"name": name, "description": bench.description, "skipped": reason}
            continue
        key = config.data.model_dump_json()
        if key not in datasets:
            datasets[key] = load_dataset(config.data)
        try:
            measure = profile_config if args.profile else bench_config
            results[name] = measure(bench, config, datasets[key], device, args, log)
        except Exception as error:  # one broken configuration (Triton's errors included) ends only itself
            problem = f"{type(error).__name__}: {first_line(error)}"
            log(f"{name}: failed ({problem})")
            if os.environ.get("DRNN_DEBUG"):  # as drnn itself does: the traceback, for a GPU run's log
                traceback.print_exc()
            results[name] = {"name": name, "description": bench.description, "error": problem}
        if partial is not None:
            partial(training_report(device, results, kind))
    return training_report(device, results, kind)


# ---------------------------------------------------------------------------------------------
# Data scale


def rss_mib(field_name: str) -> float | None:
    """``VmRSS`` / ``VmHWM`` of this process in MiB, from /proc (None where there is no /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def data_child(path: str, preprocess: str) -> None:
    """In a fresh process: time load_dataset on ``path`` and print one JSON line with peak RSS."""
    baseline = rss_mib("VmRSS")
    started = time.perf_counter()
    dataset = load_dataset(DataConfig(path=path, preprocess=preprocess, token="char"))
    seconds = time.perf_counter() - started
    peak = rss_mib("VmHWM")
    if peak is None:  # ru_maxrss is KiB on Linux, bytes on macOS
        scale = 1 if sys.platform == "darwin" else 1024
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / MIB
    print(
        json.dumps(
            {
                "seconds": seconds,
                "peak_rss_mib": peak,
                "baseline_rss_mib": baseline,
                "tokens": dataset.total_tokens,
                "vocab_size": len(dataset.vocab),
                "tokens_dtype": str(dataset.tokens.dtype),
            }
        )
    )


def write_synthetic_corpus(source: Path, target: Path, size_mib: float) -> int:
    """The source text repeated up to ``size_mib`` MiB, cut at a line end; returns the byte count."""
    text = source.read_bytes()
    wanted = int(size_mib * MIB)
    written = 0
    with target.open("wb") as handle:
        while written + len(text) <= wanted:
            handle.write(text)
            written += len(text)
        tail = text[: wanted - written]
        tail = tail[: tail.rfind(b"\n") + 1]
        handle.write(tail)
        written += len(tail)
    return written


def _data_child_result(command: list[str], env: dict[str, str], mode: str) -> dict[str, Any]:
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise DrnnError(f"the data-scale child for preprocess={mode} failed:\n{done.stderr.strip()}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_data_benchmark(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    source = Path(args.corpus) if args.corpus else SHARED_CORPUS
    if not source.is_file():
        raise DrnnError(f"the source text {source} does not exist; pass --corpus FILE")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="drnn-data-scale-") as tmp:
        path = Path(tmp) / "synthetic.txt"
        size = write_synthetic_corpus(source, path, args.data_scale)
        log(f"data scale: {size / MIB:.1f} MiB ({size:,} bytes) of repeated {source.name}")
        big = args.data_scale > 100
        seconds_target = GB_SECONDS_TARGET if big else DATA_SECONDS_TARGET
        rss_target = GB_RSS_TARGET_MIB if big else DATA_RSS_TARGET_MIB
        # The token cache goes beside the text (in this temporary directory), not into $DRNN_DATA_DIR.
        env = {key: value for key, value in os.environ.items() if key != "DRNN_DATA_DIR"}
        for mode in args.preprocess:
            command = [sys.executable, str(Path(__file__).resolve()), "--_data-child", str(path), mode]
            first, again = (_data_child_result(command, env, mode) for _ in range(2))
            result = first
            result["mib_per_s"] = size / MIB / result["seconds"]
            result["cached"] = any((path.parent / ".drnn-cache").glob("*.json"))
            result["cached_seconds"] = again["seconds"]
            result["cached_peak_rss_mib"] = again["peak_rss_mib"]
            result["ok"] = (
                result["seconds"] <= seconds_target
                and result["peak_rss_mib"] <= rss_target
                and (not result["cached"] or again["seconds"] <= CACHE_SECONDS_TARGET)
                and again["tokens"] == result["tokens"]
            )
            results[mode] = result
            log(
                f"preprocess={mode}: {result['seconds']:.2f} s, {result['mib_per_s']:.1f} MiB/s, "
                f"peak RSS {result['peak_rss_mib']:.0f} MiB, {result['tokens']:,} tokens; "
                f"again{' from the cache' if result['cached'] else ''}: {again['seconds']:.2f} s, "
                f"peak RSS {again['peak_rss_mib']:.0f} MiB"
            )
    return {
        "benchmark": "data-scale",
        "file_mib": size / MIB,
        "file_bytes": size,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "target": {
            "seconds": seconds_target,
            "peak_rss_mib": rss_target,
            "cached_seconds": CACHE_SECONDS_TARGET,
        },
        "results": results,
        "ok": all(result["ok"] for result in results.values()),
    }


# ---------------------------------------------------------------------------------------------
# Output


def config_rows(
    report: dict[str, Any], measured_rows: Callable[[str, dict[str, Any]], list[list[str]]]
) -> list[list[str]]:
    """Table rows for every configuration: ``measured_rows``'s, or why it was skipped or failed."""
    rows = []
    for name, entry in report["configs"].items():
        if "skipped" in entry or "error" in entry:
            status = "skipped" if "skipped" in entry else "FAILED"
            rows.append([name, status, entry.get("skipped") or entry["error"], "", "", "", "", ""])
        else:
            rows += measured_rows(name, entry)
    return rows


def profile_rows(name: str, entry: dict[str, Any]) -> list[list[str]]:
    rows = []
    for side, figures in entry["sides"].items():
        busy = figures["device_busy_us_per_step"]
        top = figures["top"][0] if figures["top"] else None
        rows.append(
            [
                f"{name} ({side})",
                f"{figures['wall_us_per_step']:,.0f}",
                f"{busy:,.0f}" if busy is not None else "",
                f"{figures['device_busy_fraction']:.0%}" if busy is not None else "",
                f"{figures['device_events_per_step']:.0f}" if busy is not None else "",
                f"{figures['host_ops_per_step']:.0f}",
                f"{figures['computing_ops_per_step']:.0f}",
                f"{top['name'][:40]} {top['us_per_step']:,.0f} µs" if top else "",
            ]
        )
    return rows


def training_rows(name: str, entry: dict[str, Any]) -> list[list[str]]:
    return [
        [
            f"{name} ({mode})",
            f"{figures['tokens_per_s']:,.0f}",
            f"{entry['reference_tokens_per_s']:,.0f}",
            f"{figures['ratio']:.2f}×",
            f"{figures['ratio_to_fp32_reference']:.2f}×" if "ratio_to_fp32_reference" in figures else "",
            f"{figures['train_ppl']:.2f}",
            f"{entry['reference_train_ppl']:.2f}",
            f"{entry['rounds']}×{entry['epochs_per_round']}",
        ]
        for mode, figures in entry["modes"].items()
    ]


def render(report: dict[str, Any], to_stderr: bool) -> None:
    """A rich table of the report (plain text when rich is missing)."""
    if report["benchmark"] == "profile":
        title = f"per training step, under torch.profiler — {report['device']}, torch {report['torch']}"
        header = [
            "config (side)",
            "wall µs",
            "device busy µs",
            "busy",
            "kernels",
            "host ops",
            "computing",
            "top",
        ]
        rows = config_rows(report, profile_rows)
    elif report["benchmark"] == "training":
        title = f"drnn vs the textbook loop — {report['device']}, torch {report['torch']}, {report['threads']} threads"
        header = [
            "config",
            "drnn tok/s",
            "reference tok/s",
            "ratio",
            "to fp32 ref",
            "drnn ppl",
            "ref ppl",
            "rounds×epochs",
        ]
        rows = config_rows(report, training_rows)
    else:
        target = report["target"]
        title = (
            f"load_dataset on {report['file_mib']:.0f} MiB, {report['cpu_count']} CPUs "
            f"(target ≤ {target['seconds']:.0f} s, ≤ {target['peak_rss_mib']:.0f} MiB peak RSS)"
        )
        header = [
            "preprocess",
            "seconds",
            "MiB/s",
            "peak RSS MiB",
            "baseline RSS MiB",
            "tokens",
            "vocab",
            "cached s",
            "cached RSS MiB",
            "ok",
        ]
        rows = [
            [
                mode,
                f"{r['seconds']:.2f}",
                f"{r['mib_per_s']:.1f}",
                f"{r['peak_rss_mib']:.0f}",
                f"{r['baseline_rss_mib']:.0f}" if r["baseline_rss_mib"] is not None else "?",
                f"{r['tokens']:,}",
                str(r["vocab_size"]),
                f"{r['cached_seconds']:.2f}" + ("" if r["cached"] else " (no cache)"),
                f"{r['cached_peak_rss_mib']:.0f}",
                "yes" if r["ok"] else "NO",
            ]
            for mode, r in report["results"].items()
        ]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        stream = sys.stderr if to_stderr else sys.stdout
        print(title, file=stream)
        for row in [header, *rows]:
            print("  ".join(f"{cell:>16}" for cell in row), file=stream)
        return
    table = Table(title=title)
    for index, name in enumerate(header):
        table.add_column(name, justify="left" if index == 0 else "right")
    for row in rows:
        table.add_row(*row)
    console = Console(stderr=to_stderr)
    if not console.is_terminal:  # a pipe or a log file: do not squeeze the table into 80 columns
        console = Console(stderr=to_stderr, width=120)
    console.print(table)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--configs",
        type=lambda text: [name.strip() for name in text.split(",") if name.strip()],
        default=None,
        help=f"comma-separated, from: {', '.join(BENCHMARKS)} (default: all; on a CPU the seed-size ones)",
    )
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument(
        "--modes",
        type=lambda text: [mode.strip() for mode in text.split(",") if mode.strip()],
        default=None,
        help="drnn modes, from: eager, graph (default: both on a GPU, eager on a CPU)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the training plan and exit")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="instead of timing rounds: where a step's time goes (torch.profiler)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per side (median reported)")
    parser.add_argument(
        "--epochs-per-round", type=int, default=None, help="epochs per round (default: from --round-seconds)"
    )
    parser.add_argument(
        "--round-seconds",
        type=float,
        default=2.0,
        help="without --epochs-per-round: epochs so the faster side's round lasts about this long",
    )
    parser.add_argument("--warmup-epochs", type=int, default=2, help="untimed epochs per side first")
    parser.add_argument("--big", action="store_true", help="on a CPU, also run the GPU-sized configurations")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="an extra override for every config"
    )
    parser.add_argument(
        "--corpus", default=None, help=f"the Time Machine file (default: {SHARED_CORPUS} if present)"
    )
    parser.add_argument(
        "--data-scale",
        type=float,
        nargs="?",
        const=100.0,
        default=None,
        metavar="MB",
        help="instead of training: time load_dataset on a synthetic file of MB MiB (default 100)",
    )
    parser.add_argument(
        "--preprocess",
        type=lambda text: text.split(","),
        default=["d2l", "none"],
        help="data-scale: comma-separated preprocessing modes (default d2l,none)",
    )
    parser.add_argument("--strict", action="store_true", help="data-scale: exit 1 when a target is missed")
    parser.add_argument("--json", action="store_true", help="the last stdout line is one JSON object")
    parser.add_argument("--_data-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if (
        args.rounds < 1
        or args.warmup_epochs < 1
        or (args.epochs_per_round is not None and args.epochs_per_round < 1)
    ):
        parser.error("--rounds, --warmup-epochs and --epochs-per-round must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._data_child:
        data_child(*args._data_child)
        return 0

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    printed: list[str] = []  # --json: the lines printed so far
    try:
        if args.dry_run:
            print("\n".join(training_plan(args)))
            return 0
        if args.data_scale is not None:
            report = run_data_benchmark(args, log)
        else:

            def progress(so_far: dict) -> None:
                printed.append(json.dumps(so_far))
                print(printed[-1], flush=True)

            report = run_training_benchmarks(args, log, progress if args.json else None)
    except DrnnError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    render(report, to_stderr=args.json)
    if args.json and printed[-1:] != [json.dumps(report)]:  # the last round's report is the whole one
        print(json.dumps(report))
    if args.strict and report["benchmark"] == "data-scale" and not report["ok"]:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
