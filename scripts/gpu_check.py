#!/usr/bin/env python3
"""Everything drnn still has to prove on a GPU, in one command that fits a 10-minute device call.

    python3 scripts/gpu_check.py OUTDIR [--budget SECONDS] [--only STEP,STEP] [--dry-run]

On a CUDA machine it runs, each step in its own process with its own time limit (so one hang cannot
eat the call), and all of them within ``--budget`` seconds (default 540):

 1. ``env``        nvidia-smi, Python, torch, CUDA, cuDNN, the GPU;
 2. ``tests``      the test suite with the CUDA tests enabled (tests/test_cuda.py);
 3. ``lstm2*``     ``drnn train --config configs/lstm2.yaml --device cuda`` (500 epochs): final perplexity,
                   tokens/s, both continuations; then the same as a CUDA graph, fp32, bf16 and fp16;
 4. ``full-*``     configs/lstm_full.yaml, fp32 and bf16: best validation perplexity, the training
                   seconds at each evaluation (metrics.jsonl), ``drnn eval --split val`` of the best checkpoint;
 5. ``torchrun``   ``torchrun --standalone --nproc_per_node 1 -m drnn_cli -- train ...`` over NCCL;
 6. ``bench``      ``scripts/bench.py --device cuda --json`` (eager and CUDA graph against the textbook loop,
                   impl torch, scratch and fused);
 7. ``fused-kernels`` ``scripts/fused_bench.py``: one layer fused against cuDNN, and the seed stack as one
                   cuDNN call against one call per layer (fp32/bf16/fp16), microseconds;
    ``fused-tiles`` ``scripts/fused_bench.py --sweep-tiles``: the seed layer's persistent Triton kernel,
                   variant by variant against cuDNN (tiles, W_hh resident, a counter barrier, TF32);
    ``bench-fused-variant`` the benchmark's ``fused-lstm-seed`` fp32 and bf16 with ``DRNN_FUSED_LAUNCH``
                   (the tile sweep's variants in whole training steps);
    ``bench-fused-b1024`` the benchmark's ``fused-lstm-b1024-bf16`` with that variant's words (no tile,
                   not resident): the fused kernels on the batch-1024 target's shape;
    ``profile``   ``scripts/bench.py --profile``: per step of the seed configurations and of batch 1024,
                   wall time against the device's busy time and kernel count, eager and as a graph;
    ``bench-compiled`` the benchmark's ``compiled-lstm-seed`` (impl scratch, ``train.compile on``);
    ``lstm2-fused-graph`` and ``lstm2-fused-graph-bf16`` the seed recipe through the Triton kernels
                   (``model.impl: fused``, as planned), fp32 and bf16, graph;
    ``bench-fused-grads`` impl fused's seed configurations with ``DRNN_FUSED_LAUNCH`` naming the plan's
                   variants and ``grads`` (the backward's weight gradients multiplied as the recurrent products are);
    ``bench-seed``  the seed configurations side by side, cuDNN's and impl fused's, fp32 and bf16,
                   GRU and RNN (the seed targets, for a short call);
    ``bench-fused-plan`` impl fused as planned at batch 256 and 1024, beside cuDNN's;
    ``tests-cuda`` (only when ``--only`` names it) the CUDA tests with the CPU tests of the step and the
                   fused kernels: the suite of a call too short for ``tests``;
    ``bench-open`` (last; for a short call, with ``--only``) the benchmark's configurations that decide
                   what is still open: fp16 and fp16 one call per layer under the graph, impl scratch
                   plain and compiled;
 8. ``full-bf16-graph`` configs/lstm_full.yaml, bf16, with the CUDA graph, if time is left;
 9. ``full-cpu-recipe`` configs/lstm_full_cpu.yaml (the CPU's held-out recipe) on the GPU, if time is left:
                   the candidate to replace lstm_full.yaml's recipe; then ``full-cpu-recipe-graph``, the
                   same as one CUDA graph (AdamW reads its per-step cosine rate from the device).

It writes into OUTDIR (at most 8 files, what the device tool brings back): report.md (the targets,
measured, and a verdict each), results.json (every step), log.txt (every step's output), lstm2.json,
lstm_full.json, torchrun.json, bench.json, fused.json. Run directories go to a temporary folder. It exits 0 when
every step passed, 1 when one failed or ran out of time, 2 when it cannot start (no CUDA device, a
missing Python package, no corpus), with one line saying why.

The GPU machine lent to sessions has no network and lacks pydantic. Prepare on the CPU machine, in the
repository root (downloads the wheels into .whl/ and copies the Time Machine into .device-data/)::

    scripts/device_wheels.sh

then call the device tool's ``run`` with ``carry: [".whl", ".device-data"]`` and ``timeout_s: 600``::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; PYTHONUNBUFFERED=1 python3 scripts/gpu_check.py $OUT/gpu

and read $OUT/gpu/report.md from the files the call brings back.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BUDGET_S = 540
MIN_STEP_S = 20  # a step with less time than this left is not started
# a step killed at its limit takes this long more to end and hand over its output: its limit is cut by
# as much where the budget is nearly spent, so the last step ends inside the budget too
KILL_GRACE_S = 10
# one test's limit inside a test step (with pytest-timeout): under the shortest test step's limit, so
# that a hung test ends alone and pytest still prints its summary, instead of the step being killed mute
TEST_TIMEOUT_S = 90
LOG_LINE_CHARS = 4_000  # a longer line of a step's output (bench's growing --json report) is cut in log.txt
# held-out training runs: each reports its evaluations, and the 4.4-within-60-s target takes the best
# the profile step's configurations, most wanted first (a step cut at its limit keeps what it measured):
# cuDNN's seed step against the fused kernels', then the RNN and GRU ones never profiled (the RNN's ≥ 5×
# is open), then those the H200 profiled already (bf16, and batch 1024 × 64 in bf16)
PROFILED = (
    "lstm-seed,fused-lstm-seed,rnn-seed,fused-rnn-seed,fused-gru-seed,lstm-seed-bf16,fused-lstm-seed-bf16,"
    "lstm-b1024-bf16"
)
FUSED_STEPS = ("fused-kernels", "fused-tiles")  # scripts/fused_bench.py runs, both kept in fused.json
# scripts/bench.py runs; bench-compiled compiles (slow to start); bench-open, last in the plan, is the few
# configurations whose figures decide what is still open (fp16 under the graph, one cuDNN call per layer,
# the scratch cells' written-out backward pass, compiled), for a call too short for the whole benchmark.
# The suite's steps: the whole suite, or for a short call the CUDA tests with the CPU tests of the code they
# drive (the step and the fused kernels), which runs only when --only names it
TEST_STEPS = ("tests", "tests-cuda")
ONLY_WHEN_NAMED = ("tests-cuda",)
BENCH_STEPS = (
    "bench",
    "bench-seed",
    "bench-fused-plan",
    "bench-compiled",
    "bench-open",
    "bench-fused-variant",
    "bench-fused-b1024",
    "bench-fused-grads",
)
# the seed targets' configurations side by side in one process, cuDNN's and impl fused's (as planned),
# for a call too short for the whole benchmark: their ratios then share one machine and one hour. cuDNN's
# come first and the kernels never run on a GPU (the GRU's and RNN's) last: a CUDA fault leaves the
# process's context unusable, and would take every configuration after it along
SEED_CONFIGS = "lstm-seed,lstm-seed-bf16,gru-seed,rnn-seed,fused-lstm-seed,fused-lstm-seed-bf16,fused-rnn-seed,fused-gru-seed"
# the fused kernels' plan at the larger batches (layer by layer there: W_hh resident at 256, not at 1024),
# beside cuDNN's configurations in the same process (cuDNN's first, as above)
FUSED_PLAN_CONFIGS = (
    "lstm-b256,lstm-b256-bf16,lstm-b1024-bf16,fused-lstm-b1024-bf16,fused-lstm-b256,fused-lstm-b256-bf16"
)
# their configurations named "NAME [VARIANT]"
VARIANT_STEPS = ("bench-fused-variant", "bench-fused-b1024", "bench-fused-grads")
# the fused kernel's variants (drnn_cli/fused_recurrence.py, DRNN_FUSED_LAUNCH) in whole training steps, for
# the benchmark step that times them: the fused-tiles step's fastest bf16 variant when that step ran
# (best_variant), else this one; its configurations are reported as "NAME [VARIANT]"
FUSED_VARIANT = "resident,counter,tf32"
# batch 1024 × 64 through the fused kernels: the fastest variant's words without its tile (sized for batch
# 32; the plan grows the tiles until batch 1024's grid fits) and without resident (at the 64-unit tiles
# that batch needs, W_hh's tiles are more than a multiprocessor holds: drnn refuses them)
BIG_FUSED_VARIANT = "wavefront,counter"
# what DRNN_FUSED_LAUNCH takes besides a tile (drnn_cli.fused_recurrence.LAUNCH_WORDS; this script imports no drnn
# module before it has checked that drnn's dependencies are there)
VARIANT_WORDS = ("resident", "counter", "tf32", "wavefront", "grads")
# the seed plan's variants (what bench-seed's impl fused runs) and grads: the backward's weight-gradient
# products as the recurrent ones multiply (TF32 in fp32, the autocast dtype in bf16), as cuDNN computes its
# own, where cuBLAS's IEEE fp32 kernels took about 110 of the fp32 graph step's 851 busy µs (2026-11-27)
GRADS_VARIANT = "wavefront,counter,resident,tf32,grads"
GRADS_CONFIGS = "fused-lstm-seed,fused-lstm-seed-bf16,fused-gru-seed,fused-rnn-seed"
OPEN_CONFIGS = (
    "lstm-seed,lstm-seed-bf16,lstm-seed-fp16,lstm-seed-fp16-each,scratch-lstm-seed,compiled-lstm-seed"
)
AUTO_GRAPH_NOTE_START = "train.cuda_graph auto: each training step replays as one CUDA graph"  # drnn's note
LSTM2_RUNS = (
    "lstm2",
    "lstm2-graph",
    "lstm2-graph-bf16",
    "lstm2-graph-fp16",
    "lstm2-fused-graph",
    "lstm2-fused-graph-bf16",
)
FULL_RUNS = ("full-fp32", "full-bf16", "full-bf16-graph", "full-cpu-recipe", "full-cpu-recipe-graph")
D2L_CONTINUATION = "time traveller for so it will be convenient to speak of himwas e"
CORPUS_CANDIDATES = (
    REPO / ".device-data" / "timemachine.txt",
    REPO.parent / "shared" / "data" / "timemachine.txt",
)
# module → the package that provides it (what to carry when the import fails)
REQUIRED_MODULES = {
    "torch": "torch",
    "yaml": "pyyaml",
    "requests": "requests",
    "safetensors": "safetensors",
    "pydantic": "pydantic (+ pydantic-core, annotated-types, typing-inspection)",
    "typer": "typer",
    "rich": "rich",
    "pytest": "pytest",
    "hypothesis": "hypothesis",
}
WHEELS_HINT = (
    "run scripts/device_wheels.sh on the CPU machine and carry .whl (see scripts/gpu_check.py's docstring)"
)


class CannotStart(Exception):
    """Why the check cannot run at all: printed as one line, exit 2."""


# ---------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class Step:
    name: str
    title: str
    command: list[str]
    limit_s: int
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class StepResult:
    name: str
    title: str
    status: str  # ok | failed | timeout | not run
    seconds: float = 0.0
    returncode: int | None = None
    data: dict[str, Any] = field(default_factory=dict)
    note: str = ""


def drnn(*args: str) -> list[str]:
    return [sys.executable, "-m", "drnn_cli", *args]


def build_plan(runs: Path, corpus: Path, workers: int) -> list[Step]:
    """The steps, in order of importance: what must be known first runs first."""
    lstm2, full = "configs/lstm2.yaml", "configs/lstm_full.yaml"
    # Short tracebacks, so that several failures through cuDNN or inductor all fit the log; under
    # xdist, a per-test limit (the GPU image has pytest-timeout), so that one hung test ends its worker
    # alone instead of taking the step and every result with it ("thread": a hang inside a CUDA call
    # never returns to Python; it ends the whole process, which without xdist is the whole session).
    pytest_args = ["-q", "-rfEs", "--tb=short", "-p", "no:cacheprovider"]
    pytest_args += ["-n", str(workers)] if workers > 1 else []
    if workers > 1 and importlib.util.find_spec("pytest_timeout") is not None:
        pytest_args += ["--timeout", str(TEST_TIMEOUT_S), "--timeout-method", "thread"]
    graph = ("--set", "train.cuda_graph=on")
    eager = ("--set", "train.cuda_graph=off")  # explicit: auto is a graph on CUDA
    bf16 = ("--set", "train.precision=bf16")

    def train(name: str, config: str, *extra: str) -> list[str]:
        return drnn(
            "train", "--config", config, "--device", "cuda", "--run", str(runs / name), "--json", *extra
        )

    def evaluate(name: str) -> list[str]:
        return drnn("eval", "--run", str(runs / name), "--split", "val", "--device", "cuda", "--json")

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    torchrun += ["-m", "drnn_cli", "--", "train", "--config", lstm2, "--device", "cuda"]
    torchrun += ["--set", "train.epochs=30", "--run", str(runs / "torchrun"), "--json"]
    bench_base = [sys.executable, "scripts/bench.py", "--device", "cuda", "--json", "--corpus", str(corpus)]
    bench = list(bench_base)
    # Rounds are sized so the fastest side (the graph) runs ~0.3 s; the slower ones then take 2-10×
    # that: 15 configurations × 3 sides × 2 rounds fit the step's limit, and bench.py prints its
    # report after each configuration, so a step cut off at its limit keeps what it measured.
    bench += ["--rounds", "2", "--round-seconds", "0.3"]
    return [
        Step(
            "tests",
            "test suite, CUDA tests enabled",
            [sys.executable, "-m", "pytest", *pytest_args, "tests"],
            200,
        ),
        Step(
            "tests-cuda",
            "the CUDA tests with the CPU tests of the step and the fused kernels (a short call's suite; "
            "only with --only)",
            [
                *(sys.executable, "-m", "pytest", *pytest_args),
                *("tests/test_cuda.py", "tests/test_step.py", "tests/test_fused.py"),
                # CI compiles every planned kernel for sm_90 and sm_89 without a GPU (80 CPU-seconds each,
                # under the device's Triton 3.6.0 too, as a review checked): not again in a short call
                *("-k", "not compiles_for_an_h100_without_one and not rtx_4090s_shared_memory"),
            ],
            120,
        ),
        # the 500-epoch runs before the benchmarks: a short call's budget must not starve the check that
        # a graph trains the seed recipe to its perplexity
        Step("lstm2", "configs/lstm2.yaml on the GPU (eager, fp32)", train("lstm2", lstm2, *eager), 120),
        Step(
            "lstm2-graph",
            "configs/lstm2.yaml as committed: train.cuda_graph auto, a graph on CUDA, fp32",
            train("lstm2-graph", lstm2),
            60,
        ),
        Step(
            "lstm2-graph-bf16",
            "configs/lstm2.yaml, cuda_graph on, bf16",
            train("lstm2-graph-bf16", lstm2, *graph, *bf16),
            60,
        ),
        Step(
            "lstm2-graph-fp16",
            "configs/lstm2.yaml, fp16, cuda_graph auto: a graph (fused SGD skips overflowing steps on the device)",
            train("lstm2-graph-fp16", lstm2, "--set", "train.precision=fp16"),
            60,
        ),
        Step(
            "bench-seed",
            "scripts/bench.py, the seed configurations side by side (3 rounds): cuDNN and impl fused as "
            "planned, the LSTM in fp32 and bf16, the GRU and the RNN in fp32",
            [*bench_base, "--rounds", "3", "--round-seconds", "0.3", "--configs", SEED_CONFIGS],
            200,
        ),
        Step(
            "bench-fused-grads",
            "scripts/bench.py, impl fused with the seed plan's variants and grads (the weight gradients "
            "multiplied as the recurrent products are, as cuDNN's): the seed LSTM fp32 and bf16, GRU, RNN, "
            "beside bench-seed's plan",
            [*bench, "--configs", GRADS_CONFIGS],
            120,
            env={"DRNN_FUSED_LAUNCH": GRADS_VARIANT},
        ),
        Step(
            "bench-fused-plan",
            "scripts/bench.py, impl fused as planned at batch 256 × 35 (fp32, bf16) and 1024 × 64 (bf16), "
            "each beside cuDNN's",
            [*bench, "--configs", FUSED_PLAN_CONFIGS],
            150,
        ),
        Step("full-fp32", "configs/lstm_full.yaml, fp32 (eager)", train("full-fp32", full, *eager), 100),
        Step("full-fp32-eval", "drnn eval --split val, best fp32 checkpoint", evaluate("full-fp32"), 40),
        Step(
            "full-bf16", "configs/lstm_full.yaml, bf16 (eager)", train("full-bf16", full, *eager, *bf16), 100
        ),
        Step("full-bf16-eval", "drnn eval --split val, best bf16 checkpoint", evaluate("full-bf16"), 40),
        Step(
            "torchrun", "torchrun, one process, NCCL (lstm2, 30 epochs)", torchrun, 90, {"NCCL_DEBUG": "INFO"}
        ),
        Step("bench", "scripts/bench.py --device cuda", bench, 240),
        Step(
            "fused-kernels",
            "scripts/fused_bench.py: one layer's recurrence, fused vs cuDNN; the seed stack, one cuDNN call "
            "or one per layer (fp16: cuDNN's persistent kernels); eager and graph",
            [sys.executable, "scripts/fused_bench.py", "--json"],
            90,
        ),
        Step(
            "fused-tiles",
            "scripts/fused_bench.py --sweep-tiles: the seed layer as a graph, cuDNN then the persistent Triton "
            "kernel's variants (tiles of 16 × 16 to 32 × 64, W_hh resident, a counter barrier, TF32), bf16 then fp32; "
            "then the seed model's two-layer stack, cuDNN's against impl fused layer by layer and as one wavefront",
            [sys.executable, "scripts/fused_bench.py", "--json", "--sweep-tiles"],
            200,
        ),
        Step(
            "bench-fused-variant",
            f"scripts/bench.py, impl fused with DRNN_FUSED_LAUNCH: the fused-tiles step's fastest bf16 variant "
            f"(else {FUSED_VARIANT}), TF32 for fp32, in whole training steps",
            [*bench, "--configs", "fused-lstm-seed,fused-lstm-seed-bf16"],
            90,
            env={"DRNN_FUSED_LAUNCH": FUSED_VARIANT},
        ),
        Step(
            "bench-fused-b1024",
            f"scripts/bench.py, fused-lstm-b1024-bf16 with DRNN_FUSED_LAUNCH: the fastest bf16 variant's words "
            f"without its tile or resident (else {BIG_FUSED_VARIANT}), beside cuDNN's lstm-b1024-bf16",
            [*bench, "--configs", "lstm-b1024-bf16,fused-lstm-b1024-bf16"],
            90,
            env={"DRNN_FUSED_LAUNCH": BIG_FUSED_VARIANT},
        ),
        Step(
            "profile",
            "scripts/bench.py --profile: where a seed step's time goes, eager and as a graph (torch.profiler)",
            [*bench_base, "--profile", "--configs", PROFILED, "--epochs-per-round", "4"],
            160,  # about 14 s a configuration: 8 of them took more than the 100 s this step had
        ),
        Step(
            "bench-compiled",
            "scripts/bench.py, impl scratch with train.compile on (torch.compile), eager and graph",
            [*bench, "--configs", "compiled-lstm-seed"],
            120,
        ),
        Step(
            "lstm2-fused-graph",
            "configs/lstm2.yaml, impl fused (Triton, as planned: TF32 products), cuda_graph auto, fp32",
            train("lstm2-fused-graph", lstm2, "--set", "model.impl=fused"),
            60,
        ),
        Step(
            "lstm2-fused-graph-bf16",
            "configs/lstm2.yaml, impl fused (Triton), cuda_graph on, bf16",
            train("lstm2-fused-graph-bf16", lstm2, "--set", "model.impl=fused", *graph, *bf16),
            60,
        ),
        Step(
            "full-bf16-graph",
            "configs/lstm_full.yaml, bf16, cuda_graph on",
            train("full-bf16-graph", full, *bf16, *graph),
            100,
        ),
        Step(
            "full-cpu-recipe",
            "configs/lstm_full_cpu.yaml on the GPU (3×256, AWD-LSTM regularisers; 3.9985 on 2 CPU cores), no time cap",
            train(
                "full-cpu-recipe",
                "configs/lstm_full_cpu.yaml",
                "--set",
                "train.max_time=0",
                *eager,
            ),
            130,  # eager on an H200: 74 s of training to its best epoch; 100 s did not fit all 50
        ),
        Step(
            "full-cpu-recipe-eval",
            "drnn eval --split val, best checkpoint of full-cpu-recipe",
            evaluate("full-cpu-recipe"),
            40,
        ),
        Step(
            "full-cpu-recipe-graph",
            "configs/lstm_full_cpu.yaml on the GPU as one CUDA graph, no time cap",
            train("full-cpu-recipe-graph", "configs/lstm_full_cpu.yaml", "--set", "train.max_time=0", *graph),
            100,
        ),
        Step(
            "bench-open",
            "scripts/bench.py, the configurations that decide what is open: fp16 under the graph, one cuDNN "
            "call per layer, impl scratch (written-out backward), plain and compiled",
            [*bench, "--configs", OPEN_CONFIGS],
            200,
        ),
    ]


# ---------------------------------------------------------------------------------------------
# Before anything runs


def require_cuda() -> dict[str, Any]:
    """torch, CUDA, cuDNN and the GPU, or CannotStart("no CUDA device ...")."""
    try:
        torch = importlib.import_module("torch")
    except ImportError as error:
        raise CannotStart(f"torch cannot be imported ({first_line(error)})") from None
    if not torch.cuda.is_available():
        raise CannotStart(
            f"no CUDA device (torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
            "run this on a GPU machine, or pass --dry-run to see the plan"
        )
    properties = torch.cuda.get_device_properties(0)
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "gpu": torch.cuda.get_device_name(0),
        "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
        "memory_gib": round(properties.total_memory / 2**30, 1),
        "gpus": torch.cuda.device_count(),
        "triton": triton_version(),
    }


def triton_version() -> str:
    """Triton compiles model.impl fused; CUDA builds of torch ship it."""
    try:
        return importlib.import_module("triton").__version__
    except ImportError:
        return "not installed (model.impl fused cannot run)"


def dependency_problem(modules: dict[str, str] = REQUIRED_MODULES) -> str | None:
    """One line naming every package that does not import, or None."""
    missing = []
    for module, package in modules.items():
        try:
            importlib.import_module(module)
        except Exception as error:  # a broken install (e.g. mismatched pydantic-core) counts too
            missing.append(
                f"{package} ({first_line(error)})" if not isinstance(error, ModuleNotFoundError) else package
            )
    if not missing:
        return None
    return f"missing Python packages: {', '.join(missing)}; {WHEELS_HINT}"


def find_corpus(given: str | None) -> Path:
    candidates = [Path(given)] if given else list(CORPUS_CANDIDATES)
    for path in candidates:
        if path.is_file():
            return path.resolve()
    raise CannotStart(
        f"no Time Machine corpus at {', '.join(map(str, candidates))}; run scripts/device_wheels.sh "
        "(it copies ../shared/data/timemachine.txt into .device-data/) and carry .device-data"
    )


def nvidia_smi() -> str:
    try:
        done = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"nvidia-smi failed: {first_line(error)}"
    return done.stdout.strip() or done.stderr.strip()


def first_line(error: BaseException | str) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


# ---------------------------------------------------------------------------------------------
# Running a step


def run_step(
    step: Step, timeout: float, env: dict[str, str], log: Callable[[str], None]
) -> tuple[StepResult, str, str]:
    """Run one step in its own process group; kill the group at ``timeout``. Returns (result, stdout, stderr).

    The output goes to ``log`` line by line as the step prints it: a call cut off by the device tool's
    own limit still brings back what the running step had printed."""
    log(f"\n===== {step.name}: {step.title} (limit {timeout:.0f} s)\n$ {shlex.join(step.command)}\n")
    started = time.monotonic()
    process = subprocess.Popen(
        step.command,
        cwd=REPO,
        env={**env, **step.env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    log_lock = threading.Lock()
    readers = [
        StreamReader(stream, log, log_lock, prefix)
        for stream, prefix in ((process.stdout, ""), (process.stderr, "! "))
    ]
    try:
        process.wait(timeout=timeout)
        status = "ok" if process.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        # torchrun starts its workers in sessions of their own: kill every descendant, not only the
        # group, or a hung worker keeps the output pipes open and communicate() never returns.
        for pid in [*descendants(process.pid), process.pid]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=KILL_GRACE_S / 2)
        status = "timeout"
    # something outside the tree that still holds a pipe keeps its reader waiting: not this script
    readers_end = time.monotonic() + KILL_GRACE_S / 2
    for reader in readers:
        reader.join(max(0.0, readers_end - time.monotonic()))
    out, err = (reader.text() for reader in readers)
    seconds = time.monotonic() - started
    log(f"----- {step.name}: {status}, exit {process.returncode}, {seconds:.1f} s\n")
    note = "" if status == "ok" else (last_meaningful_line(err) or last_meaningful_line(out))
    return StepResult(step.name, step.title, status, seconds, process.returncode, note=note), out, err


class StreamReader:
    """A thread that keeps one output stream of a step whole and copies each line to the log as it comes
    (stderr's lines marked ``! ``; a line over LOG_LINE_CHARS cut there)."""

    def __init__(self, stream: Any, log: Callable[[str], None], lock: threading.Lock, prefix: str) -> None:
        self._lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream, log, lock, prefix), daemon=True)
        self._thread.start()

    def _read(self, stream: Any, log: Callable[[str], None], lock: threading.Lock, prefix: str) -> None:
        for line in stream:
            self._lines.append(line)
            shown = line if len(line) <= LOG_LINE_CHARS else f"{line[:300]}… ({len(line):,} characters)\n"
            with lock:
                log(prefix + shown)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def text(self) -> str:
        return "".join(list(self._lines))


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, theirs, ...), from /proc; empty where there is none."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ")"
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def last_meaningful_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def last_json(text: str) -> dict[str, Any]:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                return json.loads(line)
    return {}


def read_evaluations(run_dir: Path) -> list[dict[str, Any]]:
    """(epoch, validation perplexity, training seconds so far) at every evaluation of a run."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [
        {"epoch": r["epoch"], "val_ppl": r["val_ppl"], "elapsed": r["elapsed"], "train_ppl": r["train_ppl"]}
        for r in rows
        if r.get("val_ppl") is not None
    ]


def interpret(step: Step, result: StepResult, out: str, runs: Path, err: str = "") -> None:
    """Pull the figures each step exists for out of its output."""
    if step.name in TEST_STEPS:
        summary = last_meaningful_line(out)
        result.data["summary"] = summary
        if result.status == "failed" and summary:
            result.note = summary  # "2 failed, 792 passed, ...", not a plugin's warning on stderr
        for word in ("passed", "failed", "skipped", "error", "errors"):
            match = re.search(rf"(\d+) {word}\b", summary)
            if match:
                result.data[word] = int(match.group(1))
        return
    data = last_json(out)
    result.data["json"] = data
    if step.name.startswith(("lstm2", "torchrun")) and data:
        samples = data.get("samples", {})
        result.data["matches_d2l_continuation"] = samples.get("time traveller") == D2L_CONTINUATION
    if step.name in ("lstm2-graph", "lstm2-graph-fp16"):  # auto must have chosen the graph, and said so
        result.data["graph_by_default"] = AUTO_GRAPH_NOTE_START in out + err
    if step.name == "torchrun":
        result.data["nccl"] = "NCCL INFO" in out
    if step.name.startswith("full-") and not step.name.endswith("-eval"):
        evaluations = read_evaluations(runs / step.name)
        result.data["evaluations"] = evaluations
        reached = [e["elapsed"] for e in evaluations if e["val_ppl"] <= 4.4]
        result.data["seconds_to_4_4"] = reached[0] if reached else None


# ---------------------------------------------------------------------------------------------
# Targets and the report


@dataclass(frozen=True)
class Verdict:
    target: str
    measured: str
    verdict: str  # met | missed | not measured


def bench_configs(results: dict[str, StepResult]) -> dict[str, Any]:
    """Every benchmark configuration measured, by name, from the benchmark steps (the fused variants'
    as "NAME [variant]", beside the plain plan's NAME; their steps' cuDNN configurations keep their name)."""
    configs: dict[str, Any] = {}
    for name in BENCH_STEPS:
        step = results.get(name)
        measured = (step.data.get("json") or {}).get("configs", {}) if step else {}
        for config, entry in measured.items():
            variant = step.data.get("variant") if step and name in VARIANT_STEPS else None
            fused = variant is not None and config.startswith("fused-")
            configs[f"{config} [{variant}]" if fused else config] = entry
    return configs


def best_variant(tiles: StepResult | None) -> str | None:
    """DRNN_FUSED_LAUNCH for the fastest Triton row of the fused-tiles step in bf16 (the half precision
    the 15× aim is set in), with TF32 for the fp32 configuration; None when no such row was timed.
    The two-layer stack's rows decide when any was timed (they time what a training step runs; their
    variant is DRNN_FUSED_LAUNCH's words already); else the one-layer rows, whose name is a tile then
    words ("16x32 resident counter 8w"): warps and "wide-k" have no word (the tile decides the warps;
    resident implies a K tile as wide as the layer)."""
    data = (tiles.data.get("json") or {}) if tiles else {}
    timed = [
        row
        for row in data.get("stack-tiles") or []
        if row.get("dtype") == "bf16"
        and not row.get("variant", "cudnn").startswith("cudnn")
        and isinstance(row.get("graph"), float)
        and not row.get("barrier-timeout")  # a barrier that gave up stops waiting: fast and wrong
    ]
    if timed:
        tile, *words = min(timed, key=lambda row: row["graph"])["variant"].split(",")
    else:
        timed = [
            row
            for row in data.get("tiles") or []
            if row.get("dtype") == "bf16"
            and row.get("programs")
            and isinstance(row.get("fused-graph"), float)
            and not row.get("barrier-timeout")
        ]
        if not timed:
            return None
        tile, *words = min(timed, key=lambda row: row["fused-graph"])["tile"].split()
    return ",".join([tile, *(word for word in VARIANT_WORDS if word in words and word != "tf32"), "tf32"])


def big_variant(variant: str | None) -> str:
    """DRNN_FUSED_LAUNCH for batch 1024 × 64: ``variant``'s words but its tile and resident
    (BIG_FUSED_VARIANT says why); BIG_FUSED_VARIANT when the sweep named none."""
    if variant is None:
        return BIG_FUSED_VARIANT
    return ",".join(word for word in variant.split(",") if word in VARIANT_WORDS and word != "resident")


def bench_entry(results: dict[str, StepResult], name: str) -> dict[str, Any] | None:
    entry = bench_configs(results).get(name)
    return entry if entry and "modes" in entry else None


def best_mode(entry: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return max(entry["modes"].items(), key=lambda item: item[1]["tokens_per_s"])


def judge(results: dict[str, StepResult]) -> list[Verdict]:
    """The issues' targets against what was measured."""
    verdicts = []

    def ratio_target(target: str, name: str, minimum: float, fp32_loop: bool = False) -> None:
        """``fp32_loop``: a half-precision target, judged against the textbook loop in fp32 (d2l's loop
        as it is, the issue's reference: its 9.7× was bf16's graph over d2l's fp32 loop), the ratio to
        the loop under autocast beside it (bench.py's ``with_fp32_references`` says why they differ)."""
        entry = bench_entry(results, name)
        if entry is None:
            verdicts.append(Verdict(target, "", "not measured"))
            return
        mode, figures = best_mode(entry)
        ratio, reference, beside = figures["ratio"], entry["reference_tokens_per_s"], ""
        if fp32_loop:
            beside = f"{figures['ratio']:.2f}× the loop under autocast"
            if "ratio_to_fp32_reference" not in figures:
                verdicts.append(Verdict(target, f"{beside}; no fp32 loop of its shape timed", "not measured"))
                return
            ratio, reference = figures["ratio_to_fp32_reference"], entry["fp32_reference"]["tokens_per_s"]
            beside = f" in fp32; {beside}"
        measured = f"{ratio:.2f}× ({mode}: {figures['tokens_per_s']:,.0f} vs {reference:,.0f} tok/s{beside})"
        verdicts.append(Verdict(target, measured, "met" if ratio >= minimum else "missed"))

    def train_ppl(name: str) -> float | None:
        step = results.get(name)
        value = step.data.get("json", {}).get("train_ppl") if step and step.status == "ok" else None
        return float(value) if value is not None else None

    def final_ppl_target(target: str, name: str) -> None:
        ppl = train_ppl(name)
        verdict = "not measured" if ppl is None else ("met" if ppl <= 1.1 else "missed")
        verdicts.append(Verdict(target, f"{ppl:.3f}" if ppl is not None else "", verdict))

    ratio_target("seed LSTM fp32 ≥ 5× the textbook loop", "lstm-seed", 5.0)
    ratio_target(
        "seed LSTM bf16 ≥ 10× the textbook loop (in fp32, as d2l runs it)",
        "lstm-seed-bf16",
        10.0,
        fp32_loop=True,
    )
    final_ppl_target("seed LSTM bf16 (CUDA graph, 500 epochs) final perplexity ≤ 1.1", "lstm2-graph-bf16")
    final_ppl_target(
        "seed LSTM fp16 (CUDA graph, fused SGD, 500 epochs) final perplexity ≤ 1.1", "lstm2-graph-fp16"
    )
    ratio_target("seed GRU ≥ 5×", "gru-seed", 5.0)
    ratio_target("seed GRU, impl fused (Triton), fp32 ≥ 5×", "fused-gru-seed", 5.0)
    ratio_target("seed RNN ≥ 5×", "rnn-seed", 5.0)
    ratio_target("seed RNN, impl fused (Triton), fp32 ≥ 5×", "fused-rnn-seed", 5.0)
    # the same with the backward's weight gradients multiplied as the recurrent products are (grads)
    for config, target, minimum in (
        ("fused-lstm-seed", "seed LSTM, impl fused with grads, fp32 ≥ 5×", 5.0),
        ("fused-gru-seed", "seed GRU, impl fused with grads, fp32 ≥ 5×", 5.0),
        ("fused-rnn-seed", "seed RNN, impl fused with grads, fp32 ≥ 5×", 5.0),
    ):
        ratio_target(target, f"{config} [{GRADS_VARIANT}]", minimum)
    ratio_target(
        "seed LSTM, impl fused with grads, bf16 ≥ 10× (the fp32 loop)",
        f"fused-lstm-seed-bf16 [{GRADS_VARIANT}]",
        10.0,
        fp32_loop=True,
    )
    ratio_target("seed LSTM, impl scratch ≥ 3×", "scratch-lstm-seed", 3.0)
    ratio_target("seed LSTM, impl scratch with train.compile on ≥ 3×", "compiled-lstm-seed", 3.0)
    ratio_target("seed LSTM, impl fused (Triton), fp32 ≥ 5×", "fused-lstm-seed", 5.0)
    ratio_target(
        "seed LSTM, impl fused (Triton), bf16: aim past 15× (the fp32 loop)",
        "fused-lstm-seed-bf16",
        15.0,
        fp32_loop=True,
    )
    final_ppl_target(
        "seed LSTM, impl fused, fp32 (TF32 products), CUDA graph (500 epochs): final perplexity ≤ 1.1",
        "lstm2-fused-graph",
    )
    final_ppl_target(
        "seed LSTM, impl fused, bf16, CUDA graph (500 epochs): final perplexity ≤ 1.1",
        "lstm2-fused-graph-bf16",
    )

    def rate_target(target: str, name: str) -> None:
        entry = bench_entry(results, name)
        if entry is None:
            verdicts.append(Verdict(target, "", "not measured"))
            return
        mode, figures = best_mode(entry)
        rate = figures["tokens_per_s"]
        verdicts.append(Verdict(target, f"{rate / 1e6:.2f} M ({mode})", "met" if rate >= 20e6 else "missed"))

    rate_target("B1024×T64 bf16 ≥ 20 M tokens/s", "lstm-b1024-bf16")
    big_fused = results.get("bench-fused-b1024")
    variant = big_fused.data.get("variant", BIG_FUSED_VARIANT) if big_fused else BIG_FUSED_VARIANT
    fused_b1024 = f"fused-lstm-b1024-bf16 [{variant}]"
    if bench_entry(results, fused_b1024) is None:  # bench-fused-plan times it as planned, under its own name
        fused_b1024 = "fused-lstm-b1024-bf16"
    rate_target("B1024×T64 bf16, impl fused (Triton) ≥ 20 M tokens/s", fused_b1024)
    lstm2 = results.get("lstm2")
    ppl = train_ppl("lstm2")
    if ppl is None or lstm2 is None:
        verdicts.append(
            Verdict("lstm2 on the GPU: perplexity ≤ 1.1 and d2l's continuation", "", "not measured")
        )
    else:
        same = lstm2.data.get("matches_d2l_continuation")
        sample = lstm2.data["json"].get("samples", {}).get("time traveller", "")
        verdicts.append(
            Verdict(
                "lstm2 on the GPU: perplexity ≤ 1.1 and d2l's continuation",
                f"{ppl:.3f}; {sample!r}",
                "met" if ppl <= 1.1 and same else "missed",
            )
        )
    full = [
        (name, results[name].data.get("seconds_to_4_4"))
        for name in FULL_RUNS
        if name in results and results[name].status == "ok"
    ]
    if not full:
        verdicts.append(Verdict("lstm_full: validation perplexity ≤ 4.4 within 60 s", "", "not measured"))
    else:
        reached = [(seconds, name) for name, seconds in full if seconds is not None]
        best = min(reached) if reached else None
        bests = ", ".join(
            f"{name} best {results[name].data.get('json', {}).get('best_val_ppl', float('nan')):.3f}"
            for name, _ in full
        )
        measured = (f"{best[0]:.1f} s ({best[1]}); " if best else "never ≤ 4.4; ") + bests
        verdicts.append(
            Verdict(
                "lstm_full: validation perplexity ≤ 4.4 within 60 s",
                measured,
                "met" if best and best[0] <= 60 else "missed",
            )
        )
    return verdicts


def render_report(env: dict[str, Any], smi: str, results: dict[str, StepResult], budget: float) -> str:
    lines = ["# drnn on a GPU: scripts/gpu_check.py", ""]
    lines += [f"- {key}: {value}" for key, value in env.items()]
    lines += ["", "## Targets", "", "| target | measured | verdict |", "| --- | --- | --- |"]
    lines += [f"| {v.target} | {v.measured} | {v.verdict} |" for v in judge(results)]
    lines += [
        "",
        f"## Steps (budget {budget:.0f} s)",
        "",
        "| step | status | seconds | note |",
        "| --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r.name} | {r.status} | {r.seconds:.1f} | {r.note.replace('|', '/')} |" for r in results.values()
    ]
    for name in (*LSTM2_RUNS, "torchrun"):
        step = results.get(name)
        data = step.data.get("json") if step else None
        if step is not None and data:
            lines += ["", f"### {name}", ""]
            lines += [
                f"- final train perplexity {data.get('train_ppl')}, {data.get('tokens_per_s', 0):,.0f} tokens/s"
            ]
            lines += [f"- `{prefix}` → `{text}`" for prefix, text in data.get("samples", {}).items()]
            lines += [f"- first continuation equals d2l's: {step.data.get('matches_d2l_continuation')}"]
            if name == "torchrun":
                lines += [f"- NCCL log lines seen: {step.data.get('nccl')}"]
            if "graph_by_default" in step.data:
                lines += [f"- train.cuda_graph auto chose the graph: {step.data['graph_by_default']}"]
    for name in FULL_RUNS:
        step = results.get(name)
        if step and step.data.get("evaluations"):
            data = step.data.get("json", {})
            evaluation = results.get(f"{name}-eval")
            confirmed = evaluation.data.get("json", {}).get("perplexity") if evaluation else None
            lines += ["", f"### {name}", "", f"- best validation perplexity {data.get('best_val_ppl')}"]
            lines += [f"- `drnn eval --split val` of the best checkpoint: {confirmed}"]
            lines += ["", "| epoch | val ppl | train ppl | training seconds |", "| --- | --- | --- | --- |"]
            lines += [
                f"| {e['epoch']} | {e['val_ppl']:.3f} | {e['train_ppl']:.3f} | {e['elapsed']:.1f} |"
                for e in step.data["evaluations"]
            ]
    configs = bench_configs(results)
    if configs:
        lines += [
            "",
            "### bench",
            "",
            "| config | mode | tokens/s | ratio to the textbook loop | to the loop in fp32 | train ppl |",
        ]
        lines += ["| --- | --- | --- | --- | --- | --- |"]
        for name, entry in configs.items():
            if "modes" not in entry:
                lines += [f"| {name} | {entry.get('skipped') or entry.get('error')} | | | | |"]
                continue
            lines += [
                f"| {name} | reference | {entry['reference_tokens_per_s']:,.0f} | 1 | | {entry['reference_train_ppl']:.3f} |"
            ]
            for mode, figures in entry["modes"].items():
                to_fp32 = figures.get("ratio_to_fp32_reference")  # half precision: d2l's loop is fp32
                lines += [
                    f"| {name} | {mode} | {figures['tokens_per_s']:,.0f} | {figures['ratio']:.2f} | "
                    f"{'' if to_fp32 is None else f'{to_fp32:.2f}'} | {figures['train_ppl']:.3f} |"
                ]
    fused = results.get("fused-kernels")
    fused_rows = (fused.data.get("json") or {}).get("rows", []) if fused else []
    if fused_rows:
        sides = ("cudnn", "cudnn-graph", "fused", "fused-graph", "fused-stepwise", "fused-stepwise-graph")
        lines += ["", "### fused-kernels (µs per forward + backward of one layer)", ""]
        lines += ["| B × T × H | dtype | tile, programs | " + " | ".join(sides) + " |"]
        lines += ["| --- | --- | --- | " + " | ".join("---" for _ in sides) + " |"]
        for row in fused_rows:
            where = f"{row['tile']}, {row['programs']}{' persistent' if row['persistent'] else ''}"
            cells = " | ".join(str(row.get(side, "")) for side in sides)
            lines += [
                f"| {row['batch']} × {row['steps']} × {row['hidden']} | {row['dtype']} | {where} | {cells} |"
            ]
    stack_rows = (fused.data.get("json") or {}).get("stack", []) if fused else []
    if stack_rows:
        stack_sides = ("stack", "stack-graph", "per-layer", "per-layer-graph")
        lines += [
            "",
            "### the seed stack through cuDNN (µs per forward + backward, 2 × 256 LSTM, B32 T35)",
            "",
        ]
        lines += ["| input | dtype | " + " | ".join(stack_sides) + " | per-layer kernels |"]
        lines += ["| --- | --- | " + " | ".join("---" for _ in stack_sides) + " | --- |"]
        for row in stack_rows:
            cells = " | ".join(str(row.get(side, "")) for side in stack_sides)
            kernels = "; ".join(row.get("per-layer-kernels", [])).replace("|", "/")
            lines += [f"| {row['input']} | {row['dtype']} | {cells} | {kernels} |"]
    lines += grads_lines(results)
    lines += profile_lines(results.get("profile"))
    lines += tile_lines(results.get("fused-tiles"))
    lines += ["", "## nvidia-smi", "", "```", smi, "```", ""]
    return "\n".join(lines)


# Between two benchmark processes the textbook loop's pace moved by up to 25% (host-bound), a graph's
# by about 4% (device-bound): what grads changes is read in graph tokens/s, and below this it is noise.
GRADS_NOISE = 0.05


def grads_lines(results: dict[str, StepResult]) -> list[str]:
    """grads against the plan without it, each config's graph tokens/s from its own step (bench-seed's and
    bench-fused-grads', two processes): their ratios to the textbook loop would carry the loop's swings
    between processes, larger than the at most ~13% grads can save (gpurev32)."""
    rows = []
    for config in GRADS_CONFIGS.split(","):
        plan, grads = bench_entry(results, config), bench_entry(results, f"{config} [{GRADS_VARIANT}]")
        if plan is None or grads is None or "graph" not in plan["modes"] or "graph" not in grads["modes"]:
            continue
        before, after = plan["modes"]["graph"]["tokens_per_s"], grads["modes"]["graph"]["tokens_per_s"]
        change = after / before - 1
        reading = "within the noise" if abs(change) < GRADS_NOISE else ("faster" if change > 0 else "slower")
        rows.append(f"| {config} | {before:,.0f} | {after:,.0f} | {change:+.1%} | {reading} |")
    if not rows:
        return []
    return [
        "",
        f"### grads against the plan (graph tokens/s; two processes: under {GRADS_NOISE:.0%} is noise)",
        "",
        "| config | the plan (bench-seed) | with grads (bench-fused-grads) | change | reading |",
        "| --- | --- | --- | --- | --- |",
        *rows,
    ]


def tile_lines(step: StepResult | None) -> list[str]:
    """The fused-tiles step: µs per forward + backward of the seed layer, one row per tile."""
    rows = ((step.data.get("json") or {}).get("tiles") or []) if step else []
    if step is None or not rows:
        return []
    lines = [
        "",
        "### fused-tiles (µs per forward + backward of the seed layer as a graph: cuDNN, then the persistent kernel's variants)",
        "",
    ]
    lines += ["| dtype | variant (rows × units, …) | warps | programs | graph µs | barrier timed out |"]
    lines += ["| --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        lines += [
            f"| {row['dtype']} | {row['tile']} | {row['warps']} | {row['programs']} | {row['fused-graph']} | "
            f"{'yes' if row.get('barrier-timeout') else 'no'} |"
        ]
    stacks = (step.data.get("json") or {}).get("stack-tiles") or []
    if stacks:
        lines += [
            "",
            "### fused-tiles, the seed model's two-layer stack (µs per forward + backward as a graph)",
            "",
        ]
        lines += [
            "| dtype | cuDNN, or impl fused under DRNN_FUSED_LAUNCH | graph µs |",
            "| --- | --- | --- |",
        ]
        lines += [f"| {row['dtype']} | {row['variant']} | {row['graph']} |" for row in stacks]
    return lines


def profile_lines(step: StepResult | None) -> list[str]:
    """The profile step's per-step figures: wall time, device-busy time, kernels, the top kernel."""
    configs = ((step.data.get("json") or {}).get("configs") or {}) if step else {}
    if not configs:
        return []
    lines = ["", "### profile (per training step, under torch.profiler)", ""]
    lines += [
        "| config | side | wall µs | device busy µs | busy | kernels | host ops | top kernels (µs per step) |"
    ]
    lines += ["| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, entry in configs.items():
        for side, figures in (entry.get("sides") or {}).items():
            busy = figures.get("device_busy_us_per_step")
            top = "; ".join(f"{t['name'][:60]} {t['us_per_step']:,.0f}" for t in figures.get("top", [])[:3])
            lines += [
                f"| {name} | {side} | {figures['wall_us_per_step']:,.0f} | "
                + (f"{busy:,.0f} | {figures['device_busy_fraction']:.0%} | " if busy is not None else " | | ")
                + f"{figures['device_events_per_step']:.0f} | {figures['host_ops_per_step']:.0f} | {top} |"
            ]
    return lines


def write_outputs(
    outdir: Path, env: dict[str, Any], smi: str, results: dict[str, StepResult], budget: float
) -> None:
    """The report and the per-run JSON files (rewritten after every step: a killed call keeps them)."""
    outdir.mkdir(parents=True, exist_ok=True)
    groups = {
        "lstm2.json": LSTM2_RUNS,
        "lstm_full.json": (*FULL_RUNS, *(f"{name}-eval" for name in FULL_RUNS)),
        "torchrun.json": ("torchrun",),
    }
    for filename, names in groups.items():
        chosen = {name: asdict(results[name]) for name in names if name in results}
        if chosen:
            (outdir / filename).write_text(json.dumps(chosen, indent=1) + "\n")
    fused = {name: results[name].data.get("json") for name in FUSED_STEPS if name in results}
    if any(fused.values()):
        (outdir / "fused.json").write_text(json.dumps(fused, indent=1) + "\n")
    if any(results[name].data.get("json") for name in BENCH_STEPS if name in results):
        measured = {name: results[name].data.get("json") for name in BENCH_STEPS if name in results}
        (outdir / "bench.json").write_text(json.dumps(measured, indent=1) + "\n")
    everything = {"env": env, "steps": {name: asdict(r) for name, r in results.items()}}
    (outdir / "results.json").write_text(json.dumps(everything, indent=1) + "\n")
    (outdir / "report.md").write_text(render_report(env, smi, results, budget))


# ---------------------------------------------------------------------------------------------
# Main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", type=Path, help="where report.md and the JSON files go")
    parser.add_argument(
        "--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds for all steps together"
    )
    parser.add_argument(
        "--only", type=lambda text: [n.strip() for n in text.split(",") if n.strip()], default=None
    )
    parser.add_argument(
        "--corpus", default=None, help="the Time Machine (default: .device-data/ or ../shared/data/)"
    )
    parser.add_argument(
        "--workers", type=int, default=8, help="pytest-xdist workers for the test step (1: none)"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit; needs no GPU")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()  # the budget counts from here: CUDA's start-up and the imports are in it
    args = parse_args(argv)
    runs = Path(tempfile.gettempdir()) / "drnn-gpu-check" / "runs"
    corpus_hint = Path(args.corpus) if args.corpus else CORPUS_CANDIDATES[0]
    plan = build_plan(runs, corpus_hint, args.workers)
    if args.only:
        unknown = sorted(set(args.only) - {step.name for step in plan})
        if unknown:
            print(
                f"gpu_check: unknown --only {', '.join(unknown)}; steps: {', '.join(s.name for s in plan)}",
                file=sys.stderr,
            )
            return 2
        plan = [step for step in plan if step.name in args.only]
    else:
        plan = [step for step in plan if step.name not in ONLY_WHEN_NAMED]
    if args.dry_run:
        print(f"gpu_check plan (budget {args.budget:.0f} s, outputs in {args.outdir}):")
        for step in plan:
            print(f"  {step.name:<17} ≤{step.limit_s:>4} s  {step.title}\n      $ {shlex.join(step.command)}")
        return 0
    try:
        env_info = require_cuda()
        problem = dependency_problem()
        if problem:
            raise CannotStart(problem)
        corpus = find_corpus(args.corpus)
    except CannotStart as reason:
        print(f"gpu_check: {reason}", file=sys.stderr)
        return 2
    if corpus != corpus_hint.resolve():
        plan = [
            step for step in build_plan(runs, corpus, args.workers) if step.name in {s.name for s in plan}
        ]
    if args.workers > 1 and importlib.util.find_spec("xdist") is None:
        plan = [step for step in build_plan(runs, corpus, 1) if step.name in {s.name for s in plan}]

    deadline = started + args.budget
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True)
    cache = runs.parent / "data"
    cache.mkdir(exist_ok=True)
    shutil.copyfile(corpus, cache / "timemachine.txt")
    child_env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "PYTHONUNBUFFERED": "1",
        "DRNN_DATA_DIR": str(cache),
        "DRNN_DATA_URL": "http://127.0.0.1:9/unreachable",  # the machine has no network: fail fast
        "DRNN_TEST_CORPUS": str(corpus),
    }
    args.outdir.mkdir(parents=True, exist_ok=True)
    smi = nvidia_smi()
    log_file = (args.outdir / "log.txt").open("w", encoding="utf-8")

    def log(text: str) -> None:
        log_file.write(text)
        log_file.flush()

    log(f"{json.dumps(env_info)}\n{smi}\n")
    print(
        f"gpu_check: {env_info['gpu']}, torch {env_info['torch']}, CUDA {env_info['cuda']}, cuDNN {env_info['cudnn']}"
    )
    results: dict[str, StepResult] = {}
    for step in plan:
        left = deadline - time.monotonic()
        if left < MIN_STEP_S:
            results[step.name] = StepResult(step.name, step.title, "not run", note="out of time (--budget)")
        else:
            # drnn prints the traceback behind a one-line error (a failed capture or compilation) into
            # log.txt; the test suite checks the one-line errors themselves, so not there.
            env = child_env if step.name in TEST_STEPS else {**child_env, "DRNN_DEBUG": "1"}
            # the sweep's winner, measured in whole training steps
            variant = best_variant(results.get("fused-tiles"))
            if step.name == "bench-fused-variant" and variant:
                step = replace(step, env={**step.env, "DRNN_FUSED_LAUNCH": variant})
            elif step.name == "bench-fused-b1024":
                step = replace(step, env={**step.env, "DRNN_FUSED_LAUNCH": big_variant(variant)})
            result, out, err = run_step(step, min(step.limit_s, left - KILL_GRACE_S), env, log)
            interpret(step, result, out, runs, err)
            if step.name in VARIANT_STEPS:
                result.data["variant"] = step.env["DRNN_FUSED_LAUNCH"]
            results[step.name] = result
        result = results[step.name]
        print(
            f"gpu_check: {step.name}: {result.status} ({result.seconds:.1f} s) {result.note}".rstrip(),
            flush=True,
        )
        write_outputs(args.outdir, env_info, smi, results, args.budget)
    log_file.close()
    for verdict in judge(results):
        print(f"gpu_check: target {verdict.verdict:>12}: {verdict.target}: {verdict.measured}")
    print(f"gpu_check: report in {args.outdir / 'report.md'}")
    # only if time is left
    optional = {
        "profile",
        "full-bf16-graph",
        "full-cpu-recipe",
        "full-cpu-recipe-eval",
        "full-cpu-recipe-graph",
    }
    failed = [
        r for r in results.values() if r.status != "ok" and not (r.name in optional and r.status == "not run")
    ]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
