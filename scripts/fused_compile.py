#!/usr/bin/env python3
"""Compile the ``model.impl: fused`` kernels for a GPU that is not here, and report their resources.

    python scripts/fused_compile.py [--arch 90] [--slots 132] [--variants] [--json]

Triton compiles for a named target without a device (its own ptxas ships in the wheel), so a CPU
machine can prove that every kernel drnn would launch on an H100 (sm_90, 132 multiprocessors)
compiles, and see what ptxas makes of it: registers per thread, spilled bytes, shared memory.
It compiles, for each shape below, forward and backward, exactly the launch
:func:`drnn_cli.fused_recurrence.plan_launch` plans for the benchmark's two-layer LSTM stack: bf16 (half
products), fp32 with TF32 products (PyTorch's default) and fp32 with IEEE ones (TF32 switched off), each
with the variants the plan takes where they fit; and the same for the GRU and the tanh RNN at the seed
shape (``OTHER_CELLS``: one kernel pair serves every cell, so these prove the cells' own branches); with ``--variants``, also the seed layer's variants
that ``scripts/fused_bench.py --sweep-tiles`` times (its SWEPT_VARIANTS: other tiles, W_hh resident,
the counter barrier, TF32) and the two-layer stack's launches it times (STACK_VARIANTS: the wavefront
kernels, with dropout between the layers), and batch 1024's wavefront (BIG_STACK_VARIANTS). Exit 0 when all compiled, 1 when one failed.

Run it without ``TRITON_INTERPRET`` set (under the interpreter nothing is compiled). The kernels compile
in parallel, one process per core this process may use.
"""

from __future__ import annotations

import argparse
import inspect
import json
import multiprocessing
import os
import re
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # drnn_cli is imported below, once the Triton environment is set
    from drnn_cli.fused_recurrence import Products

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# (name, batch rows, hidden units): the benchmark's shapes (scripts/bench.py)
SHAPES = (("seed B32", 32, 256), ("B256", 256, 256), ("B1024", 1024, 256), ("B4096 (stepwise)", 4096, 256))
# the cells compiled beside the LSTM, at the seed shape (SHAPES[0]) only
OTHER_CELLS = ("gru", "rnn")
# the words scripts/gpu_check.py's bench-fused-b1024 step may train batch 1024 through (no tile, not resident)
BIG_STACK_VARIANTS = ("wavefront", "wavefront,counter")
# the plan's launches, by the weights' dtype and how the products multiply (fused_recurrence.products_for)
PLANNED_PRODUCTS: tuple[tuple[str, Products], ...] = (("bf16", "half"), ("fp32", "tf32"), ("fp32", "ieee"))
# shared memory one program may take (CUDA's opt-in maximum per block), by compute capability: what
# the plan is told on such a device (fused_recurrence.device_shared_bytes)
SHARED_BYTES = {70: 98_304, 75: 65_536, 80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448}
POINTERS = {
    "forward": (
        *("xg_ptr", "w_ptr", "wx_ptr", "bias_ptr", "hbias_ptr", "mask_ptr"),
        *("hs_ptr", "cs_ptr", "act_ptr", "flags_ptr", "error_ptr"),
    ),
    "backward": (
        *("w_ptr", "wx_ptr", "mask_ptr", "act_ptr", "states_ptr"),
        *("dout_ptr", "dz_ptr", "dc_ptr", "flags_ptr", "error_ptr"),
    ),
}


def pointer_type(name: str, dtype: str) -> str:
    if name in ("w_ptr", "wx_ptr"):  # the weights, in the product dtype
        return f"*{dtype}"
    return "*i32" if name in ("flags_ptr", "error_ptr") else "*fp32"


def compile_one(kernel: Any, pointers: tuple[str, ...], constants: dict[str, Any], arch: int, warps: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(inspect.signature(kernel.fn).parameters)
    dtype = constants.pop("_dtype")
    signature = {
        name: "constexpr" if name in constants else pointer_type(name, dtype) if name in pointers else "i32"
        for name in names
    }
    source = ASTSource(
        fn=kernel, signature=signature, constexprs={(names.index(k),): v for k, v in constants.items()}
    )
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})


def ptxas_report(ptx: str, arch: int) -> dict[str, int]:
    """Registers and spills as ``ptxas -v`` reports them (Triton's own ptxas)."""
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    ptxas = str(bundled) if bundled.is_file() else "ptxas"
    target = re.search(r"^\.target (\S+)", ptx, re.M)
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"drnn-fused-{os.getpid()}.ptx"
    path.write_text(ptx)
    try:
        done = subprocess.run(
            [
                ptxas,
                "-v",
                f"-arch={target.group(1) if target else f'sm_{arch}'}",
                str(path),
                "-o",
                os.devnull,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        path.unlink(missing_ok=True)
    text = done.stdout + done.stderr
    registers = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores", text)
    return {
        "registers": int(registers.group(1)) if registers else -1,
        "spill_bytes": int(spills.group(1)) if spills else 0,
    }


def compile_row(job: tuple[dict[str, Any], dict[str, Any]], arch: int) -> dict[str, Any]:
    """One kernel of the report, compiled: its row with ptxas's figures, or with the error."""
    from drnn_cli import fused_kernels

    row, constants = dict(job[0]), dict(job[1])
    name = row["kernel"]
    try:
        compiled = compile_one(getattr(fused_kernels, name), POINTERS[name], constants, arch, row["warps"])
        row |= ptxas_report(compiled.asm["ptx"], arch)
        row["shared_bytes"] = compiled.metadata.shared
        row["tensor_cores"] = "mma" in compiled.asm["ptx"]
        limit = SHARED_BYTES.get(arch)
        if limit is not None and compiled.metadata.shared > limit:  # Triton would refuse it
            row["error"] = (
                f"needs {compiled.metadata.shared} B of shared memory, more than sm_{arch}'s {limit}"
            )
    except Exception as error:  # report every kernel, then fail
        row["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}"
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability × 10 (90: H100/H200)")
    parser.add_argument("--slots", type=int, default=132, help="multiprocessors (132 on an H100 SXM)")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    parser.add_argument(
        "--variants",
        action="store_true",
        help="also the seed layer's variants that scripts/fused_bench.py --sweep-tiles times",
    )
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("fused_compile: unset TRITON_INTERPRET (the interpreter compiles nothing)", file=sys.stderr)
        return 2
    try:
        import triton  # noqa: F401
    except ImportError:
        print("fused_compile: Triton is not installed (pip install triton)", file=sys.stderr)
        return 2
    from drnn_cli import fused_kernels  # noqa: F401 (imported before the workers fork: they inherit it)
    from drnn_cli.fused_recurrence import KernelCell, Launch, kernel_constants, plan_launch
    from drnn_cli.model_size import GATES

    sys.path.insert(0, str(REPO / "scripts"))
    from fused_bench import launch_environment, stack_variant_launches, variant_launches

    # (label, launch, the weights' dtypes it is compiled for): the plan's own for each dtype ...
    launches: list[tuple[str, Launch, tuple[str, ...]]] = []
    shared = SHARED_BYTES.get(args.arch)
    with launch_environment(""):  # the plan as a run without DRNN_FUSED_LAUNCH makes it
        for label, batch, hidden in SHAPES:
            for dtype, products in PLANNED_PRODUCTS:
                launch = plan_launch(
                    batch, hidden, args.slots, layers=2, products=products, shared_bytes=shared
                )
                launches += [(f"{label} {products}", launch, (dtype,))]
        # ... and the other cells' at the seed shape
        label, batch, hidden = SHAPES[0]
        for other in OTHER_CELLS:
            for dtype, products in PLANNED_PRODUCTS:
                gates = GATES[other]
                launch = plan_launch(
                    batch, hidden, args.slots, layers=2, products=products, shared_bytes=shared, gates=gates
                )
                launches += [(f"{other} {label} {products}", launch, (dtype,))]
    if args.variants:  # ... and the sweep's variants in both
        both = ("fp32", "bf16")
        launches += [(f"seed {name}", launch, both) for name, launch in variant_launches(args.slots)]
        # as the sweep times them (dropout between the layers; fp32 rows on TF32 tensor cores), and as
        # the CUDA tests run them (no dropout, IEEE fp32)
        for words, launch in stack_variant_launches(args.slots):
            launches += [(f"seed stack {words} dropout tf32", replace(launch, tf32=True), both)]
            launches += [(f"seed stack {words}", launch, both)]
        # batch 1024 × 64 as one wavefront (scripts/gpu_check.py's bench-fused-b1024), no dropout
        for words in BIG_STACK_VARIANTS:
            with launch_environment(words):
                launches += [(f"B1024 stack {words}", plan_launch(1024, 256, args.slots, layers=2), both)]
    jobs: list[tuple[dict[str, Any], dict[str, Any]]] = []  # (the report's row, the kernel's constants)
    for label, launch, dtypes in launches:
        hidden = launch.grid[0] * launch.block_h
        cell = KernelCell(next((name for name in OTHER_CELLS if label.startswith(f"{name} ")), "lstm"))
        for dtype in dtypes:
            for name in ("forward", "backward"):
                masked = label.endswith("dropout tf32")
                constants = {
                    "_dtype": dtype,
                    "H": hidden,
                    **kernel_constants(launch, dtype == "fp32", masked, cell),
                }
                row: dict[str, Any] = {
                    "cell": cell.name,
                    "shape": label[:56],
                    "kernel": name,
                    "dtype": dtype,
                    "tile": f"{launch.block_b}x{launch.block_h}",
                    "grid": launch.programs,
                    "persistent": launch.persistent,
                    "layers": launch.layers,
                    "resident": launch.resident,
                    "precision": constants["PRECISION"],
                    "warps": launch.num_warps,
                }
                jobs.append((row, constants))
    # Each kernel compiles on its own core: Triton's front end, LLVM and ptxas are single-threaded.
    workers = max(1, min(len(jobs), len(os.sched_getaffinity(0))))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        rows = list(pool.map(partial(compile_row, arch=args.arch), jobs))
    failed = any("error" in row for row in rows)
    if args.json:
        print(json.dumps({"arch": args.arch, "slots": args.slots, "kernels": rows}))
    else:
        print(f"model.impl fused kernels compiled for sm_{args.arch} ({args.slots} multiprocessors)")
        for row in rows:
            what = row.get("error") or (
                f"{row['registers']} registers, {row['spill_bytes']} B spilled, {row['shared_bytes']} B shared"
                + (", tensor cores" if row["tensor_cores"] else "")
            )
            print(
                f"  {row['shape']:<22} {row['kernel']:<8} {row['dtype']}  tile {row['tile']:<6} "
                f"{row['grid']:>4} programs{' persistent' if row['persistent'] else ''}"
                f"{', resident' if row['resident'] else ''}, {row['warps']} warps: {what}"
            )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
