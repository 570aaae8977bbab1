#!/usr/bin/env python3
"""Time one LSTM layer's recurrence, forward and backward: ``model.impl: fused`` against cuDNN.

    python scripts/fused_bench.py [--json] [--iterations 50] [--tile 16x16]

On a CUDA GPU, for the benchmark's shapes (batch 32 × 35 steps, 256 × 35, 1024 × 64; 256 units) in
fp32 and bf16: the fused kernels as planned (persistent where the grid fits) and forced to one launch
per timestep, against ``nn.LSTM`` (cuDNN) on the same input, each run eagerly and as one CUDA graph.
Microseconds per forward + backward, from CUDA events over ``--iterations`` after a warm-up; every
fused run also reports whether a grid barrier timed out. ``--tile BxH`` overrides the planned tile
(a tuning aid). ``scripts/gpu_check.py`` runs it as its ``fused-kernels`` step.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from drnn_cli import fused_lstm  # noqa: E402

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
    batch: int, steps: int, hidden: int, dtype: torch.dtype, launch: fused_lstm.Launch, error: torch.Tensor
) -> Callable[[], None]:
    device = torch.device("cuda")
    xg = torch.randn(steps, batch, 4 * hidden, device=device, requires_grad=True)
    w_hh = (torch.randn(4 * hidden, hidden, device=device) / hidden**0.5).requires_grad_(True)
    h0 = torch.zeros(batch, hidden, device=device)
    probe = torch.randn(steps, batch, hidden, device=device)

    def run() -> None:
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            out, _, _ = fused_lstm.fused_lstm_layer(xg, h0, h0, w_hh, launch=launch, error=error)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--tile", default="", help="BxH tile instead of the planned one, e.g. 32x16")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("fused_bench: no CUDA device", file=sys.stderr)
        return 2
    if not fused_lstm.triton_available():
        print("fused_bench: Triton is not installed", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32
    slots = fused_lstm.device_slots(torch.device("cuda"))
    rows: list[dict[str, Any]] = []
    failed = False
    for batch, steps, hidden in SHAPES:
        for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            planned = fused_lstm.plan_launch(batch, hidden, slots)
            if args.tile:
                block_b, block_h = (int(part) for part in args.tile.lower().split("x"))
                planned = fused_lstm.Launch(
                    block_b,
                    block_h,
                    planned.block_k,
                    (hidden // block_h, -(-batch // block_b)),
                    planned.persistent,
                    8 if block_b * block_h >= 2048 else 4,
                )
            stepwise = fused_lstm.plan_launch(batch, hidden, slots, mode="stepwise")
            sides: dict[str, tuple[Callable[[], None], torch.Tensor | None]] = {
                "cudnn": (cudnn_runner(batch, steps, hidden, dtype), None)
            }
            for label, launch in (("fused", planned), ("fused-stepwise", stepwise)):
                error = torch.zeros((), device="cuda", dtype=torch.int32)
                sides[label] = (fused_runner(batch, steps, hidden, dtype, launch, error), error)
            row: dict[str, Any] = {
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
            if not args.json:
                print(json.dumps(row), flush=True)
    if args.json:
        print(json.dumps({"device": torch.cuda.get_device_name(0), "slots": slots, "rows": rows}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
