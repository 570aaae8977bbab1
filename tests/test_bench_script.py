"""scripts/bench.py: a tiny configuration and a tiny data-scale run produce the promised JSON."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("drnn_bench_script", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def test_training_benchmark_reports_both_loops_and_their_ratio(bench, corpus_path, capsys):
    tiny = ["data.max_tokens=800", "data.batch_size=4", "data.num_steps=8", "model.hidden_size=8"]
    argv = ["--device", "cpu", "--configs", "lstm-seed,lstm-b1024-bf16", "--rounds", "1"]
    argv += ["--epochs-per-round", "1", "--corpus", str(corpus_path), "--json"]
    assert bench.main(argv + [arg for override in tiny for arg in ("--set", override)]) == 0
    report = last_json(capsys.readouterr().out)
    entry = report["configs"]["lstm-seed"]
    for key in ("device", "torch", "config", "drnn_tokens_per_s", "reference_tokens_per_s", "ratio"):
        assert key in entry
    assert entry["device"] == "cpu" and entry["config"]["hidden_size"] == 8
    assert entry["ratio"] == pytest.approx(entry["drnn_tokens_per_s"] / entry["reference_tokens_per_s"])
    # Same initial weights, same minibatches, same arithmetic: the two loops agree on perplexity.
    assert entry["drnn_train_ppl"] == pytest.approx(entry["reference_train_ppl"], rel=1e-4)
    assert "GPU" in report["configs"]["lstm-b1024-bf16"]["skipped"]
    # On a CPU drnn runs eagerly only; the top-level figures are that mode's.
    assert list(entry["modes"]) == ["eager"]
    assert entry["modes"]["eager"]["ratio"] == entry["ratio"]
    assert entry["modes"]["eager"]["tokens_per_s"] == entry["drnn_tokens_per_s"]


def test_a_failing_configuration_is_reported_and_each_one_prints_the_report_so_far(
    bench, corpus_path, capsys, monkeypatch
):
    """A Triton compile error is no RuntimeError; it ends its configuration only. With --json the
    report so far is printed after every configuration, so a run cut off by a time limit still
    leaves a JSON line with what it measured (scripts/gpu_check.py reads the last one)."""

    class TritonLikeError(Exception):  # triton.errors.TritonError derives from Exception
        pass

    real = bench.bench_config

    def flaky(spec, *args, **kwargs):
        if spec.name == "gru-seed":
            raise TritonLikeError("out of resource: shared memory\nmore detail")
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(bench, "bench_config", flaky)
    tiny = ["data.max_tokens=800", "data.batch_size=4", "data.num_steps=8", "model.hidden_size=8"]
    argv = ["--device", "cpu", "--configs", "gru-seed,lstm-seed", "--rounds", "1", "--epochs-per-round", "1"]
    argv += ["--corpus", str(corpus_path), "--json"]
    assert bench.main(argv + [arg for override in tiny for arg in ("--set", override)]) == 0
    reports = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    # after each of the two configurations: the second is the whole report, not printed again
    assert [sorted(r["configs"]) for r in reports] == [["gru-seed"], ["gru-seed", "lstm-seed"]]
    failed = reports[-1]["configs"]["gru-seed"]
    assert failed["error"] == "TritonLikeError: out of resource: shared memory"
    assert reports[-1]["configs"]["lstm-seed"]["ratio"] > 0


def test_the_gpu_plan_lists_every_configuration_in_both_modes_without_a_gpu(bench, capsys):
    assert bench.main(["--device", "cuda", "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "training benchmark on cuda: drnn modes eager, graph against the reference loop"
    planned = {line.split()[0]: line for line in lines[1:]}
    # Every configuration but the compiling one, which is asked for by name (its own gpu_check step).
    assert set(planned) == set(bench.BENCHMARKS) - {"compiled-lstm-seed"}
    for name in ("lstm-seed", "gru-seed-bf16", "rnn-seed-bf16", "scratch-lstm-seed", "lstm-b1024-bf16"):
        assert planned[name].endswith("reference, drnn-eager, drnn-graph"), planned[name]


def test_the_compiled_configuration_runs_when_named(bench, capsys):
    assert bench.main(["--device", "cuda", "--dry-run", "--configs", "compiled-lstm-seed"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[1].split()[0] == "compiled-lstm-seed"
    assert lines[1].endswith("reference, drnn-eager, drnn-graph"), lines[1]


def test_a_cuda_graph_on_a_cpu_is_refused(bench, capsys):
    assert bench.main(["--device", "cpu", "--modes", "graph", "--dry-run"]) != 0
    assert "--modes graph needs a CUDA device" in capsys.readouterr().err


def test_unknown_configuration_is_one_line_error(bench, capsys):
    assert bench.main(["--device", "cpu", "--configs", "lstm-seed,nope"]) != 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"error: unknown --configs nope; choose from: {', '.join(bench.BENCHMARKS)}\n"


def test_data_scale_benchmark_measures_a_fresh_process(bench, corpus_path, capsys):
    argv = ["--data-scale", "0.5", "--preprocess", "d2l", "--corpus", str(corpus_path), "--json"]
    assert bench.main(argv) == 0
    report = last_json(capsys.readouterr().out)
    result = report["results"]["d2l"]
    assert report["file_bytes"] <= 0.5 * (1 << 20) and result["vocab_size"] == 28
    assert result["seconds"] > 0 and result["peak_rss_mib"] >= result["baseline_rss_mib"] > 0
    assert result["cached"] is False and result["cached_seconds"] > 0  # under 1 MiB: never cached


def measured(precision: str, impl: str, batch: int, reference_rounds: list[float], modes: dict) -> dict:
    """A configuration's entry as bench_config reports it (its own reference at 100 tokens/s)."""
    config = {"cell": "lstm", "impl": impl, "batch_size": batch, "num_steps": 35, "precision": precision}
    figures = {
        mode: {"tokens_per_s": rate, "ratio": rate / 100.0, "train_ppl": 1.5} for mode, rate in modes.items()
    }
    entry = {"config": config, "reference_tokens_per_s": 100.0, "reference_rounds": reference_rounds}
    return entry | {"reference_train_ppl": 1.5, "rounds": 1, "epochs_per_round": 1, "modes": figures}


def test_half_precision_is_also_set_against_the_textbook_loop_in_fp32(bench, capsys):
    """d2l's loop runs in fp32; a bf16 configuration's own reference runs under autocast (slower on a
    GPU), so its ratio to the fp32 loop of the same shape, timed in the same run, is reported too: the
    median of every fp32 round of that shape, whatever drnn's impl was (the loop does not use it)."""
    configs = {
        "lstm-seed": measured("fp32", "torch", 32, [200.0, 210.0, 190.0], {"graph": 1000.0}),
        "fused-lstm-seed": measured("fp32", "fused", 32, [205.0, 180.0, 220.0], {"graph": 1200.0}),
        "lstm-seed-bf16": measured("bf16", "torch", 32, [150.0], {"eager": 405.0, "graph": 2025.0}),
        "lstm-b256-bf16": measured("bf16", "torch", 256, [1000.0], {"graph": 5000.0}),
        "gru-seed": {"name": "gru-seed", "error": "boom"},
    }
    widened = bench.with_fp32_references(configs)
    half = widened["lstm-seed-bf16"]
    # rounds 180, 190, 200, 205, 210, 220: the median is (200 + 205) / 2
    assert half["fp32_reference"] == {
        "tokens_per_s": 202.5,
        "rounds": 6,
        "from": ["lstm-seed", "fused-lstm-seed"],
    }
    assert half["modes"]["graph"]["ratio_to_fp32_reference"] == pytest.approx(10.0)
    assert half["modes"]["eager"]["ratio_to_fp32_reference"] == pytest.approx(2.0)
    assert half["modes"]["graph"]["ratio"] == 20.25  # against its own loop, under autocast, as before
    # no fp32 configuration of batch 256 ran: nothing to set it against; fp32 and failed entries as they were
    assert "fp32_reference" not in widened["lstm-b256-bf16"]
    assert widened["lstm-seed"] == configs["lstm-seed"] and widened["gru-seed"] == configs["gru-seed"]
    assert "fp32_reference" not in configs["lstm-seed-bf16"]  # the measured entries are left alone
    report = {"benchmark": "training", "device": "cpu", "torch": "2.13", "threads": 1, "configs": widened}
    bench.render(report, to_stderr=False)
    table = capsys.readouterr().out
    rows = {cells[0]: cells[1:] for cells in table_cells(table)}
    assert rows["lstm-seed-bf16 (graph)"] == ["2,025", "100", "20.25×", "10.00×", "1.50", "1.50", "1×1"]
    assert rows["lstm-seed (graph)"] == [
        "1,000",
        "100",
        "10.00×",
        "",
        "1.50",
        "1.50",
        "1×1",
    ]  # fp32: no column


def table_cells(table: str) -> list[list[str]]:
    """The cells of each body row of a rich table as text."""
    return [
        [cell.strip() for cell in line.split("│")[1:-1]]
        for line in table.splitlines()
        if line.startswith("│")
    ]


def test_busy_time_counts_overlapping_kernels_once(bench):
    # 0-10 and 5-15 overlap (15 µs together), 20-30 stands alone, 22-25 lies inside it
    assert bench.busy_microseconds([(20, 30), (0, 10), (5, 15), (22, 25)]) == 25
    assert bench.busy_microseconds([]) == 0


def test_profile_says_where_a_step_goes_for_each_side(bench, corpus_path, capsys):
    tiny = ["data.max_tokens=300", "data.batch_size=4", "data.num_steps=8", "model.hidden_size=16"]
    argv = ["--device", "cpu", "--profile", "--configs", "lstm-seed,scratch-lstm-seed", "--threads", "1"]
    argv += ["--warmup-epochs", "1", "--epochs-per-round", "1", "--corpus", str(corpus_path), "--json"]
    assert bench.main(argv + [arg for override in tiny for arg in ("--set", override)]) == 0
    report = last_json(capsys.readouterr().out)
    assert report["benchmark"] == "profile"
    plain, scratch = (report["configs"][name]["sides"] for name in ("lstm-seed", "scratch-lstm-seed"))
    assert set(plain) == {"drnn-eager", "reference"}
    for figures in (*plain.values(), *scratch.values()):
        assert figures["steps"] == 9  # (300 − 1) // (4 × 8) minibatches in one epoch
        assert figures["wall_us_per_step"] > 0 and figures["tokens_per_s"] > 0
        assert figures["device_busy_us_per_step"] is None and figures["device_events_per_step"] == 0  # a CPU
        assert figures["top"] and all(entry["per_step"] > 0 for entry in figures["top"])
        # every operator is kept, the costliest first; "top" is the head of that list
        assert figures["all"][: len(figures["top"])] == figures["top"]
        assert len(figures["all"]) > len(figures["top"])
        times = [entry["us_per_step"] for entry in figures["all"]]
        assert times == sorted(times, reverse=True)
    # nn.LSTM runs a layer as one operator; the scratch cells step it timestep by timestep (8 here),
    # forward and backward, a few element-wise operators and a matrix product each way
    plain_ops, scratch_ops = (side["drnn-eager"]["computing_ops_per_step"] for side in (plain, scratch))
    assert scratch_ops > 3 * plain_ops > 0
