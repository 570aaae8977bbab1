#!/usr/bin/env python3
"""Time recurrences on a GPU, forward and backward: cuDNN's stack two ways, and ``impl: fused``.

    python scripts/fused_bench.py [--json] [--iterations 50] [--tile 16x16 | --sweep-tiles]

First the seed model's two-layer stack through cuDNN (batch 32 × 35 steps, 256 units; the input
one-hot 28 wide as in d2l, or a 128-wide embedding), as one two-layer ``nn.LSTM`` call and as one call
per layer, in fp32, bf16 and fp16, eager and as a graph; the fp16 rows name their costliest kernels.
PyTorch lets cuDNN run its persistent kernels (the recurrent weights kept on chip across timesteps)
for 256 units only in a one-layer fp16 call whose input and hidden widths are multiples of 128, at
batch ≤ 128 (``get_algo`` in ATen's cudnn/RNN.cpp): the per-layer fp16 rows show whether that beats
the stack.

Then one LSTM layer's recurrence for the benchmark's shapes (batch 32 × 35 steps, 256 × 35,
1024 × 64; 256 units) in fp32, bf16 and fp16: the fused Triton kernels under the plain plan (persistent
where the grid fits, none of the variants training takes: ``--sweep-tiles`` times those) and forced to
one launch per timestep, against ``nn.LSTM`` (cuDNN) on the same input,
each run eagerly and as one CUDA graph; every fused run also reports whether a grid barrier timed out.

Microseconds per forward + backward, from CUDA events over ``--iterations`` after a warm-up. With
``--json`` the whole report so far is printed after every row (the last line is complete). ``--tile
BxH`` overrides the planned tile (a tuning aid); ``--sweep-tiles`` times only the seed layer as a
graph, in bf16 and fp32: cuDNN (fp32 with TF32 off and on), then the persistent kernel in each of
SWEPT_VARIANTS (tiles from 16 × 16, 32 programs, to 32 × 64, 4 programs, at 4 or 8 warps; W_hh
resident across timesteps; one counter for the barrier; TF32 products); then the seed model's whole
two-layer stack, cuDNN's against ``impl: fused`` under each DRNN_FUSED_LAUNCH of STACK_VARIANTS
(layer by layer, and the whole stack as one wavefront launch). ``scripts/gpu_check.py`` runs it as
its ``fused-kernels`` and ``fused-tiles`` steps.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from drnn_cli import fused_recurrence  # noqa: E402

SHAPES = ((32, 35, 256), (256, 35, 256), (1024, 64, 256))  # (batch, steps, hidden)


def time_us(run: Callable[[], None], iterations: int, graph: bool) -> float:
    """Mean microseconds per call; with ``graph``, of replaying ``run`` captured once."""
    for _ in range(3):
        run()  # compile, autotune cuDNN, allocate
    torch.cuda.synchronize()
    if graph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream().wait_stream(side)
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            run()
        run = captured.replay
        run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iterations):
        run()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / iterations


def fused_runner(
    batch: int,
    steps: int,
    hidden: int,
    dtype: torch.dtype,
    launch: fused_recurrence.Launch,
    error: torch.Tensor,
) -> Callable[[], None]:
    device = torch.device("cuda")
    xg = torch.randn(steps, batch, 4 * hidden, device=device, requires_grad=True)
    w_hh = (torch.randn(4 * hidden, hidden, device=device) / hidden**0.5).requires_grad_(True)
    h0 = torch.zeros(batch, hidden, device=device)
    probe = torch.randn(steps, batch, hidden, device=device)

    def run() -> None:
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            out, _, _ = fused_recurrence.fused_layer(xg, h0, h0, w_hh, launch=launch, error=error)
        (out * probe).sum().backward()

    return run


def cudnn_runner(batch: int, steps: int, hidden: int, dtype: torch.dtype) -> Callable[[], None]:
    device = torch.device("cuda")
    layer = nn.LSTM(hidden, hidden).to(device)
    x = torch.randn(steps, batch, hidden, device=device, requires_grad=True)
    probe = torch.randn(steps, batch, hidden, device=device)

    def run() -> None:
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            out, _ = layer(x)
        (out.float() * probe).sum().backward()

    return run


STACK_SHAPE = (32, 35, 256)  # (batch, steps, hidden): the seed configuration
STACK_INPUTS = (28, 128)  # the one-hot width of d2l's vocabulary; an embedding cuDNN can persist on
DTYPES = (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16))


def stack_runner(input_size: int, dtype: torch.dtype, per_layer: bool) -> Callable[[], None]:
    """Two LSTM layers through cuDNN: one ``nn.LSTM(num_layers=2)`` call, or one call per layer."""
    batch, steps, hidden = STACK_SHAPE
    device = torch.device("cuda")
    if per_layer:
        layers = [nn.LSTM(input_size, hidden).to(device), nn.LSTM(hidden, hidden).to(device)]
    else:
        layers = [nn.LSTM(input_size, hidden, num_layers=2).to(device)]
    x = torch.randn(steps, batch, input_size, device=device)  # the input needs no gradient, as one-hot
    probe = torch.randn(steps, batch, hidden, device=device)

    def run() -> None:
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            out = x
            for layer in layers:
                out, _ = layer(out)
        (out.float() * probe).sum().backward()

    return run


def top_kernels(run: Callable[[], None], count: int = 3) -> list[str]:
    """The names of the kernels that took the most device time in one call of ``run``."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        run()
        torch.cuda.synchronize()
    totals: dict[str, float] = {}
    for event in profiler.events():
        if event.device_type == DeviceType.CUDA:
            totals[event.name] = totals.get(event.name, 0.0) + event.time_range.end - event.time_range.start
    return [name[:100] for name, _ in sorted(totals.items(), key=lambda item: -item[1])[:count]]


def stack_rows(iterations: int) -> Iterator[tuple[dict[str, Any], bool]]:
    """µs per forward + backward of the two-layer stack, each way, a row at a time with whether a
    side failed; the fp16 rows also name their costliest kernels (is cuDNN's persistent one there?)."""
    for input_size in STACK_INPUTS:
        for dtype_name, dtype in DTYPES:
            row: dict[str, Any] = {"input": input_size, "dtype": dtype_name}
            failed = False
            for label, per_layer in (("stack", False), ("per-layer", True)):
                try:
                    run = stack_runner(input_size, dtype, per_layer)
                    row[label] = round(time_us(run, iterations, graph=False), 1)
                    row[f"{label}-graph"] = round(time_us(run, iterations, graph=True), 1)
                    if dtype == torch.float16:
                        row[f"{label}-kernels"] = top_kernels(run)
                except Exception as problem:  # report every side, then fail
                    row[label] = f"{type(problem).__name__}: {str(problem).strip().splitlines()[0][:160]}"
                    failed = True
            yield row, failed


# (rows, units, warps). Compiled for sm_90 on a CPU (scripts/fused_compile.py's ptxas), the forward
# kernel of every tile past 16 × 16 spills at 4 warps (up to 392 B) and not, or barely (≤ 72 B), at 8;
# 32 × 128 needs 272 KiB of shared memory in fp32, more than a multiprocessor has.
SWEPT_TILES = ((16, 16, 4), (16, 32, 4), (16, 32, 8), (32, 16, 8), (16, 64, 8), (32, 32, 8), (32, 64, 8))
# (name, rows, units, warps, Launch fields): the kernel built other ways, at the tiles that did best in
# the tile sweep on an H200 (16 × 16 in fp32, 16 × 32 in bf16). "wide_k": one K tile as wide as the
# layer (block_k = hidden); "resident" reads W_hh once before the time loop (and needs wide_k);
# "counter_barrier" meets at one counter; "tf32" multiplies fp32 on TF32 tensor cores (fp32 rows only).
SWEPT_VARIANTS: tuple[tuple[str, int, int, int, dict[str, bool]], ...] = (
    *((f"{b}x{h} {w}w", b, h, w, {}) for b, h, w in SWEPT_TILES),
    ("16x16 wide-k", 16, 16, 4, {"wide_k": True}),
    ("16x16 resident", 16, 16, 4, {"wide_k": True, "resident": True}),
    ("16x16 counter", 16, 16, 4, {"counter_barrier": True}),
    ("16x16 resident counter", 16, 16, 4, {"wide_k": True, "resident": True, "counter_barrier": True}),
    ("16x16 resident counter 8w", 16, 16, 8, {"wide_k": True, "resident": True, "counter_barrier": True}),
    ("16x32 resident counter 8w", 16, 32, 8, {"wide_k": True, "resident": True, "counter_barrier": True}),
    ("16x32 counter", 16, 32, 4, {"counter_barrier": True}),
    ("16x16 tf32", 16, 16, 4, {"tf32": True}),
    ("16x16 counter tf32", 16, 16, 4, {"counter_barrier": True, "tf32": True}),
    (
        "16x16 resident counter tf32",
        16,
        16,
        4,
        {"wide_k": True, "resident": True, "counter_barrier": True, "tf32": True},
    ),
)


def variant_launches(slots: int) -> list[tuple[str, fused_recurrence.Launch]]:
    """The seed layer's persistent launch for every entry of SWEPT_VARIANTS, by name."""
    batch, _, hidden = STACK_SHAPE
    planned = fused_recurrence.plan_launch(batch, hidden, slots)
    launches = []
    for name, block_b, block_h, warps, options in SWEPT_VARIANTS:
        launch = fused_recurrence.with_tile(planned, batch, hidden, block_b, block_h, warps)
        fields: dict[str, Any] = {key: value for key, value in options.items() if key != "wide_k"}
        launches.append(
            (
                name,
                dataclasses.replace(
                    launch, **fields, block_k=hidden if options.get("wide_k") else launch.block_k
                ),
            )
        )
    return launches


def tile_rows(iterations: int, slots: int) -> Iterator[tuple[dict[str, Any], bool]]:
    """The seed layer (batch 32 × 35 steps, 256 units) through the persistent kernel as one graph,
    variant by variant, bf16 first, after cuDNN's time for the same layer as a graph (in fp32 with TF32
    off, as every fused variant but the tf32 ones, and on, cuDNN's default): fewer, larger programs meet
    at a cheaper barrier but each does more; a resident W_hh and one counter cut what each timestep waits for."""
    batch, steps, hidden = STACK_SHAPE
    for dtype_name, dtype in (DTYPES[1], DTYPES[0]):
        for tf32 in (False, True) if dtype == torch.float32 else (False,):
            torch.backends.cudnn.allow_tf32 = tf32
            row: dict[str, Any] = {"dtype": dtype_name, "tile": "cudnn" + (" tf32" if tf32 else "")}
            row |= {"warps": 0, "programs": 0, "barrier-timeout": False}
            try:
                runner = cudnn_runner(batch, steps, hidden, dtype)
                row["fused-graph"] = round(time_us(runner, iterations, graph=True), 1)
            except Exception as problem:  # the Triton rows still run
                row["fused-graph"] = f"{type(problem).__name__}: {str(problem).strip().splitlines()[0][:160]}"
            finally:
                torch.backends.cudnn.allow_tf32 = False
            yield row, False
        for name, launch in variant_launches(slots):
            if launch.tf32 and dtype != torch.float32:
                continue  # TF32 is a way to multiply fp32 only
            row = {"dtype": dtype_name, "tile": name, "warps": launch.num_warps, "programs": launch.programs}
            error = torch.zeros((), device="cuda", dtype=torch.int32)
            try:
                run = fused_runner(batch, steps, hidden, dtype, launch, error)
                row["fused-graph"] = round(time_us(run, iterations, graph=True), 1)
                row["barrier-timeout"] = bool(int(error))
                failed = row["barrier-timeout"]
            except Exception as problem:
                row["fused-graph"] = f"{type(problem).__name__}: {str(problem).strip().splitlines()[0][:160]}"
                # a variant the device has too few resources for is a finding; anything else is a failure
                failed = type(problem).__name__ != "OutOfResources"
            yield row, failed


# DRNN_FUSED_LAUNCH values the sweep times the seed model's whole two-layer stack through (as
# model.impl fused runs it in training): layer by layer as planned, and as one wavefront launch (the
# layers' timesteps overlapped, the layer above's input products inside the kernel) in its variants.
# fp32 rows add tf32 to each (cuDNN multiplies fp32 on TF32 tensor cores by default).
STACK_VARIANTS = (
    "16x16",
    "16x16,wavefront",
    "16x16,wavefront,counter",
    "16x16,wavefront,resident",
    "16x16,wavefront,resident,counter",
    "16x32,wavefront,counter",
    "32x16,wavefront,counter",
)


@contextlib.contextmanager
def launch_environment(words: str) -> Iterator[None]:
    """DRNN_FUSED_LAUNCH set to ``words`` inside the block (the fused stack plans under it)."""
    before = os.environ.get(fused_recurrence.LAUNCH_ENV)
    os.environ[fused_recurrence.LAUNCH_ENV] = words
    try:
        yield
    finally:
        if before is None:
            del os.environ[fused_recurrence.LAUNCH_ENV]
        else:
            os.environ[fused_recurrence.LAUNCH_ENV] = before


def stack_variant_launches(slots: int) -> list[tuple[str, fused_recurrence.Launch]]:
    """The seed stack's launch under each of STACK_VARIANTS (with TF32: fp32's), as training plans it."""
    batch, _, hidden = STACK_SHAPE
    launches = []
    for words in STACK_VARIANTS:
        with launch_environment(words):
            launches.append((words, fused_recurrence.plan_launch(batch, hidden, slots, layers=2)))
    return launches


def fused_stack_runner(input_size: int, dtype: torch.dtype) -> tuple[Callable[[], None], torch.Tensor]:
    """The seed model's two LSTM layers through ``impl: fused`` (:class:`FusedRecurrent`), planned
    when first run, i.e. under the DRNN_FUSED_LAUNCH set at that time; and its barrier's error flag."""
    from drnn_cli.models import FusedRecurrent

    batch, steps, hidden = STACK_SHAPE
    device = torch.device("cuda")
    stack = FusedRecurrent("lstm", input_size, hidden, 2).to(device)
    x = torch.randn(steps, batch, input_size, device=device)
    state = (torch.zeros(2, batch, hidden, device=device), torch.zeros(2, batch, hidden, device=device))
    probe = torch.randn(steps, batch, hidden, device=device)

    def run() -> None:
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            out, _ = stack(x, state)
        (out.float() * probe).sum().backward()

    return run, stack.barrier_error


def stack_variant_rows(iterations: int) -> Iterator[tuple[dict[str, Any], bool]]:
    """µs per forward + backward of the seed model's two-layer stack as a graph, input one-hot 28 wide:
    cuDNN's (fp32 with TF32 off and on), then impl fused under each of STACK_VARIANTS, bf16 first."""
    input_size = STACK_INPUTS[0]
    for dtype_name, dtype in (DTYPES[1], DTYPES[0]):
        for tf32 in (False, True) if dtype == torch.float32 else (False,):
            torch.backends.cudnn.allow_tf32 = tf32
            row: dict[str, Any] = {"dtype": dtype_name, "variant": "cudnn" + (" tf32" if tf32 else "")}
            try:
                row["graph"] = round(
                    time_us(stack_runner(input_size, dtype, False), iterations, graph=True), 1
                )
            except Exception as problem:  # the Triton rows still run
                row["graph"] = f"{type(problem).__name__}: {str(problem).strip().splitlines()[0][:160]}"
            finally:
                torch.backends.cudnn.allow_tf32 = False
            yield row, False
        for variant in STACK_VARIANTS:
            words = f"{variant},tf32" if dtype == torch.float32 else variant
            row = {"dtype": dtype_name, "variant": words}
            try:
                with launch_environment(words):
                    run, error = fused_stack_runner(input_size, dtype)
                    row["graph"] = round(time_us(run, iterations, graph=True), 1)
                row["barrier-timeout"] = failed = bool(int(error))
            except Exception as problem:
                row["graph"] = f"{type(problem).__name__}: {str(problem).strip().splitlines()[0][:160]}"
                failed = type(problem).__name__ != "OutOfResources"  # as in tile_rows
            yield row, failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--tile", default="", help="BxH tile instead of the planned one, e.g. 32x16")
    parser.add_argument(
        "--sweep-tiles",
        action="store_true",
        help="only the seed layer's persistent kernel, tile by tile (graph)",
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("fused_bench: no CUDA device", file=sys.stderr)
        return 2
    if not fused_recurrence.triton_available():
        print("fused_bench: Triton is not installed", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32
    slots = fused_recurrence.device_slots(torch.device("cuda"))
    rows: list[dict[str, Any]] = []
    stack: list[dict[str, Any]] = []
    report = {"device": torch.cuda.get_device_name(0), "slots": slots, "rows": rows, "stack": stack}

    def emit(row: dict[str, Any]) -> None:
        """With --json, the whole report so far after every row: a run cut off keeps what it measured."""
        print(json.dumps(report if args.json else row), flush=True)

    failed = False
    if args.sweep_tiles:
        report["tiles"] = tiles = []
        for row, row_failed in tile_rows(args.iterations, slots):
            tiles.append(row)
            failed |= row_failed
            emit(row)
        report["stack-tiles"] = stack_tiles = []
        for row, row_failed in stack_variant_rows(args.iterations):
            stack_tiles.append(row)
            failed |= row_failed
            emit(row)
        timed = [row for row in tiles if isinstance(row["fused-graph"], float) and row["programs"]]
        # a variant refused for resources is a finding; no Triton row timed at all, a failure
        return 1 if failed or not timed else 0
    for row, row_failed in stack_rows(args.iterations):  # first: the question the next step hangs on
        stack.append(row)
        failed |= row_failed
        emit(row)
    for batch, steps, hidden in SHAPES:
        for dtype_name, dtype in DTYPES:
            planned = fused_recurrence.plan_launch(batch, hidden, slots)
            if args.tile:
                block_b, block_h = (int(part) for part in args.tile.lower().split("x"))
                planned = fused_recurrence.with_tile(planned, batch, hidden, block_b, block_h)
            stepwise = fused_recurrence.plan_launch(batch, hidden, slots, mode="stepwise")
            sides: dict[str, tuple[Callable[[], None], torch.Tensor | None]] = {
                "cudnn": (cudnn_runner(batch, steps, hidden, dtype), None)
            }
            for label, launch in (("fused", planned), ("fused-stepwise", stepwise)):
                flag = torch.zeros((), device="cuda", dtype=torch.int32)
                sides[label] = (fused_runner(batch, steps, hidden, dtype, launch, flag), flag)
            row = {
                "batch": batch,
                "steps": steps,
                "hidden": hidden,
                "dtype": dtype_name,
                "tile": f"{planned.block_b}x{planned.block_h}",
                "programs": planned.programs,
                "persistent": planned.persistent,
            }
            for label, (run, error) in sides.items():
                for graph in (False, True):
                    key = f"{label}{'-graph' if graph else ''}"
                    try:
                        row[key] = round(time_us(run, args.iterations, graph), 1)
                        if error is not None and int(error):
                            row[f"{key}-barrier-timeout"] = True
                            failed = True
                    except Exception as problem:  # report every side, then fail
                        row[key] = f"{type(problem).__name__}: {str(problem).strip().splitlines()[0][:160]}"
                        failed = True
            rows.append(row)
            emit(row)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
