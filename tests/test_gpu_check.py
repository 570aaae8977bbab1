"""scripts/gpu_check.py's CPU-side logic: the plan, the refusals, the verdicts; and that the CUDA
tests are collected and skipped cleanly where there is no GPU."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("drnn_gpu_check_script", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def test_dry_run_prints_every_step_and_its_command(gpu_check, tmp_path: Path, capsys) -> None:
    assert gpu_check.main([str(tmp_path / "out"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    for name in (
        "tests",
        "lstm2",
        "lstm2-graph",
        "lstm2-graph-bf16",
        "full-fp32",
        "full-bf16-eval",
        "torchrun",
        "bench",
    ):
        assert f"  {name} " in out, name
    assert "-m drnn_cli train --config configs/lstm2.yaml --device cuda" in out
    assert "-m torch.distributed.run --standalone --nproc_per_node 1 -m drnn_cli -- train" in out
    assert "scripts/bench.py --device cuda --json" in out
    assert "eval --run" in out and "--split val" in out
    assert "train.cuda_graph=on" in out and "train.precision=bf16" in out
    assert not (tmp_path / "out").exists()  # a plan writes nothing


def test_the_steps_fit_the_device_call(gpu_check, tmp_path: Path) -> None:
    """Each step has its own limit; the budget keeps the whole run inside a 10-minute call."""
    plan = gpu_check.build_plan(tmp_path, tmp_path / "corpus.txt", 8)
    assert all(0 < step.limit_s <= 240 for step in plan)
    assert gpu_check.DEFAULT_BUDGET_S <= 560
    # steps run in the plan's order: the seed recipe's graph run (not optional) before the benchmarks,
    # whose limits could otherwise leave it under its 20 s minimum in a short call's budget
    names = [step.name for step in plan]
    assert names.index("lstm2-graph") < min(
        names.index(bench) for bench in ("bench-seed", "bench-fused-plan", "bench")
    )


@pytest.mark.parametrize("has_pytest_timeout", [True, False])
def test_one_hung_test_fails_alone_and_tracebacks_are_short(
    gpu_check, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, has_pytest_timeout: bool
) -> None:
    """A CUDA call that never returns would otherwise take the test step's whole limit and, with
    ``-q``, every result with it: each test gets its own limit where pytest-timeout is installed (the
    GPU image has it), enforced from a thread; tracebacks are short so that all failures fit the log."""
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        gpu_check.importlib.util,
        "find_spec",
        lambda name, *a: (
            (object() if has_pytest_timeout else None)
            if name == "pytest_timeout"
            else real_find_spec(name, *a)
        ),
    )
    tests = next(
        step for step in gpu_check.build_plan(tmp_path, tmp_path / "c.txt", 8) if step.name == "tests"
    )
    assert "--tb=short" in tests.command
    limit = ["--timeout", "90", "--timeout-method", "thread"]
    joined = " ".join(tests.command)
    assert (" ".join(limit) in joined) is has_pytest_timeout
    # a hung test ends before its step does, so that pytest still prints which one it was
    shortest = min(
        step.limit_s
        for step in gpu_check.build_plan(tmp_path, tmp_path / "c.txt", 8)
        if "pytest" in step.command
    )
    assert shortest >= gpu_check.TEST_TIMEOUT_S + 20
    # without xdist a timed-out test would end the whole session (the thread method exits the process)
    alone = next(
        step for step in gpu_check.build_plan(tmp_path, tmp_path / "c.txt", 1) if step.name == "tests"
    )
    assert "--timeout" not in alone.command and "-n" not in alone.command


def test_every_benchmark_configuration_a_step_names_exists(gpu_check, tmp_path: Path) -> None:
    """A misspelt --configs name would cost a device call; bench.py refuses unknown names, here first."""
    spec = importlib.util.spec_from_file_location("drnn_bench_for_gpu_check", REPO / "scripts" / "bench.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    named = [
        name
        for step in gpu_check.build_plan(tmp_path, tmp_path / "corpus.txt", 8)
        if "--configs" in step.command
        for name in step.command[step.command.index("--configs") + 1].split(",")
    ]
    assert "compiled-lstm-seed" in named and "lstm-seed-fp16-each" in named
    assert set(named) <= set(bench.BENCHMARKS)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_it_says_so_in_one_line(gpu_check, tmp_path: Path, capsys) -> None:
    assert gpu_check.main([str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no CUDA device (torch "), captured.err
    assert captured.out == "" and not (tmp_path / "out").exists()


def test_a_step_past_its_limit_is_killed_with_workers_in_sessions_of_their_own(gpu_check) -> None:
    """torchrun's workers run in new sessions, outside the step's process group, and inherit its
    output pipes: they are killed too, so the check goes on instead of waiting for them forever."""
    worker = "import time; print('worker up', flush=True); time.sleep(120)"
    launcher = (
        "import subprocess, sys, time; "
        f"subprocess.Popen([sys.executable, '-c', {worker!r}], start_new_session=True); time.sleep(120)"
    )
    step = gpu_check.Step("hung", "a launcher whose worker hangs", [sys.executable, "-c", launcher], 2)
    started = time.monotonic()
    result, out, _ = gpu_check.run_step(step, 2.0, dict(os.environ), lambda _: None)
    assert time.monotonic() - started < 20
    assert result.status == "timeout" and "worker up" in out


def test_a_steps_output_reaches_the_log_while_it_runs(gpu_check) -> None:
    """The device tool kills the whole call at its own limit: what the running step printed until then
    must already be in log.txt, stderr's lines marked, an over-long line (bench's growing JSON) cut."""
    printer = (
        "import sys, time; print('first', flush=True); print('x' * 9000, flush=True); "
        "print('warned', file=sys.stderr, flush=True); time.sleep(60)"
    )
    step = gpu_check.Step("slow", "prints, then hangs", [sys.executable, "-c", printer], 60)
    logged: list[tuple[float, str]] = []
    started = time.monotonic()
    result, out, err = gpu_check.run_step(
        step, 3.0, dict(os.environ), lambda text: logged.append((time.monotonic(), text))
    )
    assert result.status == "timeout"
    lines = {text: at - started for at, text in logged}
    assert lines["first\n"] < 3.0 and lines["! warned\n"] < 3.0  # logged before the kill, not after
    assert f"{'x' * 300}… (9,001 characters)\n" in lines
    assert out == "first\n" + "x" * 9000 + "\n" and err == "warned\n"  # the step's own output stays whole


def test_a_missing_package_is_named_with_what_to_carry(gpu_check) -> None:
    assert gpu_check.dependency_problem({"json": "json"}) is None
    problem = gpu_check.dependency_problem({"json": "json", "surely_not_installed_xyz": "pydantic"})
    assert problem.startswith("missing Python packages: pydantic; run scripts/device_wheels.sh")
    assert "\n" not in problem and ".whl" in problem


def test_unknown_step_is_refused(gpu_check, tmp_path: Path, capsys) -> None:
    assert gpu_check.main([str(tmp_path), "--only", "lstm2,nope", "--dry-run"]) == 2
    assert "unknown --only nope" in capsys.readouterr().err


def bench_entry(reference: float, eager: float, graph: float) -> dict:
    modes = {
        "eager": {"tokens_per_s": eager, "ratio": eager / reference, "train_ppl": 1.5},
        "graph": {"tokens_per_s": graph, "ratio": graph / reference, "train_ppl": 1.5},
    }
    return {"reference_tokens_per_s": reference, "reference_train_ppl": 1.5, "modes": modes}


def half_entry(reference: float, fp32_reference: float, eager: float, graph: float) -> dict:
    """A half-precision configuration: its own loop (under autocast) at ``reference``, and the textbook loop
    of its shape in fp32 timed beside it at ``fp32_reference`` (scripts/bench.py's with_fp32_references)."""
    entry = bench_entry(reference, eager, graph)
    for figures in entry["modes"].values():
        figures["ratio_to_fp32_reference"] = figures["tokens_per_s"] / fp32_reference
    return entry | {"fp32_reference": {"tokens_per_s": fp32_reference, "rounds": 3, "from": ["lstm-seed"]}}


def bench_step(gpu_check, name: str, configs: dict, variant: str | None = None) -> object:
    """A benchmark step that measured ``configs``, as run_step leaves it (``variant``: its DRNN_FUSED_LAUNCH)."""
    data: dict = {"json": {"configs": configs}} | ({"variant": variant} if variant else {})
    return gpu_check.StepResult(name, "", "ok", data=data)


def test_verdicts_compare_the_measurements_with_the_targets(gpu_check, tmp_path: Path) -> None:
    Result = gpu_check.StepResult
    configs = {
        "lstm-seed": bench_entry(160_000, 170_000, 900_000),  # graph 5.6×: met
        # 11.1× its own loop under autocast (135,000 tokens/s), 9.4× the loop in fp32, d2l's: missed
        "lstm-seed-bf16": half_entry(135_000, 160_000, 170_000, 1_500_000),
        "lstm-b1024-bf16": bench_entry(5e6, 8e6, 21e6),
        "gru-seed": {"name": "gru-seed", "error": "boom"},
        "fused-lstm-seed-bf16": half_entry(150_000, 160_000, 170_000, 2_500_000),  # 15.6× the fp32 loop: met
        "lstm-b256-bf16": bench_entry(
            1e6, 2e6, 6e6
        ),  # no fp32 loop of its shape: no fp32 ratio in the report
        "fused-gru-seed": bench_entry(200_000, 210_000, 1_300_000),  # 6.5×: met
    }
    fused_row = {"batch": 32, "steps": 35, "hidden": 256, "dtype": "bf16", "tile": "16x16", "programs": 32}
    fused_row |= {
        "persistent": True,
        "cudnn": 900.5,
        "cudnn-graph": 700.0,
        "fused": 300.0,
        "fused-graph": 250.0,
    }
    stack_row = {"input": 128, "dtype": "fp16", "stack": 900.0, "stack-graph": 600.0, "per-layer": 800.0}
    stack_row |= {"per-layer-graph": 300.0, "per-layer-kernels": ["RNN_blockPersist_fp_LSTM", "gemm|x"]}
    samples = {"time traveller": gpu_check.D2L_CONTINUATION, "traveller": "traveller x"}
    graph_step = {"wall_us_per_step": 1250.4, "device_busy_us_per_step": 1100.0, "device_busy_fraction": 0.88}
    graph_step |= {"device_events_per_step": 412.0, "host_ops_per_step": 3.0}
    graph_step["top"] = [{"name": "RNN_blockPersist_fp_LSTM", "per_step": 2.0, "us_per_step": 300.0}]
    profiled = {"drnn-graph": graph_step}
    tile_row = {
        "dtype": "bf16",
        "tile": "32x64",
        "warps": 8,
        "programs": 4,
        "fused-graph": 280.5,
        "barrier-timeout": False,
    }
    results = {
        "lstm2": Result(
            "lstm2",
            "",
            "ok",
            data={"json": {"train_ppl": 1.03, "samples": samples}, "matches_d2l_continuation": True},
        ),
        "lstm2-graph-bf16": Result("lstm2-graph-bf16", "", "ok", data={"json": {"train_ppl": 1.2}}),
        "full-fp32": Result(
            "full-fp32",
            "",
            "ok",
            data={
                "json": {"best_val_ppl": 4.31},
                "seconds_to_4_4": 42.0,
                "evaluations": [{"epoch": 1, "val_ppl": 4.31, "train_ppl": 5.0, "elapsed": 42.0}],
            },
        ),
        "bench": Result("bench", "", "ok", data={"json": {"configs": configs}}),
        "bench-compiled": Result(  # a second benchmark step: its configurations join the first's
            "bench-compiled",
            "",
            "ok",
            data={"json": {"configs": {"compiled-lstm-seed": bench_entry(160_000, 300_000, 560_000)}}},
        ),
        "fused-kernels": Result(
            "fused-kernels", "", "ok", data={"json": {"rows": [fused_row], "stack": [stack_row]}}
        ),
        "profile": Result(
            "profile", "", "ok", data={"json": {"configs": {"lstm-seed": {"sides": profiled}}}}
        ),
        "fused-tiles": Result("fused-tiles", "", "ok", data={"json": {"tiles": [tile_row]}}),
    }
    verdicts = {v.target: v for v in gpu_check.judge(results)}
    assert verdicts["seed LSTM fp32 ≥ 5× the textbook loop"].verdict == "met"
    assert verdicts["seed LSTM fp32 ≥ 5× the textbook loop"].measured.startswith("5.62× (graph")
    bf16 = verdicts["seed LSTM bf16 ≥ 10× the textbook loop (in fp32, as d2l runs it)"]
    assert bf16.verdict == "missed"
    assert (
        bf16.measured == "9.38× (graph: 1,500,000 vs 160,000 tok/s in fp32; 11.11× the loop under autocast)"
    )
    assert verdicts["seed LSTM bf16 (CUDA graph, 500 epochs) final perplexity ≤ 1.1"].verdict == "missed"
    assert verdicts["seed GRU ≥ 5×"].verdict == "not measured"  # the benchmark failed: no figure
    fused_gru = verdicts["seed GRU, impl fused (Triton), fp32 ≥ 5×"]
    assert (fused_gru.measured, fused_gru.verdict) == ("6.50× (graph: 1,300,000 vs 200,000 tok/s)", "met")
    assert verdicts["seed RNN, impl fused (Triton), fp32 ≥ 5×"].verdict == "not measured"
    assert verdicts["B1024×T64 bf16 ≥ 20 M tokens/s"].verdict == "met"
    assert verdicts["lstm2 on the GPU: perplexity ≤ 1.1 and d2l's continuation"].verdict == "met"
    assert verdicts["lstm_full: validation perplexity ≤ 4.4 within 60 s"].verdict == "met"
    assert verdicts["seed LSTM, impl fused (Triton), bf16: aim past 15× (the fp32 loop)"].verdict == "met"
    assert verdicts["seed LSTM, impl fused (Triton), fp32 ≥ 5×"].verdict == "not measured"
    compiled = verdicts["seed LSTM, impl scratch with train.compile on ≥ 3×"]
    assert (compiled.measured, compiled.verdict) == ("3.50× (graph: 560,000 vs 160,000 tok/s)", "met")

    gpu_check.write_outputs(tmp_path, {"gpu": "test"}, "smi", results, 540)
    report = (tmp_path / "report.md").read_text()
    assert (
        "| seed LSTM fp32 ≥ 5× the textbook loop | 5.62× (graph: 900,000 vs 160,000 tok/s) | met |" in report
    )
    assert "| 1 | 4.310 | 5.000 | 42.0 |" in report
    assert "| compiled-lstm-seed | graph | 560,000 | 3.50 |  | 1.500 |" in report
    assert "| lstm-seed-bf16 | graph | 1,500,000 | 11.11 | 9.38 | 1.500 |" in report
    assert "| lstm-b256-bf16 | graph | 6,000,000 | 6.00 |  | 1.500 |" in report
    bench_json = json.loads((tmp_path / "bench.json").read_text())
    assert sorted(bench_json) == ["bench", "bench-compiled"]
    assert "compiled-lstm-seed" in bench_json["bench-compiled"]["configs"]
    assert "| 32 × 35 × 256 | bf16 | 16x16, 32 persistent | 900.5 | 700.0 | 300.0 | 250.0 |  |  |" in report
    assert (
        "| lstm-seed | drnn-graph | 1,250 | 1,100 | 88% | 412 | 3 | RNN_blockPersist_fp_LSTM 300 |" in report
    )
    assert "| 128 | fp16 | 900.0 | 600.0 | 800.0 | 300.0 | RNN_blockPersist_fp_LSTM; gemm/x |" in report
    assert "| bf16 | 32x64 | 8 | 4 | 280.5 | no |" in report
    fused_json = json.loads((tmp_path / "fused.json").read_text())
    assert fused_json["fused-tiles"]["tiles"] == [tile_row] and fused_json["fused-kernels"]["stack"] == [
        stack_row
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "bench.json",
        "fused.json",
        "lstm2.json",
        "lstm_full.json",
        "report.md",
        "results.json",
    ]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens on a machine without CUDA")
def test_cuda_tests_are_collected_and_skipped_cleanly_without_cuda() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-rfEs",
            "-p",
            "no:cacheprovider",
            str(REPO / "tests" / "test_cuda.py"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    summary = done.stdout.strip().splitlines()[-1]
    assert summary.startswith("64 skipped"), done.stdout
    assert done.stdout.count("SKIPPED [") >= 1 and "needs a CUDA device" in done.stdout
    assert "error" not in summary and "passed" not in summary


def test_the_default_graph_is_recognised_by_drnn_own_note(gpu_check) -> None:
    """Step lstm2-graph runs configs/lstm2.yaml as committed and records whether auto chose the graph."""
    from drnn_cli.step import AUTO_GRAPH_NOTE

    assert AUTO_GRAPH_NOTE.startswith(gpu_check.AUTO_GRAPH_NOTE_START)
    step = next(s for s in gpu_check.build_plan(Path("runs"), Path("c.txt"), 1) if s.name == "lstm2-graph")
    assert "train.cuda_graph=on" not in step.command and "train.cuda_graph=off" not in step.command
    result = gpu_check.StepResult("lstm2-graph", "", "ok")
    gpu_check.interpret(step, result, '{"train_ppl": 1.02}', Path("runs"), f"note: {AUTO_GRAPH_NOTE}\n")
    assert result.data["graph_by_default"] is True
    eager = gpu_check.StepResult("lstm2-graph", "", "ok")  # auto kept the eager step: no note
    gpu_check.interpret(step, eager, '{"train_ppl": 1.02}', Path("runs"), "")
    assert eager.data["graph_by_default"] is False


def test_the_fused_variant_is_measured_under_its_own_name(gpu_check) -> None:
    """Step bench-fused-variant runs fused-lstm-seed with DRNN_FUSED_LAUNCH set: its figures stand beside
    the plan's under their own name, so neither overwrites the other (nor counts for the plan's targets)."""
    step = next(
        s for s in gpu_check.build_plan(Path("runs"), Path("c.txt"), 1) if s.name == "bench-fused-variant"
    )
    assert step.env == {"DRNN_FUSED_LAUNCH": "resident,counter,tf32"}
    from drnn_cli.fused_recurrence import launch_from_environment, plan_launch

    planned = plan_launch(32, 256, 132)
    assert launch_from_environment(step.env["DRNN_FUSED_LAUNCH"], planned, 32, 256, 132).resident
    plain, variant = bench_entry(200_000, 300_000, 450_000), bench_entry(200_000, 300_000, 1_200_000)
    results = {
        "bench": bench_step(gpu_check, "bench", {"fused-lstm-seed": plain}),
        "bench-fused-variant": bench_step(
            gpu_check, "bench-fused-variant", {"fused-lstm-seed": variant}, "16x32,counter,tf32"
        ),
    }
    assert gpu_check.bench_configs(results) == {
        "fused-lstm-seed": plain,
        "fused-lstm-seed [16x32,counter,tf32]": variant,
    }


def test_grads_is_measured_on_the_seed_plan_under_its_own_name_and_judged(gpu_check) -> None:
    """Step bench-fused-grads names the variants drnn's plan takes for the seed shape, and grads: on the
    plan it would take anyway (an H100's 132 multiprocessors, TF32 products), the weight gradients alone
    change. Its figures stand under "NAME [WORDS]" beside bench-seed's plan, and have targets of their own."""
    step = next(
        s for s in gpu_check.build_plan(Path("runs"), Path("c.txt"), 1) if s.name == "bench-fused-grads"
    )
    from drnn_cli.fused_recurrence import (
        KernelCell,
        kernel_constants,
        launch_from_environment,
        plan_launch,
        with_tuned_variants,
    )

    words = step.env["DRNN_FUSED_LAUNCH"]
    for cell, gates in (("lstm", 4), ("gru", 3), ("rnn", 1)):
        plain = plan_launch(32, 256, 132, layers=2, gates=gates)  # no products given: no variant taken
        planned = with_tuned_variants(plain, 256, 2, "tf32", 232_448)
        asked = launch_from_environment(words, plain, 32, 256, 132, 2, 232_448)
        assert asked == dataclasses.replace(planned, gradient_products=True), cell
        # bf16 (fused-lstm-seed-bf16): the words name tf32, which multiplies nothing in half precision
        half = with_tuned_variants(plain, 256, 2, "half", 232_448)
        assert asked == dataclasses.replace(half, gradient_products=True, tf32=True), cell
        kernel = KernelCell(cell)
        assert kernel_constants(asked, False, cell=kernel) == kernel_constants(half, False, cell=kernel)
    seed, grads = bench_entry(200_000, 300_000, 1_100_000), bench_entry(200_000, 300_000, 1_250_000)
    half = bench_entry(150_000, 300_000, 1_600_000)  # a bf16 row whose step timed no fp32 loop of its shape
    grads_configs = {"fused-gru-seed": grads, "fused-lstm-seed-bf16": half}
    results = {
        "bench-seed": bench_step(gpu_check, "bench-seed", {"fused-gru-seed": seed}),
        "bench-fused-grads": bench_step(gpu_check, "bench-fused-grads", grads_configs, words),
    }
    assert gpu_check.bench_configs(results) == {
        "fused-gru-seed": seed,
        f"fused-gru-seed [{words}]": grads,
        f"fused-lstm-seed-bf16 [{words}]": half,
    }
    verdicts = {v.target: v for v in gpu_check.judge(results)}
    assert verdicts["seed GRU, impl fused with grads, fp32 ≥ 5×"].verdict == "met"  # 6.25×
    assert verdicts["seed GRU, impl fused (Triton), fp32 ≥ 5×"].verdict == "met"  # 5.5×, the plan's
    # 10.67× its loop under autocast is no verdict on a target set against d2l's fp32 loop
    unjudged = verdicts["seed LSTM, impl fused with grads, bf16 ≥ 10× (the fp32 loop)"]
    assert (unjudged.measured, unjudged.verdict) == (
        "10.67× the loop under autocast; no fp32 loop of its shape timed",
        "not measured",
    )
    # what grads changes is read in graph tokens/s, not in ratios to loops timed in two processes
    assert gpu_check.grads_lines(results)[-1] == (
        "| fused-gru-seed | 1,100,000 | 1,250,000 | +13.6% | faster |"
    )
    results["bench-fused-grads"].data["json"]["configs"]["fused-gru-seed"] = bench_entry(
        150_000, 1, 1_130_000
    )
    assert gpu_check.grads_lines(results)[-1].endswith(
        "| +2.7% | within the noise |"
    )  # the loop's 25% swing aside


def test_the_variant_measured_in_whole_steps_is_the_sweeps_fastest_in_bf16(gpu_check) -> None:
    """cuDNN's rows (no programs), fp32 rows and refused variants do not count; the winner's name becomes
    DRNN_FUSED_LAUNCH words (its warps and "wide-k" have none), with TF32 for the fp32 configuration."""
    rows = [
        {"dtype": "bf16", "tile": "cudnn", "programs": 0, "fused-graph": 300.0},
        {"dtype": "bf16", "tile": "16x16 4w", "programs": 32, "fused-graph": 520.0},
        {"dtype": "bf16", "tile": "16x32 resident counter 8w", "programs": 16, "fused-graph": 410.5},
        {"dtype": "bf16", "tile": "16x16 resident", "programs": 32, "fused-graph": "OutOfResources: shared"},
        {"dtype": "fp32", "tile": "16x16 counter tf32", "programs": 32, "fused-graph": 200.0},
    ]
    from drnn_cli.fused_recurrence import LAUNCH_WORDS

    assert tuple(LAUNCH_WORDS) == gpu_check.VARIANT_WORDS  # the words drnn reads
    tiles = gpu_check.StepResult("fused-tiles", "", "ok", data={"json": {"tiles": rows}})
    assert gpu_check.best_variant(tiles) == "16x32,resident,counter,tf32"
    from drnn_cli.fused_recurrence import launch_from_environment, plan_launch

    launch = launch_from_environment("16x32,resident,counter,tf32", plan_launch(32, 256, 132), 32, 256, 132)
    assert (launch.block_h, launch.resident, launch.counter_barrier, launch.tf32) == (32, True, True, True)
    assert (
        gpu_check.best_variant(
            gpu_check.StepResult("fused-tiles", "", "ok", data={"json": {"tiles": rows[:1]}})
        )
        is None
    )
    assert gpu_check.best_variant(None) is None


def test_the_two_layer_stacks_fastest_bf16_variant_decides_when_the_sweep_timed_stacks(gpu_check) -> None:
    """The stack rows time what a training step runs (both layers, one wavefront or one after the
    other), so they decide over the one-layer rows; cuDNN's, fp32, failed and timed-out rows do not count."""
    stacks = [
        {"dtype": "bf16", "variant": "cudnn", "graph": 400.0},
        {"dtype": "bf16", "variant": "16x16", "graph": 980.0},
        {"dtype": "bf16", "variant": "16x16,wavefront,resident,counter", "graph": 610.2},
        {"dtype": "bf16", "variant": "32x16,wavefront,counter", "graph": "OutOfResources: shared"},
        # a barrier that gave up stops waiting at every later one: the fastest row, and a wrong one
        {"dtype": "bf16", "variant": "16x16,wavefront", "graph": 1.0, "barrier-timeout": True},
        {"dtype": "fp32", "variant": "16x32,wavefront,counter,tf32", "graph": 500.0},
    ]
    layer_rows = [
        {"dtype": "bf16", "tile": "16x32 counter", "warps": 4, "programs": 16, "fused-graph": 300.0}
    ]
    sweep = {"tiles": layer_rows, "stack-tiles": stacks}
    tiles = gpu_check.StepResult("fused-tiles", "", "ok", data={"json": sweep})
    assert gpu_check.best_variant(tiles) == "16x16,resident,counter,wavefront,tf32"
    report = gpu_check.tile_lines(tiles)  # report.md's table of the stack rows, after the layer's
    assert "| bf16 | 16x16,wavefront,resident,counter | 610.2 |" in report
    assert report.index("| bf16 | cudnn | 400.0 |") > report.index(
        "| bf16 | 16x32 counter | 4 | 16 | 300.0 | no |"
    )
    without_stacks = {"tiles": layer_rows, "stack-tiles": stacks[:1]}
    assert gpu_check.best_variant(
        gpu_check.StepResult("fused-tiles", "", "ok", data={"json": without_stacks})
    ) == ("16x32,counter,tf32")
    from drnn_cli.fused_recurrence import launch_from_environment, plan_launch

    launch = launch_from_environment(
        "16x16,resident,counter,wavefront,tf32", plan_launch(32, 256, 132), 32, 256, 132, layers=2
    )
    assert (launch.layers, launch.resident, launch.counter_barrier, launch.tf32, launch.programs) == (
        2,
        True,
        True,
        True,
        64,
    )


def test_batch_1024_trains_through_the_fastest_variants_words_without_its_tile_or_resident(
    gpu_check, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Step bench-fused-b1024 times the batch-1024 target's shape through the fused kernels: the sweep's
    tile is sized for batch 32 (1,024 programs a layer at batch 1024) and resident cannot hold 64
    units' weights, so both are dropped and the plan grows the tiles until the stack fits."""
    step = next(
        s for s in gpu_check.build_plan(Path("runs"), Path("c.txt"), 1) if s.name == "bench-fused-b1024"
    )
    assert step.env == {"DRNN_FUSED_LAUNCH": "wavefront,counter"}
    assert "lstm-b1024-bf16,fused-lstm-b1024-bf16" in step.command
    assert gpu_check.big_variant("16x16,resident,counter,wavefront,tf32") == "counter,wavefront,tf32"
    assert gpu_check.big_variant("16x32,counter,tf32") == "counter,tf32"
    assert gpu_check.big_variant(None) == "wavefront,counter"
    from drnn_cli.errors import DrnnError
    from drnn_cli.fused_recurrence import LAUNCH_ENV, plan_launch

    monkeypatch.setenv(LAUNCH_ENV, "counter,wavefront,tf32")
    launch = plan_launch(1024, 256, 132, layers=2)
    assert (launch.layers, launch.block_b, launch.block_h, launch.programs, launch.persistent) == (
        2,
        64,
        64,
        128,
        True,
    )
    monkeypatch.setenv(LAUNCH_ENV, "counter,wavefront,resident")
    with pytest.raises(DrnnError, match="512 KiB of weights per program"):
        plan_launch(1024, 256, 132, layers=2)

    Result = gpu_check.StepResult
    cudnn, fused = bench_entry(5e6, 8e6, 17e6), bench_entry(5e6, 9e6, 24e6)
    results = {
        "bench-fused-b1024": Result(
            "bench-fused-b1024",
            "",
            "ok",
            data={
                "json": {"configs": {"lstm-b1024-bf16": cudnn, "fused-lstm-b1024-bf16": fused}},
                "variant": "counter,wavefront,tf32",
            },
        )
    }
    assert gpu_check.bench_configs(results) == {
        "lstm-b1024-bf16": cudnn,  # cuDNN's call, beside the variant in the same process
        "fused-lstm-b1024-bf16 [counter,wavefront,tf32]": fused,
    }
    verdicts = {v.target: v for v in gpu_check.judge(results)}
    plain = verdicts["B1024×T64 bf16 ≥ 20 M tokens/s"]
    assert (plain.measured, plain.verdict) == ("17.00 M (graph)", "missed")
    through_fused = verdicts["B1024×T64 bf16, impl fused (Triton) ≥ 20 M tokens/s"]
    assert (through_fused.measured, through_fused.verdict) == ("24.00 M (graph)", "met")
    # bench-fused-plan times it as planned, under its plain name: that figure is judged when no variant ran
    planned = {"bench-fused-plan": Result("bench-fused-plan", "", "ok", data={"json": {"configs": {
        "lstm-b1024-bf16": cudnn, "fused-lstm-b1024-bf16": bench_entry(5e6, 9e6, 9e6)}}})}  # fmt: skip
    through_fused = {v.target: v for v in gpu_check.judge(planned)}[
        "B1024×T64 bf16, impl fused (Triton) ≥ 20 M tokens/s"
    ]
    assert (through_fused.measured, through_fused.verdict) == ("9.00 M (eager)", "missed")


def test_the_short_calls_suite_runs_only_when_named(gpu_check, tmp_path: Path, capsys) -> None:
    """tests-cuda (the CUDA tests with the CPU tests of the code they drive) stands in for the whole
    suite in a short call; the whole plan runs the whole suite and not this one as well."""
    assert gpu_check.main([str(tmp_path / "out"), "--dry-run"]) == 0
    assert "  tests-cuda " not in capsys.readouterr().out
    assert gpu_check.main([str(tmp_path / "out"), "--dry-run", "--only", "tests-cuda,fused-tiles"]) == 0
    plan = capsys.readouterr().out
    assert "  tests-cuda " in plan and "tests/test_cuda.py tests/test_step.py tests/test_fused.py" in plan
    step = next(s for s in gpu_check.build_plan(tmp_path, tmp_path / "c.txt", 1) if s.name == "tests-cuda")
    result = gpu_check.StepResult("tests-cuda", "", "failed")
    gpu_check.interpret(step, result, "....F\n1 failed, 150 passed, 2 skipped in 40.00s\n", tmp_path)
    assert (result.data["failed"], result.data["passed"], result.note) == (
        1,
        150,
        "1 failed, 150 passed, 2 skipped in 40.00s",
    )
